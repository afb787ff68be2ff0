"""Property-based tests: the corpus span index (SpanIndex) against brute force on random token streams, including
documents shorter than its DEPTH, empty documents, no documents, and the followed_only variant the store uses."""

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="property tests need the test extra: pip install -e '.[test]'")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from refdecode.corpus.spans import DEPTH, MAX_CONTINUATION, SpanIndex  # noqa: E402


def occurrences(docs, tail, followed_only):
    """{L: [(doc, end)]} for every L <= min(DEPTH, len(tail)) at which tail[-L:] occurs in a document (and, with
    followed_only, has a token after it there)."""
    found = {}
    for L in range(1, min(DEPTH, len(tail)) + 1):
        pat = list(tail[-L:])
        stop = 1 if followed_only else 0
        hits = [
            (d, i + L - 1)
            for d, doc in enumerate(docs)
            for i in range(len(doc) - L + 1 - stop)
            if doc[i : i + L] == pat
        ]
        if not hits:
            break
        found[L] = hits
    return found


vocabs = st.sampled_from([2, 3, 7, 65_534, 65_535, 70_000])  # 65534: the largest uint16 stream; then uint32


@st.composite
def corpus_and_tails(draw):
    vocab = draw(vocabs)
    token = st.one_of(st.sampled_from([0, vocab - 1]), st.integers(0, vocab - 1))
    docs = draw(st.lists(st.one_of(st.lists(token, max_size=DEPTH - 1), st.lists(token, max_size=60)), max_size=5))
    return vocab, docs, draw_tails(draw, docs, token, count=6, noise=4)


def draw_tails(draw, docs, token, *, count: int, noise: int) -> list[list[int]]:
    """1..count context tails: up to `noise` random tokens, then often a stretch of a document ending anywhere."""
    tails = []
    for _ in range(draw(st.integers(1, count))):
        tail = draw(st.lists(token, max_size=noise))
        nonempty = [d for d in docs if d]
        if nonempty and draw(st.booleans()):
            doc = draw(st.sampled_from(nonempty))
            end = draw(st.integers(0, len(doc) - 1))
            tail += doc[max(0, end - draw(st.integers(0, 20))) : end + 1]
        tails.append(tail)
    return tails


@pytest.mark.fuzz
@given(case=corpus_and_tails(), followed_only=st.booleans())
def test_longest_match_equals_brute_force(case, followed_only):
    vocab, docs, tails = case
    index = SpanIndex.build(docs, vocab, followed_only=followed_only)
    for tail in tails:
        L, a, b = index.longest_match(tail)
        found = occurrences(docs, tail, followed_only)
        assert L == max(found, default=0)
        assert b - a == len(found.get(L, []))  # the exact range: every occurrence once
        for e in np.asarray(index.sa[a:b]).tolist():
            assert (np.asarray(index.stream[e - L + 1 : e + 1], dtype=np.int64) - 1).tolist() == tail[-L:]


@pytest.mark.fuzz
@given(case=corpus_and_tails(), max_tokens=st.sampled_from([1, 3, 10**9]))
def test_continuations_are_real_and_complete(case, max_tokens):
    vocab, docs, tails = case
    index = SpanIndex.build(docs, vocab)
    n = min(max_tokens, MAX_CONTINUATION)
    for tail in tails:
        L, conts = index.continuations(tail, max_tokens, max_candidates=10_000, min_match=1, pool=10_000)
        found = occurrences(docs, tail, followed_only=False)
        longest = max(found, default=0)
        expect = {tuple(docs[d][e + 1 : e + 1 + n]) for d, e in found.get(longest, [])} - {()}
        assert L == (longest if expect else 0)
        assert set(map(tuple, conts)) == expect


def test_empty_corpora_answer_no_match():
    for docs in ([], [[]], [[], []], [[5]]):
        index = SpanIndex.build(docs, 10, followed_only=True)
        assert index.longest_match([5]) == (0, 0, 0)
        assert index.continuations([5], 10**9, min_match=1) == (0, [])
