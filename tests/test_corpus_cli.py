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
    return run(capsys, "index", "build", str(src), "--out", str(out), "--model", "toy", "--embedder", "hashed",
               "--quiet", *extra)


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
    code, _, err = run(capsys, "index", "build", str(src), "--out", str(tmp_path / "idx"), "--model",
                       "missing-model", "--quiet")
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
    code, out, _ = run(capsys, "index", "search", str(tmp_path / "idx"), "olive lemon", "-k", "2", "--rerank", "5",
                       "--model", "toy")
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
