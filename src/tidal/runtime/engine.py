"""The coordinator of heterogeneous training: gate, dispatch queue, barriers, faults.

The engine never touches a tensor. It hands batch ids to sparse workers (read ahead),
lets a batch be pooled when the mode allows it (`sync`: once every earlier batch's
sparse update landed; `async`: while fewer than `max_inflight` batches are between
pooling and update), puts the pooled batch's metadata (id, producer, rows, where its
slices are) on the bounded dispatch queue, hands it to the dense workers when they are
free, and routes each gradient back to the producer. The next batch's rows are found
(looked up, created: no values read) while it waits to be pooled, so in sync mode only
the update and the pooling stand between two dense steps. Checkpoints, evaluations and
worker-count changes happen at barriers: no lookup passes one until every earlier
update has landed.

A sparse worker that fails is replaced; its batches are read or looked up again, and
an update that fails is applied by the replacement (the lookup lives in the store), so
nothing is lost unless the same update fails three times. A dense worker that fails
stops the run.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tidal.config import MAX_SPARSE_WORKERS, is_whole_number
from tidal.errors import RunStoppedError, TidalError
from tidal.runtime.telemetry import Telemetry
from tidal.runtime.workers import check_loss

__all__ = ["Engine", "Ticket"]

_MAX_ATTEMPTS = 3
_DENSE_AHEAD = 2  # group steps handed to the dense workers at once: the next input waits ready
_LOOK_AHEAD = 1  # batches whose rows are found while they wait to be pooled


@dataclass(frozen=True, kw_only=True)
class Ticket:
    """What the dispatch queue carries: metadata only."""

    batch_id: int
    producer: int  # sparse worker slot
    rows: int
    location: list[Any]  # one handle per dense worker: its row slice, where it lies


@dataclass
class _Flight:
    """One batch between lookup and update."""

    slot: int
    worker: Any  # the handle the last call went to
    staleness: int  # earlier batches whose update it missed: in flight at its lookup
    slices: list[Any] = field(default_factory=list)  # handles of the row slices
    meta: dict | None = None  # what the forward said
    dense: list[Any] = field(default_factory=list)  # (meta, grad) handles per dense rank
    ranks_left: int = 0
    loss: np.ndarray | float = 0.0  # the slices' `step_losses`, summed
    nonfinite_rows: list[int] = field(default_factory=list)  # the batch's rows whose outputs are not numbers


class Engine:
    """Runs the steps of a `Trainer` through a backend's sparse and dense workers."""

    def __init__(self, trainer: Any, backend: Any, telemetry: Telemetry) -> None:
        self.trainer, self.backend, self.telemetry = trainer, backend, telemetry
        self.runtime = trainer.config.runtime
        self.sparse: dict[int, Any] = {}  # slot -> worker handle
        self.dense: list[Any] = []
        self.assigned: dict[int, int] = {}  # batch id -> slot reading it
        self.looked_up: dict[int, int] = {}  # batch id -> slot that found its rows; not pooled yet
        self.finding: set[int] = set()  # batch ids whose lookup (or forward, which looks up) may be running
        self.flights: dict[int, _Flight] = {}
        self.retry: list[int] = []  # batch ids to look up again
        self.pending: dict[Any, tuple[str, int]] = {}  # handle -> (kind, batch id)
        self.dispatch: deque[Ticket] = deque()
        self.failures: list[dict] = []
        self.attempts: dict[tuple[str, int], int] = {}  # (forward | backward, batch id) -> failures
        self.lost = {"batches": 0, "samples": 0}
        self.placement: dict[int, tuple[int, int]] = {}  # batch id -> (epoch, index)
        self.next_assign = self.next_forward = self.done = self.dense_running = 0
        self.end_id: int | None = None
        self.target_workers = self.runtime.sparse_workers + int(self.runtime.colocated_sparse_worker)
        self.worker_counts: list[tuple[int, int]] = []  # (step, sparse workers from then on)

    # ------------------------------------------------------------------ workers

    def resize(self, sparse_workers: int, asked_by: str | None = None) -> None:
        """Run `sparse_workers` sparse workers from now on (safe from any thread: the
        coordinator takes it up at its next turn). `asked_by`: the call asking for them
        (None: the run's `sparse_workers_at`)."""
        if not is_whole_number(sparse_workers) or not 1 <= sparse_workers <= MAX_SPARSE_WORKERS:
            raise TidalError(f"sparse workers must be a whole number from 1 to {MAX_SPARSE_WORKERS} (as "
                             f"runtime.sparse_workers), got {sparse_workers!r}")
        self.backend.check_workers(sparse_workers, asked_by)
        self.target_workers = sparse_workers

    def _apply_resize(self) -> None:
        if not self.worker_counts or self.worker_counts[-1][1] != self.target_workers:
            self.worker_counts.append((self.start_step + self.done, self.target_workers))
        while len(self.sparse) < self.target_workers:
            slot = max(self.sparse, default=-1) + 1
            self.sparse[slot] = self.backend.start_sparse(slot)
        for slot in sorted(self.sparse)[self.target_workers :]:
            if not any(f.slot == slot for f in self.flights.values()) and slot not in self.looked_up.values():
                self._retire(slot)

    def _retire(self, slot: int) -> None:
        """Stop the worker in `slot`; batches it was reading go to the others."""
        self._release_reads(slot)
        self.backend.stop(self.sparse.pop(slot))

    def _replace(self, slot: int, batch_id: int, stage: str, exc: BaseException) -> None:
        self.failures.append({"worker": slot, "batch": batch_id, "stage": stage, "error": repr(exc)})
        print(f"  sparse worker {slot} failed in {stage} of batch {batch_id}: {exc!r}; replacing it", flush=True)
        self._release_reads(slot)
        worker = self.sparse[slot]
        self.sparse[slot] = self.backend.start_sparse(slot)
        try:
            self.backend.stop(worker)
        except Exception:  # a dead actor cannot be stopped twice; the backend forgets it
            pass

    def _release_reads(self, slot: int) -> None:
        for waiting in (self.assigned, self.looked_up):
            for batch_id in [k for k, s in waiting.items() if s == slot]:
                del waiting[batch_id]
                self.retry.append(batch_id)

    # ------------------------------------------------------------------ the loop

    def run(self, start: dict[str, int], max_steps: int | None, on_done: Any, at_barrier: Any) -> tuple[int, bool]:
        """Train from position `start` (step, epoch, batch) until the data ends (True) or
        `max_steps` (False); the last step.

        `on_done(step, meta, losses)` is called for every batch whose update landed,
        `at_barrier(step, position)` when a barrier step is reached, `max_steps`
        included: the eviction, evaluation and checkpoint due at the step a run stops
        at happen before it stops, as in the reference trainer.
        """
        start_step = start["step"]
        self.start_step, self.max_steps = start_step, max_steps
        self.placement = {-1: (start["epoch"], start["batch"] - 1)}  # where the batch before id 0 was
        self.on_done, self.at_barrier = on_done, at_barrier
        passed = [s for s in self.runtime.sparse_workers_at if s <= start_step]  # a resumed run's schedule so far
        if passed:
            self.resize(self.runtime.sparse_workers_at[max(passed)])
        self.dense = self.backend.start_dense()
        self._apply_resize()
        self.backend.wait_ready([*self.sparse.values(), *self.dense])
        self.telemetry.restart()  # worker start-up is not training time
        self.trainer.progress.start = time.perf_counter()  # nor for the run's speed
        self.barrier = self._next_barrier(1)
        while True:
            self._apply_resize()
            self._assign_reads()
            self._issue_forwards()
            self._issue_dense()
            self._sample()
            if self._at_barrier():
                step = start_step + self.done
                if step in self.runtime.sparse_workers_at and not self._stop_here():
                    self.resize(self.runtime.sparse_workers_at[step])
                self._sample()
                self.at_barrier(step, self._position())  # at max_steps too: what is due there, as the reference does
                if self._stop_here():
                    return step, False
                self.telemetry.skip()  # a checkpoint or an evaluation is not training time
                self.barrier = self._next_barrier(self.done + 1)
                continue
            if self.end_id is not None and self.done >= self.end_id and not self.flights:
                return start_step + self.done, True
            if not self.pending:
                raise RuntimeError(f"engine stalled: nothing in flight, {self.done} batches done, "
                                   f"reading {sorted(self.assigned)[:8]}, barrier {self.barrier}, end {self.end_id}")
            for handle in self.backend.wait(list(self.pending), 0.5):
                self._complete(handle)

    def _sample(self) -> None:
        self.telemetry.sample({"sparse": len(self.sparse), "dense": len(self.dense)},
                              {"dispatch": len(self.dispatch), "reading": len(self.assigned),
                               "in_flight": len(self.flights)})

    # ------------------------------------------------------------------ barriers

    def _next_barrier(self, from_done: int) -> int | None:
        """The smallest number of done batches >= `from_done` where something is due."""
        training = self.trainer.config.training
        steps = [self.max_steps] if self.max_steps is not None else []
        evict_every = training.evict_every if self.trainer.collection.evicts else None
        for every in (training.checkpoint_every, training.eval_every if self.trainer.config.data.eval else None,
                      evict_every):
            if every:
                step = self.start_step + from_done
                steps.append(step + (-step) % every)
        steps += [s for s in self.runtime.sparse_workers_at if s >= self.start_step + from_done]
        return min(steps) - self.start_step if steps else None

    def _at_barrier(self) -> bool:
        return self.barrier is not None and self.done >= self.barrier and not self.flights

    def _stop_here(self) -> bool:
        return self.max_steps is not None and self.start_step + self.done >= self.max_steps

    def _position(self) -> dict[str, int]:
        """Where a run resumed from this step goes on. Batches lost before they were placed
        (ids after the last one placed) count as trained: it goes on after them, counted
        from the last batch placed (past the end of its epoch, the reader goes on into the
        next one by as many batches)."""
        last = max(k for k in self.placement if k < self.done)
        epoch, index = self.placement[last]
        return {"step": self.start_step + self.done, "epoch": epoch, "batch": index + self.done - last}

    # ------------------------------------------------------------------ issuing work

    def _assign_reads(self) -> None:
        live = sorted(self.sparse)[: self.target_workers]  # not the ones about to retire
        horizon = self.next_forward + self.runtime.read_ahead * len(live)
        for batch_id in sorted(self.retry):
            self._assign(batch_id, live)
        self.retry.clear()
        while self.next_assign < horizon and (self.end_id is None or self.next_assign < self.end_id):
            self._assign(self.next_assign, live)
            self.next_assign += 1

    def _assign(self, batch_id: int, live: list[int]) -> None:
        slot = live[batch_id % len(live)]
        self.assigned[batch_id] = slot
        self.backend.call(self.sparse[slot], "prepare", batch_id)

    def _may_look_up(self, batch_id: int) -> bool:
        if self.barrier is not None and batch_id >= self.barrier:
            return False
        return self.end_id is None or batch_id < self.end_id

    def _may_pool(self) -> bool:
        if self.runtime.mode == "sync":
            return not self.flights
        return len(self.flights) < self.runtime.max_inflight

    def _issue_forwards(self) -> None:
        while self.looked_up or self.assigned:
            batch_id = min([*self.looked_up, *self.assigned])
            if not self._may_look_up(batch_id):
                return
            if not self._may_pool():
                self._look_ahead()
                return
            if batch_id in self.looked_up:
                slot = self.looked_up.pop(batch_id)
            else:
                slot = self.assigned.pop(batch_id)
                self.finding.add(batch_id)
            self.next_forward = max(self.next_forward, batch_id + 1)
            worker = self.sparse[slot]
            handles = self.backend.call(worker, "forward", batch_id, returns=1 + len(self.dense))
            staleness = sum(k < batch_id for k in self.flights)
            self.flights[batch_id] = _Flight(slot=slot, worker=worker, staleness=staleness, slices=handles[1:])
            self.pending[handles[0]] = ("forward", batch_id)

    def _look_ahead(self) -> None:
        """Have the rows of the next waiting batches found while they wait to be pooled.

        In sync mode a lookup starts only once every earlier batch's has ended: lookups
        create rows and count sightings for admission, so they must come in batch order
        for the tables to end as the reference trainer's do.
        """
        while self.assigned and len(self.looked_up) < _LOOK_AHEAD:
            batch_id = min(self.assigned)
            if not self._may_look_up(batch_id) or (self.runtime.mode == "sync" and self.finding):
                return
            slot = self.looked_up[batch_id] = self.assigned.pop(batch_id)
            self.finding.add(batch_id)
            self.pending[self.backend.call(self.sparse[slot], "look_up", batch_id)[0]] = ("look_up", batch_id)

    def _issue_dense(self) -> None:
        while self.dispatch and self.dense_running < _DENSE_AHEAD:
            ticket = self.dispatch.popleft()
            flight = self.flights[ticket.batch_id]
            step = self.start_step + ticket.batch_id + 1  # the run's step of the batch, as its lookup's
            flight.dense = [self.backend.call(worker, "step", part, step, returns=2)
                            for worker, part in zip(self.dense, ticket.location)]
            for meta, _ in flight.dense:
                self.pending[meta] = ("dense", ticket.batch_id)
            flight.ranks_left = len(self.dense)
            self.dense_running += 1

    # ------------------------------------------------------------------ completions

    def _complete(self, handle: Any) -> None:
        kind, batch_id = self.pending.pop(handle)
        if kind in ("look_up", "forward"):  # its lookup has ended, whether it failed or not
            self.finding.discard(batch_id)
        try:
            result = self.backend.get(handle)
        except TidalError:
            raise
        except Exception as exc:
            self._failed(kind, batch_id, exc)
            return
        getattr(self, f"_{kind}_done")(batch_id, result)

    def _failed(self, kind: str, batch_id: int, exc: Exception) -> None:
        if kind == "look_up":  # a worker keeps its own errors for forward: its actor died, and forward will fail too
            return
        flight = self.flights[batch_id]
        if kind == "dense":
            raise RunStoppedError(f"dense worker failed on batch {batch_id} (step {self.start_step + batch_id + 1}): "
                                  f"{exc!r}") from exc
        if self.sparse.get(flight.slot) is flight.worker:  # its own failure: else the worker went for another's
            self._replace(flight.slot, batch_id, kind, exc)
            self.attempts[kind, batch_id] = self.attempts.get((kind, batch_id), 0) + 1
        if self.attempts.get((kind, batch_id), 0) >= _MAX_ATTEMPTS:
            self._lose(batch_id, flight, f"{kind} failed {_MAX_ATTEMPTS} times: {exc!r}")
        elif kind == "forward":
            del self.flights[batch_id]
            self.retry.append(batch_id)
        else:
            self._send_backward(batch_id, flight)

    def _lose(self, batch_id: int, flight: _Flight, reason: str) -> None:
        """Give batch `batch_id` up (it failed every time it was tried), and say so."""
        del self.flights[batch_id]
        self.backend.forget(batch_id)
        rows = flight.meta["rows"] if flight.meta else self.trainer.config.data.batch_size  # never pooled: a full batch
        self.lost["batches"] += 1
        self.lost["samples"] += rows
        self.failures.append({"batch": batch_id, "lost_samples": rows, "error": reason})
        self.done += 1

    def _forward_done(self, batch_id: int, meta: dict) -> None:
        flight = self.flights[batch_id]
        if meta["end"]:
            del self.flights[batch_id]
            self.end_id = batch_id if self.end_id is None else min(self.end_id, batch_id)
            self.assigned = {k: s for k, s in self.assigned.items() if k < self.end_id}
            self.looked_up = {k: s for k, s in self.looked_up.items() if k < self.end_id}
            return
        self.telemetry.add("sparse", meta["timings"])
        self.placement[batch_id] = (meta["epoch"], meta["index"])
        if len(self.placement) > 4 * self.runtime.max_inflight + 16:  # keep what _position may need
            latest = max(k for k in self.placement if k < self.done)
            self.placement = {k: v for k, v in self.placement.items() if k >= latest}
        flight.meta = meta
        self.dispatch.append(Ticket(batch_id=batch_id, producer=flight.slot, rows=meta["rows"], location=flight.slices))

    def _look_up_done(self, batch_id: int, result: None) -> None:
        """Nothing to do: the rows wait in the store, the timings come with the forward."""

    def _dense_done(self, batch_id: int, meta: dict) -> None:
        flight = self.flights[batch_id]
        self.telemetry.add("dense", meta["timings"])
        flight.loss += meta["loss"]
        flight.nonfinite_rows += meta["nonfinite_rows"]
        flight.ranks_left -= 1
        if flight.ranks_left:
            return
        self.dense_running -= 1
        check_loss(flight.loss[0], self.start_step + batch_id + 1, sorted(flight.nonfinite_rows),  # type: ignore[index]
                   flight.meta["rows"])  # type: ignore[index]
        self._send_backward(batch_id, flight)

    def _send_backward(self, batch_id: int, flight: _Flight) -> None:
        grads = [grad for _, grad in flight.dense]
        flight.worker = self.sparse[flight.slot]
        handle = self.backend.call(flight.worker, "backward", batch_id, *grads)[0]
        self.pending[handle] = ("backward", batch_id)

    def _backward_done(self, batch_id: int, timings: dict) -> None:
        flight = self.flights.pop(batch_id)
        self.telemetry.add("sparse", timings)
        self.telemetry.note_staleness(flight.staleness)
        self.telemetry.samples += flight.meta["rows"]  # type: ignore[index]
        self.done += 1
        self.on_done(self.start_step + self.done, flight.meta, flight.loss)

    def report(self) -> dict:
        return {"sparse_workers": self.worker_counts,
                "sparse_worker_failures": [f for f in self.failures if "worker" in f],
                "lost_batches": self.lost["batches"], "lost_samples": self.lost["samples"],
                "lost_reasons": [f["error"] for f in self.failures if "lost_samples" in f]}
