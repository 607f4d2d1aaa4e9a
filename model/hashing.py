"""Stable, vectorized id hashing and vocabulary clipping (numpy).

The hash is part of the model: it maps raw ids to embedding rows, so training and serving must
agree on it forever. It is the splitmix64 finalizer (Steele et al., used by java.util
SplittableRandom) applied to the id's 64 bits XOR a fixed salt, then reduced into
``[1, buckets)``:

    bucket(x) = 0                                   if x == 0   (placeholder / padding)
              = 1 + splitmix64(uint64(x) ^ SALT) % (buckets - 1)   otherwise

It depends on nothing but the id and the bucket count: no Python ``hash()`` (randomized per
process), no platform dependence. Features that ``share_with`` another feature use the shared
feature's bucket count and therefore land in the same rows.
"""

from __future__ import annotations

import numpy as np

SALT = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer of uint64 values (wrapping arithmetic), on a fresh copy."""
    z = np.asarray(x, dtype=np.uint64) ^ SALT  # the copy every later op works in place on
    z ^= z >> _S30
    z *= _M1
    z ^= z >> _S27
    z *= _M2
    z ^= z >> _S31
    return z


def hash_ids(ids: np.ndarray, buckets: int) -> np.ndarray:
    """int64 ids (any shape) -> int64 buckets in [1, buckets); id 0 -> 0."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if buckets <= 1:
        return np.zeros_like(ids)
    with np.errstate(over="ignore"):
        h = splitmix64(ids.view(np.uint64))
    h %= np.uint64(buckets - 1)
    out = h.view(np.int64)
    out += 1
    out[ids == 0] = 0
    return out


def clip_vocab(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """int64 ids -> same ids where 0 <= id < vocab_size, else 0 (the placeholder)."""
    ids = np.asarray(ids, dtype=np.int64)
    return np.where((ids >= 0) & (ids < vocab_size), ids, 0)
