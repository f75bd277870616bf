"""Stable 64-bit mixing, and row initial values as a pure function of (seed, table, key).

Everything here is deterministic across runs, processes and machines: a row created by
any shard, worker or process for the same key of the same table gets the same vector.
"""

from __future__ import annotations

import hashlib

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

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


@numba.njit(nogil=True)
def init_row(out: np.ndarray, key: np.int64, seed: np.uint64, kind: int, scale: float) -> None:
    """Write the initial values of `key` into `out` ([dim] float32).

    kind 0: zeros; 1: uniform in [-scale, scale); 2: normal with std `scale`. The bits
    come from splitmix64 started at mix64(key ^ seed): uniform dim d takes its d-th
    output (one output per value, a loop that vectorizes: rows are created on the
    training hot path); normal takes two values from each output (Box-Muller).
    Compiled without fastmath: it would let the compiler fuse and reorder the float
    operations by the CPU it compiles for, and rows would differ between machines.
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
    """Box-Muller: values 2p and 2p + 1 are the cosine and sine of one angle at one
    radius, drawn from the p-th output. The logarithm, sine and cosine are polynomials
    (`_log`, `_sin_cos`, within a few float32 units in the last place), so that the
    loop vectorizes: with the library's functions a normal row cost ten times a
    uniform one."""
    for p in range(out.shape[0] // 2):
        radius, cos, sin = _polar(state, p, scale)
        out[2 * p] = radius * cos
        out[2 * p + 1] = radius * sin
    if out.shape[0] % 2:
        radius, cos, _ = _polar(state, out.shape[0] // 2, scale)
        out[out.shape[0] - 1] = radius * cos


@numba.njit(nogil=True, inline="always")
def _polar(state: np.uint64, p: int, scale: np.float32) -> tuple[np.float32, np.float32, np.float32]:
    """Radius (times `scale`) and the cosine and sine of the angle of Box-Muller pair p."""
    u1, u2 = _two_units(mix64(state + np.uint64(2 * p) * GOLDEN))
    radius = scale * np.sqrt(np.float32(-2.0) * _log(np.float32(1.0) - u1))  # 1 - u1 in (0, 1]
    cos, sin = _sin_cos(u2)
    return radius, cos, sin


@intrinsic
def _float_bits(typingctx, value):  # type: ignore[no-untyped-def]
    """The bits of a float32 as an int32."""
    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.IntType(32))
    return types.int32(types.float32), codegen


@intrinsic
def _bits_float(typingctx, bits):  # type: ignore[no-untyped-def]
    """The float32 whose bits an int32 holds."""
    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


_SQRT_HALF = np.float32(0.70710678)
_LN2_HIGH, _LN2_LOW = np.float32(0.693359375), np.float32(-2.12194440e-4)  # ln 2 = high + low


@numba.njit(nogil=True, inline="always")
def _log(x: np.float32) -> np.float32:
    """Natural logarithm of a normal positive float32: x = m * 2**e with m in
    [sqrt(1/2), sqrt(2)), log(1 + f) for f = m - 1 by a minimax polynomial (Cephes)."""
    bits = _float_bits(x)
    e = np.int32((bits >> 23) - 126)
    m = _bits_float((bits & 0x007FFFFF) | 0x3F000000)  # in [1/2, 1)
    low = m < _SQRT_HALF
    e -= np.int32(low)
    f = (m + m if low else m) - np.float32(1.0)
    z = f * f
    y = np.float32(7.0376836292e-2)
    for c in (-1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
              -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1):
        y = y * f + np.float32(c)
    y = y * f * z + np.float32(e) * _LN2_LOW - np.float32(0.5) * z
    return f + y + np.float32(e) * _LN2_HIGH


@numba.njit(nogil=True, inline="always")
def _sin_cos(turns: np.float32) -> tuple[np.float32, np.float32]:
    """cos and sin of the angle 2 pi * `turns`, turns in [0, 1): the nearest quarter turn
    q, and minimax polynomials (Cephes) of the rest, in [-pi/4, pi/4)."""
    quarters = turns * np.float32(4.0) + np.float32(0.5)
    q = np.int32(quarters)  # the nearest quarter turn (4 is the same as 0)
    x = (quarters - np.float32(q) - np.float32(0.5)) * np.float32(np.pi / 2)
    z = x * x
    sin = x + x * z * (np.float32(-1.6666654611e-1) + z * (np.float32(8.3321608736e-3) + z * np.float32(-1.9515295891e-4)))
    cos = np.float32(1.0) - np.float32(0.5) * z + z * z * (
        np.float32(4.166664568298827e-2) + z * (np.float32(-1.388731625493765e-3) + z * np.float32(2.443315711809948e-5)))
    odd = (q & 1) == 1
    c, s = (-sin if odd else cos), (cos if odd else sin)  # a quarter turn: (c, s) -> (-s, c)
    half = (q & 2) == 2
    return (-c if half else c), (-s if half else s)  # half a turn: both change sign


def table_seed(seed: int, table_name: str) -> np.uint64:
    """A 64-bit seed from the user seed and the table name (stable, not Python's hash)."""
    digest = hashlib.blake2b(f"{seed}:{table_name}".encode(), digest_size=8).digest()
    return np.uint64(int.from_bytes(digest, "little"))
