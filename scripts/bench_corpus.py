"""Does drafting from a corpus index pay when the prompt holds only the question?
(docs/benchmarks.md, "Corpus drafting and retrieval")

    python -m scripts.bench_corpus --index indexes/pydocs [--n 12] [--max-new-tokens 128] [--threads 1] [--out F]

Build the index first from the Python docs' reST sources (`python -m scripts.prepare_data --only python_docs`):
    refdecode index build ~/.cache/refdecode/data/python_docs/sources --out indexes/pydocs --model smollm2-135m

Each request is a Python FAQ question alone in a chat prompt (no passages: the model answers from what it knows,
and the corpus holds the docs it was likely trained on). Methods, greedy, alternated per request A B C C B A so
drift cancels: `plain` (refdecode without an index: prompt and output only), `index` (the same with
`index=` the corpus: retrieved passages and the corpus span index join the tree), `index-chain` (the index with
tree=False, the voted chain that consults the corpus only when nothing local matches). Outputs must be identical
(greedy); the table gives tokens per step and decoding throughput, and their ratios to `plain`.

Knows: FAQ questions (refdecode.bench.data), timing, the table. Does not know: drafting.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

METHODS = ("plain", "index", "index-chain")


def questions(n: int, seed: int) -> list[dict]:
    from refdecode.bench.data import faq_pairs

    pairs = faq_pairs()
    random.Random(seed).shuffle(pairs)
    return pairs[:n]


def run_one(model, tokenizer, prompt_ids, method: str, index, max_new_tokens: int) -> dict:
    from refdecode import generate

    kwargs = {"index": index} if method != "plain" else {}
    t0 = time.perf_counter()
    out = generate(model, tokenizer, prompt_ids, max_new_tokens=max_new_tokens, tree=method != "index-chain", **kwargs)
    e2e = time.perf_counter() - t0
    s = out.stats
    return {
        "method": method,
        "token_ids": out.token_ids,
        "new_tokens": s.new_tokens,
        "steps": s.steps,
        "decode_seconds": s.decode_seconds,
        "e2e_seconds": e2e,
        "accepted_sources": dict(s.accepted_sources),
    }


def summarize(records: list[dict]) -> dict:
    by: dict[str, dict] = {}
    for m in METHODS:
        rows = [r for r in records if r["method"] == m]
        decoded = sum(r["new_tokens"] - 1 for r in rows)
        steps = sum(r["steps"] for r in rows)
        seconds = sum(r["decode_seconds"] for r in rows)
        sources: dict[str, int] = {}
        for r in rows:
            for k, v in r["accepted_sources"].items():
                sources[k] = sources.get(k, 0) + v
        by[m] = {
            "tokens_per_step": decoded / steps if steps else 0.0,
            "tokens_per_second": decoded / seconds if seconds else 0.0,
            "e2e_seconds": sum(r["e2e_seconds"] for r in rows),
            "accepted_sources": sources,
        }
    base = by["plain"]
    for m in METHODS:
        by[m]["steps_ratio"] = by[m]["tokens_per_step"] / base["tokens_per_step"] if base["tokens_per_step"] else 0
        by[m]["speed_ratio"] = (
            by[m]["tokens_per_second"] / base["tokens_per_second"] if base["tokens_per_second"] else 0
        )
    return by


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--index", required=True, help="a corpus index of the Python docs")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--n", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", help="write the records and the summary as JSON here")
    args = p.parse_args(argv)
    import torch

    from refdecode import load_model
    from refdecode.corpus import CorpusIndex
    from refdecode.inputs import prepare_prompt

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    index = CorpusIndex.load(args.index, tokenizer=tokenizer)
    faqs = questions(args.n, args.seed)
    warm = prepare_prompt(tokenizer, faqs[0]["question"], chat=True)
    for m in METHODS:  # warm-up: calibration, caches, first-call costs
        run_one(model, tokenizer, warm, m, index, 8)
    records, mismatches = [], 0
    for i, faq in enumerate(faqs):
        prompt_ids = prepare_prompt(tokenizer, faq["question"], chat=True)
        order = METHODS if i % 2 == 0 else METHODS[::-1]
        outs = {m: run_one(model, tokenizer, prompt_ids, m, index, args.max_new_tokens) for m in order}
        if len({tuple(o["token_ids"]) for o in outs.values()}) != 1:
            mismatches += 1
        for o in outs.values():
            o["id"] = faq["id"]
            records.append(o)
        print(
            f"[{i + 1}/{len(faqs)}] {faq['id']}: "
            + ", ".join(f"{m} {o['new_tokens'] - 1}/{o['steps']} steps" for m, o in outs.items()),
            file=sys.stderr,
        )
    summary = summarize(records)
    print(f"{'method':<12} {'tok/step':>9} {'x plain':>8} {'tok/s':>8} {'x plain':>8}  accepted by source")
    for m, s in summary.items():
        print(
            f"{m:<12} {s['tokens_per_step']:9.2f} {s['steps_ratio']:8.2f} {s['tokens_per_second']:8.1f} "
            f"{s['speed_ratio']:8.2f}  {s['accepted_sources']}"
        )
    print(f"outputs identical across methods: {len(faqs) - mismatches}/{len(faqs)}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "summary": summary, "records": records}, indent=1))
    return 0 if mismatches == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
