"""ReferenceDrafter: drafts bounded by the policy's max_draft whatever the budget, cheap at any max_tokens, and (as
properties) never raising, within budget and always a real copy of what followed the matched suffix."""

import time

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="property tests need the test extra: pip install -e '.[test]'")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from stats_helpers import IdTokenizer, tiny_llama  # noqa: E402

import refdecode  # noqa: E402
from refdecode.corpus.spans import MAX_CONTINUATION, SpanIndex  # noqa: E402
from refdecode.drafters import MAX_DRAFT_TOKENS, ReferenceDrafter  # noqa: E402
from refdecode.policy import DraftPolicy, ForwardCostModel  # noqa: E402
from refdecode.store import ReferenceStore  # noqa: E402

VOCAB = 6  # few tokens: long repeats, many equal matches that vote


class _Enough(Exception):
    pass


class SpyDrafter:
    """Records the max_tokens it is asked for; ends the generation after a few steps."""

    def __init__(self, prompt, steps: int = 6):
        self.inner = ReferenceDrafter(prompt)
        self.asked: list[int] = []
        self.steps = steps

    def propose(self, context, max_tokens):
        self.asked.append(max_tokens)
        if len(self.asked) >= self.steps:
            raise _Enough
        return self.inner.propose(context, max_tokens)

    def observe(self, new_tokens):
        self.inner.observe(new_tokens)


def test_the_loop_asks_for_at_most_max_draft_tokens():
    # Regression: the loop asked for the whole remaining budget (3 s per step at 1e6, +550 MB at 1e7).
    model = tiny_llama(vocab_size=VOCAB + 2, seed=0, eos_token_id=None)
    model.config.max_position_embeddings = 10**7 + 64  # room for the budget: only the drafting is under test
    spy = SpyDrafter([2, 3, 4, 2, 3, 4, 2, 3])
    policy = DraftPolicy(max_draft=5, costs=ForwardCostModel({1: 1.0, 64: 1.0}))
    with pytest.raises(_Enough):
        refdecode.generate(
            model,
            IdTokenizer(VOCAB + 2),
            [2, 3, 4, 2, 3, 4, 2, 3],
            max_new_tokens=10**7,
            drafter=spy,
            policy=policy,
            calibrate=False,
        )
    assert spy.asked and max(spy.asked) <= 5


def test_propose_is_cheap_at_any_max_tokens():
    # Regression: the LZ77 self-copy and the votes were built to max_tokens, however large.
    context = [5] + [1, 2, 3] * 20_000  # a repeating output: the copy overlaps itself
    store = ReferenceStore(IdTokenizer(VOCAB))
    store.add([1, 2, 3] * 20_000)
    drafter = ReferenceDrafter(context, store=store)
    t0 = time.perf_counter()
    draft = drafter.propose(context, 10**9)
    assert time.perf_counter() - t0 < 2.0  # loose: 10**9 tokens would take minutes and gigabytes
    assert len(draft.tokens) == MAX_DRAFT_TOKENS and draft.tokens[:4] == [1, 2, 3, 1]


def test_span_continuations_are_cheap_at_any_max_tokens():
    # Regression: span continuations allocated (16, max_tokens) per step (+800 MB at 4e6).
    index = SpanIndex.build([[1, 2, 3] * 2_000, [4, 1, 2] * 100], 10)
    t0 = time.perf_counter()
    length, conts = index.continuations([1, 2], 10**9, max_candidates=8, min_match=1, pool=10**9)
    assert time.perf_counter() - t0 < 2.0
    assert length == 2 and conts and max(map(len, conts)) == MAX_CONTINUATION


class _Spans:
    """A corpus span source (CorpusIndex.span_continuations) over a SpanIndex of `docs`."""

    def __init__(self, docs):
        self.index = SpanIndex.build(docs, VOCAB)

    def span_continuations(self, context_tail, max_tokens, **kw):
        return self.index.continuations(context_tail, max_tokens, **kw)


def _sequences():
    return st.lists(st.integers(0, VOCAB - 1), max_size=30)


def _is_copy(draft, match_len, context, references) -> bool:
    """Does `draft` follow a real occurrence of the context's last min(match_len, ...) tokens: in a reference, or
    in the context itself where the copy may run past the end by overlapping itself (LZ77)?"""
    k = len(draft)
    for seq in references:
        for p in range(1, len(seq) - k + 1):
            m = min(match_len, p, len(context))
            if seq[p : p + k] == draft and seq[p - m : p] == context[len(context) - m :]:
                return True
    for p in range(1, len(context)):
        period = len(context) - p
        copied = [context[p + i % period] for i in range(k)]
        m = min(match_len, p)
        if copied == draft and context[p - m : p] == context[len(context) - m :]:
            return True
    return False


@pytest.mark.fuzz
@given(
    prompt=_sequences().filter(bool),
    docs=st.lists(st.lists(_sequences(), max_size=4), min_size=2, max_size=2),
    steps=st.lists(st.tuples(st.integers(-2, 40), st.integers(0, 8), st.integers(0, VOCAB + 1)), max_size=12),
    max_ngram=st.sampled_from([1, 3, 12]),
)
def test_drafts_are_real_copies_within_budget(prompt, docs, steps, max_ngram):
    stores = []
    for group in docs:
        store = ReferenceStore(IdTokenizer(VOCAB), max_ngram=max_ngram)
        for doc in group:
            if doc:
                store.add(doc)
        stores.append(store)
    references = [d for group in docs for d in group]
    drafter = ReferenceDrafter(prompt, store=stores, max_ngram=max_ngram)
    context = list(prompt)
    for budget, keep, own in steps:
        draft = drafter.propose(context, budget)
        if draft is not None:
            assert 1 <= len(draft.tokens) <= max(budget, 0) and draft.source == "reference"
            assert _is_copy(draft.tokens, draft.match_len, context, references), (draft, context)
        # verification kept `keep` draft tokens and added one of the model's own (sometimes an id no store holds)
        new = (draft.tokens[:keep] if draft is not None else []) + [own]
        drafter.observe(new)
        context += new


@pytest.mark.fuzz
@given(
    context=st.lists(st.one_of(st.integers(-5, VOCAB + 5), st.sampled_from([2**40, -(2**40)])), max_size=20),
    budget=st.sampled_from([0, 1, 7, 10**9]),
)
def test_propose_never_raises_on_odd_contexts(context, budget):
    store = ReferenceStore(IdTokenizer(VOCAB))
    store.add([1, 2, 3, 4, 1, 2, 5])
    drafter = ReferenceDrafter([1, 2], store=[store, None], spans=_Spans([[1, 2, 3, 4, 5, 1, 2, 3]]))
    draft = drafter.propose(context, budget)
    assert draft is None or 1 <= len(draft.tokens) <= min(budget, MAX_DRAFT_TOKENS)


def test_store_argument_is_checked():
    with pytest.raises(ValueError, match="ReferenceStore"):
        ReferenceDrafter([1, 2], store=[object()])
    assert ReferenceDrafter([1, 2], store=None).propose([1, 2], 3) is None  # the last 2 has no successor yet
