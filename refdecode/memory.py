"""Output memory: a bounded memory of finished outputs, drafted from by later requests (SuffixDecoding's global tree).

Knows: which outputs it holds (numbered in the order they were recorded, the oldest evicted first once more than
`max_tokens` tokens are held), how to find the longest context suffix among them (the SuffixSource protocol of
refdecode.matching, so a drafter asks it like a ReferenceStore), and what it saves: two .npy arrays (never
pickle) and its bounds and tokenizer fingerprint, in a checked folder (refdecode.checked_folder: manifest with
every file's size and SHA-256, a generation subfolder switched with one os.replace).
Does not know: models, decoding, or when outputs are recorded (the decode loop calls `record`).

Structure: outputs live in segments, each a DocumentIndex (a suffix array) over a run of consecutive outputs.
`record` adds a one-output segment and merges the newest segments while the older of the two is at most 4 times
the newer's size, so there are O(log n) segments (few: every lookup asks each) and a token is re-indexed O(log n)
times in all; no record rebuilds the whole memory. Segments never grow past `max_tokens // 4` by merging, so the
largest rebuild is bounded too. Eviction only moves the number of the oldest live output: lookups skip dead
outputs, a segment is dropped once all its outputs are dead and rebuilt from its live ones once most of its
tokens are dead.
Positions are (output number, end offset); numbers are never reused, so a position of an evicted output stays
recognisable (its continuation is []).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .checked_folder import (
    FolderFormat,
    FolderFormatError,
    GenerationGone,
    claim,
    is_count,
    new_generation,
    read_manifest,
    tokenizer_fingerprint,
    verify_files,
)
from .corpus.spans import DEPTH
from .matching import DocumentIndex, Match, as_token_ids

__all__ = ["MEMORY_FOLDER", "MEMORY_FORMAT", "MEMORY_VERSION", "OutputMemory"]

MEMORY_FORMAT = "refdecode-output-memory"
MEMORY_VERSION = 1
_FILES = ("lengths.npy", "tokens.npy")
_VOCAB = 0x110000  # ids a memory holds: those a SuffixIndex accepts (a model may emit ids beyond its tokenizer's)
_MAX_POSITIONS = 16
_MIN_SEGMENT_CAP = 4096
_CAP_FRACTION = 4  # segments grow by merging up to max_tokens // this: at most ~this many full-size ones
_MERGE_FACTOR = 4  # merge the newest segments while the older is at most this times the newer's size
MEMORY_FOLDER = FolderFormat(
    name=MEMORY_FORMAT, version=MEMORY_VERSION, label="output memory", data_files=frozenset(_FILES)
)


class _Segment:
    """A DocumentIndex over outputs first .. first + count - 1 (numbers), document i = output first + i."""

    def __init__(self, first: int, outputs: Sequence[np.ndarray], max_ngram: int):
        self.first, self.count = first, len(outputs)
        self.tokens = int(sum(o.size for o in outputs))
        self.index = DocumentIndex(_VOCAB, max_ngram=max_ngram, max_positions=_MAX_POSITIONS)
        for out in outputs:
            self.index.add(out)

    def lookup(self, context: Sequence[int], first_live: int) -> tuple[int, list[tuple[int, int]]]:
        """(length, positions) of the longest context suffix in this segment's live outputs, the most recent first.

        Dead outputs are the oldest and positions come most recent first, so a match whose most recent positions
        include a dead one has no live position beyond them; one with none alive is retried one token shorter."""
        tail = list(context[-self.index.max_ngram :])
        while tail:
            match = self.index.longest_suffix(tail)
            if match.length == 0:
                break
            live = [(self.first + d, e) for d, e in match.positions if self.first + d >= first_live]
            if live:
                return match.length, live
            tail = tail[len(tail) - match.length + 1 :]
        return 0, []


class OutputMemory:
    """SuffixDecoding's global tree: past outputs as a drafting source across requests.

    max_tokens: the most tokens held; recording beyond it evicts the oldest outputs (an output longer than
    max_tokens keeps its last max_tokens tokens). max_ngram: the longest context suffix matched (1..DEPTH).
    """

    def __init__(self, max_tokens: int = 1_000_000, *, max_ngram: int = 12):
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        DocumentIndex(1, max_ngram=max_ngram)  # checks max_ngram against what a suffix array supports
        self.max_tokens, self.max_ngram = max_tokens, max_ngram
        self.fingerprint: str | None = None
        self._bound = None  # the last tokenizer object bind() checked: the same object is not hashed again
        self._outputs: deque[np.ndarray] = deque()  # (T_i,) int32, the live outputs, oldest first
        self._first_live = 0  # the number of _outputs[0]
        self._num_tokens = 0
        self._segments: list[_Segment] = []  # oldest first; together they cover every live output

    # -- contents ------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._outputs)

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    def outputs(self) -> list[list[int]]:
        """The live outputs' token ids, the oldest first."""
        return [o.tolist() for o in self._outputs]

    def bind(self, tokenizer) -> None:
        """Remember the tokenizer's fingerprint on first use; ValueError if another tokenizer was bound (its ids
        would mean other text). None: nothing to check."""
        if tokenizer is None or tokenizer is self._bound:
            return
        have = tokenizer_fingerprint(tokenizer)
        if self.fingerprint is None:
            self.fingerprint = have
        elif have != self.fingerprint:
            raise ValueError(
                f"this output memory holds token ids of another tokenizer (fingerprint {self.fingerprint}; this "
                f"tokenizer's is {have}): use a memory per tokenizer"
            )
        self._bound = tokenizer

    def record(self, token_ids: Sequence[int]) -> None:
        """Add one finished output (an empty one is ignored), then evict the oldest outputs beyond max_tokens."""
        ids = as_token_ids(token_ids, _VOCAB, what="output token ids")[-self.max_tokens :].astype(np.int32)
        if ids.size == 0:
            return
        self._outputs.append(ids)
        self._num_tokens += int(ids.size)
        self._segments.append(_Segment(self._first_live + len(self._outputs) - 1, [ids], self.max_ngram))
        self._evict()
        self._merge()

    def _evict(self) -> None:
        # 1) the oldest outputs go until the rest fit
        while self._num_tokens > self.max_tokens:
            self._num_tokens -= int(self._outputs.popleft().size)
            self._first_live += 1
        # 2) segments with no live output go; one mostly dead is rebuilt from its live outputs
        self._segments = [s for s in self._segments if s.first + s.count > self._first_live]
        if self._segments and self._segments[0].first < self._first_live:
            s = self._segments[0]
            live = self._live(self._first_live, s.first + s.count)
            if 2 * sum(o.size for o in live) < s.tokens:
                self._segments[0] = _Segment(self._first_live, live, self.max_ngram)

    def _merge(self) -> None:
        """Merge the two newest segments while the older is at most _MERGE_FACTOR times the newer (and the result
        stays under the cap): the segment sizes fall geometrically, like a counter in base _MERGE_FACTOR."""
        cap = self._cap()
        while len(self._segments) >= 2:
            older, newer = self._segments[-2], self._segments[-1]
            if older.tokens > _MERGE_FACTOR * newer.tokens or older.tokens + newer.tokens > cap:
                break
            first = max(older.first, self._first_live)
            self._segments[-2:] = [_Segment(first, self._live(first, newer.first + newer.count), self.max_ngram)]

    def _restore(self, outputs: Sequence[np.ndarray]) -> None:
        """Hold `outputs` (checked (T_i,) int32 arrays, oldest first) in segments of up to the merge cap each, built
        once: a load does not replay every record's merges."""
        for ids in outputs:
            self._outputs.append(ids[-self.max_tokens :])
            self._num_tokens += int(self._outputs[-1].size)
        self._evict()
        cap = self._cap()
        first, size = self._first_live, 0
        chunk: list[np.ndarray] = []
        for ids in self._outputs:
            if chunk and size + ids.size > cap:
                self._segments.append(_Segment(first, chunk, self.max_ngram))
                first, chunk, size = first + len(chunk), [], 0
            chunk.append(ids)
            size += int(ids.size)
        if chunk:
            self._segments.append(_Segment(first, chunk, self.max_ngram))

    def _cap(self) -> int:
        return max(_MIN_SEGMENT_CAP, self.max_tokens // _CAP_FRACTION)

    def _live(self, start: int, stop: int) -> list[np.ndarray]:
        """The live outputs numbered start .. stop - 1."""
        base = self._first_live
        return [self._outputs[i - base] for i in range(max(start, base), stop)]

    # -- SuffixSource ----------------------------------------------------------------------------------------------

    def longest_suffix(self, context: Sequence[int]) -> Match:
        """The longest suffix of `context` (<= max_ngram tokens) that occurs in a live output with a following
        token; positions (output number, end offset), the most recent first, at most 16. Never spans outputs."""
        best, positions = 0, []
        for seg in self._segments:
            length, found = seg.lookup(context, self._first_live)
            if length > best:
                best, positions = length, found
            elif length == best and length:
                positions.extend(found)
        return Match(best, tuple(sorted(positions, reverse=True)[:_MAX_POSITIONS]))

    def continuation(self, position: tuple[int, int], max_tokens: int) -> list[int]:
        """The <= max_tokens ids after offset `end` of output `number` (position = (number, end)); [] for an evicted
        or unknown output."""
        try:
            number, end = int(position[0]), int(position[1])
        except (TypeError, ValueError, IndexError):
            return []
        i = number - self._first_live
        if not 0 <= i < len(self._outputs) or end < -1:
            return []
        return self._outputs[i][end + 1 : end + 1 + max(0, max_tokens)].tolist()

    # -- files -------------------------------------------------------------------------------------------------

    def save(self, path) -> None:
        """Write the memory to folder `path`, a checked folder (refdecode.checked_folder): a new generation beside
        the old one, then manifest.json switched to it with one os.replace, then the old generation removed; a new
        folder is written under a hidden name and renamed into place. ValueError for a path that is not an output
        memory (a file, a link, a user's folder, an index): it is never written to."""
        path = Path(path)
        replacing = claim(path, MEMORY_FOLDER)
        with new_generation(path, MEMORY_FOLDER, replacing=replacing) as gen:
            lengths = np.array([o.size for o in self._outputs], dtype=np.int64)  # (K,)
            tokens = np.concatenate([*self._outputs, np.zeros(0, np.int32)]).astype(np.int32)  # (N,)
            np.save(gen.dir / "lengths.npy", lengths, allow_pickle=False)
            np.save(gen.dir / "tokens.npy", tokens, allow_pickle=False)
            gen.commit(
                {
                    "tokenizer_fingerprint": self.fingerprint,
                    "max_tokens": self.max_tokens,
                    "max_ngram": self.max_ngram,
                    "num_outputs": len(self._outputs),
                    "num_tokens": self._num_tokens,
                },
                _FILES,
            )

    @classmethod
    def load(cls, path, *, tokenizer=None, max_tokens: int | None = None) -> OutputMemory:
        """The memory saved in folder `path`, checked as a checked folder (format, version, files, sizes, SHA-256,
        array types and contents): FolderFormatError (a ValueError) otherwise. tokenizer: refused if another
        tokenizer was bound to the memory. max_tokens: a new bound (the oldest outputs beyond it are evicted)."""
        path = Path(path)
        for attempt in range(3):
            manifest = _read_manifest(path)
            try:
                where = verify_files(path, MEMORY_FOLDER, manifest, _FILES)
                lengths = _load_array(path, where / "lengths.npy", np.int64)
                tokens = _load_array(path, where / "tokens.npy", np.int32)
                break
            except GenerationGone:
                if attempt == 2:  # pragma: no cover - three saves raced this load
                    raise
        _check_contents(path, manifest, lengths, tokens)
        memory = cls(manifest["max_tokens"] if max_tokens is None else max_tokens, max_ngram=manifest["max_ngram"])
        memory.fingerprint = manifest["tokenizer_fingerprint"]
        if tokenizer is not None:
            try:
                memory.bind(tokenizer)
            except ValueError as e:
                raise FolderFormatError(f"output memory {path}: {e}") from None
        memory._restore(np.split(tokens, np.cumsum(lengths)[:-1]) if lengths.size else [])
        return memory


# -- reading and checking a saved memory -------------------------------------------------------------------------


def _read_manifest(folder: Path) -> dict:
    """Parse and check the manifest: a checked folder of this format and version, and well-formed fields."""
    manifest = read_manifest(folder, MEMORY_FOLDER)
    fingerprint = manifest.get("tokenizer_fingerprint")
    if fingerprint is not None and not isinstance(fingerprint, str):
        raise FolderFormatError(f"output memory {folder}: tokenizer_fingerprint must be a string or null")
    for key in ("max_tokens", "max_ngram", "num_outputs", "num_tokens"):
        if not is_count(manifest.get(key)):
            raise FolderFormatError(f"output memory {folder}: {key} must be a non-negative integer")
    if manifest["max_tokens"] < 1 or not 1 <= manifest["max_ngram"] <= DEPTH:
        raise FolderFormatError(f"output memory {folder}: max_tokens or max_ngram out of range")
    return manifest


def _load_array(folder: Path, file: Path, dtype) -> np.ndarray:
    """A 1-D array of `dtype` from a checked .npy file, never unpickled."""
    try:
        arr = np.load(file, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise FolderFormatError(f"output memory {folder}: {file.name} is not a readable array ({e})") from None
    if not isinstance(arr, np.ndarray) or arr.dtype != np.dtype(dtype) or arr.ndim != 1:
        raise FolderFormatError(f"output memory {folder}: {file.name} is not a 1-D {np.dtype(dtype).name} array")
    return arr


def _check_contents(folder: Path, manifest: dict, lengths: np.ndarray, tokens: np.ndarray) -> None:
    """The arrays agree with each other and with the manifest: positive lengths that add up to the tokens held,
    ids in range, no more than max_tokens."""
    problems = []
    if lengths.size != manifest["num_outputs"] or tokens.size != manifest["num_tokens"]:
        problems.append("the counts differ from the manifest's")
    if lengths.size and (int(lengths.min()) < 1 or int(lengths.sum()) != tokens.size):
        problems.append("the output lengths do not add up to the tokens")
    if not lengths.size and tokens.size:
        problems.append("tokens without outputs")
    if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= _VOCAB):
        problems.append("a token id is out of range")
    if tokens.size > manifest["max_tokens"]:
        problems.append("more tokens than max_tokens")
    if problems:
        raise FolderFormatError(f"output memory {folder} is inconsistent: {'; '.join(problems)}")
