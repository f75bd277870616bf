"""Stable 64-bit ids from raw strings, vectorized over Arrow string arrays.

The hash is FNV-1a over the UTF-8 bytes, then mixed with a per-feature seed by
splitmix64's finalizer: the same string gives the same id on every run and machine,
and equal strings of two features differ unless the features share a seed.
"""

from __future__ import annotations

import numba
import numpy as np
import pyarrow as pa

from tidal.mixing import mix64

__all__ = ["hash_strings"]

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


@numba.njit(nogil=True, cache=True)
def _fnv1a(offsets: np.ndarray, data: np.ndarray, seed: np.uint64, out: np.ndarray) -> None:
    for i in range(out.shape[0]):
        h = _FNV_OFFSET
        for j in range(offsets[i], offsets[i + 1]):
            h = (h ^ np.uint64(data[j])) * _FNV_PRIME
        out[i] = np.int64(mix64(h ^ seed))


def hash_strings(array: pa.Array | pa.ChunkedArray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(int64 id of every string, mask of missing values: null or empty)."""
    if isinstance(array, pa.ChunkedArray):
        parts = [hash_strings(chunk, seed) for chunk in array.chunks]
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0, bool)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    if not pa.types.is_string(array.type) and not pa.types.is_large_string(array.type):
        raise TypeError(f"hash_strings needs a string array, got {array.type}")
    n = len(array)
    offset_type = np.int64 if pa.types.is_large_string(array.type) else np.int32
    buffers = array.buffers()
    offsets = np.frombuffer(buffers[1], dtype=offset_type)[array.offset : array.offset + n + 1].astype(np.int64)
    data = np.frombuffer(buffers[2], dtype=np.uint8) if buffers[2] is not None else np.zeros(0, np.uint8)
    ids = np.empty(n, dtype=np.int64)
    _fnv1a(offsets, data, np.uint64(seed & (2**64 - 1)), ids)
    missing = np.diff(offsets) == 0
    if array.null_count:
        missing |= ~np.asarray(array.is_valid())
    return ids, missing
