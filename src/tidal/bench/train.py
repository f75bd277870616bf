"""`tidal bench train`: end-to-end training samples/s, Tidal against plain PyTorch DLRM.

Data: generated Criteo-like rows, extracted once into in-memory batches of 4096, so
neither side pays for parsing. Tidal trains its collision-free tables (SGD) and the
DLRM (Adam); the peer is the same DLRM over 26 modulo-hashed `nn.EmbeddingBag(sparse=
True)` tables holding as many bytes in all as Tidal's table ends up holding, with
`torch.optim.SGD` on the tables and Adam on the dense net. The two take turns on every
batch (same machine load), and both are evaluated on held-out rows afterwards.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tidal.config import ModelConfig, RunConfig
from tidal.data.batch import SparseBatch
from tidal.data.criteo import criteo_features
from tidal.data.extract import Extractor
from tidal.data.generate import auc, generate
from tidal.data.readers import read_batches
from tidal.models import RankingModel
from tidal.runtime import Trainer

__all__ = ["CONFIGS", "run"]

BATCH = 4096
LR_SPARSE, LR_DENSE = 0.05, 0.001


@dataclass(frozen=True, kw_only=True)
class _Shape:
    dim: int
    bottom: list[int]  # the bottom MLP before its last layer, which has `dim` outputs
    top: list[int]  # the top MLP before the single-logit head


CONFIGS = {
    "": _Shape(dim=64, bottom=[256], top=[256]),  # (a) embedding-heavy
    "kaggle_": _Shape(dim=16, bottom=[512, 256, 64], top=[512, 256]),  # (b) the Criteo Kaggle DLRM
}


def _batches(paths: list[str]) -> list[SparseBatch]:
    extractor = Extractor(criteo_features(table="ids"))
    return [extractor(t) for t in read_batches(paths, batch_rows=BATCH) if t.num_rows]


def _tidal(shape: _Shape, paths: list[str], run_dir: Path) -> Trainer:
    config = RunConfig(
        data={"train": paths}, features=[f.model_dump() for f in criteo_features(table="ids")],
        tables=[{"name": "ids", "dim": shape.dim, "optimizer": {"kind": "sgd", "lr": LR_SPARSE}}],
        model={"kind": "dlrm", "bottom_sizes": shape.bottom, "hidden_sizes": shape.top},
        training={"lr": LR_DENSE, "run_dir": str(run_dir), "threads": torch.get_num_threads()})
    return Trainer(config)


class _TorchDLRM(nn.Module):
    """The peer: one modulo-hashed EmbeddingBag per feature, then the same dense net."""

    def __init__(self, shape: _Shape, rows_per_table: int) -> None:
        super().__init__()
        self.rows = rows_per_table
        self.tables = nn.ModuleList(nn.EmbeddingBag(rows_per_table, shape.dim, mode="sum", sparse=True) for _ in range(26))
        for table in self.tables:  # Tidal's default initializer, so both start alike
            nn.init.uniform_(table.weight, -0.01, 0.01)
        self.dense_net = RankingModel(ModelConfig(kind="dlrm", bottom_sizes=shape.bottom, hidden_sizes=shape.top),
                                      num_features=26, dim=shape.dim, dense_features=13, num_targets=1)

    def forward(self, batch: SparseBatch) -> torch.Tensor:
        offsets, b = batch.offsets, batch.batch_size
        pooled = []
        for f, table in enumerate(self.tables):
            lo, hi = offsets[f * b], offsets[(f + 1) * b]
            ids = torch.from_numpy(batch.values[lo:hi] % self.rows)
            bag_starts = torch.from_numpy(offsets[f * b : (f + 1) * b] - lo)
            pooled.append(table(ids, bag_starts))
        return self.dense_net(torch.stack(pooled, dim=1), torch.tensor(batch.dense))  # [B, 1]


def _torch_step(model: _TorchDLRM, sparse: torch.optim.Optimizer, dense: torch.optim.Optimizer,
                batch: SparseBatch) -> None:
    loss = nn.functional.binary_cross_entropy_with_logits(model(batch), torch.tensor(batch.labels))
    sparse.zero_grad(set_to_none=True)
    dense.zero_grad(set_to_none=True)
    loss.backward()
    sparse.step()
    dense.step()


@torch.no_grad()
def _auc(score, batches: list[SparseBatch]) -> float:  # type: ignore[no-untyped-def]
    scores = np.concatenate([score(b).numpy().ravel() for b in batches])
    return auc(np.concatenate([b.labels.ravel() for b in batches]), scores)


def _equal_bytes_rows(tidal: Trainer, train: list[SparseBatch], dim: int) -> int:
    """Rows per peer table so that 26 of them hold the bytes Tidal's table will hold:
    one row (values + index and metadata) per distinct id of the training data."""
    distinct = np.unique(np.concatenate([b.values for b in train])).shape[0]
    return max(1, distinct * tidal.collection.tables[0].bytes_per_row // (4 * dim) // 26)


def _run_config(prefix: str, shape: _Shape, train: list[SparseBatch], held_out: list[SparseBatch],
                paths: list[str], scratch: Path) -> dict:
    torch.manual_seed(0)
    tidal = _tidal(shape, paths, scratch / f"run{prefix}")
    tidal.step(train[0])  # compile the kernels before timing
    rows_per_table = _equal_bytes_rows(tidal, train, shape.dim)
    peer = _TorchDLRM(shape, rows_per_table)
    sparse_opt = torch.optim.SGD(peer.tables.parameters(), lr=LR_SPARSE)
    dense_opt = torch.optim.Adam(peer.dense_net.parameters(), lr=LR_DENSE)
    seconds = {"tidal": 0.0, "torch": 0.0}
    for batch in train:
        start = time.perf_counter()
        tidal.step(batch)
        middle = time.perf_counter()
        _torch_step(peer, sparse_opt, dense_opt, batch)
        seconds["tidal"] += middle - start
        seconds["torch"] += time.perf_counter() - middle
    rows = sum(b.batch_size for b in train)
    tidal.model.eval()
    tidal_auc = _auc(lambda b: tidal.model(tidal.collection.forward(b, train=False)[0], torch.tensor(b.dense)), held_out)
    result = {"tidal_samples_per_s": rows / seconds["tidal"], "torch_samples_per_s": rows / seconds["torch"],
              "tidal_auc": tidal_auc, "torch_auc": _auc(peer, held_out)}
    result["ratio_vs_torch"] = result["tidal_samples_per_s"] / result["torch_samples_per_s"]
    print(f"{prefix or 'heavy_':>8} dim {shape.dim}: tidal {result['tidal_samples_per_s']:,.0f} samples/s "
          f"(AUC {tidal_auc:.4f})  torch {result['torch_samples_per_s']:,.0f} samples/s (AUC {result['torch_auc']:.4f}, "
          f"{rows_per_table:,d} rows x 26 tables)  x{result['ratio_vs_torch']:.2f}", flush=True)
    return {f"{prefix}{k}": v for k, v in result.items()}


def run(rows: int = 1_000_000, as_json: bool = False) -> dict:
    """Both configs on `rows` generated training rows (and a fifth as many held out)."""
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        data = generate(scratch / "train", rows=rows, seed=3)
        held_out = _batches(generate(scratch / "eval", rows=max(rows // 5, 1_000), seed=3, split=1).paths)
        train = _batches(data.paths)
        summary: dict = {}
        for prefix, shape in CONFIGS.items():
            summary |= _run_config(prefix, shape, train, held_out, data.paths, scratch)
    if as_json:
        print(json.dumps(summary))
    return summary
