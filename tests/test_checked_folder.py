"""Checked folders (refdecode.checked_folder), the one module behind the corpus index, the output memory and the
heads: the manifest against a brute-force oracle (sizes and SHA-256 recomputed with hashlib), every kind of
tampering refused with one sentence, ownership (never write over what is not ours), the atomic switch under a
failure injected at every filesystem step, cleanup of what killed writes left, the lock; and `import refdecode`
without the corpus extra."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from refdecode import checked_folder as cf

FMT = cf.FolderFormat(
    name="refdecode-test-folder",
    version=2,
    label="test folder",
    data_files=frozenset({"a.bin", "b.bin", "c.txt"}),
    readable=(1, 2),
    flat_versions=(1,),
    renew="write it again",
)
REPO = Path(__file__).resolve().parents[1]


def write(folder: Path, contents: dict[str, bytes], **fields) -> dict:
    """Write `contents` (file name -> bytes) as `folder`'s new generation, the way every owner does."""
    replacing = cf.claim(folder, FMT)
    with cf.new_generation(folder, FMT, replacing=replacing) as gen:
        for name, data in contents.items():
            (gen.dir / name).write_bytes(data)
        return gen.commit(fields, list(contents))


def read(folder: Path, required=None, checksums: bool = True) -> dict[str, bytes]:
    """What a reader sees: the checked files' bytes."""
    manifest = cf.read_manifest(folder, FMT)
    names = set(manifest["files"]) if required is None else set(required)
    where = cf.verify_files(folder, FMT, manifest, names, checksums=checksums)
    return {name: (where / name).read_bytes() for name in sorted(names)}


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
        for p in sorted(root.rglob("*"))
    }


def generation(folder: Path) -> Path:
    return folder / json.loads((folder / cf.MANIFEST_FILE).read_text())["generation"]


def clean(folder: Path) -> bool:
    """Only the manifest and its one generation in `folder`, and nothing hidden beside it."""
    names = sorted(p.name for p in folder.iterdir())
    hidden = [p for p in folder.parent.iterdir() if p.name.startswith(".")]
    return names == sorted([cf.MANIFEST_FILE, generation(folder).name]) and not hidden


SAMPLE = {"a.bin": b"\x00\x01 alpha", "b.bin": bytes(range(256)) * 3, "c.txt": b"olive lemon\n"}


# -- 1) the manifest against an oracle ---------------------------------------------------------------------------


def test_manifest_round_trip_matches_an_oracle(tmp_path):
    manifest = write(tmp_path / "f", SAMPLE, model_name="toy", counts={"n": 3})
    on_disk = json.loads((tmp_path / "f" / cf.MANIFEST_FILE).read_text())
    assert on_disk == manifest == cf.read_manifest(tmp_path / "f", FMT)
    assert on_disk["format"] == FMT.name and on_disk["version"] == FMT.version
    assert on_disk["model_name"] == "toy" and on_disk["counts"] == {"n": 3}
    assert on_disk["files"] == {
        n: {"bytes": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in SAMPLE.items()
    }
    assert read(tmp_path / "f") == SAMPLE and clean(tmp_path / "f")


@pytest.mark.fuzz
def test_any_sequence_of_writes_reads_back_the_last():
    """Random contents, written one after another into the same folder: each read returns exactly what was last
    written, the manifest equals the oracle's, and one generation is left, nothing else."""
    import tempfile

    from hypothesis import given
    from hypothesis import strategies as st

    contents = st.dictionaries(st.sampled_from(sorted(FMT.data_files)), st.binary(max_size=300), min_size=1)

    @given(st.lists(contents, min_size=1, max_size=4))
    def check(writes):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "f"
            for files in writes:
                manifest = write(folder, files)
                oracle = {n: {"bytes": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()}
                assert manifest["files"] == oracle
                assert read(folder) == dict(sorted(files.items())) and clean(folder)

    check()


# -- 2) tampering ------------------------------------------------------------------------------------------------


def _flip_byte(folder: Path) -> None:
    path = generation(folder) / "b.bin"
    data = bytearray(path.read_bytes())
    data[100] ^= 1
    path.write_bytes(bytes(data))


def _edit(fn):
    def edit(folder: Path) -> None:
        manifest = json.loads((folder / cf.MANIFEST_FILE).read_text())
        fn(manifest)
        (folder / cf.MANIFEST_FILE).write_text(json.dumps(manifest))

    return edit


TAMPERED = {
    "changed byte": (_flip_byte, r"file b.bin fails its checksum"),
    "changed size": (lambda f: (generation(f) / "a.bin").write_bytes(b"short"), r"a.bin has 5 bytes.*truncated"),
    "grown file": (lambda f: (generation(f) / "c.txt").write_bytes(SAMPLE["c.txt"] + b"!"), "c.txt has 13 bytes"),
    "missing file": (lambda f: (generation(f) / "c.txt").unlink(), "file c.txt is missing"),
    "extra file in the generation": (
        lambda f: (generation(f) / "notes.txt").write_text("x"),
        "holds notes.txt, which the manifest does not list",
    ),
    "extra file in the manifest": (
        _edit(lambda m: m["files"].update({"d.bin": m["files"]["a.bin"]})),
        r"does not list the files.*unexpected: d.bin",
    ),
    "file dropped from the manifest": (_edit(lambda m: m["files"].pop("a.bin")), r"unlisted: a.bin"),
    "symlinked file": (
        lambda f: (generation(f) / "a.bin").unlink() or (generation(f) / "a.bin").symlink_to(f / cf.MANIFEST_FILE),
        "a.bin is not a plain file",
    ),
    "missing generation": (lambda f: os.rename(generation(f), f / "elsewhere"), "generation gen-.* is missing"),
    "generation outside": (_edit(lambda m: m.update(generation="../f")), "names no valid generation folder"),
    "name outside": (_edit(lambda m: m["files"].update({"../a.bin": m["files"].pop("a.bin")})), "outside the"),
    "size not an integer": (_edit(lambda m: m["files"]["a.bin"].update(bytes="9")), r"'bytes' \(an integer"),
    "checksum not hex": (_edit(lambda m: m["files"]["a.bin"].update(sha256="z" * 64)), r"'sha256' \(64 hex"),
    "no files": (_edit(lambda m: m.update(files={})), "lists no files"),
    "manifest not ours": (_edit(lambda m: m.update(format="refdecode-corpus-index")), "not a refdecode test folder"),
    "manifest of a future version": (_edit(lambda m: m.update(version=3)), "version 3 is not supported.*write it"),
    "version true": (_edit(lambda m: m.update(version=True)), "version True is not supported"),
    "manifest not JSON": (lambda f: (f / cf.MANIFEST_FILE).write_bytes(b'{"format": "\xff'), "is corrupt"),
    "manifest a list": (lambda f: (f / cf.MANIFEST_FILE).write_text("[]"), "not a refdecode test folder manifest"),
    "manifest too big": (lambda f: (f / cf.MANIFEST_FILE).write_text(" " * (2 << 20)), "larger than"),
    "manifest missing": (lambda f: (f / cf.MANIFEST_FILE).unlink(), "manifest.json is missing"),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_tampering_is_refused_with_one_sentence(tmp_path, case):
    tamper, message = TAMPERED[case]
    write(tmp_path / "f", SAMPLE)
    tamper(tmp_path / "f")
    with pytest.raises(cf.FolderFormatError, match=message) as err:
        read(tmp_path / "f", required=SAMPLE)
    assert "\n" not in str(err.value) and isinstance(err.value, ValueError)


@pytest.mark.parametrize("case", ["changed byte", "changed size", "missing file"])
def test_without_checksums_only_same_size_changes_pass(tmp_path, case):
    tamper, message = TAMPERED[case]
    write(tmp_path / "f", SAMPLE)
    tamper(tmp_path / "f")
    if case == "changed byte":  # the caller chose to trust bytes: sizes and names still hold
        assert read(tmp_path / "f", checksums=False)["b.bin"] != SAMPLE["b.bin"]
    else:
        with pytest.raises(cf.FolderFormatError, match=message):
            read(tmp_path / "f", checksums=False)


def test_a_flat_older_version_is_read_and_replaced_cleanly(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    for name, data in SAMPLE.items():
        (folder / name).write_bytes(data)
    (folder / "notes.md").write_text("the user's")
    files = {n: cf.file_entry(folder / n) for n in SAMPLE}
    (folder / cf.MANIFEST_FILE).write_text(json.dumps({"format": FMT.name, "version": 1, "files": files}))
    assert read(folder) == SAMPLE
    write(folder, {"a.bin": b"new"})
    assert read(folder) == {"a.bin": b"new"}
    assert sorted(p.name for p in folder.iterdir()) == sorted([cf.MANIFEST_FILE, "notes.md", generation(folder).name])


# -- 3) ownership: never written over, never removed -------------------------------------------------------------


@pytest.mark.parametrize("what", ["a file", "a link to ours", "a user's folder", "an empty folder", "a foreign one"])
def test_what_is_not_ours_is_never_written(tmp_path, what):
    target = tmp_path / "target"
    if what == "a file":
        target.write_text("precious")
    elif what == "a link to ours":
        write(tmp_path / "ours", SAMPLE)
        target.symlink_to(tmp_path / "ours")
    elif what == "a user's folder":
        target.mkdir()
        (target / "todo.txt").write_text("buy milk")
    elif what == "an empty folder":
        target.mkdir()
    else:
        target.mkdir()
        (target / cf.MANIFEST_FILE).write_text('{"format": "something-else"}')
    before = snapshot(tmp_path)
    with pytest.raises(cf.FolderFormatError, match="test folder.*remove it yourself") as err:
        write(target, SAMPLE)
    assert "\n" not in str(err.value)
    assert snapshot(tmp_path) == before


def test_ownership_options(tmp_path):
    """unmarked: a folder without any manifest is written into, its files left alone; a foreign manifest is still
    refused. through_link: a link to our folder is written through. Any version of our format is ours."""
    user = tmp_path / "user"
    user.mkdir()
    (user / "todo.txt").write_text("mine")
    assert cf.claim(user, FMT, unmarked=True) is True
    with cf.new_generation(user, FMT, replacing=True) as gen:
        (gen.dir / "a.bin").write_bytes(b"x")
        gen.commit({}, ["a.bin"])
    assert read(user) == {"a.bin": b"x"} and (user / "todo.txt").read_text() == "mine"
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / cf.MANIFEST_FILE).write_text("{}")
    with pytest.raises(cf.FolderFormatError, match="does not hold a refdecode test folder"):
        cf.claim(tmp_path / "foreign", FMT, unmarked=True)
    (tmp_path / "link").symlink_to(user)
    assert cf.claim(tmp_path / "link", FMT, through_link=True) is True
    assert cf.claim(tmp_path / "absent", FMT) is False
    _edit(lambda m: m.update(version=99))(user)
    assert cf.claim(user, FMT) is True and cf.own_manifest(user, FMT)["version"] == 99


def test_commit_refuses_a_file_name_the_format_does_not_know(tmp_path):
    with pytest.raises(ValueError, match="holds no file named x.pkl"):
        with cf.new_generation(tmp_path / "f", FMT, replacing=False) as gen:
            (gen.dir / "x.pkl").write_bytes(b"x")
            gen.commit({}, ["x.pkl"])
    assert list(tmp_path.iterdir()) == []


def test_numbered_names_match_a_pattern_and_nothing_else(tmp_path):
    """A format with a pattern for numbered files (a variable count of parts) commits and cleans those names; any
    other name is still refused, including near misses of the pattern."""
    fmt = cf.FolderFormat(
        name="refdecode-test-parts",
        version=1,
        label="parts",
        data_files=frozenset({"a.bin"}),
        data_patterns=(r"part\.[0-9]{5}\.npy",),
    )
    assert fmt.holds("a.bin") and fmt.holds("part.00000.npy") and fmt.holds("part.12345.npy")
    for bad in ("part.0000.npy", "part.000000.npy", "part.0000a.npy", "xpart.00000.npy", "part.00000.npy.tmp", "b"):
        assert not fmt.holds(bad), bad
    folder = tmp_path / "f"
    with cf.new_generation(folder, fmt, replacing=False) as gen:
        for name in ("a.bin", "part.00000.npy", "part.00001.npy"):
            (gen.dir / name).write_bytes(name.encode())
        full = gen.commit({}, ["a.bin", "part.00000.npy", "part.00001.npy"])
    assert sorted(full["files"]) == ["a.bin", "part.00000.npy", "part.00001.npy"]
    stray = folder / "gen-00000000000000aa"  # a killed write's parts: removed by the next write
    stray.mkdir()
    (stray / "part.00007.npy").write_bytes(b"x")
    users = folder / "gen-00000000000000cc"  # a near miss is not ours: kept
    users.mkdir()
    (users / "part.7.npy").write_bytes(b"mine")
    with pytest.raises(ValueError, match="holds no file named part.1.npy"):
        with cf.new_generation(folder, fmt, replacing=True) as gen:
            (gen.dir / "part.1.npy").write_bytes(b"x")
            gen.commit({}, ["part.1.npy"])
    assert not stray.exists() and (users / "part.7.npy").read_bytes() == b"mine"


def test_a_format_must_read_what_it_writes():
    with pytest.raises(ValueError, match="must be readable"):
        cf.FolderFormat(name="x", version=2, label="x", data_files=frozenset({"a"}), readable=(1,))


# -- 4) the atomic switch under failures -------------------------------------------------------------------------

_STEPS = ("replace", "rename", "fsync", "mkdir", "unlink", "rmdir", "open")


class Injected(OSError):
    pass


def _fail_at(monkeypatch, k: int) -> list[str]:
    """Make the k-th call (1-based) of any filesystem step in _STEPS raise Injected. -> the steps seen"""
    seen: list[str] = []
    for name in _STEPS:
        real = getattr(os, name)

        def step(*args, _real=real, _name=name, **kwargs):
            seen.append(_name)
            if len(seen) == k:
                raise Injected(f"injected failure at {_name}")
            return _real(*args, **kwargs)

        monkeypatch.setattr(os, name, step)
    return seen


@pytest.mark.parametrize("replacing", [True, False], ids=["replace", "new"])
def test_a_failure_at_any_step_leaves_the_old_folder_or_the_new_one(tmp_path, monkeypatch, replacing):
    """Inject a failure at every filesystem step of a write, one at a time: afterwards the folder reads exactly as
    before (old contents, or nothing for a new folder) or exactly as the new contents, never a mix or an error;
    a failure before the switch leaves nothing of the write behind, and the next write cleans up the rest."""
    new = {"a.bin": b"new a", "c.txt": b"new c"}
    with monkeypatch.context() as m:
        steps = _fail_at(m, 0)
        write(tmp_path / "probe", SAMPLE)
        if replacing:
            steps.clear()
            write(tmp_path / "probe", new)
    assert len(steps) > 5
    for k in range(1, len(steps) + 1):
        root = tmp_path / f"k{k}"
        root.mkdir()
        folder = root / "f"
        if replacing:
            write(folder, SAMPLE)
        with monkeypatch.context() as m:
            _fail_at(m, k)
            try:
                write(folder, new)
                failed = False
            except Injected:
                failed = True
        if not os.path.lexists(folder):
            assert failed and not replacing and list(root.iterdir()) == [], k  # no staging folder left
        elif read(folder) != new:
            # failed before the switch: the old folder, exactly, and nothing of the write beside it
            assert failed and replacing and read(folder) == SAMPLE and clean(folder), k
        write(folder, SAMPLE)  # the next write succeeds and leaves one clean generation
        assert read(folder) == SAMPLE and clean(folder)


def test_a_writer_that_raises_leaves_the_old_generation(tmp_path):
    write(tmp_path / "f", SAMPLE)
    before = snapshot(tmp_path)
    with pytest.raises(RuntimeError, match="disk full"):
        with cf.new_generation(tmp_path / "f", FMT, replacing=True) as gen:
            (gen.dir / "a.bin").write_bytes(b"half")
            raise RuntimeError("disk full")
    assert snapshot(tmp_path) == before
    with pytest.raises(RuntimeError, match="without committing"):
        with cf.new_generation(tmp_path / "f", FMT, replacing=True):
            pass
    assert snapshot(tmp_path) == before


# -- 5) leftovers of killed writes, and the lock -----------------------------------------------------------------


def test_the_next_write_removes_what_a_killed_write_left_and_only_that(tmp_path):
    folder = tmp_path / "f"
    write(folder, SAMPLE)
    stray = folder / "gen-00000000000000aa"
    stray.mkdir()
    (stray / "a.bin").write_bytes(b"old")
    (folder / ".manifest.json.tmp-00000000000000bb").write_text("{}")
    users = folder / "gen-00000000000000cc"
    users.mkdir()
    (users / "diary.txt").write_text("mine")
    staging = tmp_path / ".f.building-0000abcd"
    staging.mkdir()
    (staging / cf.MANIFEST_FILE).write_text("{}")
    not_staging = tmp_path / ".f.building-0000abce"
    not_staging.mkdir()
    (not_staging / "diary.txt").write_text("mine too")
    write(folder, {"b.bin": b"b"})
    assert not stray.exists() and not staging.exists() and not (folder / ".manifest.json.tmp-00000000000000bb").exists()
    assert (users / "diary.txt").read_text() == "mine" and (not_staging / "diary.txt").read_text() == "mine too"
    assert read(folder) == {"b.bin": b"b"}


def test_two_writers_of_one_folder_are_refused_not_mixed(tmp_path):
    folder = tmp_path / "f"
    write(folder, SAMPLE)
    with cf.new_generation(folder, FMT, replacing=True) as gen:
        with pytest.raises(cf.FolderFormatError, match="another refdecode process is writing"):
            write(folder, {"a.bin": b"second"})
        (gen.dir / "a.bin").write_bytes(b"first")
        gen.commit({}, ["a.bin"])
    assert read(folder) == {"a.bin": b"first"} and clean(folder)


# -- 6) the corpus extra -----------------------------------------------------------------------------------------


def test_import_refdecode_loads_no_optional_dependency():
    code = (
        "import sys, refdecode, refdecode.corpus, refdecode.memory, refdecode.heads\n"
        "from refdecode.corpus import SpanIndex\n"
        "refdecode.OutputMemory(100).record([1, 2, 3])\n"
        "import refdecode.corpus.cli, refdecode.corpus.index\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('faiss', 'datasketch', 'ray', 'pyarrow'))\n"
        "assert not loaded, loaded\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("missing", ["faiss", "datasketch"])
def test_a_corpus_feature_without_the_extra_names_the_install_command(tmp_path, monkeypatch, missing):
    from refdecode.corpus import CorpusIndex, build_index
    from refdecode.corpus.testing import WordTokenizer

    def build():
        return build_index(
            [tmp_path / "doc.md"],
            tmp_path / "idx",
            tokenizer=WordTokenizer(),
            model_name="toy",
            embedder="hashed",
            progress=False,
        )

    (tmp_path / "doc.md").write_text("alpha beta gamma delta " * 40)
    monkeypatch.setitem(sys.modules, missing, None)  # import raises ImportError, as when it is not installed
    with pytest.raises(ImportError, match=r"not installed: pip install 'refdecode\[corpus\]'") as err:
        build()
    assert "\n" not in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.md"]  # refused before anything was written
    if missing == "faiss":  # an index built with the extra does not load without it
        monkeypatch.undo()  # faiss is back
        build()
        monkeypatch.setitem(sys.modules, missing, None)
        with pytest.raises(ImportError, match=r"corpus indexes need faiss-cpu.*pip install 'refdecode\[corpus\]'"):
            CorpusIndex.load(tmp_path / "idx")
