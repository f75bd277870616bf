"""Pass-mode training of a `Trainer`'s run (its config's `passmode` section).

A pass is `batches_per_pass` consecutive batches of the run; passes end at the steps
that are multiples of it (and at the run's end), so a run resumed from a checkpoint
cuts the same passes. For each pass::

    plan (CPU)      read and extract its batches, look its keys up in the tables once,
                    give every id a device slot, pull the rows that come in
    swap            rows the pass no longer uses go back, the pulled ones come in
    train (device)  per batch: gather + pool, the dense step, the sparse update by
                    index adds on the device rows
    safe point      rows go back to their tables; evict, evaluate, checkpoint when due

With `look_ahead`, the next pass is planned on a second thread while this one trains,
except when this one ends at a safe point (the tables change there).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any

from tidal.data.batch import SparseBatch
from tidal.passmode.plan import PassPlan, Residency, plan_pass
from tidal.passmode.rows import DeviceRows
from tidal.runtime import checkpoint

__all__ = ["train"]


class _Passes:
    """The run's batches cut into passes, each planned against the rows before it."""

    def __init__(self, trainer: Any, position: dict[str, int], max_steps: int | None) -> None:
        self.trainer = trainer
        self.every = trainer.config.passmode.batches_per_pass
        self.batches: Iterator[tuple[int, int, SparseBatch]] = trainer.training_batches(position)
        self.step = position["step"]  # the last step planned
        self.max_steps = max_steps
        self.finished = False  # the data ran out (not max_steps)

    def next(self, before: Residency) -> PassPlan | None:
        """The next pass's plan, the device holding `before`; None after the last."""
        end = (self.step // self.every + 1) * self.every
        if self.max_steps is not None:
            end = min(end, self.max_steps)
        taken = list(itertools.islice(self.batches, max(end - self.step, 0)))
        if len(taken) < end - self.step:
            self.finished = True
        if not taken:
            return None
        for _, _, batch in taken:
            self.trainer._check_batch(batch)
        plan = plan_pass(self.trainer.collection, taken, before, self.step + 1)
        self.step = plan.last_step
        return plan


def train(trainer: Any, log: IO[str], position: dict[str, int], max_steps: int | None) -> tuple[int, bool]:
    """Train from `position` to the end (or `max_steps`) in passes: (last step,
    finished); rows and losses go to `trainer.progress`. Every row is back in its
    table when it returns."""
    rows = DeviceRows(trainer.collection, trainer.device)
    passes = _Passes(trainer, position, max_steps)
    ahead = ThreadPoolExecutor(1, thread_name_prefix="tidal-pass-plan")
    step = position["step"]
    try:
        plan = passes.next(rows.residency)
        while plan is not None:
            rows.swap(plan)
            safe = _safe_point(trainer, plan.last_step)
            look_ahead = trainer.config.passmode.look_ahead and not safe
            planned = ahead.submit(passes.next, plan.residency) if look_ahead else None
            step = _train_pass(trainer, rows, plan, log)
            if safe:
                _at_safe_point(trainer, rows, log, plan)
            plan = planned.result() if planned is not None else passes.next(rows.residency)
        rows.flush()
    finally:
        ahead.shutdown()  # after a failed pass too: the plan running ahead must not touch the tables later
    return step, passes.finished


def _safe_point(trainer: Any, step: int) -> bool:
    """Whether the tables must be current after `step`: an eviction, evaluation or
    checkpoint falls there."""
    training, data = trainer.config.training, trainer.config.data
    return bool((trainer.collection.evicts and step % training.evict_every == 0)
                or (training.eval_every and data.eval and step % training.eval_every == 0)
                or (training.checkpoint_every and step % training.checkpoint_every == 0))


def _train_pass(trainer: Any, rows: DeviceRows, plan: PassPlan, log: IO[str]) -> int:
    """Train the batches of `plan` on the device rows; the pass's last step."""
    log_every = trainer.config.training.log_every
    for step, item in enumerate(plan.batches, start=plan.first_step):
        loss, grad = trainer.dense_step(item.batch, rows.pool(item))
        rows.update(item, grad)
        trainer.progress.add(step, item.batch.batch_size, loss)
        if step % log_every == 0:
            trainer._log(log, item.epoch, step)
    return plan.last_step


def _at_safe_point(trainer: Any, rows: DeviceRows, log: IO[str], plan: PassPlan) -> None:
    """Rows back in their tables; evict, evaluate and checkpoint as due at the pass's end."""
    training, data, step = trainer.config.training, trainer.config.data, plan.last_step
    if trainer.collection.evicts and step % training.evict_every == 0:
        rows.release()  # an evicted row must not stay here
        trainer.collection.evict()
    else:
        rows.flush()
    if training.eval_every and data.eval and step % training.eval_every == 0:
        trainer._log_eval(log, step)
    if training.checkpoint_every and step % training.checkpoint_every == 0:
        last = plan.batches[-1]
        checkpoint.save(trainer, {"step": step, "epoch": last.epoch, "batch": last.index + 1})
