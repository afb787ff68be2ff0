"""The `bench` command: options -> BenchConfig -> runner -> report files.

Knows: the command-line options and their defaults (including what `--quick` changes), where results go, and the
export / import of rendered requests for machines without the data cache. Does not measure or summarize anything
itself (`refdecode.bench.runner`, `refdecode.bench.report`).

    refdecode bench --workloads code-edit rag --n 10 --out results/cpu-smollm2
    python -m scripts.bench --quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

__all__ = ["add_bench_arguments", "add_bench_command", "build_parser", "run_bench", "main"]

QUICK = {"n": 1, "max_new_tokens": 32, "cost_reps": 2}
DEFAULTS = {"n": 12, "max_new_tokens": 128, "cost_reps": 5}


def _names(value: str) -> list[str]:
    return [v for v in value.replace(",", " ").split() if v]


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from refdecode.bench.runner import DEFAULT_METHODS, DEFAULT_WORKLOADS, METHODS, SUFFIX_METHODS
    from refdecode.bench.workloads import WORKLOADS

    parser.add_argument(
        "--workloads",
        nargs="+",
        metavar="NAME",
        default=list(DEFAULT_WORKLOADS),
        help=f"workloads to run, space or comma separated ({', '.join(WORKLOADS)}); "
        f"default: {' '.join(DEFAULT_WORKLOADS)}",
    )
    parser.add_argument(
        "--n",
        type=int,
        default=None,
        help=f"prompts per workload (default {DEFAULTS['n']}, --quick {QUICK['n']}); spec-bench "
        "splits them over its six categories",
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling of the prompts, and of the sampling rows")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help=f"default {DEFAULTS['max_new_tokens']} (--quick {QUICK['max_new_tokens']})",
    )
    parser.add_argument("--model", default="smollm2-135m", help="refdecode.load_model name (default smollm2-135m)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--methods",
        nargs="+",
        metavar="NAME",
        default=list(DEFAULT_METHODS),
        help=f"methods ({', '.join(METHODS)}); greedy, the baseline, always runs; default: "
        f"{' '.join(DEFAULT_METHODS)}. {' and '.join(SUFFIX_METHODS)} (SuffixDecoding's drafter in refdecode's loop, "
        "chain and tree mode) need arctic-inference: `make suffix-setup`",
    )
    parser.add_argument(
        "--drafters",
        "--prophets",
        dest="drafters",
        nargs="+",
        metavar="SPEC",
        default=[],
        help="model drafters to add rows for, each alone (drafter:SPEC) and with the references (refdecode+SPEC): "
        "self:heads, self:int8, self:layers=N, self:recycle, or a draft model name sharing the tokenizer; "
        "--prophets is the same option under its older name",
    )
    parser.add_argument(
        "--draft-model",
        metavar="NAME",
        default=None,
        help="a model sharing the target's tokenizer (e.g. qwen2.5-coder-0.5b for --model qwen2.5-coder-1.5b), "
        "loaded once: adds transformers' assisted generation with it (assisted) and refdecode's tree with it "
        "joining the references (refdecode+NAME)",
    )
    parser.add_argument(
        "--share-prefill",
        action="store_true",
        help="compute the target's prompt forward once per prompt and start every method from a copy of its cache "
        "(refdecode.bench.prefill): throughput is unchanged, but prefill and end-to-end seconds then exclude that "
        "forward; for large models on a CPU, where each prefill costs tens of seconds",
    )
    parser.add_argument(
        "--sampling",
        action="store_true",
        help="add rows at temperature 0.7, top_p 0.9: transformers sampling vs refdecode (tree and chain)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--cost-reps",
        type=int,
        default=None,
        help=f"repetitions per width of the forward-cost curve (default {DEFAULTS['cost_reps']})",
    )
    parser.add_argument(
        "--cost-max-width",
        type=int,
        default=64,
        help="the forward-cost curve times widths 1..this (default 64; a large model on a CPU: 32)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output folder for results.json, table.md and the plots (default results/bench-MODEL-DEVICE-TIME)",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a smoke run: n={QUICK['n']}, max_new_tokens={QUICK['max_new_tokens']}, "
        f"cost_reps={QUICK['cost_reps']} unless given",
    )
    parser.add_argument(
        "--export-requests",
        metavar="FILE",
        help="write the sampled requests (token ids, references included) to FILE and exit",
    )
    parser.add_argument(
        "--index",
        metavar="DIR",
        help="a corpus index (refdecode index build): the rag-index workload retrieves its prompts' "
        "passages from it, and refdecode drafts from it (retrieval + corpus span index)",
    )
    parser.add_argument(
        "--requests",
        metavar="FILE",
        help="run the requests of an --export-requests FILE instead of sampling from the data cache",
    )
    return parser


def add_bench_command(subparsers) -> argparse.ArgumentParser:
    """Add `bench` to a CLI's subparsers; the parsed namespace's `func(args)` runs it and returns an exit code."""
    parser = subparsers.add_parser(
        "bench",
        help="benchmark refdecode against transformers greedy and prompt lookup",
        description="Time transformers greedy, prompt lookup, refdecode (token tree and single chain), optionally "
        "SuffixDecoding's drafter in refdecode's loop, and an oracle drafter on the same prompts (interleaved per "
        "prompt), check outputs are identical to greedy, and write a report.",
    )
    add_bench_arguments(parser)
    parser.set_defaults(func=run_bench)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench", description="refdecode benchmark")
    add_bench_arguments(parser)
    return parser


def _config(args):
    from refdecode.bench.runner import BenchConfig

    chosen = QUICK if args.quick else DEFAULTS
    return BenchConfig(
        workloads=tuple(w for v in args.workloads for w in _names(v)),
        n=args.n if args.n is not None else chosen["n"],
        seed=args.seed,
        max_new_tokens=args.max_new_tokens if args.max_new_tokens is not None else chosen["max_new_tokens"],
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        methods=tuple(m for v in args.methods for m in _names(v)),
        sampling=args.sampling,
        threads=args.threads,
        cost_reps=args.cost_reps if args.cost_reps is not None else chosen["cost_reps"],
        cost_max_width=args.cost_max_width,
        requests_file=args.requests,
        index=args.index,
        quick=args.quick,
        drafters=tuple(args.drafters),
        draft_model=args.draft_model,
        share_prefill=args.share_prefill,
    )


# the timed records of a run still going (or stopped early), one JSON object a line; gone once results.json is written
PARTIAL_RECORDS = "records.partial.jsonl"


def run_bench(args) -> int:
    """Run the benchmark (or only export its requests); returns the exit code: 0, or 2 on bad options."""
    from refdecode import cost_cache
    from refdecode.bench import report, runner

    # A run calibrates its forward costs afresh, as the runs it is compared with did; REFDECODE_COST_CACHE=on reuses
    # a table kept on this machine instead (refdecode.cost_cache).
    os.environ.setdefault(cost_cache.SWITCH_VARIABLE, "off")
    try:
        config = _config(args)
    except ValueError as err:
        print(f"bench: {err}", file=sys.stderr)
        return 2
    if args.export_requests:
        return _export(config, args.export_requests)
    out = Path(
        args.out
        or f"results/bench-{Path(config.model).name}-{config.device.replace(':', '')}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    out.mkdir(parents=True, exist_ok=True)
    partial = out / PARTIAL_RECORDS
    partial.unlink(missing_ok=True)

    def keep(record: dict) -> None:  # one JSON line per timed record, written as soon as it is measured
        with partial.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    try:
        results = runner.run_benchmark(config, log=lambda line: print(line, flush=True), on_record=keep)
    except ValueError as err:
        print(f"bench: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        kept = len(partial.read_text(encoding="utf-8").splitlines()) if partial.exists() else 0
        print(f"bench: stopped; the {kept} records measured so far are in {partial}", file=sys.stderr)
        return 130
    summary = report.write_report(results, out, plots=not args.no_plots)
    partial.unlink(missing_ok=True)  # results.json holds every record now
    print()
    print(report.format_report(results, summary))
    print(f"wrote {out}/results.json, {out}/table.md" + ("" if args.no_plots else " and plots"))
    return 0


def _export(config, path: str) -> int:
    from refdecode import load_tokenizer
    from refdecode.bench import runner

    tokenizer = load_tokenizer(config.model)
    requests = runner.prepare_requests(config.workloads, config.n, config.seed, tokenizer)
    meta = {"model": config.model, "seed": config.seed, "n": config.n, "workloads": list(config.workloads)}
    runner.export_requests(path, requests, tokenizer=tokenizer, meta=meta)
    counts = {w: sum(r.workload == w for r in requests) for w in config.workloads}
    print(f"wrote {len(requests)} requests to {path}: " + ", ".join(f"{w} {c}" for w, c in counts.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_bench(build_parser().parse_args(argv))
