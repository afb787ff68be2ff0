"""The tensors of a tree forward: a token tree verified in one forward of an unmodified transformers model.

Knows: how a DraftTree flattens after the pending token (row 0 = the pending token, row i + 1 = node i), its
position ids (cache length + depth), the additive 4D attention masks that let each row see the whole past and its
own ancestors only (per layer type: full attention, or a sliding window applied on top), and transformers'
DynamicCache layers (DynamicLayer, DynamicSlidingWindowLayer), whose new rows are compacted to the accepted path.
Does not know: which tree to build, which path to accept, or the decode loop around it (decoding.py).

Why these choices (transformers 5.24):
- A 4D mask reaches the attention as given (masking_utils returns it untouched). Eager attention *adds* it to the
  scores, so it is a float mask in the model's dtype (0 visible, dtype min hidden); sdpa takes the same tensor.
- Models with mixed layer types (Gemma 3: sliding and full) take a dict {layer type: mask}; a single tensor would
  either fail on shape (a sliding layer's keys are fewer) or silently drop the window.
- A sliding-window layer hands the attention its last min(stored, window - 1) past rows plus the new ones, so its
  mask is narrower than a full layer's; it keeps the rows a compaction needs only under
  `cache.activate_past_recording()`.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from .kernels import forward_tokens
from .tree import DraftTree

__all__ = ["keep_rows", "recompute_row", "supports_tree", "tree_forward"]

FULL, SLIDING = "full_attention", "sliding_attention"
_ATTENTIONS = ("eager", "sdpa")  # flash attention takes no custom mask; flex wants a BlockMask


def supports_tree(model) -> bool:
    """Whether `tree_forward` can verify a tree with this model (else the caller should verify chains)."""
    return _unsupported_reason(model) is None


@torch.no_grad()
def tree_forward(model, cache, pending: int, tree: DraftTree) -> torch.Tensor:
    """One forward of the pending token and the tree's nodes after the cached context (the cache holds every
    committed token except `pending`). Returns float32 logits [len(tree) + 1, V]: row 0 = scores after the pending
    token, row i + 1 = scores after node i (i.e. after the path root..i)."""
    reason = _unsupported_reason(model)
    if reason is not None:
        raise ValueError(f"token trees cannot be verified with model type {_model_type(model)!r}: {reason}")
    _check_cache(cache)
    device = model.device
    past = cache.get_seq_length()
    depth = torch.tensor([0, *tree.depths()], dtype=torch.long)  # [n]: pending at depth 0
    sees = ancestor_matrix(tree.parents).to(device)  # [n, n], moved once for every layer type's mask
    masks = {
        name: additive_mask(sees, depth, visible_past, window, model.dtype, device)
        for name, (window, visible_past) in _layer_kinds(model, cache, past).items()
    }
    mask = next(iter(masks.values())) if len(masks) == 1 else masks  # [1, 1, n, S + n] or {layer type: that}
    ids = torch.tensor([[pending, *tree.tokens]], dtype=torch.long, device=device)  # [1, n]
    position_ids = (past + depth).unsqueeze(0).to(device)  # [1, n]
    out = model(input_ids=ids, position_ids=position_ids, attention_mask=mask, cache=cache, use_cache=True)
    return out.logits[0].float()


@torch.no_grad()
def keep_rows(cache, past_length: int, rows: Sequence[int]) -> None:
    """After tree_forward on a cache that held `past_length` tokens: keep only the forward's rows `rows` (flat
    rows: 0 = the pending token, i + 1 = node i), in that order, appended after the past; drop the others. rows
    is a root-to-node path: [0, p1 + 1, p2 + 1, ...] (possibly [] = back to past_length, or [0]). After it the
    cache must be exactly what plain one-token-at-a-time decoding of those tokens would have built."""
    _check_cache(cache)
    n_new = cache.get_seq_length() - past_length
    if n_new < 0 or any(not 0 <= r < n_new for r in rows):
        raise ValueError(f"rows {list(rows)} are not among the {max(n_new, 0)} rows of the last forward")
    if list(rows) == list(range(len(rows))):  # a prefix of the flat order (a chain, or nothing): a plain crop
        cache.crop(len(rows) - n_new)  # crop(0) still trims sliding-window layers back to their window
        return
    for layer in cache.layers:
        _keep_layer_rows(layer, past_length, n_new, rows)


@torch.no_grad()
def recompute_row(model, cache, past_length: int, rows: Sequence[int], token: int) -> torch.Tensor | None:
    """One row of the last forward recomputed one token wide, the cache left as that forward left it.

    The cache held `past_length` tokens before a forward (a chain's or a tree's) appended its rows; `rows` is a
    root-to-node path of them (as keep_rows: 0 = the pending token, i + 1 = node i). Returns the float32 logits [V]
    of `token` fed alone after the past and those rows: exactly the forward plain decoding runs there, over the
    same cache entries. The forward's rows are set aside first and put back afterwards, so the walk over that
    forward's other rows can go on. None, with the cache untouched, where its layers cannot be put back that way
    (sliding-window layers keep only their last window): the caller then leaves the row to a step of its own."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers is None or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    n_new = cache.get_seq_length() - past_length
    if n_new < 1:
        raise ValueError(f"no forward's rows to recompute: the cache holds {n_new + past_length} of {past_length}")
    saved = [
        (layer.keys[:, :, -n_new:].clone(), layer.values[:, :, -n_new:].clone()) if layer.is_initialized else None
        for layer in layers
    ]  # [B, H, n_new, D] each
    keep_rows(cache, past_length, rows)
    logits = forward_tokens(model, cache, [token])[0]  # [V]
    cache.crop(-(len(rows) + 1))  # back to the past alone
    for layer, kept in zip(layers, saved, strict=True):
        if kept is not None:
            layer.keys = torch.cat([layer.keys, kept[0]], dim=-2)
            layer.values = torch.cat([layer.values, kept[1]], dim=-2)
    return logits


def ancestor_matrix(parents: Sequence[int]) -> torch.Tensor:
    """[n + 1, n + 1] bool over the flat rows (0 = the pending token, i + 1 = node i): row r sees column c iff c is
    r or one of its ancestors. Built by squaring the parent relation: log2(height) small matmuls."""
    n = len(parents) + 1
    rows = torch.arange(n)
    parent = torch.tensor([0, *(p + 1 for p in parents)], dtype=torch.long)  # [n] flat parent row; row 0 its own
    reach = torch.zeros(n, n)  # [n, n] 1 where c is r or an ancestor at most `span` levels up
    reach[rows, rows] = 1.0
    reach[rows, parent] = 1.0
    span, height = 1, _height(parents)
    while span < height:
        reach = (reach @ reach).clamp_(max=1.0)  # ancestors up to 2 * span levels up
        span *= 2
    return reach.bool()


def _height(parents: Sequence[int]) -> int:
    """The depth of the deepest node (0 for no nodes)."""
    depth: list[int] = []
    for p in parents:
        depth.append(1 if p < 0 else depth[p] + 1)
    return max(depth, default=0)


def additive_mask(
    sees: torch.Tensor,
    depth: torch.Tensor,
    visible_past: int,
    window: int | None,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """[1, 1, n, visible_past + n] float mask on `device`: 0 where a row attends, dtype min where it does not.

    sees: [n, n] ancestor matrix; depth: [n] depth of each row (pending = 0); visible_past: how many of the last past
    rows the layer hands to the attention (the first of them is the oldest). window: a sliding window (a row at
    position P sees positions > P - window, as masking_utils' sliding_window_overlay) or None.
    """
    n, height = sees.shape[0], int(depth.max())  # read before the move: no device sync
    sees, depth = sees.to(device), depth.to(device)
    hidden = torch.finfo(dtype).min
    mask = torch.zeros(n, visible_past + n, dtype=dtype, device=device)  # [n, S + n]: the past is visible...
    if window is not None:
        sees = sees & (depth[:, None] - depth[None, :] < window)  # ...and an ancestor within the window
        # past column j holds position past - S + j and row i sits at past + depth[i]: row i sees column j iff
        # j >= first_seen[i]. Columns before `lo` are out of every row's window, after `hi` inside every one.
        first_seen = depth + visible_past - window + 1  # [n]
        lo = min(max(visible_past - window + 1, 0), visible_past)
        hi = min(max(visible_past - window + 1 + height, 0), visible_past)
        mask[:, :lo] = hidden
        band = torch.arange(lo, hi, device=device)  # [hi - lo], at most the tree's height
        mask[:, lo:hi].masked_fill_(band[None, :] < first_seen[:, None], hidden)
    mask[:, visible_past:].masked_fill_(~sees, hidden)
    return mask[None, None]


def _layer_kinds(model, cache, past: int) -> dict[str, tuple[int | None, int]]:
    """{layer type: (sliding window or None, past rows its layers hand to the attention)} for this forward."""
    layer_types, windows = _model_layers(model)
    kinds: dict[str, tuple[int | None, int]] = {}
    for i, (name, window) in enumerate(zip(layer_types, windows, strict=True)):
        layer = cache.layers[i] if i < len(cache.layers) else None
        kind = (window, _visible_past(layer, past))
        if kinds.setdefault(name, kind) != kind:
            raise ValueError(f"layers of type {name!r} disagree on window or cached length: {kinds[name]}, {kind}")
    return kinds


def _visible_past(layer, past: int) -> int:
    """How many past rows this cache layer passes to the attention with the next forward's new rows."""
    if layer is not None and layer.is_sliding:
        stored = layer.keys.shape[-2] if layer.is_initialized else 0
        return min(stored, layer.sliding_window - 1)  # its update returns the last window - 1 + new rows
    return past


def _model_layers(model) -> tuple[list[str], list[int | None]]:
    """Each decoder layer's attention type, and its sliding window (None for full attention)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    layer_types, kwargs = get_layer_types_and_kwargs(model.config.get_text_config(decoder=True))
    pairs = zip(layer_types, kwargs, strict=True)
    windows = [kw.get("sliding_window") if name == SLIDING else None for name, kw in pairs]
    return list(layer_types), windows


def _model_type(model) -> str:
    return getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__


def _unsupported_reason(model) -> str | None:
    """Why this model's forward cannot take the tree's masks, or None when it can."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return "not a decoder-only transformers model"
    attention = getattr(config, "_attn_implementation", None)
    if attention not in _ATTENTIONS:
        return f"attention {attention!r} takes no custom 4D mask (use one of {', '.join(_ATTENTIONS)})"
    try:
        layer_types, _ = _model_layers(model)
    except (AttributeError, KeyError, TypeError) as err:
        return f"its layer types are unknown ({err})"
    other = sorted(set(layer_types) - {FULL, SLIDING})
    if other:
        return f"layers of type {', '.join(other)} are not full or sliding-window attention"
    if len(set(layer_types)) > 1 and not _takes_mask_dict(type(model)):
        return "its layers mix attention types and its forward takes no dict of masks"
    return None


def _takes_mask_dict(model_class: type) -> bool:
    """Whether the decoder forward of a model class with mixed layer types accepts a prepared {layer type: mask}.

    transformers' hybrid models open with `if not isinstance(causal_mask_mapping := attention_mask, dict)`; there
    is no flag for it, so the source of the module that defines the decoder says.
    """
    if model_class not in _TAKES_MASK_DICT:
        module = inspect.getmodule(model_class)
        try:
            source = inspect.getsource(module) if module is not None else ""
        except (OSError, TypeError):
            source = ""
        _TAKES_MASK_DICT[model_class] = "causal_mask_mapping := attention_mask, dict)" in source
    return _TAKES_MASK_DICT[model_class]


_TAKES_MASK_DICT: dict[type, bool] = {}  # model class -> whether its forward takes a dict of masks


def _check_cache(cache) -> None:
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ValueError(f"tree verification needs a DynamicCache, got {type(cache).__name__}")
    for i, layer in enumerate(layers):
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
            raise ValueError(f"cache layer {i} is a {type(layer).__name__}: only dynamic cache layers can be compacted")
        if isinstance(layer, DynamicSlidingWindowLayer) and not layer.record_past:
            raise ValueError(
                "sliding-window cache layers drop the rows a tree compaction needs: call "
                "cache.activate_past_recording() after the prefill"
            )


def _keep_layer_rows(layer, past_length: int, n_new: int, rows: Sequence[int]) -> None:
    """Move this layer's kept new rows to just after its past rows (in place), drop the rest; a sliding-window
    layer also gets its cumulative length back and keeps only its last window - 1 rows, as its own crop does."""
    if not layer.is_initialized:
        return
    start = layer.keys.shape[-2] - n_new  # the forward's rows are the layer's last n_new rows
    m = len(rows)
    keep = torch.tensor(list(rows), dtype=torch.long, device=layer.keys.device) + start  # [m]
    begin = 0
    if layer.is_sliding:
        layer.cumulative_length = past_length + m
        if layer.cumulative_length >= layer.sliding_window:
            begin = max(start + m - layer.sliding_window + 1, 0)
    for name in ("keys", "values"):
        states = getattr(layer, name)  # [B, H, stored, D]
        # in place, so a step costs the kept rows, not a copy of the past; the forward may have run in inference mode
        with torch.inference_mode(states.is_inference()):
            states[:, :, start : start + m] = states.index_select(2, keep)
        setattr(layer, name, states[:, :, begin : start + m])
