"""Stable 64-bit mixing, and row initial values as a pure function of (seed, table, key).

Everything here is deterministic across runs, processes and machines: a row created by
any shard, worker or process for the same key of the same table gets the same vector.
"""

from __future__ import annotations

import hashlib

import numba
import numpy as np

from tidal.mixing import mix64

__all__ = ["INIT_KINDS", "init_row", "mix64", "table_seed", "unit_float"]

INIT_KINDS = {"zeros": 0, "uniform": 1, "normal": 2}

@numba.njit(nogil=True, inline="always")
def unit_float(bits: np.uint64) -> float:
    """A float64 in [0, 1) from the top 53 bits."""
    return float(bits >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@numba.njit(nogil=True, inline="always")
def _two_units(bits: np.uint64) -> tuple[np.float32, np.float32]:
    """Two float32 in [0, 1) from the top two 24-bit groups of 64 mixed bits."""
    # through int64: converting a signed integer to float is one instruction, unsigned is not
    high = np.float32(np.int64(bits >> np.uint64(40))) * np.float32(1.0 / 16777216.0)
    low = np.float32(np.int64((bits >> np.uint64(8)) & np.uint64(0xFFFFFF))) * np.float32(1.0 / 16777216.0)
    return high, low


@numba.njit(nogil=True, fastmath=True)
def init_row(out: np.ndarray, key: np.int64, seed: np.uint64, kind: int, scale: float) -> None:
    """Write the initial values of `key` into `out` ([dim] float32).

    kind 0: zeros; 1: uniform in [-scale, scale); 2: normal with std `scale`
    (Box-Muller). Each 64-bit mix of (seed, key, position) gives two values.
    """
    dim = out.shape[0]
    if kind == 0:
        out[:] = 0.0
        return
    base = mix64(np.uint64(key) ^ seed)
    s = np.float32(scale)
    for d in range(0, dim, 2):
        u1, u2 = _two_units(mix64(base + np.uint64(d)))
        if kind == 1:
            a, b = s * (np.float32(2.0) * u1 - np.float32(1.0)), s * (np.float32(2.0) * u2 - np.float32(1.0))
        else:
            radius = s * np.sqrt(np.float32(-2.0) * np.log(np.float32(1.0) - u1))  # 1 - u1 in (0, 1]
            angle = np.float32(2.0 * np.pi) * u2
            a, b = radius * np.cos(angle), radius * np.sin(angle)
        out[d] = a
        if d + 1 < dim:
            out[d + 1] = b


def table_seed(seed: int, table_name: str) -> np.uint64:
    """A 64-bit seed from the user seed and the table name (stable, not Python's hash)."""
    digest = hashlib.blake2b(f"{seed}:{table_name}".encode(), digest_size=8).digest()
    return np.uint64(int.from_bytes(digest, "little"))
