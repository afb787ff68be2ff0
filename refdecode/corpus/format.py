"""On-disk format of a corpus index: manifest, checksums, versions, atomic build folders.

An index is a folder `indexes/NAME/` holding plain files (numpy `.npy` arrays, JSON, faiss's own index file,
a UTF-8 text blob) and one `manifest.json` that names every file with its size and SHA-256, the format version,
the tokenizer fingerprint, the model name, the counts and the build options. Loading checks the manifest first
and every file against it before anything opens that file, so a truncated or tampered file is refused with a
message (faiss would otherwise crash or read garbage). Nothing here unpickles: arrays load with
`allow_pickle=False`.

A build writes into a hidden temporary sibling folder and renames it to the final name only when complete, so an
interrupted build never leaves a half index under the final name, and an existing index is only replaced with
`force=True`.

This module knows nothing about what the files contain (spans, passages, embeddings): callers name them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_FILE",
    "IndexFormatError",
    "tokenizer_fingerprint",
    "file_entry",
    "write_manifest",
    "read_manifest",
    "verify_files",
    "check_tokenizer",
    "staging_dir",
]

FORMAT_NAME = "refdecode-corpus-index"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
_CHUNK = 1 << 20


class IndexFormatError(ValueError):
    """An index folder that cannot be used: missing, corrupt, truncated, another version or another tokenizer."""


def tokenizer_fingerprint(tokenizer) -> str:
    """A stable hash of the tokenizer's vocabulary (token -> id map) and its special tokens.

    Two tokenizers with the same fingerprint map every text to the same ids, as far as the vocabulary decides;
    ids in an index built with one are valid for the other.
    """
    vocab = tokenizer.get_vocab()
    items = sorted((str(tok), int(i)) for tok, i in vocab.items())
    special = sorted(str(t) for t in (getattr(tokenizer, "all_special_tokens", None) or []))
    blob = json.dumps({"vocab": items, "special": special}, ensure_ascii=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def file_entry(path: Path) -> dict:
    """Size and SHA-256 of one file, as the manifest records it."""
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def write_manifest(folder: Path, manifest: dict, files: list[str]) -> dict:
    """Record `files` (names inside `folder`) with sizes and checksums, plus the format name and version."""
    full = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **manifest,
            "files": {name: file_entry(folder / name) for name in files}}
    tmp = folder / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(full, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, folder / MANIFEST_FILE)
    return full


def read_manifest(folder: Path) -> dict:
    """Parse and check `manifest.json`: it exists, is JSON, names this format and a version this code reads."""
    folder = Path(folder)
    if not folder.is_dir():
        raise IndexFormatError(f"no index at {folder}: not a folder")
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise IndexFormatError(f"no index at {folder}: {MANIFEST_FILE} is missing (an unfinished build?)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexFormatError(f"index {folder}: {MANIFEST_FILE} is corrupt ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise IndexFormatError(f"index {folder}: {MANIFEST_FILE} is not a refdecode corpus index manifest")
    version = manifest.get("version")
    if version != FORMAT_VERSION:
        raise IndexFormatError(f"index {folder}: format version {version!r} is not supported by this refdecode "
                               f"(reads version {FORMAT_VERSION}); rebuild it with `refdecode index build --force`")
    if not isinstance(manifest.get("files"), dict):
        raise IndexFormatError(f"index {folder}: {MANIFEST_FILE} lists no files")
    return manifest


def verify_files(folder: Path, manifest: dict, *, checksums: bool = True) -> None:
    """Check every file the manifest names: present, the recorded size, and (by default) the recorded SHA-256."""
    folder = Path(folder)
    for name, entry in manifest["files"].items():
        path = folder / name
        if Path(name).name != name:
            raise IndexFormatError(f"index {folder}: manifest names a file outside the index: {name!r}")
        if not path.is_file():
            raise IndexFormatError(f"index {folder}: file {name} is missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise IndexFormatError(f"index {folder}: file {name} has {size} bytes, the manifest says "
                                   f"{entry['bytes']} (truncated or replaced)")
        if checksums and _sha256(path) != entry["sha256"]:
            raise IndexFormatError(f"index {folder}: file {name} fails its checksum (corrupted or modified)")


def check_tokenizer(folder: Path, manifest: dict, tokenizer) -> None:
    """Refuse an index whose token ids come from another tokenizer than `tokenizer`."""
    have = tokenizer_fingerprint(tokenizer)
    if manifest.get("tokenizer_fingerprint") != have:
        raise IndexFormatError(
            f"index {folder} was built for another tokenizer (model {manifest.get('model_name')!r}, fingerprint "
            f"{manifest.get('tokenizer_fingerprint')}); this tokenizer's fingerprint is {have}. "
            f"Rebuild the index with this model's tokenizer")


@contextlib.contextmanager
def staging_dir(out: Path, *, force: bool) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `out`; on success rename it to `out`, on any error delete it.

    An existing `out` is left untouched unless `force`, and even then it is only replaced after the new index is
    complete.
    """
    out = Path(out)
    if out.exists() and not force:
        raise IndexFormatError(f"{out} already exists; pass --force (force=True) to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.building-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            if not force:
                raise IndexFormatError(f"{out} appeared during the build; pass --force to replace it")
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
