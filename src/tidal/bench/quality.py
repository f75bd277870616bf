"""`tidal bench quality`: collision-free tables against modulo-hashed tables of equal bytes.

Both runs train the same DLRM on the same generated data (planted logistic truth over
Zipf ids) for the same steps. The hashed baseline folds every id into a fixed table
(``id mod N``) holding as many bytes as Tidal's table ends up holding, as a fixed-size
hashed embedding would; colliding ids then share one row. `ceiling_auc` is the AUC of
the true probabilities: no model can beat it in expectation.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import pyarrow as pa

from tidal.config import RunConfig
from tidal.data.batch import SparseBatch
from tidal.data.criteo import criteo_features
from tidal.data.generate import generate
from tidal.runtime import Trainer

__all__ = ["MIN_ROWS", "run"]

MIN_ROWS = 1_000  # training rows: a quarter as many are held out, which must hold both classes to score


class _HashedTrainer(Trainer):
    """The same trainer, with every id folded into `rows` buckets before lookup."""

    def __init__(self, config: RunConfig, rows: int) -> None:
        super().__init__(config)
        self.rows = rows

    def extract(self, table: pa.RecordBatch) -> SparseBatch:
        batch = super().extract(table)
        return dataclasses.replace(batch, values=batch.values % self.rows)


def _config(train: list[str], held_out: list[str], run_dir: Path, epochs: int) -> RunConfig:
    return RunConfig(
        data={"train": train, "eval": held_out, "batch_size": 2048},
        features=[f.model_dump() for f in criteo_features(table="ids")],
        tables=[{"name": "ids", "dim": 16, "optimizer": {"kind": "adagrad", "lr": 0.01, "eps": 1e-5}}],
        model={"kind": "dlrm", "bottom_sizes": [64], "hidden_sizes": [128, 64]},
        training={"epochs": epochs, "lr": 0.002, "log_every": 1_000_000, "run_dir": str(run_dir)},
    )


def run(rows: int = 1_000_000, vocabulary: int = 1_000, epochs: int = 2, as_json: bool = False) -> dict:
    """Train both on `rows` rows whose ids come from `vocabulary` ranks per column."""
    with tempfile.TemporaryDirectory() as scratch:
        train = generate(Path(scratch) / "train", rows=rows, seed=7, vocabulary=vocabulary)
        held_out = generate(Path(scratch) / "eval", rows=rows // 4, seed=7, split=1, vocabulary=vocabulary)
        tidal = Trainer(_config(train.paths, held_out.paths, Path(scratch) / "tidal", epochs))
        tidal_summary = tidal.fit()
        stats = tidal.collection.tables[0].stats()
        row_bytes = stats.value_bytes // max(stats.rows, 1) + stats.state_bytes // max(stats.rows, 1)
        total = stats.value_bytes + stats.state_bytes + stats.index_bytes + stats.metadata_bytes
        hashed_rows = max(1, total // row_bytes)
        hashed = _HashedTrainer(_config(train.paths, held_out.paths, Path(scratch) / "hashed", epochs), hashed_rows)
        hashed_summary = hashed.fit()
    summary = {"tidal_auc": tidal_summary["eval"]["auc"]["label"], "hashed_auc": hashed_summary["eval"]["auc"]["label"],
               "ceiling_auc": held_out.ceiling_auc, "tidal_rows": stats.rows, "hashed_rows": int(hashed_rows),
               "table_bytes": int(total)}
    print(f"tidal AUC {summary['tidal_auc']:.4f} ({stats.rows:,d} rows)   hashed AUC {summary['hashed_auc']:.4f} "
          f"({hashed_rows:,d} rows, same bytes)   ceiling {summary['ceiling_auc']:.4f}")
    if as_json:
        print(json.dumps(summary))
    return summary
