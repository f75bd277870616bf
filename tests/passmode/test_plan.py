"""Pass plans and the device rows: slots, moves by difference, write-backs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tidal.config import Adagrad, Adam, CountAdmission, EmbeddingFeature, Eviction, Sgd, TableConfig
from tidal.data import SparseBatch
from tidal.embedding import EmbeddingCollection
from tidal.errors import ConfigError, TidalError
from tidal.passmode.plan import ZERO_SLOT, Residency, plan_pass
from tidal.passmode.rows import DeviceRows


def _collection(optimizer=None, **table) -> EmbeddingCollection:
    tables = [TableConfig(name="a", dim=4, optimizer=optimizer or Sgd(lr=0.5), **table), TableConfig(name="b", dim=4)]
    features = [EmbeddingFeature(name="x", table="a"), EmbeddingFeature(name="y", table="b", pooling="mean"),
                EmbeddingFeature(name="z", table="a", pooling="sqrtn")]
    return EmbeddingCollection(tables, features)


def _batch(x, y, z, weights=None) -> SparseBatch:
    return SparseBatch.from_lists({"x": x, "y": y, "z": z}, weights=weights)


def _plan(collection, batches, before=None, first_step=1):
    before = before or Residency.empty(len(collection.tables))
    return plan_pass(collection, [(0, n, b) for n, b in enumerate(batches)], before, first_step)


def test_the_next_pass_moves_only_the_rows_that_differ_and_reuses_freed_slots():
    collection = _collection()
    first = _plan(collection, [_batch([[1, 2]], [[7]], [[3]])])
    assert [m.entering.keys.tolist() for m in first.moves] == [[1, 2, 3], [7]]
    slot = {int(k): int(s) for k, s in zip(first.residency.keys[0], first.residency.slots[0])}
    second = _plan(collection, [_batch([[2, 4]], [[7]], [[3, 5]])], first.residency, first_step=2)
    move = second.moves[0]
    assert move.leaving_keys.tolist() == [1] and move.leaving_slots.tolist() == [slot[1]]
    assert move.entering.keys.tolist() == [4, 5]
    assert move.entering_slots[0] == slot[1]  # the slot key 1 leaves takes the first row that comes in
    assert second.moves[1].entering.keys.size == 0 and second.moves[1].leaving_keys.size == 0  # b's row stays
    after = {int(k): int(s) for k, s in zip(second.residency.keys[0], second.residency.slots[0])}
    assert after[2] == slot[2] and after[3] == slot[3]
    assert second.residency.size == first.residency.size + 1  # one new slot: 5 came in beside 4


def test_ids_without_a_row_read_slot_zero_and_move_nothing():
    collection = _collection(Adagrad(), admission=CountAdmission(min_count=3))
    plan = _plan(collection, [_batch([[1, 1], [2]], [[7], [8]], [[1], [9]]), _batch([[2]], [[7]], [[9]])])
    table_a = plan.moves[0]
    assert table_a.entering.keys.tolist() == [1]  # seen three times in the pass; 2 and 9 twice
    first = plan.batches[0]
    a_slot = plan.residency.slots[0][0]
    assert first.slots[:3].tolist() == [a_slot, a_slot, ZERO_SLOT]  # x: 1, 1 | 2
    update = next(u for u in first.updates if u.table == 0)
    assert update.distinct.tolist() == [a_slot] and update.inverse.tolist() == [0, 0, 0]  # x's 1, 1 and z's 1
    sgd = next(u for u in first.updates if u.table == 1)  # plain SGD lists no distinct rows: it adds id by id
    assert sgd.distinct is None and sgd.slots.shape == (2,)


def test_each_batch_numbers_its_own_distinct_rows():
    collection = _collection(Adagrad())
    plan = _plan(collection, [_batch([[5, 6], [5]], [[7], [7]], [[6], [8]]), _batch([[8]], [[7]], [[6]])])
    for item in plan.batches:
        update = next(u for u in item.updates if u.table == 0)
        assert np.unique(update.distinct).shape == update.distinct.shape
        np.testing.assert_array_equal(update.distinct[update.inverse], update.slots)
    assert plan.batches[1].updates[0].distinct.shape == (2,)  # 8 and 6, not the pass's three keys


def test_device_pooling_equals_the_collection_s_for_every_pooling_mode_and_weight():
    collection = _collection()
    batch = _batch([[1, 2], [], [3]], [[7, 8, 9], [8], [7]], [[1, 3], [2], []],
                   weights={"x": [[0.5, 2.0], [], [1.5]], "y": [[1.0, 2.0, 3.0], [4.0], [0.5]],
                            "z": [[2.0, 1.0], [3.0], []]})
    plan = _plan(collection, [batch])
    rows = DeviceRows(collection, "cpu")
    rows.swap(plan)
    expected, _ = collection.forward(batch, train=False)
    torch.testing.assert_close(rows.pool(plan.batches[0]), expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(rows.values[ZERO_SLOT], torch.zeros(4))


def test_an_update_adds_each_row_s_scaled_gradients_and_flush_writes_them_back():
    collection = _collection()
    batch = _batch([[1, 1]], [[7]], [[1]])
    plan = _plan(collection, [batch])
    rows = DeviceRows(collection, "cpu")
    rows.swap(plan)
    before = collection.tables[0].lookup(np.array([1]))[0]
    grad = torch.zeros(1, 3, 4)
    grad[0, 0], grad[0, 2] = 1.0, 2.0  # x's bag holds key 1 twice; z's (sqrtn of one id) once
    rows.update(plan.batches[0], grad)
    assert np.allclose(collection.tables[0].lookup(np.array([1]))[0], before)  # on the device only, so far
    rows.flush()
    np.testing.assert_allclose(collection.tables[0].lookup(np.array([1]))[0], before - 0.5 * (1 + 1 + 2), rtol=1e-6)


def test_rows_going_back_keep_their_pass_s_step_and_lookup_counts():
    collection = _collection(eviction=Eviction(ttl_steps=100, capacity_policy="lfu"), max_rows=100)
    first = _plan(collection, [_batch([[1]], [[7]], [[2]]), _batch([[1]], [[7]], [[2]])], first_step=1)
    rows = DeviceRows(collection, "cpu")
    rows.swap(first)
    second = _plan(collection, [_batch([[3]], [[7]], [[2]])], first.residency, first_step=3)
    rows.swap(second)  # key 1 goes back, last used at step 2
    block, found = collection.tables[0].pull_rows(np.array([1, 2]))
    assert found.all() and block.last_seen[0] == 2
    assert block.counts.tolist() == [2, 3]  # each sighting counted once, in the passes' lookups


def test_the_device_table_grows_and_slot_zero_stays_zero():
    collection = _collection()
    rows = DeviceRows(collection, "cpu")
    plan = _plan(collection, [_batch([list(range(100))], [[7]], [[1000]])])
    rows.swap(plan)
    assert rows.values.shape[0] >= plan.residency.size == 103  # slot 0, 101 rows of a, 1 of b
    keys = plan.residency.keys[0]
    np.testing.assert_array_equal(rows.values[torch.from_numpy(plan.residency.slots[0])].numpy(),
                                  collection.tables[0].lookup(keys))
    assert torch.equal(rows.values[ZERO_SLOT], torch.zeros(4))


def test_one_id_bags_pool_by_one_gather_in_sample_order():
    collection = _collection()
    batch = _batch([[1], [2]], [[7], [8]], [[3], [1]])
    plan = _plan(collection, [batch])
    item = plan.batches[0]
    assert item.gather is None and item.scales is not None  # y and z pool by mean and sqrtn: scales, no gather
    batch = SparseBatch.from_lists({"x": [[1], [2]], "z": [[3], [1]]})
    collection = EmbeddingCollection([TableConfig(name="a", dim=4)], [EmbeddingFeature(name="x", table="a"),
                                                                      EmbeddingFeature(name="z", table="a")])
    plan = _plan(collection, [batch])
    rows = DeviceRows(collection, "cpu")
    rows.swap(plan)
    assert plan.batches[0].gather is not None
    expected, _ = collection.forward(batch, train=False)
    assert torch.equal(rows.pool(plan.batches[0]), expected)


@pytest.mark.parametrize("optimizer", [Sgd(lr=0.3), Adagrad(lr=0.3), Adam(lr=0.1)], ids=lambda o: o.kind)
def test_compiled_and_torch_updates_agree(optimizer):
    batch = _batch([[1, 1], [2]], [[7], [8]], [[1, 5], []], weights={"x": [[0.5, 2.0], [1.0]], "y": [[1.0], [3.0]],
                                                                      "z": [[2.0, 1.0], []]})
    results = []
    for compiled in (True, False):
        collection = _collection(optimizer)
        plan = _plan(collection, [batch])
        rows = DeviceRows(collection, "cpu", compiled=compiled)
        rows.swap(plan)
        for _ in range(3):
            rows.update(plan.batches[0], torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4) / 10 - 1)
        results.append((rows.values.clone(), rows.state.clone()))
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-6)
    assert not torch.equal(results[0][0], _plan_values(optimizer, batch))  # the rows did move


def _plan_values(optimizer, batch) -> torch.Tensor:
    collection = _collection(optimizer)
    rows = DeviceRows(collection, "cpu")
    rows.swap(_plan(collection, [batch]))
    return rows.values


def test_compiled_updates_are_refused_off_the_cpu():
    with pytest.raises(ConfigError, match="compiled row updates run on the CPU only, not on meta"):
        DeviceRows(_collection(), "meta", compiled=True)


def test_a_pass_too_big_for_the_device_says_how_big_and_what_to_do(monkeypatch):
    collection = _collection()
    rows = DeviceRows(collection, "cpu")
    plan = _plan(collection, [_batch([list(range(100))], [[7]], [[1000]])])

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(torch, "cat", out_of_memory)
    with pytest.raises(TidalError, match=r"a pass needs 103 rows on cpu \(0\.00 GiB\), more than it has free; give "
                                         r"passmode\.batches_per_pass fewer batches"):
        rows.swap(plan)
