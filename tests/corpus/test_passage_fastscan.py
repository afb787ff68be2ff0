"""The fast-scan passage index (passage_index.py, compressed="fastscan", the default above the flat limit): 4-bit
IVF-PQ fast-scan whose candidates are re-ranked exactly against the stored vectors. Its fields, recall against exact
search, the re-ranking against a brute-force oracle, the choice of k_factor and nprobe, identical bytes from
identical inputs, and the header walk that refuses a damaged or mismatched file (or stored vectors) before faiss
reads it."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from index_helpers import assert_disagreeing_fields_refused, clustered, damaged_faiss, ivf_header_cases, patched

from refdecode.corpus import IndexFormatError
from refdecode.corpus import passage_index as pi
from refdecode.corpus.npyfile import NpyAppender, open_npy

faiss = pytest.importorskip("faiss")

N, DIM = 3000, 32


def write(folder, vectors, n=N):
    return pi.write_passage_index(folder, vectors, dim=DIM, n_total=n, flat_limit_bytes=1000)


@pytest.fixture(scope="module")
def fast(tmp_path_factory):
    """A fast-scan passage index of N clustered vectors, written from blocks of uneven sizes."""
    folder = tmp_path_factory.mktemp("fast")
    x = clustered(N, DIM, seed=10)
    blocks = [x[a:b] for a, b in zip([0, 1, 700, 701, 2500], [1, 700, 701, 2500, N], strict=True)]
    files, fields = write(folder, lambda: iter(blocks))
    return folder, x, files, fields["passage_index"]


def read(folder, fields, dim=DIM, n=N):
    return pi.read_passage_index(folder / "passages.faiss", fields, dim, n, f"index {folder}: file passages.faiss")


def exact_top(x: np.ndarray, queries: np.ndarray, k: int = 10) -> np.ndarray:
    flat = faiss.IndexFlatIP(DIM)
    flat.add(x)
    return flat.search(queries, k)[1]


def test_fastscan_is_the_default_above_the_limit_with_its_fields(fast):
    _, _, files, fields = fast
    assert files == ["passages.faiss", "passages.refine.npy"]
    assert fields["kind"] == "ivfpq_fastscan" and fields["nbits"] == 4 and fields["m"] == DIM // 2
    assert fields["k_factor"] in pi.K_FACTORS and fields["refine"] == "float32"
    assert 1 <= fields["nprobe"] <= fields["nlist"] <= 4 * np.sqrt(N) + 1
    assert fields["recall_at_10"] >= pi.RECALL_TARGET and fields["held_out"] == pi.RECALL_QUERIES
    assert pi.passage_fields_problem({"passage_index": fields}) is None
    assert pi.passage_extra_files(fields) == ("passages.refine.npy",)


def test_the_stored_vectors_are_the_input_vectors(fast):
    folder, x, _, _ = fast
    stored = open_npy(folder / "passages.refine.npy", [np.float32], 2, "t")
    assert stored.shape == (N, DIM) and np.array_equal(stored, x)


def test_recall_against_flat_on_fresh_queries(fast):
    """The loaded index (nprobe and k_factor from the manifest) finds >= 90% of the exact top 10 for new queries."""
    folder, x, _, fields = fast
    index = read(folder, fields)
    assert isinstance(index, pi.RefinedIndex) and (index.d, index.ntotal) == (DIM, N)
    assert index.nprobe == fields["nprobe"] and index.k_factor == fields["k_factor"]
    queries = clustered(200, DIM, seed=1)
    assert pi._recall(index.search(queries, 10)[1], exact_top(x, queries)) >= 0.9


def test_reranking_against_a_brute_force_oracle(fast):
    """Oracle: the coarse index's own k * k_factor candidates, scored by numpy and sorted (score down, id up), give
    the same ids and scores; with every list probed and every vector a candidate it is exact search."""
    folder, x, _, fields = fast
    index = read(folder, fields)
    queries = clustered(30, DIM, seed=2)
    scores, ids = index.search(queries, 10)
    _, candidates = index.coarse.search(queries, 10 * index.k_factor)
    for q, cand, got_ids, got_scores in zip(queries, candidates, ids, scores, strict=True):
        cand = np.unique(cand[cand >= 0])
        exact = x[cand] @ q
        order = sorted(range(cand.size), key=lambda j: (-exact[j], cand[j]))[:10]
        assert got_ids.tolist() == cand[order].tolist() and np.allclose(got_scores, exact[order], atol=1e-6)
    everything = pi.RefinedIndex(index.coarse, index.vectors, k_factor=N)
    everything.nprobe = fields["nlist"]
    top_scores, top_ids = everything.search(queries, 10)
    brute = queries @ x.T  # (Q, N)
    for row, got in zip(brute, top_ids, strict=True):
        assert got.tolist() == sorted(range(N), key=lambda j: (-row[j], j))[:10]
    assert np.allclose(top_scores, np.sort(brute, axis=1)[:, ::-1][:, :10], atol=1e-6)


def test_more_neighbours_than_vectors_pads_with_minus_one(tmp_path):
    x = clustered(pi.MIN_IVF_PASSAGES, DIM, seed=3)
    _, fields = write(tmp_path, [x], n=x.shape[0])
    index = read(tmp_path, fields["passage_index"], n=x.shape[0])
    index.nprobe = fields["passage_index"]["nlist"]
    index.k_factor = 1
    scores, ids = index.search(x[:2], x.shape[0] + 5)
    assert (ids[:, -5:] == -1).all() and np.isneginf(scores[:, -5:]).all()
    assert sorted(ids[0, :-5].tolist()) == list(range(x.shape[0]))


def test_k_factor_and_nprobe_are_the_smallest_that_reach_the_target(fast):
    """Oracle on the writer's own held-out passages, each one's own vector left out of both lists: the recorded
    k_factor is the first of K_FACTORS that reaches the target with some nprobe (every smaller one misses it even
    with every list probed), and nprobe is the smallest for it."""
    folder, x, _, fields = fast
    index = read(folder, fields)
    nlist, held_rows, _ = pi._plan(N, fields["seed"])
    queries = x[held_rows]
    exact = pi._others(exact_top(x, queries, 11), held_rows, 10)

    def recall() -> float:
        return pi._recall(pi._others(index.search(queries, 11)[1], held_rows, 10), exact)

    for k_factor in pi.K_FACTORS[: pi.K_FACTORS.index(fields["k_factor"])]:
        index.k_factor, index.nprobe = k_factor, nlist
        assert recall() < pi.RECALL_TARGET
    index.k_factor = fields["k_factor"]
    index.nprobe = fields["nprobe"]
    assert round(recall(), 4) == fields["recall_at_10"] >= pi.RECALL_TARGET
    if fields["nprobe"] > 1:
        index.nprobe = fields["nprobe"] - 1
        assert recall() < pi.RECALL_TARGET


def test_a_held_out_passage_is_left_out_of_its_own_neighbours():
    """_others drops the row's own id wherever it stands, else the last id, and keeps the order of the rest."""
    ids = np.array([[7, 1, 2], [1, 7, 2], [1, 2, 3], [-1, -1, -1]])
    own = np.array([7, 7, 9, 7])
    assert pi._others(ids, own, 2).tolist() == [[1, 2], [1, 2], [1, 2], [-1, -1]]


def test_a_target_out_of_reach_warns_and_records_what_it_measured(tmp_path, monkeypatch):
    monkeypatch.setattr(pi, "RECALL_TARGET", 1.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, fields = write(tmp_path, [clustered(N, DIM, seed=4)])
    f = fields["passage_index"]
    assert any("misses the target" in str(w.message) for w in caught)
    assert f["k_factor"] == pi.K_FACTORS[-1] and f["nprobe"] == f["nlist"] and f["recall_at_10"] <= 1.0


def test_the_same_inputs_write_the_same_bytes(fast, tmp_path):
    folder, x, _, fields = fast
    _, again = write(tmp_path, [x])
    assert again["passage_index"] == fields
    for name in ("passages.faiss", "passages.refine.npy"):
        assert (tmp_path / name).read_bytes() == (folder / name).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["passages.faiss", "passages.refine.npy"]


def test_the_ondisk_ivfpq_kind_is_still_written_when_asked_for(tmp_path):
    files, fields = pi.write_passage_index(
        tmp_path, [clustered(N, DIM, seed=5)], dim=DIM, n_total=N, flat_limit_bytes=0, compressed="ivfpq"
    )
    assert files == ["passages.faiss", "passages.ivfdata"] and fields["passage_index"]["kind"] == "ivfpq"
    with pytest.raises(ValueError, match="compressed must be one of"):
        pi.write_passage_index(tmp_path, [clustered(N, DIM, seed=5)], dim=DIM, n_total=N, compressed="hnsw")


def _list_sizes_at(data: bytes) -> int:
    """Where the first list's vector count lies: right after the block lists' header ('ilbl', nlist, code size,
    vectors per block, bytes per block)."""
    return data.index(b"ilbl") + 4 + 4 * 8


HEADER_CASES = {
    **ivf_header_cases(N, DIM, b"IwPf"),
    "a list's size": lambda d: patched(d, _list_sizes_at(d), "<Q", 10**12),
    "block size": lambda d: patched(d, d.index(b"ilbl") + 4 + 3 * 8, "<Q", 64),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_header_check_refuses_a_damaged_or_mismatched_file(fast, tmp_path, case):
    folder, x, _, fields = fast
    damaged_faiss(HEADER_CASES[case], folder / "passages.faiss", x, tmp_path / "passages.faiss")
    (tmp_path / "passages.refine.npy").write_bytes((folder / "passages.refine.npy").read_bytes())
    with pytest.raises(IndexFormatError) as err:
        read(tmp_path, fields)
    assert "\n" not in str(err.value) and "passages.faiss" in str(err.value)


def _stored(path, array):
    np.save(path, array)


REFINE_CASES = {
    "truncated": lambda p, x: p.write_bytes(p.read_bytes()[:-4]),
    "one row short": lambda p, x: _stored(p, x[:-1]),
    "other dims": lambda p, x: _stored(p, x[:, :-1]),
    "float64": lambda p, x: _stored(p, x.astype(np.float64)),
    "not npy": lambda p, x: p.write_bytes(b"hello" * 100),
}


@pytest.mark.parametrize("case", list(REFINE_CASES))
def test_damaged_stored_vectors_are_refused(fast, tmp_path, case):
    folder, x, _, fields = fast
    (tmp_path / "passages.faiss").write_bytes((folder / "passages.faiss").read_bytes())
    refine = tmp_path / "passages.refine.npy"
    refine.write_bytes((folder / "passages.refine.npy").read_bytes())
    REFINE_CASES[case](refine, x)
    with pytest.raises(IndexFormatError, match="passages.refine.npy") as err:
        read(tmp_path, fields)
    assert "\n" not in str(err.value)


def test_missing_stored_vectors_are_a_missing_file(fast, tmp_path):
    folder, _, _, fields = fast
    (tmp_path / "passages.faiss").write_bytes((folder / "passages.faiss").read_bytes())
    with pytest.raises(Exception, match="passages.refine.npy is missing"):
        read(tmp_path, fields)


@pytest.mark.parametrize(
    "change",
    [{"nlist": 3}, {"m": DIM}, {"nbits": 8}, {"nprobe": 10**6}, {"k_factor": 0}, {"k_factor": True},
     {"refine": "float16"}, {"kind": "flat"}, {"kind": "ivfpq"}],
)  # fmt: skip
def test_a_manifest_that_disagrees_is_refused(fast, change):
    folder, _, _, fields = fast
    assert_disagreeing_fields_refused(folder / "passages.faiss", fields, change, DIM, N)


def test_compressed_option_in_the_cli(capsys):
    import argparse

    import refdecode.corpus.cli as cli

    parser = argparse.ArgumentParser(prog="refdecode")
    cli.add_index_commands(parser.add_subparsers(dest="command", required=True))
    base = ["index", "build", "src", "--out", "o", "--model", "m"]
    assert parser.parse_args(base).compressed == "fastscan"
    assert parser.parse_args([*base, "--compressed", "ivfpq"]).compressed == "ivfpq"
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args([*base, "--compressed", "hnsw"])
    assert exit_.value.code == 2 and "--compressed" in capsys.readouterr().err


def test_npy_appender_writes_rows(tmp_path):
    x = clustered(10, DIM, seed=6)
    with NpyAppender(tmp_path / "rows.npy", np.float32, (DIM,)) as out:
        out.append(x[:3])
        out.append(x[3:3])
        out.append(x[3:])
        with pytest.raises(ValueError, match=r"blocks of shape \(B, 32\)"):
            out.append(x[:, :5])
    assert np.array_equal(np.load(tmp_path / "rows.npy"), x)
    assert np.array_equal(open_npy(tmp_path / "rows.npy", [np.float32], 2, "t"), x)
