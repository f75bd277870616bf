"""A pass's plan: its batches, the device slot of every id, and the rows that move.

Pass mode (AIBox, HugeCTR's HBM parameter server) trains a pass of batches on rows
held in one device table. Before the pass, each embedding table looks the pass's keys
up (creating and admitting rows as the reference trainer would), and the rows move by
difference: rows
of the last pass that this one also uses stay where they are; the others go back to
their table, and the pass's other rows come in::

    last pass's rows   {a, b, c}        slots  a:1  b:2  c:3
    this pass's keys   {b, c, d, e}
    leaving            {a}              written back from slot 1
    entering           {d, e}           pulled into slots 1 and 4 (freed first, then new)

Slot 0 holds no row and stays zero: ids without a row (not admitted, or their table
at its row cap) read zeros there and update nothing. Every id of a batch gets its slot,
and each table's update its distinct slots, before the pass: the device only gathers
and adds (`tidal.passmode.rows`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tidal.data.batch import SparseBatch
from tidal.embedding import pooling
from tidal.embedding.collection import EmbeddingCollection
from tidal.embedding.table import EmbeddingTable, RowBlock
from tidal.errors import TidalError
from tidal.passmode._kernels import distinct_keys

__all__ = ["ZERO_SLOT", "BatchSlots", "PassPlan", "Residency", "TableMove", "TableUpdate", "counts_sightings", "plan_pass"]

ZERO_SLOT = 0


@dataclass(frozen=True, kw_only=True)
class Residency:
    """Which rows sit in which slots of the device table.

    keys   per table [n_t] int64, ascending
    slots  per table [n_t] int64, the slot of each key
    free   [m] int64  slots that held rows and hold none now
    size   slots the device table needs (slot 0 included)
    """

    keys: tuple[np.ndarray, ...]
    slots: tuple[np.ndarray, ...]
    free: np.ndarray
    size: int

    @classmethod
    def empty(cls, tables: int) -> Residency:
        none = tuple(np.zeros(0, np.int64) for _ in range(tables))
        return cls(keys=none, slots=none, free=np.zeros(0, np.int64), size=ZERO_SLOT + 1)

    @property
    def rows(self) -> int:
        return sum(k.shape[0] for k in self.keys)


@dataclass(frozen=True, kw_only=True)
class TableMove:
    """One table's rows moving before a pass: `leaving` (keys and slots) go back to the
    table, `entering` (pulled from it, with their optimizer state) into `entering_slots`."""

    leaving_keys: np.ndarray  # [l] int64
    leaving_slots: np.ndarray  # [l] int64
    entering: RowBlock  # [e] rows
    entering_slots: np.ndarray  # [e] int64


@dataclass(frozen=True, kw_only=True)
class TableUpdate:
    """One table's sparse update in a batch, its ids with a row only.

    sources   [m] int64    each id's gradient row, ``b * F + f``, of the gradient `[B * F, D]`
    scales    [m] float32  each id's pooling scale (None: all 1)
    slots     [m] int64    each id's slot
    distinct  [u] int64    the distinct slots, each taking the sum of its ids' gradients
    inverse   [m] int64    each id's position in `distinct`
    """

    table: int
    sources: np.ndarray
    scales: np.ndarray | None
    slots: np.ndarray
    distinct: np.ndarray
    inverse: np.ndarray


@dataclass(frozen=True, kw_only=True)
class BatchSlots:
    """One batch of a pass with what the device needs for it.

    slots    [n] int64          the slot of every id of `batch`, in its order (its bags are
                                `batch.offsets`, feature-major)
    scales   [n] float32        each id's pooling scale (its weight, mean or sqrtn); None
                                when all are 1
    gather   [B * F] int64      when every bag holds one id of scale 1: the slots in
                                sample-major order, so pooling is one row gather; else None
    """

    batch: SparseBatch
    epoch: int
    index: int  # the batch's number in its epoch
    slots: np.ndarray
    scales: np.ndarray | None
    gather: np.ndarray | None
    updates: tuple[TableUpdate, ...]


@dataclass(frozen=True, kw_only=True)
class PassPlan:
    """A pass: its batches (steps `first_step` on) and the rows that move before it."""

    first_step: int
    batches: list[BatchSlots]
    moves: list[TableMove]  # `DeviceRows.swap` keeps only the keys of the rows it placed
    residency: Residency  # after the moves
    last_steps: tuple[np.ndarray, ...]  # per table [n_t] uint32: the step each row of `residency` was last used at

    @property
    def last_step(self) -> int:
        return self.first_step + len(self.batches) - 1

    def kept(self) -> Residency:
        """The rows that stay on the device from the pass before (its residency
        without the entering rows)."""
        stays = [~np.isin(keys, move.entering.keys, assume_unique=True)
                 for keys, move in zip(self.residency.keys, self.moves)]
        return Residency(keys=tuple(k[m] for k, m in zip(self.residency.keys, stays)),
                         slots=tuple(s[m] for s, m in zip(self.residency.slots, stays)),
                         free=self.residency.free, size=self.residency.size)


def plan_pass(collection: EmbeddingCollection, batches: Sequence[tuple[int, int, SparseBatch]],
              before: Residency, first_step: int) -> PassPlan:
    """The plan of a pass over `batches` ((epoch, index, batch) each) whose first step
    is `first_step`, the device table holding `before`. Each batch's ids get their
    slots in its own (feature-major) order::

        batch     F=2 features "x" (table a), "z" (table a), B=2 samples
        values    [ 7, 9, 7 | 9 ]           x: [7, 9] [7]   z: [9] []
        lengths   [ 2, 1, 1, 0 ]
        slots     [ 1, 2, 1 | 2 ]           key 7 -> slot 1, key 9 -> slot 2
        update a  distinct [1, 2], inverse [0, 1, 0, 1]

    Each table looks the pass's keys up before it trains, each key at the step of the
    batch that first holds it (every sighting, at its own step, in a table that counts
    them: admission, LFU eviction, a row cap without eviction), so rows are created,
    admitted and refused (a table at its cap) as the reference trainer does; its
    entering rows are pulled.
    """
    positions = [{t: _indices(p) for t, p in collection.table_positions(b).items()} for _, _, b in batches]
    pool = _SlotPool(before.free, before.size)
    tables = [_plan_table(table, t, batches, positions, before, first_step, pool)
              for t, table in enumerate(collection.tables)]
    residency = Residency(keys=tuple(p.keys for p in tables), slots=tuple(p.slots for p in tables), free=pool.free,
                          size=pool.size)
    return PassPlan(first_step=first_step, batches=_batch_slots(collection, batches, positions, tables),
                    moves=[p.move for p in tables], residency=residency, last_steps=tuple(p.last_steps for p in tables))


@dataclass(frozen=True, kw_only=True)
class _TablePlan:
    """One table's part of a pass: its rows on the device, their slots and the steps
    of their last use, its move, and the key (`inverse`) of each of its ids in batch
    order with each key's slot (`key_slots`); `sighted` (None: every id) says which
    ids read their row: under admission, a key's sightings before the batch that
    admitted it read zeros, as in the reference trainer."""

    keys: np.ndarray
    slots: np.ndarray
    last_steps: np.ndarray
    move: TableMove
    inverse: np.ndarray
    key_slots: np.ndarray
    sighted: np.ndarray | None


class _SlotPool:
    """Slots of the device table to give out: freed ones first, then new ones."""

    def __init__(self, free: np.ndarray, size: int) -> None:
        self.free, self.size = free, size

    def give_back(self, slots: np.ndarray) -> None:
        self.free = np.concatenate([self.free, slots])

    def take(self, count: int) -> np.ndarray:
        reused = min(count, self.free.shape[0])
        taken = np.concatenate([self.free[:reused], np.arange(self.size, self.size + count - reused)])
        self.free, self.size = self.free[reused:], self.size + count - reused
        return taken


def _plan_table(table: EmbeddingTable, t: int, batches: Sequence[tuple[int, int, SparseBatch]],
                positions: list[dict[int, np.ndarray]], before: Residency, first_step: int,
                pool: _SlotPool) -> _TablePlan:
    runs = [batch.values[p[t]] if t in p else np.zeros(0, np.int64) for (_, _, batch), p in zip(batches, positions)]
    ids, ends = np.concatenate(runs), np.cumsum([r.shape[0] for r in runs])
    distinct, inverse, first, last = distinct_keys(ids)
    lookups = _Lookups(ids=ids, ends=ends, served=[t in p for p in positions], first_step=first_step)
    has_row, sighted = _have_rows(table, lookups, distinct, first)
    rows = distinct[has_row]  # ascending: the table's keys on the device for this pass
    stays, at = _found_in(before.keys[t], rows)
    leaving = np.ones(before.keys[t].shape[0], dtype=bool)
    leaving[at[stays]] = False
    pool.give_back(before.slots[t][leaving])
    entering_slots = pool.take(int((~stays).sum()))
    move = TableMove(leaving_keys=before.keys[t][leaving], leaving_slots=before.slots[t][leaving],
                     entering=_pulled(table, rows[~stays]), entering_slots=entering_slots)
    row_slots = np.empty(rows.shape[0], np.int64)
    row_slots[stays], row_slots[~stays] = before.slots[t][at[stays]], entering_slots
    key_slots = np.full(distinct.shape[0], ZERO_SLOT, np.int64)
    key_slots[has_row] = row_slots
    last_steps = (first_step + lookups.batch_of(last[has_row])).astype(np.uint32)
    return _TablePlan(keys=rows, slots=row_slots, last_steps=last_steps, move=move, inverse=inverse,
                      key_slots=key_slots, sighted=sighted)


@dataclass(frozen=True, kw_only=True)
class _Lookups:
    """A table's ids in a pass: batch i's are ``ids[ends[i - 1]:ends[i]]`` (none where
    `served[i]` is False: no feature of the batch reads the table), at step
    ``first_step + i``."""

    ids: np.ndarray
    ends: np.ndarray
    served: list[bool]
    first_step: int

    def batch_of(self, positions: np.ndarray) -> np.ndarray:
        """The batch of each id at `positions`."""
        return np.searchsorted(self.ends, positions, side="right")


def _have_rows(table: EmbeddingTable, lookups: _Lookups, distinct: np.ndarray,
               first: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Which of the pass's `distinct` keys (first seen at ids `first`) have a row once
    the pass's lookups made them, and, in a table that counts sightings (admission, LFU
    eviction), which ids had their row at their own step (None elsewhere: all that
    have one). Every batch that reads the table looks up, as in the reference trainer
    (so the table's step moves as there): its new keys in the order they come (its other
    ids counted as lookups), or, in a table that counts sightings or refuses them when
    full, all its ids."""
    starts = np.concatenate([[0], lookups.ends[:-1]]).astype(np.int64)
    capped = table.config.row_cap is not None and table.config.eviction is None  # it counts the sightings it drops
    if table.config.admission is not None or counts_sightings(table) or capped:
        sighted = np.zeros(lookups.ids.shape[0], dtype=bool)  # the ids whose key had a row at their step
        for i in np.flatnonzero(lookups.served):
            found = table.lookup_or_insert(lookups.ids[starts[i] : lookups.ends[i]], step=lookups.first_step + int(i))
            sighted[starts[i] : lookups.ends[i]] = found.handles >= 0
        return table.find(distinct, count=False).handles >= 0, sighted
    arrival = np.argsort(first)  # the keys as they come, as the reference creates their rows
    bounds = np.searchsorted(lookups.batch_of(first[arrival]), np.arange(lookups.ends.shape[0] + 1))
    has_row = np.zeros(distinct.shape[0], dtype=bool)
    for i in np.flatnonzero(lookups.served):
        new = arrival[bounds[i] : bounds[i + 1]]
        has_row[new] = table.lookup_or_insert(distinct[new], step=lookups.first_step + int(i)).handles >= 0
    table.count_lookups(lookups.ids.shape[0] - distinct.shape[0])
    return has_row, None


def counts_sightings(table: EmbeddingTable) -> bool:
    """Whether `table` counts each row's lookups (its eviction is least frequently used)."""
    return table.config.eviction is not None and table.config.eviction.capacity_policy == "lfu"


def _found_in(sorted_keys: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which of `keys` are in `sorted_keys`, and where (valid where found)."""
    if sorted_keys.shape[0] == 0:
        return np.zeros(keys.shape[0], dtype=bool), np.zeros(keys.shape[0], np.int64)
    at = np.minimum(np.searchsorted(sorted_keys, keys), sorted_keys.shape[0] - 1)
    return sorted_keys[at] == keys, at


def _pulled(table: EmbeddingTable, keys: np.ndarray) -> RowBlock:
    block, found = table.pull_rows(keys)
    if not found.all():  # rows are removed only at the safe points between passes
        raise TidalError(f"table {table.name!r}: {int((~found).sum())} rows the pass's lookup found were gone when "
                         f"pulled; rows may be removed only between passes")
    return block


def _batch_slots(collection: EmbeddingCollection, batches: Sequence[tuple[int, int, SparseBatch]],
                 positions: list[dict[int, np.ndarray]], tables: list[_TablePlan]) -> list[BatchSlots]:
    """Each batch's share of the pass's slots, table by table, with its updates."""
    taken = [0] * len(collection.tables)
    planned = []
    for (epoch, index, batch), where in zip(batches, positions):
        slots = np.full(batch.values.shape[0], ZERO_SLOT, np.int64)
        scales = _scales(collection, batch)
        sources = pooling.id_sources(batch.offsets, batch.batch_size)
        updates = []
        for t, p in where.items():
            mine = slice(taken[t], taken[t] + p.shape[0])
            pass_keys, key_slots, sighted = tables[t].inverse[mine], tables[t].key_slots, tables[t].sighted
            taken[t] += p.shape[0]
            slots[p] = key_slots[pass_keys] if sighted is None else np.where(sighted[mine], key_slots[pass_keys], ZERO_SLOT)
            updates.append(_update(t, p, slots, pass_keys, key_slots.shape[0], sources, scales))
        one_each = scales is None and slots.shape[0] == batch.lengths.shape[0] and bool((batch.lengths == 1).all())
        gather = slots.reshape(len(batch.keys), batch.batch_size).T.ravel() if one_each else None
        planned.append(BatchSlots(batch=batch, epoch=epoch, index=index, slots=slots, scales=scales, gather=gather,
                                  updates=tuple(updates)))
    return planned


def _scales(collection: EmbeddingCollection, batch: SparseBatch) -> np.ndarray | None:
    """Each id's pooling scale, or None when every one is 1 (sums of unweighted ids)."""
    if batch.weights is None and all(collection.features[k].pooling == "sum" for k in batch.keys):
        return None
    return collection.id_scales(batch)


def _indices(positions: slice | np.ndarray) -> np.ndarray:
    """`EmbeddingCollection.table_positions`' positions as an index array."""
    return np.arange(positions.start, positions.stop) if isinstance(positions, slice) else positions


def _update(t: int, positions: np.ndarray, slots: np.ndarray, pass_keys: np.ndarray, num_keys: int,
            sources: np.ndarray, scales: np.ndarray | None) -> TableUpdate:
    """Table `t`'s update in a batch whose ids at `positions` are its ids, `pass_keys`
    their keys' numbers in the pass (of `num_keys`)."""
    with_row = slots[positions] != ZERO_SLOT
    ids, keys = positions[with_row], pass_keys[with_row]
    present = np.zeros(num_keys, dtype=bool)
    present[keys] = True
    numbered = np.flatnonzero(present)
    number = np.empty(num_keys, np.int64)
    number[numbered] = np.arange(numbered.shape[0])
    inverse = number[keys]
    distinct = np.empty(numbered.shape[0], np.int64)
    distinct[inverse] = slots[ids]
    return TableUpdate(table=t, sources=sources[ids], scales=None if scales is None else scales[ids], slots=slots[ids],
                       distinct=distinct, inverse=inverse)
