"""The vLLM plugin: tells refdecode's proposer which request each row of the batch holds.

vLLM calls a `custom_class` proposer with token arrays only (`propose(sampled_token_ids, num_tokens_no_spec,
token_ids_cpu)`); the request ids (`input_batch.req_ids`) and each request's `SamplingParams.extra_args` live on the
model runner. `register` (the `vllm.general_plugins` entry point "refdecode", loaded by vLLM in every process)
checks the vLLM version; `attach` (called when refdecode.vllm.Proposer is built, i.e. only in an engine that uses
it) wraps the runner's `propose_draft_token_ids` so that it calls `Proposer.bind_batch` first. Other proposers and
engines without refdecode's proposer are left alone.

Knows: the names of vLLM's model-runner attributes in the tested versions. Does not know: drafting.
"""

from __future__ import annotations

import functools
import logging

__all__ = ["TESTED_VLLM_VERSIONS", "register", "attach", "check_version"]

logger = logging.getLogger("refdecode.vllm")

# The model runner's internals read by the hook (input_batch.req_ids, requests[id].sampling_params.extra_args,
# propose_draft_token_ids) are not a public API: another version is refused rather than patched blindly.
TESTED_VLLM_VERSIONS = ("0.32.0",)

_registered = False
_HOOK_FLAG = "_refdecode_binds_rows"


def check_version(version: str) -> None:
    """ValueError unless `version` is a vLLM release this plugin was tested with (local suffixes like +cpu ignored)."""
    release = version.split("+", 1)[0]
    if release not in TESTED_VLLM_VERSIONS:
        raise ValueError(
            f"refdecode's vLLM proposer is tested with vLLM {', '.join(TESTED_VLLM_VERSIONS)}, not {version}: it "
            "reads the model runner's request ids, which are not a public API. Install a tested version "
            "(pip install 'refdecode[vllm]') or use another speculative method."
        )


def register() -> None:
    """Entry point of `vllm.general_plugins` (vLLM may call it several times, in several processes).

    Never raises: a vLLM version refdecode was not tested with is logged here and refused when refdecode's
    proposer is built, so that engines not using it keep working."""
    global _registered
    import vllm

    try:
        check_version(vllm.__version__)
    except ValueError as err:
        logger.warning("%s", err)
    _registered = True


def attach(proposer_class: type) -> None:
    """Make the model runner bind each batch's rows to requests before calling a `proposer_class` drafter.

    Raises RuntimeError when the plugin was not loaded by vLLM, ValueError on an untested vLLM version."""
    import vllm

    if not _registered:
        raise RuntimeError(
            "the refdecode vLLM plugin was not loaded, so the proposer cannot tell the batch's requests apart: "
            "install refdecode (with the [vllm] extra) into the engine's environment, and if VLLM_PLUGINS is set, "
            "include 'refdecode' in it"
        )
    check_version(vllm.__version__)
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner  # the CPU runner inherits from it

    original = GPUModelRunner.propose_draft_token_ids
    if getattr(original, _HOOK_FLAG, False):
        return

    @functools.wraps(original)
    def propose_draft_token_ids(self, *args, **kwargs):
        drafter = getattr(self, "drafter", None)
        if isinstance(drafter, proposer_class):
            requests = self.requests
            drafter.bind_batch(list(self.input_batch.req_ids), functools.partial(extra_args_of, requests), requests)
        return original(self, *args, **kwargs)

    setattr(propose_draft_token_ids, _HOOK_FLAG, True)
    GPUModelRunner.propose_draft_token_ids = propose_draft_token_ids
    logger.info("refdecode: rows bound to requests in vLLM %s's model runner", vllm.__version__)


def extra_args_of(requests, req_id: str):
    """`SamplingParams.extra_args` of a request held by the runner (None for a pooling request or none given)."""
    state = requests.get(req_id)
    params = getattr(state, "sampling_params", None)
    return getattr(params, "extra_args", None)
