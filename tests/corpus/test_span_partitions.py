"""The partitioned suffix order (index format version 3): a span index cut into tiny partitions answers exactly as
the single-array index and as brute force; the order is unique (ties by position); write_span_index writes the same
files whatever the block sizes; int64 positions; the writer refuses bad input; tampered partitions are refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from index_helpers import answers, build, gen_dir, span_contexts, write_corpus

from refdecode.checked_folder import file_entry
from refdecode.corpus import CorpusIndex, IndexFormatError
from refdecode.corpus import spans as spans_module
from refdecode.corpus.spans import (
    DEPTH,
    ShardedStream,
    SpanIndex,
    SuffixOrder,
    build_suffix_order,
    encode_stream,
    read_span_index,
    span_fields_problem,
    stream_shard_names,
    write_span_index,
)

hypothesis = pytest.importorskip("hypothesis", reason="property tests need the test extra: pip install -e '.[test]'")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_spans_props import draw_tails  # noqa: E402


def brute_match(docs, tail):
    """Longest L <= DEPTH with tail[-L:] inside a document, and the continuations (<= 4 tokens) after it."""
    best, conts = 0, set()
    for L in range(1, min(DEPTH, len(tail)) + 1):
        pat = list(tail[-L:])
        found = [d[i + L : i + L + 4] for d in docs for i in range(len(d) - L + 1) if d[i : i + L] == pat]
        if not found:
            break
        best, conts = L, {tuple(c) for c in found} - {()}
    return best, conts


def saved(index: SpanIndex, folder, **kw) -> SpanIndex:
    folder.mkdir(parents=True, exist_ok=True)
    _, fields = index.save(folder, **kw)
    return SpanIndex.load(folder, fields)


@st.composite
def corpus_and_tails(draw):
    vocab = draw(st.sampled_from([2, 3, 5, 70_000]))
    token = st.integers(0, vocab - 1) if vocab < 10 else st.integers(0, 4)
    docs = draw(st.lists(st.lists(token, max_size=40), max_size=5))
    return vocab, docs, draw_tails(draw, docs, token, count=5, noise=3)


@pytest.mark.fuzz
@settings(max_examples=60, deadline=None)
@given(case=corpus_and_tails(), partition_entries=st.integers(1, 9), shard_tokens=st.integers(1, 40))
def test_tiny_partitions_answer_as_one_array_and_brute_force(tmp_path_factory, case, partition_entries, shard_tokens):
    """Partitions of a few entries and stream shards of a few tokens (windows and continuations cross the cuts)."""
    vocab, docs, tails = case
    one = SpanIndex.build(docs, vocab)
    folder = tmp_path_factory.mktemp("parts")
    parted = saved(one, folder, partition_entries=partition_entries, stream_shard_tokens=shard_tokens)
    assert len(parted.sa.parts) == max(1, -(-one.num_tokens // partition_entries))
    shards = -(-one.stream.size // shard_tokens)
    assert len(getattr(parted.stream, "parts", [parted.stream])) == shards
    assert (folder / "span_stream.npy").exists() == (shards == 1)
    assert np.array_equal(parted.stream[:], one.stream)
    for tail in tails:
        L, a, b = parted.longest_match(tail)
        assert (L, a, b) == one.longest_match(tail)
        assert L == brute_match(docs, tail)[0]
        assert np.array_equal(parted.sa[a:b], one.sa[a:b])  # a range that may span partitions
        got = parted.continuations(tail, 4, max_candidates=10_000, min_match=1, pool=10_000)
        assert got == one.continuations(tail, 4, max_candidates=10_000, min_match=1, pool=10_000)
        want_L, want = brute_match(docs, tail)
        assert set(map(tuple, got[1])) == want and got[0] == (want_L if want else 0)


def test_suffix_order_slices_and_gathers_across_partitions():
    rng = np.random.default_rng(0)
    whole = rng.integers(0, 1000, size=50).astype(np.uint32)
    cuts = [0, 0, 7, 8, 8, 30, 50]  # empty partitions included
    order = SuffixOrder([whole[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)])
    assert order.size == len(order) == 50 and order.max() == int(whole.max())
    for lo, hi, step in [(0, 50, 1), (5, 9, 1), (7, 8, 1), (8, 31, 1), (3, 3, 1), (9, 2, 1), (0, 50, 7), (1, 49, 3)]:
        assert np.array_equal(order[lo:hi:step], whole[lo:hi:step])
    rows = rng.integers(0, 50, size=200)
    assert np.array_equal(order.take(rows), whole[rows]) and order.take(rows).dtype == np.uint32
    assert order[3] == whole[3] and order[-1] == whole[-1] and order[np.int64(49)] == whole[49]
    with pytest.raises(IndexError):
        order[50]
    with pytest.raises(TypeError):
        order[[1, 2]]
    clipped = rng.integers(-5, 55, size=(20, 16))  # np.take calls take, mode="clip" as a lookup's windows use it
    assert np.array_equal(np.take(order, clipped, mode="clip"), np.take(whole, clipped, mode="clip"))
    with pytest.raises(IndexError):
        order.take(np.array([0, 50]))


def test_ties_are_ordered_by_position():
    """Equal 16-token windows (long repeats) sort by position: the order is unique, so any engine sorting by
    (window, position) writes the same suffix order."""
    rng = np.random.default_rng(1)
    docs = [[1] * 40, [1, 2] * 30, rng.integers(0, 3, 200).tolist(), [1] * 40]
    stream = encode_stream(docs, 5)
    order = build_suffix_order(stream)

    def window(e):
        return tuple(int(stream[e - j]) if e - j >= 0 else 0 for j in range(DEPTH))

    expected = sorted(np.flatnonzero(stream).tolist(), key=lambda e: (window(e), e))
    assert order.tolist() == expected


def _blockings(order: np.ndarray, rng) -> list[list[np.ndarray]]:
    """The same order as one block, one block per entry with empty blocks between, and random splits."""
    cuts = np.sort(rng.integers(0, order.size + 1, size=6))
    return [
        [order],
        [b for e in order for b in (np.zeros(0, order.dtype), order[order == e][:1])],
        np.split(order, cuts),
        [np.zeros(0, np.uint32), *np.split(order, [1, 2, 3]), np.zeros(0, np.uint32)],
    ]


@pytest.mark.parametrize("partition_entries", [1, 4, 1 << 26])
def test_any_blocking_writes_the_same_files(tmp_path, partition_entries):
    rng = np.random.default_rng(2)
    stream = encode_stream([rng.integers(0, 6, int(rng.integers(0, 50))).tolist() for _ in range(8)], 6)
    order = build_suffix_order(stream)
    written = []
    for i, blocks in enumerate(_blockings(order, rng)):
        folder = tmp_path / str(i)
        folder.mkdir()
        names, fields = write_span_index(folder, stream, iter(blocks), partition_entries=partition_entries)
        written.append((names, fields, {n: (folder / n).read_bytes() for n in names}))
    assert all(w == written[0] for w in written)
    names, fields, _ = written[0]
    assert names[0] == "span_stream.npy" and names[-1] == "span_samples.npy"
    assert sum(p["entries"] for p in fields["span_partitions"]) == order.size
    assert np.array_equal(np.load(tmp_path / "0" / "span_stream.npy"), stream)


def test_int64_positions_answer_the_same(tmp_path):
    rng = np.random.default_rng(3)
    docs = [rng.integers(0, 4, 60).tolist() for _ in range(6)]
    one = SpanIndex.build(docs, 4)
    names, fields = write_span_index(tmp_path, one.stream, [one.sa[:]], partition_entries=50, position_dtype=np.int64)
    assert fields["position_dtype"] == "int64" and all(np.load(tmp_path / n).dtype == np.int64 for n in names[1:-1])
    wide = read_span_index(tmp_path, fields, span_tokens=one.num_tokens)
    assert wide.sa.dtype == np.int64 and len(wide.sa.parts) == -(-one.num_tokens // 50)
    for _ in range(100):
        doc = docs[int(rng.integers(6))]
        tail = doc[: int(rng.integers(1, 30))]
        assert wide.continuations(tail, 4, min_match=1) == one.continuations(tail, 4, min_match=1)
    with pytest.raises(IndexFormatError, match=r"span_sa.00000.npy: array of int64.*expected.*uint32"):
        read_span_index(tmp_path, {**fields, "position_dtype": "uint32"}, span_tokens=one.num_tokens)
    with pytest.raises(ValueError, match="position_dtype must be uint32"):
        write_span_index(tmp_path, one.stream, [one.sa[:]], position_dtype=np.int32)


def test_the_writer_refuses_bad_input(tmp_path):
    stream = encode_stream([[1, 2, 3, 1, 2], [3, 3]], 4)
    order = build_suffix_order(stream)
    cases = {
        "out of order": ([order[3:], order[:3]], "out of order"),
        "a separator": ([np.array([0], np.uint32)], "outside the stream's tokens"),
        "past the stream": ([np.array([stream.size + 5])], "outside the stream's tokens"),
        "repeated positions": ([order, order], "some repeat|out of order"),
        "2-D block": ([order[None, :]], "1-D integer array"),
        "float block": ([order.astype(float)], "1-D integer array"),
    }
    for blocks, pattern in cases.values():
        with pytest.raises(ValueError, match=pattern):
            write_span_index(tmp_path, stream, blocks)
    with pytest.raises(ValueError, match="start and end with the separator"):
        write_span_index(tmp_path, stream[1:], [])
    with pytest.raises(ValueError, match="partition_entries"):
        write_span_index(tmp_path, stream, [order], partition_entries=0)
    with pytest.raises(ValueError, match="stream_shard_tokens"):
        write_span_index(tmp_path, stream, [order], stream_shard_tokens=0)


def test_stream_shards_are_written_and_read_as_one_stream(tmp_path):
    rng = np.random.default_rng(5)
    docs = [rng.integers(0, 4, 60).tolist() for _ in range(6)]
    one = SpanIndex.build(docs, 4)
    names, fields = write_span_index(tmp_path, one.stream, [one.sa[:]], stream_shard_tokens=100)
    sizes = [100] * (one.stream.size // 100) + ([one.stream.size % 100] if one.stream.size % 100 else [])
    assert fields["stream_shards"] == sizes and names[: len(sizes)] == list(stream_shard_names(len(sizes)))
    assert names[0] == "span_stream.00000.npy" and not (tmp_path / "span_stream.npy").exists()
    assert np.array_equal(np.concatenate([np.load(tmp_path / n) for n in names[: len(sizes)]]), one.stream)
    sharded = read_span_index(tmp_path, fields, span_tokens=one.num_tokens)
    assert isinstance(sharded.stream, ShardedStream) and sharded.stream.size == one.stream.size
    for _ in range(100):
        doc = docs[int(rng.integers(6))]
        tail = doc[: int(rng.integers(1, 30))]
        assert sharded.continuations(tail, 4, min_match=1) == one.continuations(tail, 4, min_match=1)
    again = tmp_path / "again"  # a sharded stream saves as the array it stands for
    again.mkdir()
    assert sharded.save(again)[1]["stream_shards"] == [one.stream.size]
    assert np.array_equal(np.load(again / "span_stream.npy"), one.stream)
    assert span_fields_problem({**fields, "stream_shards": [0]}) is not None
    assert span_fields_problem({**fields, "stream_shards": "100"}) is not None
    assert span_fields_problem({k: v for k, v in fields.items() if k != "stream_shards"}) is None  # older writers


# -- a whole index with many partitions, and tampered partitions ---------------------------------------------------


@pytest.fixture(scope="module")
def parted(tmp_path_factory):
    """An index cut into partitions of 100 entries, and what it answers (the same as a one-partition index)."""
    root = tmp_path_factory.mktemp("parted")
    src = write_corpus(root / "src", seed=4)
    build(src, root / "one")
    build(src, root / "idx", partition_entries=100)
    ctx = span_contexts(src)
    expected = answers(CorpusIndex.load(root / "one"), ctx)
    return root, expected, ctx


def test_a_stream_sharded_index_answers_as_one(parted, tmp_path, monkeypatch):
    """A whole index whose stream is cut every 64 tokens answers as the one-file index; an index written before
    stream shards (no `stream_shards` field) still loads."""
    root, expected, ctx = parted
    monkeypatch.setattr(spans_module, "STREAM_SHARD_TOKENS", 64)
    idx = build(root / "src", tmp_path / "sharded")
    index = CorpusIndex.load(idx)
    shards = index.manifest["stream_shards"]
    assert (
        len(shards) > 3
        and sum(shards) == index.spans.stream.size
        and "span_stream.00000.npy" in index.manifest["files"]
    )
    assert answers(index, ctx) == expected
    for i in range(0, len(index), 7):  # passages read their tokens across the cuts
        assert index.passage(i).token_ids == CorpusIndex.load(root / "one").passage(i).token_ids
    old = shutil.copytree(root / "one", tmp_path / "old")
    _edit(lambda m: m.pop("stream_shards"))(old)
    assert answers(CorpusIndex.load(old), ctx) == expected


def test_a_many_partition_index_answers_as_one(parted, tmp_path):
    root, expected, ctx = parted
    index = CorpusIndex.load(root / "idx")
    info = index.info()
    assert info["span_partitions"] == len(index.manifest["span_partitions"]) > 3
    assert info["passage_index"] == {"kind": "flat"} and info["position_dtype"] == "uint32"
    assert answers(index, ctx) == expected


def _manifest(idx):
    return json.loads((idx / "manifest.json").read_text())


def _swap_partitions(idx):
    """Partitions 1 and 2 swapped, files and manifest entries made consistent: only the order check can tell."""
    m, gen = _manifest(idx), gen_dir(idx)
    a, b = gen / "span_sa.00001.npy", gen / "span_sa.00002.npy"
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    parts = m["span_partitions"]
    parts[1]["entries"], parts[2]["entries"] = _entries(a), _entries(b)
    parts[1]["first_key"], parts[2]["first_key"] = _key_of(idx, a), _key_of(idx, b)
    m["files"]["span_sa.00001.npy"], m["files"]["span_sa.00002.npy"] = file_entry(a), file_entry(b)
    (idx / "manifest.json").write_text(json.dumps(m))


def _entries(path) -> int:
    return int(np.load(path).size)


def _key_of(idx, path) -> str:
    """The hex key of a partition file's first entry, as the writer records it."""
    stream = np.load(gen_dir(idx) / "span_stream.npy")
    e = int(np.load(path)[0])
    window = [int(stream[e - j]) if e - j >= 0 else 0 for j in range(DEPTH)]
    return np.array(window).astype(stream.dtype.newbyteorder(">")).tobytes().hex()


def _edit(fn):
    def mutate(idx):
        m = _manifest(idx)
        fn(m)
        (idx / "manifest.json").write_text(json.dumps(m))

    return mutate


def _rewrite_partition(i: int, fn):
    def mutate(idx):
        path = gen_dir(idx) / f"span_sa.{i:05d}.npy"
        arr = fn(np.load(path))
        path.unlink()
        np.save(path, arr, allow_pickle=False)
        m = _manifest(idx)
        m["files"][path.name] = file_entry(path)
        (idx / "manifest.json").write_text(json.dumps(m))

    return mutate


TAMPERED = {
    "partitions swapped (consistent manifest)": (_swap_partitions, "out of order"),
    "first key edited": (_edit(lambda m: m["span_partitions"][1].update(first_key="00" * 32)), "first_key"),
    "first key not hex": (_edit(lambda m: m["span_partitions"][1].update(first_key="zz")), "first_key"),
    "entries off by one": (
        _edit(lambda m: m["span_partitions"][0].update(entries=m["span_partitions"][0]["entries"] + 1)),
        "positions, the manifest says",
    ),
    "a partition renamed": (_edit(lambda m: m["span_partitions"][1].update(file="span_sa.00009.npy")), "name the file"),
    "a partition dropped": (_edit(lambda m: m["span_partitions"].pop()), "unexpected: span_sa"),
    "position dtype int64": (_edit(lambda m: m.update(position_dtype="int64")), "expected 1 dimension"),
    "position dtype other": (_edit(lambda m: m.update(position_dtype="float64")), "position_dtype"),
    "partitions not a list": (_edit(lambda m: m.update(span_partitions={})), "span_partitions"),
    "no partitions": (_edit(lambda m: m.update(span_partitions=[])), "span_partitions"),
    "partition reversed inside": (_rewrite_partition(1, lambda a: a[::-1]), "first_key|out of order"),
    "partition of int64": (_rewrite_partition(1, lambda a: a.astype(np.int64)), "expected 1 dimension"),
    "partition past the stream": (_rewrite_partition(2, lambda a: a + 10**6), "outside the stream"),
    "passage index kind unknown": (_edit(lambda m: m.update(passage_index={"kind": "hnsw"})), "passage_index"),
    "stream shard sizes garbage": (_edit(lambda m: m.update(stream_shards=[-3])), "stream_shards"),
}


def _shard_edit(fn):
    def mutate(idx):
        m = _manifest(idx)
        fn(m, gen_dir(idx))
        (idx / "manifest.json").write_text(json.dumps(m))

    return mutate


def _drop_last_shard(m, gen):
    last = f"span_stream.{len(m['stream_shards']) - 1:05d}.npy"
    (gen / last).unlink()
    m["files"].pop(last)
    m["stream_shards"].pop()


SHARDS_TAMPERED = {
    "a shard's size edited": (_shard_edit(lambda m, g: m["stream_shards"].__setitem__(1, 65)), "tokens, the manifest"),
    "a shard dropped": (_shard_edit(_drop_last_shard), "positions for a stream|outside the stream|not the manifest"),
    "one shard said": (_shard_edit(lambda m, g: m.update(stream_shards=[sum(m["stream_shards"])])), "span_stream"),
}


@pytest.mark.parametrize("case", list(SHARDS_TAMPERED))
def test_tampered_stream_shards_are_refused_in_one_line(tmp_path, monkeypatch, case):
    monkeypatch.setattr(spans_module, "STREAM_SHARD_TOKENS", 64)
    idx = build(write_corpus(tmp_path / "src", seed=4), tmp_path / "idx")
    mutate, pattern = SHARDS_TAMPERED[case]
    mutate(idx)
    with pytest.raises(IndexFormatError, match=pattern) as err:
        CorpusIndex.load(idx, checksums=False)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_partitions_are_refused_in_one_line(parted, tmp_path, case):
    root, _, _ = parted
    shutil.copytree(root / "idx", tmp_path / "idx")
    mutate, pattern = TAMPERED[case]
    mutate(tmp_path / "idx")
    for checksums in (True, False):
        with pytest.raises(IndexFormatError, match=pattern) as err:
            CorpusIndex.load(tmp_path / "idx", checksums=checksums)
        assert "\n" not in str(err.value)
