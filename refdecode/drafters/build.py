"""Building drafters by name, and the one setup path of a call: `build_drafting`.

Knows: the drafter specs ("self:int8", "self:layers=N", "self:heads", "self:recycle", a model name or folder, a
causal LM object), which derived models, heads and tables are built once per target and reused, how a draft
model is checked against the target, how a corpus index's passages join the references, and how a call's policy is
warm-started. `generate`, `hf_generate` and the vLLM proposer all set up their drafting here. Does not know: the
decode loop, verification, or how any drafter drafts.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..inputs import check_max_draft, check_tree
from ..policy import DraftPolicy, policy_kind, remember_policy, warm_policy
from .base import Drafter, ModelDrafterBase
from .draft_model import ModelDrafter
from .early_exit import early_exit_model
from .heads import HeadsDrafter
from .hybrid import HybridDrafter
from .int8 import int8_model
from .recycle import RecycleDrafter, SuccessorTable
from .reference import ReferenceDrafter, SpanSource, as_sources

__all__ = [
    "SELF_DRAFTERS",
    "Drafting",
    "attach_index",
    "build_drafting",
    "build_model_drafter",
    "check_draft_model",
    "check_drafter_spec",
    "forget_learned",
]


_DERIVED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # target -> {spec: derived model, heads, table}
SELF_DRAFTERS = ("self:int8", "self:heads", "self:recycle")  # and self:layers=N


def check_draft_model(target, draft, target_tokenizer=None, draft_tokenizer=None) -> None:
    """ValueError unless the draft model can draft for the target: the same vocabulary size and special tokens,
    and (when both tokenizers are known) the same tokenizer."""
    tv, dv = target.config.vocab_size, getattr(draft.config, "vocab_size", None)
    if tv != dv:
        raise ValueError(
            f"the draft model's vocabulary ({dv} tokens) differs from the target's ({tv}): a draft model must share "
            "the target's tokenizer"
        )
    for key in ("eos_token_id", "bos_token_id"):
        a = getattr(target.generation_config, key, None)
        b = getattr(getattr(draft, "generation_config", None), key, None)
        if a is not None and b is not None and _as_set(a) != _as_set(b):
            raise ValueError(f"the draft model's {key} {b} differs from the target's {a}: not the same tokenizer")
    if target_tokenizer is not None and draft_tokenizer is not None:
        from ..checked_folder import tokenizer_fingerprint

        if tokenizer_fingerprint(target_tokenizer) != tokenizer_fingerprint(draft_tokenizer):
            raise ValueError("the draft model's tokenizer differs from the target's: their token ids do not agree")


def _as_set(value) -> set[int]:
    return {int(value)} if isinstance(value, int) else {int(v) for v in value}


def check_drafter_spec(spec: str) -> None:
    """ValueError for a drafter name that cannot be right whatever the target: an unknown "self:" drafter, a
    layer count that is not a positive whole number, an empty name."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("the drafter name is empty")
    spec = spec.strip()
    if spec.startswith("self:layers="):
        value = spec.split("=", 1)[1]
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"self:layers=N needs a whole number of layers >= 1, got {value!r}")
    elif spec.startswith("self:") and spec not in SELF_DRAFTERS:
        raise ValueError(
            f"unknown drafter {spec!r}: known self-drafters are self:int8, self:layers=N, self:heads, self:recycle"
        )


def forget_learned(model) -> None:
    """Drop what model drafters learned across calls for the target `model` (the self:recycle successor table);
    derived models and trained heads are kept. The next self:recycle call starts from an empty table."""
    _DERIVED.get(model, {}).pop("self:recycle", None)


def build_model_drafter(spec, model, tokenizer=None) -> ModelDrafterBase:
    """A model drafter for `spec`: a ModelDrafterBase object (returned as it is), a causal LM object (a draft model
    sharing the tokenizer), "self:int8", "self:layers=N", "self:heads", "self:recycle", a known model name or a local
    checkpoint folder. Derived models, heads and the recycled successor table are built once per target and reused
    (the table keeps learning)."""
    if spec is None:
        raise ValueError("no drafter given")
    if isinstance(spec, ModelDrafterBase):  # built by the caller (e.g. a RecycleDrafter with a table of its own)
        return spec
    if not isinstance(spec, str):
        if not hasattr(spec, "config") or not callable(spec):
            raise ValueError(
                f"a model drafter must be a causal LM, a name or a ModelDrafterBase, got {type(spec).__name__}"
            )
        check_draft_model(model, spec)
        return ModelDrafter(spec, name="draft")
    check_drafter_spec(spec)
    spec = spec.strip()
    derived = _DERIVED.setdefault(model, {})
    if spec == "self:int8":
        if spec not in derived:
            derived[spec] = int8_model(model)
        return ModelDrafter(derived[spec], name="int8")
    if spec.startswith("self:layers="):
        value = spec.split("=", 1)[1]
        if spec not in derived:
            derived[spec] = early_exit_model(model, int(value))
        return ModelDrafter(derived[spec], name=f"layers{int(value)}", shared_cache=True)
    if spec == "self:recycle":
        if spec not in derived:
            derived[spec] = SuccessorTable()
        return RecycleDrafter(derived[spec])
    if spec == "self:heads":
        if spec not in derived:
            from ..heads import load_heads

            derived[spec] = load_heads(_model_name(model), tokenizer=tokenizer, model=model)
        return HeadsDrafter(derived[spec])
    from ..models import load_model

    if spec not in derived:
        draft, draft_tokenizer = load_model(spec, dtype=model.dtype, device=model.device)
        check_draft_model(model, draft, tokenizer, draft_tokenizer)
        derived[spec] = draft
    return ModelDrafter(derived[spec], name="draft")


def _model_name(model) -> str:
    """The refdecode name of a loaded model (set by load_model), else its checkpoint folder."""
    from pathlib import Path

    name = getattr(model, "refdecode_name", None) or Path(str(getattr(model.config, "_name_or_path", "") or "")).name
    if not name:
        raise ValueError("self:heads needs to know the model's name: load it with refdecode.load_model")
    return str(name)


# ---------------------------------------------------------------------------------------------------------------
# The setup of a call
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Drafting:
    """What a call drafts with: the drafter, the policy that sizes its drafts, and the key (`kind`) under which a
    default policy is remembered for the next call on the same model (`remember`)."""

    drafter: Drafter
    policy: DraftPolicy
    kind: str  # policy.policy_kind of the drafter and mode
    warm: bool = False  # the policy is the call's default one, warm-started: remember it when the call ends

    def remember(self, model) -> None:
        """Keep a default policy for the next call's warm start (policy.warm_policy); a caller's policy is its own."""
        if self.warm and model is not None:
            remember_policy(model, self.policy, kind=self.kind)


def build_drafting(
    model,
    tokenizer,
    prompt_ids: Sequence[int],
    *,
    store=None,
    index=None,
    spans: SpanSource | None = None,
    memory=None,
    drafter=None,
    alone: bool | None = None,
    policy: DraftPolicy | None = None,
    tree: bool = True,
    max_draft: int = 128,
    max_ngram: int = 12,
    retrieve_k: int = 4,
    rerank: int = 0,
) -> Drafting:
    """The drafter and policy of one call: what `generate`, `hf_generate` and the vLLM proposer draft with.

    model: the target (None: no model drafter, no reranking, no warm start, e.g. an engine that verifies itself).
    tokenizer: the target's tokenizer (needed by index=, rerank= and a named draft model; None: token ids only).
    prompt_ids: the prompt's token ids, the first reference.
    store: a ReferenceStore or a sequence of them (never copied or changed).
    index: a refdecode.corpus.CorpusIndex or its path: its top `retrieve_k` passages for the prompt join the
        references (reranked by the target over the top `rerank` when rerank > 0), and its span index drafts where
        nothing local matches. spans: a span index alone, without retrieval (the vLLM engine's index).
    memory: a refdecode.OutputMemory: past outputs draft too (bound to `tokenizer`).
    drafter: None (references only); a model drafter that joins the references in one tree: a causal LM sharing the
        tokenizer, a known model name or checkpoint folder, "self:int8", "self:layers=N", "self:heads",
        "self:recycle"; or a Drafter object, used as it is (alone).
    alone: whether `drafter` drafts without the references; default: alone for a Drafter object, joined for a
        name or a model. alone=False joins a ModelDrafterBase object to the references.
    policy: a DraftPolicy (default: fresh with `max_draft`, warm-started from the last call on this model with the
        same kind of drafting; `Drafting.remember` keeps it for the next).
    tree: True: the references merge their candidates into a token tree; False: one voted chain per step.
    max_ngram: the longest context suffix the prompt's references match.
    """
    # 1) options, checked before anything is loaded
    check_tree(tree)
    check_max_draft(max_draft)
    if isinstance(rerank, bool) or not isinstance(rerank, int) or rerank < 0:
        raise ValueError(f"rerank must be >= 0 (0 = off), got {rerank!r:.40}")
    if index is not None and spans is not None:
        raise ValueError("pass either index= (retrieval and its span index) or spans=, not both")
    is_drafter = hasattr(drafter, "propose") and hasattr(drafter, "observe")
    if alone is None:
        alone = is_drafter
    if alone and not is_drafter:
        raise ValueError(f"alone=True needs a Drafter object (with propose and observe), got {type(drafter).__name__}")
    if memory is not None:
        memory.bind(tokenizer)
    # 2) the drafter: the references (the index's passages first), joined by a model drafter if one is named
    if alone:
        chosen = drafter
    else:
        if index is not None:
            reranker = None
            if rerank:
                from ..corpus.rerank import LMReranker

                reranker = LMReranker(model, tokenizer)
            store, spans = attach_index(index, tokenizer, prompt_ids, store, retrieve_k, reranker, max(rerank, 1))
        chosen = ReferenceDrafter(prompt_ids, store=store, spans=spans, memory=memory, max_ngram=max_ngram, tree=tree)
        if drafter is not None:
            chosen = HybridDrafter(chosen, build_model_drafter(drafter, model, tokenizer))
    # 3) the policy: the caller's, or a fresh one that starts from what the last call of this kind learned
    kind = policy_kind(chosen, tree)
    if policy is not None:
        return Drafting(chosen, policy, kind)
    if model is None:
        return Drafting(chosen, DraftPolicy(max_draft=max_draft), kind)
    return Drafting(chosen, warm_policy(model, max_draft, kind=kind), kind, warm=True)


def attach_index(
    index, tokenizer, prompt_ids: Sequence[int], store, retrieve_k: int, reranker=None, candidates: int = 20
) -> tuple[list, Any]:
    """Retrieve the index's top passages for the prompt into a small store of their own; return (stores, span
    source): the passages' store, then the caller's `store` (a store, a sequence of them, or None) untouched; the
    drafter takes several stores, so nothing is copied per call. The passages come first, as in the merged store
    this replaces, where they were the most recent documents."""
    from ..corpus import CorpusIndex
    from ..store import ReferenceStore

    if tokenizer is None:
        raise ValueError("drafting from a corpus index needs the tokenizer the index was built with")
    if isinstance(index, CorpusIndex):
        index.check_tokenizer(tokenizer)  # a loaded index is checked like a path: its ids must be this tokenizer's
    else:
        index = CorpusIndex.load(index, tokenizer=tokenizer)
    retrieved = ReferenceStore(tokenizer)
    retrieved.kind = "retrieved"  # the policy learns how often retrieved passages are copied, apart from stores
    query = tokenizer.decode(list(prompt_ids)[-512:], skip_special_tokens=True)
    for passage in index.retrieve(query, k=retrieve_k, reranker=reranker, candidates=candidates):
        retrieved.add(passage.token_ids, source=f"{passage.source}#{passage.id}")
    return [retrieved, *as_sources(store)], index
