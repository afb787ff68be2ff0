"""The corpus extra: faiss-cpu (passage retrieval) and datasketch (near-duplicate removal), imported only when a
corpus index is built, loaded or searched, so that `import refdecode` needs neither.

Knows: which packages `pip install 'refdecode[corpus]'` brings and how to ask for them. Does not know: what they
are used for.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["INSTALL_HINT", "require"]

INSTALL_HINT = "pip install 'refdecode[corpus]'"
_PACKAGES = {"faiss": "faiss-cpu", "datasketch": "datasketch"}


def require(module: str) -> ModuleType:
    """The corpus dependency `module` ("faiss" or "datasketch"), imported; ImportError with the install command
    when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"corpus indexes need {_PACKAGES[module]}, which is not installed: {INSTALL_HINT}") from None
