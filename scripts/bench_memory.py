"""Output memory figure: the same questions asked a second time in other words, with an OutputMemory vs without.

    python -m scripts.bench_memory [--n 20] [--offset 0] [--max-new-tokens 128] [--threads N]
                                   [--model smollm2-135m] [--out results/memory_bench.json]

1) n Python FAQ questions (Debian python3.11-doc, `python -m scripts.prepare_data --only python_docs`), spread
   evenly over the 179 from the `--offset`-th on, are asked once through the chat template with one shared
   OutputMemory, which records every answer (this pass also warms the model up and calibrates the draft policy).
2) Each question is reworded by fixed, generic rules (no model): "How do I X?" -> "What is the way to X?", "Why
   does X?" -> "What is the reason X?", a prefix such as "Quick question: ", or a chat-style next turn such as
   "Can you explain that again: <question>". Each paraphrase is asked with the memory and without it, in the order
   A B / B A alternating per request, greedy, same max_new_tokens; the two outputs must be identical. The memory
   keeps recording in this pass too, as it would serving requests.
`--scale`: instead, the memory's own costs at 100k and 1M tokens held (synthetic outputs of 400 random ids):
record() plus the first lookup after it (mean, p99, max), a lookup alone, save and load.

Printed: tokens/s (new tokens after the first, over the decode time after the prefill, summed over requests),
tokens per verification step, and the ratios with/without; `--out` also writes them and the per-request rows.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

PREFIXES = ("Quick question: ", "I was wondering: ", "Please help. ", "One more thing. ")
NEXT_TURNS = ("Can you explain that again: {q}", "Sorry, I did not follow. {q}", "Let me ask once more: {q}")
REWRITES = (  # (pattern, replacement): the question's own wording changed, the topic kept
    (re.compile(r"^How do I (.+)\?$"), r"What is the way to \1?"),
    (re.compile(r"^How can I (.+)\?$"), r"What is a good way to \1?"),
    (re.compile(r"^How do you (.+)\?$"), r"What is the way to \1?"),
    (re.compile(r"^Why (?:does|do|is|are|must) (.+)\?$"), r"What is the reason \1?"),
    (re.compile(r"^Why (.+)\?$"), r"Could you tell me why \1?"),  # "why don't ...": the negation stays
    (re.compile(r"^Is there (.+)\?$"), r"Does there exist \1?"),
    (re.compile(r"^Can I (.+)\?$"), r"Is it possible to \1?"),
    (re.compile(r"^What is (.+)\?$"), r"Could you tell me what \1 is?"),
    (re.compile(r"^Are there (.+)\?$"), r"Do there exist \1?"),
)


def paraphrase(question: str, k: int) -> str:
    """Question k reworded: a rewrite rule where one fits, then every third one a chat-style next turn and the
    others a prefix, chosen by k (deterministic)."""
    text = question.strip()
    for pattern, replacement in REWRITES:
        if pattern.match(text):
            text = pattern.sub(replacement, text)
            break
    if k % 3 == 2:
        lower = text[0].lower() + text[1:] if text[1:2].islower() else text  # "I ..." and "CPython ..." stay
        return NEXT_TURNS[(k // 3) % len(NEXT_TURNS)].format(q=lower)
    return PREFIXES[k % len(PREFIXES)] + text


def pick_questions(n: int, offset: int = 0) -> list[str]:
    """n FAQ questions spread evenly over the Python FAQ, starting `offset` questions in (another offset: another
    set of questions, to check that a figure is not a property of one set)."""
    from refdecode.bench import data

    pairs = data.faq_pairs()
    if not 1 <= n <= len(pairs):
        raise ValueError(f"--n must be in 1..{len(pairs)}, got {n}")
    if not 0 <= offset < len(pairs):
        raise ValueError(f"--offset must be in 0..{len(pairs) - 1}, got {offset}")
    return [pairs[(i * len(pairs) // n + offset) % len(pairs)]["question"] for i in range(n)]


def _row(out) -> dict:
    s = out.stats
    return {
        "token_ids": out.token_ids,
        "new_tokens": s.new_tokens,
        "steps": s.steps,
        "decode_seconds": s.decode_seconds,
        "tokens_per_second": s.tokens_per_second,
        "tokens_per_step": s.mean_accepted,
        "accepted_sources": dict(getattr(s, "accepted_sources", {}) or {}),
    }


def _totals(rows: list[dict]) -> dict:
    tokens = sum(max(0, r["new_tokens"] - 1) for r in rows)
    seconds = sum(r["decode_seconds"] for r in rows)
    steps = sum(r["steps"] for r in rows)
    return {
        "tokens_per_second": tokens / seconds if seconds else 0.0,
        "tokens_per_step": tokens / steps if steps else 0.0,
        "decode_seconds": seconds,
        "new_tokens": tokens,
    }


def run(model, tokenizer, questions: list[str], *, max_new_tokens: int = 128, progress=print) -> dict:
    """Pass 1 (originals, recording) and pass 2 (paraphrases, with vs without memory). -> the figures and rows"""
    import refdecode

    memory = refdecode.OutputMemory()
    first = []
    for q in questions:  # 1) originals: recorded in the memory
        out = refdecode.generate(model, tokenizer, q, chat=True, max_new_tokens=max_new_tokens, memory=memory)
        first.append(_row(out))
        progress(f"  pass 1: {out.stats.new_tokens} tokens, {out.stats.mean_accepted:.2f} per step: {q[:60]!r}")
    rows = []
    for k, q in enumerate(questions):  # 2) paraphrases, A B / B A
        para = paraphrase(q, k)
        arms = ("with", "without") if k % 2 == 0 else ("without", "with")
        got = {}
        for arm in arms:
            out = refdecode.generate(
                model,
                tokenizer,
                para,
                chat=True,
                max_new_tokens=max_new_tokens,
                memory=memory if arm == "with" else None,
            )
            got[arm] = _row(out)
        same = got["with"]["token_ids"] == got["without"]["token_ids"]
        rows.append({"question": q, "paraphrase": para, "identical": same, **{a: got[a] for a in arms}})
        progress(
            f"  pass 2: {got['with']['tokens_per_step']:.2f} vs {got['without']['tokens_per_step']:.2f} tokens per "
            f"step, {got['with']['tokens_per_second']:.1f} vs {got['without']['tokens_per_second']:.1f} tokens/s"
            f"{'' if same else ' OUTPUTS DIFFER'}: {para[:60]!r}"
        )
    with_, without = _totals([r["with"] for r in rows]), _totals([r["without"] for r in rows])
    return {
        "requests": len(questions),
        "max_new_tokens": max_new_tokens,
        "identical": all(r["identical"] for r in rows),
        "with_memory": with_,
        "without_memory": without,
        "speedup_tokens_per_second": (
            with_["tokens_per_second"] / without["tokens_per_second"] if without["tokens_per_second"] else 0.0
        ),
        "ratio_tokens_per_step": (
            with_["tokens_per_step"] / without["tokens_per_step"] if without["tokens_per_step"] else 0.0
        ),
        "memory_outputs": len(memory),
        "memory_tokens": memory.num_tokens,
        "pass1": first,
        "pass2": rows,
    }


def measure_scale(held: int, *, output_len: int = 400, vocab: int = 2000, seed: int = 0) -> dict:
    """Record 1.5x `held` tokens of random outputs into a memory bounded at `held` (eviction included), timing each
    record() with the first lookup after it; then lookups alone, save and load."""
    import tempfile
    import time

    import numpy as np

    from refdecode.memory import OutputMemory

    rng = np.random.default_rng(seed)
    memory = OutputMemory(max_tokens=held)
    times = []
    outputs = [rng.integers(0, vocab, size=output_len).tolist() for _ in range(int(1.5 * held) // output_len)]
    for out in outputs:
        t0 = time.perf_counter()
        memory.record(out)
        memory.longest_suffix(out[:20])
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for i in range(200):
        memory.longest_suffix(outputs[-3][i : i + 12])
    lookup = (time.perf_counter() - t0) / 200
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        memory.save(Path(tmp) / "memory")
        saved = time.perf_counter() - t0
        t0 = time.perf_counter()
        OutputMemory.load(Path(tmp) / "memory")
        loaded = time.perf_counter() - t0
    ms = np.asarray(times) * 1e3
    return {
        "held_tokens": memory.num_tokens,
        "record_and_first_lookup_ms": {"mean": ms.mean(), "p99": np.percentile(ms, 99), "max": ms.max()},
        "lookup_ms": lookup * 1e3,
        "save_s": saved,
        "load_s": loaded,
        "segments": len(memory._segments),
    }


def report(result: dict) -> str:
    w, wo = result["with_memory"], result["without_memory"]
    return "\n".join(
        [
            f"{result['requests']} paraphrased requests, max_new_tokens {result['max_new_tokens']}, outputs "
            f"{'identical' if result['identical'] else 'DIFFERENT'} with and without memory",
            f"  without memory: {wo['tokens_per_second']:.1f} tokens/s, {wo['tokens_per_step']:.2f} tokens per step",
            f"  with memory:    {w['tokens_per_second']:.1f} tokens/s, {w['tokens_per_step']:.2f} tokens per step",
            f"  ratio: {result['speedup_tokens_per_second']:.2f}x tokens/s, {result['ratio_tokens_per_step']:.2f}x "
            f"tokens per step (memory: {result['memory_outputs']} outputs, {result['memory_tokens']} tokens)",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20, help="questions (default 20)")
    parser.add_argument("--offset", type=int, default=0, help="start this many FAQ questions in (another set)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", help="write the figures and per-request rows as JSON here")
    parser.add_argument("--scale", action="store_true", help="measure the memory's own costs at 100k and 1M tokens")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be >= 1")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        import torch

        torch.set_num_threads(args.threads)
    if args.scale:
        for held in (100_000, 1_000_000):
            r = measure_scale(held)
            t = r["record_and_first_lookup_ms"]
            print(
                f"{r['held_tokens']:>9,} tokens held: record + first lookup {t['mean']:.2f} ms mean, {t['p99']:.1f} "
                f"p99, {t['max']:.1f} max; lookup {r['lookup_ms']:.2f} ms ({r['segments']} segments); save "
                f"{r['save_s']:.2f} s, load {r['load_s']:.2f} s"
            )
        return 0
    import refdecode

    try:
        questions = pick_questions(args.n, args.offset)
    except ValueError as err:
        parser.error(str(err))
    model, tokenizer = refdecode.load_model(args.model)
    result = run(model, tokenizer, questions, max_new_tokens=args.max_new_tokens)
    result.update(model=args.model, threads=args.threads)
    print(report(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
    return 0 if result["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
