"""transformers integration: `model.generate(..., custom_generate=refdecode.hf_generate, references=[...])`.

Knows: the calling convention transformers 5 uses for a callable `custom_generate` (it prepares the generation
config, the logits processors including the sampling warpers, and the stopping criteria, then calls us), and how
to map that onto refdecode's decode loop. Does not know: drafting or verification details.

transformers does not forward its own `tokenizer=` and `streamer=` arguments to a callable custom_generate, so
this one takes `ref_tokenizer=` (to tokenize text references) and `ref_streamer=` instead; for the same reason
transformers refuses `stop_strings=` here (it cannot find a tokenizer), so pass `stop=[...]` with `ref_tokenizer=`.
Every stopping criterion transformers prepared (max length, EOS, custom ones) is applied after each committed
token. Limits, checked with clear errors: batch size 1, no beam search, an attention_mask that is all ones or left
padding (stripped before decoding and kept in front of the returned ids).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .decoding import decode
from .drafting import ReferenceDrafter
from .policy import DraftPolicy, policy_kind, remember_policy, warm_policy
from .prophets import with_prophet
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
    stop: Sequence[str] | None = None,
    max_draft: int = 64,
    policy: DraftPolicy | None = None,
    seed: int | None = None,
    memory=None,
    tree: bool = True,
    draft_model=None,
    **model_kwargs,
) -> torch.Tensor:
    """Drop-in decoding method for `model.generate(custom_generate=hf_generate, ...)`.

    Extra generate() arguments it understands: references (texts, which need ref_tokenizer=, or token-id lists; a
    single string is one reference), store (a ReferenceStore or a list of them, never copied), index (a corpus
    index or its path; needs ref_tokenizer=), max_draft or a DraftPolicy (policy=), seed (sampling), ref_streamer
    (e.g. a TextStreamer), stop (stop strings; needs ref_tokenizer=), memory (a refdecode.OutputMemory: past
    outputs draft for this call and its output is recorded; bound to ref_tokenizer= when given), tree (False: one
    voted chain per step instead of a token tree), draft_model (a model prophet beside the references, as in
    refdecode.generate: a causal LM sharing the tokenizer, a model name, "self:int8", "self:layers=N", "self:heads",
    "self:recycle").
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
    spans = None
    if index is not None:
        from .decoding import _attach_index

        store, spans = _attach_index(index, tokenizer, prompt_ids, store, retrieve_k=4)
    if memory is not None:
        memory.bind(ref_tokenizer)  # None (token ids only): nothing to check
    sampling = bool(generation_config.do_sample)
    generator = None
    if sampling:
        generator = torch.Generator(device=model.device)
        # like transformers: without seed=, torch.manual_seed(...) before generate() reproduces the run
        generator.manual_seed(seed if seed is not None else int(torch.randint(2**62, ())))
    eos = generation_config.eos_token_id
    eos_ids = set() if eos is None else ({int(eos)} if isinstance(eos, int) else {int(t) for t in eos})
    # 3) decode
    if not isinstance(tree, bool):
        raise ValueError(f"tree must be True or False, got {tree!r:.40}")
    reference_drafter = ReferenceDrafter(prompt_ids, store=store, spans=spans, memory=memory, tree=tree)
    drafter = with_prophet(reference_drafter, draft_model, model, tokenizer)
    kind = policy_kind(drafter, tree)
    own_policy = policy is None
    policy = policy or warm_policy(model, max_draft, kind=kind)
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
        drafter=drafter,
        policy=policy,
        memory=memory,
    )
    if own_policy:
        remember_policy(model, policy, kind=kind)
    new = torch.tensor([out.token_ids], dtype=input_ids.dtype, device=input_ids.device)
    model.refdecode_stats = out.stats  # the last call's statistics, for callers who want them
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
