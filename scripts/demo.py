"""The demo: a real model edits a real source file, streamed, then timed against plain decoding in the same run.

    python -m scripts.demo [--model qwen2.5-coder-1.5b] [--dtype bfloat16] [--file PATH] [--max-new-tokens N]

The file (default: refdecode/files.py, this repository's own reader of user files) is sent with an edit request
and also given as a reference; refdecode streams the edited file as drafts are accepted. Then transformers' plain
greedy `generate` writes the same number of tokens, and the demo prints both decoding throughputs (new tokens after
the first, over the time after the first), the speed-up, and whether the two outputs are the same tokens.
`make demo` installs the Qwen2.5-Coder parts first (`make models`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import refdecode
from refdecode.bench.runner import run_hf
from refdecode.files import read_text
from refdecode.inputs import prepare_prompt

DEFAULT_FILE = Path(__file__).resolve().parents[1] / "refdecode" / "files.py"
REQUEST = (
    "Add a keyword argument `max_bytes: int | None = None` to `read_text`: when it is set and the file is larger, "
    "raise a ValueError saying so, in the style of the other messages. Keep everything else exactly as it is and "
    "output the whole updated module in one ```python block.\n\n```python\n{code}```"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-1.5b")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--file", type=Path, default=DEFAULT_FILE, help="the source file to edit")
    parser.add_argument("--max-new-tokens", type=int, default=400)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    try:
        code = read_text(args.file, "source")
        if args.max_new_tokens < 2:
            raise ValueError("--max-new-tokens must be at least 2")
        if args.threads:
            torch.set_num_threads(args.threads)
        print(f"loading {args.model} ({args.dtype}) ...", file=sys.stderr)
        model, tokenizer = refdecode.load_model(args.model, dtype=args.dtype)
    except ValueError as err:  # ModelNotFoundError included: names the package to install
        print(f"demo: {err}", file=sys.stderr)
        return 2
    prompt_ids = prepare_prompt(tokenizer, REQUEST.format(code=code), chat=True)
    store = refdecode.ReferenceStore(tokenizer)
    store.add(code, source=str(args.file))

    # 1) refdecode, streamed
    from transformers import TextStreamer

    print(f"--- refdecode edits {args.file} ---", file=sys.stderr)
    out = refdecode.generate(
        model,
        tokenizer,
        prompt_ids,
        store=store,
        max_new_tokens=args.max_new_tokens,
        streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
    )
    s = out.stats
    ours = (s.new_tokens - 1) / s.decode_seconds if s.decode_seconds > 0 and s.new_tokens > 1 else None

    # 2) plain greedy decoding of the same number of tokens, for the speed-up measured in this run
    print(f"--- plain greedy decoding of the same {len(out.token_ids)} tokens, for comparison ...", file=sys.stderr)
    plain = run_hf(model, prompt_ids, len(out.token_ids), "greedy")
    same = plain["token_ids"] == list(out.token_ids)
    theirs = plain["tokens_per_second"]
    speedup = ours / theirs if ours and theirs else float("nan")
    print(
        f"refdecode: {s.new_tokens} tokens, {_rate(ours)} after the first ({s.steps} steps, "
        f"{s.accepted_tokens}/{s.drafted_tokens} drafted tokens accepted)\n"
        f"plain greedy: {_rate(theirs)}\n"
        f"speed-up: {speedup:.2f}x; output identical to plain greedy: {'yes' if same else 'no'}"
        + ("" if same or args.dtype == "float32" else f" ({args.dtype} rounds wide and narrow forwards differently)"),
        file=sys.stderr,
    )
    return 0


def _rate(tps: float | None) -> str:
    return f"{tps:.2f} tokens/s" if tps else "-"


if __name__ == "__main__":
    sys.exit(main())
