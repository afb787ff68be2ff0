"""Drafters: everything that guesses the next tokens for the target model to verify, behind one interface.

Knows: the `Drafter` protocol (propose / observe) and its implementations: copying from references (reference.py),
a draft model, the target's int8 copy or its first layers (draft_model.py, int8.py, early_exit.py), Medusa-style
heads (heads.py), the target's own earlier predictions (recycle.py), references and a model drafter in one tree
(hybrid.py); building them by name and setting up a call's drafting (build.py). Does not know: acceptance rules
(verification.py), the draft policy's arithmetic (policy.py) or the decode loop (decoding.py).
"""

from .base import MAX_DRAFT_TOKENS, Draft, Drafter, DraftSession, ModelDrafterBase, confidence_evidence
from .build import (
    SELF_DRAFTERS,
    Drafting,
    attach_index,
    build_drafting,
    build_model_drafter,
    check_draft_model,
    check_drafter_spec,
    forget_learned,
)
from .draft_model import ModelDrafter
from .early_exit import early_exit_model
from .heads import HeadsDrafter
from .hybrid import HybridDrafter, merge_trees
from .int8 import int8_model
from .recycle import RecycleDrafter, SuccessorTable
from .reference import ReferenceDrafter, SpanSource, as_sources

__all__ = [
    "MAX_DRAFT_TOKENS",
    "SELF_DRAFTERS",
    "Draft",
    "DraftSession",
    "Drafter",
    "Drafting",
    "HeadsDrafter",
    "HybridDrafter",
    "ModelDrafter",
    "ModelDrafterBase",
    "RecycleDrafter",
    "ReferenceDrafter",
    "SpanSource",
    "SuccessorTable",
    "as_sources",
    "attach_index",
    "build_drafting",
    "build_model_drafter",
    "check_draft_model",
    "check_drafter_spec",
    "confidence_evidence",
    "early_exit_model",
    "forget_learned",
    "int8_model",
    "merge_trees",
]
