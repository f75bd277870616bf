"""A pass's rows on its device: one table for all embedding tables, trained with plain
index gathers and adds.

Every embedding table has the same dim, so all of them share one `values` tensor
`[slots, D]` (one gather pools every feature of a batch) and one `state` tensor
`[slots, W]` (W the widest optimizer state; a table's rows use its first columns).
Slot 0 holds no row and stays zero. Rows come in and go back by the difference
between consecutive passes (`tidal.passmode.plan`); `flush` writes every row back to
its table, at the points where the tables must be current (checkpoints, evaluation,
the end of a run), and `release` also drops the rows of tables about to evict.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from tidal.embedding.collection import EmbeddingCollection
from tidal.embedding.table import RowBlock
from tidal.errors import ConfigError, TidalError
from tidal.optim import rowwise as rw
from tidal.passmode._kernels import ids_by_row, optimizer_step, sgd_add
from tidal.passmode.optim import update_rows
from tidal.passmode.plan import BatchSlots, PassPlan, Residency, TableUpdate, counts_sightings

__all__ = ["DeviceRows"]

_GROWTH = 1.25  # the device table grows by at least a quarter, so a growing run copies it rarely
_WRITE_BACK_ROWS = 1 << 18  # rows gathered on the device at a time to go back


class DeviceRows:
    """The rows of the current pass on `device`. See the module docstring."""

    def __init__(self, collection: EmbeddingCollection, device: torch.device | str, *,
                 compiled: bool | None = None) -> None:
        self.collection = collection
        self.device = torch.device(device)
        # on the CPU the store's kind of compiled kernels update rows (torch's index_add_ costs 4x);
        # elsewhere torch's ops, which the CPU also runs when `compiled` is False
        self.compiled = self.device.type == "cpu" if compiled is None else compiled
        if self.compiled and self.device.type != "cpu":
            raise ConfigError(f"compiled row updates run on the CPU only, not on {self.device}: pass compiled=False "
                              f"(or None, which chooses by the device)")
        self.dim = collection.dim
        width = max(t.optimizer.state_width for t in collection.tables)
        self.values = torch.zeros((1, self.dim), dtype=torch.float32, device=self.device)  # [slots, D]
        self.state = torch.zeros((1, width), dtype=torch.float32, device=self.device)  # [slots, W]
        self.residency = Residency.empty(len(collection.tables))
        self.last_steps = np.zeros(1, np.uint32)  # [slots] the step each slot's row was last used at
        self.trained = False  # some row here was updated since it came or last went back

    # ------------------------------------------------------------------ moves

    def swap(self, plan: PassPlan) -> None:
        """Make the device hold `plan`'s rows: write its leaving rows back, then place
        its entering ones (a leaving row's slot may take an entering one)."""
        if self.trained:  # else their tables hold them as they are here (flushed since)
            for t, move in enumerate(plan.moves):
                self._write_back(t, move.leaving_keys, move.leaving_slots)
        self.residency = plan.kept()  # until the entering rows are in: what a flush may write back
        self._grow(plan.residency.size)
        for t, move in enumerate(plan.moves):
            slots = self._tensor(move.entering_slots)
            self.values.index_copy_(0, slots, self._tensor(move.entering.values))
            width = move.entering.state.shape[1]
            if width:
                self.state[:, :width].index_copy_(0, slots, self._tensor(move.entering.state))
            plan.moves[t] = replace(move, entering=_keys_only(move.entering))  # the pulled rows live here now
        self.residency = plan.residency
        for slots, steps in zip(plan.residency.slots, plan.last_steps):
            self.last_steps[slots] = steps

    def flush(self) -> None:
        """Write every row back to its table (unless none was trained since the last
        flush); the rows stay here."""
        if not self.trained:
            return
        for t, (keys, slots) in enumerate(zip(self.residency.keys, self.residency.slots)):
            self._write_back(t, keys, slots)
        self.trained = False

    def release(self, tables: Collection[int]) -> int:
        """Write every row back, and hold none of `tables` (before they evict: the next
        pass pulls their rows again); their slots are free for others. The rows of
        `tables` it held."""
        self.flush()
        held = self.residency
        empty = np.zeros(0, np.int64)
        self.residency = Residency(keys=tuple(empty if t in tables else k for t, k in enumerate(held.keys)),
                                   slots=tuple(empty if t in tables else s for t, s in enumerate(held.slots)),
                                   free=np.concatenate([held.free, *(held.slots[t] for t in tables)]), size=held.size)
        return sum(held.keys[t].shape[0] for t in tables)

    def _write_back(self, t: int, keys: np.ndarray, slots: np.ndarray) -> None:
        """Rows `keys` from `slots` into table `t`, with the steps they were last used at
        (their TTL and LRU age); their lookup counts (kept by LFU tables only) are the
        table's: the pass's lookups counted them."""
        table = self.collection.tables[t]
        for lo in range(0, keys.shape[0], _WRITE_BACK_ROWS):  # in pieces: no second copy of the device table
            part, index = keys[lo : lo + _WRITE_BACK_ROWS], slots[lo : lo + _WRITE_BACK_ROWS]
            on_device = self._tensor(index)
            values = self.values.index_select(0, on_device).cpu().numpy()
            state = self.state[:, : table.optimizer.state_width].index_select(0, on_device).cpu().numpy()
            counts = table.pull_rows(part)[0].counts if counts_sightings(table) else np.zeros(part.shape[0], np.uint32)
            block = RowBlock(keys=part, values=values, state=state, counts=counts, last_seen=self.last_steps[index])
            stored = table.push_rows(block, keep_last_seen=True)
            if not stored.all():  # the rows were the table's: overwriting them takes no new row
                raise TidalError(f"table {table.name!r}: {int((~stored).sum())} rows trained in pass mode could not "
                                 f"be written back (the table refused them as full); this is a bug in Tidal")

    def _grow(self, size: int) -> None:
        if size <= self.values.shape[0]:
            return
        needed = size
        size = max(size, int(self.values.shape[0] * _GROWTH))
        more = size - self.values.shape[0]
        try:
            self.values, self.state = _grown(self.values, size), _grown(self.state, size)
        except torch.OutOfMemoryError:
            row_bytes = 4 * (self.values.shape[1] + self.state.shape[1])
            raise TidalError(f"pass mode: a pass needs {needed:,d} rows on {self.device} "
                             f"({needed * row_bytes / 2**30:.2f} GiB), and the device could not allocate them; give "
                             f"passmode.batches_per_pass fewer batches") from None
        self.last_steps = np.concatenate([self.last_steps, np.zeros(more, np.uint32)])

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        array = np.ascontiguousarray(array)
        if not array.flags.writeable:  # a batch's own arrays: torch takes only writable ones
            array = array.copy()
        return torch.from_numpy(array).to(self.device, non_blocking=True)

    # ------------------------------------------------------------------ training

    def pool(self, item: BatchSlots) -> torch.Tensor:
        """The pooled embeddings `[B, F, D]` float32 of a batch of the pass."""
        batch = item.batch
        if item.gather is not None:  # one id a bag: the rows themselves, sample by sample
            return self.values.index_select(0, self._tensor(item.gather)).view(batch.batch_size, len(batch.keys), self.dim)
        scales = None if item.scales is None else self._tensor(item.scales)
        bags = F.embedding_bag(self._tensor(item.slots), self.values, self._tensor(batch.offsets), mode="sum",
                               per_sample_weights=scales, include_last_offset=True)  # [F * B, D]
        return bags.view(len(batch.keys), batch.batch_size, self.dim).transpose(0, 1).contiguous()

    def update(self, item: BatchSlots, grad: torch.Tensor, lr_scale: float = 1.0) -> None:
        """Each table's optimizer step on the rows of `item`, given the gradient of its
        pooled output `[B, F, D]`: each row takes the sum of its ids' scaled gradients.
        `lr_scale` multiplies every table's learning rate (a schedule's)."""
        rows = grad.detach().to(self.device, torch.float32).reshape(-1, self.dim).contiguous()  # [B * F, D]
        self.trained = True
        for update in item.updates:
            table = self.collection.tables[update.table]
            step = table.count_update()
            if update.slots.shape[0] == 0:
                continue
            if self.compiled:
                self._update_compiled(table.optimizer, update, rows.numpy(), step, lr_scale)
            else:
                self._update_torch(table.optimizer, update, rows, step, lr_scale)

    def _update_compiled(self, optimizer: rw.OptimizerKernel, update: TableUpdate, grad: np.ndarray, step: int,
                         lr_scale: float) -> None:
        scales, hyper = _NO_SCALES if update.scales is None else update.scales, optimizer.hyper_at(lr_scale)
        if optimizer.code == rw.SGD:  # each id's gradient added as it comes: the same sum, no listing first
            sgd_add(self.values.numpy(), update.slots, grad, update.sources, scales, np.float32(hyper[rw.LR]))
        else:
            optimizer_step(self.values.numpy(), self.state.numpy(), optimizer.state_width, update.distinct,
                           update.inverse, grad, update.sources, scales, optimizer.code, hyper, step)

    def _update_torch(self, optimizer: rw.OptimizerKernel, update: TableUpdate, grad: torch.Tensor, step: int,
                      lr_scale: float) -> None:
        order, offsets = ids_by_row(update.inverse, update.distinct.shape[0])
        scales = None if update.scales is None else self._tensor(update.scales[order])
        # each row's gradients summed in its ids' order, on any device (a GPU's index_add_ adds in no fixed order)
        summed = F.embedding_bag(self._tensor(update.sources[order]), grad, self._tensor(offsets), mode="sum",
                                 per_sample_weights=scales, include_last_offset=True)  # [u, D]
        update_rows(optimizer, self.values, self.state, self._tensor(update.distinct), summed, step, lr_scale)


def _keys_only(block: RowBlock) -> RowBlock:
    """`block` without its values and state (what a plan keeps of the rows it pulled)."""
    none = np.zeros((block.keys.shape[0], 0), np.float32)
    return replace(block, values=none, state=none)


def _grown(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """`tensor` with zero rows added up to `rows` (the old and the new one at once, no
    third buffer)."""
    grown = tensor.new_zeros((rows, tensor.shape[1]))
    grown[: tensor.shape[0]] = tensor
    return grown


_NO_SCALES = np.zeros(0, np.float32)
