"""Verification: which draft tokens the target model keeps, and which token it adds after them.

Knows: the greedy rule (longest prefix equal to the argmax) and the lossless sampling rule for drafts with or
without a draft distribution. Does not know: models, caches, drafters or where the scores came from.

Shapes: `scores` and `probs` are [k + 1, V]: row i is the target's next-token scores after the context plus the
first i draft tokens, so row k scores the token after a fully accepted draft.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["PositionNoise", "Verdict", "verify_greedy", "verify_point_mass", "verify_sampling"]


@dataclass(frozen=True)
class Verdict:
    """accepted: how many draft tokens are kept. next_token: the model's own token after them, or None when the
    greedy choice was too close to call at this width and must be recomputed by a one-token forward."""

    accepted: int
    next_token: int | None


def verify_greedy(scores: torch.Tensor, draft: Sequence[int], *, tie_margin: float = 0.0) -> Verdict:
    """Keep the longest draft prefix that equals the row-wise argmax; the argmax after it is the next token.

    A forward of k + 1 tokens and a forward of 1 token can differ in the last bits of the scores. Where the top two
    scores of a row we rely on are closer than tie_margin, the wider forward cannot decide the argmax for certain:
    the verdict then stops before that row with next_token=None, and the caller recomputes it one token wide, the
    way plain decoding does.
    """
    k = len(draft)
    top = scores.topk(2, dim=-1)  # values, indices: [k + 1, 2]
    best = top.indices[:, 0].tolist()
    margin = (top.values[:, 0] - top.values[:, 1]).tolist()
    n = 0
    while n < k and draft[n] == best[n] and margin[n] >= tie_margin:
        n += 1
    if margin[n] < tie_margin and k > 0:
        return Verdict(n, None)
    return Verdict(n, best[n])


class PositionNoise:
    """Gumbel noise for each output position, drawn once, in position order, from a seeded generator.

    Sampling token j as argmax(log p_j + g_j) with g_j ~ Gumbel(0, 1) i.i.d. per vocabulary entry is exact sampling
    from p_j (the Gumbel-max trick). Because row j is drawn the first time position j is verified, and always in
    position order, g_j does not depend on how the positions were grouped into forwards: the output is a function of
    the seed alone, identical whatever draft lengths the policy (or the machine's timing) chose.
    """

    def __init__(self, generator: torch.Generator, vocab_size: int, device):
        self.generator, self.vocab_size, self.device = generator, vocab_size, device
        self.first = 0  # output position of rows[0]; earlier rows are committed and dropped
        self.rows: list[torch.Tensor] = []  # rows[j - first]: [V] noise of output position j

    def rows_for(self, start: int, count: int) -> torch.Tensor:
        """Noise of positions start .. start + count - 1: [count, V]. Positions before `start` are never asked for
        again (they are committed), so their rows are released."""
        if start < self.first:
            raise ValueError(f"position {start} was already committed")
        del self.rows[: start - self.first]
        self.first = start
        while len(self.rows) < count:
            u = torch.rand(self.vocab_size, generator=self.generator, device=self.device)
            self.rows.append(-torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny))))
        return torch.stack(self.rows[:count])


def verify_point_mass(
    log_probs: torch.Tensor, draft: Sequence[int], noise: torch.Tensor, *, tie_margin: float = 0.0
) -> Verdict:
    """Sampling verification of copied tokens, coupled through per-position Gumbel noise.

    log_probs: [k + 1, V] target log-probabilities; noise: [k + 1, V] the positions' Gumbel rows. The token of each
    position is y_i = argmax(log p_i + g_i); the draft token x_i is accepted iff x_i == y_i, and the first y_i that
    differs is the model's own token. This is the point-mass rule of verify_sampling with coupled randomness:
        P(accept x) = P(argmax(log p + g) = x) = p(x),
        P(y | rejected) = p(y) [y != x] / (1 - p(x))   (the Gumbel argmax conditioned on not being x),
    i.e. accept x with probability p(x), else sample p with x removed and renormalised. Each y_i is exactly
    distributed as plain sampling from p_i given the committed prefix (tests/test_sampling.py checks the joint
    distribution against exact enumeration). tie_margin as in verify_greedy, so that a wide and a narrow forward
    cannot pick different tokens for the same noise.
    """
    return verify_greedy(log_probs + noise, draft, tie_margin=tie_margin)


@torch.no_grad()
def verify_sampling(
    probs: torch.Tensor,
    draft: Sequence[int],
    generator: torch.Generator,
    *,
    draft_probs: torch.Tensor | None = None,
) -> Verdict:
    """Speculative sampling (Leviathan et al. 2211.17192, Chen et al. 2302.01318) for one chain.

    probs: [k + 1, V] target distributions; draft_probs: [k, V] distributions the draft tokens were sampled from,
    or None for copied tokens (a point mass on each draft token).

    Row i: accept x = draft[i] with probability min(1, p(x) / q(x)); on rejection sample from norm(max(0, p - q))
    and stop; after k acceptances sample the extra token from row k. With a point mass q = one_hot(x) this is:
    accept x with probability p(x), else sample from p with x removed and renormalised. Why that is exact:
        P(y) = p(x) [y = x] + (1 - p(x)) * p(y) [y != x] / (1 - p(x)) = p(y)   for every y,
    so each emitted token is distributed as plain sampling from p given the same prefix (tests/test_sampling.py
    checks this empirically and shows that re-sampling from p itself after a rejection is biased).
    """
    k = len(draft)
    for i in range(k):
        x = int(draft[i])
        p = probs[i]
        q_x = 1.0 if draft_probs is None else float(draft_probs[i, x])
        p_x = float(p[x])
        u = float(torch.rand((), generator=generator, device=p.device))
        if q_x > 0 and u < min(1.0, p_x / q_x):
            continue
        if draft_probs is None:
            residual = p.clone()
            residual[x] = 0.0
        else:
            residual = (p - draft_probs[i]).clamp_min(0.0)
        total = float(residual.sum())
        if total <= 0.0:  # p equals q up to rounding: nothing to correct, the draft token stands
            continue
        token = torch.multinomial(residual / total, 1, generator=generator)
        return Verdict(i, int(token))
    token = torch.multinomial(probs[k], 1, generator=generator)
    return Verdict(k, int(token))
