"""Online updates of a running server: its bundle's new deltas, applied in place.

`tidal export --delta` writes a delta into the bundle a server serves
(`tidal.serving.delta` draws the layout); the server applies it on
`POST /v2/repository/models/{name}/load` (Triton's model repository extension, so
`tritonclient`'s `load_model` triggers it), and every `serving.delta_poll_s` seconds
when that is set. When a full export of the same model replaced the bundle (or its
deltas were rewritten), the server loads the bundle again, beside what it serves, and
swaps it in. A delta that cannot be applied (damaged, out of order) is refused with
the reason, with those after it, and the deltas before it are applied; a bundle of
another model is refused and changes nothing: the server goes on serving what it
served. An update that fails while it changes the tables (memory ran
out) leaves them between two states: the server then refuses to score (503) until it
is restarted or a full export is loaded. A request is scored by one state: an update
waits for the requests under way to finish their chunks' sparse stages, and those that
come meanwhile wait for it (`Batcher.between_requests`).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from tidal.errors import CheckpointError, ConfigError, TidalError
from tidal.serving.bundle import MANIFEST, NO_DELTAS, Delta, moved_since, peek, readable_deltas
from tidal.serving.delta import DELTAS, Position, Source, delta_name
from tidal.serving.predictor import Predictor

__all__ = ["Update", "Updater", "log_update", "refusal"]


@dataclass(frozen=True, kw_only=True)
class Update:
    """What one update applied."""

    applied: int  # deltas
    delta: int  # the last delta now served (0: the base alone)
    rows_changed: int
    rows_removed: int
    seconds: float  # reading the deltas and applying them
    paused_s: float  # of which new batches waited
    reload_reason: str | None = None  # why the whole bundle was loaded again (then rows_changed: the rows loaded)
    refused: str | None = None  # why the delta after those applied cannot be (it and those after it were not)
    source: Source | None = None  # the checkpoint now served, when its manifest records it

    def summary(self) -> str:
        served = f"delta {self.delta}" + (f" of {self.source}" if self.source else "")
        if self.reload_reason:
            return (f"loaded the bundle again (it {self.reload_reason}), now serving {served}: "
                    f"{self.rows_changed:,d} rows, in {self.seconds * 1e3:.1f} ms (batches waited "
                    f"{self.paused_s * 1e3:.1f} ms of it)")
        if not self.applied:
            return f"no new delta (serving {served})"
        return (f"applied {self.applied} delta{'s' if self.applied > 1 else ''}, now serving {served}: "
                f"{self.rows_changed:,d} rows changed, {self.rows_removed:,d} removed, in {self.seconds * 1e3:.1f} ms "
                f"(batches waited {self.paused_s * 1e3:.1f} ms of it)")


class Updater:
    """Brings a predictor up to the newest deltas of its bundle: on demand (`update`),
    and every `poll_s` seconds from a thread of its own when `poll_s` is given (each
    update it applies is printed, and each new refusal). Each update changes the
    predictor inside `between()` (`Predictor.update`).

    `refused` counts refusals once each: an update that meets the refusal the one
    before it met (the same reason, and the bundle and its next delta as they were) is
    not counted again; another reason, another delta or that delta rewritten is."""

    def __init__(self, predictor: Predictor, bundle_path: Path, *, poll_s: float | None = None,
                 between: Callable[[], AbstractContextManager[object]] = nullcontext) -> None:
        self._predictor = predictor
        self._path = Path(bundle_path)
        self._between = between
        self._lock = threading.Lock()  # one update at a time: the poller's and a request's
        self.deltas_applied = 0
        self.reloads = 0  # of the whole bundle, after a full export replaced it
        self._refused_export: tuple[str | None, ConfigError] | None = None  # (seal, why) of a full export unfit here
        self.refused = 0  # distinct refusals (see the class docstring)
        self._last_refusal: tuple[str, tuple] | None = None  # (reason, what it met) of the last update, if refused
        self.updated_unix_s: float | None = None
        self._stop = threading.Event()
        self._poller = None
        if poll_s is not None:
            self._poller = threading.Thread(target=self._poll, args=(poll_s,), name="tidal-deltas", daemon=True)
            self._poller.start()

    @property
    def delta(self) -> int:
        position = self._predictor.position
        return position.sequence if position else 0

    def serving(self) -> str:
        """What the predictor serves, in words: the delta, or why its tables are torn."""
        return self._predictor.torn or f"still serving delta {self.delta}"

    def update(self) -> Update:
        """Apply the deltas written since the last one applied, or load the bundle again
        when a full export replaced it. A delta that cannot be applied stops the update
        there: those before it are applied, and `Update.refused` says why. When nothing
        can be, the exception says why (`refusal`) and nothing changed, unless the apply
        itself failed half way (`Predictor.torn`)."""
        outcome, _ = self._attempt()
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def _attempt(self) -> tuple[Update | Exception, bool]:
        """(the update, or the error that refused it whole; whether it met a new
        refusal): `update`'s work, its refusal counted unless the last update met it too."""
        with self._lock:
            try:
                update = self._update()
            except Exception as exc:  # noqa: BLE001 - given back to the caller
                return exc, self._count_refusal(refusal(exc))
            return update, self._count_refusal(update.refused)

    def _count_refusal(self, reason: str | None) -> bool:
        """Note the refusal an update met (`reason`; None when it met none), and count
        it in `refused` unless the update before met the same one. Whether it was new."""
        met = None if reason is None else (reason, self._refused_files())
        new = met is not None and met != self._last_refusal
        self._last_refusal = met
        if new:
            self.refused += 1
        return new

    def _refused_files(self) -> tuple:
        """The bundle's manifest and the delta after the one served (its folder and its
        manifest), as they stand: a refusal met again after one was rewritten is another."""
        delta = self._path / DELTAS / delta_name(self.delta + 1)
        return _stamp(self._path / MANIFEST), _stamp(delta), _stamp(delta / MANIFEST)

    def _update(self) -> Update:
        position = self._predictor.position
        start = time.perf_counter()
        moved = moved_since(self._path, position)
        if moved:
            return self._reload(moved, start)
        if position is None:
            raise CheckpointError(f"{self._path}: {NO_DELTAS}")
        self._predictor.check_whole()
        deltas, stopped, moved = self._deltas_after(position)
        if moved:
            return self._reload(moved, start)
        if stopped is not None:  # what to do, for a server that serves the deltas before
            stopped = type(stopped)(f"{stopped}: remove them or export them again, or export the bundle in full")
            if not deltas:
                raise stopped
        applied = self._predictor.update(deltas, self._between)
        if deltas:
            self.deltas_applied += len(deltas)
            self.updated_unix_s = time.time()
        return Update(applied=len(deltas), delta=self.delta, rows_changed=applied.rows_changed,
                      rows_removed=applied.rows_removed, seconds=time.perf_counter() - start, paused_s=applied.paused_s,
                      refused=None if stopped is None else refusal(stopped), source=self._predictor.source)

    def _deltas_after(self, position: Position) -> tuple[list[Delta], CheckpointError | None, str | None]:
        """The deltas that follow `position` and why those after them cannot be applied
        (`readable_deltas`), or what moved the bundle: a full export that landed while
        they were looked for, which then made the look fail."""
        try:
            deltas, stopped = readable_deltas(self._path, position, self._predictor.config)
        except (CheckpointError, OSError):
            if moved := moved_since(self._path, position):
                return [], None, moved
            raise
        moved = moved_since(self._path, position) if stopped is not None and not deltas else None
        return deltas, stopped, moved

    def _reload(self, moved: str, start: float) -> Update:
        """Load the full export that replaced the bundle. One this server cannot run
        (`ConfigError`: its backend's file or its batch sizes) is not loaded again at
        every poll, only once another export replaced it; a damaged file may be
        repaired, so that refusal is not kept."""
        seal = peek(self._path).seal
        position = self._predictor.position
        if position is not None and position.sequence and seal == position.base \
                and not (self._path / DELTAS / delta_name(position.sequence)).is_dir():
            raise CheckpointError(f"{self._path}: delta {delta_name(position.sequence)}, which this server serves, was "
                                  f"removed but not the base it builds on: loading the bundle would take the model "
                                  f"back to an earlier checkpoint; to drop deltas, export the bundle in full")
        if self._refused_export is not None and self._refused_export[0] == seal:
            raise ConfigError(str(self._refused_export[1]))
        try:
            applied = self._predictor.reload(self._path, self._between)
        except ConfigError as exc:
            self._refused_export = (seal, exc)
            raise
        self.reloads += 1
        self.updated_unix_s = time.time()
        return Update(applied=0, delta=self.delta, rows_changed=applied.rows_changed, rows_removed=0,
                      seconds=time.perf_counter() - start, paused_s=applied.paused_s, reload_reason=moved,
                      source=self._predictor.source)

    def _poll(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            outcome, new = self._attempt()  # the poller goes on after any error: it is reported
            update = outcome if isinstance(outcome, Update) else None
            reason = outcome.refused if isinstance(outcome, Update) else refusal(outcome)
            log_update(update, reason if new else None, self.delta)  # a refusal once, not every poll

    def close(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join()


def log_update(update: Update | None, refused: str | None, delta: int) -> None:
    """A server's log lines of an update: what it applied or loaded (stdout), and why
    the bundle was not updated past `delta` (stderr)."""
    if update is not None and (update.applied or update.reload_reason):
        print(f"tidal serve: {update.summary()}", flush=True)
    if refused:
        print(f"tidal serve: bundle not updated past delta {delta}: {refused}", file=sys.stderr, flush=True)


def _stamp(path: Path) -> tuple[int, int] | None:
    """Which file or folder is at `path` (inode, modification time), None when none is."""
    try:
        found = path.stat()
    except OSError:
        return None
    return found.st_ino, found.st_mtime_ns


def refusal(exc: Exception) -> str:
    """Why an update was refused, in words: the message of Tidal's and the system's
    errors (they name the file), the type too of anything else."""
    return str(exc) if isinstance(exc, (TidalError, OSError)) else f"{type(exc).__name__}: {exc}"
