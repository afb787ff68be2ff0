"""The passage index kinds as a corpus grows: build, recall and search time at several passage counts, on hashed
n-gram vectors of real text or on synthetic clustered vectors (docs/corpus.md, "Past one machine's memory").

    python -m scripts.bench_passage_scale [--passages 545k 5.2M] [--kinds fastscan ivfpq] [--vectors corpus]
                                          [--dim 256] [--queries 256] [--seed 0] [--out DIR]
        --vectors corpus:    [--chunk-chars N] [--cache ~/.cache/refdecode/passage-vectors] [--workers CPUS]
        --vectors synthetic: [--per-topic 64] [--noise 1.0]

A 1B-token corpus holds ~5.2M passages (the 100M-token build's 105.2M tokens made 544,642).

--vectors corpus (the default) makes the vectors `refdecode index build --embedder hashed --hashed-dim DIM` would
make from scripts/bench_index_build's corpus, without writing that corpus:
- texts: bench_index_build's `real_texts()` (Python docs, ACLSum papers, ShareGPT conversations), each once, then
  copies of them with ~10% of the words replaced (its `perturbed()`, with words of the first 2,000 texts, as its
  `write_corpus` makes them), pass after pass, each pass in its own seeded order;
- passages: each text cut by the library's own rules (`chunking.chunk_document`: at a section start, else at the
  last paragraph break within budget) with each character standing for a token, at most --chunk-chars characters
  (default: 256 tokens times bench_index_build's `chars_per_token` estimate for the smollm2-135m tokenizer). A
  simplification: cut by characters, a passage ends near where the build would end it, not exactly there;
- vectors: `HashedNgramEmbedder(--dim)` with its IDF fitted on the first min(n, FIT_PASSAGES) passages (the build
  fits it on all of them), made in --workers processes a unit at a time (UNIT_DOCS texts of one pass, drawn from
  their own seeds, so the vectors are the same whatever the number of workers). A vector that is zero (a passage
  with no word the embedder reads: Chinese text, a lone '}'; ~0.4%, which the build keeps) or equal to one kept
  before (a repeat, which the build's near-duplicate removal drops too) is dropped. Near repeats stay: a copy
  differs from its text by 10% of its words, which the build keeps (it would drop a few short pieces more);
- queries: the QUERY_POOL vectors kept after the first n (so none is one of the n); --queries takes the first.
They are made once per (n, dim, seed, chunk chars) into --cache as .npy files (written under a temporary name and
renamed when whole) and memory-mapped from there.

--vectors synthetic: unit vectors around n / --per-topic random topic centres (a corpus grows in topics as it
grows), each centre plus Gaussian noise of --noise times its norm, drawn block by block from the seed. They were
shown not to stand in for real vectors (the lists needed for recall@10 0.9 jump from 2 to 231 of 693 between two
noise levels; docs/LOG.md); kept to compare with.

Each size and kind goes through the library's own writer (`write_passage_index` with a flat limit below the
vectors' size: trained on a sample, nprobe (and fast-scan's k_factor) the smallest reaching recall@10 0.9 on
held-out vectors) and reader; the queries' exact top 10 is found by brute force over the vectors; search time is
one query at a time, as `retrieve` searches, without the query's embedding.

Knows: the two vector sources, timing, the table. Does not know the index's layout (refdecode.corpus.passage_index).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from refdecode.corpus.chunking import chunk_document
from refdecode.corpus.embedding import HashedNgramEmbedder
from scripts.bench_index_build import PeakRSS, parse_count, perturbed

BLOCK = 1 << 16  # vectors per block handed to the writer and to the exact search
KINDS = ("fastscan", "ivfpq")  # write_passage_index's `compressed` kinds
MANIFEST_KINDS = {"fastscan": "ivfpq_fastscan", "ivfpq": "ivfpq"}  # the kind each writes into its fields
CHUNK_TOKENS = 256  # the build's default passage budget
TOKENIZER = "smollm2-135m"  # whose characters per token make --chunk-chars' default
UNIT_DOCS = 256  # texts per unit of work: ~2,300 passages, about a tenth of a second to make and embed
FIT_PASSAGES = 200_000  # the hashed embedder's IDF is fitted on the first this many passages
QUERY_POOL = 1024  # held-out query vectors kept beside each vector file
STREAM_VERSION = 1  # in the cache's file names: raise it when the passages or vectors a seed makes change


class Synthetic:
    """n unit vectors of `dim`, clustered around n // per_topic topic centres; iterating yields (B, dim) float32
    blocks, the same ones every time."""

    def __init__(self, n: int, dim: int, per_topic: int, seed: int, noise: float = 1.0):
        self.n, self.dim, self.seed, self.noise = n, dim, seed, noise
        self.topics = _unit(np.random.default_rng([seed, 0]).standard_normal((max(1, n // per_topic), dim)))

    def __iter__(self):
        for number, start in enumerate(range(0, self.n, BLOCK)):
            yield self.draw(min(BLOCK, self.n - start), np.random.default_rng([self.seed, 1, number]))

    def draw(self, rows: int, rng: np.random.Generator) -> np.ndarray:
        """rows vectors of the distribution: a random topic centre plus noise of `noise` times its norm.
        -> (rows, dim)"""
        centres = self.topics[rng.integers(0, self.topics.shape[0], rows)]
        return _unit(centres + self.noise * _unit(rng.standard_normal((rows, self.dim)))).astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# -- vectors of real text ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PassageStream:
    """An endless, seeded stream of passages of real text, made a unit at a time so that a process can make any
    unit alone. Pass p takes every text once, in the order of a permutation drawn from the seed and p: as it is on
    pass 0, perturbed after. Unit k is UNIT_DOCS texts of one pass cut into passages of at most chunk_chars
    characters."""

    texts: list[str]
    words: list[str]  # what perturbed copies put in place of a word
    chunk_chars: int
    seed: int

    def passages(self, unit: int) -> list[str]:
        """The passages of unit `unit` (0, 1, ...), in stream order."""
        per_pass = -(-len(self.texts) // UNIT_DOCS)
        p, u = divmod(unit, per_pass)
        order = np.random.default_rng([self.seed, 3, p]).permutation(len(self.texts))
        rng = np.random.default_rng([self.seed, 4, p, u])
        out = []
        for j in order[u * UNIT_DOCS : (u + 1) * UNIT_DOCS].tolist():
            out += cut(self.texts[j] if p == 0 else perturbed(self.texts[j], self.words, rng), self.chunk_chars)
        return out


def cut(text: str, chunk_chars: int) -> list[str]:
    """A text's passages: the build's cutting rules (chunk_document) with each character standing for a token."""
    return [text[c.char_start : c.char_end] for c in chunk_document(0, text, np.arange(len(text)), chunk_chars)]


def replacement_words(texts: list[str]) -> list[str]:
    """The words perturbed copies put in, picked as bench_index_build's write_corpus picks them."""
    return sorted({w for t in texts[:2000] for w in t.split() if len(w) < 20})


def default_chunk_chars(texts: list[str], seed: int) -> int:
    """CHUNK_TOKENS times the characters per token of TOKENIZER on a seeded sample of the texts."""
    from refdecode.models import load_tokenizer
    from scripts.bench_index_build import chars_per_token

    return round(CHUNK_TOKENS * chars_per_token(load_tokenizer(TOKENIZER), texts, np.random.default_rng(seed)))


# What a worker makes, unit by unit. Each task returns the seconds it spent making text and embedding (or counting).

_stream: PassageStream | None = None  # this process's stream: set once in each worker (the pool's initializer)


def _adopt(stream: PassageStream | None) -> None:
    global _stream
    _stream = stream


def _frequencies(unit: int, dim: int, limit: int | None = None) -> tuple[int, np.ndarray, float, float]:
    """The hashed embedder's document frequencies over the unit's first `limit` passages (all when None).
    -> (passages counted, (dim,) float64, make seconds, count seconds)"""
    start = time.perf_counter()
    passages = _stream.passages(unit)[:limit]
    made = time.perf_counter()
    df = HashedNgramEmbedder(dim).document_frequencies(passages)
    return len(passages), df, made - start, time.perf_counter() - made


def _embedded(unit: int, embedder: HashedNgramEmbedder) -> tuple[np.ndarray, np.ndarray, float, float]:
    """The unit's passage vectors and a hash of each (equal vectors, equal hashes).
    -> ((P, dim) float32, (P,) uint64, make seconds, embed seconds)"""
    start = time.perf_counter()
    passages = _stream.passages(unit)
    made = time.perf_counter()
    vectors = embedder.embed(passages)  # (P, dim)
    keys = np.array([_key(v) for v in vectors], dtype=np.uint64)  # (P,)
    return vectors, keys, made - start, time.perf_counter() - made


def _key(vector: np.ndarray) -> int:
    return int.from_bytes(hashlib.blake2b(vector.tobytes(), digest_size=8).digest(), "little")


@contextmanager
def _workers(stream: PassageStream, workers: int) -> Iterator[Callable]:
    """submit(fn, *args) -> a callable that waits for fn(*args), run in one of `workers` processes (in this one
    when workers == 1)."""
    if workers == 1:
        _adopt(stream)
        try:
            yield lambda fn, *args: functools.partial(fn, *args)
        finally:
            _adopt(None)
        return
    with multiprocessing.Pool(workers, _adopt, (stream,)) as pool:
        yield lambda fn, *args: pool.apply_async(fn, args).get


def _in_order(submit: Callable, fn: Callable, *args, window: int) -> Iterator[tuple[int, tuple]]:
    """(unit, fn(unit, *args)) for unit 0, 1, ... without end, in order, with at most `window` units in flight."""
    pending: deque = deque()
    for unit in itertools.count():
        pending.append((unit, submit(fn, unit, *args)))
        if len(pending) >= window:
            done, result = pending.popleft()
            yield done, result()


def cache_paths(cache: Path, n: int, dim: int, seed: int, chunk_chars: int) -> tuple[Path, Path]:
    """(the vectors' file, the queries' file) for these settings."""
    stem = f"corpus-v{STREAM_VERSION}-n{n}-dim{dim}-seed{seed}-chunk{chunk_chars}"
    return cache / f"{stem}.npy", cache / f"{stem}-queries.npy"


def corpus_vectors(
    n: int, stream: PassageStream, *, dim: int, cache: Path, workers: int
) -> tuple[Path, Path, dict | None]:
    """The stream's first n kept vectors and the QUERY_POOL kept after them (see make_vectors), as .npy files in
    `cache`: made now unless both are there. A file appears under its name only whole (the queries' first, so the
    vectors' says both are).
    -> (vectors (n, dim) float32, queries (QUERY_POOL, dim) float32, how the making went or None when cached)"""
    vectors_path, queries_path = cache_paths(cache, n, dim, stream.seed, stream.chunk_chars)
    if vectors_path.exists() and queries_path.exists():
        return vectors_path, queries_path, None
    cache.mkdir(parents=True, exist_ok=True)
    partial = [p.with_name(f"{p.name}.partial-{os.getpid()}") for p in (vectors_path, queries_path)]
    try:
        stats = make_vectors(n, stream, dim=dim, workers=workers, vectors_out=partial[0], queries_out=partial[1])
        os.replace(partial[1], queries_path)
        os.replace(partial[0], vectors_path)
    finally:
        for p in partial:
            p.unlink(missing_ok=True)
    return vectors_path, queries_path, stats


def make_vectors(
    n: int, stream: PassageStream, *, dim: int, workers: int, vectors_out: Path, queries_out: Path
) -> dict:
    """The stream's passages embedded, in order, the kept ones (`_kept`) written as .npy float32: the first n into
    vectors_out, the next QUERY_POOL into queries_out.
    -> passages made, kept and dropped; seconds making text, counting, embedding (summed over the workers) and on
       the clock"""
    window = 2 * workers  # units in flight: every worker busy, results held for at most two units each
    made = {"make": 0.0, "count": 0.0, "embed": 0.0}  # seconds spent by the workers
    with _workers(stream, workers) as submit:
        # 1) the IDF from the first min(n, FIT_PASSAGES) passages; the unit crossing the limit is counted again, cut
        start = time.perf_counter()
        fit = min(n, FIT_PASSAGES)
        df, counted = np.zeros(dim), 0  # (dim,) float64
        for unit, (rows, unit_df, make_s, count_s) in _in_order(submit, _frequencies, dim, window=window):
            if counted + rows > fit:
                rows, unit_df, make_s, count_s = submit(_frequencies, unit, dim, fit - counted)()
            df, counted = df + unit_df, counted + rows
            made["make"], made["count"] = made["make"] + make_s, made["count"] + count_s
            if counted == fit:
                break
        embedder = HashedNgramEmbedder(dim).fit_counts(df, fit)  # = fit(the first `fit` passages)
        fit_wall = time.perf_counter() - start
        # 2) every passage embedded, in order; the kept ones fill the file, then the queries
        start = time.perf_counter()
        out = np.lib.format.open_memmap(vectors_out, mode="w+", dtype=np.float32, shape=(n, dim))
        seen: set[int] = set()  # the kept vectors' keys
        embedded, rows, queries, held = 0, 0, [], 0
        for unit, (vectors, keys, make_s, embed_s) in _in_order(submit, _embedded, embedder, window=window):
            made["make"], made["embed"] = made["make"] + make_s, made["embed"] + embed_s
            embedded += len(vectors)
            vectors = vectors[_kept(vectors, keys, seen)]  # (K, dim)
            take = min(len(vectors), n - rows)
            out[rows : rows + take] = vectors[:take]
            rows += take
            queries.append(vectors[take:])
            held += len(vectors) - take
            if held >= QUERY_POOL:
                break
            if unit % 100 == 99:
                print(f"  {rows:,} of {n:,} vectors", file=sys.stderr, flush=True)
        out.flush()
        del out
        with open(queries_out, "wb") as f:
            np.save(f, np.concatenate(queries)[:QUERY_POOL], allow_pickle=False)
    return {
        "workers": workers,
        "fit_passages": fit,
        "embedded_passages": embedded,
        "dropped_passages": embedded - n - held,
        "make_seconds": made["make"],
        "count_seconds": made["count"],
        "embed_seconds": made["embed"],
        "fit_wall_seconds": fit_wall,
        "embed_wall_seconds": time.perf_counter() - start,
    }


def _kept(vectors: np.ndarray, keys: np.ndarray, seen: set[int]) -> np.ndarray:
    """Which of a unit's vectors are kept: those that are not zero (a passage with no word the embedder reads:
    Chinese text, a lone '}') and equal no vector kept before; the kept ones' keys join `seen`.
    (P, dim), (P,) -> (P,) bool"""
    keep = np.linalg.norm(vectors, axis=1) > 0.5
    for i, key in enumerate(keys.tolist()):
        keep[i] = keep[i] and key not in seen
        if keep[i]:
            seen.add(key)
    return keep


# -- measuring -----------------------------------------------------------------------------------------------------


class Vectors(NamedTuple):
    """What an index is built and searched from."""

    blocks: Callable[[], Iterable[np.ndarray]]  # a fresh iterable of (B, dim) float32 blocks per call
    queries: np.ndarray  # (Q, dim) float32, none of them a row of the blocks
    about: dict  # where they come from, for results.json


def synthetic_vectors(n: int, args: argparse.Namespace) -> Vectors:
    vectors = Synthetic(n, args.dim, args.per_topic, args.seed, args.noise)
    # the held-out rows the writer draws are its business; queries here are fresh draws of the same distribution
    queries = vectors.draw(args.queries, np.random.default_rng([args.seed, 2]))
    return Vectors(vectors.__iter__, queries, {"source": "synthetic"})


def mapped_vectors(vectors_path: Path, queries_path: Path, count: int, about: dict) -> Vectors:
    """The cached corpus vectors, memory-mapped, in BLOCK-row slices; the first `count` queries."""
    vectors = np.load(vectors_path, mmap_mode="r")  # (n, dim)
    queries = np.load(queries_path)[:count]  # (count, dim)
    return Vectors(lambda: (vectors[i : i + BLOCK] for i in range(0, len(vectors), BLOCK)), queries, about)


def measure(n: int, kind: str, vectors: Vectors, exact: np.ndarray, args: argparse.Namespace, work: Path) -> dict:
    """Build an index of `kind` over the n vectors, load it and search it one query at a time.
    exact: (Q, 10) the queries' exact neighbours."""
    import faiss

    from refdecode.corpus.passage_index import read_passage_index, write_passage_index

    folder = work / f"passages-{n}-{kind}"
    folder.mkdir()
    rss = PeakRSS(os.getpid())
    start = time.perf_counter()
    _, fields = write_passage_index(
        folder, vectors.blocks, dim=args.dim, n_total=n, flat_limit_bytes=0, seed=args.seed, compressed=kind
    )
    build = time.perf_counter() - start
    rss.stop()
    info = fields["passage_index"]
    if info["kind"] != MANIFEST_KINDS[kind]:
        raise RuntimeError(f"asked write_passage_index for {kind!r}, it wrote {info['kind']!r}")
    index = read_passage_index(folder / "passages.faiss", info, args.dim, n, "bench")
    found, seconds = [], []
    for q in vectors.queries:
        t = time.perf_counter()
        found.append(index.search(q[None], 10)[1][0])
        seconds.append(time.perf_counter() - t)
    recall = float(np.mean([len(set(f.tolist()) & set(e.tolist())) / 10 for f, e in zip(found, exact, strict=True)]))
    sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
    return {
        "passages": n,
        "kind": kind,
        "build_seconds": build,
        "build_peak_rss_bytes": rss.peak,
        "index": info,
        "files_bytes": sizes,
        "fresh_queries": len(vectors.queries),
        "fresh_recall_at_10": recall,
        "search_median_ms": 1e3 * float(np.median(seconds)),
        "search_p90_ms": 1e3 * float(np.percentile(seconds, 90)),
        "threads": faiss.omp_get_max_threads(),
    }


def exact_top10(blocks: Iterable[np.ndarray], queries: np.ndarray) -> np.ndarray:
    """The queries' exact top 10 by inner product over every (B, dim) block, rows numbered across blocks.
    -> (Q, 10) ids"""
    best = np.full((len(queries), 10), -np.inf, dtype=np.float32)
    ids = np.full((len(queries), 10), -1, dtype=np.int64)
    start = 0
    for block in blocks:
        scores = np.concatenate((best, queries @ block.T), axis=1)
        cand = np.concatenate(
            (ids, np.broadcast_to(np.arange(block.shape[0]) + start, (len(queries), block.shape[0]))), 1
        )
        top = np.argpartition(-scores, 9, axis=1)[:, :10]
        best, ids = np.take_along_axis(scores, top, 1), np.take_along_axis(cand, top, 1)
        start += block.shape[0]
    return ids


def table(results: list[dict], args: argparse.Namespace) -> str:
    if args.vectors == "synthetic":
        source = (
            f"Synthetic unit vectors, {args.dim} dimensions, one topic per {args.per_topic} passages, noise "
            f"{args.noise} (seed {args.seed})"
        )
    else:
        source = (
            f"Hashed n-gram vectors ({args.dim} dimensions, IDF from the first {FIT_PASSAGES:,} passages at most) of "
            f"real text passages cut at {args.chunk_chars} characters, not tokens (~{CHUNK_TOKENS} tokens; a "
            f"simplification), texts then copies with 10% of words replaced (seed {args.seed}); queries are passages "
            "past the indexed ones"
        )
    lines = [
        f"{source}; the passage index kinds as `write_passage_index` writes them; search one query at a time.",
        "",
        "| passages | kind | nlist | m | nprobe | k_factor | recall@10 held-out (build) | recall@10 fresh queries "
        "| search median ms | p90 ms | build s | index + lists MB | flat would be MB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        i = r["index"]
        lines.append(
            f"| {r['passages']:,} | {r['kind']} | {i['nlist']} | {i['m']} | {i['nprobe']} | {i.get('k_factor', '-')} "
            f"| {i['recall_at_10']:.3f} | {r['fresh_recall_at_10']:.3f} | {r['search_median_ms']:.1f} "
            f"| {r['search_p90_ms']:.1f} | {r['build_seconds']:.0f} | {sum(r['files_bytes'].values()) / 1e6:.0f} "
            f"| {r['passages'] * args.dim * 4 / 1e6:.0f} |"
        )
    return "\n".join(lines) + "\n"


def prepare(sizes: list[int], args: argparse.Namespace) -> list[Vectors]:
    """Each size's vectors; corpus vectors are all made (or found in the cache) before any index is built, so the
    worker processes start before faiss does."""
    if args.vectors == "synthetic":
        return [synthetic_vectors(n, args) for n in sizes]
    from scripts.bench_index_build import real_texts

    texts, _ = real_texts()
    if args.chunk_chars is None:
        args.chunk_chars = default_chunk_chars(texts, args.seed)
    stream = PassageStream(texts, replacement_words(texts), args.chunk_chars, args.seed)
    out = []
    for n in sizes:
        print(f"{n:,} corpus passages: vectors ...", file=sys.stderr, flush=True)
        vectors_path, queries_path, stats = corpus_vectors(
            n, stream, dim=args.dim, cache=args.cache, workers=args.workers
        )
        if stats is not None:
            print(f"  {rates(stats)}", file=sys.stderr, flush=True)
        about = {"source": "corpus", "file": str(vectors_path), "made": stats}
        out.append(mapped_vectors(vectors_path, queries_path, args.queries, about))
    return out


def rates(stats: dict) -> str:
    """How fast corpus vectors were made: per worker for each step, and on the clock."""
    made, embedded = stats["fit_passages"] + stats["embedded_passages"], stats["embedded_passages"]
    return (
        f"text {made / stats['make_seconds']:,.0f} passages/s per worker, IDF counts "
        f"{stats['fit_passages'] / stats['count_seconds']:,.0f}/s, "
        f"embedding {embedded / stats['embed_seconds']:,.0f}/s; "
        f"{stats['fit_wall_seconds'] + stats['embed_wall_seconds']:.1f} s on the clock with {stats['workers']} "
        f"workers; {stats['dropped_passages']:,} of {embedded:,} dropped (zero or repeated vectors)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--passages", nargs="+", type=parse_count, default=[545_000, 5_200_000], help="passage counts (k, M suffixes)"
    )
    parser.add_argument(
        "--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="index kinds (default: fastscan ivfpq)"
    )
    parser.add_argument(
        "--vectors", choices=("corpus", "synthetic"), default="corpus", help="vectors of real text (default) or not"
    )
    parser.add_argument("--dim", type=int, default=256, help="vector dimensions (default 256)")
    parser.add_argument(
        "--queries",
        type=int,
        default=256,
        help=f"fresh queries timed and scored (default 256; corpus: <= {QUERY_POOL})",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--chunk-chars",
        type=int,
        default=None,
        help=f"corpus: characters per passage at most (default: {CHUNK_TOKENS} tokens of {TOKENIZER} in characters)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path("~/.cache/refdecode/passage-vectors").expanduser(),
        help="corpus: where the vectors are kept (default ~/.cache/refdecode/passage-vectors)",
    )
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count(), help="corpus: processes making vectors (default: every CPU)"
    )
    parser.add_argument("--per-topic", type=int, default=64, help="synthetic: passages per topic centre (default 64)")
    parser.add_argument(
        "--noise",
        type=float,
        default=1.0,
        help="synthetic: noise norm over the topic centre's (default 1.0; larger: less clustered)",
    )
    parser.add_argument(
        "--out", default=None, help="results folder (default scripts/results/cpu-passage-scale[-corpus])"
    )
    args = parser.parse_args(argv)
    sizes = args.passages
    if min(sizes) < 4096 or args.dim < 8 or args.per_topic < 1 or args.queries < 1:
        parser.error("--passages must be >= 4096 each, --dim >= 8, --per-topic and --queries >= 1")
    if args.vectors == "corpus" and (args.queries > QUERY_POOL or args.workers < 1 or (args.chunk_chars or 1) < 1):
        parser.error(f"with corpus vectors --queries must be <= {QUERY_POOL}, --workers and --chunk-chars >= 1")
    out = Path(args.out or f"scripts/results/cpu-passage-scale{'-corpus' if args.vectors == 'corpus' else ''}")
    out.mkdir(parents=True, exist_ok=True)
    sources = prepare(sizes, args)
    results = []
    with tempfile.TemporaryDirectory(prefix="passage-scale-") as tmp:
        for n, vectors in zip(sizes, sources, strict=True):
            print(f"{n:,} passages: exact neighbours ...", file=sys.stderr, flush=True)
            exact = exact_top10(vectors.blocks(), vectors.queries)
            for kind in args.kinds:
                print(f"{n:,} passages: {kind} ...", file=sys.stderr, flush=True)
                results.append({**measure(n, kind, vectors, exact, args, Path(tmp)), "vectors": vectors.about})
                shutil.rmtree(Path(tmp) / f"passages-{n}-{kind}")
                record = {"args": {**vars(args), "cache": str(args.cache)}, "sizes": results}
                (out / "results.json").write_text(json.dumps(record, indent=1))
                (out / "table.md").write_text(table(results, args))
    print(table(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
