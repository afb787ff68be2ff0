"""scripts/prophet_bound.py without a model: the free-verification replay of chains, trees, recycling and copies."""

import argparse

import pytest

from scripts.prophet_bound import METHODS, TOP, parse_args, replay, table


def request(prompt: list[int], output: list[int]) -> dict:
    """A replayed request whose stored rows say the model's greedy token first (as the real rows do), then fillers."""
    fillers = [90 + i for i in range(TOP)]
    top_ids = [[t] + [f for f in fillers if f != t][: TOP - 1] for t in output]
    top_probs = [[0.6] + [0.4 / TOP] * (TOP - 1) for _ in output]
    return {
        "id": "r",
        "workload": "w",
        "prompt": prompt,
        "output": output,
        "references": [],
        "top_ids": top_ids,
        "top_probs": top_probs,
    }


def args(**kw) -> argparse.Namespace:
    base = dict(k=16, recycle_nodes=24)
    base.update(kw)
    return argparse.Namespace(**base)


def test_a_verbatim_copy_is_committed_in_one_step_by_every_copying_method():
    output = [10, 11, 12, 13, 14, 15, 16, 17]
    r = request([5, 9, 10, 11, 12, 13, 14, 15, 16, 17, 3, 9], output)
    for method in ("chain", "tree", "tree+recycle", "copy-oracle"):
        assert replay(r, method, args(), None) == (7, 1), method


def test_recycle_drafts_what_the_model_predicted_after_a_token_before():
    """A cycle the prompt never showed: recycling knows nothing in the first round, then each token's successor
    (recorded from the rows of the committed path) drafts a long chain through the cycle."""
    output = [20, 21, 22, 23] * 8
    r = request([1, 2, 3], output)
    tokens, steps = replay(r, "recycle", args(), None)
    assert tokens == len(output) - 1
    assert steps <= 8  # 4 steps to learn the cycle, then K = 16 tokens at a time
    assert replay(r, "recycle", args(k=2), None)[1] > steps  # never deeper than K


def test_nothing_to_copy_and_nothing_recorded_is_one_token_per_step():
    output = [30, 31, 32, 33, 34]
    r = request([1, 2], output)
    for method in METHODS:
        assert replay(r, method, args(), None) == (4, 4), method


def test_the_table_gives_tokens_per_step_and_ratios_against_the_chain():
    totals = {"w": {m: [8, 4] for m in METHODS}}
    totals["w"]["tree"] = [8, 2]
    text = table(totals, argparse.Namespace(k=16, recycle_nodes=24, n=1, seed=1, max_tokens=8))
    assert (
        "| w | 2.00 | 4.00 | 2.00 | 2.00 | 2.00 | 2.00 | 2.00 | 2.00x | 1.00x | 1.00x | 1.00x | 1.00x | 1.00x |" in text
    )


@pytest.mark.parametrize("flag", ["--n", "--k", "--recycle-nodes", "--max-tokens"])
def test_parse_args_refuses_counts_below_one(flag):
    with pytest.raises(SystemExit):
        parse_args([flag, "0"])


def test_wide_tree_keeps_the_most_frequent_continuations_of_every_suffix():
    from scripts.prophet_bound import wide_tree
    from scripts.vllm_draft_sim import deepest_agreeing_path

    # the last token 7 was followed by 8 twice and by 9 once; the suffix [6, 7] by 8 once
    context = [6, 7, 8, 1, 7, 8, 2, 7, 9, 6, 7]
    tree = wide_tree([context], k=2, nodes=2)
    assert tree.parents == [-1, -1] or tree.parents == [-1, 0]
    assert tree.tokens[0] == 8  # the most frequent first token first
    assert deepest_agreeing_path(wide_tree([context], k=2, nodes=8), [9, 6]) == 2
    assert all(p < i for i, p in enumerate(wide_tree([context, [7, 5, 5]], k=3, nodes=8).parents))
    assert len(wide_tree([[1, 2, 3]], k=2, nodes=8)) == 0  # no suffix occurred earlier
