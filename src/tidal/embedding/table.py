"""A collision-free dynamic embedding table: every distinct int64 key owns its own row.

The table is split into shards by a 64-bit mix of the key; each shard has its own lock,
hash index, row metadata and chunks of rows, so threads working on different shards
never wait for each other. Row initial values are a pure function of (seed, table
name, key). Optimizer state is stored in the row, right after the values.

Verbs (the parameter-server protocol speaks the same ones)::

    lookup(keys)            -> values [n, dim]   serving: read-only, missing keys read 0
    lookup_or_insert(keys)  -> RowLookup         training: one step; creates admitted rows
    apply_gradients(keys, grads)                 fused optimizer update on unique rows
    pull_rows(keys) / push_rows(block)           move rows with their optimizer state
    evict()                                      TTL, row cap and sketch ageing, at a safe point
    save / save_delta / load                     see tidal.embedding.checkpoint
    stats()                                      rows, bytes, lookups, misses, ...
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import numpy as np

from tidal.config import (CountAdmission, ProbabilityAdmission, TableConfig, is_whole_number, require,
                          require_threads)
from tidal.data.batch import int64_ids, whole_numbers
from tidal.embedding import index as ix
from tidal.embedding import pooling
from tidal.embedding._memory import CHUNK_ROWS, SHARD_BITS, Arena
from tidal.embedding._parallel import run_split, run_tasks
from tidal.embedding.hashing import INIT_KINDS, table_seed
from tidal.errors import BatchError, CheckpointError, ConfigError, TidalError
from tidal.gate import Gate
from tidal.optim.rowwise import OptimizerKernel

__all__ = ["EmbeddingTable", "RowBlock", "RowLookup", "TableStats"]

_MAX_LOAD = 0.75
_ROW_ARRAY_GROWTH = 1.25
_UNLIMITED = 1 << 62
_KEPT_REMOVALS = 1 << 16  # removed keys a shard always keeps for the next delta


@dataclass(frozen=True, kw_only=True)
class TableStats:
    """A snapshot of one table's size and counters."""

    name: str
    rows: int
    dim: int
    value_bytes: int  # rows x dim x 4
    state_bytes: int  # rows x optimizer state width x 4
    index_bytes: int  # hash slots and the key of every row
    metadata_bytes: int  # last-seen step, counts, free list, admission sketch
    allocated_bytes: int  # row chunks reserved, used or not
    lookups: int
    misses: int  # serving lookups of absent keys
    admitted: int  # rows created
    not_admitted: int  # sightings of keys that admission turned away
    evicted: int
    dropped_full: int  # sightings of new keys refused because their shard held its share of the row cap (no eviction)

    @property
    def overhead_bytes_per_row(self) -> float:
        """Index and metadata bytes per row, beyond values and optimizer state."""
        return (self.index_bytes + self.metadata_bytes) / max(self.rows, 1)


@dataclass(frozen=True, kw_only=True)
class RowLookup:
    """Where the keys of one lookup live, and (when its update needs them) its distinct
    rows.

    handles        [n]      int64  row handle of each key, -1 when it has no row
    key_offsets    [S + 1]  int64  shard s's keys are order[key_offsets[s]:key_offsets[s + 1]]
    order          [n]      int64  the keys' positions in the lookup, shard by shard
    unique         [U]      int64  the distinct row handles, grouped by shard
    shard_offsets  [S + 1]  int64  shard s's rows are unique[shard_offsets[s]:shard_offsets[s+1]]
    numbers        [n]      int64  for each key of `order`, its row's number within its shard
                                   (unique[shard_offsets[s] + number]), -1 when it has none

    The last three are None when the table's optimizer is plain SGD, which adds each
    key's gradient to its row as it comes: listing the distinct rows costs about a tenth
    of a lookup, and only the other optimizers need the sum of a row's gradients first.

    `table` and `epoch` say which table made it and between which removals of rows
    (`remove`, `evict`): handles are only valid there, so `apply_grouped` refuses a
    lookup from elsewhere or older.
    `seen_at` is the step its rows were marked seen at (-1: a `find`, which marks none).
    """

    handles: np.ndarray
    key_offsets: np.ndarray
    order: np.ndarray
    unique: np.ndarray | None
    shard_offsets: np.ndarray | None
    numbers: np.ndarray | None
    table: int  # id() of the table
    epoch: int  # the table's removals of rows when it was made
    seen_at: int


@dataclass(frozen=True, kw_only=True)
class RowBlock:
    """Rows moved between tables, shards and checkpoints, with their optimizer state.

    keys      [n]            int64
    values    [n, dim]       float32
    state     [n, state]     float32   optimizer state, layout of tidal.optim.rowwise
    last_seen [n]            uint32    step a row was last looked up or written
    counts    [n]            uint32    lookups of each row (zeros when not tracked)
    """

    keys: np.ndarray
    values: np.ndarray
    state: np.ndarray
    last_seen: np.ndarray
    counts: np.ndarray


class _Shard:
    """One shard's index, row metadata and control block; used under `lock` only."""

    def __init__(self, row_limit: int, track_counts: bool, sketch_width: int) -> None:
        self.lock = threading.Lock()
        self.slots = np.full(1024, ix.EMPTY, dtype=np.int32)
        self.row_keys = np.zeros(0, dtype=np.int64)
        self.last_seen = np.zeros(0, dtype=np.uint32)
        self.track_counts = track_counts
        self.counts = np.zeros(0, dtype=np.uint32)
        self.free_rows = np.zeros(0, dtype=np.int64)
        self.sketch = np.zeros((ix.SKETCH_DEPTH, sketch_width), dtype=np.uint16)
        self.evicted: list[np.ndarray] = []  # keys removed since the last save, for the next delta
        self.evicted_count = 0
        self.evicted_dropped = False  # more were removed than kept: no delta until the next save
        self.ctl = np.zeros(ix.C_SIZE, dtype=np.int64)
        self.ctl[ix.C_MAX_LIVE] = int(self.slots.shape[0] * _MAX_LOAD)
        self.ctl[ix.C_ROW_LIMIT] = row_limit

    def record_removed(self, keys: np.ndarray) -> None:
        """Keep removed `keys` for the next delta checkpoint, unless more keys were removed
        since the last save than the shard holds rows (and at least `_KEPT_REMOVALS`): a
        delta would then outweigh a full checkpoint, and the record would grow without
        bound in a run that never writes one. It is dropped until the next save."""
        if self.evicted_dropped:
            return
        self.evicted_count += len(keys)
        if self.evicted_count > max(int(self.ctl[ix.C_LIVE]), _KEPT_REMOVALS):
            self.evicted.clear()
            self.evicted_dropped = True
        else:
            self.evicted.append(keys)

    def forget_removed(self) -> None:
        self.evicted.clear()
        self.evicted_count, self.evicted_dropped = 0, False

    def grow_index(self) -> None:
        new_slots = np.full(2 * self.slots.shape[0], ix.EMPTY, dtype=np.int32)
        ix.rehash(self.slots, new_slots, self.row_keys)
        self.slots = new_slots
        self.ctl[ix.C_MAX_LIVE] = int(new_slots.shape[0] * _MAX_LOAD)

    def grow_rows(self, arena_rows: int) -> None:
        """Grow the per-row arrays by a 25% step (a chunk at least), up to `arena_rows`:
        rows reserved in the arena cost no index memory until they are used."""
        size = self.row_keys.shape[0]
        size = min(arena_rows, max(size + CHUNK_ROWS, int(size * _ROW_ARRAY_GROWTH)))
        self.row_keys = _resized(self.row_keys, size)
        self.last_seen = _resized(self.last_seen, size)
        if self.track_counts:
            self.counts = _resized(self.counts, size)
        self.ctl[ix.C_ROW_CAP] = size

    def reserve_free(self, extra: int) -> None:
        need = int(self.ctl[ix.C_FREE]) + extra
        if need > self.free_rows.shape[0]:
            self.free_rows = _resized(self.free_rows, max(need, 2 * self.free_rows.shape[0]))

    def metadata_bytes(self) -> int:
        arrays = (self.last_seen, self.counts, self.free_rows, self.sketch)
        return sum(a.nbytes for a in arrays)


def _largest_first(sizes: np.ndarray) -> list[int]:
    """The shards with work (sizes[s] > 0), largest first."""
    return [int(s) for s in np.argsort(-sizes, kind="stable") if sizes[s] > 0]


_NOT_LISTED = np.zeros(0, dtype=np.int64)


def _handles_in_shard(lookup: RowLookup, s: int) -> np.ndarray:
    """The row handles of shard `s` in `lookup`: its distinct ones when it lists them,
    else those of each of its keys (-1 for a key without a row)."""
    if lookup.unique is not None:
        return lookup.unique[lookup.shard_offsets[s] : lookup.shard_offsets[s + 1]]
    keys = lookup.key_offsets
    return lookup.handles[lookup.order[keys[s] : keys[s + 1]]]


def _resized(array: np.ndarray, size: int) -> np.ndarray:
    grown = np.zeros(size, dtype=array.dtype)
    grown[: array.shape[0]] = array
    return grown


class EmbeddingTable:
    """A sharded, collision-free embedding table. See the module docstring."""

    def __init__(self, config: TableConfig, *, threads: int = 1) -> None:
        require(config, TableConfig, "EmbeddingTable: config")
        require_threads(threads, f"table {config.name!r}")
        self.config = config
        self.name = config.name
        self.dim = config.dim
        self.threads = threads
        self.optimizer = OptimizerKernel(config.optimizer, config.dim)
        self.width = config.dim + self.optimizer.state_width
        self.arena = Arena(config.num_shards, self.width)
        self._seed = table_seed(config.seed, config.name)
        self._step = 0  # the latest training step looked up
        self._updates = 0  # optimizer steps so far
        self._saved_step = -1  # rows last seen at or after this step go into the next delta
        self._counter_lock = threading.Lock()
        self._gate = Gate()
        self._epoch = 0  # removals of rows so far (under the gate): a RowLookup is valid within one
        self._shards = [self._new_shard(s) for s in range(config.num_shards)]
        self.checkpoint_id: str | None = None  # what a delta would extend: '<full checkpoint id>/<chain entry>'
        self.values_only = False  # loaded without its optimizer state (`load_tables(values_only=True)`): never saved
        self._reserve(config.reserve_rows)

    # ------------------------------------------------------------------ set-up

    def _reserve(self, rows: int) -> None:
        """Allocate chunks for `rows` rows, split evenly over the shards, and touch the
        memory of those rows (not the whole of their chunks: a chunk of wide rows is large)."""
        most = ix.MAX_SHARD_ROWS * self.num_shards
        if self.row_cap is not None:
            most = min(most, self.row_cap)
        if rows > most:
            raise ConfigError(f"table {self.name!r}: reserve_rows={rows} is more than the table may hold; "
                              f"give at most {most} (max_rows, memory_bytes and num_shards set the limit)")
        per_shard = -(-rows // self.num_shards)
        for s in range(self.num_shards):
            while (capacity := self.arena.rows_capacity(s)) < per_shard:
                self.arena.add_chunk(s, touch_rows=min(per_shard - capacity, CHUNK_ROWS))

    def _new_shard(self, s: int) -> _Shard:
        eviction = self.config.eviction
        track_counts = eviction is not None and eviction.capacity_policy == "lfu"
        admission = self.config.admission
        sketch_width = admission.sketch_width if isinstance(admission, CountAdmission) else 0
        return _Shard(self._shard_row_limit(s), track_counts, sketch_width)

    @property
    def row_cap(self) -> int | None:
        """The most rows the table keeps: `max_rows`, or what `memory_bytes` pays for."""
        return self.config.row_cap

    @property
    def bytes_per_row(self) -> int:
        """What one row costs against `memory_bytes` (`TableConfig.bytes_per_row`)."""
        return self.config.bytes_per_row

    def _shard_row_limit(self, s: int) -> int:
        """New keys are refused past this in shard `s`; with eviction, `evict()` trims instead.

        The cap is split evenly over the shards (the limits add up to it exactly), so a
        shard that fills first refuses keys while the others still take theirs.
        """
        cap, shards = self.row_cap, self.config.num_shards
        if cap is None or self.config.eviction is not None:
            return _UNLIMITED
        return cap // shards + (s < cap % shards)

    def _row_settings(self) -> tuple:
        init = self.config.initializer
        return (self.arena.directory, self.width, self.dim, self._seed, INIT_KINDS[init.kind],
                init.scale, np.float32(self.optimizer.initial_state))

    def _admission_settings(self, force: bool) -> tuple:
        admission = self.config.admission
        if force or admission is None:
            return (ix.ADMIT_ALL, 0, 1.0, self._seed)
        if isinstance(admission, ProbabilityAdmission):
            return (ix.ADMIT_PROBABILITY, 0, admission.probability, self._seed)
        return (ix.ADMIT_COUNT, admission.min_count, 1.0, self._seed)

    # ------------------------------------------------------------------ counters

    @property
    def num_shards(self) -> int:
        return len(self._shards)

    @property
    def sketch_shape(self) -> tuple[int, int]:
        """Shape of each shard's admission sketch (width 0 without count admission)."""
        return self._shards[0].sketch.shape

    @property
    def step(self) -> int:
        return self._step

    def _take_step(self, step: int | None) -> int:
        """The step of a training lookup (`step`, or the one after the latest); the
        table's step becomes the latest of them."""
        if step is not None and not is_whole_number(step):
            raise BatchError(f"table {self.name!r}: a lookup's step must be an integer, got {step!r}")
        with self._counter_lock:
            given, step = step is not None, self._step + 1 if step is None else int(step)
            if step >= ix.MARK:
                raise (BatchError(f"table {self.name!r}: a lookup's step must be below {int(ix.MARK)}, got {step}")
                       if given else TidalError(f"table {self.name!r}: the step counter reached its limit of "
                                                f"{int(ix.MARK) - 1} steps"))
            if step < 1:
                raise BatchError(f"table {self.name!r}: a lookup's step must be at least 1, got {step}")
            if step < self._saved_step:
                raise BatchError(f"table {self.name!r}: a lookup's step may not be before the last save "
                                 f"(step {self._saved_step}), got {step}")
            self._step = max(self._step, step)
            return step

    def count_update(self) -> int:
        """Count one optimizer step applied to this table's rows elsewhere (pass mode
        trains a pass's rows on a device); its number, the step Adam's bias correction
        uses without per-row steps."""
        return self._next_update()

    def _next_update(self) -> int:
        with self._counter_lock:
            self._updates += 1
            return self._updates

    # ------------------------------------------------------------------ routing

    def _keys(self, keys: np.ndarray) -> np.ndarray:
        keys = int64_ids(keys, f"table {self.name!r}") if whole_numbers(keys) else np.asarray(keys)
        if keys.shape == (0,):  # no ids, whatever their type ([] reads as float64)
            return np.empty(0, dtype=np.int64)
        if keys.ndim != 1 or keys.dtype.kind not in "iu":
            raise BatchError(
                f"table {self.name!r}: keys must be a 1-D integer array of raw ids, got "
                f"{keys.dtype} of shape {keys.shape}; hash strings to int64 ids first"
            )
        return np.ascontiguousarray(keys, dtype=np.int64)

    # ------------------------------------------------------------------ lookups

    def lookup_or_insert(self, keys: np.ndarray, *, step: int | None = None) -> RowLookup:
        """Rows of `keys` for training step `step` (default: the one after the latest),
        creating admitted rows on first sight.

        Keys turned away by admission (or by a full table) get handle -1. Handles stay
        valid until rows are next removed (`evict`, `remove`). Rows keep the latest
        step that looked them up, so lookups given their batches' steps may come in any
        order (a pipeline looking batches up on several threads) and leave every row's
        step, and so its TTL, as lookups in step order would. Under admission, which sighting creates a row still
        depends on the order of the sightings.
        """
        keys, step = self._keys(keys), self._take_step(step)
        with self._gate.shared():
            return self._resolve(keys, step=step, insert=True, distinct=self.optimizer.sums_keys_first)

    def count_lookups(self, count: int) -> None:
        """Count `count` lookups of keys whose rows were found without asking the index
        again (pass mode looks each key of a pass up once, at its first sighting; its
        later sightings count here, as the reference trainer's lookups count them)."""
        shard = self._shards[0]
        with self._gate.shared(), shard.lock:  # as every lookup counts: not while a checkpoint reads the counters
            shard.ctl[ix.C_LOOKUPS] += count

    def find(self, keys: np.ndarray, *, count: bool = True) -> RowLookup:
        """Rows of `keys` without creating any: absent keys get -1 (and, with `count`,
        count as misses; internal reads such as `apply_gradients` pass False)."""
        keys = self._keys(keys)
        with self._gate.shared():
            return self._find(keys, count)

    def _find(self, keys: np.ndarray, count: bool) -> RowLookup:
        """`find` for a caller that holds the gate."""
        return self._resolve(keys, step=self._step, insert=False, distinct=self.optimizer.sums_keys_first, count=count)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Values `[n, dim]` float32 of `keys` for serving; absent keys read as zeros."""
        keys = self._keys(keys)
        with self._gate.shared():
            return self._gather(self._resolve(keys, step=self._step, insert=False, distinct=False).handles,
                                columns=self.dim)

    def holding_rows(self) -> AbstractContextManager[None]:
        """A block in which no row of this table is removed: lookups made before it can be
        checked (`check_lookup`) and then used without a removal freeing their rows. The
        table's other methods may be called inside it, but not `evict` or `remove`
        (`RuntimeError`: they would wait for the block to end)."""
        return self._gate.shared()

    def _resolve(self, keys: np.ndarray, *, step: int, insert: bool, distinct: bool, force: bool = False,
                 count: bool = True) -> RowLookup:
        """The rows of `keys`; the caller holds the gate (`using`)."""
        keys, hashes, order, offsets = ix.group_by_shard(keys, self.num_shards)
        handles = np.empty(keys.shape[0], dtype=np.int64)
        numbers = np.empty(keys.shape[0] if distinct else 0, dtype=np.int64)
        found: list[np.ndarray] = [np.zeros(0, np.int64)] * self.num_shards
        route = (keys, hashes, order, offsets, handles, numbers)
        settings = (step, insert, count, distinct, self._admission_settings(force))

        def in_shard(s: int) -> None:
            found[s] = self._resolve_in_shard(s, route, settings)

        run_tasks([partial(in_shard, s) for s in _largest_first(np.diff(offsets))], self.threads)
        lookup = RowLookup(handles=handles, key_offsets=offsets, order=order, unique=None, shard_offsets=None,
                           numbers=None, table=id(self), epoch=self._epoch, seen_at=step if insert else -1)
        if not distinct:
            return lookup
        bases = np.zeros(self.num_shards + 1, dtype=np.int64)
        np.cumsum([len(f) for f in found], out=bases[1:])
        unique = np.concatenate([(rows << SHARD_BITS) | s for s, rows in enumerate(found)])
        return replace(lookup, unique=unique, shard_offsets=bases, numbers=numbers)

    def _resolve_in_shard(self, s: int, route: tuple, settings: tuple) -> np.ndarray:
        """Resolve shard `s`'s part of a batch under its lock; its distinct local rows
        (none without `distinct`)."""
        keys, hashes, order, offsets, handles, numbers = route
        step, insert, count, distinct, admission = settings
        shard = self._shards[s]
        position, end = int(offsets[s]), int(offsets[s + 1])
        rows = np.empty(end - position if distinct else 0, dtype=np.int64)
        previous = np.empty(rows.shape[0], dtype=np.uint32)
        n_rows = np.zeros(1, dtype=np.int64)
        counted = insert and admission[0] == ix.ADMIT_COUNT
        refused, n_refused = np.empty(end - position if counted else 0, dtype=np.int64), np.zeros(1, dtype=np.int64)
        out = (handles, numbers, rows, previous, n_rows, refused, n_refused)
        with shard.lock:
            try:
                while position < end:
                    position = ix.resolve(
                        shard.slots, shard.row_keys, shard.last_seen, shard.counts, shard.free_rows,
                        shard.ctl, keys, hashes, order, position, end, step, s, self._row_settings(),
                        admission, shard.sketch, insert, count, distinct, out)
                    self._grow(s, shard)
                if counted:
                    ix.admit_earlier_sightings(shard.slots, shard.row_keys, shard.last_seen, shard.counts, shard.ctl,
                                               keys, hashes, order, s, distinct, out)
            finally:  # even if growing failed, no row may stay marked
                ix.unmark(shard.last_seen, rows, previous, n_rows[0], step, insert)
        return rows[: n_rows[0]]

    def _grow(self, s: int, shard: _Shard) -> None:
        """Grow what the last kernel call asked for (nothing, the index, or the rows)."""
        if shard.ctl[ix.C_NEED] == ix.NEED_REHASH:
            shard.grow_index()
        elif shard.ctl[ix.C_NEED] == ix.NEED_ROWS:
            if shard.ctl[ix.C_HIGH] == self.arena.rows_capacity(s):  # else reserved rows are left
                if self.arena.rows_capacity(s) >= ix.MAX_SHARD_ROWS:
                    raise TidalError(f"table {self.name!r}: shard {s} holds {ix.MAX_SHARD_ROWS} rows, the most one "
                                     f"shard can; give the table more shards (num_shards) or a row cap")
                self.arena.add_chunk(s)
            shard.grow_rows(self.arena.rows_capacity(s))

    def _gather(self, handles: np.ndarray, columns: int | None = None) -> np.ndarray:
        """The first `columns` (default: all) of each row; zeros for handle -1."""
        rows = np.empty((handles.shape[0], columns or self.width), dtype=np.float32)
        run_split(pooling.gather_rows, handles.shape[0], self.threads,
                  self.arena.directory, self.width, handles, rows)
        return rows

    # ------------------------------------------------------------------ updates

    def apply_gradients(self, keys: np.ndarray, grads: np.ndarray) -> None:
        """One optimizer step on the rows of `keys` given one gradient per key.

        Repeated keys have their gradients summed first; absent keys are skipped.
        `grads` is `[n, dim]`, a numpy array or a torch tensor (bfloat16 and float16 too),
        applied as float32.
        """
        keys = self._keys(keys)
        if hasattr(grads, "detach"):  # a torch tensor, perhaps one autograd tracks, on a GPU or in bfloat16
            grads = grads.detach().cpu()
            grads = grads.float().numpy() if grads.dtype.is_floating_point else grads.numpy()
        try:
            grads = np.asarray(grads)
        except (TypeError, ValueError) as e:  # a ragged list, ...
            raise BatchError(f"table {self.name!r}: grads must be a float array of shape {(keys.shape[0], self.dim)} "
                             f"that numpy can read, got {type(grads).__name__} ({e}); convert it first, e.g. "
                             f"tensor.float().numpy()") from e
        if grads.dtype.kind not in "iuf":
            raise BatchError(f"table {self.name!r}: grads must be a float array of shape {(keys.shape[0], self.dim)} "
                             f"(real numbers: floats or integers), got dtype {grads.dtype}")
        with np.errstate(over="ignore"):  # a value past float32's range becomes an infinity, refused below
            grads = np.ascontiguousarray(grads, dtype=np.float32)
        if grads.shape != (keys.shape[0], self.dim):
            raise BatchError(
                f"table {self.name!r}: grads must have shape {(keys.shape[0], self.dim)} "
                f"(one row per key), got {grads.shape}"
            )
        if not np.isfinite(grads).all():  # one NaN would stay in its row's values and state for good
            raise BatchError(f"table {self.name!r}: grads must be finite in float32 (magnitudes up to 3.4e38), got "
                             f"{int((~np.isfinite(grads)).sum())} NaN or infinite values; no row was updated")
        with self._gate.shared():  # found and updated with no removal between
            lookup = self._find(keys, count=False)
            self._apply(lookup, self._gradient(lookup, grads, np.arange(keys.shape[0]), np.ones(keys.shape[0])))

    def apply_grouped(self, lookup: RowLookup, grad: np.ndarray, sources: np.ndarray, scales: np.ndarray,
                      lr_scale: float = 1.0) -> None:
        """One fused optimizer step on the distinct rows of `lookup`: each row takes the
        sum, over its keys k, of ``scales[k] * grad[sources[k]]``.

        `grad` is `[N, dim]` float32 (or uint16 bfloat16 bits); `sources` and `scales`
        have one entry per key of the lookup. `lr_scale` multiplies the optimizer's
        learning rate for this step (a schedule's).
        """
        gradient = self._gradient(lookup, grad, sources, scales)
        with self._gate.shared():  # no row is removed from the check to the last shard's update
            self.check_lookup(lookup)
            self._apply(lookup, gradient, lr_scale)

    def _gradient(self, lookup: RowLookup, grad: np.ndarray, sources: np.ndarray, scales: np.ndarray) -> tuple:
        """(sources, scales, grad) of an update of `lookup`, checked and in the kernel's dtypes."""
        n = lookup.handles.shape[0]
        if not isinstance(grad, np.ndarray) or grad.dtype not in (np.float32, np.uint16):
            raise BatchError(f"table {self.name!r}: gradient rows must be a float32 numpy array (or uint16 bfloat16 "
                             f"bits), got {getattr(grad, 'dtype', type(grad).__name__)}")
        grad = np.ascontiguousarray(grad)
        sources, scales = np.asarray(sources), np.asarray(scales, dtype=np.float32)
        if grad.ndim != 2 or grad.shape[1] != self.dim or sources.shape != (n,) or scales.shape != (n,):
            raise BatchError(f"table {self.name!r}: gradient rows {list(grad.shape)} with {sources.shape[0]} "
                             f"sources and {scales.shape[0]} scales do not fit {n} keys of dim {self.dim}")
        if sources.dtype.kind not in "iu" or (n and not 0 <= sources.min() <= sources.max() < grad.shape[0]):
            raise BatchError(f"table {self.name!r}: sources must be integer rows of the {grad.shape[0]} gradient rows")
        return sources.astype(np.int64, copy=False), scales, grad

    def _apply(self, lookup: RowLookup, gradient: tuple, lr_scale: float = 1.0) -> None:
        """The update of a current `lookup`, shard by shard; the caller holds the gate."""
        cost = np.diff(lookup.key_offsets)  # a gradient row read per key (plain SGD: and its row updated)
        if lookup.shard_offsets is not None:
            cost += np.diff(lookup.shard_offsets)  # each distinct row read and written once
        hyper = self.optimizer.hyper_at(lr_scale)  # checked before the update is counted
        step = self._next_update()
        run_tasks([partial(self._apply_in_shard, s, lookup, gradient, step, hyper) for s in _largest_first(cost)],
                  self.threads)

    @contextmanager
    def updating_in_place(self, lookup: RowLookup) -> Iterator[None]:
        """Hold every shard's lock while the caller updates the rows of `lookup` itself
        (a kernel that visits rows of all shards, such as `pooling.sgd_by_sample`); the
        rows are marked seen on the way out. Locks are taken in shard order, as by every
        caller that holds more than one."""
        with self._gate.shared(), ExitStack() as held:
            self.check_lookup(lookup)
            self._next_update()
            for shard in self._shards:
                held.enter_context(shard.lock)
            yield
            if self._needs_marking(lookup):
                for s, shard in enumerate(self._shards):
                    pooling.mark_seen(shard.last_seen, _handles_in_shard(lookup, s), np.uint32(self._step))

    def _needs_marking(self, lookup: RowLookup) -> bool:
        """Whether updated rows must be marked seen now: yes when a save came after the
        lookup marked them, so that the next delta checkpoint holds the update; no
        otherwise, so that rows keep the step of the batch that used them, whatever
        later batches were looked up meanwhile (as a pipeline does). Rows found by
        `find` (`apply_gradients`), which marks none, are marked whenever updated."""
        return lookup.seen_at < 0 or lookup.seen_at < self._saved_step

    def check_lookup(self, lookup: RowLookup) -> None:
        """A `BatchError` unless `lookup` came from this table and no row was removed since
        (check it inside `holding_rows` to use it after)."""
        if lookup.table != id(self) or lookup.epoch != self._epoch:
            raise BatchError(f"table {self.name!r}: this lookup (a RowLookup, or the context forward() returned) "
                             "came from another table or from before an evict() or remove() of its rows; look the "
                             "keys up again (call forward again)")

    def _apply_in_shard(self, s: int, lookup: RowLookup, gradient: tuple, step: int, hyper: np.ndarray) -> None:
        shard = self._shards[s]
        keys = lookup.key_offsets
        numbers, unique, lo, hi = _NOT_LISTED, _NOT_LISTED, 0, 0  # plain SGD's lookups list no rows
        if lookup.unique is not None:
            numbers, unique = lookup.numbers, lookup.unique
            lo, hi = int(lookup.shard_offsets[s]), int(lookup.shard_offsets[s + 1])
        grouping = (lookup.order, numbers, lookup.handles, int(keys[s]), int(keys[s + 1]))
        with shard.lock:
            pooling.apply_grouped(self.arena.directory, self.width, unique, grouping, gradient,
                                  self.optimizer.code, hyper, step, lo, hi)
            if self._needs_marking(lookup):
                pooling.mark_seen(shard.last_seen, _handles_in_shard(lookup, s), np.uint32(self._step))

    # ------------------------------------------------------------------ row moves

    def pull_rows(self, keys: np.ndarray) -> tuple[RowBlock, np.ndarray]:
        """The rows of `keys` with their optimizer state and metadata, and a found mask.

        Absent keys come back as zero rows with found False.
        """
        keys = self._keys(keys)
        with self._gate.shared():
            return self._pull(keys, self._resolve(keys, step=self._step, insert=False, distinct=False,
                                                  count=False).handles)

    def _pull(self, keys: np.ndarray, handles: np.ndarray) -> tuple[RowBlock, np.ndarray]:
        rows = self._gather(handles)
        last_seen = np.zeros(keys.shape[0], dtype=np.uint32)
        counts = np.zeros(keys.shape[0], dtype=np.uint32)
        for s, shard in enumerate(self._shards):
            mine = self._in_shard(handles, s)
            local = handles[mine] >> SHARD_BITS
            with shard.lock:  # a resolve running in this shard marks last_seen meanwhile
                last_seen[mine] = shard.last_seen[local]
                if shard.track_counts:
                    counts[mine] = shard.counts[local]
        block = RowBlock(keys=keys, values=rows[:, : self.dim], state=rows[:, self.dim :],
                         last_seen=last_seen, counts=counts)
        return block, handles >= 0

    def push_rows(self, block: RowBlock, *, keep_last_seen: bool = False) -> np.ndarray:
        """Insert or overwrite rows with their optimizer state and lookup counts.

        The rows count as written now (so the next delta checkpoint holds them), or,
        with `keep_last_seen`, at the block's `last_seen` steps (rows trained elsewhere
        coming back: their steps say when they were last used); a row pushed so at a
        step before the table's last save is not in the next delta, so push only rows
        unchanged since then that way.
        Admission does not apply (the rows were admitted where they came from); the row
        cap does: returns a mask of the rows stored, False where the table was full.
        """
        return self._push(block, keep_last_seen=keep_last_seen)

    def _push(self, block: RowBlock, *, keep_last_seen: bool, checked: bool = False) -> np.ndarray:
        """`push_rows`; `checked`: the rows' numbers are known finite and their state
        never negative where the optimizer's is not (a checkpoint's, checked as it was read)."""
        keys = self._keys(block.keys)
        ascending = bool(np.all(keys[1:] > keys[:-1]))  # distinct at a glance, as a bundle's rows come
        if not ascending and np.unique(keys).shape[0] != keys.shape[0]:
            raise BatchError(f"table {self.name!r}: pushed keys must be distinct; de-duplicate the block first")
        values, state = self._real_rows(block.values, "values"), self._real_rows(block.state, "state")
        expected = ((len(keys), self.dim), (len(keys), self.optimizer.state_width))
        if (values.shape, state.shape) != expected:
            raise BatchError(
                f"table {self.name!r}: pushed values and state must have shapes {expected[0]} and "
                f"{expected[1]}, got {values.shape} and {state.shape}"
            )
        metadata = {"last_seen": np.shape(block.last_seen), "counts": np.shape(block.counts)}
        if any(shape != (len(keys),) for shape in metadata.values()):  # checked before any row is written
            raise BatchError(f"table {self.name!r}: pushed last_seen and counts must have one entry per key "
                             f"({len(keys)}), got shapes {metadata}")
        rows = np.concatenate([values, state], axis=1) if state.shape[1] else np.ascontiguousarray(values)
        if not checked:
            self._check_finite_rows(rows, keys)
            if note := self.optimizer.negative_state_note(state, keys):
                raise BatchError(f"table {self.name!r}: pushed optimizer state holds {note}, which "
                                 f"{self.config.optimizer.kind} never keeps; no row was written")
        last_seen = (self._whole_numbers(block.last_seen, "last_seen must be steps", int(ix.MARK) - 1)  # see MARK
                     if keep_last_seen else np.full(len(keys), self._step, np.uint32))
        counts = self._whole_numbers(block.counts, "counts must be whole numbers", int(np.iinfo(np.uint32).max))
        with self._gate.shared():
            lookup = self._resolve(keys, step=self._step, insert=True, distinct=False, force=True, count=False)
            run_split(pooling.scatter_rows, len(keys), self.threads, self.arena.directory, self.width, lookup.handles, rows)
            self._set_metadata(lookup, last_seen, counts)
        return lookup.handles >= 0

    def _real_rows(self, rows: Any, what: str) -> np.ndarray:
        """Pushed `rows` (values or state) as float32; a `BatchError` for numbers that are not real."""
        found = np.asarray(rows)
        if found.dtype.kind not in "iuf":
            raise BatchError(f"table {self.name!r}: pushed {what} must be real numbers (floats or integers), got "
                             f"dtype {found.dtype}; no row was written")
        with np.errstate(over="ignore"):  # a value past float32's range becomes an infinity, refused as one
            return found.astype(np.float32, copy=False)

    def _check_finite_rows(self, rows: np.ndarray, keys: np.ndarray) -> None:
        """A `BatchError` naming the first pushed row holding a NaN or an infinity (it
        would be served, and trained from, for good)."""
        if note := pooling.nonfinite_note(rows, keys, self.threads):
            raise BatchError(f"table {self.name!r}: pushed values and state must be finite, got {note}; no row was "
                             f"written")

    def _whole_numbers(self, values: np.ndarray, rule: str, most: int) -> np.ndarray:
        """Pushed metadata as the table keeps it (uint32); a `BatchError` saying `rule` for
        a value that is not a whole number from 0 to `most` (last_seen: below the bit that
        marks rows while a lookup runs)."""
        found = np.asarray(values)
        if found.size and (found.dtype.kind not in "iu" or found.min() < 0 or found.max() > most):
            shown = found.dtype if found.dtype.kind not in "iu" else f"{found.min()} to {found.max()}"
            raise BatchError(f"table {self.name!r}: pushed {rule} from 0 to {most}, got {shown}; no row was written")
        return found.astype(np.uint32)

    def _set_metadata(self, lookup: RowLookup, last_seen: np.ndarray, counts: np.ndarray) -> None:
        for s, shard in enumerate(self._shards):
            mine = lookup.order[lookup.key_offsets[s] : lookup.key_offsets[s + 1]]  # positions of shard s's keys
            with shard.lock:
                pooling.scatter_metadata(shard.last_seen, lookup.handles, mine, last_seen)
                if shard.track_counts:
                    pooling.scatter_metadata(shard.counts, lookup.handles, mine, counts)

    @staticmethod
    def _in_shard(handles: np.ndarray, s: int) -> np.ndarray:
        """Mask of the handles that are rows of shard `s`."""
        return (handles >= 0) & ((handles & ((1 << SHARD_BITS) - 1)) == s)

    def remove(self, keys: np.ndarray) -> int:
        """Delete the rows of `keys` (absent keys are skipped); returns how many went.

        Removed rows count as evicted and are recorded for the next delta checkpoint.
        It waits for the lookups, reads and updates under way, and those that come
        meanwhile wait for it. When rows went, lookups made before are refused by the
        updates they are given to (their rows may go to other keys): look the keys up again.
        """
        keys = self._keys(keys)
        with self._gate.exclusive():
            return self._remove(keys)

    def _remove(self, keys: np.ndarray) -> int:
        """`remove` of checked keys; the caller holds the gate alone."""
        grouped, _, _, offsets = ix.group_by_shard(keys, self.num_shards)
        removed = 0
        for s, shard in enumerate(self._shards):
            mine = grouped[offsets[s] : offsets[s + 1]]
            with shard.lock:
                shard.reserve_free(len(mine))
                present = ix.remove(shard.slots, shard.row_keys, shard.free_rows, shard.ctl, mine)
                if self._saved_step >= 0:  # only a delta after a save needs them
                    shard.record_removed(mine[present])
                shard.ctl[ix.C_EVICTED] += int(present.sum())
                removed += int(present.sum())
        self._epoch += removed > 0
        return removed

    # ------------------------------------------------------------------ eviction

    def evict(self) -> int:
        """Apply the TTL and the row cap now; returns the number of rows evicted.

        Call it at a safe point: no handle from an earlier `lookup_or_insert` may be in
        use, since evicted rows are reused. It also halves the admission counts of keys
        not yet admitted, so a key must keep coming back to earn its row. It holds the
        table alone from choosing the rows to removing them: lookups, updates, saves and
        other evictions wait (a lookup between the two would find a row chosen as
        stale, and two evictions at once would both cut the table down to its cap).
        """
        eviction = self.config.eviction
        if eviction is None:
            self._age_sketches()
            return 0
        with self._gate.exclusive():  # lookups from before a safe point are refused, even if no row goes
            self._epoch += 1
            self._age_sketches()  # once the gate let it through: an evict refused changes nothing
            evicted = 0
            if eviction.ttl_steps is not None:
                stale = [keys[self._step - seen.astype(np.int64) > eviction.ttl_steps]
                         for keys, seen, _ in self._live_metadata()]
                evicted += self._remove(np.concatenate(stale))
            over = self.stats().rows - (_UNLIMITED if self.row_cap is None else self.row_cap)
            if over > 0:
                evicted += self._remove(self._least_used(over, eviction.capacity_policy))
        return evicted

    def _age_sketches(self) -> None:
        for shard in self._shards:
            with shard.lock:
                shard.sketch >>= 1

    def _live_metadata(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(keys, last_seen, counts) of the live rows of each shard."""
        found = []
        for shard in self._shards:
            with shard.lock:
                local = ix.live_rows(shard.slots)
                counts = shard.counts[local] if shard.track_counts else np.zeros(len(local), np.uint32)
                found.append((shard.row_keys[local], shard.last_seen[local], counts))
        return found

    def _least_used(self, count: int, policy: str) -> np.ndarray:
        live = self._live_metadata()
        keys = np.concatenate([k for k, _, _ in live])
        score = np.concatenate([(c if policy == "lfu" else s).astype(np.int64) for _, s, c in live])
        return keys[np.lexsort((keys, score))[:count]]  # ties go by key: the same on every copy

    # ------------------------------------------------------------------ checkpoints

    def snapshot_shard(self, s: int, *, since_save: bool) -> dict[str, np.ndarray]:
        """Shard `s` as arrays: every live row, or (delta) rows seen from the last save's
        step on plus the keys removed since that save. Call at a safe point (no training running)."""
        shard = self._shards[s]
        with shard.lock:
            local = ix.live_rows(shard.slots)
            if since_save:
                local = local[shard.last_seen[local].astype(np.int64) >= self._saved_step]
            rows = self._gather((local << SHARD_BITS) | s)
            arrays = {
                "keys": shard.row_keys[local], "values": rows[:, : self.dim],
                "state": rows[:, self.dim :], "last_seen": shard.last_seen[local],
                "counts": shard.counts[local] if shard.track_counts else np.zeros(len(local), np.uint32),
                "counters": shard.ctl[ix.C_LOOKUPS : ix.C_SIZE].copy(), "sketch": shard.sketch,
            }
            if since_save:
                if shard.evicted_dropped:
                    raise CheckpointError(
                        f"table {self.name!r}: shard {s} lost more rows since the last save ({shard.evicted_count}) "
                        f"than it holds, so their keys were not kept; a delta would outweigh a full checkpoint: "
                        f"save a full one (save_tables)")
                arrays["evicted"] = np.concatenate([np.zeros(0, np.int64), *shard.evicted])
        return {name: np.ascontiguousarray(a) for name, a in arrays.items()}

    def values_by_key(self) -> tuple[np.ndarray, np.ndarray]:
        """Every live row as (keys [n] ascending, values [n, dim] float32), without the
        optimizer state or a copy of it: what serving takes. Call at a safe point."""
        keys, handles = [], []
        for s, shard in enumerate(self._shards):
            with shard.lock:
                local = ix.live_rows(shard.slots)
                keys.append(shard.row_keys[local])
                handles.append((local << SHARD_BITS) | s)
        all_keys = np.concatenate(keys)
        order = np.argsort(all_keys, kind="stable")
        return all_keys[order], self._gather(np.concatenate(handles)[order], columns=self.dim)

    def restore_shard(self, s: int, arrays: dict[str, np.ndarray]) -> None:
        """Apply a snapshot of shard `s`: removals first (delta), then rows, then counters."""
        if "evicted" in arrays:
            self.remove(arrays["evicted"])
        block = RowBlock(keys=arrays["keys"], values=arrays["values"], state=arrays["state"],
                         last_seen=arrays["last_seen"], counts=arrays["counts"])
        self._push(block, keep_last_seen=True, checked=True)  # the reader checked them
        shard = self._shards[s]
        with shard.lock:
            shard.ctl[ix.C_LOOKUPS : ix.C_SIZE] = arrays["counters"]
            shard.sketch[...] = arrays["sketch"]
            shard.forget_removed()

    def clocks_after_save(self) -> dict[str, int]:
        """The step counters a checkpoint records (`mark_saved` then takes its saved step).

        A save takes no step (so saves do not age rows toward their TTL); the next delta
        holds the rows seen at the save's step or later, so rows a lookup of that step
        touches after the save are in it too, and a few written before it again.
        """
        return {"step": self._step, "updates": self._updates, "saved_step": self._step}

    def clocks(self) -> dict[str, int]:
        """The step counters now (lookup steps, updates, the step of the last save)."""
        return {"step": self._step, "updates": self._updates, "saved_step": self._saved_step}

    def restore_clocks(self, clocks: dict[str, int]) -> None:
        with self._counter_lock:
            self._step, self._updates, self._saved_step = clocks["step"], clocks["updates"], clocks["saved_step"]

    def saving(self) -> AbstractContextManager[None]:
        """A block in which the table does not change: lookups, updates and removals
        wait for it to end. A save writes the rows and forgets the removals in it, so
        that its checkpoint holds one state of the table and the next delta misses no
        change. Not inside `holding_rows` (`RuntimeError`: it would wait for itself); a
        lookup or update from the thread that holds it waits for good."""
        return self._gate.exclusive()

    def mark_saved(self, clocks: dict[str, int], checkpoint_id: str) -> None:
        """The checkpoint written with `clocks` committed: the next delta starts here.
        The step counters stay as they are: lookups made meanwhile keep theirs."""
        with self._counter_lock:
            self._saved_step = clocks["saved_step"]
        self.checkpoint_id = checkpoint_id
        for shard in self._shards:
            with shard.lock:
                shard.forget_removed()

    def save(self, root: str | os.PathLike) -> None:
        """A full checkpoint of this table under `root` (see tidal.embedding.checkpoint)."""
        from tidal.embedding.checkpoint import save

        save(root, [self])

    def save_delta(self, root: str | os.PathLike) -> None:
        """A delta checkpoint: rows touched and keys removed since the last save."""
        from tidal.embedding.checkpoint import save_delta

        save_delta(root, [self])

    @classmethod
    def load(cls, root: str | os.PathLike, *, threads: int = 1) -> EmbeddingTable:
        """The single table of the checkpoint under `root`, full plus deltas applied."""
        from tidal.embedding.checkpoint import load

        tables = load(root, threads=threads)
        if len(tables) != 1:
            raise CheckpointError(f"{root}: expected a checkpoint of one table, found {sorted(tables)}")
        return next(iter(tables.values()))

    # ------------------------------------------------------------------ stats

    def stats(self) -> TableStats:
        ctl = np.sum([shard.ctl for shard in self._shards], axis=0)
        rows = int(ctl[ix.C_LIVE])
        index_bytes = sum(s.slots.nbytes + s.row_keys.nbytes for s in self._shards)
        return TableStats(
            name=self.name, rows=rows, dim=self.dim,
            value_bytes=rows * self.dim * 4,
            state_bytes=rows * self.optimizer.state_width * 4,
            index_bytes=index_bytes,
            metadata_bytes=sum(s.metadata_bytes() for s in self._shards),
            allocated_bytes=self.arena.allocated_bytes(),
            lookups=int(ctl[ix.C_LOOKUPS]), misses=int(ctl[ix.C_MISSES]),
            admitted=int(ctl[ix.C_ADMITTED]), not_admitted=int(ctl[ix.C_NOT_ADMITTED]),
            evicted=int(ctl[ix.C_EVICTED]), dropped_full=int(ctl[ix.C_DROPPED_FULL]),
        )
