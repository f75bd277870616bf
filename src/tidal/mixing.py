"""64-bit mixing shared by every layer: stable across runs, processes and machines."""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["GOLDEN", "mix64", "mix64_array"]

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


@numba.njit(nogil=True, inline="always")
def mix64(x: np.uint64) -> np.uint64:
    """splitmix64's finalizer: a bijection of uint64 with full avalanche."""
    z = x + GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


@numba.njit(nogil=True, cache=True)
def mix64_array(values: np.ndarray) -> np.ndarray:
    """`mix64` of every int64 value, as int64."""
    out = np.empty(values.shape[0], dtype=np.int64)
    for i in range(values.shape[0]):
        out[i] = np.int64(mix64(np.uint64(values[i])))
    return out
