"""The held-out user requests (scripts/user_requests.py): each kind built from the standard library and the docs
pages, code quoted or referenced whole, RAG passages that hold the answer's word, and a clean error without data."""

from __future__ import annotations

import json

import pytest

from refdecode.bench import data
from scripts import user_requests
from scripts.user_requests import CHAT, CODE_EDIT, CODE_EDIT_REF, RAG, SUMMARIZE, build, function_source, stdlib_source

MODULE = (
    "import re\n\n_re = re.compile('x')\n\n\ndef first(a):\n    '''Doc.'''\n\n    return a\n\n\n"
    "def second():\n    pass\n"
)


def test_function_source_is_the_whole_top_level_def_and_nothing_after():
    assert function_source(MODULE, "first") == "def first(a):\n    '''Doc.'''\n\n    return a"
    assert function_source(MODULE, "second") == "def second():\n    pass"


def fake_docs(root):
    """Every page the requests read, each a few paragraphs; RAG pages hold their answer's word in one of them."""
    pages = {page for page, *_ in RAG} | {other for _, _, other, _ in RAG} | {page for page, _ in SUMMARIZE}
    words = {page: word for page, word, _, _ in RAG}
    for page in pages:
        path = root / page
        path.parent.mkdir(parents=True, exist_ok=True)
        filler = " ".join(["text"] * 160)
        path.write_text(f"{filler}\n\n{filler} {words.get(page, '')} answer\n\n{filler}\n", encoding="utf-8")
    return root


def test_build_makes_two_requests_of_each_kind_from_the_sources(tmp_path):
    requests = build(fake_docs(tmp_path))
    kinds = [r.workload for r in requests]
    assert kinds.count("code-edit-ref") == len(CODE_EDIT_REF) == 2
    assert kinds.count("code-edit") == len(CODE_EDIT) == 2
    assert kinds.count("rag") == len(RAG) == 2 and kinds.count("summarize") == len(SUMMARIZE) == 2
    assert kinds.count("chat") == len(CHAT) == 2
    assert len({r.id for r in requests}) == len(requests)
    for r in requests:
        assert r.chat and r.messages and r.messages[-1]["role"] == "user"
    for (module, _), r in zip(CODE_EDIT_REF, [r for r in requests if r.workload == "code-edit-ref"], strict=True):
        assert r.references == ((module, stdlib_source(module)),)  # the old file only as a reference, whole
        assert "def " not in r.messages[0]["content"]
    for (module, function, _), r in zip(CODE_EDIT, [r for r in requests if r.workload == "code-edit"], strict=True):
        assert function_source(stdlib_source(module), function) in r.messages[0]["content"] and not r.references
    for (_, word, _, _), r in zip(RAG, [r for r in requests if r.workload == "rag"], strict=True):
        assert f"{word} answer" in r.messages[0]["content"]


def test_missing_docs_are_a_clean_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("REFDECODE_DATA", str(tmp_path))
    assert not data.is_fetched("python_docs")
    assert user_requests.main(["--out", str(tmp_path / "out.json")]) == 2
    assert "prepare_data --only python_docs" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


@pytest.mark.skipif(
    not data.is_fetched("python_docs"), reason="python docs not fetched (python -m scripts.prepare_data)"
)
def test_the_real_requests_render_for_the_benchmark(tmp_path):
    from refdecode.bench.runner import load_requests

    out = tmp_path / "requests.json"
    assert user_requests.main(["--model", "smollm2-135m", "--out", str(out)]) == 0
    requests, meta = load_requests(out)
    assert len(requests) == 10 and meta["source"] == "user_requests"
    assert all(r.prompt_ids for r in requests)
    assert json.loads(out.read_text())["meta"]["model"] == "smollm2-135m"
