"""Heterogeneous training of a `Trainer`'s run: its config's `runtime` section chooses
the backend and the numbers of sparse and dense workers (see `tidal.runtime.engine`)."""

from __future__ import annotations

import time
from typing import IO, Any

import numpy as np

from tidal.errors import ConfigError
from tidal.runtime.engine import Engine
from tidal.runtime.source import MemorySpec, ReaderSpec
from tidal.runtime.telemetry import TELEMETRY_FILE, Telemetry

__all__ = ["make_backend", "train"]


def make_backend(trainer: Any, spec: ReaderSpec | MemorySpec, first_step: int = 0) -> Any:
    """The backend the run's config names, placing workers for `trainer` reading `spec`
    from the run's step `first_step` on."""
    if trainer.config.runtime.backend == "ray":
        try:
            from tidal.runtime.ray_backend import RayBackend
        except ImportError as exc:
            raise ConfigError(f"runtime.backend is 'ray', but Ray cannot be imported ({exc}); "
                              "install it with: pip install 'tidal[ray]'") from None

        return RayBackend(trainer, spec, first_step)
    from tidal.runtime.local import LocalBackend

    return LocalBackend(trainer, spec, first_step)


def train(trainer: Any, log: IO[str], position: dict[str, int], max_steps: int | None,
          spec: ReaderSpec | MemorySpec | None = None) -> tuple[int, bool]:
    """Train from `position` to the end (or `max_steps`): (last step, finished); the
    rows and losses go to `trainer.progress`.

    The batches are the config's training files, or those of `spec`. The telemetry and
    fault report land in `trainer.runtime_report` and in ``<run_dir>/telemetry.json``;
    every worker is stopped on the way out, error or not.
    """
    config = trainer.config
    if spec is None:
        spec = trainer.reader_spec(config.data.train, epochs=config.training.epochs, start_epoch=position["epoch"],
                                   start_batch=position["batch"], sizes=trainer.data_sizes)
    telemetry = Telemetry(trainer.run_dir / TELEMETRY_FILE, config.runtime.telemetry_every_s)
    backend = make_backend(trainer, spec, position["step"])
    engine = trainer.engine = Engine(trainer, backend, telemetry)
    try:
        step, finished = engine.run(position, max_steps, lambda *done: _done(trainer, log, *done),
                                    lambda step, at: _barrier(trainer, backend, log, step, at))
        trainer.progress.stopped = time.perf_counter()  # stopping the workers (Ray's too) is not training time
        backend.pull_state()
    finally:
        trainer.engine = None
        try:
            backend.shutdown()  # a Ctrl-C while it stops Ray comes after it
        finally:
            trainer.runtime_report = telemetry.finish(engine.report())
    return step, finished


def _done(trainer: Any, log: IO[str], step: int, meta: dict, losses: np.ndarray) -> None:
    """Count a finished batch's rows, bad rows and losses, and log every `log_every` steps."""
    if meta["epoch"] == 0:  # later epochs read the same rows again
        trainer.bad_rows.extend(meta["bad_rows"], meta["bad_examples"])
    trainer.count_step(log, meta["epoch"], step, meta["rows"], losses)


def _barrier(trainer: Any, backend: Any, log: IO[str], step: int, position: dict[str, int]) -> None:
    """Evict, evaluate and checkpoint when due (every update has landed, nothing is in flight)."""
    due = trainer.due(step)
    if due.evict:
        backend.evict()
    backend.pull_state()
    trainer.evaluate_and_save(log, step, due, position)
