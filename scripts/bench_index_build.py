"""Corpus index builds at scale on this machine: the one-process build against the Ray Data build.

    python -m scripts.bench_index_build [--tokens 10M 100M] [--engines local ray] [--embedder hashed]
                                        [--embed-dim 256] [--flat-limit 64M] [--model smollm2-135m] [--work DIR]
                                        [--out scripts/results/cpu-index-build]

--embed-dim N gives the hashed embedder N dimensions instead of 16,384 (`--hashed-dim` of the CLI): a scale-test
embedder, cheap enough that the build's other stages show, not one for retrieval quality. At 16,384 dimensions it
writes 64 KB per passage (2.6 GB of vectors at 10M tokens, above the flat limit, and IVF-PQ training over 16,384
dimensions does not finish in minutes).

For each corpus size: a JSONL corpus of real text (the Python docs, ACLSum papers and ShareGPT conversations, then
copies of them with 10% of the words replaced by other words of the corpus, seeded, so that near-duplicate removal
keeps them) is written once under --work; then each engine builds it with the CLI a user runs
(`refdecode index build CORPUS --out DIR [--ray]`), in a fresh process, one after the other, never side by side.
Recorded per build: wall time (process start to exit, Ray's start-up included), the manifest's stage times (and,
for Ray builds, its per-stage rows, bytes, task seconds and shuffle bytes: build_stats), tokens per second, the peak
of the summed RSS of the build process and all its descendants (Ray's workers included; shared pages are counted
once per process, so this is an upper bound), the index's bytes on disk. Then the built
index is loaded and timed: span lookups (16-token tails, half from the corpus and half held out) and passage search
(top 10). Where both engines built a size, their span continuations and retrieved ids are compared probe by probe.

Results: results.json and table.md in --out. The corpus token count is approximate (characters per token estimated
on a sample); the exact count is the manifest's.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from refdecode.bench import data

_SHARD_CHARS = 32 << 20  # characters per JSONL shard: several files, so reading is parallel
_REPLACE = 0.10  # fraction of words replaced in each copy after the first


def parse_count(text: str) -> int:
    """'10M' -> 10_000_000, '1B' -> 1_000_000_000, '5000' -> 5000."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMbBgG]?)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r} (e.g. 10M, 1B, 250000)")
    scale = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def real_texts() -> tuple[list[str], list[str]]:
    """(corpus texts, held-out conversations for queries)."""
    texts = [data.read_text(p) for p in data.python_docs_files()]
    texts += [p["paper"] for p in data.aclsum_pairs()]
    convs = ["\n\n".join(t["content"] for t in c) for c in data.sharegpt_conversations()]
    return texts + convs[300:], convs[:300]


def chars_per_token(tokenizer, texts: list[str], rng) -> float:
    sample = [texts[int(i)] for i in rng.choice(len(texts), size=min(200, len(texts)), replace=False)]
    n_tokens = sum(len(ids) for ids in tokenizer(sample, add_special_tokens=False)["input_ids"])
    return sum(len(t) for t in sample) / max(n_tokens, 1)


def perturbed(text: str, words: list[str], rng) -> str:
    """`text` with about _REPLACE of its words swapped for random corpus words (whitespace kept)."""
    parts = re.split(r"(\s+)", text)
    picks = rng.random(len(parts)) < _REPLACE
    for i in np.flatnonzero(picks).tolist():
        if parts[i] and not parts[i].isspace():
            parts[i] = words[int(rng.integers(len(words)))]
    return "".join(parts)


def write_corpus(folder: Path, texts: list[str], target_chars: int, seed: int = 0) -> int:
    """JSONL shards of about `target_chars` characters: the texts once, then perturbed copies. -> characters"""
    done = folder / "DONE"
    if done.exists():
        return int(done.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("shard-*.jsonl"):
        old.unlink()
    rng = np.random.default_rng(seed)
    words = sorted({w for t in texts[:2000] for w in t.split() if len(w) < 20})
    written, shard, shard_chars, copy = 0, 0, 0, 0
    out = open(folder / f"shard-{shard:05d}.jsonl", "w", encoding="utf-8")
    while written < target_chars:
        for j in rng.permutation(len(texts)).tolist():
            text = texts[j] if copy == 0 else perturbed(texts[j], words, rng)
            out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            written += len(text)
            shard_chars += len(text)
            if written >= target_chars:
                break
            if shard_chars >= _SHARD_CHARS:
                out.close()
                shard, shard_chars = shard + 1, 0
                out = open(folder / f"shard-{shard:05d}.jsonl", "w", encoding="utf-8")
        copy += 1
    out.close()
    done.write_text(str(written))
    return written


class PeakRSS:
    """Samples the summed RSS of a process and all its descendants every `every` seconds; `.peak` in bytes. Also
    `.peak_pss`: the summed proportional set size (a page shared by k processes counts 1/k in each, so the sum is
    what they hold together: Ray's object store once, not once per worker), and `.peak_used`: the machine's memory
    in use (total - available) above what it was at the start.

    PSS costs a walk over every mapped page (smaps_rollup): with Ray's object store mapped into every worker, one
    sweep took ~0.1 s a process at 1B tokens, and sampling it every 0.25 s kept 40% of a core busy beside the build
    it measured. So the sampler times its own PSS sweeps and waits `_PSS_DUTY` times as long before the next one
    (at most ~5% of a core), while RSS (cheap) and machine memory keep the short period."""

    _PSS_DUTY = 20

    def __init__(self, pid: int, every: float = 0.25):
        import psutil

        self._root, self._every, self.peak, self.peak_pss, self.peak_used = psutil.Process(pid), every, 0, 0, 0
        self.samples = self.pss_sweeps = 0
        self._base_used = self._used()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _used() -> int:
        import psutil

        memory = psutil.virtual_memory()
        return int(memory.total - memory.available)

    def _run(self) -> None:
        import psutil

        next_pss = 0.0
        while not self._stop.is_set():
            try:
                procs = [self._root, *self._root.children(recursive=True)]
            except psutil.Error:
                return
            started = time.monotonic()
            sweep = started >= next_pss
            total = pss = 0
            for p in procs:
                try:
                    if sweep:
                        info = p.memory_full_info()  # /proc/PID/smaps_rollup: walks the mapped pages
                        total += info.rss
                        pss += info.pss
                    else:
                        total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.samples += 1
            if sweep:
                self.pss_sweeps += 1
                self.peak_pss = max(self.peak_pss, pss)
                next_pss = time.monotonic() + self._PSS_DUTY * (time.monotonic() - started)
            self.peak = max(self.peak, total)
            self.peak_used = max(self.peak_used, self._used() - self._base_used)
            self._stop.wait(self._every)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_build(
    corpus: Path,
    out: Path,
    engine: str,
    model: str,
    embedder: str,
    log: Path,
    embed_dim: int | None = None,
    flat_limit: str | None = None,
) -> dict:
    """One build with the CLI in a fresh process. -> wall seconds, peak RSS, exit code"""
    cmd = [
        sys.executable,
        "-c",
        "import sys; from refdecode.cli import main; sys.exit(main())",
        "index",
        "build",
        str(corpus),
        "--out",
        str(out),
        "--model",
        model,
        "--embedder",
        embedder,
        "--force",
    ]
    if embed_dim is not None:
        cmd += ["--hashed-dim", str(embed_dim)]
    if flat_limit is not None:
        cmd += ["--flat-limit", flat_limit]
    if engine == "ray":
        cmd.append("--ray")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        rss = PeakRSS(proc.pid)
        rc = proc.wait()
    wall = time.perf_counter() - t0
    return {"command": " ".join(cmd[3:]), "rc": rc, "wall_seconds": wall, "peak_rss_bytes": rss.stop()}


def probes(tokenizer, corpus_texts: list[str], held_out: list[str], n: int, rng) -> list[list[int]]:
    from scripts.bench_index import make_queries

    corpus_docs = [np.asarray(ids) for ids in tokenizer(corpus_texts[:400], add_special_tokens=False)["input_ids"]]
    held = [np.asarray(ids) for ids in tokenizer(held_out, add_special_tokens=False)["input_ids"]]
    return make_queries(corpus_docs, held, n, rng)


def measure_index(folder: Path, queries: list[list[int]], texts: list[str]) -> dict:
    from refdecode.corpus import CorpusIndex
    from scripts.bench_index import time_lookups

    t0 = time.perf_counter()
    index = CorpusIndex.load(folder, checksums=False)
    load_s = time.perf_counter() - t0
    spans = time_lookups(index.spans, queries)
    index.retrieve(texts[0], 10)  # loads the embedder
    times, ids = [], []
    for t in texts:
        t0 = time.perf_counter()
        found = index.retrieve(t, 10)
        times.append(time.perf_counter() - t0)
        ids.append([p.id for p in found])
    info = index.info()
    return {
        "info": info,
        "manifest": {k: index.manifest.get(k) for k in ("build_seconds", "build_stats", "build_options", "counts")},
        "load_seconds": load_s,
        **spans,
        "retrieve_median_ms": float(np.median(times) * 1e3),
        "retrieve_p90_ms": float(np.percentile(times, 90) * 1e3),
        "_answers": (
            [index.span_continuations(q, 8) for q in queries[:500]],
            ids,
        ),
    }


def table(results: dict) -> str:
    lines = [
        "| tokens | engine | wall s | tokens/s | peak RSS GB | tokenize+chunk s | dedup s | span s | embed s | "
        "bytes on disk/token | span lookup median us | continuations median us | retrieve median ms | passage index | "
        "same answers |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for size, runs in results["sizes"].items():
        for engine, r in runs["engines"].items():
            if r.get("rc") != 0:
                lines.append(f"| {size} | {engine} | failed (rc {r.get('rc')}) | | | | | | | | | | | | |")
                continue
            c = r["info"]
            bs = r["manifest"]["build_seconds"] or {}
            lines.append(
                f"| {c['tokens']:,} | {engine} | {r['wall_seconds']:.0f} | {c['tokens'] / r['wall_seconds']:,.0f} | "
                f"{r['peak_rss_bytes'] / 2**30:.2f} | {bs.get('tokenize_chunk', float('nan')):.0f} | "
                f"{bs.get('dedup', float('nan')):.0f} | {bs.get('span_index', float('nan')):.0f} | "
                f"{bs.get('embed', float('nan')):.0f} | {c['bytes_on_disk'] / max(c['tokens'], 1):.1f} | "
                f"{r['lookup_median_us']:.0f} | {r['continuations_median_us']:.0f} | "
                f"{r['retrieve_median_ms']:.1f} | {passage_kind(c.get('passage_index'))} | "
                f"{runs.get('same_answers', '-')} |"
            )
    return "\n".join(lines) + "\n" + stage_table(results)


def passage_kind(fields: dict | None) -> str:
    """'flat', or IVF-PQ with its build-time recall@10 against exact search, nprobe and shards."""
    if not fields or fields.get("kind") != "ivfpq":
        return "flat"
    return (
        f"IVF-PQ, recall@10 {fields.get('recall_at_10')} at nprobe {fields.get('nprobe')} of {fields.get('nlist')}, "
        f"{fields.get('shards', 1)} shard(s) {fields.get('inverted_lists', 'memory')}"
    )


def stage_table(results: dict) -> str:
    """The Ray builds' per-stage figures (the manifest's build_stats): what docs/corpus.md projects a cluster from."""
    lines = [
        "",
        "Per stage (Ray builds): wall seconds on the driver's clock, the stage's tasks' summed wall seconds, rows and "
        "MB in and out, MB shuffled.",
        "",
        "| tokens | stage | wall s | task s | rows in | rows out | MB in | MB out | MB shuffled |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    found = False
    for runs in results["sizes"].values():
        for r in runs["engines"].values():
            stats = (r.get("manifest") or {}).get("build_stats") if r.get("rc") == 0 else None
            if not stats:
                continue
            found = True
            seconds = r["manifest"]["build_seconds"]
            for stage, f in stats["stages"].items():
                lines.append(
                    f"| {r['info']['tokens']:,} | {stage} | {seconds.get(stage, 0):.1f} | "
                    f"{f.get('task_seconds', 0):.1f} | {f.get('rows_in', 0):,} | {f.get('rows_out', 0):,} | "
                    f"{f.get('bytes_in', 0) / 1e6:,.1f} | "
                    f"{f.get('bytes_out', 0) / 1e6:,.1f} | {f.get('shuffle_bytes', 0) / 1e6:,.1f} |"
                )
    return "\n".join(lines) + "\n" if found else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", nargs="+", type=parse_count, default=[10**7, 10**8])
    parser.add_argument("--engines", nargs="+", choices=("local", "ray"), default=["local", "ray"])
    parser.add_argument("--embedder", default="hashed", help="passage embedder of the builds (default: hashed)")
    parser.add_argument(
        "--embed-dim",
        type=int,
        default=None,
        help="dimensions of the hashed embedder (default: its 16384); a small one (256) for scale tests only",
    )
    parser.add_argument(
        "--flat-limit", default=None, help="the builds' --flat-limit (e.g. 64M: IVF-PQ above it; default the CLI's)"
    )
    parser.add_argument("--model", default="smollm2-135m", help="tokenizer of the index (default: smollm2-135m)")
    parser.add_argument("--work", type=Path, default=data.data_root().parent / "index-build-bench")
    parser.add_argument("--out", type=Path, default=Path("scripts/results/cpu-index-build"))
    args = parser.parse_args()

    from refdecode.models import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    rng = np.random.default_rng(0)
    texts, held_out = real_texts()
    cpt = chars_per_token(tokenizer, texts, rng)
    queries = probes(tokenizer, texts, held_out, 2000, rng)
    search_texts = [t[:300] for t in held_out[:100]]
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"chars_per_token": cpt, "model": args.model, "embedder": args.embedder, "sizes": {}}
    results["embed_dim"] = args.embed_dim
    for n in args.tokens:
        label = f"{n / 1e6:g}M"
        corpus = args.work / f"corpus-{label}"
        print(f"[{label}] writing the corpus into {corpus} ...", flush=True)
        chars = write_corpus(corpus, texts, int(n * cpt))
        runs: dict = {"corpus": str(corpus), "characters": chars, "engines": {}}
        answers = {}
        for engine in args.engines:
            out = args.work / f"index-{label}-{engine}"
            print(f"[{label}] {engine} build ...", flush=True)
            log = args.out / f"build-{label}-{engine}.log"
            r = run_build(corpus, out, engine, args.model, args.embedder, log, args.embed_dim, args.flat_limit)
            if r["rc"] == 0:
                r.update(measure_index(out, queries, search_texts))
                answers[engine] = r.pop("_answers")
            runs["engines"][engine] = r
            print(
                f"[{label}] {engine}: rc {r['rc']}, {r['wall_seconds']:.0f} s, peak RSS "
                f"{r['peak_rss_bytes'] / 2**30:.2f} GB",
                flush=True,
            )
        if len(answers) == 2:
            a, b = answers.values()
            runs["same_answers"] = f"spans {a[0] == b[0]}, retrieve {a[1] == b[1]}"
        results["sizes"][label] = runs
        (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
        (args.out / "table.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
