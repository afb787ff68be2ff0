"""How many tokens per step can trees of copied candidates and free prophets commit? Greedy outputs replayed with
every draft verified for free (issues 11 and 12: are their goals within reach of these drafters at all?).

    python -m scripts.prophet_bound [--n 6] [--seed 1] [--k 16] [--workloads ...] [--outputs FILE] [--out table.md]

Each request's greedy output (refdecode.generate, exactly transformers' greedy) is replayed step by step. Every
step a drafter proposes after the context (prompt + output so far), the longest proposed path that agrees with the
output is committed plus the model's own next token, and the drafter observes what was committed, as in the
decode loop. Verification costs nothing here, however wide: the figures bound what a policy that prunes these
drafts can reach (it only removes nodes), and a GPU, where width is nearly free, comes closest. Methods:

  chain          refdecode's ReferenceDrafter, chain mode: the voted chain, up to K tokens
  tree           the same drafter in tree mode: every candidate of every source merged into one trie, the deepest
                 agreeing path committed
  recycle        self:recycle alone (refdecode.drafters.RecycleDrafter): its table filled with the teacher-forced
                 rows of the committed tokens (a bound too: the real loop also records rejected rows), a tree of
                 up to --recycle-nodes nodes
  tree+recycle   both trees merged (refdecode.drafters.merge_trees)
  wide-N         a wider candidate set than refdecode's: what followed every occurrence of every context suffix
                 (1 to 12 tokens) in the context and the references, merged into a trie, its N most frequent
                 nodes kept (a node is never more frequent than its parent, so they form a tree). N = 16 and 64:
                 on the CPU a 17-token forward costs ~1.6 one-token forwards, a 65-token one ~3
  copy-oracle    any drafter that copies: the longest prefix of the rest of the output (up to K) found anywhere in
                 the context or the references, drafted exactly. It knows the output

Prints tokens per step and each method's ratio against the chain, per workload.

Knows: replaying outputs, the drafters' interfaces. Does not know: timing (scripts.bench measures that).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scripts.vllm_draft_sim import deepest_agreeing_path, longest_copy, ratio_header

WORKLOADS = ("chat", "summarize", "spec-bench", "rag", "code-edit-ref")
METHODS = ("chain", "tree", "recycle", "tree+recycle", "wide-16", "wide-64", "copy-oracle")
TOP = 8  # successors recorded per token, as SuccessorTable's default


def greedy_outputs(args: argparse.Namespace) -> list[dict]:
    """The requests with their greedy outputs and, per output position j, the top-TOP tokens and probabilities of
    the row that chose output token j (teacher-forced), read from --outputs when that file exists, else generated
    (and written there when --outputs is given)."""
    if args.outputs and Path(args.outputs).exists():
        return json.loads(Path(args.outputs).read_text())
    import torch

    import refdecode
    from refdecode.bench.runner import prepare_requests

    model, tokenizer = refdecode.load_model(args.model)
    requests = []
    for request in prepare_requests(args.workloads, args.n, args.seed, tokenizer):
        out = refdecode.generate(model, tokenizer, request.prompt_ids, max_new_tokens=args.max_tokens)
        ids = request.prompt_ids + list(out.token_ids)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, len(request.prompt_ids) - 1 : -1].float()
        top = torch.topk(torch.softmax(logits, dim=-1), TOP, dim=-1)
        requests.append(
            {
                "id": request.id,
                "workload": request.workload,
                "prompt": request.prompt_ids,
                "output": list(out.token_ids),
                "references": [[source, ids] for source, ids in request.references],
                "top_ids": top.indices.tolist(),
                "top_probs": top.values.tolist(),
            }
        )
        print(f"  {request.id}: {len(out.token_ids)} tokens", file=sys.stderr)
    if args.outputs:
        Path(args.outputs).write_text(json.dumps(requests))
    return requests


def replay(request: dict, method: str, args: argparse.Namespace, tokenizer) -> tuple[int, int]:
    """(tokens committed after the first, steps) for one request and one method."""
    from refdecode import ReferenceStore
    from refdecode.drafters import Draft, RecycleDrafter, ReferenceDrafter, SuccessorTable, merge_trees
    from refdecode.tree import DraftTree

    prompt, output = request["prompt"], request["output"]
    references = [ids for _, ids in request["references"]]
    store = None
    if references:
        store = ReferenceStore(tokenizer)
        for source, ids in request["references"]:
            store.add(ids, source=source)
    drafter = ReferenceDrafter(prompt, store=store, tree=method != "chain")
    table = SuccessorTable(k=TOP)
    recycle = RecycleDrafter(table, max_nodes=args.recycle_nodes)
    drafter.observe(output[:1])
    vocab = 1 + max(max(max(ids) for ids in request["top_ids"]), *prompt, *output)
    t, steps = 0, 0  # output[t] is the pending token
    while t + 1 < len(output):
        context = prompt + output[: t + 1]
        rest = output[t + 1 : t + 1 + args.k]
        if method == "copy-oracle":
            accepted = longest_copy([context, *references], rest)
        elif method.startswith("wide-"):
            accepted = deepest_agreeing_path(wide_tree([context, *references], args.k, int(method[5:])), rest)
        else:
            tree = None
            if method != "recycle":
                found = drafter.propose(context, args.k)
                tree = DraftTree.chain(found.tokens, source="reference") if isinstance(found, Draft) else found
            if method in ("recycle", "tree+recycle"):
                guess = recycle.grow(output[t], args.k)
                tree = guess if tree is None or not len(tree) else (merge_trees(tree, guess) if guess else tree)
            accepted = deepest_agreeing_path(tree, rest) if tree is not None else 0
        committed = output[t + 1 : t + 2 + accepted]  # the agreeing draft and the model's own token after it
        # the verified rows of the committed path (input output[r], scoring output[r + 1]), within the output
        rows = [r for r in range(t, t + 1 + accepted) if r + 1 < len(output)]
        table.update([output[r] for r in rows], _rows(request, [r + 1 for r in rows], vocab))
        drafter.observe(committed)
        t += len(committed)
        steps += 1
    return len(output) - 1, steps


def wide_tree(texts: list[list[int]], k: int, nodes: int, longest: int = 12):
    """The `nodes` most frequent nodes of the trie of what followed every occurrence of every suffix (1..longest
    tokens) of texts[0] in any of texts (texts[0]'s own suffix excluded), each continuation up to k tokens."""
    from refdecode.tree import DraftTree

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
    tokens, parents = [], []
    for path in kept:
        if len(path) > 1 and path[:-1] not in index:
            continue  # a tie with its parent cut the parent off: leave the orphan out
        index[path] = len(tokens)
        tokens.append(path[-1])
        parents.append(index[path[:-1]] if len(path) > 1 else -1)
    return DraftTree(tokens, parents)


def _rows(request: dict, positions: list[int], vocab: int):
    """Logits rows rebuilt from the stored top-TOP (log-probabilities, the rest at -inf): SuccessorTable keeps a
    row's top-TOP tokens, so it records the same tokens the full row would give (their probabilities renormalised
    over the TOP, which keeps each node's successors in order)."""
    import torch

    rows = torch.full((len(positions), vocab), float("-inf"))
    for i, j in enumerate(positions):
        rows[i, request["top_ids"][j]] = torch.tensor(request["top_probs"][j]).log()
    return rows


def table(totals: dict, args: argparse.Namespace) -> str:
    lines = [
        f"Free verification, K = {args.k}, recycle trees of up to {args.recycle_nodes} nodes, "
        f"{args.n} requests per workload, seed {args.seed}, {args.max_tokens} new tokens.",
        "",
        *ratio_header(METHODS, "tokens/step"),
    ]
    for workload, rows in totals.items():
        per_step = {m: rows[m][0] / max(1, rows[m][1]) for m in METHODS}
        cells = " | ".join(f"{per_step[m]:.2f}" for m in METHODS)
        ratios = " | ".join(f"{per_step[m] / per_step['chain']:.2f}x" for m in METHODS[1:])
        lines.append(f"| {workload} | {cells} | {ratios} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=6, help="requests per workload (default 6)")
    parser.add_argument("--seed", type=int, default=1, help="workload sampling seed (default 1: not the benchmark's)")
    parser.add_argument("--k", type=int, default=16, help="deepest draft (default 16)")
    parser.add_argument("--recycle-nodes", type=int, default=24, help="largest recycle tree (default 24)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--outputs", help="JSON file of greedy outputs: read when it exists, else written")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    for name in ("n", "k", "recycle_nodes", "max_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from refdecode import load_tokenizer

    requests = greedy_outputs(args)
    tokenizer = load_tokenizer(args.model)
    totals: dict = {}
    for request in requests:
        rows = totals.setdefault(request["workload"], {m: [0, 0] for m in METHODS})
        for method in METHODS:
            tokens, steps = replay(request, method, args, tokenizer)
            rows[method][0] += tokens
            rows[method][1] += steps
    text = table(totals, args)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
