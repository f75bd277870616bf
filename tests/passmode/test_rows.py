"""The device rows: pooling, updates on either kind of kernel, write-backs, growth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tidal.config import Adagrad, Adam, EmbeddingFeature, Eviction, Sgd, TableConfig
from tidal.data import SparseBatch
from tidal.embedding import EmbeddingCollection
from tidal.errors import ConfigError, TidalError
from tidal.passmode.plan import ZERO_SLOT
from tidal.passmode.rows import DeviceRows

from passmode_helpers import batch_of, collection_of, plan_of


def test_device_pooling_equals_the_collection_s_for_every_pooling_mode_and_weight():
    collection = collection_of()
    batch = batch_of([[1, 2], [], [3]], [[7, 8, 9], [8], [7]], [[1, 3], [2], []],
                   weights={"x": [[0.5, 2.0], [], [1.5]], "y": [[1.0, 2.0, 3.0], [4.0], [0.5]],
                            "z": [[2.0, 1.0], [3.0], []]})
    plan = plan_of(collection, [batch])
    rows = DeviceRows(collection, "cpu")
    rows.swap(plan)
    expected, _ = collection.forward(batch, train=False)
    torch.testing.assert_close(rows.pool(plan.batches[0]), expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(rows.values[ZERO_SLOT], torch.zeros(4))


def test_an_update_adds_each_row_s_scaled_gradients_and_flush_writes_them_back():
    collection = collection_of()
    batch = batch_of([[1, 1]], [[7]], [[1]])
    plan = plan_of(collection, [batch])
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
    collection = collection_of(eviction=Eviction(ttl_steps=100, capacity_policy="lfu"), max_rows=100)
    first = plan_of(collection, [batch_of([[1]], [[7]], [[2]]), batch_of([[1]], [[7]], [[2]])], first_step=1)
    rows = DeviceRows(collection, "cpu")
    rows.swap(first)
    second = plan_of(collection, [batch_of([[3]], [[7]], [[2]])], first.residency, first_step=3)
    rows.swap(second)  # key 1 goes back, last used at step 2
    block, found = collection.tables[0].pull_rows(np.array([1, 2]))
    assert found.all() and block.last_seen[0] == 2
    assert block.counts.tolist() == [2, 3]  # each sighting counted once, in the passes' lookups


def test_the_device_table_grows_and_slot_zero_stays_zero():
    collection = collection_of()
    rows = DeviceRows(collection, "cpu")
    plan = plan_of(collection, [batch_of([list(range(100))], [[7]], [[1000]])])
    rows.swap(plan)
    assert rows.values.shape[0] >= plan.residency.size == 103  # slot 0, 101 rows of a, 1 of b
    keys = plan.residency.keys[0]
    np.testing.assert_array_equal(rows.values[torch.from_numpy(plan.residency.slots[0])].numpy(),
                                  collection.tables[0].lookup(keys))
    assert torch.equal(rows.values[ZERO_SLOT], torch.zeros(4))


def test_one_id_bags_pool_by_one_gather_in_sample_order():
    collection = collection_of()
    batch = batch_of([[1], [2]], [[7], [8]], [[3], [1]])
    plan = plan_of(collection, [batch])
    item = plan.batches[0]
    assert item.gather is None and item.scales is not None  # y and z pool by mean and sqrtn: scales, no gather
    batch = SparseBatch.from_lists({"x": [[1], [2]], "z": [[3], [1]]})
    collection = EmbeddingCollection([TableConfig(name="a", dim=4)], [EmbeddingFeature(name="x", table="a"),
                                                                      EmbeddingFeature(name="z", table="a")])
    plan = plan_of(collection, [batch])
    rows = DeviceRows(collection, "cpu")
    rows.swap(plan)
    assert plan.batches[0].gather is not None
    expected, _ = collection.forward(batch, train=False)
    assert torch.equal(rows.pool(plan.batches[0]), expected)


@pytest.mark.parametrize("lr_scale", [1.0, 0.25])
@pytest.mark.parametrize("optimizer", [Sgd(lr=0.3), Adagrad(lr=0.3), Adam(lr=0.1)], ids=lambda o: o.kind)
def test_compiled_and_torch_updates_agree(optimizer, lr_scale):
    batch = batch_of([[1, 1], [2]], [[7], [8]], [[1, 5], []], weights={"x": [[0.5, 2.0], [1.0]], "y": [[1.0], [3.0]],
                                                                      "z": [[2.0, 1.0], []]})

    def trained(compiled: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        collection = collection_of(optimizer)
        plan = plan_of(collection, [batch])
        rows = DeviceRows(collection, "cpu", compiled=compiled)
        rows.swap(plan)
        for _ in range(3):
            rows.update(plan.batches[0], torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4) / 10 - 1, scale)
        return rows.values.clone(), rows.state.clone()

    results = [trained(compiled, lr_scale) for compiled in (True, False)]
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-6)
    assert not torch.equal(results[0][0], _plan_values(optimizer, batch))  # the rows did move
    if lr_scale != 1.0:  # by the scaled rate, on either path
        assert not torch.equal(results[1][0], trained(False, 1.0)[0])


def _plan_values(optimizer, batch) -> torch.Tensor:
    collection = collection_of(optimizer)
    rows = DeviceRows(collection, "cpu")
    rows.swap(plan_of(collection, [batch]))
    return rows.values


def test_compiled_updates_are_refused_off_the_cpu():
    with pytest.raises(ConfigError, match="compiled row updates run on the CPU only, not on meta"):
        DeviceRows(collection_of(), "meta", compiled=True)


def test_a_pass_too_big_for_the_device_says_how_big_and_what_to_do(monkeypatch):
    import tidal.passmode.rows

    collection = collection_of()
    rows = DeviceRows(collection, "cpu")
    plan = plan_of(collection, [batch_of([list(range(100))], [[7]], [[1000]])])

    def out_of_memory(tensor, size):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(tidal.passmode.rows, "_grown", out_of_memory)
    with pytest.raises(TidalError, match=r"a pass needs 103 rows on cpu \(0\.00 GiB\), and the device could not allocate "
                                         r"them; give passmode\.batches_per_pass fewer batches"):
        rows.swap(plan)


def test_rows_go_back_in_pieces_and_only_when_trained(monkeypatch):
    import tidal.passmode.rows

    monkeypatch.setattr(tidal.passmode.rows, "_WRITE_BACK_ROWS", 7)
    collection = collection_of()
    rows = DeviceRows(collection, "cpu")
    plan = plan_of(collection, [batch_of([list(range(50))], [[7]], [[1000]])])
    rows.swap(plan)
    rows.update(plan.batches[0], torch.ones(1, 3, 4))
    pushed = []
    push_rows = collection.tables[0].push_rows
    monkeypatch.setattr(collection.tables[0], "push_rows", lambda block, **kw: pushed.append(len(block.keys)) or
                        push_rows(block, **kw))
    rows.flush()
    assert pushed == [7] * 7 + [2]  # 51 rows of table a, seven at a time
    keys = plan.residency.keys[0]
    np.testing.assert_array_equal(collection.tables[0].lookup(keys),
                                  rows.values[torch.from_numpy(plan.residency.slots[0])].numpy())
    rows.flush()  # nothing trained since: nothing to write
    assert len(pushed) == 8


def test_releasing_a_table_frees_its_slots_and_keeps_the_others_rows():
    collection = collection_of()
    rows = DeviceRows(collection, "cpu")
    first = plan_of(collection, [batch_of([[1, 2]], [[7]], [[3]])])
    rows.swap(first)
    assert first.moves[0].entering.values.shape == (3, 0)  # placed: the plan keeps only their keys
    rows.release([0])
    assert rows.residency.keys[0].size == 0 and rows.residency.keys[1].tolist() == [7]
    assert sorted(rows.residency.free.tolist()) == sorted(first.residency.slots[0].tolist())
    second = plan_of(collection, [batch_of([[1]], [[7]], [[2]])], rows.residency, first_step=2)
    assert second.moves[0].entering.keys.tolist() == [1, 2]  # pulled again, into the freed slots
    assert set(second.moves[0].entering_slots.tolist()) <= set(first.residency.slots[0].tolist())
    assert second.moves[1].entering.keys.size == 0  # table b's row stayed


def test_rows_that_leave_after_a_flush_are_not_written_again(monkeypatch):
    collection = collection_of()
    rows = DeviceRows(collection, "cpu")
    first = plan_of(collection, [batch_of([[1, 2]], [[7]], [[3]])])
    rows.swap(first)
    rows.update(first.batches[0], torch.ones(1, 3, 4))
    rows.flush()
    pushed = []
    push_rows = collection.tables[0].push_rows
    monkeypatch.setattr(collection.tables[0], "push_rows", lambda block, **kw: pushed.append(block.keys.tolist()) or
                        push_rows(block, **kw))
    second = plan_of(collection, [batch_of([[4]], [[7]], [[5]])], rows.residency, first_step=2)
    rows.swap(second)  # 1, 2 and 3 leave, as their table holds them since the flush
    assert pushed == []
    rows.update(second.batches[0], torch.ones(1, 3, 4))
    third = plan_of(collection, [batch_of([[1]], [[7]], [[2]])], rows.residency, first_step=3)
    rows.swap(third)  # trained since: 4 and 5 go back
    assert pushed == [[4, 5]]
