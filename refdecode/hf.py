"""transformers integration: `model.generate(..., custom_generate=refdecode.hf_generate, references=[...])`.

Knows: the calling convention transformers 5 uses for a callable `custom_generate` (it prepares the generation
config, the logits processors including the sampling warpers, and the stopping criteria, then calls us), and how
to map that onto refdecode's decode loop. Does not know: drafting or verification details.

Limits, checked with clear errors: batch size 1, no beam search, and no stopping criteria beyond the standard
ones (max length, EOS, stop strings), which the decode loop applies itself.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .decoding import decode
from .drafting import DraftPolicy, ReferenceDrafter
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
    references: Sequence[str] | None = None,
    store: ReferenceStore | None = None,
    index=None,
    tokenizer=None,
    refdecode_streamer=None,
    max_draft: int = 64,
    seed: int | None = None,
    **model_kwargs,
) -> torch.LongTensor:
    """Drop-in decoding method for `model.generate(custom_generate=hf_generate, ...)`.

    Extra generate() arguments it understands: references (list of texts; needs tokenizer=), store (a
    ReferenceStore), index (a corpus index or its path), tokenizer, max_draft, seed (sampling), and
    refdecode_streamer (transformers does not forward `streamer=` to a callable custom_generate, so pass a
    TextStreamer here). Returns the prompt followed by the new tokens, like generate() does: [1, T + new].
    """
    # 1) what transformers resolved for us
    if input_ids.shape[0] != 1:
        raise ValueError(f"refdecode.hf_generate decodes one sequence at a time; got batch size {input_ids.shape[0]}")
    if generation_config is None:
        raise ValueError("hf_generate must be called through model.generate(custom_generate=hf_generate, ...)")
    if getattr(generation_config, "num_beams", 1) > 1:
        raise ValueError("refdecode.hf_generate does not do beam search (num_beams > 1)")
    _check_stopping_criteria(stopping_criteria)
    prompt_ids = input_ids[0].tolist()
    max_new_tokens = generation_config.max_length - len(prompt_ids)
    if references and tokenizer is None and store is None:
        raise ValueError("pass tokenizer=... to generate() along with references=[...]")
    # 2) references: the caller's store plus the given texts
    if references:
        merged = ReferenceStore(tokenizer if tokenizer is not None else store.tokenizer)
        if store is not None:
            for doc_id, doc in enumerate(store.documents):
                merged.add(store.index.sequences[doc_id], source=doc.source)
        for i, text in enumerate(references):
            merged.add(text, source=f"reference-{i}")
        store = merged
    spans = None
    if index is not None:
        from .decoding import _attach_index

        store, spans = _attach_index(index, tokenizer or store.tokenizer, prompt_ids, store, retrieve_k=4)
    sampling = bool(generation_config.do_sample)
    generator = None
    if sampling:
        generator = torch.Generator(device=model.device)
        generator.manual_seed(seed if seed is not None else torch.seed())
    eos = generation_config.eos_token_id
    eos_ids = set() if eos is None else ({int(eos)} if isinstance(eos, int) else {int(t) for t in eos})
    stop_strings = generation_config.stop_strings or []
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need tokenizer=... in generate(), as in transformers")
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
        stop_strings=stop_strings,
        streamer=refdecode_streamer,
        drafter=ReferenceDrafter(prompt_ids, store=store, spans=spans),
        policy=DraftPolicy(max_draft=max_draft),
    )
    new = torch.tensor([out.token_ids], dtype=input_ids.dtype, device=input_ids.device)
    model.refdecode_stats = out.stats  # the last call's statistics, for callers who want them
    return torch.cat([input_ids, new], dim=1)


_STANDARD_CRITERIA = ("MaxLengthCriteria", "EosTokenCriteria", "StopStringCriteria")


def _check_stopping_criteria(criteria) -> None:
    for criterion in criteria or []:
        if type(criterion).__name__ not in _STANDARD_CRITERIA:
            raise ValueError(
                f"refdecode.hf_generate supports the standard stopping criteria only, not {type(criterion).__name__}"
            )
