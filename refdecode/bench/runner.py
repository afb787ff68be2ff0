"""The benchmark runner: time transformers greedy, transformers prompt lookup, refdecode (its token tree and its
single chain), SuffixDecoding's drafter in refdecode's loop, and an oracle drafter on the same prompts, in one
process, interleaved per prompt.

Knows: turning workload requests into token ids (and back out of / into a portable JSON file for machines without
the data cache), timing each method's prefill and decoding separately (a streamer for transformers, the stats for
refdecode), checking every speculative output against greedy, and the forward-cost curve of the device.
Does not know: how summaries, tables and plots are made (`refdecode.bench.report`), nor command-line parsing
(`refdecode.bench.cli`).

Speed is *decoding throughput*: new tokens after the first, over the time after the first new token arrived (the
prefill is the same work for every method and is reported apart). One untimed warm-up generation per method runs
before any measurement.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from refdecode.bench.prefill import SharedPrefill
from refdecode.drafters import Draft

__all__ = [
    "METHODS",
    "DEFAULT_METHODS",
    "SUFFIX_METHODS",
    "SAMPLING_METHODS",
    "DEFAULT_WORKLOADS",
    "BenchConfig",
    "PreparedRequest",
    "OracleDrafter",
    "TimingStreamer",
    "prepare_requests",
    "export_requests",
    "load_requests",
    "forward_cost_curve",
    "machine_info",
    "run_benchmark",
]

# every greedy method, in run order; greedy is the baseline and always runs first. refdecode: generate's default (a
# token tree per step); refdecode-chain: generate(tree=False), one chain per step; suffix / suffix-tree:
# SuffixDecoding's drafter (arctic-inference, refdecode.bench.suffix) in refdecode's loop, chain / tree mode;
# refdecode-hf-kernels: refdecode with transformers' own CPU kernels for its wide forwards (REFDECODE_CPU_KERNELS=
# transformers, see refdecode.kernels), to measure what the routed kernels add; refdecode-no-guard: the tree with
# tie_margin=0, no row recomputed one token wide, to measure what the greedy tie guard costs and what it keeps
# identical (in bfloat16 a wide forward moves logits by ~0.2).
METHODS = (
    "greedy",
    "pld",
    "refdecode",
    "refdecode-hf-kernels",
    "refdecode-no-guard",
    "refdecode-chain",
    "suffix",
    "suffix-tree",
    "oracle",
)
SUFFIX_METHODS = ("suffix", "suffix-tree")  # optional: need arctic-inference (`make suffix-setup`)
DEFAULT_METHODS = tuple(m for m in METHODS if m not in SUFFIX_METHODS + ("refdecode-hf-kernels", "refdecode-no-guard"))
SAMPLING_METHODS = ("hf-sample", "refdecode-sample", "refdecode-chain-sample")
CHECKED_METHODS = tuple(m for m in METHODS if m != "greedy")  # lossless under greedy: output == greedy's
REFDECODE_METHODS = (  # its own drafter
    "refdecode",
    "refdecode-hf-kernels",
    "refdecode-no-guard",
    "refdecode-chain",
    "refdecode-sample",
    "refdecode-chain-sample",
)
DEFAULT_WORKLOADS = ("code-edit", "code-edit-ref", "rag", "summarize", "chat", "control")
PLD_TOKENS = 10  # transformers' prompt_lookup_num_tokens, the value its docs suggest
SAMPLE_TEMPERATURE, SAMPLE_TOP_P = 0.7, 0.9
REQUESTS_FORMAT = "refdecode-bench-requests/1"
# + a drafter spec: the model drafter drafting alone (no references); the method name keeps its first spelling,
# which the saved results and their reports use
DRAFTER_ALONE = "drafter:"
WITH_REFERENCES = "refdecode+"  # + a drafter spec: refdecode's references and the model drafter in one tree
RECYCLE = "self:recycle"  # the model drafter that learns across calls (its table is kept per method, see run_refdecode)


ASSISTED = "assisted"  # transformers' assisted generation (assistant_model=) with the config's draft model


def is_checked(method: str) -> bool:
    """Greedy methods whose output must equal transformers greedy's token for token."""
    return method in CHECKED_METHODS or method == ASSISTED or method.startswith((DRAFTER_ALONE, WITH_REFERENCES))


@dataclass
class BenchConfig:
    """What to run. Validated up front; `quick` only changes the defaults the CLI fills in."""

    workloads: tuple[str, ...] = DEFAULT_WORKLOADS
    n: int = 12
    seed: int = 0
    max_new_tokens: int = 128
    model: str = "smollm2-135m"
    device: str = "cpu"
    dtype: str = "float32"
    methods: tuple[str, ...] = DEFAULT_METHODS
    sampling: bool = False
    threads: int | None = None
    cost_reps: int = 5
    cost_context: int = 256
    cost_max_width: int = 64
    requests_file: str | None = None
    quick: bool = False
    index: str | None = None  # a corpus index: rag-index prompts retrieve from it, and refdecode drafts from it
    drafters: tuple[str, ...] = ()  # model drafters (refdecode.drafters): each adds a row alone and one with references
    draft_model: str | None = None  # a model sharing the tokenizer: transformers' assisted generation with it, and
    # refdecode's tree with it joining the references (refdecode+NAME)
    share_prefill: bool = False  # the target's prompt forward computed once per prompt and copied to every method
    # (refdecode.bench.prefill): throughput is unchanged, prefill and end-to-end times then exclude that forward

    def __post_init__(self):
        from refdecode.bench.workloads import WORKLOADS

        self.workloads = tuple(self.workloads)
        unknown = [w for w in self.workloads if w not in WORKLOADS]
        if unknown:
            raise ValueError(f"unknown workload(s) {', '.join(unknown)}; known: {', '.join(WORKLOADS)}")
        if not self.workloads and not self.requests_file:
            raise ValueError("no workloads to run")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown method(s) {', '.join(bad)}; known: {', '.join(METHODS)}")
        # greedy is the baseline: every ratio and the identical-output check need it, and the oracle copies it
        self.methods = tuple(m for m in METHODS if m in self.methods or m == "greedy")
        if any(m in SUFFIX_METHODS for m in self.methods):
            from refdecode.bench.suffix import MISSING, suffix_available

            if not suffix_available():
                raise ValueError(MISSING)
        for name in ("n", "max_new_tokens", "cost_reps", "cost_max_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cost_context < 1:
            raise ValueError(f"cost_context must be >= 1, got {self.cost_context}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        from refdecode.drafters import check_drafter_spec

        self.drafters = tuple(self.drafters)
        if self.draft_model is not None:
            check_drafter_spec(self.draft_model)
            if self.draft_model.strip().startswith("self:"):
                raise ValueError(
                    f"draft_model must be a model sharing the tokenizer, got {self.draft_model!r}: "
                    "self: drafters go in drafters"
                )
        for spec in self.drafters:
            check_drafter_spec(spec)

    @property
    def all_methods(self) -> tuple[str, ...]:
        drafters = tuple(m for spec in self.drafters for m in (DRAFTER_ALONE + spec, WITH_REFERENCES + spec))
        assisted = (ASSISTED, WITH_REFERENCES + self.draft_model) if self.draft_model else ()
        return self.methods + assisted + drafters + (SAMPLING_METHODS if self.sampling else ())


@dataclass
class PreparedRequest:
    """A request rendered to token ids. prompt_ids: [T] as the model sees it (chat template applied);
    references: (source, token ids without special tokens), documents refdecode may copy from but the prompt lacks."""

    id: str
    workload: str
    prompt_ids: list[int]
    references: list[tuple[str, list[int]]] = field(default_factory=list)
    category: str = ""


# ---------------------------------------------------------------------------------------------------------------
# requests: render, export, import


def render_prompt(request, tokenizer) -> list[int]:
    """Chat requests through the chat template (generation prompt added), raw prompts through encode."""
    if request.chat:
        ids = tokenizer.apply_chat_template(list(request.messages), add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        return [int(t) for t in ids]
    return [int(t) for t in tokenizer.encode(request.prompt)]


def prepare_requests(
    workloads: Sequence[str], n: int, seed: int, tokenizer, *, loader: Callable | None = None, index=None
):
    """Sample n requests per workload (refdecode.bench.workloads.load_workload) and render them to token ids."""
    if loader is None:
        from refdecode.bench.workloads import load_workload

        loader = load_workload
    prepared = []
    for name in workloads:
        extra = {"index": index} if index is not None else {}
        for request in loader(name, n=n, seed=seed, tokenizer=tokenizer, **extra):
            refs = [
                (src, [int(t) for t in tokenizer.encode(text, add_special_tokens=False)])
                for src, text in request.references
            ]
            prepared.append(
                PreparedRequest(
                    request.id,
                    request.workload,
                    render_prompt(request, tokenizer),
                    [(s, ids) for s, ids in refs if ids],
                    request.category,
                )
            )
    return prepared


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the vocabulary size and a fixed text's ids: two tokenizers that differ disagree here."""
    probe = "def f(x):\n    return x  # Ünïcode, 1234 tokens; <|im_start|> The quick brown fox."
    ids = tokenizer.encode(probe, add_special_tokens=False)
    return hashlib.sha1(json.dumps([len(tokenizer), list(ids)]).encode()).hexdigest()[:16]


def export_requests(path: str | Path, requests: Sequence[PreparedRequest], *, tokenizer, meta: dict) -> None:
    """Write the rendered requests to one JSON file, to run them where the data cache is absent."""
    payload = {
        "format": REQUESTS_FORMAT,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "meta": meta,
        "requests": [asdict(r) for r in requests],
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def load_requests(path: str | Path, *, tokenizer=None) -> tuple[list[PreparedRequest], dict]:
    """Read a file written by export_requests; ValueError if it is not one, or was made with another tokenizer."""
    try:
        payload = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"requests file not found: {path}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"requests file {path} is not JSON: {err}") from None
    if not isinstance(payload, dict) or payload.get("format") != REQUESTS_FORMAT:
        raise ValueError(f"{path} is not a refdecode requests file (format {REQUESTS_FORMAT})")
    if tokenizer is not None and payload["tokenizer_fingerprint"] != tokenizer_fingerprint(tokenizer):
        raise ValueError(f"{path} was rendered with another tokenizer (model {payload['meta'].get('model')!r})")
    requests = [
        PreparedRequest(
            r["id"],
            r["workload"],
            list(r["prompt_ids"]),
            [(s, list(ids)) for s, ids in r["references"]],
            r.get("category", ""),
        )
        for r in payload["requests"]
    ]
    return requests, payload["meta"]


# ---------------------------------------------------------------------------------------------------------------
# the oracle drafter and the timing streamer


class OracleDrafter:
    """Drafts the true greedy continuation (known from a greedy run): the ceiling for any drafter under the same
    DraftPolicy on this hardware. After a divergence from `continuation` it drafts nothing."""

    def __init__(self, prompt_ids: Sequence[int], continuation: Sequence[int], *, match_len: int = 64):
        self.prompt_len = len(prompt_ids)
        self.continuation = list(continuation)
        self.match_len = match_len  # evidence given to the policy: the top bucket, as for a long followed span

    def observe(self, new_tokens: Sequence[int]) -> None:
        pass

    def propose(self, context: Sequence[int], max_tokens: int) -> Draft | None:
        done = list(context[self.prompt_len :])
        if max_tokens <= 0 or done != self.continuation[: len(done)]:
            return None
        tokens = self.continuation[len(done) : len(done) + max_tokens]
        return Draft(tokens, self.match_len, "oracle") if tokens else None


class TimingStreamer:
    """A transformers streamer that records perf_counter() at each put: the first put is the prompt, the second
    carries the first new token(s), each later put is one decoding step's tokens."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.times: list[float] = []
        self.sizes: list[int] = []

    def put(self, value) -> None:
        _sync(self.device)  # transformers copies the tokens to the host first, which already synchronises
        self.times.append(time.perf_counter())
        self.sizes.append(int(value.numel()))

    def end(self) -> None:
        pass


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------------------
# one generation per method -> one record


def _record(
    method: str,
    token_ids: list[int],
    first_tokens: int,
    prefill: float,
    decode: float,
    e2e: float,
    accept_lengths: list[int],
) -> dict:
    """Plain record; tokens_per_second = tokens after the first new token(s) over the time after them."""
    after = len(token_ids) - first_tokens
    return {
        "method": method,
        "new_tokens": len(token_ids),
        "first_tokens": first_tokens,
        "decode_tokens": after,
        "prefill_seconds": prefill,
        "decode_seconds": decode,
        "e2e_seconds": e2e,
        "tokens_per_second": after / decode if decode > 0 and after > 0 else None,
        "steps": len(accept_lengths),
        "mean_accepted": after / len(accept_lengths) if accept_lengths else None,
        "accept_lengths": accept_lengths,
        "token_ids": token_ids,
    }


def run_hf(model, prompt_ids: list[int], max_new_tokens: int, method: str, *, seed: int = 0, draft=None) -> dict:
    """transformers generate: greedy, prompt lookup, assisted generation with `draft` (transformers' own schedule
    of draft lengths), or sampling (T=0.7, top_p=0.9, no top-k)."""
    device = model.device
    x = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    kwargs = dict(attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, pad_token_id=_pad_id(model))
    if method == "greedy":
        kwargs.update(do_sample=False)
    elif method == "pld":
        kwargs.update(do_sample=False, prompt_lookup_num_tokens=PLD_TOKENS)
    elif method == ASSISTED:
        if draft is None:
            raise ValueError("assisted generation needs a draft model (BenchConfig.draft_model)")
        kwargs.update(do_sample=False, assistant_model=draft)
    elif method == "hf-sample":
        kwargs.update(do_sample=True, temperature=SAMPLE_TEMPERATURE, top_p=SAMPLE_TOP_P, top_k=0)
    else:
        raise ValueError(f"not a transformers method: {method}")
    streamer = TimingStreamer(device)
    # transformers samples from torch's global generator: fork it so the run is seeded without touching the caller's
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        _sync(device)
        t0 = time.perf_counter()
        out = model.generate(x, streamer=streamer, **kwargs)
        _sync(device)
        t_end = time.perf_counter()
    token_ids = out[0, len(prompt_ids) :].tolist()
    if len(streamer.times) < 2:  # nothing generated after the prompt
        return _record(method, token_ids, len(token_ids), t_end - t0, 0.0, t_end - t0, [])
    t_first, first = streamer.times[1], streamer.sizes[1]
    return _record(method, token_ids, first, t_first - t0, t_end - t_first, t_end - t0, streamer.sizes[2:])


def _pad_id(model):
    gc = model.generation_config
    if gc.pad_token_id is not None:
        return gc.pad_token_id
    eos = gc.eos_token_id
    return eos[0] if isinstance(eos, (list, tuple)) else eos


def run_refdecode(
    model,
    tokenizer,
    request: PreparedRequest,
    max_new_tokens: int,
    method: str,
    *,
    greedy_ids: list[int] | None = None,
    seed: int = 0,
    index=None,
    learned: dict | None = None,
    draft=None,
) -> dict:
    """refdecode.generate: with a ReferenceStore of the request's references (a tree, or one chain for the -chain
    methods), with SuffixDecoding's drafter over the same references, or with the oracle drafter. The corpus index
    (if any) is refdecode's own source: the suffix and oracle methods do not see it.

    learned: method -> what a model drafter learns across calls (self:recycle's successor table), kept by the caller
    over the timed requests, so each method's table grows over earlier, other prompts as on a server and never
    holds a run of the same prompt by another method; None (the warm-up): a fresh table, thrown away.
    draft: the config's draft model, loaded once: the refdecode+NAME row drafts with this object."""
    from refdecode import build_drafting, generate, kernels

    kwargs: dict = {}
    suffix = None
    model_drafter: Any = None  # a ModelDrafterBase
    joined: dict | None = None  # build_drafting's arguments when a model drafter joins the references
    if method.startswith((WITH_REFERENCES, DRAFTER_ALONE)):
        from refdecode.drafters import RecycleDrafter, SuccessorTable, build_model_drafter

        spec = method[len(DRAFTER_ALONE) :] if method.startswith(DRAFTER_ALONE) else method[len(WITH_REFERENCES) :]
        if spec == RECYCLE:  # its table learns across calls: one per method, never shared between methods
            table = SuccessorTable() if learned is None else learned.setdefault(method, SuccessorTable())
            model_drafter = RecycleDrafter(table)
        elif draft is not None and spec == getattr(draft, "refdecode_name", None):
            model_drafter = build_model_drafter(draft, model, tokenizer)
        else:
            model_drafter = build_model_drafter(spec, model, tokenizer)
    if method in REFDECODE_METHODS:
        kwargs.update(store=_store(tokenizer, request), tree="-chain" not in method)
        if method == "refdecode-no-guard":
            kwargs.update(tie_margin=0.0)
        if method.endswith("-sample"):
            kwargs.update(temperature=SAMPLE_TEMPERATURE, top_p=SAMPLE_TOP_P, seed=seed)
        if index is not None:
            kwargs.update(index=index)
    elif method in SUFFIX_METHODS:
        from refdecode.bench.suffix import SuffixDrafter

        references = [ids for _, ids in request.references]
        suffix = SuffixDrafter(request.prompt_ids, references=references, tree=method == "suffix-tree")
        kwargs.update(drafter=suffix)  # and generate's default DraftPolicy, as for refdecode
    elif method.startswith(WITH_REFERENCES):
        joined = dict(store=_store(tokenizer, request), index=index, drafter=model_drafter, alone=False)
    elif method.startswith(DRAFTER_ALONE):
        kwargs.update(drafter=model_drafter)
    elif method == "oracle":
        if greedy_ids is None:
            raise ValueError("the oracle needs the greedy output of the same prompt")
        kwargs.update(drafter=OracleDrafter(request.prompt_ids, greedy_ids))  # and generate's default DraftPolicy
    else:
        raise ValueError(f"not a refdecode method: {method}")
    _sync(model.device)
    t0 = time.perf_counter()
    try:
        with kernels.transformers_kernels(method == "refdecode-hf-kernels"):
            drafting = None
            if joined is not None:  # a drafter object of its own (a per-method table) beside the references
                drafting = build_drafting(model, tokenizer, request.prompt_ids, **joined)
                kwargs.update(drafter=drafting.drafter, policy=drafting.policy)
            out = generate(model, tokenizer, request.prompt_ids, max_new_tokens=max_new_tokens, **kwargs)
            if drafting is not None:
                drafting.remember(model)
    finally:
        if suffix is not None:
            suffix.close()
    _sync(model.device)
    e2e = time.perf_counter() - t0
    s = out.stats
    record = _record(method, list(out.token_ids), 1, s.prefill_seconds, s.decode_seconds, e2e, list(s.accept_lengths))
    record.update(
        drafted_tokens=s.drafted_tokens,
        accepted_tokens=s.accepted_tokens,
        recomputed=s.recomputed,
        padded_steps=getattr(s, "padded_steps", 0),
        stop_reason=out.stop_reason,
        draft_seconds=getattr(s, "draft_seconds", 0.0),
    )
    if getattr(s, "forward_seconds", 0.0):  # a refdecode that times the target's forwards (not older results)
        record.update(forward_seconds=s.forward_seconds, policy_seconds=s.policy_seconds)
    # the tree statistics, from a refdecode that keeps them: nodes verified per step, accepted tokens per source
    # (saved under its former name "tree_sizes": the report reads results written before)
    if getattr(s, "draft_lengths", None) is not None:
        record["tree_sizes"] = list(s.draft_lengths)
    if getattr(s, "accepted_sources", None) is not None:
        record["accepted_sources"] = dict(s.accepted_sources)
    return record


def _store(tokenizer, request: PreparedRequest):
    """A ReferenceStore of the request's references, or None when it has none."""
    from refdecode import ReferenceStore

    if not request.references:
        return None
    store = ReferenceStore(tokenizer)
    for source, ids in request.references:
        store.add(ids, source=source)
    return store


def run_method(
    model,
    tokenizer,
    request: PreparedRequest,
    method: str,
    max_new_tokens: int,
    *,
    greedy_ids: list[int] | None,
    seed: int,
    index=None,
    learned: dict | None = None,
    draft=None,
) -> dict:
    if method in ("greedy", "pld", "hf-sample", ASSISTED):
        return run_hf(model, request.prompt_ids, max_new_tokens, method, seed=seed, draft=draft)
    return run_refdecode(
        model,
        tokenizer,
        request,
        max_new_tokens,
        method,
        greedy_ids=greedy_ids,
        seed=seed,
        index=index,
        learned=learned,
        draft=draft,
    )


def _method_order(methods: Sequence[str], i: int) -> list[str]:
    """The order of the methods on the i-th timed prompt: greedy first (the others are checked against it and the
    oracle copies it), then the rest forwards on even prompts and backwards on odd ones (A B B A), so a machine
    growing faster or slower during a run favours no method."""
    rest = [m for m in methods if m != "greedy"]
    head = ["greedy"] if "greedy" in methods else []
    return head + (rest if i % 2 == 0 else rest[::-1])


def first_mismatch(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first position where two token lists differ (a length difference counts), else None."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# ---------------------------------------------------------------------------------------------------------------
# the device: forward-cost curve and description


ROUTED_WIDTHS = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)  # widths also timed with refdecode's routed CPU kernels


@torch.no_grad()
def forward_cost_curve(model, *, context: int = 256, max_width: int = 64, reps: int = 5, seed: int = 0) -> dict:
    """Seconds of one forward of k tokens (k = 1..max_width) after a prefilled cache of `context` tokens, cropped
    back after each; median of `reps`. relative[k-1] = cost(k) / cost(1), the curve the draft policy trades on.
    On a model refdecode.kernels can route (a CPU model), the widths ROUTED_WIDTHS are also timed with the routed
    kernels: routed_widths, routed_seconds and routed_relative (over the same one-token cost)."""
    from transformers import DynamicCache

    from refdecode import kernels

    device = model.device
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, vocab, (1, context), generator=g).to(device)  # [1, context]
    cache = DynamicCache(config=model.config)
    model(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1)
    if hasattr(cache, "activate_past_recording"):  # sliding-window layers must keep past states to be croppable
        cache.activate_past_recording()
    widths = list(range(1, max_width + 1))
    routed = [k for k in ROUTED_WIDTHS if k <= max_width] if kernels.routable(model) else []
    trials = [(k, False) for k in widths] + [(k, True) for k in routed]
    samples: dict[tuple[int, bool], list[float]] = {trial: [] for trial in trials}
    for rep in range(reps + 1):  # rep 0 warms every width up and is not kept
        for k, route in trials:
            ids = torch.randint(3, vocab, (1, k), generator=g).to(device)  # [1, k]
            _sync(device)
            t0 = time.perf_counter()
            with kernels.routed(model, k, force=route):
                model(input_ids=ids, cache=cache, use_cache=True)  # all k rows of logits, as a verification does
            _sync(device)
            if rep:
                samples[k, route].append(time.perf_counter() - t0)
            cache.crop(-k)
    seconds = [statistics.median(samples[k, False]) for k in widths]
    routed_seconds = [statistics.median(samples[k, True]) for k in routed]
    return {
        "context_tokens": context,
        "reps": reps,
        "widths": widths,
        "seconds": seconds,
        "relative": [s / seconds[0] for s in seconds],
        "routed_widths": routed,
        "routed_seconds": routed_seconds,
        "routed_relative": [s / seconds[0] for s in routed_seconds],
    }


def _routed_costs(cost: dict) -> str:
    """'k=2: 1.02, k=4: ...' for the powers of two among the routed widths of a forward_cost_curve."""
    pairs = zip(cost["routed_widths"], cost["routed_relative"], strict=True)
    return ", ".join(f"k={k}: {r:.2f}" for k, r in pairs if k & (k - 1) == 0)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(model, dtype: str) -> dict:
    import transformers

    import refdecode

    device = model.device
    info = {
        "device": str(device),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "refdecode": refdecode.__version__,
        "dtype": dtype,
        "model_class": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return info


# ---------------------------------------------------------------------------------------------------------------
# the whole run


def run_benchmark(
    config: BenchConfig,
    *,
    model=None,
    tokenizer=None,
    requests: Sequence[PreparedRequest] | None = None,
    log: Callable[[str], None] = print,
    on_record: Callable[[dict], None] | None = None,
) -> dict:
    """Run every method on every request, interleaved per prompt; returns the raw results (see report.summarize).

    model/tokenizer: loaded from config.model when None. requests: from config.requests_file, else sampled from the
    data cache for config.workloads. on_record: called with every timed record as soon as it is measured (the CLI
    appends them to a file, so a long run stopped early keeps what it measured).
    """
    # 1) model, requests, device description
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    notes: list[str] = []
    if config.threads:
        torch.set_num_threads(config.threads)
    if model is None:
        from refdecode import load_model

        model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
    index = None
    if config.index:
        from refdecode.corpus import CorpusIndex

        index = CorpusIndex.load(config.index, tokenizer=tokenizer)
        notes.append(f"refdecode drafts from the corpus index {config.index} too")
    if requests is None:
        if config.requests_file:
            requests, meta = load_requests(config.requests_file, tokenizer=tokenizer)
            notes.append(
                f"requests read from {config.requests_file} (made for {meta.get('model')}, "
                f"seed {meta.get('seed')}, n {meta.get('n')})"
            )
        else:
            requests = prepare_requests(config.workloads, config.n, config.seed, tokenizer, index=index)
    requests = list(requests)
    if not requests:
        raise ValueError("no requests to run")
    draft = None
    if config.draft_model:
        from refdecode import load_model
        from refdecode.drafters import check_draft_model

        draft, draft_tokenizer = load_model(config.draft_model, dtype=config.dtype, device=config.device)
        check_draft_model(model, draft, tokenizer, draft_tokenizer)
    info = machine_info(model, config.dtype)
    log(_describe(info, config, requests))

    # 2) forward-cost curve (before any generation, on a freshly loaded model: it warms the kernels up too)
    log(
        f"forward cost: k = 1..{config.cost_max_width} after {config.cost_context} tokens, median of {config.cost_reps}"
    )
    cost = forward_cost_curve(
        model, context=config.cost_context, max_width=config.cost_max_width, reps=config.cost_reps, seed=config.seed
    )
    log(
        "  cost(k)/cost(1): "
        + ", ".join(
            f"k={k}: {cost['relative'][k - 1]:.2f}" for k in (1, 2, 4, 8, 16, 32, 64) if k <= len(cost["relative"])
        )
    )
    if cost["routed_widths"]:
        log("  with refdecode's CPU kernels: " + _routed_costs(cost))
    draft_cost = None
    if draft is not None:
        draft_cost = forward_cost_curve(
            draft, context=config.cost_context, max_width=config.cost_max_width, reps=config.cost_reps, seed=config.seed
        )
        log(
            f"  draft model {config.draft_model}: one-token forward {draft_cost['seconds'][0] * 1e3:.0f} ms "
            f"({draft_cost['seconds'][0] / cost['seconds'][0]:.2f} of the target's)"
        )

    # 3) and 4): the warm-up and the measurement, with the prefill shared if asked
    methods = config.all_methods
    if config.share_prefill:
        notes.append(
            "prefill shared: the target's prompt forward ran once per prompt (untimed) and every method started from "
            "a copy of its cache; throughput is unchanged, prefill and end-to-end seconds exclude that forward"
        )
    with SharedPrefill(model) if config.share_prefill else contextlib.nullcontext() as shared:
        measured = _measure(config, model, tokenizer, requests, draft, index, shared, log=log, on_record=on_record)
    return {
        "meta": {
            "machine": info,
            "config": asdict(config),
            "methods": list(methods),
            "started": started,
            "timing": (
                "decoding throughput = new tokens after the first / time after the first new token; "
                "transformers methods are timed with a streamer (first put = prompt, second = first new "
                "token), refdecode with its GenerationStats; one untimed warm-up per method; greedy first on "
                "every prompt, the other methods in alternating order (A B B A)"
            ),
            "notes": notes,
        },
        "forward_cost": cost,
        "draft_forward_cost": draft_cost,
        **measured,
    }


def _measure(config: BenchConfig, model, tokenizer, requests, draft, index, shared, *, log, on_record=None) -> dict:
    """Steps 3 and 4 of run_benchmark: the warm-up, then every method on every request; returns requests and
    records. shared: a SharedPrefill (primed here for each prompt) or None."""
    # 3) one untimed warm-up per method, on the first request
    methods = config.all_methods
    warm = requests[0]
    if shared is not None:
        shared.prime(warm.prompt_ids)
    greedy_warm = None
    for method in methods:
        rec = run_method(
            model,
            tokenizer,
            warm,
            method,
            config.max_new_tokens,
            greedy_ids=greedy_warm,
            seed=config.seed,
            index=index,
            draft=draft,
        )
        greedy_warm = rec["token_ids"] if method == "greedy" else greedy_warm
    log(f"warm-up done ({', '.join(methods)} on {warm.id})")

    # 4) measure: every method on a prompt before the next prompt
    records = []
    learned: dict = {}  # method -> its model drafter's table, grown over the earlier timed requests (run_refdecode)
    prefill_seconds: list[float | None] = []
    for i, request in enumerate(requests):
        greedy_ids = None
        line = []
        prefill_seconds.append(shared.prime(request.prompt_ids) if shared is not None else None)
        for method in _method_order(methods, i):
            rec = run_method(
                model,
                tokenizer,
                request,
                method,
                config.max_new_tokens,
                greedy_ids=greedy_ids,
                seed=config.seed + i,
                index=index,
                learned=learned,
                draft=draft,
            )
            if method == "greedy":
                greedy_ids = rec["token_ids"]
            elif is_checked(method) and greedy_ids is not None:
                pos = first_mismatch(rec["token_ids"], greedy_ids)
                rec["matches_greedy"], rec["first_mismatch"] = pos is None, pos
            rec.update(
                request_id=request.id,
                workload=request.workload,
                category=request.category,
                prompt_tokens=len(request.prompt_ids),
            )
            records.append(rec)
            if on_record is not None:
                on_record(rec)
            tps = rec["tokens_per_second"]
            flag = "" if rec.get("matches_greedy", True) else f" MISMATCH@{rec['first_mismatch']}"
            line.append(f"{method} {tps:.1f}{flag}" if tps else f"{method} -{flag}")
        log(
            f"[{i + 1}/{len(requests)}] {request.id} ({len(request.prompt_ids)} prompt tokens): "
            + ", ".join(line)
            + " tok/s"
        )

    return {
        "requests": [
            {
                "id": r.id,
                "workload": r.workload,
                "category": r.category,
                "prompt_tokens": len(r.prompt_ids),
                "reference_tokens": sum(len(ids) for _, ids in r.references),
                **({"shared_prefill_seconds": p} if p is not None else {}),
            }
            for r, p in zip(requests, prefill_seconds, strict=True)
        ],
        "records": records,
    }


def _describe(info: dict, config: BenchConfig, requests: Sequence[PreparedRequest]) -> str:
    hw = info["gpu"] or info["cpu"]
    counts: dict[str, int] = {}
    for r in requests:
        counts[r.workload] = counts.get(r.workload, 0) + 1
    return (
        f"machine: {hw} ({info['device']}, {info['cpu_count']} CPUs, {info['torch_threads']} torch threads)\n"
        f"versions: python {info['python']}, torch {info['torch']}, transformers {info['transformers']}, "
        f"refdecode {info['refdecode']}\n"
        f"model: {config.model} ({info['model_class']}, {info['parameters'] / 1e6:.0f}M parameters, "
        f"{info['dtype']}); max_new_tokens {config.max_new_tokens}; seed {config.seed}\n"
        f"requests: " + ", ".join(f"{w} {c}" for w, c in counts.items()) + "; methods: " + ", ".join(config.all_methods)
    )
