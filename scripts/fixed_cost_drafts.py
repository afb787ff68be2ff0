"""Drafting decisions without timing noise: generate every code-edit / code-edit-ref prompt under one fixed
forward-cost table, so two versions of refdecode can be compared step for step.

    python -m scripts.fixed_cost_drafts OUT.json [--n 4] [--seed 0]

Writes {request id: [steps, accept lengths per step, token ids]}. Two trees give identical files exactly when
their drafting and policy decisions are the same; speed is measured by scripts.bench, not here.
"""

from __future__ import annotations

import argparse
import json

import torch

import refdecode
from refdecode.bench.runner import render_prompt
from refdecode.bench.workloads import load_workload
from refdecode.policy import DraftPolicy
from scripts.replay_drafts import COSTS as COST_TABLES
from scripts.replay_drafts import FixedCosts

# cost(k) / cost(1) of SmolLM2 on a 2-core CPU with transformers' kernels (the table replay_drafts calls "cpu")
COSTS = COST_TABLES["cpu"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, tok = refdecode.load_model("smollm2-135m")
    results = {}
    for workload in ("code-edit", "code-edit-ref"):
        for request in load_workload(workload, n=args.n, seed=args.seed, tokenizer=tok):
            store = None
            if request.references:
                store = refdecode.ReferenceStore(tok)
                for source, text in request.references:
                    store.add(text, source=source)
            policy = DraftPolicy(costs=FixedCosts(dict(COSTS)))
            out = refdecode.generate(
                model, tok, render_prompt(request, tok), store=store, max_new_tokens=args.max_new_tokens, policy=policy
            )
            results[request.id] = (out.stats.steps, out.stats.accept_lengths, out.token_ids)
            print(f"{request.id}: {out.stats.steps} steps, {out.stats.mean_accepted:.2f} tokens per step", flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
