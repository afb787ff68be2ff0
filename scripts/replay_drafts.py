"""Replay drafting against known greedy outputs: tokens per step of chain and tree under a fixed cost table.

    python -m scripts.replay_drafts RESULTS.json [--costs cpu|cpu-routed|gpu] [--workloads rag chat ...]

RESULTS.json is a benchmark run (`python -m scripts.bench --out DIR`): its config regenerates the same requests
(the data cache must hold their sources) and its greedy records give the target's output. Under greedy decoding
what a step accepts is fully determined by that output: the longest tree path (or chain prefix) that equals it.
So the drafter and the policy can be replayed without the model, in milliseconds per request, and two drafting
strategies compared exactly, step for step, under the same costs. Modelled throughput = committed tokens over
the summed cost of the forwards. It is a development tool: the real figures come from `scripts.bench`.

Knows: the drafter, the policy, the requests of a run. Does not know: models (nothing is run).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

from refdecode.drafters import Draft, ReferenceDrafter
from refdecode.policy import DraftPolicy, ForwardCostModel
from refdecode.tree import DraftTree

# cost(width) / cost(1): SmolLM2 on a 2-core CPU with transformers' kernels (scripts.fixed_cost_drafts), the same
# with refdecode's routed CPU kernels (measured in scripts/results/cpu-issue11-kernels up to 16; 32 and 64
# extrapolated), and on an H200 (nearly flat)
COSTS = {
    "cpu": {1: 1.0, 2: 1.6, 4: 1.8, 8: 2.0, 16: 2.3, 32: 3.3, 64: 4.6},
    "cpu-routed": {1: 1.0, 2: 1.0, 4: 1.0, 8: 1.46, 16: 1.68, 32: 2.6, 64: 4.0},
    "gpu": {1: 1.0, 2: 1.0, 4: 1.01, 8: 1.02, 16: 1.04, 32: 1.08, 64: 1.15},
}


class FixedCosts(ForwardCostModel):
    """A cost table that the decode loop's timings never change."""

    def observe(self, width: int, seconds: float) -> None:
        pass


def accepted_path(tree: DraftTree, truth: list[int]) -> list[int]:
    """The longest root-to-node path that equals the start of `truth`."""
    children = tree.child_map()
    path: list[int] = []
    node = -1
    for token in truth:
        nxt = children.get(node, {}).get(token)
        if nxt is None:
            break
        path.append(nxt)
        node = nxt
    return path


def replay(prompt_ids, references, truth, *, tree: bool, costs: dict, max_draft: int = 64, earlier=None) -> dict:
    """Replay one request; truth = the greedy output (new tokens)."""
    from refdecode.matching import DocumentIndex

    store = None
    if references:
        store = DocumentIndex(1 << 17)
        for _src, ids in references:
            store.add(ids)
    drafter = ReferenceDrafter(prompt_ids, store=store, tree=tree)
    policy = DraftPolicy(costs=FixedCosts(dict(costs)), max_draft=max_draft)
    if earlier is not None:
        policy.inherit(earlier)
    output = truth[:1]
    drafter.observe(output)
    steps, seconds, widths = 0, 0.0, []
    while len(output) < len(truth):
        budget = len(truth) - len(output) - 1
        proposal = drafter.propose(prompt_ids + output, min(budget, max_draft)) if budget > 0 else None
        rest = truth[len(output) :]
        if isinstance(proposal, DraftTree):
            chosen = policy.choose_tree(proposal, budget)
            if chosen is None:
                n, path = 0, []
            else:
                n, path = len(chosen), accepted_path(chosen, rest)
                policy.update_tree(chosen, path, n + 1, costs_of(policy, n + 1))
            accepted = len(path)
        else:
            k = policy.choose_length(proposal, budget) if proposal is not None else 0
            draft = proposal.truncated(k) if isinstance(proposal, Draft) and k else None
            accepted = 0
            while draft is not None and accepted < k and draft.tokens[accepted] == rest[accepted]:
                accepted += 1
            policy.update(draft, k, accepted, k + 1, 0.0)
            n = k
        new = rest[: accepted + 1]
        seconds += policy.costs.cost(n + 1)
        widths.append(n)
        steps += 1
        output += new
        drafter.observe(new)
    decoded = len(truth) - 1
    return {
        "steps": steps,
        "decoded": decoded,
        "seconds": seconds,
        "mean_width": sum(widths) / max(1, len(widths)),
        "policy": policy,
    }


def costs_of(policy: DraftPolicy, width: int) -> float:
    return policy.costs.cost(width)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results")
    p.add_argument("--costs", choices=sorted(COSTS), default="cpu")
    p.add_argument("--workloads", nargs="*", default=None)
    p.add_argument("--carry", action="store_true", help="each request inherits the previous one's policy")
    args = p.parse_args()
    from refdecode.bench.runner import prepare_requests
    from refdecode.models import load_tokenizer

    run = json.load(open(args.results))
    config = run["meta"]["config"]
    tokenizer = load_tokenizer("smollm2-135m")
    workloads = args.workloads or config["workloads"]
    greedy = {r["request_id"]: r["token_ids"] for r in run["records"] if r["method"] == "greedy"}
    oracle = {r["request_id"]: r for r in run["records"] if r["method"] == "oracle"}
    totals: dict = defaultdict(lambda: defaultdict(float))
    last: dict = {}
    for w in workloads:
        try:
            requests = prepare_requests([w], config["n"], config["seed"], tokenizer)
        except Exception as err:  # a data source missing from the cache: skip that workload
            print(f"{w}: skipped ({err})")
            continue
        for req in requests:
            truth = greedy.get(req.id)
            if not truth or len(truth) < 2:
                continue
            for mode in ("chain", "tree"):
                before = last.get(mode) if args.carry else None
                r = replay(
                    req.prompt_ids, req.references, truth, tree=mode == "tree", costs=COSTS[args.costs], earlier=before
                )
                last[mode] = r["policy"]
                t = totals[(w, mode)]
                for key in ("steps", "decoded", "seconds"):
                    t[key] += r[key]
                t["width"] += r["mean_width"]
                t["n"] += 1
            if req.id in oracle:
                totals[(w, "oracle")]["steps"] += oracle[req.id]["steps"]
                totals[(w, "oracle")]["decoded"] += oracle[req.id]["decode_tokens"]
    print(
        f"{'workload':<14} {'chain t/step':>12} {'tree t/step':>12} {'x':>6} {'chain t/cost':>12} "
        f"{'tree t/cost':>12} "
        f"{'x':>6} {'tree width':>10} {'oracle t/step':>13}"
    )
    for w in workloads:
        c, t, o = totals.get((w, "chain")), totals.get((w, "tree")), totals.get((w, "oracle"))
        if not c:
            continue
        cs, ts = c["decoded"] / c["steps"], t["decoded"] / t["steps"]
        cr, tr = c["decoded"] / c["seconds"], t["decoded"] / t["seconds"]
        os_ = o["decoded"] / o["steps"] if o and o["steps"] else float("nan")
        print(
            f"{w:<14} {cs:12.2f} {ts:12.2f} {ts / cs:6.2f} {cr:12.3f} {tr:12.3f} {tr / cr:6.2f} "
            f"{t['width'] / t['n']:10.1f} {os_:13.2f}"
        )


if __name__ == "__main__":
    main()
