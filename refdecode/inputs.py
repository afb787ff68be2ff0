"""Input checks of a generate call: the prompt, token ids, the output budget and the simple options.

Knows: what a prompt may be (text, a list of token ids, a (T,) or (1, T) integer tensor), how to tokenize one
(optionally through the chat template), the model's vocabulary size and context length, and which values the
scalar options take. Every bad value is refused with one clear sentence (ValueError). Does not know: drafting,
verification or the decode loop (decoding.py), which call these checks before anything runs.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Sequence

import torch

__all__ = [
    "check_max_draft",
    "check_max_new_tokens",
    "check_prompt_ids",
    "check_tree",
    "drafter_argument",
    "eos_token_ids",
    "prepare_prompt",
    "vocab_size",
]


def prepare_prompt(tokenizer, prompt, *, chat: bool = False) -> list[int]:
    """list[int] / LongTensor (T,) or (1, T) / str (tokenized; chat=True applies the chat template) -> list[int].

    ValueError for anything that is not a non-empty sequence of integer token ids (floats, bools, strings of digits,
    float or bool tensors) or a non-empty text; the ids' range is checked against the model in `check_prompt_ids`.
    """
    if isinstance(prompt, str):
        return _tokenize(tokenizer, prompt, chat)
    if isinstance(prompt, (bytes, bytearray)):
        raise ValueError("the prompt is bytes: decode it to str, or pass token ids")
    if hasattr(prompt, "dtype") and hasattr(prompt, "shape"):  # a torch tensor or a numpy array
        ids = _tensor_ids(torch.as_tensor(prompt) if not isinstance(prompt, torch.Tensor) else prompt)
    elif isinstance(prompt, (list, tuple, range)):
        ids = [_token_id(t, i) for i, t in enumerate(prompt)]
    else:
        raise TypeError(f"the prompt must be a str, a list of token ids or a LongTensor, got {type(prompt).__name__}")
    if not ids:
        raise ValueError("the prompt has no tokens")
    return ids


def _tokenize(tokenizer, prompt: str, chat: bool) -> list[int]:
    if not prompt.strip():
        raise ValueError("the prompt is empty")
    if tokenizer is None:
        raise ValueError("a text prompt needs the tokenizer (or pass token ids)")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as err:  # lone surrogates, e.g. from undecodable command-line bytes
        raise ValueError(f"the prompt is not valid Unicode text (a lone surrogate at character {err.start})") from None
    if chat:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if hasattr(ids, "keys"):  # some versions return a BatchEncoding
            ids = ids["input_ids"]
        ids = [int(t) for t in ids]
    else:
        ids = list(tokenizer.encode(prompt))
    if not ids:
        raise ValueError("the prompt has no tokens after tokenization")
    return ids


def _tensor_ids(prompt: torch.Tensor) -> list[int]:
    """(T,) or (1, T) integer tensor -> list[int]; float and bool tensors are refused rather than truncated."""
    if prompt.dtype == torch.bool or prompt.is_floating_point() or prompt.is_complex():
        raise ValueError(f"a prompt tensor must hold integer token ids, got dtype {prompt.dtype}")
    if prompt.dim() == 2:
        if prompt.shape[0] != 1:
            raise ValueError(f"batch size {prompt.shape[0]} is not supported: pass one sequence (1, T)")
        prompt = prompt[0]
    if prompt.dim() != 1:
        raise ValueError(f"prompt tensor must be (T,) or (1, T), got shape {tuple(prompt.shape)}")
    return [int(t) for t in prompt.tolist()]


def _token_id(value, position: int) -> int:
    """One prompt element as an int: ints (Python, numpy, 0-d integer tensors) pass; bools, floats, str do not."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise ValueError(f"prompt token {position} is a bool ({value!r}), not a token id")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"prompt token {position} is not an integer token id: {value!r:.40}") from None


def vocab_size(model) -> int | None:
    """The model's vocabulary size: config.vocab_size, else the rows of its output embedding (None if neither)."""
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(size, int) and size > 0:
        return size
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if weight is not None else None


def check_prompt_ids(model, prompt_ids: list[int]) -> None:
    """ValueError unless every id is in 0 .. V - 1 (V the model's vocabulary) and the prompt fits the context."""
    if not prompt_ids:
        raise ValueError("the prompt has no tokens")
    vocab = vocab_size(model)
    low, high = min(prompt_ids), max(prompt_ids)
    if low < 0 or (vocab is not None and high >= vocab):
        bad = low if low < 0 else high
        where = prompt_ids.index(bad)
        raise ValueError(
            f"prompt token {where} is {bad}: token ids must be in 0 .. {vocab - 1 if vocab else '?'} "
            f"(the model's vocabulary size, model.config.vocab_size, is {vocab})"
        )
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and limit and len(prompt_ids) >= limit:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {limit}")


def check_max_new_tokens(max_new_tokens) -> int:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r:.40}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    return max_new_tokens


def check_max_draft(max_draft) -> int:
    if isinstance(max_draft, bool) or not isinstance(max_draft, int) or max_draft < 0:
        raise ValueError(f"max_draft must be an int >= 0 (0 = no drafting), got {max_draft!r:.40}")
    return max_draft


def check_tree(tree) -> bool:
    if not isinstance(tree, bool):
        raise ValueError(f"tree must be True or False, got {tree!r:.40}")
    return tree


def eos_token_ids(model, eos_token_id: int | Sequence[int] | None) -> set[int]:
    """The ids that end generation: `eos_token_id` (an id or several), else the model's generation config's."""
    if eos_token_id is None:
        eos_token_id = getattr(model.generation_config, "eos_token_id", None)
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return {int(t) for t in eos_token_id}


def drafter_argument(drafter, draft_model, *, stacklevel: int = 3) -> tuple[object, bool]:
    """The drafter a call names: `drafter=`, or the same value under its deprecated name `draft_model=` (with a
    DeprecationWarning) -> (the value, whether it came as draft_model=). ValueError if both are given."""
    if draft_model is None:
        return drafter, False
    if drafter is not None:
        raise ValueError("pass either drafter= or draft_model= (its deprecated name), not both")
    warnings.warn(
        "draft_model= is deprecated: pass the same value as drafter= (a model sharing the tokenizer, a model name, "
        '"self:int8", "self:layers=N", "self:heads", "self:recycle")',
        DeprecationWarning,
        stacklevel=stacklevel,
    )
    return draft_model, True
