"""Reading the user's text files (prompts, references, corpus sources) with clear errors.

Knows: UTF-8 decoding and the ways a path can fail to be a readable text file. Does not know: what the text is for.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["read_text"]


def read_text(path: str | Path, what: str = "input") -> str:
    """The UTF-8 text of `path`; ValueError naming `what` and the path if it is missing, a directory, unreadable or
    not UTF-8 (with the offset of the first bad byte)."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{what} file not found: {path}") from None
    except IsADirectoryError:
        raise ValueError(f"{what} is a directory, not a file: {path}") from None
    except PermissionError:
        raise ValueError(f"cannot read {what} file: {path} (permission denied)") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} file is not UTF-8 text: {path} (invalid byte at offset {err.start})") from None
