"""scripts/bench_passage_scale: its synthetic vectors and exact neighbours (the IVF-PQ writer is tested in
tests/corpus)."""

from __future__ import annotations

import numpy as np
import pytest

from scripts.bench_passage_scale import BLOCK, Synthetic, exact_top10, main


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


@pytest.mark.parametrize("argv", [["--passages", "100"], ["--dim", "4"], ["--passages", "ten"]])
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
