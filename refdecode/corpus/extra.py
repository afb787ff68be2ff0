"""Optional dependencies of the corpus index, imported only where a build, load or search needs them, so that
`import refdecode` needs none of them: the corpus extra (faiss-cpu for passage retrieval, datasketch for
near-duplicate removal), pyarrow (Parquet sources) and the ray extra (ray[data]: building on Ray).

Knows: which package brings each module and which command installs it. Does not know: what they are used for.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["INSTALL_HINT", "RAY_INSTALL_HINT", "require"]

INSTALL_HINT = "pip install 'refdecode[corpus]'"
RAY_INSTALL_HINT = "pip install 'refdecode[ray]'"
# module -> (what needs which package, the install command)
_PACKAGES = {
    "faiss": ("corpus indexes need faiss-cpu", INSTALL_HINT),
    "datasketch": ("corpus indexes need datasketch", INSTALL_HINT),
    "pyarrow.parquet": ("Parquet sources need pyarrow", "pip install pyarrow (the ray extra brings it too)"),
    "ray": ("building on Ray (engine='ray', --ray) needs ray[data]", RAY_INSTALL_HINT),
}


def require(module: str) -> ModuleType:
    """The optional dependency `module` ("faiss", "datasketch", "pyarrow.parquet" or "ray"), imported;
    ImportError with the install command, in one line, when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError:
        needs, hint = _PACKAGES[module]
        raise ImportError(f"{needs}, which is not installed: {hint}") from None
