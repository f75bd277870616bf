"""Compiled kernels of pass planning."""

from __future__ import annotations

import numba
import numpy as np

from tidal.mixing import mix64
from tidal.optim import rowwise as rw

__all__ = ["distinct_keys", "ids_by_row", "optimizer_step", "sgd_add"]


@numba.njit(nogil=True, cache=True)
def distinct_keys(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The distinct keys of `ids` ascending; each id's key (its position among them);
    and each key's first and last sighting (positions in `ids`).

    A hash set finds each key's first sighting (a pass holds a million ids or more, of
    which a fifth to a third distinct: sorting them all costs four times as much), then
    only the distinct keys are sorted.
    """
    n = ids.shape[0]
    capacity = 16
    while capacity < 2 * n:
        capacity *= 2
    mask = np.uint64(capacity - 1)
    numbers = np.full(capacity, -1, np.int64)  # a slot's key, as its number in `seen`
    seen = np.empty(n, np.int64)
    first = np.empty(n, np.int64)  # each key's first sighting, keys numbered as first seen
    last = np.empty(n, np.int64)
    key_of = np.empty(n, np.int64)  # each id's key, numbered as first seen
    count = 0
    for i in range(n):
        key = ids[i]
        j = mix64(np.uint64(key)) & mask
        while numbers[j] >= 0 and seen[numbers[j]] != key:
            j = (j + np.uint64(1)) & mask
        if numbers[j] < 0:
            numbers[j] = count
            seen[count] = key
            first[count] = i
            count += 1
        key_of[i] = numbers[j]
        last[key_of[i]] = i
    order = np.argsort(seen[:count])
    rank = np.empty(count, np.int64)
    rank[order] = np.arange(count)
    inverse = np.empty(n, np.int64)
    for i in range(n):
        inverse[i] = rank[key_of[i]]
    return seen[:count][order], inverse, first[:count][order], last[:count][order]


@numba.njit(nogil=True, cache=True)
def sgd_add(values, slots, grad, sources, scales, rate):  # type: ignore[no-untyped-def]
    """Plain SGD id by id: ``values[slots[k]] -= rate * scales[k] * grad[sources[k]]``
    (`scales` empty: 1). `values` `[R, D]`, `grad` `[N, D]` float32."""
    dim = values.shape[1]
    for k in range(slots.shape[0]):
        step = rate * scales[k] if scales.shape[0] else rate
        row, g = values[slots[k]], grad[sources[k]]
        for d in range(dim):
            row[d] -= step * g[d]


@numba.njit(nogil=True, cache=True)
def optimizer_step(values, state, width, distinct, inverse, grad, sources, scales, code, hyper, step):  # type: ignore[no-untyped-def]
    """One optimizer step (`tidal.optim.rowwise` code `code`, state `width` wide) on rows
    `distinct` of `values` `[R, D]` and `state` `[R, >= width]`: row u takes the sum of
    ``scales[k] * grad[sources[k]]`` over the ids k with ``inverse[k] == u``."""
    dim = values.shape[1]
    summed = np.zeros((distinct.shape[0], dim), np.float32)
    for k in range(inverse.shape[0]):
        scale = scales[k] if scales.shape[0] else np.float32(1.0)
        target, g = summed[inverse[k]], grad[sources[k]]
        for d in range(dim):
            target[d] += scale * g[d]
    row = np.empty(dim + width, np.float32)  # the store's layout: values, then state
    for u in range(distinct.shape[0]):
        slot = distinct[u]
        row[:dim] = values[slot]
        row[dim:] = state[slot, :width]
        rw.update_row(code, row, summed[u], hyper, step)
        values[slot] = row[:dim]
        state[slot, :width] = row[dim:]


@numba.njit(nogil=True, cache=True)
def ids_by_row(inverse: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The ids grouped by the row they update (`inverse[k]`, of `rows`), each row's in
    their order: ``order[offsets[u]:offsets[u + 1]]`` are row u's ids (a counting sort)."""
    offsets = np.zeros(rows + 1, np.int64)
    for k in range(inverse.shape[0]):
        offsets[inverse[k] + 1] += 1
    for u in range(rows):
        offsets[u + 1] += offsets[u]
    order = np.empty(inverse.shape[0], np.int64)
    filled = offsets[:-1].copy()
    for k in range(inverse.shape[0]):
        order[filled[inverse[k]]] = k
        filled[inverse[k]] += 1
    return order, offsets
