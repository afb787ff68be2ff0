"""The span index against brute-force longest-suffix search on random token sequences."""

import numpy as np
import pytest

from refdecode.corpus.spans import DEPTH, SpanIndex


def brute_longest(docs, tail):
    """Longest L <= DEPTH such that tail[-L:] occurs inside one document; and every continuation after it."""
    best, conts = 0, []
    for L in range(1, min(DEPTH, len(tail)) + 1):
        pat = list(tail[-L:])
        found = [(d, i + L) for d in docs for i in range(len(d) - L + 1) if list(d[i : i + L]) == pat]
        if not found:
            break
        best, conts = L, found
    return best, conts


def random_docs(rng, vocab):
    return [rng.integers(0, vocab, size=int(rng.integers(0, 60))).tolist() for _ in range(int(rng.integers(1, 6)))]


def random_tail(rng, docs, vocab):
    tail = rng.integers(0, vocab, size=int(rng.integers(1, 25))).tolist()
    long_docs = [d for d in docs if len(d) > 3]
    if long_docs and rng.random() < 0.6:  # often end the query inside a document
        d = long_docs[int(rng.integers(len(long_docs)))]
        a = int(rng.integers(0, len(d) - 2))
        tail = tail[:3] + d[a : int(rng.integers(a + 1, len(d) + 1))]
    return tail


@pytest.mark.parametrize("vocab_size", [4, 70_000])  # uint16 and uint32 streams
def test_longest_match_equals_brute_force(vocab_size):
    rng = np.random.default_rng(vocab_size)
    for _ in range(150):
        vocab = int(rng.integers(2, 6))
        docs = random_docs(rng, vocab)
        index = SpanIndex.build(docs, max(vocab, vocab_size))
        for _ in range(15):
            tail = random_tail(rng, docs, vocab)
            L, a, b = index.longest_match(tail)
            want, _ = brute_longest(docs, tail)
            assert L == want
            for e in np.asarray(index.sa[a:b]).tolist():  # every reported entry is an occurrence
                assert (np.asarray(index.stream[e - L + 1 : e + 1], dtype=np.int64) - 1).tolist() == tail[-L:]


def test_continuations_are_real_and_stop_at_document_end():
    rng = np.random.default_rng(7)
    for _ in range(200):
        docs = random_docs(rng, 3)
        index = SpanIndex.build(docs, 3)
        tail = random_tail(rng, docs, 3)
        L, conts = index.continuations(tail, max_tokens=5, max_candidates=10_000, min_match=1, pool=10_000)
        want_L, occ = brute_longest(docs, tail)
        expect = {tuple(d[j : j + 5]) for d, j in occ} - {()}
        assert L == (want_L if expect else 0)  # a match only at documents' ends drafts nothing
        assert set(map(tuple, conts)) == expect  # all of them (pool covers every occurrence), no more


def test_min_match_and_most_frequent_first():
    docs = [[1, 2, 3, 9], [1, 2, 3, 9], [1, 2, 3, 7], [5, 5]]
    index = SpanIndex.build(docs, 10)
    assert index.continuations([4, 2, 3], 3, min_match=2) == (2, [[9], [7]])
    assert index.continuations([4, 6, 3], 3, min_match=2) == (0, [])
    assert index.continuations([8, 8], 3, min_match=1) == (0, [])
    assert index.continuations([5], 3, min_match=1) == (1, [[5]])  # the document's last 5 has no successor


def test_save_load_memory_maps(tmp_path):
    rng = np.random.default_rng(3)
    docs = [rng.integers(0, 50, size=200).tolist() for _ in range(5)]
    built = SpanIndex.build(docs, 50)
    _, fields = built.save(tmp_path)
    loaded = SpanIndex.load(tmp_path, fields)
    part = loaded.sa.parts[0]
    assert isinstance(part.base, np.memmap) and not part.flags.owndata  # mapped, not read
    assert loaded.nbytes() <= 8 * (sum(map(len, docs)) + 16 * 2)
    for _ in range(50):
        tail = docs[int(rng.integers(5))][: int(rng.integers(1, 30))]
        assert loaded.continuations(tail, 4, min_match=1) == built.continuations(tail, 4, min_match=1)


def test_bad_arguments():
    index = SpanIndex.build([[1, 2, 3]], 5)
    with pytest.raises(ValueError):
        index.continuations([1, 2], 0)
    with pytest.raises(ValueError):
        SpanIndex.build([[1, 7]], 5)
    for bad in ([-1, 2], [2, 70_000]):
        with pytest.raises(ValueError, match="vocabulary range"):
            index.longest_match(bad)
