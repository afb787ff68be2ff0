"""refdecode: lossless speculative decoding that drafts tokens by copying from reference text.

model, tokenizer = refdecode.load_model("smollm2-135m")
store = refdecode.ReferenceStore(tokenizer)
store.add("reference text", source="doc-1")
out = refdecode.generate(model, tokenizer, prompt_ids, store=store, max_new_tokens=128)

The names below are imported on first use (PEP 562): `import refdecode`, and any `refdecode.corpus...` module,
import neither torch nor transformers until something that needs them is touched. A Ray worker that runs a corpus
build's task functions therefore never loads them, nor does `refdecode index build --help`.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# each public name -> the module that defines it
_SOURCES = {
    ".decoding": ("GenerationOutput", "GenerationStats", "NonFiniteLogitsError", "generate"),
    ".drafters": (
        "Draft",
        "Drafter",
        "Drafting",
        "DraftSession",
        "HeadsDrafter",
        "HybridDrafter",
        "ModelDrafter",
        "ModelDrafterBase",
        "RecycleDrafter",
        "ReferenceDrafter",
        "build_drafting",
    ),
    ".hf": ("hf_generate",),
    ".memory": ("OutputMemory",),
    ".models": ("KNOWN_MODELS", "ModelNotFoundError", "load_model", "load_tokenizer"),
    ".policy": ("DraftPolicy",),
    ".store": ("ReferenceStore",),
    ".tree": ("DraftTree",),
}
_WHERE = {name: module for module, names in _SOURCES.items() for name in names}

if TYPE_CHECKING:  # what type checkers and IDEs see: the same names, imported eagerly
    from .decoding import GenerationOutput, GenerationStats, NonFiniteLogitsError, generate
    from .drafters import (
        Draft,
        Drafter,
        Drafting,
        DraftSession,
        HeadsDrafter,
        HybridDrafter,
        ModelDrafter,
        ModelDrafterBase,
        RecycleDrafter,
        ReferenceDrafter,
        build_drafting,
    )
    from .hf import hf_generate
    from .memory import OutputMemory
    from .models import KNOWN_MODELS, ModelNotFoundError, load_model, load_tokenizer
    from .policy import DraftPolicy
    from .store import ReferenceStore
    from .tree import DraftTree

__all__ = [
    "KNOWN_MODELS",
    "Draft",
    "DraftPolicy",
    "DraftSession",
    "DraftTree",
    "Drafter",
    "Drafting",
    "GenerationOutput",
    "GenerationStats",
    "HeadsDrafter",
    "HybridDrafter",
    "ModelDrafter",
    "ModelDrafterBase",
    "ModelNotFoundError",
    "NonFiniteLogitsError",
    "OutputMemory",
    "RecycleDrafter",
    "ReferenceDrafter",
    "ReferenceStore",
    "build_drafting",
    "generate",
    "hf_generate",
    "load_model",
    "load_tokenizer",
]


def __getattr__(name: str) -> Any:
    """A public name, imported from its module on first use and kept; a submodule (`refdecode.drafters`, which the
    eager imports used to make an attribute as a side effect) is imported too."""
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
