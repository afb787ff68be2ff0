"""scripts/bench_passage_scale: its two vector sources (synthetic; hashed vectors of a passage stream, cached) and
exact neighbours (the passage index writer is tested in tests/corpus)."""

from __future__ import annotations

import numpy as np
import pytest

from refdecode.corpus.embedding import HashedNgramEmbedder
from scripts import bench_passage_scale as bench
from scripts.bench_passage_scale import (
    BLOCK,
    QUERY_POOL,
    PassageStream,
    Synthetic,
    corpus_vectors,
    cut,
    exact_top10,
    main,
    mapped_vectors,
    replacement_words,
)

N, DIM = 500, 16


def test_synthetic_vectors_are_unit_the_same_every_pass_and_as_many_as_asked():
    vectors = Synthetic(BLOCK + 100, 16, per_topic=8, seed=3)
    first, second = list(vectors), list(vectors)
    assert [b.shape for b in first] == [(BLOCK, 16), (100, 16)]
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert np.allclose(np.linalg.norm(np.concatenate(first), axis=1), 1.0, atol=1e-5)
    assert not np.array_equal(first[0], next(iter(Synthetic(BLOCK + 100, 16, per_topic=8, seed=4))))


def test_exact_neighbours_match_brute_force_across_blocks():
    vectors = Synthetic(BLOCK + 500, 8, per_topic=4, seed=0, noise=2.0)
    queries = vectors.draw(5, np.random.default_rng(1))
    everything = np.concatenate(list(vectors))
    brute = np.argsort(-(queries @ everything.T), axis=1)[:, :10]
    assert [set(r) for r in exact_top10(vectors, queries).tolist()] == [set(r) for r in brute.tolist()]


def stream(seed: int = 0) -> PassageStream:
    """40 texts of made-up words (one unit a pass): ~4 passages each, so N vectors and the queries span passes."""
    rng = np.random.default_rng(7)
    vocabulary = [f"w{i}" for i in range(300)]
    texts = [
        "\n\n".join(" ".join(rng.choice(vocabulary, size=int(rng.integers(5, 30)))) for _ in range(8))
        for _ in range(40)
    ]
    return PassageStream(texts, replacement_words(texts), chunk_chars=200, seed=seed)


def made(tmp_path, name: str, **kw) -> tuple[np.ndarray, np.ndarray]:
    vectors, queries, _ = corpus_vectors(N, kw.pop("source", stream()), dim=DIM, cache=tmp_path / name, **kw)
    return np.load(vectors), np.load(queries)


def test_passages_are_cut_within_chunk_chars_and_join_back_into_the_text():
    text = stream().texts[0]
    pieces = cut(text, 200)
    assert "".join(pieces) == text and len(pieces) > 1 and max(map(len, pieces)) <= 200


def test_corpus_vectors_are_the_embedders_of_the_passages_in_order_without_zero_or_repeated_ones(tmp_path):
    s = stream()
    passages = [p for unit in range(40) for p in s.passages(unit)]
    vectors = HashedNgramEmbedder(DIM).fit(passages[:N]).embed(passages)
    keep = np.linalg.norm(vectors, axis=1) > 0.5
    keep &= np.isin(np.arange(len(vectors)), np.unique(vectors, axis=0, return_index=True)[1])  # first copies
    expected = vectors[keep]
    got, queries = made(tmp_path, "one", workers=1)
    assert got.dtype == queries.dtype == np.float32
    assert got.shape == (N, DIM) and queries.shape == (QUERY_POOL, DIM)
    assert np.array_equal(got, expected[:N]) and np.array_equal(queries, expected[N : N + QUERY_POOL])
    assert np.allclose(np.linalg.norm(np.concatenate((got, queries)), axis=1), 1.0, atol=1e-5)


def test_corpus_vectors_depend_on_the_seed_and_not_on_the_workers(tmp_path):
    one, two = made(tmp_path, "one", workers=1), made(tmp_path, "two", workers=2)
    assert np.array_equal(one[0], two[0]) and np.array_equal(one[1], two[1])
    assert not np.array_equal(one[0], made(tmp_path, "other", workers=1, source=stream(seed=1))[0])


def test_query_vectors_are_no_rows_of_the_indexed_set(tmp_path):
    vectors, queries = made(tmp_path, "one", workers=1)
    indexed = {row.tobytes() for row in vectors}
    assert not any(q.tobytes() in indexed for q in queries)


def test_cached_vectors_are_reused(tmp_path, monkeypatch):
    first = corpus_vectors(N, stream(), dim=DIM, cache=tmp_path, workers=1)
    assert first[2] is not None
    monkeypatch.setattr(bench, "make_vectors", lambda *a, **kw: pytest.fail("made again"))
    again = corpus_vectors(N, stream(), dim=DIM, cache=tmp_path, workers=1)
    assert again == (first[0], first[1], None)
    blocks = list(mapped_vectors(first[0], first[1], 3, {}).blocks())
    assert np.array_equal(np.concatenate(blocks), np.load(first[0])) and isinstance(blocks[0], np.memmap)


def test_a_failed_making_leaves_no_file_and_the_next_one_makes_them_whole(tmp_path, monkeypatch):
    kept, calls = bench._kept, []

    def fail_on_the_third_unit(*args):
        calls.append(1)
        if len(calls) == 3:  # the vectors' file is half written by now
            raise KeyboardInterrupt
        return kept(*args)

    monkeypatch.setattr(bench, "_kept", fail_on_the_third_unit)
    with pytest.raises(KeyboardInterrupt):
        corpus_vectors(N, stream(), dim=DIM, cache=tmp_path / "cache", workers=1)
    assert list((tmp_path / "cache").iterdir()) == []
    monkeypatch.setattr(bench, "_kept", kept)
    assert np.array_equal(made(tmp_path, "cache", workers=1)[0], made(tmp_path, "fresh", workers=1)[0])


@pytest.mark.parametrize(
    "argv",
    [
        ["--passages", "100"],
        ["--dim", "4"],
        ["--passages", "ten"],
        ["--kinds", "flat"],
        ["--vectors", "real"],
        ["--queries", str(QUERY_POOL + 1)],
        ["--workers", "0"],
    ],
)
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
