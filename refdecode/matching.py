"""Longest-suffix matching of a token context against reference token sequences.

Knows: how to find where the last few tokens of a context occur in a set of token sequences, and which tokens
followed them there; what a valid token id is. Does not know: models, tokenizers, draft lengths, or where the
sequences came from.

Two indexes answer the same two questions (`SuffixSource`: `longest_suffix(context) -> Match` and
`continuation(position, max_tokens)`), so a drafter can ask both without knowing which is which:
- `SuffixIndex` (below): a trie, for the live context (prompt + output: small, growing one token at a time).
- `DocumentIndex`: a suffix array (corpus.spans.SpanIndex) over static documents, ~10 bytes per token instead of
  the trie's ~500, rebuilt lazily on the first lookup after an `add`.

Structure: a pyahocorasick trie (used as a trie: keys are strings, one code point per token id) over the *reversed*
n-grams of every sequence: for the n-gram ending at position i, the key is seq[i], seq[i-1], ..., seq[i-n+1] and
the value is the list of (sequence, i) where that n-gram ends. Walking the trie with the reversed context tail finds
the longest suffix of the context that occurs anywhere in O(n), independent of the reference size, and adding a
token appends one key, so the index grows incrementally with the generated text.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Protocol

import ahocorasick
import numpy as np

__all__ = ["Match", "SuffixSource", "SuffixIndex", "DocumentIndex", "as_token_ids", "brute_force_longest_suffix"]

_MAX_CODE_POINT = 0x10FFFF
_MAX_SCANNED = 1 << 16  # occurrences of one match a DocumentIndex ranks by recency (a common short match has more)


@dataclass(frozen=True)
class Match:
    """Where the longest context suffix occurs: `length` tokens ending at each (sequence id, end position)."""

    length: int
    positions: tuple[tuple[int, int], ...]


class SuffixSource(Protocol):
    """What a drafter asks a reference index: where the context's longest suffix occurs, and what followed there."""

    def longest_suffix(self, context: Sequence[int]) -> Match: ...

    def continuation(self, position: tuple[int, int], max_tokens: int) -> list[int]: ...


def as_token_ids(tokens, vocab_size: int | None = None, *, what: str = "token ids") -> np.ndarray:
    """Validate a 1-D sequence of token ids -> (T,) int64 array.

    Accepts lists/tuples of ints (numpy integers too), integer numpy arrays and integer torch tensors. Refuses with
    ValueError: floats (even integral ones: a float id means the caller mixed something up), bools, strings, nested
    sequences, and ids < 0 or >= vocab_size (reported against the vocabulary; without one, against the matcher's
    code point range).
    """
    if isinstance(tokens, (str, bytes)):
        raise ValueError(f"{what} must be a sequence of integers, got a {type(tokens).__name__}")
    if hasattr(tokens, "detach") and hasattr(tokens, "dtype"):  # a torch tensor, without importing torch here
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or str(tokens.dtype) == "torch.bool":
            raise ValueError(f"{what} must be integers, got a tensor of {tokens.dtype}")
        tokens = tokens.detach().cpu().numpy()
    if isinstance(tokens, np.ndarray):
        if tokens.dtype.kind not in "iu":
            raise ValueError(f"{what} must be integers, got an array of {tokens.dtype}")
        if tokens.ndim != 1:
            raise ValueError(f"{what} must be 1-D, got shape {tuple(tokens.shape)}")
        arr = tokens.astype(np.int64, copy=False)
        if tokens.dtype == np.uint64 and tokens.size and tokens.max() > np.iinfo(np.int64).max:
            arr = np.full(1, np.iinfo(np.int64).max)  # reported as too large below
    else:
        tokens = list(tokens)
        for t in tokens:
            if isinstance(t, (bool, np.bool_)) or not isinstance(t, numbers.Integral):
                raise ValueError(f"{what} must be integers, got {t!r} ({type(t).__name__})")
        try:
            arr = np.fromiter((int(t) for t in tokens), dtype=np.int64, count=len(tokens))
        except OverflowError:
            raise ValueError(f"{what}: an id does not fit in 64 bits") from None
    if arr.size:
        low, high = int(arr.min()), int(arr.max())
        limit = _MAX_CODE_POINT + 1 if vocab_size is None else vocab_size
        if low < 0 or high >= limit:
            bad = low if low < 0 else high
            where = (
                f"this vocabulary (size {vocab_size})"
                if vocab_size is not None
                else f"the supported range 0..{_MAX_CODE_POINT}"
            )
            raise ValueError(f"token id {bad} is outside {where}")
    return arr


def _valid_tail(context: Sequence[int], n: int, limit: int) -> list[int]:
    """The last <= n tokens of `context` after its last id that cannot occur in an index (not an int, < 0 or >=
    limit): a suffix match never spans such an id. Never raises (a model may emit ids beyond the tokenizer's)."""
    tail = list(context[-n:]) if n > 0 else []
    if all(type(t) is int for t in tail) and (not tail or (min(tail) >= 0 and max(tail) < limit)):
        return tail  # the usual case, checked fast: the decode loop passes plain ints
    for i in range(len(tail) - 1, -1, -1):
        t = tail[i]
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, numbers.Integral) or not 0 <= t < limit:
            return [int(x) for x in tail[i + 1 :]]
    return [int(x) for x in tail]


def _key(tokens: Sequence[int]) -> str:
    # One code point per token id; the trie walks keys code point by code point.
    return "".join(map(chr, reversed(tokens)))


class SuffixIndex:
    """Trie of reversed n-grams (n <= max_ngram) over a growing set of token sequences.

    Sequences are append-only lists of token ids; `extend` indexes the new positions incrementally.
    Positions are reported only where at least one token follows the n-gram, so a match always has a continuation.
    Token ids: 0 .. vocab_size - 1 (default: any Unicode code point, 0..0x10FFFF), checked by `as_token_ids`.
    """

    def __init__(self, *, max_ngram: int = 12, max_positions: int = 16, vocab_size: int | None = None):
        if max_ngram < 1:
            raise ValueError(f"max_ngram must be >= 1, got {max_ngram}")
        if max_positions < 1:
            raise ValueError(f"max_positions must be >= 1, got {max_positions}")
        self.max_ngram = max_ngram
        self.max_positions = max_positions
        self.vocab_size = vocab_size
        self.sequences: list[list[int]] = []
        self._trie = ahocorasick.Automaton(ahocorasick.STORE_ANY)
        self._indexed: list[int] = []  # per sequence: n-grams ending before this position are in the trie

    def __len__(self) -> int:
        return sum(len(seq) for seq in self.sequences)

    def add(self, tokens: Sequence[int]) -> int:
        """Add a new sequence; returns its id. Its last token gets indexed once another token follows it."""
        self.sequences.append([])
        self._indexed.append(0)
        seq_id = len(self.sequences) - 1
        self.extend(seq_id, tokens)
        return seq_id

    def extend(self, seq_id: int, tokens: Sequence[int]) -> None:
        """Append tokens to sequence `seq_id` and index every n-gram that now has a following token."""
        seq = self.sequences[seq_id]
        seq.extend(as_token_ids(tokens, self.vocab_size).tolist())
        n = self.max_ngram
        for end in range(self._indexed[seq_id], len(seq) - 1):
            key = _key(seq[max(0, end - n + 1) : end + 1])
            # Shorter keys (near a sequence start) are prefixes of longer paths, which is all a lookup needs.
            positions = self._trie.get(key, None)
            if positions is None:
                self._trie.add_word(key, [(seq_id, end)])
            else:
                positions.append((seq_id, end))  # the stored list is shared, so this updates the trie in place
        self._indexed[seq_id] = max(self._indexed[seq_id], len(seq) - 1)

    def longest_suffix(self, context: Sequence[int]) -> Match:
        """The longest suffix of `context` (at most max_ngram tokens) that occurs with a continuation.

        Returns Match(0, ()) when not even the last token occurs. Positions: the most recent ones first, at most
        max_positions of them.
        """
        if len(self._trie) == 0:  # pyahocorasick ends the process on longest_prefix of an automaton without words
            return Match(0, ())
        limit = _MAX_CODE_POINT + 1 if self.vocab_size is None else self.vocab_size
        tail = _valid_tail(context, self.max_ngram, limit)
        if not tail:
            return Match(0, ())
        probe = _key(tail)
        length = self._trie.longest_prefix(probe)
        if length == 0:
            return Match(0, ())
        positions: list[tuple[int, int]] = []
        exact = self._trie.get(probe[:length], None)
        if exact is not None:
            positions.extend(exact[-self.max_positions :])
        if len(positions) < self.max_positions:
            # Keys that extend the matched path (longer n-grams whose suffix is the match) end at the same places.
            for stored in islice(self._trie.values(probe[:length]), 4 * self.max_positions):
                if stored is not exact:
                    positions.extend(stored[-self.max_positions :])
        ordered = sorted(set(positions), reverse=True)[: self.max_positions]
        return Match(length, tuple(ordered))

    def continuation(self, position: tuple[int, int], max_tokens: int) -> list[int]:
        """The tokens that follow the n-gram ending at `position`, at most max_tokens of them."""
        seq_id, end = position
        seq = self.sequences[seq_id]
        return seq[end + 1 : end + 1 + max(0, max_tokens)]

    def length(self, seq_id: int) -> int:
        return len(self.sequences[seq_id])


class DocumentIndex:
    """Longest-suffix lookup over static documents, backed by a suffix array (corpus.spans.SpanIndex).

    Same answers as a SuffixIndex holding the same documents (longest suffix of <= max_ngram tokens that occurs with
    a following token; the most recent max_positions positions first), in ~10 bytes per token: the token stream
    (2 or 4 bytes), the suffix order of the positions that have a successor (4) and its samples (2). Documents are
    appended to `pending` and the arrays rebuilt on the first lookup after an `add` (~0.4 s per 1M tokens), so add
    many documents before drafting rather than one between every lookup.
    """

    def __init__(self, vocab_size: int, *, max_ngram: int = 12, max_positions: int = 16):
        from .corpus.spans import DEPTH

        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        if not 1 <= max_ngram <= DEPTH:
            raise ValueError(f"max_ngram must be in 1..{DEPTH} for a document index, got {max_ngram}")
        if max_positions < 1:
            raise ValueError(f"max_positions must be >= 1, got {max_positions}")
        self.vocab_size, self.max_ngram, self.max_positions = vocab_size, max_ngram, max_positions
        self._dtype = np.uint16 if vocab_size < np.iinfo(np.uint16).max else np.uint32  # ids + 1 must fit
        self._stream = np.zeros(1, dtype=self._dtype)  # (N,) ids + 1, a 0 before, between and after documents
        self._starts: list[int] = []  # stream offset of each document's first token
        self._lengths: list[int] = []
        self._pending: list[np.ndarray] = []  # documents added since the last build, ids + 1
        self._size = 1  # the stream's length once the pending documents are in
        self._spans = None  # SpanIndex over _stream, None until the first lookup

    def __len__(self) -> int:
        return sum(self._lengths)

    @property
    def num_documents(self) -> int:
        return len(self._lengths)

    def add(self, tokens) -> int:
        """Add one document (any length, 0 included; ids checked by as_token_ids); returns its id."""
        ids = as_token_ids(tokens, self.vocab_size)
        self._pending.append((ids + 1).astype(self._dtype))
        self._starts.append(self._size)
        self._lengths.append(int(ids.size))
        self._size += int(ids.size) + 1
        self._spans = None
        return len(self._lengths) - 1

    def copy(self) -> DocumentIndex:
        """An index with the same documents that can grow on its own (the arrays are shared until then)."""
        twin = DocumentIndex(self.vocab_size, max_ngram=self.max_ngram, max_positions=self.max_positions)
        twin._stream, twin._starts, twin._lengths = self._stream, list(self._starts), list(self._lengths)
        twin._pending, twin._size, twin._spans = list(self._pending), self._size, self._spans
        return twin

    def nbytes(self) -> int:
        """Bytes held by the arrays (stream, suffix order, samples, pending documents)."""
        spans = self._spans.nbytes() - self._stream.nbytes if self._spans is not None else 0
        return int(self._stream.nbytes + spans + sum(p.nbytes for p in self._pending) + 16 * len(self._starts))

    def tokens(self, doc_id: int) -> list[int]:
        """Document `doc_id`'s token ids."""
        return self.continuation((doc_id, -1), self._lengths[doc_id])

    def _index(self):
        """The SpanIndex over all documents, (re)built if some were added since the last lookup."""
        from .corpus.spans import SpanIndex

        if self._spans is None:
            if self._pending:
                stream = np.zeros(self._size, dtype=self._dtype)
                stream[: self._stream.size] = self._stream
                for start, doc in zip(self._starts[-len(self._pending) :], self._pending, strict=True):
                    stream[start : start + doc.size] = doc
                self._stream, self._pending = stream, []
            self._spans = SpanIndex.from_stream(self._stream, followed_only=True)
        return self._spans

    def longest_suffix(self, context: Sequence[int]) -> Match:
        """As SuffixIndex.longest_suffix: positions (document id, end offset), the most recent first."""
        tail = _valid_tail(context, self.max_ngram, self.vocab_size)
        if not tail or not self._lengths:
            return Match(0, ())
        spans = self._index()
        length, a, b = spans.longest_match(tail)
        if length == 0:
            return Match(0, ())
        step = -(-(b - a) // _MAX_SCANNED)  # a match with very many occurrences: rank an even spread of them
        ends = np.asarray(spans.sa[a:b:step], dtype=np.int64)  # (R,) stream offsets of the match's last token
        k = min(self.max_positions, ends.size)
        latest = np.sort(np.partition(ends, ends.size - k)[ends.size - k :])[::-1]  # (k,) the k largest, descending
        docs = np.searchsorted(np.asarray(self._starts, dtype=np.int64), latest, side="right") - 1
        starts = np.asarray(self._starts, dtype=np.int64)[docs]
        return Match(length, tuple(zip(docs.tolist(), (latest - starts).tolist(), strict=True)))

    def continuation(self, position: tuple[int, int], max_tokens: int) -> list[int]:
        """The <= max_tokens ids that follow the end offset `position` = (document id, end) in that document."""
        doc_id, end = position
        if self._pending:
            self._index()
        start = self._starts[doc_id] + end + 1
        stop = self._starts[doc_id] + self._lengths[doc_id]
        return (self._stream[start : min(stop, start + max(0, max_tokens))].astype(np.int64) - 1).tolist()


def brute_force_longest_suffix(
    sequences: Sequence[Sequence[int]], context: Sequence[int], max_ngram: int
) -> tuple[int, set[tuple[int, int]]]:
    """Reference implementation for tests: (length, all end positions) of the longest context suffix (<= max_ngram)
    that occurs in some sequence with at least one token after it."""
    for n in range(min(max_ngram, len(context)), 0, -1):
        suffix = list(context[-n:])
        found = {
            (s, end)
            for s, seq in enumerate(sequences)
            for end in range(n - 1, len(seq) - 1)
            if list(seq[end - n + 1 : end + 1]) == suffix
        }
        if found:
            return n, found
    return 0, set()
