"""Longest-suffix matching of a token context against reference token sequences.

Knows: how to find where the last few tokens of a context occur in a set of token sequences, and which tokens
followed them there. Does not know: models, tokenizers, draft lengths, or where the sequences came from.

Structure: a pyahocorasick trie (used as a trie: keys are strings, one code point per token id) over the *reversed*
n-grams of every sequence: for the n-gram ending at position i, the key is seq[i], seq[i-1], ..., seq[i-n+1] and
the value is the list of (sequence, i) where that n-gram ends. Walking the trie with the reversed context tail finds
the longest suffix of the context that occurs anywhere in O(n), independent of the reference size, and adding a
token appends one key, so the index grows incrementally with the generated text.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from typing import Sequence

import ahocorasick

__all__ = ["Match", "SuffixIndex", "brute_force_longest_suffix"]

_MAX_CODE_POINT = 0x10FFFF


@dataclass(frozen=True)
class Match:
    """Where the longest context suffix occurs: `length` tokens ending at each (sequence id, end position)."""

    length: int
    positions: tuple[tuple[int, int], ...]


def _key(tokens: Sequence[int]) -> str:
    # One code point per token id; the trie walks keys code point by code point.
    return "".join(map(chr, reversed(tokens)))


class SuffixIndex:
    """Trie of reversed n-grams (n <= max_ngram) over a growing set of token sequences.

    Sequences are append-only lists of token ids; `extend` indexes the new positions incrementally.
    Positions are reported only where at least one token follows the n-gram, so a match always has a continuation.
    """

    def __init__(self, *, max_ngram: int = 12, max_positions: int = 16):
        if max_ngram < 1:
            raise ValueError(f"max_ngram must be >= 1, got {max_ngram}")
        if max_positions < 1:
            raise ValueError(f"max_positions must be >= 1, got {max_positions}")
        self.max_ngram = max_ngram
        self.max_positions = max_positions
        self.sequences: list[list[int]] = []
        self._trie = ahocorasick.Automaton(ahocorasick.STORE_ANY)
        self._indexed: list[int] = []  # per sequence: n-grams ending before this position are in the trie

    def __len__(self) -> int:
        return sum(len(seq) for seq in self.sequences)

    def add(self, tokens: Sequence[int]) -> int:
        """Add a new sequence; returns its id. Its last token gets indexed once another token follows it."""
        self.sequences.append([])
        self._indexed.append(0)
        seq_id = len(self.sequences) - 1
        self.extend(seq_id, tokens)
        return seq_id

    def extend(self, seq_id: int, tokens: Sequence[int]) -> None:
        """Append tokens to sequence `seq_id` and index every n-gram that now has a following token."""
        seq = self.sequences[seq_id]
        for token in tokens:
            if not 0 <= token <= _MAX_CODE_POINT:
                raise ValueError(f"token id {token} is outside the supported range 0..{_MAX_CODE_POINT}")
        seq.extend(int(t) for t in tokens)
        n = self.max_ngram
        for end in range(self._indexed[seq_id], len(seq) - 1):
            key = _key(seq[max(0, end - n + 1) : end + 1])
            # Shorter keys (near a sequence start) are prefixes of longer paths, which is all a lookup needs.
            positions = self._trie.get(key, None)
            if positions is None:
                self._trie.add_word(key, [(seq_id, end)])
            else:
                positions.append((seq_id, end))  # the stored list is shared, so this updates the trie in place
        self._indexed[seq_id] = max(self._indexed[seq_id], len(seq) - 1)

    def longest_suffix(self, context: Sequence[int]) -> Match:
        """The longest suffix of `context` (at most max_ngram tokens) that occurs with a continuation.

        Returns Match(0, ()) when not even the last token occurs. Positions: the most recent ones first, at most
        max_positions of them.
        """
        if not context:
            return Match(0, ())
        if len(self._trie) == 0:  # pyahocorasick ends the process on longest_prefix of an automaton without words
            return Match(0, ())
        tail = [t for t in context[-self.max_ngram :] if 0 <= t <= _MAX_CODE_POINT]
        probe = _key(tail)
        length = self._trie.longest_prefix(probe)
        if length == 0:
            return Match(0, ())
        positions: list[tuple[int, int]] = []
        exact = self._trie.get(probe[:length], None)
        if exact is not None:
            positions.extend(exact[-self.max_positions :])
        if len(positions) < self.max_positions:
            # Keys that extend the matched path (longer n-grams whose suffix is the match) end at the same places.
            for stored in islice(self._trie.values(probe[:length]), 4 * self.max_positions):
                if stored is not exact:
                    positions.extend(stored[-self.max_positions :])
        ordered = sorted(set(positions), reverse=True)[: self.max_positions]
        return Match(length, tuple(ordered))

    def continuation(self, position: tuple[int, int], max_tokens: int) -> list[int]:
        """The tokens that follow the n-gram ending at `position`, at most max_tokens of them."""
        seq_id, end = position
        seq = self.sequences[seq_id]
        return seq[end + 1 : end + 1 + max_tokens]


def brute_force_longest_suffix(
    sequences: Sequence[Sequence[int]], context: Sequence[int], max_ngram: int
) -> tuple[int, set[tuple[int, int]]]:
    """Reference implementation for tests: (length, all end positions) of the longest context suffix (<= max_ngram)
    that occurs in some sequence with at least one token after it."""
    for n in range(min(max_ngram, len(context)), 0, -1):
        suffix = list(context[-n:])
        found = {
            (s, end)
            for s, seq in enumerate(sequences)
            for end in range(n - 1, len(seq) - 1)
            if list(seq[end - n + 1 : end + 1]) == suffix
        }
        if found:
            return n, found
    return 0, set()
