"""Reading corpus sources into documents, tokenizing them, and cutting them into passages.

Sources are directories (walked recursively), text / Markdown / reST files, JSONL files (one document per line, the
text under a named field), any of these gzip-compressed (`.gz`), Parquet files (one document per row, the text in a
named string column; read with pyarrow), and glob patterns of any of these (`data/*.jsonl`, `shards/**/*.parquet`).
A document is tokenized whole, once, with the
fast tokenizer's batch encoding; passages are then cut at paragraph breaks (blank lines) into pieces of at most
`chunk_tokens` tokens, so a passage's tokens are exactly the document's tokens over that stretch and its text is
the exact source text.

This module knows files, text and token ids; it knows nothing about dedup, embeddings or the span index.
"""

from __future__ import annotations

import glob
import gzip
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "Document",
    "Chunk",
    "TEXT_SUFFIXES",
    "list_files",
    "read_documents",
    "tokenize_documents",
    "section_starts",
    "chunk_document",
]

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIX = ".parquet"  # never gzipped: Parquet compresses its own pages
_GLOB = re.compile(r"[*?\[]")  # a source naming no existing path but holding one of these is a pattern
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")
_UNDERLINE = re.compile(r"([=\-~^\"'`#*+:.])\1{2,}[ \t]*")
_MD_HEADING = re.compile(r"#{1,6}[ \t]")


@dataclass
class Document:
    source: str  # file path, with ":LINE" for a JSONL record, ":ROW" (from 1) for a Parquet row
    text: str


@dataclass
class Chunk:
    doc: int  # index of its document
    token_start: int  # [token_start, token_end) in the document's tokens
    token_end: int
    char_start: int  # [char_start, char_end) in the document's text
    char_end: int


def _suffixes(path: Path) -> tuple[str, bool]:
    """(the suffix that decides the kind, whether gzip) e.g. 'a.jsonl.gz' -> ('.jsonl', True)"""
    name = path.name.lower()
    gz = name.endswith(".gz")
    return Path(name[:-3] if gz else name).suffix, gz


def _is_source_file(path: Path) -> bool:
    suffix, gz = _suffixes(path)
    return suffix in TEXT_SUFFIXES or suffix in JSONL_SUFFIXES or (suffix == PARQUET_SUFFIX and not gz)


def _files_under(folder: Path) -> list[Path]:
    """The source files below a folder, recursively, sorted; hidden entries (below it) skipped."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and _is_source_file(p) and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _files_matching(pattern: str) -> list[Path]:
    """The source files a glob pattern names (`**` recurses), sorted; a folder it matches is walked. A pattern
    that names no source file is an error, as a missing path is."""
    found: list[Path] = []
    for name in sorted(glob.glob(pattern, recursive=True)):
        path = Path(name)
        if path.is_dir():
            found.extend(_files_under(path))
        elif path.is_file() and _is_source_file(path):
            found.append(path)
    if not found:
        raise FileNotFoundError(f"source pattern {pattern} matches no text, markdown, reST, JSONL or Parquet file")
    return found


def list_files(sources: Sequence[str | Path]) -> list[Path]:
    """Expand directories (recursively, sorted, hidden entries skipped) and glob patterns (sorted) into the source
    files they hold. A path that does not exist, and a pattern that matches no source file, are errors."""
    files: list[Path] = []
    for src in sources:
        path = Path(src)
        if path.is_dir():
            files.extend(_files_under(path))
        elif path.is_file():
            files.append(path)
        elif _GLOB.search(str(src)):
            files.extend(_files_matching(str(src)))
        else:
            raise FileNotFoundError(f"source {src} does not exist")
    return files


def _read_text(path: Path, gz: bool) -> str:
    try:
        raw = gzip.open(path, "rb").read() if gz else path.read_bytes()
    except (OSError, EOFError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}); convert it or leave it out") from None


def _check_unicode(text: str, what: str) -> None:
    """JSON may escape a lone surrogate ("\\ud800"): a str that no tokenizer can take. Refuse it by name."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"{what} holds a lone surrogate (U+{ord(text[e.start]):04X} at character {e.start}), not valid Unicode text"
        ) from None


def _read_parquet(path: Path, field: str) -> Iterator[Document]:
    """One Document per row of a Parquet file's string column `field`, read batch by batch; nulls and blank values
    are skipped (rows still count). pyarrow is imported here, as only a Parquet source needs it."""
    from .extra import require

    pq = require("pyarrow.parquet")
    try:
        reader = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ... for a file that is not Parquet
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a readable Parquet file ({first})") from None
    schema = reader.schema_arrow
    if field not in schema.names:
        raise ValueError(f"{path}: no column {field!r} (choose it with --field)")
    kind = schema.field(field).type
    if str(kind) not in ("string", "large_string", "string_view"):
        raise ValueError(f"{path}: column {field!r} holds {kind}, not strings")
    row = 0
    for batch in reader.iter_batches(columns=[field]):
        try:
            values = batch.column(0).to_pylist()
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: column {field!r} is not UTF-8 text (byte {e.start} of a value)") from None
        for value in values:
            row += 1
            if value is not None and value.strip():
                _check_unicode(value, f"{path}:{row}: column {field!r}")
                yield Document(f"{path}:{row}", value)


def read_documents(files: Sequence[Path], *, field: str = "text") -> Iterator[Document]:
    """One Document per text file, one per JSONL line and per Parquet row (its `field`); empty documents are
    skipped."""
    for path in files:
        suffix, gz = _suffixes(path)
        if suffix == PARQUET_SUFFIX and not gz:
            yield from _read_parquet(path, field)
            continue
        text = _read_text(path, gz)
        if suffix not in JSONL_SUFFIXES:
            if text.strip():
                yield Document(str(path), text)
            continue
        # JSONL records end at \n only: str.splitlines would also cut inside a string holding U+2028 or U+0085,
        # which JSON writers leave unescaped (ensure_ascii=False)
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or field not in record:
                raise ValueError(f"{path}:{lineno}: no field {field!r} (choose it with --field)")
            value = record[field]
            if not isinstance(value, str):
                raise ValueError(f"{path}:{lineno}: field {field!r} is not a string")
            _check_unicode(value, f"{path}:{lineno}: field {field!r}")
            if value.strip():
                yield Document(f"{path}:{lineno}", value)


def tokenize_documents(tokenizer, texts: list[str]) -> list[tuple[list[int], np.ndarray]]:
    """Token ids and each token's start character for a batch of texts. -> [(ids (T,), starts (T,) int64)]

    Uses the fast tokenizer's batch call with offsets (parallel in Rust). A tokenizer without offsets falls back
    to tokenizing paragraph by paragraph, with every token starting at its paragraph's start.
    """
    try:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        out = []
        for ids, offsets in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
            starts = np.fromiter((o[0] for o in offsets), dtype=np.int64, count=len(offsets))
            out.append((list(ids), np.maximum.accumulate(starts) if starts.size else starts))
        return out
    except (TypeError, NotImplementedError, KeyError, ValueError):
        return [_tokenize_by_paragraph(tokenizer, text) for text in texts]


def _tokenize_by_paragraph(tokenizer, text: str) -> tuple[list[int], np.ndarray]:
    bounds = [0] + [m.end() for m in _PARAGRAPH_BREAK.finditer(text)] + [len(text)]
    ids: list[int] = []
    starts: list[int] = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if b > a:
            piece = tokenizer.encode(text[a:b], add_special_tokens=False)
            ids.extend(piece)
            starts.extend([a] * len(piece))
    return ids, np.asarray(starts, dtype=np.int64)


def section_starts(text: str) -> np.ndarray:
    """Character positions where a reST or Markdown section begins (its title or over/underline). -> (S,) int64

    reST: a text line followed by an underline of one repeated punctuation character, or an underline/overline
    after a blank line. Markdown: a line starting with 1-6 '#' and a space.
    """
    lines = text.split("\n")
    starts = np.cumsum([0] + [len(line) + 1 for line in lines[:-1]])
    under = [bool(_UNDERLINE.fullmatch(line)) for line in lines]
    found = []
    for i, line in enumerate(lines):
        if _MD_HEADING.match(line):
            found.append(starts[i])
        elif under[i] and (i == 0 or not lines[i - 1].strip()):
            found.append(starts[i])
        elif (
            line.strip()
            and not under[i]
            and i + 1 < len(lines)
            and under[i + 1]
            and len(lines[i + 1].rstrip()) >= len(line.rstrip()) - 1
        ):
            found.append(starts[i])
    return np.asarray(found, dtype=np.int64)


def chunk_document(doc: int, text: str, starts: np.ndarray, chunk_tokens: int) -> list[Chunk]:
    """Cut one tokenized document into passages of <= chunk_tokens tokens.

    A passage ends at the first section start within budget (so one passage does not straddle two sections),
    else at the last paragraph break within budget, else after exactly chunk_tokens tokens.
    starts: (T,) start character of each token, non-decreasing.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    n = starts.size
    if n == 0:
        return []
    # token indices where a paragraph begins: the allowed cut points
    para = np.fromiter((m.end() for m in _PARAGRAPH_BREAK.finditer(text)), dtype=np.int64)
    cuts = np.unique(np.concatenate([np.searchsorted(starts, para, side="left"), [n]]))
    cuts = cuts[(cuts > 0) & (cuts <= n)]
    sections = np.unique(np.searchsorted(starts, section_starts(text), side="left"))
    sections = sections[(sections > 0) & (sections < n)]
    chunks = []
    a = 0
    while a < n:
        s = np.searchsorted(sections, a, side="right")
        j = np.searchsorted(cuts, a + chunk_tokens, side="right") - 1
        if s < sections.size and sections[s] <= a + chunk_tokens:
            b = int(sections[s])  # the next section starts within budget
        elif j >= 0 and cuts[j] > a:
            b = int(cuts[j])  # the furthest paragraph break within budget
        else:
            b = min(a + chunk_tokens, n)  # a paragraph longer than the budget
        char_end = int(starts[b]) if b < n else len(text)
        chunks.append(Chunk(doc, a, b, 0 if a == 0 else int(starts[a]), char_end))
        a = b
    return chunks
