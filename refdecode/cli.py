"""The `refdecode` command line: generate and calibrate, plus the `index`, `bench` and `heads` command groups.

Knows: argument parsing, reading prompt/reference files, printing text, streams and JSON, and turning every
expected failure (missing or non-UTF-8 file, empty prompt, unknown model, bad option, unavailable device) into one
line on stderr and exit status 2; anything unexpected is one line naming the exception type and exit status 1.
Does not know: how decoding works (it calls refdecode.generate).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import cost_cache, kernels
from .files import read_text

__all__ = ["main", "build_parser"]


class CliError(Exception):
    """An expected failure: printed as one line, exit status 2."""


def _read_text(path: str, what: str) -> str:
    try:
        return read_text(path, what)
    except ValueError as err:
        raise CliError(str(err)) from None


def _check_utf8(text: str, what: str) -> None:
    """Command-line bytes that are not UTF-8 reach Python as lone surrogates (PEP 383), which tokenizers reject."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise CliError(f"{what} is not valid UTF-8 (an undecodable byte at character {err.start})") from None


def _add_model_options(p, *, dtype: bool = True) -> None:
    """--model and --device (and --dtype), as every command that loads the target takes them."""
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m, gemma3-270m, or a local checkpoint dir")
    p.add_argument("--device", default="cpu")
    if dtype:
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def _add_generate(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text with reference drafting")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument("--prompt-file", help="read the prompt from a UTF-8 file")
    _add_model_options(p)
    p.add_argument("--ref", action="append", default=[], metavar="FILE", help="a reference file (repeatable)")
    p.add_argument("--index", help="a corpus index directory built with `refdecode index build`")
    p.add_argument(
        "--rerank",
        type=int,
        default=0,
        metavar="N",
        help="with --index: the model reranks the embedding search's top N passages (default: 0, off)",
    )
    p.add_argument(
        "--memory",
        metavar="DIR",
        help="an output memory folder: past outputs draft for this one, which is added and saved back (created if "
        "missing; a folder that is not an output memory is refused, never overwritten)",
    )
    p.add_argument(
        "--drafter",
        "--draft-model",
        dest="drafter",
        metavar="NAME",
        help="a model drafter beside the references: a known model name or checkpoint folder sharing the "
        "tokenizer, self:int8 (the model quantized, CPU), self:layers=N (its first N layers), self:heads "
        "(heads trained with `refdecode heads train`), or self:recycle (what the model itself predicted earlier); "
        "--draft-model is the same option under its older name",
    )
    p.add_argument("--no-tree", action="store_true", help="verify one draft chain per step instead of a token tree")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="makes sampling repeatable")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="a stop string (repeatable)")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    p.add_argument("--max-draft", type=int, default=128, help="longest draft verified in one forward")
    p.add_argument("--json", action="store_true", help="print one JSON object with the text and statistics")
    p.add_argument("--stream", action="store_true", help="print tokens as they are accepted")
    p.add_argument("--stats", action="store_true", help="print a line of decoding statistics to stderr")
    p.set_defaults(func=_run_generate)


class _PrintStreamer:
    """Prints decoded text as tokens arrive (the prompt, which comes first, is skipped)."""

    def __init__(self, tokenizer, stream):
        self.tokenizer, self.stream = tokenizer, stream
        self.tokens: list[int] = []
        self.printed = 0
        self.seen_prompt = False

    def put(self, value) -> None:
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        self.tokens.extend(int(t) for t in value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the next token
            return
        self.stream.write(text[self.printed :])
        self.stream.flush()
        self.printed = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        self.stream.write(text[self.printed :] + "\n")
        self.stream.flush()


def _check_reference_sizes(paths: list[str]) -> None:
    """Refuse reference files that a ReferenceStore cannot hold before reading any of them (a 1 GB file would be
    read whole first): their sizes come from the file system."""
    from .store import MAX_STORE_BYTES

    total = 0
    for path in paths:
        try:
            total += os.stat(path).st_size
        except OSError:
            continue  # missing or unreadable: _read_text names the problem
        if total > MAX_STORE_BYTES:
            raise CliError(
                f"the reference files are too large for drafting in memory ({total:,} bytes up to {path}; "
                f"at most {MAX_STORE_BYTES:,}): index a corpus with `refdecode index build SRC --out DIR` "
                "and pass --index DIR"
            )


def _run_generate(args) -> int:
    import refdecode

    if args.max_new_tokens < 1:
        raise CliError("--max-new-tokens must be at least 1")
    prompt = args.prompt if args.prompt is not None else _read_text(args.prompt_file, "prompt")
    if not prompt.strip():
        raise CliError("the prompt is empty")
    _check_utf8(prompt, "--prompt")
    for stop in args.stop:
        _check_utf8(stop, "--stop")
    _check_reference_sizes(args.ref)
    references = [(path, _read_text(path, "reference")) for path in args.ref]
    for path, text in references:
        if not text.strip():
            raise CliError(f"reference file is empty: {path}")
    if args.index and not Path(args.index).is_dir():
        raise CliError(f"index directory not found: {args.index}")
    if args.rerank < 0 or (args.rerank and not args.index):
        raise CliError("--rerank N needs N >= 0 and an --index to rerank passages from")
    if args.drafter is not None:
        from .drafters import check_drafter_spec

        check_drafter_spec(args.drafter)  # a misspelt self: name fails before the model loads
    memory = _open_memory(args.memory) if args.memory else None  # checked before the model loads
    model, tokenizer = refdecode.load_model(args.model, dtype=args.dtype, device=args.device)
    store = refdecode.ReferenceStore(tokenizer)
    context = getattr(model.config, "max_position_embeddings", None)
    for path, text in references:
        doc = store.add(text, source=path)
        n = store.documents[doc].num_tokens
        if context and n > context:
            print(
                f"refdecode: note: {path} has {n} tokens, more than the model's context ({context}); "
                "it is only copied from, never fed to the model",
                file=sys.stderr,
            )
    streamer = _PrintStreamer(tokenizer, sys.stderr if args.json else sys.stdout) if args.stream else None
    out = refdecode.generate(
        model,
        tokenizer,
        prompt,
        store=store if len(store) else None,
        index=args.index,
        rerank=args.rerank,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop,
        chat=args.chat,
        streamer=streamer,
        max_draft=args.max_draft,
        tree=not args.no_tree,
        memory=memory,
        drafter=args.drafter,
    )
    if args.json:
        record = {"text": out.text, "token_ids": out.token_ids, **out.stats.as_dict(), "stop_reason": out.stop_reason}
        print(json.dumps(record))
    elif not args.stream:
        print(out.text)
    if args.stats:
        s = out.stats
        print(
            f"refdecode: {s.new_tokens} new tokens, the first from the prefill, the rest from {s.steps} verification "
            f"forwards ({s.mean_accepted:.2f} tokens each; {s.accepted_tokens}/{s.drafted_tokens} draft tokens "
            f"accepted); {s.tokens_per_second:.1f} tokens/s after the prefill, {s.seconds:.1f} s in all",
            file=sys.stderr,
        )
        print(_tree_line(s), file=sys.stderr)
        if s.steps:
            print(_time_line(s), file=sys.stderr)
    if memory is not None:  # after the output is printed: a failed save does not lose it
        try:
            memory.save(args.memory)
        except OSError as err:
            raise CliError(f"could not save the output memory to {args.memory}: {err.strerror or err}") from None
    return 0


def _open_memory(path: str):
    """The output memory saved at `path` (checked: a folder that is not one is refused), or a new empty one."""
    from .memory import OutputMemory

    if not os.path.lexists(path):
        return OutputMemory()
    if not Path(path).is_dir() or Path(path).is_symlink():
        raise CliError(f"--memory {path} is not a folder holding an output memory; it is left as it is")
    return OutputMemory.load(path)  # a corrupt or foreign folder: IndexFormatError, one line


def _tree_line(s) -> str:
    """The token tree statistics: nodes verified per step, accepted depth, accepted draft tokens per source."""
    sizes = s.draft_lengths or [0]
    by_source = ", ".join(f"{name} {n}" for name, n in sorted(s.accepted_sources.items(), key=lambda kv: -kv[1]))
    return (
        f"refdecode: tree: {sum(sizes) / len(sizes):.1f} nodes per step on average, {max(sizes)} at most; "
        f"accepted depth {s.accepted_tokens / s.steps if s.steps else 0.0:.2f} on average; accepted draft tokens "
        f"by source: {by_source or 'none'}"
    )


def _time_line(s) -> str:
    """Where a decoding step's time went: the target's forward against refdecode's own work."""
    ms = 1000.0 / s.steps
    other = max(0.0, s.overhead_seconds - s.draft_seconds - s.policy_seconds)
    share = s.overhead_seconds / s.decode_seconds if s.decode_seconds > 0 else 0.0
    forward, besides = s.forward_seconds * ms, s.overhead_seconds * ms
    return (
        f"refdecode: per step {forward:.1f} ms in the target's forward, {besides:.1f} ms besides ({share:.1%} of "
        f"decoding): drafting {s.draft_seconds * ms:.1f} ms, policy {s.policy_seconds * ms:.1f} ms, masks, checks and "
        f"bookkeeping {other * ms:.1f} ms"
    )


def _add_calibrate(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate",
        help="time the model's forward by width on this machine and keep the table for later processes",
        description="Time a forward of 1 to max-draft + 1 tokens (the widths the draft policy prices), choose the "
        "faster CPU kernels per width, and keep the table in $REFDECODE_CACHE/costs/ (default ~/.cache/refdecode), "
        "where every later generation on this machine with the same model shapes and dtype finds it. Prints the "
        "cost curve: how much a wider forward costs over a one-token one, i.e. how free verifying width is here.",
    )
    _add_model_options(p)
    p.add_argument("--max-draft", type=int, default=128, help="the longest draft generation will use (default 128)")
    p.add_argument("--context", type=int, default=256, help="cached tokens the forwards run after (default 256)")
    p.add_argument("--again", action="store_true", help="time afresh even where a kept table passes its check")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=_run_calibrate)


CHAIN_RATES = (0.5, 0.7, 0.9, 0.99)  # per-token acceptance rates `calibrate` shows the verified chain length at

_FILLER = (
    "A reference store indexes documents; a matcher copies the spans that follow the current suffix as draft tokens, "
    "and the target model verifies them in one forward pass. "
)


def _run_calibrate(args) -> int:
    import time

    import torch
    from transformers import DynamicCache

    import refdecode

    from .kernels import routable, route_table
    from .policy import (
        DraftPolicy,
        ForwardCostModel,
        calibrate_costs,
        calibration_widths,
        measured_rounding,
        tie_margin_for,
    )

    if not 1 <= args.max_draft <= 1024:
        raise CliError("--max-draft must be between 1 and 1024")
    if args.context < 1:
        raise CliError("--context must be at least 1")
    model, tokenizer = refdecode.load_model(args.model, dtype=args.dtype, device=args.device)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and args.context + args.max_draft + 2 > limit:
        raise CliError(
            f"--context {args.context} and --max-draft {args.max_draft} exceed the model's context ({limit})"
        )
    filler = tokenizer.encode(_FILLER, add_special_tokens=False)
    ids = (filler * (args.context // max(1, len(filler)) + 1))[: args.context]
    key = cost_cache.fingerprint(model, routable=routable(model)) if cost_cache.enabled() else None
    before = cost_cache.load(key) if key is not None else []
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.tensor([ids], device=model.device), cache=cache, use_cache=True)
        t0 = time.perf_counter()
        table = calibrate_costs(
            model, cache, ids[-1], widths=calibration_widths(args.max_draft), reuse_kept=not args.again
        )
        seconds = time.perf_counter() - t0
    after = cost_cache.load(key) if key is not None else []
    routes = dict(route_table(model))
    rounding = measured_rounding(model)
    priced = DraftPolicy(max_draft=args.max_draft, costs=ForwardCostModel(table))
    chains = {rate: priced.chain_length_at(rate) for rate in CHAIN_RATES}
    if key is None:
        where, how = None, "timed; not kept (REFDECODE_COST_CACHE=off)"
    elif not after:
        where, how = None, "timed; could not be kept (the cache folder is not writable)"
    else:
        where = str(cost_cache.table_path(key))
        how = "the kept table, checked" if before and after == before and not args.again else "timed"
    record = {
        "model": args.model,
        "dtype": args.dtype,
        "device": str(model.device),
        "context": args.context,
        "seconds": seconds,
        "source": how,
        "kept_in": where,
        "widths": {
            str(w): {"seconds": t, "relative": t / table[1], "routed": routes.get(w, False)} for w, t in table.items()
        },
        "rounding": rounding,
        "tie_margin": tie_margin_for(model, rounding or 0.0),
        "chain_lengths": {str(rate): k for rate, k in chains.items()},
    }
    if args.json:
        print(json.dumps(record))
        return 0
    print(f"{args.model}, {args.dtype} on {model.device}, after {args.context} cached tokens: {how} in {seconds:.1f} s")
    print("width  seconds  x one token  kernels")
    for w, t in table.items():
        print(f"{w:5d}  {t:7.4f}  {t / table[1]:11.2f}  {'routed' if routes.get(w) else 'transformers'}")
    lengths = ", ".join(f"{rate:g} -> {k}" for rate, k in chains.items())
    print(f"chains the draft policy verifies at these costs, by per-token acceptance: {lengths}")
    if rounding is not None:
        margin = record["tie_margin"]
        print(f"a wide forward moves a logit by up to {rounding:.2g}; the greedy tie guard's margin: {margin:.2g}")
    if where:
        print(f"kept in {where}")
    return 0


def _add_heads(subparsers) -> None:
    p = subparsers.add_parser("heads", help="Medusa-style heads that draft from the target's own hidden state")
    group = p.add_subparsers(dest="heads_command", required=True)
    t = group.add_parser("train", help="train heads on ShareGPT conversations (the training half), base frozen")
    _add_model_options(t, dtype=False)
    t.add_argument("--minutes", type=float, default=25.0, help="wall-clock budget of the whole run (default: 25)")
    t.add_argument("--max-tokens", type=int, default=100_000, help="tokens run through the base model")
    t.add_argument("--heads", type=int, default=3, help="number of heads K: head k guesses token t+k+1")
    t.add_argument("--vocab", type=int, default=8192, help="restricted vocabulary: the V most frequent outputs")
    t.add_argument("--out", help="folder to save into (default: the model cache's heads/MODEL)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument(
        "--train-output", action="store_true", help="also train the heads' output matrix (default: the model's own)"
    )
    t.set_defaults(func=_run_heads_train)


def _run_heads_train(args) -> int:
    import refdecode

    from .bench import data
    from .heads import heads_dir, save_heads, train_heads

    if not args.minutes > 0:
        raise CliError("--minutes must be positive")
    if args.max_tokens < 1000:
        raise CliError("--max-tokens must be at least 1000")
    if not 1 <= args.heads <= 16:
        raise CliError("--heads must be between 1 and 16")
    if args.vocab < 16:
        raise CliError("--vocab must be at least 16")
    out = Path(args.out) if args.out else heads_dir(args.model)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} is a file, not a folder")
    try:
        _, train = data.sharegpt_split(data.sharegpt_conversations())
    except FileNotFoundError:
        raise CliError(f"the ShareGPT conversations are not in {data.data_root()}: run `make data` first") from None
    model, tokenizer = refdecode.load_model(args.model, device=args.device)
    heads, metrics = train_heads(
        model,
        tokenizer,
        train,
        num_heads=args.heads,
        vocab_size=args.vocab,
        max_tokens=args.max_tokens,
        minutes=args.minutes,
        seed=args.seed,
        train_output=args.train_output,
    )
    try:
        save_heads(heads, out, tokenizer=tokenizer, model_name=args.model, metrics=metrics, model=model)
    except OSError as err:
        raise CliError(f"could not save the heads to {out}: {err.strerror or err}") from None
    print(_heads_report(metrics, out))
    return 0


def _heads_report(m: dict, out: Path) -> str:
    """The training metrics as a few lines: agreement with the base's greedy choice on held-out conversations."""

    def pct(values: list[float]) -> str:
        return " ".join(f"{100 * v:.1f}%" for v in values)

    lines = [
        f"heads saved to {out}",
        f"held-out agreement with the base's greedy token, heads +2..+{m['num_heads'] + 1} "
        f"({m['heldout_rows']} positions, labels: {m['labels']}):",
        f"  top-1 {pct(m['top1'])}; top-3 {pct(m['top3'])} (untrained: top-1 {pct(m['untrained_top1'])})",
    ]
    for name, r in m["by_labels"].items():
        lines.append(f"  {name} labels: top-1 {pct(r['top1'])}; top-3 {pct(r['top3'])}")
    lines.append(
        f"vocabulary {m['vocab_size']} tokens covers {100 * m['coverage']:.2f}% of the base's greedy tokens; "
        f"{m['forward_tokens']} tokens from {m['texts']} conversations at {m['forward_tokens_per_second']:.0f} tok/s; "
        f"{m['seconds_total']:.0f} s in all"
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refdecode", description="Lossless reference-drafted speculative decoding for transformers models."
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_generate(subparsers)
    _add_calibrate(subparsers)
    _add_heads(subparsers)
    try:
        from .corpus.cli import add_index_commands

        add_index_commands(subparsers)
    except ImportError:  # the corpus extra is optional
        pass
    try:
        from .bench.cli import add_bench_command

        add_bench_command(subparsers)
    except ImportError:
        pass
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a model hub
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        kernels.enabled()  # a bad REFDECODE_CPU_KERNELS or REFDECODE_COST_CACHE is refused before any model loads
        cost_cache.enabled()
        return int(args.func(args) or 0)
    except CliError as err:
        print(f"refdecode: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"refdecode: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("refdecode: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # the last resort: a bug, but still one line rather than a traceback
        print(
            f"refdecode: internal error: {type(err).__name__}: {_one_line(err)} (please report this)", file=sys.stderr
        )
        return 1


def _one_line(err: BaseException) -> str:
    """The message's first line, with undecodable characters escaped, so stderr always gets exactly one line."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


if __name__ == "__main__":
    sys.exit(main())
