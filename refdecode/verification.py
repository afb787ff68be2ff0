"""Verification: which draft tokens the target model keeps, and which token it adds after them.

Knows: the greedy rule (longest prefix equal to the argmax) and the lossless sampling rule for drafts with or
without a draft distribution, for one chain and for a token tree (walked root to leaf, one child per level), and
the probability with which each draft token was accepted (what the draft policy learns from under sampling): scores
in, verdict out (`verify_chain`, `verify_tree`, `choose_first` pick the rule for the decode loop).
Does not know: models, caches, drafters or where the scores came from.

Shapes: for a chain, `scores` and `probs` are [k + 1, V]: row i is the target's next-token scores after the context
plus the first i draft tokens, so row k scores the token after a fully accepted draft. For a tree of n nodes they are
[n + 1, V]: row 0 after the pending token (the root), row i + 1 after node i (the context plus the path to node i).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from .tree import ROOT, DraftTree

__all__ = [
    "PositionNoise",
    "TreeVerdict",
    "Verdict",
    "choose_first",
    "tree_accept_probs",
    "verify_chain",
    "verify_greedy",
    "verify_point_mass",
    "verify_sampling",
    "verify_tree",
    "verify_tree_greedy",
    "verify_tree_point_mass",
    "verify_tree_sampling",
]


@dataclass(frozen=True)
class Verdict:
    """accepted: how many draft tokens are kept. next_token: the model's own token after them, or None when the
    greedy choice was too close to call at this width and must be recomputed by a one-token forward."""

    accepted: int
    next_token: int | None


def _argmax_and_margin(scores: torch.Tensor, exact_rows: Collection[int] = ()) -> tuple[list[int], list[float]]:
    """Per row: its argmax, the first of equal maxima as plain greedy takes it (topk's order of ties is unspecified:
    on a bfloat16 row with two equal top logits it put the later token first), and the gap between its top two
    scores (0 on a tie; infinite on `exact_rows`, rows already computed one token wide, which no guard need doubt).
    -> (best, margin), lists of length scores.shape[0]"""
    values, indices = scores.topk(2, dim=-1)  # one pass over the rows; argmax would be a second
    margin = (values[:, 0] - values[:, 1]).tolist()
    best = indices[:, 0].tolist()
    for row, gap in enumerate(margin):
        if gap == 0.0:  # equal maxima: the first of them, as argmax takes it
            best[row] = int(scores[row].argmax())
    for row in exact_rows:
        margin[row] = math.inf
    return best, margin


def verify_greedy(
    scores: torch.Tensor, draft: Sequence[int], *, tie_margin: float = 0.0, exact_rows: Collection[int] = ()
) -> Verdict:
    """Keep the longest draft prefix that equals the row-wise argmax; the argmax after it is the next token.

    A forward of k + 1 tokens and a forward of 1 token can differ in the last bits of the scores. Where the top two
    scores of a row we rely on are closer than tie_margin, the wider forward cannot decide the argmax for certain:
    the verdict then stops before that row (row `accepted`) with next_token=None, and the caller recomputes it one
    token wide, the way plain decoding does, and verifies again with that row among `exact_rows`.
    """
    k = len(draft)
    best, margin = _argmax_and_margin(scores, exact_rows)
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
    log_probs: torch.Tensor,
    draft: Sequence[int],
    noise: torch.Tensor,
    *,
    tie_margin: float = 0.0,
    exact_rows: Collection[int] = (),
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
    return verify_greedy(log_probs + noise, draft, tie_margin=tie_margin, exact_rows=exact_rows)


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


# ---------------------------------------------------------------------------------------------------------------
# Token trees: the same rules, walked from the root down one child per level
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TreeVerdict:
    """path: the accepted nodes, the root's child first (node indices of the tree; each is the parent of the next).
    next_token: the model's own token after the path, or None when too close to call (as in Verdict)."""

    path: list[int]
    next_token: int | None


def _check_rows(rows: torch.Tensor, tree: DraftTree, name: str) -> None:
    if rows.dim() != 2 or rows.shape[0] != len(tree) + 1:
        raise ValueError(
            f"{name} must be [n + 1, V] = [{len(tree) + 1}, V] for a tree of {len(tree)} nodes, got {tuple(rows.shape)}"
        )


def _row(node: int) -> int:
    """The score row after `node`: 0 after the root (the pending token), node + 1 after a node."""
    return 0 if node == ROOT else node + 1


def verify_tree_greedy(
    scores: torch.Tensor, tree: DraftTree, *, tie_margin: float = 0.0, exact_rows: Collection[int] = ()
) -> TreeVerdict:
    """Follow the argmax down the tree: at the current row take the argmax; if a child of the current node has that
    token, accept it and continue from its row, else the argmax is the next token.

    scores: [n + 1, V]. Siblings never share a token, so at most one child matches and the walk is the greedy
    decoding itself restricted to the tree. The tie guard of verify_greedy applies to every row the walk relies on
    (the rows of the accepted nodes' parents and the last row): a row whose top two scores are closer than tie_margin
    stops the walk there with next_token=None, unless the tree is empty (a one-token forward needs no guard) or the
    row is among `exact_rows` (recomputed one token wide). The row too close to call is then the last path node's.
    """
    _check_rows(scores, tree, "scores")
    best, margin = _argmax_and_margin(scores, exact_rows)
    guard = len(tree) > 0
    children = tree.child_map()
    path: list[int] = []
    node = ROOT
    while True:
        row = _row(node)
        if guard and margin[row] < tie_margin:
            return TreeVerdict(path, None)
        child = children.get(node, {}).get(best[row])
        if child is None:
            return TreeVerdict(path, best[row])
        path.append(child)
        node = child


def verify_tree_point_mass(
    log_probs: torch.Tensor,
    tree: DraftTree,
    noise: torch.Tensor,
    *,
    tie_margin: float = 0.0,
    exact_rows: Collection[int] = (),
) -> TreeVerdict:
    """Sampling verification of a tree of copied tokens, coupled through per-position Gumbel noise.

    log_probs: [n + 1, V] target log-probabilities; noise: [D + 1, V] the Gumbel rows of the output positions by
    depth, from PositionNoise.rows_for(position, D + 1) with D = the tree's depth: row d is used at every node of
    depth d (the position its children would fill is d + 1), row 0 at the root. The token of a position is
    y = argmax(log p_row + g_depth), one draw per position whatever the tree; the walk descends into the child equal
    to y, else y is the next token. Hence:
        - the output is a function of the seed alone (the same tokens as plain Gumbel sampling with those rows);
        - a copied child x is accepted with probability p(x), and a node is left downwards with probability the sum
          of its children's p (siblings differ, so these events are disjoint);
        - after the walk stops, y is distributed as p with the children's tokens removed and renormalised, i.e.
          every emitted token is exactly distributed as plain sampling given the same prefix.
    tie_margin as in verify_tree_greedy, on the perturbed scores.
    """
    _check_rows(log_probs, tree, "log_probs")
    depth_of_row = [0] + tree.depths()  # [n + 1]: the depth of the node whose row it is
    need = max(depth_of_row) + 1
    if noise.dim() != 2 or noise.shape[0] < need or noise.shape[1] != log_probs.shape[1]:
        raise ValueError(f"noise must be [D + 1, V] = [{need}, {log_probs.shape[1]}], got {tuple(noise.shape)}")
    rows = torch.as_tensor(depth_of_row, dtype=torch.long, device=noise.device)
    return verify_tree_greedy(log_probs + noise[rows], tree, tie_margin=tie_margin, exact_rows=exact_rows)


@torch.no_grad()
def verify_tree_sampling(probs: torch.Tensor, tree: DraftTree, generator: torch.Generator) -> TreeVerdict:
    """SpecInfer's multi-step speculative sampling (2305.09781) down a tree whose children may carry a distribution.

    probs: [n + 1, V] target distributions; tree.q: [n, V], row i the distribution node i's token was drawn from,
    given its parent and its earlier siblings (a drafter that samples siblings without replacement passes q with the
    earlier siblings removed and renormalised), or None for copied tokens (point masses q_x = one_hot(x)).

    At the current node with target row p, try the children in flat order: accept child x with probability
    min(1, p(x) / q_x(x)); on rejection replace p by norm(max(0, p - q_x)) and try the next child; when all are
    rejected (or there are none) the next token is sampled from the final p. Each try is the chain rule of
    verify_sampling applied to the current residual, which emits a token distributed as that residual; by induction
    over the children the emitted token is distributed as the node's target row. With point masses the rule reads
    "accept x with probability p(x) / (mass left), else remove x". A chain gives the same draws, in the same order,
    as verify_sampling.
    """
    _check_rows(probs, tree, "probs")
    children = tree.child_map()
    path: list[int] = []
    node = ROOT
    while True:
        p = probs[_row(node)]  # [V], normalised
        for child in children.get(node, {}).values():  # dicts keep insertion order: flat order
            x = tree.tokens[child]
            q = None if tree.q is None else tree.q[child]  # [V] or None (a point mass on x)
            q_x = 1.0 if q is None else float(q[x])
            u = float(torch.rand((), generator=generator, device=p.device))
            if q_x > 0 and u < min(1.0, float(p[x]) / q_x):
                break
            residual = _residual(p, x, q)
            total = float(residual.sum())
            if total <= 0.0:  # p equals q up to rounding: nothing to correct, the child stands
                break
            p = residual / total
        else:  # every child rejected, or none: the model's own token from what is left
            return TreeVerdict(path, int(torch.multinomial(p, 1, generator=generator)))
        path.append(child)
        node = child


def _residual(p: torch.Tensor, x: int, q: torch.Tensor | None) -> torch.Tensor:
    """max(0, p - q) unnormalised: [V]; for a point mass on x, p with x removed."""
    if q is None:
        residual = p.clone()
        residual[x] = 0.0
        return residual
    return (p - q).clamp_min(0.0)


@torch.no_grad()
def tree_accept_probs(probs: torch.Tensor, tree: DraftTree) -> list[float]:
    """Per node, the probability that the target accepts it given that its parent was reached: [n] floats.

    probs: [n + 1, V] target distributions. Copied children (tree.q None): p_parent_row(token), exact under both
    verify_tree_point_mass and verify_tree_sampling (siblings' acceptances are disjoint events summing to the
    node's chance of being left downwards). Children with q: the chance under verify_tree_sampling, given the
    realised sibling tokens: P(every earlier sibling rejected) * min(1, residual(x) / q_x(x)), the residual being
    the one that rule has left when it reaches the child. For the policy's low-variance learning under sampling.
    """
    _check_rows(probs, tree, "probs")
    if tree.q is None:
        rows = torch.as_tensor([_row(p) for p in tree.parents], dtype=torch.long, device=probs.device)
        tokens = torch.as_tensor(tree.tokens, dtype=torch.long, device=probs.device)
        return probs[rows, tokens].tolist()
    out = [0.0] * len(tree)
    for node, kids in tree.child_map().items():
        p = probs[_row(node)]  # [V]
        reach = 1.0  # P(every earlier sibling was rejected)
        for child in kids.values():
            x, q = tree.tokens[child], tree.q[child]
            q_x = float(q[x])
            accept = min(1.0, float(p[x]) / q_x) if q_x > 0 else 0.0
            residual = _residual(p, x, q)
            total = float(residual.sum())
            if total <= 0.0:  # verify_tree_sampling keeps the child whatever u was
                out[child], reach = reach, 0.0
                break
            out[child] = reach * accept
            reach *= 1.0 - accept
            p = residual / total
    return out


# ---------------------------------------------------------------------------------------------------------------
# The rule for a step: greedy (noise None), copied tokens under sampling (point masses, coupled noise), or a model
# drafter's tokens with their distributions (min(1, p/q))
# ---------------------------------------------------------------------------------------------------------------


def choose_first(scores: torch.Tensor, noise: PositionNoise | None) -> int:
    """The model's own first token from the prefill's scores [1, V]: argmax, or the Gumbel argmax of position 0."""
    if noise is not None:
        scores = torch.log_softmax(scores, dim=-1) + noise.rows_for(0, 1)
    return int(scores[0].argmax())


def verify_chain(
    scores: torch.Tensor,
    tokens: Sequence[int],
    noise: PositionNoise | None,
    position: int,
    generator: torch.Generator | None,
    *,
    draft_probs: torch.Tensor | None = None,
    tie_margin: float = 0.0,
    exact_rows: Collection[int] = (),
) -> tuple[Verdict, list[float] | None]:
    """scores: [k + 1, V] for output positions position .. position + k; draft_probs: [k, V] the distributions a
    model drafter sampled the tokens from, or None (copied tokens). -> (verdict, accept_probs): under sampling, the
    probability each draft token had of being accepted given the ones before it (for the policy); None when greedy."""
    if noise is None:
        return verify_greedy(scores, tokens, tie_margin=tie_margin, exact_rows=exact_rows), None
    k = len(tokens)
    ids = torch.as_tensor(tokens, dtype=torch.long, device=scores.device)
    if draft_probs is not None:  # a model drafter's distributions: min(1, p/q) rule
        assert generator is not None
        probs = torch.softmax(scores, dim=-1)
        q = draft_probs[torch.arange(k), ids].clamp_min(1e-30)
        accept_probs = (probs[torch.arange(k), ids] / q).clamp(max=1.0).tolist()
        return verify_sampling(probs, tokens, generator, draft_probs=draft_probs), accept_probs
    log_probs = torch.log_softmax(scores, dim=-1)
    accept_probs = log_probs[torch.arange(k), ids].exp().tolist()
    rows = noise.rows_for(position, k + 1)
    verdict = verify_point_mass(log_probs, tokens, rows, tie_margin=tie_margin, exact_rows=exact_rows)
    return verdict, accept_probs


def verify_tree(
    scores: torch.Tensor,
    tree: DraftTree,
    noise: PositionNoise | None,
    position: int,
    generator: torch.Generator | None,
    *,
    tie_margin: float = 0.0,
    exact_rows: Collection[int] = (),
) -> tuple[TreeVerdict, list[float] | None]:
    """scores [n + 1, V] -> (TreeVerdict, accept_probs): under sampling with copied tokens, each node's probability
    of acceptance given its parent was reached (for the policy); None when greedy or when tree.q is given."""
    if noise is None:
        return verify_tree_greedy(scores, tree, tie_margin=tie_margin, exact_rows=exact_rows), None
    probs = torch.softmax(scores, dim=-1)
    if tree.q is not None:  # a model drafter's distributions: SpecInfer's multi-step rule
        assert generator is not None
        return verify_tree_sampling(probs, tree, generator), None
    depth = max(tree.depths(), default=0)
    log_probs = torch.log_softmax(scores, dim=-1)
    rows = noise.rows_for(position, depth + 1)
    verdict = verify_tree_point_mass(log_probs, tree, rows, tie_margin=tie_margin, exact_rows=exact_rows)
    return verdict, tree_accept_probs(probs, tree)
