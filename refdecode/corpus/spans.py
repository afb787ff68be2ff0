"""Token-level span index over a whole corpus: longest suffix match of a context and the tokens that follow it.

Structure (all plain numpy arrays, memory-mapped on load):
- `stream` (N,) uint16 or uint32: every document's token ids plus one, with 0 as a separator before, between and
  after documents. The +1 keeps 0 free, so no match and no continuation ever crosses a document boundary.
- `sa` (M,) uint32: the non-separator positions of `stream`, sorted by their *backward* context, i.e. by the
  reversed window stream[e], stream[e-1], ..., stream[e-DEPTH+1] (0-padded before the start). Sorting backwards
  makes the ranges of entries matching the last 1, 2, ..., DEPTH tokens of a context nested, so one pass finds
  the longest suffix of the context that occurs in the corpus, and the continuation of an entry e is simply
  stream[e+1:]. Order is defined to DEPTH tokens, which is all a lookup compares; entries with equal windows
  are in position order, so any sort by (window, position) builds the same array.
- `samples` (ceil(M/S),) fixed-width byte strings: the reversed window of every S-th `sa` entry, big-endian, so
  `np.searchsorted` compares them lexicographically in C. A lookup is one searchsorted call over the samples for
  all match lengths at once, then one small gather of the <= 3(S-1) entries in the gaps between samples that
  decide the longest match and the exact ends of its range.

Size: 2 (stream, vocab < 65535) + 4 (sa) + 2 (samples) = 8 bytes per corpus token; 10 for a larger vocabulary.
Build: prefix doubling with numpy sorts; ~0.4 s per 1M tokens, ~2 min for 100M on 2 cores.

This module knows token ids only: no text, no tokenizer, no passages.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["DEPTH", "SpanIndex", "encode_stream", "build_suffix_order", "build_samples"]

DEPTH = 16  # the longest context suffix a lookup matches, in tokens
MAX_CONTINUATION = 256  # continuations are cut here whatever max_tokens a caller asks (drafts need less)
_SAMPLE_BYTES_PER_TOKEN = 2  # sample spacing S is chosen so the samples cost this many bytes per corpus token
_BACK = np.arange(DEPTH)  # offsets of a reversed window


def encode_stream(docs: Sequence[Sequence[int] | np.ndarray], vocab_size: int) -> np.ndarray:
    """Concatenate documents as ids+1 with 0 separators around each: (N,) uint16 if ids fit, else uint32."""
    dtype = np.uint16 if vocab_size < np.iinfo(np.uint16).max else np.uint32
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    stream = np.zeros(int(lengths.sum()) + len(docs) + 1, dtype=dtype)
    starts = np.concatenate([[1], 1 + np.cumsum(lengths + 1)[:-1]]) if len(docs) else np.zeros(0, np.int64)
    for start, doc in zip(starts.tolist(), docs, strict=True):
        arr = np.asarray(doc, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
            raise ValueError(f"token id out of range [0, {vocab_size})")
        stream[start : start + arr.size] = arr + 1
    return stream


def _shift(x: np.ndarray, k: int) -> np.ndarray:
    """x[i-k], 0 for i < k. x: (N,) -> (N,)"""
    out = np.zeros_like(x)
    out[k:] = x[:-k] if k else x
    return out


def _dense_rank(keys: np.ndarray) -> np.ndarray:
    """Order-preserving dense ranks of uint64 keys: (N,) -> (N,) uint64, 0 for the smallest key."""
    order = np.argsort(keys)
    sorted_keys = keys[order]
    new = np.empty(keys.size, dtype=np.uint64)
    new[0] = 0
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=new[1:])
    ranks = np.empty(keys.size, dtype=np.uint64)
    ranks[order] = np.cumsum(new)
    return ranks


def build_suffix_order(stream: np.ndarray, depth: int = DEPTH, *, followed_only: bool = False) -> np.ndarray:
    """Non-separator positions of `stream` sorted by their reversed window of `depth` tokens. -> (M,) uint32/int64

    followed_only: keep only positions followed by another token of their document, so that a lookup finds the
    longest suffix that has a continuation (what a drafter wants) rather than one that occurs only at a document's
    end. `stream` must end with the separator 0 (encode_stream's does).

    Prefix doubling: pack as many tokens as fit in 64 bits, rank them densely, then combine pairs of ranks
    (rank[e], rank[e-h]) until the window covers `depth` tokens; each round is one numpy sort.
    """
    if depth & (depth - 1):
        raise ValueError(f"depth must be a power of two, got {depth}")
    bits = 16 if stream.dtype == np.uint16 else 32
    per_word = 64 // bits
    x = stream.astype(np.uint64)
    key = np.zeros(stream.size, dtype=np.uint64)
    width = min(per_word, depth)
    for j in range(width):  # key[e] = v[e] v[e-1] ... v[e-width+1], most significant first
        key |= _shift(x, j) << np.uint64(bits * (width - 1 - j))
    del x
    while width < depth:
        rank = _dense_rank(key)
        key = (rank << np.uint64(32)) | _shift(rank, width)  # ranks < 2**32 for N < 4G tokens
        width *= 2
    positions = np.flatnonzero(stream)
    if followed_only:
        positions = positions[stream[positions + 1] != 0]
    order = np.argsort(key[positions], kind="stable")  # ties (equal windows) in position order
    index_dtype = np.uint32 if stream.size < 2**32 else np.int64
    return positions[order].astype(index_dtype)


def _key_dtypes(stream_dtype) -> tuple[np.dtype, np.dtype, int]:
    """(big-endian token dtype, byte-string key dtype, max token value) for a stream dtype."""
    be = np.dtype(">u2") if stream_dtype == np.uint16 else np.dtype(">u4")
    return be, np.dtype(f"S{be.itemsize * DEPTH}"), int(np.iinfo(stream_dtype).max)


def _reversed_windows(stream: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """stream[e], stream[e-1], ..., stream[e-DEPTH+1] (0 before the start) for each e. (B,) -> (B, DEPTH)"""
    idx = ends.astype(np.int64)[:, None] - _BACK[None, :]
    return np.take(stream, idx, mode="clip")  # clip: index < 0 reads stream[0], the leading separator 0


def _as_keys(windows: np.ndarray, stream_dtype) -> np.ndarray:
    """(B, DEPTH) token windows -> (B,) fixed-width byte strings that sort like the windows."""
    be, key_dtype, _ = _key_dtypes(stream_dtype)
    return np.ascontiguousarray(windows.astype(be)).view(key_dtype).ravel()


def sample_every(stream_dtype) -> int:
    """Spacing S of the sampled keys: keeps them at ~2 bytes per corpus token."""
    return np.dtype(_key_dtypes(stream_dtype)[1]).itemsize // _SAMPLE_BYTES_PER_TOKEN


def build_samples(stream: np.ndarray, sa: np.ndarray) -> np.ndarray:
    """Keys of every S-th suffix-order entry. -> (ceil(M/S),) byte strings"""
    step = sample_every(stream.dtype)
    out = []
    for lo in range(0, sa.size, step * (1 << 20)):  # bounded memory: 1M samples at a time
        ends = np.asarray(sa[lo : lo + step * (1 << 20) : step])
        out.append(_as_keys(_reversed_windows(stream, ends), stream.dtype))
    _, key_dtype, _ = _key_dtypes(stream.dtype)
    return np.concatenate(out) if out else np.zeros(0, dtype=key_dtype)


class SpanIndex:
    """Longest-suffix lookup over a token stream; build with `SpanIndex.build`, persist with `save`/`load`."""

    FILES = ("span_stream.npy", "span_sa.npy", "span_samples.npy")

    def __init__(self, stream: np.ndarray, sa: np.ndarray, samples: np.ndarray):
        self.stream, self.sa, self.samples = stream, sa, samples
        self.step = sample_every(stream.dtype)
        self._be, self._key_dtype, self._max = _key_dtypes(stream.dtype)
        # lower-triangular mask: row i keeps the first i+1 tokens of a reversed query
        self._tri = (np.arange(DEPTH)[None, :] < np.arange(1, DEPTH + 1)[:, None]).astype(np.int64)  # (D, D)
        self._eye = np.eye(DEPTH, dtype=np.int64)  # (D, D)
        for name, arr in (("stream", stream), ("suffix order", sa), ("samples", samples)):
            if arr.ndim != 1:
                raise ValueError(f"span index {name} must be 1-D, got shape {arr.shape}")
        if stream.dtype not in (np.uint16, np.uint32) or stream.size == 0:
            raise ValueError(f"span index stream must be non-empty uint16 or uint32, got {stream.dtype}")
        if sa.dtype.kind not in "iu" or samples.dtype != self._key_dtype:
            raise ValueError(f"span index arrays have unexpected types: {sa.dtype}, {samples.dtype}")
        if samples.size != -(-sa.size // self.step):
            raise ValueError("span index arrays disagree: samples do not match the suffix order")

    @classmethod
    def build(
        cls, docs: Sequence[Sequence[int] | np.ndarray], vocab_size: int, *, followed_only: bool = False
    ) -> SpanIndex:
        return cls.from_stream(encode_stream(docs, vocab_size), followed_only=followed_only)

    @classmethod
    def from_stream(cls, stream: np.ndarray, *, followed_only: bool = False) -> SpanIndex:
        """Index a stream laid out as encode_stream's (ids + 1, 0 around every document); see build_suffix_order."""
        sa = build_suffix_order(stream, followed_only=followed_only)
        return cls(stream, sa, build_samples(stream, sa))

    @property
    def num_tokens(self) -> int:
        return int(self.sa.size)

    def save(self, folder: Path) -> list[str]:
        for name, arr in zip(self.FILES, (self.stream, self.sa, self.samples), strict=True):
            np.save(Path(folder) / name, arr, allow_pickle=False)
        return list(self.FILES)

    @classmethod
    def load(cls, folder: Path) -> SpanIndex:
        """Memory-map the arrays: nothing is read until a lookup touches it. The memmaps are viewed as plain
        ndarrays (same mapped buffer) because np.memmap's Python-level wrapping costs microseconds per call."""
        return cls(*(_load_array(Path(folder) / name) for name in cls.FILES))

    def nbytes(self) -> int:
        return int(self.stream.nbytes + self.sa.nbytes + self.samples.nbytes)

    # -- lookup --------------------------------------------------------------------------------------------------
    def _block_keys(self, rows: np.ndarray) -> np.ndarray:
        """Keys of the suffix-order entries `rows`. (B,) -> (B,) byte strings"""
        return _as_keys(_reversed_windows(self.stream, np.take(self.sa, rows)), self.stream.dtype)

    def _query_keys(self, tail: Sequence[int]) -> np.ndarray:
        """Keys bracketing the last 1..m tokens of `tail` (m <= DEPTH). -> (2m,) byte strings

        Row i < m is the reversed last i+1 tokens padded with 0 (the smallest key with that prefix); row m+i is
        its successor, the same with its last token + 1 (larger than every key with that prefix), so one
        left-side searchsorted gives both ends of every range.
        """
        rev = np.asarray(tail[-DEPTH:], dtype=np.int64)[::-1] + 1  # (m,) most recent token first
        m = rev.size
        if (rev - 1).view(np.uint64).max() >= self._max - 1:  # one check for both < 0 and too large
            raise ValueError("context token id out of the index's vocabulary range")
        pad = np.zeros(DEPTH, dtype=np.int64)
        pad[:m] = rev
        lo = self._tri[:m] * pad  # (m, DEPTH)
        both = np.concatenate((lo, lo + self._eye[:m]))  # (2m, DEPTH)
        return both.astype(self._be).view(self._key_dtype).ravel()

    def _usable_tail(self, context_tail: Sequence[int]) -> list[int]:
        """The last <= DEPTH ids of the context after its last id that _query_keys would refuse."""
        tail = [int(t) for t in list(context_tail[-DEPTH:])]
        for i in range(len(tail) - 1, -1, -1):
            if not 0 <= tail[i] < self._max - 1:
                return tail[i + 1 :]
        return tail

    def _gap(self, g: int) -> range:
        """Suffix-order entries strictly between sample g-1 and sample g."""
        return range(max((g - 1) * self.step + 1, 0), min(g * self.step, self.sa.size))

    def longest_match(self, context_tail: Sequence[int]) -> tuple[int, int, int]:
        """(L, a, b): the longest L such that the last L tokens of the context occur; sa[a:b] are occurrences.

        [a, b) is the exact range of entries whose reversed window starts with the reversed match.
        (0, 0, 0) when not even the last token occurs.
        """
        if len(context_tail) == 0 or self.sa.size == 0:
            return 0, 0, 0
        keys = self._query_keys(context_tail)
        m = keys.size // 2
        # 1) all match lengths at once against the samples; ranges are nested, so hits are a prefix 1..n_hit
        pos = np.searchsorted(self.samples, keys)  # (2m,)
        n_hit = int(np.count_nonzero(pos[m:] > pos[:m]))
        # 2) one gather of the gaps that matter: G, where any longer match must lie (between two samples, as
        #    ranges are nested); A and B, before the first and after the last sample of the n_hit range
        G = self._gap(int(pos[n_hit])) if n_hit < m else range(0)
        A = self._gap(int(pos[n_hit - 1])) if n_hit else range(0)
        B = self._gap(int(pos[m + n_hit - 1])) if n_hit else range(0)
        block = self._block_keys(np.array([*G, *A, *B], dtype=np.int64))
        if len(G):
            found = np.searchsorted(block[: len(G)], np.concatenate((keys[n_hit:m], keys[m + n_hit :])))
            k = m - n_hit
            extra = int(np.count_nonzero(found[k:] > found[:k]))
            if extra:
                return n_hit + extra, G.start + int(found[extra - 1]), G.start + int(found[k + extra - 1])
        if n_hit == 0:
            return 0, 0, 0
        # 3) exact ends of the n_hit range from A and B
        a = A.start + int(np.searchsorted(block[len(G) : len(G) + len(A)], keys[n_hit - 1]))
        b = B.start + int(np.searchsorted(block[len(G) + len(A) :], keys[m + n_hit - 1]))
        return n_hit, a, b

    def continuations(
        self,
        context_tail: Sequence[int],
        max_tokens: int,
        *,
        max_candidates: int = 8,
        min_match: int = 2,
        pool: int | None = None,
    ) -> tuple[int, list[list[int]]]:
        """Longest suffix match and up to `max_candidates` distinct continuations, most frequent first.

        A continuation is the <= `max_tokens` ids that follow an occurrence (at most MAX_CONTINUATION: the work is
        bounded whatever a caller asks), cut at the document's end. Up to `pool` (default 2 * max_candidates)
        occurrences, evenly spread over the range, are read to rank them. Context ids the index cannot hold
        (negative, too large) end the usable tail: a context never makes this raise.
        (0, []) if the match is shorter than `min_match` or no occurrence has a continuation.
        """
        if max_tokens < 1 or max_candidates < 1 or min_match < 1:
            raise ValueError("max_tokens, max_candidates and min_match must be >= 1")
        max_tokens = min(int(max_tokens), MAX_CONTINUATION)
        pool = min(pool or 2 * max_candidates, 1 << 12)
        L, a, b = self.longest_match(self._usable_tail(context_tail))
        if L < min_match:
            return 0, []
        if b - a <= pool:
            ends = self.sa[a:b]
        else:  # evenly spread (np.linspace is slow)
            ends = np.take(self.sa, a + np.arange(pool) * (b - 1 - a) // max(pool - 1, 1))
        idx = ends.astype(np.int64)[:, None] + np.arange(1, max_tokens + 1)  # (P, max_tokens)
        rows = np.take(self.stream, idx, mode="clip").tolist()  # clip: past the end reads the final 0
        # few rows: plain Python counting beats numpy's per-call overhead here
        counts: dict[tuple, int] = {}
        for row in rows:
            if 0 in row:  # 0 = separator: the document ends there
                row = row[: row.index(0)]
            if row:
                key = tuple(row)
                counts[key] = counts.get(key, 0) + 1
        if not counts:
            return 0, []
        ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:max_candidates]  # stable: first seen wins ties
        return L, [[t - 1 for t in key] for key, _ in ranked]


def _load_array(path: Path) -> np.ndarray:
    """Memory-map a saved array, viewed as a plain ndarray (see SpanIndex.load). An array without elements is read
    instead: there is nothing to map, and a zero-length mapping is an error on some platforms and numpy versions."""
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    if arr.size == 0:
        return np.load(path, allow_pickle=False)
    return np.asarray(arr)
