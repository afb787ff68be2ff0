"""Sampling configuration: temperature, top-k, top-p, repetition penalty and caller logits processors.

Knows: how to validate the options and turn them into a transformers LogitsProcessorList in the order transformers'
own `generate` applies them (penalties and caller processors first, then temperature, top-k, top-p), so the
distribution we verify against is exactly the one plain sampling draws from. Does not know: drafts or models.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SamplingConfig", "build_processors"]


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 -> greedy (top_k/top_p unused); temperature > 0 -> sampling. seed makes sampling repeatable."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def sampling(self) -> bool:
        return self.temperature > 0


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
