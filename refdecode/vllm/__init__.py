"""refdecode inside vLLM: reference drafting as a `custom_class` speculative proposer.

    from vllm import LLM, SamplingParams
    llm = LLM(model=..., speculative_config={"method": "custom_class", "model": "refdecode.vllm.Proposer",
                                              "num_speculative_tokens": 8},
              additional_config={"refdecode": {"index": "indexes/pydocs"}})      # optional corpus index
    llm.generate(prompt, SamplingParams(max_tokens=256, extra_args={"references": ["old file ..."]}))

Knows: the vLLM-facing shell (hook the runner through the plugin, never let a drafting error stop the engine).
Does not know: drafting itself (proposer.BatchDrafter, vLLM-free) or models. Importing this package does not import
vLLM; building a Proposer does (it runs inside vLLM's model runner).
"""

from __future__ import annotations

import logging

import numpy as np

from . import plugin
from .proposer import BatchCosts, BatchDrafter, ProposerOptions

__all__ = ["BatchCosts", "BatchDrafter", "Proposer", "ProposerOptions"]

logger = logging.getLogger("refdecode.vllm")


class Proposer(BatchDrafter):
    """The class vLLM builds for `speculative_config={"method": "custom_class", "model": "refdecode.vllm.Proposer",
    "num_speculative_tokens": K}`: BatchDrafter, hooked into the model runner by the plugin.

    A drafting error is logged and answered with no drafts (plain decoding for that step); request state is then
    rebuilt from the next step's tokens. Speculation never changes what vLLM outputs, so this costs speed only.
    """

    def __init__(self, vllm_config, **kwargs):
        scheduler = getattr(vllm_config, "scheduler_config", None)
        if getattr(scheduler, "async_scheduling", False):
            raise ValueError(
                "refdecode.vllm.Proposer needs async_scheduling off: with it on, vLLM hands the proposer placeholder "
                "tokens instead of the sampled ones (vLLM turns it off by default for custom_class proposers)"
            )
        plugin.attach(Proposer)
        super().__init__(vllm_config, **kwargs)
        # Loaded now, with the engine, rather than inside the step of the first request that brings references
        # (~0.5 s that every request of that step would wait for).
        self.tokenizer  # noqa: B018

    def propose(
        self, sampled_token_ids, num_tokens_no_spec: np.ndarray, token_ids_cpu: np.ndarray, slot_mappings=None
    ) -> list[list[int]]:
        try:
            return super().propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings)
        except Exception:  # a drafting bug must cost one step's speed, not every request of the engine
            logger.exception("refdecode: drafting failed; this step decodes without drafts")
            self.sessions.clear()
            return [[] for _ in sampled_token_ids]
