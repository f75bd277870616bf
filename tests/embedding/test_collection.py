"""The fused lookup + pooling operator and its backward, against plain references."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tidal.config import (Adagrad, Adam, AdamW, CountAdmission, EmbeddingFeature, Ftrl, Initializer,
                          OptimizerConfig, ProbabilityAdmission, RowWiseAdagrad, Sgd, TableConfig)
from tidal.data.batch import SparseBatch
from tidal.embedding import EmbeddingCollection
from tidal.embedding._memory import CHUNK_ROWS, SHARD_BITS
from tidal.errors import BatchError, ConfigError

DIM = 4
MODES = ["sum", "mean", "sqrtn"]


def _collection(feature_tables: list[int], modes: list[str], threads: int = 1, dim: int = DIM,
                optimizer: OptimizerConfig = Sgd(lr=1.0), **table_kw) -> EmbeddingCollection:
    tables = [TableConfig(name=f"t{t}", dim=dim, optimizer=optimizer, num_shards=2,
                          initializer=Initializer(kind="uniform", scale=1.0), **table_kw)
              for t in range(max(feature_tables) + 1)]
    features = [EmbeddingFeature(name=f"f{f}", table=f"t{t}", pooling=m)
                for f, (t, m) in enumerate(zip(feature_tables, modes))]
    return EmbeddingCollection(tables, features, threads=threads)


def _bag_scale(pooling: str, ids: int) -> float:
    """What each id of a bag of `ids` ids is scaled by."""
    return {"sum": 1.0, "mean": 1.0 / max(ids, 1), "sqrtn": max(ids, 1) ** -0.5}[pooling]


def _reference_pool(collection: EmbeddingCollection, batch: SparseBatch) -> np.ndarray:
    """Bag by bag in plain numpy: sum of weight * row, scaled by 1, 1/n or 1/sqrt(n)."""
    out = np.zeros((batch.batch_size, len(batch.keys), collection.dim), dtype=np.float64)
    offsets = batch.offsets
    for f, key in enumerate(batch.keys):
        feature = collection.features[key]
        table = collection.table(feature.table)
        for b in range(batch.batch_size):
            lo, hi = offsets[f * batch.batch_size + b], offsets[f * batch.batch_size + b + 1]
            if hi == lo:
                continue
            rows = table.lookup(batch.values[lo:hi]).astype(np.float64)
            weights = batch.weights[lo:hi, None] if batch.weights is not None else 1.0
            scale = _bag_scale(feature.pooling, hi - lo)
            out[b, f] = (rows * weights).sum(0) * scale
    return out


def _reference_row_grads(collection: EmbeddingCollection, batch: SparseBatch, grad: torch.Tensor) -> dict:
    """{(table, key): gradient} by torch autograd over a dense copy of the rows used."""
    leaves, pooled = {}, [[torch.zeros(DIM, dtype=torch.float64) for _ in batch.keys] for _ in range(batch.batch_size)]
    offsets = batch.offsets
    for f, key in enumerate(batch.keys):
        feature = collection.features[key]
        for b in range(batch.batch_size):
            lo, hi = offsets[f * batch.batch_size + b], offsets[f * batch.batch_size + b + 1]
            scale = _bag_scale(feature.pooling, hi - lo)
            for i in range(lo, hi):
                leaf = leaves.setdefault((feature.table, int(batch.values[i])),
                                         torch.zeros(DIM, dtype=torch.float64, requires_grad=True))
                weight = float(batch.weights[i]) if batch.weights is not None else 1.0
                pooled[b][f] = pooled[b][f] + leaf * weight * scale
    loss = torch.zeros((), dtype=torch.float64)
    for b in range(batch.batch_size):
        for f in range(len(batch.keys)):
            loss = loss + (pooled[b][f] * grad[b, f].double()).sum()
    if leaves:
        torch.autograd.backward(loss, inputs=list(leaves.values()))
    return {k: v.grad.numpy() for k, v in leaves.items()}


@st.composite
def _batches(draw):
    num_features = draw(st.integers(1, 3))
    feature_tables = draw(st.lists(st.integers(0, 1), min_size=num_features, max_size=num_features))
    feature_tables[0] = 0
    modes = draw(st.lists(st.sampled_from(MODES), min_size=num_features, max_size=num_features))
    batch_size = draw(st.integers(0, 5))
    lengths = draw(st.lists(st.integers(0, 4), min_size=num_features * batch_size, max_size=num_features * batch_size))
    ids = st.one_of(st.integers(0, 6), st.sampled_from([-1, -(2**63), 2**63 - 1]))
    values = draw(st.lists(ids, min_size=sum(lengths), max_size=sum(lengths)))
    weighted = draw(st.booleans())
    weights = draw(st.lists(st.floats(-2, 2, width=32), min_size=len(values), max_size=len(values))) if weighted else None
    batch = SparseBatch(keys=[f"f{f}" for f in range(num_features)], values=np.array(values, np.int64),
                        lengths=np.array(lengths, np.int32), batch_size=batch_size,
                        weights=None if weights is None else np.array(weights, np.float32))
    return feature_tables, modes, batch


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_batches(), threads=st.sampled_from([1, 2]), dim=st.sampled_from([DIM, 32]))
def test_forward_matches_reference_for_any_batch(case, threads, dim):
    """Dim 4 rows are written in place; dim 32 rows are streamed (64-byte multiples)."""
    feature_tables, modes, batch = case
    collection = _collection(feature_tables, modes, threads, dim)
    pooled, _ = collection.forward(batch)
    assert pooled.shape == (batch.batch_size, len(batch.keys), dim)
    np.testing.assert_allclose(pooled.numpy(), _reference_pool(collection, batch), rtol=1e-5, atol=1e-6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_batches(), seed=st.integers(0, 1000))
def test_backward_applies_summed_scaled_row_gradients(case, seed):
    feature_tables, modes, batch = case
    collection = _collection(feature_tables, modes)
    _, ctx = collection.forward(batch)
    before = {(t.name, k): t.lookup(np.array([k]))[0] for t in collection.tables for k in set(batch.values.tolist())}
    grad = torch.from_numpy(np.random.default_rng(seed).standard_normal((batch.batch_size, len(batch.keys), DIM)).astype(np.float32))
    collection.backward(ctx, grad)
    expected = _reference_row_grads(collection, batch, grad)
    for (table, key), row_grad in expected.items():
        after = collection.table(table).lookup(np.array([key]))[0]
        np.testing.assert_allclose(before[(table, key)] - after, row_grad, rtol=1e-4, atol=1e-5)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_batches(), threads=st.sampled_from([1, 2]), seed=st.integers(0, 1000), dim=st.sampled_from([DIM, 32]))
def test_bfloat16_pooling_and_gradients_are_the_float32_ones_rounded(case, threads, seed, dim):
    feature_tables, modes, batch = case
    full, half = _collection(feature_tables, modes, threads, dim), _collection(feature_tables, modes, threads, dim)
    pooled, ctx_full = full.forward(batch)
    pooled_bf16, ctx_half = half.forward(batch, dtype=torch.bfloat16)
    assert torch.equal(pooled_bf16.view(torch.int16), pooled.to(torch.bfloat16).view(torch.int16))
    shape = (batch.batch_size, len(batch.keys), dim)
    grad = torch.from_numpy(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)).to(torch.bfloat16)
    full.backward(ctx_full, grad.float())
    half.backward(ctx_half, grad)  # read as bfloat16 bits
    for a, b in zip(full.tables, half.tables):
        keys = np.unique(batch.values)
        np.testing.assert_array_equal(a.pull_rows(keys)[0].values, b.pull_rows(keys)[0].values)


@pytest.mark.parametrize("threads", [1, 2])
def test_backward_sums_many_rows_across_tables_and_blocks_as_numpy_does(threads):
    """Hundreds of distinct rows in two tables (the update sums rows a block at a time),
    Zipf-like repeats, weights and mean pooling, against a numpy scatter-add."""
    rng = np.random.default_rng(5)
    collection = _collection([0, 1, 0], ["sum", "mean", "sqrtn"], threads)
    lengths = rng.integers(0, 4, 3 * 400).astype(np.int32)
    values = (rng.zipf(1.3, int(lengths.sum())) % 700).astype(np.int64)
    batch = SparseBatch(keys=["f0", "f1", "f2"], values=values, lengths=lengths, batch_size=400,
                        weights=rng.uniform(0.5, 2.0, values.shape[0]).astype(np.float32))
    _, ctx = collection.forward(batch)
    before = [t.lookup(np.arange(700)) for t in collection.tables]
    grad = rng.standard_normal((400, 3, DIM)).astype(np.float32)
    collection.backward(ctx, torch.from_numpy(grad))
    expected = [np.zeros((700, DIM)) for _ in collection.tables]
    bag_sizes = lengths.reshape(3, 400)
    for i, (value, bag) in enumerate(zip(values, np.repeat(np.arange(3 * 400), lengths))):
        f, b = divmod(int(bag), 400)
        scale = batch.weights[i] * {0: 1.0, 1: 1.0 / bag_sizes[f, b], 2: bag_sizes[f, b] ** -0.5}[f]
        expected[[0, 1, 0][f]][value] += scale * grad[b, f]
    for table, old, step in zip(collection.tables, before, expected):
        np.testing.assert_allclose(old - table.lookup(np.arange(700)), step, rtol=1e-4, atol=1e-5)


def _scaled_id_gradients(collection: EmbeddingCollection, batch: SparseBatch, grad: np.ndarray,
                         admitted: np.ndarray) -> dict:
    """{table: (keys, gradients)}: the key of every id that found a row (`admitted`) and
    its ``weight * pooling scale * grad[b, f]``, in plain numpy."""
    per_table: dict = {}
    offsets = batch.offsets
    for f, name in enumerate(batch.keys):
        feature = collection.features[name]
        keys, grads = per_table.setdefault(feature.table, ([], []))
        for b in range(batch.batch_size):
            lo, hi = offsets[f * batch.batch_size + b], offsets[f * batch.batch_size + b + 1]
            scale = _bag_scale(feature.pooling, hi - lo)
            for i in range(lo, hi):
                if not admitted[i]:
                    continue
                weight = batch.weights[i] if batch.weights is not None else 1.0
                keys.append(batch.values[i])
                grads.append(np.float32(weight * scale) * grad[b, f])
    return {t: (np.array(k, np.int64), np.array(g, np.float32).reshape(-1, grad.shape[2]))
            for t, (k, g) in per_table.items()}


COUNT, ONE_IN_TWO = CountAdmission(min_count=2, sketch_width=4096), ProbabilityAdmission(probability=0.5)
# plain SGD's backward and a summing optimizer's, each on every path; the other optimizers on one
BACKWARD_CASES = [pytest.param(threads, optimizer, grad_dtype, admission, id=f"{threads}-{optimizer.kind}-{name}-{admission.kind}")
                  for threads in (1, 2) for optimizer in (Sgd(lr=0.5), Adagrad(lr=0.5, initial_accumulator_value=0.1))
                  for grad_dtype, name in ((torch.float32, "f32"), (torch.bfloat16, "bf16")) for admission in (COUNT, ONE_IN_TWO)]
BACKWARD_CASES += [pytest.param(2, optimizer, torch.bfloat16, COUNT, id=f"2-{optimizer.kind}-bf16-count")
                   for optimizer in (RowWiseAdagrad(lr=0.5), Adam(lr=0.5), AdamW(lr=0.5, per_row_bias_correction=True),
                                     Ftrl(alpha=0.5, l1=0.01, l2=0.01))]


@pytest.mark.parametrize("threads, optimizer, grad_dtype, admission", BACKWARD_CASES)
def test_backward_moves_rows_as_apply_gradients_given_each_ids_scaled_gradient(threads, optimizer, grad_dtype, admission):
    """Two features sharing a table (mean and sqrtn pooling), a third on its own, weights,
    Zipf repeats and ids that admission has not let in (some only at a later id of the
    batch): over two steps, backward moves every row, values and optimizer state, as a
    twin table's `apply_gradients` given the scaled gradient of each id that found a row
    (repeats summed there too)."""
    trained, twin = (_collection([0, 0, 1], ["mean", "sqrtn", "sum"], threads, optimizer=optimizer, admission=admission)
                     for _ in range(2))
    rng = np.random.default_rng(3)
    for batch in _zipf_batches(4, 2, batch_size=200, keys=300):
        grad = torch.from_numpy(rng.standard_normal((batch.batch_size, 3, DIM)).astype(np.float32)).to(grad_dtype)
        _, ctx = trained.forward(batch)
        trained.backward(ctx, grad)
        admitted = np.zeros(batch.values.shape[0], bool)  # the same sightings: the same ids let in
        for positions, found in twin.forward(batch)[1].lookups.values():
            admitted[positions] = found.handles >= 0
        for table, (keys, grads) in _scaled_id_gradients(twin, batch, grad.float().numpy(), admitted).items():
            twin.table(table).apply_gradients(keys, grads)
    keys = np.arange(300)
    for one, two in zip(trained.tables, twin.tables):
        (a, found), (b, twin_found) = one.pull_rows(keys), two.pull_rows(keys)
        assert 0 < found.sum() < len(keys) and np.array_equal(found, twin_found)
        np.testing.assert_allclose(a.values, b.values, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.state, b.state, rtol=1e-5, atol=1e-6)


def _zipf_batches(seed: int, count: int, batch_size: int = 300, keys: int = 500) -> list[SparseBatch]:
    """Batches of three features with Zipf-like repeats of `keys` keys, weights, empty bags."""
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        lengths = rng.integers(0, 4, 3 * batch_size).astype(np.int32)
        values = (rng.zipf(1.3, int(lengths.sum())) % keys).astype(np.int64)
        batches.append(SparseBatch(keys=["f0", "f1", "f2"], values=values, lengths=lengths, batch_size=batch_size,
                                   weights=rng.uniform(0.5, 2.0, values.shape[0]).astype(np.float32)))
    return batches


def test_sgd_on_one_thread_in_sample_order_equals_two_threads_shard_by_shard():
    """One thread subtracts each id's gradient in sample order; two threads go shard by
    shard, each shard's ids in their own order. Same rows, same last-seen steps, up to
    rounding."""
    by_id, grouped = (_collection([0, 1, 0], ["sum", "mean", "sqrtn"], threads) for threads in (1, 2))
    rng = np.random.default_rng(8)
    batches = _zipf_batches(8, 4)
    grads = [torch.from_numpy(rng.standard_normal((b.batch_size, 3, DIM)).astype(np.float32)) for b in batches]
    for collection in (by_id, grouped):
        for pair in ((0, 1), (2, 3)):  # two batches in flight: updated rows are marked seen at the later step
            contexts = [collection.forward(batches[n])[1] for n in pair]
            for n, ctx in zip(pair, contexts):
                collection.backward(ctx, grads[n])
    keys = np.arange(500)
    for one, two in zip(by_id.tables, grouped.tables):
        a, found = one.pull_rows(keys)
        b, _ = two.pull_rows(keys)
        assert found.sum() > 100
        np.testing.assert_allclose(a.values, b.values, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(a.last_seen, b.last_seen)


def test_concurrent_updates_on_one_thread_lose_no_gradient():
    """Four callers train one single-threaded collection at once (as several sparse
    workers share a store): the rows end where one caller doing it all would leave them."""
    shared, alone = _collection([0, 0, 0], ["sum"] * 3), _collection([0, 0, 0], ["sum"] * 3)
    batches = _zipf_batches(9, 24, batch_size=4000, keys=40)  # updates long enough to overlap, on few rows
    grads = [torch.full((b.batch_size, 3, DIM), 0.01 * (n + 1)) for n, b in enumerate(batches)]

    def train(collection, work):
        for batch, grad in work:
            _, ctx = collection.forward(batch)
            collection.backward(ctx, grad)

    work = list(zip(batches, grads))
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda part: train(shared, work[part::4]), range(4)))
    train(alone, work)
    keys = np.arange(40)
    np.testing.assert_allclose(shared.tables[0].lookup(keys), alone.tables[0].lookup(keys), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("threads", [1, 2])
def test_pooling_into_a_buffer_off_the_64_byte_grid_equals_the_streamed_output(threads):
    """A caller's `out` that does not start on a 64-byte boundary is written in place."""
    collection = _collection([0, 0], ["sum", "mean"], threads, dim=32)
    rng = np.random.default_rng(3)
    lengths = rng.integers(0, 3, 2 * 1500).astype(np.int32)
    batch = SparseBatch(keys=["f0", "f1"], values=rng.integers(0, 500, int(lengths.sum())), lengths=lengths,
                        batch_size=1500)
    streamed, _ = collection.forward(batch)
    spare = torch.full((1500 * 2 * 32 + 1,), 7.0)
    shifted = spare[1:].view(1500, 2, 32)  # 4 bytes past torch's 64-byte aligned start
    collection.forward(batch, train=False, out=shifted)
    assert torch.equal(shifted, streamed)


def test_bfloat16_pooling_rounds_ties_to_even_and_keeps_specials():
    collection = _collection([0], ["sum"])
    table = collection.tables[0]
    specials = np.array([[1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.0e38],  # ties, and one that rounds to inf
                         [np.nan, np.inf, -np.inf, -0.0], [1e-40, -1e-45, 65504.0, 1 / 3]], np.float32)
    for key, values in enumerate(specials):  # written in place: no way in refuses numbers that are not finite
        handle = int(table.lookup_or_insert(np.array([key])).handles[0])
        shard, local = handle & ((1 << SHARD_BITS) - 1), handle >> SHARD_BITS
        table.arena.chunks[shard][local // CHUNK_ROWS][local % CHUNK_ROWS, : table.dim] = values
    batch = SparseBatch.from_lists({"f0": [[0], [1], [2]]})
    pooled = collection.forward(batch, dtype=torch.bfloat16)[0][:, 0]
    expected = torch.from_numpy(specials).to(torch.bfloat16)
    nan = torch.isnan(expected)  # a NaN's payload bits are free
    assert torch.isnan(pooled[nan]).all()
    assert torch.equal(pooled[~nan].view(torch.int16), expected[~nan].view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_half_precision_outputs_round_float32(dtype):
    collection = _collection([0], ["sum"])
    batch = SparseBatch.from_lists({"f0": [[1, 2], [3], []]})
    full, _ = collection.forward(batch)
    half, _ = collection.forward(batch, dtype=dtype)
    assert half.dtype == dtype
    torch.testing.assert_close(half.float(), full.to(dtype).float())


def test_forward_empty_bags_and_unadmitted_ids_read_zeros():
    collection = _collection([0], ["mean"], admission=CountAdmission(min_count=2))
    batch = SparseBatch.from_lists({"f0": [[], [5], [5, 7]]})
    pooled, ctx = collection.forward(batch)  # 5 is admitted by its second sighting, which both read; 7 never
    row5 = collection.tables[0].lookup(np.array([5]))[0]
    np.testing.assert_array_equal(pooled[0, 0].numpy(), np.zeros(DIM))
    np.testing.assert_array_equal(pooled[1, 0].numpy(), row5)
    np.testing.assert_allclose(pooled[2, 0].numpy(), row5 / 2, rtol=1e-6)
    collection.backward(ctx, torch.ones(3, 1, DIM))
    assert collection.tables[0].find(np.array([7])).handles[0] == -1


def test_forward_without_training_creates_no_rows_and_refuses_backward():
    collection = _collection([0], ["sum"])
    pooled, ctx = collection.forward(SparseBatch.from_lists({"f0": [[1], [2]]}), train=False)
    assert collection.tables[0].stats().rows == 0
    assert not pooled.any()
    with pytest.raises(BatchError, match="read-only"):
        collection.backward(ctx, torch.zeros(2, 1, DIM))


def test_forward_into_given_buffer_reuses_it():
    collection = _collection([0], ["sum"])
    batch = SparseBatch.from_lists({"f0": [[1, 2], [3]]})
    buffer = torch.full((2, 1, DIM), 7.0)
    pooled, _ = collection.forward(batch, out=buffer)
    assert pooled.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(pooled, collection.forward(batch)[0])
    with pytest.raises(BatchError, match=r"out must be a contiguous float32 CPU tensor of shape \[B, F, D\] = \[2, 1, 4\]"):
        collection.forward(batch, out=torch.empty(2, 2, DIM))
    with pytest.raises(BatchError, match=r"got torch.float32 \[2, 1, 4\] on cpu, not contiguous"):
        collection.forward(batch, out=torch.empty(DIM, 1, 2).transpose(0, 2))


def test_shared_table_serves_two_features_with_one_row_per_key():
    collection = _collection([0, 0], ["sum", "sum"])
    pooled, _ = collection.forward(SparseBatch.from_lists({"f0": [[9]], "f1": [[9]]}))
    torch.testing.assert_close(pooled[0, 0], pooled[0, 1])
    assert collection.tables[0].stats().rows == 1


def test_bad_inputs_raise_clear_errors():
    collection = _collection([0], ["sum"])
    with pytest.raises(BatchError, match="no table serves"):
        collection.forward(SparseBatch.from_lists({"unknown": [[1]]}))
    _, ctx = collection.forward(SparseBatch.from_lists({"f0": [[1]]}))
    with pytest.raises(BatchError, match=r"\[B, F, D\] = \[1, 1, 4\], got \[2, 1, 4\]"):
        collection.backward(ctx, torch.zeros(2, 1, DIM))
    with pytest.raises(BatchError, match="dtype must be one of"):
        collection.forward(SparseBatch.from_lists({"f0": [[1]]}), dtype=torch.int64)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("optimizer", [Sgd(lr=1.0), Adagrad(lr=0.1)], ids=lambda o: o.kind)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_gradient_with_a_nan_or_an_infinity_is_refused_before_any_row_moves(threads, optimizer, dtype, bad):
    """As apply_gradients refuses one: a NaN would stay in its row for good."""
    collection = _collection([0, 0, 1], ["sum", "mean", "sum"], threads=threads, optimizer=optimizer)
    batch = SparseBatch.from_lists({"f0": [[1], [2], [3]], "f1": [[1, 4], [], [5]], "f2": [[6], [7], [8]]})
    keys = np.arange(1, 9)
    _, ctx = collection.forward(batch)
    before = [t.lookup(keys) for t in collection.tables]
    grad = torch.ones(3, 3, DIM, dtype=dtype)
    grad[2, 1, 3] = bad
    with pytest.raises(BatchError, match=r"gradient of the pooled output must be finite in float32 \(magnitudes up to "
                                         r"3\.4e38\), got 1 NaN or infinite values "
                                         r"\(the first at sample 2, feature 1\); no row was updated"):
        collection.backward(ctx, grad)
    assert all(np.array_equal(b, t.lookup(keys)) for b, t in zip(before, collection.tables))
    collection.backward(ctx, torch.ones(3, 3, DIM, dtype=dtype))  # the context is still good
    assert not np.array_equal(before[0], collection.tables[0].lookup(keys))


@pytest.mark.parametrize("where", [0, 3_999])
def test_a_nan_in_any_part_of_a_gradient_split_over_threads_is_found(where):
    collection = _collection([0], ["sum"], threads=2)
    _, ctx = collection.forward(SparseBatch.from_lists({"f0": [[k] for k in range(4_000)]}))
    grad = torch.zeros(4_000, 1, DIM)
    grad[where, 0, 1] = float("nan")
    with pytest.raises(BatchError, match=rf"got 1 NaN or infinite values \(the first at sample {where}, feature 0\)"):
        collection.backward(ctx, grad)


def test_config_errors_name_the_problem():
    tables = [TableConfig(name="a", dim=4), TableConfig(name="b", dim=8)]
    with pytest.raises(ConfigError, match="same dim"):
        EmbeddingCollection(tables, [EmbeddingFeature(name="x", table="a")])
    with pytest.raises(ConfigError, match="table 'zz' is not defined"):
        EmbeddingCollection(tables[:1], [EmbeddingFeature(name="x", table="zz")])


def test_repeated_table_or_feature_names_are_refused():
    with pytest.raises(ConfigError, match=r"table names must be distinct, got \['a'\]"):
        EmbeddingCollection([TableConfig(name="a", dim=4)] * 2, [EmbeddingFeature(name="x", table="a")])
    with pytest.raises(ConfigError, match=r"feature names must be distinct, got \['x'\]"):
        EmbeddingCollection([TableConfig(name="a", dim=4)], [EmbeddingFeature(name="x", table="a")] * 2)


@pytest.mark.parametrize("optimizer, threads", [(Sgd(lr=1.0), 1), (Sgd(lr=1.0), 2), (Adagrad(lr=1.0), 1)],
                         ids=["sgd-in-place", "sgd-by-shard", "adagrad"])
def test_backward_after_evict_is_refused_instead_of_updating_reused_rows(optimizer, threads):
    from tidal.config import Eviction

    collection = _collection([0], ["sum"], threads, optimizer=optimizer, eviction=Eviction(ttl_steps=1))
    _, ctx = collection.forward(SparseBatch.from_lists({"f0": [[1], [2]]}))
    collection.tables[0].evict()
    with pytest.raises(BatchError, match="before an evict"):
        collection.backward(ctx, torch.ones(2, 1, DIM))


def test_a_lookup_from_before_a_remove_is_refused_instead_of_writing_a_reused_row():
    table = _collection([0], ["sum"]).tables[0]
    stale = table.lookup_or_insert(np.array([1], np.int64))
    table.remove(np.array([1], np.int64))
    table.lookup_or_insert(np.array([2], np.int64))  # takes the freed row
    before = table.lookup(np.array([2], np.int64)).copy()
    with pytest.raises(BatchError, match=r"before an evict\(\) or remove\(\)"):
        table.apply_grouped(stale, np.full((1, DIM), 100.0, np.float32), np.zeros(1, np.int64), np.ones(1, np.float32))
    np.testing.assert_array_equal(table.lookup(np.array([2], np.int64)), before)


def test_a_context_pools_and_updates_only_its_own_batch_and_only_once():
    collection = _collection([0, 0], ["sum", "sum"])
    small = SparseBatch.from_lists({"f0": [[1], [2]], "f1": [[3], [4]]})
    ctx = collection.lookup(small)
    for other in (SparseBatch.from_lists({"f0": [[1]] * 3, "f1": [[3]] * 3}),  # another shape
                  SparseBatch.from_lists({"f0": [[1, 2], []], "f1": [[3], [4]]}),  # same ids, other bags
                  SparseBatch.from_lists({"f0": [[2], [1]], "f1": [[3], [4]]}),  # same bags, other ids
                  SparseBatch.from_lists({"f1": [[1], [2]], "f0": [[3], [4]]}),  # features in another order
                  SparseBatch.from_lists({"f0": [[1], [2]], "f1": [[3], [4]]},
                                         weights={"f0": [[2.0], [1.0]], "f1": [[1.0], [1.0]]})):  # other weights
        with pytest.raises(BatchError, match="this context was looked up for another batch"):
            collection.pool(other, ctx)
    collection.pool(small, ctx)
    collection.backward(ctx, torch.ones(2, 2, DIM))
    with pytest.raises(BatchError, match="update was applied already"):
        collection.backward(ctx, torch.ones(2, 2, DIM))
    with pytest.raises(ConfigError, match=r"no table 'nope' in this collection; it has \['t0'\]"):
        collection.table("nope")


@pytest.mark.parametrize("threads", [1, 2])
def test_a_backward_that_failed_half_way_applies_the_rest_when_called_again(threads, monkeypatch):
    batch = SparseBatch.from_lists({"f0": [[1], [2, 5]], "f1": [[3], [1]]})
    grad = torch.randn(2, 2, DIM, generator=torch.Generator().manual_seed(0))
    clean, failing = (_collection([0, 1], ["sum", "mean"], threads, optimizer=Adagrad(lr=0.5)) for _ in range(2))
    contexts = [c.forward(batch)[1] for c in (clean, failing)]
    clean.backward(contexts[0], grad)
    second = failing.tables[1]
    original = type(second).apply_grouped

    def fails_once(table, *args):
        if table is second and not fails_once.raised:
            fails_once.raised = True
            raise MemoryError("no memory for the update buffer")
        return original(table, *args)

    fails_once.raised = False
    monkeypatch.setattr(type(second), "apply_grouped", fails_once)
    with pytest.raises(MemoryError):
        failing.backward(contexts[1], grad)
    failing.backward(contexts[1], grad)  # the first table's update is not applied twice
    for a, b in zip(clean.tables, failing.tables):
        np.testing.assert_array_equal(a.pull_rows(np.arange(6))[0].state, b.pull_rows(np.arange(6))[0].state)
        np.testing.assert_array_equal(a.lookup(np.arange(6)), b.lookup(np.arange(6)))
    with pytest.raises(BatchError, match="update was applied already"):
        failing.backward(contexts[1], grad)


def test_two_collections_sharing_tables_in_either_order_do_not_deadlock():
    a, b = (TableConfig(name=n, dim=DIM, optimizer=Sgd(lr=0.1)) for n in ("a", "b"))
    first = EmbeddingCollection([a, b], [EmbeddingFeature(name="x", table="a"), EmbeddingFeature(name="y", table="b")])
    second = EmbeddingCollection(list(reversed(first.tables)),
                                 [EmbeddingFeature(name="x", table="a"), EmbeddingFeature(name="y", table="b")])
    batch = SparseBatch.from_lists({"x": [[1], [2]], "y": [[3], [4]]})

    def train(collection: EmbeddingCollection) -> None:
        for _ in range(3000):
            _, ctx = collection.forward(batch)
            collection.backward(ctx, torch.ones(2, 2, DIM))

    import threading

    runs = [threading.Thread(target=train, args=(c,), daemon=True) for c in (first, second)]
    for run in runs:
        run.start()
    for run in runs:
        run.join(timeout=60)
    assert not any(run.is_alive() for run in runs), "deadlocked"


def test_apply_grouped_refuses_what_its_kernel_would_misread():
    table = _collection([0], ["sum"], optimizer=Adagrad(lr=0.1)).tables[0]
    lookup = table.lookup_or_insert(np.array([1, 2], np.int64))
    ones = np.ones(2, np.float32)
    for grad, sources, reason in [
        (np.full((2, DIM), 2.0), np.arange(2), "must be a float32 numpy array"),  # float64 read as float32
        (torch.ones(2, DIM), np.arange(2), "must be a float32 numpy array"),
        (np.ones((2, DIM), np.float32), np.array([0, 10**9]), "sources must be integer rows of the 2 gradient rows"),
        (np.ones((2, DIM), np.float32), np.array([0.0, 1.0]), "sources must be integer rows"),
    ]:
        with pytest.raises(BatchError, match=reason):
            table.apply_grouped(lookup, grad, sources, ones)
    strided = np.ones((2, 2 * DIM), np.float32)
    strided[:, 1::2] = 1e4
    table.apply_grouped(lookup, strided[:, ::2], np.arange(2), ones)  # copied, not read past its columns
    assert np.abs(table.pull_rows(np.array([1, 2], np.int64))[0].state).max() == 1.0  # Adagrad's sum of g**2


def test_from_lists_refuses_ids_that_are_not_integers():
    with pytest.raises(BatchError, match=r"feature 'b', sample 1: ids must be integers, got 2.9 \(float\)"):
        SparseBatch.from_lists({"a": [[1], [2]], "b": [[3], [4, 2.9]]})


def test_calls_with_the_wrong_kind_of_argument_say_what_was_expected():
    config = TableConfig(name="t0", dim=DIM)
    with pytest.raises(ConfigError, match="EmbeddingCollection: tables must be a list, got dict"):
        EmbeddingCollection({"t0": config}, [EmbeddingFeature(name="f0", table="t0")])
    with pytest.raises(ConfigError, match="EmbeddingCollection: each feature: expected EmbeddingFeature, got str"):
        EmbeddingCollection([config], ["f0"])
    with pytest.raises(ConfigError, match="EmbeddingCollection: threads must be an integer >= 1, got 0"):
        EmbeddingCollection([config], [EmbeddingFeature(name="f0", table="t0")], threads=0)
    collection = _collection([0], ["sum"])
    with pytest.raises(BatchError, match="EmbeddingCollection takes a SparseBatch, got dict"):
        collection.forward({"f0": [[1]]})
    batch = SparseBatch.from_lists({"f0": [[1], [2]]})
    with pytest.raises(BatchError, match="out must be a torch tensor that does not require grad .*, got ndarray"):
        collection.forward(batch, out=np.zeros((2, 1, DIM), np.float32))
    with pytest.raises(BatchError, match="got Tensor requiring grad"):
        collection.forward(batch, out=torch.zeros(2, 1, DIM, requires_grad=True))
    _, ctx = collection.forward(batch)
    with pytest.raises(BatchError, match=r"must be a torch tensor or numpy array \[2, 1, 4\], got list"):
        collection.backward(ctx, [[0.0] * DIM] * 2)
    grad = torch.zeros(2, 1, DIM)
    with pytest.raises(BatchError, match=r"backward\(ctx, grad\) takes the PooledContext .*, got Tensor; are the "
                                         r"arguments swapped\?"):
        collection.backward(grad, ctx)
    with pytest.raises(BatchError, match=r"pool\(batch, ctx\) takes the PooledContext .*, got SparseBatch"):
        collection.pool(ctx, batch)
    for wrong in (torch.zeros(2, 1, DIM, dtype=torch.complex64), np.full((2, 1, DIM), "x"),
                  torch.zeros(2, 1, DIM, dtype=torch.bool)):
        with pytest.raises(BatchError, match=r"must hold real numbers .*, got dtype"):
            collection.backward(ctx, wrong)
    collection.backward(ctx, grad)  # the refused calls left the context unused
