"""Corpus index safety: --force never destroys what is not an index, nothing is left behind, hostile index folders
are refused (never executed), and the C extensions (faiss, numpy maps) never see input that crashes them."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from index_helpers import answers, as_version_2, build, gen_dir, span_contexts, tree, write_corpus

from refdecode.checked_folder import file_entry
from refdecode.corpus import CorpusIndex, IndexFormatError
from refdecode.corpus.format import index_files, new_generation
from refdecode.corpus.testing import WordTokenizer

SA = "span_sa.00000.npy"  # the one suffix-order partition of these small indexes
ALL_FILES = index_files({"span_partitions": [SA]}, hashed=True)  # every file of such an index


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """One index (and a second of another corpus) built once; each test copies them."""
    root = tmp_path_factory.mktemp("pristine")
    src, other = write_corpus(root / "src", seed=0), write_corpus(root / "other", seed=1, docs=5, words=120)
    build(src, root / "idx")
    build(other, root / "idx_b")
    ctx = span_contexts(src)
    return root, answers(CorpusIndex.load(root / "idx"), ctx), ctx


@pytest.fixture
def idx(pristine, tmp_path):
    root, _, _ = pristine
    shutil.copytree(root / "idx", tmp_path / "idx")
    (tmp_path / "idx_b").symlink_to(root / "idx_b")  # only read: the source of swapped files
    return tmp_path / "idx"


# -- 1) --force replaces an index and nothing else; nothing of a build stays behind ------------------------------


def test_force_refuses_a_folder_that_is_not_an_index(tmp_path):
    src = write_corpus(tmp_path / "src", seed=0)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("buy milk\n")
    (notes / "manifest.json").write_text('{"format": "something-else"}')  # a manifest, but not ours
    before = tree(notes)
    with pytest.raises(IndexFormatError, match="does not hold a refdecode index.*--force only replaces an index"):
        build(src, notes, force=True)
    assert tree(notes) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "src"]


def test_force_refuses_a_file(tmp_path):
    src = write_corpus(tmp_path / "src", seed=0)
    (tmp_path / "out").write_text("precious")
    with pytest.raises(IndexFormatError, match="not a folder holding a refdecode index"):
        build(src, tmp_path / "out", force=True)
    assert (tmp_path / "out").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no .out.old-XXXX


@pytest.mark.parametrize("where", ["the source", "inside the source", "around the source"])
def test_output_overlapping_a_source_is_refused(tmp_path, where):
    src = write_corpus(tmp_path / "corpus" / "src", seed=0)
    out = {"the source": src, "inside the source": src / "idx", "around the source": tmp_path / "corpus"}[where]
    before = tree(tmp_path)
    for force in (False, True):
        with pytest.raises(IndexFormatError, match="overlaps the source"):
            build(src, out, force=force)
    assert tree(tmp_path) == before


def test_rebuilds_leave_one_generation_and_nothing_else(idx):
    (idx / "README.txt").write_text("a note the user keeps beside the index")
    for seed in (1, 2):
        build(write_corpus(idx.parent / f"src{seed}", seed=seed), idx, force=True)
    names = sorted(p.name for p in idx.iterdir())
    assert names == sorted(["README.txt", "manifest.json", gen_dir(idx).name])
    assert sorted(p.name for p in gen_dir(idx).iterdir()) == sorted(ALL_FILES)
    assert not [p for p in idx.parent.iterdir() if p.name.startswith(".")]


def test_failed_rebuild_leaves_the_old_index_and_nothing_else(idx, pristine, monkeypatch):
    import faiss

    _, expected, ctx = pristine
    before = tree(idx)

    def explode(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(faiss, "write_index", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        build(write_corpus(idx.parent / "new", seed=5), idx, force=True)
    assert tree(idx) == before and answers(CorpusIndex.load(idx), ctx) == expected
    assert not [p for p in idx.parent.iterdir() if p.name.startswith(".")]


def test_the_next_build_removes_what_a_killed_build_left(idx):
    """A SIGKILL can leave a stray generation, a temporary manifest, a staging folder: the next build removes
    them, and only them (a folder that merely looks like one but holds a user's file stays)."""
    stray = idx / "gen-00000000000000aa"
    shutil.copytree(gen_dir(idx), stray)
    (idx / ".manifest.json.tmp-00000000000000bb").write_text("{}")
    users = idx / "gen-00000000000000cc"
    users.mkdir()
    (users / "diary.txt").write_text("mine")
    staging = idx.parent / ".idx.building-0000abcd"
    shutil.copytree(idx, staging, ignore=shutil.ignore_patterns("gen-00000000000000cc"))
    build(write_corpus(idx.parent / "src2", seed=2), idx, force=True)
    assert not stray.exists() and not staging.exists() and (users / "diary.txt").read_text() == "mine"
    assert not (idx / ".manifest.json.tmp-00000000000000bb").exists()


def test_version_1_flat_index_loads_and_is_replaced_cleanly(idx, pristine):
    _, expected, ctx = pristine
    as_version_2(idx)
    manifest = json.loads((idx / "manifest.json").read_text())
    for p in gen_dir(idx).iterdir():
        p.rename(idx / p.name)
    gen_dir(idx).rmdir()
    del manifest["generation"]
    manifest["version"] = 1
    (idx / "manifest.json").write_text(json.dumps(manifest))
    (idx / "notes.md").write_text("kept")
    assert answers(CorpusIndex.load(idx), ctx) == expected
    build(write_corpus(idx.parent / "src2", seed=2), idx, force=True)
    assert sorted(p.name for p in idx.iterdir()) == sorted(["manifest.json", "notes.md", gen_dir(idx).name])


def test_force_replaces_an_index_of_another_version(idx):
    """An index of a newer refdecode cannot be read, but it is still an index: --force may replace it."""
    m = _manifest(idx)
    m["version"] = 99
    _write_manifest(idx, m)
    with pytest.raises(IndexFormatError, match="format version 99 is not supported"):
        CorpusIndex.load(idx)
    build(write_corpus(idx.parent / "src2", seed=2), idx, force=True)
    assert CorpusIndex.load(idx).manifest["version"] == 3


# -- 3) hostile index folders: refused with IndexFormatError, nothing executed -----------------------------------


def _manifest(idx: Path) -> dict:
    return json.loads((idx / "manifest.json").read_text())


def _write_manifest(idx: Path, m: dict) -> None:
    (idx / "manifest.json").write_text(json.dumps(m))


def _edit(fn):
    """A mutation of the manifest's JSON object."""

    def mutate(idx: Path) -> None:
        m = _manifest(idx)
        fn(m)
        _write_manifest(idx, m)

    return mutate


def _rehash(idx: Path, *names: str) -> None:
    """Record the current size and SHA-256 of `names`: the tampering also fixed the manifest up."""
    m = _manifest(idx)
    for name in names:
        m["files"][name] = file_entry(gen_dir(idx) / name)
    _write_manifest(idx, m)


def _replace_file(name: str, content):
    def mutate(idx: Path) -> None:
        path = gen_dir(idx) / name
        data = content(path) if callable(content) else content
        if isinstance(data, np.ndarray):
            path.unlink()
            with open(path, "wb") as f:
                np.save(f, data, allow_pickle=data.dtype == object)
        else:
            path.write_bytes(data)
        _rehash(idx, name)

    return mutate


def _flip(name: str, rehash: bool = False):
    def mutate(idx: Path) -> None:
        path = gen_dir(idx) / name
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x5A
        path.write_bytes(bytes(data))
        if rehash:
            _rehash(idx, name)

    return mutate


def _truncate(name: str):
    def mutate(idx: Path) -> None:
        path = gen_dir(idx) / name
        path.write_bytes(path.read_bytes()[:-1])

    return mutate


def _symlink_file(idx: Path) -> None:
    path = gen_dir(idx) / SA
    copy = idx.parent / "elsewhere.npy"
    shutil.copy(path, copy)
    path.unlink()
    path.symlink_to(copy)


def _symlink_generation(idx: Path) -> None:
    gen = gen_dir(idx)
    shutil.copytree(gen, idx.parent / "elsewhere")
    shutil.rmtree(gen)
    gen.symlink_to(idx.parent / "elsewhere")


def _swap_from_other(name: str, rehash: bool):
    def mutate(idx: Path) -> None:
        shutil.copy(gen_dir(idx.parent / "idx_b") / name, gen_dir(idx) / name)
        if rehash:
            _rehash(idx, name)

    return mutate


class _Payload:
    """Unpickling this touches a marker file: proof that a load executed something."""

    def __reduce__(self):
        return (Path.touch, (Path(os.environ["REFDECODE_TEST_MARKER"]),))


def _pickled_array(idx: Path) -> None:
    _replace_file("passage_source.npy", np.array([_Payload()] * 3, dtype=object))(idx)


def _npy_header(dtype: str, shape: tuple) -> bytes:
    header = repr({"descr": dtype, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header


def _offsets_past_text(path: Path) -> np.ndarray:
    offsets = np.load(path).copy()
    offsets[-1] += 10
    return offsets


def _faiss_header(field: int, value: int):
    """Patch one field of the faiss header: 1 = d (int32 at 4), 2 = ntotal (int64 at 8)."""

    def content(path: Path) -> bytes:
        data = bytearray(path.read_bytes())
        at, width = {1: (4, 4), 2: (8, 8)}[field]
        data[at : at + width] = value.to_bytes(width, "little", signed=True)
        return bytes(data)

    return content


_FIELD_DELETIONS = [
    ("files", SA, "sha256"),
    ("counts",),
    ("model_name",),
    ("tokenizer_fingerprint",),
    ("embedder", "dim"),
    ("embedder",),
    ("build_options",),
    ("generation",),
    ("version",),
    ("format",),
    ("counts", "passages"),
    ("embedder", "name"),
]


def _delete(path):
    def fn(m):
        for key in path[:-1]:
            m = m[key]
        del m[path[-1]]

    return fn


HOSTILE = {
    # the manifest decides nothing about which files are needed
    "dropped file entry": _edit(lambda m: m["files"].pop("passage_text.bin")),
    "files: {}": _edit(lambda m: m.update(files={})),
    "files: a list": _edit(lambda m: m.update(files=list(m["files"]))),
    "unexpected file entry": _edit(lambda m: m["files"].update({"extra.npy": m["files"][SA]})),
    # names stay inside the index
    "../ in a name": _edit(lambda m: m["files"].update({"../span_sa.npy": m["files"].pop(SA)})),
    "absolute name": _edit(lambda m: m["files"].update({"/etc/passwd": m["files"].pop(SA)})),
    "separator in a name": _edit(lambda m: m["files"].update({"a/span_sa.npy": m["files"].pop(SA)})),
    "generation ../": _edit(lambda m: m.update(generation="../" + m["generation"])),
    "generation absolute": _edit(lambda m: m.update(generation="/tmp")),
    "generation not a string": _edit(lambda m: m.update(generation=7)),
    "generation missing folder": _edit(lambda m: m.update(generation="gen-0123456789abcdef")),
    "symlinked file": _symlink_file,
    "symlinked generation": _symlink_generation,
    # malformed or missing fields
    **{f"missing {'.'.join(p)}": _edit(_delete(p)) for p in _FIELD_DELETIONS},
    "dim 0": _edit(lambda m: m["embedder"].update(dim=0)),
    "dim 1e13": _edit(lambda m: m["embedder"].update(dim=1e13)),
    "dim 10**13": _edit(lambda m: m["embedder"].update(dim=10**13)),
    "dim a string": _edit(lambda m: m["embedder"].update(dim="16384")),
    "dim true": _edit(lambda m: m["embedder"].update(dim=True)),
    "dim -1": _edit(lambda m: m["embedder"].update(dim=-1)),
    "dim of another size": _edit(lambda m: m["embedder"].update(dim=384)),
    "unknown embedder": _edit(lambda m: m["embedder"].update(name="pickle")),
    "minilm with a wrong dim": _edit(lambda m: m["embedder"].update(name="minilm", dim=16384)),
    "counts a list": _edit(lambda m: m.update(counts=[1, 2])),
    "passages negative": _edit(lambda m: m["counts"].update(passages=-1)),
    "passages a float": _edit(lambda m: m["counts"].update(passages=3.0)),
    "passages more than stored": _edit(lambda m: m["counts"].update(passages=m["counts"]["passages"] + 1)),
    "span_tokens wrong": _edit(lambda m: m["counts"].update(span_tokens=m["counts"]["span_tokens"] + 1)),
    "model_name a number": _edit(lambda m: m.update(model_name=1)),
    "version 4": _edit(lambda m: m.update(version=4)),
    "version true": _edit(lambda m: m.update(version=True)),
    "version a string": _edit(lambda m: m.update(version="2")),
    "wrong format": _edit(lambda m: m.update(format="pickle")),
    "sha256 not hex": _edit(lambda m: m["files"][SA].update(sha256="zz" * 32)),
    "bytes a string": _edit(lambda m: m["files"][SA].update(bytes="12")),
    "bytes negative": _edit(lambda m: m["files"][SA].update(bytes=-5)),
    "bytes 1e13": _edit(lambda m: m["files"][SA].update(bytes=1e13)),
    "huge declared size": _edit(lambda m: m["files"]["passages.faiss"].update(bytes=2**60)),
    "declared size off by one": _edit(
        lambda m: m["files"]["passages.faiss"].update(bytes=m["files"]["passages.faiss"]["bytes"] + 1)
    ),
    "manifest a list": lambda idx: (idx / "manifest.json").write_text("[]"),
    "manifest not JSON": lambda idx: (idx / "manifest.json").write_text("{"),
    "manifest not UTF-8": lambda idx: (idx / "manifest.json").write_bytes(b'{"format": "\xff"}'),
    "manifest empty": lambda idx: (idx / "manifest.json").write_bytes(b""),
    "manifest huge": lambda idx: (idx / "manifest.json").write_text(" " * (2 << 20) + "{}"),
    "manifest deeply nested": lambda idx: (idx / "manifest.json").write_text("[" * 100000 + "]" * 100000),
    "manifest missing": lambda idx: (idx / "manifest.json").unlink(),
    # file contents
    **{f"truncated {name}": _truncate(name) for name in ALL_FILES},
    **{f"bit flip in {name}": _flip(name) for name in ALL_FILES},
    **{f"swapped {name} from another index": _swap_from_other(name, rehash=False) for name in ALL_FILES},
    # ...and the same tampering with the manifest fixed up (sizes and checksums recomputed): structure decides
    "empty sources.json": _replace_file("sources.json", b"[]"),
    "sources.json not a list": _replace_file("sources.json", b'{"a": 1}'),
    "sources.json not JSON": _replace_file("sources.json", b"\x80\x81"),
    "pickled object array": _pickled_array,
    "array of another dtype": _replace_file("passage_tokens.npy", lambda p: np.load(p).astype(np.int32)),
    "array of another shape": _replace_file("passage_tokens.npy", lambda p: np.load(p).ravel()),
    "npy header larger than the file": _replace_file(SA, _npy_header("<u4", (10**12,)) + b"\0" * 8),
    "npy header garbage": _replace_file(SA, b"\x93NUMPY\x01\x00\x10\x00{'descr': os.sy}\n"),
    "not an npy file": _replace_file("span_stream.npy", b"PK\x03\x04 a zip, not an array"),
    "empty npy file": _replace_file("passage_source.npy", b""),
    "offsets past the text": _replace_file("passage_text_offsets.npy", _offsets_past_text),
    "token range past the stream": _replace_file("passage_tokens.npy", lambda p: np.load(p) + 10**6),
    "source id past sources.json": _replace_file("passage_source.npy", lambda p: np.load(p) + 1000),
    "suffix array past the stream": _replace_file(SA, lambda p: np.load(p) + 10**6),
    "fewer samples": _replace_file("span_samples.npy", lambda p: np.load(p)[:-1]),
    "stream of another dtype": _replace_file("span_stream.npy", lambda p: np.load(p).astype(np.uint32)),
    "idf with NaN": _replace_file("embed_idf.npy", lambda p: np.full_like(np.load(p), np.nan)),
    "idf of another size": _replace_file("embed_idf.npy", lambda p: np.load(p)[:8]),
    "faiss file of another index": _swap_from_other("passages.faiss", rehash=True),
    "faiss header: huge ntotal": _replace_file("passages.faiss", _faiss_header(2, 2**40)),
    "faiss header: dim 0": _replace_file("passages.faiss", _faiss_header(1, 0)),
    "faiss file: garbage": _replace_file("passages.faiss", b"IxFI" + b"\xff" * 60),
    "faiss file: another index type": _replace_file("passages.faiss", lambda p: b"IxF2" + p.read_bytes()[4:]),
    "faiss file truncated and rehashed": _replace_file("passages.faiss", lambda p: p.read_bytes()[:-4]),
    "npy file truncated and rehashed": _replace_file("span_stream.npy", lambda p: p.read_bytes()[:-2]),
}


@pytest.mark.parametrize("checksums", [True, False], ids=["checksums", "no-checksums"])
@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_index_folder_is_refused(idx, pristine, case, checksums, tmp_path, monkeypatch):
    """Each case: IndexFormatError (a ValueError) with a message, nothing executed; with --no-checksums too,
    except where only a checksum can tell (same sizes, other bytes)."""
    marker = tmp_path / "executed"
    monkeypatch.setenv("REFDECODE_TEST_MARKER", str(marker))
    ctx = pristine[2]
    HOSTILE[case](idx)
    if not checksums and case.startswith(("bit flip", "swapped")):
        try:  # may load: the caller chose to trust bytes; never a crash
            index = CorpusIndex.load(idx, checksums=False)
        except IndexFormatError:
            pass
        else:
            try:
                answers(index, ctx)
            except (ValueError, IndexError):
                pass
    else:
        with pytest.raises(IndexFormatError):
            CorpusIndex.load(idx, checksums=checksums)
    assert not marker.exists()


def test_hostile_case_count():
    """The figure for the note: how many hostile folders the test above refuses (each with and without checksums,
    save the same-size content changes that only checksums catch)."""
    assert len(HOSTILE) >= 90


# -- 3b) random manifest mutations: refused, or loads and answers exactly as the original -----------------------


def _json_values():
    from hypothesis import strategies as st

    leaves = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**64), 2**64),
        st.floats(allow_nan=True),
        st.text(max_size=20),
        st.sampled_from(["gen-0123456789abcdef", "../x", "/", "hashed", "minilm", SA, "0" * 64]),
    )
    return st.recursive(
        leaves,
        lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
        max_leaves=6,
    )


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, (*prefix, i))


@pytest.mark.fuzz
def test_random_manifest_mutations_are_refused_or_harmless(pristine, tmp_path_factory):
    """Up to three random edits anywhere in the manifest (set a value to random JSON, delete a key, add one), with
    and without checksums: refused with IndexFormatError, or loaded and answering exactly as the original."""
    pytest.importorskip("hypothesis")
    from hypothesis import given
    from hypothesis import strategies as st

    root, expected, ctx = pristine
    work = tmp_path_factory.mktemp("mutate")
    shutil.copytree(root / "idx", work / "idx")
    idx = work / "idx"
    original = (idx / "manifest.json").read_text()
    paths = list(_paths(json.loads(original)))

    @given(
        st.lists(
            st.tuples(st.sampled_from(paths), st.sampled_from(["set", "delete", "add"]), _json_values()),
            min_size=1,
            max_size=3,
        ),
        st.booleans(),
    )
    def check(mutations, checksums):
        m = json.loads(original)
        for path, op, value in mutations:
            parent, node = None, m
            try:
                for key in path:
                    parent, node = node, node[key]
            except (KeyError, IndexError, TypeError):
                continue  # an earlier mutation removed this path
            if op == "set" and parent is not None:
                parent[path[-1]] = value
            elif op == "delete" and parent is not None:
                del parent[path[-1]]
            elif op == "add" and isinstance(node, dict):
                node["extra"] = value
            elif op == "set":
                m = value
        (idx / "manifest.json").write_text(json.dumps(m))
        try:
            index = CorpusIndex.load(idx, checksums=checksums)
        except IndexFormatError:
            return
        assert answers(index, ctx) == expected
        index.info()

    try:
        check()
    finally:
        (idx / "manifest.json").write_text(original)


# -- 4) C-extension guards ---------------------------------------------------------------------------------------


def _empty_index(out: Path) -> Path:
    """A well-formed index of zero passages (no build makes one: an empty corpus is refused; a writer might)."""
    import faiss

    from refdecode.corpus.embedding import HashedNgramEmbedder
    from refdecode.corpus.spans import SpanIndex

    with new_generation(out, force=False) as gen:
        spans = SpanIndex.build([], 5000)
        files, span_fields = spans.save(gen.dir)
        (gen.dir / "passage_text.bin").write_bytes(b"")
        np.save(gen.dir / "passage_text_offsets.npy", np.zeros(1, np.uint64))
        np.save(gen.dir / "passage_tokens.npy", np.zeros((0, 2), np.int64))
        np.save(gen.dir / "passage_source.npy", np.zeros(0, np.int32))
        (gen.dir / "sources.json").write_text("[]")
        faiss.write_index(faiss.IndexFlatIP(64), str(gen.dir / "passages.faiss"))
        files += [
            "passage_text.bin",
            "passage_text_offsets.npy",
            "passage_tokens.npy",
            "passage_source.npy",
            "sources.json",
            "passages.faiss",
        ] + HashedNgramEmbedder(64).save(gen.dir)
        from refdecode.checked_folder import tokenizer_fingerprint

        gen.commit(
            {
                "model_name": "toy",
                "tokenizer_fingerprint": tokenizer_fingerprint(WordTokenizer()),
                "counts": {
                    k: 0
                    for k in (
                        "files",
                        "documents",
                        "tokens",
                        "passages",
                        "duplicates_removed",
                        "span_tokens",
                        "span_bytes",
                    )
                },
                "build_options": {},
                "embedder": {"name": "hashed", "dim": 64},
                **span_fields,
                "passage_index": {"kind": "flat"},
            },
            files,
        )
    return out


def test_empty_index_answers_nothing(tmp_path):
    """Zero passages: zero-length arrays are made, not mapped; faiss is never asked for 0 neighbours."""
    index = CorpusIndex.load(_empty_index(tmp_path / "empty"), tokenizer=WordTokenizer())
    assert len(index) == 0 and index.retrieve("anything", k=5) == []
    assert index.span_continuations([1, 2, 3], 4) == (0, [])
    with pytest.raises(IndexError, match="out of range"):
        index.passage(0)
    assert index.info()["passages"] == 0


def test_k_beyond_the_index_and_bad_k(idx):
    index = CorpusIndex.load(idx)
    assert len(index.retrieve("alpha", k=10_000)) == len(index)
    for k in (0, -1, 2.5, True, "3"):
        with pytest.raises(ValueError, match="k and candidates"):
            index.retrieve("alpha", k=k)
    with pytest.raises(IndexError):
        index.passage(len(index))
    with pytest.raises(IndexError):
        index.passage(-1)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_query_vector_is_refused(idx, bad):
    index = CorpusIndex.load(idx)

    class Broken:
        def embed(self, texts):
            v = np.zeros((len(texts), index._faiss.d), np.float32)
            v[:, 0] = bad
            return v

    index._embedder = Broken()
    with pytest.raises(ValueError, match="not finite"):
        index.retrieve("alpha")


_C_EXTENSION_CASES = (
    "faiss header: huge ntotal",
    "faiss header: dim 0",
    "faiss file: garbage",
    "faiss file: another index type",
    "faiss file truncated and rehashed",
    "npy header larger than the file",
    "empty npy file",
    "pickled object array",
    "suffix array past the stream",
    "token range past the stream",
)


@pytest.mark.slow
def test_hostile_files_never_reach_faiss_or_numpy_in_a_child(pristine, tmp_path):
    """The folders that would make faiss or numpy abort, allocate terabytes or unpickle: a child process loads
    each (checksums off, the weakest setting) and gets IndexFormatError; an empty index answers nothing. The
    child's exit status proves the interpreter survived; the marker file proves nothing was executed."""
    import subprocess

    root, _, _ = pristine
    marker = tmp_path / "executed"
    os.environ["REFDECODE_TEST_MARKER"] = str(marker)
    folders = []
    try:
        for i, case in enumerate(_C_EXTENSION_CASES):
            shutil.copytree(root / "idx", tmp_path / f"case{i}" / "idx")
            (tmp_path / f"case{i}" / "idx_b").symlink_to(root / "idx_b")
            HOSTILE[case](tmp_path / f"case{i}" / "idx")
            folders.append(str(tmp_path / f"case{i}" / "idx"))
    finally:
        del os.environ["REFDECODE_TEST_MARKER"]
    empty = _empty_index(tmp_path / "empty")
    code = (
        f"from refdecode.corpus import CorpusIndex, IndexFormatError\n"
        f"for folder in {folders!r}:\n"
        f"    try:\n        CorpusIndex.load(folder, checksums=False)\n"
        f"    except IndexFormatError:\n        continue\n"
        f"    raise SystemExit('loaded: ' + folder)\n"
        f"index = CorpusIndex.load({str(empty)!r}, checksums=False)\n"
        f"assert index.retrieve('x', k=3) == [] and index.span_continuations([1, 2], 3) == (0, [])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "REFDECODE_TEST_MARKER": str(marker)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert not marker.exists()


# -- 5) check_tokenizer on a loaded index ------------------------------------------------------------------------


def test_check_tokenizer_on_a_loaded_index(idx):
    index = CorpusIndex.load(idx)
    index.check_tokenizer(WordTokenizer())
    with pytest.raises(IndexFormatError, match="another tokenizer"):
        index.check_tokenizer(WordTokenizer(salt="other"))
