"""Sampling configuration: temperature, top-k, top-p, repetition penalty and caller logits processors.

Knows: how to validate the options and turn them into a transformers LogitsProcessorList in the order transformers'
own `generate` applies them (penalties and caller processors first, then temperature, top-k, top-p), so the
distribution we verify against is exactly the one plain sampling draws from; and how to apply such a list to the
k + 1 rows of one verification forward quickly (`process_rows`). Does not know: drafts or models.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["SamplingConfig", "build_processors", "process_rows", "top_p_rows"]


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 -> greedy (top_k/top_p unused); temperature > 0 -> sampling. seed makes sampling repeatable."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    def __post_init__(self):
        # NaN compares false with everything, so each check is written to fail for it (nan temperature would
        # otherwise slip through as "not > 0", i.e. silently greedy).
        if not (_real(self.temperature, "temperature") >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and not _integer(self.top_k, "top_k") >= 0:  # 0 = off, as in transformers
            raise ValueError(f"top_k must be >= 0 (0 or None = off), got {self.top_k}")
        if self.top_p is not None and not 0.0 < _real(self.top_p, "top_p") <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty is not None and not (
            _real(self.repetition_penalty, "repetition_penalty") > 0 and math.isfinite(self.repetition_penalty)
        ):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        if self.seed is not None and not 0 <= _integer(self.seed, "seed") < 2**64:
            raise ValueError(f"seed must be in 0 .. 2**64 - 1, got {self.seed}")

    @property
    def sampling(self) -> bool:
        return self.temperature > 0


def _real(value, name: str) -> float:
    """value as a float if it is a real number (not a bool or a str); ValueError naming the option otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r:.40}")
    return float(value)


def _integer(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {value!r:.40}")
    return int(value)


def build_processors(config: SamplingConfig, extra=None):
    """A LogitsProcessorList for `config`; `extra` (caller processors) runs after the penalty, before the warpers."""
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors = LogitsProcessorList()
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if extra:
        processors.extend(extra)
    if config.sampling:
        if config.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k:
            processors.append(TopKLogitsWarper(config.top_k))
        if config.top_p is not None and config.top_p < 1.0:
            processors.append(TopPLogitsWarper(config.top_p))
    return processors


def _row_independent(processor) -> bool:
    """True for transformers' warpers whose output row depends on that row's scores alone (not on input_ids)."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    return type(processor) in (TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)


def process_rows(
    processor,
    context_ids: torch.Tensor,
    draft: Sequence[int],
    logits: torch.Tensor,
    *,
    row_prefixes: Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """Apply a transformers LogitsProcessor(List) to every verification row with the prefix that row really has.

    context_ids: [T] committed tokens (prompt + output, the pending token included); logits: [k + 1, V] float32.
    Row i sees context + draft[:i], exactly what plain decoding would have passed at that position; for a tree,
    row_prefixes[i] gives row i's draft tokens instead (its path from the root).

    Processors that read input_ids (penalties, the caller's) run row by row. The trailing warpers (temperature,
    top-k, top-p) read nothing but their row, so they run on all rows at once, and top-p without sorting the
    vocabulary (`top_p_rows`): transformers sorts all V scores of a row, ~10 ms on a 2-core CPU for SmolLM2's 49k
    vocabulary, which for a 16-token draft would cost more than the forward itself. The result is the same tensor.
    """
    if not processor:
        return logits
    procs = list(processor) if isinstance(processor, list) else [processor]
    n = len(procs)
    while n > 0 and _row_independent(procs[n - 1]):
        n -= 1
    head, tail = procs[:n], procs[n:]
    scores = logits
    if head:
        draft_ids = torch.as_tensor(list(draft), dtype=context_ids.dtype, device=context_ids.device)
        rows = []
        for i in range(logits.shape[0]):
            extra = draft_ids[:i] if row_prefixes is None else draft_ids.new_tensor(list(row_prefixes[i]))
            ids, row = torch.cat([context_ids, extra])[None, :], logits[i : i + 1].clone()
            for p in head:
                row = p(ids, row)
            rows.append(row)
        scores = torch.cat(rows, dim=0)
    from transformers import TopPLogitsWarper

    for p in tail:
        if isinstance(p, TopPLogitsWarper):
            scores = top_p_rows(scores, p.top_p, min_tokens_to_keep=p.min_tokens_to_keep, filter_value=p.filter_value)
        else:
            scores = p(context_ids[None, :], scores)
    return scores


def top_p_rows(
    scores: torch.Tensor,
    top_p: float,
    *,
    min_tokens_to_keep: int = 1,
    filter_value: float = -float("inf"),
    width: int = 256,
    margin: float = 1e-4,
) -> torch.Tensor:
    """transformers' TopPLogitsWarper on [R, V] scores, reading only each row's `width` best scores.

    transformers keeps a token iff the probability mass of the tokens ranked strictly above it is < top_p (it
    sorts ascending and drops tokens whose cumulative mass, themselves included, is <= 1 - top_p). The nucleus is
    therefore a prefix of the descending order; where a row's best `width` tokens already carry more than top_p,
    that prefix lies inside them and topk(width) finds it. Rows where it does not, or where the cut falls within
    `margin` of top_p (float sums in another order could then cut elsewhere) or between two equal scores (the
    order of ties is the sort's), go through transformers' own warper, so the result is always its result.
    """
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    m = min(width, scores.shape[-1])
    values, ids = scores.topk(m, dim=-1)  # [R, m], descending
    probs = (values - torch.logsumexp(scores, dim=-1, keepdim=True)).exp()
    above = probs.cumsum(dim=-1) - probs  # mass ranked strictly above each token
    keep = above < top_p
    keep[:, :min_tokens_to_keep] = True
    cut = keep.sum(dim=-1)  # [R] tokens kept
    rows = torch.arange(scores.shape[0], device=scores.device)
    first_out = cut.clamp(max=m - 1)  # [R] rank of the first dropped token
    last_in = (first_out - 1).clamp(min=0)  # [R] rank of the last kept token
    inside = cut < m  # the first dropped token is in the top m
    clear_cut = ((above[rows, first_out] - top_p).abs() > margin) & ((above[rows, last_in] - top_p).abs() > margin)
    no_tie = values[rows, first_out] != values[rows, last_in]
    safe = inside & clear_cut & no_tie
    remove = torch.ones_like(scores, dtype=torch.bool).scatter(1, ids, ~keep)
    out = scores.masked_fill(remove, filter_value)
    if not bool(safe.all()):
        from transformers import TopPLogitsWarper

        warper = TopPLogitsWarper(top_p, filter_value=filter_value, min_tokens_to_keep=min_tokens_to_keep)
        slow = (~safe).nonzero().flatten()
        out[slow] = warper(None, scores[slow])
    return out
