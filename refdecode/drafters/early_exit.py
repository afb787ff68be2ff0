"""The target's first layers (`"self:layers=N"`): a draft model that shares the target's weights and cache.

Knows: how to build a transformers model of the same class with fewer decoder layers whose modules are the
target's (no copy). Does not know: drafting (a ModelDrafter with shared_cache=True runs it, draft_model.py).
"""

from __future__ import annotations

import copy

import torch

__all__ = ["early_exit_model"]


def early_exit_model(model, layers: int):
    """The target's first `layers` decoder layers with its final norm and head, sharing the target's weights (no
    copy): a model of the same class built on the meta device whose modules are the target's."""
    config = model.config
    total = getattr(config, "num_hidden_layers", None)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if not isinstance(total, int) or decoder is None or not hasattr(decoder, "layers"):
        raise ValueError(f"self:layers=N needs a decoder with a `layers` list; {type(model).__name__} has none")
    if not 1 <= layers < total:
        raise ValueError(f"self:layers=N needs 1 <= N < {total} (the target's layers), got {layers}")
    small = copy.deepcopy(config)
    small.num_hidden_layers = layers
    if isinstance(getattr(small, "layer_types", None), list):
        small.layer_types = small.layer_types[:layers]
    with torch.device("meta"):
        view = type(model)(small)
    view_decoder = view.get_decoder()
    for name, child in decoder.named_children():
        if name == "layers":
            setattr(view_decoder, name, torch.nn.ModuleList(list(child)[:layers]))
        else:
            setattr(view_decoder, name, child)
    for name, child in model.named_children():
        if child is not decoder:
            setattr(view, name, child)
    leftover = [n for n, p in view.named_parameters() if p.is_meta] + [n for n, b in view.named_buffers() if b.is_meta]
    if leftover:
        raise ValueError(f"self:layers=N cannot share every weight of {type(model).__name__}: {leftover[:3]}")
    view.generation_config = model.generation_config
    return view.eval()
