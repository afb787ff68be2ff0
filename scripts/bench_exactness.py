"""How exact can a speculative decoder be in this dtype? The near-ties of greedy's own path, measured.

    python -m scripts.bench_exactness --model qwen2.5-coder-1.5b --dtype bfloat16 \
        [--workloads code-edit ...] [--n 3] [--seed 0] [--max-new-tokens 48] [--width 16] [--threads N] \
        [--results BENCH_DIR/results.json] [--out DIR]

Every speculative method (prompt lookup, assisted generation, refdecode) writes the target's cache with forwards
of several tokens. In float32 those round like one-token forwards to ~1e-5; in bfloat16 they move a logit by a
tenth or more, and where greedy's top two tokens are closer than that, the output may change. For each prompt of
the benchmark's workloads (the same prompts as `scripts.bench` with the same `--seed` and `--n`):

1. greedy: transformers `generate` (one token per forward after the prefill), its logits kept;
2. wide: greedy's own tokens fed back `--width` at a time (the cache then holds wide forwards' rows, as any
   speculative method's does): the first position where a wide forward's argmax is not greedy's token;
3. ideal guard: the same wide cache, but every position's scores recomputed by a one-token forward (the best any
   tie guard can do, at any margin): the first position where even that is not greedy's token. A prompt that
   diverges here diverges for every method whose cache was written by forwards of `--width` tokens, unless it
   happens to cut its forwards elsewhere.

Printed and written (`--out`: exactness.json, exactness.md): per prompt greedy's smallest top-two gap and where it
lies, the largest logit change a wide forward made, the two first divergences, and with `--results` (a
`scripts.bench` results.json of the same prompts) where each method left greedy. The summary counts the prompts
where the ideal guard keeps greedy's path: a measured bound on the identical rate at this width.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

ISSUE_WORKLOADS = ("code-edit", "code-edit-ref", "rag", "summarize", "chat", "spec-bench")  # the benchmark table's six


def top2_gap(rows: torch.Tensor) -> torch.Tensor:
    """[n, V] scores -> [n] gap between the best and the second best score of each row."""
    top = torch.topk(rows.float(), 2, dim=-1).values
    return top[:, 0] - top[:, 1]


@torch.no_grad()
def greedy_with_logits(
    model, prompt_ids: list[int], max_new_tokens: int, pad_id: int
) -> tuple[list[int], torch.Tensor]:
    """transformers greedy: the new tokens and the float32 scores each was chosen from, [n, V] (row 0: the
    prefill's last row)."""
    x = torch.tensor([prompt_ids], device=model.device)
    out = model.generate(
        x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=pad_id,
    )
    tokens = out.sequences[0, len(prompt_ids) :].tolist()
    return tokens, torch.stack([row[0].float() for row in out.logits])


@torch.no_grad()
def wide_replay(model, prompt_ids: list[int], tokens: list[int], width: int) -> dict:
    """Greedy's tokens fed back `width` at a time after the prompt's prefill. Returns the argmax of every position
    from the wide forwards ("wide") and from one-token forwards over the wide forwards' cache ("guarded"), and
    the largest |logit change| of a wide row against that position's one-token row."""
    from transformers import DynamicCache

    from refdecode.decoding import _crop
    from refdecode.kernels import forward_tokens

    if any(kind != "full_attention" for kind in getattr(model.config, "layer_types", None) or ()):
        raise ValueError("bench_exactness replays full-attention models only (this one has sliding-window layers)")
    cache = DynamicCache(config=model.config)
    ids = torch.tensor([prompt_ids], device=model.device)
    first = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1].float()
    wide, guarded, moved = [int(first.argmax())], [int(first.argmax())], 0.0
    position = 0  # tokens[:position] are in the cache
    while position < len(tokens) - 1:
        chunk = tokens[position : min(position + width, len(tokens) - 1)]
        past = cache.get_seq_length()
        rows = forward_tokens(model, cache, chunk)  # [w, V]: the scores after each chunk token
        wide.extend(int(i) for i in rows.argmax(dim=-1))
        narrow = []
        for i in range(len(chunk) - 1, -1, -1):  # right to left: each crop drops only rows already used
            _crop(cache, cache.get_seq_length() - (past + i))
            narrow.append(forward_tokens(model, cache, [chunk[i]])[0])
        narrow.reverse()
        narrow_rows = torch.stack(narrow)
        guarded.extend(int(i) for i in narrow_rows.argmax(dim=-1))
        moved = max(moved, (rows - narrow_rows).abs().max().item())
        _crop(cache, cache.get_seq_length() - past)
        forward_tokens(model, cache, chunk)  # the wide forward's rows back in the cache for the next chunk
        position += len(chunk)
    return {"wide": wide, "guarded": guarded, "moved": moved}


def method_divergences(results_path: str | Path | None) -> dict[str, dict[str, int | None]]:
    """{request id: {method: first mismatch with greedy (None: identical)}} from a scripts.bench results.json."""
    if results_path is None:
        return {}
    path = Path(results_path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read benchmark results {path}: {e}") from None
    out: dict[str, dict[str, int | None]] = {}
    for record in data.get("records", []):
        if record.get("method") == "greedy" or "matches_greedy" not in record:
            continue
        out.setdefault(record["request_id"], {})[record["method"]] = record.get("first_mismatch")
    return out


def measure(model, tokenizer, requests, *, max_new_tokens: int, width: int, log=print) -> list[dict]:
    """One row per prepared request (see the module docstring)."""
    from refdecode.bench.runner import _pad_id, first_mismatch

    rows = []
    for k, request in enumerate(requests, start=1):
        tokens, logits = greedy_with_logits(model, request.prompt_ids, max_new_tokens, _pad_id(model))
        gaps = top2_gap(logits)
        replay = wide_replay(model, request.prompt_ids, tokens, width)
        row = {
            "request_id": request.id,
            "workload": request.workload,
            "new_tokens": len(tokens),
            "smallest_gap": round(float(gaps.min()), 5),
            "smallest_gap_at": int(gaps.argmin()),
            "gaps_below_0.25": int((gaps < 0.25).sum()),
            "largest_move": round(replay["moved"], 5),
            "wide_diverges_at": first_mismatch(replay["wide"], tokens),
            "guarded_diverges_at": first_mismatch(replay["guarded"], tokens),
        }
        rows.append(row)
        log(
            f"[{k}/{len(requests)}] {request.id}: smallest gap {row['smallest_gap']:.4f} at {row['smallest_gap_at']}, "
            f"wide moves up to {row['largest_move']:.3f}, wide diverges at {row['wide_diverges_at']}, "
            f"ideal guard at {row['guarded_diverges_at']}"
        )
    return rows


def summarize(rows: list[dict], divergences: dict[str, dict[str, int | None]], width: int) -> str:
    """The markdown table and the summary lines."""
    methods = sorted({m for per in divergences.values() for m in per})
    head = ["prompt", "smallest gap (at)", "gaps < 0.25", "largest move", f"wide x{width} leaves at", "ideal guard"]
    lines = ["| " + " | ".join(head + methods) + " |", "|" + "---|" * (len(head) + len(methods))]
    for r in rows:
        cells = [
            r["request_id"],
            f"{r['smallest_gap']:.4f} ({r['smallest_gap_at']})",
            str(r["gaps_below_0.25"]),
            f"{r['largest_move']:.3f}",
            "-" if r["wide_diverges_at"] is None else str(r["wide_diverges_at"]),
            "-" if r["guarded_diverges_at"] is None else str(r["guarded_diverges_at"]),
        ]
        per = divergences.get(r["request_id"], {})
        cells += ["-" if per.get(m) is None else str(per[m]) for m in methods]
        lines.append("| " + " | ".join(cells) + " |")
    n = len(rows)
    kept_wide = sum(r["wide_diverges_at"] is None for r in rows)
    kept_guard = sum(r["guarded_diverges_at"] is None for r in rows)
    lines += [
        "",
        f"Greedy's path kept by wide forwards of {width}: {kept_wide}/{n}; by the ideal guard over their cache: "
        f"{kept_guard}/{n} (a measured bound on the identical rate of a method whose cache is written {width} "
        "tokens at a time). '-': identical to greedy.",
    ]
    for m in methods:
        same = sum(divergences.get(r["request_id"], {}).get(m, 0) is None for r in rows)
        lines.append(f"- {m}: identical on {same}/{n}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from refdecode.bench.workloads import WORKLOADS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--workloads", nargs="+", default=list(ISSUE_WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--n", type=int, default=3, help="prompts per workload (as scripts.bench)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--width", type=int, default=16, help="tokens per wide forward (default 16)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--results", default=None, help="a scripts.bench results.json of the same prompts")
    parser.add_argument("--out", default=None, help="folder for exactness.json and exactness.md")
    args = parser.parse_args(argv)
    if args.n < 1 or args.max_new_tokens < 2 or args.width < 2:
        parser.error("--n must be >= 1, --max-new-tokens >= 2 and --width >= 2")
    if args.threads:
        torch.set_num_threads(args.threads)

    import refdecode
    from refdecode.bench.runner import prepare_requests

    try:
        divergences = method_divergences(args.results)
        model, tokenizer = refdecode.load_model(args.model, dtype=args.dtype)
        requests = prepare_requests(args.workloads, args.n, args.seed, tokenizer)
        rows = measure(model, tokenizer, requests, max_new_tokens=args.max_new_tokens, width=args.width)
    except ValueError as err:  # unknown model or dtype, missing data, unreadable results, a sliding window: one line
        print(f"bench_exactness: {err}", file=sys.stderr)
        return 2
    table = summarize(rows, divergences, args.width)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {k: v for k, v in vars(args).items()}
        (out / "exactness.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        (out / "exactness.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
