"""Row-wise optimizers of an EmbeddingTable against torch.optim or a written reference.

Every check runs several steps on a small table whose batches repeat ids (gradients of
a repeated id are summed) and leave some ids out (their rows must not move).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose

from tidal.config import Adagrad, Adam, AdamW, Ftrl, Initializer, RowWiseAdagrad, Sgd, TableConfig
from tidal.embedding.table import EmbeddingTable
from tidal.errors import BatchError, ConfigError
from tidal.optim import OptimizerKernel

DIM = 4
KEYS = np.array([3, 17, 42, 101, 7777, 5, 1 << 40], dtype=np.int64)
N = len(KEYS)  # the last row is in no batch unless `all_rows`
STEPS = 6
TOL = dict(rtol=1e-5, atol=1e-5)


def _table(optimizer, keys=KEYS, dim=DIM) -> EmbeddingTable:
    config = TableConfig(name="t", dim=dim, num_shards=2, optimizer=optimizer,
                         initializer=Initializer(kind="normal", scale=0.5))
    table = EmbeddingTable(config)
    table.lookup_or_insert(keys)
    return table


def _rows(table: EmbeddingTable, keys=KEYS) -> tuple[np.ndarray, np.ndarray]:
    """(values [n, dim], optimizer state [n, state]) of `keys`, copied."""
    block, found = table.pull_rows(keys)
    assert found.all()
    return block.values.copy(), block.state.copy()


def _batches(seed: int, *, all_rows: bool = False):
    """Per step: row positions (repeats included) and their float32 gradients [n, DIM].

    Unless `all_rows`, step s leaves out rows r with (r + s) % 3 == 0, and row N - 1
    is never present.
    """
    rng = np.random.default_rng(seed)
    for step in range(STEPS):
        rows = np.arange(N) if all_rows else np.array([r for r in range(N - 1) if (r + step) % 3])
        positions = np.concatenate([rows, rng.choice(rows, size=3)])  # 3 repeated ids
        rng.shuffle(positions)
        yield positions, rng.standard_normal((len(positions), DIM)).astype(np.float32)


def _summed(positions: np.ndarray, grads: np.ndarray, n: int = N) -> np.ndarray:
    total = np.zeros((n, grads.shape[1]), dtype=np.float32)
    np.add.at(total, positions, grads)
    return total


def _sparse(positions: np.ndarray, grads: np.ndarray, n: int = N) -> torch.Tensor:
    """Uncoalesced sparse gradient of a [n, DIM] parameter (torch sums the repeats)."""
    return torch.sparse_coo_tensor(torch.from_numpy(positions)[None], torch.from_numpy(grads), (n, DIM))


def _check_one_parameter(config, make_optimizer, *, sparse: bool, all_rows: bool = False, seed: int = 0):
    """The table against a torch optimizer of one parameter holding the whole table."""
    table = _table(config)
    initial, _ = _rows(table)
    param = torch.nn.Parameter(torch.from_numpy(initial.copy()))
    optimizer = make_optimizer([param])
    for positions, grads in _batches(seed, all_rows=all_rows):
        table.apply_gradients(KEYS[positions], grads)
        param.grad = _sparse(positions, grads) if sparse else torch.from_numpy(_summed(positions, grads))
        optimizer.step()
        assert_allclose(_rows(table)[0], param.detach().numpy(), **TOL)
    if not all_rows:
        assert np.array_equal(_rows(table)[0][N - 1], initial[N - 1])  # never present: untouched
    return table


def _check_per_row(config, make_optimizer, *, sparse: bool, seed: int = 0) -> EmbeddingTable:
    """The table against one torch optimizer per row, stepped only when the row is present."""
    table = _table(config)
    params = [torch.nn.Parameter(torch.from_numpy(row[None].copy())) for row in _rows(table)[0]]
    optimizers = [make_optimizer([p]) for p in params]
    for positions, grads in _batches(seed):
        table.apply_gradients(KEYS[positions], grads)
        summed = _summed(positions, grads)
        for r in np.unique(positions):
            mine = grads[positions == r]
            params[r].grad = (torch.sparse_coo_tensor(torch.zeros((1, len(mine)), dtype=torch.long),
                                                      torch.from_numpy(mine), (1, DIM))
                              if sparse else torch.from_numpy(summed[r][None].copy()))
            optimizers[r].step()
        assert_allclose(_rows(table)[0], torch.cat([p.detach() for p in params]).numpy(), **TOL)
    return table


def _present_counts(seed: int = 0) -> np.ndarray:
    return sum(np.isin(np.arange(N), positions).astype(np.float32) for positions, _ in _batches(seed))


# ---------------------------------------------------------------- against torch.optim


def test_sgd_matches_torch_sgd_with_repeated_and_absent_ids() -> None:
    _check_one_parameter(Sgd(lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1), sparse=True)


@pytest.mark.parametrize(("initial", "eps"), [(0.0, 1e-10), (0.3, 1e-3)])
def test_adagrad_matches_torch_adagrad_with_initial_accumulator(initial: float, eps: float) -> None:
    config = Adagrad(lr=0.2, eps=eps, initial_accumulator_value=initial)
    make = lambda p: torch.optim.Adagrad(p, lr=0.2, eps=eps, initial_accumulator_value=initial)  # noqa: E731
    table = _check_one_parameter(config, make, sparse=True)
    assert np.all(_rows(table)[1][N - 1] == np.float32(initial))


def test_adam_matches_sparse_adam_with_global_step() -> None:
    config = Adam(lr=0.05, beta1=0.8, beta2=0.95, eps=1e-6)
    make = lambda p: torch.optim.SparseAdam(p, lr=0.05, betas=(0.8, 0.95), eps=1e-6)  # noqa: E731
    _check_one_parameter(config, make, sparse=True)


def test_adam_per_row_bias_correction_matches_per_row_sparse_adam() -> None:
    config = Adam(lr=0.05, beta1=0.8, beta2=0.95, eps=1e-6, per_row_bias_correction=True)
    make = lambda p: torch.optim.SparseAdam(p, lr=0.05, betas=(0.8, 0.95), eps=1e-6)  # noqa: E731
    table = _check_per_row(config, make, sparse=True)
    assert_allclose(_rows(table)[1][:, 2 * DIM], _present_counts())  # each row's own step


def test_adamw_matches_torch_adamw_when_every_row_present() -> None:
    config = AdamW(lr=0.05, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.1)
    make = lambda p: torch.optim.AdamW(p, lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)  # noqa: E731
    _check_one_parameter(config, make, sparse=False, all_rows=True)


def test_adamw_per_row_bias_correction_matches_per_row_adamw() -> None:
    config = AdamW(lr=0.05, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.1, per_row_bias_correction=True)
    make = lambda p: torch.optim.AdamW(p, lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)  # noqa: E731
    table = _check_per_row(config, make, sparse=False)
    assert_allclose(_rows(table)[1][:, 2 * DIM], _present_counts())


# ---------------------------------------------------------------- against written references


def _rowwise_adagrad_reference(w, state, g, lr, eps):
    """state = [mean of g² summed over steps]."""
    state = state + np.mean(g * g)
    return w - lr * g / (np.sqrt(state[0]) + eps), state


def _ftrl_reference(w, state, g, alpha, beta, l1, l2):
    """FTRL-proximal per coordinate (McMahan et al. 2013, algorithm 1); state = [z | n]."""
    z, n = state[:DIM], state[DIM:]
    sigma = (np.sqrt(n + g * g) - np.sqrt(n)) / alpha
    z, n = z + g - sigma * w, n + g * g
    w = np.where(np.abs(z) <= l1, 0.0, -(z - np.sign(z) * l1) / ((beta + np.sqrt(n)) / alpha + l2))
    return w, np.concatenate([z, n])


def _check_reference(config, reference, seed: int = 0) -> np.ndarray:
    """The table against `reference(w, state, g) -> (w, state)` in float64 on present rows."""
    table = _table(config)
    w, state = (a.astype(np.float64) for a in _rows(table))
    for positions, grads in _batches(seed):
        table.apply_gradients(KEYS[positions], grads)
        summed = _summed(positions, grads).astype(np.float64)
        for r in np.unique(positions):
            w[r], state[r] = reference(w[r], state[r], summed[r])
        values, got_state = _rows(table)
        assert_allclose(values, w, **TOL)
        assert_allclose(got_state, state, **TOL)
    return w


def test_rowwise_adagrad_matches_reference_with_repeated_ids() -> None:
    _check_reference(RowWiseAdagrad(lr=0.2, eps=1e-3),
                     lambda w, s, g: _rowwise_adagrad_reference(w, s, g, lr=0.2, eps=1e-3))


def test_ftrl_matches_reference_with_l1_and_l2() -> None:
    hyper = dict(alpha=0.1, beta=0.5, l1=0.8, l2=0.3)
    w = _check_reference(Ftrl(**hyper), lambda w, s, g: _ftrl_reference(w, s, g, **hyper))
    present = w[: N - 1]
    assert (present == 0).any() and (present != 0).any()  # both sides of the l1 threshold


# ---------------------------------------------------------------- property


_optimizers = st.one_of(
    st.builds(Sgd, lr=st.floats(1e-3, 1.0)),
    st.builds(Adagrad, lr=st.floats(1e-3, 1.0), eps=st.floats(1e-10, 1e-2),
              initial_accumulator_value=st.floats(0.0, 1.0)),
)


@settings(max_examples=60, deadline=None)
@given(config=_optimizers, n=st.integers(1, 8), dim=st.integers(1, 6), seed=st.integers(0, 2**32 - 1),
       steps=st.lists(st.lists(st.integers(0, 7), min_size=1, max_size=10), min_size=1, max_size=4))
def test_update_row_leaves_absent_rows_unchanged_for_random_configs(config, n, dim, seed, steps) -> None:
    keys = np.arange(100, 100 + n, dtype=np.int64) * 7919
    table = _table(config, keys, dim)
    w, acc = (a.astype(np.float64) for a in _rows(table, keys))
    rng = np.random.default_rng(seed)
    for positions in steps:
        positions = np.array(positions) % n
        grads = rng.standard_normal((len(positions), dim)).astype(np.float32)
        before = _rows(table, keys)[0]
        table.apply_gradients(keys[positions], grads)
        after = _rows(table, keys)[0]
        absent = ~np.isin(np.arange(n), positions)
        assert np.array_equal(after[absent], before[absent])
        g = _summed(positions, grads, n).astype(np.float64)[~absent]
        if isinstance(config, Sgd):
            w[~absent] -= config.lr * g
        else:
            acc[~absent] += g * g
            w[~absent] -= config.lr * g / (np.sqrt(acc[~absent]) + config.eps)
        assert_allclose(after, w, **TOL)


@pytest.mark.parametrize("optimizer", [Sgd(lr=0.1), Adagrad(lr=0.1), RowWiseAdagrad(lr=0.1), Adam(lr=0.1),
                                       AdamW(lr=0.1), Ftrl(alpha=0.1)])
def test_a_kernel_updates_a_single_row_as_the_table_updates_its_rows(optimizer) -> None:
    table = _table(optimizer, keys=KEYS[:1])
    block, _ = table.pull_rows(KEYS[:1])
    row = np.concatenate([block.values[0], block.state[0]]).astype(np.float32)
    kernel = OptimizerKernel(optimizer, DIM)
    grads = np.random.default_rng(3).standard_normal((STEPS, DIM))
    for step, grad in enumerate(grads, start=1):
        kernel.update(row, grad.tolist(), step)  # a list of Python floats is taken too
        table.apply_gradients(KEYS[:1], grad[None].astype(np.float32))
    values, state = _rows(table, KEYS[:1])
    assert_allclose(row, np.concatenate([values[0], state[0]]), **TOL)


@pytest.mark.parametrize(("row", "grad", "step", "message"), [
    (np.zeros(DIM, np.float32), np.ones(DIM), 1, r"row must be a float32 numpy array of 8 values \(4 values and "
                                                 r"4 of optimizer state\), got float32 of shape \[4\]"),
    (np.zeros(2 * DIM), np.ones(DIM), 1, r"got float64 of shape \[8\]"),
    ([0.0] * 2 * DIM, np.ones(DIM), 1, "got list"),
    (np.zeros(2 * DIM, np.float32), np.ones(DIM + 1), 1, r"grad must be 4 numbers \(a 1-D array\), got float64 of shape \[5\]"),
    (np.zeros(2 * DIM, np.float32), ["a"] * DIM, 1, r"grad must be 4 numbers .*got <U1"),
    (np.zeros(2 * DIM, np.float32), [1.0, float("nan"), 1.0, 1.0], 1, r"grad must be finite in float32 "
                                                                       r"\(magnitudes up to 3\.4e38\), got \[1\.0, nan"),
    (np.zeros(2 * DIM, np.float32), [1e39, 0.0, 0.0, 0.0], 1, r"grad must be finite in float32 .*, got \[1e\+39, 0"),
    (np.zeros(2 * DIM, np.float32), np.ones(DIM), 0, r"step must be a whole number from 1 to 2\*\*63 - 1, got 0"),
    (np.zeros(2 * DIM, np.float32), np.ones(DIM), 2**70, r"step must be a whole number .*, got 1180591620717411303424"),
])
def test_a_kernel_refuses_a_row_or_gradient_that_does_not_fit_and_writes_nothing(row, grad, step, message) -> None:
    kernel = OptimizerKernel(Adagrad(lr=0.1), DIM)
    before = np.array(row, copy=True)
    with pytest.raises(BatchError, match=message):
        kernel.update(row, grad, step)
    assert np.array_equal(np.asarray(row), before)


def test_a_kernel_refuses_what_is_not_an_optimizer_config() -> None:
    with pytest.raises(ConfigError, match=r"an optimizer config must be one of Sgd, Adagrad.*got 'adagrad'"):
        OptimizerKernel("adagrad", DIM)
    with pytest.raises(ConfigError, match="dim must be a whole number >= 1, got 0"):
        OptimizerKernel(Sgd(), 0)
