"""Model drafters (refdecode.drafters): drafts from a model join the token tree and decoding stays lossless.

Greedy: token for token equal to transformers' greedy generate with any model drafter (a weak random model, the
target itself, its int8 copy, its first layers), with and without references, trees and chains, alone or hybrid,
also through hf_generate. Sampling: the first tokens follow the exact distribution with the model drafter's q
(alone) and with point masses (hybrid), and the same statistic rejects a wrong residual. The shared-cache model
drafter leaves the target's cache as it found it; the own-cache model drafter rolls back rejected drafts; bad input
is refused with ValueError (exit 2 at the command line); merge_trees keeps every path of both trees; the hybrid
skips the model drafter where references cover the next token.

Costs are fixed (FixedCosts: one forward = 1 s, whatever its width, never re-timed), so whether a model drafter
drafts and how far never depends on this machine's load: every run below is deterministic.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import _tiny_gemma3, _tiny_llama
from stats_helpers import (
    VOCAB,
    IdTokenizer,
    chi_square_gof,
    exact_tables,
    joint_probabilities,
    tiny_llama,
    tiny_sampling_llama,
    total_variation,
)
from stats_helpers import AlwaysDraft as FullDrafts
from test_sampling import uncertain_references

import refdecode
import refdecode.verification
from refdecode.bench import replay
from refdecode.drafters import (
    DraftSession,
    HeadsDrafter,
    HybridDrafter,
    ModelDrafter,
    ModelDrafterBase,
    RecycleDrafter,
    SuccessorTable,
    build_model_drafter,
    check_draft_model,
    check_drafter_spec,
    early_exit_model,
    merge_trees,
)
from refdecode.policy import AcceptanceModel, DraftPolicy, ForwardCostModel
from refdecode.sampling import SamplingConfig, build_processors
from refdecode.store import ReferenceStore
from refdecode.tree import ROOT, Candidate, DraftTree, build_tree
from refdecode.verification import Verdict

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


class FixedCosts(replay.FixedCosts):
    """Every forward costs 1 s whatever its width, and measurements never change that: drafting decisions depend on
    acceptance only (a model drafter's own draft cost, measured in milliseconds, is then always worth it)."""

    def __init__(self):
        super().__init__({1: 1.0, 64: 1.0})


def fixed_policy(**kwargs) -> DraftPolicy:
    return DraftPolicy(costs=FixedCosts(), **kwargs)


def plain_greedy(model, prompt, max_new: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new)
    return out[0, len(prompt) :].tolist()


# ---------------------------------------------------------------------------------------------------------------
# 1. Greedy equivalence with transformers
# ---------------------------------------------------------------------------------------------------------------

MAX_NEW = 20
PROMPTS = [
    [0, 5, 9, 13, 17, 5, 9, 21, 30],
    [0, 40, 41, 42, 43, 44, 45, 46, 40, 41],
    [0, 77, 3, 88, 3, 77, 3, 12],
]
FAMILIES = {"llama": _tiny_llama, "gemma3": _tiny_gemma3}
_MODELS: dict = {}


def family_models(family: str):
    """(target, weak model drafter): two random models of the same family and vocabulary, built once per module."""
    if family not in _MODELS:
        _MODELS[family] = FAMILIES[family](), FAMILIES[family](seed=5)
    return _MODELS[family]


def drafter_spec(name: str, target, weak):
    return {"weak": weak, "self": target}.get(name, name)


MODES = ("refs-tree", "refs-chain", "no-refs", "alone")
GREEDY_CASES = [
    (family, model_drafter, mode, i % len(PROMPTS))
    for i, (family, model_drafter, mode) in enumerate(
        (family, model_drafter, mode)
        for family in FAMILIES
        for model_drafter in ("weak", "self", "self:int8", "self:layers=1", "self:recycle")
        for mode in MODES
    )
]


@pytest.mark.parametrize("family, model_drafter, mode, prompt_index", GREEDY_CASES)
def test_greedy_equals_transformers(family, model_drafter, mode, prompt_index):
    model, weak = family_models(family)
    prompt = PROMPTS[prompt_index]
    expected = plain_greedy(model, prompt, MAX_NEW)
    spec = drafter_spec(model_drafter, model, weak)
    kwargs: dict = dict(max_new_tokens=MAX_NEW, policy=fixed_policy(), calibrate=False)
    if mode == "alone":
        kwargs["drafter"] = drafter = build_model_drafter(spec, model)
    else:
        kwargs["drafter"] = spec
        kwargs["tree"] = mode != "refs-chain"
        if mode.startswith("refs"):  # a reference that holds part of the answer after a detour: both kinds draft
            kwargs["store"] = store = ReferenceStore(IdTokenizer(model.config.vocab_size))
            store.add(prompt[-2:] + expected[:6] + [2, 3] + expected[10:16], source="doc")
    out = refdecode.generate(model, None, prompt, **kwargs)
    assert out.token_ids == expected
    if mode == "alone":
        assert drafter.proposals > 0 and drafter.session is None  # it drafted, and the loop closed it


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("mode", ["hybrid", "alone"])
def test_perfect_model_drafter_is_mostly_accepted(family, mode):
    """The target drafting for itself: its drafts are the answer, so most steps commit several tokens."""
    model, _ = family_models(family)
    prompt = PROMPTS[0]
    expected = plain_greedy(model, prompt, MAX_NEW)
    kwargs: dict = {"drafter": build_model_drafter(model, model)} if mode == "alone" else {"drafter": model}
    out = refdecode.generate(
        model, None, prompt, max_new_tokens=MAX_NEW, policy=fixed_policy(), calibrate=False, **kwargs
    )
    assert out.token_ids == expected
    assert out.stats.accepted_sources.get("draft", 0) > 0, out.stats.accepted_sources
    assert out.stats.as_dict()["mean_accepted"] > 2
    assert out.stats.draft_seconds > 0


@pytest.mark.parametrize("model_drafter", ["weak", "self", "self:layers=1", "self:recycle"])
def test_hf_generate_with_a_model_drafter_equals_plain_generate(model_drafter):
    model, weak = family_models("llama")
    prompt = PROMPTS[1]
    x = torch.tensor([prompt])
    plain = model.generate(x, max_new_tokens=MAX_NEW, do_sample=False)
    ours = model.generate(
        x,
        max_new_tokens=MAX_NEW,
        do_sample=False,
        custom_generate=refdecode.hf_generate,
        drafter=drafter_spec(model_drafter, model, weak),
        policy=fixed_policy(),
        ref_stats=(stats := refdecode.GenerationStats()),
    )
    assert torch.equal(ours, plain)
    if model_drafter != "weak":
        assert stats.accepted_tokens > 0


# ---------------------------------------------------------------------------------------------------------------
# 2-3. The model drafter's cache: the shared one is left as found, the own one rolls back
# ---------------------------------------------------------------------------------------------------------------


def four_layer_llama():
    from stats_helpers import tiny_llama

    return tiny_llama(vocab_size=96, seed=3, max_positions=256, layers=4)


def prefilled_session(model, context, *, accepted: int = 0, policy=None) -> DraftSession:
    """The loop's state between steps: the target's cache holds the context except its last (pending) token, built
    as decode builds it (prefill, then past recording; `accepted`: the last tokens came from a verification forward
    whose draft was accepted whole, so nothing cropped them and sliding layers still hold rows past their window)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    head, tail = context[: len(context) - 1 - accepted], context[len(context) - 1 - accepted : -1]
    with torch.no_grad():
        model(input_ids=torch.tensor([head]), cache=cache, use_cache=True)
        cache.activate_past_recording()
        if tail:
            model(input_ids=torch.tensor([tail]), cache=cache, use_cache=True)
    return DraftSession(model, cache, policy or fixed_policy(), None, None, row=len(context) - 2)


def cache_snapshot(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's keys and values as the next forward sees them: a sliding layer's last window - 1 rows (the
    rows it keeps beyond those are only a record for rolling back, which crop trims)."""
    out = []
    for layer in cache.layers:
        rows = layer.sliding_window - 1 if getattr(layer, "is_sliding", False) else 0
        out.append((layer.keys[:, :, -rows:].clone(), layer.values[:, :, -rows:].clone()))
    return out


@pytest.mark.parametrize("accepted", [0, 3])
@pytest.mark.parametrize(
    "family, layers",
    [("llama4", 1), ("llama4", 3), ("gemma3", 1), ("gemma3", 2)],  # N = 1 and N = L - 1
)
def test_shared_cache_model_drafter_leaves_the_targets_cache_as_found(family, layers, accepted):
    model = four_layer_llama() if family == "llama4" else family_models("gemma3")[0]
    context = [0] + [(7 * i + 3) % 90 + 2 for i in range(30)]  # 31 tokens: past Gemma 3's 16-token window
    session = prefilled_session(model, context, accepted=accepted)
    before = cache_snapshot(session.cache)
    drafter = build_model_drafter(f"self:layers={layers}", model)
    assert drafter.shared_cache
    drafter.start(session)
    tree = drafter.propose(context, 6)
    assert tree is not None and len(tree) >= 2  # it drafted (more than one forward of the first layers)
    after = cache_snapshot(session.cache)
    assert session.cache.get_seq_length() == len(context) - 1
    assert len(after) == len(before)
    for i, ((k0, v0), (k1, v1)) in enumerate(zip(before, after, strict=True)):
        assert torch.equal(k0, k1) and torch.equal(v0, v1), f"layer {i} changed"
    # and its first token is what the first N layers predict from scratch on the context
    with torch.no_grad():
        fresh = early_exit_model(model, layers)(input_ids=torch.tensor([context])).logits[0, -1]
    assert tree.tokens[0] == int(fresh.argmax())
    drafter.close()


def test_shared_cache_model_drafter_then_the_target_decodes_as_before():
    """The target's next forward after a shared-cache proposal gives the logits it gives without one."""
    model = family_models("gemma3")[0]
    context = [0] + [(11 * i + 5) % 90 + 2 for i in range(25)]
    with torch.no_grad():
        plain = prefilled_session(model, context, accepted=2)
        expected = model(input_ids=torch.tensor([context[-1:]]), cache=plain.cache, use_cache=True).logits[0, -1]
        session = prefilled_session(model, context, accepted=2)
        drafter = build_model_drafter("self:layers=1", model)
        drafter.start(session)
        assert drafter.propose(context, 5) is not None
        got = model(input_ids=torch.tensor([context[-1:]]), cache=session.cache, use_cache=True).logits[0, -1]
    assert torch.equal(got, expected)


def test_shared_cache_model_drafter_declines_a_cache_out_of_step():
    """Between steps the cache holds the context minus the pending token; anything else: no draft, no change."""
    model = four_layer_llama()
    context = list(range(2, 20))
    session = prefilled_session(model, context)
    before = cache_snapshot(session.cache)
    drafter = build_model_drafter("self:layers=2", model)
    drafter.start(session)
    assert drafter.propose(context + [5], 4) is None
    after = cache_snapshot(session.cache)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(before, after, strict=True))


def draft_argmax(draft_model, context) -> int:
    with torch.no_grad():
        return int(draft_model(input_ids=torch.tensor([context])).logits[0, -1].argmax())


@pytest.mark.parametrize("diverge_at", [0, 1, 2])
def test_own_cache_model_drafter_rolls_back_a_rejected_draft(diverge_at):
    """After the target rejects the draft at depth `diverge_at` (it keeps the first diverge_at draft tokens, then
    commits a token of its own), the next proposal starts with what the draft model predicts from scratch."""
    model, weak = family_models("llama")
    context = PROMPTS[0] + [33, 34]
    drafter = ModelDrafter(weak, top_k=1)
    drafter.start(prefilled_session(model, context))
    first = drafter.propose(context, 4)
    assert first is not None and first.is_chain() and len(first) > diverge_at
    chain = first.tokens
    own = (chain[diverge_at] + 1) % weak.config.vocab_size  # the target's token where the draft was rejected
    committed = context + chain[:diverge_at] + [own, (own + 7) % weak.config.vocab_size]
    second = drafter.propose(committed, 4)
    assert second is not None
    assert second.tokens[0] == draft_argmax(weak, committed)
    assert drafter.cached[: len(committed)] == committed  # the cache holds the committed context, then drafts
    assert drafter.cache.get_seq_length() == len(drafter.cached)
    drafter.close()


def test_own_cache_model_drafter_rolls_back_on_a_sliding_window_model():
    """Gemma 3's sliding layers (window 16): a rejected draft past the window must roll back as well."""
    model, weak = family_models("gemma3")
    context = [0] + [(5 * i + 2) % 90 + 2 for i in range(24)]
    drafter = ModelDrafter(weak, top_k=1)
    drafter.start(prefilled_session(model, context))
    first = drafter.propose(context, 4)
    assert first is not None
    committed = context + [(first.tokens[0] + 1) % 96]
    second = drafter.propose(committed, 4)
    assert second is not None and second.tokens[0] == draft_argmax(weak, committed)


# ---------------------------------------------------------------------------------------------------------------
# 4. Sampling stays lossless with a model model drafter
# ---------------------------------------------------------------------------------------------------------------

ALPHA = 1e-3  # as tests/test_sampling.py: a correct sampler fails each test with probability 0.001
S_PROMPT = [2, 7, 4, 3, 6, 5]
S_TEMPERATURE = 0.8
S_MAX_NEW = 3  # the step after the prefill drafts 1 token: the second token is the model drafter's or a residual's
SAMPLING_RUNS = {False: 400, True: 400}  # generate calls per goodness-of-fit test: alone, hybrid
WRONG_RUNS = 300
_SAMPLING: dict = {}


class AlwaysDraft(FullDrafts):
    """Verify whatever is proposed (WholeTree), chains at full length, at fixed costs: the model drafter drafts as far
    as the budget allows (its draft costs milliseconds against a 1 s forward)."""

    def __init__(self):
        super().__init__(max_draft=8, costs=FixedCosts())


def sampling_case():
    """{"target", "model_drafter", "tables"}: tiny 8-token Llamas; the model drafter is peaked (its q puts most mass
    on one token), which the target accepts at the drafted position about half the time: both verdicts are common, and a
    wrong residual is far from the right one (a biased rule shows in a few hundred runs)."""
    if not _SAMPLING:
        target, model_drafter = tiny_sampling_llama(), tiny_sampling_llama(seed=13, logit_scale=30.0)
        processors = build_processors(SamplingConfig(temperature=S_TEMPERATURE))
        _SAMPLING.update(target=target, model_drafter=model_drafter, tables=exact_tables(target, S_PROMPT, processors))
    return _SAMPLING


class QSpy:
    """Wraps decoding's verify_sampling: counts the calls that verified draft tokens against a draft distribution q."""

    def __init__(self, verify):
        self.verify, self.with_q = verify, 0

    def __call__(self, probs, draft, generator, *, draft_probs=None):
        self.with_q += int(draft_probs is not None and len(draft) > 0)
        return self.verify(probs, draft, generator, draft_probs=draft_probs)


def model_drafter_samples(runs: int, *, first_seed: int = 0, hybrid: bool = False):
    """First three tokens of `runs` seeded generate calls with the model drafter (alone, with its q; or hybrid with
    references, point masses), and (drafted, accepted, accepted from the model drafter) summed over the runs."""
    case = sampling_case()
    model, model_drafter = case["target"], case["model_drafter"]
    samples, drafted, accepted, from_model_drafter = [], 0, 0, 0
    store = None
    if hybrid:  # references whose next token is a coin flip for the target, beside the model drafter's guesses
        store = ReferenceStore(IdTokenizer(VOCAB))
        for i, ref in enumerate(uncertain_references(S_PROMPT, case["tables"])):
            store.add(ref, source=f"ref-{i}")
    for seed in range(first_seed, first_seed + runs):
        kwargs: dict = (
            {"drafter": model_drafter, "store": store}
            if hybrid
            else {"drafter": build_model_drafter(model_drafter, model)}
        )
        out = refdecode.generate(
            model,
            None,
            S_PROMPT,
            max_new_tokens=S_MAX_NEW,
            temperature=S_TEMPERATURE,
            seed=seed,
            policy=AlwaysDraft(),
            calibrate=False,
            **kwargs,
        )
        samples.append(tuple(out.token_ids[:3]))
        drafted += out.stats.drafted_tokens
        accepted += out.stats.accepted_tokens
        from_model_drafter += out.stats.accepted_sources.get("draft", 0)
    return samples, (drafted, accepted, from_model_drafter)


@pytest.mark.slow  # thousands of seeded runs: the full suite runs it, make test-fast does not
@pytest.mark.parametrize("hybrid", [False, True], ids=["alone-with-q", "hybrid-point-masses"])
def test_sampling_with_a_model_drafter_matches_exact_distribution(hybrid, monkeypatch):
    sampling_case()
    spy = QSpy(refdecode.verification.verify_sampling)
    monkeypatch.setattr(refdecode.verification, "verify_sampling", spy)
    runs = SAMPLING_RUNS[hybrid]
    samples, (drafted, accepted, from_model_drafter) = model_drafter_samples(runs, hybrid=hybrid)
    probability = joint_probabilities(_SAMPLING["tables"])
    rate = accepted / drafted
    assert 0.1 < rate < 0.9, rate  # both verdicts were common
    assert from_model_drafter > runs // 10  # the model drafter's tokens were accepted, not only the references'
    if hybrid:
        assert spy.with_q == 0  # the hybrid verifies the model drafter's tokens as point masses
    else:
        assert spy.with_q >= runs // 2  # the q rule verified the model drafter's chains
    result = chi_square_gof(samples, probability)
    tv = total_variation(samples, probability)
    print(f"\n{'hybrid' if hybrid else 'alone'}: {runs} runs, acceptance {rate:.2f}, {result}, TV {tv:.3f}")
    assert result.dof >= 8  # enough cells that the test looks at the joint, not one marginal
    assert result.pvalue > ALPHA, f"the first 3 tokens do not follow the model: {result}"
    if not hybrid:  # the control of test_the_statistic_rejects_a_wrong_residual: the right rule's pairs fit
        pairs = chi_square_gof([s[:2] for s in samples], pair_probabilities(_SAMPLING["tables"]))
        assert pairs.pvalue > ALPHA, f"the first 2 tokens do not follow the model: {pairs}"


def test_a_hybrid_model_drafter_does_not_change_what_a_seed_samples():
    """Point masses are verified by position-keyed Gumbel noise, so the sample of a seed does not depend on the
    drafts (tests/test_sampling.py: same seed, same output whatever the draft lengths); a hybrid model drafter only adds
    drafts, so generate(seed=s, drafter=X) must equal generate(seed=s)."""
    case = sampling_case()
    model, model_drafter = case["target"], case["model_drafter"]
    from_model_drafter = 0
    for seed in range(4):
        kwargs: dict = dict(max_new_tokens=12, temperature=S_TEMPERATURE, seed=seed, calibrate=False)
        plain = refdecode.generate(model, None, S_PROMPT, policy=AlwaysDraft(), **kwargs)
        hybrid = refdecode.generate(model, None, S_PROMPT, policy=AlwaysDraft(), drafter=model_drafter, **kwargs)
        from_model_drafter += hybrid.stats.accepted_sources.get("draft", 0)
        assert hybrid.token_ids == plain.token_ids, f"seed {seed}"
    assert from_model_drafter > 0


def pair_probabilities(tables) -> dict[tuple[int, int], float]:
    """{(t1, t2): exact probability}: the marginal of the first two new tokens."""
    pair = tables.p1[:, None] * tables.p2  # [V, V]
    return {(a, b): float(pair[a, b]) for a in range(VOCAB) for b in range(VOCAB) if float(pair[a, b]) > 0}


def renormalised_p_residual(probs, draft, generator, *, draft_probs=None):
    """A wrong rule for drafts sampled from q: accept x with probability min(1, p(x) / q(x)), but on rejection
    draw from p itself instead of norm(max(0, p - q)): x comes out with probability min(p, q)(x) + (1 - beta) p(x),
    beta = sum(min(p, q)), too often wherever q(x) > beta p(x)."""
    for i, x in enumerate(draft):
        p, x = probs[i], int(x)
        q_x = 1.0 if draft_probs is None else float(draft_probs[i, x])
        u = float(torch.rand((), generator=generator))
        if q_x > 0 and u < min(1.0, float(p[x]) / q_x):
            continue
        return Verdict(i, int(torch.multinomial(p, 1, generator=generator)))
    return Verdict(len(draft), int(torch.multinomial(probs[len(draft)], 1, generator=generator)))


@pytest.mark.slow  # thousands of seeded runs: the full suite runs it, make test-fast does not
def test_the_statistic_rejects_a_wrong_residual(monkeypatch):
    """The same goodness-of-fit test, on the first two tokens (the second is the one the q rule emits), fails the
    model drafter's q path with a wrong residual: it has teeth."""
    tables = sampling_case()["tables"]
    spy = QSpy(renormalised_p_residual)
    monkeypatch.setattr(refdecode.verification, "verify_sampling", spy)
    samples, (drafted, accepted, _) = model_drafter_samples(WRONG_RUNS, first_seed=10**6)
    assert spy.with_q >= WRONG_RUNS // 2 and drafted > accepted > 0  # the q path was taken, with rejections
    probability = pair_probabilities(tables)
    pairs = [s[:2] for s in samples]
    result = chi_square_gof(pairs, probability)
    print(f"\nwrong residual: {len(pairs)} runs, {result}, TV {total_variation(pairs, probability):.3f}")
    assert result.pvalue < ALPHA, f"the test cannot tell a biased residual from the right one: {result}"


# ---------------------------------------------------------------------------------------------------------------
# 5. Bad input, and the heads drafter with stand-in heads
# ---------------------------------------------------------------------------------------------------------------


def test_a_draft_model_with_another_vocabulary_is_refused():
    model, _ = family_models("llama")
    other = _tiny_llama(vocab_size=100)
    with pytest.raises(ValueError, match=r"100.*96|96.*100"):
        check_draft_model(model, other)
    with pytest.raises(ValueError, match=r"100.*96|96.*100"):
        refdecode.generate(model, None, PROMPTS[0], max_new_tokens=4, drafter=other)


def test_a_draft_model_with_another_eos_is_refused():
    model, _ = family_models("llama")
    other = tiny_llama(vocab_size=96, seed=1, eos_token_id=2)
    with pytest.raises(ValueError, match="eos_token_id"):
        build_model_drafter(other, model)


@pytest.mark.parametrize("spec", ["self:int4", "self:layers=x", "self:layers=0", "self:layers=-1", "", "   "])
def test_check_model_drafter_spec_refuses(spec):
    with pytest.raises(ValueError):
        check_drafter_spec(spec)


@pytest.mark.parametrize(
    "spec", ["self:int8", "self:layers=1", "self:heads", "self:recycle", "smollm2-135m", "/some/checkpoint"]
)
def test_check_model_drafter_spec_accepts(spec):
    check_drafter_spec(spec)


@pytest.mark.parametrize("layers", [2, 3])  # the tiny Llama has 2 layers: N must be below that
def test_layers_at_or_beyond_the_target_are_refused(layers):
    model, _ = family_models("llama")
    with pytest.raises(ValueError, match="1 <= N < 2"):
        build_model_drafter(f"self:layers={layers}", model)


def test_drafter_and_draft_model_together_are_refused():
    model, weak = family_models("llama")
    with pytest.raises(ValueError, match="either drafter= or draft_model="):
        refdecode.generate(
            model, None, PROMPTS[0], max_new_tokens=4, drafter=build_model_drafter(weak, model), draft_model=weak
        )


def test_draft_model_is_the_deprecated_name_of_drafter():
    """draft_model= still works, warns (pointing at the caller's line) and decodes exactly as drafter= does."""
    model, weak = family_models("llama")
    new = refdecode.generate(model, None, PROMPTS[0], max_new_tokens=MAX_NEW, drafter=weak, policy=fixed_policy())
    with pytest.warns(DeprecationWarning, match="drafter=") as caught:
        old = refdecode.generate(
            model, None, PROMPTS[0], max_new_tokens=MAX_NEW, draft_model=weak, policy=fixed_policy()
        )
    assert caught[0].filename == __file__
    assert old.token_ids == new.token_ids and old.stats.accepted_sources == new.stats.accepted_sources


def test_draft_model_with_a_drafter_object_still_joins_the_references():
    """A model drafter object given as draft_model= joins the references (a HybridDrafter), as it always did; given
    as drafter= it drafts alone."""
    model, _ = family_models("llama")
    prompt = PROMPTS[0]
    expected = plain_greedy(model, prompt, MAX_NEW)
    kwargs: dict = dict(max_new_tokens=MAX_NEW, calibrate=False)
    with pytest.warns(DeprecationWarning):
        joined = refdecode.generate(
            model, None, prompt, policy=fixed_policy(), draft_model=CountingDrafter(()), **kwargs
        )
    alone = refdecode.generate(model, None, prompt, policy=fixed_policy(), drafter=CountingDrafter(()), **kwargs)
    assert joined.token_ids == alone.token_ids == expected
    assert alone.stats.drafted_tokens == 0  # only the stub, which proposes nothing
    assert joined.stats.drafted_tokens > 0  # the references drafted beside it


def test_hf_generate_takes_drafter_and_warns_on_draft_model():
    model, weak = family_models("llama")
    x = torch.tensor([PROMPTS[1]])
    common = dict(max_new_tokens=MAX_NEW, do_sample=False, custom_generate=refdecode.hf_generate)
    new = model.generate(x, drafter=weak, policy=fixed_policy(), **common)
    with pytest.warns(DeprecationWarning, match="drafter="):
        old = model.generate(x, draft_model=weak, policy=fixed_policy(), **common)
    assert torch.equal(old, new)
    with pytest.raises(ValueError, match="either drafter= or draft_model="):
        model.generate(x, drafter=weak, draft_model=weak, **common)


@pytest.mark.parametrize("flag", ["--drafter", "--draft-model"])
def test_cli_refuses_an_unknown_model_drafter_before_loading_a_model(capsys, monkeypatch, flag):
    """--drafter is the option's name; --draft-model, its older name, is the same option."""
    from refdecode.cli import main

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the draft model name was checked")

    monkeypatch.setattr(refdecode, "load_model", no_loading)
    code = main(["generate", "--prompt", "hi", flag, "self:bogus"])
    err = capsys.readouterr().err
    assert code == 2
    assert "self:bogus" in err and "Traceback" not in err and err.count("\n") == 1


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.skipif(importlib.util.find_spec("refdecode.heads") is None, reason="refdecode.heads is not here yet")
def test_cli_self_heads_without_trained_heads_is_one_line(capsys, monkeypatch, tmp_path, smollm2):
    """`--draft-model self:heads` where no heads were trained: exit 2 with one line that names the train command.
    The model is the real SmolLM2 (its name is how heads are looked up); heads are looked for in an empty cache."""
    from refdecode.cli import main

    model, tokenizer = smollm2
    monkeypatch.setattr(refdecode, "load_model", lambda *args, **kwargs: (model, tokenizer))
    monkeypatch.setenv("REFDECODE_CACHE", str(tmp_path))
    code = main(["generate", "--prompt", "hi", "--max-new-tokens", "4", "--draft-model", "self:heads"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "heads" in err and "Traceback" not in err and err.count("\n") == 1


class LmHeadHeads(torch.nn.Module):
    """Stand-in Medusa heads: every head returns the target's own output layer's logits over the whole vocabulary
    (a poor guess k + 1 tokens ahead, but well-formed)."""

    def __init__(self, model, num_heads: int = 3):
        super().__init__()
        self.num_heads = num_heads
        self.lm_head = model.lm_head
        self.register_buffer("vocab_ids", torch.arange(model.config.vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., K, V]
        logits = self.lm_head(hidden)
        return logits.unsqueeze(-2).expand(*logits.shape[:-1], self.num_heads, logits.shape[-1])


class ShiftedHeads(torch.nn.Module):
    """Stand-in heads over a restricted vocabulary (the even ids): head k scores token (argmax + k + 1) mod V highest,
    so drafts are mostly wrong but do name tokens outside the argmax."""

    def __init__(self, model, num_heads: int = 2):
        super().__init__()
        self.num_heads = num_heads
        self.lm_head = model.lm_head
        self.register_buffer("vocab_ids", torch.arange(0, model.config.vocab_size, 2))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [..., H] -> [..., K, V']
        logits = self.lm_head(hidden)[..., self.vocab_ids]
        return torch.stack([logits.roll(k + 1, dims=-1) for k in range(self.num_heads)], dim=-2)


def final_norm_hooks(model) -> int:
    return len(model.model.norm._forward_hooks)


@pytest.mark.parametrize("heads_kind", ["lm_head", "shifted"])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_heads_drafter_greedy_equals_plain_and_removes_its_hook(family, heads_kind):
    model, _ = family_models(family)
    prompt = PROMPTS[2]
    expected = plain_greedy(model, prompt, MAX_NEW)
    heads = LmHeadHeads(model) if heads_kind == "lm_head" else ShiftedHeads(model)
    hooks = final_norm_hooks(model)
    for kwargs in (
        {"drafter": HeadsDrafter(heads)},
        {"drafter": HybridDrafter(refdecode.ReferenceDrafter(prompt), HeadsDrafter(heads))},
    ):
        out = refdecode.generate(
            model, None, prompt, max_new_tokens=MAX_NEW, policy=fixed_policy(), calibrate=False, **kwargs
        )
        assert out.token_ids == expected
        assert final_norm_hooks(model) == hooks  # the capture hook went with the call
    assert kwargs["drafter"].model_drafter.proposals > 0  # the heads drafted


class OracleHeads(torch.nn.Module):
    """Stand-in heads that know the answer: given the final hidden state of the row at position t of the greedy
    sequence (which chose the token at t + 1, the pending one), head k returns the token at t + 2 + k. The row is
    recognised by its nearest stored hidden state, so the drafts are right only if the drafter reads the row that
    chose the pending token (session.row)."""

    def __init__(self, model, ids: list[int], num_heads: int = 3):
        super().__init__()
        self.num_heads, self.vocab = num_heads, model.config.vocab_size
        self.scale = torch.nn.Parameter(torch.ones(()))  # heads have weights (HeadsDrafter reads their dtype)
        captured = []
        hook = model.model.norm.register_forward_hook(lambda module, inputs, output: captured.append(output))
        try:
            with torch.no_grad():
                model(input_ids=torch.tensor([ids]))
        finally:
            hook.remove()
        self.register_buffer("rows", captured[0][0].detach().clone())  # [T, H]
        self.register_buffer("vocab_ids", torch.arange(self.vocab))
        self.ids = ids

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [H] -> [K, V]
        t = int((self.rows - hidden).norm(dim=-1).argmin())
        logits = torch.zeros(self.num_heads, self.vocab)
        for k in range(self.num_heads):
            if t + 2 + k < len(self.ids):
                logits[k, self.ids[t + 2 + k]] = 30.0
        return logits * self.scale


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_heads_drafter_reads_the_row_that_chose_the_pending_token(family):
    """With heads that are right whenever they are given the right row, nearly every step commits several tokens:
    the loop's session.row and the hook's capture point at the right hidden state, in chain and tree steps alike."""
    model, _ = family_models(family)
    prompt = PROMPTS[1]
    expected = plain_greedy(model, prompt, MAX_NEW)
    drafter = HeadsDrafter(OracleHeads(model, prompt + expected), top_k=2)  # top_k=2: trees with a sibling
    out = refdecode.generate(
        model, None, prompt, max_new_tokens=MAX_NEW, drafter=drafter, policy=fixed_policy(), calibrate=False
    )
    assert out.token_ids == expected
    assert out.stats.accepted_sources.get("heads", 0) >= MAX_NEW // 2, out.stats.accepted_sources
    assert out.stats.as_dict()["mean_accepted"] > 2


def test_heads_drafter_removes_its_hook_when_decoding_fails():
    model, _ = family_models("llama")
    drafter = HeadsDrafter(LmHeadHeads(model))
    hooks = final_norm_hooks(model)

    class Boom(RuntimeError):
        pass

    def explode(*args, **kwargs):
        raise Boom

    original = drafter.propose
    calls = []

    def propose_then_fail(context, max_tokens):
        calls.append(1)
        if len(calls) > 2:
            explode()
        return original(context, max_tokens)

    drafter.propose = propose_then_fail
    with pytest.raises(Boom):
        refdecode.generate(
            model, None, PROMPTS[0], max_new_tokens=MAX_NEW, drafter=drafter, policy=fixed_policy(), calibrate=False
        )
    assert final_norm_hooks(model) == hooks


# ---------------------------------------------------------------------------------------------------------------
# 6. merge_trees
# ---------------------------------------------------------------------------------------------------------------


def token_paths(tree: DraftTree) -> dict[tuple[int, ...], int]:
    """{token path from the root's child down to a node: that node}."""
    return {tuple(tree.tokens[j] for j in tree.path(i)): i for i in range(len(tree))}


def test_merge_trees_merges_shared_nodes_and_appends_new_ones():
    base = build_tree([Candidate([5, 6, 7], "context", 4), Candidate([5, 8], "store", 2)], max_depth=8)
    extra = DraftTree([5, 6, 9, 3], [ROOT, 0, 1, ROOT], ["draft"] * 4, [7, 5, 3, 2], [1, 1, 1, 1])
    merged = merge_trees(base, extra)
    paths = token_paths(merged)
    assert set(paths) == {(5,), (5, 6), (5, 6, 7), (5, 8), (5, 6, 9), (3,)}
    assert merged.counts[paths[(5,)]] == 2 + 1 and merged.counts[paths[(5, 6)]] == 1 + 1
    assert merged.sources[paths[(5, 6)]] == "context" and merged.match_lens[paths[(5, 6)]] == 4  # the base's evidence
    assert merged.sources[paths[(5, 6, 9)]] == "draft" and merged.match_lens[paths[(5, 6, 9)]] == 3
    assert merged.sources[paths[(3,)]] == "draft" and merged.parents[paths[(3,)]] == ROOT
    assert merged.parents[paths[(5, 6, 9)]] == paths[(5, 6)]
    assert merged.q is None


def test_merge_trees_drops_q():
    base = DraftTree.chain([1, 2], source="context", match_len=3)
    extra = DraftTree.chain([1, 4], source="draft", q=torch.full((2, 8), 1 / 8))
    assert merge_trees(base, extra).q is None


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_paths = st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=4), max_size=6)


def _tree_of(paths: list[list[int]], source: str) -> DraftTree:
    return build_tree([Candidate(p, source, 1 + i) for i, p in enumerate(paths)], max_depth=8)


@pytest.mark.fuzz
@given(_paths, _paths)
def test_merge_trees_keeps_every_path_of_both(base_paths, extra_paths):
    base, extra = _tree_of(base_paths, "context"), _tree_of(extra_paths, "draft")
    merged = merge_trees(base, extra)
    got, in_base, in_extra = token_paths(merged), token_paths(base), token_paths(extra)
    assert set(got) == set(in_base) | set(in_extra)  # every path of both, and nothing else (no duplicates)
    assert len(merged) == len(got)
    assert all(p < i for i, p in enumerate(merged.parents))  # flat order: parents before children
    for path, node in got.items():
        base_count = base.counts[in_base[path]] if path in in_base else 0
        extra_count = extra.counts[in_extra[path]] if path in in_extra else 0
        assert merged.counts[node] == base_count + extra_count
        origin, i = (base, in_base[path]) if path in in_base else (extra, in_extra[path])
        assert (merged.sources[node], merged.match_lens[node]) == (origin.sources[i], origin.match_lens[i])


# ---------------------------------------------------------------------------------------------------------------
# 7. The hybrid skips the model drafter where references cover the next token
# ---------------------------------------------------------------------------------------------------------------


class CountingDrafter(ModelDrafterBase):
    """A model drafter stub: counts its proposals, drafts a fixed chain, costs 10 ms a token (decides whether it pays
    with the real rule)."""

    name = "stub"

    def __init__(self, tokens=(4, 5)):
        super().__init__()
        self.tokens, self.calls, self.seconds_per_token = list(tokens), 0, 0.01
        self.started = self.closed = 0

    def start(self, session):
        super().start(session)
        self.started += 1

    def close(self):
        self.closed += 1

    def observe(self, new_tokens):
        pass

    def propose(self, context, max_tokens):
        self.calls += 1
        return DraftTree.chain(self.tokens[:max_tokens], source=self.name, match_len=4)


class FixedReference:
    """A reference drafter stub that proposes the same tree (or nothing) every step."""

    def __init__(self, tree):
        self.tree = tree

    def propose(self, context, max_tokens):
        return self.tree

    def observe(self, new_tokens):
        pass


def sure_policy() -> DraftPolicy:
    """Every source's drafts are accepted with probability 1 (a prior of weight 10^6 at 1.0)."""
    return fixed_policy(acceptance=AcceptanceModel(prior=1.0, prior_weight=1e6))


def hybrid_with(reference_tree, policy):
    model_drafter = CountingDrafter()
    hybrid = HybridDrafter(FixedReference(reference_tree), model_drafter)
    assert model_drafter.use_q is False  # the hybrid verifies point masses
    hybrid.start(DraftSession(None, None, policy, None, None))
    return hybrid, model_drafter


def test_hybrid_skips_the_model_drafter_where_references_cover_the_next_token():
    hybrid, model_drafter = hybrid_with(DraftTree.chain([7, 8, 9], source="context", match_len=6), sure_policy())
    for step in range(3):
        tree = hybrid.propose([1, 2, 3], 4)
        assert tree is not None and tree.tokens == [7, 8, 9]
        assert hybrid.skipped == step + 1
    assert model_drafter.calls == 0


def test_hybrid_runs_the_model_drafter_where_nothing_matches():
    hybrid, model_drafter = hybrid_with(None, sure_policy())
    tree = hybrid.propose([1, 2, 3], 4)
    assert model_drafter.calls == 1 and hybrid.skipped == 0
    assert tree is not None and tree.tokens == [4, 5] and tree.sources == ["stub", "stub"]


def test_hybrid_merges_the_model_drafter_where_references_are_unsure():
    """References at an acceptance of 0.3 leave room: the model drafter runs and its chain joins the references'
    tree."""
    policy = fixed_policy(acceptance=AcceptanceModel(prior=0.3, prior_weight=1e6))
    hybrid, model_drafter = hybrid_with(DraftTree.chain([7, 8], source="context", match_len=2), policy)
    tree = hybrid.propose([1, 2, 3], 4)
    assert model_drafter.calls == 1 and hybrid.skipped == 0
    assert set(token_paths(tree)) == {(7,), (7, 8), (4,), (4, 5)}


def test_a_gaps_only_model_drafter_runs_only_where_references_propose_nothing():
    """self:recycle is gaps_only: even beside unsure references (where an ordinary model drafter is merged, test above)
    it is not run; where they propose nothing it drafts alone."""
    policy = fixed_policy(acceptance=AcceptanceModel(prior=0.3, prior_weight=1e6))
    hybrid, model_drafter = hybrid_with(DraftTree.chain([7, 8], source="context", match_len=2), policy)
    model_drafter.gaps_only = True
    assert hybrid.propose([1, 2, 3], 4).tokens == [7, 8]
    assert model_drafter.calls == 0 and hybrid.skipped == 1
    hybrid, model_drafter = hybrid_with(None, policy)
    model_drafter.gaps_only = True
    assert hybrid.propose([1, 2, 3], 4).tokens == [4, 5]
    assert model_drafter.calls == 1 and RecycleDrafter.gaps_only


def test_hybrid_starts_and_closes_its_model_drafter_through_generate():
    model, _ = family_models("llama")
    model_drafter = CountingDrafter(tokens=())
    hybrid = HybridDrafter(refdecode.ReferenceDrafter(PROMPTS[0]), model_drafter)
    refdecode.generate(
        model, None, PROMPTS[0], max_new_tokens=6, drafter=hybrid, policy=fixed_policy(), calibrate=False
    )
    assert (model_drafter.started, model_drafter.closed) == (1, 1) and hybrid.session is None


# ---------------------------------------------------------------------------------------------------------------
# The real SmolLM2
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.real_model
@pytest.mark.parametrize(
    "spec, alone", [("self:layers=10", False), ("self:int8", False), ("self:recycle", False), ("self:recycle", True)]
)
def test_smollm2_greedy_with_a_self_model_drafter_equals_transformers(smollm2, spec, alone):
    """Hybrid (beside the prompt's references) and, for self:recycle, alone too: beside references it runs only where
    they propose nothing, which on this prompt may be never."""
    model, tokenizer = smollm2
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "List three prime numbers and say why each is prime."}],
        add_generation_prompt=True,
        tokenize=True,
    )
    ids = ids["input_ids"] if hasattr(ids, "keys") else list(ids)
    expected = plain_greedy(model, ids, 24)
    model_drafter = {"drafter": build_model_drafter(spec, model)} if alone else {"drafter": spec}
    kwargs: dict = dict(max_new_tokens=24, policy=fixed_policy(), calibrate=False)
    out = refdecode.generate(model, tokenizer, ids, **kwargs, **model_drafter)
    assert out.token_ids == expected
    if alone or not build_model_drafter(spec, model).gaps_only:
        assert out.stats.accepted_sources.get(build_model_drafter(spec, model).name, 0) > 0, out.stats.accepted_sources


def test_a_model_drafter_runs_where_its_gain_beats_draft_time_plus_the_wider_verification():
    """ModelDrafterBase.pays: a model drafter right half the time pays on a flat cost curve (a GPU), not where a
    2-token forward costs 1.8 one-token forwards (this CPU), unless its acceptance is high; refused explore_every
    times in a row, it runs once anyway so its estimates can still change."""

    def model_drafter_on(costs, rate):
        model_drafter = CountingDrafter()
        policy = DraftPolicy(costs=ForwardCostModel(costs), explore_every=4)
        policy.node_model("stub", 0).prior, policy.node_model("stub", 0).prior_weight = rate, 1e6
        model_drafter.start(DraftSession(None, None, policy, None, None))
        model_drafter.seconds_per_token = 0.001
        return model_drafter

    flat, steep = {1: 0.1, 2: 0.102, 4: 0.104}, {1: 0.1, 2: 0.18, 4: 0.2}
    assert model_drafter_on(flat, 0.5).pays(0.0, 1)
    assert not model_drafter_on(flat, 0.5).pays(0.99, 1)  # the references cover the next token
    assert model_drafter_on(steep, 0.9).pays(0.0, 1)
    cpu = model_drafter_on(steep, 0.5)
    assert [cpu.pays(0.0, 1) for _ in range(8)] == [False, False, False, True] * 2


def test_an_own_cache_model_drafter_never_feeds_more_than_its_window():
    """A long context (a prompt, or steps the hybrid skipped) is caught up from its last `window` tokens only; the
    cache then grows with the context up to twice the window and starts again. Greedy output is still plain
    decoding's (the window only changes what the draft sees)."""
    model, weak = family_models("llama")
    model_drafter = ModelDrafter(weak, window=8)
    fed: list[int] = []
    forward = model_drafter._forward
    model_drafter._forward = lambda cache, ids: (fed.append(len(ids)), forward(cache, ids))[1]
    model_drafter.start(DraftSession(model, None, fixed_policy(), None, None))
    context = list(range(2, 40))
    model_drafter.propose(context, 3)
    assert fed[0] == 8 and model_drafter.offset == len(context) - 8
    for grow in range(1, 20):
        fed.clear()
        model_drafter.propose(context + list(range(3, 3 + grow)), 3)
        assert fed[0] <= 8 and len(model_drafter.cached) <= 16 + 2  # up to twice the window, plus its own drafts
    prompt = PROMPTS[1]
    expected = plain_greedy(model, prompt, MAX_NEW)
    drafter = ModelDrafter(weak, window=4)
    out = refdecode.generate(model, None, prompt, max_new_tokens=MAX_NEW, drafter=drafter, policy=fixed_policy())
    assert out.token_ids == expected


def test_a_model_drafter_never_timed_prices_its_tokens_from_its_first_forward(monkeypatch):
    """A fresh model drafter has no measured cost per token; its first forward's time stands in for it, so a slow
    draft model beside a fast target drafts a couple of sure tokens, not as many as it is allowed. The drafter's
    clock is a fake one that only its forwards advance (30 ms each): with real time, a later forward that ran
    slower than the first under a loaded machine made the drafter draft deeper (depth 4 under xdist)."""
    import types

    import refdecode.drafters.draft_model as draft_model_module

    now = [0.0]
    monkeypatch.setattr(draft_model_module, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    model, weak = family_models("llama")
    model_drafter = ModelDrafter(weak, window=8)
    forward = model_drafter._forward

    def slow_forward(cache, ids):
        now[0] += 0.03
        return forward(cache, ids)

    model_drafter._forward = slow_forward
    policy = DraftPolicy(costs=ForwardCostModel({1: 0.001, 2: 0.001, 32: 0.001}))
    for rank in range(3):  # every draft token is "sure" to be accepted
        policy.node_model(model_drafter.name, rank).prior, policy.node_model(model_drafter.name, rank).prior_weight = (
            0.99,
            1e6,
        )
    model_drafter.start(DraftSession(model, None, policy, None, None))
    tree = model_drafter.propose(list(range(2, 20)), 20)
    assert 1 <= max(tree.depths()) <= 3 and model_drafter.seconds_per_token >= 0.03  # the chain's length


def test_a_primed_model_drafter_feeds_one_token_at_its_first_step():
    """prime (called with the target's prefill) feeds the prompt's last `window` tokens; the first draft step then
    feeds only the pending token (its window then holds one token more than an unprimed drafter's restart). Through
    generate, priming happens before the first token, and the output is plain greedy's."""
    model, weak = family_models("llama")
    context = list(range(2, 40))
    windows, feeds = [], []
    for primed in (True, False):
        model_drafter = ModelDrafter(weak, window=8)
        fed: list[int] = []
        forward = model_drafter._forward
        model_drafter._forward = lambda cache, ids, fed=fed, forward=forward: (
            fed.append(len(ids)),
            forward(cache, ids),
        )[1]
        if primed:
            model_drafter.prime(context[:-1])
            assert model_drafter.cached == context[-9:-1] and model_drafter.offset == len(context) - 9
        model_drafter.start(DraftSession(model, None, fixed_policy(), None, None))
        assert model_drafter.propose(context, 3) is not None
        feeds.append(fed[0])
        offset = model_drafter.offset
        assert model_drafter.cached[: len(context) - offset] == context[offset:]  # the window, then its own drafts
        windows.append(len(context) - offset)
    assert feeds == [1, 8] and windows == [9, 8]
    order: list[str] = []
    model_drafter = ModelDrafter(weak, window=8)
    prime, start = model_drafter.prime, model_drafter.start
    model_drafter.prime = lambda ids: (order.append("prime"), prime(ids))[1]
    model_drafter.start = lambda session: (order.append("start"), start(session))[1]
    hybrid = HybridDrafter(refdecode.ReferenceDrafter(PROMPTS[1]), model_drafter)
    streamed: list[str] = []

    class Streamer:
        def put(self, value):
            streamed.append("token" if order else "prompt")

        def end(self):
            pass

    out = refdecode.generate(
        model, None, PROMPTS[1], max_new_tokens=MAX_NEW, drafter=hybrid, policy=fixed_policy(), streamer=Streamer()
    )
    assert out.token_ids == plain_greedy(model, PROMPTS[1], MAX_NEW)
    assert order[:2] == ["prime", "start"] and streamed[0] == "prompt" and len(streamed) > 1


# ---------------------------------------------------------------------------------------------------------------
# 9. Recycled predictions (self:recycle): the target's own earlier logits as a model drafter
# ---------------------------------------------------------------------------------------------------------------


def brute_successors(rows: list[tuple[int, list[float]]], token: int, k: int) -> list[tuple[int, float]]:
    """The top-k (token, probability) of the last logits row whose input was `token`, by sorting all of it."""
    last = [logits for t, logits in rows if t == token]
    if not last:
        return []
    probs = torch.softmax(torch.tensor(last[-1], dtype=torch.float64), dim=-1).tolist()
    ranked = sorted(range(len(probs)), key=lambda i: (-probs[i], i))[:k]
    return [(i, probs[i]) for i in ranked]


@pytest.mark.fuzz
@given(
    st.lists(
        st.lists(st.tuples(st.integers(0, 5), st.lists(st.integers(-40, 40), min_size=7, max_size=7)), max_size=6),
        max_size=4,
    ),
    st.integers(1, 9),
)
def test_successor_table_keeps_the_last_rows_top_k(forwards, k):
    """Oracle: after any sequence of forwards (input ids with their logits rows, repeated ids within a forward
    included), each token's successors are the top-k of the last row whose input was that token."""
    table = SuccessorTable(k=k)
    seen: list[tuple[int, list[float]]] = []
    for forward in forwards:
        ids = [t for t, _ in forward]
        logits = torch.tensor([[v / 4 for v in row] for _, row in forward], dtype=torch.float32).reshape(len(ids), 7)
        table.update(ids, logits)
        seen += [(t, [v / 4 for v in row]) for t, row in forward]
    for token in range(7):
        got = table.successors(token, k)
        want = brute_successors(seen, token, k)
        assert [t for t, _ in got] == [t for t, _ in want] or _ties(want, got)
        assert [p for _, p in got] == pytest.approx([p for _, p in want], abs=1e-5)


def _ties(want, got) -> bool:
    """Equal probabilities may come in any order: the same multiset of (rounded) probabilities is enough."""
    return sorted(round(p, 5) for _, p in want) == sorted(round(p, 5) for _, p in got)


def test_successor_table_refuses_mismatched_rows_and_ignores_foreign_ids():
    table = SuccessorTable(k=2)
    with pytest.raises(ValueError, match="one logits row per input id"):
        table.update([1, 2], torch.zeros(3, 5))
    table.update([1, 99, -3], torch.tensor([[0.0, 5, 1, 0, 0], [9, 0, 0, 0, 0], [0, 0, 0, 9, 0]]))
    assert [t for t, _ in table.successors(1, 2)] == [1, 2]
    assert table.successors(99, 2) == [] and table.successors(-3, 2) == [] and table.successors(4, 2) == []
    with pytest.raises(ValueError, match="k must be"):
        SuccessorTable(k=0)


def brute_best_paths(table: SuccessorTable, root: int, branch: int, depth: int, n: int) -> list[tuple[int, ...]]:
    """Every path of up to `depth` recorded successors after root, the n of highest probability product."""
    paths: list[tuple[tuple[int, ...], float]] = []

    def walk(token: int, path: tuple[int, ...], prob: float) -> None:
        if len(path) == depth:
            return
        for child, p in table.successors(token, branch):
            paths.append((path + (child,), prob * p))
            walk(child, path + (child,), prob * p)

    walk(root, (), 1.0)
    return [path for path, _ in sorted(paths, key=lambda x: -x[1])[:n]]


@pytest.mark.fuzz
@given(st.integers(0, 2**32 - 1), st.integers(1, 3), st.integers(1, 4), st.integers(1, 12))
def test_recycle_tree_holds_the_most_probable_paths(seed, branch, depth, max_nodes):
    """Oracle: the grown tree's paths are the max_nodes most probable ones (probabilities distinct, so the set is
    unique), its parents come before its children and it never goes deeper than asked."""
    gen = torch.Generator().manual_seed(seed)
    table = SuccessorTable(k=4)
    table.update(list(range(6)), torch.randn(6, 6, generator=gen) * 3)
    tree = RecycleDrafter(table, branch=branch, max_nodes=max_nodes).grow(0, depth)
    want = brute_best_paths(table, 0, branch, depth, max_nodes)
    assert tree is not None
    assert set(token_paths(tree)) == set(want)
    assert all(p < i for i, p in enumerate(tree.parents)) and max(tree.depths()) <= depth
    assert set(tree.sources) == {"recycle"}


def test_recycle_grows_nothing_from_an_unseen_token():
    assert RecycleDrafter(SuccessorTable()).grow(3, 4) is None


def test_recycle_records_every_row_of_the_targets_forwards_and_unhooks_on_close():
    """While a session is open every forward of the target is recorded (input id -> top-k of its row); close()
    removes both hooks, after which forwards no longer change the table."""
    model, _ = family_models("llama")
    drafter = RecycleDrafter(SuccessorTable(k=3))
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    hooks = len(model.get_output_embeddings()._forward_hooks), len(model.get_input_embeddings()._forward_pre_hooks)
    drafter.start(DraftSession(model, cache, fixed_policy(), None, None))
    ids = [4, 9, 4, 17, 2]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True).logits[0].float()
    drafter.close()
    rows = [(t, logits[i].tolist()) for i, t in enumerate(ids)]
    for token in set(ids):
        got = drafter.table.successors(token, 3)
        assert [t for t, _ in got] == [t for t, _ in brute_successors(rows, token, 3)]
    assert drafter.table.rows == len(ids)
    after = (len(model.get_output_embeddings()._forward_hooks), len(model.get_input_embeddings()._forward_pre_hooks))
    assert after == hooks
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6]]))
    assert drafter.table.rows == len(ids)


def test_recycle_table_belongs_to_the_target_and_learns_across_calls():
    """build_model_drafter hands out one table per target: a second call drafts from what the first recorded, and on a
    repeated request it commits more tokens per step."""
    model = _tiny_llama()
    prompt = PROMPTS[0]
    expected = plain_greedy(model, prompt, MAX_NEW)
    steps = []
    for _ in range(2):
        drafter = build_model_drafter("self:recycle", model)
        out = refdecode.generate(
            model, None, prompt, max_new_tokens=MAX_NEW, drafter=drafter, policy=fixed_policy(), calibrate=False
        )
        assert out.token_ids == expected
        steps.append(out.stats.steps)
    assert build_model_drafter("self:recycle", model).table is drafter.table
    assert build_model_drafter("self:recycle", _tiny_llama()).table is not drafter.table
    assert steps[1] < steps[0], steps


@pytest.mark.parametrize("hybrid", [False, True], ids=["alone", "hybrid"])
def test_recycle_does_not_change_what_a_seed_samples(hybrid):
    """Its drafts are point masses chosen from earlier forwards, never from the verification's noise, so under
    sampling a seed gives the output it gives without drafts (position-keyed noise, tests/test_sampling.py)."""
    case = sampling_case()
    model = case["target"]
    accepted = 0
    for seed in range(6):
        kwargs: dict = dict(max_new_tokens=16, temperature=S_TEMPERATURE, seed=seed, calibrate=False)
        plain = refdecode.generate(model, None, S_PROMPT, policy=AlwaysDraft(), **kwargs)
        if hybrid:
            kwargs["drafter"] = "self:recycle"
        else:
            kwargs["drafter"] = build_model_drafter("self:recycle", model)
        out = refdecode.generate(model, None, S_PROMPT, policy=AlwaysDraft(), **kwargs)
        accepted += out.stats.accepted_sources.get("recycle", 0)
        assert out.token_ids == plain.token_ids, f"seed {seed}"
    assert accepted > 0


def test_forget_learned_starts_the_next_recycle_call_cold():
    model = _tiny_llama()
    table = build_model_drafter("self:recycle", model).table
    table.update([1], torch.randn(1, model.config.vocab_size))
    refdecode.drafters.forget_learned(model)
    fresh = build_model_drafter("self:recycle", model).table
    assert fresh is not table and fresh.rows == 0 and fresh.successors(1, 3) == []
    refdecode.drafters.forget_learned(_tiny_llama())  # a target that never had a model drafter: nothing to forget
