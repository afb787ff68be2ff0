"""Small corpora, quick index builds and an index's full set of answers, for the index safety and crash tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from refdecode.corpus import CorpusIndex, build_index
from refdecode.corpus.testing import WordTokenizer

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "omicron",
    "pi",
    "rho",
    "sigma",
    "tau",
    "upsilon",
    "phi",
    "chi",
    "psi",
    "omega",
    "apple",
    "banana",
    "cherry",
    "grape",
    "lemon",
    "mango",
    "melon",
    "olive",
    "peach",
    "pear",
    "plum",
]
QUERIES = ("alpha beta", "mango peach plum", "omega psi chi", "lemon")


def write_corpus(folder: Path, seed: int, docs: int = 6, words: int = 150) -> Path:
    """`docs` Markdown files of random words in three paragraphs each. -> folder"""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(docs):
        paras = [" ".join(rng.choice(WORDS, size=words // 3)) for _ in range(3)]
        (folder / f"doc{i}.md").write_text("\n\n".join(paras) + "\n", encoding="utf-8")
    return folder


def build(src: Path, out: Path, **kw) -> Path:
    kw.setdefault("embedder", "hashed")
    kw.setdefault("chunk_tokens", 32)
    return build_index([src], out, tokenizer=WordTokenizer(), model_name="toy", progress=False, **kw)


def span_contexts(src: Path, n: int = 6) -> list[list[int]]:
    """Token windows taken from the corpus' own text: each has a long match in an index of that corpus."""
    tok = WordTokenizer()
    ids = [tok.encode((src / f"doc{i}.md").read_text()) for i in range(n)]
    return [d[10:22] for d in ids]


def answers(index: CorpusIndex, contexts: list[list[int]]) -> tuple:
    """Everything a reader sees: passages, search results with scores, span continuations. Equal answers =
    the same index, as far as any caller can tell."""
    passages = tuple((p.text, tuple(p.token_ids), p.source) for p in (index.passage(i) for i in range(len(index))))
    search = tuple(tuple((p.id, p.score) for p in index.retrieve(q, k=3)) for q in QUERIES)
    spans = tuple(
        (L, tuple(map(tuple, conts)))
        for L, conts in (index.span_continuations(c, 4, max_candidates=8) for c in contexts)
    )
    return passages, search, spans


def gen_dir(index_dir: Path) -> Path:
    return index_dir / json.loads((index_dir / "manifest.json").read_text())["generation"]


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` (relative) with its bytes (None for folders): a snapshot to compare."""
    out: dict[str, bytes | None] = {}
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), folder)] = None
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, folder)] = None if os.path.islink(p) else Path(p).read_bytes()
    return out


def as_version_2(index_dir: Path) -> Path:
    """Rewrite a one-partition, flat version 3 index in place as version 2 wrote it: one `span_sa.npy`, no
    partition or passage-index fields. The files' bytes are the same, so it answers exactly as before."""
    from refdecode.checked_folder import file_entry

    manifest = json.loads((index_dir / "manifest.json").read_text())
    assert manifest["version"] == 3 and len(manifest["span_partitions"]) == 1
    assert manifest["passage_index"] == {"kind": "flat"} and manifest["position_dtype"] == "uint32"
    gen = gen_dir(index_dir)
    sa = np.load(gen / "span_sa.00000.npy")
    (gen / "span_sa.00000.npy").unlink()
    np.save(gen / "span_sa.npy", sa, allow_pickle=False)  # numpy's own header, as version 2 saved it
    del manifest["files"]["span_sa.00000.npy"], manifest["span_partitions"], manifest["position_dtype"]
    del manifest["passage_index"]
    manifest["files"]["span_sa.npy"] = file_entry(gen / "span_sa.npy")
    manifest["version"] = 2
    (index_dir / "manifest.json").write_text(json.dumps(manifest))
    return index_dir


def patched(data: bytes, at: int, fmt: str, value) -> bytes:
    """`data` with `value` packed by struct format `fmt` at byte `at`."""
    import struct

    out = bytearray(data)
    struct.pack_into(fmt, out, at, value)
    return bytes(out)


def ivf_header_cases(n: int, dim: int, fourcc: bytes) -> dict:
    """Damage every faiss IVF file can suffer in the part the kinds share (header, nlist), as functions of its bytes;
    "a flat file" (None) stands for a flat index of the same vectors, made by `damaged_faiss`."""
    return {
        "truncated": lambda d: d[:-1],
        "truncated in the header": lambda d: d[:40],
        "one byte more": lambda d: d + b"\0",
        "ntotal": lambda d: patched(d, 8, "<q", n + 1),
        "dim": lambda d: patched(d, 4, "<i", dim * 2),
        "fourcc": lambda d: b"IvPQ" + d[4:],
        "metric L2": lambda d: patched(d, 33, "<i", 1),
        "nlist": lambda d: patched(d, 37, "<Q", 7),
        "garbage": lambda d: fourcc + b"\xff" * 200,
        "a flat file": None,
    }


def damaged_faiss(damage, source: Path, x: np.ndarray, path: Path) -> None:
    """Write `path`: `source`'s bytes through `damage`, or for None a flat faiss index of the vectors x."""
    if damage is None:
        import faiss

        flat = faiss.IndexFlatIP(x.shape[1])
        flat.add(x)
        faiss.write_index(flat, str(path))
    else:
        path.write_bytes(damage(source.read_bytes()))


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit vectors around the same 40 random centres; `seed` draws which centre and the noise. -> (n, dim) float32"""
    centres = np.random.default_rng(0).normal(size=(40, dim))
    rng = np.random.default_rng(seed)
    x = (centres[rng.integers(0, 40, n)] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def assert_disagreeing_fields_refused(path: Path, fields: dict, change: dict, dim: int, n: int) -> None:
    """A passage index whose manifest fields are edited by `change` is refused: by the fields' own check, or, when
    they are well-formed, by the file's check against them; and the right fields with the wrong dims or count."""
    import pytest

    from refdecode.corpus import IndexFormatError
    from refdecode.corpus import passage_index as pi

    edited = {**fields, **change}
    if pi.passage_fields_problem({"passage_index": edited}) is None:  # well-formed: the file itself must disagree
        with pytest.raises(IndexFormatError):
            pi.check_passage_file(path, edited, dim, n, path.name)
    for wrong_dim, wrong_n in ((dim + 1, n), (dim, n - 1)):
        with pytest.raises(IndexFormatError):
            pi.check_passage_file(path, fields, wrong_dim, wrong_n, path.name)
