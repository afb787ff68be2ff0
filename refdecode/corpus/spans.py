"""Token-level span index over a whole corpus: longest suffix match of a context and the tokens that follow it.

Structure (all plain numpy arrays, memory-mapped on load):
- `stream` (N,) uint16 or uint32: every document's token ids plus one, with 0 as a separator before, between and
  after documents. The +1 keeps 0 free, so no match and no continuation ever crosses a document boundary.
- `sa` (M,) uint32 (int64 once N >= 2**32): the non-separator positions of `stream`, sorted by their *backward*
  context, i.e. by the reversed window stream[e], stream[e-1], ..., stream[e-DEPTH+1] (0-padded before the start),
  and by position among equal windows. Sorting backwards makes the ranges of entries matching the last 1, 2, ...,
  DEPTH tokens of a context nested, so one pass finds the longest suffix of the context that occurs in the corpus,
  and the continuation of an entry e is simply stream[e+1:]. The order is total and deterministic: any engine that
  sorts by (window, position) produces the same `sa`.
- `samples` (ceil(M/S),) fixed-width byte strings: the reversed window of every S-th `sa` entry, big-endian, so
  `np.searchsorted` compares them lexicographically in C. A lookup is one searchsorted call over the samples for
  all match lengths at once, then one small gather of the <= 3(S-1) entries in the gaps between samples that
  decide the longest match and the exact ends of its range.

On disk (format version 3) `sa` is cut into partitions `span_sa.NNNNN.npy`, consecutive slices of the global order
of at most PARTITION_ENTRIES entries each; `SuffixOrder` concatenates them virtually (a global row is mapped to its
partition by one searchsorted over the partitions' start rows), so lookups cost what they did with one array.
`write_span_index(folder, stream, sorted_blocks)` writes the files from the order given as consecutive sorted blocks
of any sizes (the one-process build passes one block; a distributed build streams its sorted ranges), in bounded
memory, and returns the manifest fields that `read_span_index` checks on load: each partition's file, entry count
and first key (hex of its big-endian reversed window), and the positions' dtype.

Size: 2 (stream, vocab < 65535) + 4 (sa) + 2 (samples) = 8 bytes per corpus token; 10 for a larger vocabulary,
+4 for int64 positions.
Build: prefix doubling with numpy sorts; ~0.4 s per 1M tokens, ~2 min for 100M on 2 cores.

This module knows token ids and its own files only: no text, no tokenizer, no passages, no manifest beyond the
fields it returns and reads back, no checksums (checked_folder.py)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeAlias

import numpy as np

from ..checked_folder import FolderFormatError
from .npyfile import NpyAppender, open_npy

__all__ = [
    "DEPTH",
    "LEGACY_FILES",
    "PARTITION_ENTRIES",
    "PARTITION_PATTERN",
    "STREAM_SHARD_PATTERN",
    "STREAM_SHARD_TOKENS",
    "Concatenated",
    "SpanIndex",
    "SuffixOrder",
    "build_samples",
    "build_suffix_order",
    "encode_stream",
    "partition_name",
    "read_span_index",
    "span_fields_problem",
    "span_files",
    "stream_shard_names",
    "write_span_index",
]

DEPTH = 16  # the longest context suffix a lookup matches, in tokens
PARTITION_ENTRIES = 1 << 26  # suffix-order entries per partition file: 256 MiB of uint32 positions
PARTITION_PATTERN = r"span_sa\.[0-9]{5}\.npy"  # span_sa.00000.npy, span_sa.00001.npy, ...
MAX_PARTITIONS = 100_000  # what five digits number
STREAM_FILE, SAMPLES_FILE = "span_stream.npy", "span_samples.npy"
STREAM_SHARD_TOKENS = 1 << 30  # stream tokens per shard file (2 GiB of uint16); one shard keeps STREAM_FILE's name
STREAM_SHARD_PATTERN = r"span_stream\.[0-9]{5}\.npy"  # span_stream.00000.npy, ... when the stream has several
LEGACY_FILES = (STREAM_FILE, "span_sa.npy", SAMPLES_FILE)  # format versions 1 and 2: one suffix-order file
_COPY_CHUNK = 1 << 24  # stream items copied into its file at a time
_KEY_CHUNK = 1 << 20  # sample keys computed at a time
MAX_CONTINUATION = 256  # continuations are cut here whatever max_tokens a caller asks (drafts need less)
_SAMPLE_BYTES_PER_TOKEN = 2  # sample spacing S is chosen so the samples cost this many bytes per corpus token
_BACK = np.arange(DEPTH)  # offsets of a reversed window
Stream: TypeAlias = "np.ndarray | ShardedStream"  # the token stream: one array, or its shards read as one


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
    """Non-separator positions of `stream` sorted by their reversed window of `depth` tokens, and by position among
    equal windows. -> (M,) uint32 (int64 once the stream has 2**32 tokens)

    The tie rule makes the order unique, so another engine that sorts by (window, position) writes the same files.

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
    order = np.argsort(key[positions], kind="stable")  # positions are increasing: ties stay in position order
    index_dtype = np.uint32 if stream.size < 2**32 else np.int64
    return positions[order].astype(index_dtype)


def _key_dtypes(stream_dtype) -> tuple[np.dtype, np.dtype, int]:
    """(big-endian token dtype, byte-string key dtype, max token value) for a stream dtype."""
    be = np.dtype(">u2") if stream_dtype == np.uint16 else np.dtype(">u4")
    return be, np.dtype(f"S{be.itemsize * DEPTH}"), int(np.iinfo(stream_dtype).max)


def _reversed_windows(stream: Stream, ends: np.ndarray) -> np.ndarray:
    """stream[e], stream[e-1], ..., stream[e-DEPTH+1] (0 before the start) for each e. (B,) -> (B, DEPTH)"""
    idx = ends.astype(np.int64)[:, None] - _BACK[None, :]
    return stream.take(idx, mode="clip")  # clip: index < 0 reads stream[0], the leading separator 0


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


class Concatenated:
    """A 1-D integer array (N,) as a virtual concatenation of parts of one dtype (memory-mapped on load), read as
    a lookup reads an array: `size`, `a[lo:hi:step]`, `a[i]`, `take(rows)` (np.take works, mode="clip" too) and
    `max()`; a global row maps to (part, offset) by one searchsorted over `starts`."""

    what = "a concatenated array"

    def __init__(self, parts: Sequence[np.ndarray]):
        if not parts:
            raise ValueError(f"{self.what} needs at least one part (an empty one for an empty array)")
        if len({p.dtype for p in parts}) != 1 or any(p.ndim != 1 or p.dtype.kind not in "iu" for p in parts):
            raise ValueError(f"the parts of {self.what} must be 1-D integer arrays of one dtype")
        self.parts = list(parts)
        self.starts = np.zeros(len(parts) + 1, dtype=np.int64)  # (P+1,) global row of each part's first entry
        np.cumsum([p.size for p in parts], out=self.starts[1:])
        self.size, self.dtype, self.ndim = int(self.starts[-1]), self.parts[0].dtype, 1
        self.shape = (self.size,)

    def __len__(self) -> int:
        return self.size

    @property
    def nbytes(self) -> int:
        return sum(int(p.nbytes) for p in self.parts)

    def __getitem__(self, key: slice | int) -> np.ndarray:
        """Rows of a slice, concatenated across parts when it spans several (-> (K,)); or one row (-> scalar)."""
        if isinstance(key, (int, np.integer)):
            row = int(key) + self.size if key < 0 else int(key)
            if not 0 <= row < self.size:
                raise IndexError(f"row {key} out of range for {self.what} of {self.size}")
            return self.take(np.array([row]))[0]
        if not isinstance(key, slice):
            raise TypeError(f"{self.what} is sliced (a[lo:hi]), indexed by one row or gathered (take)")
        lo, hi, step = key.indices(self.size)
        if len(self.parts) == 1:
            return self.parts[0][lo:hi:step]
        if step != 1:
            return self.take(np.arange(lo, hi, step))
        if hi <= lo:
            return np.zeros(0, dtype=self.dtype)
        first, last = (np.searchsorted(self.starts, (lo, hi - 1), side="right") - 1).tolist()
        pieces = [
            self.parts[p][max(lo - int(self.starts[p]), 0) : hi - int(self.starts[p])] for p in range(first, last + 1)
        ]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def take(self, rows, axis=None, out=None, mode: str = "raise") -> np.ndarray:
        """Entries at global `rows` (each in [0, size); mode="clip" clips them into it), like np.take, which calls
        this. Any shape of rows -> the same shape"""
        if axis not in (None, 0) or out is not None:
            raise TypeError(f"{self.what} takes along its one axis, without out=")
        rows = np.asarray(rows, dtype=np.int64)
        if mode == "clip":
            rows = np.clip(rows, 0, self.size - 1)
        if len(self.parts) == 1:
            return np.take(self.parts[0], rows)
        if rows.size and (int(rows.min()) < 0 or int(rows.max()) >= self.size):
            raise IndexError(f"a row out of range for {self.what} of {self.size}")
        part = np.searchsorted(self.starts, rows, side="right") - 1  # last part starting at or before the row
        found = np.empty(rows.shape, dtype=self.dtype)
        for p in np.unique(part).tolist():
            sel = part == p
            found[sel] = np.take(self.parts[p], rows[sel] - self.starts[p])
        return found

    def max(self) -> int:
        """The largest entry; -1 for an empty array."""
        return max((int(p.max()) for p in self.parts if p.size), default=-1)


class SuffixOrder(Concatenated):
    """The suffix order (M,) as a virtual concatenation of partitions: consecutive slices of the global order, each a
    1-D array of positions of one dtype."""

    what = "a suffix order"


class ShardedStream(Concatenated):
    """The token stream (N,) as a virtual concatenation of its shard files, cut every STREAM_SHARD_TOKENS tokens
    wherever that falls (a window or a continuation may cross a cut: take reads across it)."""

    what = "a sharded stream"


class SpanIndex:
    """Longest-suffix lookup over a token stream; build with `SpanIndex.build`, persist with `save`/`load`
    (`write_span_index` / `read_span_index`)."""

    def __init__(self, stream: Stream, sa: np.ndarray | SuffixOrder, samples: np.ndarray):
        self.stream, self.samples = stream, samples
        self.sa = sa if isinstance(sa, SuffixOrder) else SuffixOrder([sa])
        self.step = sample_every(stream.dtype)
        self._be, self._key_dtype, self._max = _key_dtypes(stream.dtype)
        # lower-triangular mask: row i keeps the first i+1 tokens of a reversed query
        self._tri = (np.arange(DEPTH)[None, :] < np.arange(1, DEPTH + 1)[:, None]).astype(np.int64)  # (D, D)
        self._eye = np.eye(DEPTH, dtype=np.int64)  # (D, D)
        for name, arr in (("stream", stream), ("samples", samples)):  # the suffix order checks its partitions
            if arr.ndim != 1:
                raise ValueError(f"span index {name} must be 1-D, got shape {arr.shape}")
        if stream.dtype not in (np.uint16, np.uint32) or stream.size == 0:
            raise ValueError(f"span index stream must be non-empty uint16 or uint32, got {stream.dtype}")
        if samples.dtype != self._key_dtype:
            raise ValueError(f"span index samples have an unexpected type: {samples.dtype}")
        if samples.size != -(-self.sa.size // self.step):
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

    def save(
        self,
        folder: Path,
        *,
        partition_entries: int = PARTITION_ENTRIES,
        stream_shard_tokens: int | None = None,
    ) -> tuple[list[str], dict]:
        """Write the index's files into `folder` (see write_span_index). -> (file names, manifest fields)"""
        return write_span_index(
            folder,
            self.stream,
            self.sa.parts,
            partition_entries=partition_entries,
            position_dtype=self.sa.dtype,
            stream_shard_tokens=stream_shard_tokens,
        )

    @classmethod
    def load(cls, folder: Path, fields: dict) -> SpanIndex:
        """Check and memory-map the files `save` wrote, given the fields it returned (see read_span_index)."""
        return read_span_index(folder, fields, span_tokens=sum(p["entries"] for p in fields["span_partitions"]))

    def nbytes(self) -> int:
        return int(self.stream.nbytes + self.sa.nbytes + self.samples.nbytes)

    # -- lookup --------------------------------------------------------------------------------------------------
    def _block_keys(self, rows: np.ndarray) -> np.ndarray:
        """Keys of the suffix-order entries `rows`. (B,) -> (B,) byte strings"""
        return _as_keys(_reversed_windows(self.stream, self.sa.take(rows)), self.stream.dtype)

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
            ends = self.sa.take(a + np.arange(pool) * (b - 1 - a) // max(pool - 1, 1))
        idx = ends.astype(np.int64)[:, None] + np.arange(1, max_tokens + 1)  # (P, max_tokens)
        rows = self.stream.take(idx, mode="clip").tolist()  # clip: past the end reads the final 0
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


# -- files: the partitioned suffix order, the stream and the samples -------------------------------------------


def partition_name(i: int) -> str:
    """File name of suffix-order partition i: span_sa.00000.npy, ..."""
    return f"span_sa.{i:05d}.npy"


def stream_shard_names(shards: int) -> tuple[str, ...]:
    """File names of a stream in `shards` shards: span_stream.npy for one, span_stream.00000.npy, ... for more."""
    return (STREAM_FILE,) if shards == 1 else tuple(f"span_stream.{i:05d}.npy" for i in range(shards))


def span_files(fields: dict | None) -> tuple[str, ...]:
    """The span index's file names for its manifest fields (checked by span_fields_problem); None: the single
    suffix-order file of format versions 1 and 2. An index written before stream shards has one stream file."""
    if fields is None:
        return LEGACY_FILES
    parts = tuple(partition_name(i) for i in range(len(fields["span_partitions"])))
    return (*stream_shard_names(len(fields.get("stream_shards", [0]))), *parts, SAMPLES_FILE)


def _position_dtype(stream_size: int, requested) -> np.dtype:
    """uint32 while every position fits, else int64; `requested` (uint32 or int64) overrides when it fits."""
    if requested is None:
        return np.dtype(np.uint32 if stream_size < 2**32 else np.int64)
    dtype = np.dtype(requested)
    if dtype not in (np.dtype(np.uint32), np.dtype(np.int64)) or (dtype == np.uint32 and stream_size >= 2**32):
        raise ValueError(f"position_dtype must be uint32 (streams < 2**32 tokens) or int64, got {dtype}")
    return dtype


def _key_hex(stream: Stream, e: int) -> str:
    """The full-width key of position e as hex (byte strings would drop trailing zero bytes)."""
    be, _, _ = _key_dtypes(stream.dtype)
    return _reversed_windows(stream, np.array([e])).astype(be).tobytes().hex()


class _PartitionWriter:
    """Cuts the order into partition files of `size` entries as blocks arrive; records each one's manifest entry."""

    def __init__(self, folder: Path, stream: Stream, dtype: np.dtype, size: int):
        self.folder, self.stream, self.dtype, self.size = folder, stream, dtype, size
        self.entries: list[dict] = []
        self._out: NpyAppender | None = None

    def append(self, block: np.ndarray) -> None:
        while block.size:
            if self._out is None:
                name = partition_name(len(self.entries))
                self._out = NpyAppender(self.folder / name, self.dtype)
                self.entries.append({"file": name, "entries": 0, "first_key": _key_hex(self.stream, int(block[0]))})
            piece, block = block[: self.size - self._out.count], block[self.size - self._out.count :]
            self._out.append(piece)
            self.entries[-1]["entries"] = self._out.count
            if self._out.count == self.size:
                self._close()

    def _close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    def finish(self) -> list[dict]:
        self._close()
        if not self.entries:  # an empty order is one empty partition, so a reader always finds one file
            NpyAppender(self.folder / partition_name(0), self.dtype).close()
            self.entries.append({"file": partition_name(0), "entries": 0, "first_key": ""})
        return self.entries


def _check_block(stream: Stream, block: np.ndarray, prev_key: str | None) -> str | None:
    """A block of positions: 1-D integers at non-separator positions of the stream, and not ordered before the
    previous block's last entry (the order inside a block is the caller's). -> the block's last key"""
    if block.ndim != 1 or (block.size and block.dtype.kind not in "iu"):
        raise ValueError(f"a block of the suffix order must be a 1-D integer array, got {block.dtype} {block.shape}")
    if not block.size:
        return prev_key
    lo, hi = int(block.min()), int(block.max())
    if lo < 1 or hi >= stream.size - 1 or not np.all(stream.take(block)):
        raise ValueError("a block of the suffix order holds a position outside the stream's tokens (a separator?)")
    if prev_key is not None and _key_hex(stream, int(block[0])) < prev_key:
        raise ValueError("blocks of the suffix order are out of order: a block starts before the previous one ends")
    return _key_hex(stream, int(block[-1]))


def write_span_index(
    folder: Path,
    stream: Stream,
    sorted_blocks: Iterable[np.ndarray],
    *,
    partition_entries: int = PARTITION_ENTRIES,
    position_dtype=None,
    stream_shard_tokens: int | None = None,
) -> tuple[list[str], dict]:
    """Write a span index into `folder`: the stream (span_stream.npy, or span_stream.NNNNN.npy shards of
    `stream_shard_tokens` tokens, STREAM_SHARD_TOKENS by default, when it has more), span_sa.NNNNN.npy partitions,
    span_samples.npy.

    stream: (N,) uint16/uint32 laid out as encode_stream's (ids + 1, 0 around every document); written through
    memory maps in chunks, never copied whole. sorted_blocks: the global suffix order (build_suffix_order's, or any
    engine's sorting by (reversed window, position)) as consecutive blocks of positions, any sizes, empty ones too;
    each block is consumed once, so memory is one block plus one chunk of sample keys. Checked: positions are
    tokens of the stream, and each block starts at or after the previous one's last key (within a block, the order
    is trusted). partition_entries: entries per partition file (the last may hold fewer). position_dtype: uint32
    (default while N < 2**32) or int64.
    -> (file names written, manifest fields {"span_partitions": [{"file", "entries", "first_key"}, ...],
        "position_dtype": "uint32" | "int64", "stream_shards": [tokens of each shard]})
    """
    folder = Path(folder)
    if stream.ndim != 1 or stream.dtype not in (np.uint16, np.uint32) or stream.size < 1:
        raise ValueError(f"the span stream must be a non-empty 1-D uint16 or uint32 array, got {stream.dtype}")
    if stream[0] != 0 or stream[-1] != 0:
        raise ValueError("the span stream must start and end with the separator 0 (see encode_stream)")
    if not 1 <= partition_entries <= 1 << 40:
        raise ValueError(f"partition_entries must be in [1, 2**40], got {partition_entries}")
    stream_shard_tokens = STREAM_SHARD_TOKENS if stream_shard_tokens is None else stream_shard_tokens
    shards = -(-stream.size // stream_shard_tokens) if stream_shard_tokens >= 1 else 0
    if not 1 <= shards <= MAX_PARTITIONS:
        raise ValueError(f"stream_shard_tokens must cut the stream into 1 to {MAX_PARTITIONS} shards")
    dtype = _position_dtype(stream.size, position_dtype)
    # 1) the stream, copied chunk by chunk into mapped shard files
    shard_names, sizes = stream_shard_names(shards), []
    for name, start in zip(shard_names, range(0, stream.size, stream_shard_tokens), strict=True):
        end = min(start + stream_shard_tokens, stream.size)
        sizes.append(end - start)
        out = np.lib.format.open_memmap(folder / name, mode="w+", dtype=stream.dtype, shape=(end - start,))
        for lo in range(start, end, _COPY_CHUNK):
            out[lo - start : min(lo + _COPY_CHUNK, end) - start] = stream[lo : min(lo + _COPY_CHUNK, end)]
        out.flush()
        del out
    # 2) partitions and samples, block by block: sample j is global row j*S
    step = sample_every(stream.dtype)
    parts = _PartitionWriter(folder, stream, dtype, partition_entries)
    row, last_key = 0, None
    with NpyAppender(folder / SAMPLES_FILE, _key_dtypes(stream.dtype)[1]) as samples:
        for block in sorted_blocks:
            block = np.asarray(block)
            last_key = _check_block(stream, block, last_key)
            parts.append(block.astype(dtype, copy=False))
            ends = block[(-row) % step :: step]
            for lo in range(0, ends.size, _KEY_CHUNK):
                samples.append(_as_keys(_reversed_windows(stream, ends[lo : lo + _KEY_CHUNK]), stream.dtype))
            row += block.size
    entries = parts.finish()
    if row >= stream.size:
        raise ValueError(f"the suffix order holds {row} positions for a stream of {stream.size}: some repeat")
    names = [*shard_names, *(e["file"] for e in entries), SAMPLES_FILE]
    return names, {"span_partitions": entries, "position_dtype": str(dtype), "stream_shards": sizes}


def span_fields_problem(fields: dict) -> str | None:
    """What is wrong with a manifest's span fields (as write_span_index returns them), or None. Names and counts
    are decided here: partition i must be called partition_name(i)."""
    parts, dtype = fields.get("span_partitions"), fields.get("position_dtype")
    if dtype not in ("uint32", "int64"):
        return f"'position_dtype' is {dtype!r}, not 'uint32' or 'int64'"
    shards = fields.get("stream_shards", [1])  # absent: written before stream shards, one stream file
    if not isinstance(shards, list) or not 1 <= len(shards) <= MAX_PARTITIONS:
        return f"'stream_shards' is not a list of 1 to {MAX_PARTITIONS} shard sizes"
    if not all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 1 << 50 for n in shards):
        return "'stream_shards' holds a size that is not an integer in [1, 2**50]"
    if not isinstance(parts, list) or not 1 <= len(parts) <= MAX_PARTITIONS:
        return f"'span_partitions' is not a list of 1 to {MAX_PARTITIONS} partitions"
    for i, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("file") != partition_name(i):
            return f"'span_partitions[{i}]' does not name the file {partition_name(i)}"
        entries, key = part.get("entries"), part.get("first_key")
        if not isinstance(entries, int) or isinstance(entries, bool) or not 0 <= entries <= 1 << 50:
            return f"'span_partitions[{i}].entries' is not an integer in [0, 2**50]"
        if not (isinstance(key, str) and re.fullmatch(r"(?:[0-9a-f]{2})*", key) and (key == "") == (entries == 0)):
            return f"'span_partitions[{i}].first_key' is not the hex key of its first entry"
        if entries == 0 and len(parts) > 1:
            return f"'span_partitions[{i}]' is empty (only an empty index has an empty partition)"
    return None


def _default_label(name: str) -> str:
    return f"span index file {name}"


def read_span_index(
    folder: Path, fields: dict | None, *, span_tokens: int, label: Callable[[str], str] = _default_label
) -> SpanIndex:
    """Check and memory-map a span index's files: every header (dtype, shape, size against the file) before a map,
    then the counts (partitions' entries as the manifest says, summing to `span_tokens`, fewer than the stream's
    tokens; samples for that many entries), positions inside the stream, and the partitions in order (each
    one's first key as recorded, never below the previous partition's last). fields: the manifest's span fields
    (checked by span_fields_problem first); None for format versions 1 and 2 (one span_sa.npy). Raises
    FolderFormatError (the index's IndexFormatError) in one line, `label(file name)` naming the file.
    -> SpanIndex over read-only arrays"""
    folder = Path(folder)
    stream = _open_stream(folder, fields, label)
    if fields is None:
        parts = [open_npy(folder / "span_sa.npy", (np.uint32, np.int64), 1, label("span_sa.npy"))]
        names, keys = ["span_sa.npy"], None
    else:
        names = [p["file"] for p in fields["span_partitions"]]
        keys = [p["first_key"] for p in fields["span_partitions"]]
        parts = [open_npy(folder / n, (fields["position_dtype"],), 1, label(n)) for n in names]
        for name, part, entry in zip(names, parts, fields["span_partitions"], strict=True):
            if part.size != entry["entries"]:
                raise FolderFormatError(f"{label(name)}: {part.size} positions, the manifest says {entry['entries']}")
    key_dtype = _key_dtypes(stream.dtype)[1]
    samples = open_npy(folder / SAMPLES_FILE, (key_dtype,), 1, label(SAMPLES_FILE))
    order = SuffixOrder(parts)
    if stream.size == 0 or order.size != span_tokens or order.size >= stream.size:
        raise FolderFormatError(
            f"{label(names[0])}: {order.size} positions for a stream of {stream.size} tokens (the manifest says "
            f"{span_tokens})"
        )
    if samples.size != -(-order.size // sample_every(stream.dtype)):
        raise FolderFormatError(f"{label(SAMPLES_FILE)}: {samples.size} samples do not fit {order.size} positions")
    for name, part in zip(names, parts, strict=True):  # a bad position would index past the stream
        if part.size and int(part.max()) >= stream.size:
            raise FolderFormatError(f"{label(name)}: a position lies outside the stream")
    if keys is not None:
        _check_partition_keys(stream, names, parts, keys, label)
    return SpanIndex(stream, order, samples)


def _open_stream(folder: Path, fields: dict | None, label) -> Stream:
    """The stream: one mapped file, or its shards (each its recorded size, one dtype) as one ShardedStream."""
    sizes = (fields or {}).get("stream_shards", [None])
    names = stream_shard_names(len(sizes))
    shards = [open_npy(folder / name, (np.uint16, np.uint32), 1, label(name)) for name in names]
    for name, shard, size in zip(names, shards, sizes, strict=True):
        if size is not None and shard.size != size:
            raise FolderFormatError(f"{label(name)}: {shard.size} tokens, the manifest says {size}")
    if len(shards) == 1:
        return shards[0]
    if len({shard.dtype for shard in shards}) != 1:
        raise FolderFormatError(f"{label(names[0])}: the stream's shards differ in dtype")
    return ShardedStream(shards)


def _check_partition_keys(stream, names, parts, keys, label) -> None:
    """Each partition's first key as the manifest records it; first keys non-decreasing, and no partition's last
    key above the next one's first: the partitions are consecutive slices of one order."""
    prev_last = ""
    for name, part, key in zip(names, parts, keys, strict=True):
        if not part.size:
            continue
        first = _key_hex(stream, int(part[0]))
        if first != key:
            raise FolderFormatError(f"{label(name)}: its first key is not the manifest's first_key (a modified file?)")
        if first < prev_last:
            raise FolderFormatError(f"{label(name)}: partitions are out of order (its first key precedes the last)")
        prev_last = _key_hex(stream, int(part[-1]))
