"""CorpusIndex: build a corpus into `indexes/NAME/` once, load it memory-mapped, query it every decoding step.

An index holds, for a corpus tokenized with one tokenizer:
- passages (chunks of <= chunk_tokens tokens, near-duplicates removed): their exact text (a UTF-8 blob with
  offsets), their token range in the span stream, their source file;
- a faiss inner-product index over passage embeddings, for `retrieve(query, k)`: flat, or IVF-PQ above
  `flat_limit` bytes of vectors (passage_index.py);
- the span index over all kept passages' tokens, for `span_continuations(context_tail, ...)` (spans.py).

Files (all listed with size and SHA-256 in manifest.json, inside its generation folder `gen-<id>/`; see format.py
and refdecode/checked_folder.py):
    span_stream.npy (or .NNNNN.npy shards) span_sa.NNNNN.npy... span_samples.npy   spans.py (v1, 2: span_sa.npy)
    passage_text.bin (UTF-8) passage_text_offsets.npy (P+1,) uint64
    passage_tokens.npy (P, 2) int64: [start, end) in span_stream     passage_source.npy (P,) int32
    sources.json (list of source names)    passages.faiss (passage_index.py)
    [embed_idf.npy (dim,) float32, hashed embedder only]

Two engines build the same index: the local one in this process, the Ray one (`engine="ray"`, ray_build.py) as Ray
Data operations. Both write through the same writers, spans.write_span_index (the stream and the suffix order as
sorted blocks) and passage_index.write_passage_index (vectors as blocks), and through one generation, manifest and
commit path here; each writer returns its manifest fields, which the loader hands back to spans.read_span_index
and passage_index.read_passage_index.

Loading trusts nothing it has not checked: the manifest's fields (types, ranges), the set of files (from this
code, not from the manifest), every file's size (and SHA-256), each array's header (dtype, shape, size against the
file) and the cross-file counts, before any array is mapped or faiss reads its file.

This module ties the others together; it knows no decoding and no model beyond its tokenizer. faiss (the corpus
extra) is imported when an index is built or loaded, not when this module is.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .chunking import (
    Chunk,
    chunk_document,
    list_files,
    read_documents,
    tokenize_documents,
)
from .dedup import find_near_duplicates
from .embedding import (
    EMBEDDERS,
    HASHED_DIM,
    Embedder,
    HashedNgramEmbedder,
    MiniLMEmbedder,
    MPNetEmbedder,
    default_embedder,
    make_embedder,
)
from .extra import require
from .format import (
    GenerationGone,
    IndexFormatError,
    check_target,
    check_tokenizer,
    index_files,
    new_generation,
    read_manifest,
    tokenizer_fingerprint,
    verify_files,
)
from .npyfile import open_npy
from .passage_index import (
    COMPRESSED_KINDS,
    FAISS_FILE,
    FLAT_LIMIT_BYTES,
    passage_extra_files,
    passage_fields_problem,
    read_passage_index,
    write_passage_index,
)
from .spans import (
    PARTITION_ENTRIES,
    SpanIndex,
    build_suffix_order,
    encode_stream,
    read_span_index,
    span_fields_problem,
    write_span_index,
)

__all__ = [
    "ENGINES",
    "CorpusIndex",
    "Passage",
    "StageResult",
    "build_index",
    "lay_out_passages",
    "save_passages",
    "vocab_size",
    "write_index_files",
    "write_span_files",
]

_TOKENIZE_BATCH = 64  # documents per tokenizer call (the Rust side runs a batch in parallel)
_LOAD_ATTEMPTS = 8  # a load that loses its generation to a concurrent rebuild re-reads the manifest
_MAX_DIM = 1 << 16  # embedding dimensions above this are not an index this code writes
_COUNTS = ("files", "documents", "tokens", "passages", "duplicates_removed", "span_tokens", "span_bytes")
_ENCODER_DIMS = {"minilm": MiniLMEmbedder.dim, "mpnet": MPNetEmbedder.dim}


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


def vocab_size(tokenizer) -> int:
    """The ids a tokenizer can produce: what the span stream's dtype must hold."""
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
        for doc, (ids, starts) in zip(batch, tokenize_documents(tokenizer, [d.text for d in batch]), strict=True):
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


def _segments(chunks: Sequence[Chunk]) -> list[list[int]]:
    """Group passages (in order) into runs that are contiguous in one document: each run is one span-index
    document. -> lists of indices into `chunks`"""
    runs: list[list[int]] = []
    prev = None
    for i, c in enumerate(chunks):
        if prev is not None and prev.doc == c.doc and prev.token_end == c.token_start:
            runs[-1].append(i)
        else:
            runs.append([i])
        prev = c
    return runs


def lay_out_passages(chunks: Sequence[Chunk], tokens: Sequence[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
    """The kept passages, in order, laid out as the span stream holds them (encode_stream: 0, run, 0, run, ..., 0;
    passages contiguous in one document joined into one run). Both engines call this, so their streams are equal.
    -> (each run's tokens, each passage's [start, end) in the stream (P, 2) int64)"""
    runs = _segments(chunks)
    run_tokens = [np.concatenate([tokens[i] for i in run]) for run in runs]
    ranges = np.zeros((len(chunks), 2), dtype=np.int64)
    pos = 1
    for run in runs:
        for i in run:
            n = int(tokens[i].size)
            ranges[i] = (pos, pos + n)
            pos += n
        pos += 1  # the separator after the run
    return run_tokens, ranges


def write_span_files(
    folder: Path, stream: np.ndarray, span_blocks: Iterable[np.ndarray], *, partition_entries: int = PARTITION_ENTRIES
) -> tuple[list[str], dict[str, int], dict]:
    """The span index (spans.write_span_index) from the stream (N,) and the suffix order as consecutive sorted
    blocks of positions. -> (file names, counts {span_tokens, span_bytes}, manifest fields)"""
    names, fields = write_span_index(folder, stream, span_blocks, partition_entries=partition_entries)
    span_tokens = sum(int(part["entries"]) for part in fields["span_partitions"])
    span_bytes = sum((folder / name).stat().st_size for name in names)
    return names, {"span_tokens": span_tokens, "span_bytes": span_bytes}, fields


def write_index_files(
    folder: Path,
    stream: np.ndarray,
    span_blocks: Iterable[np.ndarray],
    vector_blocks: Iterable[np.ndarray] | Callable[[], Iterable[np.ndarray]],
    *,
    dim: int,
    n_passages: int,
    flat_limit: int = FLAT_LIMIT_BYTES,
    partition_entries: int = PARTITION_ENTRIES,
    compressed: str = COMPRESSED_KINDS[0],
) -> tuple[list[str], dict[str, int], dict]:
    """The span index and the passage index of a build whose stages hand over blocks (the Ray engine; the local
    one calls the same two writers in turn): the suffix order as sorted blocks of positions, the passage vectors
    as (B, dim) float32 blocks in passage order, or a callable returning them afresh (IVF-PQ reads them twice).
    -> (file names, counts {span_tokens, span_bytes}, manifest fields of both writers)"""
    names, counts, fields = write_span_files(folder, stream, span_blocks, partition_entries=partition_entries)
    faiss_names, passage_fields = write_passage_index(
        folder, vector_blocks, dim=dim, n_total=n_passages, flat_limit_bytes=flat_limit, compressed=compressed
    )
    return [*names, *faiss_names], counts, {**fields, **passage_fields}


@dataclass
class StageResult:
    """What one engine's stages wrote into a generation folder, and what the manifest records about it."""

    files: list[str]  # names written into the generation folder
    counts: dict[str, int]  # the manifest's counts (_COUNTS)
    embedder: dict  # the embedder's config
    seconds: dict[str, float]  # wall seconds per stage
    fields: dict  # the writers' manifest fields (span partitions, position dtype, passage index)
    stats: dict | None = None  # the Ray engine's per-stage figures (ray_build.py), the manifest's build_stats


ENGINES = ("local", "ray")


def build_index(
    sources: list[str | Path],
    out: Path,
    *,
    tokenizer,
    model_name: str,
    field: str = "text",
    chunk_tokens: int = 256,
    dedup_threshold: float = 0.9,
    force: bool = False,
    progress: bool = True,
    embedder: str | None = None,
    flat_limit: int = FLAT_LIMIT_BYTES,
    partition_entries: int = PARTITION_ENTRIES,
    engine: str = "local",
    ray_address: str | None = None,
    hashed_dim: int = HASHED_DIM,
    compressed: str = COMPRESSED_KINDS[0],
) -> Path:
    """Build a corpus index from files, folders and glob patterns into `out` (atomically). Returns `out`. -> Path

    embedder: "minilm" (default when its package is installed), "mpnet" (better retrieval, ~7x the embedding
    time), "minilm+mpnet" (both, scores summed) or "hashed"; see embedding.py. flat_limit: the most bytes of
    float32 passage vectors kept as an exact flat index; above it, the `compressed` kind (see passage_index.py):
    "fastscan" (IVF-PQ fast-scan re-ranked against the stored vectors: fast, its codes in memory) or "ivfpq"
    (8-bit IVF-PQ with its lists on disk: least memory, slower).
    partition_entries: suffix-order entries per partition file (see spans.py). hashed_dim: the hashed embedder's
    dimensions (16384 by default; a small one such as 256 makes it a cheap embedder for scale tests of the build,
    not one for retrieval quality).
    engine: "local" (this process) or "ray" (the stages as Ray Data operations, ray_build.py: the same files, on
    this machine's cores or a cluster's). ray_address: the Ray cluster to join ("auto", "HOST:PORT",
    "ray://HOST:PORT"); None uses a Ray this process already started, else starts a local one for the build.
    """
    out = Path(out)
    embedder = embedder or default_embedder()
    _validate(chunk_tokens, dedup_threshold, embedder)
    if flat_limit < 0 or partition_entries < 1:
        raise ValueError(f"flat_limit must be >= 0 and partition_entries >= 1, got {flat_limit}, {partition_entries}")
    if compressed not in COMPRESSED_KINDS:
        raise ValueError(f"compressed must be one of {COMPRESSED_KINDS}, got {compressed!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if not 1 <= hashed_dim <= _MAX_DIM:
        raise ValueError(f"hashed_dim must be in [1, {_MAX_DIM}], got {hashed_dim}")
    if hashed_dim != HASHED_DIM and embedder != "hashed":
        raise ValueError(f"hashed_dim is for embedder='hashed' only, not {embedder!r}")
    if ray_address is not None and engine != "ray":
        raise ValueError("ray_address is only for engine='ray'")
    if not sources:
        raise ValueError("no sources given")
    check_target(out, force=force, protect=sources)  # before reading anything: refuse early, touch nothing
    require("faiss")
    require("datasketch")  # dedup needs it after the tokenizing: missing, it is refused before that
    if engine == "ray":
        require("ray")
    files = list_files(sources)
    if not files:
        raise ValueError(f"no text, markdown, reST, JSONL or Parquet files found in {', '.join(map(str, sources))}")
    options: dict = {"field": field, "chunk_tokens": chunk_tokens, "dedup_threshold": dedup_threshold}
    options["embedder"] = embedder
    layout: dict = {"flat_limit": flat_limit, "partition_entries": partition_entries, "hashed_dim": hashed_dim}
    layout["compressed"] = compressed
    with new_generation(out, force=force, protect=sources) as gen:
        # the stages differ by engine; the generation, the writers, the manifest and the commit are one path
        result: StageResult
        if engine == "ray":
            from .ray_build import run_ray_stages  # ray is imported by a Ray build only

            result = run_ray_stages(
                gen.dir, files, tokenizer=tokenizer, progress=progress, address=ray_address, **options, **layout
            )
        else:
            result = _run_local_stages(gen.dir, files, tokenizer=tokenizer, progress=progress, **options, **layout)
        # manifest last, switched atomically: a generation without one is never a usable index
        gen.commit(
            {
                "model_name": model_name,
                "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                "counts": result.counts,
                "build_options": {**options, "engine": engine},
                "embedder": result.embedder,
                "build_seconds": {k: round(v, 3) for k, v in result.seconds.items()},
                **({"build_stats": result.stats} if result.stats else {}),
                "sources": [str(Path(s)) for s in sources],
                **result.fields,
            },
            result.files,
        )
    return out


def _run_local_stages(
    folder: Path,
    files: list[Path],
    *,
    tokenizer,
    field: str,
    chunk_tokens: int,
    dedup_threshold: float,
    embedder: str,
    progress: bool,
    flat_limit: int,
    partition_entries: int,
    hashed_dim: int,
    compressed: str,
) -> StageResult:
    """The build's stages in this process, writing into `folder`. -> StageResult"""
    t0 = time.perf_counter()
    # 1) read, tokenize, chunk
    texts, token_arrays, doc_sources, chunks = _tokenize_and_chunk(files, tokenizer, field, chunk_tokens, progress)
    if not chunks:
        raise ValueError("the corpus is empty: no document has any text")
    passage_ids = [token_arrays[c.doc][c.token_start : c.token_end] for c in chunks]
    t_tok = time.perf_counter()
    # 2) near-duplicate passages out
    dropped = find_near_duplicates(passage_ids, threshold=dedup_threshold)
    keep = np.ones(len(chunks), dtype=bool)
    keep[dropped] = False
    kept = np.flatnonzero(keep).tolist()
    kept_chunks = [chunks[i] for i in kept]
    t_dedup = time.perf_counter()
    # 3) span index over the kept passages, contiguous runs kept contiguous
    run_tokens, ranges = lay_out_passages(kept_chunks, [passage_ids[i] for i in kept])
    stream = encode_stream(run_tokens, vocab_size(tokenizer))
    order = build_suffix_order(stream)
    files_written, span_counts, fields = write_span_files(folder, stream, [order], partition_entries=partition_entries)
    del order
    t_span = time.perf_counter()
    # 4) passage store: token ranges in the stream, exact texts, sources
    passage_texts = [texts[c.doc][c.char_start : c.char_end] for c in kept_chunks]
    files_written += save_passages(folder, passage_texts, ranges, [c.doc for c in kept_chunks], doc_sources)
    # 5) passage embeddings into faiss
    if embedder == "hashed":
        emb: Embedder = HashedNgramEmbedder(hashed_dim).fit(passage_texts)
    else:
        emb = make_embedder({"name": embedder})
    bar = _progress(progress, desc="embed", unit="passage", total=len(passage_texts) * emb.passes)
    vectors = emb.embed(passage_texts, progress=bar)  # (P, dim)
    bar.close()
    faiss_files, passage_fields = write_passage_index(
        folder, [vectors], dim=emb.dim, n_total=len(passage_texts), flat_limit_bytes=flat_limit, compressed=compressed
    )
    files_written += faiss_files + emb.save(folder)
    t_end = time.perf_counter()
    counts = {
        "files": len(files),
        "documents": len(texts),
        "tokens": int(sum(a.size for a in token_arrays)),
        "passages": len(kept),
        "duplicates_removed": int(dropped.size),
        **span_counts,
    }
    seconds = {"tokenize_chunk": t_tok - t0, "dedup": t_dedup - t_tok, "span_index": t_span - t_dedup}
    seconds["embed"] = t_end - t_span
    return StageResult(files_written, counts, emb.config(), seconds, {**fields, **passage_fields})


def save_passages(
    folder: Path, texts: list[str], ranges: np.ndarray, docs: list[int], doc_sources: list[str]
) -> list[str]:
    """The passage store: exact texts (a UTF-8 blob and its offsets), token ranges (P, 2) in the span stream, each
    passage's document (P,) and the documents' source names. -> the file names written"""
    blobs = [t.encode("utf-8") for t in texts]
    offsets = np.zeros(len(blobs) + 1, dtype=np.uint64)
    np.cumsum([len(b) for b in blobs], out=offsets[1:])
    (folder / "passage_text.bin").write_bytes(b"".join(blobs))
    np.save(folder / "passage_text_offsets.npy", offsets, allow_pickle=False)
    np.save(folder / "passage_tokens.npy", ranges, allow_pickle=False)
    np.save(folder / "passage_source.npy", np.asarray(docs, dtype=np.int32), allow_pickle=False)
    (folder / "sources.json").write_text(json.dumps(doc_sources, ensure_ascii=False), encoding="utf-8")
    return ["passage_text.bin", "passage_text_offsets.npy", "passage_tokens.npy", "passage_source.npy", "sources.json"]


# -- loading: every check before anything is mapped or parsed by a C extension ---------------------------------


def _is_int(value, lo: int = 0, hi: int = 1 << 62) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _check_fields(path: Path, m: dict) -> None:
    """The manifest fields the loader and `info` use: present, of the right type, in range."""

    def bad(what: str) -> IndexFormatError:
        return IndexFormatError(f"index {path}: manifest field {what}")

    for key in ("model_name", "tokenizer_fingerprint"):
        if not isinstance(m.get(key), str):
            raise bad(f"{key!r} is missing or not a string")
    counts = m.get("counts")
    if not isinstance(counts, dict):
        raise bad("'counts' is missing or not an object")
    for key in _COUNTS:
        if not _is_int(counts.get(key)):
            raise bad(f"'counts.{key}' is missing or not a non-negative integer")
    if not isinstance(m.get("build_options"), dict):
        raise bad("'build_options' is missing or not an object")
    emb = m.get("embedder")
    if not isinstance(emb, dict) or emb.get("name") not in EMBEDDERS:
        raise bad(f"'embedder' is missing or names no known embedder (one of {EMBEDDERS})")
    if not _is_int(emb.get("dim"), 1, _MAX_DIM):
        raise bad(f"'embedder.dim' is not an integer in [1, {_MAX_DIM}]: {emb.get('dim')!r}")
    want = sum(_ENCODER_DIMS[n] for n in emb["name"].split("+")) if emb["name"] != "hashed" else emb["dim"]
    if emb["dim"] != want:
        raise bad(f"'embedder.dim' is {emb['dim']}, but the {emb['name']} embedder makes {want}-dim vectors")
    if _is_partitioned(m):
        problem = span_fields_problem(m) or passage_fields_problem(m)
        if problem:
            raise bad(problem)


def _is_partitioned(manifest: dict) -> bool:
    """Version 3 on: span partitions and a passage index kind in the manifest (versions 1 and 2: neither)."""
    return manifest["version"] >= 3


def _required_files(manifest: dict) -> tuple[str, ...]:
    """The files this code needs for the manifest's span partitions and embedder: decided here (the partitions'
    names from their count), never by the manifest's list."""
    span_fields = manifest if _is_partitioned(manifest) else None
    passages = manifest.get("passage_index") if _is_partitioned(manifest) else None
    extra = passage_extra_files(passages)
    return index_files(span_fields, hashed=manifest["embedder"]["name"] == "hashed", passage_extra=extra)


def _read_sources(path: Path, n_passages: int, label: str) -> list[str]:
    try:
        sources = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise IndexFormatError(f"{label}: not valid JSON ({e})") from None
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        raise IndexFormatError(f"{label}: not a list of source names")
    if n_passages and not sources:
        raise IndexFormatError(f"{label}: lists no sources for {n_passages} passages")
    return sources


def _load_spans(where: Path, manifest: dict, label) -> SpanIndex:
    fields = manifest if _is_partitioned(manifest) else None
    return read_span_index(where, fields, span_tokens=manifest["counts"]["span_tokens"], label=label)


def _load_passages(where: Path, n: int, stream_size: int, label) -> tuple:
    """-> text (B,) uint8, offsets (P+1,) uint64, token ranges (P, 2) int64, source ids (P,) int32, sources"""
    offsets = open_npy(where / "passage_text_offsets.npy", (np.uint64,), 1, label("passage_text_offsets.npy"))
    ranges = open_npy(where / "passage_tokens.npy", (np.int64,), 2, label("passage_tokens.npy"))
    source_ids = open_npy(where / "passage_source.npy", (np.int32,), 1, label("passage_source.npy"))
    text_bytes = (where / "passage_text.bin").stat().st_size
    text = (
        np.asarray(np.memmap(where / "passage_text.bin", dtype=np.uint8, mode="r"))
        if text_bytes
        else np.zeros(0, np.uint8)
    )
    sources = _read_sources(where / "sources.json", n, label("sources.json"))
    if offsets.shape != (n + 1,) or ranges.shape != (n, 2) or source_ids.shape != (n,):
        raise IndexFormatError(
            f"{label('passage_*')}: passage files disagree on the number of passages (the manifest says {n})"
        )
    # O(passages) checks, so no lookup ever slices outside a file
    if int(offsets[0]) != 0 or int(offsets[-1]) != text_bytes or np.any(np.diff(offsets.astype(np.int64)) < 0):
        raise IndexFormatError(f"{label('passage_text_offsets.npy')}: offsets do not cut passage_text.bin")
    if n and (ranges[:, 0].min() < 1 or np.any(ranges[:, 1] < ranges[:, 0]) or ranges[:, 1].max() >= stream_size):
        raise IndexFormatError(f"{label('passage_tokens.npy')}: a token range lies outside the span stream")
    if n and (source_ids.min() < 0 or source_ids.max() >= len(sources)):
        raise IndexFormatError(f"{label('passage_source.npy')}: a source id has no entry in sources.json")
    return text, offsets, ranges, source_ids, sources


def _load_embedder(where: Path, config: dict, label):
    """The hashed embedder with its IDF weights, read now (the generation may be gone later); a sentence encoder
    is loaded on first use, as it needs no file of the index. -> Embedder or None"""
    if config["name"] != "hashed":
        return None
    idf = open_npy(where / "embed_idf.npy", (np.float32,), 1, label("embed_idf.npy"))
    if idf.shape != (config["dim"],) or not np.all(np.isfinite(idf)):
        raise IndexFormatError(f"{label('embed_idf.npy')}: not {config['dim']} finite weights")
    return HashedNgramEmbedder(config["dim"], np.array(idf))


class CorpusIndex:
    """A loaded corpus index: `retrieve` passages for a query, `span_continuations` for a context's tail."""

    def __init__(
        self,
        path: Path,
        manifest: dict,
        spans: SpanIndex,
        faiss_index,
        text: np.ndarray,
        text_offsets: np.ndarray,
        token_ranges: np.ndarray,
        passage_source: np.ndarray,
        sources: list[str],
        embedder=None,
    ):
        self.path, self.manifest, self.spans = path, manifest, spans
        self._faiss, self._text, self._text_offsets = faiss_index, text, text_offsets
        self._token_ranges, self._passage_source, self._sources = token_ranges, passage_source, sources
        self._embedder = embedder
        if faiss_index.ntotal != token_ranges.shape[0] or text_offsets.size != token_ranges.shape[0] + 1:
            raise IndexFormatError(f"index {path}: passage files disagree on the number of passages")

    @classmethod
    def load(cls, path, *, tokenizer=None, checksums: bool = True) -> CorpusIndex:
        """Open an index: manifest first (its fields, and exactly the files this code needs), every file checked
        (size, SHA-256, array headers, cross-file counts) before it is opened, then arrays memory-mapped. With
        `tokenizer`, its fingerprint must match the one the index was built with. checksums=False skips only the
        hashing (for very large indexes, when the files are trusted); every structural check still runs.

        A concurrent `build --force` may switch generations while this reads; a load that finds its generation's
        files gone re-reads the manifest and loads the new generation: it returns the old or the new index,
        never a mix."""
        path = Path(path)
        for _ in range(_LOAD_ATTEMPTS):
            manifest = read_manifest(path)
            try:
                return cls._load_generation(path, manifest, tokenizer, checksums)
            except (GenerationGone, FileNotFoundError) as e:
                again = read_manifest(path)
                if again.get("generation") == manifest.get("generation"):
                    raise IndexFormatError(f"index {path}: a file is missing ({e})") from None
        raise IndexFormatError(f"index {path}: rebuilt {_LOAD_ATTEMPTS} times while loading; try again")

    @classmethod
    def _load_generation(cls, path: Path, manifest: dict, tokenizer, checksums: bool) -> CorpusIndex:
        _check_fields(path, manifest)
        if tokenizer is not None:
            check_tokenizer(path, manifest, tokenizer)
        where = verify_files(path, manifest, _required_files(manifest), checksums=checksums)

        def label(name: str) -> str:
            return f"index {path}: file {name}"

        counts = manifest["counts"]
        spans = _load_spans(where, manifest, label)
        text, offsets, ranges, source_ids, sources = _load_passages(where, counts["passages"], spans.stream.size, label)
        dim = manifest["embedder"]["dim"]
        embedder = _load_embedder(where, manifest["embedder"], label)
        fields = manifest["passage_index"] if _is_partitioned(manifest) else None  # versions 1, 2: flat
        faiss_index = read_passage_index(where / FAISS_FILE, fields, dim, counts["passages"], label(FAISS_FILE))
        return cls(path, manifest, spans, faiss_index, text, offsets, ranges, source_ids, sources, embedder)

    def check_tokenizer(self, tokenizer) -> None:
        """Raise IndexFormatError unless `tokenizer` is the one this index was built with (same fingerprint),
        for an index loaded without one: `generate(index=CorpusIndex.load(path))`."""
        check_tokenizer(self.path, self.manifest, tokenizer)

    def __len__(self) -> int:
        return int(self._token_ranges.shape[0])

    def passage(self, i: int, score: float = 0.0) -> Passage:
        if not 0 <= int(i) < len(self):
            raise IndexError(f"passage {i} out of range: the index holds {len(self)} passages")
        a, b = int(self._text_offsets[i]), int(self._text_offsets[i + 1])
        s, e = (int(v) for v in self._token_ranges[i])
        ids = (np.asarray(self.spans.stream[s:e], dtype=np.int64) - 1).tolist()
        try:
            text = bytes(self._text[a:b]).decode("utf-8")
        except UnicodeDecodeError:
            raise IndexFormatError(f"index {self.path}: passage {i}'s text is not UTF-8 (a modified file?)") from None
        return Passage(int(i), text, ids, float(score), self._sources[int(self._passage_source[i])])

    def embed_queries(self, queries: Sequence[str]) -> np.ndarray:
        """(Q,) texts -> (Q, dim) float32 with the embedder the index was built with (loaded on first use).
        Raises ValueError on a non-finite vector (faiss would rank NaN arbitrarily)."""
        if self._embedder is None:
            self._embedder = make_embedder(self.manifest["embedder"])
        vectors = np.ascontiguousarray(self._embedder.embed(list(queries)), dtype=np.float32)  # (Q, dim)
        if vectors.shape != (len(queries), self._faiss.d):
            raise ValueError(
                f"the embedder made vectors of shape {vectors.shape}, the index holds {self._faiss.d} dims"
            )
        if not np.all(np.isfinite(vectors)):
            raise ValueError("a query embedding is not finite (NaN or inf); nothing can be ranked against it")
        return vectors

    def retrieve(self, query: str, k: int = 4, *, reranker=None, candidates: int = 20) -> list[Passage]:
        """The k passages nearest to `query` by embedding inner product, best first (fewer if the index holds
        fewer; none from an empty index).

        With a `reranker` (e.g. rerank.LMReranker over the target model), the embedding search proposes
        max(k, candidates) passages and the reranker orders them; each Passage keeps its embedding score."""
        if not (_is_int(k, 1) and _is_int(candidates, 1)):
            raise ValueError(f"k and candidates must be integers >= 1, got {k!r} and {candidates!r}")
        n = min(max(k, candidates) if reranker is not None else k, len(self))
        if n == 0:
            return []  # faiss asserts on a search for 0 neighbours
        scores, ids = self._faiss.search(self.embed_queries([query]), n)  # (1, n)
        found = [self.passage(int(i), float(s)) for s, i in zip(scores[0], ids[0], strict=True) if i >= 0]  # best first
        if reranker is not None:
            by_id = {p.id: p for p in found}
            found = [by_id[i] for i in reranker.rerank(query, list(by_id), [p.text for p in found])]
        return found[:k]

    def span_continuations(
        self, context_tail: Sequence[int], max_tokens: int, *, max_candidates: int = 8, min_match: int = 2
    ) -> tuple[int, list[list[int]]]:
        """Longest suffix of context_tail (<= 16 tokens) found in the corpus, and up to max_candidates
        continuations (<= max_tokens ids each, most frequent first, never crossing a document end).
        -> (match_len, continuations); (0, []) if the match is shorter than min_match."""
        return self.spans.continuations(context_tail, max_tokens, max_candidates=max_candidates, min_match=min_match)

    def info(self) -> dict:
        m = self.manifest
        return {
            "path": str(self.path),
            "version": m["version"],
            "generation": m.get("generation"),
            "model_name": m["model_name"],
            "tokenizer_fingerprint": m["tokenizer_fingerprint"],
            **{key: m["counts"][key] for key in _COUNTS},
            "build_options": m["build_options"],
            "embedder": m["embedder"],
            "span_partitions": len(self.spans.sa.parts),
            "position_dtype": str(self.spans.sa.dtype),
            "passage_index": m.get("passage_index", {"kind": "flat"}),
            "bytes_on_disk": sum(f["bytes"] for f in m["files"].values()),
            "build_seconds": m.get("build_seconds"),
            **({"build_stats": m["build_stats"]} if "build_stats" in m else {}),
        }
