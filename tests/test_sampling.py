"""Sampling is lossless: refdecode's output has exactly the distribution of plain sampling.

On a tiny random Llama with 8 tokens the exact joint distribution of the first three new tokens is enumerable from
the model's own logits, with the same processors (temperature, top-k, top-p) plain sampling applies. Thousands of
seeded refdecode runs are compared with it by a Pearson chi-square goodness-of-fit test at ALPHA; references are
built so that the drafted tokens have target probability 0.2-0.6 (drafts are often accepted and often rejected),
and the same statistic rejects a deliberately wrong rule (REST's re-sampling from the full distribution after a
rejection). Runs are seeded, so every p-value below is the same on every run of the suite.
"""

from __future__ import annotations

import pytest
import torch
from stats_helpers import (
    VOCAB,
    AlwaysDraft,
    IdTokenizer,
    chi_square_gof,
    chi_square_two_sample,
    exact_tables,
    joint_probabilities,
    tiny_sampling_llama,
    total_variation,
)

import refdecode
from refdecode.decoding import decode
from refdecode.drafters import Draft
from refdecode.policy import DraftPolicy, ForwardCostModel
from refdecode.sampling import SamplingConfig, build_processors
from refdecode.store import ReferenceStore
from refdecode.verification import Verdict, verify_sampling

ALPHA = 1e-3  # significance of each test below: it fails a correct sampler with probability 0.001
PROMPT = [2, 7, 4, 3, 6, 5]
SETTINGS = {
    "temperature": dict(temperature=0.8),
    "top_k": dict(temperature=1.0, top_k=3),
    "top_p": dict(temperature=1.0, top_p=0.8),
}
RUNS = {"temperature": 3000, "top_k": 2000, "top_p": 2000}  # refdecode.generate calls per setting
MAX_NEW = 4  # the first step after the prefill may then draft 2 tokens: positions 2 and 3 are both verified


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest


@pytest.fixture(scope="module")
def model():
    # one layer: a forward is mostly per-layer Python overhead at this size, and these tests make ~10,000 of them;
    # the verification rules, the tree masks and the cache compaction are the same code for every layer
    return tiny_sampling_llama(layers=1)


def processors_for(setting: str):
    return build_processors(SamplingConfig(**SETTINGS[setting]))


def uncertain_references(prompt, tables, *, target: float = 0.4) -> list[list[int]]:
    """One reference per possible first token v: prompt[-3:] + [v, x2, x3], with x2 the token whose probability
    after v is nearest `target` and x3 likewise after (v, x2). Whatever the first token, the first step then
    drafts [x2, x3] from a 4-token match, and each draft token is a coin flip for the target model."""
    refs = []
    for v in range(tables.p1.shape[0]):
        x2 = int((tables.p2[v] - target).abs().argmin())
        x3 = int((tables.p3[v, x2] - target).abs().argmin())
        refs.append(list(prompt[-3:]) + [v, x2, x3])
    return refs


def store_of(references) -> ReferenceStore:
    store = ReferenceStore(IdTokenizer(VOCAB))
    for i, ref in enumerate(references):
        store.add(ref, source=f"ref-{i}")
    return store


def assert_drafts_are_uncertain(tables, references):
    """The drafted tokens' target probabilities lie in 0.2-0.6 wherever the first token is likely."""
    for ref in references:
        v, x2, x3 = ref[-3:]
        if float(tables.p1[v]) < 0.01:
            continue
        assert 0.2 <= float(tables.p2[v, x2]) <= 0.6, (v, x2, float(tables.p2[v, x2]))
        assert 0.2 <= float(tables.p3[v, x2, x3]) <= 0.6, (v, x2, x3, float(tables.p3[v, x2, x3]))


class Totals:
    def __init__(self):
        self.steps = self.drafted = self.accepted = self.tree_steps = 0

    def add(self, stats):
        self.tree_steps += stats.tree_steps
        self.steps += stats.steps
        self.drafted += stats.drafted_tokens
        self.accepted += stats.accepted_tokens


def refdecode_samples(model, setting, store, runs, *, first_seed=0, max_new=MAX_NEW, tree=True):
    """First three tokens of `runs` seeded refdecode.generate calls, and the summed acceptance statistics."""
    totals = Totals()
    samples = []
    for seed in range(first_seed, first_seed + runs):
        out = refdecode.generate(
            model,
            None,
            PROMPT,
            store=store,
            max_new_tokens=max_new,
            seed=seed,
            policy=AlwaysDraft(max_draft=8),
            calibrate=False,
            tree=tree,
            **SETTINGS[setting],
        )
        samples.append(tuple(out.token_ids[:3]))
        totals.add(out.stats)
    return samples, totals


_TABLES: dict = {}
_CACHE: dict = {}


def setting_tables(model, setting):
    """(tables, references) for one setting: the exact distribution and the references, cheap, once per module."""
    if setting not in _TABLES:
        tables = exact_tables(model, PROMPT, processors_for(setting))
        _TABLES[setting] = tables, uncertain_references(PROMPT, tables)
    return _TABLES[setting]


def setting_case(model, setting):
    """(tables, references, samples, totals) for one setting: thousands of seeded runs, once per module."""
    if setting not in _CACHE:
        tables, references = setting_tables(model, setting)
        samples, totals = refdecode_samples(model, setting, store_of(references), RUNS[setting])
        _CACHE[setting] = tables, references, samples, totals
    return _CACHE[setting]


def assert_support(samples, probability):
    """No sample may be an outcome the processed distribution forbids (top-k / top-p cut it to zero)."""
    impossible = [s for s in set(samples) if probability.get(s, 0.0) <= 1e-9]
    assert not impossible, f"sampled outcomes of probability 0: {impossible[:5]}"


# ---------------------------------------------------------------------------------------------------------------
# Goodness of fit of the real generate loop against the exact distribution
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow  # thousands of seeded runs: the full suite runs it, make test-fast does not
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_generate_matches_exact_distribution(model, setting):
    tables, references, samples, totals = setting_case(model, setting)
    assert_drafts_are_uncertain(tables, references)
    if setting != "temperature":  # the warper must really cut: a token with real mass before it is gone after
        plain = exact_tables(model, PROMPT, build_processors(SamplingConfig(temperature=1.0)))
        assert float(plain.p1[tables.p1 == 0].max()) > 0.02
    # drafts were verified and both verdicts were common (later steps also draft from chance matches in the
    # prompt and output, whose tokens the model gives any probability, so the overall rate is lower than 0.2-0.6)
    assert totals.drafted > 0
    assert totals.tree_steps > 0  # real trees (the references part after the prompt) were verified
    rate = totals.accepted / totals.drafted
    assert 0.1 < rate < 0.9, rate
    probability = joint_probabilities(tables)
    assert_support(samples, probability)
    result = chi_square_gof(samples, probability)
    tv = total_variation(samples, probability)
    print(f"\n{setting}: {len(samples)} runs, acceptance {rate:.2f}, {result}, TV {tv:.3f}")
    assert result.dof >= 10  # enough cells that the test looks at the joint, not one marginal
    assert result.pvalue > ALPHA, f"{setting}: refdecode's first 3 tokens do not follow the model: {result}"


def resample_from_full_p(probs, draft, generator, *, draft_probs=None):
    """REST's rule, which is wrong for copied drafts: on rejection draw from p itself, not from p without x.

    The draft token then comes out with probability p(x) + (1 - p(x)) p(x) > p(x)."""
    for i, x in enumerate(draft):
        u = float(torch.rand((), generator=generator))
        if u < float(probs[i, int(x)]):
            continue
        return Verdict(i, int(torch.multinomial(probs[i], 1, generator=generator)))
    return Verdict(len(draft), int(torch.multinomial(probs[len(draft)], 1, generator=generator)))


def resample_from_full_p_coupled(log_probs, draft, noise, *, tie_margin=0.0, exact_rows=()):
    """REST's rule in the coupled form the decode loop uses for copied drafts: a draft token is accepted iff it is
    the position's Gumbel argmax (probability p(x)), but a rejection draws a fresh token from p itself."""
    chosen = (log_probs + noise).argmax(dim=-1).tolist()
    for i, x in enumerate(draft):
        if int(x) == chosen[i]:
            continue
        return Verdict(i, int(torch.multinomial(log_probs[i].exp(), 1, generator=WRONG_RULE_RNG)))
    return Verdict(len(draft), chosen[len(draft)])


WRONG_RULE_RNG = torch.Generator().manual_seed(1234)


@pytest.mark.slow  # thousands of seeded runs: the full suite runs it, make test-fast does not
def test_the_statistic_rejects_a_wrong_rule(model, monkeypatch):
    """The same goodness-of-fit test, on fewer runs, fails REST's re-sampling rule: the test has teeth."""
    tables, references = setting_tables(model, "temperature")
    monkeypatch.setattr(refdecode.verification, "verify_point_mass", resample_from_full_p_coupled)
    samples, totals = refdecode_samples(model, "temperature", store_of(references), 500, first_seed=10**6, tree=False)
    assert totals.drafted > totals.accepted > 0
    probability = joint_probabilities(tables)
    result = chi_square_gof(samples, probability)
    print(f"\nwrong rule: {len(samples)} runs, {result}, TV {total_variation(samples, probability):.3f}")
    assert result.pvalue < ALPHA, f"the test cannot tell a biased rule from the right one: {result}"


# ---------------------------------------------------------------------------------------------------------------
# verify_sampling on exact distributions: the point-mass rule and the min(1, p/q) rule
# ---------------------------------------------------------------------------------------------------------------


def _random_distribution(gen, vocab, zeros=0):
    """A random distribution over `vocab` tokens, far from uniform, with `zeros` tokens of probability 0."""
    p = torch.softmax(1.5 * torch.randn(vocab, generator=gen), dim=-1)
    if zeros:
        p[torch.randperm(vocab, generator=gen)[:zeros]] = 0.0
    return p / p.sum()


def _emitted(verdict, draft):
    """The tokens this verdict commits: the accepted draft prefix and the model's own token."""
    return list(draft[: verdict.accepted]) + [verdict.next_token]


@pytest.mark.parametrize("rule", ["point_mass", "full_p"])
def test_point_mass_rule_on_exact_rows(rule):
    """Chain of 2 copied tokens, fixed rows: the first emitted token ~ row 0 and, after x0, the second ~ row 1.
    The wrong rule (full_p) fails the same test on the same draws."""
    vocab, n = 6, 6000
    rows_gen = torch.Generator().manual_seed(3)
    probs = torch.stack([_random_distribution(rows_gen, vocab) for _ in range(3)])  # [k + 1, V]
    # the drafted tokens: the ones nearest 0.4, so accept and reject both happen
    draft = [int((probs[i] - 0.4).abs().argmin()) for i in range(2)]
    assert all(0.2 <= float(probs[i, draft[i]]) <= 0.6 for i in range(2))
    verify = verify_sampling if rule == "point_mass" else resample_from_full_p
    gen = torch.Generator().manual_seed(1)
    first, second = [], []
    for _ in range(n):
        verdict = verify(probs, draft, gen)
        tokens = _emitted(verdict, draft)
        first.append((tokens[0],))
        if verdict.accepted >= 1:  # the first token was the draft's: the second is drawn from row 1
            second.append((tokens[1],))
    r1 = chi_square_gof(first, {(t,): float(probs[0, t]) for t in range(vocab)})
    r2 = chi_square_gof(second, {(t,): float(probs[1, t]) for t in range(vocab)})
    worst = min(r1.pvalue, r2.pvalue)
    print(f"\n{rule}: p(draft)={[round(float(probs[i, draft[i]]), 2) for i in range(2)]} first {r1}, second {r2}")
    if rule == "point_mass":
        assert worst > ALPHA / 2  # two tests: Bonferroni
    else:
        assert r1.pvalue < ALPHA


@pytest.mark.parametrize("case", range(4))
def test_draft_distribution_rule_keeps_the_target(case):
    """A draft sampled from q, verified by min(1, p/q) with residual norm(max(0, p - q)): the emitted token ~ p.

    Cases include q with zeros where p has mass, p with zeros (a top-k cut) and q == p (always accept)."""
    vocab, n = 6, 6000
    rows_gen = torch.Generator().manual_seed(100 + case)
    p = _random_distribution(rows_gen, vocab, zeros=2 if case == 2 else 0)
    q = p.clone() if case == 3 else _random_distribution(rows_gen, vocab, zeros=2 if case == 1 else 0)
    rows = torch.stack([p, _random_distribution(rows_gen, vocab)])  # [k + 1, V], k = 1
    draft_gen = torch.Generator().manual_seed(7)
    gen = torch.Generator().manual_seed(8)
    firsts, accepted = [], 0
    for _ in range(n):
        x = int(torch.multinomial(q, 1, generator=draft_gen))
        verdict = verify_sampling(rows, [x], gen, draft_probs=q[None, :])
        firsts.append((_emitted(verdict, [x])[0],))
        accepted += verdict.accepted
    result = chi_square_gof(firsts, {(t,): float(p[t]) for t in range(vocab)})
    expected_accept = float(torch.minimum(p, q).sum())  # P(accept) = sum_x min(p(x), q(x))
    print(f"\ncase {case}: acceptance {accepted / n:.3f} (exact {expected_accept:.3f}), {result}")
    assert result.pvalue > ALPHA
    assert abs(accepted / n - expected_accept) < 4 * (expected_accept * (1 - expected_accept) / n) ** 0.5 + 1e-9
    assert all(float(p[t]) > 0 for (t,) in set(firsts)), "emitted a token the target forbids"


# ---------------------------------------------------------------------------------------------------------------
# Against transformers' own sampling
# ---------------------------------------------------------------------------------------------------------------


def transformers_samples(model, setting, runs, seed):
    kwargs = dict(SETTINGS[setting])
    kwargs.setdefault("top_k", 0)  # transformers' default top_k=50 is a no-op at 8 tokens; say so explicitly
    # one batch of `runs` copies of the prompt: every row draws its own tokens, so the rows are `runs` independent
    # samples of plain sampling, for one generate call's overhead instead of `runs`
    prompts = torch.tensor([PROMPT]).expand(runs, -1)  # [runs, T], no padding: every row has the same length
    with torch.random.fork_rng():  # transformers draws from the global RNG; keep the suite's state untouched
        torch.manual_seed(seed)
        out = model.generate(prompts, do_sample=True, max_new_tokens=3, **kwargs)  # [runs, T + 3]
    return [tuple(row) for row in out[:, len(PROMPT) :].tolist()]


@pytest.mark.slow  # thousands of seeded runs: the full suite runs it, make test-fast does not
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_transformers_sampling_agrees(model, setting):
    """transformers' samples fit the enumeration (so the exact tables are what plain sampling draws from, processor
    order included), and a two-sample test finds no difference between them and refdecode's samples."""
    tables, _, ours, _ = setting_case(model, setting)
    theirs = transformers_samples(model, setting, 500, seed=1234)
    probability = joint_probabilities(tables)
    assert_support(theirs, probability)
    fit = chi_square_gof(theirs, probability)
    both = chi_square_two_sample(ours, theirs)
    print(f"\ntransformers {setting}: {len(theirs)} runs, fit {fit}; refdecode vs transformers {both}")
    assert fit.pvalue > ALPHA
    assert both.pvalue > ALPHA


# ---------------------------------------------------------------------------------------------------------------
# hf_generate, seeds, greedy, statistics
# ---------------------------------------------------------------------------------------------------------------


def hf_sample(model, store, seed, max_new=MAX_NEW, stats=None):
    out = model.generate(
        torch.tensor([PROMPT]),
        custom_generate=refdecode.hf_generate,
        do_sample=True,
        temperature=0.8,
        top_k=0,
        max_new_tokens=max_new,
        store=store,
        seed=seed,
        ref_stats=stats,
    )
    return out[0, len(PROMPT) :].tolist()


@pytest.mark.slow  # thousands of seeded runs: the full suite runs it, make test-fast does not
def test_hf_generate_sampling_fits_and_repeats(model, monkeypatch):
    """model.generate(custom_generate=hf_generate, do_sample=True): transformers builds the warpers, refdecode
    samples; drafts forced to full length (hf_generate takes no policy, so its DraftPolicy is swapped)."""
    monkeypatch.setattr(refdecode.hf, "DraftPolicy", AlwaysDraft)
    tables, references = setting_tables(model, "temperature")
    store = store_of(references)
    first = hf_sample(model, store, 5, max_new=40)
    assert len(first) == 40 and hf_sample(model, store, 5, max_new=40) == first
    samples, drafted, accepted = [], 0, 0
    for seed in range(400):
        stats = refdecode.GenerationStats()
        samples.append(tuple(hf_sample(model, store, seed, stats=stats)[:3]))
        drafted += stats.drafted_tokens
        accepted += stats.accepted_tokens
    assert drafted > accepted > 0
    probability = joint_probabilities(tables)
    assert_support(samples, probability)
    result = chi_square_gof(samples, probability)
    print(f"\nhf_generate: {len(samples)} runs, acceptance {accepted / drafted:.2f}, {result}")
    assert result.pvalue > ALPHA


def test_hf_generate_same_seed_same_output(model):
    _, references = setting_tables(model, "temperature")
    store = store_of(references)
    first = hf_sample(model, store, 5, max_new=40)
    assert len(first) == 40
    for _ in range(3):
        assert hf_sample(model, store, 5, max_new=40) == first


def test_same_seed_same_output_different_seeds_differ(model):
    _, references = setting_tables(model, "top_p")
    store = store_of(references)

    def run(seed, **kw):
        return refdecode.generate(
            model, None, PROMPT, store=store, max_new_tokens=30, seed=seed, top_p=0.8, temperature=1.0, **kw
        ).token_ids

    fixed = dict(policy=AlwaysDraft(max_draft=8), calibrate=False)
    first = run(11, **fixed)
    assert run(11, **dict(policy=AlwaysDraft(max_draft=8), calibrate=False)) == first
    # a generator passed in is used as is: the same seed through it gives the same output
    gen = torch.Generator().manual_seed(11)
    assert (
        refdecode.generate(
            model,
            None,
            PROMPT,
            store=store,
            max_new_tokens=30,
            generator=gen,
            top_p=0.8,
            temperature=1.0,
            policy=AlwaysDraft(max_draft=8),
            calibrate=False,
        ).token_ids
        == first
    )
    outputs = {tuple(run(seed, policy=AlwaysDraft(max_draft=8), calibrate=False)) for seed in range(8)}
    assert len(outputs) >= 6  # 30 tokens of a far from degenerate distribution: collisions are rare


def test_same_seed_same_output_whatever_the_draft_lengths(model):
    _, references = setting_tables(model, "temperature")
    store = store_of(references)

    def run(policy):
        return refdecode.generate(
            model,
            None,
            PROMPT,
            store=store,
            max_new_tokens=30,
            seed=3,
            temperature=0.8,
            policy=policy,
            calibrate=False,
        ).token_ids

    never = DraftPolicy(max_draft=0)  # plain sampling, one token per forward
    cheap = DraftPolicy(costs=ForwardCostModel({1: 1.0, 64: 1.0}))  # what a fast wide forward makes it choose
    assert run(never) == run(AlwaysDraft(max_draft=8)) == run(cheap)


def test_unseeded_sampling_leaves_the_global_rng_alone(model):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    refdecode.generate(model, None, PROMPT, max_new_tokens=2, temperature=1.0)
    assert torch.equal(torch.rand(3), expected)


def test_a_draft_with_a_distribution_goes_through_decode(model):
    class ModelLikeDrafter:
        """Proposes a token drawn from a uniform q, as a model drafter would, with its probability."""

        def propose(self, context, max_tokens):
            q = torch.full((1, VOCAB), 1.0 / VOCAB)  # [k, V]: the distribution the token was drawn from
            return Draft([3], match_len=1, source="model", probs=q) if max_tokens > 0 else None

        def observe(self, new_tokens):
            pass

    out = decode(
        model,
        None,
        PROMPT,
        processors=processors_for("temperature"),
        sampling=True,
        generator=torch.Generator().manual_seed(0),
        max_new_tokens=4,
        eos_ids=set(),
        stop_strings=[],
        streamer=None,
        drafter=ModelLikeDrafter(),
        policy=AlwaysDraft(max_draft=4),
        calibrate=False,
    )
    assert out.stats.drafted_tokens > 0


@pytest.mark.parametrize("case", range(3))
def test_greedy_stays_token_for_token(model, case):
    """temperature=0 equals transformers greedy exactly, with drafts forced to full length."""
    _, references = setting_tables(model, "temperature")
    prompt = PROMPT[: 3 + case]
    expected = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=20)[0, len(prompt) :].tolist()
    store = store_of(references + [prompt[-2:] + expected])
    out = refdecode.generate(
        model,
        None,
        prompt,
        store=store,
        max_new_tokens=20,
        temperature=0.0,
        policy=AlwaysDraft(max_draft=8),
        calibrate=False,
    )
    assert out.token_ids == expected
    assert out.stats.drafted_tokens > 0


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_acceptance_statistics_add_up(model, temperature):
    """Sampling reports acceptance exactly as greedy does: each step commits its accepted draft tokens plus one."""
    _, references = setting_tables(model, "temperature")
    store = store_of(references)
    for seed in range(5):
        out = refdecode.generate(
            model,
            None,
            PROMPT,
            store=store,
            max_new_tokens=25,
            temperature=temperature,
            seed=seed,
            policy=AlwaysDraft(max_draft=8),
            calibrate=False,
        )
        s = out.stats
        assert s.new_tokens == len(out.token_ids) == 25
        assert s.accepted_tokens <= s.drafted_tokens
        assert len(s.accept_lengths) <= s.steps  # a greedy recompute that keeps nothing appends no length
        assert sum(s.accept_lengths) == s.new_tokens - 1 == s.steps + s.accepted_tokens - s.recomputed
        assert s.as_dict()["mean_accepted"] == pytest.approx((s.new_tokens - 1) / s.steps)
