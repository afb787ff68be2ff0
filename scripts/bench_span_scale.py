"""The span index past one machine's memory: a synthetic token stream sorted by the Ray build's range-partitioned
span sort and written by the index's own writer, against the one-process sort on the same stream.

    python -m scripts.bench_span_scale [--tokens 1B] [--base STREAM.npy] [--work DIR]
                                       [--out scripts/results/cpu-span-scale-1B]

The stream is synthetic: a real one (the span_stream.npy of a built index; by default the 100M-token local index
that `python -m scripts.bench_index_build --tokens 100M` leaves under its --work) copied until it holds --tokens
tokens, every copy after the first with 2% of its tokens replaced by tokens drawn from the stream (seeded), its
documents and separators kept: real text's skew and repeats, many times over. It is written once under --work.

Each step runs in a fresh process, one after the other, so that its peak memory is its own:
1. local: spans.build_suffix_order (what `refdecode index build` runs) on the whole stream, under an address-space
   limit of this machine's physical memory (RLIMIT_AS): whether it fails, where and after how long; and the peak
   RSS of the same sort on the first 10M tokens, for its bytes per token.
2. ray: ray_build.sorted_span_blocks (what `refdecode index build --ray` runs) on a local Ray of this machine's
   cores, streamed into spans.write_span_index: wall seconds, the peak of the summed RSS of the process and all its
   descendants (Ray's included; shared pages counted once per process: an upper bound), Ray Data's figures
   (shuffle bytes, task seconds), bytes on disk.
3. lookups: the written index loaded memory-mapped, and 2,000 16-token tails (half copied from the stream, half
   random tokens) looked up: longest match and continuations, median microseconds.

Results: results.json and table.md in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from scripts.bench_index_build import PeakRSS, parse_count

_MUTATE = 0.02  # fraction of tokens replaced in every copy after the first
_CHUNK = 1 << 24  # tokens written per step
_SMALL = 10_000_000  # tokens of the local sort's memory measurement
_DEFAULT_WORK = Path.home() / ".cache" / "refdecode" / "index-build-bench"


def default_base(work: Path) -> Path | None:
    found = sorted((work / "index-100M-local").glob("gen-*/span_stream.npy"))
    return found[0] if found else None


def synthetic_stream(base: Path, tokens: int, path: Path, seed: int = 0) -> Path:
    """Copies of the base stream, mutated after the first, cut at a document boundary after `tokens` tokens."""
    done = path.with_suffix(".done")
    if path.exists() and done.exists() and done.read_text() == f"{base} {tokens} {seed}":
        return path
    src = np.load(base, mmap_mode="r")
    copies = max(1, -(-tokens // src.size))
    rng = np.random.default_rng(seed)
    pool = np.asarray(src[src != 0][: 1 << 22])  # tokens to draw replacements from
    # cut at the first separator at or after `tokens`, so the stream ends with one (the base stream does)
    j = tokens - (copies - 1) * src.size
    size = (
        (copies - 1) * src.size + j + int(np.flatnonzero(np.asarray(src[j:]) == 0)[0]) + 1
        if j < src.size
        else copies * src.size
    )
    out = np.lib.format.open_memmap(path, mode="w+", dtype=src.dtype, shape=(size,))
    for c in range(copies):
        for lo in range(0, src.size, _CHUNK):
            at = c * src.size + lo
            if at >= size:
                break
            part = np.array(src[lo : lo + _CHUNK][: size - at])
            if c:
                hit = (rng.random(part.size) < _MUTATE) & (part != 0)
                part[hit] = pool[rng.integers(pool.size, size=int(hit.sum()))]
            out[at : at + part.size] = part
    out.flush()
    del out
    done.write_text(f"{base} {tokens} {seed}")
    return path


# -- the steps, each run in its own process ---------------------------------------------------------------------------


def step_local(stream_path: Path, limit: int | None) -> dict:
    """build_suffix_order on the stream (the first `limit` tokens, cut at a separator, or all of it)."""
    from refdecode.corpus.spans import build_suffix_order

    stream = np.load(stream_path, mmap_mode="r")
    if limit is not None:
        cut = limit + int(np.flatnonzero(np.asarray(stream[limit : limit + 100_000]) == 0)[0])
        stream = stream[: cut + 1]
    t0 = time.perf_counter()
    try:
        order = build_suffix_order(np.asarray(stream))
    except MemoryError as e:
        return {"ok": False, "error": str(e).splitlines()[0], "seconds": time.perf_counter() - t0}
    return {"ok": True, "entries": int(order.size), "tokens": int(stream.size), "seconds": time.perf_counter() - t0}


def step_ray(stream_path: Path, dest: Path) -> dict:
    """The Ray build's span sort streamed into the index writer, as `index build --ray` runs them."""
    from refdecode.corpus.ray_build import ray_session, sorted_span_blocks
    from refdecode.corpus.spans import write_span_index

    stream = np.load(stream_path, mmap_mode="r")
    if (dest / "fields.json").exists():  # this script's own earlier output: no stale partition files
        shutil.rmtree(dest)
    dest.mkdir(parents=True, exist_ok=True)
    figures: dict = {}
    t0 = time.perf_counter()
    with ray_session(progress=False) as ray:
        cpus = int(ray.cluster_resources().get("CPU", 1))
        names, fields = write_span_index(dest, stream, sorted_span_blocks(stream, stats=figures))
    seconds = time.perf_counter() - t0
    (dest / "fields.json").write_text(json.dumps(fields))
    disk = sum((dest / n).stat().st_size for n in names)
    return {"seconds": seconds, "cpus": cpus, "figures": figures, "bytes_on_disk": disk, "partitions": len(names) - 2}


def step_lookups(dest: Path, stream_path: Path, n: int = 2000, seed: int = 0) -> dict:
    from refdecode.corpus.spans import SpanIndex
    from scripts.bench_index import time_lookups

    t0 = time.perf_counter()
    index = SpanIndex.load(dest, json.loads((dest / "fields.json").read_text()))
    load_s = time.perf_counter() - t0
    stream = np.load(stream_path, mmap_mode="r")
    rng = np.random.default_rng(seed)
    vocab = int(np.asarray(stream[: 1 << 22]).max())
    queries: list[list[int]] = []
    while len(queries) < n:
        if len(queries) % 2:
            queries.append((rng.integers(1, vocab + 1, size=16) - 1).tolist())  # held out: random tokens
            continue
        e = int(rng.integers(16, stream.size - 1))
        window = np.asarray(stream[e - 16 : e], dtype=np.int64)
        if np.all(window):
            queries.append((window - 1).tolist())  # the stream holds ids + 1
    return {"load_seconds": load_s, **time_lookups(index, queries)}


# -- the driver -------------------------------------------------------------------------------------------------------


def run_step(args: list[str], log: Path, *, memory_limit: int | None = None) -> dict:
    """One step in a fresh process: its result, wall seconds and peak RSS (with its descendants')."""
    cmd = [sys.executable, "-m", "scripts.bench_span_scale", "--step", *args]

    def limit() -> None:
        if memory_limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=f, preexec_fn=limit, text=True)
        rss = PeakRSS(proc.pid)
        out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    lines = out.strip().splitlines()
    result = json.loads(lines[-1]) if proc.returncode == 0 and lines else {"ok": False, "rc": proc.returncode}
    peak = rss.stop()
    return {
        **result,
        "wall_seconds": wall,
        "peak_rss_bytes": peak,
        "peak_pss_bytes": rss.peak_pss,
        "peak_used_bytes": rss.peak_used,
    }


def table(r: dict) -> str:
    gb = 1e9
    local, small, ray = r["local"], r["local_10M"], r["ray"]
    fig = ray.get("figures", {})
    per_token = small["peak_rss_bytes"] / small["tokens"]
    lines = [
        f"Stream: {r['tokens']:,} tokens ({r['dtype']}), synthetic: {r['base']} copied, {_MUTATE:.0%} of each "
        "later copy's tokens replaced.",
        "",
        "| engine | result | wall s | peak RSS GB (summed) | peak PSS GB (summed) | machine memory used GB |"
        " shuffle GB | task s | bytes on disk/token | lookup median us |"
        " continuations median us |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| local (one process, RLIMIT_AS {r['memory_limit'] / gb:.1f} GB) | "
        + ("built" if local.get("ok") else f"failed: {local.get('error', 'rc ' + str(local.get('rc')))}")
        + f" | {local['wall_seconds']:.0f} | {local['peak_rss_bytes'] / gb:.2f}"
        f" | {local.get('peak_pss_bytes', 0) / gb:.2f}"
        f" | {local.get('peak_used_bytes', 0) / gb:.2f} | - | - | - | - | - |",
        f"| ray ({ray.get('cpus', '?')} CPUs, {ray.get('partitions', '?')} partition files) | built | "
        f"{ray['wall_seconds']:.0f} | {ray['peak_rss_bytes'] / gb:.2f} | {ray.get('peak_pss_bytes', 0) / gb:.2f} | "
        f"{ray.get('peak_used_bytes', 0) / gb:.2f} | {fig.get('shuffle_bytes', 0) / gb:.2f} | "
        f"{fig.get('task_seconds', 0):.0f} | {ray.get('bytes_on_disk', 0) / r['tokens']:.1f} | "
        f"{r['lookups']['lookup_median_us']:.0f} | {r['lookups']['continuations_median_us']:.0f} |",
        "",
        f"The local sort's peak RSS on the first {small['tokens']:,} tokens: {small['peak_rss_bytes'] / gb:.2f} GB, "
        f"{per_token:.0f} bytes per token: {per_token * r['tokens'] / gb:.0f} GB at {r['tokens']:,} tokens.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=parse_count, default=parse_count("1B"))
    ap.add_argument("--base", type=Path, help="a span_stream.npy (default: the 100M index of bench_index_build)")
    ap.add_argument("--work", type=Path, default=_DEFAULT_WORK)
    ap.add_argument("--out", type=Path, default=Path("scripts/results/cpu-span-scale-1B"))
    ap.add_argument("--step", nargs="+", help=argparse.SUPPRESS)  # internal: one step, in a child process
    args = ap.parse_args()
    if args.step:
        kind, *rest = args.step
        if kind == "local":
            result = step_local(Path(rest[0]), int(rest[1]) if len(rest) > 1 else None)
        elif kind == "ray":
            result = step_ray(Path(rest[0]), Path(rest[1]))
        else:
            result = step_lookups(Path(rest[0]), Path(rest[1]))
        print(json.dumps(result))
        return 0
    base = args.base or default_base(args.work)
    if base is None or not base.exists():
        print(
            "bench_span_scale: no base stream: pass --base STREAM.npy, or build the 100M index first "
            "(python -m scripts.bench_index_build --tokens 100M --engines local)",
            file=sys.stderr,
        )
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    label = f"{args.tokens // 10**6}M"
    t0 = time.perf_counter()
    stream_path = synthetic_stream(base, args.tokens, args.work / f"span-stream-{label}.npy")
    stream = np.load(stream_path, mmap_mode="r")
    print(f"stream: {stream.size:,} tokens, {stream.dtype} ({time.perf_counter() - t0:.0f} s)", flush=True)
    memory = resource.getpagesize() * os.sysconf("SC_PHYS_PAGES")
    results = {"tokens": int(stream.size), "dtype": str(stream.dtype), "base": str(base), "memory_limit": memory}
    results["local_10M"] = run_step(["local", str(stream_path), str(_SMALL)], args.out / "local-10M.log")
    results["local_10M"]["tokens"] = _SMALL
    print(f"local 10M: {results['local_10M']}", flush=True)
    results["local"] = run_step(["local", str(stream_path)], args.out / "local.log", memory_limit=memory)
    print(f"local: {results['local']}", flush=True)
    dest = args.work / f"span-index-{label}-ray"
    results["ray"] = run_step(["ray", str(stream_path), str(dest)], args.out / "ray.log")
    print(f"ray: {results['ray']}", flush=True)
    results["lookups"] = run_step(["lookups", str(dest), str(stream_path)], args.out / "lookups.log")
    print(f"lookups: {results['lookups']}", flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "table.md").write_text(table(results))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
