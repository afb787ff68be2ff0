"""A Ray build on a cluster, on paper: each stage's time at a corpus size, projected from one machine's Ray Data
statistics with the model of docs/corpus.md ("Per-stage statistics, and projecting a cluster from them").

    python -m scripts.project_cluster [--build scripts/results/cpu-index-build-100M-hashed256/results.json]
                                      [--span scripts/results/cpu-span-scale-1B/results.json] [--tokens 1B]
                                      [--nodes 1 4 16 64] [--cpus-per-node 16] [--link-gbit 10] [--slower 1]
                                      [--out scripts/results/cpu-span-scale-1B/projection.md]

--build: a bench_index_build results.json with a Ray build (its manifest's build_seconds and build_stats, per
stage: wall seconds W, task seconds T, shuffle bytes S, bytes out). Each stage is scaled from that build's tokens to
--tokens in proportion (reading, tokenizing, MinHash, the pair checks, embedding, writing and both shuffles grow
with the corpus; the pair checks grow faster where a corpus repeats itself more). --span: a bench_span_scale
results.json: its span sort, measured at (about) --tokens, replaces the scaled span_index stage (its wall seconds
include writing the span files, which `write` counts again: the projection errs long).

Per stage, on the measuring machine of C CPUs and a cluster of N nodes of c CPUs whose cores are --slower times as
slow, joined by links of B bytes/s: D = max(0, W - T / C) stays on the driver; the tasks take T k / (N c); the
shuffle S (N - 1) / (N^2 B); what ends on the driver (rows, pairs, vectors, sorted positions) bytes_out / B. A
projection, not a measurement: see docs/corpus.md for what it leaves out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scripts.bench_index_build import parse_count

_PULLED = ("tokenize_chunk", "dedup", "embed", "span_index")  # stages whose output crosses the driver's link


def stage_figures(build: dict, span: dict | None, tokens: int) -> tuple[dict[str, dict], int, float]:
    """Each stage's {W, T, S, out} at `tokens`. -> (stages, the measuring machine's CPUs, start-up seconds)"""
    (size,) = build["sizes"].values()
    ray = size["engines"]["ray"]
    manifest = ray["manifest"]
    measured = manifest["counts"]["tokens"]
    scale = tokens / measured
    stats = manifest["build_stats"]
    stages = {}
    for name, figures in stats["stages"].items():
        stages[name] = {
            "W": manifest["build_seconds"][name] * scale,
            "T": figures["task_seconds"] * scale,
            "S": figures["shuffle_bytes"] * scale,
            "out": figures["bytes_out"] * scale,
            "from": f"{measured / 1e6:.0f}M x {scale:.2f}",
        }
    if span is not None:
        fig = span["ray"]["figures"]
        s = tokens / span["tokens"]
        stages["span_index"] = {
            "W": span["ray"]["seconds"] * s,
            "T": fig["task_seconds"] * s,
            "S": fig["shuffle_bytes"] * s,
            "out": fig["bytes_out"] * s,
            "from": f"{span['tokens'] / 1e9:.2f}B measured",
        }
    startup = ray["wall_seconds"] - sum(manifest["build_seconds"].values())
    return stages, int(stats["cpus"]), startup


def project(stage: str, f: dict, *, cpus: int, nodes: int, per_node: int, link: float, slower: float) -> float:
    driver = max(0.0, f["W"] - f["T"] / cpus)
    seconds = driver + f["T"] * slower / (nodes * per_node)
    seconds += f["S"] * (nodes - 1) / (nodes**2 * link)
    if stage in _PULLED:
        seconds += f["out"] / link
    return seconds


def table(stages: dict, cpus: int, startup: float, args) -> str:
    link = args.link_gbit * 1e9 / 8
    head = " | ".join(f"N={n}" for n in args.nodes)
    lines = [
        f"Projected Ray build of {args.tokens / 1e9:.2f}B tokens: the measuring machine has {cpus} CPUs; nodes of "
        f"{args.cpus_per_node} CPUs, cores {args.slower:g}x as slow, {args.link_gbit:g} Gbit/s links. Seconds.",
        "",
        f"| stage | from | W s | T s | driver s | shuffle GB | to driver GB | {head} |",
        "|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(args.nodes),
    ]
    totals = [startup] * len(args.nodes)
    for name, f in stages.items():
        row = [
            project(name, f, cpus=cpus, nodes=n, per_node=args.cpus_per_node, link=link, slower=args.slower)
            for n in args.nodes
        ]
        totals = [t + r for t, r in zip(totals, row, strict=True)]
        out = f["out"] / 1e9 if name in _PULLED else 0.0
        lines.append(
            f"| {name} | {f['from']} | {f['W']:.0f} | {f['T']:.0f} | {max(0.0, f['W'] - f['T'] / cpus):.0f} | "
            f"{f['S'] / 1e9:.1f} | {out:.1f} | " + " | ".join(f"{r:.0f}" for r in row) + " |"
        )
    lines.append(
        f"| start-up | as measured | {startup:.0f} | | | | | " + " | ".join(f"{startup:.0f}" for _ in totals) + " |"
    )
    lines.append("| **total** | | | | | | | " + " | ".join(f"**{t:.0f}**" for t in totals) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", type=Path, default=Path("scripts/results/cpu-index-build-100M-hashed256/results.json"))
    ap.add_argument("--span", type=Path, default=Path("scripts/results/cpu-span-scale-1B/results.json"))
    ap.add_argument("--tokens", type=parse_count, default=parse_count("1B"))
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--cpus-per-node", type=int, default=16)
    ap.add_argument("--link-gbit", type=float, default=10.0)
    ap.add_argument("--slower", type=float, default=1.0, help="a cluster core's time over this machine's")
    ap.add_argument("--out", type=Path, help="also write the table here")
    args = ap.parse_args()
    for path in (args.build, args.span):
        if not path.exists():
            print(f"project_cluster: {path} does not exist (run its benchmark first)", file=sys.stderr)
            return 2
    try:
        build = json.loads(args.build.read_text())
        span = json.loads(args.span.read_text())
        stages, cpus, startup = stage_figures(build, span, args.tokens)
    except (ValueError, KeyError) as e:
        print(f"project_cluster: not a benchmark's results.json with a Ray build: {e}", file=sys.stderr)
        return 2
    text = table(stages, cpus, startup, args)
    if args.out:
        args.out.write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
