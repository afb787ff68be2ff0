"""The corpus extra: faiss-cpu (passage retrieval) and datasketch (near-duplicate removal), imported only when a
corpus index is built, loaded or searched, so that `import refdecode` needs neither; and the optional pieces beyond
it: pyarrow (Parquet sources) and ray[data] (building on Ray, the `ray` extra).

Knows: which packages each extra brings and how to ask for them. Does not know: what they are used for.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["INSTALL_HINT", "RAY_INSTALL_HINT", "require"]

INSTALL_HINT = "pip install 'refdecode[corpus]'"
RAY_INSTALL_HINT = "pip install 'refdecode[ray]'"
# module -> (the package that brings it, what needs it, how to install it)
_PACKAGES = {
    "faiss": ("faiss-cpu", "corpus indexes", INSTALL_HINT),
    "datasketch": ("datasketch", "corpus indexes", INSTALL_HINT),
    "pyarrow.parquet": ("pyarrow", "Parquet sources", f"pip install pyarrow (or {RAY_INSTALL_HINT})"),
    "ray": ("ray[data]", "building on Ray (engine='ray', --ray)", RAY_INSTALL_HINT),
}


def require(module: str) -> ModuleType:
    """An optional dependency `module` ("faiss", "datasketch", "pyarrow.parquet" or "ray"), imported; ImportError
    with the install command when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package, needs, hint = _PACKAGES[module]
        raise ImportError(f"{needs} need {package}, which is not installed: {hint}") from None
