"""Heterogeneous training of a `Trainer`'s run: its config's `runtime` section chooses
the backend and the numbers of sparse and dense workers (see `tidal.runtime.engine`)."""

from __future__ import annotations

import time
from typing import IO, Any

from tidal.errors import ConfigError
from tidal.runtime import checkpoint
from tidal.runtime.engine import Engine
from tidal.runtime.source import MemorySpec, ReaderSpec
from tidal.runtime.telemetry import Telemetry

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
          spec: ReaderSpec | MemorySpec | None = None) -> tuple[int, int, bool]:
    """Train from `position` to the end (or `max_steps`): (last step, rows trained, finished).

    The batches are the config's training files, or those of `spec`. The telemetry and
    fault report land in `trainer.runtime_report` and in ``<run_dir>/telemetry.json``;
    every worker is stopped on the way out, error or not.
    """
    config = trainer.config
    if spec is None:
        spec = trainer.reader_spec(config.data.train, epochs=config.training.epochs,
                                   start_epoch=position["epoch"], start_batch=position["batch"])
    telemetry = Telemetry(trainer.run_dir / "telemetry.json", config.runtime.telemetry_every_s)
    backend = make_backend(trainer, spec, position["step"])
    engine = trainer.engine = Engine(trainer, backend, telemetry)
    progress = _Progress(trainer, log)
    try:
        step, finished = engine.run(position, max_steps, progress.done,
                                    lambda step, at: _barrier(trainer, backend, log, step, at))
        backend.pull_state()
    finally:
        trainer.engine = None
        backend.shutdown()
        trainer.runtime_report = telemetry.finish(engine.report())
    return step, progress.rows, finished


class _Progress:
    """Counts rows and bad rows of finished batches, and logs every `log_every` steps."""

    def __init__(self, trainer: Any, log: IO[str]) -> None:
        self.trainer, self.log = trainer, log
        self.rows, self.losses, self.start = 0, [], time.perf_counter()

    def done(self, step: int, meta: dict, loss: float) -> None:
        if meta["epoch"] == 0:  # later epochs read the same rows again
            self.trainer.bad_rows.extend(meta["bad_rows"], meta["bad_examples"])
        self.rows += meta["rows"]
        self.losses.append(loss)
        if step % self.trainer.config.training.log_every == 0:
            self.trainer._log(self.log, meta["epoch"], step, self.rows, self.start, self.losses)
            self.losses = []


def _barrier(trainer: Any, backend: Any, log: IO[str], step: int, position: dict[str, int]) -> None:
    """Evict, evaluate and checkpoint when due (every update has landed, nothing is in flight)."""
    training, data = trainer.config.training, trainer.config.data
    if trainer.collection.evicts and step % training.evict_every == 0:
        backend.evict()
    backend.pull_state()
    if training.eval_every and data.eval and step % training.eval_every == 0:
        trainer._log_eval(log, step)
    if training.checkpoint_every and step % training.checkpoint_every == 0:
        checkpoint.save(trainer, position)
