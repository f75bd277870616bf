"""Stable 64-bit ids from raw strings, vectorized over Arrow string arrays.

The hash is FNV-1a over the UTF-8 bytes, then mixed with a per-feature seed by
splitmix64's finalizer: the same string gives the same id on every run and machine,
and equal strings of two features differ unless the features share a seed.
"""

from __future__ import annotations

import numba
import numpy as np
import pyarrow as pa

from tidal.errors import DataError
from tidal.mixing import mix64

__all__ = ["hash_strings"]

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


@numba.njit(nogil=True, cache=True)
def _fnv1a(offsets: np.ndarray, data: np.ndarray, seeds: np.ndarray, rows_per_seed: int, out: np.ndarray) -> None:
    for i in range(out.shape[0]):
        h = _FNV_OFFSET
        for j in range(offsets[i], offsets[i + 1]):
            h = (h ^ np.uint64(data[j])) * _FNV_PRIME
        out[i] = np.int64(mix64(h ^ seeds[i // rows_per_seed]))


def hash_strings(array: pa.Array | pa.ChunkedArray, seed: int | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int64 id of every string, mask of missing values: null or empty).

    `seed` is one seed for every string, or an array of k seeds for an array that is
    k columns of equal length one after the other (several features hashed in one call).
    """
    if isinstance(array, pa.ChunkedArray):
        array = pa.concat_arrays(array.chunks) if array.num_chunks else pa.array([], pa.string())
    if not isinstance(array, pa.Array) or not (pa.types.is_string(array.type) or pa.types.is_large_string(array.type)):
        got = array.type if isinstance(array, pa.Array) else type(array).__name__
        raise DataError(f"hash_strings needs a pyarrow string array, got {got}; "
                        f"pass pyarrow.array(values, pyarrow.string()) or cast the column to string first")
    seeds = _seeds(seed)
    n = len(array)
    if n % seeds.shape[0]:
        raise DataError(f"hash_strings: {n} strings do not split into {seeds.shape[0]} columns of equal length "
                        f"(one a seed)")
    offset_type = np.int64 if pa.types.is_large_string(array.type) else np.int32
    buffers = array.buffers()
    offsets = np.frombuffer(buffers[1], dtype=offset_type)[array.offset : array.offset + n + 1].astype(np.int64)
    data = np.frombuffer(buffers[2], dtype=np.uint8) if buffers[2] is not None else np.zeros(0, np.uint8)
    ids = np.empty(n, dtype=np.int64)
    _fnv1a(offsets, data, seeds, max(1, n // seeds.shape[0]), ids)
    missing = np.diff(offsets) == 0
    if array.null_count:
        missing |= ~np.asarray(array.is_valid())
    return ids, missing


def _seeds(seed: int | np.ndarray) -> np.ndarray:
    """`seed` as a non-empty uint64 array: an integer of 64 bits (signed or not; numpy's
    too) or a 1-D array of them."""
    if np.ndim(seed) == 0:
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not -(2**63) <= int(seed) < 2**64:
            raise DataError(f"hash_strings: the seed must be an integer of 64 bits (signed or not), got {seed!r}")
        return np.array([int(seed) & (2**64 - 1)], dtype=np.uint64)
    seeds = np.asarray(seed)
    if seeds.ndim != 1 or seeds.shape[0] == 0 or seeds.dtype.kind not in "iu":
        raise DataError(f"hash_strings: the seeds must be a 1-D array of integers, one per column, got "
                        f"{seeds.dtype} of shape {seeds.shape}")
    return seeds.astype(np.uint64)
