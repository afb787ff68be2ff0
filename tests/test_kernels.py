"""The routed CPU kernels of wide forwards (refdecode.kernels): same logits within float32 noise, exact greedy
output, the model and the environment left as they were, routing only where it was chosen."""

import os
import random

import pytest
import torch
from stats_helpers import AlwaysDraft, IdTokenizer, tiny_llama
from transformers import DynamicCache

import refdecode
from refdecode import kernels
from refdecode.kernels import forward_tokens
from refdecode.policy import CALIBRATED_WIDTHS, ForwardCostModel, calibrate_costs, calibration_widths

pytestmark = pytest.mark.usefixtures("one_thread")

WIDTHS = (2, 4, 8, 16, 32, 64)


@pytest.fixture
def model():
    """A fresh tiny Llama with grouped-query attention (4 heads, 2 key/value heads) and biased projections, so the
    routed linear's bias and SDPA's enable_gqa are both exercised; its route is its own."""
    m = tiny_llama(vocab_size=96, seed=3, layers=2, hidden=64)
    m.config.attention_bias = True
    g = torch.Generator().manual_seed(3)
    for layer in m.model.layers:  # biases on q/k/v/o, as attention_bias=True would have built
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            proj = getattr(layer.self_attn, name)
            proj.bias = torch.nn.Parameter(torch.randn(proj.out_features, generator=g) * 0.1)
    yield m
    kernels.forget_route(m)


def prefilled(model, length=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, model.config.vocab_size, (1, length), generator=g)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True)
    return cache


@pytest.mark.parametrize("width", [2, 3, 9, 40])
def test_routed_forward_matches_transformers_kernels(model, width):
    cache = prefilled(model)
    tokens = list(range(5, 5 + width))
    with torch.no_grad():
        plain = forward_tokens(model, cache, tokens, route=False)
        cache.crop(-width)
        with kernels.routed(model, width, force=True) as used:
            assert used
            assert all("forward" in m.__dict__ for m in model.modules() if type(m) is torch.nn.Linear)
            assert os.environ.get(kernels.FORCE_GQA_VARIABLE) == "1"
        fast = forward_tokens(model, cache, tokens, route=True)
    assert fast.shape == plain.shape == (width, model.config.vocab_size)
    assert torch.allclose(fast, plain, atol=1e-5, rtol=1e-4)
    assert not torch.equal(fast, torch.zeros_like(fast))
    # restored: no instance forward left on any Linear, no environment variable left behind
    assert not any("forward" in m.__dict__ for m in model.modules() if type(m) is torch.nn.Linear)
    assert kernels.FORCE_GQA_VARIABLE not in os.environ


def test_routed_linear_rounds_its_bias_once_like_f_linear():
    """In bfloat16 a product rounded before its bias is added rounds twice (a quarter of the elements then differ
    from F.linear by an ulp); the routed kernel adds the bias inside the product, so it rounds like F.linear."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128, bias=True).to(torch.bfloat16)
    x = torch.randn(2, 4, 256, dtype=torch.bfloat16)
    expected = torch.nn.functional.linear(x, linear.weight, linear.bias)
    routed = kernels._transposed_forward(linear, x)
    assert routed.shape == expected.shape == (2, 4, 128) and routed.is_contiguous()
    twice = (torch.mm(linear.weight, x.reshape(8, 256).t()).t() + linear.bias).reshape(2, 4, 128)
    assert (routed != expected).float().mean() < 0.2 * (twice != expected).float().mean()


def test_one_token_and_unchosen_widths_are_never_routed(model):
    kernels.set_route(model, {2: True, 4: True, 8: False, 16: True})
    assert not kernels.takes_route(model, 1)
    assert kernels.takes_route(model, 2) and kernels.takes_route(model, 3) and kernels.takes_route(model, 4)
    assert not kernels.takes_route(model, 5) and not kernels.takes_route(model, 8)
    assert kernels.takes_route(model, 9) and kernels.takes_route(model, 16)
    assert not kernels.takes_route(model, 17), "above every calibrated width: transformers' kernels"
    assert kernels.route_widths(model) == {2, 4, 16}
    with kernels.routed(model, 1) as used:
        assert not used
    with kernels.routed(model, 1, force=True) as used:
        assert not used
    with kernels.routed(model, 8) as used:
        assert not used
        assert not any("forward" in m.__dict__ for m in model.modules())


def test_set_route_refuses_one_token(model):
    with pytest.raises(ValueError, match="2 or more tokens"):
        kernels.set_route(model, {1: True})


def test_restored_after_an_error_and_user_settings_kept(model, monkeypatch):
    monkeypatch.setenv(kernels.FORCE_GQA_VARIABLE, "0")  # the user's own choice: never touched
    with pytest.raises(RuntimeError, match="boom"):
        with kernels.routed(model, 4, force=True):
            assert os.environ[kernels.FORCE_GQA_VARIABLE] == "0"
            raise RuntimeError("boom")
    assert os.environ[kernels.FORCE_GQA_VARIABLE] == "0"
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_a_replaced_forward_is_left_alone(model):
    """accelerate's hooks, LoRA and the like set an instance forward: routing neither replaces nor removes it."""
    head = model.lm_head
    calls = []

    def hooked(x):
        calls.append(x.shape)
        return torch.nn.functional.linear(x, head.weight, head.bias)

    head.forward = hooked
    try:
        cache = prefilled(model)
        with torch.no_grad():
            forward_tokens(model, cache, [5, 6, 7], route=True)
        assert calls and calls[-1][-2] == 3, "the user's forward ran"
        assert head.__dict__["forward"] is hooked
    finally:
        del head.forward


def test_switch_variable(model, monkeypatch):
    monkeypatch.setenv(kernels.SWITCH_VARIABLE, "transformers")
    assert not kernels.enabled() and not kernels.routable(model)
    with kernels.routed(model, 4, force=True) as used:
        assert not used
    monkeypatch.setenv(kernels.SWITCH_VARIABLE, "fast please")
    with pytest.raises(ValueError, match="'auto' or 'transformers'"):
        kernels.enabled()
    monkeypatch.delenv(kernels.SWITCH_VARIABLE)
    assert kernels.enabled() and kernels.routable(model)
    with kernels.transformers_kernels():
        assert not kernels.enabled()
    assert kernels.SWITCH_VARIABLE not in os.environ
    with kernels.transformers_kernels(active=False):
        assert kernels.enabled()


def test_calibration_chooses_per_width_and_prices_the_faster(model, monkeypatch):
    """The cost of a width is the faster of its two timings, and the route follows: here the routed trial is made
    to look slow at 8 tokens and up."""
    import refdecode.policy as policy

    real = policy.forward_tokens

    def timed(model_, cache, tokens, *, route=None):
        if route and len(tokens) >= 8:  # a little real work: routed looks slower at these widths
            for _ in range(20):
                torch.ones(300, 300) @ torch.ones(300, 300)
        return real(model_, cache, tokens, route=route)

    monkeypatch.setattr(policy, "forward_tokens", timed)
    cache = prefilled(model)
    length = cache.get_seq_length()
    table = calibrate_costs(model, cache, 5, rounds=2)
    assert cache.get_seq_length() == length, "every timed forward is rolled back"
    assert set(table) == set(CALIBRATED_WIDTHS) and all(t > 0 for t in table.values())
    assert not kernels.takes_route(model, 8) and not kernels.takes_route(model, 64)
    # a second call on the same model reuses the table; with routing switched off a separate table is kept
    assert calibrate_costs(model, cache, 5) is table
    monkeypatch.setenv(kernels.SWITCH_VARIABLE, "transformers")
    assert calibrate_costs(model, cache, 5, rounds=1) is not table


def test_calibration_prices_a_staircase_by_its_steps(model, monkeypatch):
    """Blocked kernels make a forward's cost a staircase with steps just past powers of two (1.5B bfloat16 on AMX:
    32 tokens 1.20 one-token forwards, 33 tokens 1.4-1.5). Timed on a fake clock that such a staircase advances, the
    calibrated curve prices 33 tokens at the step above 32 and 3 tokens at the step above 2, not half-way to the
    next power of two as interpolating between powers of two alone did."""
    import refdecode.policy as policy

    def staircase(width):
        return 1.0 if width <= 2 else 2.0 if width <= 4 else 3.0 if width <= 32 else 5.0

    class Clock:
        now = 0.0

        def perf_counter(self):
            return self.now

    clock = Clock()
    real = policy.forward_tokens

    def timed(model_, cache, tokens, *, route=None):
        clock.now += staircase(len(tokens)) * (1.0 if route else 1.5)  # routed is always the faster here
        return real(model_, cache, tokens, route=route)

    monkeypatch.setattr(policy, "time", clock)
    monkeypatch.setattr(policy, "forward_tokens", timed)
    costs = ForwardCostModel(calibrate_costs(model, prefilled(model), 5, rounds=1))
    assert costs.table[1] == 1.5  # one token is never routed
    assert costs.cost(3) == 2.0 and costs.cost(24) == 3.0 and costs.cost(33) == 5.0
    assert costs.cost(48) == 5.0 and costs.cost(64) == 5.0
    assert kernels.takes_route(model, 33) and kernels.takes_route(model, 3)


def test_calibration_widths_cover_what_max_draft_can_run():
    """A forward verifies max_draft drafts and the pending token: the calibration times every calibrated width up
    to max_draft + 1, and the next one past it where that width is not calibrated itself (to interpolate)."""
    assert calibration_widths(128) == CALIBRATED_WIDTHS
    assert calibration_widths(64) == tuple(w for w in CALIBRATED_WIDTHS if w <= 65)
    assert calibration_widths(40) == tuple(w for w in CALIBRATED_WIDTHS if w <= 64)
    assert calibration_widths(0) == (1,) and calibration_widths(1) == (1, 2)
    assert calibration_widths(1000) == CALIBRATED_WIDTHS


def test_a_wider_call_times_only_the_widths_it_adds(model, monkeypatch):
    """A second call asking for more widths (a larger max_draft) keeps the first call's times and routes, and times
    only the widths it lacked: the union is one table."""
    import refdecode.policy as policy

    real = policy.forward_tokens
    timed_widths = []

    def counted(model_, cache, tokens, *, route=None):
        timed_widths.append(len(tokens))
        return real(model_, cache, tokens, route=route)

    monkeypatch.setattr(policy, "forward_tokens", counted)
    cache = prefilled(model)
    narrow = calibrate_costs(model, cache, 5, widths=calibration_widths(16), rounds=1)
    assert set(narrow) == set(calibration_widths(16))
    routes = dict(kernels.route_table(model))
    timed_widths.clear()
    wide = calibrate_costs(model, cache, 5, widths=calibration_widths(128), rounds=1)
    assert set(timed_widths) == set(CALIBRATED_WIDTHS) - set(narrow)
    assert set(wide) == set(CALIBRATED_WIDTHS) and all(wide[w] == narrow[w] for w in narrow)
    assert {w: d for w, d in kernels.route_table(model) if w in routes} == routes
    timed_widths.clear()
    assert calibrate_costs(model, cache, 5, widths=calibration_widths(64)) is wide and not timed_widths


@pytest.mark.parametrize("case", range(6))
def test_greedy_exact_with_every_width_routed(model, case, monkeypatch):
    """Routing every width and verifying every draft of (a corruption of) the true continuation at full length keeps
    the output token for token transformers' greedy output."""
    rng = random.Random(case)
    vocab = model.config.vocab_size
    prompt = [rng.randrange(2, vocab) for _ in range(rng.randint(3, 30))]
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)[0, len(prompt) :].tolist()
    tok = IdTokenizer(vocab)
    store = refdecode.ReferenceStore(tok)
    store.add(prompt[-4:] + (expected if case % 2 else expected[:10] + expected[12:]), source="answer")
    kernels.set_route(model, dict.fromkeys(WIDTHS, True))
    routed_rows = []
    real = kernels._transposed_forward

    def counting(self, x):
        routed_rows.append(x.numel() // x.shape[-1])
        return real(self, x)

    monkeypatch.setattr(kernels, "_transposed_forward", counting)
    policy = AlwaysDraft(max_draft=16)
    out = refdecode.generate(
        model, tok, prompt, store=store, max_new_tokens=40, policy=policy, tree=False, calibrate=False
    )
    assert out.token_ids == expected
    assert out.stats.drafted_tokens > 0 and routed_rows and min(routed_rows) >= 2, "wide forwards ran routed"
