"""The faiss index over passage embeddings: exact (IndexFlatIP) while it is small, compressed when it is not.

`write_passage_index(folder, vectors, dim=, n_total=, flat_limit_bytes=, compressed=)` writes `passages.faiss` (and
the file beside it) and returns the manifest fields that `read_passage_index` checks on load:
- flat, when the float32 vectors take at most `flat_limit_bytes` (FLAT_LIMIT_BYTES, 1 GiB, by default) or there
  are fewer than MIN_IVF_PASSAGES of them: 4 * dim bytes per passage, exact inner-product search;
- otherwise the `compressed` kind, both with inner product and nlist ~ 4 sqrt(n) inverted lists (bounded by
  MAX_NLIST and by the training sample), trained on a seeded random sample of at most max(64 nlist, 39 * 256)
  vectors:
  - "fastscan" (the default; manifest kind "ivfpq_fastscan"): IVF-PQ fast-scan, m = dim / 2 sub-quantizers of 4
    bits (scored from lookup tables held in SIMD registers; dim / 4 + 8 bytes a passage, held in memory when
    searched), whose k * k_factor best candidates are re-ranked by their exact inner product with the vectors
    themselves, stored beside it (REFINE_FILE, 4 dim bytes a passage, memory-mapped: a query reads only its
    candidates' rows). k_factor is the first of K_FACTORS that reaches the recall target. On 544,642 hashed
    256-dim passage vectors of the 100M-token benchmark corpus this measured recall@10 0.90 at 1.5 ms a query
    where the 8-bit kind below took 15 ms (docs/LOG.md, 2026-12-06);
  - "ivfpq": m = dim sub-quantizers of 8 bits (1 byte per dimension plus an 8-byte id a passage; a coarser
    m = dim/2 measured 0.82 recall@10 on clustered vectors, below the target; m is capped at MAX_PQ_M, the largest
    divisor of dim up to it, so the 16384-dim hashed embedder gets 16-dim sub-quantizers; even so that build is
    slow, over 3 minutes for 1,100 passages on 2 cores, not profiled), its lists merged on disk (below): the least
    memory, the slowest search.
  nprobe is the smallest value (powers of two tried first, then a bisection between the last two) whose recall@10
  against exact search on RECALL_QUERIES held-out passages (never in the training sample) reaches RECALL_TARGET;
  recall@10 is the mean overlap of the approximate and the exact top 10 besides the passage itself (a held-out
  passage finds its own vector first, which a query that is not in the index cannot: counted, it lifted recall on
  held-out passages to 0.903 where fresh queries got 0.892 at 5.2M passages). Both are measured at build time and
  recorded; if even nprobe = nlist (and, for fast-scan, the largest k_factor) misses the target, the build warns
  and records what it measured.

`vectors` is read once for a flat index and twice when compressed (a first pass draws the samples, a second adds
every vector and finds the held-out passages' exact neighbours), so it is a callable returning a fresh iterable of
blocks, or a re-iterable (a list of blocks); a one-shot iterator is refused when compressed. Blocks are (B, dim)
float32 in passage order; memory is one block plus the sample, plus for fast-scan every passage's codes (dim / 4 +
8 bytes), for IVF-PQ one shard's codes (dim + 8 bytes per passage, SHARD_VECTORS passages a shard). IVF-PQ shards
are written beside the index as they fill and their inverted lists merged on disk into IVFDATA_FILE (faiss'
merge_ondisk), which the index names by its file name alone and a load reads from the index's own folder,
memory-mapped.

Loading checks the file's header against the manifest before faiss reads a byte: for flat the dimensions, count and
exact file size; for the compressed kinds every size faiss would read (dims, count, lists, quantizer, codebook,
list sizes summing to the count, the exact file size), and for fast-scan the stored vectors' .npy header ((n, dim)
float32, the exact file size).

Knows: faiss index kinds, their file layout and parameters. Does not know passages, texts, embedders or manifests
beyond the fields it returns and reads back.
"""

from __future__ import annotations

import math
import os
import re
import struct
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..checked_folder import FolderFormatError, GenerationGone
from .extra import require
from .npyfile import NpyAppender, open_npy

__all__ = [
    "COMPRESSED_KINDS",
    "FAISS_FILE",
    "IVFDATA_FILE",
    "REFINE_FILE",
    "RefinedIndex",
    "SHARD_VECTORS",
    "FLAT_LIMIT_BYTES",
    "MAX_NLIST",
    "MAX_PQ_M",
    "MIN_IVF_PASSAGES",
    "RECALL_QUERIES",
    "RECALL_TARGET",
    "check_passage_file",
    "parse_bytes",
    "passage_extra_files",
    "passage_fields_problem",
    "read_passage_index",
    "write_passage_index",
]

FAISS_FILE = "passages.faiss"
IVFDATA_FILE = "passages.ivfdata"  # an IVF-PQ index's inverted lists, merged on disk from its shards
REFINE_FILE = "passages.refine.npy"  # a fast-scan index's exact vectors, memory-mapped to re-rank its candidates
COMPRESSED_KINDS = ("fastscan", "ivfpq")  # what a build writes above the flat limit; the first is the default
SHARD_VECTORS = 1 << 20  # vectors per IVF-PQ shard: the writer holds one shard's codes in memory at a time
FLAT_LIMIT_BYTES = 1 << 30  # float32 vectors up to this size stay an exact flat index
MIN_IVF_PASSAGES = 1024  # fewer passages: flat whatever the limit (too few to train lists and a codebook)
MAX_NLIST = 1 << 14
MAX_PQ_M = 1024  # sub-quantizers at most: training and search tables grow with m
RECALL_TARGET, RECALL_K, RECALL_QUERIES = 0.9, 10, 256
PQ_BITS = 8
FASTSCAN_BITS = 4  # fast-scan codes: 16 centroids a sub-quantizer, scored from tables held in SIMD registers
FASTSCAN_BLOCK = 32  # vectors a block of a fast-scan inverted list (faiss' bbs)
K_FACTORS = (16, 32, 64)  # candidates re-ranked per neighbour asked for, tried in turn until the recall target is met
MAX_K_FACTOR = 1024
_SEARCH_ROWS = 1 << 14  # database rows scored against the held-out queries at a time
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_BYTES = re.compile(r"\s*([0-9]+)\s*([KMGT]?)(?:I?B)?\s*", re.IGNORECASE)
_METRIC_INNER_PRODUCT = 0  # faiss.METRIC_INNER_PRODUCT as faiss writes it: headers are read before faiss imports
_INDEX_HEADER = struct.Struct("<4siqqq?i")  # fourcc, d, ntotal, 2 unused, is_trained, metric
_FLAT = struct.Struct("<4siqqq?iQ")  # IndexFlat: the header, then the number of floats that follow


def parse_bytes(text: str) -> int:
    """'1073741824', '512M', '2G', '64KiB' (binary units, case-insensitive) -> bytes. Raises ValueError."""
    match = _BYTES.fullmatch(str(text))
    if not match:
        raise ValueError(f"expected a size in bytes like 512M, 2G or 1073741824, got {text!r}")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


# -- writing -----------------------------------------------------------------------------------------------------


def _iterate(vectors) -> Iterator:
    return iter(vectors() if callable(vectors) else vectors)


def _blocks(vectors, dim: int) -> Iterator[np.ndarray]:
    """Each block checked: (B, dim) finite float32. -> contiguous (B, dim) float32"""
    for block in _iterate(vectors):
        arr = np.ascontiguousarray(block, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[1] != dim:
            raise ValueError(f"passage vectors must come in (B, {dim}) blocks, got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError("a passage vector is not finite (NaN or inf)")
        yield arr


def _check_count(seen: int, n_total: int) -> None:
    if seen != n_total:
        raise ValueError(f"the passage vectors number {seen}, n_total says {n_total}")


def _write_flat(faiss, path: Path, vectors, dim: int, n_total: int) -> dict:
    index = faiss.IndexFlatIP(dim)
    for block in _blocks(vectors, dim):
        index.add(block)
    _check_count(index.ntotal, n_total)
    faiss.write_index(index, str(path))
    return {"kind": "flat"}


def _plan(n: int, seed: int) -> tuple[int, np.ndarray, np.ndarray]:
    """nlist, held-out rows (Q,) and training rows (T,), disjoint, drawn with `seed`."""
    held = min(RECALL_QUERIES, n // 4)
    nlist = max(1, min(round(4 * math.sqrt(n)), MAX_NLIST, (n - held) // 39))
    train = min(n - held, max(64 * nlist, 39 * (1 << PQ_BITS)))
    pick = np.random.default_rng(seed).choice(n, size=held + train, replace=False)
    return nlist, pick[:held], pick[held:]


def _gather(vectors, dim: int, rows: np.ndarray) -> np.ndarray:
    """Rows of the whole sequence of blocks, read in one pass. (R,) -> (R, dim) float32 in the order of `rows`"""
    order = np.argsort(rows)
    wanted = rows[order]
    out = np.empty((rows.size, dim), dtype=np.float32)
    start = 0
    for block in _blocks(vectors, dim):
        lo, hi = np.searchsorted(wanted, (start, start + block.shape[0]))
        out[order[lo:hi]] = block[wanted[lo:hi] - start]
        start += block.shape[0]
    return out


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean overlap of each row's found and exact neighbours. (Q, k), (Q, k) -> recall@k"""
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / b.size for a, b in zip(found, exact, strict=True)]))


def _refuse_one_shot(vectors) -> None:
    if not callable(vectors) and iter(vectors) is vectors:
        raise ValueError(
            "an IVF-PQ passage index reads the vectors twice: pass a callable returning a fresh iterable of "
            "blocks (or a list), not a one-shot iterator"
        )


def _sub_quantizers(dim: int, most: int) -> int:
    """The product quantizer's m: the largest divisor of dim up to min(most, MAX_PQ_M)."""
    return max(d for d in range(1, min(dim, most, MAX_PQ_M) + 1) if dim % d == 0)


class _HeldOut:
    """The held-out passages (rows of the index, never in the training sample) whose recall sets nprobe: their
    exact neighbours scored block by block as the adding pass reads the vectors, each passage's own row left out
    of what it finds (a query that is not in the index cannot find itself)."""

    def __init__(self, queries: np.ndarray, rows: np.ndarray, n: int):
        self.queries, self.rows = queries, rows  # (Q, dim), (Q,)
        self.k = min(RECALL_K, n - 1)  # neighbours besides the passage itself
        self.best = np.full((rows.size, self.k + 1), -np.inf, dtype=np.float32)  # (Q, k + 1) exact scores so far
        self.best_ids = np.full((rows.size, self.k + 1), -1, dtype=np.int64)  # (Q, k + 1)

    def score(self, block: np.ndarray, start: int) -> None:
        """One more block of the index's vectors (rows start.. of it)."""
        self.best, self.best_ids = _score_block(self.queries, block, start, self.best, self.best_ids, self.k + 1)

    def smallest_nprobe(self, index, nlist: int) -> tuple[int, float, bool]:
        """_smallest_nprobe on these passages, once every block is scored."""
        order = np.argsort(-self.best, axis=1, kind="stable")  # best first
        exact = _others(np.take_along_axis(self.best_ids, order, 1), self.rows, self.k)
        return _smallest_nprobe(index, self.queries, exact, self.k, nlist, own=self.rows)


def _first_pass(vectors, dim: int, n: int, seed: int) -> tuple[int, _HeldOut, np.ndarray]:
    """The compressed kinds' first read of the vectors: nlist, the held-out passages and the training sample.
    -> (nlist, _HeldOut, (T, dim) float32)"""
    _refuse_one_shot(vectors)
    nlist, held_rows, train_rows = _plan(n, seed)
    sample = _gather(vectors, dim, np.concatenate((held_rows, train_rows)))
    return nlist, _HeldOut(sample[: held_rows.size], held_rows, n), sample[held_rows.size :]


def _write_ivfpq(faiss, path: Path, vectors, dim: int, n: int, seed: int) -> dict:
    # 1) first pass: the training sample and the held-out passages
    nlist, held, train = _first_pass(vectors, dim, n, seed)
    # 2) train the coarse quantizer and the codebook, seeded
    m = _sub_quantizers(dim, dim)
    trained = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, m, PQ_BITS, faiss.METRIC_INNER_PRODUCT)
    trained.cp.seed = seed
    trained.pq.cp.seed = seed
    trained.train(train)
    empty = faiss.serialize_index(trained)  # the trained, empty index every shard starts from
    train_vectors = len(train)
    del train, trained
    # 3) second pass: add every vector to shards of SHARD_VECTORS, each written beside the index; score the
    #    held-out passages exactly on the way
    shards: list[Path] = []
    shard = None
    start = 0
    try:
        for block in _blocks(vectors, dim):
            done = 0  # rows of this block already in a shard
            while done < block.shape[0]:
                if shard is None:
                    shard = faiss.deserialize_index(empty)
                take = min(SHARD_VECTORS - shard.ntotal, block.shape[0] - done)
                ids = np.arange(start + done, start + done + take, dtype=np.int64)
                shard.add_with_ids(block[done : done + take], ids)
                done += take
                if shard.ntotal == SHARD_VECTORS:
                    shards.append(_write_shard(faiss, shard, path, len(shards)))
                    shard = None
            held.score(block, start)
            start += block.shape[0]
        if shard is not None:
            shards.append(_write_shard(faiss, shard, path, len(shards)))
        _check_count(start, n)  # before the merge: the shards hold exactly the vectors read
        index = _merge_on_disk(faiss, empty, shards, path.with_name(IVFDATA_FILE))
    finally:
        for name in shards:
            name.unlink(missing_ok=True)
    # 4) the smallest nprobe that reaches the recall target on the held-out passages
    nprobe, recall, reached = held.smallest_nprobe(index, nlist)
    if not reached:
        _warn_recall(held.k, recall, nlist)
    index.nprobe = nprobe
    faiss.write_index(index, str(path))
    return {
        "kind": "ivfpq",
        "nlist": nlist,
        "m": m,
        "nbits": PQ_BITS,
        "nprobe": nprobe,
        f"recall_at_{RECALL_K}": round(recall, 4),
        "held_out": int(held.rows.size),
        "train_vectors": train_vectors,
        "seed": seed,
        "inverted_lists": "ondisk",
        "shards": len(shards),
    }


def _warn_recall(k: int, recall: float, nlist: int) -> None:
    warnings.warn(
        f"IVF-PQ passage index: recall@{k} {recall:.3f} at nprobe={nlist} (every list) misses the target "
        f"{RECALL_TARGET}; raise --flat-limit for an exact index",
        stacklevel=4,
    )


def _write_fastscan(faiss, folder: Path, vectors, dim: int, n: int, seed: int) -> dict:
    """IVF-PQ fast-scan (4-bit codes, m = dim / 2 sub-quantizers, lists in memory) whose candidates are re-ranked
    exactly against the vectors themselves, stored beside it (REFINE_FILE) and memory-mapped when searched."""
    # 1) first pass: the training sample and the held-out passages
    nlist, held, train = _first_pass(vectors, dim, n, seed)
    # 2) train the coarse quantizer and the codebook, seeded
    m = _sub_quantizers(dim, max(1, dim // 2))
    index = faiss.IndexIVFPQFastScan(
        faiss.IndexFlatIP(dim), dim, nlist, m, FASTSCAN_BITS, faiss.METRIC_INNER_PRODUCT, FASTSCAN_BLOCK
    )
    index.cp.seed = seed
    index.pq.cp.seed = seed
    index.train(train)
    train_vectors = len(train)
    del train
    # 3) second pass: every vector coded into the lists and stored exactly; the held-out passages scored exactly
    start = 0
    with NpyAppender(folder / REFINE_FILE, np.float32, (dim,)) as refine:
        for block in _blocks(vectors, dim):
            index.add(block)
            refine.append(block)
            held.score(block, start)
            start += block.shape[0]
    _check_count(start, n)
    # 4) the fewest candidates per neighbour, then the fewest lists, that reach the target on the held-out queries
    searcher = RefinedIndex(index, open_npy(folder / REFINE_FILE, [np.float32], 2, REFINE_FILE), K_FACTORS[0])
    for k_factor in K_FACTORS:
        searcher.k_factor = k_factor
        nprobe, recall, reached = held.smallest_nprobe(searcher, nlist)
        if reached:
            break
    else:
        _warn_recall(held.k, recall, nlist)
    index.nprobe = nprobe
    faiss.write_index(index, str(folder / FAISS_FILE))
    return {
        "kind": "ivfpq_fastscan",
        "nlist": nlist,
        "m": m,
        "nbits": FASTSCAN_BITS,
        "nprobe": nprobe,
        "k_factor": searcher.k_factor,
        "refine": "float32",
        f"recall_at_{RECALL_K}": round(recall, 4),
        "held_out": int(held.rows.size),
        "train_vectors": train_vectors,
        "seed": seed,
    }


class RefinedIndex:
    """A fast-scan IVF-PQ index whose k * k_factor candidates are re-ranked by their exact inner product with the
    stored vectors (what faiss' IndexRefineFlat does, with the vectors memory-mapped instead of held in memory: a
    query reads k * k_factor rows of them). Answers as a faiss index does: `search`, `nprobe`, `d`, `ntotal`."""

    def __init__(self, coarse, vectors: np.ndarray, k_factor: int):
        if vectors.shape != (coarse.ntotal, coarse.d):
            raise ValueError(f"the stored vectors are {vectors.shape}, the index holds {coarse.ntotal} of {coarse.d}")
        self.coarse, self.vectors, self.k_factor = coarse, vectors, k_factor
        self.d, self.ntotal = coarse.d, coarse.ntotal

    @property
    def nprobe(self) -> int:
        return self.coarse.nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        self.coarse.nprobe = value

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(Q, d) float32, k -> (scores (Q, k) float32, ids (Q, k) int64), best first; -inf and -1 pad rows that
        have fewer than k candidates. Ties go to the lower id."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        scores = np.full((queries.shape[0], k), -np.inf, dtype=np.float32)
        ids = np.full((queries.shape[0], k), -1, dtype=np.int64)
        if self.ntotal == 0:
            return scores, ids
        _, candidates = self.coarse.search(queries, min(k * self.k_factor, self.ntotal))  # (Q, k * k_factor)
        for row, (query, found) in enumerate(zip(queries, candidates, strict=True)):
            found = np.unique(found[found >= 0])  # ascending: the stored rows are read in file order
            exact = self.vectors[found] @ query  # (C,)
            top = np.argsort(-exact, kind="stable")[:k]
            scores[row, : top.size], ids[row, : top.size] = exact[top], found[top]
        return scores, ids


def _others(ids: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """Each row's ids, best first, without the row's own id (the held-out passage itself, which every search of it
    finds and a real query is not): the first k others. (Q, k + 1), (Q,) -> (Q, k)"""
    mine = ids == own[:, None]  # (Q, k + 1)
    mine[~mine.any(axis=1), -1] = True  # not found: the last one goes instead
    mine &= np.cumsum(mine, axis=1) == 1  # at most one a row
    return ids[~mine].reshape(ids.shape[0], k)


def _smallest_nprobe(index, queries, exact_ids, k: int, nlist: int, own=None) -> tuple[int, float, bool]:
    """The smallest nprobe whose recall@k on the held-out queries reaches RECALL_TARGET: powers of two first, then a
    bisection between the last two (recall grows with nprobe, nearly monotonically; each trial is one search of the
    held-out queries). own: the queries' own rows in the index (held-out passages), left out of what the search
    finds as exact_ids leaves them out (None: queries that are not in the index).
    -> (nprobe, its recall, whether the target was reached; else nlist and its recall)"""

    def recall_at(probe: int) -> float:
        index.nprobe = probe
        if own is None:
            return _recall(index.search(queries, k)[1], exact_ids)
        return _recall(_others(index.search(queries, k + 1)[1], own, k), exact_ids)

    low = 0  # the largest nprobe known to miss the target
    for probe in sorted({*(1 << i for i in range(nlist.bit_length())), nlist}):
        recall = recall_at(probe)
        if recall >= RECALL_TARGET:
            high, high_recall = probe, recall
            break
        low = probe
    else:
        return nlist, recall, False
    while high - low > 1:
        middle = (low + high) // 2
        recall = recall_at(middle)
        if recall >= RECALL_TARGET:
            high, high_recall = middle, recall
        else:
            low = middle
    return high, high_recall, True


def _score_block(queries, block, start: int, best, best_ids, k: int):
    """The held-out queries' exact top k after one more block of the database (rows start.. of it)."""
    for lo in range(0, block.shape[0], _SEARCH_ROWS):
        rows = block[lo : lo + _SEARCH_ROWS]
        scores = np.concatenate((best, queries @ rows.T), axis=1)  # (Q, k + R)
        ids = np.concatenate((best_ids, np.broadcast_to(np.arange(rows.shape[0]) + start + lo, scores[:, k:].shape)), 1)
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        best, best_ids = np.take_along_axis(scores, top, 1), np.take_along_axis(ids, top, 1)
    return best, best_ids


def _write_shard(faiss, shard, path: Path, number: int) -> Path:
    """One shard of an IVF-PQ index, written beside it until the merge (then removed)."""
    name = path.with_name(f"{path.name}.shard-{number}")
    faiss.write_index(shard, str(name))
    return name


@contextmanager
def _c_stdout_to_stderr() -> Iterator[None]:
    """Within the block, what C code writes to file descriptor 1 goes to descriptor 2 (a CLI's stdout may be JSON)."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no descriptor 1 to protect
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        _libc_flush()
        os.dup2(saved, 1)
        os.close(saved)


def _libc_flush() -> None:
    """Flush C stdio's buffers (faiss writes with printf), so nothing buffered leaks out after the block."""
    import ctypes

    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass


def _merge_on_disk(faiss, empty, shards: list[Path], ivfdata: Path):
    """The trained index whose inverted lists are the shards' merged into `ivfdata` (faiss' OnDiskInvertedLists,
    the shards memory-mapped, never read whole). The lists' file is recorded by its name alone, so the index reads
    it from its own folder wherever that folder is moved (read with IO_FLAG_ONDISK_SAME_DIR), and two builds of the
    same vectors write the same bytes."""
    from faiss.contrib.ondisk import merge_ondisk

    index = faiss.deserialize_index(empty)
    ivfdata.unlink(missing_ok=True)
    with _c_stdout_to_stderr():  # faiss printf()s "resizing ..." as the lists file grows: keep stdout the caller's
        merge_ondisk(index, [str(p) for p in shards], str(ivfdata))
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    lists.filename = IVFDATA_FILE
    return index


def write_passage_index(
    folder: Path,
    vectors: Iterable[np.ndarray] | Callable[[], Iterable[np.ndarray]],
    *,
    dim: int,
    n_total: int,
    flat_limit_bytes: int = FLAT_LIMIT_BYTES,
    seed: int = 0,
    compressed: str = COMPRESSED_KINDS[0],
) -> tuple[list[str], dict]:
    """Write `passages.faiss` (and the files beside it) into `folder`: flat when n_total * dim * 4 <=
    flat_limit_bytes (or n_total < MIN_IVF_PASSAGES), else the `compressed` kind (see the module docstring):
    "fastscan" (IVF-PQ fast-scan re-ranked against the stored vectors) or "ivfpq" (8-bit IVF-PQ, lists on disk).

    vectors: (B, dim) float32 blocks in passage order, as a callable returning a fresh iterable, or a re-iterable
    (read twice when compressed). n_total: how many vectors there are (checked). seed: the samples' and k-means'
    seed.
    -> (file names written, manifest fields {"passage_index": {"kind": "flat"}, {"kind": "ivfpq_fastscan", "nlist",
        "m", "nbits", "nprobe", "k_factor", "refine", "recall_at_10", ...} or {"kind": "ivfpq", "nlist", "m",
        "nbits", "nprobe", "recall_at_10", "held_out", "train_vectors", "seed", "inverted_lists", "shards"}})
    """
    if not 1 <= dim <= 1 << 16 or n_total < 0 or flat_limit_bytes < 0:
        raise ValueError(
            f"dim must be in [1, 65536], n_total and flat_limit_bytes >= 0; got {dim}, {n_total}, {flat_limit_bytes}"
        )
    if compressed not in COMPRESSED_KINDS:
        raise ValueError(f"compressed must be one of {COMPRESSED_KINDS}, got {compressed!r}")
    faiss = require("faiss")
    path = Path(folder) / FAISS_FILE
    if n_total * dim * 4 <= flat_limit_bytes or n_total < MIN_IVF_PASSAGES:
        fields = _write_flat(faiss, path, vectors, dim, n_total)
    elif compressed == "fastscan":
        fields = _write_fastscan(faiss, Path(folder), vectors, dim, n_total, seed)
    else:
        fields = _write_ivfpq(faiss, path, vectors, dim, n_total, seed)
    return [FAISS_FILE, *passage_extra_files(fields)], {"passage_index": fields}


def passage_extra_files(fields: dict | None) -> tuple[str, ...]:
    """The files a passage index of these manifest fields (`passage_index`; None: versions 1 and 2) holds beside
    FAISS_FILE: the merged lists of an on-disk IVF-PQ, the stored vectors of a fast-scan index. -> names"""
    if fields is None:
        return ()
    if fields.get("kind") == "ivfpq_fastscan":
        return (REFINE_FILE,)
    if fields.get("kind") == "ivfpq" and fields.get("inverted_lists") == "ondisk":
        return (IVFDATA_FILE,)
    return ()


# -- reading: the header first -----------------------------------------------------------------------------------


def passage_fields_problem(fields: dict) -> str | None:
    """What is wrong with a manifest's `passage_index` field, or None."""
    p = fields.get("passage_index")
    if not isinstance(p, dict) or p.get("kind") not in ("flat", "ivfpq", "ivfpq_fastscan"):
        return "'passage_index' is missing or its kind is not 'flat', 'ivfpq' or 'ivfpq_fastscan'"
    if p["kind"] == "flat":
        return None
    fast = p["kind"] == "ivfpq_fastscan"
    limits = (("nlist", MAX_NLIST), ("m", 1 << 16), ("nprobe", MAX_NLIST), *((("k_factor", MAX_K_FACTOR),) * fast))
    for key, hi in limits:
        value = p.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= hi:
            return f"'passage_index.{key}' is not an integer in [1, {hi}]"
    bits = FASTSCAN_BITS if fast else PQ_BITS
    if p.get("nbits") != bits or p["nprobe"] > p["nlist"]:
        return f"'passage_index' asks for nbits {p.get('nbits')!r} (this code writes {bits}) or nprobe > nlist"
    if fast:
        return None if p.get("refine") == "float32" else "'passage_index.refine' is not 'float32'"
    if p.get("inverted_lists", "memory") not in ("memory", "ondisk"):
        return "'passage_index.inverted_lists' is neither 'memory' (in passages.faiss) nor 'ondisk'"
    return None


class _Reader:
    """Sequential reads of a file's little-endian fields, each refused past the end of the file."""

    def __init__(self, path: Path, label: str):
        self.f, self.label, self.size = open(path, "rb"), label, path.stat().st_size  # noqa: SIM115 - closed below

    def read(self, fmt: str | struct.Struct) -> tuple:
        s = fmt if isinstance(fmt, struct.Struct) else struct.Struct("<" + fmt)
        data = self.f.read(s.size)
        if len(data) < s.size:
            raise FolderFormatError(f"{self.label}: ends inside its faiss header (truncated?)")
        return s.unpack(data)

    def skip(self, n: int) -> None:
        if n < 0 or self.f.tell() + n > self.size:
            raise FolderFormatError(f"{self.label}: declares more data than the file holds")
        self.f.seek(n, 1)


def _check_flat(path: Path, dim: int, n: int, label: str) -> None:
    with open(path, "rb") as f:
        head = f.read(_FLAT.size)
    if len(head) < _FLAT.size:
        raise FolderFormatError(f"{label}: too short for a faiss IndexFlatIP")
    fourcc, d, ntotal, _, _, _, metric, codes = _FLAT.unpack(head)
    if fourcc != b"IxFI" or metric != _METRIC_INNER_PRODUCT:
        raise FolderFormatError(f"{label}: not a faiss IndexFlatIP file")
    if d != dim or ntotal != n or codes != n * dim or path.stat().st_size != _FLAT.size + 4 * n * dim:
        raise FolderFormatError(
            f"{label}: holds {ntotal} vectors of {d} dims ({codes} floats), the manifest says {n} of {dim}"
        )


def _check_ivf_head(r: _Reader, fourcc: bytes, name: str, dim: int, n: int, nlist: int, refuse) -> None:
    """The part every faiss IVF file shares: its header (kind, metric, dims, count), nlist and nprobe, the coarse
    quantizer (a flat inner-product index of one centroid per list) and an empty direct map."""
    found, d, ntotal, _, _, trained, metric = r.read(_INDEX_HEADER)
    if found != fourcc or metric != _METRIC_INNER_PRODUCT or not trained:
        raise refuse(f"not a trained inner-product faiss {name}")
    if d != dim or ntotal != n:
        raise refuse(f"holds {ntotal} vectors of {d} dims (the manifest: {n} of {dim})")
    (lists, _) = r.read("QQ")
    if lists != nlist:
        raise refuse(f"{lists} inverted lists")
    qfourcc, qd, qn, _, _, _, qmetric, qcodes = r.read(_FLAT)
    if (qfourcc, qd, qn, qmetric, qcodes) != (b"IxFI", dim, nlist, _METRIC_INNER_PRODUCT, nlist * dim):
        raise refuse("its coarse quantizer is not a flat inner-product index of one centroid per list")
    r.skip(4 * qcodes)
    map_type, map_size = r.read("bQ")
    if map_type != 0 or map_size != 0:
        raise refuse("it keeps a direct map")


def _check_ivfpq(path: Path, dim: int, n: int, fields: dict, label: str) -> None:
    """Walk an IndexIVFPQ file as faiss writes it (header, coarse quantizer, direct map, codebook, inverted lists)
    and compare every size faiss would trust with the manifest."""
    nlist, m = fields["nlist"], fields["m"]

    def refuse(what: str) -> FolderFormatError:
        return FolderFormatError(f"{label}: {what}, not the IVF-PQ index the manifest describes")

    r = _Reader(path, label)
    with r.f:
        _check_ivf_head(r, b"IwPQ", "IndexIVFPQ", dim, n, nlist, refuse)
        _, code_size = r.read("?Q")
        pq_d, pq_m, pq_bits, centroids = r.read("QQQQ")
        if (code_size, pq_d, pq_m, pq_bits, centroids) != (m, dim, m, PQ_BITS, dim << PQ_BITS):
            raise refuse(f"its product quantizer is {pq_m} x {pq_bits} bits over {pq_d} dims")
        r.skip(4 * centroids)
        kind_of_lists, il_lists, il_code = r.read("4sQQ")
        if fields.get("inverted_lists") == "ondisk":
            if (kind_of_lists, il_lists, il_code) != (b"ilod", nlist, m):
                raise refuse("its inverted lists are not on disk, one list per centroid")
            _check_ondisk_lists(r, path.with_name(IVFDATA_FILE), n, nlist, m, refuse)
            return
        if (kind_of_lists, il_lists, il_code) != (b"ilar", nlist, m):
            raise refuse("its inverted lists are not plain arrays of its codes")
        (kind, count) = r.read("4sQ")
        if kind == b"full" and count == nlist:
            sizes = list(r.read(f"{nlist}Q"))
        elif kind == b"sprs" and count % 2 == 0 and count <= 2 * nlist:
            pairs = r.read(f"{count}Q")
            sizes = list(pairs[1::2])
        else:
            raise refuse("its inverted list sizes are malformed")
        total = sum(sizes)
        if total != n:
            raise refuse(f"its lists hold {total} vectors")
        if r.f.tell() + total * (m + 8) != r.size:
            raise refuse(f"it has {r.size} bytes where its lists need {r.f.tell() + total * (m + 8)}")


def _check_fastscan(path: Path, dim: int, n: int, fields: dict, label: str) -> None:
    """Walk an IndexIVFPQFastScan file as faiss writes it (header, coarse quantizer, direct map, fast-scan layout,
    codebook, then its lists in blocks of FASTSCAN_BLOCK vectors: each list's ids, then its codes rounded up to
    whole blocks) and compare every size faiss would trust with the manifest."""
    nlist, m = fields["nlist"], fields["m"]
    packed = (m + 1) // 2  # bytes of one vector's codes: two 4-bit codes a byte

    def refuse(what: str) -> FolderFormatError:
        return FolderFormatError(f"{label}: {what}, not the fast-scan IVF-PQ index the manifest describes")

    r = _Reader(path, label)
    with r.f:
        _check_ivf_head(r, b"IwPf", "IndexIVFPQFastScan", dim, n, nlist, refuse)
        _, code_size, block, m2, _, _ = r.read("?QiQiQ")  # by_residual, code_size, bbs, M2, implem, qbs2
        if (code_size, block, m2) != (packed, FASTSCAN_BLOCK, 2 * packed):
            raise refuse(f"its codes take {code_size} bytes in blocks of {block}")
        pq_d, pq_m, pq_bits, centroids = r.read("QQQQ")
        if (pq_d, pq_m, pq_bits, centroids) != (dim, m, FASTSCAN_BITS, dim << FASTSCAN_BITS):
            raise refuse(f"its product quantizer is {pq_m} x {pq_bits} bits over {pq_d} dims")
        r.skip(4 * centroids)
        kind_of_lists, il_lists, _, per_block, block_bytes = r.read("4sQqQQ")
        if (kind_of_lists, il_lists, per_block, block_bytes) != (b"ilbl", nlist, FASTSCAN_BLOCK, block * packed):
            raise refuse("its inverted lists are not blocks of fast-scan codes, one list per centroid")
        total = 0
        for _ in range(nlist):
            (size,) = r.read("Q")
            r.skip(8 * size)
            (code_bytes,) = r.read("Q")
            if code_bytes != -(-size // per_block) * block_bytes:
                raise refuse(f"a list of {size} vectors holds {code_bytes} bytes of codes")
            r.skip(code_bytes)
            total += size
        if total != n:
            raise refuse(f"its lists hold {total} vectors")
        if r.f.tell() != r.size:
            raise refuse("it has bytes after its inverted lists")


def _check_ondisk_lists(r: _Reader, ivfdata: Path, n: int, nlist: int, m: int, refuse) -> None:
    """The rest of an IVF-PQ file whose lists live in `ivfdata` (faiss' OnDiskInvertedLists, as merge_ondisk
    writes it): (size, capacity, offset) per list, the free slots, the lists file's name and size. Every list must
    lie inside the lists file, the sizes sum to the manifest's count, and the name is the file beside it."""
    (count,) = r.read("Q")
    if count != nlist:
        raise refuse(f"it describes {count} on-disk lists")
    entries = r.read(f"{3 * nlist}Q")
    if not ivfdata.exists():
        raise GenerationGone(f"{ivfdata.name} is missing")
    data_size = ivfdata.stat().st_size
    sizes, capacities, offsets = entries[0::3], entries[1::3], entries[2::3]
    if any(size > cap for size, cap in zip(sizes, capacities, strict=True)):
        raise refuse("a list holds more codes than its capacity")
    if any(off + cap * (m + 8) > data_size for off, cap in zip(offsets, capacities, strict=True)):
        raise refuse(f"a list reaches past the end of {ivfdata.name} ({data_size} bytes)")
    if sum(sizes) != n:
        raise refuse(f"its lists hold {sum(sizes)} vectors")
    (slots,) = r.read("Q")
    r.skip(16 * slots)
    (name_length,) = r.read("Q")
    if name_length > 4096:
        raise refuse("its lists file name is implausibly long")
    (name,) = r.read(f"{name_length}s")
    (total,) = r.read("Q")
    if Path(name.decode("utf-8", "replace")).name != IVFDATA_FILE or total != data_size:
        raise refuse(f"its lists file is {name!r} of {total} bytes, not {IVFDATA_FILE} of {data_size}")
    if r.f.tell() != r.size:
        raise refuse("it has bytes after its inverted lists")


def check_passage_file(path: Path, fields: dict | None, dim: int, n: int, label: str) -> None:
    """Check `passages.faiss` says exactly what the manifest says before faiss opens it. fields: the manifest's
    `passage_index` (checked by passage_fields_problem), None for versions 1 and 2 (flat)."""
    if fields is None or fields["kind"] == "flat":
        _check_flat(path, dim, n, label)
    elif fields["kind"] == "ivfpq_fastscan":
        _check_fastscan(path, dim, n, fields, label)
    else:
        _check_ivfpq(path, dim, n, fields, label)


def _open_refine(path: Path, dim: int, n: int, label: str) -> np.ndarray:
    """The fast-scan index's stored vectors beside `path`, memory-mapped once their header says (n, dim) float32."""
    refine = path.with_name(REFINE_FILE)
    if not refine.exists():
        raise GenerationGone(f"{REFINE_FILE} is missing")
    name = label.replace(path.name, REFINE_FILE) if path.name in label else f"{label} ({REFINE_FILE})"
    vectors = open_npy(refine, [np.float32], 2, name)
    if vectors.shape != (n, dim):
        raise FolderFormatError(
            f"{name}: holds {vectors.shape[0]} vectors of {vectors.shape[1]} dims, the manifest says {n} of {dim}"
        )
    return vectors


def read_passage_index(path: Path, fields: dict | None, dim: int, n: int, label: str):
    """The checked faiss index, read-only, with the manifest's nprobe for IVF-PQ; a fast-scan index comes as a
    RefinedIndex over its memory-mapped vectors. -> faiss.Index or RefinedIndex (both: search, nprobe, d, ntotal)"""
    check_passage_file(path, fields, dim, n, label)
    fast = fields is not None and fields["kind"] == "ivfpq_fastscan"
    refine = _open_refine(path, dim, n, label) if fast else None
    faiss = require("faiss")
    try:
        # an on-disk IVF-PQ's lists file is read from this folder, whatever name it was written under
        index = faiss.read_index(str(path), faiss.IO_FLAG_READ_ONLY | faiss.IO_FLAG_ONDISK_SAME_DIR)
    except RuntimeError as e:  # the header passed, so this is a vanished file or an I/O error
        if not path.exists():
            raise GenerationGone(f"{label} is missing") from None
        raise FolderFormatError(f"{label}: faiss cannot read it ({e})") from None
    if fields is None or fields["kind"] == "flat":
        return index
    index.nprobe = fields["nprobe"]
    return RefinedIndex(index, refine, fields["k_factor"]) if refine is not None else index
