"""Stopping: which committed token ends generation (EOS, a completed stop string, a transformers criterion).

Knows: how to decode just enough of the output to see a stop string complete, whatever the tokenizer's byte-level
pieces (emoji and CJK take several tokens per character), and how to call a transformers StoppingCriteriaList.
Does not know: the model, drafting or verification; the decode loop (decoding.py) asks it after every commit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["StopChecker", "stop_list"]


def stop_list(stop) -> list[str]:
    """None / a str / a sequence of str -> list[str]; ValueError for anything else (a bare int, bytes, ...)."""
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, (list, tuple, set, frozenset)) and all(isinstance(s, str) for s in stop):
        return list(stop)
    raise ValueError(f"stop must be a str or a list of str, got {stop!r:.60}")


class StopChecker:
    """Finds the first new token that ends generation: EOS, a token whose text completes a stop string, or one after
    which a transformers StoppingCriteria (called with the prompt and output up to that token) says stop."""

    def __init__(self, tokenizer, eos_ids: set[int], stop_strings: Sequence[str], criteria=None, prompt_ids=()):
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.criteria = criteria
        self.prompt_ids = list(prompt_ids)
        self.stop_strings = [s for s in stop_strings if s]
        if self.stop_strings and tokenizer is None:
            raise ValueError("stop strings need the tokenizer")
        self.longest = max((len(s) for s in self.stop_strings), default=0)
        # Tokens decoded before token i: starts at one per character, doubles while the text is too short (emoji and
        # CJK take several byte-level tokens per character) and remembers what sufficed, up to a cap.
        self.width = self.longest + 8
        self.max_width = 4 * (self.longest + _WINDOW_SLACK) + 8  # 4 UTF-8 bytes per character at most

    def first_stop(self, output: list[int], start: int) -> tuple[int, str] | None:
        """(index in output, reason) of the first stopping token among output[start:], else None."""
        for i in range(start, len(output)):
            if output[i] in self.eos_ids:
                return i, "eos"
            if self.stop_strings and self._completes_stop_string(output, i):
                return i, "stop_string"
            if self.criteria and self._criteria_stop(output[: i + 1]):
                return i, "stopping_criteria"
        return None

    def _criteria_stop(self, output: list[int]) -> bool:
        ids = torch.tensor([self.prompt_ids + output], dtype=torch.long)
        return bool(torch.as_tensor(self.criteria(ids, None)).any())

    def _completes_stop_string(self, output: list[int], i: int) -> bool:
        """A stop string counts once its last character comes from token i. The window of tokens decoded before i
        must hold at least the longest stop string's characters (plus slack for a partial character at its start,
        decoded as U+FFFD), however many tokens that takes; its width is found by doubling, not by decoding the
        whole output, so a step costs O(tokens per stop string)."""
        width = self.width
        while True:
            start = max(0, i - width)
            before = self.tokenizer.decode(output[start:i])
            if start == 0 or len(before) >= self.longest + _WINDOW_SLACK:
                break
            width *= 2
        self.width = max(self.width, min(width, self.max_width))
        after = self.tokenizer.decode(output[start : i + 1])
        return any(s in after and (s not in before or after.rfind(s) + len(s) > len(before)) for s in self.stop_strings)


_WINDOW_SLACK = 4  # characters: up to 3 U+FFFD for a UTF-8 character cut at the window's start, 1 for a lead space
