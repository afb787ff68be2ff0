"""Building a corpus index on Ray Data: the local build's stages as Ray Data operations, the same index out.

`build_index(..., engine="ray")` (index.py) runs these stages inside its generation; the manifest and the commit
are index.py's, shared with the local build.

1) read: one task per block of files (list_files' order), read_documents on each file -> rows (file, doc, source,
   text); a file's errors are the local build's one-line errors.
2) tokenize + chunk (map_batches) -> one row per passage. The driver then numbers documents and passages from the
   small key columns (file, doc, chunk) in the local build's order, so every later decision is by passage number
   and none depends on how rows were partitioned.
3) MinHash signatures (map_batches): dedup.minhash_signatures with datasketch's permutations (seed 1, 128).
4) candidates (map_groups): one row per (passage, LSH band), b and r from the MinHashLSH the local build uses,
   bucketed by a hash of (band, its values); in a bucket, candidates are passages whose values in one band are
   equal; each candidate pair is confirmed there by signature agreement >= threshold (the local rule).
5) first copy wins, on the driver, in passage order over the confirmed pairs: the same dropped set as
   dedup.find_near_duplicates (which keeps a passage unless an earlier *kept* one is a confirmed candidate).
6) span order: for every non-separator position e of the stream, the reversed window stream[e], stream[e-1], ...
   (DEPTH tokens, 0 before the start) packed into uint64 key columns, the position last; `ds.sort` over them
   orders exactly as spans.build_suffix_order (ties by position), read back block by block in order.
7) embeddings: map_batches over an actor pool holding the encoder (one actor per cluster CPU), blocks of vectors
   in passage order; the hashed embedder's IDF comes from document frequencies summed over batches.
The stream (encode_stream's layout) and the passage store are assembled on the driver; `write_index_files` is the
one place that turns the sorted span blocks and the vector blocks into files.

Test-only: REFDECODE_TEST_RAY_FAIL=STAGE (read, tokenize, minhash, candidates, span_keys, embed) makes that stage's
user code raise, to test that a failed task fails the build cleanly. It is read inside the stage's task (the
driver forwards it to the tasks' environment).

Knows: Ray Data, the stages' order, how the span order is expressed as sort keys. Does not know: how files are
parsed or tokens chunked (chunking.py), what the index files hold beyond today's writer, the manifest (index.py).
ray is imported when a Ray build runs, never by `import refdecode`.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from .chunking import Chunk, chunk_document, read_documents, tokenize_documents
from .dedup import lsh_bands, minhash_signatures, permutations
from .embedding import Embedder, HashedNgramEmbedder, make_embedder
from .extra import require
from .index import StageResult, lay_out_passages, save_passages, vocab_size
from .spans import DEPTH, SpanIndex, build_samples, encode_stream

__all__ = [
    "FAIL_ENV",
    "STAGES",
    "dedup_on_ray",
    "embedding_blocks",
    "ray_session",
    "run_ray_stages",
    "sorted_span_blocks",
    "span_key_columns",
    "write_index_files",
]

FAIL_ENV = "REFDECODE_TEST_RAY_FAIL"  # test-only: the stage whose tasks raise
STAGES = ("read", "tokenize", "minhash", "candidates", "span_keys", "embed")
_TOKENIZE_BATCH = 64  # documents per tokenize task batch (as the local build's tokenizer calls)
_EMBED_BATCH = 64  # passages per embedding call
_ROWS_PER_BLOCK = 1 << 20  # span positions per block before sorting
_MARK = "\x1frefdecode-error\x1f"  # brackets an error's type and message inside Ray's wrapped error text
_ERRORS: dict[str, type[Exception]] = {
    e.__name__: e for e in (ValueError, OSError, FileNotFoundError, RuntimeError, ImportError, UnicodeError)
}


# -- errors and faults inside tasks ---------------------------------------------------------------------------------


def _guarded(stage: str, fn: Callable, *, inject: bool = True) -> Callable:
    """`fn` as a task body: it raises the test failure for `stage` when asked (and `inject`), and any error it
    raises travels inside Ray's wrapping with its type and one-line message marked, for _unwrap on the driver."""

    def run(*args, **kwargs):
        try:
            if inject and os.environ.get(FAIL_ENV) == stage:
                raise RuntimeError(f"injected failure in the Ray stage {stage!r} ({FAIL_ENV}, for tests only)")
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - every error crosses the task boundary, marked
            raise RuntimeError(f"{_MARK}{type(e).__name__}{_MARK}{_one_line(e)}{_MARK}") from None

    return run


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _unwrap(err: BaseException) -> Exception:
    """The error a Ray task raised, as the local build would have raised it (type and one-line message); any
    other failure of Ray's (a lost worker, an unreachable cluster) as one RuntimeError line."""
    found = re.findall(f"{_MARK}(\\w+){_MARK}(.*?){_MARK}", str(err), flags=re.DOTALL)
    if found:
        name, message = found[-1]
        return _ERRORS.get(name, RuntimeError)(message)
    return RuntimeError(f"the Ray build failed: {_one_line(err)}")


def _remote_args() -> dict:
    """Ray options for every stage's tasks: the test-only failure switch, forwarded into their environment (a
    cluster's workers were started without the driver's environment)."""
    stage = os.environ.get(FAIL_ENV)
    return {"runtime_env": {"env_vars": {FAIL_ENV: stage}}} if stage else {}


# -- Ray itself -------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def ray_session(address: str | None = None, *, progress: bool = True) -> Iterator:
    """Ray for one build: one already initialised in this process is used as it is and left running; otherwise
    join the cluster at `address` ("auto", "ray://HOST:PORT", "HOST:PORT"), or with None start a local Ray on
    this machine's cores; either is shut down at the end. Inside, Ray Data runs as the stages need it (order
    preserved, sort-based shuffles; progress bars as `progress` says); its settings are restored after. -> ray"""
    ray = require("ray")
    started = False
    if not ray.is_initialized():
        quiet = {} if progress else {"logging_level": logging.WARNING, "log_to_driver": False}
        try:
            if address is None:
                ray.init(num_cpus=os.cpu_count(), include_dashboard=False, **quiet)
            else:
                ray.init(address=address, **quiet)
        except Exception as e:  # noqa: BLE001 - ConnectionError, ValueError, RuntimeError: all one line
            where = f"join the Ray cluster at {address}" if address else "start a local Ray"
            raise RuntimeError(f"cannot {where}: {_one_line(e)}") from None
        started = True
    ctx = ray.data.DataContext.get_current()
    fields = ("enable_progress_bars", "print_on_execution_start", "shuffle_strategy")
    saved = {name: getattr(ctx, name) for name in fields}
    saved_order = ctx.execution_options.preserve_order
    data_log = logging.getLogger("ray.data")
    log_level = data_log.level
    ctx.enable_progress_bars = progress
    ctx.print_on_execution_start = progress
    ctx.execution_options.preserve_order = True  # batches come back in passage / sort order
    # the sort-based shuffle (groupby, sort): Ray's default shuffle starts aggregator actors first, which costs
    # ~10 s per shuffle on a small machine against < 1 s for this one
    ctx.shuffle_strategy = ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    if not progress:
        data_log.setLevel(logging.WARNING)
    try:
        yield ray
    finally:
        for name, value in saved.items():
            setattr(ctx, name, value)
        ctx.execution_options.preserve_order = saved_order
        data_log.setLevel(log_level)
        if started:
            ray.shutdown()


def _cluster_cpus(ray) -> int:
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _default_blocks(ray, rows: int, per_block: int) -> int:
    """Blocks for `rows` rows: enough for every CPU to work (x2), none much over `per_block` rows."""
    return max(1, min(max(rows, 1), max(2 * _cluster_cpus(ray), -(-rows // per_block))))


# -- 1) read, 2) tokenize and chunk ---------------------------------------------------------------------------------


def _read_files(batch: dict, *, field: str):
    """A block of files -> their documents. batch: file (F,) int, path (F,) str -> table of (file, doc, source, text)"""
    import pyarrow as pa

    out: dict[str, list] = {"file": [], "doc": [], "source": [], "text": []}
    for f, path in zip(batch["file"].tolist(), batch["path"].tolist(), strict=True):
        for d, doc in enumerate(read_documents([Path(path)], field=field)):
            out["file"].append(f)
            out["doc"].append(d)
            out["source"].append(doc.source)
            out["text"].append(doc.text)
    return pa.table(
        {
            "file": pa.array(out["file"], pa.int32()),
            "doc": pa.array(out["doc"], pa.int64()),
            "source": pa.array(out["source"], pa.string()),
            "text": pa.array(out["text"], pa.large_string()),
        }
    )


def _tokenize_chunk(batch: dict, *, tokenizer, chunk_tokens: int):
    """Documents -> their passages: keys (file, doc, chunk), token and character ranges in the document, the
    passage's token ids (int32 bytes) and exact text."""
    import pyarrow as pa

    texts = batch["text"].tolist()
    cols: dict[str, list] = {k: [] for k in ("file", "doc", "chunk", "t0", "t1", "c0", "c1", "tokens", "text")}
    for f, d, text, (ids, starts) in zip(
        batch["file"].tolist(), batch["doc"].tolist(), texts, tokenize_documents(tokenizer, texts), strict=True
    ):
        arr = np.asarray(ids, dtype=np.int32)
        for k, c in enumerate(chunk_document(0, text, starts, chunk_tokens)):
            for key, value in zip(cols, (f, d, k, c.token_start, c.token_end, c.char_start, c.char_end), strict=False):
                cols[key].append(value)
            cols["tokens"].append(arr[c.token_start : c.token_end].tobytes())
            cols["text"].append(text[c.char_start : c.char_end])
    ints = {"file": pa.int32(), "doc": pa.int64(), "chunk": pa.int32()}
    table = {k: pa.array(cols[k], ints.get(k, pa.int64())) for k in ("file", "doc", "chunk", "t0", "t1", "c0", "c1")}
    table["tokens"] = pa.array(cols["tokens"], pa.large_binary())
    table["text"] = pa.array(cols["text"], pa.large_string())
    return pa.table(table)


def _number(batch: dict, *, doc_base: np.ndarray, first_passage: np.ndarray) -> dict:
    """Global document and passage numbers (the local build's order) from the keys. -> batch + gdoc, pid"""
    gdoc = doc_base[batch["file"].astype(np.int64)] + batch["doc"]
    return {**batch, "gdoc": gdoc, "pid": first_passage[gdoc] + batch["chunk"]}


def _column(ds, names: list[str]) -> dict[str, np.ndarray]:
    """Columns of a (small) dataset on the driver, in the dataset's order."""
    parts: dict[str, list] = {n: [] for n in names}
    for batch in ds.select_columns(names).iter_batches(batch_size=None, batch_format="numpy"):
        for n in names:
            parts[n].append(batch[n])
    return {n: np.concatenate(v) if v else np.zeros(0) for n, v in parts.items()}


# -- 3), 4), 5) near-duplicates ---------------------------------------------------------------------------------------


def _signatures(batch: dict, *, perm: tuple[np.ndarray, np.ndarray]) -> dict:
    """Passages' token bytes -> MinHash signatures. -> pid (B,), sig (B, NUM_PERM) uint32"""
    tokens = [np.frombuffer(t, dtype=np.int32).astype(np.int64) for t in batch["tokens"]]
    return {"pid": batch["pid"], "sig": minhash_signatures(tokens, perm)}


def _band_rows(batch: dict, *, b: int, r: int, buckets: int) -> dict:
    """One row per (passage, band), in the bucket a hash of (band, its r values) picks: rows that may be LSH
    candidates of each other share a bucket. -> bucket, band, pid, sig"""
    sig = batch["sig"]  # (B, NUM_PERM) uint32
    n = sig.shape[0]
    keys = np.empty((b, n), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(b):
            h = np.full(n, 1469598103934665603 ^ i, dtype=np.uint64)
            for v in sig[:, i * r : (i + 1) * r].T.astype(np.uint64):
                h = (h ^ v) * np.uint64(1099511628211)
            keys[i] = h
    return {
        "bucket": (keys.ravel() % np.uint64(buckets)).astype(np.int64),
        "band": np.repeat(np.arange(b, dtype=np.int32), n),
        "pid": np.tile(batch["pid"], b),
        "sig": np.tile(sig, (b, 1)),
    }


def _confirmed_pairs(bucket: dict, *, r: int, threshold: float) -> dict:
    """One bucket's rows -> the pairs (a < b) with equal values in one band (the LSH candidates: exact, whatever
    the hash put together) whose signatures agree on >= threshold of their values. -> a, b"""
    pid, band, sig = bucket["pid"], bucket["band"], bucket["sig"]
    a_out, b_out = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    if pid.size > 1:
        cols = band[:, None] * r + np.arange(r)[None, :]  # (G, r) each row's band columns
        values = np.take_along_axis(sig, cols, axis=1)  # (G, r)
        _, same, sizes = np.unique(
            np.column_stack([band.astype(np.uint32), values]), axis=0, return_inverse=True, return_counts=True
        )
        same = same.ravel()
        for s in np.flatnonzero(sizes > 1).tolist():
            rows = np.flatnonzero(same == s)
            for lo in range(0, rows.size, 256):  # bounded work arrays for a large group
                part = rows[lo : lo + 256]
                agree = (sig[part][:, None, :] == sig[rows][None, :, :]).mean(axis=-1)  # (p, G_s)
                i, j = np.nonzero(agree >= threshold)
                first, second = pid[part][i], pid[rows][j]
                a_out.append(first[first < second])
                b_out.append(second[first < second])
    return {"a": np.concatenate(a_out).astype(np.int64), "b": np.concatenate(b_out).astype(np.int64)}


def _first_copy_wins(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Passages in order: one is dropped when an earlier kept one is a confirmed candidate of it. -> dropped (D,)"""
    keep = np.ones(n, dtype=bool)
    if a.size:
        pairs = np.unique(np.column_stack([b, a]), axis=0)  # sorted by the later passage
        later, starts = np.unique(pairs[:, 0], return_index=True)
        for i, lo, hi in zip(later.tolist(), starts.tolist(), [*starts[1:].tolist(), len(pairs)], strict=True):
            if keep[pairs[lo:hi, 1]].any():
                keep[i] = False
    return np.flatnonzero(~keep).astype(np.int64)


def dedup_on_ray(passages, n_passages: int, *, threshold: float) -> np.ndarray:
    """Near-duplicates among a dataset's passages (columns pid: 0..n_passages-1, tokens: int32 bytes), the same
    as dedup.find_near_duplicates over the passages in pid order, however the dataset is partitioned. Call it
    inside ray_session with a dataset made there (a dataset keeps the Ray Data settings it was made with).
    -> dropped pids (D,) int64, ascending"""
    ray = require("ray")
    b, r = lsh_bands(threshold)
    args = _remote_args()
    signatures = passages.select_columns(["pid", "tokens"]).map_batches(
        _guarded("minhash", _signatures), fn_kwargs={"perm": permutations()}, batch_format="numpy", **args
    )
    # a few large groups (buckets of band keys), not one per key: Ray Data's per-group overhead is milliseconds
    buckets = _default_blocks(ray, n_passages * b, 1 << 20)
    bands = signatures.map_batches(
        _guarded("minhash", _band_rows), fn_kwargs={"b": b, "r": r, "buckets": buckets}, batch_format="numpy"
    )
    pairs = bands.groupby("bucket", num_partitions=buckets).map_groups(
        _guarded("candidates", _confirmed_pairs),
        fn_kwargs={"r": r, "threshold": threshold},
        batch_format="numpy",
        **args,
    )
    edges = _column(pairs, ["a", "b"])
    return _first_copy_wins(n_passages, edges["a"].astype(np.int64), edges["b"].astype(np.int64))


# -- 6) span order ----------------------------------------------------------------------------------------------------


def span_key_columns(stream_dtype) -> tuple[int, int]:
    """(tokens per uint64 key column, columns) for a stream dtype: 4 x 16-bit or 2 x 32-bit tokens a column."""
    per = 4 if np.dtype(stream_dtype) == np.uint16 else 2
    return per, DEPTH // per


def _span_keys(batch: dict, *, stream_box: list, followed_only: bool) -> dict:
    """Positions -> their reversed windows packed into uint64 columns k0.. (most significant first), and pos."""
    ray = require("ray")
    stream = ray.get(stream_box[0])
    e = batch["id"].astype(np.int64)
    e = e[stream[e] != 0]
    if followed_only:
        e = e[stream[e + 1] != 0]
    window = np.take(stream, e[:, None] - np.arange(DEPTH)[None, :], mode="clip").astype(np.uint64)  # (B, DEPTH)
    per, ncols = span_key_columns(stream.dtype)
    bits = 64 // per
    out = {}
    for c in range(ncols):
        key = np.zeros(e.size, dtype=np.uint64)
        for j in range(per):
            key |= window[:, c * per + j] << np.uint64(bits * (per - 1 - j))
        out[f"k{c}"] = key
    out["pos"] = e
    return out


def sorted_span_blocks(stream: np.ndarray, *, followed_only: bool = False, blocks: int | None = None) -> Iterator:
    """The span index's suffix order (spans.build_suffix_order) as a Ray Data sort: blocks of positions, in
    order; their concatenation equals build_suffix_order(stream, followed_only=...). -> Iterator of (B,) arrays
    (uint32, or int64 for a stream of 4G tokens or more)"""
    ray = require("ray")
    _, ncols = span_key_columns(stream.dtype)
    index_dtype = np.uint32 if stream.size < 2**32 else np.int64
    n_blocks = blocks or _default_blocks(ray, stream.size, _ROWS_PER_BLOCK)
    keys = ray.data.range(stream.size, override_num_blocks=n_blocks).map_batches(
        _guarded("span_keys", _span_keys),
        fn_kwargs={"stream_box": [ray.put(stream)], "followed_only": followed_only},
        batch_format="numpy",
        **_remote_args(),
    )
    ordered = keys.sort([f"k{c}" for c in range(ncols)] + ["pos"])
    for batch in ordered.select_columns(["pos"]).iter_batches(batch_size=None, batch_format="numpy"):
        if batch["pos"].size:
            yield batch["pos"].astype(index_dtype)


# -- 7) embeddings ------------------------------------------------------------------------------------------------


def _document_frequencies(batch: dict, *, dim: int) -> dict:
    return {"df": HashedNgramEmbedder(dim).document_frequencies(batch["text"].tolist())[None, :]}  # (1, dim)


class _EmbedPassages:
    """An actor holding one encoder: batches of texts -> rows and vectors (B, dim) float32."""

    def __init__(self, config: dict, idf: np.ndarray | None):
        def load():
            if config["name"] == "hashed":
                return HashedNgramEmbedder(config["dim"], idf)
            import torch

            torch.set_num_threads(1)  # one actor per CPU
            return make_embedder(config)

        self.embedder = _guarded("embed", load, inject=False)()
        self.embed = _guarded("embed", self._embed)

    def _embed(self, batch: dict) -> dict:
        return {"row": batch["row"], "vector": self.embedder.embed(batch["text"].tolist()).astype(np.float32)}

    def __call__(self, batch: dict) -> dict:
        return self.embed(batch)


def embedding_blocks(texts: list[str], config: dict, *, idf: np.ndarray | None = None, blocks: int | None = None):
    """Passage vectors from an actor pool (one actor per cluster CPU), in passage order. config: the embedder's
    config ({"name": ..., "dim": ...}), idf: the hashed embedder's weights. -> Iterator of (B, dim) float32"""
    ray = require("ray")
    import pyarrow as pa

    n_blocks = blocks or _default_blocks(ray, len(texts), 4 * _EMBED_BATCH)
    # blocks made here, not by a repartition: a task that waits for a CPU the actors hold would never run
    table = pa.table({"row": np.arange(len(texts)), "text": pa.array(texts, pa.large_string())})
    step = -(-len(texts) // n_blocks)
    data = ray.data.from_arrow([table.slice(lo, step) for lo in range(0, len(texts), step)])
    vectors = data.map_batches(
        _EmbedPassages,
        fn_constructor_kwargs={"config": config, "idf": idf},
        batch_size=_EMBED_BATCH,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=_cluster_cpus(ray)),
        **_remote_args(),
    )
    done = 0
    for batch in vectors.iter_batches(batch_size=None, batch_format="numpy"):
        rows = batch["row"]
        if rows.size and not np.array_equal(rows, np.arange(done, done + rows.size)):
            raise RuntimeError("the Ray build returned embeddings out of passage order")  # preserve_order is on
        done += rows.size
        if rows.size:
            yield np.ascontiguousarray(batch["vector"], dtype=np.float32)
    if done != len(texts):
        raise RuntimeError(f"the Ray build embedded {done} of {len(texts)} passages")


def _fit_hashed(texts: list[str], dim: int) -> np.ndarray:
    """The hashed embedder's IDF from document frequencies summed over batches: equal to fit() on all texts."""
    ray = require("ray")
    import pyarrow as pa

    table = pa.table({"text": pa.array(texts, pa.large_string())})
    step = -(-len(texts) // _default_blocks(ray, len(texts), 1024))
    data = ray.data.from_arrow([table.slice(lo, step) for lo in range(0, len(texts), step)])
    counts = data.map_batches(_document_frequencies, fn_kwargs={"dim": dim}, batch_size=1024, batch_format="numpy")
    df = np.zeros(dim, dtype=np.float64)
    for batch in counts.iter_batches(batch_size=None, batch_format="numpy"):
        df += batch["df"].sum(axis=0)
    return HashedNgramEmbedder(dim).fit_counts(df, len(texts)).idf


# -- today's on-disk format --------------------------------------------------------------------------------------
# THE ONE FUNCTION THE FORMAT WORK REPLACES: write_span_index(folder, stream, span_blocks, ...) and
# write_passage_index(folder, vector_blocks, dim=..., n_total=..., ...) take these same iterators.


def write_index_files(
    folder: Path,
    stream: np.ndarray,
    span_blocks: Iterable[np.ndarray],
    vector_blocks: Iterable[np.ndarray],
    *,
    dim: int,
) -> tuple[list[str], dict[str, int]]:
    """Today's format from the sorted span blocks and the embedding blocks: the span arrays (the blocks
    concatenated into sa) and a faiss IndexFlatIP of the vectors. -> (file names, counts span_tokens, span_bytes)"""
    faiss = require("faiss")
    parts = list(span_blocks)
    sa = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32 if stream.size < 2**32 else np.int64)
    spans = SpanIndex(stream, sa, build_samples(stream, sa))
    files = spans.save(folder)
    index = faiss.IndexFlatIP(dim)
    for vectors in vector_blocks:
        index.add(vectors)
    faiss.write_index(index, str(folder / "passages.faiss"))
    return [*files, "passages.faiss"], {"span_tokens": spans.num_tokens, "span_bytes": spans.nbytes()}


# -- the whole build --------------------------------------------------------------------------------------------------


class _Clock:
    """Wall seconds per stage, including the time spent pulling a stage's blocks through an iterator."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._t
        self._t = now

    def timed(self, stage: str, blocks: Iterator) -> Iterator:
        while True:
            start = time.perf_counter()
            try:
                item = next(blocks)
            except StopIteration:
                return
            finally:
                self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
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
    address: str | None = None,
    blocks: int | None = None,
) -> StageResult:
    """The build's stages on Ray, writing into `folder` (a generation index.py commits). blocks: how many blocks
    each stage's input is cut into (None: from the cluster's CPUs); the index does not depend on it."""
    ray_mod = require("ray")
    failure: Exception | None = None
    try:
        with ray_session(address, progress=progress) as ray:
            return _run(ray, folder, files, tokenizer, field, chunk_tokens, dedup_threshold, embedder, blocks)
    except ray_mod.exceptions.RayError as e:
        failure = _unwrap(e)
    except Exception as e:
        if _MARK not in str(e):  # else a task's error that reached us under another wrapper
            raise
        failure = _unwrap(e)
    # raised outside the handler: Ray's error and its traceback (whose frames hold the running datasets and so
    # their actors and CPUs) are not kept alive as this error's context
    gc.collect()
    raise failure


def _run(ray, folder, files, tokenizer, field, chunk_tokens, dedup_threshold, embedder, blocks) -> StageResult:
    args = _remote_args()
    clock = _Clock()
    # 1) read: one task per block of files
    listing = ray.data.from_items(
        [{"file": i, "path": str(p)} for i, p in enumerate(files)],
        override_num_blocks=blocks or min(len(files), 4 * _cluster_cpus(ray)),
    )
    docs = listing.map_batches(
        _guarded("read", _read_files), fn_kwargs={"field": field}, batch_size=None, batch_format="numpy", **args
    ).materialize()
    keys = _column(docs, ["file", "doc", "source"])
    clock.lap("read")
    # 2) tokenize, chunk; number documents and passages in the local build's order (file, doc, chunk)
    chunked = docs.map_batches(
        _guarded("tokenize", _tokenize_chunk),
        fn_kwargs={"tokenizer": tokenizer, "chunk_tokens": chunk_tokens},
        batch_size=_TOKENIZE_BATCH,
        batch_format="numpy",
        **args,
    ).materialize()
    order = np.lexsort((keys["doc"], keys["file"]))
    doc_sources = [str(s) for s in keys["source"][order].tolist()]
    doc_base = np.concatenate([[0], np.cumsum(np.bincount(keys["file"].astype(np.int64), minlength=len(files)))])
    pkeys = _column(chunked, ["file", "doc", "t0", "t1"])
    n_passages = int(pkeys["file"].size)
    if n_passages == 0:
        raise ValueError("the corpus is empty: no document has any text")
    gdoc = doc_base[pkeys["file"].astype(np.int64)] + pkeys["doc"].astype(np.int64)
    first_passage = np.concatenate([[0], np.cumsum(np.bincount(gdoc, minlength=len(doc_sources)))])
    numbered = chunked.map_batches(
        _number, fn_kwargs={"doc_base": doc_base, "first_passage": first_passage}, batch_format="numpy"
    ).materialize()
    n_tokens = int((pkeys["t1"] - pkeys["t0"]).sum())
    clock.lap("tokenize_chunk")
    # 3-5) near-duplicates: signatures, band candidates, confirmation; first copy wins on the driver
    dropped = dedup_on_ray(numbered, n_passages, threshold=dedup_threshold)
    clock.lap("dedup")
    # the kept passages, in order, on the driver: the stream and the passage store are assembled here
    keep = np.ones(n_passages, dtype=bool)
    keep[dropped] = False
    kept = _column(_kept(numbered, keep), ["pid", "gdoc", "t0", "t1", "c0", "c1", "tokens", "text"])
    by_pid = np.argsort(kept["pid"])
    chunks = [
        Chunk(int(kept["gdoc"][i]), int(kept["t0"][i]), int(kept["t1"][i]), int(kept["c0"][i]), int(kept["c1"][i]))
        for i in by_pid.tolist()
    ]
    tokens = [np.frombuffer(kept["tokens"][i], dtype=np.int32).astype(np.int64) for i in by_pid.tolist()]
    texts = [str(kept["text"][i]) for i in by_pid.tolist()]
    run_tokens, ranges = lay_out_passages(chunks, tokens)
    stream = encode_stream(run_tokens, vocab_size(tokenizer))
    written = save_passages(folder, texts, ranges, [c.doc for c in chunks], doc_sources)
    clock.lap("passages")
    # 6, 7) span order and embeddings, both as blocks into the writer
    emb: Embedder
    if embedder == "hashed":
        emb = HashedNgramEmbedder()
        emb.idf = _fit_hashed(texts, emb.dim)
    else:
        emb = make_embedder({"name": embedder})  # on the driver only for its config and dim: actors embed
    clock.lap("embed")
    idf = emb.idf if isinstance(emb, HashedNgramEmbedder) else None
    span_blocks = clock.timed("span_index", sorted_span_blocks(stream, followed_only=False, blocks=blocks))
    vector_blocks = clock.timed("embed", embedding_blocks(texts, emb.config(), idf=idf, blocks=blocks))
    pulled = sum(clock.seconds.get(k, 0.0) for k in ("span_index", "embed"))
    files_out, span_counts = write_index_files(folder, stream, span_blocks, vector_blocks, dim=emb.dim)
    written += files_out + emb.save(folder)
    clock.lap("write")  # the writer's own time: the time it spent pulling blocks is the stages'
    clock.seconds["write"] -= sum(clock.seconds.get(k, 0.0) for k in ("span_index", "embed")) - pulled
    counts = {
        "files": len(files),
        "documents": len(doc_sources),
        "tokens": n_tokens,
        "passages": len(texts),
        "duplicates_removed": int(dropped.size),
        **span_counts,
    }
    return StageResult(written, counts, emb.config(), clock.seconds)


def _keep_rows(batch: dict, *, keep: np.ndarray) -> dict:
    mask = keep[batch["pid"]]
    return {k: v[mask] for k, v in batch.items()}


def _kept(numbered, keep: np.ndarray):
    """The kept passages' rows (the dropped never leave the cluster)."""
    return numbered.map_batches(_keep_rows, fn_kwargs={"keep": keep}, batch_format="numpy")
