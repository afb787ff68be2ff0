"""Corpus indexes: a corpus as a first-class reference source, built once into `indexes/NAME/`, loaded
memory-mapped, queried every decoding step (passage retrieval and token-level span continuations).

Modules: format (the index's format name, versions and files, on refdecode.checked_folder), chunking (sources ->
documents -> passages), dedup (MinHash-LSH near-duplicates), embedding (passage/query vectors), spans (the token
span index and its partitioned files: write_span_index), passage_index (flat or IVF-PQ faiss index:
write_passage_index), npyfile (checked .npy reads, appending writes), index (CorpusIndex, build_index), cli
(`refdecode index build|info|search`), extra (faiss and datasketch, the `corpus` extra: imported only when an index
is built, loaded or searched).
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
