"""SuffixIndex against a brute-force longest-suffix oracle, and the drafter's span following and voting."""

import random

import pytest

from refdecode.drafters import ReferenceDrafter
from refdecode.matching import SuffixIndex, brute_force_longest_suffix


@pytest.mark.parametrize("seed", range(30))
def test_longest_suffix_matches_brute_force(seed):
    rng = random.Random(seed)
    vocab = rng.choice([2, 3, 5, 20, 70000])  # tiny alphabets make long repeats; a huge one exercises code points
    max_ngram = rng.choice([1, 3, 6, 12])
    index = SuffixIndex(max_ngram=max_ngram, max_positions=10_000)
    sequences = []
    for _ in range(rng.randint(1, 4)):
        seq = [rng.randrange(vocab) for _ in range(rng.randint(0, 60))]
        sid = index.add(seq[: len(seq) // 2])
        index.extend(sid, seq[len(seq) // 2 :])  # incremental growth must index the same n-grams
        sequences.append(seq)
    for _ in range(20):
        context = [rng.randrange(vocab) for _ in range(rng.randint(1, 15))]
        if rng.random() < 0.5 and any(sequences):
            seq = rng.choice([s for s in sequences if s])
            end = rng.randrange(len(seq))
            context = context[: rng.randint(0, 3)] + seq[max(0, end - rng.randint(1, 14)) : end + 1]
        length, positions = brute_force_longest_suffix(sequences, context, max_ngram)
        match = index.longest_suffix(context)
        assert match.length == length
        assert set(match.positions) == positions
        for pos in match.positions:
            assert index.continuation(pos, 3) == sequences[pos[0]][pos[1] + 1 : pos[1] + 4]


def test_positions_are_most_recent_first_and_capped():
    index = SuffixIndex(max_ngram=4, max_positions=3)
    index.add([1, 2, 9] * 10)
    match = index.longest_suffix([1, 2])
    assert match.length == 2
    assert list(match.positions) == sorted(match.positions, reverse=True)
    assert len(match.positions) == 3 and match.positions[0] == (0, 28)


def test_bad_token_and_config():
    with pytest.raises(ValueError):
        SuffixIndex(max_ngram=0)
    with pytest.raises(ValueError, match="outside"):
        SuffixIndex().add([-1])
    assert SuffixIndex().longest_suffix([]).length == 0


def test_drafter_follows_a_span_beyond_the_trie_depth():
    doc = list(range(100, 160))
    drafter = ReferenceDrafter([1, 2, 3] + doc[:5], max_ngram=4)
    drafter.session.add(doc)  # a second sequence holding the whole span
    context = [1, 2, 3] + doc[:5]
    draft = drafter.propose(context, 10)
    assert draft.tokens == doc[5:15]
    accepted = draft.tokens[:10] + [doc[15]]
    drafter.observe(accepted)
    context += accepted
    draft = drafter.propose(context, 8)
    assert draft.tokens == doc[16:24]
    assert draft.match_len == 4 + 11  # trie depth, then one more for every token the span predicted


def test_drafter_votes_and_prefers_recent_on_ties():
    # [7, 8] is followed by 1 twice and by 2 once: the majority wins even though 2 is most recent
    context = [7, 8, 1, 5, 7, 8, 1, 6, 7, 8, 2, 4, 7, 8]
    drafter = ReferenceDrafter(context, max_ngram=2)
    assert drafter.propose(context, 1).tokens == [1]
    # one occurrence each: the most recent one
    context = [7, 8, 1, 5, 7, 8, 2, 4, 7, 8]
    drafter = ReferenceDrafter(context, max_ngram=2)
    assert drafter.propose(context, 1).tokens == [2]


def test_drafter_with_no_match_proposes_nothing():
    drafter = ReferenceDrafter([1, 2, 3])
    assert drafter.propose([1, 2, 3, 4], 5) is None
    assert drafter.propose([1, 2, 3], 0) is None


def test_drafter_extends_a_repeating_output_past_the_context_end():
    context = [5, 1, 2, 3, 1, 2, 3, 1, 2]  # period 3: the copy overlaps its own output, as in LZ77
    draft = ReferenceDrafter(context).propose(context, 10)
    assert draft.tokens == [3, 1, 2, 3, 1, 2, 3, 1, 2, 3]


@pytest.mark.slow
def test_lookup_in_an_index_without_ngrams_does_not_end_the_process():
    # Regression: pyahocorasick aborts the interpreter on longest_prefix of an automaton with no words. Run the
    # lookups in a child process so that a regression fails this test instead of killing the test run.
    import subprocess
    import sys

    code = (
        "from refdecode.matching import SuffixIndex\n"
        "for seqs in ([], [[]], [[5]], [[5], [7]]):\n"
        "    index = SuffixIndex()\n"
        "    for s in seqs:\n"
        "        index.add(s)\n"
        "    assert index.longest_suffix([5, 7]).length == 0\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
