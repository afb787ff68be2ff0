"""refdecode: lossless speculative decoding that drafts tokens by copying from reference text.

model, tokenizer = refdecode.load_model("smollm2-135m")
store = refdecode.ReferenceStore(tokenizer)
store.add("reference text", source="doc-1")
out = refdecode.generate(model, tokenizer, prompt_ids, store=store, max_new_tokens=128)
"""

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
__version__ = "0.1.0"
