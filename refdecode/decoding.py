"""The decode loop: prefill, then draft -> verify in one forward -> commit -> roll the cache back, until a stop.

Knows: the order of a step, and that it is the only place that runs the target model: the transformers causal-LM
forward and its DynamicCache (cropped, or compacted to a tree's accepted path, to roll rejected tokens back),
streaming, and the statistics. Does not know: how the prompt and options are checked (inputs.py), how drafts are
found (drafters/), how many draft tokens pay (policy.py), which ones are accepted (verification.py: scores in,
verdict out) or which token stops generation (stopping.py).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .drafters import Draft, Drafter, DraftSession, build_drafting
from .inputs import (
    check_max_draft,
    check_max_new_tokens,
    check_prompt_ids,
    check_tree,
    drafter_argument,
    eos_token_ids,
    prepare_prompt,
)
from .kernels import forward_tokens, routed, synchronize
from .policy import (
    GUESS,
    DraftPolicy,
    ForwardCostModel,
    calibrate_costs,
    calibration_widths,
    measure_rounding,
    measured_rounding,
    tie_margin_for,
)
from .sampling import SamplingConfig, build_processors, process_rows
from .stopping import StopChecker, stop_list
from .tree import DraftTree
from .tree_attention import keep_rows, recompute_row, supports_tree, tree_forward
from .verification import PositionNoise, choose_first, verify_chain, verify_tree

__all__ = ["GenerationOutput", "GenerationStats", "NonFiniteLogitsError", "decode", "generate"]


@dataclass
class GenerationStats:
    """steps: verification forwards after the prefill; drafted/accepted: draft tokens verified/kept;
    seconds: end to end; prefill_seconds: the prompt's forward and the first token; decode_seconds: the rest.

    Where decode_seconds go: forward_seconds inside the target model's own forward calls (the device synchronized
    at each call's end); the rest is overhead_seconds, of which draft_seconds drafting (the drafter's propose: finding
    candidates, building their tree, a draft model's forwards) and policy_seconds choosing what to verify and
    learning from the verdict; what remains is the tree mask, the acceptance check, cache bookkeeping and stopping."""

    steps: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    recomputed: int = 0  # rows recomputed one token wide because a wide forward could not call them (tie guard)
    unresolved_steps: int = 0  # steps that left such a row to a one-token step of their own (committing no token)
    calibration_seconds: float = 0.0  # the one-time forward-cost calibration (first call per model), inside seconds
    accept_lengths: list[int] = field(default_factory=list)  # tokens committed per step
    draft_lengths: list[int] = field(default_factory=list)  # draft tokens (tree nodes) verified per step
    tree_steps: int = 0  # steps that verified a tree with branches (the others verified a chain)
    padded_steps: int = 0  # steps with nothing to draft that verified one guessed token (DraftPolicy.pad_plain)
    accepted_sources: dict[str, int] = field(default_factory=dict)  # accepted draft tokens per source
    draft_seconds: float = 0.0  # time spent in the drafter's propose (inside decode_seconds): a model's forwards
    forward_seconds: float = 0.0  # time inside the target's forward calls while decoding (inside decode_seconds)
    policy_seconds: float = 0.0  # the policy choosing the draft (or subtree) and learning from verdicts

    @property
    def tree_sizes(self) -> list[int]:
        """Deprecated: the same list as draft_lengths (a chain of k draft tokens is a tree of k nodes)."""
        warnings.warn("GenerationStats.tree_sizes is deprecated: read draft_lengths", DeprecationWarning, stacklevel=2)
        return self.draft_lengths

    @property
    def mean_tree_size(self) -> float:
        """Mean draft tokens (tree nodes) verified per step."""
        return sum(self.draft_lengths) / len(self.draft_lengths) if self.draft_lengths else 0.0

    @property
    def mean_accepted_depth(self) -> float:
        """Mean draft tokens accepted per step (the depth reached in the tree)."""
        return self.accepted_tokens / self.steps if self.steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Decoding throughput: new tokens after the first, over the time after the prefill."""
        return (self.new_tokens - 1) / self.decode_seconds if self.decode_seconds > 0 and self.new_tokens > 1 else 0.0

    @property
    def overhead_seconds(self) -> float:
        """Decoding time outside the target's forwards: drafting, the policy, tree masks, acceptance checks, cache
        bookkeeping and stopping checks (0 when the forwards were not timed)."""
        return max(0.0, self.decode_seconds - self.forward_seconds) if self.forward_seconds else 0.0

    @property
    def mean_accepted(self) -> float:
        """Mean tokens committed per verification forward (accepted draft tokens + the model's own)."""
        return (self.new_tokens - 1) / self.steps if self.steps else 0.0

    def as_dict(self) -> dict:
        return {
            "steps": self.steps,
            "drafted_tokens": self.drafted_tokens,
            "accepted_tokens": self.accepted_tokens,
            "new_tokens": self.new_tokens,
            "seconds": self.seconds,
            "prefill_seconds": self.prefill_seconds,
            "decode_seconds": self.decode_seconds,
            "tokens_per_second": self.tokens_per_second,
            "mean_accepted": self.mean_accepted,
            "recomputed": self.recomputed,
            "unresolved_steps": self.unresolved_steps,
            "calibration_seconds": self.calibration_seconds,
            "mean_tree_size": self.mean_tree_size,
            "max_tree_size": max(self.draft_lengths, default=0),
            "tree_steps": self.tree_steps,
            "mean_accepted_depth": self.mean_accepted_depth,
            "accepted_sources": dict(self.accepted_sources),
            "draft_seconds": self.draft_seconds,
            "forward_seconds": self.forward_seconds,
            "policy_seconds": self.policy_seconds,
            "overhead_seconds": self.overhead_seconds,
        }


@dataclass
class GenerationOutput:
    token_ids: list[int]
    text: str
    stats: GenerationStats
    stop_reason: str = ""  # "eos", "stop_string", "max_new_tokens"


class NonFiniteLogitsError(RuntimeError):
    """The model returned NaN or infinite logits (typically a half-precision overflow): no token can be chosen."""


def _check_finite(logits: torch.Tensor, where: str) -> None:
    """Raw logits [R, V] must be finite; checked before the processors, whose warpers legitimately write -inf.

    One sum is the cheap test (NaN and inf propagate through it; torch.isfinite(...).all() costs ~20x more on CPU);
    only a non-finite sum, which huge but finite logits can also give, pays for the exact check."""
    if math.isfinite(float(logits.sum())):
        return
    if not bool(torch.isfinite(logits).all()):
        nan = int(torch.isnan(logits).sum())
        inf = int(torch.isinf(logits).sum())
        raise NonFiniteLogitsError(
            f"the model returned non-finite logits at {where} ({nan} NaN, {inf} inf values): the weights or "
            "activations overflow in this dtype; try dtype='float32' or 'bfloat16'"
        )


def _crop(cache, tokens_to_remove: int) -> None:
    if tokens_to_remove > 0:
        cache.crop(-tokens_to_remove)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompt,
    *,
    store=None,
    index=None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    logits_processor=None,
    stop: Sequence[str] | str | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    chat: bool = False,
    streamer=None,
    drafter=None,
    policy: DraftPolicy | None = None,
    max_draft: int = 128,
    calibrate: bool = True,
    tie_margin: float | None = None,
    retrieve_k: int = 4,
    rerank: int = 0,
    tree: bool = True,
    memory=None,
    draft_model=None,
) -> GenerationOutput:
    """Generate with reference drafting; the output equals plain decoding (greedy) or has its distribution.

    Args:
        prompt: list[int], LongTensor (T,) or (1, T), or str (tokenized; chat=True applies the chat template).
        store: ReferenceStore of documents to draft from, or a list of stores (none is copied or changed); the prompt
            and the output so far are always references.
        index: a refdecode.corpus.CorpusIndex (or its path): top passages for the prompt join the references and
            its corpus-wide span index drafts where nothing local matches.
        retrieve_k: passages retrieved from `index` for the prompt.
        rerank: 0 keeps the embedding order; N > 0 lets this model rerank the embedding search's top N passages by
            how likely it finds the prompt after each (corpus.rerank.LMReranker: one batched forward over N
            passages, cheap on a GPU, seconds on a small CPU).
        temperature: 0 -> greedy; > 0 -> sampling with top_k / top_p / repetition_penalty / logits_processor and a
            torch.Generator seeded from `seed` (or pass `generator`).
        stop: stop strings; eos_token_id defaults to the model's generation config.
        streamer: an object with put(LongTensor) / end(), e.g. transformers.TextStreamer.
        drafter: None (default): the references alone (ReferenceDrafter over prompt, output, store, index and
            memory). A model drafter joining the references in the same tree (refdecode.drafters): a causal LM
            that shares the tokenizer, a known model name or checkpoint folder, "self:int8" (the target quantized
            to int8, CPU), "self:layers=N" (the target's first N layers), "self:heads" (Medusa heads trained with
            `refdecode heads train`) or "self:recycle" (the target's own earlier predictions, no training); it runs
            only where references leave room and its cost pays. Or a Drafter object, which drafts alone.
        policy: a DraftPolicy (default: adaptive, calibrated on this model); max_draft caps the draft length.
        tie_margin: greedy only; top-2 score gap below which a wide forward's argmax is recomputed one token wide
            (default: twice the largest logit change a wide forward of this model showed, see policy.tie_margin_for)
            (default: 1e-3 for float32 models, 0 for half precision, where wide and narrow forwards differ anyway).
        tree: True (default): each step merges the candidates of every source into a token tree and verifies the
            part that pays in one forward; False: one voted chain per step, as before.
        memory: a refdecode.OutputMemory: past outputs draft for this request, and this output is recorded in it.
        draft_model: the deprecated name of `drafter` for a model drafter (DeprecationWarning); its value always
            joins the references, even a model drafter object.
    Returns:
        GenerationOutput(token_ids, text, stats, stop_reason).
    """
    config = SamplingConfig(
        temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, seed=seed
    )
    check_max_new_tokens(max_new_tokens)
    check_max_draft(max_draft)
    drafter, renamed = drafter_argument(drafter, draft_model, stacklevel=4)  # 4: past torch.no_grad's wrapper
    stop_strings = stop_list(stop)
    prompt_ids = prepare_prompt(tokenizer, prompt, chat=chat)
    check_prompt_ids(model, prompt_ids)
    check_tree(tree)
    if config.sampling and generator is None:
        generator = torch.Generator(device=model.device)
        if seed is not None:
            generator.manual_seed(seed)
        else:
            generator.seed()  # a fresh seed without touching torch's global generator
    drafting = build_drafting(
        model,
        tokenizer,
        prompt_ids,
        store=store,
        index=index,
        memory=memory,
        drafter=drafter,
        alone=False if renamed else None,  # draft_model= always joined the references, even a drafter object
        policy=policy,
        tree=tree,
        max_draft=max_draft,
        retrieve_k=retrieve_k,
        rerank=rerank,
    )
    out = decode(
        model,
        tokenizer,
        prompt_ids,
        processors=build_processors(config, logits_processor),
        sampling=config.sampling,
        generator=generator,
        max_new_tokens=max_new_tokens,
        eos_ids=eos_token_ids(model, eos_token_id),
        stop_strings=stop_strings,
        streamer=streamer,
        drafter=drafting.drafter,
        policy=drafting.policy,
        calibrate=calibrate,
        tie_margin=tie_margin,
        memory=memory,
    )
    drafting.remember(model)
    return out


@torch.no_grad()  # also when called directly (tests, adapters): no autograd graph over the steps
def decode(
    model,
    tokenizer,
    prompt_ids: list[int],
    *,
    processors,
    sampling: bool,
    generator: torch.Generator | None,
    max_new_tokens: int,
    eos_ids: set[int],
    stop_strings: Sequence[str],
    streamer,
    drafter: Drafter,
    policy: DraftPolicy,
    calibrate: bool = True,
    tie_margin: float | None = None,
    stopping_criteria=None,
    memory=None,
) -> GenerationOutput:
    """The loop behind `generate` and `hf_generate`, with everything already resolved.

    processors: a transformers LogitsProcessorList producing the scores to decide on (for sampling it includes the
    temperature / top-k / top-p warpers); sampling: sample from softmax(scores), each output position with its own
    Gumbel noise drawn from `generator` (so the output depends on the seed only, not on draft lengths), else argmax.
    stopping_criteria: optional transformers StoppingCriteriaList, checked after every committed token.
    memory: an OutputMemory that records the output when decoding ends.
    The drafter may propose a chain (Draft) or a token tree (DraftTree); a model whose attention cannot take a
    tree mask (see tree_attention.supports_tree) gets the tree's favourite chain.
    """
    t_start = time.perf_counter()
    check_max_new_tokens(max_new_tokens)
    if sampling and generator is None:
        raise ValueError("sampling needs a torch.Generator")
    check_prompt_ids(model, prompt_ids)
    device = model.device
    stopper = StopChecker(tokenizer, eos_ids, stop_strings, stopping_criteria, prompt_ids)
    stats = GenerationStats()
    if streamer is not None:  # like transformers: the prompt first (TextStreamer(skip_prompt=True) drops it)
        streamer.put(torch.tensor([prompt_ids], dtype=torch.long))
    context = torch.tensor(prompt_ids, dtype=torch.long, device=device)  # [T] committed tokens, grows

    # 1) prefill: the prompt in one forward; its last row gives the first new token
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    logits = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1:].float()
    _check_finite(logits, "the prefill (output token 0)")
    scores = process_rows(processors, context, [], logits)
    noise = PositionNoise(generator, logits.shape[-1], device) if sampling and generator is not None else None
    first = choose_first(scores, noise)
    prime = getattr(drafter, "prime", None)
    if prime is not None and max_new_tokens > 1:  # a draft model's prompt forward belongs to the prefill
        prime(list(prompt_ids))
    cache.activate_past_recording()  # sliding-window layers must keep past states to be croppable
    output: list[int] = []
    stop_reason = _commit(output, [first], stopper, max_new_tokens, streamer)
    drafter.observe(output[-1:])
    context = torch.cat([context, context.new_tensor(output[-1:])])
    synchronize(device)
    stats.prefill_seconds = time.perf_counter() - t_start
    if not stop_reason and calibrate and not policy.costs:
        widths = calibration_widths(policy.max_draft)
        policy.costs = ForwardCostModel(calibrate_costs(model, cache, output[-1], widths=widths))
    if tie_margin is None:  # from how far this model's wide forwards move a logit (measured once per model)
        rounding = measured_rounding(model)
        if rounding is None and model.dtype != torch.float32 and not stop_reason:
            rounding = measure_rounding(model, cache, output[-1])
        tie_margin = tie_margin_for(model, rounding or 0.0)
    t_decode = time.perf_counter()
    stats.calibration_seconds = t_decode - t_start - stats.prefill_seconds

    trees_ok = supports_tree(model)
    force_plain = False
    session = DraftSession(model, cache, policy, processors, generator if sampling else None, row=len(prompt_ids) - 1)
    start, close = getattr(drafter, "start", None), getattr(drafter, "close", None)
    if start is not None and not stop_reason:
        start(session)
    clock = _ForwardClock(model)
    try:
        while not stop_reason:
            # 2) draft: propose (a chain or a tree), then keep what pays at this acceptance and forward cost
            budget = max_new_tokens - len(output) - 1
            t_draft = time.perf_counter()
            proposal = None if force_plain else drafter.propose(context.tolist(), min(budget, policy.draft_depth()))
            stats.draft_seconds += time.perf_counter() - t_draft
            # 3) verify in one forward; the cache is rolled back to the pending token and the accepted tokens
            position = len(output)  # output position of row 0: the token after the pending one
            step = _StepInputs(model, cache, output[-1], context, processors, noise, position, generator, policy)
            step.tie_margin, step.where = tie_margin, f"verification step {stats.steps + 1}"
            t_policy = time.perf_counter()
            tree = chain = None
            if isinstance(proposal, DraftTree):
                tree = policy.choose_tree(proposal if trees_ok else _favourite_chain(proposal), budget)
            else:
                k = 0 if proposal is None else policy.choose_length(proposal, budget)
                chain = proposal.truncated(k) if proposal is not None and k > 0 else None
            padded = tree is None and chain is None and budget >= 1 and not force_plain and policy.pad_plain()
            if padded:  # nothing worth drafting, but two tokens cost less than one here: verify a guess
                chain = Draft([_guess(context)], 0, GUESS)
            stats.policy_seconds += time.perf_counter() - t_policy
            as_tree = isinstance(proposal, DraftTree) and not padded
            result = _tree_step(tree, step) if as_tree else _chain_step(chain, step)
            stats.policy_seconds += result.policy_seconds
            if padded:
                stats.padded_steps += 1
                policy.padded(result.recomputed > 0 or result.next_token is None)
            _count_step(stats, result)
            session.forwards, session.row = session.forwards + 1, result.row
            # 4) commit: the accepted tokens and the model's own token (which is fed first next step)
            new, next_token = result.accepted, result.next_token
            stats.recomputed += result.recomputed
            if next_token is None:  # too close to call, and the cache could not be put back: a one-token step
                stats.recomputed += 1
                stats.unresolved_steps += 1
                force_plain = True
                if not new:
                    stats.accept_lengths.append(0)
                    continue
                # the last accepted token becomes the pending one: its cache entry was dropped and is re-fed next step
            else:
                new = new + [next_token]
                force_plain = False
            before = len(output)
            stop_reason = _commit(output, new, stopper, max_new_tokens, streamer)
            stats.accept_lengths.append(len(output) - before)
            drafter.observe(output[before:])
            context = torch.cat([context, context.new_tensor(output[before:])])
    finally:
        clock.stop()
        if close is not None:
            close()
    stats.forward_seconds = clock.seconds
    if streamer is not None:
        streamer.end()

    synchronize(device)
    t_end = time.perf_counter()
    stats.decode_seconds = t_end - t_decode
    stats.seconds = t_end - t_start
    stats.new_tokens = len(output)
    if memory is not None:
        memory.record(output)
    text = tokenizer.decode(output, skip_special_tokens=True) if tokenizer is not None else ""
    return GenerationOutput(output, text, stats, stop_reason)


@dataclass
class _StepInputs:
    """What one verification step needs from the loop (shapes as in decode)."""

    model: Any  # a transformers causal LM
    cache: Any  # its DynamicCache
    pending: int  # the last committed token, fed first
    context: torch.Tensor  # [T] committed tokens, the pending one included
    processors: Any  # a LogitsProcessorList, or None
    noise: PositionNoise | None
    position: int  # output position of the forward's row 0
    generator: torch.Generator | None
    policy: DraftPolicy
    tie_margin: float = 0.0
    where: str = ""  # for error messages


@dataclass
class _Step:
    """One verification step's outcome: the accepted draft tokens, the model's own token after them (None: too
    close to call, recompute one wide), and for the statistics the nodes verified and the accepted ones' sources."""

    accepted: list[int]
    next_token: int | None
    verified: int
    accepted_sources: list[str]
    branched: bool = False
    row: int | None = None  # the forward's row whose scores chose next_token (None: no next token)
    policy_seconds: float = 0.0  # the policy learning from this step's verdict
    recomputed: int = 0  # rows recomputed one token wide inside the step (too close to call at its width)


@dataclass
class _Walk:
    """The verification of one step's forward, too-close rows recomputed: the accepted path (node indices; a chain's
    are 0..accepted - 1), the next token (None: a row stayed too close to call), the rule's acceptance
    probabilities, and the rows recomputed one token wide (in order) with their forwards' seconds."""

    path: list[int]
    next_token: int | None
    accept_probs: list[float] | None
    exact_rows: list[int]
    seconds: float

    def row_for_drafters(self) -> int | None:
        """The row of the target's *last* forward that chose next_token, for drafters reading its hidden states
        (session.row): the step's forward's row after the path, or 0 when the last one-token recompute chose it,
        or None when a recompute ran after the row that chose it (its hidden states are gone)."""
        if self.next_token is None:
            return None
        row = _row_after(self.path)
        if not self.exact_rows:
            return row
        return 0 if self.exact_rows[-1] == row else None


GUESS_WINDOW = 64  # committed tokens a guess is drawn from


def _guess(context: torch.Tensor) -> int:
    """The token a step with nothing to draft verifies anyway (DraftPolicy.pad_plain): the most frequent of the last
    GUESS_WINDOW committed tokens. The drafters found no earlier occurrence of the pending token to copy from, so
    nothing better is known; the step costs less than a plain one whatever the guess is."""
    return int(torch.mode(context[-GUESS_WINDOW:]).values)


def _row_after(path: list[int]) -> int:
    """The forward's flat row after an accepted path of node indices (0: the pending token's, i + 1: node i's): the
    row that chose the next token, or was too close to call."""
    return path[-1] + 1 if path else 0


def _walk(s: _StepInputs, past: int, fed: list[int], logits: torch.Tensor, rescore, verify) -> _Walk:
    """Verify the rows of one forward; where the verdict stops at a row too close to call at this width (the tie
    guard), recompute that row one token wide over the same cache entries, as plain decoding computes it, and
    verify again with it exact, so that the walk goes on over the forward's other rows. Fewer forwards than
    leaving the row to a one-token step and drafting again after it, and the policy learns the real outcome.

    past: cache length before the forward; fed: the token fed at each flat row ([pending] + the draft);
    logits: [rows, V] the forward's; rescore(logits) -> scores; verify(scores, exact_rows) -> (path, next, probs)."""
    exact: list[int] = []
    seconds = 0.0
    path, next_token, accept_probs = verify(rescore(logits), exact)
    while next_token is None:
        row = _row_after(path)
        t0 = time.perf_counter()
        narrow = recompute_row(s.model, s.cache, past, [0] + [p + 1 for p in path[:-1]] if path else [], fed[row])
        if narrow is None:  # this cache cannot be put back: the caller leaves the row to a one-token step
            break
        _check_finite(narrow[None], f"{s.where} (output token {s.position + len(path)}, recomputed one token wide)")
        synchronize(s.model.device)
        seconds += time.perf_counter() - t0
        logits = torch.cat([logits[:row], narrow[None], logits[row + 1 :]])
        exact.append(row)
        path, next_token, accept_probs = verify(rescore(logits), exact)
    return _Walk(path, next_token, accept_probs, exact, seconds)


def _count_step(stats: GenerationStats, step: _Step) -> None:
    stats.steps += 1
    stats.drafted_tokens += step.verified
    stats.draft_lengths.append(step.verified)
    stats.tree_steps += int(step.branched)
    stats.accepted_tokens += len(step.accepted)
    for name in step.accepted_sources:
        stats.accepted_sources[name] = stats.accepted_sources.get(name, 0) + 1


def _chain_step(draft: Draft | None, s: _StepInputs) -> _Step:
    """Verify a chain of k draft tokens (or none) in one forward of k + 1 tokens; crop the rejected ones."""
    tokens = draft.tokens if draft is not None else []
    k = len(tokens)
    t0 = time.perf_counter()
    logits = forward_tokens(s.model, s.cache, [s.pending] + tokens)  # [k + 1, V]
    _check_finite(logits, f"{s.where} (output tokens {s.position}..{s.position + k})")
    past = s.cache.get_seq_length() - (k + 1)
    tie_margin = s.tie_margin if k > 0 else 0.0
    draft_probs = draft.probs if draft is not None else None

    verify = _chain_verifier(s, tokens, draft_probs, tie_margin)
    walk = _walk(
        s, past, [s.pending] + tokens, logits, lambda x: process_rows(s.processors, s.context, tokens, x), verify
    )
    accepted_count = len(walk.path)
    synchronize(s.model.device)
    t_policy = time.perf_counter()
    s.policy.update(draft, k, accepted_count, k + 1, t_policy - t0 - walk.seconds, walk.accept_probs)
    _observe_recomputes(s.policy, walk)
    policy_seconds = time.perf_counter() - t_policy
    # keep the pending token and the accepted ones; on a too-close call the last accepted one is re-fed next step
    _crop(s.cache, k - accepted_count + (1 if walk.next_token is None else 0))
    source = (draft.source or "reference") if draft is not None else ""
    accepted = tokens[:accepted_count]
    return _Step(
        accepted,
        walk.next_token,
        k,
        [source] * accepted_count,
        row=walk.row_for_drafters(),
        policy_seconds=policy_seconds,
        recomputed=len(walk.exact_rows),
    )


def _chain_verifier(s: _StepInputs, tokens: list[int], draft_probs, tie_margin: float):
    """verify(scores, exact_rows) -> (path, next token, acceptance probabilities) of a chain of `tokens`, for _walk:
    a chain's path is its accepted prefix, nodes 0 .. accepted - 1."""

    def verify(scores, exact_rows):
        verdict, probs = verify_chain(
            scores,
            tokens,
            s.noise,
            s.position,
            s.generator,
            draft_probs=draft_probs,
            tie_margin=tie_margin,
            exact_rows=exact_rows,
        )
        return list(range(verdict.accepted)), verdict.next_token, probs

    return verify


def _observe_recomputes(policy, walk: _Walk) -> None:
    """A step's one-token recomputes are one-token forwards: the cost model learns their time as such."""
    for _ in walk.exact_rows:
        policy.update(None, 0, 0, 1, walk.seconds / len(walk.exact_rows))


def _tree_step(tree: DraftTree | None, s: _StepInputs) -> _Step:
    """Verify a token tree in one forward (a chain takes the plain forward); keep the accepted path's cache rows."""
    tree = tree if tree is not None else DraftTree()
    n = len(tree)
    past = s.cache.get_seq_length()
    t0 = time.perf_counter()
    if tree.is_chain():  # the fast path: no mask to build, the cache is cropped
        logits = forward_tokens(s.model, s.cache, [s.pending] + tree.tokens)
    else:
        with routed(s.model, n + 1):
            logits = tree_forward(s.model, s.cache, s.pending, tree)  # [n + 1, V]: row i + 1 scores after node i
    _check_finite(logits, f"{s.where} (output token {s.position}, {n} draft nodes)")
    tie_margin = s.tie_margin if n > 0 else 0.0
    if tree.is_chain():
        draft_probs = tree.q if n else None

        def rescore(x):
            return process_rows(s.processors, s.context, tree.tokens, x)

        verify = _chain_verifier(s, tree.tokens, draft_probs, tie_margin)
    else:
        paths: list[list[int]] | None = None
        if s.processors:  # row i + 1 sees the context plus its path (penalties read it); nothing reads it otherwise
            paths = [[]] + [[tree.tokens[j] for j in tree.path(i)] for i in range(n)]

        def rescore(x):
            return process_rows(s.processors, s.context, tree.tokens, x, row_prefixes=paths)

        def verify(scores, exact_rows):
            verdict, probs = verify_tree(
                scores, tree, s.noise, s.position, s.generator, tie_margin=tie_margin, exact_rows=exact_rows
            )
            return verdict.path, verdict.next_token, probs

    walk = _walk(s, past, [s.pending] + tree.tokens, logits, rescore, verify)
    path, next_token = walk.path, walk.next_token
    synchronize(s.model.device)
    t_policy = time.perf_counter()
    if n:
        s.policy.update_tree(tree, path, n + 1, t_policy - t0 - walk.seconds, walk.accept_probs)
    else:
        s.policy.update(None, 0, 0, 1, t_policy - t0 - walk.seconds)
    _observe_recomputes(s.policy, walk)
    policy_seconds = time.perf_counter() - t_policy
    # keep the pending token and the accepted path; on a too-close call the last accepted one is re-fed next step
    kept = path if next_token is not None else path[:-1]
    rows = [0] + [i + 1 for i in kept] if (path or next_token is not None) else []
    if tree.is_chain():
        _crop(s.cache, n + 1 - len(rows))
    else:
        keep_rows(s.cache, past, rows)
    return _Step(
        [tree.tokens[i] for i in path],
        next_token,
        n,
        [tree.sources[i] or "reference" for i in path],
        branched=not tree.is_chain(),
        row=walk.row_for_drafters(),
        policy_seconds=policy_seconds,
        recomputed=len(walk.exact_rows),
    )


class _ForwardClock:
    """Seconds spent inside `model`'s own forward calls from now until stop(): a pre-hook and a hook on its top
    module read the clock around each call, the device synchronized at the call's end so that the time is the
    forward's, not its launch's. A separate draft model's forwards are not counted (other modules)."""

    def __init__(self, model):
        self.seconds, self._started = 0.0, 0.0
        device = model.device

        def before(_module, _args) -> None:
            self._started = time.perf_counter()

        def after(_module, _args, _output) -> None:
            synchronize(device)
            self.seconds += time.perf_counter() - self._started

        self._handles = [model.register_forward_pre_hook(before), model.register_forward_hook(after)]

    def stop(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _favourite_chain(tree: DraftTree) -> DraftTree:
    """The path of first children from the root (build_tree's flat order puts it first): what a model that cannot
    verify trees verifies instead."""
    n = 0
    while n < len(tree) and tree.parents[n] == n - 1:
        n += 1
    return tree.subtree(range(n))


def _commit(output: list[int], new: list[int], stopper: StopChecker, max_new_tokens: int, streamer) -> str:
    """Append `new`, cut at the first stop (kept, like transformers) or at max_new_tokens; returns the stop reason."""
    start = len(output)
    output.extend(new)
    reason = ""
    found = stopper.first_stop(output, start)
    if found is not None:
        del output[found[0] + 1 :]
        reason = found[1]
    if len(output) >= max_new_tokens:
        del output[max_new_tokens:]
        reason = reason or "max_new_tokens"
    if streamer is not None and len(output) > start:
        streamer.put(torch.tensor(output[start:], dtype=torch.long))
    return reason
