"""A pass's plan: its batches, the device slot of every id, and the rows that move.

Pass mode (AIBox, HugeCTR's HBM parameter server) trains a pass of batches on rows
held in one device table. Before the pass, each embedding table looks the pass's keys
up once (creating rows, applying admission), and the rows move by difference: rows
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

__all__ = ["ZERO_SLOT", "BatchSlots", "PassPlan", "Residency", "TableMove", "TableUpdate", "plan_pass"]

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

    sources  [m] int64    each id's gradient row, ``b * F + f``, of the gradient `[B * F, D]`
    scales   [m] float32  each id's pooling scale
    inverse  [m] int64    each id's position in `slots`
    slots    [u] int64    the distinct slots the update moves
    """

    table: int
    sources: np.ndarray
    scales: np.ndarray
    inverse: np.ndarray
    slots: np.ndarray


@dataclass(frozen=True, kw_only=True)
class BatchSlots:
    """One batch of a pass with what the device needs for it.

    slots    [n] int64          the slot of every id of `batch`, in its order
    offsets  [F * B + 1] int64  the batch's bags (feature-major, as `SparseBatch`)
    scales   [n] float32        each id's pooling scale (its weight, mean or sqrtn)
    """

    batch: SparseBatch
    epoch: int
    index: int  # the batch's number in its epoch
    slots: np.ndarray
    offsets: np.ndarray
    scales: np.ndarray
    updates: tuple[TableUpdate, ...]


@dataclass(frozen=True, kw_only=True)
class PassPlan:
    """A pass: its batches (steps `first_step` on) and the rows that move before it."""

    first_step: int
    batches: list[BatchSlots]
    moves: list[TableMove]
    residency: Residency  # after the moves

    @property
    def last_step(self) -> int:
        return self.first_step + len(self.batches) - 1


def plan_pass(collection: EmbeddingCollection, batches: Sequence[tuple[int, int, SparseBatch]],
              before: Residency, first_step: int) -> PassPlan:
    """The plan of a pass over `batches` ((epoch, index, batch) each) whose first step
    is `first_step`, the device table holding `before`.

    Each table takes one training lookup of the pass's keys, at the pass's last step
    (rows are created and admission applies: a key admitted anywhere in the pass
    trains from its start), and its entering rows are pulled.
    """
    last_step = first_step + len(batches) - 1
    positions = [_table_positions(collection, b) for _, _, b in batches]
    free, size = [before.free], before.size
    keys, slots, moves, id_slots = [], [], [], []
    for t, table in enumerate(collection.tables):
        ids = np.concatenate([batch.values[p[t]] for (_, _, batch), p in zip(batches, positions) if t in p] or
                             [np.zeros(0, np.int64)])
        rows = _rows_of_pass(table, ids, last_step)
        kept = np.isin(before.keys[t], rows, assume_unique=True)
        entering = rows[~np.isin(rows, before.keys[t], assume_unique=True)]
        free.append(before.slots[t][~kept])
        pool = np.concatenate(free)
        taken = min(pool.shape[0], entering.shape[0])
        entering_slots = np.concatenate([pool[:taken], np.arange(size, size + entering.shape[0] - taken)])
        free, size = [pool[taken:]], size + entering.shape[0] - taken
        moves.append(TableMove(leaving_keys=before.keys[t][~kept], leaving_slots=before.slots[t][~kept],
                               entering=_pulled(table, entering), entering_slots=entering_slots))
        table_keys, table_slots = _merged(before.keys[t][kept], before.slots[t][kept], entering, entering_slots)
        keys.append(table_keys)
        slots.append(table_slots)
        id_slots.append(_slots_of(ids, table_keys, table_slots))
    residency = Residency(keys=tuple(keys), slots=tuple(slots), free=np.concatenate(free), size=size)
    return PassPlan(first_step=first_step, batches=_batch_slots(collection, batches, positions, id_slots),
                    moves=moves, residency=residency)


def _table_positions(collection: EmbeddingCollection, batch: SparseBatch) -> dict[int, np.ndarray]:
    """Where each table's ids sit in `batch.values` (the runs of its features' ids)."""
    names = [t.name for t in collection.tables]
    starts = batch.offsets[np.arange(len(batch.keys) + 1) * batch.batch_size]
    positions: dict[int, list[np.ndarray]] = {}
    for f, key in enumerate(batch.keys):
        positions.setdefault(names.index(collection.features[key].table), []).append(np.arange(starts[f], starts[f + 1]))
    return {t: np.concatenate(runs) for t, runs in positions.items()}


def _rows_of_pass(table: EmbeddingTable, ids: np.ndarray, step: int) -> np.ndarray:
    """The distinct keys of `ids` that have a row once the pass's lookup made them,
    ascending. A table that counts sightings (admission, or LFU eviction) sees every
    id; the others each distinct key once."""
    keys = np.unique(ids)
    counted = table.config.admission is not None or (
        table.config.eviction is not None and table.config.eviction.capacity_policy == "lfu")
    if counted:
        table.lookup_or_insert(ids, step=step)
        return keys[table.find(keys, count=False).handles >= 0]
    return keys[table.lookup_or_insert(keys, step=step).handles >= 0]


def _pulled(table: EmbeddingTable, keys: np.ndarray) -> RowBlock:
    block, found = table.pull_rows(keys)
    if not found.all():  # rows are removed only at the safe points between passes
        raise TidalError(f"table {table.name!r}: {int((~found).sum())} rows the pass's lookup found were gone when "
                         f"pulled; rows may be removed only between passes")
    return block


def _merged(kept_keys: np.ndarray, kept_slots: np.ndarray, new_keys: np.ndarray,
            new_slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two key -> slot lists merged, keys ascending."""
    keys = np.concatenate([kept_keys, new_keys])
    order = np.argsort(keys, kind="stable")
    return keys[order], np.concatenate([kept_slots, new_slots])[order]


def _slots_of(ids: np.ndarray, keys: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """The slot of every id (`ZERO_SLOT` where its key has no row)."""
    if keys.shape[0] == 0:
        return np.full(ids.shape[0], ZERO_SLOT, np.int64)
    at = np.minimum(np.searchsorted(keys, ids), keys.shape[0] - 1)
    return np.where(keys[at] == ids, slots[at], ZERO_SLOT)


def _batch_slots(collection: EmbeddingCollection, batches: Sequence[tuple[int, int, SparseBatch]],
                 positions: list[dict[int, np.ndarray]], id_slots: list[np.ndarray]) -> list[BatchSlots]:
    """Each batch's share of the pass's slots, table by table, with its updates."""
    taken = [0] * len(collection.tables)
    planned = []
    for (epoch, index, batch), where in zip(batches, positions):
        slots = np.full(batch.values.shape[0], ZERO_SLOT, np.int64)
        for t, p in where.items():
            slots[p] = id_slots[t][taken[t] : taken[t] + p.shape[0]]
            taken[t] += p.shape[0]
        modes = np.array([pooling.MODES[collection.features[k].pooling] for k in batch.keys], dtype=np.int64)
        weights = batch.weights if batch.weights is not None else np.zeros(0, np.float32)
        scales = pooling.id_scales(batch.offsets, weights, modes, batch.batch_size)
        sources = pooling.id_sources(batch.offsets, batch.batch_size)
        updates = tuple(_update(t, p, slots, sources, scales) for t, p in where.items())
        planned.append(BatchSlots(batch=batch, epoch=epoch, index=index, slots=slots, offsets=batch.offsets,
                                  scales=scales, updates=updates))
    return planned


def _update(t: int, positions: np.ndarray, slots: np.ndarray, sources: np.ndarray, scales: np.ndarray) -> TableUpdate:
    with_row = positions[slots[positions] != ZERO_SLOT]
    distinct, inverse = np.unique(slots[with_row], return_inverse=True)
    return TableUpdate(table=t, sources=sources[with_row], scales=scales[with_row], inverse=inverse.reshape(-1),
                       slots=distinct)
