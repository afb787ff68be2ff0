"""Faster verification forwards on the CPU: a few tokens at the price of one.

Knows: how a transformers model's `nn.Linear` layers and SDPA attention compute a forward of a few tokens on the
CPU, and which of two ways of computing it is faster (timed per model, per width, by the caller's calibration).
Does not know what the tokens are, nor anything about drafting or acceptance.

Why. A verification forward runs 2..64 tokens. For so few rows MKL's sgemm (`x @ W.T`, what `F.linear` calls)
runs well below memory speed: measured on a 2-core EPYC (AVX2) with SmolLM2-135M, a 2-token forward cost 1.9x a
1-token one and 16 tokens 2.3x. The same products taken the other way round, `(W @ x.T).T` (many rows of W, a few
columns), stream the weights once: 2 to 4 tokens then cost what one token does. And transformers copies every
key/value head `n_rep` times for grouped-query attention whenever a mask is given (always, for a forward of more
than one token after a cache); SDPA's own `enable_gqa` avoids that copy. transformers reads the switch for that,
`TRANSFORMERS_SDPA_FORCE_GQA`, from the environment on every call.

Numerics. Both are the same products summed in another order: a routed forward's logits differ from a one-token
forward's by ~5e-5, as an unrouted wide forward's already do, and verification's tie guard (rows whose top-2 gap is
below `tie_margin` are recomputed one token wide) covers both. One-token forwards and the prefill are never routed:
a plain step computes exactly what transformers computes.

Scope. Only CPU models, only `nn.Linear` modules of exactly that class whose `forward` nobody replaced (accelerate's
hooks, quantized or LoRA layers keep theirs), only inside `routed(model, width)` and only at widths the
calibration found faster. The modules are restored when the block ends, even on an error; the environment
variable is left alone when the user set it.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = [
    "FORCE_GQA_VARIABLE",
    "SWITCH_VARIABLE",
    "enabled",
    "forget_route",
    "forward_tokens",
    "routable",
    "route_widths",
    "routed",
    "set_route",
    "synchronize",
    "takes_route",
    "transformers_kernels",
]

FORCE_GQA_VARIABLE = "TRANSFORMERS_SDPA_FORCE_GQA"
SWITCH_VARIABLE = "REFDECODE_CPU_KERNELS"  # "auto" (default): calibrate and route; "transformers": never route

_ROUTES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> ((calibrated width, routed?), ...)
_LINEARS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> [its routable nn.Linear modules]


def enabled() -> bool:
    """False when the environment says REFDECODE_CPU_KERNELS=transformers (every forward then runs transformers' own
    kernels); True for "auto" or unset. Any other value is a ValueError naming the two."""
    value = os.environ.get(SWITCH_VARIABLE, "auto").strip().lower()
    if value not in ("auto", "transformers"):
        raise ValueError(f"{SWITCH_VARIABLE} must be 'auto' or 'transformers', got {value!r}")
    return value == "auto"


@contextmanager
def transformers_kernels(active: bool = True) -> Iterator[None]:
    """Within the block (when `active`), every forward runs transformers' own kernels, as with
    REFDECODE_CPU_KERNELS=transformers; the variable is restored afterwards. For measuring what routing adds."""
    if not active:
        yield
        return
    before = os.environ.get(SWITCH_VARIABLE)
    os.environ[SWITCH_VARIABLE] = "transformers"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(SWITCH_VARIABLE, None)
        else:
            os.environ[SWITCH_VARIABLE] = before


def routable(model) -> bool:
    """Whether `routed` can change anything for this model: routing enabled, a CPU model, at least one plain
    nn.Linear."""
    device = getattr(model, "device", None)
    return enabled() and device is not None and torch.device(device).type == "cpu" and bool(_routable_linears(model))


def set_route(model, decisions: dict[int, bool]) -> None:
    """Route forwards through the transposed products at the calibrated widths marked True (token counts >= 2). A
    width between two calibrated ones takes the decision of the next larger one; one above them all is not routed."""
    table = tuple(sorted((int(w), bool(d)) for w, d in decisions.items()))
    if any(w < 2 for w, _ in table):
        raise ValueError(f"only forwards of 2 or more tokens can be routed, got widths {[w for w, _ in table]}")
    _ROUTES[model] = table


def forget_route(model) -> None:
    """Back to transformers' own kernels for every width of this model."""
    _ROUTES.pop(model, None)


def route_table(model) -> tuple[tuple[int, bool], ...]:
    """The calibrated widths of this model and whether each is routed, sorted by width (empty: not calibrated)."""
    return _ROUTES.get(model, ())


def route_widths(model) -> frozenset:
    """The calibrated widths routed for this model (empty: none)."""
    return frozenset(w for w, d in _ROUTES.get(model, ()) if d)


def takes_route(model, width: int) -> bool:
    """Whether a forward of `width` tokens is routed: by the smallest calibrated width at or above it."""
    if width < 2:
        return False
    for calibrated, decision in _ROUTES.get(model, ()):
        if calibrated >= width:
            return decision
    return False


@contextmanager
def routed(model, width: int, *, force: bool | None = None) -> Iterator[bool]:
    """Within the block, a forward of `width` tokens of `model` runs the transposed linear products and SDPA's own
    grouped-query attention, when the calibration found that faster at this width (or `force` says so: the
    calibration's own trial). Yields whether it is routed. Never routes one token, a GPU model or a model without
    plain nn.Linear layers."""
    use = takes_route(model, width) if force is None else (force and width >= 2)
    if not use or not routable(model):
        yield False
        return
    linears = [module for module in _routable_linears(model) if _own_forward(module)]  # hooks may have come since
    set_gqa = FORCE_GQA_VARIABLE not in os.environ
    try:
        for module in linears:
            module.forward = _transposed_forward.__get__(module)  # an instance attribute shadows Linear.forward
        if set_gqa:
            os.environ[FORCE_GQA_VARIABLE] = "1"
        yield True
    finally:
        for module in linears:
            module.__dict__.pop("forward", None)
        if set_gqa:
            os.environ.pop(FORCE_GQA_VARIABLE, None)


def forward_tokens(model, cache, token_ids: list[int], *, route: bool | None = None) -> torch.Tensor:
    """One forward of `token_ids` after the cached context; returns float32 logits [len(token_ids), V]. A forward of
    several tokens takes the faster CPU kernels where the calibration chose them (`routed`; `route` forces the
    choice, for the calibration itself)."""
    ids = torch.tensor([token_ids], dtype=torch.long, device=model.device)
    with routed(model, len(token_ids), force=route):
        out = model(input_ids=ids, cache=cache, use_cache=True)
    return out.logits[0].float()


def synchronize(device) -> None:
    """Wait for the device's queued work (CUDA), so that a timer read afterwards measures it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _routable_linears(model) -> list:
    """The model's nn.Linear modules (exactly that class) whose forward is the class's own; cached per model."""
    found = _LINEARS.get(model)
    if found is None:
        found = [
            module
            for module in model.modules()
            if type(module) is torch.nn.Linear and _own_forward(module) and module.weight.device.type == "cpu"
        ]
        _LINEARS[model] = found
    return found


def _own_forward(module) -> bool:
    return "forward" not in module.__dict__


def _transposed_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`F.linear(x, W, b)` computed as `(W @ x.T).T`: x [..., in] -> [..., out], contiguous (SDPA's fast CPU kernel
    refuses strided queries)."""
    rows = x.numel() // x.shape[-1]
    if rows < 2 or x.dtype != self.weight.dtype:
        return torch.nn.functional.linear(x, self.weight, self.bias)
    columns = x.reshape(rows, x.shape[-1]).t()
    if self.bias is None:
        out = torch.mm(self.weight, columns)  # [out, rows]
    else:  # the bias inside the product, rounded once as F.linear does (adding it after rounds bfloat16 twice)
        out = torch.addmm(self.bias.unsqueeze(1), self.weight, columns)
    out = out.t().contiguous()  # [rows, out]
    return out.reshape(*x.shape[:-1], out.shape[-1])
