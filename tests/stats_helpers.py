"""Statistics for the sampling tests: a tiny model whose next-token distributions can be enumerated, the exact
joint distribution of its first generated tokens under a sampling configuration, and Pearson chi-square tests.

Knows: transformers' Llama built from a config, the processors refdecode samples from, scipy's chi-square
distribution. Does not know: drafting or verification (the tests bring those).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from scipy import stats as scipy_stats

from refdecode.policy import DraftPolicy

VOCAB = 8  # 8^3 = 512 joint outcomes of three tokens: enumerable, and few enough cells for a chi-square test


class WholeTree(DraftPolicy):
    """Verify every proposed tree node within budget and max_draft (nodes in flat order: parents come first, so any
    prefix of them is a subtree), whatever the adaptive policy would think it worth: branches get verified."""

    def choose_tree(self, tree, budget):
        keep = [i for i, d in enumerate(tree.depths()) if d <= budget][: self.max_draft]
        if not keep:
            return None
        chosen = tree.subtree(keep)
        chosen.probs = [0.5] * len(chosen)
        return chosen


class AlwaysDraft(WholeTree):
    """Verify every draft at full length (within budget and max_draft), and every tree whole (WholeTree), whatever
    the adaptive policy would think it worth: wide forwards at every step that has a draft."""

    def choose_length(self, draft, budget):
        return 0 if draft is None else min(len(draft.tokens), budget, self.max_draft)


class IdTokenizer:
    """Just enough tokenizer for token-id references: ids pass through, decode is a readable join."""

    def __init__(self, vocab_size: int = VOCAB):
        self.vocab_size = vocab_size

    def __len__(self):
        return self.vocab_size

    def encode(self, text, add_special_tokens=False):
        return [int(t) for t in text.split()]

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


def tiny_llama(
    *,
    vocab_size: int,
    seed: int,
    max_positions: int = 512,
    eos_token_id: int | None = 1,
    logit_scale: float = 1.0,
    layers: int = 2,
    hidden: int = 32,
):
    """A random Llama (2 layers, 32 wide by default) built from a config (no weights downloaded); lm_head scaled by
    logit_scale."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)  # weight init only
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=0,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    if logit_scale != 1.0:
        with torch.no_grad():
            model.lm_head.weight.mul_(logit_scale)
    model.generation_config.eos_token_id = eos_token_id
    model.generation_config.pad_token_id = eos_token_id
    return model


def tiny_sampling_llama(*, vocab_size: int = VOCAB, seed: int = 2, logit_scale: float = 6.0, layers: int = 2):
    """A random Llama (2 layers by default) with no EOS (every run yields all its tokens) and lm_head scaled by
    `logit_scale`.

    A random init gives near-uniform next-token distributions; scaling the output layer makes them peaked enough
    that the likeliest tokens carry 0.2-0.6 of the mass (seed and scale were picked by enumerating a few; with
    seed 2 and scale 6 this holds for 1 and 2 layers).
    """
    return tiny_llama(
        vocab_size=vocab_size, seed=seed, max_positions=64, eos_token_id=None, logit_scale=logit_scale, layers=layers
    )


@dataclass
class ExactTables:
    """Processed next-token distributions of the first three new tokens after a prompt.

    p1: [V] first token; p2: [V, V] second given the first; p3: [V, V, V] third given the first two.
    joint: [V, V, V] probability of each (t1, t2, t3).
    """

    p1: torch.Tensor
    p2: torch.Tensor
    p3: torch.Tensor

    @property
    def joint(self) -> torch.Tensor:
        return self.p1[:, None, None] * self.p2[:, :, None] * self.p3


@torch.no_grad()
def exact_tables(model, prompt: Sequence[int], processors) -> ExactTables:
    """Enumerate every (t1, t2) continuation in one batched forward; apply `processors` to each row with the
    prefix that row has, exactly as plain sampling would before drawing from softmax(scores)."""
    vocab = model.config.vocab_size
    pairs = torch.tensor(list(itertools.product(range(vocab), repeat=2)))  # [V*V, 2]
    ids = torch.cat([torch.tensor(prompt).expand(len(pairs), -1), pairs], dim=1)  # [V*V, T + 2]
    logits = model(input_ids=ids).logits.float()  # [V*V, T + 2, V]
    t = len(prompt)

    def probs_at(pos: int) -> torch.Tensor:  # distribution of the token at pos + 1: [V*V, V]
        scores = logits[:, pos].clone()
        if processors:
            scores = processors(ids[:, : pos + 1], scores)
        return torch.softmax(scores, dim=-1).double()

    p1 = probs_at(t - 1)[0]
    p2 = probs_at(t).view(vocab, vocab, vocab)[:, 0]
    p3 = probs_at(t + 1).view(vocab, vocab, vocab)
    return ExactTables(p1, p2, p3)


@dataclass
class ChiSquare:
    statistic: float
    dof: int
    pvalue: float
    cells: int  # cells after pooling

    def __str__(self):
        return f"chi2={self.statistic:.1f} dof={self.dof} p={self.pvalue:.3g}"


def chi_square_gof(samples: Iterable[tuple], probability: dict, *, min_expected: float = 5.0) -> ChiSquare:
    """Pearson goodness of fit of observed outcomes against exact probabilities.

    probability: {outcome: exact probability}; outcomes never observed are covered by pooling: the cells with
    expected count >= min_expected are tested one by one, everything else (rare outcomes, observed or not) is one
    pooled cell whose probability is 1 minus the rest, so no mass is lost. If the pooled cell is still below
    min_expected it joins the smallest kept cell.
    """
    counts = Counter(tuple(s) for s in samples)
    n = sum(counts.values())
    expected = {o: n * p for o, p in probability.items()}
    kept = sorted((o for o in probability if expected[o] >= min_expected), key=lambda o: expected[o])
    obs = [counts.get(o, 0) for o in kept]
    exp = [expected[o] for o in kept]
    rest_obs = n - sum(obs)
    rest_exp = n - sum(exp)
    if rest_exp >= min_expected or (rest_exp > 0 and not kept):
        obs.append(rest_obs)
        exp.append(rest_exp)
    elif kept:  # too small to stand alone: merge into the smallest kept cell
        obs[0] += rest_obs
        exp[0] += rest_exp
    statistic = sum((o - e) ** 2 / e for o, e in zip(obs, exp, strict=True))
    dof = len(obs) - 1
    return ChiSquare(statistic, dof, float(scipy_stats.chi2.sf(statistic, dof)), len(obs))


def joint_probabilities(tables: ExactTables) -> dict[tuple[int, int, int], float]:
    """{(t1, t2, t3): probability} over all outcomes the processors allow (probability > 0)."""
    joint = tables.joint
    vocab = joint.shape[0]
    return {o: float(joint[o]) for o in itertools.product(range(vocab), repeat=3) if float(joint[o]) > 0.0}


def chi_square_two_sample(a: Iterable[tuple], b: Iterable[tuple], *, min_expected: float = 5.0) -> ChiSquare:
    """Pearson chi-square test that two samples come from the same distribution (2 x cells contingency table).

    Outcomes whose pooled count is too small for min_expected in both rows are pooled into one cell."""
    ca, cb = Counter(map(tuple, a)), Counter(map(tuple, b))
    na, nb = sum(ca.values()), sum(cb.values())
    frac = min(na, nb) / (na + nb)
    keys = sorted(set(ca) | set(cb))
    big = [k for k in keys if (ca[k] + cb[k]) * frac >= min_expected]
    rows = [[ca[k] for k in big], [cb[k] for k in big]]
    rest = [na - sum(rows[0]), nb - sum(rows[1])]
    if (rest[0] + rest[1]) * frac >= min_expected:
        rows[0].append(rest[0])
        rows[1].append(rest[1])
    elif big:
        rows[0][0] += rest[0]
        rows[1][0] += rest[1]
    result = scipy_stats.chi2_contingency(rows, correction=False)
    return ChiSquare(float(result.statistic), int(result.dof), float(result.pvalue), len(rows[0]))


def total_variation(samples: Sequence[tuple], probability: dict) -> float:
    """Total-variation distance between the empirical distribution of `samples` and `probability` (for messages)."""
    counts = Counter(map(tuple, samples))
    n = len(samples)
    keys = set(counts) | set(probability)
    return 0.5 * sum(abs(counts.get(k, 0) / n - probability.get(k, 0.0)) for k in keys)
