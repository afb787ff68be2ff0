"""The passage index (passage_index.py): flat below the limit, IVF-PQ above it with recall@10 >= 0.9 against exact
search, its manifest fields, the header check that refuses a truncated or mismatched file before faiss reads it,
the vectors' contract (a one-shot iterator is refused for IVF-PQ), --flat-limit parsing, and a whole CorpusIndex
over an IVF-PQ passage index."""

from __future__ import annotations

import json

import numpy as np
import pytest
from index_helpers import (
    as_version_2,
    assert_disagreeing_fields_refused,
    build,
    clustered,
    damaged_faiss,
    gen_dir,
    ivf_header_cases,
    write_corpus,
)

from refdecode.checked_folder import file_entry
from refdecode.corpus import CorpusIndex, IndexFormatError
from refdecode.corpus import passage_index as pi

faiss = pytest.importorskip("faiss")

N, DIM = 3000, 32


SHARD = 1000  # vectors per shard in these tests: N makes 3 shards, the blocks below cross their boundaries


def write_sharded(folder, vectors, shard=SHARD, n=N):
    """write_passage_index with shards of `shard` vectors (the module's SHARD_VECTORS, restored afterwards)."""
    before = pi.SHARD_VECTORS
    pi.SHARD_VECTORS = shard
    try:
        return pi.write_passage_index(folder, vectors, dim=DIM, n_total=n, flat_limit_bytes=1000, compressed="ivfpq")
    finally:
        pi.SHARD_VECTORS = before


@pytest.fixture(scope="module")
def ivf(tmp_path_factory):
    """An IVF-PQ passage index of N clustered vectors, written block by block (blocks of uneven sizes), in shards
    of SHARD vectors merged on disk."""
    folder = tmp_path_factory.mktemp("ivf")
    x = clustered(N, DIM, seed=10)
    blocks = [x[a:b] for a, b in zip([0, 1, 700, 701, 2500], [1, 700, 701, 2500, N], strict=True)]
    files, fields = write_sharded(folder, lambda: iter(blocks))
    return folder, x, files, fields["passage_index"]


def test_ivfpq_above_the_limit_with_its_fields(ivf):
    _, _, files, fields = ivf
    assert files == ["passages.faiss", "passages.ivfdata"]
    assert fields["kind"] == "ivfpq" and fields["nbits"] == 8 and DIM % fields["m"] == 0
    assert fields["inverted_lists"] == "ondisk" and fields["shards"] == 3
    assert 1 <= fields["nprobe"] <= fields["nlist"] <= 4 * np.sqrt(N) + 1
    assert fields["recall_at_10"] >= pi.RECALL_TARGET and fields["held_out"] == pi.RECALL_QUERIES
    assert fields["train_vectors"] <= max(64 * fields["nlist"], 39 * 256)
    assert pi.passage_fields_problem({"passage_index": fields}) is None


def test_ivfpq_recall_against_flat_on_fresh_queries(ivf):
    """The loaded index (nprobe from the manifest) finds >= 90% of the exact top 10 for queries it never saw."""
    folder, x, _, fields = ivf
    index = pi.read_passage_index(folder / "passages.faiss", fields, DIM, N, "test")
    assert index.nprobe == fields["nprobe"]
    flat = faiss.IndexFlatIP(DIM)
    flat.add(x)
    queries = clustered(200, DIM, seed=1)  # new points of the same clusters
    exact, found = flat.search(queries, 10)[1], index.search(queries, 10)[1]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found.tolist(), exact.tolist(), strict=True)])
    assert recall >= 0.9


def test_the_same_inputs_write_the_same_file(ivf, tmp_path):
    folder, x, _, fields = ivf
    _, again = write_sharded(tmp_path, [x])
    assert again["passage_index"] == fields
    for name in ("passages.faiss", "passages.ivfdata"):  # the lists file is recorded by name, not by its path
        assert (tmp_path / name).read_bytes() == (folder / name).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["passages.faiss", "passages.ivfdata"]  # shards removed


def test_shards_merged_on_disk_search_as_one_index_in_memory(ivf, tmp_path):
    """Oracle: the same vectors in one shard, and the same trained index filled in memory by faiss itself, return
    the same neighbours and scores as the 3 shards merged on disk; the folder reads from wherever it is moved."""
    folder, x, _, fields = ivf
    (tmp_path / "one").mkdir()
    _, one = write_sharded(tmp_path / "one", [x], shard=1 << 20)
    assert one["passage_index"]["shards"] == 1
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("passages.faiss", "passages.ivfdata"):
        (moved / name).write_bytes((folder / name).read_bytes())
    sharded = pi.read_passage_index(moved / "passages.faiss", fields, DIM, N, "test")
    single = pi.read_passage_index(tmp_path / "one" / "passages.faiss", one["passage_index"], DIM, N, "test")
    in_memory = faiss.read_index(str(moved / "passages.faiss"), faiss.IO_FLAG_ONDISK_SAME_DIR)
    plain = faiss.IndexIVFPQ(in_memory.quantizer, DIM, fields["nlist"], fields["m"], 8, faiss.METRIC_INNER_PRODUCT)
    plain.pq = in_memory.pq
    plain.is_trained = True
    plain.add(x)
    queries = clustered(50, DIM, seed=3)
    for index in (single, plain):
        index.nprobe = fields["nprobe"]
        d0, i0 = sharded.search(queries, 10)
        d1, i1 = index.search(queries, 10)
        assert np.array_equal(i0, i1) and np.allclose(d0, d1)


def test_a_damaged_or_missing_lists_file_is_refused(ivf, tmp_path):
    folder, _, _, fields = ivf
    (tmp_path / "passages.faiss").write_bytes((folder / "passages.faiss").read_bytes())
    data = (folder / "passages.ivfdata").read_bytes()
    with pytest.raises(Exception, match="passages.ivfdata is missing"):
        pi.check_passage_file(tmp_path / "passages.faiss", fields, DIM, N, "passages.faiss")
    for damaged in (data[:-1], data + b"\0"):
        (tmp_path / "passages.ivfdata").write_bytes(damaged)
        with pytest.raises(IndexFormatError, match="passages.ivfdata"):
            pi.check_passage_file(tmp_path / "passages.faiss", fields, DIM, N, "passages.faiss")


def test_an_ivfpq_index_with_its_lists_in_memory_still_loads(ivf, tmp_path):
    """Indexes written before the lists moved to disk: one passages.faiss, no `inverted_lists` field."""
    folder, x, _, fields = ivf
    trained = faiss.read_index(str(folder / "passages.faiss"), faiss.IO_FLAG_ONDISK_SAME_DIR)
    legacy = faiss.IndexIVFPQ(trained.quantizer, DIM, fields["nlist"], fields["m"], 8, faiss.METRIC_INNER_PRODUCT)
    legacy.pq = trained.pq
    legacy.is_trained = True
    legacy.add(x)
    faiss.write_index(legacy, str(tmp_path / "passages.faiss"))
    old = {k: v for k, v in fields.items() if k not in ("inverted_lists", "shards")}
    assert pi.passage_fields_problem({"passage_index": old}) is None
    index = pi.read_passage_index(tmp_path / "passages.faiss", old, DIM, N, "test")
    assert index.ntotal == N and index.nprobe == fields["nprobe"]
    assert pi.passage_fields_problem({"passage_index": {**fields, "inverted_lists": "cloud"}}) is not None


HEADER_CASES = ivf_header_cases(N, DIM, b"IwPQ")


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_header_check_refuses_a_damaged_or_mismatched_file(ivf, tmp_path, case):
    folder, x, _, fields = ivf
    damaged_faiss(HEADER_CASES[case], folder / "passages.faiss", x, tmp_path / "passages.faiss")
    (tmp_path / "passages.ivfdata").write_bytes((folder / "passages.ivfdata").read_bytes())
    with pytest.raises(IndexFormatError) as err:
        pi.check_passage_file(tmp_path / "passages.faiss", fields, DIM, N, "passages.faiss")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "change", [{"nlist": 3}, {"m": DIM // 2}, {"nbits": 4}, {"nprobe": 10**6}, {"kind": "flat"}, {"m": "8"}]
)
def test_header_check_refuses_a_manifest_that_disagrees(ivf, change):
    folder, _, _, fields = ivf
    assert_disagreeing_fields_refused(folder / "passages.faiss", fields, change, DIM, N)


def test_flat_below_the_limit_and_below_the_minimum(tmp_path):
    x = clustered(500, DIM, seed=2)
    for limit in (500 * DIM * 4, 0):  # at the limit; and too few passages for IVF whatever the limit
        files, fields = pi.write_passage_index(tmp_path, iter([x[:200], x[200:]]), dim=DIM, n_total=500,
                                               flat_limit_bytes=limit)  # fmt: skip
        assert fields == {"passage_index": {"kind": "flat"}}
        index = pi.read_passage_index(tmp_path / "passages.faiss", fields["passage_index"], DIM, 500, "t")
        assert index.ntotal == 500


def test_the_vectors_contract(tmp_path):
    x = clustered(N, DIM, seed=3)
    with pytest.raises(ValueError, match="one-shot iterator"):
        pi.write_passage_index(tmp_path, iter([x]), dim=DIM, n_total=N, flat_limit_bytes=0)
    with pytest.raises(ValueError, match="number 3000, n_total says 3001"):
        pi.write_passage_index(tmp_path, [x], dim=DIM, n_total=N + 1, flat_limit_bytes=1 << 30)
    with pytest.raises(ValueError, match=r"\(B, 32\) blocks"):
        pi.write_passage_index(tmp_path, [x[:, :8]], dim=DIM, n_total=N)
    bad = x.copy()
    bad[5, 3] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        pi.write_passage_index(tmp_path, [bad], dim=DIM, n_total=N)


@pytest.mark.parametrize(
    "text, value",
    [("0", 0), ("1073741824", 1 << 30), ("512M", 512 << 20), ("2G", 2 << 30), ("2g", 2 << 30), ("64KiB", 64 << 10),
     ("1TB", 1 << 40), (" 3 M ", 3 << 20)],
)  # fmt: skip
def test_parse_bytes(text, value):
    assert pi.parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "abc", "1.5G", "-1", "12Q", "G", "1 2"])
def test_parse_bytes_refuses_garbage(text):
    with pytest.raises(ValueError, match="expected a size in bytes like 512M"):
        pi.parse_bytes(text)


def test_flat_limit_option_in_the_cli(capsys):
    import argparse

    import refdecode.corpus.cli as cli

    parser = argparse.ArgumentParser(prog="refdecode")
    cli.add_index_commands(parser.add_subparsers(dest="command", required=True))
    base = ["index", "build", "src", "--out", "o", "--model", "m"]
    assert parser.parse_args(base).flat_limit == pi.FLAT_LIMIT_BYTES
    assert parser.parse_args([*base, "--flat-limit", "512M"]).flat_limit == 512 << 20
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args([*base, "--flat-limit", "lots"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--flat-limit" in err and "expected a size in bytes like 512M" in err


# -- a whole index over an IVF-PQ passage index ------------------------------------------------------------------


@pytest.mark.parametrize(
    "compressed, kind, beside",
    [("ivfpq", "ivfpq", "passages.ivfdata"), ("fastscan", "ivfpq_fastscan", "passages.refine.npy")],
)
def test_corpus_index_builds_loads_and_searches_a_compressed_passage_index(tmp_path, compressed, kind, beside):
    """build_index with flat_limit=0 writes the compressed kind asked for (a 64-dim hashed embedder, hashed_dim=64,
    keeps it quick: the default 16384 dims train slowly); the load checks its header and sets the manifest's nprobe;
    a passage's own text finds it; the file beside passages.faiss is part of the index."""
    src = write_corpus(tmp_path / "src", seed=0, docs=40, words=300)
    idx = build(src, tmp_path / "idx", chunk_tokens=8, flat_limit=0, hashed_dim=64, compressed=compressed)
    index = CorpusIndex.load(idx)
    fields = index.manifest["passage_index"]
    assert len(index) >= pi.MIN_IVF_PASSAGES and fields["kind"] == kind and index.manifest["embedder"]["dim"] == 64
    assert beside in index.manifest["files"]
    assert index._faiss.nprobe == fields["nprobe"] and index.info()["passage_index"] == fields
    hits = [index.retrieve(index.passage(i).text, k=3)[0].id == i for i in range(0, len(index), 37)]
    assert np.mean(hits) >= 0.8
    gen = gen_dir(idx)
    (gen / "passages.faiss").write_bytes((gen / "passages.faiss").read_bytes()[:-8])  # truncated and rehashed
    m = json.loads((idx / "manifest.json").read_text())
    m["files"]["passages.faiss"] = file_entry(gen / "passages.faiss")
    (idx / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IndexFormatError, match="passages.faiss: (ends inside its faiss header|declares more data)"):
        CorpusIndex.load(idx)
    assert (gen / beside).exists() and not any(".shard-" in p.name for p in gen.iterdir())
    (gen / beside).unlink()
    with pytest.raises(IndexFormatError, match=beside):
        CorpusIndex.load(idx)


def test_a_version_2_index_still_loads_and_answers_the_same(tmp_path):
    from index_helpers import answers, span_contexts

    src = write_corpus(tmp_path / "src", seed=5)
    idx = build(src, tmp_path / "idx")
    ctx = span_contexts(src)
    expected = answers(CorpusIndex.load(idx), ctx)
    as_version_2(idx)
    old = CorpusIndex.load(idx)
    names = {p.name for p in gen_dir(idx).iterdir()}
    assert old.manifest["version"] == 2 and "span_sa.npy" in names and "span_sa.00000.npy" not in names
    assert answers(old, ctx) == expected
    assert old.info()["span_partitions"] == 1 and old.info()["passage_index"] == {"kind": "flat"}


def test_the_merge_keeps_stdout_clean(tmp_path, capfd):
    """faiss prints as its on-disk lists grow; a CLI's stdout (JSON with --json) must not see it."""
    write_sharded(tmp_path, [clustered(N, DIM, seed=4)])
    out, _ = capfd.readouterr()
    assert "resizing" not in out


def test_nprobe_is_the_smallest_that_reaches_the_target(ivf):
    """Oracle: every nprobe from 1 to nlist tried in turn. The nprobe found reaches the target and the one below it
    does not; where recall is monotone in nprobe (nearly always), it is the first that reaches it."""
    folder, x, _, fields = ivf
    index = pi.read_passage_index(folder / "passages.faiss", fields, DIM, N, "test")
    queries = clustered(pi.RECALL_QUERIES, DIM, seed=7)
    flat = faiss.IndexFlatIP(DIM)
    flat.add(x)
    exact = flat.search(queries, 10)[1]
    nlist = fields["nlist"]
    scanned = []
    for probe in range(1, nlist + 1):
        index.nprobe = probe
        scanned.append(pi._recall(index.search(queries, 10)[1], exact))
    found, recall, reached = pi._smallest_nprobe(index, queries, exact, 10, nlist)
    assert reached and recall == scanned[found - 1] >= pi.RECALL_TARGET
    assert found == 1 or scanned[found - 2] < pi.RECALL_TARGET  # the one below it misses
    if all(a <= b for a, b in zip(scanned, scanned[1:], strict=False)):  # monotone: exactly the first that reaches
        assert found == next(p for p, r in enumerate(scanned, start=1) if r >= pi.RECALL_TARGET)
