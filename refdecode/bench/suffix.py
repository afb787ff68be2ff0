"""SuffixDecoding (arctic-inference's SuffixDecodingCache) as a refdecode Drafter: the best peer drafter, run in
refdecode's own loop and draft policy so that the benchmark compares guesses, not loops.

Knows: how to drive a SuffixDecodingCache for one request (its per-request tree holds the prompt and the output so
far; the request's references go into its global tree as cached earlier responses), how its drafts map onto
refdecode's shapes (a chain -> Draft, a tree -> DraftTree), and that arctic-inference is optional.
Does not know: models, verification, or how many of the drafted tokens are worth verifying (the loop's DraftPolicy
decides, as for every drafter). Nothing here is imported by the library itself.

arctic-inference 0.3.0 is a source release: `make suffix-setup` builds it into the venv.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Sequence

from refdecode.drafters import Draft
from refdecode.tree import ROOT, DraftTree

__all__ = ["SOURCE", "SuffixDrafter", "suffix_available", "require_suffix"]

SOURCE = "suffix"  # the source name of every draft token, in stats and the policy's acceptance models
MISSING = (
    "the suffix methods need arctic-inference 0.3.0 (SuffixDecoding), which is not installed: "
    "run `make suffix-setup` (it builds it into .venv)"
)
_request_ids = itertools.count()  # unique request ids, so several drafters can share one cache


def suffix_available() -> bool:
    """Whether arctic-inference's SuffixDecodingCache can be imported."""
    try:
        import arctic_inference.suffix_decoding  # noqa: F401
    except ImportError:
        return False
    return True


def require_suffix():
    """The SuffixDecodingCache class; ImportError with how to install it when arctic-inference is missing."""
    try:
        from arctic_inference.suffix_decoding import SuffixDecodingCache
    except ImportError as err:
        raise ImportError(MISSING) from err
    return SuffixDecodingCache


class SuffixDrafter:
    """Drafts with SuffixDecoding for one request; use it for one `generate` call, then `close()` it (or use it as a
    context manager).

    context: the prompt's token ids (the per-request tree starts with them; observe() adds the output).
    references: token id sequences the request may copy from (documents, passages): each is added to the global tree
        as the response of a finished earlier request, which is how SuffixDecoding drafts from text beyond the
        prompt. close() evicts them again.
    tree: False -> speculate a chain (a Draft); True -> `use_tree_spec=True`, a DraftTree.
    trust_probs: in tree mode, hand SuffixDecoding's estimates of each node given its parent (its path
        probabilities divided by the parent's) to the policy in `probs`, which it then uses instead of its learned
        acceptance. Default False: the issue compares drafters "plugged into refdecode's own loop and policy", so
        the policy learns SuffixDecoding's acceptance (source "suffix") as it learns its own sources' and the
        comparison is about the guesses. (Its estimates are 1.0 for a continuation seen once: trusted, they make
        the policy verify whole trees.)
    cache: a SuffixDecodingCache to share across requests (its global tree then also keeps this request's output
        after close(), as SuffixDecoding does); default: a fresh one with arctic-inference's defaults.
    max_spec_factor, max_spec_offset, min_token_prob: speculate()'s own defaults (a draft is at most
        factor * match length + offset tokens; tokens below min_token_prob are not drafted).
    """

    def __init__(
        self,
        context: Sequence[int],
        *,
        references: Sequence[Sequence[int]] = (),
        tree: bool = False,
        trust_probs: bool = False,
        cache=None,
        max_spec_factor: float = 1.0,
        max_spec_offset: float = 0.0,
        min_token_prob: float = 0.1,
    ):
        if max_spec_factor < 0 or max_spec_offset < 0:
            raise ValueError(f"max_spec_factor and max_spec_offset must be >= 0: {max_spec_factor}, {max_spec_offset}")
        if not 0.0 <= min_token_prob <= 1.0:
            raise ValueError(f"min_token_prob must be in [0, 1], got {min_token_prob}")
        self.cache = cache if cache is not None else require_suffix()()
        self.tree = tree
        self.trust_probs = trust_probs
        self.max_spec_factor = max_spec_factor
        self.max_spec_offset = max_spec_offset
        self.min_token_prob = min_token_prob
        n = next(_request_ids)
        self.request_id: Hashable = ("refdecode", n)
        self.reference_ids: list[Hashable] = []
        for i, ids in enumerate(references):
            self.reference_ids.append(self._cache_response(("refdecode", n, "reference", i), ids))
        self.cache.start_request(self.request_id, [int(t) for t in context])
        self.closed = False

    def _cache_response(self, request_id: Hashable, token_ids: Sequence[int]) -> Hashable:
        """Add token_ids to the global tree as the whole response of a finished request with no prompt."""
        self.cache.start_request(request_id, [])
        self.cache.add_active_response(request_id, [int(t) for t in token_ids])
        self.cache.stop_request(request_id)
        return request_id

    def observe(self, new_tokens: Sequence[int]) -> None:
        self._check_open()
        if new_tokens:
            self.cache.add_active_response(self.request_id, [int(t) for t in new_tokens])

    def propose(self, context: Sequence[int], max_tokens: int) -> Draft | DraftTree | None:
        """SuffixDecoding's best draft (from the prompt + output or the global tree, whichever scores higher) of at
        most max_tokens tokens, or None when nothing matches."""
        self._check_open()
        if max_tokens <= 0:
            return None
        depth = self.cache.max_tree_depth
        draft = self.cache.speculate(
            self.request_id,
            [int(t) for t in context[-depth:]],
            max_spec_tokens=max_tokens,  # explicit: speculate's default (None) reads a missing attribute
            max_spec_factor=self.max_spec_factor,
            max_spec_offset=self.max_spec_offset,
            min_token_prob=self.min_token_prob,
            use_tree_spec=self.tree,
        )
        if not draft.token_ids:
            return None
        if not self.tree:
            return Draft(list(draft.token_ids), draft.match_len, SOURCE)
        probs = draft.probs if self.trust_probs else None
        return to_draft_tree(draft.token_ids, draft.parents, probs, draft.match_len)

    def close(self) -> None:
        """End the request: drop its per-request tree and evict the references it cached. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.cache.stop_request(self.request_id)
        for request_id in self.reference_ids:
            if request_id in self.cache.cached_requests:
                self.cache.evict_cached_response(request_id)

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this SuffixDrafter is closed: make a new one per request")

    def __enter__(self) -> SuffixDrafter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def to_draft_tree(
    tokens: Sequence[int], parents: Sequence[int], path_probs: Sequence[float] | None, match_len: int
) -> DraftTree:
    """SuffixDecoding's tree (parents -1 = after the context, path probabilities) as a DraftTree whose probs are
    per node given its parent: [n] -> [n]."""
    parents = [int(p) for p in parents]
    probs = None
    if path_probs is not None and len(path_probs) == len(tokens):
        probs = []
        for prob, parent in zip(path_probs, parents, strict=True):
            above = 1.0 if parent == ROOT else float(path_probs[parent])
            probs.append(min(1.0, float(prob) / above) if above > 0 else 0.0)
    n = len(tokens)
    return DraftTree([int(t) for t in tokens], parents, [SOURCE] * n, [int(match_len)] * n, [1] * n, probs)
