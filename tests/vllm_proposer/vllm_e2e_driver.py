"""Driver of the end-to-end vLLM test (tests/test_vllm_e2e.py): one engine, one method, a mixed batch, JSON out.

    python tests/vllm_e2e_driver.py --method none|ngram|refdecode --out result.json

Runs SmolLM2 (refdecode's converted checkpoint) greedily on a batch of requests with and without per-request
references, and writes each request's output token ids; with --method refdecode, SpyProposer (refdecode's proposer,
recording every draft it returns with the request's tag) writes the drafts next to it. Not a test module itself:
vLLM must be created under `if __name__ == "__main__"`, in a process of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from refdecode.vllm import Proposer

K = 6

# An "old file" given to one request as a reference only; its marker comment occurs nowhere else, so a draft holding
# the marker's tokens for another request (same prompt, no reference) would be a leak.
MARKER = "# Xylophone quagmire zeppelin"
OLD_FILE = f'''import math


def area(radius):
    """Area of a circle."""
    return math.pi * radius ** 2


def circumference(radius):
    """Circumference of a circle."""
    {MARKER}
    return 2 * math.pi * radius


def describe(radius):
    return f"circle r={{radius}}: area {{area(radius):.2f}}, circumference {{circumference(radius):.2f}}"
'''
PROMPT_FILE = 'import math\n\n\ndef area(radius):\n    """Area of a circle."""\n'
OTHER_REF = "The quick brown fox jumps over the lazy dog. The quick brown fox naps under the old oak tree.\n"

# (tag, prompt, references): the same prompt with and without the reference, a chat-style repeat, one more ref
REQUESTS = [
    ("with-ref", PROMPT_FILE, [OLD_FILE]),
    ("no-ref", PROMPT_FILE, None),
    (
        "repeat",
        "Copy this list exactly.\nred, green, blue, cyan, magenta, yellow, black, white\nred, green, blue, cyan,",
        None,
    ),
    ("fox", "Finish the story. The quick brown fox", [OTHER_REF]),
]


class SpyProposer(Proposer):
    """refdecode's proposer, appending {"tag", "at", "draft"} of every non-empty draft to $REFDECODE_SPY (JSON
    lines); `at` is the request's length (prompt + output) the draft was to follow."""

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None):
        drafts = super().propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings)
        assert self._batch is not None
        req_ids, extra_args, _ = self._batch
        with open(os.environ["REFDECODE_SPY"], "a") as f:
            for row, (req_id, draft) in enumerate(zip(req_ids, drafts, strict=True)):
                if draft and req_id is not None:
                    tag = (extra_args(req_id) or {}).get("tag")
                    at = int(num_tokens_no_spec[row])
                    f.write(json.dumps({"tag": tag, "at": at, "draft": draft}) + "\n")
        return drafts


def checkpoint() -> str:
    root = Path(os.environ.get("REFDECODE_CACHE", Path.home() / ".cache" / "refdecode"))
    return str(root / "models" / "smollm2-135m")


def speculative_config(method: str) -> dict | None:
    if method == "none":
        return None
    if method == "ngram":
        return {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
    return {"method": "custom_class", "model": "vllm_e2e_driver.SpyProposer", "num_speculative_tokens": K}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", choices=["none", "ngram", "refdecode"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=checkpoint(),
        dtype="float32",
        max_model_len=1024,
        max_num_seqs=8,
        seed=0,
        speculative_config=speculative_config(args.method),
        enforce_eager=True,
        kv_cache_memory_bytes=1 << 30,
    )
    params = [
        SamplingParams(
            temperature=0.0,
            max_tokens=args.max_tokens,
            ignore_eos=False,
            extra_args={"tag": tag, **({"references": refs} if refs else {})},
        )
        for tag, _, refs in REQUESTS
    ]
    outputs = llm.generate([prompt for _, prompt, _ in REQUESTS], params, use_tqdm=False)
    result = {tag: list(out.outputs[0].token_ids) for (tag, _, _), out in zip(REQUESTS, outputs, strict=True)}
    prompts = {tag: list(out.prompt_token_ids) for (tag, _, _), out in zip(REQUESTS, outputs, strict=True)}
    texts = {tag: out.outputs[0].text for (tag, _, _), out in zip(REQUESTS, outputs, strict=True)}
    marker_ids = llm.get_tokenizer().encode(MARKER, add_special_tokens=False)
    Path(args.out).write_text(
        json.dumps({"token_ids": result, "prompt_ids": prompts, "texts": texts, "marker_ids": marker_ids})
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
