"""A drafter that runs a causal LM sharing the target's tokenizer: a separate small model, the target's int8 copy
(int8.py) or the target's own first layers (early_exit.py).

Knows: how to run a draft model between verification steps and keep its KV cache in step with the committed
context (its own cache, or the target's cache rows of the layers it shares), and when drafting one more token
pays. Does not know: acceptance rules (verification.py) or the loop (decoding.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from ..tree import DraftTree
from .base import MAX_DRAFT_TOKENS, DraftSession, ModelDrafterBase

__all__ = ["ModelDrafter"]


class ModelDrafter(ModelDrafterBase):
    """Drafts with a causal LM that shares the target's tokenizer: a separate small model with its own cache, the
    target's int8 copy, or the target's first layers (`shared_cache=True`: it writes into the target's cache rows of
    those layers and crops them back, so it never prefills).

    Each step it feeds the committed tokens it has not seen (its cache is cropped back to the longest prefix it
    shares with the context: rejected drafts roll back there), then drafts one token per forward while another
    token raises the expected tokens per second (see worth_drafting), with the draft's top-k alternatives at each
    depth as siblings (greedy) or, sampling alone, a chain sampled from its distributions q.

    window: an own-cache model sees the last `window` to 2 * `window` tokens of the context: it starts again from
    the last `window` tokens when its cache would grow past twice that or lags by more than that, so catching up
    never costs more than one window-wide forward (measured: prefilling a 1300-token prompt with the int8 copy cost
    more than what its drafts saved).
    """

    def __init__(self, model, *, name: str = "draft", shared_cache: bool = False, top_k: int = 3, window: int = 256):
        super().__init__()
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.model, self.name, self.shared_cache, self.top_k, self.window = model, name, shared_cache, top_k, window
        self.cache: Any = None
        self.cached: list[int] = []  # the tokens in self.cache (own cache only): context[offset : offset + len]
        self.offset = 0
        self._primed = False  # prime() filled the cache for the call about to start

    @torch.no_grad()
    def prime(self, prompt_ids: Sequence[int]) -> None:
        """Called with the target's prefill, before the first token is out: an own cache is fed the prompt's last
        `window` tokens now, so this prompt-sized forward is prefill work (as a serving engine prefills its draft
        model with the target) and the first draft step feeds one token instead of a window. A shared cache needs
        nothing. A drafter never timed takes this forward's time as its cost per token until it is measured."""
        if self.shared_cache or not prompt_ids:
            return
        self._restart(max(0, len(prompt_ids) - self.window))
        feed = list(prompt_ids[self.offset :])
        ids = torch.tensor([feed], dtype=torch.long, device=self.model.device)
        t0 = time.perf_counter()
        self.model(input_ids=ids, cache=self.cache, use_cache=True, logits_to_keep=1)
        if self.seconds_per_token == 0.0:  # never timed: no draft token costs less than a forward, and this one
            # prices the first step's decision whether to run at all (pays), not only how far to draft
            self.seconds_per_token = time.perf_counter() - t0
        self.cached, self._primed = feed, True

    def start(self, session: DraftSession) -> None:
        super().start(session)
        if not self.shared_cache and not self._primed:
            self._restart(0)
        self._primed = False  # a later call starts afresh unless primed again

    def _restart(self, offset: int) -> None:
        from transformers import DynamicCache

        self.cache, self.cached, self.offset = DynamicCache(config=self.model.config), [], offset
        self.cache.activate_past_recording()  # sliding-window layers (Gemma 3) must stay croppable on rollback

    def close(self) -> None:
        super().close()
        self.cache, self.cached, self._primed = None, [], False

    def _forward(self, cache, token_ids: list[int]) -> torch.Tensor:
        """Logits [V_target] after feeding `token_ids`; the draft's columns beyond the target's vocabulary dropped."""
        assert self.session is not None
        ids = torch.tensor([token_ids], dtype=torch.long, device=self.model.device)
        logits = self.model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1].float()
        vocab = self.session.model.config.vocab_size
        if logits.shape[-1] > vocab:
            logits = logits[:vocab]
        elif logits.shape[-1] < vocab:
            logits = torch.cat([logits, logits.new_full((vocab - logits.shape[-1],), float("-inf"))])
        return logits.to(self.session.model.device)

    def _catch_up(self, context: Sequence[int]) -> tuple[Any, torch.Tensor, int] | None:
        """Bring the draft's cache to the context minus the pending token and feed the pending token: -> (cache,
        logits after the pending token, rows to crop from a shared cache afterwards)."""
        assert self.session is not None
        if self.shared_cache:
            cache = self.session.cache
            if cache.get_seq_length() != len(context) - 1:  # not between steps as expected: do not guess
                return None
            return cache, self._forward(cache, [context[-1]]), 1
        start, common = self.offset, 0
        limit = min(len(self.cached), len(context) - 1 - start)
        while common < limit and self.cached[common] == context[start + common]:
            common += 1
        if len(context) - start - common > self.window or len(context) - start > 2 * self.window:
            # far behind (skipped steps, a long prompt) or a long cache: start again from the last `window` tokens,
            # so catching up never costs more than one window-wide forward (a draft needs recent context only)
            self._restart(max(0, len(context) - self.window))
            common = 0
        elif common < len(self.cached):
            self.cache.crop(common - len(self.cached))  # transformers 5 takes the count of tokens to drop
            del self.cached[common:]
        feed = list(context[self.offset + common :])
        logits = self._forward(self.cache, feed)
        self.cached.extend(feed)
        return self.cache, logits, 0

    @torch.no_grad()
    def propose(self, context: Sequence[int], max_tokens: int) -> DraftTree | None:
        if self.session is None or max_tokens <= 0 or (self.standalone and not self.pays(0.0, 1)):
            return None
        max_tokens = min(max_tokens, MAX_DRAFT_TOKENS)
        t0 = time.perf_counter()
        caught = self._catch_up(context)
        if caught is None:
            return None
        cache, logits, fed = caught
        first_seconds = time.perf_counter() - t0
        if self.seconds_per_token == 0.0:  # never timed: a draft token costs at least what this forward did, and
            # pricing it at zero would draft as long as the draft stays confident (seconds of 0.5B forwards where
            # the target verifies 16 tokens in 0.2 s)
            self.seconds_per_token = first_seconds
        context_t = torch.as_tensor(list(context), dtype=torch.long, device=self.session.model.device)
        chain: list[tuple[int, float, Any, list]] = []
        drafted: list[int] = []
        expected, path_prob, spent = 1.0, 1.0, first_seconds
        steps = 1
        while len(chain) < max_tokens:
            token, confidence, q, alternatives = self._token_rows(logits, context_t, drafted)
            p = path_prob * self._acceptance(confidence)
            if not self.worth_drafting(expected, spent, p, len(chain) + 1) and chain:
                break
            chain.append((token, confidence, q, alternatives))
            drafted.append(token)
            expected, path_prob = expected + p, p
            if len(chain) >= max_tokens:
                break
            t1 = time.perf_counter()
            logits = self._forward(cache, [token])
            spent += time.perf_counter() - t1
            steps += 1
            if self.shared_cache:
                fed += 1
            else:
                self.cached.append(token)
        if self.shared_cache and fed:  # only the first layers hold draft rows (crop(-n) would cut every layer)
            for layer in cache.layers[: self.model.config.num_hidden_layers]:
                layer.crop(-fed)
        self._time(time.perf_counter() - t0, steps)
        self.proposals += 1
        return self._tree(chain)
