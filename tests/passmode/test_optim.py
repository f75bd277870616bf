"""The device optimizers against the store's compiled kernels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tidal.config import Adagrad, Adam, AdamW, Ftrl, RowWiseAdagrad, Sgd, TableConfig
from tidal.embedding import EmbeddingTable
from tidal.embedding.table import RowBlock
from tidal.passmode.optim import update_rows

OPTIMIZERS = [Sgd(lr=0.1), Adagrad(lr=0.1), RowWiseAdagrad(lr=0.1), Adam(lr=0.05), Adam(lr=0.05, per_row_bias_correction=True),
              AdamW(lr=0.05, weight_decay=0.1), Ftrl(alpha=0.1, l1=0.05, l2=0.01)]


def _table(optimizer, rows: int, dim: int, rng) -> tuple[EmbeddingTable, np.ndarray]:
    table = EmbeddingTable(TableConfig(name="t", dim=dim, optimizer=optimizer))
    keys = np.arange(rows, dtype=np.int64) * 7 - 20
    width = table.optimizer.state_width
    state = np.abs(rng.standard_normal((rows, width))).astype(np.float32)  # accumulators are not negative
    table.push_rows(RowBlock(keys=keys, values=rng.standard_normal((rows, dim)).astype(np.float32), state=state,
                             last_seen=np.zeros(rows, np.uint32), counts=np.zeros(rows, np.uint32)))
    return table, keys


@pytest.mark.parametrize("optimizer", OPTIMIZERS, ids=lambda o: f"{o.kind}{'_per_row' if getattr(o, 'per_row_bias_correction', False) else ''}")
def test_device_update_matches_the_store_kernel_over_several_steps(optimizer):
    rng = np.random.default_rng(1)
    table, keys = _table(optimizer, rows=40, dim=8, rng=rng)
    block, _ = table.pull_rows(keys)
    spare = 3  # the device state is wider than this table's, as when tables of other optimizers share it
    values = torch.tensor(block.values)
    state = torch.cat([torch.tensor(block.state), torch.full((len(keys), spare), 9.0)], dim=1)
    for step in range(1, 5):
        chosen = rng.choice(len(keys), size=25, replace=False)
        grad = rng.standard_normal((25, 8)).astype(np.float32)
        table.apply_gradients(keys[chosen], grad)
        update_rows(table.optimizer, values, state, torch.tensor(chosen), torch.tensor(grad), step)
    after, _ = table.pull_rows(keys)
    np.testing.assert_allclose(values.numpy(), after.values, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(state[:, : after.state.shape[1]].numpy(), after.state, rtol=1e-6, atol=1e-6)
    assert (state[:, after.state.shape[1] :] == 9.0).all()  # the other tables' columns untouched
