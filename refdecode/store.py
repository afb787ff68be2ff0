"""ReferenceStore: the documents a caller offers as references, tokenized and indexed for suffix matching.

Knows: tokenizing texts with the target model's tokenizer (in bounded blocks, so a large text is never tokenized
in one piece), reading reference files as a stream, remembering where each document came from, the store's size
limit, and keeping a DocumentIndex (suffix array, ~10 bytes per token) over all of them. Does not know: the prompt
or the output of a generation call (those are indexed per call by the drafter), models, or draft policies.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .matching import DocumentIndex, Match, as_token_ids

__all__ = ["ReferenceStore", "Document", "MAX_STORE_TOKENS", "MAX_STORE_BYTES"]

MAX_STORE_TOKENS = 16_000_000  # default limit: ~150 MB held (9 B/token), ~1.1 GB while the suffix array is built
_BYTES_PER_TOKEN_BOUND = 4  # a reference file larger than 4 bytes per allowed token is refused before reading it
MAX_STORE_BYTES = MAX_STORE_TOKENS * _BYTES_PER_TOKEN_BOUND  # what a default store takes in files, all together
_BLOCK_CHARS = 1 << 20  # text is tokenized in blocks of about this many characters
_READ_BYTES = 1 << 20  # files are read in blocks of this many bytes


@dataclass(frozen=True)
class Document:
    source: str
    num_tokens: int


class ReferenceStore:
    """Reference documents for drafting.

    >>> store = ReferenceStore(tokenizer)
    >>> store.add("reference text", source="doc-1")
    >>> store.add_file("notes.md")

    A reference is never fed to the model, only copied from, so documents of any length are accepted up to the
    store's `max_tokens` in all (references live in memory, ~10 bytes per token); a larger corpus belongs in a
    corpus index (`refdecode index build`, then `generate(index=...)`). The store answers the drafter's two
    questions (`longest_suffix`, `continuation`: matching.SuffixSource) and is never copied per call.
    """

    def __init__(self, tokenizer, *, max_ngram: int = 12, max_tokens: int = MAX_STORE_TOKENS):
        if tokenizer is None:
            raise ValueError("ReferenceStore needs the target model's tokenizer")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.kind = "store"  # how drafts from it are named for the tree policy (retrieved passages: "retrieved")
        self.index = DocumentIndex(len(tokenizer), max_ngram=max_ngram)
        self.documents: list[Document] = []

    def __len__(self) -> int:
        return len(self.documents)

    @property
    def num_tokens(self) -> int:
        return len(self.index)

    def add(self, text_or_ids: str | Sequence[int], *, source: str | None = None) -> int:
        """Add one document (text, or token ids of this tokenizer: a list, numpy array or LongTensor); returns its
        id. Empty documents, non-integer ids and ids outside the vocabulary are refused with ValueError."""
        name = source or f"doc-{len(self.documents)}"
        if isinstance(text_or_ids, str):
            if not text_or_ids.strip():
                raise ValueError(f"reference '{name}' is empty")
            self._check_size(name, len(text_or_ids), "characters")
            token_ids = self._encode_blocks(name, _text_blocks(text_or_ids))
        else:
            token_ids = as_token_ids(text_or_ids, len(self.tokenizer), what=f"reference '{name}'")
            if not token_ids.size:
                raise ValueError(f"reference '{name}' has no tokens")
            self._check_room(name, token_ids.size)
        return self._add_ids(token_ids, name)

    def add_file(self, path: str | Path, *, source: str | None = None) -> int:
        """Add a UTF-8 text file, read and tokenized in blocks; ValueError with the file name if it is missing, not
        UTF-8, empty, or larger than the store takes (checked before reading it)."""
        name = source or str(path)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise ValueError(f"reference file not found: {path}") from None
        except OSError as err:
            raise ValueError(f"cannot read reference file: {path} ({err.strerror})") from None
        self._check_size(str(path), size, "bytes")
        token_ids = self._encode_blocks(name, _file_blocks(path))
        if not token_ids.size:
            raise ValueError(f"reference '{name}' is empty")
        return self._add_ids(token_ids, name)

    def copy(self) -> ReferenceStore:
        """A new store with the same documents (arrays are shared; adding to the copy leaves this one alone).
        Not needed to add per-call references: the drafter takes several stores."""
        twin = ReferenceStore(self.tokenizer, max_ngram=self.index.max_ngram, max_tokens=self.max_tokens)
        twin.index = self.index.copy()
        twin.documents = list(self.documents)
        twin.kind = self.kind
        return twin

    def source_of(self, doc_id: int) -> str:
        return self.documents[doc_id].source

    def tokens(self, doc_id: int) -> list[int]:
        """The token ids of document `doc_id`."""
        return self.index.tokens(doc_id)

    # -- what the drafter asks (matching.SuffixSource) ------------------------------------------------------------
    @property
    def max_ngram(self) -> int:
        """The longest context suffix a lookup matches, in tokens."""
        return self.index.max_ngram

    def longest_suffix(self, context: Sequence[int]) -> Match:
        """Longest suffix (<= max_ngram tokens) of `context` occurring in a document with a following token;
        positions (document id, end offset), the most recent first."""
        return self.index.longest_suffix(context)

    def continuation(self, position: tuple[int, int], max_tokens: int) -> list[int]:
        return self.index.continuation(position, max_tokens)

    # -- internals ------------------------------------------------------------------------------------------------
    def _add_ids(self, token_ids: np.ndarray, name: str) -> int:
        doc_id = self.index.add(token_ids)
        self.documents.append(Document(name, int(token_ids.size)))
        return doc_id

    def _limit_hint(self) -> str:
        return (
            f"a ReferenceStore holds at most {self.max_tokens:,} tokens (references live in memory); index a "
            f"larger corpus with `refdecode index build SRC --out DIR` and generate with index=DIR"
        )

    def _check_size(self, name: str, size: int, unit: str) -> None:
        """Refuse a text or file before tokenizing it if it cannot fit (more than 4 bytes per allowed token)."""
        limit = (self.max_tokens - self.num_tokens) * _BYTES_PER_TOKEN_BOUND
        if size > limit:
            raise ValueError(
                f"reference '{name}' is too large ({size:,} {unit}; at most {limit:,} fit): " + self._limit_hint()
            )

    def _check_room(self, name: str, num_tokens: int) -> None:
        if self.num_tokens + num_tokens > self.max_tokens:
            raise ValueError(
                f"reference '{name}' does not fit ({self.num_tokens + num_tokens:,} tokens in all): "
                + self._limit_hint()
            )

    def _encode_blocks(self, name: str, blocks: Iterator[str]) -> np.ndarray:
        """Tokenize text blocks one at a time into one id array, refusing as soon as the store's limit is passed.
        -> (T,) int64. Blocks end at line breaks, so the ids equal the whole text's wherever the tokenizer does not
        merge across a line break (a reference only needs to be copyable, not tokenized identically)."""
        parts: list[np.ndarray] = []
        total = 0
        for block in blocks:
            ids = np.asarray(self.tokenizer.encode(block, add_special_tokens=False), dtype=np.int64)
            total += ids.size
            self._check_room(name, total)
            parts.append(ids.astype(np.uint32))  # half the memory while the blocks pile up
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def _text_blocks(text: str) -> Iterator[str]:
    """`text` in consecutive blocks of at most _BLOCK_CHARS characters, each ending after a line break where one is
    in the block's second half."""
    size, start = _BLOCK_CHARS, 0
    while start < len(text):
        stop = min(start + size, len(text))
        if stop < len(text):
            cut = text.rfind("\n", start + size // 2, stop)
            stop = cut + 1 if cut >= 0 else stop
        yield text[start:stop]
        start = stop


def _file_blocks(path: str | Path) -> Iterator[str]:
    """The UTF-8 text of a file in blocks (see _text_blocks), read _READ_BYTES at a time; ValueError naming the file
    and the offset of the first invalid byte if it is not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    carry, offset = "", 0
    try:
        with open(path, "rb") as f:
            while True:
                raw = f.read(_READ_BYTES)
                try:
                    text = carry + decoder.decode(raw, final=not raw)
                except UnicodeDecodeError as err:
                    bad = offset - len(decoder.getstate()[0]) + err.start
                    raise ValueError(
                        f"reference file is not UTF-8 text: {path} (invalid byte at offset {bad})"
                    ) from None
                offset += len(raw)
                if not raw:
                    if text:
                        yield text
                    return
                cut = text.rfind("\n") + 1
                if cut == 0 and len(text) < _BLOCK_CHARS:
                    carry = text  # no line break yet: keep reading (a block is cut anyway at _BLOCK_CHARS)
                    continue
                cut = cut or len(text)
                yield text[:cut]
                carry = text[cut:]
    except IsADirectoryError:
        raise ValueError(f"reference is a directory, not a file: {path}") from None
    except PermissionError:
        raise ValueError(f"cannot read reference file: {path} (permission denied)") from None
