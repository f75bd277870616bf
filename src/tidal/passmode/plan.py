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

    `distinct` and `inverse` are None for plain SGD, which adds each id's gradient as
    it comes (the same sum).
    """

    table: int
    sources: np.ndarray
    scales: np.ndarray | None
    slots: np.ndarray
    distinct: np.ndarray | None
    inverse: np.ndarray | None


@dataclass(frozen=True, kw_only=True)
class BatchSlots:
    """One batch of a pass with what the device needs for it.

    slots    [n] int64          the slot of every id of `batch`, in its order
    offsets  [F * B + 1] int64  the batch's bags (feature-major, as `SparseBatch`)
    scales   [n] float32        each id's pooling scale (its weight, mean or sqrtn); None
                                when all are 1
    gather   [B * F] int64      when every bag holds one id of scale 1: the slots in
                                sample-major order, so pooling is one row gather; else None
    """

    batch: SparseBatch
    epoch: int
    index: int  # the batch's number in its epoch
    slots: np.ndarray
    offsets: np.ndarray
    scales: np.ndarray | None
    gather: np.ndarray | None
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
    is `first_step`, the device table holding `before`.

    Each table takes one training lookup of the pass's keys, at the pass's last step
    (rows are created and admission applies: a key admitted anywhere in the pass
    trains from its start), and its entering rows are pulled.
    """
    last_step = first_step + len(batches) - 1
    positions = [_table_positions(collection, b) for _, _, b in batches]
    free, size = before.free, before.size
    keys, slots, moves, id_keys = [], [], [], []
    for t, table in enumerate(collection.tables):
        ids = np.concatenate([batch.values[p[t]] for (_, _, batch), p in zip(batches, positions) if t in p] or
                             [np.zeros(0, np.int64)])
        distinct, inverse = distinct_keys(ids)
        has_row = _have_rows(table, ids, distinct, last_step)
        rows = distinct[has_row]  # ascending: the table's keys on the device for this pass
        stays, at = _found_in(before.keys[t], rows)
        leaving = np.ones(before.keys[t].shape[0], dtype=bool)
        leaving[at[stays]] = False
        free = np.concatenate([free, before.slots[t][leaving]])
        entering = rows[~stays]
        taken = min(free.shape[0], entering.shape[0])
        entering_slots = np.concatenate([free[:taken], np.arange(size, size + entering.shape[0] - taken)])
        free, size = free[taken:], size + entering.shape[0] - taken
        moves.append(TableMove(leaving_keys=before.keys[t][leaving], leaving_slots=before.slots[t][leaving],
                               entering=_pulled(table, entering), entering_slots=entering_slots))
        row_slots = np.empty(rows.shape[0], np.int64)
        row_slots[stays], row_slots[~stays] = before.slots[t][at[stays]], entering_slots
        key_slots = np.full(distinct.shape[0], ZERO_SLOT, np.int64)
        key_slots[has_row] = row_slots
        keys.append(rows)
        slots.append(row_slots)
        id_keys.append((inverse, key_slots))
    residency = Residency(keys=tuple(keys), slots=tuple(slots), free=free, size=size)
    return PassPlan(first_step=first_step, batches=_batch_slots(collection, batches, positions, id_keys),
                    moves=moves, residency=residency)


def _table_positions(collection: EmbeddingCollection, batch: SparseBatch) -> dict[int, np.ndarray]:
    """Where each table's ids sit in `batch.values` (the runs of its features' ids)."""
    names = [t.name for t in collection.tables]
    starts = batch.offsets[np.arange(len(batch.keys) + 1) * batch.batch_size]
    positions: dict[int, list[np.ndarray]] = {}
    for f, key in enumerate(batch.keys):
        positions.setdefault(names.index(collection.features[key].table), []).append(np.arange(starts[f], starts[f + 1]))
    return {t: np.concatenate(runs) for t, runs in positions.items()}


def _have_rows(table: EmbeddingTable, ids: np.ndarray, distinct: np.ndarray, step: int) -> np.ndarray:
    """Which of the pass's `distinct` keys have a row once its lookup made them. A table
    that counts sightings (admission, or LFU eviction) sees every id; the others each
    distinct key once."""
    if table.config.admission is not None or counts_sightings(table):
        table.lookup_or_insert(ids, step=step)
        return table.find(distinct, count=False).handles >= 0
    return table.lookup_or_insert(distinct, step=step).handles >= 0


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
                 positions: list[dict[int, np.ndarray]], id_keys: list[tuple[np.ndarray, np.ndarray]]) -> list[BatchSlots]:
    """Each batch's share of the pass's slots, table by table, with its updates.
    `id_keys[t]` is (the pass key of each of table t's ids, in batch order; the slot
    of each pass key)."""
    taken = [0] * len(collection.tables)
    planned = []
    for (epoch, index, batch), where in zip(batches, positions):
        slots = np.full(batch.values.shape[0], ZERO_SLOT, np.int64)
        scales = _scales(collection, batch)
        sources = pooling.id_sources(batch.offsets, batch.batch_size)
        updates = []
        for t, p in where.items():
            pass_keys, key_slots = id_keys[t][0][taken[t] : taken[t] + p.shape[0]], id_keys[t][1]
            taken[t] += p.shape[0]
            slots[p] = key_slots[pass_keys]
            updates.append(_update(collection.tables[t], t, p, slots, pass_keys, key_slots.shape[0], sources, scales))
        one_each = scales is None and slots.shape[0] == batch.lengths.shape[0] and bool((batch.lengths == 1).all())
        gather = slots.reshape(len(batch.keys), batch.batch_size).T.ravel() if one_each else None
        planned.append(BatchSlots(batch=batch, epoch=epoch, index=index, slots=slots, offsets=batch.offsets,
                                  scales=scales, gather=gather, updates=tuple(updates)))
    return planned


def _scales(collection: EmbeddingCollection, batch: SparseBatch) -> np.ndarray | None:
    """Each id's pooling scale, or None when every one is 1 (sums of unweighted ids)."""
    modes = np.array([pooling.MODES[collection.features[k].pooling] for k in batch.keys], dtype=np.int64)
    if batch.weights is None and not modes.any():
        return None
    weights = batch.weights if batch.weights is not None else np.zeros(0, np.float32)
    return pooling.id_scales(batch.offsets, weights, modes, batch.batch_size)


def _update(table: EmbeddingTable, t: int, positions: np.ndarray, slots: np.ndarray, pass_keys: np.ndarray,
            num_keys: int, sources: np.ndarray, scales: np.ndarray | None) -> TableUpdate:
    """Table `t`'s update in a batch whose ids at `positions` are its ids, `pass_keys`
    their keys' numbers in the pass (of `num_keys`)."""
    with_row = slots[positions] != ZERO_SLOT
    ids = positions[with_row]
    scaled = None if scales is None else scales[ids]
    if not table.optimizer.sums_keys_first:  # plain SGD adds each id's gradient as it comes
        return TableUpdate(table=t, sources=sources[ids], scales=scaled, slots=slots[ids], distinct=None, inverse=None)
    keys = pass_keys[with_row]
    present = np.zeros(num_keys, dtype=bool)
    present[keys] = True
    numbered = np.flatnonzero(present)
    number = np.empty(num_keys, np.int64)
    number[numbered] = np.arange(numbered.shape[0])
    inverse = number[keys]
    distinct = np.empty(numbered.shape[0], np.int64)
    distinct[inverse] = slots[ids]
    return TableUpdate(table=t, sources=sources[ids], scales=scaled, slots=slots[ids], distinct=distinct,
                       inverse=inverse)
