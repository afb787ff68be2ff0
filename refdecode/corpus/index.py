"""CorpusIndex: build a corpus into `indexes/NAME/` once, load it memory-mapped, query it every decoding step.

An index holds, for a corpus tokenized with one tokenizer:
- passages (chunks of <= chunk_tokens tokens, near-duplicates removed): their exact text (a UTF-8 blob with
  offsets), their token range in the span stream, their source file;
- a faiss inner-product index over passage embeddings, for `retrieve(query, k)`;
- the span index over all kept passages' tokens, for `span_continuations(context_tail, ...)`.

Files (all listed with size and SHA-256 in manifest.json; see format.py):
    span_stream.npy span_sa.npy span_samples.npy   spans.py
    passage_text.bin (UTF-8) passage_text_offsets.npy (P+1,) uint64
    passage_tokens.npy (P, 2) int64: [start, end) in span_stream     passage_source.npy (P,) int32
    sources.json (list of source names)    passages.faiss    [embed_idf.npy for the hashed embedder]

This module ties the others together; it knows no decoding and no model beyond its tokenizer.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np

from .chunking import Chunk, chunk_document, list_files, read_documents, tokenize_documents
from .dedup import find_near_duplicates
from .embedding import EMBEDDERS, HashedNgramEmbedder, default_embedder, make_embedder
from .format import (IndexFormatError, check_tokenizer, read_manifest, staging_dir, tokenizer_fingerprint,
                     verify_files, write_manifest)
from .spans import SpanIndex

__all__ = ["Passage", "CorpusIndex", "build_index"]

_TOKENIZE_BATCH = 64            # documents per tokenizer call (the Rust side runs a batch in parallel)


@dataclass
class Passage:
    id: int
    text: str
    token_ids: list[int]
    score: float
    source: str


def _progress(enabled: bool, **kw):
    from tqdm.auto import tqdm
    return tqdm(disable=not enabled, dynamic_ncols=True, **kw)


def _vocab_size(tokenizer) -> int:
    vocab = tokenizer.get_vocab()
    return max(len(tokenizer), max(vocab.values()) + 1) if hasattr(tokenizer, "__len__") else max(vocab.values()) + 1


def _validate(chunk_tokens: int, dedup_threshold: float, embedder: str) -> None:
    if chunk_tokens < 8:
        raise ValueError(f"chunk_tokens must be >= 8, got {chunk_tokens}")
    if not 0.0 < dedup_threshold <= 1.0:
        raise ValueError(f"dedup_threshold must be in (0, 1], got {dedup_threshold}")
    if embedder not in EMBEDDERS:
        raise ValueError(f"embedder must be one of {EMBEDDERS}, got {embedder!r}")


def _tokenize_and_chunk(files, tokenizer, field, chunk_tokens, progress):
    """-> documents' texts, their token arrays, their source names, and the chunks over them."""
    texts, sources, token_arrays, chunks = [], [], [], []
    bar = _progress(progress, desc="tokenize", unit="tok", unit_scale=True)
    batch: list = []

    def flush():
        for doc, (ids, starts) in zip(batch, tokenize_documents(tokenizer, [d.text for d in batch])):
            d = len(texts)
            texts.append(doc.text)
            sources.append(doc.source)
            token_arrays.append(np.asarray(ids, dtype=np.int64))
            chunks.extend(chunk_document(d, doc.text, starts, chunk_tokens))
            bar.update(len(ids))
        batch.clear()

    for doc in read_documents(files, field=field):
        batch.append(doc)
        if len(batch) >= _TOKENIZE_BATCH:
            flush()
    flush()
    bar.close()
    return texts, token_arrays, sources, chunks


def _segments(chunks: list[Chunk], keep: np.ndarray) -> list[list[int]]:
    """Group kept chunks into runs that are contiguous in one document: each run is one span-index document."""
    runs: list[list[int]] = []
    prev = None
    for i in np.flatnonzero(keep).tolist():
        c = chunks[i]
        if prev is not None and prev.doc == c.doc and prev.token_end == c.token_start:
            runs[-1].append(i)
        else:
            runs.append([i])
        prev = c
    return runs


def build_index(sources: list[str | Path], out: Path, *, tokenizer, model_name: str, field: str = "text",
                chunk_tokens: int = 256, dedup_threshold: float = 0.9, force: bool = False, progress: bool = True,
                embedder: str | None = None) -> Path:
    """Build a corpus index from files/folders into `out` (atomically). Returns `out`. -> Path

    embedder: "minilm" (default when its package is installed), "mpnet" (better retrieval, ~7x the embedding
    time), "minilm+mpnet" (both, scores summed) or "hashed"; see embedding.py.
    """
    out = Path(out)
    embedder = embedder or default_embedder()
    _validate(chunk_tokens, dedup_threshold, embedder)
    if not sources:
        raise ValueError("no sources given")
    files = list_files(sources)
    if not files:
        raise ValueError(f"no text, markdown, reST or JSONL files found in {', '.join(map(str, sources))}")
    with staging_dir(out, force=force) as tmp:
        t0 = time.perf_counter()
        # 1) read, tokenize, chunk
        texts, token_arrays, doc_sources, chunks = _tokenize_and_chunk(files, tokenizer, field, chunk_tokens,
                                                                       progress)
        if not chunks:
            raise ValueError("the corpus is empty: no document has any text")
        passage_ids = [token_arrays[c.doc][c.token_start:c.token_end] for c in chunks]
        t_tok = time.perf_counter()
        # 2) near-duplicate passages out
        dropped = find_near_duplicates(passage_ids, threshold=dedup_threshold)
        keep = np.ones(len(chunks), dtype=bool)
        keep[dropped] = False
        t_dedup = time.perf_counter()
        # 3) span index over the kept passages, contiguous runs kept contiguous
        runs = _segments(chunks, keep)
        run_tokens = [np.concatenate([passage_ids[i] for i in run]) for run in runs]
        spans = SpanIndex.build(run_tokens, _vocab_size(tokenizer))
        files_written = spans.save(tmp)
        t_span = time.perf_counter()
        # 4) passage store: token ranges in the stream, exact texts, sources
        kept = np.flatnonzero(keep)
        ranges = np.zeros((kept.size, 2), dtype=np.int64)
        pos, row = 1, 0                                    # stream: 0 sep, run, 0 sep, run, ..., 0 sep
        for run in runs:
            for i in run:
                n = passage_ids[i].size
                ranges[row] = (pos, pos + n)
                pos, row = pos + n, row + 1
            pos += 1
        passage_texts = [texts[chunks[i].doc][chunks[i].char_start:chunks[i].char_end] for i in kept.tolist()]
        files_written += _save_passages(tmp, passage_texts, ranges, [chunks[i].doc for i in kept.tolist()],
                                        doc_sources)
        # 5) passage embeddings into faiss
        emb = HashedNgramEmbedder().fit(passage_texts) if embedder == "hashed" else make_embedder({"name": embedder})
        bar = _progress(progress, desc="embed", unit="passage", total=len(passage_texts) * emb.passes)
        vectors = emb.embed(passage_texts, progress=bar)                  # (P, dim)
        bar.close()
        faiss_index = faiss.IndexFlatIP(emb.dim)
        faiss_index.add(vectors)
        faiss.write_index(faiss_index, str(tmp / "passages.faiss"))
        files_written += ["passages.faiss"] + emb.save(tmp)
        t_end = time.perf_counter()
        # 6) manifest last: a folder without one is never a usable index
        n_tokens = int(sum(a.size for a in token_arrays))
        write_manifest(tmp, {
            "model_name": model_name,
            "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
            "counts": {"files": len(files), "documents": len(texts), "tokens": n_tokens,
                       "passages": int(kept.size), "duplicates_removed": int(dropped.size),
                       "span_tokens": spans.num_tokens, "span_bytes": spans.nbytes()},
            "build_options": {"field": field, "chunk_tokens": chunk_tokens, "dedup_threshold": dedup_threshold,
                              "embedder": embedder},
            "embedder": emb.config(),
            "build_seconds": {"tokenize_chunk": round(t_tok - t0, 3), "dedup": round(t_dedup - t_tok, 3),
                              "span_index": round(t_span - t_dedup, 3), "embed": round(t_end - t_span, 3)},
            "sources": [str(Path(s)) for s in sources],
        }, files_written)
    return out


def _save_passages(folder: Path, texts: list[str], ranges: np.ndarray, docs: list[int],
                   doc_sources: list[str]) -> list[str]:
    blobs = [t.encode("utf-8") for t in texts]
    offsets = np.zeros(len(blobs) + 1, dtype=np.uint64)
    np.cumsum([len(b) for b in blobs], out=offsets[1:])
    (folder / "passage_text.bin").write_bytes(b"".join(blobs))
    np.save(folder / "passage_text_offsets.npy", offsets, allow_pickle=False)
    np.save(folder / "passage_tokens.npy", ranges, allow_pickle=False)
    np.save(folder / "passage_source.npy", np.asarray(docs, dtype=np.int32), allow_pickle=False)
    (folder / "sources.json").write_text(json.dumps(doc_sources, ensure_ascii=False), encoding="utf-8")
    return ["passage_text.bin", "passage_text_offsets.npy", "passage_tokens.npy", "passage_source.npy",
            "sources.json"]


class CorpusIndex:
    """A loaded corpus index: `retrieve` passages for a query, `span_continuations` for a context's tail."""

    def __init__(self, path: Path, manifest: dict, spans: SpanIndex, faiss_index, text: np.ndarray,
                 text_offsets: np.ndarray, token_ranges: np.ndarray, passage_source: np.ndarray,
                 sources: list[str]):
        self.path, self.manifest, self.spans = path, manifest, spans
        self._faiss, self._text, self._text_offsets = faiss_index, text, text_offsets
        self._token_ranges, self._passage_source, self._sources = token_ranges, passage_source, sources
        self._embedder = None
        if faiss_index.ntotal != token_ranges.shape[0] or text_offsets.size != token_ranges.shape[0] + 1:
            raise IndexFormatError(f"index {path}: passage files disagree on the number of passages")

    @classmethod
    def load(cls, path, *, tokenizer=None, checksums: bool = True) -> "CorpusIndex":
        """Open an index: manifest first, every file checked (size and SHA-256) before it is opened, then arrays
        memory-mapped. With `tokenizer`, its fingerprint must match the one the index was built with.
        checksums=False checks sizes only (for very large indexes, when the files are trusted)."""
        path = Path(path)
        manifest = read_manifest(path)
        if tokenizer is not None:
            check_tokenizer(path, manifest, tokenizer)
        verify_files(path, manifest, checksums=checksums)
        try:
            spans = SpanIndex.load(path)
            arrays = {name: np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False)
                      for name in ("passage_text_offsets", "passage_tokens", "passage_source")}
            text = np.memmap(path / "passage_text.bin", dtype=np.uint8, mode="r") \
                if (path / "passage_text.bin").stat().st_size else np.zeros(0, np.uint8)
            sources = json.loads((path / "sources.json").read_text(encoding="utf-8"))
            faiss_index = faiss.read_index(str(path / "passages.faiss"), faiss.IO_FLAG_READ_ONLY)
        except (OSError, ValueError, RuntimeError) as e:       # files passed the manifest but do not parse
            raise IndexFormatError(f"index {path}: a file does not parse ({e})") from None
        index = cls(path, manifest, spans, faiss_index, text, arrays["passage_text_offsets"],
                    arrays["passage_tokens"], arrays["passage_source"], sources)
        return index

    def __len__(self) -> int:
        return int(self._token_ranges.shape[0])

    def passage(self, i: int, score: float = 0.0) -> Passage:
        a, b = int(self._text_offsets[i]), int(self._text_offsets[i + 1])
        s, e = (int(v) for v in self._token_ranges[i])
        ids = (np.asarray(self.spans.stream[s:e], dtype=np.int64) - 1).tolist()
        return Passage(int(i), bytes(self._text[a:b]).decode("utf-8"), ids, float(score),
                       self._sources[int(self._passage_source[i])])

    def embed_queries(self, queries: Sequence[str]) -> np.ndarray:
        """(Q,) texts -> (Q, dim) with the embedder the index was built with (loaded on first use)."""
        if self._embedder is None:
            self._embedder = make_embedder(self.manifest["embedder"], self.path)
        return self._embedder.embed(list(queries))

    def retrieve(self, query: str, k: int = 4, *, reranker=None, candidates: int = 20) -> list[Passage]:
        """The k passages nearest to `query` by embedding inner product, best first.

        With a `reranker` (e.g. rerank.LMReranker over the target model), the embedding search proposes
        max(k, candidates) passages and the reranker orders them; each Passage keeps its embedding score."""
        if k < 1 or candidates < 1:
            raise ValueError(f"k and candidates must be >= 1, got {k} and {candidates}")
        n = min(max(k, candidates) if reranker is not None else k, len(self))
        scores, ids = self._faiss.search(self.embed_queries([query]), n)                   # (1, n)
        found = [self.passage(int(i), float(s)) for s, i in zip(scores[0], ids[0]) if i >= 0]    # best first
        if reranker is not None:
            by_id = {p.id: p for p in found}
            found = [by_id[i] for i in reranker.rerank(query, list(by_id), [p.text for p in found])]
        return found[:k]

    def span_continuations(self, context_tail: Sequence[int], max_tokens: int, *, max_candidates: int = 8,
                           min_match: int = 2) -> tuple[int, list[list[int]]]:
        """Longest suffix of context_tail (<= 16 tokens) found in the corpus, and up to max_candidates
        continuations (<= max_tokens ids each, most frequent first, never crossing a document end).
        -> (match_len, continuations); (0, []) if the match is shorter than min_match."""
        return self.spans.continuations(context_tail, max_tokens, max_candidates=max_candidates,
                                        min_match=min_match)

    def info(self) -> dict:
        m = self.manifest
        return {"path": str(self.path), "version": m["version"], "model_name": m["model_name"],
                "tokenizer_fingerprint": m["tokenizer_fingerprint"], **m["counts"],
                "build_options": m["build_options"], "embedder": m["embedder"],
                "bytes_on_disk": sum(f["bytes"] for f in m["files"].values())}
