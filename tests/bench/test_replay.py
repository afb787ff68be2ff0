"""refdecode.bench.replay without a model: the replay loop, vLLM's ngram rule, the free-verification bounds of
chains, trees, recycling and copies, the policy replay under fixed costs, the tables and the command line."""

import argparse
import json
import math
import types

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from stats_helpers import IdTokenizer

from refdecode import DraftTree
from refdecode.bench.replay import (
    BOUND_METHODS,
    COSTS,
    TOP,
    VLLM_METHODS,
    FixedCosts,
    StepCost,
    agreeing_path,
    bound_table,
    candidate_runs,
    cheapest_schedule,
    copy_runs,
    cost_bound_table,
    cost_bounds,
    draft_runs,
    feature_oracle,
    longest_copy,
    ngram_draft,
    parse_args,
    parse_costs,
    parse_widths,
    replay,
    replay_bound,
    replay_policy,
    simulate_vllm,
    span_kind,
    vllm_table,
    wide_tree,
)
from refdecode.policy import CALIBRATED_WIDTHS


def deepest_agreeing_path(tree, truth) -> int:
    return len(agreeing_path(tree, truth))


# the replay core


def test_longest_copy_finds_the_longest_prefix_anywhere():
    assert longest_copy([[9, 1, 2, 8], [1, 2, 3, 0]], [1, 2, 3, 4]) == 3
    assert longest_copy([[5, 5]], [1, 2]) == 0
    assert longest_copy([[]], [1]) == 0
    assert longest_copy([[1, 2]], []) == 0


def test_a_matched_copy_must_follow_the_given_tokens_in_the_same_text():
    texts = [[7, 1, 2, 3, 9], [8, 1, 2, 3, 4], [1, 2, 3, 4, 5]]
    assert longest_copy(texts, [1, 2, 3, 4, 5]) == 5  # anywhere: the third text, which nothing precedes
    assert longest_copy(texts, [1, 2, 3, 4, 5], after=[8]) == 4
    assert longest_copy(texts, [1, 2, 3, 4, 5], after=[7]) == 3
    assert longest_copy(texts, [1, 2, 3, 4, 5], after=[6]) == 0
    assert longest_copy([[5, 8, 1, 2]], [1, 2], after=[5, 8]) == 2


@settings(max_examples=60, deadline=None)
@given(
    texts=st.lists(st.lists(st.integers(1, 4), max_size=20), min_size=1, max_size=3),
    truth=st.lists(st.integers(1, 4), max_size=8),
    after=st.lists(st.integers(1, 4), max_size=2),
)
def test_longest_copy_agrees_with_brute_force(texts, truth, after):
    best = 0
    for text in texts:
        for start in range(len(text)):
            if start >= len(after) and text[start - len(after) : start] == after:
                n = 0
                while n < len(truth) and start + n < len(text) and text[start + n] == truth[n]:
                    n += 1
                best = max(best, n)
    assert longest_copy(texts, truth, after) == best


def test_deepest_agreeing_path_follows_the_truth_down_the_tree():
    #        root -> 1 -> 2 -> 3
    #             \-> 1? no: siblings 1 and 4; under 4: 5
    tree = DraftTree(tokens=[1, 4, 2, 5, 3, 7], parents=[-1, -1, 0, 1, 2, 2])
    assert deepest_agreeing_path(tree, [1, 2, 3, 3]) == 3
    assert deepest_agreeing_path(tree, [1, 2, 7]) == 3
    assert deepest_agreeing_path(tree, [4, 5, 6]) == 2
    assert deepest_agreeing_path(tree, [6]) == 0
    assert deepest_agreeing_path(tree, []) == 0
    # the nodes themselves, root side first
    assert agreeing_path(tree, [1, 2, 7]) == [0, 2, 5]
    assert agreeing_path(tree, [4, 5]) == [1, 3]


def test_step_cost_shape():
    cost = StepCost(jump=0.25, per_token=0.02)
    assert cost(1) == 1.0
    assert cost(2) == pytest.approx(1.25)
    assert cost(9) == pytest.approx(1.25 + 7 * 0.02)


def test_fixed_costs_ignore_timings():
    costs = FixedCosts(dict(COSTS["cpu"]))
    before = [costs.cost(w) for w in (1, 2, 3, 8, 64)]
    costs.observe(2, 100.0)
    assert [costs.cost(w) for w in (1, 2, 3, 8, 64)] == before
    assert costs.cost(2) == 1.6


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


def test_replay_pays_for_every_node_of_a_tree_and_commits_its_agreeing_path():
    """A tree's width is all its nodes; what it commits is its deepest agreeing path plus the model's token, and the
    observer sees the context grow by exactly those tokens."""
    output = [10, 11, 12, 13, 14, 15]
    seen = []

    def draft(context, future):
        seen.append(list(context))
        # the right token and a wrong sibling at the first level, the right one below the right one
        return DraftTree(tokens=[future[0], 99, future[1]], parents=[-1, -1, 0]) if len(future) > 1 else []

    observed = []
    result = replay([1, 2], output, draft, lambda width: float(width), lambda g, p, c: observed.append((p, c)))
    assert observed == [([0, 2], [11, 12, 13]), ([0, 2], [14, 15])]
    assert seen == [[1, 2, 10], [1, 2, 10, 11, 12, 13]]
    assert result == {"tokens": 5, "steps": 2, "units": 8.0, "drafted": 6}


# vllm: the ngram rule and the simulation


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


def sim_args(**kw):
    base = {"k": 8, "jump": 0.25, "per_token": 0.02, "model": "stand-in"}
    return argparse.Namespace(**{**base, **kw})


def copying_request(request_id: str, workload: str) -> dict:
    """A request whose 56-token output copies a reference that its prompt shows only the first 4 tokens of."""
    reference = list(range(100, 180))
    return {
        "id": request_id,
        "workload": workload,
        "prompt": [5, 6, 7] + reference[:4],
        "output": reference[4:60],
        "references": [" ".join(map(str, reference))],
    }


def test_simulate_on_a_copied_reference():
    """A reference the output copies but the prompt never shows: ngram has nothing to copy, refdecode drafts from the
    reference, and both bounds commit more than one token per step."""
    requests = [copying_request("copy/0", "code-edit-ref")]
    totals = simulate_vllm(requests, IdTokenizer(1000), k=8, cost=StepCost(0.25, 0.02), model="stand-in")
    rows = {m: totals["code-edit-ref"][m] for m in VLLM_METHODS}
    assert all(r["tokens"] == 55 for r in rows.values())
    assert rows["ngram"]["steps"] == 55 and rows["ngram"]["drafted"] == 0
    assert rows["refdecode"]["steps"] < 20
    assert rows["best-candidate"]["steps"] < 20 and rows["copy-oracle"]["steps"] < 20
    assert rows["feature-oracle"]["steps"] < 20
    text = vllm_table(totals, sim_args())
    assert text.count("| code-edit-ref |") == 1 and "refdecode / ngram" in text


def test_the_vllm_table_gives_tokens_per_step_and_ratios_of_tokens_per_cost_against_ngram():
    totals = {"w": {m: {"tokens": 8, "steps": 4, "units": 8.0} for m in VLLM_METHODS}}
    totals["w"]["copy-oracle"] = {"tokens": 8, "steps": 2, "units": 4.0}
    assert "| w | 2.00 | 2.00 | 2.00 | 2.00 | 4.00 | 1.00x | 1.00x | 1.00x | 2.00x |" in vllm_table(totals, sim_args())


def test_the_feature_oracle_drafts_only_what_its_fitted_rates_say_pays():
    """A request copying a reference drafts long chains; one whose output never follows what the context suggests
    learns rates of 0 and decodes plainly, at exactly the plain cost."""
    copying = copying_request("copy", "w")
    misled = {
        "id": "misled",
        "workload": "w",
        "prompt": [1, 2, 3, 1, 2, 4],
        "output": [1, 5, 1, 6, 1, 7, 1, 8],
        "references": [],
    }
    results = feature_oracle([copying, misled], IdTokenizer(1000), k=8, cost=StepCost(0.25, 0.02))
    copied = results[("w", "copy")]
    assert copied["tokens"] == 55 and copied["steps"] < 15 and copied["drafted"] >= 40
    assert results[("w", "misled")] == {"tokens": 7, "steps": 7, "units": 7.0, "drafted": 0}


def test_span_kind_reads_source_followed_share_and_place():
    from collections import Counter

    span = types.SimpleNamespace(source="src", seq=0, pos=10, name="store")
    anchors = {(id("src"), 0): 7}
    assert span_kind(span, [4, 5], Counter({4: 1}), True, anchors) == ("store", True, "all", "after")
    assert span_kind(span, [4], Counter({4: 1, 5: 1}), False, {}) == ("store", False, "half", "no copy")
    assert span_kind(span, [4], Counter({4: 1, 5: 2}), False, {(id("src"), 0): 10})[2:] == ("fewer", "there")
    assert span_kind(span, [4], Counter({4: 1}), False, {(id("src"), 0): 12})[3] == "before"
    assert span_kind(span, [4], Counter({4: 1}), False, {(id("src"), 0): 100})[3] == "far"


@pytest.mark.parametrize("argv", [["--n", "0"], ["--k", "0"], ["--jump", "-1"], ["--workloads", "summarize"]])
def test_bad_vllm_arguments_are_refused(argv):
    with pytest.raises(SystemExit):
        parse_args(["vllm", *argv])


# bound: free verification of chains, trees, recycling and copies


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


def test_a_verbatim_copy_is_committed_in_one_step_by_every_copying_method():
    output = [10, 11, 12, 13, 14, 15, 16, 17]
    r = request([5, 9, 10, 11, 12, 13, 14, 15, 16, 17, 3, 9], output)
    for method in ("chain", "tree", "tree+recycle", "copy-oracle"):
        assert replay_bound(r, method) == (7, 1), method


def test_recycle_drafts_what_the_model_predicted_after_a_token_before():
    """A cycle the prompt never showed: recycling knows nothing in the first round, then each token's successor
    (recorded from the rows of the committed path) drafts a long chain through the cycle."""
    output = [20, 21, 22, 23] * 8
    r = request([1, 2, 3], output)
    tokens, steps = replay_bound(r, "recycle")
    assert tokens == len(output) - 1
    assert steps <= 8  # 4 steps to learn the cycle, then K = 16 tokens at a time
    assert replay_bound(r, "recycle", k=2)[1] > steps  # never deeper than K


def test_nothing_to_copy_and_nothing_recorded_is_one_token_per_step():
    output = [30, 31, 32, 33, 34]
    r = request([1, 2], output)
    for method in BOUND_METHODS:
        assert replay_bound(r, method) == (4, 4), method


def test_a_reference_only_the_output_copies_is_drafted_by_the_copying_methods():
    reference = list(range(200, 240))
    r = request([1, 2, 200, 201], reference[2:30])
    r["references"] = [["ref-0", reference]]
    assert replay_bound(r, "copy-oracle", tokenizer=IdTokenizer(1000)) == (27, 2)  # 16 tokens a step at most
    assert replay_bound(r, "tree", tokenizer=IdTokenizer(1000))[1] < 10
    assert replay_bound(r, "wide-16", tokenizer=IdTokenizer(1000))[1] < 10


def test_the_bound_table_gives_tokens_per_step_and_ratios_against_the_chain():
    totals = {"w": {m: {"tokens": 8, "steps": 4} for m in BOUND_METHODS}}
    totals["w"]["tree"] = {"tokens": 8, "steps": 2}
    text = bound_table(totals, argparse.Namespace(k=16, recycle_nodes=24, n=1, seed=1, max_tokens=8))
    assert (
        "| w | 2.00 | 4.00 | 2.00 | 2.00 | 2.00 | 2.00 | 2.00 | 2.00x | 1.00x | 1.00x | 1.00x | 1.00x | 1.00x |" in text
    )


@pytest.mark.parametrize("flag", ["--n", "--k", "--recycle-nodes", "--max-tokens"])
def test_bound_refuses_counts_below_one(flag):
    with pytest.raises(SystemExit):
        parse_args(["bound", flag, "0"])


def test_wide_tree_keeps_the_most_frequent_continuations_of_every_suffix():
    # the last token 7 was followed by 8 twice and by 9 once; the suffix [6, 7] by 8 once
    context = [6, 7, 8, 1, 7, 8, 2, 7, 9, 6, 7]
    tree = wide_tree([context], k=2, nodes=2)
    assert tree.parents == [-1, -1] or tree.parents == [-1, 0]
    assert tree.tokens[0] == 8  # the most frequent first token first
    assert deepest_agreeing_path(wide_tree([context], k=2, nodes=8), [9, 6]) == 2
    assert all(p < i for i, p in enumerate(wide_tree([context, [7, 5, 5]], k=3, nodes=8).parents))
    assert len(wide_tree([[1, 2, 3]], k=2, nodes=8)) == 0  # no suffix occurred earlier


# policy: refdecode's drafter and policy under a fixed cost table


@pytest.mark.parametrize("tree", [False, True])
def test_policy_replay_drafts_a_copied_reference_and_pays_the_fixed_costs(tree):
    reference = list(range(300, 380))
    truth = reference[10:70]
    result = replay_policy([1, 2, 3, *reference[:10]], [("ref", reference)], truth, tree=tree, costs=COSTS["gpu"])
    assert result["decoded"] == len(truth) - 1
    assert result["steps"] < 15  # a plain replay takes 59
    assert result["mean_width"] > 2
    assert result["seconds"] >= result["steps"]  # no step costs less than a plain one
    plain = replay_policy([1, 2, 3], [], truth, tree=tree, costs=COSTS["gpu"])
    assert plain["steps"] == plain["decoded"] == len(truth) - 1 and plain["mean_width"] < 1
    # a later request that inherits the policy replays the same output in no more steps
    again = replay_policy(
        [1, 2, 3, *reference[:10]], [("ref", reference)], truth, tree=tree, costs=COSTS["gpu"], earlier=result["policy"]
    )
    assert again["decoded"] == result["decoded"] and again["steps"] <= result["steps"]


@pytest.mark.parametrize("tree", [False, True])
def test_a_policy_believing_some_widths_is_charged_the_curve_and_learns_what_it_runs(tree):
    """With `believed`, the policy starts from those widths of the curve only (here 1 and 64, both cheap), pays
    every step its own width's cost (10 between them) and learns each width's true cost as it runs it; without,
    it knows the curve and is charged what it believes (the non-decreasing curve: 1 everywhere)."""
    reference = list(range(300, 380))
    truth = reference[10:70]
    costs = {w: 1.0 if w in (1, 64) else 10.0 for w in range(1, 65)}
    prompt, refs = [1, 2, 3, *reference[:10]], [("ref", reference)]
    believing = replay_policy(prompt, refs, truth, tree=tree, costs=costs, believed=(1, 64))
    assert believing["decoded"] == len(truth) - 1
    assert believing["seconds"] > believing["steps"]  # some step ran a dear width
    learned = believing["policy"].costs.table
    assert set(learned) > {1, 64}
    assert all(learned[w] == costs[w] for w in learned)
    knowing = replay_policy(prompt, refs, truth, tree=tree, costs=costs)
    assert knowing["seconds"] == knowing["steps"]
    with pytest.raises(ValueError, match=r"believed widths \[2\] are not in the cost curve"):
        replay_policy(prompt, refs, truth, tree=tree, costs={1: 1.0, 64: 1.0}, believed=(1, 2, 64))


def test_a_cost_curve_file_is_scaled_to_its_one_token_forward(tmp_path):
    path = tmp_path / "curve.json"
    path.write_text(json.dumps({"1": 0.2, "2": 0.21, "33": 0.3}))
    assert parse_costs(str(path)) == pytest.approx({1: 1.0, 2: 1.05, 33: 1.5})
    for bad in ('{"2": 0.2}', "[1, 2]", "not json", '{"1": 0}'):
        path.write_text(bad)
        with pytest.raises(argparse.ArgumentTypeError):
            parse_costs(str(path))
    with pytest.raises(argparse.ArgumentTypeError, match="not a cost curve file"):
        parse_costs(str(tmp_path / "missing.json"))
    assert parse_widths("calibrated") == CALIBRATED_WIDTHS and parse_widths("4,1,2") == (1, 2, 4)
    for bad in ("2,4", "0,1", "1,x", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_widths(bad)


def test_policy_replay_of_a_one_token_output_takes_no_step():
    result = replay_policy([1, 2], [], [7], tree=True, costs=COSTS["cpu"])
    assert (result["steps"], result["decoded"], result["seconds"]) == (0, 0, 0.0)


def test_the_command_line_names_four_commands():
    assert parse_args(["policy", "r.json", "--costs", "cpu-routed", "--carry"]).carry
    assert parse_args(["fixed-cost", "out.json"]).n == 4
    assert parse_args(["policy", "r.json", "--costs", "gpu", "--believe", "1,2,64"]).believe == (1, 2, 64)
    for argv in (
        ["policy", "r.json", "--costs", "tpu"],
        ["policy", "r.json", "--costs", "gpu", "--believe", "1,3"],  # width 3 is not in the gpu curve
        ["fixed-cost", "out.json", "--n", "0"],
        [],
        ["simulate"],
    ):
        with pytest.raises(SystemExit):
            parse_args(argv)


# the bound at a cost curve: cheapest schedules


def brute_force_schedule(n, options, cost, j=1):
    """Every schedule from position j, recursively: the least cost."""
    if j >= n:
        return 0.0
    best = cost(1) + brute_force_schedule(n, options, cost, j + 1)
    for most, free, per_token in options(j):
        for d in range(1, min(most, n - 1 - j) + 1):
            best = min(
                best, cost(d + 1) + max(0, d - free) * per_token + brute_force_schedule(n, options, cost, j + d + 1)
            )
    return best


@given(
    runs=st.lists(st.integers(0, 6), min_size=1, max_size=9),
    draft=st.lists(st.integers(0, 6), min_size=9, max_size=9),
    per_token=st.sampled_from([0.0, 0.2, 0.5]),
    costs=st.sampled_from(["cpu", "cpu-routed", "gpu"]),
)
def test_the_cheapest_schedule_is_the_least_cost_of_every_schedule(runs, draft, per_token, costs):
    n = len(runs)
    cost = FixedCosts(dict(COSTS[costs])).cost

    def options(j):
        return [(runs[j], runs[j], 0.0), (draft[j], 0, per_token)]

    assert math.isclose(cheapest_schedule(n, options, cost), brute_force_schedule(n, options, cost))


def test_without_drafts_the_cheapest_schedule_is_greedy():
    cost = FixedCosts(dict(COSTS["cpu"])).cost
    assert cheapest_schedule(10, lambda j: [], cost) == 9.0
    assert cheapest_schedule(1, lambda j: [(5, 5, 0.0)], cost) == 0.0


def test_draft_runs_count_the_draft_models_agreement_ahead_teacher_forced():
    r = {"output": [5, 6, 7, 8, 9], "draft_next": [0, 6, 7, 1, 9]}
    assert draft_runs(r, k=16) == [0, 2, 1, 0, 1]
    assert draft_runs(r, k=1) == [0, 1, 1, 0, 1]
    assert draft_runs({"output": [1, 2]}, k=4) is None


def test_copy_runs_see_the_prompt_the_output_so_far_and_the_references():
    r = request([1, 10, 11, 12], [10, 11, 12, 40, 41, 10, 11])
    r["references"] = [["ref", [40, 41, 10]]]
    assert copy_runs(r, k=16) == [0, 2, 1, 3, 2, 2, 1]
    # matched: at j = 3 (after 12) the reference's 40 41 10 follows nothing, so no copy; at j = 5 (after 41) the
    # reference's 10 follows 41 but the prompt's 10 11 follows 1, so 1 token instead of 2
    assert copy_runs(r, k=16, context=1) == [0, 2, 1, 0, 2, 1, 1]


def test_the_cost_bounds_of_a_verbatim_copy_at_flat_costs():
    output = list(range(10, 42))
    r = request([5, *output], output)
    r["draft_next"] = list(output)  # a draft model that is always right
    flat = FixedCosts(dict(COSTS["gpu"])).cost
    found = cost_bounds(r, flat, k=64, draft_cost=0.5)
    assert found["greedy"] == 31.0
    assert math.isclose(found["copy"], flat(31))  # one step: 30 tokens copied and the model's own
    assert math.isclose(found["copy+draft-model"], found["copy"])  # the copy needs no draft model
    assert found["draft-model"] > found["copy"]  # its drafts cost
    found = cost_bounds(r, flat, k=8, draft_cost=0.5)
    assert math.isclose(found["copy"], 3 * flat(9) + flat(4))  # 9 + 9 + 9 + 4 tokens


def test_the_cost_bound_table_has_a_row_per_workload_and_the_bounds_beat_the_policy():
    reference = list(range(300, 380))
    r = request([1, 2, 3, *reference[:10]], reference[10:60])
    r["references"] = [["ref", reference]]
    r["draft_next"] = [t if i % 3 else 0 for i, t in enumerate(r["output"])]
    args = argparse.Namespace(costs="cpu-routed", k=64, draft_cost=0.2)
    text = cost_bound_table([r], args)
    row = next(line for line in text.splitlines() if line.startswith("| w |"))
    figures = [float(cell.strip().rstrip("x")) for cell in row.split("|")[2:-1]]
    copy_bound, matched_bound, candidates_bound, _draft_bound, both_bound, matched_both, chain, tree = figures[:8]
    assert copy_bound > 1.5 and both_bound >= copy_bound and matched_both >= matched_bound
    assert chain <= candidates_bound + 1e-9 and tree <= candidates_bound + 1e-9
    assert candidates_bound <= matched_bound + 1e-9 <= copy_bound + 2e-9 and matched_both <= both_bound + 1e-9


@settings(max_examples=40, deadline=None)
@given(
    prompt=st.lists(st.integers(1, 5), min_size=1, max_size=30),
    output=st.lists(st.integers(1, 5), min_size=2, max_size=25),
    reference=st.lists(st.integers(1, 5), max_size=30),
    tree=st.booleans(),
)
def test_refdecodes_candidates_never_run_past_the_longest_copy(prompt, output, reference, tree):
    r = request(prompt, output)
    r["references"] = [["ref", reference]] if reference else []
    found = candidate_runs(r, 16, tree=tree)
    matched = copy_runs(r, 16, context=1)
    copies = copy_runs(r, 16)
    assert len(found) == len(matched) == len(copies) == len(output) and found[0] == 0
    assert all(0 <= f <= m <= c for f, m, c in zip(found, matched, copies, strict=True))


def test_refdecodes_candidates_follow_a_verbatim_reference():
    reference = list(range(300, 380))
    r = request([1, 2, 3, *reference[:10]], reference[10:60])
    r["references"] = [["ref", reference]]
    found = candidate_runs(r, 64, tree=True)
    assert found[1:] == [50 - j for j in range(1, 50)]  # the rest of the output, from every position


def test_cost_curves_are_named_or_given_as_pairs():
    assert parse_costs("gpu") == COSTS["gpu"]
    assert parse_costs("1:1,2:1.05,8:1.8") == {1: 1.0, 2: 1.05, 8: 1.8}
    for bad in ("fast", "1:1,2", "2:1.1,4:1.2", "1:0"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_costs(bad)
    assert parse_args(["bound", "--costs", "1:1,16:1.4", "--draft-cost", "0.3"]).draft_cost == 0.3
    for argv in (["bound", "--costs", "nope"], ["bound", "--draft-cost", "-1"]):
        with pytest.raises(SystemExit):
            parse_args(argv)


def test_bound_outputs_in_bfloat16_are_transformers_greedy(monkeypatch):
    """`bound --dtype bfloat16`: both models load in that dtype and the outputs are transformers' own greedy (the
    reference of every identical-to-greedy figure), not refdecode's."""
    import torch
    from stats_helpers import tiny_llama

    import refdecode
    from refdecode.bench import replay as replay_module
    from refdecode.bench.runner import PreparedRequest

    target = tiny_llama(vocab_size=96, seed=0).to(torch.bfloat16)
    draft = tiny_llama(vocab_size=96, seed=1).to(torch.bfloat16)
    loaded = []

    def load_model(name, dtype="float32"):
        loaded.append((name, dtype))
        return (target if name == "target" else draft), IdTokenizer(96)

    def generate(*args, **kwargs):
        raise AssertionError("refdecode.generate must not make the bfloat16 outputs")

    monkeypatch.setattr(refdecode, "load_model", load_model)
    monkeypatch.setattr(refdecode, "generate", generate)
    prompt = [5, 17, 33, 2, 9, 41]
    monkeypatch.setattr(
        "refdecode.bench.runner.prepare_requests",
        lambda workloads, n, seed, tokenizer: [PreparedRequest("w/0", "w", prompt, [("ref", [1, 2, 3])], "")],
    )
    args = parse_args(
        ["bound", "--model", "target", "--draft-model", "draft", "--dtype", "bfloat16", "--max-tokens", "6"]
    )
    [record] = replay_module.bound_outputs(args)
    assert loaded == [("target", "bfloat16"), ("draft", "bfloat16")]
    x = torch.tensor([prompt])
    expected = target.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False, pad_token_id=1)
    assert record["output"] == expected[0, len(prompt) :].tolist() and len(record["output"]) == 6
    assert len(record["draft_next"]) == len(record["top_ids"]) == 6


def test_bound_refuses_an_unknown_dtype():
    with pytest.raises(SystemExit):
        parse_args(["bound", "--dtype", "int8"])


def test_vllm_outputs_in_bfloat16_are_transformers_greedy(monkeypatch):
    """`vllm --dtype bfloat16`: the target loads in that dtype and the outputs are transformers' own greedy, as for
    `bound` (the outputs vLLM's bfloat16 engine is compared with)."""
    import types

    import torch
    from stats_helpers import tiny_llama

    import refdecode
    from refdecode.bench import replay as replay_module

    target = tiny_llama(vocab_size=96, seed=0).to(torch.bfloat16)
    loaded = []

    def load_model(name, dtype="float32"):
        loaded.append((name, dtype))
        return target, IdTokenizer(96)

    def generate(*args, **kwargs):
        raise AssertionError("refdecode.generate must not make the bfloat16 outputs")

    request = types.SimpleNamespace(id="rag/0", chat=False, prompt="5 17 33 2 9 41", references=[("ref", "1 2 3")])
    monkeypatch.setattr(refdecode, "load_model", load_model)
    monkeypatch.setattr(refdecode, "generate", generate)
    monkeypatch.setattr("refdecode.bench.workloads.load_workload", lambda *a, **kw: [request])
    args = parse_args(["vllm", "--model", "target", "--dtype", "bfloat16", "--max-tokens", "6", "--workloads", "rag"])
    [record] = replay_module.vllm_outputs(args)
    assert loaded == [("target", "bfloat16")] and record["references"] == ["1 2 3"]
    x = torch.tensor([[5, 17, 33, 2, 9, 41]])
    expected = target.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False, pad_token_id=1)
    assert record["output"] == expected[0, 6:].tolist() and len(record["output"]) == 6
