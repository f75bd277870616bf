"""The `local` backend: every worker a thread of this process, the tables shared.

Each worker is served by one thread that runs its calls one at a time, in order (the
same contract as a Ray actor); calls return `concurrent.futures.Future`s, and a future
passed as an argument is waited for before the call runs.
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import queue
import threading
from typing import Any

import torch

from tidal.runtime.source import BatchSource
from tidal.runtime.workers import (DenseWorker, EmbeddingShard, SparseWorker, ThreadAllReduce, dense_device,
                                   transfer_dtype)

__all__ = ["LocalBackend"]


class _ThreadActor:
    """One object served by one thread."""

    def __init__(self, target: Any, name: str) -> None:
        self.target = target
        self._calls: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def call(self, method: str, args: tuple, returns: int) -> list[cf.Future]:
        done: cf.Future = cf.Future()
        self._calls.put((done, method, args))
        if returns == 1:
            return [done]
        parts = [cf.Future() for _ in range(returns)]
        done.add_done_callback(lambda f: _split(f, parts))
        return parts

    def _serve(self) -> None:
        while (job := self._calls.get()) is not None:
            done, method, args = job
            try:
                args = tuple(a.result() if isinstance(a, cf.Future) else a for a in args)
                done.set_result(getattr(self.target, method)(*args))
            except BaseException as exc:  # the caller sees it through the future
                done.set_exception(exc)

    def close(self) -> None:
        """Finish the call running (a target's `close` unblocks one that waits), then stop."""
        self._calls.put(None)
        if hasattr(self.target, "close"):
            self.target.close()
        self._thread.join()


def _split(done: cf.Future, parts: list[cf.Future]) -> None:
    if done.exception() is not None:
        for part in parts:
            part.set_exception(done.exception())
        return
    for part, value in zip(parts, done.result()):
        part.set_result(value)


class LocalBackend:
    """Threads in one process: one shared source, one shared store, M dense replicas."""

    def __init__(self, trainer: Any, spec: Any, first_step: int = 0) -> None:
        self.trainer, self.runtime = trainer, trainer.config.runtime
        self.source = BatchSource(spec, shared=True)
        self.store = EmbeddingShard(trainer.collection, nice=self.runtime.sparse_nice, first_step=first_step)
        self._all_reduce = ThreadAllReduce(self.runtime.dense_workers) if self.runtime.dense_workers > 1 else None
        self._actors: list[_ThreadActor] = []
        self._dense: list[_ThreadActor] = []
        self._torch_threads = torch.get_num_threads()
        if self.runtime.dense_threads:
            torch.set_num_threads(self.runtime.dense_threads)

    def start_sparse(self, index: int) -> _ThreadActor:
        worker = SparseWorker(index, source=self.source, extractor=self.trainer.extractor, store=self.store,
                              dense_workers=self.runtime.dense_workers,
                              transfer_dtype=transfer_dtype(self.runtime, self.trainer.config.training.precision),
                              nice=self.runtime.sparse_nice)
        return self._track(_ThreadActor(worker, f"tidal-sparse-{index}"))

    def start_dense(self) -> list[_ThreadActor]:
        """M dense workers. Rank 0 trains the trainer's own model and optimizer when it
        runs on the trainer's device; otherwise every rank trains a copy, and
        `pull_state` brings rank 0's back."""
        trainer = self.trainer
        optimizer_state = trainer.optimizer.state_dict() if trainer.optimizer.state else None
        self._dense = []
        for rank in range(self.runtime.dense_workers):
            shared = rank == 0 and dense_device(self.runtime.device, rank) == trainer.device
            model = trainer.model if shared else copy.deepcopy(trainer.model)
            worker = DenseWorker(rank, model=model, training=trainer.config.training,
                                 optimizer_state=copy.deepcopy(optimizer_state),  # loading it shares its tensors
                                 loss_weights=trainer.loss_weights, all_reduce=self._all_reduce,
                                 loss_scale=self.runtime.loss_scale, device=self.runtime.device,
                                 precision=trainer.config.training.precision)
            if shared:
                trainer.optimizer = worker.optimizer
            self._dense.append(self._track(_ThreadActor(worker, f"tidal-dense-{rank}")))
        return self._dense

    def _track(self, actor: _ThreadActor) -> _ThreadActor:
        self._actors.append(actor)
        return actor

    def call(self, actor: _ThreadActor, method: str, *args: Any, returns: int = 1) -> list[cf.Future]:
        return actor.call(method, args, returns)

    @staticmethod
    def wait_ready(actors: list[_ThreadActor]) -> None:
        """Threads are ready as soon as they start."""

    @staticmethod
    def wait(handles: list[cf.Future], timeout_s: float) -> list[cf.Future]:
        done, _ = cf.wait(handles, timeout=timeout_s, return_when=cf.FIRST_COMPLETED)
        return list(done)

    @staticmethod
    def get(handle: cf.Future) -> Any:
        return handle.result()

    def forget(self, batch_id: int) -> None:
        self.store.drop(batch_id)

    def check_workers(self, sparse_workers: int, asked_by: str | None = None) -> None:
        """Threads: any number of sparse workers can start."""

    def stop(self, actor: _ThreadActor) -> None:
        actor.close()
        self._actors.remove(actor)

    def evict(self) -> None:
        """Apply the tables' eviction (at a barrier: nothing in flight)."""
        self.store.evict()

    def pull_state(self) -> None:
        """Bring the trained dense state to the trainer (the tables are shared)."""
        rank0 = self._dense[0].target if self._dense else None
        if rank0 is not None and rank0.model is not self.trainer.model:
            state = rank0.state()
            self.trainer.model.load_state_dict(state["model"])
            self.trainer.optimizer.load_state_dict(state["optimizer"])

    def shutdown(self) -> None:
        """Join every worker thread (after a failure too: waiting ranks are freed)."""
        if self._all_reduce is not None:
            self._all_reduce.abort()
        for actor in list(self._actors):
            self.stop(actor)
        torch.set_num_threads(self._torch_threads)
