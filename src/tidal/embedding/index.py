"""Compiled kernels of one shard's hash index: int64 key -> local row.

Open addressing with linear probing over a power-of-two array of int32 slots. A slot
holds `EMPTY` or a local row number with 4 bits of its key's hash (the tag) above it;
the key of a row lives in `row_keys[row]`. Since emptiness is marked in the slot and
never by a key value, all 2**64 int64 values are valid keys: 0, -1, the minimum and the
maximum included, and none is reserved. A probe reads a row's key only when the tag
matches, so walking past other keys' slots costs no cache miss on `row_keys`.

    slots      [ -1 | t:7 | -1 | t:2 | t:5 | -1 | ... ]   power-of-two length, int32
    row_keys   [ k0 | k1 | k2 | ... ]                      key of each local row, int64

Deletion shifts later entries of the probe run back (no tombstones), so lookups stay
short however many rows were evicted. The caller holds the shard's lock.

`ctl` is the shard's int64 control block (see the `C_*` positions): kernels update it
in place and stop early, setting `C_NEED`, when the index must grow (`NEED_REHASH`) or
the arena needs another chunk (`NEED_ROWS`); the caller grows it and calls again from
the returned position.
"""

from __future__ import annotations

import numba
import numpy as np

from tidal.embedding._memory import SHARD_BITS, prefetch, row_of
from tidal.embedding.hashing import init_row, mix64, unit_float

__all__ = ["EMPTY", "group_by_shard"]

EMPTY = np.int32(-1)

# positions in a shard's control block
(C_HIGH, C_FREE, C_LIVE, C_ROW_CAP, C_MAX_LIVE, C_ROW_LIMIT, C_NEED,
 C_LOOKUPS, C_MISSES, C_ADMITTED, C_NOT_ADMITTED, C_EVICTED, C_DROPPED_FULL, C_SIZE) = range(14)
NEED_NOTHING, NEED_REHASH, NEED_ROWS = 0, 1, 2
COUNT_MAX = np.uint32(0xFFFFFFFF)  # a row's lookup count (for LFU eviction) stops here
MARK = np.uint32(1 << 31)  # last_seen of a row numbered by the running resolve (steps stay < 2**31)

TAG_SHIFT = 27  # slot = tag << 27 | row: at most 2**27 rows per shard
ROW_MASK = (1 << TAG_SHIFT) - 1
MAX_SHARD_ROWS = 1 << TAG_SHIFT

# admission kinds
ADMIT_ALL, ADMIT_COUNT, ADMIT_PROBABILITY = 0, 1, 2
SKETCH_DEPTH = 4  # rows of a count-min sketch


@numba.njit(nogil=True, cache=True)
def group_by_shard(keys: np.ndarray, num_shards: int) -> tuple:
    """Keys and their hashes regrouped shard by shard (a stable counting sort).

    Returns (grouped keys, grouped hashes, order, offsets): shard s's keys are
    ``grouped[offsets[s]:offsets[s + 1]]`` and ``grouped[j] == keys[order[j]]``. The
    kernels then read shard ranges contiguously; `resolve` writes each key's handle back
    at its caller position, order[j].
    """
    n = keys.shape[0]
    hashes = np.empty(n, dtype=np.uint64)
    shards = np.empty(n, dtype=np.uint8)  # a byte a key, so that it stays in cache for the second pass
    for i in range(n):  # the top bits of the mix choose the shard, the low bits the slot
        h = mix64(np.uint64(keys[i]))
        hashes[i] = h
        shards[i] = np.int64(h >> np.uint64(58)) & (num_shards - 1)
    offsets = np.zeros(num_shards + 1, dtype=np.int64)
    for s in shards:
        offsets[s + 1] += 1
    for s in range(num_shards):
        offsets[s + 1] += offsets[s]
    fill = offsets[:-1].copy()
    order = np.empty(n, dtype=np.int64)
    grouped_keys = np.empty(n, dtype=np.int64)
    grouped_hashes = np.empty(n, dtype=np.uint64)
    for i in range(n):
        j = fill[shards[i]]
        fill[shards[i]] += 1
        order[j] = i
        grouped_keys[j] = keys[i]
        grouped_hashes[j] = hashes[i]
    return grouped_keys, grouped_hashes, order, offsets


@numba.njit(nogil=True, inline="always")
def _tag(h: np.uint64) -> np.int32:
    return np.int32((h >> np.uint64(40)) & np.uint64(15))


@numba.njit(nogil=True, inline="always")
def _entry(h: np.uint64, row: int) -> np.int32:
    return np.int32((_tag(h) << TAG_SHIFT) | row)


@numba.njit(nogil=True, inline="always")
def _probe(slots: np.ndarray, row_keys: np.ndarray, key: np.int64, h: np.uint64) -> tuple[int, int]:
    """(slot position, row): the key's slot, or the empty slot where it would go (row -1)."""
    mask = slots.shape[0] - 1
    pos = np.int64(h & np.uint64(mask))
    tag = _tag(h)
    while True:
        entry = slots[pos]
        if entry == EMPTY:
            return pos, -1
        if entry >> TAG_SHIFT == tag and row_keys[entry & ROW_MASK] == key:
            return pos, entry & ROW_MASK
        pos = (pos + 1) & mask


@numba.njit(nogil=True, cache=True)
def resolve(slots, row_keys, last_seen, counts, free_rows, ctl, keys, hashes, order, lo, hi,
            step, shard, rows, admission, sketch, insert, count, distinct, out):  # type: ignore[no-untyped-def]
    """Row handles of keys[lo:hi] (one shard's range), with `distinct` de-duplicated on
    the way.

    With `insert` (training) an admitted key's row is created on first sight and every
    found row is marked seen at `step` (or a later step that saw it); without it
    (serving) the index is only read and absent keys are counted as misses. With
    `count`, the keys are counted as lookups (and misses) in the statistics; internal
    reads pass False.

    `out` = (handles [n] in the caller's order: key i's at order[i], numbers [n],
    unique local rows [hi - lo], their saved last_seen [hi - lo], unique count [1],
    refused [hi - lo], refused count [1]). Under count admission, `refused` lists the
    sightings turned away, for `admit_earlier_sightings` to finish with; its length
    may be 0 otherwise.
    With `distinct`, numbers[i] numbers the distinct rows of this shard in the order
    they were first found or created, -1 for a key without a row, and the caller ends
    with `unmark` once the whole range is resolved; without it only the handles are
    written (the other arrays may be empty), and with `insert` each found row is marked
    seen as it is found.

    `rows` = (directory, width, dim, seed, init kind, init scale, initial state value);
    `admission` = (kind, min count, probability, seed). Returns the position reached:
    `hi` when done, earlier when `ctl[C_NEED]` asks the caller to grow something.
    """
    handles, numbers, unique, previous, n_unique, refused, n_refused = out
    ctl[C_NEED] = NEED_NOTHING
    first = _home_rows(slots, row_keys, last_seen, keys, hashes, lo, hi, distinct or insert)
    created = np.empty(hi - lo, dtype=np.int64)  # local rows created here, valued at the end
    n_created = 0
    end = hi
    for i in range(lo, hi):
        pos, row = 0, first[i - lo]
        if row < 0:  # not in its home slot: walk the run
            pos, row = _probe(slots, row_keys, keys[i], hashes[i])
        if row == EMPTY and insert:
            # Written out here, not in a helper: an inlined helper taking arrays costs
            # atomic reference-count updates on every new row.
            # Growth first, so that a key's sighting is counted by admission only once.
            if ctl[C_LIVE] < ctl[C_ROW_LIMIT]:
                if ctl[C_LIVE] >= ctl[C_MAX_LIVE]:
                    ctl[C_NEED] = NEED_REHASH
                elif ctl[C_FREE] == 0 and ctl[C_HIGH] == ctl[C_ROW_CAP]:
                    ctl[C_NEED] = NEED_ROWS
            if ctl[C_NEED] != NEED_NOTHING:  # the caller grows it and calls again from key i
                end = i
                break
            if not _admit(keys[i], hashes[i], step, admission, sketch):
                ctl[C_NOT_ADMITTED] += 1
                if refused.shape[0] > 0:
                    refused[n_refused[0]] = i
                    n_refused[0] += 1
            elif ctl[C_LIVE] >= ctl[C_ROW_LIMIT]:
                ctl[C_DROPPED_FULL] += 1
            else:
                if ctl[C_FREE] > 0:  # an evicted row first
                    ctl[C_FREE] -= 1
                    row = free_rows[ctl[C_FREE]]
                else:
                    row = ctl[C_HIGH]
                    ctl[C_HIGH] += 1
                ctl[C_LIVE] += 1
                ctl[C_ADMITTED] += 1
                slots[pos] = _entry(hashes[i], row)
                row_keys[row] = keys[i]
                last_seen[row] = 0  # a reused row must not inherit the evicted key's step or count
                if counts.shape[0] > 0:
                    counts[row] = 0
                created[n_created] = row
                n_created += 1
        if row < 0:
            handles[order[i]] = -1
            if distinct:
                numbers[i] = -1
            ctl[C_MISSES] += count and not insert
            continue
        if insert and counts.shape[0] > 0 and counts[row] < COUNT_MAX:  # saturates: the hottest row stays hottest
            counts[row] += 1
        handles[order[i]] = (np.int64(row) << SHARD_BITS) | shard
        if distinct:
            numbers[i] = _number(last_seen, unique, previous, n_unique, row)
        elif insert and last_seen[row] < step:  # the latest step that saw it
            last_seen[row] = np.uint32(step)
    _init_rows(rows, created[:n_created], row_keys, shard)
    ctl[C_LOOKUPS] += (end - lo) * count
    return end


@numba.njit(nogil=True, cache=True)
def admit_earlier_sightings(slots, row_keys, last_seen, counts, ctl, keys, hashes, order, shard, distinct, out):  # type: ignore[no-untyped-def]
    """End a count-admission resolve: a key whose later sighting in the batch created its
    row gives that row to its earlier sightings, which admission had turned away, so that
    every sighting of a key in one batch reads and updates the same row. `out` as in
    `resolve`."""
    handles, numbers, unique, previous, n_unique, refused, n_refused = out
    for r in range(n_refused[0]):
        i = refused[r]
        _, row = _probe(slots, row_keys, keys[i], hashes[i])
        if row < 0:  # turned away at every sighting
            continue
        ctl[C_NOT_ADMITTED] -= 1
        if counts.shape[0] > 0 and counts[row] < COUNT_MAX:
            counts[row] += 1
        handles[order[i]] = (np.int64(row) << SHARD_BITS) | shard
        if distinct:
            numbers[i] = _number(last_seen, unique, previous, n_unique, row)


@numba.njit(nogil=True, inline="always")
def _home_rows(slots, row_keys, last_seen, keys, hashes, lo, hi, touch_seen):  # type: ignore[no-untyped-def]
    """The row of every key found in its home slot, else -1, in passes of independent loads.

    Most keys sit in their home slot, so the main loop then finds them without waiting
    on a chain of dependent cache misses (slot, then key); here the misses of many keys
    overlap instead. With `touch_seen`, the rows' `last_seen` the main loop will read or
    write is fetched too.
    """
    mask = np.uint64(slots.shape[0] - 1)
    home = np.empty(hi - lo, dtype=np.int32)
    for i in range(lo, hi):
        home[i - lo] = slots[np.int64(hashes[i] & mask)]
    for j in range(hi - lo):
        i = lo + j
        entry = home[j]
        found = entry != EMPTY and entry >> TAG_SHIFT == _tag(hashes[i]) and row_keys[entry & ROW_MASK] == keys[i]
        home[j] = entry & ROW_MASK if found else -1
        if found and touch_seen:
            prefetch(last_seen.ctypes.data + (entry & ROW_MASK) * 4, 4)
    return home


@numba.njit(nogil=True, inline="always")
def _number(last_seen, unique, previous, n_unique, row):  # type: ignore[no-untyped-def]
    """The batch-local number of `row`, giving it the next one on first sight.

    While a call runs, a numbered row's `last_seen` holds ``MARK | number`` (its old
    value saved in `previous`); `unmark` puts the real value back at the end.
    """
    seen = last_seen[row]
    if seen & MARK:
        return np.int64(seen & ~MARK)
    number = n_unique[0]
    unique[number] = row
    previous[number] = seen
    n_unique[0] += 1
    last_seen[row] = MARK | np.uint32(number)
    return number


@numba.njit(nogil=True, cache=True)
def unmark(last_seen, unique, previous, count, step, insert):  # type: ignore[no-untyped-def]
    """End a resolve: numbered rows are marked seen at `step` (insert; unless a later
    step saw them already) or restored."""
    for k in range(count):
        last_seen[unique[k]] = max(previous[k], np.uint32(step)) if insert else previous[k]


@numba.njit(nogil=True, inline="always")
def _init_rows(rows, created, row_keys, shard):  # type: ignore[no-untyped-def]
    """Write the initial values and optimizer state of the rows just created."""
    directory, width, dim, seed, kind, scale, state_value = rows
    for local in created:
        row = row_of(directory, (local << SHARD_BITS) | shard, width)
        init_row(row[:dim], row_keys[local], seed, kind, scale)
        row[dim:] = state_value


@numba.njit(nogil=True, inline="always")
def _admit(key, h, step, admission, sketch):  # type: ignore[no-untyped-def]
    """Whether this sighting of a missing key creates its row."""
    kind, min_count, probability, seed = admission
    if kind == ADMIT_ALL:
        return True
    if kind == ADMIT_PROBABILITY:
        return unit_float(mix64(np.uint64(key) ^ seed ^ mix64(np.uint64(step)))) < probability
    return _sketch_add(sketch, h) >= min_count


@numba.njit(nogil=True, inline="always")
def _sketch_add(sketch, h):  # type: ignore[no-untyped-def]
    """Count one sighting in a count-min sketch ([4, width] uint16); return the estimate."""
    width = np.uint64(sketch.shape[1])
    estimate = 65535
    for d in range(SKETCH_DEPTH):
        col = np.int64(mix64(h + np.uint64(d)) % width)
        if sketch[d, col] < 65535:
            sketch[d, col] += 1
        estimate = min(estimate, np.int64(sketch[d, col]))
    return estimate


@numba.njit(nogil=True, cache=True)
def rehash(old_slots, new_slots, row_keys):  # type: ignore[no-untyped-def]
    """Insert every row of `old_slots` into the larger, empty `new_slots`."""
    mask = new_slots.shape[0] - 1
    for entry in old_slots:
        if entry != EMPTY:
            pos = np.int64(mix64(np.uint64(row_keys[entry & ROW_MASK])) & np.uint64(mask))
            while new_slots[pos] != EMPTY:
                pos = (pos + 1) & mask
            new_slots[pos] = entry


@numba.njit(nogil=True, cache=True)
def remove(slots, row_keys, free_rows, ctl, keys):  # type: ignore[no-untyped-def]
    """Delete `keys` (missing ones are skipped); their rows go to the free list.

    Returns a bool mask of the keys that were present. `free_rows` must have room for
    `ctl[C_FREE] + len(keys)` entries.
    """
    present = np.zeros(keys.shape[0], dtype=np.bool_)
    for i in range(keys.shape[0]):
        pos, row = _probe(slots, row_keys, keys[i], mix64(np.uint64(keys[i])))
        if row == EMPTY:
            continue
        present[i] = True
        free_rows[ctl[C_FREE]] = row
        ctl[C_FREE] += 1
        ctl[C_LIVE] -= 1
        _shift_back(slots, row_keys, pos)
    return present


@numba.njit(nogil=True, inline="always")
def _shift_back(slots, row_keys, hole):  # type: ignore[no-untyped-def]
    """Close the hole at `hole` by moving later entries of its probe run back."""
    mask = slots.shape[0] - 1
    j = hole
    while True:
        j = (j + 1) & mask
        entry = slots[j]
        if entry == EMPTY:
            break
        home = np.int64(mix64(np.uint64(row_keys[entry & ROW_MASK])) & np.uint64(mask))
        # the entry at j may move to the hole unless its home lies cyclically in (hole, j]
        if (hole < j and hole < home <= j) or (hole > j and (home > hole or home <= j)):
            continue
        slots[hole] = entry
        hole = j
    slots[hole] = EMPTY


@numba.njit(nogil=True, cache=True)
def live_rows(slots: np.ndarray) -> np.ndarray:
    """The local rows present in the index, in slot order."""
    count = 0
    for entry in slots:
        count += entry != EMPTY
    rows = np.empty(count, dtype=np.int64)
    k = 0
    for entry in slots:
        if entry != EMPTY:
            rows[k] = entry & ROW_MASK
            k += 1
    return rows
