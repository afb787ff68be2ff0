"""ReferenceStore: small memory per token, streamed or refused large references, no per-call copies, clear errors
for bad token ids, and a plain-string `references=` taken as one reference."""

import os
import signal
import time
import traceback

import numpy as np
import pytest
import torch
from stats_helpers import IdTokenizer, tiny_llama

import refdecode
import refdecode.store as store_module
from refdecode.drafters import ReferenceDrafter
from refdecode.policy import DraftPolicy, ForwardCostModel
from refdecode.store import ReferenceStore


class CharTokenizer:
    """One token per character (its code point): block boundaries cannot change the ids, so streamed and whole
    tokenization must agree exactly."""

    def __len__(self):
        return 0x110000

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(map(chr, ids))


def test_memory_per_token_is_near_the_token_arrays():
    # Regression: ~550 bytes per reference token (a trie of every reversed 12-gram); now the suffix array's ~8-10.
    rng = np.random.default_rng(0)
    store = ReferenceStore(IdTokenizer(49152))
    for i in range(20):
        store.add(rng.integers(0, 49152, size=10_000), source=f"doc-{i}")
    assert store.longest_suffix(store.tokens(3)[:5]).length == 5
    assert store.index.nbytes() <= 10 * store.num_tokens


def test_lookups_and_continuations_match_the_documents():
    store = ReferenceStore(IdTokenizer(20))
    store.add([1, 2, 3, 4, 5], source="a")
    store.add([9, 2, 3, 7], source="b")
    match = store.longest_suffix([8, 2, 3])
    assert match.length == 2 and match.positions == ((1, 2), (0, 2))  # the most recent document first
    assert store.continuation((1, 2), 10) == [7] and store.continuation((0, 2), 2) == [4, 5]
    assert store.tokens(1) == [9, 2, 3, 7] and store.source_of(1) == "b"


def test_text_is_tokenized_in_blocks(monkeypatch):
    monkeypatch.setattr(store_module, "_BLOCK_CHARS", 10)
    text = "héllo wörld\n" * 7 + "a long line without any break in it at all" + "\nend"
    store = ReferenceStore(CharTokenizer())
    calls = []
    encode = store.tokenizer.encode
    monkeypatch.setattr(store.tokenizer, "encode", lambda t, **kw: calls.append(len(t)) or encode(t, **kw))
    store.add(text)
    assert store.tokens(0) == [ord(c) for c in text]
    assert len(calls) > 5 and max(calls) <= 10


def test_files_are_read_in_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "_READ_BYTES", 7)  # splits multi-byte characters across reads
    monkeypatch.setattr(store_module, "_BLOCK_CHARS", 16)
    text = "ünïcödé ✓ lines\n" * 20 + "🙂" * 30 + "\nlast line without newline"
    path = tmp_path / "ref.txt"
    path.write_text(text, encoding="utf-8")
    store = ReferenceStore(CharTokenizer())
    store.add_file(path)
    assert store.tokens(0) == [ord(c) for c in text] and store.source_of(0) == str(path)


def test_file_errors_name_the_file(tmp_path):
    store = ReferenceStore(CharTokenizer())
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine text\n" * 3 + b"\xff rest")
    with pytest.raises(ValueError, match=r"not UTF-8 text: .*bad.txt \(invalid byte at offset 30\)"):
        store.add_file(bad)
    with pytest.raises(ValueError, match="not found"):
        store.add_file(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="directory"):
        store.add_file(tmp_path)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        store.add_file(tmp_path / "empty.txt")
    assert len(store) == 0 and store.num_tokens == 0


def test_a_huge_file_is_refused_before_it_is_read(tmp_path):
    # Regression: a reference file was read whole into memory, then tokenized whole. A 1 GB sparse file: refused
    # from its size alone, naming the limit and the corpus index to use instead.
    path = tmp_path / "huge.txt"
    with open(path, "wb") as f:
        f.truncate(2**30)
    store = ReferenceStore(IdTokenizer(100))
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"too large \(1,073,741,824 bytes.*at most 16,000,000 tokens.*index build"):
        store.add_file(path)
    assert time.perf_counter() - t0 < 1.0 and len(store) == 0


def test_the_token_limit_is_checked_while_streaming():
    store = ReferenceStore(IdTokenizer(100), max_tokens=50)
    store.add(list(range(30)))
    with pytest.raises(ValueError, match="does not fit .*60 tokens in all.*at most 50 tokens.*index build"):
        store.add(list(range(30)))
    with pytest.raises(ValueError, match="too large"):
        store.add("1 " * 200)  # refused from its length before tokenizing
    small = ReferenceStore(IdTokenizer(100), max_tokens=50)
    with pytest.raises(ValueError, match="does not fit"):
        small.add("1 2\n" * 30)  # fits the length bound, passes the limit while its blocks are tokenized
    assert store.num_tokens == 30 and len(store) == 1 and small.num_tokens == 0


def test_bad_token_ids_are_reported_against_the_vocabulary():
    store = ReferenceStore(IdTokenizer(100))
    for bad, message in (
        ([1, 100], r"token id 100 is outside this vocabulary \(size 100\)"),
        ([-3, 1], r"token id -3 is outside this vocabulary \(size 100\)"),
        ([1, 2.5], "must be integers"),
        ([True, 1], "must be integers"),
        (["1", "2"], "must be integers"),
        (torch.tensor([1.0]), "must be integers"),
        (torch.tensor([True]), "must be integers"),
        ([], "has no tokens"),
    ):
        with pytest.raises(ValueError, match=message):
            store.add(bad)
    store.add(np.array([1, 2, 3], dtype=np.int16))
    store.add(torch.tensor([4, 5, 6]))
    assert [store.tokens(0), store.tokens(1)] == [[1, 2, 3], [4, 5, 6]]


def test_drafting_from_several_stores_copies_nothing(monkeypatch):
    # Regression: generate(store=, index=) and hf_generate(store=, references=) copied the whole store per call.
    monkeypatch.setattr(ReferenceStore, "copy", lambda self: pytest.fail("a store was copied"))
    big = ReferenceStore(IdTokenizer(50))
    big.add([1, 2, 3, 4, 5, 6])
    extra = ReferenceStore(IdTokenizer(50))
    extra.add([7, 8, 9, 10])
    assert ReferenceDrafter([0, 7, 8], store=[extra, big]).propose([0, 7, 8], 5).tokens == [9, 10]
    assert ReferenceDrafter([0, 2, 3], store=[extra, big]).propose([0, 2, 3], 5).tokens == [4, 5, 6]
    assert len(big) == 1 and len(extra) == 1


def test_attach_index_keeps_the_callers_store(monkeypatch):
    from refdecode.corpus import CorpusIndex, Passage
    from refdecode.drafters import attach_index

    monkeypatch.setattr(ReferenceStore, "copy", lambda self: pytest.fail("a store was copied"))
    index = object.__new__(CorpusIndex)  # retrieval only: two fixed passages
    index.retrieve = lambda query, k, reranker, candidates: [Passage(7, "", [5, 6, 7], 1.0, "src")]
    index.check_tokenizer = lambda tokenizer: None  # a stand-in index has no manifest to check against
    store = ReferenceStore(IdTokenizer(50))
    store.add([1, 2, 3])
    stores, spans = attach_index(index, IdTokenizer(50), [1, 2], store, retrieve_k=1)
    assert spans is index and stores[1] is store and len(store) == 1
    assert stores[0].tokens(0) == [5, 6, 7] and stores[0].source_of(0) == "src#7"


def _flat_policy():
    """Wide forwards priced as free: no timing calibration (seconds on a shared CPU) and drafting that does not
    depend on this machine."""
    return DraftPolicy(costs=ForwardCostModel({1: 1.0, 64: 1.0}))


def test_hf_generate_takes_a_plain_string_as_one_reference(monkeypatch):
    import refdecode.drafters.build as build_module  # where hf_generate's drafter is built (build_drafting)

    seen = {}
    real = build_module.ReferenceDrafter
    monkeypatch.setattr(
        build_module,
        "ReferenceDrafter",
        lambda prompt, store=None, spans=None, **kw: seen.setdefault("d", real(prompt, store=store, **kw)),
    )
    model = tiny_llama(vocab_size=50, seed=0)
    x = torch.tensor([[3, 4, 5]])
    model.generate(
        x,
        max_new_tokens=3,
        do_sample=False,
        custom_generate=refdecode.hf_generate,
        references="5 6 7 8",
        ref_tokenizer=IdTokenizer(50),
        policy=_flat_policy(),
    )
    (extra,) = seen["d"].sources[1:]
    assert len(extra) == 1 and extra.tokens(0) == [5, 6, 7, 8]


def _in_forked_child(work, timeout: float = 300.0) -> tuple[int, str]:
    """Run `work()` in a forked child (it inherits the imported torch and refdecode, so no interpreter start-up) and
    return (its wait status, the traceback it wrote or ""). A child that crashes the interpreter or hangs fails only
    the calling test; one still running after `timeout` seconds is SIGKILLed."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        os.close(read_end)
        code = 1
        try:
            torch.set_num_threads(1)  # an OpenMP pool the parent used is not safe to use after a fork
            work()
            code = 0
        except BaseException:  # noqa: BLE001 - everything goes back to the parent as text
            os.write(write_end, traceback.format_exc()[-4000:].encode())
        finally:
            os._exit(code)
    os.close(write_end)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            break
        time.sleep(0.05)
    with os.fdopen(read_end, "rb") as child_output:
        return status, child_output.read().decode(errors="replace")


def _generate_with_one_character_references():
    model = tiny_llama(vocab_size=50, seed=0)
    for refs in ("7", ["7", "8"], [[7], [8]]):
        model.generate(
            torch.tensor([[3, 7]]),
            max_new_tokens=4,
            do_sample=False,
            custom_generate=refdecode.hf_generate,
            references=refs,
            ref_tokenizer=IdTokenizer(50),
            policy=DraftPolicy(costs=ForwardCostModel({1: 1.0, 64: 1.0})),
        )
    store = ReferenceStore(IdTokenizer(50))
    refdecode.generate(model, IdTokenizer(50), [3, 7], store=store, max_new_tokens=4, calibrate=False)


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_one_character_references_do_not_end_the_process():
    # Regression: references="text" was iterated one character at a time, one-token documents, an index without
    # n-grams, and pyahocorasick ended the interpreter. In a forked child so a regression fails just this test.
    status, error = _in_forked_child(_generate_with_one_character_references)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (status, error)
