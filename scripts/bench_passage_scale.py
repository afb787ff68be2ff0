"""The IVF-PQ passage index as a corpus grows: build, recall and search time at several passage counts, on
synthetic clustered vectors (docs/corpus.md, "Past one machine's memory").

    python -m scripts.bench_passage_scale [--passages 545k 5.2M] [--dim 256] [--per-topic 64] [--noise 1.0] [--seed 0]
                                          [--out scripts/results/cpu-passage-scale]

A 1B-token corpus holds ~5.2M passages (the 100M-token build's 105.2M tokens made 544,642). No such corpus of
real text is at hand here (the span-index figure at 1B uses a synthetic token stream, which has no text to embed),
so the vectors are synthetic and say so: unit vectors around n / --per-topic random topic centres (a corpus grows
in topics as it grows), each centre plus Gaussian noise of --noise times its norm, drawn block by block from the
seed so the writer can read them twice without holding them. Each size goes through the library's own writer
(`write_passage_index` with a flat limit below the vectors' size: IVF-PQ trained on a sample, shards merged on disk,
nprobe the smallest reaching recall@10 0.9 on the held-out vectors) and reader (memory-mapped lists); search time
is one held-out query at a time, as `retrieve` searches, without the query's embedding.

Knows: the synthetic vectors, timing, the table. Does not know the index's layout (refdecode.corpus.passage_index).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from scripts.bench_index_build import PeakRSS, parse_count

BLOCK = 1 << 16


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


def measure(n: int, args: argparse.Namespace, work: Path) -> dict:
    import faiss

    from refdecode.corpus.passage_index import read_passage_index, write_passage_index

    vectors = Synthetic(n, args.dim, args.per_topic, args.seed, args.noise)
    folder = work / f"passages-{n}"
    folder.mkdir()
    rss = PeakRSS(os.getpid())
    start = time.perf_counter()
    _, fields = write_passage_index(folder, vectors, dim=args.dim, n_total=n, flat_limit_bytes=0, seed=args.seed)
    build = time.perf_counter() - start
    rss.stop()
    info = fields["passage_index"]
    index = read_passage_index(folder / "passages.faiss", info, args.dim, n, "bench")
    # the held-out rows the writer drew are its business; queries here are fresh draws of the same distribution
    queries = vectors.draw(args.queries, np.random.default_rng([args.seed, 2]))
    exact = exact_top10(vectors, queries)
    found, seconds = [], []
    for q in queries:
        t = time.perf_counter()
        found.append(index.search(q[None], 10)[1][0])
        seconds.append(time.perf_counter() - t)
    recall = float(np.mean([len(set(f.tolist()) & set(e.tolist())) / 10 for f, e in zip(found, exact, strict=True)]))
    sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
    return {
        "passages": n,
        "build_seconds": build,
        "build_peak_rss_bytes": rss.peak,
        "index": info,
        "files_bytes": sizes,
        "fresh_queries": len(queries),
        "fresh_recall_at_10": recall,
        "search_median_ms": 1e3 * float(np.median(seconds)),
        "search_p90_ms": 1e3 * float(np.percentile(seconds, 90)),
        "threads": faiss.omp_get_max_threads(),
    }


def exact_top10(vectors: Synthetic, queries: np.ndarray) -> np.ndarray:
    """The queries' exact top 10 by inner product over every block. -> (Q, 10) ids"""
    best = np.full((len(queries), 10), -np.inf, dtype=np.float32)
    ids = np.full((len(queries), 10), -1, dtype=np.int64)
    start = 0
    for block in vectors:
        scores = np.concatenate((best, queries @ block.T), axis=1)
        cand = np.concatenate(
            (ids, np.broadcast_to(np.arange(block.shape[0]) + start, (len(queries), block.shape[0]))), 1
        )
        top = np.argpartition(-scores, 9, axis=1)[:, :10]
        best, ids = np.take_along_axis(scores, top, 1), np.take_along_axis(cand, top, 1)
        start += block.shape[0]
    return ids


def table(results: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"Synthetic unit vectors, {args.dim} dimensions, one topic per {args.per_topic} passages, noise {args.noise} "
        f"(seed {args.seed}); "
        "IVF-PQ as `refdecode index build` writes it; search one query at a time.",
        "",
        "| passages | nlist | m | nprobe | recall@10 held-out (build) | recall@10 fresh queries | search median ms "
        "| p90 ms | build s | index + lists MB | flat would be MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        i = r["index"]
        lines.append(
            f"| {r['passages']:,} | {i['nlist']} | {i['m']} | {i['nprobe']} | {i['recall_at_10']:.3f} "
            f"| {r['fresh_recall_at_10']:.3f} | {r['search_median_ms']:.1f} | {r['search_p90_ms']:.1f} "
            f"| {r['build_seconds']:.0f} | {sum(r['files_bytes'].values()) / 1e6:.0f} "
            f"| {r['passages'] * args.dim * 4 / 1e6:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--passages", nargs="+", type=parse_count, default=[545_000, 5_200_000], help="passage counts (k, M suffixes)"
    )
    parser.add_argument("--dim", type=int, default=256, help="vector dimensions (default 256, the hashed embedder's)")
    parser.add_argument("--per-topic", type=int, default=64, help="passages per topic centre (default 64)")
    parser.add_argument(
        "--noise",
        type=float,
        default=1.0,
        help="noise norm over the topic centre's (default 1.0; larger: less clustered)",
    )
    parser.add_argument("--queries", type=int, default=256, help="fresh queries timed and scored (default 256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="scripts/results/cpu-passage-scale")
    args = parser.parse_args(argv)
    sizes = args.passages
    if min(sizes) < 4096 or args.dim < 8 or args.per_topic < 1 or args.queries < 1:
        parser.error("--passages must be >= 4096 each, --dim >= 8, --per-topic and --queries >= 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="passage-scale-") as tmp:
        for n in sizes:
            print(f"{n:,} passages ...", file=sys.stderr, flush=True)
            results.append(measure(n, args, Path(tmp)))
            shutil.rmtree(Path(tmp) / f"passages-{n}")
            (out / "results.json").write_text(json.dumps({"args": vars(args), "sizes": results}, indent=1))
            (out / "table.md").write_text(table(results, args))
    print(table(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
