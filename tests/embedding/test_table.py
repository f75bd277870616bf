"""EmbeddingTable: collision-free index, arena, admission, eviction, stats, threads, bad input."""

from __future__ import annotations

import os
import re
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tidal.config import (Adagrad, Adam, CountAdmission, Eviction, Ftrl, Initializer, ProbabilityAdmission, Sgd,
                          TableConfig)
from tidal.embedding import EmbeddingTable, pooling, save_tables
from tidal.embedding.table import RowBlock
from tidal.embedding._memory import CHUNK_ROWS, SHARD_BITS
from tidal.errors import BatchError, CheckpointError, ConfigError

from keys import ADVERSARIAL, INT64_MAX, INT64_MIN, M64, as_int64, unmix64
from serving_helpers import until

PROPERTY = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# plain SGD's lookups list no distinct rows, a summing optimizer's do: both paths mark and count rows
BOTH_LOOKUPS = pytest.mark.parametrize("optimizer", [Sgd(), Adagrad()], ids=["sgd", "adagrad"])


def make_table(*, threads=1, **config):
    config = {"name": "t", "dim": 4, "num_shards": 1, **config}
    return EmbeddingTable(TableConfig(**config), threads=threads)


def arr(*keys):
    return np.array(keys, dtype=np.int64)


def insert(table, keys):
    return table.lookup_or_insert(np.asarray(keys, dtype=np.int64)).handles


def sight(table, *key_times):
    """Look up each (key, times) pair `times` times, one step each."""
    for key, times in key_times:
        for _ in range(times):
            insert(table, arr(key))


def present(table, keys):
    return table.find(np.asarray(keys, dtype=np.int64)).handles >= 0


# keys whose hashes share their low 10 bits: one home slot in a fresh 1024-slot index,
# split apart only gradually by each rehash
COLLIDING = [as_int64(unmix64((i << 10) | 77)) for i in range(1, 1200)]

int64s = st.integers(INT64_MIN, INT64_MAX)
key_values = st.one_of(int64s, st.sampled_from(ADVERSARIAL), st.sampled_from(COLLIDING))


@st.composite
def key_batches(draw, max_run=1500):
    """Random and adversarial keys, a run of consecutive keys (wrapping at int64), duplicates."""
    keys = draw(st.lists(key_values, max_size=150))
    start, length = draw(int64s), draw(st.integers(0, max_run))
    keys += [((start + i - INT64_MIN) & M64) + INT64_MIN for i in range(length)]
    keys += draw(st.lists(st.sampled_from(keys), max_size=100)) if keys else []
    draw(st.randoms(use_true_random=False)).shuffle(keys)
    return np.array(keys, dtype=np.int64)


# -- collision-free index ------------------------------------------------------------------------
@PROPERTY
@given(keys=key_batches(), num_shards=st.sampled_from([1, 8]))
def test_distinct_keys_own_distinct_stable_rows_when_keys_random_and_adversarial(keys, num_shards):
    table = make_table(num_shards=num_shards)
    handles = insert(table, keys)
    by_key = {}
    for key, handle in zip(keys.tolist(), handles.tolist()):
        assert by_key.setdefault(key, handle) == handle, f"key {key} got two handles"
    assert min(handles, default=0) >= 0
    assert len(set(by_key.values())) == len(by_key) == table.stats().rows
    values = table.lookup(keys)
    np.testing.assert_array_equal(insert(table, keys[::-1]), handles[::-1])
    np.testing.assert_array_equal(table.find(keys).handles, handles)
    np.testing.assert_array_equal(table.lookup(keys), values)


@PROPERTY
@given(data=st.data(), num_shards=st.sampled_from([1, 4]))
def test_find_matches_dict_reference_when_inserts_and_removes_interleave(data, num_shards):
    table, reference, seen = make_table(num_shards=num_shards), {}, set()
    rnd = data.draw(st.randoms(use_true_random=False))
    for _ in range(data.draw(st.integers(1, 6))):
        if reference and data.draw(st.booleans()):
            doomed = rnd.sample(sorted(seen), k=rnd.randint(0, len(seen)))
            expected = sum(reference.pop(k, None) is not None for k in set(doomed))
            assert table.remove(np.array(doomed + doomed[:3], dtype=np.int64)) == expected
        else:
            keys, live, new = data.draw(key_batches(max_run=3000)), set(reference.values()), {}
            for key, handle in zip(keys.tolist(), insert(table, keys).tolist()):
                if key in reference:
                    assert handle == reference[key]
                else:
                    assert handle not in live and new.setdefault(key, handle) == handle
            assert len(set(new.values())) == len(new)
            reference.update(new)
            seen.update(new)
        ordered = np.array(sorted(seen), dtype=np.int64)
        expected = np.array([reference.get(k, -1) for k in ordered.tolist()], dtype=np.int64)
        np.testing.assert_array_equal(table.find(ordered).handles, expected)
        assert table.stats().rows == len(reference)


def test_find_consistent_when_removes_interleave_with_several_rehashes():
    table, rng, reference = make_table(), np.random.default_rng(0), set()
    for round_ in range(12):
        keys = np.concatenate([rng.integers(INT64_MIN, INT64_MAX, 3000, dtype=np.int64),
                               arr(*ADVERSARIAL), np.arange(3000, dtype=np.int64) + round_ * 1000])
        insert(table, keys)
        reference.update(keys.tolist())
        doomed = rng.choice(np.array(sorted(reference)), size=len(reference) // 4, replace=False)
        assert table.remove(doomed) == len(doomed)
        reference.difference_update(doomed.tolist())
        everything = np.concatenate([keys, doomed])
        np.testing.assert_array_equal(present(table, everything), np.isin(everything, list(reference)))
    assert table._shards[0].slots.shape[0] >= 8 * 1024  # at least three rehashes
    assert table.stats().rows == len(reference)


def test_colliding_keys_stay_findable_when_middle_of_probe_run_removed():
    table = make_table(initializer=Initializer(kind="uniform", scale=1.0))
    keys = arr(*COLLIDING[:700])
    handles, values = insert(table, keys), table.lookup(keys)
    kept = np.arange(len(keys)) % 3 != 1
    gone = keys[~kept]
    assert table.remove(gone) == len(gone)
    assert not present(table, gone).any()
    np.testing.assert_array_equal(table.find(keys[::3]).handles, handles[::3])
    np.testing.assert_array_equal(table.lookup(keys[::3]), values[::3])
    insert(table, arr(*COLLIDING))  # refill and force rehashes with the colliding keys
    assert present(table, COLLIDING).all() and table.stats().rows == len(COLLIDING)
    np.testing.assert_array_equal(table.lookup(keys[kept]), values[kept])


# -- arena: rows never move, freed rows are reused -----------------------------------------------
def test_rows_never_move_when_table_grows_into_new_chunks():
    table = make_table(optimizer=Sgd(lr=1.0))
    keys = arr(*ADVERSARIAL)
    handles = insert(table, keys)
    table.apply_gradients(keys, np.ones((len(keys), 4), np.float32))
    values, chunk, address = table.lookup(keys), table.arena.chunks[0][0], int(table.arena.directory[0, 0])
    assert address == chunk.ctypes.data
    insert(table, np.arange(5 * CHUNK_ROWS, dtype=np.int64) + 10**12)
    assert len(table.arena.chunks[0]) >= 6 and table.arena.directory.shape[1] > 4
    assert table.arena.chunks[0][0] is chunk and int(table.arena.directory[0, 0]) == address
    np.testing.assert_array_equal(table.find(keys).handles, handles)
    np.testing.assert_array_equal(table.lookup(keys), values)
    np.testing.assert_array_equal(chunk[(handles >> SHARD_BITS) & (CHUNK_ROWS - 1)], values)


@pytest.mark.parametrize(("dim", "boundary"), [(32, 2 << 20), (4, 64)], ids=["2 MiB chunks", "256 KiB chunks"])
def test_chunks_start_on_huge_page_boundaries_so_the_kernel_can_back_them_with_huge_pages(dim, boundary):
    """Chunks too small for a huge page start on a cache line."""
    table = make_table(num_shards=2, dim=dim)
    insert(table, np.arange(3 * CHUNK_ROWS, dtype=np.int64))
    chunks = [c for shard in table.arena.chunks for c in shard]
    assert len(chunks) >= 3
    assert all(c.ctypes.data % boundary == 0 and c.shape == (CHUNK_ROWS, table.width) for c in chunks)


def test_reserved_rows_are_allocated_up_front_and_fill_without_a_new_chunk():
    keys = np.arange(3 * CHUNK_ROWS, dtype=np.int64) * 7919
    plain, reserved = make_table(num_shards=2), make_table(num_shards=2, reserve_rows=4 * CHUNK_ROWS)
    allocated = reserved.stats().allocated_bytes
    assert allocated == 4 * CHUNK_ROWS * reserved.width * 4 and reserved.stats().rows == 0
    assert reserved.stats().index_bytes < plain.stats().index_bytes + 4096  # no index memory yet
    np.testing.assert_array_equal(insert(reserved, keys), insert(plain, keys))
    np.testing.assert_array_equal(reserved.lookup(keys), plain.lookup(keys))
    assert reserved.stats().allocated_bytes == allocated
    assert reserved.stats().overhead_bytes_per_row <= plain.stats().overhead_bytes_per_row
    insert(reserved, np.arange(2 * CHUNK_ROWS, dtype=np.int64) - 10**9)  # grows past the reserve
    assert reserved.stats().rows == 5 * CHUNK_ROWS and reserved.stats().allocated_bytes > allocated


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident memory from /proc (Linux)")
def test_a_few_reserved_wide_rows_touch_the_memory_of_those_rows_not_of_their_whole_chunks():
    """8 rows of dim 1024 with Adam are 96 KiB; their chunks, 16,384 rows a shard, 768 MiB."""
    before = _resident_bytes()
    table = EmbeddingTable(TableConfig(name="wide", dim=1024, optimizer=Adam(), num_shards=4, reserve_rows=8))
    assert table.stats().allocated_bytes == 4 * CHUNK_ROWS * table.width * 4
    assert _resident_bytes() - before < 64 << 20


def _present_pages(low: int, high: int) -> list[bool]:
    """Whether each page of [low, high) of this process is in memory (/proc/self/pagemap's bit 63)."""
    page = os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(low // page * 8)
        entries = np.frombuffer(f.read((high - low) // page * 8), dtype=np.uint64)
    return [bool(e >> np.uint64(63)) for e in entries]


@pytest.mark.skipif(not os.access("/proc/self/pagemap", os.R_OK), reason="reads which pages are in memory (Linux)")
@pytest.mark.parametrize("dim", [16, 32, 64])
def test_a_chunk_of_rows_takes_the_memory_of_its_rows_and_no_more(dim):
    """Chunks were padded by 2 MiB to start on a huge page, padding that could be
    resident: narrow tables held up to twice what stats() reported."""
    table = EmbeddingTable(TableConfig(name="t", dim=dim, num_shards=1, reserve_rows=CHUNK_ROWS))
    chunk = table.arena.chunks[0][0]
    assert chunk.nbytes == table.stats().allocated_bytes == CHUNK_ROWS * dim * 4
    chunk.fill(1.0)  # every row written
    raw = chunk
    while isinstance(raw.base, np.ndarray):  # down to the buffer the chunk was cut from
        raw = raw.base
    low, high = chunk.ctypes.data, chunk.ctypes.data + chunk.nbytes
    if chunk.nbytes < 2 << 20:  # no huge page fits: cache-line aligned on the heap
        assert low % 64 == 0 and raw.nbytes <= chunk.nbytes + 64
        return
    assert low % (2 << 20) == 0  # on huge pages of a mapping of its own, whose slack is never written
    assert all(_present_pages(low, high))
    assert not any(_present_pages(raw.ctypes.data, low)) and not any(_present_pages(high, raw.ctypes.data + raw.nbytes))


def test_reserve_beyond_the_row_cap_is_a_config_error():
    from tidal.errors import ConfigError

    with pytest.raises(ConfigError, match="reserve_rows=11 is more than the table may hold; give at most 10"):
        make_table(max_rows=10, reserve_rows=11)


def test_freed_rows_reused_when_keys_removed():
    table = make_table()
    first = insert(table, np.arange(CHUNK_ROWS, dtype=np.int64))
    allocated = table.stats().allocated_bytes
    table.remove(np.arange(100, 400, dtype=np.int64))
    reused = insert(table, np.arange(300, dtype=np.int64) - 10**6)
    assert set(reused.tolist()) == set(first[100:400].tolist())
    assert table.stats().allocated_bytes == allocated and table.stats().rows == CHUNK_ROWS


@pytest.mark.parametrize("optimizer", [Adagrad(lr=0.5, initial_accumulator_value=0.3), Adam(lr=0.5)], ids=["adagrad", "adam"])
def test_reused_row_starts_with_the_new_keys_initial_values_and_fresh_optimizer_state(optimizer):
    table, fresh = make_table(optimizer=optimizer), make_table(optimizer=optimizer)
    freed = insert(table, arr(10, 20))[0]
    table.apply_gradients(arr(10, 20), np.full((2, 4), 3.0, np.float32))
    table.remove(arr(10))
    assert insert(table, arr(30))[0] == freed
    insert(fresh, arr(30))
    reused, untouched = table.pull_rows(arr(30))[0], fresh.pull_rows(arr(30))[0]
    np.testing.assert_array_equal(reused.values, untouched.values)
    np.testing.assert_array_equal(reused.state, untouched.state)
    assert table.pull_rows(arr(20))[0].state.tolist() != untouched.state.tolist()  # the update did move state


# -- serving lookups and admission ---------------------------------------------------------------
def test_lookup_reads_zeros_and_counts_misses_when_keys_absent():
    table = make_table()
    insert(table, arr(1, 2))
    values = table.lookup(arr(1, 99, 2, -5, 99))
    np.testing.assert_array_equal(values[[1, 3, 4]], 0.0)
    np.testing.assert_array_equal(values[[0, 2]], table.pull_rows(arr(1, 2))[0].values)
    assert table.stats().rows == 2 and table.stats().misses == 3
    assert not present(table, arr(99, -5)).any()


def test_count_admission_creates_row_on_third_sighting_when_min_count_3():
    table = make_table(admission=CountAdmission(min_count=3), initializer=Initializer(scale=1.0))
    for _ in range(2):
        assert insert(table, arr(7)).tolist() == [-1]
        table.apply_gradients(arr(7), np.ones((1, 4), np.float32))
        np.testing.assert_array_equal(table.lookup(arr(7)), 0.0)
        assert table.stats().rows == 0
    assert insert(table, arr(7))[0] >= 0
    s = table.stats()
    assert np.abs(table.lookup(arr(7))).max() > 0 and (s.rows, s.admitted, s.not_admitted) == (1, 1, 2)


@BOTH_LOOKUPS
def test_count_admission_gives_every_sighting_in_a_batch_the_row_its_last_sighting_created(optimizer):
    """Key 7 is admitted by its second sighting in the batch: its first sighting reads the
    same row, not zeros, and both sightings' gradients reach it."""
    table = make_table(admission=CountAdmission(min_count=2), optimizer=optimizer, num_shards=2,
                       eviction=Eviction(capacity_policy="lfu"), max_rows=100)
    keys = arr(7, 5, 7, 9, 9, 9)  # 5 is seen once: turned away
    lookup = table.lookup_or_insert(keys)
    assert lookup.handles[0] == lookup.handles[2] >= 0 and lookup.handles[1] == -1
    assert lookup.handles[3] == lookup.handles[4] == lookup.handles[5] >= 0
    s = table.stats()
    assert (s.rows, s.admitted, s.not_admitted) == (2, 2, 1)
    if lookup.unique is not None:  # each row listed once, every sighting numbered
        assert len(lookup.unique) == 2 and (lookup.numbers >= 0).sum() == 5
    assert table.pull_rows(arr(7, 9))[0].counts.tolist() == [2, 3]
    before = table.lookup(arr(7))
    grad = np.arange(24, dtype=np.float32).reshape(6, 4)
    table.apply_grouped(lookup, grad, np.arange(6), np.ones(6, np.float32))
    if optimizer.kind == "sgd":
        np.testing.assert_allclose(table.lookup(arr(7)), before - optimizer.lr * (grad[0] + grad[2]), rtol=1e-6)


def test_probability_admission_admits_about_30_percent_reproducibly_when_p_0_3():
    keys, admission = np.arange(20_000, dtype=np.int64) * 7919, ProbabilityAdmission(probability=0.3)
    first, again, other = (insert(make_table(admission=admission, num_shards=8, seed=seed), keys)
                           for seed in (0, 0, 1))
    assert (first >= 0).mean() == pytest.approx(0.3, abs=0.02)
    np.testing.assert_array_equal(first, again)
    assert ((other >= 0) != (first >= 0)).any()


def test_stats_misses_count_only_serving_lookups_when_gradients_hit_absent_keys():
    """`misses` are documented as serving lookups of absent keys (TableStats)."""
    table = make_table(admission=CountAdmission(min_count=5))
    insert(table, arr(3))
    table.apply_gradients(arr(3), np.ones((1, 4), np.float32))
    assert table.stats().misses == 0


# -- eviction and row caps -----------------------------------------------------------------------
@BOTH_LOOKUPS
def test_ttl_evicts_rows_unseen_for_more_than_ttl_steps_when_evict_called(optimizer):
    table = make_table(eviction=Eviction(ttl_steps=3), optimizer=optimizer)
    insert(table, arr(1, 2))  # step 1
    sight(table, (2, 3))  # steps 2..4
    assert table.evict() == 0  # key 1 unseen for exactly 3 steps
    sight(table, (2, 1))  # step 5
    assert present(table, arr(1, 2)).all()  # nothing goes before evict()
    assert table.evict() == 1
    assert present(table, arr(1, 2)).tolist() == [False, True] and table.stats().evicted == 1


@BOTH_LOOKUPS
def test_saves_take_no_step_so_rows_age_toward_their_ttl_by_lookups_only(optimizer, tmp_path):
    saved, unsaved = (make_table(eviction=Eviction(ttl_steps=3), optimizer=optimizer) for _ in range(2))
    for table in (saved, unsaved):
        insert(table, arr(1, 2))  # step 1
        sight(table, (2, 2))  # steps 2, 3
    for n in range(3):
        saved.save(tmp_path / f"full-{n}")
    for table in (saved, unsaved):
        sight(table, (2, 1))  # step 4: key 1 unseen for exactly 3 steps
        assert table.step == 4 and table.evict() == 0
    assert saved.pull_rows(arr(1, 2))[0].last_seen.tolist() == unsaved.pull_rows(arr(1, 2))[0].last_seen.tolist() == [1, 4]


def test_a_save_committing_after_later_lookups_leaves_their_steps_and_updates_counted(tmp_path):
    table = make_table(optimizer=Adam(lr=0.1))
    insert(table, arr(1, 2))
    clocks = table.clocks_after_save()  # a save begins; another thread goes on training meanwhile
    insert(table, arr(1))
    table.apply_gradients(arr(1), np.ones((1, 4), np.float32))
    table.mark_saved(clocks, "ckpt-1")
    assert table.clocks() == {"step": 2, "updates": 1, "saved_step": 1}


def test_apply_gradients_marks_its_rows_seen_whether_or_not_the_table_was_saved(tmp_path):
    found = []
    for saved in (False, True):
        table = make_table(eviction=Eviction(ttl_steps=3))
        insert(table, arr(1, 2))  # step 1
        sight(table, (2, 2))  # steps 2, 3
        if saved:
            table.save(tmp_path / "full")
        table.apply_gradients(arr(1), np.ones((1, 4), np.float32))  # at step 3
        sight(table, (2, 2))  # steps 4, 5
        found.append((table.pull_rows(arr(1, 2))[0].last_seen.tolist(), table.evict()))
    assert found == [([3, 5], 0), ([3, 5], 0)]


@BOTH_LOOKUPS
def test_lookups_given_their_steps_out_of_order_leave_the_table_of_lookups_in_order(optimizer):
    """A pipeline may look batch 3 up before batch 2: each row keeps the latest step
    that saw it, and the table's step is the latest given. (Under admission, which
    sighting creates a row depends on their order: the engine keeps lookups in order.)"""
    batches = {1: arr(1, 2, 3), 2: arr(2, 4, 4), 3: arr(3, 4, 5)}
    in_order, shuffled = (make_table(optimizer=optimizer, num_shards=2) for _ in range(2))
    for step in (1, 2, 3):
        in_order.lookup_or_insert(batches[step])
    for step in (3, 1, 2):
        shuffled.lookup_or_insert(batches[step], step=step)
    keys = arr(1, 2, 3, 4, 5)
    a, b = in_order.pull_rows(keys), shuffled.pull_rows(keys)
    assert a[1].tolist() == b[1].tolist() and a[0].last_seen.tolist() == b[0].last_seen.tolist()
    np.testing.assert_array_equal(a[0].values, b[0].values)
    assert in_order.step == shuffled.step == 3


def test_lookup_refuses_a_step_before_the_last_save(tmp_path):
    table = make_table()
    insert(table, arr(1))
    insert(table, arr(2))
    table.save(tmp_path)
    with pytest.raises(BatchError, match=r"may not be before the last save \(step 2\), got 1"):
        table.lookup_or_insert(arr(3), step=1)
    with pytest.raises(BatchError, match="must be at least 1, got 0"):
        make_table().lookup_or_insert(arr(3), step=0)
    assert table.lookup_or_insert(arr(3), step=2).handles[0] >= 0  # the save's own step: in the next delta


@BOTH_LOOKUPS
def test_lru_cap_evicts_oldest_rows_when_over_max_rows(optimizer):
    table = make_table(num_shards=8, max_rows=3, eviction=Eviction(capacity_policy="lru"), optimizer=optimizer)
    sight(table, *[(key, 1) for key in (1, 2, 3, 4, 5, 1)])
    assert table.stats().rows == 5 and table.stats().evicted == 0
    assert table.evict() == 2
    assert present(table, arr(1, 2, 3, 4, 5)).tolist() == [True, False, False, True, True]


@BOTH_LOOKUPS
def test_lfu_cap_evicts_least_counted_rows_when_over_max_rows(optimizer):
    table = make_table(num_shards=8, max_rows=2, eviction=Eviction(capacity_policy="lfu"), optimizer=optimizer)
    sight(table, (10, 5), (20, 1), (30, 3))
    assert table.pull_rows(arr(10, 20, 30))[0].counts.tolist() == [5, 1, 3]
    assert table.evict() == 1
    assert present(table, arr(10, 20, 30)).tolist() == [True, False, True]


@BOTH_LOOKUPS
def test_lfu_counts_stop_at_their_largest_value_so_the_hottest_row_stays_hottest(optimizer):
    """An audit's find: a count near 2**32 (a warm start carries counts on) wrapped to 0,
    and LFU then evicted the most used row first."""
    table = make_table(max_rows=2, eviction=Eviction(capacity_policy="lfu"), optimizer=optimizer)
    most = np.iinfo(np.uint32).max
    table.push_rows(RowBlock(keys=arr(1, 2, 3), values=np.zeros((3, 4), np.float32),
                             state=np.zeros((3, table.optimizer.state_width), np.float32),
                             last_seen=np.zeros(3, np.uint32), counts=np.array([most - 1, 5, 1], np.uint32)))
    sight(table, (1, 3))
    assert table.pull_rows(arr(1))[0].counts.tolist() == [most]
    assert table.evict() == 1
    assert present(table, arr(1, 2, 3)).tolist() == [True, True, False]


@BOTH_LOOKUPS
def test_lfu_counts_start_fresh_when_new_key_reuses_removed_row(optimizer):
    table = make_table(max_rows=2, eviction=Eviction(capacity_policy="lfu"), optimizer=optimizer)
    sight(table, (10, 5), (20, 3))
    table.remove(arr(10))
    sight(table, (30, 1), (40, 2))  # key 30 takes the row key 10 freed
    assert table.pull_rows(arr(30))[0].counts.tolist() == [1]
    table.evict()
    assert present(table, arr(20, 30, 40)).tolist() == [True, False, True]


def test_new_keys_refused_and_counted_when_max_rows_reached_without_eviction():
    table = make_table(max_rows=5)
    handles = insert(table, np.arange(8, dtype=np.int64))
    assert (handles >= 0).tolist() == [True] * 5 + [False] * 3
    assert table.stats().rows == 5 and table.stats().dropped_full == 3 and table.evict() == 0
    table.remove(arr(0))
    assert insert(table, arr(100))[0] >= 0 and insert(table, arr(101))[0] == -1


def test_rows_never_exceed_max_rows_when_cap_not_multiple_of_shards():
    table = make_table(num_shards=8, max_rows=10)
    insert(table, np.arange(200, dtype=np.int64))
    assert table.stats().rows <= 10


def test_row_cap_comes_from_memory_bytes_when_set():
    assert make_table(memory_bytes=4000).row_cap == 100  # 4 x 4 value bytes + 24 per row
    assert make_table(memory_bytes=4000, max_rows=50).row_cap == 50
    assert make_table(memory_bytes=4000, optimizer=Adagrad()).row_cap == 4000 // 56
    assert make_table().row_cap is None
    table = make_table(memory_bytes=4000)
    insert(table, np.arange(150, dtype=np.int64))
    assert table.stats().rows == 100 and table.stats().dropped_full == 50


# -- statistics ----------------------------------------------------------------------------------
def test_stats_fields_add_up_when_rows_inserted_looked_up_and_removed():
    table = make_table(dim=8, num_shards=4, optimizer=Adagrad())
    insert(table, np.arange(1000, dtype=np.int64))
    table.lookup(np.arange(800, 1100, dtype=np.int64))
    table.remove(np.arange(200, dtype=np.int64))
    s = table.stats()
    assert (s.rows, s.lookups, s.misses, s.admitted) == (800, 1300, 100, 1000)
    assert (s.evicted, s.dropped_full) == (200, 0)
    assert s.value_bytes == s.state_bytes == 800 * 8 * 4
    assert s.allocated_bytes == sum(map(len, table.arena.chunks)) * CHUNK_ROWS * 16 * 4 == 4 * CHUNK_ROWS * 64
    assert s.index_bytes >= 4 * 1024 * 4 + 1000 * 8 and s.metadata_bytes >= 1000 * 4
    assert s.overhead_bytes_per_row == (s.index_bytes + s.metadata_bytes) / 800


# -- threads -------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer, threads", [(Sgd(lr=1.0), 1), (Adagrad(lr=1.0), 2)], ids=["sgd", "adagrad"])
def test_rows_exact_when_six_threads_insert_update_and_read_one_table(optimizer, threads):
    """Six trainers and two readers at once on one table (itself using `threads`): every
    key keeps one row, and every row took every gradient of ones. SGD's values count its
    ids; Adagrad's accumulators sum the square of each batch's count of the key, exact
    whatever order the threads took."""
    table = make_table(num_shards=8, optimizer=optimizer, initializer=Initializer(kind="zeros"), threads=threads)
    rng = np.random.default_rng(0)
    pool = np.union1d(rng.integers(INT64_MIN, INT64_MAX, 1500, dtype=np.int64), arr(*ADVERSARIAL))
    absent = np.setdiff1d(rng.integers(INT64_MIN, INT64_MAX, 500, dtype=np.int64), pool)
    trainers, iterations, batch = 6, 150, 96
    applied, squared = np.zeros((trainers, len(pool)), np.int64), np.zeros((trainers, len(pool)), np.int64)
    handles = np.full((trainers, len(pool)), -1, np.int64)
    done, start = threading.Event(), threading.Barrier(trainers + 2)

    def train(t):
        local = np.random.default_rng(100 + t)
        start.wait()
        for _ in range(iterations):
            idx = local.integers(0, len(pool), batch)
            got = insert(table, pool[idx])
            assert (got >= 0).all() and ((handles[t, idx] == -1) | (handles[t, idx] == got)).all()
            handles[t, idx] = got
            table.apply_gradients(pool[idx], np.ones((batch, 4), np.float32))
            counts = np.bincount(idx, minlength=len(pool))
            applied[t] += counts
            squared[t] += counts**2

    def read(r):
        local = np.random.default_rng(200 + r)
        start.wait()
        while not done.is_set():
            values = table.lookup(pool[local.integers(0, len(pool), 64)])
            assert (values <= 0).all() and (optimizer.kind != "sgd" or (values == np.round(values)).all())
            np.testing.assert_array_equal(table.lookup(absent), 0.0)

    with ThreadPoolExecutor(trainers + 2) as executor:
        readers = [executor.submit(read, r) for r in range(2)]
        for future in [executor.submit(train, t) for t in range(trainers)]:
            future.result()
        done.set()
        for future in readers:
            future.result()
    touched, final = applied.sum(axis=0) > 0, table.find(pool).handles
    assert (final[touched] >= 0).all() and (final[~touched] == -1).all()
    assert len(np.unique(final[touched])) == touched.sum() == table.stats().rows
    np.testing.assert_array_equal(handles[handles >= 0], np.broadcast_to(final, handles.shape)[handles >= 0])
    rows = table.pull_rows(pool[touched])[0]
    if optimizer.kind == "sgd":
        np.testing.assert_array_equal(rows.values, -np.repeat(applied.sum(axis=0)[touched, None], 4, axis=1))
    else:
        np.testing.assert_array_equal(rows.state, np.repeat(squared.sum(axis=0)[touched, None], 4, axis=1))
        assert (rows.values < 0).all()


@pytest.mark.parametrize("optimizer, threads", [(Sgd(lr=1.0), 1), (Adagrad(lr=1.0), 2)], ids=["sgd", "adagrad"])
def test_no_update_lost_when_six_threads_update_the_same_64_rows(optimizer, threads):
    """Every batch touches every row, so updates overlap all the time: without the
    shard locks, some increments were lost here in every run tried."""
    table = make_table(num_shards=8, optimizer=optimizer, initializer=Initializer(kind="zeros"), threads=threads)
    keys = np.arange(64, dtype=np.int64) * 7919
    counts = [np.random.default_rng(t).integers(0, 64, (60, 4096)) for t in range(6)]

    def train(t):
        for idx in counts[t]:
            table.lookup_or_insert(keys[idx])
            table.apply_gradients(keys[idx], np.ones((len(idx), 4), np.float32))

    with ThreadPoolExecutor(6) as executor:
        list(executor.map(train, range(6)))
    per_batch = np.array([np.bincount(idx, minlength=64) for c in counts for idx in c])  # [batches, 64]
    rows = table.pull_rows(keys)[0]
    if optimizer.kind == "sgd":
        np.testing.assert_array_equal(rows.values[:, 0], -per_batch.sum(axis=0))
    else:
        np.testing.assert_array_equal(rows.state[:, 0], (per_batch**2).sum(axis=0))


def _push(table: EmbeddingTable, keys: np.ndarray, value: float) -> None:
    table.push_rows(RowBlock(keys=keys, values=np.full((len(keys), table.dim), value, np.float32),
                             state=np.zeros((len(keys), table.optimizer.state_width), np.float32),
                             last_seen=np.zeros(len(keys), np.uint32), counts=np.zeros(len(keys), np.uint32)))


def _while_rows_are_removed_and_reused(table: EmbeddingTable, keys: np.ndarray, work, rounds: int = 150) -> np.ndarray:
    """Run `work()` over and over while another thread, `rounds` times, writes ones into
    the rows of `keys`, removes half of them and has new keys take their rows, holding
    twos; returns the new keys."""
    reused = []

    def remove_and_reuse():
        for r in range(rounds):
            _push(table, keys, 1.0)
            table.remove(keys[::2])
            reused.append(np.arange(10**9 + r * len(keys), 10**9 + r * len(keys) + len(keys) // 2))
            _push(table, reused[-1], 2.0)

    remover = threading.Thread(target=remove_and_reuse)
    remover.start()
    try:
        while remover.is_alive():
            work()
    finally:  # a failing `work` too: the remover's rounds end before the test does
        remover.join()
    return np.concatenate(reused)


@pytest.mark.parametrize("num_shards", [1, 8])
def test_an_update_racing_a_remove_never_lands_in_a_row_another_key_took(num_shards):
    """An audit's race: rows freed while a lookup held them went to new keys, and the
    lookup's update wrote into them."""
    table = make_table(num_shards=num_shards, optimizer=Sgd(lr=1.0), initializer=Initializer(kind="zeros"), threads=2)
    keys, refused = np.arange(2000, dtype=np.int64), []

    def train():
        lookup = table.lookup_or_insert(keys)
        try:
            table.apply_grouped(lookup, np.full((len(keys), 4), -1000.0, np.float32), np.arange(len(keys)),
                                np.ones(len(keys), np.float32))
        except BatchError:
            refused.append(1)

    reused = _while_rows_are_removed_and_reused(table, keys, train)
    assert refused  # the race did happen
    assert (table.lookup(reused) == 2.0).all()  # as pushed: no stale update reached them


def test_a_lookup_used_inside_holding_rows_while_an_eviction_waits_does_not_deadlock():
    """An audit's hang: inside `holding_rows` the table's own methods took its gate
    again, behind an eviction waiting for the block to end."""
    table = make_table(optimizer=Sgd(lr=1.0), initializer=Initializer(kind="zeros"), eviction=Eviction(ttl_steps=100))
    lookup, evicting = table.lookup_or_insert(np.arange(10)), threading.Event()
    evictor = threading.Thread(target=lambda: (evicting.wait(), table.evict()))
    evictor.start()
    with table.holding_rows():
        table.check_lookup(lookup)
        evicting.set()
        until(lambda: table._gate._exclusive_waiting, "the eviction waiting for the block")
        table.apply_grouped(lookup, np.ones((10, 4), np.float32), np.arange(10), np.ones(10, np.float32))
        assert (table.lookup(np.arange(10)) == -1.0).all()
        with pytest.raises(RuntimeError, match="would wait for itself forever"):
            table.remove(np.array([3]))
    evictor.join(timeout=10)
    assert not evictor.is_alive()


def test_an_eviction_refused_inside_holding_rows_leaves_admission_counts_as_they_were():
    table = make_table(admission=CountAdmission(min_count=3), eviction=Eviction(ttl_steps=100))
    insert(table, arr(7, 7))
    with table.holding_rows(), pytest.raises(RuntimeError, match="would wait for itself forever"):
        table.evict()
    assert (insert(table, arr(7)) >= 0).tolist() == [True]  # its third sighting: admitted


def test_a_lookup_racing_a_remove_reads_no_row_another_key_took():
    table = make_table(num_shards=8, optimizer=Sgd(lr=1.0), initializer=Initializer(kind="zeros"), threads=2)
    keys, seen = np.arange(2000, dtype=np.int64), []

    def read():
        values = table.lookup(keys)[:, 0]
        seen.append(bool(np.isin(values, (0.0, 1.0)).all()))  # its own row (new, or ones), or absent

    _while_rows_are_removed_and_reused(table, keys, read)
    assert len(seen) > 10 and all(seen)


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("keys", [np.array([1.5, 2.0]), np.zeros((2, 3), np.int64), np.array(["a", "b"]),
                                  np.array([True, False])])
@pytest.mark.parametrize("verb", ["lookup", "lookup_or_insert", "find", "remove", "apply_gradients"])
def test_bad_keys_raise_batch_error_naming_table_shape_and_dtype(verb, keys):
    table = make_table(name="user_id")
    args = (keys, np.ones((2, 4), np.float32)) if verb == "apply_gradients" else (keys,)
    with pytest.raises(BatchError) as info:
        getattr(table, verb)(*args)
    assert all(part in str(info.value) for part in ("'user_id'", str(keys.shape), str(keys.dtype)))
    assert table.stats().rows == 0


def test_a_list_of_ids_takes_uint64_ids_as_a_uint64_array_does():
    table = make_table()
    listed = table.lookup_or_insert([-1, 2**64 - 1, 2**63]).handles  # numpy alone made this list float64
    assert listed.tolist() == table.lookup_or_insert(np.array([2**64 - 1, 2**64 - 1, 2**63], np.uint64)).handles.tolist()
    assert table.stats().rows == 2
    with pytest.raises(BatchError, match=rf"table 't': ids must fit in 64 bits \(int64, or uint64\), got {2**64}"):
        table.lookup_or_insert([1, 2**64])


@pytest.mark.parametrize("shape", [(3, 5), (2, 4), (3,), (3, 4, 1)])
def test_apply_gradients_raises_batch_error_when_grad_shape_wrong(shape):
    table = make_table(name="items")
    insert(table, arr(1, 2, 3))
    with pytest.raises(BatchError, match=r"'items'.*\(3, 4\).*" + rf"\({shape[0]}"):
        table.apply_gradients(arr(1, 2, 3), np.ones(shape, np.float32))


def test_apply_gradients_raises_batch_error_when_grads_are_not_readable_as_floats():
    table = make_table(name="items")
    insert(table, arr(1, 2, 3))
    before = table.lookup(arr(1, 2, 3)).copy()
    for wrong, came in [([["a"] * 4] * 3, "dtype <U1"), (np.ones((3, 4), complex), "dtype complex128"),
                        (torch.ones(3, 4, dtype=torch.complex64), "dtype complex64"),
                        (torch.ones(3, 4, dtype=torch.bool), "dtype bool"), ([[1.0] * 4, [1.0]], "list")]:
        with pytest.raises(BatchError, match=rf"'items': grads must be a float array of shape \(3, 4\).*got {came}"):
            table.apply_gradients(arr(1, 2, 3), wrong)
    np.testing.assert_array_equal(table.lookup(arr(1, 2, 3)), before)  # no row moved


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_apply_gradients_takes_half_precision_tensors_as_their_float32_values(dtype):
    table, twin = make_table(), make_table()
    grads = torch.tensor([[0.5, -1.25, 3.0, 0.0078125]] * 2, dtype=dtype)  # exact in both half precisions
    for t, g in ((table, grads), (twin, grads.float().numpy())):
        insert(t, arr(1, 2))
        t.apply_gradients(arr(1, 2), g)
    np.testing.assert_array_equal(table.lookup(arr(1, 2)), twin.lookup(arr(1, 2)))


def test_apply_grouped_refuses_a_lookup_from_another_table_or_gradients_that_do_not_fit():
    table, other = make_table(), make_table()
    lookup = other.lookup_or_insert(arr(1, 2))
    grad, sources, scales = np.zeros((2, 4), np.float32), np.arange(2), np.ones(2, np.float32)
    with pytest.raises(BatchError, match="came from another table"):
        table.apply_grouped(lookup, grad, sources, scales)
    own = table.lookup_or_insert(arr(1, 2, 3))
    with pytest.raises(BatchError, match=r"gradient rows \[2, 4\] with 2 sources and 2 scales do not fit 3 keys"):
        table.apply_grouped(own, grad, sources, scales)


def test_lookup_numbers_each_shards_rows_and_places_its_keys():
    table = make_table(num_shards=2, optimizer=Adagrad(lr=0.1), admission=CountAdmission(min_count=3))
    sight(table, (7, 3), (8, 3))
    keys = arr(7, 9, 8, 7, 9, 8, 8)  # 9 is seen twice: not admitted, no row
    lookup = table.lookup_or_insert(keys)
    shard = {int(k): s for s in range(2) for k in keys[lookup.order[lookup.key_offsets[s]:lookup.key_offsets[s + 1]]]}
    for j, (position, number) in enumerate(zip(lookup.order, lookup.numbers)):
        if keys[position] == 9:
            assert number == -1 and lookup.handles[position] == -1
        else:
            assert lookup.unique[lookup.shard_offsets[shard[int(keys[position])]] + number] == lookup.handles[position]
    assert sorted(lookup.order.tolist()) == list(range(7)) and len(lookup.unique) == 2


def test_sgd_lookups_list_no_distinct_rows_yet_find_update_and_mark_the_same_rows():
    """Plain SGD needs no row's gradients summed first, so its lookups skip listing the
    distinct rows; they find the rows an Adagrad table's lookups find, and mark them seen
    when looked up; an update after later lookups keeps the step of its own batch (a save
    in between marks them again: test_rows_looked_up_before_a_save_and_updated_after_are_in_the_next_delta)."""
    listed, bare = (make_table(num_shards=2, optimizer=opt, admission=CountAdmission(min_count=2))
                    for opt in (Adagrad(lr=0.1), Sgd(lr=0.1)))
    keys = arr(7, 9, 8, 7, 8, 8, 5)  # 9 and 5 are seen once: not admitted, no row
    for table in (listed, bare):
        sight(table, (7, 1), (8, 1), (3, 3))  # 7 and 8 last seen at steps 1 and 2
    a, b = listed.lookup_or_insert(keys), bare.lookup_or_insert(keys)  # step 6
    assert a.unique is not None and b.unique is None and b.numbers is None and b.shard_offsets is None
    np.testing.assert_array_equal(a.handles, b.handles)
    np.testing.assert_array_equal(bare.find(keys).handles, a.handles)
    assert listed.pull_rows(keys)[0].last_seen.tolist() == bare.pull_rows(keys)[0].last_seen.tolist() == [6, 0, 6, 6, 6, 6, 0]
    before = bare.lookup(arr(7, 8))
    insert(bare, arr(3))  # step 7: a later batch's lookup, as a pipeline makes before this update
    bare.apply_grouped(b, np.ones((1, 4), np.float32), np.zeros(7, np.int64), np.ones(7, np.float32))
    np.testing.assert_allclose(bare.lookup(arr(7, 8)), before - np.array([[0.2], [0.3]], np.float32), rtol=1e-6)
    assert bare.pull_rows(keys)[0].last_seen.tolist() == [6, 0, 6, 6, 6, 6, 0]


def test_mark_seen_skips_keys_without_a_row():
    last_seen = np.zeros(4, np.uint32)
    pooling.mark_seen(last_seen, np.array([2 << SHARD_BITS, -1]), np.uint32(9))
    assert last_seen.tolist() == [0, 0, 9, 0]


def test_push_rows_refuses_repeated_keys_and_reports_rows_refused_by_the_cap():
    table = make_table(max_rows=2)
    block, _ = make_table().pull_rows(arr(1, 2, 3))
    for repeated in (arr(1, 1, 2), arr(3, 1, 3)):  # in order or not
        with pytest.raises(BatchError, match="pushed keys must be distinct"):
            table.push_rows(type(block)(keys=repeated, values=block.values, state=block.state,
                                        last_seen=block.last_seen, counts=block.counts))
    stored = table.push_rows(block)
    assert stored.sum() == 2 and table.stats().dropped_full == 1


@pytest.mark.parametrize("counts", [None, "short"])
def test_push_rows_checks_its_metadata_before_writing_a_row(counts):
    from tidal.config import Eviction

    table = make_table(eviction=Eviction(capacity_policy="lfu"), max_rows=100)  # LFU keeps counts
    block, _ = make_table().pull_rows(arr(1, 2, 3))
    bad = type(block)(keys=block.keys, values=block.values, state=block.state, last_seen=block.last_seen,
                      counts=None if counts is None else block.counts[:2])
    with pytest.raises(BatchError, match="pushed last_seen and counts must have one entry per key"):
        table.push_rows(bad)
    assert table.stats().rows == 0  # nothing half written


@pytest.mark.parametrize(("last_seen", "shown"), [(np.array([5, 1 << 31], np.int64), "5 to 2147483648"),
                                                 (np.array([5, -1]), "-1 to 5"),
                                                 (np.array([5.0, 6.0]), "float64")])
def test_push_rows_refuses_steps_no_table_reaches(last_seen, shown):
    """A step's top bit marks rows while a lookup runs: a row pushed with it would take
    other keys' gradients, and its table's checkpoint would not load."""
    table = make_table(optimizer=Adagrad(lr=0.1))
    block, _ = make_table(optimizer=Adagrad(lr=0.1)).pull_rows(arr(1, 2))
    with pytest.raises(BatchError, match=f"pushed last_seen must be steps from 0 to 2147483647, got {shown}; no row"):
        table.push_rows(replace(block, last_seen=last_seen), keep_last_seen=True)
    assert table.stats().rows == 0
    assert table.push_rows(replace(block, last_seen=last_seen), keep_last_seen=False).all()  # stamped now


@pytest.mark.parametrize(("counts", "shown"), [(np.array([1, -1]), "-1 to 1"), (np.array([1.0, np.nan]), "float64")])
def test_push_rows_refuses_counts_that_are_not_whole_numbers_a_uint32_holds(counts, shown):
    table = make_table(optimizer=Adagrad(lr=0.1), eviction=Eviction(capacity_policy="lfu"), max_rows=100)
    block, _ = make_table(optimizer=Adagrad(lr=0.1)).pull_rows(arr(1, 2))
    with pytest.raises(BatchError, match=f"pushed counts must be whole numbers from 0 to 4294967295, got {shown}"):
        table.push_rows(replace(block, counts=counts))
    assert table.stats().rows == 0


@pytest.mark.parametrize("bad", [np.inf, np.nan])
@pytest.mark.parametrize("where", ["values", "state"])
def test_push_rows_refuses_numbers_that_are_not_finite(bad, where):
    table = make_table(optimizer=Adagrad(lr=0.1))
    block, _ = make_table(optimizer=Adagrad(lr=0.1)).pull_rows(arr(1, 2, 3))
    getattr(block, where)[1, -1] = bad
    with pytest.raises(BatchError, match=r"pushed values and state must be finite, got NaN or infinite numbers in 1 "
                                         r"row \(the first of key 2\); no row was written"):
        table.push_rows(block)
    assert table.stats().rows == 0


@pytest.mark.parametrize("values", [np.array([["a", "b"]]), np.array([[1 + 2j, 1.0]])], ids=["strings", "complex"])
def test_push_rows_refuses_numbers_that_are_not_real(values):
    table = make_table(dim=2)
    block = RowBlock(keys=arr(1), values=values, state=np.zeros((1, 0)), last_seen=arr(0), counts=arr(0))
    with pytest.raises(BatchError, match=rf"pushed values must be real numbers \(floats or integers\), got dtype "
                                         rf"{re.escape(str(values.dtype))}; no row was written"):
        table.push_rows(block)
    assert table.stats().rows == 0


@pytest.mark.parametrize(("optimizer", "column"), [(Adagrad(lr=0.1), 0), (Adam(lr=0.1), 2 * 4 - 1), (Ftrl(), 4)],
                         ids=["adagrad", "adam v", "ftrl n"])
def test_push_rows_refuses_a_negative_sum_of_squares_and_takes_a_negative_mean(optimizer, column):
    """A square root of the negative accumulator would put NaN in the row for good."""
    table = make_table(optimizer=optimizer)
    block, _ = make_table(optimizer=optimizer).pull_rows(arr(1, 2, 3))
    block.state[2, column] = -0.5
    with pytest.raises(BatchError, match=rf"pushed optimizer state holds a negative sum of squares or step in 1 row "
                                         rf"\(the first of key 3\), which {optimizer.kind} never keeps; no row"):
        table.push_rows(block)
    assert table.stats().rows == 0
    if isinstance(optimizer, Adam):  # its first moment may be negative
        block.state[2, column], block.state[2, 0] = 0.0, -0.5
        assert table.push_rows(block).all()


def test_a_cap_without_eviction_under_one_row_a_shard_is_refused():
    with pytest.raises(ConfigError, match=r"max_rows 3 is under num_shards \(8\); without eviction each shard keeps "
                                          r"an even share of the cap"):
        make_table(num_shards=8, max_rows=3)
    make_table(num_shards=8, max_rows=3, eviction=Eviction(capacity_policy="lru"))  # evict() trims the whole table
    make_table(num_shards=8, max_rows=8)
    with pytest.raises(ConfigError, match=r"memory_bytes 400 \(which pays for 2 rows\) is under num_shards \(8\)"):
        make_table(num_shards=8, dim=16, optimizer=Adagrad(), memory_bytes=400)  # 4 x (16 + 16) + 24 = 152 a row
    assert make_table(num_shards=8, dim=16, optimizer=Adagrad(), memory_bytes=8 * 152).row_cap == 8


def test_memory_budget_below_one_row_is_refused_with_the_config():
    with pytest.raises(ConfigError, match=r"memory_bytes 30 pays for no row of 40 bytes \(4 x \(dim \+ optimizer "
                                          r"state\) \+ 24 of index\); give at least 40"):
        TableConfig(name="t", dim=4, memory_bytes=30)



def test_evict_ages_admission_counts_when_keys_stop_coming():
    table = make_table(admission=CountAdmission(min_count=2, sketch_width=4096))
    insert(table, arr(5))  # one sighting
    table.evict()  # halves it to zero
    assert insert(table, arr(5))[0] == -1  # one sighting again: not yet admitted
    assert insert(table, arr(5))[0] >= 0


def test_calls_with_the_wrong_kind_of_argument_say_what_was_expected(tmp_path):
    with pytest.raises(ConfigError, match=r"EmbeddingTable: config: expected TableConfig, got dict; build one with"):
        EmbeddingTable({"name": "t", "dim": 4})
    for threads in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match=rf"table 't': threads must be an integer >= 1, got {threads!r}"):
            make_table(threads=threads)
    table = make_table()
    for step in (2.7, "5", True):
        with pytest.raises(BatchError, match=rf"a lookup's step must be an integer, got {step!r}"):
            table.lookup_or_insert(arr(1), step=step)
    with pytest.raises(BatchError, match=r"a lookup's step must be below 2147483648, got 1099511627776"):
        table.lookup_or_insert(arr(1), step=2**40)
    grads = np.ones((2, 4), np.float32)
    grads[1, 2] = np.inf
    for wrong in (grads, np.where(np.isinf(grads), 1e39, grads.astype(np.float64))):  # 1e39: finite in float64, not in float32
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no numpy overflow warning before the message
            with pytest.raises(BatchError, match=r"grads must be finite in float32 \(magnitudes up to 3\.4e38\), got 1 "
                                                 r"NaN or infinite values; no row was updated"):
                table.apply_gradients(arr(1, 2), wrong)
    assert table.stats().rows == 0
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match=r"expected a list of EmbeddingTables to save, got EmbeddingTable"):
        save_tables(tmp_path / "ckpt", table)
    with pytest.raises(CheckpointError, match=r"expected a list of EmbeddingTables to save, got a list holding \['str'\]"):
        save_tables(tmp_path / "ckpt", ["t"])
    with pytest.raises(CheckpointError, match=r"^a save takes the folder first, then the tables \(save_tables\(root, "
                                              r"tables\)\); got a list where the folder goes$"):
        save_tables([table], str(tmp_path / "ckpt"))  # named the tables as the folder, "got str"
    with pytest.raises(CheckpointError, match=r"file is a file; expected a folder to hold the checkpoints"):
        save_tables(tmp_path / "file", [table])


def test_apply_gradients_is_never_refused_by_a_removal_between_its_find_and_its_update():
    table = make_table(num_shards=8, optimizer=Sgd(lr=1.0), initializer=Initializer(kind="zeros"), threads=2)
    keys, calls = np.arange(2000, dtype=np.int64), []
    kept = keys[1::2]  # the remover takes only keys[::2]

    def update():
        table.apply_gradients(kept, np.zeros((len(kept), 4), np.float32))  # a BatchError here fails the test
        calls.append(1)

    _while_rows_are_removed_and_reused(table, keys, update)
    assert len(calls) > 10


@pytest.mark.parametrize("policy", [None, "lfu"])
def test_pushed_rows_keep_their_counts_and_are_marked_seen_now_in_every_shard(policy):
    from tidal.config import Eviction

    eviction = Eviction(capacity_policy=policy) if policy else None  # lfu keeps counts
    table = make_table(num_shards=4, eviction=eviction, max_rows=1000)
    table.lookup_or_insert(arr(99), step=7)  # the table's step is 7
    keys = np.arange(-20, 20, dtype=np.int64) * 1_000_003
    values = np.arange(len(keys) * 4, dtype=np.float32).reshape(-1, 4)
    counts = np.arange(len(keys), dtype=np.uint32) + 3
    from tidal.embedding import RowBlock

    table.push_rows(RowBlock(keys=keys, values=values, state=np.zeros((len(keys), 0), np.float32),
                             last_seen=np.zeros(len(keys), np.uint32), counts=counts))
    block, found = table.pull_rows(keys)
    assert found.all() and np.array_equal(block.values, values)
    assert np.array_equal(block.last_seen, np.full(len(keys), table.step, np.uint32))
    assert np.array_equal(block.counts, counts if policy else np.zeros_like(counts))


def test_no_keys_as_an_empty_list_are_no_keys_and_a_tracked_gradient_tensor_is_read_as_its_values():
    table = make_table()
    assert table.lookup_or_insert([]).handles.shape == (0,) and table.lookup([]).shape == (0, table.dim)
    table.remove([])
    table.apply_gradients([], np.zeros((0, table.dim), np.float32))
    insert(table, np.array([5]))
    before = table.lookup([5])
    table.apply_gradients([5], torch.ones(1, table.dim, requires_grad=True))  # as backward takes one
    assert not np.array_equal(before, table.lookup([5]))


def test_an_eviction_holds_the_table_from_choosing_its_rows_to_removing_them(monkeypatch):
    """A lookup between the two had its fresh row evicted as stale, and two evictions at
    once cut a capped table to half its cap (an audit's finds)."""
    table = EmbeddingTable(TableConfig(name="t", dim=4, eviction=Eviction(ttl_steps=2)))
    table.lookup_or_insert(np.array([1]), step=1)
    table.lookup_or_insert(np.array([2]), step=10)
    chosen, looking = EmbeddingTable._live_metadata, []

    def chosen_then_looked_up(self):  # type: ignore[no-untyped-def]
        found = chosen(self)
        looking.append(threading.Thread(target=self.lookup_or_insert, args=(np.array([1]),), kwargs={"step": 10}))
        looking[0].start()
        looking[0].join(0.2)
        assert looking[0].is_alive()  # it waits for the eviction
        return found

    monkeypatch.setattr(EmbeddingTable, "_live_metadata", chosen_then_looked_up)
    assert table.evict() == 1
    looking[0].join()
    monkeypatch.undo()
    assert table.find(np.array([1]), count=False).handles[0] >= 0  # looked up after its row went: a new row
    capped = EmbeddingTable(TableConfig(name="c", dim=4, max_rows=1000, eviction=Eviction(capacity_policy="lru")))
    capped.lookup_or_insert(np.arange(1500))
    with ThreadPoolExecutor(3) as pool:
        assert sorted(pool.map(lambda _: capped.evict(), range(3))) == [0, 0, 500]
    assert capped.stats().rows == 1000
