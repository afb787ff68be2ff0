"""Drafts longer than 64 tokens: where the measured cost of a forward keeps falling per token past 64 (width nearly
free), a copy that has been right for long is drafted up to 128 tokens; where width costs, the policy stays short.
The calibration times the widths a call's max_draft can run, and the output stays transformers' greedy output."""

import random

import pytest
import torch
from stats_helpers import AlwaysDraft, IdTokenizer, tiny_llama

import refdecode
from refdecode.bench.replay import FixedCosts
from refdecode.drafters import Draft
from refdecode.policy import CALIBRATED_WIDTHS, DraftPolicy, ForwardCostModel, calibration_widths

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest

# Relative costs measured on Qwen2.5-Coder-1.5B on a 2-core AMX Xeon (LOG 2026-12-07, tenth session): bfloat16,
# where width is nearly free, and float32, where it is not.
NEARLY_FREE = {1: 1.0, 2: 0.83, 16: 0.9, 32: 1.09, 33: 1.34, 64: 1.54, 65: 1.86, 128: 2.35, 129: 2.54}
DEAR = {1: 1.0, 2: 0.98, 16: 1.8, 32: 2.28, 33: 2.7, 64: 3.73, 65: 3.84, 128: 5.86, 129: 6.18}


def taught(costs: dict, successes: float, trials: float) -> DraftPolicy:
    """A default policy whose long-match copies have been right `successes` times in `trials`."""
    policy = DraftPolicy(costs=ForwardCostModel(dict(costs)))
    policy.acceptance.update_trials([(64, successes, trials)])
    return policy


def long_copy(n: int = 200) -> Draft:
    return Draft(list(range(2, 2 + n)), 64, "reference")


def test_defaults_draft_up_to_128():
    import inspect

    assert DraftPolicy().max_draft == 128
    for fn in (refdecode.generate, refdecode.hf_generate):
        assert inspect.signature(fn).parameters["max_draft"].default == 128


def test_a_copy_right_for_long_is_drafted_past_64_only_where_width_is_nearly_free():
    # right 500 times in a row at long matches: rate ~0.996
    # (127 drafts and the pending token fill 128 rows; the 129th costs a step of the staircase)
    assert taught(NEARLY_FREE, 500, 500).choose_length(long_copy(), 400) == 127
    assert taught(DEAR, 500, 500).choose_length(long_copy(), 400) == 127  # a token still gets cheaper per token
    # right 95% of the time: a 128-token draft would mostly be wasted; the step just past 64 is not worth paying
    assert taught(NEARLY_FREE, 95, 100).choose_length(long_copy(), 400) <= 64
    assert taught(DEAR, 95, 100).choose_length(long_copy(), 400) < 64
    # never past what the caller allows, or past the draft
    assert DraftPolicy(max_draft=64, costs=ForwardCostModel(dict(NEARLY_FREE))).choose_length(long_copy(), 400) <= 64
    assert taught(NEARLY_FREE, 500, 500).choose_length(long_copy(20), 400) == 20


@pytest.mark.parametrize("max_draft", [0, 16, 64, 128])
def test_generate_calibrates_the_widths_its_max_draft_can_run(max_draft, monkeypatch):
    import refdecode.decoding

    asked = []

    def fake(model, cache, pending, *, widths=CALIBRATED_WIDTHS, rounds=None):
        asked.append(tuple(widths))
        return {w: 1.0 for w in widths}

    monkeypatch.setattr(refdecode.decoding, "calibrate_costs", fake)
    model = tiny_llama(vocab_size=64, seed=1, layers=1, hidden=32)
    refdecode.generate(model, IdTokenizer(64), [3, 4, 5, 3, 4], max_new_tokens=4, max_draft=max_draft)
    assert asked == [calibration_widths(max_draft)]


@pytest.mark.parametrize("case", range(3))
def test_greedy_exact_with_drafts_past_64(case):
    """Drafts of up to 128 tokens (a corruption of the true continuation, verified whole) keep the output token for
    token transformers' greedy output, chain and tree."""
    model = tiny_llama(vocab_size=96, seed=case, layers=2, hidden=64, eos_token_id=None)
    rng = random.Random(case)
    prompt = [rng.randrange(2, 96) for _ in range(20)]
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=200, do_sample=False)[0, len(prompt) :].tolist()
    tok = IdTokenizer(96)
    store = refdecode.ReferenceStore(tok)
    cut = 100 + 10 * case  # one edit far into the copy: a draft past 64 tokens is partly accepted
    store.add(prompt[-4:] + expected[:cut] + [(expected[cut] + 1) % 96 or 2] + expected[cut + 1 :], source="answer")
    for tree in (False, True):
        out = refdecode.generate(
            model, tok, prompt, store=store, max_new_tokens=200, policy=AlwaysDraft(), tree=tree, calibrate=False
        )
        assert out.token_ids == expected
        assert max(out.stats.draft_lengths) > 64, "drafts past 64 tokens were verified"


def test_drafters_are_asked_only_as_deep_as_a_draft_can_be_chosen():
    """draft_depth: max_draft while uncalibrated; at a measured curve, the length a chain at the best learned rate
    would be verified at, which grows as drafts are accepted and never exceeds max_draft (nor falls under 2)."""
    assert DraftPolicy().draft_depth() == 128 and DraftPolicy(max_draft=7).draft_depth() == 7
    depths = []
    for successes in (0, 9, 95, 500):
        policy = DraftPolicy(costs=ForwardCostModel(dict(DEAR)))
        if successes:
            policy.acceptance.update_trials([(64, successes, successes + (successes < 500))])
        depths.append(policy.draft_depth())
        best = max(policy.choose_length(long_copy(), 400), 2)
        assert best <= depths[-1], "no chain deeper than the depth is ever chosen"
    assert depths == sorted(depths) and depths[0] >= 2 and depths[-1] == 127
    assert taught(NEARLY_FREE, 500, 500).draft_depth() == 127


def test_generate_asks_the_drafter_for_the_policys_depth():
    asked = []

    class Recording:
        def propose(self, context, max_tokens):
            asked.append(max_tokens)
            return None

        def observe(self, new_tokens):
            pass

    model = tiny_llama(vocab_size=64, seed=1, layers=1, hidden=32, eos_token_id=None)
    policy = taught(DEAR, 9, 10)
    policy.costs = FixedCosts(dict(DEAR))  # a tiny model's own timings would reshape the curve
    refdecode.generate(model, IdTokenizer(64), [3, 4, 5], max_new_tokens=40, drafter=Recording(), policy=policy)
    assert asked and max(asked) == asked[0] == policy.draft_depth() and 2 < policy.draft_depth() < 64  # then the budget
