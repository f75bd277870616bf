"""Compiled kernels of the fused lookup + pooling operator and its backward.

They work on a whole `SparseBatch` at once. Bag `k` of the jagged layout is feature
``f = k // B`` of sample ``b = k % B`` (feature-major, as in a KeyedJaggedTensor); its
ids are ``values[offsets[k]:offsets[k+1]]`` and its pooled vector is ``out[b, f]`` of
the `[B, F, D]` output. Each id carries a scale: its weight (1 when the batch has none)
times 1, 1/n or 1/sqrt(n) for sum, mean or sqrtn pooling of a bag of n ids. An id
without a row (not admitted, or absent when serving) has handle -1: it reads as zeros
and gets no gradient.

Tables are addressed through `directories` ``[T, shards, chunks]`` and `widths` ``[T]``,
so one kernel call covers every table of the batch. Float buffers are read through raw row
views, so every one passed here must be C-contiguous float32 (the callers ensure it)."""

from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.extending import overload

from tidal.embedding._memory import SHARD_BITS, float_row, prefetch, prefetch_row, row_in, row_of, store_fence, stream
from tidal.embedding._parallel import run_split
from tidal.optim import rowwise as rw

__all__ = ["MODES"]

MODES = {"sum": 0, "mean": 1, "sqrtn": 2}
_BLOCK = 128  # rows of gradient summed at a time (32 KiB at dim 64)
_AHEAD = 8  # gradient rows prefetched ahead of the one being read
_AHEAD_IDS = 16  # rows prefetched ahead of the id being pooled
_AHEAD_GRAD = 16  # gradient rows prefetched ahead by `sgd_by_sample`
_AHEAD_SAMPLES = 32  # samples whose id lists `sgd_by_sample` prefetches ahead


@numba.njit(nogil=True, cache=True)
def id_scales(offsets, weights, modes, batch_size):  # type: ignore[no-untyped-def]
    """Per-id pooling scale: weight x (1 | 1/n | 1/sqrt(n)) by the bag's feature mode."""
    scales = np.ones(offsets[-1], dtype=np.float32)
    if weights.shape[0] > 0:
        scales[:] = weights
    for f in range(modes.shape[0]):
        if modes[f] == 0:  # sum: the weights as they are
            continue
        for k in range(f * batch_size, (f + 1) * batch_size):
            n = offsets[k + 1] - offsets[k]
            if n == 0:
                continue
            factor = 1.0 / n if modes[f] == 1 else 1.0 / np.sqrt(n)
            for i in range(offsets[k], offsets[k + 1]):
                scales[i] *= factor
    return scales


@numba.njit(nogil=True, cache=True)
def pool(directories, widths, feature_tables, handles, offsets, scales, out, lo, hi):  # type: ignore[no-untyped-def]
    """out[b, f] = sum of scale * row over the ids of bag f * B + b, samples b in [lo, hi).

    `out` is `[B, F, D]` float32. Bags are taken in id order, feature by feature, so
    the batch's arrays are read front to back. When the output rows start on 64-byte
    boundaries (torch's buffers do, for D a multiple of 16), each bag is summed in a
    buffer that stays in cache and written with non-temporal stores: the output is
    larger than the cache, and plain stores would first read every line of it.
    """
    batch_size, num_features, dim = out.shape
    row_bytes = dim * 4
    streamed = out.ctypes.data % 64 == 0 and row_bytes % 64 == 0
    buffer = np.empty(dim + 16, dtype=np.float32)
    bag = buffer.ctypes.data + (-buffer.ctypes.data) % 64
    for f in range(num_features):
        table, width = feature_tables[f], widths[feature_tables[f]]
        last = offsets[f * batch_size + hi]  # ids past it belong to other samples
        for b in range(lo, hi):
            k = f * batch_size + b
            destination = out.ctypes.data + (b * num_features + f) * row_bytes
            target = float_row(bag if streamed else destination, 0, dim)
            first = True
            for i in range(offsets[k], offsets[k + 1]):
                if i + _AHEAD_IDS < last:
                    prefetch_row(directories[table], handles[i + _AHEAD_IDS], width, dim)
                if handles[i] < 0:
                    continue
                row = row_in(directories, table, handles[i], width)
                scale = scales[i]
                if first:  # write, not add: no zeroing pass
                    for d in range(dim):
                        target[d] = scale * row[d]
                    first = False
                else:
                    for d in range(dim):
                        target[d] += scale * row[d]
            if first:
                target[:] = 0.0
            if streamed:
                stream(destination, bag, row_bytes)
    store_fence()


@numba.njit(nogil=True, cache=True)
def pool_bf16(directories, widths, feature_tables, handles, offsets, scales, out_bits, lo, hi):  # type: ignore[no-untyped-def]
    """`pool` into bfloat16: `out_bits` is `[B, F, D]` uint16 holding bfloat16 bits,
    rounded to nearest even as torch rounds. Each bag is summed in float32 as `pool`
    sums it, rounded in one vectorized pass, and streamed out as `pool` streams (for D
    a multiple of 32). The bag loop is `pool`'s, written out again: numba vectorizes it
    only inline (a shared helper made `pool` two to three times slower)."""
    batch_size, num_features, dim = out_bits.shape
    row_bytes = dim * 2
    streamed = out_bits.ctypes.data % 64 == 0 and row_bytes % 64 == 0
    buffer = np.empty(dim + 16, dtype=np.float32)
    bag = buffer.ctypes.data + (-buffer.ctypes.data) % 64
    target = float_row(bag, 0, dim)
    target_bits = target.view(np.uint32)
    spare = np.empty(dim + 32, dtype=np.uint16)
    start = (-spare.ctypes.data) % 64 // 2
    rounded = spare[start : start + dim]  # starts on a 64-byte boundary
    flat = out_bits.reshape(batch_size * num_features * dim)
    for f in range(num_features):
        table, width = feature_tables[f], widths[feature_tables[f]]
        last = offsets[f * batch_size + hi]  # ids past it belong to other samples
        for b in range(lo, hi):
            k = f * batch_size + b
            first = True
            for i in range(offsets[k], offsets[k + 1]):
                if i + _AHEAD_IDS < last:
                    prefetch_row(directories[table], handles[i + _AHEAD_IDS], width, dim)
                if handles[i] < 0:
                    continue
                row = row_in(directories, table, handles[i], width)
                scale = scales[i]
                if first:
                    for d in range(dim):
                        target[d] = scale * row[d]
                    first = False
                else:
                    for d in range(dim):
                        target[d] += scale * row[d]
            if first:
                target[:] = 0.0
            for d in range(dim):  # branch-free, so it vectorizes
                bits = np.int64(target_bits[d])
                nan = np.int64((bits & 0x7FFFFFFF) > 0x7F800000)  # 1 for a NaN: made quiet, low half
                bits = (bits | (nan << 22)) & ~(nan * 0xFFFF)  # cleared, so rounding cannot carry out of it
                rounded[d] = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            first_value = (b * num_features + f) * dim
            if streamed:
                stream(out_bits.ctypes.data + first_value * 2, rounded.ctypes.data, row_bytes)
            else:
                for d in range(dim):
                    flat[first_value + d] = rounded[d]
    store_fence()


def grad_row(grad_out, r, wide):  # type: ignore[no-untyped-def]
    """Row r of a `[N, D]` gradient as float32: a view of a float32 gradient, or, for
    uint16 bfloat16 bits, the row widened (exactly) into `wide` ([D] uint32)."""
    raise NotImplementedError("grad_row is for compiled kernels only")


@overload(grad_row, inline="always")
def _grad_row(grad_out, r, wide):  # type: ignore[no-untyped-def]
    if grad_out.dtype == types.uint16:
        def widened(grad_out, r, wide):  # type: ignore[no-untyped-def]
            for d in range(wide.shape[0]):
                wide[d] = np.uint32(grad_out[r, d]) << 16
            return float_row(wide.ctypes.data, 0, wide.shape[0])
        return widened

    def view(grad_out, r, wide):  # type: ignore[no-untyped-def]
        return float_row(grad_out.ctypes.data, r, grad_out.shape[1])
    return view


@numba.njit(nogil=True, cache=True)
def find_nonfinite(bits, width, exponent, flags, lo, hi):  # type: ignore[no-untyped-def]
    """flags[lo] = whether rows [lo, hi) of `bits` (rows of `width` float32, bfloat16 or
    float16 values, flat, read as uint32 or uint16) hold a NaN or an infinity: a value whose
    `exponent` bits are all set. Integer operations only: the loop vectorizes, and takes
    half the time of `np.isfinite(...).all()`."""
    part = bits[lo * width:hi * width]
    found = exponent ^ exponent  # 0 of the bits' type: a literal 0 would widen the loop to int64 and slow it 7x
    for i in range(part.shape[0]):
        found = max(found, part[i] & exponent)
    flags[lo] = found == exponent


_EXPONENTS = {np.dtype(np.float32): (np.uint32, np.uint32(0x7F800000)),
              np.dtype(np.float16): (np.uint16, np.uint16(0x7C00))}


def nonfinite_rows(rows: np.ndarray, threads: int = 1) -> np.ndarray:
    """The indices of the rows of the C-contiguous float32 or float16 `[N, D]` array
    `rows` that hold a NaN or an infinity: one pass over its bits, without a temporary
    of its size, when there is none."""
    n = rows.shape[0]
    if n == 0 or rows.shape[1] == 0:
        return np.zeros(0, np.int64)
    view, exponent = _EXPONENTS[rows.dtype]
    flags = np.zeros(n, np.bool_)
    run_split(find_nonfinite, n, threads, np.ascontiguousarray(rows).view(view).reshape(-1), rows.shape[1],
              exponent, flags)
    return np.flatnonzero(~np.isfinite(rows).all(axis=1)) if flags.any() else np.zeros(0, np.int64)


def nonfinite_note(rows: np.ndarray, keys: np.ndarray, threads: int = 1) -> str | None:
    """"NaN or infinite numbers in N rows (the first of key K)" for the rows of `rows`
    (one per key of `keys`) that hold one; None when none does."""
    bad = nonfinite_rows(rows, threads)
    if not bad.size:
        return None
    rows = f"{bad.size:,d} row{'s' if bad.size != 1 else ''}"
    return f"NaN or infinite numbers in {rows} (the first of key {int(keys[bad[0]])})"


@numba.njit(nogil=True, cache=True)
def id_sources(offsets, batch_size):  # type: ignore[no-untyped-def]
    """The gradient row of every id: ``b * F + f`` for the ids of bag ``f * B + b``,
    the gradient seen as `[B * F, D]`."""
    num_features = (offsets.shape[0] - 1) // batch_size if batch_size > 0 else 0
    sources = np.empty(offsets[-1], dtype=np.int64)
    for f in range(num_features):
        for b in range(batch_size):
            k = f * batch_size + b
            for i in range(offsets[k], offsets[k + 1]):
                sources[i] = b * num_features + f
    return sources


@numba.njit(nogil=True, cache=True)
def sgd_by_sample(directories, widths, feature_tables, handles, offsets, scales, grad_out, rates, lo, hi):  # type: ignore[no-untyped-def]
    """Plain SGD applied id by id, samples b in [lo, hi) in order: the row of each id of
    bag f * B + b takes ``-rate * scale * grad[b * F + f]`` (its table's rate).

    The same sum as grouping a row's ids first, added one term at a time; in exchange
    the gradient `[B * F, D]` (float32, or uint16 bfloat16 bits) is read front to back,
    which the memory system streams, instead of at random. Two threads must not run it
    on rows they share: it is for one thread.
    """
    num_features = feature_tables.shape[0]
    batch_size = (offsets.shape[0] - 1) // num_features if num_features > 0 else 0
    n_rows, dim = grad_out.shape
    row_bytes = dim * grad_out.itemsize
    wide = np.empty(dim, dtype=np.uint32)
    for b in range(lo, hi):
        # Each feature's offsets, handles and scales are read as a separate stream, too
        # many for the hardware to follow: once per line of them, fetch them ahead.
        lists_ahead = b % 8 == 0 and b + _AHEAD_SAMPLES < hi
        for f in range(num_features):
            k = f * batch_size + b
            table = feature_tables[f]
            if lists_ahead:
                prefetch(offsets.ctypes.data + (k + _AHEAD_SAMPLES) * 8, 8)
                prefetch(handles.ctypes.data + (offsets[k] + _AHEAD_SAMPLES) * 8, 8)
                prefetch(scales.ctypes.data + (offsets[k] + _AHEAD_SAMPLES) * 4, 4)
            if b + 1 < hi and offsets[k + 1] < offsets[k + 2]:  # the next sample's bag of f
                prefetch_row(directories[table], handles[offsets[k + 1]], widths[table], dim)
            r = b * num_features + f
            if r + _AHEAD_GRAD < n_rows:  # read in order, yet the hardware falls behind
                prefetch(grad_out.ctypes.data + (r + _AHEAD_GRAD) * row_bytes, row_bytes)
            gradient = grad_row(grad_out, r, wide)
            for i in range(offsets[k], offsets[k + 1]):
                if handles[i] < 0:
                    continue
                row = row_in(directories, table, handles[i], widths[table])
                step = rates[table] * scales[i]
                for d in range(dim):
                    row[d] -= step * gradient[d]


@numba.njit(nogil=True, cache=True)
def mark_seen(last_seen, handles, now):  # type: ignore[no-untyped-def]
    """last_seen[row] = now for the rows of `handles` (one shard's; -1 is skipped)."""
    for handle in handles:
        if handle >= 0:
            last_seen[handle >> SHARD_BITS] = now


@numba.njit(nogil=True, cache=True)
def scatter_metadata(target, handles, positions, values):  # type: ignore[no-untyped-def]
    """target[row] = values[p] for the keys at `positions` (one shard's) that have a row
    (handles[p] >= 0): a shard's last-seen steps or counts, set for pushed rows."""
    for p in positions:
        handle = handles[p]
        if handle >= 0:
            target[handle >> SHARD_BITS] = values[p]


@numba.njit(nogil=True, cache=True)
def keys_by_row(order, numbers, lo, hi, n_rows):  # type: ignore[no-untyped-def]
    """One shard's keys (positions order[lo:hi], their rows numbered 0..n_rows-1 by
    `numbers`, -1 for none) grouped by row, a counting sort: returns (starts
    [n_rows + 1], positions): row r's keys are positions[starts[r]:starts[r + 1]]."""
    starts = np.zeros(n_rows + 1, dtype=np.int64)
    for j in range(lo, hi):
        if numbers[j] >= 0:
            starts[numbers[j] + 1] += 1
    for r in range(n_rows):
        starts[r + 1] += starts[r]
    fill = starts[:-1].copy()
    positions = np.empty(starts[-1], dtype=np.int64)
    for j in range(lo, hi):
        if numbers[j] >= 0:
            positions[fill[numbers[j]]] = order[j]
            fill[numbers[j]] += 1
    return starts, positions


@numba.njit(nogil=True, cache=True)
def apply_grouped(directory, width, unique, grouping, gradient, code, hyper, step, lo, hi):  # type: ignore[no-untyped-def]
    """The optimizer step of one shard's rows unique[lo:hi], each given the sum of its
    keys' scaled gradients.

    `grouping` = (order, numbers, handles, first, end): the shard's keys, as in
    `RowLookup`; `gradient` = (sources, scales, gradient `[N, D]` float32 or uint16
    bfloat16 bits): key k adds ``scales[k] * grad[sources[k]]``. Plain SGD adds each
    key's term to its row as it comes (`sgd_by_key`: `unique` and `numbers` are not
    read); the other optimizers need the sum first (`_sum_and_apply`).
    """
    order, numbers, handles, first, end = grouping
    if code == rw.SGD:
        sgd_by_key(directory, width, handles, order, first, end, gradient, hyper)
    else:
        _sum_and_apply(directory, width, unique, order, numbers, first, end, gradient, code, hyper, step, lo, hi)


@numba.njit(nogil=True, cache=True)
def sgd_by_key(directory, width, handles, order, first, end, gradient, hyper):  # type: ignore[no-untyped-def]
    """Plain SGD of one shard's keys order[first:end]: each key's scaled gradient goes
    straight into its row. The update is linear, so the row ends as if its keys had been
    summed first, without grouping them."""
    sources, scales, grad_out = gradient
    dim = grad_out.shape[1]
    row_bytes = dim * grad_out.itemsize
    wide = np.empty(dim, dtype=np.uint32)
    rate = np.float32(hyper[rw.LR])
    for j in range(first, end):
        if j + _AHEAD < end:
            ahead = order[j + _AHEAD]
            prefetch(grad_out.ctypes.data + sources[ahead] * row_bytes, row_bytes)
            prefetch_row(directory, handles[ahead], width, dim)
        k = order[j]
        if handles[k] < 0:
            continue
        row = row_of(directory, handles[k], width)
        gradient_row = grad_row(grad_out, sources[k], wide)
        step = rate * scales[k]
        for d in range(dim):
            row[d] -= step * gradient_row[d]


@numba.njit(nogil=True, cache=True)
def _sum_and_apply(directory, width, unique, order, numbers, first, end, gradient, code, hyper, step, lo, hi):  # type: ignore[no-untyped-def]
    """Rows unique[lo:hi] summed a block at a time into a buffer that stays in cache, then
    updated by `apply_rows`: no gradient buffer the size of the batch's rows."""
    starts, keys = keys_by_row(order, numbers, first, end, hi - lo)
    sources, scales, grad_out = gradient
    dim = grad_out.shape[1]
    row_bytes = dim * grad_out.itemsize
    block = np.empty((_BLOCK, dim), dtype=np.float32)
    wide = np.empty(dim, dtype=np.uint32)
    for start in range(lo, hi, _BLOCK):
        stop = min(start + _BLOCK, hi)
        for u in range(start, stop):
            prefetch_row(directory, unique[u], width, width)  # in cache when `apply_rows` comes to it
            target = float_row(block.ctypes.data, u - start, dim)
            target[:] = 0.0
            for e in range(starts[u - lo], starts[u - lo + 1]):
                if e + _AHEAD < keys.shape[0]:
                    prefetch(grad_out.ctypes.data + sources[keys[e + _AHEAD]] * row_bytes, row_bytes)
                source = grad_row(grad_out, sources[keys[e]], wide)
                s = scales[keys[e]]
                for d in range(dim):
                    target[d] += s * source[d]
        apply_rows(directory, width, unique[start:stop], block, code, hyper, step, 0, stop - start)


@numba.njit(nogil=True, cache=True)
def apply_rows(directory, width, handles, grads, code, hyper, step, lo, hi):  # type: ignore[no-untyped-def]
    """The optimizer step of rows handles[lo:hi] of one table, given their gradients.

    One loop per optimizer, chosen once: a loop with a single update in it vectorizes.
    `grads` is C-contiguous `[U, dim]` float32.
    """
    dim = grads.shape[1]
    if code == rw.SGD:
        for u in range(lo, hi):
            rw.sgd_row(row_of(directory, handles[u], width), float_row(grads.ctypes.data, u, dim), hyper)
    elif code == rw.ADAGRAD:
        for u in range(lo, hi):
            rw.adagrad_row(row_of(directory, handles[u], width), float_row(grads.ctypes.data, u, dim), hyper)
    elif code == rw.ROWWISE_ADAGRAD:
        for u in range(lo, hi):
            rw.rowwise_adagrad_row(row_of(directory, handles[u], width), float_row(grads.ctypes.data, u, dim), hyper)
    elif code == rw.ADAM:
        for u in range(lo, hi):
            rw.adam_row(row_of(directory, handles[u], width), float_row(grads.ctypes.data, u, dim), hyper, step)
    elif code == rw.ADAMW:
        for u in range(lo, hi):
            rw.adamw_row(row_of(directory, handles[u], width), float_row(grads.ctypes.data, u, dim), hyper, step)
    else:
        for u in range(lo, hi):
            rw.ftrl_row(row_of(directory, handles[u], width), float_row(grads.ctypes.data, u, dim), hyper)


@numba.njit(nogil=True, cache=True)
def gather_rows(directory, width, handles, out, lo, hi):  # type: ignore[no-untyped-def]
    """out[i] = the first out.shape[1] floats of the row of handles[i]; zeros for -1."""
    columns = out.shape[1]
    for i in range(lo, hi):
        if handles[i] < 0:
            out[i] = 0.0
        else:
            out[i] = row_of(directory, handles[i], width)[:columns]


@numba.njit(nogil=True, cache=True)
def scatter_rows(directory, width, handles, rows, lo, hi):  # type: ignore[no-untyped-def]
    """The whole row of handles[i] = rows[i] (handles -1 are skipped)."""
    for i in range(lo, hi):
        if handles[i] >= 0:
            row_of(directory, handles[i], width)[:] = rows[i]
