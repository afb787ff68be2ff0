"""transformers integration: `model.generate(..., custom_generate=refdecode.hf_generate, references=[...])`.

Knows: the calling convention transformers 5 uses for a callable `custom_generate` (it prepares the generation
config, the logits processors including the sampling warpers, and the stopping criteria, then calls us), and how
to map that onto refdecode's decode loop. Does not know: drafting or verification details (the drafter and policy
come from drafters.build_drafting, as for refdecode.generate).

transformers does not forward its own `tokenizer=` and `streamer=` arguments to a callable custom_generate, so
this one takes `ref_tokenizer=` (to tokenize text references) and `ref_streamer=` instead; for the same reason
transformers refuses `stop_strings=` here (it cannot find a tokenizer), so pass `stop=[...]` with `ref_tokenizer=`.
Every stopping criterion transformers prepared (max length, EOS, custom ones) is applied after each committed
token. Limits, checked with clear errors: batch size 1, no beam search, an attention_mask that is all ones or left
padding (stripped before decoding and kept in front of the returned ids).

Statistics: generate() returns token ids only, so pass `ref_stats=refdecode.GenerationStats()` and hf_generate
fills it with the call's statistics (steps, drafted and accepted tokens, seconds, ...); nothing is written onto the
model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from .decoding import GenerationStats, decode
from .drafters import build_drafting
from .inputs import drafter_argument
from .policy import DraftPolicy
from .stopping import stop_list
from .store import ReferenceStore

__all__ = ["hf_generate"]


def hf_generate(
    model,
    input_ids: torch.LongTensor,
    logits_processor=None,
    stopping_criteria=None,
    generation_config=None,
    synced_gpus: bool = False,
    streamer=None,
    references: Sequence[str | Sequence[int]] | None = None,
    store: ReferenceStore | Sequence[ReferenceStore] | None = None,
    index=None,
    ref_tokenizer=None,
    ref_streamer=None,
    ref_stats: GenerationStats | None = None,
    stop: Sequence[str] | None = None,
    max_draft: int = 128,
    policy: DraftPolicy | None = None,
    seed: int | None = None,
    memory=None,
    tree: bool = True,
    drafter=None,
    calibrate: bool = True,
    tie_margin: float | None = None,
    retrieve_k: int = 4,
    rerank: int = 0,
    draft_model=None,
    **model_kwargs,
) -> torch.Tensor:
    """Drop-in decoding method for `model.generate(custom_generate=hf_generate, ...)`.

    Extra generate() arguments it understands, as refdecode.generate takes them: references (texts, which need
    ref_tokenizer=, or token-id lists; a single string is one reference), store (a ReferenceStore or a list of
    them, never copied), index (a corpus index or its path; needs ref_tokenizer=) with retrieve_k and rerank,
    max_draft or a DraftPolicy (policy=), calibrate, tie_margin, seed (sampling), ref_streamer (e.g. a
    TextStreamer), stop (stop strings; needs ref_tokenizer=), memory (a refdecode.OutputMemory: past outputs draft
    for this call and its output is recorded), tree (False: one voted chain per step instead of a token tree),
    drafter (a model drafter beside the references: a causal LM sharing the tokenizer, a model name, "self:int8",
    "self:layers=N", "self:heads", "self:recycle"; or a Drafter object, alone), draft_model (drafter's deprecated
    name), ref_stats (a refdecode.GenerationStats that is filled with this call's statistics).
    attention_mask: all ones or left padding. Returns the prompt (with its padding) followed by the new tokens, like
    generate(): [1, T + new].
    """
    # 1) what transformers resolved for us (it has repeated input_ids num_beams times already: check beams first)
    if generation_config is None:
        raise ValueError("hf_generate must be called through model.generate(custom_generate=hf_generate, ...)")
    beams = getattr(generation_config, "num_beams", 1) or 1
    if beams > 1:
        raise ValueError(f"refdecode.hf_generate does not do beam search (num_beams={beams}); use num_beams=1")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(
            f"refdecode.hf_generate decodes one sequence at a time; got input of shape "
            f"{tuple(input_ids.shape)} (batch size {input_ids.shape[0] if input_ids.dim() else 0})"
        )
    if ref_stats is not None and not isinstance(ref_stats, GenerationStats):
        raise ValueError(f"ref_stats must be a refdecode.GenerationStats, got {type(ref_stats).__name__}")
    drafter, renamed = drafter_argument(drafter, draft_model)
    max_new_tokens = generation_config.max_length - input_ids.shape[1]
    padding = _left_padding(model_kwargs.get("attention_mask"), input_ids.shape[1])
    prompt_ids = input_ids[0, padding:].tolist()
    tokenizer = ref_tokenizer if ref_tokenizer is not None else getattr(store, "tokenizer", None)
    if tokenizer is None and (index is not None or stop or any(isinstance(r, str) for r in references or [])):
        raise ValueError("pass ref_tokenizer=tokenizer to generate() along with text references, stop or an index")
    # 2) references: a small store of the given texts, drafted from along with the caller's store (never copied)
    if isinstance(references, str):  # one text, not a sequence of one-character references
        references = [references]
    if references:
        extra = ReferenceStore(tokenizer if tokenizer is not None else _IdsOnly(model.config.vocab_size))
        for i, text in enumerate(references):
            extra.add(text, source=f"reference-{i}")
        store = [extra, *([] if store is None else [store] if isinstance(store, ReferenceStore) else store)]
    sampling = bool(generation_config.do_sample)
    generator = None
    if sampling:
        generator = torch.Generator(device=model.device)
        # like transformers: without seed=, torch.manual_seed(...) before generate() reproduces the run
        generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, ())))
    drafting = build_drafting(
        model,
        tokenizer,
        prompt_ids,
        store=store,
        index=index,
        memory=memory,
        drafter=drafter,
        alone=False if renamed else None,  # draft_model= always joined the references
        policy=policy,
        tree=tree,
        max_draft=max_draft,
        retrieve_k=retrieve_k,
        rerank=rerank,
    )
    eos = generation_config.eos_token_id
    eos_ids = set() if eos is None else ({int(eos)} if isinstance(eos, int) else {int(t) for t in eos})
    # 3) decode
    out = decode(
        model,
        tokenizer,
        prompt_ids,
        processors=logits_processor,
        sampling=sampling,
        generator=generator,
        max_new_tokens=max_new_tokens,
        eos_ids=eos_ids,
        stop_strings=stop_list(stop),
        stopping_criteria=stopping_criteria,
        streamer=ref_streamer,
        drafter=drafting.drafter,
        policy=drafting.policy,
        calibrate=calibrate,
        tie_margin=tie_margin,
        memory=memory,
    )
    drafting.remember(model)
    if ref_stats is not None:  # the caller's object, filled in place (transformers returns the ids only)
        for f in dataclasses.fields(GenerationStats):
            setattr(ref_stats, f.name, getattr(out.stats, f.name))
    new = torch.tensor([out.token_ids], dtype=input_ids.dtype, device=input_ids.device)
    return torch.cat([input_ids, new], dim=1)  # the left padding, if any, stays in front, as transformers returns it


def _left_padding(attention_mask, length: int) -> int:
    """How many leading positions of the one input row `attention_mask` [1, T] masks out (0 without a mask).

    For one sequence, left padding changes nothing but the positions: transformers derives position ids from the
    mask, so decoding the unpadded tokens gives the same result. Any other mask (right padding, holes) would need
    masked positions inside the sequence, which the decode loop does not carry: refused with a clear error.
    """
    if attention_mask is None:
        return 0
    mask = torch.as_tensor(attention_mask)
    if tuple(mask.shape) != (1, length):
        raise ValueError(f"attention_mask must have the input's shape (1, {length}), got {tuple(mask.shape)}")
    row = [int(v) for v in mask[0].tolist()]
    if any(v not in (0, 1) for v in row):
        raise ValueError("attention_mask must hold only 0 and 1")
    padding = row.index(1) if 1 in row else length
    if padding == length:
        raise ValueError("attention_mask masks every input token: there is no prompt to continue")
    if any(v == 0 for v in row[padding:]):
        raise ValueError(
            "attention_mask is not left padding (its zeros must all come before its ones): refdecode.hf_generate "
            "decodes one unpadded sequence. Note that transformers builds a mask from pad_token_id when none is "
            "given, so a prompt containing the pad token inside it gets such a mask: pass attention_mask explicitly"
        )
    return padding


class _IdsOnly:
    """Stands in for a tokenizer when every reference is already token ids."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return self.vocab_size
