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

String ids (hex ids, "Bachelors", country codes) first become int64 ids with ``string_ids``:
the first 8 bytes of BLAKE2b over the UTF-8 text, so the same string gets the same id in every
process, on every machine, in training and in serving; null and "" are the placeholder 0.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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


def string_id(text: str) -> int:
    """The stable int64 id of one string (never 0; "" is the placeholder 0)."""
    if not text:
        return 0
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True) or 1


def string_ids(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A string / large_string / dictionary<string> column -> int64 ids (n,), nulls -> 0.

    Hashes each distinct value once (dictionary-encode, then gather), so a batch with few
    distinct categories costs a few hashes, not one per row.
    """
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if not pa.types.is_dictionary(values.type):
        values = pc.dictionary_encode(values.cast(pa.string()))
    codes = values.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
    table = np.array([string_id(v) for v in values.dictionary.cast(pa.string()).to_pylist()] or [0])
    return np.where(codes >= 0, table[np.maximum(codes, 0)], 0).astype(np.int64)


def is_string_type(t: pa.DataType) -> bool:
    """string, large_string, or a dictionary of either (a categorical parquet column)."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t)
