"""Pass mode's compiled kernels against plain numpy and the store."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tidal.config import Adagrad, Adam, Ftrl, RowWiseAdagrad, TableConfig
from tidal.embedding import EmbeddingTable
from tidal.embedding.table import RowBlock
from tidal.passmode._kernels import distinct_keys, ids_by_row, optimizer_step, sgd_add

from keys import ADVERSARIAL

IDS = st.lists(st.one_of(st.sampled_from([int(k) for k in ADVERSARIAL]), st.integers(-5, 5),
                         st.integers(-(1 << 63), (1 << 63) - 1)), max_size=300)


@settings(max_examples=60, deadline=None)
@given(IDS)
def test_distinct_keys_match_numpy_with_each_key_s_first_and_last_sighting(values):
    ids = np.array(values, dtype=np.int64)
    distinct, inverse, first, last = distinct_keys(ids)
    np.testing.assert_array_equal(distinct, np.unique(ids))
    np.testing.assert_array_equal(distinct[inverse], ids)
    for k, key in enumerate(distinct):
        where = np.flatnonzero(ids == key)
        assert (first[k], last[k]) == (where[0], where[-1])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=1, max_size=60), st.booleans(), st.integers(0, 1 << 30))
def test_sgd_adds_every_id_s_scaled_gradient_to_its_row(slots, scaled, seed):
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((10, 4)).astype(np.float32)
    grad = rng.standard_normal((len(slots) + 2, 4)).astype(np.float32)
    sources = rng.integers(0, grad.shape[0], len(slots))
    scales = rng.random(len(slots)).astype(np.float32) if scaled else np.zeros(0, np.float32)
    expected = values.astype(np.float64)
    factors = scales if scaled else np.ones(len(slots), np.float32)
    np.subtract.at(expected, np.array(slots), 0.1 * factors[:, None] * grad[sources])
    sgd_add(values, np.array(slots, np.int64), grad, sources, scales, np.float32(0.1))
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([Adagrad(lr=0.1), RowWiseAdagrad(lr=0.1), Adam(lr=0.1), Adam(lr=0.1, per_row_bias_correction=True),
                        Ftrl(alpha=0.1, l1=0.01)]),
       st.lists(st.integers(0, 7), min_size=1, max_size=40), st.integers(0, 1 << 30))
def test_an_optimizer_step_on_device_rows_equals_the_store_s(optimizer, keys, seed):
    rng = np.random.default_rng(seed)
    table = EmbeddingTable(TableConfig(name="t", dim=4, optimizer=optimizer))
    width = table.optimizer.state_width
    block = RowBlock(keys=np.arange(8), values=rng.standard_normal((8, 4)).astype(np.float32),
                     state=np.abs(rng.standard_normal((8, width))).astype(np.float32),
                     last_seen=np.zeros(8, np.uint32), counts=np.zeros(8, np.uint32))
    table.push_rows(block)
    values, state = block.values.copy(), np.concatenate([block.state, np.ones((8, 2), np.float32)], axis=1)
    grad = rng.standard_normal((len(keys), 4)).astype(np.float32)
    table.apply_gradients(np.array(keys), grad)
    distinct, inverse = np.unique(np.array(keys), return_inverse=True)
    optimizer_step(values, state, width, distinct, inverse, grad, np.arange(len(keys)), np.zeros(0, np.float32),
                   table.optimizer.code, table.optimizer.hyper, 1)
    after, _ = table.pull_rows(np.arange(8))
    np.testing.assert_allclose(values, after.values, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state[:, :width], after.state, rtol=1e-5, atol=1e-6)
    assert (state[:, width:] == 1.0).all()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 5), max_size=50))
def test_ids_grouped_by_row_keep_their_order_within_each_row(inverse):
    inverse = np.array(inverse, dtype=np.int64)
    rows = int(inverse.max()) + 1 if inverse.size else 0
    order, offsets = ids_by_row(inverse, rows)
    for u in range(rows):
        np.testing.assert_array_equal(order[offsets[u] : offsets[u + 1]], np.flatnonzero(inverse == u))
    assert offsets[-1] == inverse.shape[0]
