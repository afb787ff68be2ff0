"""Near-duplicate passage removal with datasketch MinHash-LSH over token n-gram shingles.

Passages are compared by the Jaccard similarity of their sets of token 4-grams; a passage whose estimated
similarity to an earlier kept passage reaches `threshold` is dropped (the first copy wins, so the result does not
depend on anything but the input order). Signatures are computed with numpy using datasketch's own permutations
(its "affine32" scheme), a batch of passages at a time, and then handed to `MinHash` / `MinHashLSH`, so hashing
stays vectorized. datasketch is imported when a deduplication runs (the corpus extra).

The pieces another engine needs to take exactly these decisions are public: `permutations` (datasketch's, for
SEED), `lsh_bands` (the bands the LSH index uses for a threshold: candidates share all r values of one band) and
the confirmation rule (the fraction of equal signature values >= threshold).

This module knows token id sequences only; it knows nothing about files, text or the other indexes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .extra import require

__all__ = ["SHINGLE", "NUM_PERM", "SEED", "find_near_duplicates", "lsh_bands", "minhash_signatures", "permutations"]

SHINGLE = 4  # tokens per shingle
NUM_PERM = 128
SEED = 1  # datasketch's permutation seed: the same seed, the same signatures, the same decisions
_BATCH = 64  # passages hashed together: (NUM_PERM, shingles) uint32 work arrays of ~8 MB, cache-sized


def _shingle_hashes(ids: np.ndarray) -> np.ndarray:
    """32-bit hashes of the distinct token n-grams of one passage. (T,) -> (max(T-SHINGLE+1, 1),) uint32"""
    ids = ids.astype(np.uint64)
    if ids.size < SHINGLE:
        ids = np.concatenate([ids, np.zeros(SHINGLE - ids.size, np.uint64)])
    h = np.full(ids.size - SHINGLE + 1, 1469598103934665603, dtype=np.uint64)  # FNV-style mixing per column
    for j in range(SHINGLE):
        h = (h ^ ids[j : ids.size - SHINGLE + 1 + j]) * np.uint64(1099511628211)
    return np.unique((h >> np.uint64(32)).astype(np.uint32))


def minhash_signatures(passages: Sequence[np.ndarray], perm: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """MinHash values of each passage's shingle set under datasketch's "affine32" permutations
    h -> a*h + b mod 2^32 (uint32 arithmetic wraps). (P passages) -> (P, NUM_PERM) uint32"""
    a, b = perm  # (NUM_PERM,) uint32 each
    hashes = [_shingle_hashes(np.asarray(p)) for p in passages]
    starts = np.cumsum([0] + [h.size for h in hashes[:-1]])
    hv = np.concatenate(hashes)[None, :]  # (1, S)
    return np.minimum.reduceat(a[:, None] * hv + b[:, None], starts, axis=1).T  # (P, NUM_PERM)


def _lsh(threshold: float):
    """The MinHashLSH that proposes candidates for `threshold`. Its own threshold sits below the real one so that
    few true near-duplicates are missed by banding; candidates are then confirmed with the signatures' Jaccard
    estimate (the fraction of equal signature values)."""
    datasketch = require("datasketch")
    return datasketch.MinHashLSH(threshold=min(max(threshold - 0.15, 0.05), 0.9), num_perm=NUM_PERM)


def lsh_bands(threshold: float) -> tuple[int, int]:
    """(b, r): the bands of the LSH index used for `threshold`. Two passages are candidates when, for some band i,
    their signature values i*r .. i*r+r-1 are all equal."""
    lsh = _lsh(threshold)
    return int(lsh.b), int(lsh.r)


def permutations(seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's "affine32" permutations for `seed`. -> (a, b), (NUM_PERM,) uint32 each"""
    datasketch = require("datasketch")
    template = datasketch.MinHash(num_perm=NUM_PERM, seed=seed, scheme="affine32")
    a, b = (np.asarray(p, dtype=np.uint32) for p in template.permutations)
    return a, b


def find_near_duplicates(passages: Sequence[np.ndarray], *, threshold: float = 0.9, seed: int = SEED) -> np.ndarray:
    """Indices of passages that near-duplicate an earlier kept one (estimated Jaccard >= threshold). -> (D,)"""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"dedup threshold must be in (0, 1], got {threshold}")
    MinHash = require("datasketch").MinHash
    template = MinHash(num_perm=NUM_PERM, seed=seed, scheme="affine32")
    perm = permutations(seed)
    lsh = _lsh(threshold)
    dropped = []
    kept: dict[int, np.ndarray] = {}
    for lo in range(0, len(passages), _BATCH):
        signatures = minhash_signatures(passages[lo : lo + _BATCH], perm)
        for i, sig in enumerate(signatures, lo):
            mh = MinHash(
                num_perm=NUM_PERM, seed=seed, scheme="affine32", permutations=template.permutations, hashvalues=sig
            )
            if any(np.mean(kept[k] == sig) >= threshold for k in lsh.query(mh)):
                dropped.append(i)
            else:
                lsh.insert(i, mh)
                kept[i] = sig
    return np.asarray(dropped, dtype=np.int64)
