"""scripts/vllm_draft_sim.py without a model: vLLM's ngram rule, the replay, the bounds and the table."""

import argparse
import math

import pytest
from stats_helpers import IdTokenizer

from refdecode import DraftTree
from scripts.vllm_draft_sim import (
    METHODS,
    StepCost,
    deepest_agreeing_path,
    longest_copy,
    ngram_draft,
    parse_args,
    replay,
    simulate,
    table,
)


def test_ngram_takes_the_longest_suffix_from_4_down_to_2_at_its_earliest_occurrence():
    # the 3-token suffix [1, 2, 3] occurred at 0 (no 4-token suffix occurred): what followed it there
    assert ngram_draft([1, 2, 3, 9, 8, 1, 2, 3], k=3) == [9, 8, 1]
    # only the 2-token suffix [5, 6] occurred, twice: the earliest occurrence wins
    assert ngram_draft([5, 6, 7, 5, 6, 8, 4, 5, 6], k=2) == [7, 5]
    # a longer suffix beats an earlier shorter one
    assert ngram_draft([7, 8, 1, 0, 8, 1, 2, 9, 0, 8, 1], k=1) == [2]
    # never past the context's end, and never from a one-token match
    assert ngram_draft([4, 5, 4, 5], k=8) == [4, 5]
    assert ngram_draft([1, 2, 3, 1], k=4) == []
    assert ngram_draft([1], k=4) == []


def test_longest_copy_finds_the_longest_prefix_anywhere():
    assert longest_copy([[9, 1, 2, 8], [1, 2, 3, 0]], [1, 2, 3, 4]) == 3
    assert longest_copy([[5, 5]], [1, 2]) == 0
    assert longest_copy([[]], [1]) == 0
    assert longest_copy([[1, 2]], []) == 0


def test_deepest_agreeing_path_follows_the_truth_down_the_tree():
    #        root -> 1 -> 2 -> 3
    #             \-> 1? no: siblings 1 and 4; under 4: 5
    tree = DraftTree(tokens=[1, 4, 2, 5, 3, 7], parents=[-1, -1, 0, 1, 2, 2])
    assert deepest_agreeing_path(tree, [1, 2, 3, 3]) == 3
    assert deepest_agreeing_path(tree, [1, 2, 7]) == 3
    assert deepest_agreeing_path(tree, [4, 5, 6]) == 2
    assert deepest_agreeing_path(tree, [6]) == 0
    assert deepest_agreeing_path(tree, []) == 0


def test_step_cost_shape():
    cost = StepCost(jump=0.25, per_token=0.02)
    assert cost(1) == 1.0
    assert cost(2) == pytest.approx(1.25)
    assert cost(9) == pytest.approx(1.25 + 7 * 0.02)


def test_replay_with_a_perfect_drafter_commits_k_plus_one_per_step():
    prompt, output, k = [1, 2], list(range(10, 40)), 4
    cost = StepCost(jump=0.5, per_token=0.0)
    result = replay(prompt, output, lambda _context, future: list(future[:k]), cost)
    assert result["tokens"] == len(output) - 1
    assert result["steps"] == math.ceil((len(output) - 1) / (k + 1))
    assert result["units"] == pytest.approx(1.5 * result["steps"])
    # and without drafts, one token per step at cost 1
    plain = replay(prompt, output, lambda _context, _future: [], cost)
    assert plain["steps"] == plain["tokens"] == plain["units"] == len(output) - 1


def sim_args(**kw):
    base = {"k": 8, "jump": 0.25, "per_token": 0.02, "model": "stand-in"}
    return argparse.Namespace(**{**base, **kw})


def test_simulate_on_a_copied_reference():
    """A reference the output copies but the prompt never shows: ngram has nothing to copy, refdecode drafts from the
    reference, and both bounds commit more than one token per step."""
    reference = list(range(100, 180))
    requests = [
        {
            "id": "copy/0",
            "workload": "code-edit-ref",
            "prompt": [5, 6, 7] + reference[:4],
            "output": reference[4:60],
            "references": [" ".join(map(str, reference))],
        }
    ]
    totals = simulate(requests, IdTokenizer(1000), sim_args())
    rows = {m: totals[("code-edit-ref", m)] for m in METHODS}
    assert all(r["tokens"] == 55 for r in rows.values())
    assert rows["ngram"]["steps"] == 55 and rows["ngram"]["drafted"] == 0
    assert rows["refdecode"]["steps"] < 20
    assert rows["best-candidate"]["steps"] < 20 and rows["copy-oracle"]["steps"] < 20
    text = table(totals, sim_args())
    assert text.count("| code-edit-ref |") == 1 and "refdecode / ngram" in text


@pytest.mark.parametrize("argv", [["--n", "0"], ["--k", "0"], ["--jump", "-1"], ["--workloads", "summarize"]])
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit):
        parse_args(argv)
