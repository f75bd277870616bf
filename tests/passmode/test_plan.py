"""Pass plans: every id's slot, moves by difference, admission, each batch's distinct rows."""

from __future__ import annotations

import numpy as np

from tidal.config import Adagrad, CountAdmission
from tidal.passmode.plan import ZERO_SLOT

from passmode_helpers import batch_of, collection_of, plan_of


def test_the_next_pass_moves_only_the_rows_that_differ_and_reuses_freed_slots():
    collection = collection_of()
    first = plan_of(collection, [batch_of([[1, 2]], [[7]], [[3]])])
    assert [m.entering.keys.tolist() for m in first.moves] == [[1, 2, 3], [7]]
    slot = {int(k): int(s) for k, s in zip(first.residency.keys[0], first.residency.slots[0])}
    second = plan_of(collection, [batch_of([[2, 4]], [[7]], [[3, 5]])], first.residency, first_step=2)
    move = second.moves[0]
    assert move.leaving_keys.tolist() == [1] and move.leaving_slots.tolist() == [slot[1]]
    assert move.entering.keys.tolist() == [4, 5]
    assert move.entering_slots[0] == slot[1]  # the slot key 1 leaves takes the first row that comes in
    assert second.moves[1].entering.keys.size == 0 and second.moves[1].leaving_keys.size == 0  # b's row stays
    after = {int(k): int(s) for k, s in zip(second.residency.keys[0], second.residency.slots[0])}
    assert after[2] == slot[2] and after[3] == slot[3]
    assert second.residency.size == first.residency.size + 1  # one new slot: 5 came in beside 4


def test_ids_without_a_row_read_slot_zero_and_move_nothing():
    collection = collection_of(Adagrad(), admission=CountAdmission(min_count=3))
    plan = plan_of(collection, [batch_of([[1, 1], [2]], [[7], [8]], [[1], [9]]), batch_of([[2]], [[7]], [[9]])])
    table_a = plan.moves[0]
    assert table_a.entering.keys.tolist() == [1]  # seen three times in the pass; 2 and 9 twice
    first = plan.batches[0]
    a_slot = plan.residency.slots[0][0]
    assert first.slots[:3].tolist() == [a_slot, a_slot, ZERO_SLOT]  # x: 1, 1 | 2
    update = next(u for u in first.updates if u.table == 0)
    assert update.distinct.tolist() == [a_slot] and update.inverse.tolist() == [0, 0, 0]  # x's 1, 1 and z's 1


def test_each_batch_numbers_its_own_distinct_rows():
    collection = collection_of(Adagrad())
    plan = plan_of(collection, [batch_of([[5, 6], [5]], [[7], [7]], [[6], [8]]), batch_of([[8]], [[7]], [[6]])])
    for item in plan.batches:
        update = next(u for u in item.updates if u.table == 0)
        assert np.unique(update.distinct).shape == update.distinct.shape
        np.testing.assert_array_equal(update.distinct[update.inverse], update.slots)
    assert plan.batches[1].updates[0].distinct.shape == (2,)  # 8 and 6, not the pass's three keys
