"""Compiled kernels of the fused lookup + pooling operator and its backward.

They work on a whole `SparseBatch` at once. Bag `k` of the jagged layout is feature
``f = k // B`` of sample ``b = k % B`` (feature-major, as in a KeyedJaggedTensor), its
ids are ``values[offsets[k]:offsets[k+1]]`` and its pooled vector is row ``b * F + f``
of the output viewed as ``[B * F, D]``, that is ``out[b, f]``. Each id carries a scale: its weight (1 when
the batch has none) times 1, 1/n or 1/sqrt(n) for sum, mean or sqrtn pooling of a bag
of n ids. An id whose row was not admitted has handle -1: it reads as zeros and gets
no gradient.

Tables are addressed through `directories` ``[T, shards, chunks]`` and `widths` ``[T]``,
so one kernel call covers every table of the batch.
"""

from __future__ import annotations

import numba
import numpy as np

from tidal.embedding._memory import row_in, row_of
from tidal.optim.rowwise import update_row

__all__ = ["MODES"]

MODES = {"sum": 0, "mean": 1, "sqrtn": 2}


@numba.njit(nogil=True, cache=True)
def id_scales(offsets, weights, modes, batch_size):  # type: ignore[no-untyped-def]
    """Per-id pooling scale: weight x (1 | 1/n | 1/sqrt(n)) by the bag's feature mode."""
    scales = np.ones(offsets[-1], dtype=np.float32)
    if weights.shape[0] > 0:
        scales[:] = weights
    for k in range(offsets.shape[0] - 1):
        n = offsets[k + 1] - offsets[k]
        mode = modes[k // batch_size]
        if n == 0 or mode == 0:
            continue
        factor = 1.0 / n if mode == 1 else 1.0 / np.sqrt(n)
        for i in range(offsets[k], offsets[k + 1]):
            scales[i] *= factor
    return scales


@numba.njit(nogil=True, cache=True)
def pool(directories, widths, feature_tables, handles, offsets, scales, out, lo, hi):  # type: ignore[no-untyped-def]
    """out[b, f] = sum of scale * row over the ids of bag f * B + b, samples b in [lo, hi).

    `out` is `[B, F, D]` float32; samples are written in order, one contiguous block each.
    """
    batch_size, num_features, dim = out.shape
    for b in range(lo, hi):
        for f in range(num_features):
            k = f * batch_size + b
            for d in range(dim):
                out[b, f, d] = 0.0
            table = feature_tables[f]
            for i in range(offsets[k], offsets[k + 1]):
                if handles[i] >= 0:
                    row = row_in(directories, table, handles[i], widths[table])
                    scale = scales[i]
                    for d in range(dim):
                        out[b, f, d] += scale * row[d]


@numba.njit(nogil=True, cache=True)
def ids_by_unique(inverse, num_unique, targets, scales):  # type: ignore[no-untyped-def]
    """The ids of each unique row, as CSR: (starts [U + 1], their targets, their scales).

    Unique row u's ids i contribute ``scales[i] * grad_out[targets[i]]``; their targets
    and scales are copied to ``[starts[u]:starts[u + 1]]`` so the backward pass reads
    them in order and its gradient loads are independent of each other.
    """
    starts = np.zeros(num_unique + 1, dtype=np.int64)
    for u in inverse:
        if u >= 0:
            starts[u + 1] += 1
    for u in range(num_unique):
        starts[u + 1] += starts[u]
    fill = starts[:-1].copy()
    csr_targets = np.empty(starts[-1], dtype=np.int64)
    csr_scales = np.empty(starts[-1], dtype=np.float32)
    for i in range(inverse.shape[0]):
        u = inverse[i]
        if u >= 0:
            csr_targets[fill[u]] = targets[i]
            csr_scales[fill[u]] = scales[i]
            fill[u] += 1
    return starts, csr_targets, csr_scales


@numba.njit(nogil=True, cache=True)
def id_targets(offsets, batch_size, num_features):  # type: ignore[no-untyped-def]
    """Row of the [B * F, D] pooled output that each id contributes to."""
    targets = np.empty(offsets[-1], dtype=np.int64)
    for k in range(offsets.shape[0] - 1):
        f = k // batch_size
        targets[offsets[k]:offsets[k + 1]] = (k - f * batch_size) * num_features + f
    return targets


@numba.njit(nogil=True, cache=True)
def apply_pooled(directory, width, handles, csr, grad_out, code, hyper, step, lo, hi):  # type: ignore[no-untyped-def]
    """Backward and optimizer in one pass, for unique rows u in [lo, hi) of one table.

    `csr` comes from `ids_by_unique`; the gradient of row u, the sum of its ids'
    ``scale * grad_out[target]``, is applied to the row at once.
    """
    grads = np.empty((1, grad_out.shape[1]), dtype=np.float32)
    for u in range(lo, hi):
        _gradient_of(u, csr, grad_out, grads, 0)
        update_row(code, row_of(directory, handles[u], width), grads[0], hyper, step)


@numba.njit(nogil=True, cache=True)
def row_gradients(csr, grad_out):  # type: ignore[no-untyped-def]
    """The summed gradient `[U, D]` of every unique row (what apply_pooled applies)."""
    grads = np.empty((csr[0].shape[0] - 1, grad_out.shape[1]), dtype=np.float32)
    for u in range(grads.shape[0]):
        _gradient_of(u, csr, grad_out, grads, u)
    return grads


@numba.njit(nogil=True, inline="always")
def _gradient_of(u, csr, grad_out, grads, slot):  # type: ignore[no-untyped-def]
    """grads[slot] = the summed gradient of unique row u (indexing only: no views)."""
    starts, targets, scales = csr
    for d in range(grads.shape[1]):
        grads[slot, d] = 0.0
    for j in range(starts[u], starts[u + 1]):
        t = targets[j]
        s = scales[j]
        for d in range(grads.shape[1]):
            grads[slot, d] += s * grad_out[t, d]


@numba.njit(nogil=True, cache=True)
def gather_rows(directory, width, handles, out, lo, hi):  # type: ignore[no-untyped-def]
    """out[i] = the whole row (values and state) of handles[i]; zeros for -1."""
    for i in range(lo, hi):
        if handles[i] < 0:
            out[i] = 0.0
        else:
            out[i] = row_of(directory, handles[i], width)


@numba.njit(nogil=True, cache=True)
def scatter_rows(directory, width, handles, rows, lo, hi):  # type: ignore[no-untyped-def]
    """The whole row of handles[i] = rows[i] (handles -1 are skipped)."""
    for i in range(lo, hi):
        if handles[i] >= 0:
            row_of(directory, handles[i], width)[:] = rows[i]
