"""The reference drafter: propose the next tokens by copying what followed the context elsewhere.

Knows: how copied spans are found in the prompt, the output so far, the caller's stores, the output memory and a
corpus span index, followed across steps, voted on token by token, or merged into one token tree. Does not know:
models, caches, logits, acceptance rules or how many draft tokens pay (policy.py); it only sees token ids.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ..matching import SuffixIndex, SuffixSource
from ..tree import Candidate, DraftTree, build_tree
from .base import MAX_DRAFT_TOKENS, Draft

__all__ = ["ReferenceDrafter", "SpanSource", "as_sources"]


class SpanSource(Protocol):
    """A corpus-wide span index (see refdecode.corpus): continuations of the longest matching context suffix."""

    def span_continuations(
        self, context_tail: Sequence[int], max_tokens: int, *, max_candidates: int = 8, min_match: int = 2
    ) -> tuple[int, list[list[int]]]: ...


@dataclass
class _Followed:
    """A copied span being followed: the next token expected is the one at `pos` of sequence `seq` of `source`
    (the first token of source.continuation((seq, pos - 1), ...))."""

    source: SuffixSource
    seq: int
    pos: int
    name: str = ""  # the source's kind for the tree policy: "context", "store", "memory"
    length: int = 0  # evidence: context tokens matched when found, plus the tokens it predicted right since


class ReferenceDrafter:
    """Drafts by copying what followed the longest matching context suffix in the prompt, the output so far, the
    stores' documents and (optionally) a corpus span index.

    Spans are *followed*: once a span's tokens are accepted, the next draft continues from where it left off, with
    evidence (`match_len`) that grows with every token it predicted right. Several equally good spans vote token
    by token, so a draft stops where the references disagree.

    store: a ReferenceStore, or several (a sequence), e.g. the caller's store and a small one of the call's own
    references; none is copied or changed. Earlier stores win ties in the vote, after the prompt and output.
    """

    def __init__(
        self,
        context: Sequence[int],
        *,
        store=None,
        spans: SpanSource | None = None,
        memory: SuffixSource | None = None,
        max_ngram: int = 12,
        tree: bool = False,
    ):
        self.session = SuffixIndex(max_ngram=max_ngram)
        self.session.add(list(context))
        stores = as_sources(store)
        self.sources: list[SuffixSource] = [self.session, *stores, *([memory] if memory is not None else [])]
        # a source's kind names its nodes for the tree policy (a store may say, e.g. "retrieved" passages)
        kinds = [getattr(s, "kind", "store") for s in stores]
        self.names = ["context", *kinds, *(["memory"] if memory is not None else [])]
        # the longest match any source can report (a source that does not say: no bound)
        self._longest_possible = max(getattr(s, "max_ngram", None) or float("inf") for s in self.sources)
        self.spans = spans
        self.tree = tree
        self.followed: list[_Followed] = []
        self.run = 0  # tokens in a row that the followed spans predicted

    def observe(self, new_tokens: Sequence[int]) -> None:
        self.session.extend(0, new_tokens)
        for token in new_tokens:
            self.followed = [f for f in self.followed if self._expects(f, token)]
            for f in self.followed:
                f.pos += 1
                f.length += 1
            self.run = self.run + 1 if self.followed else 0

    @staticmethod
    def _expects(f: _Followed, token: int) -> bool:
        return f.source.continuation((f.seq, f.pos - 1), 1) == [token]

    def propose(self, context: Sequence[int], max_tokens: int) -> Draft | DraftTree | None:
        """A draft of 1 .. min(max_tokens, MAX_DRAFT_TOKENS) tokens (tree mode: a DraftTree at most that deep), or
        None; never more work than that bound."""
        max_tokens = min(max_tokens, MAX_DRAFT_TOKENS)
        if max_tokens <= 0:
            return None
        if self.tree:
            return self._propose_tree(context, max_tokens)
        # 1) the freshest evidence: the longest context suffix in the output/prompt and in the stores (skipped
        #    while the followed spans' run is at least every source's longest possible match: they would win in 2)
        best_len = 0
        candidates: list[_Followed] = []
        for source in self.sources if not (self.followed and self.run >= self._longest_possible) else ():
            match = source.longest_suffix(context)
            if match.length > best_len:
                best_len, candidates = match.length, []
            if match.length == best_len and match.length > 0:
                candidates += [_Followed(source, s, end + 1) for s, end in match.positions]
        # 2) spans already being followed win while their run is at least as long as the fresh match
        if self.followed and self.run >= best_len:
            best_len, candidates = self.run, self.followed
        if candidates:
            tokens, agreeing = _vote(candidates, max_tokens, live=self.session)
            if tokens:
                self.followed, self.run = agreeing, best_len
                return Draft(tokens, best_len, "reference")
        # 3) nothing local matched: ask the corpus-wide span index
        if self.spans is not None:
            length, continuations = self.spans.span_continuations(context[-32:], max_tokens)
            if continuations:
                return Draft(_vote_lists(continuations), length, "corpus")
        return None

    def spans_for(self, context: Sequence[int], max_tokens: int) -> list[tuple[_Followed, list[int]]]:
        """The local candidates of a tree step, strongest evidence first, each with its continuation (up to
        max_tokens): the spans followed since earlier steps (evidence = matched + predicted since) and the
        longest context suffix in each source (the live context with LZ77 overlap, each store, the output memory).
        Changes nothing; the replay's bounds read them too."""
        found: dict[tuple[int, int, int], _Followed] = {}
        for f in self.followed:
            found[(id(f.source), f.seq, f.pos)] = f
        for source, name in zip(self.sources, self.names, strict=True):
            match = source.longest_suffix(context)
            for seq, end in match.positions if match.length > 0 else ():
                key = (id(source), seq, end + 1)
                if key not in found or found[key].length < match.length:
                    found[key] = _Followed(source, seq, end + 1, name, match.length)
        ranked = sorted(found.values(), key=lambda f: -f.length)  # stable: fresher positions first within a length
        return [(f, _continuation(f, max_tokens, self.session)) for f in ranked]

    def _propose_tree(self, context: Sequence[int], max_tokens: int) -> DraftTree | None:
        """Every candidate at once, merged into one trie: spans_for's local candidates and the corpus span
        index's continuations. Each keeps its source and match length as evidence; the policy decides which nodes
        are worth verifying."""
        spans = self.spans_for(context, max_tokens)
        candidates = [Candidate(tokens, f.name, f.length) for f, tokens in spans]
        if self.spans is not None:
            length, continuations = self.spans.span_continuations(context[-32:], max_tokens)
            candidates += [Candidate(list(c), "corpus", length) for c in continuations]
        self.followed = [f for f, _ in spans]  # observe() keeps those the committed tokens agree with
        tree = build_tree([c for c in candidates if c.tokens], max_depth=max_tokens, max_nodes=_MAX_TREE_NODES)
        return tree if len(tree) else None


_MAX_TREE_NODES = 1024  # a trie of all candidates is built before the policy picks from it: bound that work


def as_sources(store) -> list[SuffixSource]:
    """None, one store, or a sequence of stores (None entries skipped) -> the stores, in order."""
    if store is None:
        return []
    stores = [store] if hasattr(store, "longest_suffix") else list(store)
    for s in stores:
        if s is not None and not (hasattr(s, "longest_suffix") and hasattr(s, "continuation")):
            raise ValueError(f"store must be a ReferenceStore or a sequence of them, got {type(s).__name__}")
    return [s for s in stores if s is not None]


def _continuation(c: _Followed, max_tokens: int, live: SuffixIndex) -> list[int]:
    """The tokens that follow a candidate. In the live context (prompt + output: sequence 0 of `live`) a copy may
    overlap its own output, as in LZ77: a span that repeats with period p keeps being drafted past the context's
    end."""
    cont = c.source.continuation((c.seq, c.pos - 1), max_tokens)
    if c.source is live and c.seq == 0:
        period = live.length(0) - c.pos
        if period > 0:
            while len(cont) < max_tokens:
                cont.append(cont[len(cont) - period])
    return cont


def _vote(candidates: list[_Followed], max_tokens: int, live: SuffixIndex) -> tuple[list[int], list[_Followed]]:
    """The voted draft of the candidates' continuations (see _vote_lists) and the spans that agree with its first
    token, positioned at the draft's start (observe() drops those that disagree later)."""
    conts = [_continuation(c, max_tokens, live) for c in candidates]
    tokens = _vote_lists(conts)
    agreeing = [c for c, cont in zip(candidates, conts, strict=True) if cont[:1] == tokens[:1]]
    return tokens, [_Followed(c.source, c.seq, c.pos) for c in agreeing]


def _vote_lists(continuations: list[list[int]]) -> list[int]:
    """Build a draft token by token: take the most common next token among the continuations still in agreement
    (ties: the earliest continuation's, i.e. the most recent occurrence), drop those that disagree, stop where none
    is left."""
    tokens: list[int] = []
    alive = [c for c in continuations if c]
    while alive:
        step = len(tokens)
        alive = [c for c in alive if step < len(c)]
        if not alive:
            break
        token = Counter(c[step] for c in alive).most_common(1)[0][0]  # ties: first seen, i.e. earliest
        tokens.append(token)
        alive = [c for c in alive if c[step] == token]
    return tokens
