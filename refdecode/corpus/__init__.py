"""Corpus indexes: a corpus as a first-class reference source, built once into `indexes/NAME/`, loaded
memory-mapped, queried every decoding step (passage retrieval and token-level span continuations).

Modules: format (manifest, checksums, versions, atomic build folders), chunking (sources -> documents ->
passages), dedup (MinHash-LSH near-duplicates), embedding (passage/query vectors), spans (the token span index),
index (CorpusIndex, build_index), cli (`refdecode index build|info|search`).
"""

from .format import FORMAT_VERSION, IndexFormatError, tokenizer_fingerprint
from .index import CorpusIndex, Passage, build_index
from .spans import SpanIndex

__all__ = [
    "CorpusIndex",
    "Passage",
    "build_index",
    "tokenizer_fingerprint",
    "IndexFormatError",
    "SpanIndex",
    "FORMAT_VERSION",
]
