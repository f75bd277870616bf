"""Numbered batches of a training run's files, shared by (or copied to) sparse workers.

Batch ids count from the position a run starts at: id 0 is the first batch to train,
epochs follow one another. A `BatchSource` reads the files in order and hands batch
`k` to whichever worker asks for it; a shared source (threads of one process) keeps
what it read ahead for the other workers, a private one (one per Ray actor) reads the
whole stream and drops the batches it was not asked for. Both keep the last batches
they handed out, for a retry; a batch asked for again after that is read again.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from itertools import chain

import pyarrow as pa

from tidal.data.batch import SparseBatch
from tidal.data.readers import BadRows, Bags, WeightedBags, read_batches
from tidal.errors import DataError, TidalError

__all__ = ["BatchSource", "Item", "MemorySpec", "ReaderSpec"]

_RECENT_BATCHES = 16  # handed out lately and kept: a failed worker's batch is retried soon after


@dataclass(frozen=True, kw_only=True)
class ReaderSpec:
    """Everything needed to read a run's training files again, anywhere (picklable)."""

    files: list[str]
    columns: list[str]  # those read
    layout: list[str] | None  # the columns of files without a header line, by position
    checks: dict[str, str | Bags | WeightedBags]
    file_format: str | None
    batch_rows: int
    on_bad_row: str
    epochs: int
    start_epoch: int = 0
    start_batch: int = 0  # batches of `start_epoch` already trained
    csv_header: bool = True
    max_bad_fraction: float = 0.1
    sizes: dict[str, int] | None = None  # each file's bytes when the run began: a file changed since is refused

    def epoch(self, bad_rows: BadRows) -> Iterator[pa.RecordBatch]:
        return read_batches(self.files, columns=self.columns, checks=self.checks, file_format=self.file_format,  # type: ignore[arg-type]
                            batch_rows=self.batch_rows, on_bad_row=self.on_bad_row, bad_rows=bad_rows,  # type: ignore[arg-type]
                            csv_header=self.csv_header, max_bad_fraction=self.max_bad_fraction, layout=self.layout,
                            sizes=self.sizes)


@dataclass(frozen=True, kw_only=True)
class MemorySpec:
    """Batches already extracted and in memory, trained `epochs` times (benchmarks)."""

    batches: list[SparseBatch]
    epochs: int = 1
    start_epoch: int = 0
    start_batch: int = 0

    def epoch(self, bad_rows: BadRows) -> Iterator[SparseBatch]:
        return iter(self.batches)


@dataclass(frozen=True, kw_only=True)
class Item:
    """Batch `batch_id`: the `index`-th batch of `epoch`, and the bad rows met reading it."""

    batch_id: int
    epoch: int
    index: int
    table: pa.RecordBatch | SparseBatch  # a SparseBatch when the source holds extracted batches
    bad_rows: int = 0
    bad_examples: list[str] = field(default_factory=list)
    parse_s: float = 0.0


class BatchSource:
    """Batch `k` of the stream on request; thread-safe."""

    def __init__(self, spec: ReaderSpec | MemorySpec, *, shared: bool) -> None:
        self.spec = spec
        self.shared = shared
        self._lock = threading.Lock()
        self._kept: dict[int, Item] = {}  # read, not yet handed out
        self._recent: OrderedDict[int, Item] = OrderedDict()  # the last batches handed out
        self._handed_before = 0  # every batch below this id was read once before the last rewind
        self._error: BaseException | None = None  # what broke the stream: raised to every later reader
        self._next_id = 0
        self._rewind()

    def _rewind(self) -> None:
        """Read the stream again from its start (a batch handed out before is asked for again)."""
        self._handed_before = max(self._handed_before, self._next_id)
        self._stream = self._items()
        self._next_id = 0
        self._ended = False

    def _items(self) -> Iterator[tuple[int, int, pa.RecordBatch | SparseBatch, int, list[str]]]:
        """(epoch, index, table, bad rows, their examples) past the start position.

        A batch is handed on once the next one is read (or the epoch ended), so the bad
        rows met up to then, those after a file's last full batch included, go with it.
        A start past the end of its epoch goes on into the next one, by the batches
        beyond the end (a run stopped after lost batches that began the next epoch).
        """
        skip = self.spec.start_batch
        for epoch in range(self.spec.start_epoch, self.spec.epochs):
            report, counted, shown = BadRows(), 0, 0
            held: tuple[int, pa.RecordBatch | SparseBatch] | None = None
            for index, table in enumerate(chain(self.spec.epoch(report), [None])):
                if held is not None:
                    bad, examples = report.count - counted, report.examples[shown:]
                    counted, shown = report.count, len(report.examples)
                    if held[0] >= skip:  # the bad rows of skipped batches were counted before the resume
                        yield epoch, held[0], held[1], bad, examples
                held = (index, table) if table is not None else None
            skip = max(0, skip - index)  # index: the epoch's batches, once its end is reached

    def get(self, batch_id: int) -> Item | None:
        """Batch `batch_id`, or None when the stream ends before it. A batch handed out
        lately comes again from memory (the retry of a failed worker's batch); an older
        one is read again from the start of the stream."""
        with self._lock:
            item = self._kept.pop(batch_id, None) or self._recent.pop(batch_id, None) or self._read_up_to(batch_id)
            if item is not None:
                self._recent[batch_id] = item
                if len(self._recent) > _RECENT_BATCHES:
                    self._recent.popitem(last=False)
            return item

    def _read_up_to(self, batch_id: int) -> Item | None:
        if self._error is not None:
            raise self._error
        if batch_id < self._next_id:  # handed out or dropped before: read again from the start
            self._rewind()
        dropped_s = 0.0  # parsing the batches read and not kept: the one asked for carries it
        while not self._ended and self._next_id <= batch_id:
            try:
                item = self._read()
            except Exception as exc:  # not a worker's fault: no other worker could read on, so the run stops
                self._error = exc if isinstance(exc, TidalError) else DataError(f"reading the data failed: {exc!r}")
                raise self._error from exc
            if item is not None and self._keeps(item.batch_id, batch_id):
                self._kept[item.batch_id] = item
            elif item is not None:
                dropped_s += item.parse_s
        found = self._kept.pop(batch_id, None)
        return found and replace(found, parse_s=found.parse_s + dropped_s)

    def _keeps(self, read_id: int, asked_id: int) -> bool:
        """Whether to keep a batch just read: the one asked for, and in a shared source
        those read ahead for the other workers; never one handed out before a rewind
        (nobody asks for it again unless it is retried, which reads it again)."""
        return read_id == asked_id or (self.shared and read_id >= self._handed_before)

    def _read(self) -> Item | None:
        start = time.perf_counter()
        found = next(self._stream, None)
        if found is None:
            self._ended = True
            return None
        epoch, index, table, bad, examples = found
        item = Item(batch_id=self._next_id, epoch=epoch, index=index, table=table, bad_rows=bad,
                    bad_examples=examples, parse_s=time.perf_counter() - start)
        self._next_id += 1
        return item
