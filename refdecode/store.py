"""ReferenceStore: the documents a caller offers as references, tokenized and indexed for suffix matching.

Knows: tokenizing texts with the target model's tokenizer, remembering where each document came from, and keeping
a SuffixIndex over all of them. Does not know: the prompt or the output of a generation call (those are indexed per
call by the drafter), models, or draft policies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .files import read_text
from .matching import SuffixIndex

__all__ = ["ReferenceStore", "Document"]


@dataclass(frozen=True)
class Document:
    source: str
    num_tokens: int


class ReferenceStore:
    """Reference documents for drafting.

    >>> store = ReferenceStore(tokenizer)
    >>> store.add("reference text", source="doc-1")
    >>> store.add_file("notes.md")

    Documents of any length are accepted: a reference is never fed to the model, only copied from.
    """

    def __init__(self, tokenizer, *, max_ngram: int = 12):
        if tokenizer is None:
            raise ValueError("ReferenceStore needs the target model's tokenizer")
        self.tokenizer = tokenizer
        self.index = SuffixIndex(max_ngram=max_ngram)
        self.documents: list[Document] = []

    def __len__(self) -> int:
        return len(self.documents)

    @property
    def num_tokens(self) -> int:
        return sum(doc.num_tokens for doc in self.documents)

    def add(self, text_or_ids: str | Sequence[int], *, source: str | None = None) -> int:
        """Add one document (text, or token ids of this tokenizer); returns its id. Empty documents are refused."""
        if isinstance(text_or_ids, str):
            if not text_or_ids.strip():
                raise ValueError(f"reference '{source or len(self.documents)}' is empty")
            token_ids = self.tokenizer.encode(text_or_ids, add_special_tokens=False)
        else:
            token_ids = [int(t) for t in text_or_ids]
            if not token_ids:
                raise ValueError(f"reference '{source or len(self.documents)}' has no tokens")
            vocab_size = len(self.tokenizer)
            bad = [t for t in token_ids if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(f"token id {bad[0]} is outside this tokenizer's vocabulary (size {vocab_size})")
        doc_id = self.index.add(token_ids)
        self.documents.append(Document(source or f"doc-{doc_id}", len(token_ids)))
        return doc_id

    def add_file(self, path: str | Path, *, source: str | None = None) -> int:
        """Add a UTF-8 text file; ValueError with the file name if it is missing, not UTF-8 or empty."""
        return self.add(read_text(path, "reference"), source=source or str(path))

    def copy(self) -> "ReferenceStore":
        """A new store with the same documents (token ids are shared; adding to the copy leaves this one alone)."""
        twin = ReferenceStore(self.tokenizer, max_ngram=self.index.max_ngram)
        for doc_id, doc in enumerate(self.documents):
            twin.add(self.index.sequences[doc_id], source=doc.source)
        return twin

    def source_of(self, doc_id: int) -> str:
        return self.documents[doc_id].source
