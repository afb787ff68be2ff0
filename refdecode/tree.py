"""Token trees: many candidate continuations merged into one trie, verified in one forward.

Knows: the tree's shape (tokens with parent indices, in topological order), each node's evidence (source, match
length, how many candidate continuations agree) and its predicted acceptance. Does not know: models, caches or
acceptance rules (verification.py walks a tree; tree_attention.py turns one into a forward).

Layout: node i has token `tokens[i]` and parent `parents[i]`; -1 is the root, i.e. the pending token (the last
committed token, fed first in the forward). Parents come before their children (`parents[i] < i`), so the flat
order is a valid feed order, and siblings never share a token. A chain is the tree with `parents[i] == i - 1`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["Candidate", "DraftTree", "ROOT", "build_tree", "contested_nodes", "sibling_ranks"]

ROOT = -1  # parent index of the root's children: the pending token


@dataclass
class DraftTree:
    """A token trie to follow the context (after the pending token).

    tokens, parents: the nodes (see the module docstring).
    sources: per node, where its token came from ("context", "store", "corpus", "memory", a drafter's name, ...).
    match_lens: per node, the evidence behind it (context tokens matched at the source; grows along followed spans).
    counts: per node, how many candidate continuations pass through it (REST / SuffixDecoding count weights).
    probs: per node, the predicted probability that the target accepts it given that its parent was accepted;
        filled by the tree policy (or by an outside drafter that knows better), None until then.
    q: optional [n, V] distributions the nodes' tokens were drawn from (a model drafter); None = point masses
        (copied text). Row i belongs to node i.
    contested: per node, whether it was a first child with siblings in the tree the policy chose it from (its
        candidates disagreed there); filled by the tree policy beside probs, None until then.
    """

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    match_lens: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    probs: list[float] | None = None
    q: torch.Tensor | None = None
    contested: list[bool] | None = None

    def __post_init__(self):
        n = len(self.tokens)
        if len(self.parents) != n:
            raise ValueError(f"a tree needs one parent per token: {n} tokens, {len(self.parents)} parents")
        if not self.sources:
            self.sources = [""] * n
        if not self.match_lens:
            self.match_lens = [0] * n
        if not self.counts:
            self.counts = [1] * n
        for name in ("sources", "match_lens", "counts"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {n} nodes")
        if self.probs is not None and len(self.probs) != n:
            raise ValueError(f"probs has {len(self.probs)} entries for {n} nodes")
        if self.contested is not None and len(self.contested) != n:
            raise ValueError(f"contested has {len(self.contested)} entries for {n} nodes")
        if self.q is not None and (self.q.dim() != 2 or self.q.shape[0] != n):
            raise ValueError(f"q must be [{n}, V], got {tuple(self.q.shape)}")
        seen: set[tuple[int, int]] = set()
        for i, (token, parent) in enumerate(zip(self.tokens, self.parents, strict=True)):
            if not ROOT <= parent < i:
                raise ValueError(f"node {i} has parent {parent}: parents must come first (-1 = the root)")
            if (parent, token) in seen:
                raise ValueError(f"node {i} repeats token {token} under parent {parent}: siblings must differ")
            seen.add((parent, token))

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def chain(cls, tokens: Sequence[int], *, source: str = "", match_len: int = 0, q=None) -> DraftTree:
        """The tree of one chain of draft tokens."""
        n = len(tokens)
        return cls(list(tokens), list(range(-1, n - 1)), [source] * n, [match_len] * n, [1] * n, None, q)

    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))

    def depths(self) -> list[int]:
        """Depth of each node: 1 for the root's children (the output position after the pending token's)."""
        depth: list[int] = []
        for p in self.parents:
            depth.append(1 if p == ROOT else depth[p] + 1)
        return depth

    def children(self, node: int = ROOT) -> list[int]:
        """The children of `node` (ROOT for the root), in flat order."""
        return [i for i, p in enumerate(self.parents) if p == node]

    def child_map(self) -> dict[int, dict[int, int]]:
        """{parent: {token: child}} for every parent with children (ROOT included)."""
        out: dict[int, dict[int, int]] = {}
        for i, (token, parent) in enumerate(zip(self.tokens, self.parents, strict=True)):
            out.setdefault(parent, {})[token] = i
        return out

    def path(self, node: int) -> list[int]:
        """The nodes from the root's child down to `node` (inclusive)."""
        out = []
        while node != ROOT:
            out.append(node)
            node = self.parents[node]
        return out[::-1]

    def subtree(self, keep: Sequence[int]) -> DraftTree:
        """The tree of the nodes in `keep` (every kept node's parent must be kept too), renumbered in flat order."""
        kept = sorted(set(keep))
        new_index = {old: new for new, old in enumerate(kept)}
        parents = []
        for old in kept:
            p = self.parents[old]
            if p != ROOT and p not in new_index:
                raise ValueError(f"node {old} is kept without its parent {p}")
            parents.append(ROOT if p == ROOT else new_index[p])
        return DraftTree(
            [self.tokens[i] for i in kept],
            parents,
            [self.sources[i] for i in kept],
            [self.match_lens[i] for i in kept],
            [self.counts[i] for i in kept],
            None if self.probs is None else [self.probs[i] for i in kept],
            None if self.q is None else self.q[kept],
            None if self.contested is None else [self.contested[i] for i in kept],
        )


@dataclass
class Candidate:
    """One candidate continuation and its evidence: `tokens` copied from `source` after a context match of
    `match_len` tokens. Candidates are merged into a DraftTree by `build_tree`."""

    tokens: list[int]
    source: str
    match_len: int


SHALLOW = 16  # tokens of every candidate a trie keeps before any candidate's deeper tokens (build_tree)


def build_tree(candidates: Sequence[Candidate], *, max_depth: int, max_nodes: int = 4096) -> DraftTree:
    """Merge candidate continuations into one trie (at most max_depth deep, max_nodes nodes).

    Each node counts the candidates through it; its source and match length are those of the strongest candidate
    through it (the longest match; ties: the earlier candidate, so callers list fresher evidence first). Every node
    of a candidate carries the candidate's match length: the policy's acceptance models are per-token rates by the
    match length at the draft's start, for chains and trees alike. Siblings are ordered by that evidence (the
    longest match first: one long match says more than several short ones agreeing), then by count (REST's and
    SuffixDecoding's weights), then by first appearance; the policy ranks them in that order (its first child is
    the favourite) and the flat order is depth-first.
    """
    child: dict[tuple[int, int], int] = {}  # (parent, token) -> node, in order of first appearance
    tokens: list[int] = []
    sources: list[str] = []
    match_lens: list[int] = []
    counts: list[int] = []
    kids: dict[int, list[int]] = {}  # parent -> children, in order of first appearance
    # Candidates are inserted in two bands of depths: the first SHALLOW tokens of every candidate, then the rest of
    # each in turn. Where max_nodes cuts the trie (many candidates, deep drafts) it cuts the deep tokens of the last
    # candidates, not whole candidates: a shallow node is more often committed than a deep one, and the strongest
    # candidates still go deep. A node's children all sit at one depth, so they still appear in candidate order
    # and an uncut trie is the same as inserting whole candidates.
    last = [ROOT] * len(candidates)  # per candidate: the node its inserted tokens reached
    done = [0] * len(candidates)  # per candidate: its tokens inserted (a full trie stops it for good)
    for band_end in sorted({min(SHALLOW, max_depth), max_depth}):
        for i, cand in enumerate(candidates):
            parent, evidence = last[i], cand.match_len
            for depth in range(done[i], min(band_end, len(cand.tokens))):
                token = cand.tokens[depth]
                node = child.get((parent, token))
                if node is None:
                    if len(tokens) >= max_nodes:
                        break
                    node = len(tokens)
                    child[(parent, token)] = node
                    kids.setdefault(parent, []).append(node)
                    tokens.append(token)
                    sources.append(cand.source)
                    match_lens.append(evidence)
                    counts.append(0)
                elif evidence > match_lens[node]:
                    sources[node], match_lens[node] = cand.source, evidence
                counts[node] += 1
                parent, done[i] = node, depth + 1
            last[i] = parent
    # renumber depth-first, each node's children by evidence, then count, then first appearance
    order: list[int] = []
    new_parent: list[int] = []
    new_index: dict[int, int] = {}
    stack: list[tuple[int, int]] = [(c, ROOT) for c in reversed(_ranked(kids.get(ROOT, ()), match_lens, counts))]
    while stack:
        node, parent = stack.pop()
        new_index[node] = len(order)
        order.append(node)
        new_parent.append(parent if parent == ROOT else new_index[parent])
        stack.extend((c, node) for c in reversed(_ranked(kids.get(node, ()), match_lens, counts)))
    return DraftTree(
        [tokens[i] for i in order],
        new_parent,
        [sources[i] for i in order],
        [match_lens[i] for i in order],
        [counts[i] for i in order],
    )


def _ranked(nodes: Sequence[int], match_lens: Sequence[int], counts: Sequence[int]) -> list[int]:
    """nodes (in order of first appearance) by evidence, strongest first; ties keep that order."""
    if len(nodes) < 2:
        return list(nodes)
    return sorted(nodes, key=lambda c: (-match_lens[c], -counts[c]))


def sibling_ranks(tree: DraftTree) -> list[int]:
    """Per node, its place among its siblings in flat order (0 = the first child of its parent)."""
    seen: dict[int, int] = {}
    ranks = []
    for p in tree.parents:
        ranks.append(seen.get(p, 0))
        seen[p] = ranks[-1] + 1
    return ranks


def contested_nodes(tree: DraftTree) -> list[bool]:
    """Per node, whether it is a first child with siblings: the candidates disagree at its parent, and the
    favourite is right less often than a token they all agree on (or than a chain's, which hides its rivals)."""
    children: dict[int, int] = {}
    for p in tree.parents:
        children[p] = children.get(p, 0) + 1
    return [rank == 0 and children[p] > 1 for p, rank in zip(tree.parents, sibling_ranks(tree), strict=True)]
