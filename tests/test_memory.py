"""OutputMemory: lookups equal a brute-force search over the outputs held, eviction keeps the bound (oldest first),
one tokenizer per memory, saved folders round-trip and hostile ones are refused, and generate(memory=...) drafts a
repeated request from the first one's output without changing the output."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from refdecode.corpus import IndexFormatError
from refdecode.corpus.testing import WordTokenizer
from refdecode.matching import brute_force_longest_suffix
from refdecode.memory import MEMORY_FORMAT, OutputMemory

# ---------------------------------------------------------------------------------------------------------------
# Lookups against brute force, as a state machine: record / lookup / follow an old position
# ---------------------------------------------------------------------------------------------------------------


def _check_lookup(memory: OutputMemory, held: list[tuple[int, list[int]]], context: list[int]) -> None:
    """The memory's answer equals brute force over the live outputs: same length, and its positions are the most
    recent of all positions (at most 16), each followed by the tokens the output holds there."""
    numbers = [n for n, _ in held]
    length, found = brute_force_longest_suffix([t for _, t in held], context, memory.max_ngram)
    match = memory.longest_suffix(context)
    assert match.length == length
    expected = sorted(((numbers[s], e) for s, e in found), reverse=True)[:16]
    assert list(match.positions) == expected
    by_number = dict(held)
    for number, end in match.positions:
        assert memory.continuation((number, end), 5) == by_number[number][end + 1 : end + 6]


def test_lookups_and_eviction_against_brute_force_small():
    rng = np.random.default_rng(0)
    memory = OutputMemory(max_tokens=40, max_ngram=4)
    held: list[tuple[int, list[int]]] = []
    number = 0
    for _ in range(60):
        out = rng.integers(0, 4, size=int(rng.integers(0, 15))).tolist()
        memory.record(out)
        if out:
            held.append((number, out[-40:]))
            number += 1
            while sum(len(t) for _, t in held) > 40:
                held.pop(0)
        assert memory.num_tokens <= 40 and memory.outputs() == [t for _, t in held]
        _check_lookup(memory, held, rng.integers(0, 4, size=6).tolist())


@pytest.mark.fuzz
def test_state_machine_against_brute_force():
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st
    from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, rule

    tokens = st.lists(st.integers(0, 3), max_size=12)

    class Memory(RuleBasedStateMachine):
        positions = Bundle("positions")

        @initialize(max_tokens=st.integers(1, 60), max_ngram=st.integers(1, 6))
        def start(self, max_tokens, max_ngram):
            self.memory = OutputMemory(max_tokens=max_tokens, max_ngram=max_ngram)
            self.held: list[tuple[int, list[int]]] = []
            self.next_number = 0
            self.evicted: set[int] = set()

        @rule(out=tokens)
        def record(self, out):
            self.memory.record(out)
            if not out:
                return
            self.held.append((self.next_number, out[-self.memory.max_tokens :]))
            self.next_number += 1
            while sum(len(t) for _, t in self.held) > self.memory.max_tokens:
                self.evicted.add(self.held.pop(0)[0])

        @rule(target=positions, context=tokens)
        def lookup(self, context):
            _check_lookup(self.memory, self.held, context)
            match = self.memory.longest_suffix(context)
            return match.positions[0] if match.positions else (-5, 0)

        @rule(position=positions, k=st.integers(0, 20))
        def follow(self, position, k):
            number, end = position
            by_number = dict(self.held)
            want = by_number[number][end + 1 : end + 1 + k] if number in by_number else []
            assert self.memory.continuation(position, k) == want  # [] once evicted, never another output's

        @invariant()
        def bounded(self):
            if hasattr(self, "memory"):
                assert self.memory.num_tokens <= self.memory.max_tokens
                assert self.memory.outputs() == [t for _, t in self.held]
                assert len(self.memory) == len(self.held)

    hypothesis.stateful.run_state_machine_as_test(Memory)


def test_matches_never_cross_output_boundaries():
    memory = OutputMemory(max_tokens=100)
    memory.record([1, 2, 3])
    memory.record([4, 5, 6])
    assert memory.longest_suffix([3, 4]).length == 1  # "3 4" is not in either output
    assert memory.longest_suffix([2]).positions == ((0, 1),)
    assert memory.continuation((0, 1), 10) == [3]  # stops at the output's end


def test_many_outputs_many_segments_against_brute_force():
    """Enough outputs that segments merge (and a rebuild after eviction happens): still the brute-force answer."""
    rng = np.random.default_rng(1)
    memory = OutputMemory(max_tokens=5000, max_ngram=6)
    held: list[tuple[int, list[int]]] = []
    for number in range(300):
        out = rng.integers(0, 6, size=40).tolist()
        memory.record(out)
        held.append((number, out))
        while sum(len(t) for _, t in held) > 5000:
            held.pop(0)
    assert memory.num_tokens == 5000 and len(memory) == 125
    for _ in range(30):
        _check_lookup(memory, held, rng.integers(0, 6, size=8).tolist())


# ---------------------------------------------------------------------------------------------------------------
# Bounds, bad arguments, tokenizers
# ---------------------------------------------------------------------------------------------------------------


def test_eviction_oldest_first_and_long_outputs_keep_their_tail():
    memory = OutputMemory(max_tokens=10)
    memory.record([1] * 4)
    memory.record([2] * 4)
    memory.record([3] * 4)  # 12 > 10: the first goes
    assert memory.outputs() == [[2] * 4, [3] * 4] and memory.num_tokens == 8
    memory.record(list(range(25)))  # longer than the bound: its last 10 tokens, alone
    assert memory.outputs() == [list(range(15, 25))] and memory.num_tokens == 10
    memory.record([])  # ignored
    assert len(memory) == 1


@pytest.mark.parametrize("kwargs", [{"max_tokens": 0}, {"max_tokens": True}, {"max_tokens": 1.5}, {"max_ngram": 0}])
def test_bad_configuration_is_a_value_error(kwargs):
    with pytest.raises(ValueError):
        OutputMemory(**kwargs)


def test_bad_token_ids_are_refused():
    memory = OutputMemory()
    for bad in ([1.0, 2.0], [-1], "text", [[1, 2]]):
        with pytest.raises(ValueError):
            memory.record(bad)
    assert len(memory) == 0
    assert memory.continuation(("x", None), 3) == [] and memory.continuation((99, 0), 3) == []


def test_bind_refuses_another_tokenizer():
    memory = OutputMemory()
    memory.bind(None)  # nothing to check
    memory.bind(WordTokenizer())
    memory.bind(WordTokenizer())  # another object, same vocabulary: fine
    with pytest.raises(ValueError, match="another tokenizer"):
        memory.bind(WordTokenizer(salt="x"))


# ---------------------------------------------------------------------------------------------------------------
# Files: round trip, replacement, hostile folders, never overwriting what is not a memory
# ---------------------------------------------------------------------------------------------------------------


def _filled(n: int = 20, seed: int = 0) -> OutputMemory:
    rng = np.random.default_rng(seed)
    memory = OutputMemory(max_tokens=600, max_ngram=8)
    memory.bind(WordTokenizer())
    for _ in range(n):
        memory.record(rng.integers(0, 50, size=int(rng.integers(1, 60))).tolist())
    return memory


def test_save_load_round_trip_and_replace(tmp_path):
    memory = _filled()
    memory.save(tmp_path / "mem")
    loaded = OutputMemory.load(tmp_path / "mem", tokenizer=WordTokenizer())
    assert loaded.outputs() == memory.outputs() and loaded.max_tokens == 600 and loaded.max_ngram == 8
    rng = np.random.default_rng(5)
    for _ in range(20):
        context = rng.integers(0, 50, size=10).tolist()
        assert loaded.longest_suffix(context).length == memory.longest_suffix(context).length
    loaded.record([7, 7, 7])
    loaded.save(tmp_path / "mem")  # replaces the memory: one generation left, no temporary files
    again = OutputMemory.load(tmp_path / "mem")
    assert again.outputs()[-1] == [7, 7, 7] and again.fingerprint == memory.fingerprint
    assert sorted(p.name for p in (tmp_path / "mem").iterdir() if not p.name.startswith("gen-")) == ["manifest.json"]
    assert len([p for p in (tmp_path / "mem").iterdir() if p.name.startswith("gen-")]) == 1
    smaller = OutputMemory.load(tmp_path / "mem", max_tokens=50)
    assert smaller.num_tokens <= 50 and smaller.outputs()[-1] == [7, 7, 7]
    with pytest.raises(IndexFormatError, match="another tokenizer"):
        OutputMemory.load(tmp_path / "mem", tokenizer=WordTokenizer(salt="x"))


def test_empty_memory_round_trip(tmp_path):
    OutputMemory(max_tokens=5).save(tmp_path / "m")
    loaded = OutputMemory.load(tmp_path / "m")
    assert len(loaded) == 0 and loaded.max_tokens == 5 and loaded.fingerprint is None


@pytest.mark.parametrize(
    "what",
    ["a user's folder", "an empty folder", "a corpus index", "a file", "a symlink to a memory"],
)
def test_save_never_overwrites_what_is_not_a_memory(tmp_path, what):
    target = tmp_path / "target"
    if what == "a user's folder":
        target.mkdir()
        (target / "notes.txt").write_text("mine")
    elif what == "an empty folder":
        target.mkdir()
    elif what == "a corpus index":
        target.mkdir()
        (target / "manifest.json").write_text(json.dumps({"format": "refdecode-corpus-index", "version": 2}))
    elif what == "a file":
        target.write_text("mine")
    else:
        _filled().save(tmp_path / "real")
        target.symlink_to(tmp_path / "real")
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match="not a refdecode output memory"):
        _filled().save(target)
    assert _snapshot(tmp_path) == before


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() and not p.is_symlink() else None)
        for p in sorted(root.rglob("*"))
    }


def _gen(folder: Path) -> Path:
    return folder / json.loads((folder / "manifest.json").read_text())["generation"]


def _edit_manifest(**changes):
    def edit(folder: Path) -> None:
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest.update(changes)
        (folder / "manifest.json").write_text(json.dumps(manifest))

    return edit


def _truncate(folder: Path) -> None:
    path = _gen(folder) / "tokens.npy"
    path.write_bytes(path.read_bytes()[:-7])


def _flip_byte(folder: Path) -> None:
    path = _gen(folder) / "tokens.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def _symlink_file(folder: Path) -> None:
    path = _gen(folder) / "lengths.npy"
    shutil.copy(path, folder.parent / "outside.npy")
    path.unlink()
    path.symlink_to(folder.parent / "outside.npy")


def _missing_file(folder: Path) -> None:
    (_gen(folder) / "lengths.npy").unlink()


def _consistent_lie(folder: Path) -> None:
    """Arrays rewritten with a manifest whose checksums match: the contents are still checked."""
    from refdecode.checked_folder import file_entry

    gen = _gen(folder)
    np.save(gen / "lengths.npy", np.array([3, -1], dtype=np.int64))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["lengths.npy"] = file_entry(gen / "lengths.npy")
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _pickled_array(folder: Path) -> None:
    from refdecode.checked_folder import file_entry

    gen = _gen(folder)
    np.save(gen / "tokens.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["tokens.npy"] = file_entry(gen / "tokens.npy")
    (folder / "manifest.json").write_text(json.dumps(manifest))


HOSTILE = {
    "truncated npy": _truncate,
    "a flipped byte": _flip_byte,
    "edited count": _edit_manifest(num_tokens=3),
    "wrong format name": _edit_manifest(format="refdecode-corpus-index"),
    "wrong version": _edit_manifest(version=99),
    "generation outside": _edit_manifest(generation="../../etc"),
    "file outside": _edit_manifest(files={"../x.npy": {"bytes": 1, "sha256": "0" * 64}}),
    "bad max_ngram": _edit_manifest(max_ngram=-3),
    "max_ngram too long": _edit_manifest(max_ngram=17),
    "max_tokens zero": _edit_manifest(max_tokens=0),
    "fingerprint not a string": _edit_manifest(tokenizer_fingerprint=5),
    "symlinked file": _symlink_file,
    "missing file": _missing_file,
    "inconsistent arrays": _consistent_lie,
    "pickled array": _pickled_array,
    "corrupt manifest": lambda f: (f / "manifest.json").write_bytes(b"{\xff"),
    "no manifest": lambda f: (f / "manifest.json").unlink(),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_folders_are_refused(tmp_path, name):
    folder = tmp_path / "mem"
    _filled().save(folder)
    HOSTILE[name](folder)
    with pytest.raises(IndexFormatError):
        OutputMemory.load(folder)


def test_not_a_folder_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    for path in (tmp_path / "f", tmp_path / "none"):
        with pytest.raises(IndexFormatError):
            OutputMemory.load(path)


def test_a_failed_save_leaves_the_old_memory(tmp_path, monkeypatch):
    folder = tmp_path / "mem"
    first = _filled(seed=1)
    first.save(folder)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        _filled(seed=2).save(folder)
    monkeypatch.undo()
    assert OutputMemory.load(folder).outputs() == first.outputs()
    assert len([p for p in folder.iterdir() if p.name.startswith("gen-")]) == 1
    with pytest.raises(OSError):
        monkeypatch.setattr(os, "rename", fail)
        _filled().save(tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mem"]  # no staging folder left


def test_manifest_names_the_format(tmp_path):
    _filled().save(tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["format"] == MEMORY_FORMAT and manifest["version"] == 1
    assert manifest["tokenizer_fingerprint"].startswith("sha256:")
    assert set(manifest["files"]) == {"tokens.npy", "lengths.npy"}


# ---------------------------------------------------------------------------------------------------------------
# generate(memory=...): lossless, and the repeated request drafts from memory
# ---------------------------------------------------------------------------------------------------------------


def test_generate_with_memory_is_lossless_and_drafts_a_repeat(monkeypatch, smollm2_tokenizer):
    import torch
    from stats_helpers import tiny_llama

    import refdecode
    import refdecode.decoding

    # wide forwards cost as much as narrow ones: no calibration forwards, drafting independent of this machine
    monkeypatch.setattr(refdecode.decoding, "calibrate_costs", lambda *args, **kwargs: {1: 1.0, 64: 1.0})
    tokenizer = smollm2_tokenizer
    model = tiny_llama(vocab_size=len(tokenizer), seed=3, max_positions=256, eos_token_id=None)
    with torch.no_grad():
        model.lm_head.weight.mul_(40)  # words rather than ties between near-equal logits
    prompt = "The quick brown fox asked the librarian where the old maps were kept, and she said"
    plain = refdecode.generate(model, tokenizer, prompt, max_new_tokens=48, max_draft=0)
    memory = OutputMemory()
    first = refdecode.generate(model, tokenizer, prompt, max_new_tokens=48, memory=memory)
    assert first.token_ids == plain.token_ids and len(memory) == 1
    assert memory.outputs()[0] == first.token_ids[-memory.num_tokens :]
    second = refdecode.generate(model, tokenizer, prompt, max_new_tokens=48, memory=memory)
    assert second.token_ids == plain.token_ids
    assert second.stats.accepted_tokens > first.stats.accepted_tokens
    assert second.stats.steps < first.stats.steps
