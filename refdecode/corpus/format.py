"""On-disk format of a corpus index: its name, versions, files and tokenizer check, on top of refdecode.checked_folder.

An index is a checked folder `indexes/NAME/` (see refdecode/checked_folder.py for the manifest, the checksums, the
generation subfolder switched with one os.replace, the ownership check and the cleanup of killed builds). Its
generation holds numpy `.npy` arrays, JSON, faiss's own index file and a UTF-8 text blob; its manifest adds the
tokenizer fingerprint, the model name, the counts, the build options, the embedder, the span index's partitions
and the passage index's kind. Version 3 cuts the suffix order into numbered partitions (`span_sa.NNNNN.npy`, as
many as the manifest lists) and may hold an IVF-PQ passage index; version 2 indexes (one `span_sa.npy`, a flat
passage index) and version 1 (the same files flat in the folder, no generation) still load.

`--force` only ever replaces a folder that holds a refdecode index manifest, never a file, another folder, or a
folder that contains or lies inside a source.

Knows: the index's format name and versions, which file names an index may hold, what `--force` means, and that
an index's ids belong to one tokenizer. Does not know: what the files contain (spans, passages, embeddings) or
how a folder is checked and switched (checked_folder.py).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path

from .. import checked_folder
from ..checked_folder import (
    MANIFEST_FILE,
    FolderFormat,
    FolderFormatError,
    Generation,
    GenerationGone,
    tokenizer_fingerprint,
)
from .spans import LEGACY_FILES, PARTITION_PATTERN, STREAM_SHARD_PATTERN, span_files

__all__ = [
    "ALL_FILES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "INDEX_FOLDER",
    "MANIFEST_FILE",
    "READABLE_VERSIONS",
    "Generation",
    "GenerationGone",
    "INDEX_FILES",
    "IndexFormatError",
    "PASSAGE_FILES",
    "check_target",
    "check_tokenizer",
    "data_dir",
    "index_files",
    "new_generation",
    "read_manifest",
    "tokenizer_fingerprint",
    "verify_files",
]

FORMAT_NAME = "refdecode-corpus-index"
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
PASSAGE_FILES = (
    "passage_text.bin",
    "passage_text_offsets.npy",
    "passage_tokens.npy",
    "passage_source.npy",
    "sources.json",
    "passages.faiss",
)
EMBEDDER_FILES = ("embed_idf.npy",)  # the hashed embedder's weights
IVF_FILES = ("passages.ivfdata",)  # an IVF-PQ passage index's inverted lists, merged on disk
REFINE_FILES = ("passages.refine.npy",)  # a fast-scan passage index's vectors, re-ranking its candidates
IVF_SHARD_PATTERN = r"passages\.faiss\.shard-[0-9]+"  # its shards, while the build merges them
INDEX_FILES = (*LEGACY_FILES, *PASSAGE_FILES)  # what every index of versions 1 and 2 holds
ALL_FILES = (
    *INDEX_FILES,
    *EMBEDDER_FILES,
    *IVF_FILES,
    *REFINE_FILES,
)  # every fixed name cleanup may remove (and the patterns)
INDEX_FOLDER = FolderFormat(
    name=FORMAT_NAME,
    version=FORMAT_VERSION,
    label="index",
    data_files=frozenset(ALL_FILES),
    data_patterns=(PARTITION_PATTERN, STREAM_SHARD_PATTERN, IVF_SHARD_PATTERN),
    readable=READABLE_VERSIONS,
    flat_versions=(1,),
    renew="rebuild it with `refdecode index build --force`",
)
_FORCE_ADVICE = "--force only replaces an index, never anything else: remove it yourself or choose another --out"

# An index folder that cannot be used: missing, corrupt, truncated, another version or another tokenizer. The name
# corpus callers have always caught; it is the error of every checked folder.
IndexFormatError = FolderFormatError


def read_manifest(folder: Path) -> dict:
    """Parse and check an index's `manifest.json` (format, version, generation, file entries); the other fields are
    index.py's to check."""
    return checked_folder.read_manifest(folder, INDEX_FOLDER)


def data_dir(folder: Path, manifest: dict) -> Path:
    """The folder holding the manifest's data files: its generation subfolder (version 2) or the index itself."""
    return checked_folder.data_dir(folder, INDEX_FOLDER, manifest)


def verify_files(folder: Path, manifest: dict, required: Collection[str], *, checksums: bool = True) -> Path:
    """Exactly the files `required`, each of its recorded size and SHA-256 (see checked_folder.verify_files)."""
    return checked_folder.verify_files(folder, INDEX_FOLDER, manifest, required, checksums=checksums)


def index_files(span_fields: dict | None, *, hashed: bool, passage_extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The files an index holds, decided by this code from its span fields (None: versions 1 and 2, one suffix-order
    file; see spans.span_files), its embedder (hashed: plus its weights) and its passage index's files beside
    passages.faiss (`passage_extra`, from passage_index.passage_extra_files), never by the manifest's file list."""
    unknown = set(passage_extra) - {*IVF_FILES, *REFINE_FILES}
    if unknown:
        raise ValueError(f"not a passage index file: {sorted(unknown)}")
    return (*span_files(span_fields), *PASSAGE_FILES, *(EMBEDDER_FILES if hashed else ()), *passage_extra)


def check_tokenizer(folder: Path, manifest: dict, tokenizer) -> None:
    """Refuse an index whose token ids come from another tokenizer than `tokenizer`."""
    have = tokenizer_fingerprint(tokenizer)
    if manifest.get("tokenizer_fingerprint") != have:
        raise IndexFormatError(
            f"index {folder} was built for another tokenizer (model {manifest.get('model_name')!r}, fingerprint "
            f"{manifest.get('tokenizer_fingerprint')}); this tokenizer's fingerprint is {have}. "
            f"Rebuild the index with this model's tokenizer"
        )


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_target(out: Path, *, force: bool, protect: Sequence[str | Path] = ()) -> bool:
    """Refuse an output that may not be written: one that is, contains or lies inside a path of `protect` (the
    sources), an existing path without `force`, and with `force` anything but a folder holding an index
    manifest. -> whether `out` exists (an index to replace)."""
    out = Path(out)
    where = out.resolve()
    for src in protect:
        if _overlaps(where, Path(src).resolve()):
            raise IndexFormatError(
                f"--out {out} overlaps the source {src}: an index is never written into, over "
                f"or around its own sources; choose another --out"
            )
    if os.path.lexists(out) and not force:
        raise IndexFormatError(f"{out} already exists; pass --force (force=True) to replace it")
    # a link to an index folder has always been replaced through the link
    return checked_folder.claim(out, INDEX_FOLDER, advice=_FORCE_ADVICE, through_link=True)


@contextlib.contextmanager
def new_generation(out: Path, *, force: bool, protect: Sequence[str | Path] = ()) -> Iterator[Generation]:
    """Yield a fresh generation to write an index into; it becomes `out`'s index when the caller commits it
    (`gen.commit(fields, files)`). An existing index at `out` (only with `force`) stays loadable at every instant;
    on any error `out` is as before (see checked_folder.new_generation). `protect`: the sources."""
    replacing = check_target(out, force=force, protect=protect)
    with checked_folder.new_generation(out, INDEX_FOLDER, replacing=replacing) as gen:
        yield gen
