"""The corpus index build on Ray: the local build's stages as Ray Data operations (and Ray tasks and actors for the
embeddings), the same files out.

`build_index(..., engine="ray")` (index.py) runs `run_ray_stages` inside its generation; the generation, the two
writers (spans.write_span_index, passage_index.write_passage_index, through index.write_index_files), the manifest
and the commit are the local build's own code. What runs on Ray:

1) read, tokenize, chunk: one task per block of files; each file is read by chunking.read_documents (so its errors
   are the local build's one-line errors), each document tokenized and cut by chunking's functions -> one row per
   passage (a document without passages leaves one row without tokens, so that it is still counted). The driver
   numbers documents and passages from the key columns (file, doc, chunk), as the local build reads them, so no
   later decision depends on how rows were partitioned.
2) near-duplicates: MinHash signatures (dedup.minhash_signatures, datasketch's permutations), one row per
   (passage, LSH band) grouped by a hash bucket of the band's values (b, r from the LSH index the local build
   uses), candidate pairs confirmed inside their group by the local rule (signature agreement >= threshold); then,
   on the driver, in passage order, the first copy wins: dedup.find_near_duplicates' decisions exactly.
3) span order: a range-partitioned sort. Seeded sample keys cut the order into key ranges of about equal size;
   each token position gets its range in a map, a groupby on the range moves (range, position) rows, and each range
   is sorted by its full keys (the reversed 16-token window, then the position) in one task: spans.
   build_suffix_order's order, handed to the writer range by range.
4) embeddings (Ray tasks and actors, not Ray Data, so that the build owns its actors' lifetime): a sentence
   encoder runs in an actor pool, one actor per cluster CPU, killed as soon as every batch is done (or failed);
   the hashed embedder, which loads nothing, in plain tasks, its IDF from document frequencies counted by tasks and
   summed (whole numbers: the sum is exact). The vectors stay in Ray's object store until the writer reads them.
The driver lays out the stream and the passage store (index.lay_out_passages, save_passages), as the local build
does, so it needs the memory the local build needs for them.

Every dataset a stage runs is iterated to its end before the next stage starts, and the embedding actors are
killed explicitly: Ray Data's own actor pool only drops its references when its execution ends, and its actors
went on holding both CPUs of a 2-CPU Ray for ~12 s after each build (long enough to stall the next build's tasks,
and, with several builds in one session, to hang them). Shuffles (groupby, sort) use the sort-based shuffle: Ray
Data's default one starts aggregator actors and costs ~10 s per shuffle on a 2-core machine, this one < 1 s.

Statistics: besides each stage's wall seconds, the build records per stage the rows and bytes that went in and
out, the summed wall seconds of its tasks and, for the two shuffles (the dedup's groupby, the span sort), the bytes
shuffled: Ray Data's own figures (its executed plan's per-operator metrics) where a stage is a Ray Data dataset,
the driver's counts elsewhere. They reach the manifest as `build_stats`, from which docs/corpus.md projects a
cluster.

Test-only: REFDECODE_TEST_RAY_FAIL=STAGE (one of STAGES) makes that stage's task code raise, so tests can check
that a failed task fails the build cleanly. The driver reads it when it makes a stage's task functions, which carry
the decision (an environment for the tasks would make Ray start fresh worker processes for them).

Knows: Ray Data, how each stage is expressed on it, how Ray's errors are turned back into the local build's.
Does not know: file formats or chunking (chunking.py), the files' layout (spans.py, passage_index.py), the manifest
(index.py). ray is imported when a Ray build runs, never by `import refdecode`.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .chunking import Chunk, chunk_document, read_documents, tokenize_documents
from .dedup import NUM_PERM, lsh_bands, minhash_signatures, permutations
from .embedding import Embedder, HashedNgramEmbedder, make_embedder
from .extra import require
from .index import StageResult, lay_out_passages, save_passages, vocab_size, write_index_files
from .spans import DEPTH, _key_dtypes, _position_dtype, encode_stream

__all__ = [
    "FAIL_ENV",
    "STAGES",
    "dataset_figures",
    "dedup_on_ray",
    "embedding_blocks",
    "ray_session",
    "run_ray_stages",
    "sorted_span_blocks",
]

FAIL_ENV = "REFDECODE_TEST_RAY_FAIL"  # test-only: the stage whose tasks raise
STAGES = ("read", "minhash", "candidates", "span_keys", "span_sort", "embed")
_TOKENIZE_BATCH = 64  # documents per tokenizer call, as in the local build
_EMBED_BATCH = 64  # passages per embedding call
_SPAN_ROWS = 1 << 20  # positions per block of the span sort's input
_RANGE_ROWS = 1 << 24  # positions per key range of the span sort: what one task sorts in memory
_RANGE_SAMPLES = 1024  # sampled keys per key range, whose quantiles cut the ranges
_TAG = "@@refdecode-error@@"  # brackets a task error inside Ray's wrapped text (no whitespace: Ray strips it)
_ERROR_TYPES: dict[str, type[Exception]] = {
    t.__name__: t for t in (ValueError, OSError, FileNotFoundError, RuntimeError, ImportError, UnicodeError)
}


# -- errors: a task's error comes back as the local build raises it ---------------------------------------------------


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _injected(stage: str) -> bool:
    """Whether the test-only failure is asked for `stage`: read on the driver."""
    return os.environ.get(FAIL_ENV) == stage


def _task(stage: str, fn: Callable, *, inject: bool | None = None) -> Callable:
    """`fn` as a task body of `stage`: any error crosses Ray's wrapping with its type and first line tagged, for
    _local_error on the driver. Whether the test failure is injected is decided where this is called (None: by
    _injected, so call it on the driver) and travels with the function: an environment for the tasks would make Ray
    start fresh worker processes for them."""
    inject = _injected(stage) if inject is None else inject

    def body(*args, **kwargs):
        try:
            if inject:
                raise RuntimeError(f"injected failure in the Ray stage {stage!r} ({FAIL_ENV}, for tests only)")
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - every error crosses the task boundary, tagged
            raise RuntimeError(f"{_TAG}{type(e).__name__}{_TAG}{_first_line(e)}{_TAG}") from None

    return body


def _local_error(err: BaseException) -> Exception:
    """The error a task raised, as the local build would raise it (its type, its one line); any other failure of
    Ray (a lost node, a cluster it cannot reach) as one RuntimeError line."""
    tagged = re.findall(f"{_TAG}(\\w+){_TAG}(.*?){_TAG}", str(err), flags=re.DOTALL)
    if tagged:
        name, message = tagged[-1]
        return _ERROR_TYPES.get(name, RuntimeError)(message)
    return RuntimeError(f"the Ray build failed: {_first_line(err)}")


# -- Ray itself -------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def ray_session(address: str | None = None, *, progress: bool = True) -> Iterator:
    """Ray for one build. A Ray this process already started is used as it is and left running; otherwise join
    the cluster at `address` ("auto", "HOST:PORT", "ray://HOST:PORT"), or with None start a local Ray on this
    machine's cores (no dashboard, loopback only), and shut it down at the end. Inside, Ray Data keeps block order
    and uses the sort-based shuffle; progress bars as `progress` says. Its settings are restored after. -> ray"""
    ray = require("ray")
    started = False
    if not ray.is_initialized():
        quiet = {} if progress else {"logging_level": logging.WARNING, "log_to_driver": False}
        try:
            if address is None:
                ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", **quiet)
            else:
                ray.init(address=address, **quiet)
        except Exception as e:  # noqa: BLE001 - ConnectionError, ValueError, RuntimeError: all one line
            where = f"join the Ray cluster at {address}" if address else "start a local Ray"
            raise RuntimeError(f"cannot {where}: {_first_line(e)}") from None
        started = True
    ctx = ray.data.DataContext.get_current()
    saved = {name: getattr(ctx, name) for name in ("enable_progress_bars", "shuffle_strategy")}
    saved_order = ctx.execution_options.preserve_order
    data_log = logging.getLogger("ray.data")
    saved_level = data_log.level
    ctx.enable_progress_bars = progress
    ctx.execution_options.preserve_order = True  # blocks come back in passage order and in sort order
    ctx.shuffle_strategy = ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    if not progress:
        # quiet: a task's error is raised as the build's one line; Ray Data's ERROR lines would only repeat it
        data_log.setLevel(logging.CRITICAL)
    try:
        yield ray
    finally:
        for name, value in saved.items():
            setattr(ctx, name, value)
        ctx.execution_options.preserve_order = saved_order
        data_log.setLevel(saved_level)
        if started:
            ray.shutdown()


def _cpus(ray) -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _blocks_for(ray, rows: int, per_block: int) -> int:
    """Blocks for `rows` rows: two per CPU so every CPU has work, more when blocks would exceed `per_block` rows."""
    return max(1, min(max(rows, 1), max(2 * _cpus(ray), -(-rows // per_block))))


def _from_table(ray, table, blocks: int):
    """A dataset of `table` in `blocks` slices, made on the driver: no task has to run (or wait for a CPU) to cut
    it."""
    step = max(1, -(-table.num_rows // max(blocks, 1)))
    return ray.data.from_arrow([table.slice(lo, step) for lo in range(0, max(table.num_rows, 1), step)])


def _nodes(ray) -> int:
    return max(1, sum(1 for node in ray.nodes() if node.get("Alive")))


_SHUFFLES = ("Sort", "Aggregate", "Repartition", "RandomShuffle", "HashShuffle", "HashAggregate")  # all-to-all ops


def dataset_figures(ds) -> dict:
    """Ray Data's own figures for a dataset iterated to its end, from its executed plan's per-operator metrics:
    rows and bytes into its first operator and out of its last, the bytes into its all-to-all operators (a sort's
    or a groupby's shuffle: every row crosses it, over the network on a cluster) and the summed wall seconds of
    its tasks. Nothing is materialized for them. {} where this Ray Data keeps none.
    -> {rows_in, bytes_in, rows_out, bytes_out, shuffle_bytes, task_seconds}"""
    try:
        node = ds.get_stats_summary()
    except Exception:  # noqa: BLE001 - a developer API of Ray Data: without it the figures are left out, not the build
        return {}
    ops = []
    while node is not None:
        if node.extra_metrics:  # an executed operator (the chain starts with the input's own, empty, stats)
            ops.append(node)
        node = node.parents[0] if node.parents else None
    if not ops:
        return {}
    ops.reverse()  # in execution order
    first, last = ops[0].extra_metrics, ops[-1].extra_metrics
    shuffles = [op for op in ops if (op.base_name or "").split("->")[-1].split("(")[0] in _SHUFFLES]
    seconds = [s.wall_time.sum for op in ops for s in op.operators_stats if s.wall_time is not None]
    return {
        "rows_in": int(first.get("num_row_inputs_received", 0)),
        "bytes_in": int(first.get("bytes_inputs_received", 0)),
        "rows_out": int(last.get("row_outputs_taken", 0)),
        "bytes_out": int(last.get("bytes_outputs_taken", 0)),
        "shuffle_bytes": sum(int(op.extra_metrics.get("bytes_inputs_received", 0)) for op in shuffles),
        "task_seconds": float(sum(seconds)),
    }


def _collect(ds, names: list[str]) -> dict[str, np.ndarray]:
    """Columns of a dataset on the driver, in the dataset's order, iterated to its end."""
    parts: dict[str, list] = {n: [] for n in names}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for n in names:
            parts[n].append(batch[n])
    return {n: np.concatenate(v) if v else np.zeros(0) for n, v in parts.items()}


# -- 1) read, tokenize, chunk -----------------------------------------------------------------------------------------

_PASSAGE_COLUMNS = ("file", "doc", "chunk", "doc_tokens", "t0", "t1", "c0", "c1")


def _read_and_chunk(batch: dict, *, field: str, tokenizer, chunk_tokens: int):
    """A block of files -> one row per passage: keys (file, doc, chunk), the document's source and token count,
    token and character ranges in the document, the passage's token ids (int32 bytes) and exact text. A document
    without passages keeps one row with chunk -1."""
    import pyarrow as pa

    cols: dict[str, list] = {k: [] for k in (*_PASSAGE_COLUMNS, "source", "tokens", "text")}

    def add(keys: tuple, source: str, ids: bytes, text: str) -> None:
        for key, value in zip(_PASSAGE_COLUMNS, keys, strict=True):
            cols[key].append(value)
        cols["source"].append(source)
        cols["tokens"].append(ids)
        cols["text"].append(text)

    for f, path in zip(batch["file"].tolist(), batch["path"].tolist(), strict=True):
        docs = list(read_documents([Path(path)], field=field))
        for lo in range(0, len(docs), _TOKENIZE_BATCH):
            part = docs[lo : lo + _TOKENIZE_BATCH]
            encoded = tokenize_documents(tokenizer, [doc.text for doc in part])
            for d, doc, (ids, starts) in zip(range(lo, lo + len(part)), part, encoded, strict=True):
                arr = np.asarray(ids, dtype=np.int32)
                chunks = chunk_document(0, doc.text, starts, chunk_tokens)
                for k, c in enumerate(chunks):
                    keys = (f, d, k, arr.size, c.token_start, c.token_end, c.char_start, c.char_end)
                    add(
                        keys,
                        doc.source,
                        arr[c.token_start : c.token_end].tobytes(),
                        doc.text[c.char_start : c.char_end],
                    )
                if not chunks:
                    add((f, d, -1, arr.size, 0, 0, 0, 0), doc.source, b"", "")
    table = {k: pa.array(cols[k], pa.int64()) for k in _PASSAGE_COLUMNS}
    table["source"] = pa.array(cols["source"], pa.large_string())
    table["tokens"] = pa.array(cols["tokens"], pa.large_binary())
    table["text"] = pa.array(cols["text"], pa.large_string())
    return pa.table(table)


# -- 2) near-duplicates -------------------------------------------------------------------------------------------


def _band_rows(batch: dict, *, perm: tuple[np.ndarray, np.ndarray], b: int, r: int, buckets: int) -> dict:
    """Passages -> one row per (passage, band) in the bucket a hash of (band, its r values) picks, so that LSH
    candidates of each other share a bucket. -> bucket, band, pid (R,), sig (R, NUM_PERM) uint32"""
    pid = batch["pid"].astype(np.int64)
    if pid.size == 0:
        empty = np.zeros(0, np.int64)
        return {"bucket": empty, "band": empty, "pid": empty, "sig": np.zeros((0, NUM_PERM), np.uint32)}
    sig = minhash_signatures([np.frombuffer(t, dtype=np.int32).astype(np.int64) for t in batch["tokens"]], perm)
    keys = np.empty((b, pid.size), dtype=np.uint64)
    with np.errstate(over="ignore"):  # FNV-style mixing wraps by design
        for i in range(b):
            h = np.full(pid.size, 1469598103934665603 ^ i, dtype=np.uint64)
            for value in sig[:, i * r : (i + 1) * r].T.astype(np.uint64):
                h = (h ^ value) * np.uint64(1099511628211)
            keys[i] = h
    return {
        "bucket": (keys.ravel() % np.uint64(buckets)).astype(np.int64),
        "band": np.repeat(np.arange(b, dtype=np.int64), pid.size),
        "pid": np.tile(pid, b),
        "sig": np.tile(sig, (b, 1)),
    }


def _confirmed_pairs(group: dict, *, r: int, threshold: float) -> dict:
    """One bucket's rows -> pairs (a < b) equal on all r values of one band (LSH candidates, exactly: whatever
    else the hash put in the bucket is told apart here) whose signatures agree on >= threshold of their values."""
    pid, band, sig = group["pid"].astype(np.int64), group["band"].astype(np.int64), group["sig"]
    firsts, seconds = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    if pid.size > 1:
        values = np.take_along_axis(sig, band[:, None] * r + np.arange(r)[None, :], axis=1)  # (G, r)
        _, which, sizes = np.unique(np.column_stack([band, values]), axis=0, return_inverse=True, return_counts=True)
        which = which.ravel()
        for g in np.flatnonzero(sizes > 1).tolist():
            rows = np.flatnonzero(which == g)
            for lo in range(0, rows.size, 256):  # bounded work arrays for a large group
                part = rows[lo : lo + 256]
                agree = (sig[part][:, None, :] == sig[rows][None, :, :]).mean(axis=-1)  # (p, G_g)
                i, j = np.nonzero(agree >= threshold)
                a, b = pid[part][i], pid[rows][j]
                firsts.append(a[a < b])
                seconds.append(b[a < b])
    return {"a": np.concatenate(firsts), "b": np.concatenate(seconds)}


def _first_copy_wins(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Passages in order: one is dropped when an earlier *kept* passage is a confirmed candidate of it (what
    find_near_duplicates does with its LSH index of kept passages). -> dropped (D,) int64, ascending"""
    earlier: dict[int, list[int]] = {}
    pairs = np.unique(np.column_stack([b, a]), axis=0).tolist() if a.size else []
    for later, first in pairs:
        earlier.setdefault(later, []).append(first)
    keep = np.ones(n, dtype=bool)
    for later in sorted(earlier):
        if any(keep[first] for first in earlier[later]):
            keep[later] = False
    return np.flatnonzero(~keep).astype(np.int64)


def dedup_on_ray(passages, n_passages: int, *, threshold: float, stats: dict | None = None) -> np.ndarray:
    """dedup.find_near_duplicates over a dataset of passages (columns pid (0..n-1), tokens: int32 bytes), in any
    order and any blocks. Call it inside ray_session, with a dataset made there (a dataset keeps the Ray Data
    settings of where it was made). stats: filled with the stage's dataset_figures (rows out: candidate pairs).
    -> dropped pids (D,) int64, ascending"""
    ray = require("ray")
    b, r = lsh_bands(threshold)
    buckets = _blocks_for(ray, n_passages * b, 1 << 20)  # a few large groups: Ray Data pays ms per group
    bands = passages.select_columns(["pid", "tokens"]).map_batches(
        _task("minhash", _band_rows),
        fn_kwargs={"perm": permutations(), "b": b, "r": r, "buckets": buckets},
        batch_format="numpy",
    )
    pairs = bands.groupby("bucket", num_partitions=buckets).map_groups(
        _task("candidates", _confirmed_pairs),
        fn_kwargs={"r": r, "threshold": threshold},
        batch_format="numpy",
    )
    edges = _collect(pairs, ["a", "b"])
    if stats is not None:
        stats.update(dataset_figures(pairs))
    return _first_copy_wins(n_passages, edges["a"].astype(np.int64), edges["b"].astype(np.int64))


# -- 3) span order ----------------------------------------------------------------------------------------------------


def _order_keys(stream: np.ndarray, e: np.ndarray) -> np.ndarray:
    """The span order's sort key of each position e: its reversed window of DEPTH tokens, then e, big-endian, as one
    fixed-width byte string, so that byte order is (window, position) order and no two positions tie.
    (B,) -> (B,) S40 (uint16 streams) or S72"""
    be, _, _ = _key_dtypes(stream.dtype)
    width = DEPTH + 8 // be.itemsize
    out = np.empty((e.size, width), dtype=be)
    for j in range(DEPTH):  # one gather per column: much cheaper than a (B, DEPTH) fancy index
        out[:, j] = np.take(stream, np.maximum(e - j, 0))  # before the start: stream[0], the separator 0
    out[:, DEPTH:] = e.astype(">u8").view(be).reshape(e.size, width - DEPTH)
    return out.view(f"S{width * be.itemsize}").ravel()


def _positions(stream: np.ndarray, e: np.ndarray, followed_only: bool) -> np.ndarray:
    """The positions among e that the span order holds: tokens, not separators (and followed by a token)."""
    e = e[stream[e] != 0]
    return e[stream[e + 1] != 0] if followed_only else e


def _range_bounds(stream: np.ndarray, ranges: int, followed_only: bool) -> np.ndarray:
    """Keys that cut the span order into `ranges` key ranges of about equal size: quantiles of the keys of a seeded
    sample of positions (_RANGE_SAMPLES a range), so the same stream always gets the same cuts. The keys hold the
    position, so a run of equal windows, however long, is cut too. -> (<= ranges - 1,) sorted, distinct keys"""
    if ranges <= 1:
        return _order_keys(stream, np.zeros(0, np.int64))
    picks = np.random.default_rng(0).integers(1, stream.size - 1, size=min(stream.size, ranges * _RANGE_SAMPLES))
    keys = np.unique(_order_keys(stream, _positions(stream, np.unique(picks), followed_only)))
    cuts = (np.arange(1, ranges) * keys.size) // ranges
    return np.unique(keys[cuts[cuts < keys.size]])


def _range_rows(batch: dict, *, stream_box: list, followed_only: bool, bounds: np.ndarray) -> dict:
    """Positions -> the span order's ones, each with the key range it falls in (the number of bounds <= its key)."""
    ray = require("ray")
    stream = ray.get(stream_box[0])  # boxed in a list so that Ray passes the reference, fetched once per task
    e = _positions(stream, batch["id"].astype(np.int64), followed_only)
    key_range = np.searchsorted(bounds, _order_keys(stream, e), side="right") if bounds.size else np.zeros(e.size)
    return {"range": key_range.astype(np.int32), "pos": e.astype(_position_dtype(stream.size, None))}


def _sort_range(group: dict, *, stream_box: list) -> dict:
    """One key range's positions -> sorted by (reversed window, position)."""
    ray = require("ray")
    stream = ray.get(stream_box[0])
    e = group["pos"].astype(np.int64)
    order = np.argsort(_order_keys(stream, e))
    return {"range": group["range"], "pos": group["pos"][order]}  # one range: its column is constant


@contextlib.contextmanager
def _object_store_budget(ray, nbytes: int) -> Iterator[None]:
    """Datasets made inside plan their operators' object-store use against a budget of at least `nbytes`.

    Ray Data budgets half the object store by default and runs an operator whose queued inputs exceed its share
    one task at a time. Behind a groupby (an all-to-all operator, which materializes every row it moves, spilling
    what the store cannot hold) the whole shuffle waits as the next operator's input, so past the store's size the
    per-range sort ran on one CPU while the others idled (1B tokens: ~20 of 29 minutes). Memory stays bounded
    without that budget: the store's size is fixed and it spills to disk, and a task's own memory is bounded by the
    work it is given, one task per CPU. A dataset keeps the context it was made under, so the override is scoped."""
    ctx = ray.data.DataContext.get_current()
    saved = ctx.override_object_store_memory_limit_fraction
    store = float(ray.cluster_resources().get("object_store_memory", 0))
    default = saved if saved is not None else 0.5  # Ray Data's default share of the store
    if store > 0:
        ctx.override_object_store_memory_limit_fraction = max(default, nbytes / store)
    try:
        yield
    finally:
        ctx.override_object_store_memory_limit_fraction = saved


def sorted_span_blocks(
    stream: np.ndarray,
    *,
    followed_only: bool = False,
    blocks: int | None = None,
    ranges: int | None = None,
    stats: dict | None = None,
) -> Iterator:
    """spans.build_suffix_order(stream, followed_only=...) as a range-partitioned sort on Ray Data, in consecutive
    blocks of positions; iterate it to the end (the writer does).

    Bounds cut the order into key ranges (_range_bounds); a map over the positions gives each its range; a groupby
    on the range moves only (range, position) rows, 8 bytes a token below 2**32 tokens, not the 40-72 bytes of
    the keys; each range is then sorted by its full keys in one task, from the stream every task reads from the
    object store. A range is the size of a partition's sort in memory (_RANGE_ROWS positions, ~1 GB of work
    arrays), whatever the corpus's size. ranges: how many (None: enough for that size, and two per CPU).
    stats: filled with the sort's dataset_figures once the last block is out (shuffle bytes: the rows grouped).
    -> Iterator of (B,) uint32 arrays (int64 for a stream of 2**32 tokens or more)"""
    ray = require("ray")
    n = stream.size
    if ranges is None:
        ranges = max(-(-n // _RANGE_ROWS), min(2 * _cpus(ray), -(-n // _RANGE_SAMPLES)))
    bounds = _range_bounds(stream, max(1, ranges), followed_only)
    # a plain ndarray: numpy.memmap (a stream read from disk) is pickled, so every task's ray.get would copy it (1.4 s
    # for 1G tokens), where an ndarray's buffer is read in place from the object store
    box = [ray.put(np.asarray(stream))]
    row_bytes = 4 + _position_dtype(n, None).itemsize  # a (range, position) row, the groupby's and the sort's
    with _object_store_budget(ray, 2 * 2 * n * row_bytes):  # the rows grouped and the rows sorted, queued at once
        rows = ray.data.range(n, override_num_blocks=blocks or _blocks_for(ray, n, _SPAN_ROWS))
        rows = rows.map_batches(
            _task("span_keys", _range_rows),
            fn_kwargs={"stream_box": box, "followed_only": followed_only, "bounds": bounds},
            batch_format="numpy",
        )
        ordered = rows.groupby("range", num_partitions=bounds.size + 1).map_groups(
            _task("span_sort", _sort_range), fn_kwargs={"stream_box": box}, batch_format="numpy"
        )
    last = -1
    for batch in ordered.iter_batches(batch_size=None, batch_format="numpy"):
        if batch["pos"].size:
            if batch["range"][0] < last or np.any(np.diff(batch["range"]) < 0):
                raise RuntimeError("the Ray build's span sort returned its key ranges out of order")
            last = int(batch["range"][-1])
            yield batch["pos"]
    if stats is not None:
        # ray.data.range is a read operator: its inputs are its read tasks, not rows; what the key tasks read is
        # every position of the stream
        stats.update({**dataset_figures(ordered), "rows_in": int(n), "bytes_in": int(stream.nbytes)})


# -- 4) embeddings ----------------------------------------------------------------------------------------------------


def _timed(fn: Callable, *args) -> tuple:
    """fn(*args) and the wall seconds it took, for a task to report its own time. -> (result, seconds)"""
    t = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - t


def _fit_hashed(ray, texts: list[str], dim: int) -> tuple[np.ndarray, float]:
    """The hashed embedder's IDF from document frequencies counted by tasks over slices of the texts and summed:
    whole numbers, so the sum equals what fit() counts over all of them. -> ((dim,) float32, the tasks' seconds)"""
    count = ray.remote(num_cpus=1)(
        _task("embed", lambda part: _timed(HashedNgramEmbedder(dim).document_frequencies, part))
    )
    step = max(1, -(-len(texts) // (2 * _cpus(ray))))
    df, seconds = np.zeros(dim, dtype=np.float64), 0.0
    for part, took in ray.get([count.remote(texts[lo : lo + step]) for lo in range(0, len(texts), step)]):
        df += part
        seconds += took
    return HashedNgramEmbedder(dim).fit_counts(df, len(texts)).idf, seconds


def _embedder(config: dict, idf: np.ndarray | None) -> Embedder:
    if config["name"] == "hashed":
        return HashedNgramEmbedder(int(config["dim"]), idf)
    import torch

    torch.set_num_threads(1)  # one actor per CPU
    return make_embedder(config)


def _embed_batch(config: dict, idf: np.ndarray | None, texts: list[str]) -> tuple[np.ndarray, float]:
    """One batch embedded by a plain task: for the hashed embedder, which loads nothing.
    -> ((B, dim) float32, seconds)"""
    return _timed(lambda: _embedder(config, idf).embed(texts).astype(np.float32))


class _EmbedActor:
    """An actor holding one embedder, loaded once: batches of texts -> ((B, dim) float32, seconds)."""

    def __init__(self, config: dict, idf: np.ndarray | None, inject: bool):
        self.embedder = _task("embed", _embedder, inject=False)(config, idf)
        self.run = _task("embed", lambda texts: _timed(self._vectors, texts), inject=inject)

    def _vectors(self, texts: list[str]) -> np.ndarray:
        return self.embedder.embed(texts).astype(np.float32)

    def embed(self, texts: list[str]) -> tuple[np.ndarray, float]:
        return self.run(texts)


def embedding_blocks(
    texts: list[str],
    config: dict,
    *,
    idf: np.ndarray | None = None,
    actors: bool | None = None,
    stats: dict | None = None,
) -> Callable[[], Iterator[np.ndarray]]:
    """The passages' vectors, computed on Ray and left in its object store; returns when every batch is done.

    A sentence encoder runs in an actor pool (one actor per cluster CPU, each loading the encoder once); the
    hashed embedder (config {"name": "hashed", "dim"}, idf its weights) in plain tasks, as it loads nothing and
    an actor costs a fresh worker process. actors: force one or the other (tests). The actors are killed before
    this returns, whether the batches succeeded or not, so that none holds a CPU after its build.
    -> a callable returning a fresh iterator of (B, dim) float32 blocks in passage order (write_passage_index
    reads it twice for IVF-PQ); a batch's error is raised when its block is reached. stats: given
    task_seconds (the batches' summed wall seconds, each measured in its task) once the last block is out"""
    ray = require("ray")
    use_actors = config["name"] != "hashed" if actors is None else actors
    batches = [texts[lo : lo + _EMBED_BATCH] for lo in range(0, len(texts), _EMBED_BATCH)]
    idf_ref = ray.put(idf)
    pool: list = []
    try:
        if use_actors:
            actor = ray.remote(num_cpus=1)(_EmbedActor)
            inject = _injected("embed")  # on the driver: the actors' environment is not the driver's
            pool = [actor.remote(config, idf_ref, inject) for _ in range(min(_cpus(ray), max(len(batches), 1)))]
            pairs = [pool[i % len(pool)].embed.options(num_returns=2).remote(b) for i, b in enumerate(batches)]
        else:
            task = ray.remote(num_cpus=1, num_returns=2)(_task("embed", _embed_batch))
            pairs = [task.remote(config, idf_ref, batch) for batch in batches]
        refs = [vectors for vectors, _ in pairs]  # each batch: its vectors and, apart, its seconds (a few bytes)
        ray.wait(refs, num_returns=len(refs), fetch_local=False)  # every batch done or failed: the pool can go
    finally:
        for handle in pool:
            ray.kill(handle)
    dim = int(config["dim"])

    def blocks_in_order() -> Iterator[np.ndarray]:
        for ref, batch in zip(refs, batches, strict=True):
            vectors = ray.get(ref)
            if vectors.shape != (len(batch), dim):
                raise RuntimeError(f"the Ray build embedded a batch of {len(batch)} texts as {vectors.shape}")
            yield vectors
        if stats is not None:
            stats["task_seconds"] = float(sum(ray.get([seconds for _, seconds in pairs])))

    return blocks_in_order


# -- the whole build --------------------------------------------------------------------------------------------------


class _Clock:
    """Wall seconds per stage, every second charged to one: `timed` charges the time spent pulling a stage's blocks
    to that stage and the consumer's time between pulls to another."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._t
        self._t = now

    def timed(self, stage: str, blocks: Iterator, *, between: str) -> Iterator:
        while True:
            self.lap(between)
            try:
                item = next(blocks)
            except StopIteration:
                return
            finally:
                self.lap(stage)
            yield item


def run_ray_stages(
    folder: Path,
    files: list[Path],
    *,
    tokenizer,
    field: str,
    chunk_tokens: int,
    dedup_threshold: float,
    embedder: str,
    progress: bool,
    flat_limit: int,
    partition_entries: int,
    hashed_dim: int,
    compressed: str,
    address: str | None = None,
    blocks: int | None = None,
) -> StageResult:
    """The build's stages on Ray, writing into `folder` (a generation index.py commits). address: see
    ray_session. blocks: how many blocks each stage's input is cut into (None: from the cluster's CPUs); the
    index does not depend on it. A task's error is raised as the local build raises it, in one line."""
    ray_module = require("ray")
    failure: Exception | None = None
    try:
        with ray_session(address, progress=progress) as ray:
            return _run(
                ray,
                folder,
                files,
                tokenizer=tokenizer,
                field=field,
                chunk_tokens=chunk_tokens,
                dedup_threshold=dedup_threshold,
                embedder=embedder,
                layout={"flat_limit": flat_limit, "partition_entries": partition_entries, "compressed": compressed},
                hashed_dim=hashed_dim,
                blocks=blocks,
            )
    except ray_module.exceptions.RayError as e:
        failure = _local_error(e)
    except Exception as e:
        if _TAG not in str(e):  # ours, raised on the driver: as it is
            raise
        failure = _local_error(e)  # a task's error that reached us under another wrapper
    # raised outside the handler, after a collection: Ray's error and its traceback, whose frames hold the
    # datasets that were running, are not kept alive as this error's context
    gc.collect()
    raise failure


def _run(ray, folder, files, *, tokenizer, field, chunk_tokens, dedup_threshold, embedder, layout, hashed_dim, blocks):
    import pyarrow as pa

    clock = _Clock()
    stages: dict[str, dict] = {name: {} for name in ("tokenize_chunk", "dedup", "passages", "embed", "span_index")}
    # 1) read, tokenize, chunk: one task per block of files; then number documents and passages on the driver
    listing = pa.table({"file": np.arange(len(files), dtype=np.int64), "path": [str(p) for p in files]})
    read = _from_table(ray, listing, blocks or min(len(files), 4 * _cpus(ray))).map_batches(
        _task("read", _read_and_chunk),
        fn_kwargs={"field": field, "tokenizer": tokenizer, "chunk_tokens": chunk_tokens},
        batch_size=None,
        batch_format="numpy",
    )
    rows = _collect(read, [*_PASSAGE_COLUMNS, "source", "tokens", "text"])
    # what the tasks read is the files, not the listing Ray Data hands them
    stages["tokenize_chunk"] = {**dataset_figures(read), "bytes_in": sum(p.stat().st_size for p in files)}
    del read
    order = np.lexsort((rows["chunk"], rows["doc"], rows["file"]))  # the local build's reading order
    rows = {k: v[order] for k, v in rows.items()}
    first_of_doc = rows["chunk"] <= 0
    doc_sources = [str(s) for s in rows["source"][first_of_doc].tolist()]
    n_tokens = int(rows["doc_tokens"][first_of_doc].sum())
    real = rows["chunk"] >= 0
    rows = {k: v[real] for k, v in rows.items()}
    n_passages = int(real.sum())
    if n_passages == 0:
        raise ValueError("the corpus is empty: no document has any text")
    doc_of = np.cumsum(first_of_doc)[real] - 1  # each passage's document number
    clock.lap("tokenize_chunk")
    # 2) near-duplicates on Ray; the kept passages, in order, stay on the driver
    tokens = pa.array(rows["tokens"].tolist(), pa.large_binary())
    passages = pa.table({"pid": np.arange(n_passages, dtype=np.int64), "tokens": tokens})
    dropped = dedup_on_ray(
        _from_table(ray, passages, blocks or _blocks_for(ray, n_passages, 4096)),
        n_passages,
        threshold=dedup_threshold,
        stats=stages["dedup"],
    )
    del passages, tokens
    kept = np.setdiff1d(np.arange(n_passages), dropped).tolist()
    clock.lap("dedup")
    # the stream and the passage store, laid out as the local build lays them out
    t0, t1, c0, c1 = (rows[k].tolist() for k in ("t0", "t1", "c0", "c1"))
    chunks = [Chunk(int(doc_of[i]), t0[i], t1[i], c0[i], c1[i]) for i in kept]
    passage_tokens = [np.frombuffer(rows["tokens"][i], dtype=np.int32).astype(np.int64) for i in kept]
    texts = [str(rows["text"][i]) for i in kept]
    del rows
    run_tokens, ranges = lay_out_passages(chunks, passage_tokens)
    stream = encode_stream(run_tokens, vocab_size(tokenizer))
    del run_tokens, passage_tokens
    written = save_passages(folder, texts, ranges, [c.doc for c in chunks], doc_sources)
    text_bytes = sum(len(t.encode("utf-8")) for t in texts)
    stages["passages"] = _driver_figures(len(texts), text_bytes, len(texts), _file_bytes(folder, written))
    clock.lap("passages")
    # 3) the span order (streamed into the writer below) and 4) the embeddings (materialized first)
    emb: Embedder
    idf_seconds = 0.0
    if embedder == "hashed":
        emb = HashedNgramEmbedder(hashed_dim)
        emb.idf, idf_seconds = _fit_hashed(ray, texts, emb.dim)
    else:
        emb = make_embedder({"name": embedder})  # on the driver for its config and dim only: the actors embed
    idf = emb.idf if isinstance(emb, HashedNgramEmbedder) else None
    vector_blocks = embedding_blocks(texts, emb.config(), idf=idf, stats=stages["embed"])
    clock.lap("embed")
    span_order = sorted_span_blocks(stream, blocks=blocks, stats=stages["span_index"])
    span_blocks = clock.timed("span_index", span_order, between="write")  # the writer's own time: "write"
    names, span_counts, fields = write_index_files(
        folder, stream, span_blocks, vector_blocks, dim=emb.dim, n_passages=len(texts), **layout
    )
    written += names + emb.save(folder)
    clock.lap("write")
    embed_seconds = stages["embed"].get("task_seconds", 0.0) + idf_seconds
    stages["embed"] = _driver_figures(len(texts), text_bytes, len(texts), 4 * emb.dim * len(texts), embed_seconds)
    stages["write"] = _driver_figures(0, 0, 0, _file_bytes(folder, names))
    counts = {
        "files": len(files),
        "documents": len(doc_sources),
        "tokens": n_tokens,
        "passages": len(texts),
        "duplicates_removed": int(dropped.size),
        **span_counts,
    }
    stats = {"engine": "ray", "nodes": _nodes(ray), "cpus": _cpus(ray), "stages": _rounded(stages)}
    return StageResult(written, counts, emb.config(), clock.seconds, fields, stats)


def _driver_figures(rows_in: int, bytes_in: int, rows_out: int, bytes_out: int, task_seconds: float = 0.0) -> dict:
    """A stage's figures where the driver counts them (no Ray Data dataset to ask); task_seconds: the wall seconds
    its Ray tasks reported, 0 for work on the driver alone."""
    return {
        "rows_in": rows_in,
        "bytes_in": bytes_in,
        "rows_out": rows_out,
        "bytes_out": bytes_out,
        "shuffle_bytes": 0,
        "task_seconds": task_seconds,
    }


def _file_bytes(folder: Path, names: list[str]) -> int:
    return sum((folder / name).stat().st_size for name in names)


def _rounded(stages: dict[str, dict]) -> dict[str, dict]:
    return {
        stage: {k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}
        for stage, figures in stages.items()
    }
