"""Padded plain steps: where a two-token forward costs less than a one-token one (measured), a step with nothing
worth drafting verifies one guessed token (DraftPolicy.pad_plain). The decision follows the measured widths, the
guesses' learned acceptance and the tie guard's recomputes; the output stays exactly plain decoding's, greedy
(against transformers' `generate`) and sampled (against plain sampling with the same seed)."""

import random

import pytest
import torch
from test_tree_attention import VOCAB, model_named

import refdecode
from refdecode.bench.replay import FixedCosts  # a cost table a tiny model's timings never change
from refdecode.drafters import Draft
from refdecode.policy import GUESS, DraftPolicy, ForwardCostModel

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest

CHEAP_PAIR = {1: 1.0, 2: 0.87}  # two tokens cost less than one (the 1.5B in bfloat16 on an AMX Xeon)
DEAR_PAIR = {1: 1.0, 2: 1.13}  # two tokens cost more (the same model in float32 on the same CPU)


class NothingToDraft:
    """A drafter that never finds anything to copy: every step is plain, or padded."""

    def propose(self, context, max_tokens):
        return None

    def observe(self, new_tokens):
        pass


def asks(policy: DraftPolicy, n: int) -> list[bool]:
    return [policy.pad_plain() for _ in range(n)]


def test_pads_where_two_tokens_cost_less_than_one_and_keeps_timing_one():
    policy = DraftPolicy(costs=ForwardCostModel(dict(CHEAP_PAIR)), explore_every=8)
    got = asks(policy, 32)
    assert got.count(False) == 4  # every 8th ask stays plain, so the one-token width keeps being timed
    assert all(got[i] is (i % 8 != 7) for i in range(32))


def test_never_pads_where_two_tokens_cost_more_or_nothing_is_measured_or_drafting_is_off():
    assert not any(asks(DraftPolicy(costs=ForwardCostModel(dict(DEAR_PAIR))), 20))
    assert not any(asks(DraftPolicy(costs=ForwardCostModel({1: 1.0, 64: 1.0})), 20))  # width 2 never timed
    assert not any(asks(DraftPolicy(), 20))  # uncalibrated
    assert not any(asks(DraftPolicy(max_draft=0, costs=ForwardCostModel(dict(CHEAP_PAIR))), 20))
    # equal costs: a guess never seen right earns nothing, so the step stays plain
    assert not any(asks(DraftPolicy(costs=ForwardCostModel({1: 1.0, 2: 1.0})), 20))


def test_guesses_seen_right_pay_for_a_slightly_dearer_pair():
    policy = DraftPolicy(costs=FixedCosts({1: 1.0, 2: 1.05}), explore_every=10**6)
    assert not policy.pad_plain()
    assert policy.acceptance_for(GUESS).rate(0) == 0.0  # a blind guess starts at no credit
    for _ in range(6):
        policy.update(Draft([3], 0, GUESS), 1, 1, 2, 1.05)
    assert policy.acceptance_for(GUESS).rate(0) > 0.05
    assert policy.pad_plain()


def test_recomputed_guessed_rows_stop_the_padding_when_they_cost_more_than_it_saves():
    policy = DraftPolicy(costs=ForwardCostModel(dict(CHEAP_PAIR)), explore_every=10**6)
    assert policy.pad_plain()
    for _ in range(10):  # most padded rows needed a one-token recompute: 0.87 + most of 1 > 1
        policy.padded(True)
    assert not policy.pad_plain()
    for _ in range(40):
        policy.padded(False)
    assert policy.pad_plain()


def hf_greedy(model, prompt, max_new_tokens):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt) :].tolist()


def padded_generate(model, prompt, costs, max_new_tokens, **options):
    policy = DraftPolicy(costs=FixedCosts(dict(costs)), explore_every=5)
    return refdecode.generate(
        model, None, prompt, drafter=NothingToDraft(), policy=policy, max_new_tokens=max_new_tokens, **options
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_padded_greedy_matches_transformers(seed):
    model = model_named("llama-sdpa")
    rng = random.Random(seed)
    prompt = [rng.randrange(2, VOCAB) for _ in range(12)]
    expected = hf_greedy(model, prompt, 40)
    out = padded_generate(model, prompt, CHEAP_PAIR, 40)
    s = out.stats
    assert out.token_ids == expected
    assert s.padded_steps > 0 and s.padded_steps == s.drafted_tokens
    assert s.accepted_sources.get(GUESS, 0) == s.accepted_tokens  # nothing else was drafted
    assert sum(s.accept_lengths) == s.new_tokens - 1 == s.steps + s.accepted_tokens
    plain = padded_generate(model, prompt, DEAR_PAIR, 40)
    assert plain.token_ids == expected
    assert plain.stats.padded_steps == 0 and plain.stats.steps == 39


def test_padded_greedy_with_every_guessed_row_recomputed_matches_transformers():
    """A tie margin no gap reaches: every padded row 0 goes through the one-token recompute, which the policy
    learns, so the padding mostly stops; the output is plain greedy throughout."""
    model = model_named("llama-sdpa")
    prompt = list(range(5, 17))
    expected = hf_greedy(model, prompt, 40)
    out = padded_generate(model, prompt, CHEAP_PAIR, 40, tie_margin=1e9)
    s = out.stats
    assert out.token_ids == expected
    assert 0 < s.padded_steps < s.steps // 2
    assert s.recomputed >= s.padded_steps and s.unresolved_steps == 0


def test_padded_sampling_is_plain_sampling_with_the_same_seed():
    model = model_named("llama-sdpa")
    prompt = list(range(20, 32))
    plain = refdecode.generate(
        model, None, prompt, max_new_tokens=30, temperature=0.9, seed=7, policy=DraftPolicy(max_draft=0)
    )
    out = padded_generate(model, prompt, CHEAP_PAIR, 30, temperature=0.9, seed=7)
    assert out.token_ids == plain.token_ids
    assert out.stats.padded_steps > 0
