"""Where decoding time goes (GenerationStats): the target's forwards against refdecode's own work per step.

forward_seconds counts the target model's own forward calls during decoding and nothing else: not the drafter's
work, not a separate draft model's forwards, not the prefill. overhead_seconds is the rest of decode_seconds, and
draft_seconds and policy_seconds lie inside it. The hooks that time the forwards are gone after every call, also
one that fails. Time is attributed, never judged: sleeps of known length give lower bounds, nothing is asserted
about how fast anything runs.
"""

from __future__ import annotations

import time

import pytest
import torch
from stats_helpers import tiny_llama

import refdecode
from refdecode.bench.replay import FixedCosts
from refdecode.policy import DraftPolicy

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest

PROMPT = [0, 5, 9, 13, 17, 5, 9, 13, 17, 5, 9, 13]  # repeats: the references draft at most steps
MAX_NEW = 16
PAUSE = 0.02  # seconds a sleeping hook or drafter adds, far above the clock's resolution


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=96, seed=0)


def decode(model, **kwargs):
    flat = FixedCosts({1: 1.0, 64: 1.0})  # every width costs the same, never re-timed: decisions owe nothing to load
    kwargs = {"max_new_tokens": MAX_NEW, "policy": DraftPolicy(costs=flat), "calibrate": False, **kwargs}
    return refdecode.generate(model, None, PROMPT, **kwargs)


def hooks_on(module: torch.nn.Module) -> int:
    return len(module._forward_hooks) + len(module._forward_pre_hooks)


def test_the_parts_add_up(model):
    s = decode(model).stats
    assert s.steps > 0 and s.accepted_tokens > 0  # it drafted
    assert 0.0 < s.forward_seconds < s.decode_seconds
    assert s.overhead_seconds == pytest.approx(s.decode_seconds - s.forward_seconds)
    assert 0.0 < s.draft_seconds and 0.0 < s.policy_seconds
    assert s.draft_seconds + s.policy_seconds <= s.overhead_seconds
    record = s.as_dict()
    assert {"forward_seconds", "policy_seconds", "overhead_seconds"} <= record.keys()
    assert record["overhead_seconds"] == pytest.approx(s.overhead_seconds)


def test_a_slow_forward_is_counted_as_forward(model):
    """A pause inside the target's forward (a hook on its decoder, inside the top module's call) lands in
    forward_seconds, once per verification step."""

    def pause(*_):
        time.sleep(PAUSE)

    handle = model.model.register_forward_hook(pause)
    try:
        s = decode(model).stats
    finally:
        handle.remove()
    assert s.forward_seconds >= s.steps * PAUSE
    assert s.overhead_seconds < s.steps * PAUSE  # none of the pauses is counted as refdecode's own work


class SlowDrafter:
    """The references' drafter, each proposal taking PAUSE seconds more."""

    def __init__(self, prompt):
        self.inner = refdecode.ReferenceDrafter(prompt)

    def observe(self, tokens):
        self.inner.observe(tokens)

    def propose(self, context, max_tokens):
        time.sleep(PAUSE)
        return self.inner.propose(context, max_tokens)


def test_slow_drafting_is_counted_as_overhead_not_forward(model):
    s = decode(model, drafter=SlowDrafter(PROMPT)).stats
    assert s.draft_seconds >= s.steps * PAUSE
    assert s.overhead_seconds >= s.draft_seconds
    assert s.forward_seconds < s.steps * PAUSE  # the drafter's pauses are not the target's forwards


def test_a_separate_draft_models_forwards_are_not_the_targets(model):
    """A draft model beside the references: its forwards (paused) count as drafting; the target's clock ignores
    them."""
    draft = tiny_llama(vocab_size=96, seed=5)
    calls = []

    def pause(*_):
        calls.append(1)
        time.sleep(PAUSE)

    handle = draft.register_forward_hook(pause)
    try:
        s = decode(model, drafter=draft).stats
    finally:
        handle.remove()
    assert calls, "the draft model never ran"
    assert s.draft_seconds >= (len(calls) - 1) * PAUSE  # the priming forward belongs to the prefill
    assert s.forward_seconds < s.decode_seconds - (len(calls) - 1) * PAUSE
    assert hooks_on(draft) == 0


def test_the_clock_leaves_no_hook_behind(model):
    before = hooks_on(model)
    decode(model)
    assert hooks_on(model) == before

    class Broken(SlowDrafter):
        def propose(self, context, max_tokens):
            raise RuntimeError("drafter failed")

    with pytest.raises(RuntimeError, match="drafter failed"):
        decode(model, drafter=Broken(PROMPT))
    assert hooks_on(model) == before


def test_the_output_is_unchanged_by_the_clock(model):
    """Timing is observation only: the same tokens as transformers' greedy."""
    expected = model.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=MAX_NEW)[0, len(PROMPT) :]
    assert decode(model).token_ids == expected.tolist()
