"""`refdecode index build|info|search`: working commands, and one clear stderr line (no traceback) on bad input."""

import argparse
import json

import pytest

import refdecode.corpus.cli as cli
from refdecode.corpus.testing import WordTokenizer


@pytest.fixture(autouse=True)
def toy_tokenizer(monkeypatch):
    def load(name):
        if name == "missing-model":
            raise ValueError(f"unknown model {name!r}")
        return WordTokenizer(salt="" if name == "toy" else name)

    monkeypatch.setattr(cli, "_load_tokenizer", load)


@pytest.fixture
def src(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "a.md").write_text("# Title\n\nmango peach plum and the quiet orchard\n\nmore words here\n")
    (folder / "b.rst").write_text("Heading\n=======\n\nolive lemon grape in a tidy row\n")
    return folder


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def build(capsys, src, out, *extra):
    return run(
        capsys,
        "index",
        "build",
        str(src),
        "--out",
        str(out),
        "--model",
        "toy",
        "--embedder",
        "hashed",
        "--quiet",
        *extra,
    )


def assert_one_line_error(code, err, pattern):
    assert code == 1
    assert err.count("\n") == 1 and "Traceback" not in err and pattern in err


def test_build_info_search(capsys, src, tmp_path):
    code, out, err = build(capsys, src, tmp_path / "idx")
    assert code == 0 and "2 documents" in out
    code, out, _ = run(capsys, "index", "info", str(tmp_path / "idx"), "--model", "toy")
    assert code == 0 and "model_name" in out and "toy" in out
    code, out, _ = run(capsys, "index", "search", str(tmp_path / "idx"), "olive lemon", "-k", "1")
    assert code == 0 and "olive lemon" in out and "b.rst" in out


def test_errors_are_one_line(capsys, src, tmp_path):
    code, _, err = build(capsys, tmp_path / "nowhere", tmp_path / "idx")
    assert_one_line_error(code, err, "does not exist")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00bad")
    code, _, err = build(capsys, tmp_path / "bad.txt", tmp_path / "idx")
    assert_one_line_error(code, err, "not UTF-8")
    (tmp_path / "empty.txt").write_text("\n")
    code, _, err = build(capsys, tmp_path / "empty.txt", tmp_path / "idx")
    assert_one_line_error(code, err, "empty")
    code, _, err = run(
        capsys, "index", "build", str(src), "--out", str(tmp_path / "idx"), "--model", "missing-model", "--quiet"
    )
    assert_one_line_error(code, err, "unknown model")
    assert not (tmp_path / "idx").exists()

    assert build(capsys, src, tmp_path / "idx")[0] == 0
    code, _, err = build(capsys, src, tmp_path / "idx")
    assert_one_line_error(code, err, "--force")
    assert build(capsys, src, tmp_path / "idx", "--force")[0] == 0

    code, _, err = run(capsys, "index", "info", str(tmp_path / "idx"), "--model", "other")
    assert_one_line_error(code, err, "another tokenizer")
    gen = json.loads((tmp_path / "idx" / "manifest.json").read_text())["generation"]
    faiss_file = tmp_path / "idx" / gen / "passages.faiss"
    faiss_file.write_bytes(faiss_file.read_bytes()[:20])
    code, _, err = run(capsys, "index", "search", str(tmp_path / "idx"), "olive")
    assert_one_line_error(code, err, "truncated")
    code, _, err = run(capsys, "index", "info", str(tmp_path / "nothing"))
    assert_one_line_error(code, err, "no index")


def test_search_with_rerank(capsys, src, tmp_path, monkeypatch, tiny_llama):
    """--rerank N loads --model and reranks; without --model it is a one-line error."""
    import refdecode.models

    build(capsys, src, tmp_path / "idx")
    code, _, err = run(capsys, "index", "search", str(tmp_path / "idx"), "olive", "--rerank", "5")
    assert_one_line_error(code, err, "--rerank needs --model")
    vocab = tiny_llama.config.vocab_size
    monkeypatch.setattr(refdecode.models, "load_model", lambda name: (tiny_llama, WordTokenizer(vocab)))
    code, out, _ = run(
        capsys, "index", "search", str(tmp_path / "idx"), "olive lemon", "-k", "2", "--rerank", "5", "--model", "toy"
    )
    assert code == 0 and out.count("passage ") == 2 and "b.rst" in out and "a.md" in out


def test_interrupted_build_exits_130(capsys, src, tmp_path, monkeypatch):
    import refdecode.corpus.index as index_module

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(index_module, "find_near_duplicates", interrupt)
    code, _, err = build(capsys, src, tmp_path / "idx")
    assert code == 130 and "no index was written" in err and not (tmp_path / "idx").exists()


def test_commands_attach_to_a_parent_parser():
    parser = argparse.ArgumentParser(prog="refdecode")
    cli.add_index_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["index", "search", "indexes/x", "a query", "-k", "2"])
    assert args.func is cli.cmd_index_search and args.k == 2 and args.query == "a query"


def test_force_never_replaces_what_is_not_an_index(capsys, src, tmp_path):
    """--force onto the sources, a notes folder or a file: one line, exit 1, every byte still there."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.md").write_text("keep me\n")
    (tmp_path / "file.txt").write_text("keep me too\n")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for out, pattern in (
        (src, "overlaps the source"),
        (src / "idx", "overlaps the source"),
        (notes, "does not hold a refdecode index"),
        (tmp_path / "file.txt", "not a folder"),
    ):
        code, _, err = build(capsys, src, out, "--force")
        assert_one_line_error(code, err, pattern)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "notes", "src"]


def test_jsonl_with_a_lone_surrogate_is_one_line(capsys, tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "broken \\ud800 here"}\n')
    code, _, err = build(capsys, tmp_path / "bad.jsonl", tmp_path / "idx")
    assert_one_line_error(code, err, "bad.jsonl:2: field 'text' holds a lone surrogate (U+D800")
    assert not (tmp_path / "idx").exists()


def _edit_manifest(index_dir, fn):
    path = index_dir / "manifest.json"
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


@pytest.mark.parametrize(
    ("case", "pattern"),
    [
        ("missing sha256", "'sha256' (64 hex digits)"),
        ("missing counts", "field 'counts' is missing"),
        ("missing model_name", "field 'model_name' is missing"),
        ("missing dim", "'embedder.dim' is not an integer"),
        ("dim 0", "'embedder.dim' is not an integer"),
        ("dim 1e13", "'embedder.dim' is not an integer"),
        ("empty sources.json", "sources.json: lists no sources"),
        ("files {}", "lists no files"),
    ],
)
def test_malformed_index_is_one_line(capsys, src, tmp_path, case, pattern):
    """Once a KeyError, ZeroDivisionError, a 36 TiB allocation or an IndexError; now one line naming the field."""
    from refdecode.checked_folder import file_entry

    out = tmp_path / "idx"
    assert build(capsys, src, out)[0] == 0
    gen = out / json.loads((out / "manifest.json").read_text())["generation"]
    edits = {
        "missing sha256": lambda m: m["files"]["span_sa.00000.npy"].pop("sha256"),
        "missing counts": lambda m: m.pop("counts"),
        "missing model_name": lambda m: m.pop("model_name"),
        "missing dim": lambda m: m["embedder"].pop("dim"),
        "dim 0": lambda m: m["embedder"].update(dim=0),
        "dim 1e13": lambda m: m["embedder"].update(dim=1e13),
        "files {}": lambda m: m.update(files={}),
    }
    if case == "empty sources.json":
        (gen / "sources.json").write_text("[]")
        _edit_manifest(out, lambda m: m["files"].update({"sources.json": file_entry(gen / "sources.json")}))
    else:
        _edit_manifest(out, edits[case])
    for argv in (("info", str(out)), ("search", str(out), "olive"), ("search", str(out), "olive", "--no-checksums")):
        code, out_text, err = run(capsys, "index", *argv)
        assert_one_line_error(code, err, pattern)
        assert out_text == ""


def test_an_unexpected_error_is_still_one_line(capsys, src, tmp_path, monkeypatch):
    import refdecode.corpus.index as index_module

    def bug(*a, **k):
        raise TypeError("a bug\nwith a second line")

    monkeypatch.setattr(index_module, "build_index", bug)
    code, _, err = build(capsys, src, tmp_path / "idx")
    assert_one_line_error(code, err, "unexpected TypeError (please report this): a bug")


def test_ray_build_without_ray_is_one_line_naming_the_extra(capsys, src, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import raises ImportError, as when it is not installed
    code, _, err = build(capsys, src, tmp_path / "idx", "--ray")
    assert_one_line_error(code, err, "building on Ray (engine='ray', --ray) needs ray[data], which is not installed")
    assert "pip install 'refdecode[ray]'" in err
    assert not (tmp_path / "idx").exists()
