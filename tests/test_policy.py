"""The draft-length policy: acceptance estimates, the cost curve, the length it picks, and exploration."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refdecode.drafters import Draft
from refdecode.policy import MATCH_BUCKETS, AcceptanceModel, DraftPolicy, ForwardCostModel

CPU_LIKE = {1: 0.090, 2: 0.095, 4: 0.110, 8: 0.160, 16: 0.200, 32: 0.260, 64: 0.420}


def draft(n, match_len):
    return Draft(list(range(n)), match_len=match_len)


def test_acceptance_learns_by_match_length_and_is_monotone():
    model = AcceptanceModel()
    assert model.rate(1) == pytest.approx(0.5)
    for _ in range(20):
        model.update(1, drafted=4, accepted=0)  # short matches fail
        model.update(20, drafted=8, accepted=8)  # long ones are copied
    assert model.rate(1) < 0.3  # pulled up a little by the pooled prior
    assert model.rate(20) > 0.9
    assert model.rate(40) >= model.rate(20)  # a longer match is at least as reliable
    fresh = AcceptanceModel()
    for _ in range(10):
        fresh.update(3, drafted=8, accepted=8)
    assert fresh.rate(12) > 0.8  # an untried bucket borrows what the request showed so far


def test_acceptance_under_sampling_counts_the_expected_outcome():
    # accept probabilities 0 or 1 are a greedy outcome: the same counts as the observed ones
    a, b = AcceptanceModel(), AcceptanceModel()
    a.update(4, drafted=3, accepted=1, accept_probs=[1.0, 0.0, 1.0])
    b.update(4, drafted=3, accepted=1)
    assert a.successes == b.successes and a.trials == b.trials
    # p = 0.5 at every position: whatever the noise gave (here everything rejected), the estimate is 0.5
    c = AcceptanceModel(prior=0.9)
    for _ in range(30):
        c.update(4, drafted=6, accepted=0, accept_probs=[0.5] * 6)
    assert c.rate(4) == pytest.approx(0.5, abs=0.05)  # the prior (0.9, weight 2) still pulls a little
    # a fully likely draft teaches full acceptance even on a draw that rejected it
    d = AcceptanceModel(prior=0.1)
    for _ in range(30):
        d.update(8, drafted=4, accepted=0, accept_probs=[1.0] * 4)
    assert d.rate(8) > 0.95


def brute_rate(model: AcceptanceModel, match_len: int) -> float:
    """The rate by its definition: each bucket's Beta posterior centred on the pooled rate, maximised over every
    bucket up to match_len's (non-decreasing in match length)."""
    w = model.prior_weight
    pooled = (sum(model.successes) + model.prior * w) / (sum(model.trials) + w)
    last = max(b for b, lo in enumerate(MATCH_BUCKETS) if lo <= max(1, match_len))
    return max((model.successes[b] + pooled * w) / (model.trials[b] + w) for b in range(last + 1))


_trial = st.tuples(st.integers(0, 80), st.floats(0, 1), st.floats(0, 1))


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(st.lists(_trial, max_size=5), max_size=8),
    edit=st.one_of(st.none(), st.tuples(st.integers(0, len(MATCH_BUCKETS) - 1), st.floats(0, 5))),
)
def test_cached_rates_equal_the_definition_after_any_evidence(steps, edit):
    # rates are cached between changes of evidence: every change (an update, or a caller editing the lists) shows
    model = AcceptanceModel()
    for step in steps:
        model.update_trials([(m, s * t, t) for m, s, t in step])
        for m in (0, 1, 2, 5, 13, 80):
            assert model.rate(m) == pytest.approx(brute_rate(model, m))
    if edit is not None:
        b, extra = edit
        model.trials[b] += extra
        model.successes[b] += extra
        assert all(model.rate(m) == pytest.approx(brute_rate(model, m)) for m in (1, 4, 12, 64))


def test_cost_curve_interpolates_and_is_non_decreasing():
    costs = ForwardCostModel({1: 1.0, 2: 3.0, 4: 1.5, 8: 2.0})  # width 2 timed during a burst of load
    assert costs.cost(2) == pytest.approx(1.5)
    assert costs.cost(6) == pytest.approx(1.75)
    assert costs.cost(16) == pytest.approx(3.0)  # extrapolated from the last two widths
    costs.observe(8, 4.0)
    assert costs.cost(8) == pytest.approx(0.8 * 2.0 + 0.2 * 4.0)
    costs.observe(32, 9.0)  # a new width: the cached curve is rebuilt
    assert costs.cost(16) == pytest.approx(costs.cost(8) + (9.0 - costs.cost(8)) * 8 / 24)
    costs.table[1] = 5.0  # edited by hand: seen too (and made non-decreasing)
    assert costs.cost(1) == pytest.approx(costs.cost(2))


def test_length_follows_acceptance_and_cost():
    policy = DraftPolicy(costs=ForwardCostModel(CPU_LIKE))
    for _ in range(30):
        policy.acceptance.update(30, drafted=16, accepted=16)
        policy.acceptance.update(1, drafted=2, accepted=0)
    long_k = policy.choose_length(draft(64, 30), budget=100)
    assert long_k >= 16
    assert policy.choose_length(draft(64, 1), budget=100) <= 1
    assert policy.choose_length(draft(64, 30), budget=5) <= 5
    assert policy.choose_length(draft(3, 30), budget=100) <= 3
    assert policy.choose_length(None, budget=100) == 0
    flat = DraftPolicy(costs=ForwardCostModel({1: 1.0, 64: 1.0}))  # a GPU: width is free
    assert flat.choose_length(draft(64, 1), budget=100) >= 8  # even at an untested 0.5 acceptance


def test_exploration_keeps_learning_after_drafting_stopped():
    policy = DraftPolicy(costs=ForwardCostModel({1: 1.0, 2: 5.0, 64: 50.0}), explore_every=4)
    picks = [policy.choose_length(draft(10, 2), budget=100) for _ in range(12)]
    assert picks.count(0) == 9 and picks[3] == picks[7] == picks[11] == 2


def test_bad_configuration():
    with pytest.raises(ValueError):
        DraftPolicy(max_draft=-1)
    with pytest.raises(ValueError):
        DraftPolicy(explore_every=0)


def test_sources_learn_separately():
    policy = DraftPolicy(costs=ForwardCostModel(CPU_LIKE))
    for _ in range(20):
        policy.update(Draft([1] * 8, match_len=3, source="corpus"), 8, 0, 9, 0.16)
        policy.update(Draft([1] * 8, match_len=3, source="reference"), 8, 8, 9, 0.16)
    assert policy.acceptance_for("corpus").rate(3) < 0.2
    assert policy.acceptance_for("reference").rate(3) > 0.8
    assert policy.choose_length(Draft(list(range(32)), match_len=3, source="corpus"), budget=100) <= 1
    assert policy.choose_length(Draft(list(range(32)), match_len=3, source="reference"), budget=100) > 8


def test_expected_accepted_is_the_chain_series_of_the_sources_rate():
    policy = DraftPolicy()
    for _ in range(20):
        policy.acceptance.update(8, drafted=4, accepted=2)
    a = policy.acceptance.rate(8)
    assert policy.chain_rate(draft(3, 8)) == pytest.approx(a)
    assert policy.expected_accepted(draft(3, 8)) == pytest.approx(a + a**2 + a**3)
    assert policy.expected_accepted(draft(0, 8)) == 0.0
    sure = DraftPolicy()
    for _ in range(200):
        sure.acceptance.update(8, drafted=4, accepted=4)
    assert sure.chain_rate(draft(3, 8)) <= 0.999  # capped: a long draft's expectation stays finite


def test_chain_length_at_a_rate_follows_the_cost_curve():
    """Where width is nearly free a good rate buys a long chain; where every token costs a full forward, none."""
    from refdecode.policy import DraftPolicy, ForwardCostModel

    free = DraftPolicy(max_draft=64, costs=ForwardCostModel({1: 1.0, 2: 1.0, 64: 1.05, 65: 1.3}))
    dear = DraftPolicy(max_draft=64, costs=ForwardCostModel({1: 1.0, 2: 2.0, 64: 64.0}))
    assert free.chain_length_at(0.9) > free.chain_length_at(0.5) >= 1
    assert free.chain_length_at(1.0) == 63 and free.chain_length_at(-1.0) == 0  # 64 drafts: width 65, the step
    assert dear.chain_length_at(0.9) == 0
