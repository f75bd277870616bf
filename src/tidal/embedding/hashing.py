"""Stable 64-bit mixing, and row initial values as a pure function of (seed, table, key).

Everything here is deterministic across runs, processes and machines: a row created by
any shard, worker or process for the same key of the same table gets the same vector.
"""

from __future__ import annotations

import hashlib

import numba
import numpy as np

from tidal.mixing import GOLDEN, mix64

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

    kind 0: zeros; 1: uniform in [-scale, scale); 2: normal with std `scale`. The bits
    come from splitmix64 started at mix64(key ^ seed): uniform dim d takes its d-th
    output (one output per value, a loop that vectorizes: rows are created on the
    training hot path); normal takes two values from each output (Box-Muller).
    """
    if kind == 0:
        out[:] = 0.0
    elif kind == 1:
        _uniform_row(out, mix64(np.uint64(key) ^ seed), np.float32(scale))
    else:
        _normal_row(out, mix64(np.uint64(key) ^ seed), np.float32(scale))


@numba.njit(nogil=True, inline="always")
def _uniform_row(out: np.ndarray, state: np.uint64, scale: np.float32) -> None:
    for d in range(out.shape[0]):
        bits = mix64(state + np.uint64(d) * GOLDEN)
        # through int64: converting a signed integer to float is one instruction, unsigned is not
        unit = np.float32(np.int64(bits >> np.uint64(40))) * np.float32(1.0 / 8388608.0) - np.float32(1.0)
        out[d] = scale * unit  # the top 24 bits as [-1, 1): never +scale


@numba.njit(nogil=True, inline="always")
def _normal_row(out: np.ndarray, state: np.uint64, scale: np.float32) -> None:
    dim = out.shape[0]
    for d in range(0, dim, 2):
        u1, u2 = _two_units(mix64(state + np.uint64(d) * GOLDEN))
        radius = scale * np.sqrt(np.float32(-2.0) * np.log(np.float32(1.0) - u1))  # 1 - u1 in (0, 1]
        angle = np.float32(2.0 * np.pi) * u2
        out[d] = radius * np.cos(angle)
        if d + 1 < dim:
            out[d + 1] = radius * np.sin(angle)


def table_seed(seed: int, table_name: str) -> np.uint64:
    """A 64-bit seed from the user seed and the table name (stable, not Python's hash)."""
    digest = hashlib.blake2b(f"{seed}:{table_name}".encode(), digest_size=8).digest()
    return np.uint64(int.from_bytes(digest, "little"))
