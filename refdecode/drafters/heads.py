"""Medusa-style heads as a drafter (`"self:heads"`): guesses from the target's last hidden state.

Knows: how to read the hidden state of the verification forward that chose the pending token (a forward hook on
the target's final norm) and turn the heads' logits into a token tree. Does not know: how heads are built, trained,
saved or loaded (refdecode/heads.py), acceptance rules or the loop.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from ..tree import DraftTree
from .base import DraftSession, ModelDrafterBase

__all__ = ["HeadsDrafter"]


class HeadsDrafter(ModelDrafterBase):
    """Medusa-style heads (refdecode.heads.MedusaHeads) on the target's last hidden state: head k guesses the token
    k + 1 positions after the row that chose the pending token, from the verification forward itself, so drafting
    costs a few small matrix products and no forward. The hidden state is read by a forward hook on the target's
    final norm, registered for the call (start / close)."""

    name = "heads"

    def __init__(self, heads, *, top_k: int = 3):
        super().__init__()
        self.heads, self.top_k = heads, top_k
        self._hook = None
        self._hidden: torch.Tensor | None = None
        self._captured = -1  # session.forwards when the hidden states were captured

    def start(self, session: DraftSession) -> None:
        super().start(session)
        norm = _final_norm(session.model)
        self._hidden, self._captured = None, -1

        def capture(module, inputs, output):
            self._hidden = output if isinstance(output, torch.Tensor) else output[0]
            self._captured = session.forwards + 1  # the forward now running is the next verification

        self._hook = norm.register_forward_hook(capture)

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
        self._hook, self._hidden = None, None
        super().close()

    @torch.no_grad()
    def propose(self, context: Sequence[int], max_tokens: int) -> DraftTree | None:
        s = self.session
        if s is None or max_tokens <= 0 or s.row is None or self._hidden is None or self._captured != s.forwards:
            return None
        if s.row >= self._hidden.shape[1] or (self.standalone and not self.pays(0.0, 1)):
            return None
        t0 = time.perf_counter()
        hidden = self._hidden[0, s.row].to(self.heads.vocab_ids.device)
        logits = self.heads(hidden.to(_dtype(self.heads))).float()  # [K, V']
        depth = min(max_tokens, logits.shape[0])
        if s.sampling and self.use_q or s.processors:  # the processors and q need the full vocabulary
            rows = self._full_rows(logits[:depth], list(context))
        else:  # greedy: top-k over the restricted vocabulary, mapped to token ids (no [V] tensors on a 49k vocabulary)
            rows = self._restricted_rows(logits[:depth])
        chain: list[tuple[int, float, Any, list]] = []
        expected, path_prob = 1.0, 1.0
        for token, confidence, q, alternatives in rows:
            p = path_prob * self._acceptance(confidence)
            if not self.worth_drafting(expected, 0.0, p, len(chain) + 1) and chain:
                break
            chain.append((token, confidence, q, alternatives))
            expected, path_prob = expected + p, p
        self._time(time.perf_counter() - t0, len(chain))
        self.proposals += 1
        return self._tree(chain, share_continuations=True)

    def _restricted_rows(self, logits: torch.Tensor) -> list[tuple[int, float, Any, list]]:
        """[K, V'] head logits -> per head (token, probability, None, alternatives) from a softmax over V'."""
        probs = torch.softmax(logits, dim=-1)
        top = torch.topk(probs, k=min(self.top_k, probs.shape[-1]), dim=-1)
        ids = self.heads.vocab_ids[top.indices].tolist()
        values = top.values.tolist()
        return [
            (row[0], vals[0], None, list(zip(row[1:], vals[1:], strict=True)))
            for row, vals in zip(ids, values, strict=True)
        ]

    def _full_rows(self, logits: torch.Tensor, context: list[int]) -> list[tuple[int, float, Any, list]]:
        """[K, V'] head logits -> per head, through the call's processors on the full vocabulary (sampling, or
        greedy with a penalty); each head sees the drafted tokens before it as its prefix."""
        assert self.session is not None
        vocab = self.session.model.config.vocab_size
        full = logits.new_full((logits.shape[0], vocab), float("-inf"))
        full[:, self.heads.vocab_ids] = logits
        full = full.to(self.session.model.device)
        context_t = torch.as_tensor(context, dtype=torch.long, device=self.session.model.device)
        rows: list[tuple[int, float, Any, list]] = []
        drafted: list[int] = []
        for k in range(full.shape[0]):
            row = self._token_rows(full[k], context_t, drafted)
            rows.append(row)
            drafted.append(row[0])
        return rows


def _dtype(module) -> torch.dtype:
    param = next(module.parameters(), None)
    return param.dtype if param is not None else torch.float32


def _final_norm(model):
    """The module whose output lm_head reads (the decoder's final norm)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    norm = getattr(decoder, "norm", None)
    if norm is None:
        raise ValueError(f"cannot find the final norm of {type(model).__name__}: heads need the last hidden state")
    return norm
