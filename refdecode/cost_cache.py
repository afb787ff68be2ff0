"""The forward-cost calibration kept on disk, so that a new process on the same machine need not time it again.

A calibration (policy.calibrate_costs) times ~90 forwards: 27 s for Qwen2.5-Coder-1.5B in bfloat16 on a 2-core CPU,
most of a short command-line generation. What it finds depends on the model's shapes, the dtype, the kernels and the
machine, not on the weights or the prompt, so it is kept under ``$REFDECODE_CACHE/costs/`` (default
``~/.cache/refdecode/costs/``), one JSON file per fingerprint of those, holding one table per context length the
calibration ran after (a forward's cost by width changes with the context it attends to). A later process checks the
table of the nearest context length with a few forwards before it trusts it (policy.calibrate_costs) and times it
afresh when the machine or the context no longer matches, keeping the new table beside the others.

``REFDECODE_COST_CACHE=off`` turns it off (the benchmark and the tests calibrate afresh in every process);
``on`` or unset keeps it on. Failing to read or write the cache never fails a generation: the calibration is timed
as if there were none.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import tempfile
from pathlib import Path

import torch

SWITCH_VARIABLE = "REFDECODE_COST_CACHE"
FORMAT = 2

__all__ = [
    "SWITCH_VARIABLE",
    "enabled",
    "fingerprint",
    "load",
    "load_policy",
    "nearest",
    "policy_path",
    "save",
    "save_policy",
    "table_path",
]


def enabled() -> bool:
    """True unless the environment says REFDECODE_COST_CACHE=off; any value other than on/off is a ValueError."""
    value = os.environ.get(SWITCH_VARIABLE, "on").strip().lower()
    if value not in ("on", "off"):
        raise ValueError(f"{SWITCH_VARIABLE} must be 'on' or 'off', got {value!r}")
    return value == "on"


def _processor() -> str:
    """The CPU's model name and its feature flags (AMX or AVX-512 BF16 change what a width costs), from
    /proc/cpuinfo where there is one."""
    found: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "flags") and key.strip() not in found:
                    found[key.strip()] = value.strip()
                if len(found) == 2:
                    break
    except OSError:
        pass
    name = found.get("model name") or platform.processor()
    flags = " ".join(sorted(found.get("flags", "").split()))
    return f"{platform.machine()} {name} [{flags}]"


def fingerprint(model, *, routable: bool) -> dict:
    """What a calibration's result depends on: the model's parameter shapes and dtypes (two fine-tunes of one
    architecture share a table), its attention implementation, the device (the GPU's name, or the CPU's model,
    flags and thread count), and the versions of torch, transformers and refdecode."""
    import transformers

    from . import __version__

    device = torch.device(model.device)
    if device.type == "cuda":
        where = f"cuda {torch.cuda.get_device_name(device)} {torch.version.cuda}"
    else:
        where = f"{device.type} {_processor()} threads={torch.get_num_threads()}"
    shapes = hashlib.sha256()
    for name, p in model.named_parameters():
        shapes.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
    return {
        "format": FORMAT,
        "model": type(model).__name__,
        "parameters": shapes.hexdigest(),
        "attention": str(getattr(model.config, "_attn_implementation", None)),
        "dtype": str(model.dtype),
        "device": where,
        "routable": routable,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "refdecode": __version__,
    }


def _path(folder: str, what) -> Path:
    """The file under the cache's `folder` named by a digest of `what` (JSON-ready); RuntimeError where no home
    folder can be named (Path.home)."""
    from .models import cache_dir

    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir() / folder / f"{digest}.json"


def table_path(key: dict) -> Path:
    """Where the tables of this fingerprint are kept."""
    return _path("costs", key)


def _read(folder: str, what) -> dict | None:
    """The JSON object in the file _path(folder, what) names; None where there is no home folder, no file, or no
    object."""
    try:
        data = json.loads(_path(folder, what).read_text(encoding="utf-8"))
    except (OSError, RuntimeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write(folder: str, what, body: dict) -> Path | None:
    """Write `body` whole to a temporary file beside _path(folder, what), then rename it over that file (a reader
    never sees a part). None where that fails, no home folder included: the cache is a convenience, nothing fails
    for want of it."""
    try:
        path = _path(folder, what)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(body, f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except (OSError, RuntimeError):
        return None
    return path


# A forward's cost by width changes with the cached context it attends to (the 1.5B in bfloat16: 17 tokens cost 0.91
# of one token after 3,000 cached tokens, 1.25 after 8,000), so a fingerprint keeps one table per context length a
# calibration ran at, at most MAX_TABLES; a new one replaces those within a factor CONTEXT_SPAN of its context.
MAX_TABLES = 8
CONTEXT_SPAN = 2.0


def load(key: dict) -> list[dict]:
    """The kept calibrations of this fingerprint, each {"context": cached tokens it was timed after, "seconds":
    {width: s}, "routes": {width: bool}, "rounding": float or None}; [] when there are none or the file cannot be
    read (a damaged file is timed again and replaced)."""
    data = _read("costs", key)
    if data is None or data.get("key") != key:
        return []
    try:
        tables = []
        for entry in data["tables"]:
            seconds = {int(w): float(t) for w, t in entry["seconds"].items()}
            routes = {int(w): bool(r) for w, r in entry["routes"].items()}
            rounding, context = entry.get("rounding"), int(entry["context"])
            if 1 not in seconds or any(not t > 0 for t in seconds.values()) or context < 1:
                return []
            rounding = None if rounding is None else float(rounding)
            tables.append({"context": context, "seconds": seconds, "routes": routes, "rounding": rounding})
        return tables
    except (ValueError, KeyError, TypeError, AttributeError):
        return []


def nearest(tables: list[dict], context: int) -> dict | None:
    """The kept table timed after the context length closest to `context` (by ratio), or None."""
    return min(tables, key=lambda t: abs(math.log(t["context"] / max(1, context))), default=None)


def save(key: dict, table: dict) -> Path | None:
    """Keep a calibration ({"context", "seconds", "routes", "rounding"} as load returns them) beside the kept ones
    timed after other context lengths, written whole to a temporary file then renamed over the old one (a reader
    never sees a part). Returns the file, or None when the cache cannot be written (the generation goes on)."""
    others = [t for t in load(key) if not 1 / CONTEXT_SPAN < t["context"] / table["context"] < CONTEXT_SPAN]
    tables = [*others, table][-MAX_TABLES:]
    body = {
        "key": key,
        "tables": [
            {
                "context": t["context"],
                "seconds": {str(w): v for w, v in sorted(t["seconds"].items())},
                "routes": {str(w): r for w, r in sorted(t["routes"].items())},
                "rounding": t["rounding"],
            }
            for t in tables
        ],
    }
    return _write("costs", key, body)


# What the draft policy learned (policy.warm_policy): how often drafts of each source and match length were
# accepted, per model fingerprint and kind of drafting, so that the first call of a process starts where the last
# call of the last process left off, as later calls of one process do.


def policy_path(key: dict, kind: str) -> Path:
    """Where the learned acceptance of this fingerprint and kind of drafting is kept."""
    return _path("policies", [key, kind])


def load_policy(key: dict, kind: str) -> dict | None:
    """The kept learned state of save_policy, or None when there is none or it cannot be read."""
    data = _read("policies", [key, kind])
    if data is None or data.get("key") != key or data.get("kind") != kind:
        return None
    state = data.get("state")
    return state if isinstance(state, dict) else None


def save_policy(key: dict, kind: str, state: dict) -> Path | None:
    """Keep a policy's learned state (DraftPolicy.learned_state), replacing the last one kept for this kind."""
    return _write("policies", [key, kind], {"key": key, "kind": kind, "state": state})
