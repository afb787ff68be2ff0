"""Property-based tests: SuffixIndex (trie, live context) and DocumentIndex (suffix array, store documents) against
the brute-force longest-suffix oracle under random interleavings of add / extend / lookup, and token id checks."""

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="property tests need the test extra: pip install -e '.[test]'")
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule  # noqa: E402

from refdecode.matching import DocumentIndex, SuffixIndex, as_token_ids, brute_force_longest_suffix  # noqa: E402

# Vocabulary sizes: tiny alphabets make long repeats; 49152 is SmolLM2's (a uint16 stream); 65534 and 65535 are the
# largest uint16 and the smallest uint32 stream of a DocumentIndex; 70000 needs uint32 and
# crosses the surrogate code points; 0x110000 is every code point the trie can key.
VOCABS = [2, 3, 49152, 65534, 65535, 70000, 0x110000]


def token_lists(vocab: int, max_size: int = 40):
    """Token sequences with the awkward cases drawn often: ids 0 and vocab - 1, and long runs of one token."""
    one = st.one_of(st.sampled_from([0, vocab - 1]), st.integers(0, vocab - 1))
    run = st.builds(lambda t, n: [t] * n, one, st.integers(1, 30))
    return st.lists(st.one_of(one.map(lambda t: [t]), run), max_size=max_size // 4).map(
        lambda parts: [t for p in parts for t in p][:max_size]
    )


class _OracleMachine(RuleBasedStateMachine):
    """Shared oracle: the sequences as plain lists, and lookups compared with brute_force_longest_suffix."""

    def make_index(self, vocab: int, max_ngram: int, max_positions: int):
        raise NotImplementedError

    @initialize(
        vocab=st.sampled_from(VOCABS),
        max_ngram=st.sampled_from([1, 2, 5, 12]),
        max_positions=st.sampled_from([1, 4, 10_000]),
    )
    def setup(self, vocab, max_ngram, max_positions):
        self.vocab, self.max_ngram, self.max_positions = vocab, max_ngram, max_positions
        self.index = self.make_index(vocab, max_ngram, max_positions)
        self.sequences: list[list[int]] = []

    @rule(data=st.data())
    def add(self, data):
        seq = data.draw(token_lists(self.vocab))
        assert self.index.add(seq) == len(self.sequences)
        self.sequences.append(seq)

    @rule(data=st.data())
    def lookup(self, data):
        context = data.draw(self._contexts())
        match = self.index.longest_suffix(context)
        length, positions = brute_force_longest_suffix(self.sequences, context, self.max_ngram)
        assert match.length == length
        assert list(match.positions) == sorted(set(match.positions), reverse=True)  # most recent first
        assert set(match.positions) <= positions and len(match.positions) == min(len(positions), self.max_positions)
        if self.exact_recency or len(positions) <= self.max_positions:
            # all of them, or the most recent max_positions of them
            assert list(match.positions) == sorted(positions, reverse=True)[: self.max_positions]
        for seq_id, end in match.positions:
            want = self.sequences[seq_id][end + 1 : end + 4]
            assert self.index.continuation((seq_id, end), 3) == want and want

    def _contexts(self):
        """Random contexts, often ending with a piece of a stored sequence, sometimes with ids no index holds."""
        noise = token_lists(self.vocab, 15)
        pieces = [s for s in self.sequences if s]
        if not pieces:
            return noise
        piece = st.sampled_from(pieces).flatmap(
            lambda s: st.tuples(st.integers(0, len(s) - 1), st.integers(1, 14)).map(
                lambda ab: s[max(0, ab[0] - ab[1] + 1) : ab[0] + 1]
            )
        )
        foreign = st.sampled_from([-1, self.vocab, 2**40])
        return st.one_of(
            noise,
            st.builds(lambda a, b: a + b, noise, piece),
            st.builds(lambda a, f, b: a + [f] + b, noise, foreign, piece),
        )


class SuffixIndexMachine(_OracleMachine):
    exact_recency = False  # the trie collects positions from up to 4 * max_positions keys: recent, not the latest

    def make_index(self, vocab, max_ngram, max_positions):
        return SuffixIndex(max_ngram=max_ngram, max_positions=max_positions)

    @precondition(lambda self: self.sequences)
    @rule(data=st.data())
    def extend(self, data):
        seq_id = data.draw(st.integers(0, len(self.sequences) - 1))
        tokens = data.draw(token_lists(self.vocab, 12))
        self.index.extend(seq_id, tokens)  # one token at a time in the drafter; any number here
        self.sequences[seq_id].extend(tokens)

    @invariant()
    def same_tokens(self):
        if hasattr(self, "index"):
            assert self.index.sequences == self.sequences


class DocumentIndexMachine(_OracleMachine):
    exact_recency = True

    def make_index(self, vocab, max_ngram, max_positions):
        return DocumentIndex(vocab, max_ngram=max_ngram, max_positions=max_positions)

    @invariant()
    def same_tokens(self):
        if hasattr(self, "index"):
            assert [self.index.tokens(i) for i in range(self.index.num_documents)] == self.sequences


# 20 steps per run (hypothesis' default is 50): enough for a few adds, extends and lookups each; the profile's
# example count still applies.
SuffixIndexMachine.TestCase.settings = hypothesis.settings(stateful_step_count=20)
DocumentIndexMachine.TestCase.settings = hypothesis.settings(stateful_step_count=20)
TestSuffixIndex = pytest.mark.fuzz(SuffixIndexMachine.TestCase)
TestDocumentIndex = pytest.mark.fuzz(DocumentIndexMachine.TestCase)


def test_an_id_no_index_holds_ends_the_match():
    # Regression: the trie dropped out-of-range ids from the context, so [5, -1, 7] matched as if it were [5, 7].
    for index in (SuffixIndex(), DocumentIndex(100)):
        index.add([5, 7, 9])
        assert index.longest_suffix([5, 7]).length == 2
        assert index.longest_suffix([5, -1, 7]).length == 1
        assert index.longest_suffix([5, 7, 10**9]).length == 0
        assert index.longest_suffix([5, "x", 7]).length == 1


@pytest.mark.parametrize(
    "bad",
    [
        [1, 2.5],
        [1.0, 2.0],
        [True, 2],
        ["1", "2"],
        "12",
        [[1, 2]],
        np.array([1.5]),
        np.array([True]),
        torch.tensor([1.0, 2.0]),
        torch.tensor([True]),
        np.zeros((1, 3), dtype=np.int64),
    ],
)
def test_non_integer_ids_are_refused(bad):
    for index in (SuffixIndex(), DocumentIndex(100)):
        with pytest.raises(ValueError, match="integers|1-D|sequence"):
            index.add(bad)


def test_out_of_range_ids_are_reported_against_the_vocabulary():
    with pytest.raises(ValueError, match=r"token id -1 is outside this vocabulary \(size 100\)"):
        DocumentIndex(100).add([3, -1])
    with pytest.raises(ValueError, match=r"token id 100 is outside this vocabulary \(size 100\)"):
        DocumentIndex(100).add([100])
    with pytest.raises(ValueError, match=r"token id 100 is outside this vocabulary \(size 100\)"):
        SuffixIndex(vocab_size=100).add([100])
    with pytest.raises(ValueError, match=r"outside the supported range 0\.\.1114111"):
        SuffixIndex().add([0x110000])
    with pytest.raises(ValueError, match="outside"):
        as_token_ids(np.array([2**64 - 1], dtype=np.uint64), 100)


def test_integer_arrays_and_tensors_are_accepted():
    for ids in (
        [1, 2, 3],
        (1, 2, 3),
        np.array([1, 2, 3], dtype=np.int32),
        np.array([1, 2, 3], dtype=np.uint16),
        torch.tensor([1, 2, 3]),
        [np.int64(1), np.uint8(2), 3],
    ):
        assert as_token_ids(ids, 100).tolist() == [1, 2, 3]
        index = DocumentIndex(100)
        index.add(ids)
        assert index.tokens(0) == [1, 2, 3]


def test_document_index_rebuilds_after_add_and_copies_share_nothing_mutable():
    index = DocumentIndex(50)
    index.add([1, 2, 3])
    assert index.longest_suffix([1, 2]).positions == ((0, 1),)
    twin = index.copy()
    index.add([1, 2, 4])  # lookups after an add see it (the arrays are rebuilt lazily)
    assert index.longest_suffix([1, 2]).positions == ((1, 1), (0, 1))
    assert twin.longest_suffix([1, 2]).positions == ((0, 1),)
    assert twin.num_documents == 1 and len(twin) == 3


def test_document_index_holds_about_ten_bytes_per_token():
    # Regression: the store kept a trie of every reversed 12-gram, ~550 bytes per reference token.
    rng = np.random.default_rng(0)
    index = DocumentIndex(49152)
    index.add(rng.integers(0, 49152, size=200_000))
    assert index.longest_suffix([1, 2, 3]).length >= 0  # builds the suffix array
    assert index.nbytes() <= 10 * 200_000
