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
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import IO, Any

from tidal.data.batch import SparseBatch
from tidal.passmode.plan import PassPlan, Residency, plan_pass
from tidal.passmode.rows import DeviceRows

__all__ = ["train"]


class _Passes:
    """The run's batches cut into passes, each planned against the rows before it."""

    def __init__(self, trainer: Any, batches: Iterable[tuple[int, int, SparseBatch]], position: dict[str, int],
                 max_steps: int | None) -> None:
        self.trainer = trainer
        self.every = trainer.config.passmode.batches_per_pass
        self.batches: Iterator[tuple[int, int, SparseBatch]] = iter(batches)
        self.step = position["step"]  # the last step planned
        self.max_steps = max_steps
        self.finished = False  # the data ran out (not max_steps)
        self.plan_s = 0.0  # reading, extracting and planning, on whichever thread

    def next(self, before: Residency) -> PassPlan | None:
        """The next pass's plan, the device holding `before`; None after the last."""
        start = time.perf_counter()
        try:
            return self._next(before)
        finally:
            self.plan_s += time.perf_counter() - start

    def _next(self, before: Residency) -> PassPlan | None:
        end = (self.step // self.every + 1) * self.every
        if self.max_steps is not None:
            end = min(end, self.max_steps)
        taken = list(itertools.islice(self.batches, max(end - self.step, 0)))
        if len(taken) < end - self.step:
            self.finished = True
        if not taken:
            return None
        for _, _, batch in taken:
            self.trainer.check_batch(batch)
        plan = plan_pass(self.trainer.collection, taken, before, self.step + 1)
        self.step = plan.last_step
        return plan


def train(trainer: Any, log: IO[str], position: dict[str, int], max_steps: int | None,
          batches: Iterable[tuple[int, int, SparseBatch]] | None = None) -> tuple[int, bool]:
    """Train from `position` to the end (or `max_steps`) in passes: (last step,
    finished); rows and losses go to `trainer.progress`. Every row is back in its
    table when it returns. The batches are the run's training files from `position`
    on, or `batches` ((epoch, number in the epoch, batch) each, extracted as
    `Trainer.extract` does)."""
    rows = DeviceRows(trainer.collection, trainer.device)
    passes = _Passes(trainer, trainer.training_batches(position) if batches is None else batches, position, max_steps)
    ahead = ThreadPoolExecutor(1, thread_name_prefix="tidal-pass-plan")
    step, report = position["step"], _Report()
    try:
        plan = report.timed("wait_s", passes.next, rows.residency)
        while plan is not None:
            report.count(plan)
            report.timed("swap_s", rows.swap, plan)
            safe = bool(trainer.due(plan.last_step))  # the tables must be current after the pass
            look_ahead = trainer.config.passmode.look_ahead and not safe
            planned = ahead.submit(passes.next, plan.residency) if look_ahead else None
            step = report.timed("train_s", _train_pass, trainer, rows, plan, log)
            if safe:
                report.rows_out += report.timed("safe_point_s", _at_safe_point, trainer, rows, log, plan)
            plan = report.timed("wait_s", planned.result if planned is not None else partial(passes.next, rows.residency))
        report.timed("safe_point_s", rows.flush)
    except BaseException as exc:
        _write_back_after(exc, rows, ahead)
        raise
    finally:
        ahead.shutdown()  # after a failed pass too: the plan running ahead must not touch the tables later
        trainer.runtime_report = {"passmode": report.summary(passes.plan_s)}
    return step, passes.finished


def _write_back_after(failure: BaseException, rows: DeviceRows, ahead: ThreadPoolExecutor) -> None:
    """After a failed step, the rows trained so far go back to their tables, as the
    reference trainer's tables hold every step before a failed one."""
    ahead.shutdown()  # the plan running ahead must not change the tables meanwhile
    try:
        rows.flush()
    except Exception as exc:  # the device itself may be what failed
        failure.add_note(f"pass mode: the rows trained since the last write-back could not go back to their tables "
                         f"({type(exc).__name__}: {exc}); resume from the last checkpoint")


class _Report:
    """Where a pass-mode run's time went, and how many rows moved."""

    def __init__(self) -> None:
        self.seconds = {"wait_s": 0.0, "swap_s": 0.0, "train_s": 0.0, "safe_point_s": 0.0}
        self.passes = self.rows = self.rows_in = self.rows_out = 0
        self.later_rows = self.later_rows_in = 0  # of the passes after the first, which finds none there

    def timed(self, key: str, work: Callable[..., Any], *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return work(*args)
        finally:
            self.seconds[key] += time.perf_counter() - start

    def count(self, plan: PassPlan) -> None:
        rows, rows_in = plan.residency.rows, sum(m.entering.keys.shape[0] for m in plan.moves)
        if self.passes:
            self.later_rows += rows
            self.later_rows_in += rows_in
        self.passes += 1
        self.rows += rows
        self.rows_in += rows_in
        self.rows_out += sum(m.leaving_keys.shape[0] for m in plan.moves)

    def summary(self, plan_s: float) -> dict:
        """The figures: `wait_s` is the training thread waiting for plans (all of the
        planning without look-ahead), `plan_s` the planning wherever it ran, `kept_share`
        the share of a pass's rows already on the device from the pass before, over the
        passes after the first (0 with one pass)."""
        return {"passes": self.passes, "rows_per_pass": self.rows / max(self.passes, 1),
                "kept_share": 1.0 - self.later_rows_in / self.later_rows if self.later_rows else 0.0,
                "rows_in": self.rows_in, "rows_out": self.rows_out, "plan_s": plan_s, **self.seconds}


def _train_pass(trainer: Any, rows: DeviceRows, plan: PassPlan, log: IO[str]) -> int:
    """Train the batches of `plan` on the device rows; the pass's last step."""
    for step, item in enumerate(plan.batches, start=plan.first_step):
        loss, grad = trainer.dense_step(item.batch, rows.pool(item), step=step)
        rows.update(item, grad, trainer.collection.lr_scale_at(step))
        trainer.count_step(log, item.epoch, step, item.batch.batch_size, loss)
    return plan.last_step


def _at_safe_point(trainer: Any, rows: DeviceRows, log: IO[str], plan: PassPlan) -> int:
    """Rows back in their tables; evict, evaluate and checkpoint as due at the pass's end.
    The rows it took off the device (those of tables that evict, when they do)."""
    due = trainer.due(plan.last_step)
    evicting = [t for t, table in enumerate(trainer.collection.tables) if table.config.eviction is not None]
    released = 0
    if due.evict and evicting:
        released = rows.release(evicting)  # an evicted row must not stay here, nor one with the step it had before
    else:
        rows.flush()
    if due.evict:
        trainer.collection.evict()
    last = plan.batches[-1]
    trainer.evaluate_and_save(log, plan.last_step, due, {"step": plan.last_step, "epoch": last.epoch,
                                                         "batch": last.index + 1})
    return released
