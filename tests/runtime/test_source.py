"""The batch source: batches by id, read ahead for other workers, handed out again on a retry."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tidal.data.readers import BadRows
from tidal.runtime.source import BatchSource


@dataclass
class _CountingSpec:
    """`count` stand-in batches a pass (strings, the source does not look inside), and
    how many it has read."""

    count: int
    epochs: int = 1
    start_epoch: int = 0
    start_batch: int = 0
    reads: list[int] = field(default_factory=list)

    def epoch(self, bad_rows: BadRows) -> Iterator[str]:
        for k in range(self.count):
            self.reads.append(k)
            yield f"batch-{k}"


def test_a_shared_source_keeps_what_it_read_ahead_for_the_other_workers():
    spec = _CountingSpec(10)
    source = BatchSource(spec, shared=True)
    assert source.get(5).table == "batch-5"
    assert [source.get(k).table for k in (3, 0, 4)] == ["batch-3", "batch-0", "batch-4"]
    assert len(spec.reads) == 7  # batches 0-5 once, and the next one read to know batch 5 was whole


def test_a_private_source_reads_past_the_batches_it_was_not_asked_for():
    spec = _CountingSpec(10)
    source = BatchSource(spec, shared=False)
    assert source.get(5).table == "batch-5"
    assert source.get(3).table == "batch-3"  # dropped on the way: read again from the start
    assert len(spec.reads) == 7 + 5


def test_the_batch_a_private_source_hands_out_carries_the_parsing_of_those_it_dropped(monkeypatch):
    ticks = iter(range(1_000))
    monkeypatch.setattr("tidal.runtime.source.time.perf_counter", lambda: float(next(ticks)))  # each read: 1 s
    source = BatchSource(_CountingSpec(10), shared=False)
    assert source.get(2).parse_s == 3.0  # batches 0 and 1 dropped on the way, for the reader's busy share
    assert source.get(3).parse_s == 1.0
    shared = BatchSource(_CountingSpec(10), shared=True)
    assert shared.get(2).parse_s == 1.0 and shared.get(0).parse_s == 1.0  # kept for others: each its own


@pytest.mark.parametrize("shared", [True, False])
def test_a_retried_batch_comes_back_from_memory_and_an_old_one_is_read_again_without_keeping_the_rest(shared):
    spec = _CountingSpec(1000)
    source = BatchSource(spec, shared=shared)
    for k in range(500):
        assert source.get(k).batch_id == k
    reads = len(spec.reads)
    assert source.get(495).table == "batch-495" and len(spec.reads) == reads  # a retry soon after
    assert source.get(100).table == "batch-100" and len(spec.reads) == reads + 102  # long after: read again
    assert source._kept == {}  # nothing read on the way is kept: those batches were all handed out
    assert [source.get(k).table for k in range(500, 1000)] == [f"batch-{k}" for k in range(500, 1000)]
    assert len(source._kept) == 0 and source.get(1000) is None


def test_a_read_error_reaches_every_later_reader_as_a_data_error_that_stops_the_run():
    from tidal.errors import DataError

    class Broken(_CountingSpec):
        def epoch(self, bad_rows):
            yield "batch-0"
            raise OSError("disk gone")

    source = BatchSource(Broken(2), shared=True)
    for batch_id in (1, 2):  # a DataError, not a worker's fault for the engine to retry with another worker
        with pytest.raises(DataError, match=r"reading the data failed: OSError\('disk gone'\)"):
            source.get(batch_id)
