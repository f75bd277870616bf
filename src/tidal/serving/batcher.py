"""Auto-batching and request splitting between the server and the predictor.

Requests arrive as pieces (`Predictor` pieces: a request, or one chunk of a big one).
A collector thread merges waiting pieces into batches of at most `max_batch_rows`;
the sparse stage of each batch runs on a pool of `sparse_threads` CPU threads and its
dense stage on one device thread (on a CPU-only machine, in the sparse thread that
pooled the batch: a hand-off would only add a wait for the GIL)::

    submit ─► waiting pieces ─► collector ─► sparse pool (CPU threads) ─► dense thread ─► futures
              (bounded: rows)   merges up to   extract, look up, pool       padded to a bucket
                                max_batch_rows

The collector never starts more batches than there are sparse threads, so pieces
wait in the bounded queue (beyond `max_queue_rows`, `submit` raises `Overloaded`).
A batch starts when the pipeline is idle, or beside a running one when it holds at
least half of `chunk_rows` (enough work to gain from a second thread; small batches
would only fight over the GIL, so they wait and grow). When requests arrive faster
than `max_delay_ms` apart, a batch lingers up to that long after its oldest piece
came, to fill, and a small one (under half of `chunk_rows`) up to that long after it
could start: most of a small batch's cost is per batch, not per row (measured: one
row costs the sparse stage 1.35 ms, 16 rows 1.8 ms). It lingers only while fewer
requests are in the server (waiting, or in a batch's sparse stage) than a request
finds there with itself when it comes, on a running mean: clients that wait for each
answer before they send the next are all in when that many are, and then no other
request could come to join. A lone request on a quiet server starts at once, and so
does the next request of a lone client that waits for each answer. With `merge=False`
every request is a batch of its own (the unbatched baseline). A piece whose sparse stage
fails (a column of the wrong type) fails alone: the batch's other pieces are scored
without it. A batch whose dense stage fails fails every piece in it; `close()` fails
whatever still waits, so no caller hangs; `cancel()` takes the waiting chunks of a
request given up out of the queue.

An online update changes the tables and the program between two batches. So that no
request has some chunks scored before it and others after, the update runs inside
`between_requests()`: the requests under way (a chunk taken) finish their chunks' sparse
stages, while requests not yet started wait, and start after the update.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tidal.config import is_finite_number, is_whole_number, require
from tidal.errors import BatchError, ConfigError, TidalError
from tidal.serving.predictor import Piece, Predictor, SparseOutput

__all__ = ["BatchRecord", "Batcher", "Overloaded", "ShuttingDown", "split_rows"]


_GAP_WEIGHT = 0.1  # of the newest request in the running means of the gaps between requests and of the
# requests in the server when one comes


class Overloaded(TidalError):
    """More rows wait than the batcher's bound: the caller should retry later."""


class ShuttingDown(TidalError):
    """The batcher is closed (the server is stopping): the request did not run."""


def split_rows(rows: int, chunk_rows: int) -> list[tuple[int, int]]:
    """[start, end) chunks of about equal size, each at most `chunk_rows`.

    With ``chunk_rows=256``: 100 rows stay whole, 600 become 200 + 200 + 200.
    """
    if not is_whole_number(rows) or rows < 0 or not is_whole_number(chunk_rows) or chunk_rows < 1:
        raise ConfigError(f"split_rows: rows must be a whole number >= 0 and chunk_rows one >= 1, got {rows!r} and "
                          f"{chunk_rows!r}")
    chunks = max(1, math.ceil(rows / chunk_rows))
    bounds = np.linspace(0, rows, chunks + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


@dataclass
class _Waiting:
    piece: Piece
    future: Future
    queued_s: float
    request: int  # the request it is a chunk of: chunks of one request go to batches of their own


@dataclass(frozen=True, kw_only=True)
class BatchRecord:
    """What one batch did, for metrics: rows, pieces, queue and compute seconds
    (`queue_s` the oldest piece's wait, `waited_s` all pieces' waits summed)."""

    rows: int
    pieces: int
    queue_s: float
    waited_s: float
    sparse_s: float
    dense_s: float


def _joined(stages: list[SparseOutput]) -> SparseOutput | None:
    """One stage of the rows of `stages` in order (each a piece's, of one state of the bundle)."""
    if not stages:
        return None
    return SparseOutput(pooled=torch.cat([s.pooled for s in stages]), dense=torch.cat([s.dense for s in stages]),
                        program=stages[0].program)


def _check_settings(*, max_delay_ms: Any, **counts: Any) -> None:
    """A `ConfigError` naming the first setting that is not what `Batcher` takes."""
    for name, value in counts.items():
        if not is_whole_number(value) or value < 1:
            raise ConfigError(f"Batcher: {name} must be a whole number >= 1, got {value!r}")
    if not is_finite_number(max_delay_ms) or max_delay_ms < 0:
        raise ConfigError(f"Batcher: max_delay_ms must be a finite number >= 0, got {max_delay_ms!r}")


class Batcher:
    """Merges and splits pieces into batches and runs them through the predictor.

    The settings are `ServingConfig`'s of the same names: rows a batch holds at most,
    how long a batch may wait for more, the rows a request is split into, the threads of
    the sparse stage, and the rows that may wait before requests are refused."""

    def __init__(self, predictor: Predictor, *, max_batch_rows: int, max_delay_ms: float, chunk_rows: int,
                 sparse_threads: int, max_queue_rows: int, merge: bool = True,
                 on_batch: Callable[[BatchRecord], None] | None = None) -> None:
        _check_settings(max_batch_rows=max_batch_rows, chunk_rows=chunk_rows, sparse_threads=sparse_threads,
                        max_queue_rows=max_queue_rows, max_delay_ms=max_delay_ms)
        require(predictor, Predictor, "Batcher: predictor")
        if not isinstance(merge, bool):
            raise ConfigError(f"Batcher: merge must be True or False, got {merge!r}")
        if on_batch is not None and not callable(on_batch):
            raise ConfigError(f"Batcher: on_batch must be a function taking a BatchRecord, or None; got "
                              f"{type(on_batch).__name__}")
        self.predictor = predictor
        self.max_batch_rows, self.chunk_rows, self.merge = max_batch_rows, chunk_rows, merge
        self.max_delay_s = max_delay_ms / 1000.0
        self.max_queue_rows = max_queue_rows
        self._on_batch = on_batch  # called with a BatchRecord after each batch
        self._waiting: OrderedDict[int, deque[_Waiting]] = OrderedDict()  # request -> its pieces, oldest first
        self._request_of: dict[Future, int] = {}  # the request of each waiting piece's future
        self._waiting_rows = 0
        self._requests = 0  # submitted so far
        self._in_flight = 0
        self._under_way: dict[int, int] = {}  # request with a chunk taken -> its chunks whose sparse stage is to end
        self._holds = 0  # `between_requests` callers: requests not under way wait
        self._last_arrival_s = time.perf_counter()
        self._arrival_gap_s = 1.0  # running mean of the seconds between requests
        self._concurrency = 1.0  # running mean of the requests in the server when one comes, itself included
        self._depth = sparse_threads
        self._cond = threading.Condition()
        self._closed = False
        self._sparse = ThreadPoolExecutor(sparse_threads, thread_name_prefix="tidal-sparse")
        on_device = predictor.device.type != "cpu"
        self._dense = ThreadPoolExecutor(1, thread_name_prefix="tidal-dense") if on_device else None
        self._collector = threading.Thread(target=self._collect_forever, name="tidal-collector", daemon=True)
        self._collector.start()

    def submit(self, piece: Piece) -> list[Future]:
        """Queue one request (split into chunks when merging); one future per chunk,
        each giving probabilities `[rows, T]`, in the request's row order."""
        if not isinstance(piece, Piece):
            raise BatchError(f"submit takes a Piece (Predictor.piece makes one), got {type(piece).__name__}")
        pieces = self._chunks(piece) if self.merge else [piece]
        with self._cond:
            if self._closed:
                raise ShuttingDown("the server is shutting down; this request did not run")
            if self._waiting_rows and self._waiting_rows + piece.rows > self.max_queue_rows:
                raise Overloaded(f"{self._waiting_rows} rows are waiting and this request brings {piece.rows} "
                                 f"(bound {self.max_queue_rows}); retry later")
            now = time.perf_counter()
            gap = min(now - self._last_arrival_s, 2 * self.max_delay_s)  # a quiet spell: lingering soon again
            self._arrival_gap_s += _GAP_WEIGHT * (gap - self._arrival_gap_s)
            self._concurrency += _GAP_WEIGHT * (self._in_server() + 1 - self._concurrency)
            self._last_arrival_s = now
            self._requests += 1
            waiting = [_Waiting(p, Future(), now, self._requests) for p in pieces]
            self._waiting[self._requests] = deque(waiting)
            self._request_of.update((w.future, self._requests) for w in waiting)
            self._waiting_rows += piece.rows
            self._cond.notify_all()
        return [w.future for w in waiting]

    def cancel(self, futures: list[Future]) -> None:
        """Give up on a request's chunks: those still waiting leave the queue (their rows
        stop counting toward `max_queue_rows`); those a batch took run, unread."""
        mine = set(futures)
        with self._cond:
            for request in {self._request_of.pop(f) for f in futures if f in self._request_of}:
                pieces = self._waiting[request]
                left = deque(w for w in pieces if w.future not in mine)
                self._waiting_rows -= sum(w.piece.rows for w in pieces if w.future in mine)
                self._chunks_ended(request, len(pieces) - len(left))
                self._waiting[request] = left
                if not left:
                    del self._waiting[request]
        for future in futures:
            future.cancel()

    def _chunks(self, piece: Piece) -> list[Piece]:
        if piece.rows <= self.chunk_rows:
            return [piece]
        return [Piece(items=piece.items.slice(a, b - a), user=piece.user, state=piece.state)
                for a, b in split_rows(piece.rows, self.chunk_rows)]

    @property
    def closed(self) -> bool:
        """Whether `close` was called (the server is stopping)."""
        return self._closed

    def close(self) -> None:
        """Stop taking pieces, fail those still waiting, and join the threads."""
        with self._cond:
            self._closed = True
            left = [w for pieces in self._waiting.values() for w in pieces]
            self._waiting.clear()
            self._request_of.clear()
            self._under_way.clear()
            self._cond.notify_all()
        for w in left:
            if w.future.set_running_or_notify_cancel():  # a caller that gave up needs no answer
                w.future.set_exception(ShuttingDown("the server shut down before this request ran"))
        self._collector.join()
        self._sparse.shutdown(wait=True)
        if self._dense is not None:
            self._dense.shutdown(wait=True)

    @contextmanager
    def between_requests(self) -> Iterator[None]:
        """A block that no request spans: it starts when every request under way (a
        chunk taken by a batch) has finished its chunks' sparse stages, and requests not
        yet under way wait until it ends. An online update runs in it, so that each
        request is scored by one state of the tables and program."""
        with self._cond:
            self._holds += 1
        try:
            with self._cond:
                self._cond.wait_for(lambda: not self._under_way or self._closed)
            yield
        finally:
            with self._cond:
                self._holds -= 1
                self._cond.notify_all()

    def _chunks_ended(self, request: int, count: int) -> None:
        """`count` chunks of `request` have run their sparse stage or will not run
        (called holding `_cond`)."""
        if request in self._under_way:
            self._under_way[request] -= count
            if self._under_way[request] <= 0:
                del self._under_way[request]
                self._cond.notify_all()

    # ------------------------------------------------------------------ collector

    def _collect_forever(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch:
                self._sparse.submit(self._run_sparse, batch)
            else:  # every caller of the batch gave up
                self._finished()

    def _next_batch(self) -> list[_Waiting] | None:
        """The next batch: see the module docstring for when it starts."""
        with self._cond:
            while not self._closed and not self._may_start():
                self._cond.wait()
            deadline = self._linger_deadline()
            while self.merge and not self._closed and self._waiting_rows < self.max_batch_rows and self._busy():
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                self._cond.wait(left)
            if self._closed:
                return None
            batch = self._take()
            self._in_flight += 1
            return batch

    def _busy(self) -> bool:
        """Whether a batch lingers to fill: requests come closer than `max_delay_ms` apart,
        and fewer are in the server than usually are when one comes."""
        return self._arrival_gap_s < self.max_delay_s and self._in_server() < self._concurrency

    def _in_server(self) -> int:
        """The requests waiting or under way (a chunk in a batch's sparse stage); a big
        request with chunks in both counts twice. In constant time: it runs per request."""
        return len(self._waiting) + len(self._under_way)

    def _linger_deadline(self) -> float:
        """Until when a batch that may start waits for more rows, while requests come
        closer than `max_delay_ms` apart: that long after its oldest piece came, and a
        small batch (under half of `chunk_rows`) at least that long from now, for it
        would pay the sparse stage's cost per batch (most of it, at a few rows) for
        few rows."""
        if not self._waiting:
            return 0.0
        deadline = next(iter(self._waiting.values()))[0].queued_s + self.max_delay_s
        if self._waiting_rows < self.chunk_rows // 2:
            deadline = max(deadline, time.perf_counter() + self.max_delay_s)
        return deadline

    def _may_start(self) -> bool:
        """Start now: the pipeline is idle, or a free thread gets a batch big enough to
        gain from running beside another (small ones would only fight for the GIL)."""
        if not any(self._may_take(request) for request in self._waiting):
            return False
        if self._in_flight == 0 or not self.merge:
            return self._in_flight < self._depth
        return self._in_flight < self._depth and self._waiting_rows >= self.chunk_rows // 2

    def _take(self) -> list[_Waiting]:
        """The next piece of each waiting request, oldest request first, as many as fit
        one batch (a whole request when not merging): at most one chunk of a request, so
        that a big request's chunks run beside each other, and requests behind it join
        its chunks' batches rather than wait for all of them. Those whose caller gave
        up are left out; the others can no longer be cancelled. None at all when every
        waiting piece left while the batch lingered (`cancel`)."""
        batch: list[_Waiting] = []
        rows, emptied = 0, []
        for request, pieces in self._waiting.items():
            if batch and (not self.merge or rows >= self.max_batch_rows):
                break
            if not self._may_take(request) or (batch and rows + pieces[0].piece.rows > self.max_batch_rows):
                continue  # held back by `between_requests`, or a later, smaller piece may fit
            self._under_way.setdefault(request, len(pieces))
            batch.append(pieces.popleft())
            del self._request_of[batch[-1].future]
            rows += batch[-1].piece.rows
            if not pieces:
                emptied.append(request)
        for request in emptied:
            del self._waiting[request]
        self._waiting_rows -= rows
        running = []
        for w in batch:
            if w.future.set_running_or_notify_cancel():
                running.append(w)
            else:  # its caller gave up: it will not run
                self._chunks_ended(w.request, 1)
        return running

    def _may_take(self, request: int) -> bool:
        """Whether a batch may take the next chunk of `request`: any, unless an update
        waits (`between_requests`) and the request is not under way."""
        return not self._holds or request in self._under_way

    # ------------------------------------------------------------------ stages

    def _run_sparse(self, batch: list[_Waiting]) -> None:
        start, taken = time.perf_counter(), batch
        try:
            batch, stage = self._sparse_stage(batch)
        except BaseException as exc:  # every request of the batch learns why
            self._fail(batch, exc)
            return
        finally:
            with self._cond:
                for w in taken:
                    self._chunks_ended(w.request, 1)
        if not batch:  # every piece failed on its own
            self._finished()
            return
        if self._dense is None:  # CPU: the dense network runs in this thread, no hand-off
            self._run_dense(batch, stage, start, time.perf_counter() - start)
        else:
            self._dense.submit(self._run_dense, batch, stage, start, time.perf_counter() - start)

    def _sparse_stage(self, batch: list[_Waiting]) -> tuple[list[_Waiting], SparseOutput | None]:
        """The sparse stage of `batch`. When it fails on a batch of several pieces, each
        piece runs it alone: one that fails alone fails (its caller learns why), and the
        stages of the others are joined, so that one caller's bad piece (a column of the
        wrong type) or two that do not merge fail no other. The chunks are still under
        way meanwhile: no update comes between the pieces."""
        try:
            return batch, self.predictor.sparse([w.piece for w in batch])
        except Exception:
            if len(batch) == 1:
                raise
        scored, stages = [], []
        for w in batch:
            try:
                stages.append(self.predictor.sparse([w.piece]))
            except Exception as exc:  # noqa: BLE001 - this piece's caller learns why
                w.future.set_exception(exc)
            else:
                scored.append(w)
        return scored, _joined(stages)

    def _run_dense(self, batch: list[_Waiting], stage: SparseOutput, start: float, sparse_s: float) -> None:
        dense_start = time.perf_counter()
        try:
            probabilities = self.predictor.dense(stage)
        except BaseException as exc:
            self._fail(batch, exc)
            return
        self._finished()
        if self._on_batch is not None:  # first: a caller that has its answer finds the batch counted
            waits = [start - w.queued_s for w in batch]
            record = BatchRecord(rows=len(probabilities), pieces=len(batch), queue_s=max(waits), waited_s=sum(waits),
                                 sparse_s=sparse_s, dense_s=time.perf_counter() - dense_start)
            try:
                self._on_batch(record)
            except Exception as exc:  # noqa: BLE001 - the callers get their answers all the same
                print(f"tidal: a batch's on_batch call failed ({type(exc).__name__}: {exc}); its {len(batch)} "
                      f"pieces are answered all the same", file=sys.stderr, flush=True)
        done = 0
        for w in batch:
            w.future.set_result(probabilities[done : done + w.piece.rows])
            done += w.piece.rows

    def _fail(self, batch: list[_Waiting], exc: BaseException) -> None:
        self._finished()
        for w in batch:
            if not w.future.done():  # a piece that failed alone has its own reason
                w.future.set_exception(exc)

    def _finished(self) -> None:
        with self._cond:
            self._in_flight -= 1
            self._cond.notify_all()

