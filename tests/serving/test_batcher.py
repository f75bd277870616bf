"""Auto-batching: small requests merge, big ones split, failures reach every caller."""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import pytest
from serving_helpers import file_rows, with_user_of

from tidal.errors import ConfigError, TidalError
from tidal.serving import Batcher, Overloaded, Piece, Predictor, split_rows
from tidal.serving.protocol import input_specs


@pytest.fixture(scope="module")
def predictor(bundle):
    return Predictor(bundle)


def _pieces(trainer, predictor, sizes: list[int]) -> list[Piece]:
    rows = file_rows(trainer, sum(sizes))
    pieces, start = [], 0
    for size in sizes:
        part = with_user_of(rows.slice(start, size), input_specs(trainer.config))
        items = pa.RecordBatch.from_pydict({c: part.column(c) for c in predictor.item_columns})
        user = pa.RecordBatch.from_pydict({c: part.column(c).slice(0, 1) for c in predictor.user_columns})
        pieces.append(Piece(items=items, user=user))
        start += size
    return pieces


def _batcher(predictor, records, **settings) -> Batcher:
    options = {"max_batch_rows": 256, "max_delay_ms": 50.0, "chunk_rows": 64, "sparse_threads": 1,
               "max_queue_rows": 10_000, "on_batch": records.append, **settings}
    return Batcher(predictor, **options)


@contextlib.contextmanager
def _held(predictor) -> Iterator[threading.Event]:  # type: ignore[no-untyped-def]
    """Hold every batch at a gate until it is set, so that the requests behind the first queue up."""
    gate, blocked = threading.Event(), predictor.sparse
    predictor.sparse = lambda p: gate.wait() and blocked(p)
    try:
        yield gate
    finally:
        gate.set()
        del predictor.sparse


def _until(condition) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_split_rows_cuts_about_equal_chunks():
    assert split_rows(100, 256) == [(0, 100)]
    assert split_rows(600, 256) == [(0, 200), (200, 400), (400, 600)]
    assert split_rows(65, 64) == [(0, 32), (32, 65)]
    with pytest.raises(ConfigError, match=r"rows must be a whole number >= 0 and chunk_rows one >= 1, got -5 and 3"):
        split_rows(-5, 3)  # was [(0, -5)]


@pytest.mark.parametrize(("setting", "value", "expected"), [
    ("max_batch_rows", "8", "max_batch_rows must be a whole number >= 1, got '8'"),
    ("chunk_rows", 0, "chunk_rows must be a whole number >= 1, got 0"),
    ("sparse_threads", 0, "sparse_threads must be a whole number >= 1, got 0"),
    ("max_queue_rows", True, "max_queue_rows must be a whole number >= 1, got True"),
    ("max_delay_ms", -5, "max_delay_ms must be a finite number >= 0, got -5"),
    ("on_batch", 5, "on_batch must be a function taking a BatchRecord, or None; got int"),
    ("merge", "no", "merge must be True or False, got 'no'"),
])
def test_a_batcher_refuses_settings_it_cannot_run_with(predictor, setting, value, expected):
    """An audit's find: a string max_batch_rows killed the collector thread and every request waited forever."""
    with pytest.raises(ConfigError, match=rf"^Batcher: {re.escape(expected)}$"):
        _batcher(predictor, [], **{setting: value})


def test_a_failing_on_batch_call_is_reported_and_its_requests_answered(trainer, predictor, capsys):
    """It left every caller of the batch waiting for good, and close() freed none."""
    def broken(record):  # type: ignore[no-untyped-def]
        raise RuntimeError("metrics broke")

    pieces = _pieces(trainer, predictor, [3, 2])
    batcher = _batcher(predictor, [], on_batch=broken)
    try:
        answers = [f.result(timeout=30) for piece in pieces for f in batcher.submit(piece)]
    finally:
        batcher.close()
    np.testing.assert_allclose(np.concatenate(answers), predictor.predict(pieces), rtol=1e-6)
    assert "on_batch call failed (RuntimeError: metrics broke); its " in capsys.readouterr().err


def test_a_piece_that_cannot_be_scored_fails_alone_and_the_others_of_its_batch_are_answered(trainer, predictor):
    """One caller's piece with a column of the wrong type failed every piece merged with
    it; so did two good pieces that do not merge (their columns in another order)."""
    records: list = []
    first, good, other = _pieces(trainer, predictor, [2, 3, 4])
    name = next(c for c in predictor.item_columns if good.items.column(c).type == pa.string())
    bad = Piece(items=good.items.set_column(good.items.schema.get_field_index(name), name, pa.array(np.arange(3))),
                user=good.user)
    names = list(reversed(other.items.schema.names))
    reordered = Piece(items=pa.RecordBatch.from_arrays([other.items.column(n) for n in names], names=names),
                      user=other.user)
    batcher = _batcher(predictor, records)
    try:
        with _held(predictor) as gate:
            futures = batcher.submit(first)
            _until(lambda: batcher._in_flight == 1)
            futures += [f for p in (good, bad, reordered) for f in batcher.submit(p)]
            gate.set()
            answers = [futures[k].result(timeout=30) for k in (0, 1, 3)]
            with pytest.raises(TidalError, match=rf"^feature '{name}' reads its column\(s\) as text: expected string "
                                                 rf"columns, got column '{name}' of type int64"):
                futures[2].result(timeout=30)
    finally:
        batcher.close()
    assert [(r.pieces, r.rows) for r in records] == [(1, 2), (2, 7)]  # the bad piece left its batch
    np.testing.assert_allclose(np.concatenate(answers), predictor.predict([first, good, other]), rtol=1e-5)
    assert (batcher._in_flight, batcher._under_way) == (0, {})


def test_a_piece_s_user_is_one_row_and_its_state_a_user_state(trainer, predictor):
    """A two-row user moved later pieces of a batch onto other users, silently."""
    piece = _pieces(trainer, predictor, [3])[0]
    two = pa.concat_batches([piece.user, piece.user])
    with pytest.raises(TidalError, match=r"^Piece: user must be one request's user row, a pyarrow RecordBatch of 1 "
                                         r"row; got 2 rows$"):
        Piece(items=piece.items, user=two)
    with pytest.raises(TidalError, match=r"^user_state: user must be .* got 2 rows$"):
        predictor.user_state(two)
    with pytest.raises(TidalError, match=r"^Piece: state must be a UserState .* got dict$"):
        Piece(items=piece.items, state={})


def test_library_calls_with_arguments_of_the_wrong_type_are_refused_naming_them(trainer, predictor):
    """They gave raw TypeErrors and AttributeErrors from deep inside."""
    piece = _pieces(trainer, predictor, [3])[0]
    columns = {c: piece.items.column(c) for c in predictor.item_columns} | \
              {c: piece.user.column(c) for c in predictor.user_columns}
    for wrong, expected in [(None, r"columns must be a dict of column name -> pyarrow Array, got NoneType"),
                            ({**columns, "x": [1, 2]}, r"columns must be pyarrow Arrays \(pa.array\(values\)\), got "
                                                      r"\{'x': 'list'\}")]:
        with pytest.raises(TidalError, match=rf"^piece: {expected}"):
            predictor.piece(wrong, 3)
    with pytest.raises(TidalError, match=r"^piece: state must be a UserState .* got str$"):
        predictor.piece(columns, 3, state="x")
    chunked = {c: pa.chunked_array([a]) for c, a in columns.items()}  # a pyarrow Table's columns: taken
    np.testing.assert_allclose(predictor.predict([predictor.piece(chunked, 3)]), predictor.predict([piece]), rtol=1e-6)
    with pytest.raises(ConfigError, match=r"^Batcher: predictor: expected Predictor, got NoneType$"):
        _batcher(None, [])
    batcher = _batcher(predictor, [])
    try:
        with pytest.raises(TidalError, match=r"^submit takes a Piece \(Predictor.piece makes one\), got dict$"):
            batcher.submit({})
    finally:
        batcher.close()


def test_small_concurrent_requests_are_merged_into_one_batch(trainer, predictor):
    pieces = _pieces(trainer, predictor, [1] * 12)
    records = []
    batcher = _batcher(predictor, records)
    try:
        with _held(predictor) as gate:
            futures = [batcher.submit(pieces[0])]
            _until(lambda: batcher._in_flight == 1)
            futures += [batcher.submit(p) for p in pieces[1:]]
            gate.set()
            results = [f.result(timeout=30) for fs in futures for f in fs]
    finally:
        batcher.close()
    assert [r.pieces for r in records] == [1, 11]  # the first went alone, the other 11 waited together
    expected = np.concatenate([predictor.predict([p]) for p in pieces])
    np.testing.assert_allclose(np.concatenate(results), expected, rtol=1e-5)


def test_a_lone_request_starts_at_once_and_busy_traffic_lingers_to_fill_a_batch(trainer, predictor):
    """The window, with the pipeline idle each time: a quiet server answers a lone request
    without waiting out `max_delay_ms`; after a burst, a request waits up to that long
    for the next ones, which join its batch."""
    pieces = _pieces(trainer, predictor, [1] * 13)
    records = []
    batcher = _batcher(predictor, records, max_delay_ms=500.0)
    try:
        start = time.perf_counter()
        (lone,) = batcher.submit(pieces[0])
        lone.result(timeout=30)
        assert time.perf_counter() - start < 0.4 and records[-1].pieces == 1
        for future in [f for p in pieces[1:10] for f in batcher.submit(p)]:  # a burst: requests come close together
            future.result(timeout=30)
        _until(lambda: batcher._in_flight == 0)
        futures = []
        for piece in pieces[10:]:
            futures += batcher.submit(piece)
            time.sleep(0.02)
        for future in futures:
            future.result(timeout=30)
    finally:
        batcher.close()
    assert records[-1].pieces == 3


@pytest.mark.parametrize("clients", [1, 3])
def test_clients_that_wait_for_each_answer_are_not_held_to_fill_a_batch_once_all_are_in(trainer, predictor,
                                                                                         clients):
    """Their requests come close together, but once every client's is in the server no
    other can come to join their batch."""
    pieces = _pieces(trainer, predictor, [1] * 40)
    records = []
    batcher = _batcher(predictor, records, max_delay_ms=300.0)

    def client() -> None:
        for piece in pieces:
            (future,) = batcher.submit(piece)
            future.result(timeout=30)

    try:
        start = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        took = time.perf_counter() - start
    finally:
        batcher.close()
    assert batcher._arrival_gap_s < 0.3 and took < 4.0  # lingering, most would have waited 0.3 s (some 8 s in all)


def test_under_load_a_small_batch_lingers_from_when_it_could_start_not_from_its_oldest_piece(trainer, predictor):
    """The pieces that waited behind a running batch are past their own `max_delay_ms`
    when it ends; being few, they still wait that long for more, which join them."""
    pieces = _pieces(trainer, predictor, [1] * 7)
    records = []
    batcher = _batcher(predictor, records, max_delay_ms=300.0)
    try:
        with _held(predictor) as gate:
            futures = batcher.submit(pieces[0])
            _until(lambda: batcher._in_flight == 1)
            futures += [f for p in pieces[1:6] for f in batcher.submit(p)]
            batcher._arrival_gap_s, batcher._concurrency = 0.0, 10.0  # as under load: requests close together
            time.sleep(0.4)  # the five waiting are now past their max_delay_ms
            gate.set()
            _until(lambda: len(records) == 1)
            time.sleep(0.05)
            futures += batcher.submit(pieces[6])  # comes while the small batch lingers
            for future in futures:
                future.result(timeout=30)
    finally:
        batcher.close()
    assert [r.pieces for r in records] == [1, 6]


def test_a_big_request_is_split_into_chunks_and_merged_back_in_order(trainer, predictor):
    (piece,) = _pieces(trainer, predictor, [150])
    records = []
    batcher = _batcher(predictor, records, max_batch_rows=64, sparse_threads=2)
    try:
        futures = batcher.submit(piece)
        merged = np.concatenate([f.result(timeout=30) for f in futures])
    finally:
        batcher.close()
    assert len(futures) == 3 and sorted(r.rows for r in records) == [50, 50, 50]
    np.testing.assert_allclose(merged, predictor.predict([piece]), rtol=1e-5)


def test_a_big_request_within_the_batch_bound_still_runs_as_chunks_beside_each_other(trainer, predictor):
    """The defaults' case: chunks of 64 rows, batches of up to 256. The chunks of one
    request used to be merged straight back into one batch, on one thread."""
    (piece,) = _pieces(trainer, predictor, [200])
    small = _pieces(trainer, predictor, [5])
    records = []
    batcher = _batcher(predictor, records, sparse_threads=2)
    try:
        futures = batcher.submit(piece) + batcher.submit(small[0])
        merged = np.concatenate([f.result(timeout=30) for f in futures[:-1]])
        futures[-1].result(timeout=30)
    finally:
        batcher.close()
    assert len(futures) == 5 and sorted(r.rows for r in records) == [50, 50, 50, 55]  # another request may join
    np.testing.assert_allclose(merged, predictor.predict([piece]), rtol=1e-5)


def test_requests_behind_a_big_one_join_its_first_chunks_batch_instead_of_waiting_for_all_of_them(trainer, predictor):
    blocker, big, *small = _pieces(trainer, predictor, [1, 640, 1, 2])
    records = []
    batcher = _batcher(predictor, records)
    try:
        with _held(predictor) as gate:
            first = batcher.submit(blocker)
            _until(lambda: batcher._in_flight == 1)
            chunks = batcher.submit(big)
            futures = [f for piece in small for f in batcher.submit(piece)]
            gate.set()
            results = [f.result(timeout=30) for f in futures]
            assert not chunks[-1].done()  # the small ones did not wait for the big one's 10 chunks
            merged = np.concatenate([f.result(timeout=30) for f in chunks])
            first[0].result(timeout=30)
    finally:
        batcher.close()
    assert len(chunks) == 10 and [(r.pieces, r.rows) for r in records[:3]] == [(1, 1), (3, 67), (1, 64)]
    np.testing.assert_allclose(merged, predictor.predict([big]), rtol=1e-5)
    np.testing.assert_allclose(np.concatenate(results), predictor.predict(small), rtol=1e-5)


def test_without_merging_each_request_is_its_own_batch(trainer, predictor):
    pieces = _pieces(trainer, predictor, [3, 300])
    records = []
    batcher = _batcher(predictor, records, merge=False)
    try:
        results = [f.result(timeout=30) for p in pieces for f in batcher.submit(p)]
    finally:
        batcher.close()
    assert sorted(r.rows for r in records) == [3, 300] and [len(r) for r in results] == [3, 300]


def test_a_failed_batch_fails_every_request_in_it(trainer, predictor):
    pieces = _pieces(trainer, predictor, [2, 2, 2])
    batcher = _batcher(predictor, [], max_delay_ms=200.0)
    gate = threading.Event()
    original = predictor.sparse

    def broken(batch):
        gate.wait()
        raise RuntimeError("the device fell over")

    predictor.sparse = broken
    try:
        futures = [f for p in pieces for f in batcher.submit(p)]
        gate.set()
        for future in futures:
            with pytest.raises(RuntimeError, match="fell over"):
                future.result(timeout=30)
    finally:
        predictor.sparse = original
        del predictor.sparse
        batcher.close()


@pytest.mark.parametrize("stage", ["sparse", "dense"])
def test_failed_batches_free_their_thread_and_the_next_request_is_served(trainer, predictor, stage):
    """One thread, three failures in a row, each its caller's; then a good request."""
    pieces = _pieces(trainer, predictor, [2, 2, 2, 2])
    batcher = _batcher(predictor, [], sparse_threads=1)

    def broken(*args):
        raise RuntimeError(f"the {stage} stage fell over")

    setattr(predictor, stage, broken)
    try:
        for piece in pieces[:3]:
            (future,) = batcher.submit(piece)
            with pytest.raises(RuntimeError, match=f"the {stage} stage fell over"):
                future.result(timeout=30)
        delattr(predictor, stage)
        (future,) = batcher.submit(pieces[3])
        np.testing.assert_allclose(future.result(timeout=30), predictor.predict([pieces[3]]), rtol=1e-5)
    finally:
        if stage in vars(predictor):
            delattr(predictor, stage)
        batcher.close()


def test_overload_is_refused_and_close_fails_what_waits(trainer, predictor):
    pieces = _pieces(trainer, predictor, [40, 40, 40])
    batcher = _batcher(predictor, [], max_queue_rows=50)
    gate = threading.Event()
    original = predictor.sparse
    predictor.sparse = lambda p: gate.wait() and original(p)
    try:
        first = batcher.submit(pieces[0])
        _until(lambda: batcher._in_flight == 1)  # taken by the collector, held by the gate
        waiting = batcher.submit(pieces[1])
        with pytest.raises(Overloaded, match=r"40 rows are waiting and this request brings 40 \(bound 50\); retry later"):
            batcher.submit(pieces[2])
        closer = threading.Thread(target=batcher.close)
        closer.start()
        with pytest.raises(TidalError, match="shut down"):
            waiting[0].result(timeout=30)
        gate.set()
        closer.join(timeout=30)
        assert first[0].result(timeout=30).shape == (40, 2)
    finally:
        gate.set()
        del predictor.sparse


def test_a_request_given_up_before_its_batch_runs_does_not_hang_the_others(trainer, predictor):
    pieces = _pieces(trainer, predictor, [2, 2, 2])
    batcher = _batcher(predictor, [])
    gate = threading.Event()
    original = predictor.sparse
    predictor.sparse = lambda p: gate.wait() and original(p)
    try:
        first = batcher.submit(pieces[0])
        _until(lambda: batcher._in_flight == 1)
        given_up, waiting = batcher.submit(pieces[1]), batcher.submit(pieces[2])
        assert given_up[0].cancel() and not first[0].cancel()  # running futures cannot be cancelled
        gate.set()
        assert waiting[0].result(timeout=30).shape == (2, 2) and first[0].result(timeout=30).shape == (2, 2)
        given_up = batcher.submit(pieces[1])
        given_up[0].cancel()
    finally:
        gate.set()
        batcher.close()
        del predictor.sparse


def test_cancelled_chunks_leave_the_queue_and_free_their_rows_when_no_batch_took_them(trainer, predictor):
    pieces = _pieces(trainer, predictor, [2, 150, 60])
    records = []
    batcher = _batcher(predictor, records, max_batch_rows=64, max_queue_rows=200)
    gate = threading.Event()
    original = predictor.sparse
    predictor.sparse = lambda p: gate.wait() and original(p)
    try:
        first = batcher.submit(pieces[0])
        _until(lambda: batcher._in_flight == 1)  # the one thread is held: the next pieces wait
        given_up = batcher.submit(pieces[1])  # 3 chunks of 50
        batcher.cancel(given_up)
        assert batcher._waiting_rows == 0 and all(f.cancelled() for f in given_up)
        late = batcher.submit(pieces[2])  # refused as overload if the 150 rows still counted
        gate.set()
        assert first[0].result(timeout=30).shape == (2, 2) and late[0].result(timeout=30).shape == (60, 2)
        assert not batcher._waiting and not batcher._request_of  # nothing kept of the pieces gone
    finally:
        gate.set()
        del predictor.sparse
        batcher.close()
    assert sorted(r.rows for r in records) == [2, 60]  # none of the cancelled chunks was scored


def test_the_collector_goes_on_when_every_waiting_piece_is_cancelled_while_its_batch_lingers(trainer, predictor):
    pieces = _pieces(trainer, predictor, [2, 3])
    records = []
    batcher = _batcher(predictor, records, max_delay_ms=300.0)
    try:
        with batcher._cond:
            batcher._arrival_gap_s, batcher._concurrency = 0.0, 10.0  # as after a burst: the next batch lingers
        given_up = batcher.submit(pieces[0])
        time.sleep(0.05)  # the collector lingers with it
        batcher.cancel(given_up)
        time.sleep(0.4)  # the linger ends with nothing left to take
        (future,) = batcher.submit(pieces[1])
        assert future.result(timeout=30).shape == (3, 2)
    finally:
        batcher.close()
    assert [r.rows for r in records] == [3]


def _logged(predictor) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """The rows of each piece of each batch whose sparse stage ran, in order."""
    log, original = [], predictor.sparse
    predictor.sparse = lambda p: log.append([piece.rows for piece in p]) or original(p)
    return log


def _inside_between_requests(batcher: Batcher, seen: Callable[[], object]) -> tuple[threading.Thread, list]:
    """A thread in `between_requests` recording `seen()` there; wait until it is waiting."""
    inside: list = []

    def hold() -> None:
        with batcher.between_requests():
            inside.append(seen())

    thread = threading.Thread(target=hold)
    thread.start()
    _until(lambda: batcher._holds == 1)
    return thread, inside


def test_between_requests_waits_for_the_chunks_of_requests_under_way_and_holds_back_new_ones(trainer, predictor):
    big, small = _pieces(trainer, predictor, [256, 5])
    batcher = _batcher(predictor, [], max_batch_rows=69)  # a chunk of 64 and the small request fit one batch
    try:
        with _held(predictor) as gate:
            log = _logged(predictor)
            chunks = batcher.submit(big)
            _until(lambda: batcher._in_flight == 1)  # its first chunk is taken: the request is under way
            late = batcher.submit(small)
            thread, inside = _inside_between_requests(batcher, lambda: (list(log), late[0].running()))
            gate.set()
            thread.join(timeout=30)
            assert inside == [([[64]] * 4, False)]  # every chunk of the big one, the small one not started
            assert late[0].result(timeout=30).shape == (5, 2) and log[-1] == [5]
            assert np.concatenate([f.result(timeout=30) for f in chunks]).shape == (256, 2)
    finally:
        batcher.close()


def test_chunks_given_up_while_their_request_is_under_way_do_not_hold_an_update_back(trainer, predictor):
    (big,) = _pieces(trainer, predictor, [256])
    batcher = _batcher(predictor, [])
    try:
        with _held(predictor) as gate:
            chunks = batcher.submit(big)
            _until(lambda: batcher._in_flight == 1)
            batcher.cancel(chunks)  # three chunks leave the queue; the first one runs
            thread, inside = _inside_between_requests(batcher, lambda: batcher._under_way.copy())
            gate.set()
            thread.join(timeout=30)
            assert inside == [{}] and not thread.is_alive()
    finally:
        batcher.close()


def test_a_failed_batch_ends_its_requests_chunks_and_close_releases_an_update_waiting(trainer, predictor):
    big, = _pieces(trainer, predictor, [128])
    batcher = _batcher(predictor, [])
    gate, original = threading.Event(), predictor.sparse

    def fails(pieces):  # type: ignore[no-untyped-def]
        gate.wait()
        raise TidalError("the sparse stage failed")

    predictor.sparse = fails
    try:
        chunks = batcher.submit(big)
        _until(lambda: batcher._in_flight == 1)
        thread, inside = _inside_between_requests(batcher, lambda: batcher._under_way.copy())
        gate.set()
        thread.join(timeout=30)
        assert inside == [{}] and all(isinstance(f.exception(timeout=30), TidalError) for f in chunks)
        predictor.sparse = lambda p: gate.wait(60) and original(p)
        gate.clear()
        chunks = batcher.submit(big)
        _until(lambda: batcher._in_flight == 1)
        thread, inside = _inside_between_requests(batcher, lambda: chunks[0].done())
        closing = threading.Thread(target=batcher.close)  # it waits for the chunk under way to end
        closing.start()
        thread.join(timeout=30)
        assert inside == [False]  # the update waiting was let go before the chunk under way ended
        gate.set()
        closing.join(timeout=30)
    finally:
        gate.set()
        batcher.close()
        del predictor.sparse


def test_a_bucket_is_asked_for_a_whole_number_of_rows(predictor):
    assert predictor.bucket(0) == predictor.buckets[0]
    with pytest.raises(TidalError, match=r"^bucket: rows must be a whole number >= 0, got -1$"):  # was the first bucket
        predictor.bucket(-1)
