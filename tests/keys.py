"""Keys that stress the index: the int64 extremes, and keys crafted to share a hash."""

from __future__ import annotations

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
M64 = (1 << 64) - 1
ADVERSARIAL = [0, -1, 1, -2,
               INT64_MIN, INT64_MAX, INT64_MIN + 1, INT64_MAX - 1, 2**31 - 1, -(2**31), 2**32 - 1, 2**32]


def as_int64(u: int) -> int:
    """The int64 with the bits of the uint64 `u`."""
    return u - (1 << 64) if u >= 1 << 63 else u


def unmix64(h: int) -> int:
    """The inverse of tidal.embedding.hashing.mix64 (splitmix64's finalizer), as a uint64."""

    def unshift(y: int, s: int) -> int:
        x = y
        for _ in range(64 // s + 1):
            x = y ^ (x >> s)
        return x

    z = (unshift(h, 31) * pow(0x94D049BB133111EB, -1, 1 << 64)) & M64
    z = (unshift(z, 27) * pow(0xBF58476D1CE4E5B9, -1, 1 << 64)) & M64
    return (unshift(z, 30) - 0x9E3779B97F4A7C15) & M64
