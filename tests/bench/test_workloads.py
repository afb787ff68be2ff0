"""Benchmark data parsing and workload sampling: offline tests on synthetic data, plus real-data checks that are
skipped when the cache (`python -m scripts.prepare_data`) is absent."""

import json
import random
import types

import pytest

from refdecode.bench import data, workloads
from refdecode.bench.workloads import Request, chunk_rest, load_workload

FAQ_REST = """\
:tocdepth: 2

===============
Programming FAQ
===============

.. contents::

General Questions
=================

Is there a debugger?
--------------------

Yes.

See :mod:`pdb`.

.. _faq-label:

How do you remove multiple items from a list
--------------------------------------------

Use a list comprehension::

   mylist = [x for x in mylist if keep(x)]

Empty Group
===========

Core Language
=============

Why is this?
------------
Because.
"""


def test_faq_sections_are_leaf_sections_with_bodies():
    sections = data.faq_sections(FAQ_REST)
    assert [h for h, _ in sections] == [
        "Is there a debugger?",
        "How do you remove multiple items from a list",
        "Why is this?",
    ]
    assert sections[0][1] == "Yes.\n\nSee :mod:`pdb`."  # the next section's label is not in the body
    assert sections[1][1].endswith("mylist = [x for x in mylist if keep(x)]")
    assert sections[2][1] == "Because."


def test_faq_heading_line_is_the_exact_line():
    text = FAQ_REST.replace("Why is this?\n------------", "Why is this?  \n--------------")
    heading, _ = data.faq_sections(text)[-1]
    assert heading == "Why is this?  " and heading in text.splitlines()


def test_truncated_json_array_keeps_whole_records(tmp_path):
    records = [{"id": str(i), "conversations": [{"from": "human", "value": "x" * i}]} for i in range(5)]
    full = json.dumps(records, indent=2)
    assert data.decode_json_array_prefix(full) == (records, len(full))
    cut = full[: full.index('"id": "4"') + 12]  # broken inside the last record
    got, end = data.decode_json_array_prefix(cut)
    assert got == records[:4] and end < len(cut)
    assert data.decode_json_array_prefix("[]") == ([], 2)


def test_sharegpt_roles_are_normalized():
    turns = [
        {"from": "gpt", "value": "hi"},
        {"from": "human", "value": "make it 1 / 1"},
        {"from": "chatgpt", "value": "ok"},
    ]
    assert data.normalize_conversation(turns) == [
        {"role": "user", "content": "make it"},
        {"role": "assistant", "content": "ok"},
    ]
    assert data.normalize_conversation([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]) is None
    assert data.normalize_conversation([{"from": "system", "value": "a"}]) is None


def test_chunk_rest_respects_word_bounds():
    paragraphs = [" ".join(f"w{i}_{j}" for j in range(40 + 7 * (i % 5))) for i in range(30)]
    text = "\n\n".join(paragraphs)
    chunks = chunk_rest(text, min_words=150, max_words=300)
    assert " ".join(" ".join(chunks).split()) == " ".join(text.split())  # nothing lost or reordered
    assert all(len(c.split()) <= 300 for c in chunks)
    assert all(len(c.split()) >= 150 for c in chunks[:-1])


def test_chunk_rest_splits_one_huge_paragraph():
    chunks = chunk_rest(" ".join(["word"] * 1000), min_words=150, max_words=300)
    assert [len(c.split()) for c in chunks] == [300, 300, 300, 100]
    with pytest.raises(ValueError):
        chunk_rest("x", min_words=10, max_words=5)


@pytest.fixture
def fake_data(monkeypatch, tmp_path):
    """Every data reader replaced by small synthetic sources."""
    rng = random.Random(1)

    def code(k):
        return "".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(k))

    pairs = [
        {
            "id": f"pkg-1-2/m{i}.py",
            "package": "pkg",
            "path": f"m{i}.py",
            "old_version": "1",
            "new_version": "2",
            "old": code(20 + i),
            "new": code(20 + i).replace("+ 3", "- 3"),
        }
        for i in range(12)
    ]
    docs = tmp_path / "docs"
    (docs / "faq").mkdir(parents=True)
    (docs / "faq" / "programming.rst.txt").write_text(FAQ_REST)
    for i in range(4):
        (docs / f"lib{i}.rst.txt").write_text("\n\n".join(" ".join(f"d{i}w{j}" for j in range(60)) for _ in range(6)))
    monkeypatch.setattr(data, "code_edit_pairs", lambda: pairs)
    monkeypatch.setattr(data, "python_docs_dir", lambda: docs)
    monkeypatch.setattr(
        data,
        "aclsum_pairs",
        lambda: [
            {
                "id": f"P{i}",
                "paper": "Title\n\n" + "\n\n".join("A sentence here. " * 30 for _ in range(20)),
                "abstract": "abs",
            }
            for i in range(6)
        ],
    )
    conversations = [
        [
            {"role": "user" if t % 2 == 0 else "assistant", "content": f"turn {t} " * rng.randint(1, 300)}
            for t in range(rng.randint(1, 8))
        ]
        for _ in range(30)
    ]
    monkeypatch.setattr(data, "sharegpt_conversations", lambda: conversations)
    monkeypatch.setattr(
        data, "chitchat_dialogs", lambda: [[f"hi {i}", "hello", "how are you?", "fine"] for i in range(10)]
    )
    monkeypatch.setattr(
        data,
        "humaneval_problems",
        lambda: [{"task_id": f"HumanEval/{i}", "prompt": f'def f{i}():\n    """Doc."""\n'} for i in range(10)],
    )
    monkeypatch.setattr(
        data,
        "spec_bench_questions",
        lambda: [
            {"question_id": i, "category": c, "turns": [f"question {i}"]}
            for i, c in enumerate(
                ["writing", "coding"] * 5 + ["translation", "summarization", "qa", "math_reasoning", "rag"] * 4
            )
        ],
    )


class FakeIndex:
    """Retrieval by word overlap over fixed passages: enough to build rag-index prompts."""

    def __init__(self, texts):
        self.texts = texts

    def retrieve(self, query, k=4):
        words = set(query.lower().split())
        ranked = sorted(self.texts, key=lambda t: -len(words & set(t.lower().split())))
        return [types.SimpleNamespace(text=t) for t in ranked[:k]]


FAKE_INDEX = FakeIndex([f"passage {i} about lists tuples and dicts" for i in range(5)])


@pytest.mark.parametrize("name", workloads.WORKLOADS)
def test_sampling_is_seeded_and_well_formed(fake_data, name):
    extra = {"index": FAKE_INDEX} if name == "rag-index" else {}

    def load_workload(name, **kw):
        return workloads.load_workload(name, **kw, **extra)

    a = load_workload(name, n=4, seed=3)
    assert a == load_workload(name, n=4, seed=3)
    assert load_workload(name, n=2, seed=3) == a[:2]  # a request does not depend on n
    assert 1 <= len(a) <= 4 and len({r.id for r in a}) == len(a)
    for r in a:
        assert isinstance(r, Request) and r.workload == name
        assert (r.messages is not None) == r.chat and (r.prompt is not None) == (not r.chat)
        if r.chat:
            assert r.messages[-1]["role"] == "user"
    seeds = {tuple(r.id for r in load_workload(name, n=4, seed=s)) for s in range(6)}
    assert len(seeds) > 1  # the seed matters


def test_workload_specifics(fake_data):
    ref = load_workload("code-edit-ref", n=3, seed=0)
    for r in ref:
        ((source, old),) = r.references
        assert old not in r.prompt and 15 <= r.prompt.count("\n") <= 25 and source.startswith("pkg-1/")
    rag = load_workload("rag", n=3, seed=0)
    assert all(r.messages[0]["content"].endswith("Answer using the passages.") for r in rag)
    rag_index = load_workload("rag-index", n=3, seed=0, index=FAKE_INDEX)
    assert all(r.messages[0]["content"].count("Passage ") == 3 for r in rag_index)
    with pytest.raises(ValueError, match="corpus index"):
        load_workload("rag-index", n=3, seed=0)
    control = load_workload("control", n=4, seed=0)
    assert [r.chat for r in control] == [True, False, True, False]
    spec = load_workload("spec-bench", n=12, seed=0)
    assert sorted({r.category for r in spec}) == sorted(
        ["mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag"]
    )
    assert all(sum(r.category == c for r in spec) == 2 for c in {r.category for r in spec})


def test_prompt_budget_is_enforced(fake_data):
    for name in ("summarize", "chat", "rag"):
        for r in load_workload(name, n=5, seed=0, max_prompt_tokens=300):
            assert workloads.request_tokens(r) <= 300


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="known: code-edit"):
        load_workload("nope", n=1)
    with pytest.raises(ValueError):
        load_workload("chat", n=0)
    with pytest.raises(ValueError):
        data.fetch_all(progress=False, names=["nope"])


def test_missing_source_names_the_fetch_command(monkeypatch, tmp_path):
    monkeypatch.setenv("REFDECODE_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="prepare_data --only aclsum"):
        data.aclsum_pairs()


def test_failed_command_is_a_runtime_error_naming_it():
    with pytest.raises(RuntimeError, match="false"):
        data.run_command(["false"], progress=False)
    with pytest.raises(RuntimeError, match="not found"):
        data.run_command(["refdecode-no-such-binary"], progress=False)


def test_interrupted_fetch_leaves_no_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("REFDECODE_DATA", str(tmp_path))
    with pytest.raises(RuntimeError):
        with data.fresh_source("demo", progress=False) as (work, _):
            (work / "half.txt").write_text("x")
            raise RuntimeError("network down")
    assert list(tmp_path.iterdir()) == [] and not data.is_fetched("demo")
    with data.fresh_source("demo", progress=False) as (work, _):
        (work / "all.txt").write_text("x")
    assert data.is_fetched("demo") and (tmp_path / "demo" / "all.txt").exists()
    with data.fresh_source("demo", progress=False) as dirs:
        assert dirs is None  # second fetch is skipped


# ---------------------------------------------------------------------------------------------------------------
# real data (skipped without the cache)

ALL_FETCHED = all(data.is_fetched(name) for name in data.SOURCES)


@pytest.mark.skipif(not ALL_FETCHED, reason="benchmark data not fetched (python -m scripts.prepare_data)")
def test_real_sources_have_expected_sizes():
    assert len(data.aclsum_pairs()) == 250
    faq = data.faq_pairs()
    assert len(faq) > 150
    for p in faq:
        text = (data.python_docs_dir() / p["file"]).read_text(encoding="utf-8")
        assert p["heading_line"] in text.splitlines() and p["answer"] in text
    assert len(data.humaneval_problems()) == 164
    assert len(data.code_edit_pairs()) > 50


@pytest.mark.skipif(not ALL_FETCHED, reason="benchmark data not fetched (python -m scripts.prepare_data)")
@pytest.mark.parametrize("name", [w for w in workloads.WORKLOADS if w not in ("chat", "rag-index")])
def test_real_workloads_load(name):
    if name == "spec-bench" and not data.spec_bench_path().is_file():
        pytest.skip(f"Spec-Bench questions not at {data.spec_bench_path()} (shared/ is not beside this checkout)")
    requests = load_workload(name, n=6, seed=0)
    assert len(requests) == 6
    assert requests == load_workload(name, n=6, seed=0)
