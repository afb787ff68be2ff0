"""One prompt forward shared by every method the benchmark runs on that prompt.

Every method starts by running the same prompt through the same model with an empty KV cache: on a CPU that forward
costs tens of seconds for a 1.5B model in float32 and minutes in emulated bfloat16, times the number of methods. The
benchmark measures decoding throughput, which excludes that forward, so it may compute it once per prompt:
`SharedPrefill.prime(prompt_ids)` runs it, keeps the KV cache and the last row's logits, and while the context is
active every call of the model that asks for exactly that prefill (same input ids, an empty cache, only the last
row's logits, no extra outputs) gets a copy of what was kept instead of a new forward. Any other call, and a prefill
of another prompt, runs the model as usual. The copy holds the same numbers the forward would compute on this
machine, so outputs do not change (tests/bench/test_bench.py checks greedy and refdecode outputs with and without it).

Knows: how transformers' models are called for a prefill (refdecode's loop and `generate` both call
`model(input_ids=..., cache=..., logits_to_keep=1, ...)` with an empty cache). Does not know: which methods run.
"""

from __future__ import annotations

import functools
import time

import torch

__all__ = ["SharedPrefill"]

# keyword arguments a prefill may carry that do not change what it computes for the last row
_NEUTRAL = {"attention_mask", "position_ids", "use_cache", "return_dict", "logits_to_keep", "cache_position"}


def _cache_of(kwargs: dict):
    """The cache a call passes (transformers 5 names it `cache`, earlier versions `past_key_values`)."""
    return kwargs.get("cache", kwargs.get("past_key_values"))


class SharedPrefill:
    """Context manager serving one primed prefill to every method (see the module docstring).

    hits: prefills served from the copy since the last prime.
    """

    def __init__(self, model):
        self.model = model
        self._ids: torch.Tensor | None = None
        self._layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._logits: torch.Tensor | None = None
        self._output_type = None
        self._cache_field = "past_key_values"
        self._forward = None
        self._seconds = 0.0
        self.hits = 0

    def __enter__(self) -> SharedPrefill:
        original = self.model.forward

        @functools.wraps(original)  # keeps the signature: generate checks it for logits_to_keep
        def forward(*args, **kwargs):
            served = self._serve(args, kwargs)
            return served if served is not None else original(*args, **kwargs)

        self._forward = original
        self.model.forward = forward
        return self

    def __exit__(self, *exc) -> None:
        if "forward" in vars(self.model):
            del self.model.forward  # back to the class's method
        self._forward = None
        self._ids, self._layers, self._logits = None, [], None

    @torch.no_grad()
    def prime(self, prompt_ids) -> float:
        """Run the prefill of `prompt_ids` once and keep it; returns its seconds (those of the forward already kept
        when the same prompt is primed again, e.g. the warm-up's prompt, which is also the first timed one). Needs
        the context to be active."""
        from transformers import DynamicCache

        if self._forward is None:
            raise RuntimeError("SharedPrefill.prime needs the context: with SharedPrefill(model) as shared: ...")
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.model.device)
        self.hits = 0
        if self._ids is not None and torch.equal(ids, self._ids):
            return self._seconds
        cache = DynamicCache(config=self.model.config)
        t0 = time.perf_counter()
        out = self._forward(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        if ids.device.type == "cuda":
            torch.cuda.synchronize(ids.device)
        seconds = self._seconds = time.perf_counter() - t0
        states = [(getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in cache.layers]
        if any(k is None or v is None for k, v in states):  # recurrent or linear-attention layers: not copied
            self._ids = None
            return seconds
        self._ids = ids
        self._layers = [(k.clone(), v.clone()) for k, v in states]  # type: ignore[union-attr]
        self._logits = out.logits[:, -1:].clone()
        self._output_type = type(out)
        self._cache_field = next((k for k, v in out.items() if v is cache), "past_key_values")
        return seconds

    def _serve(self, args, kwargs):
        if self._ids is None or args or kwargs.get("input_ids") is None:
            return None
        if set(kwargs) - _NEUTRAL - {"input_ids", "cache", "past_key_values"}:
            return None  # hidden states, attentions, embeddings: more than the copy holds
        if kwargs.get("logits_to_keep", 0) != 1 or kwargs.get("use_cache") is False:
            return None
        cache, ids = _cache_of(kwargs), kwargs["input_ids"]
        if cache is None or cache.get_seq_length() != 0 or not torch.equal(ids, self._ids):
            return None
        mask = kwargs.get("attention_mask")
        if mask is not None and not bool(mask.all()):
            return None  # padding: not the primed forward
        for i, (keys, values) in enumerate(self._layers):
            cache.update(keys.clone(), values.clone(), i)
        self.hits += 1
        return self._output_type(logits=self._logits.clone(), **{self._cache_field: cache})
