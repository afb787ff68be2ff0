""".npy files an index reads and writes: a checked reader that maps nothing before its header is proven, and an
appending writer for arrays whose length is only known at the end.

Knows: the .npy header (format version 1.0 and 2.0), memory maps, and which errors mean a bad file. Does not know
what the arrays mean (spans.py, index.py check their contents) or which files a folder holds (format.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..checked_folder import FolderFormatError

__all__ = ["NpyAppender", "open_npy"]

_HEADER_BYTES = 128  # a fixed-size 1.0 header: room for any 1-D shape, so the length is written in place at the end


def open_npy(path: Path, dtypes: Sequence, ndim: int, label: str) -> np.ndarray:
    """Map a `.npy` file after checking its header: one of `dtypes` (native order, never object), `ndim`
    dimensions, and a data size that is exactly the rest of the file. Empty arrays are made, not mapped
    (a zero-length map is an error). Raises FolderFormatError (the index's IndexFormatError) in one line.
    -> read-only ndarray"""
    size = path.stat().st_size
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_2_0 if version == (2, 0) else np.lib.format.read_array_header_1_0
            )
            shape, fortran, dtype = read_header(f, max_header_size=10_000)
        except (ValueError, SyntaxError, TypeError) as e:
            raise FolderFormatError(f"{label}: not a valid .npy file ({str(e).splitlines()[0][:200]})") from None
        offset = f.tell()
    if dtype not in [np.dtype(d) for d in dtypes] or len(shape) != ndim or fortran:
        raise FolderFormatError(
            f"{label}: array of {dtype} {shape}, expected {ndim} dimension(s) of "
            f"{' or '.join(str(np.dtype(d)) for d in dtypes)}"
        )
    nbytes = math.prod(shape) * dtype.itemsize
    if offset + nbytes != size:
        raise FolderFormatError(f"{label}: header declares {nbytes} bytes of data, the file holds {size - offset}")
    if nbytes == 0:
        return np.zeros(shape, dtype=dtype)
    return np.asarray(np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape))


def _header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A .npy 1.0 header for an array of `shape`, padded with spaces to exactly _HEADER_BYTES."""
    text = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
    room = _HEADER_BYTES - 10 - 1  # magic (6) + version (2) + header length (2); the header ends with a newline
    if len(text) > room:  # pragma: no cover - a shape of a few dimensions always fits
        raise ValueError(f"a .npy header for {dtype} {shape} does not fit {_HEADER_BYTES} bytes")
    return b"\x93NUMPY\x01\x00" + (room + 1).to_bytes(2, "little") + text.ljust(room).encode("latin1") + b"\n"


class NpyAppender:
    """Write a `.npy` file block by block without knowing its length up front: a fixed-size header first,
    blocks appended, the header rewritten in place with the final length by `close`. Memory: one block.
    row_shape: the shape of one item, () for a 1-D file (the default), (dim,) for a file of (n, dim) rows.

        with NpyAppender(path, np.uint32) as out:
            for block in blocks:
                out.append(block)
    """

    def __init__(self, path: Path, dtype, row_shape: tuple[int, ...] = ()):
        self.path, self.dtype, self.row_shape, self.count = Path(path), np.dtype(dtype), tuple(row_shape), 0
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed by close()
        self._file.write(_header(self.dtype, (0, *self.row_shape)))

    def append(self, block: np.ndarray) -> None:
        """Append a block of items, cast to the file's dtype. (B, *row_shape)"""
        arr = np.ascontiguousarray(block, dtype=self.dtype)
        if arr.ndim != 1 + len(self.row_shape) or arr.shape[1:] != self.row_shape:
            raise ValueError(
                f"NpyAppender takes blocks of shape (B, {', '.join(map(str, self.row_shape))}), got {arr.shape}"
            )
        arr.tofile(self._file)
        self.count += arr.shape[0]

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.seek(0)
        self._file.write(_header(self.dtype, (self.count, *self.row_shape)))
        self._file.close()

    def __enter__(self) -> NpyAppender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
