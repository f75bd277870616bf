"""`tidal demo`: generate data, train DLRM on collision-free tables, evaluate, summarize.

The generated data plants a logistic truth over Zipf-distributed raw ids, so the best
AUC any model can reach is known and printed beside the one Tidal reached. Training
runs on the heterogeneous engine: two sparse workers feed one dense worker, in sync
mode (the result is bitwise the single-process trainer's).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from tidal.config import RunConfig
from tidal.data.criteo import criteo_features
from tidal.data.generate import generate
from tidal.runtime import Telemetry, Trainer

__all__ = ["run"]


def _config(train: list[str], held_out: list[str], run_dir: Path) -> RunConfig:
    return RunConfig(
        data={"train": train, "eval": held_out, "batch_size": 2048},
        features=[f.model_dump() for f in criteo_features(table="ids")],
        tables=[{"name": "ids", "dim": 16, "optimizer": {"kind": "adagrad", "lr": 0.05}}],
        model={"kind": "dlrm", "bottom_sizes": [64], "hidden_sizes": [128, 64]},
        training={"epochs": 1, "lr": 0.002, "log_every": 25, "eval_every": 50, "run_dir": str(run_dir)},
        runtime={"backend": "local", "sparse_workers": 2, "dense_workers": 1, "mode": "sync"},
    )


def run(rows: int = 300_000) -> dict:
    """The whole path on `rows` generated training rows (and a quarter as many held out)."""
    with tempfile.TemporaryDirectory() as scratch:
        print(f"Generating {rows:,d} training and {rows // 4:,d} held-out rows (Criteo layout, planted truth)")
        train = generate(Path(scratch) / "train", rows=rows, files=2, seed=0)
        held_out = generate(Path(scratch) / "eval", rows=rows // 4, seed=0, split=1)
        print("Training DLRM, every raw id in its own row: 2 sparse workers feed 1 dense worker "
              "(in a temporary run directory)")
        summary = Trainer(_config(train.paths, held_out.paths, Path(scratch) / "run")).fit()
    _print_summary(summary, held_out.ceiling_auc)
    return summary


def _print_summary(summary: dict, ceiling_auc: float) -> None:
    evaluation = summary["eval"]
    print("Summary")
    print(f"  eval AUC        {evaluation['auc']['label']:.4f}   (planted ceiling {ceiling_auc:.4f})")
    print(f"  eval log loss   {evaluation['logloss']['label']:.4f}   on {evaluation['rows']:,d} rows")
    print(f"  training        {summary['rows']:,d} rows at {summary['samples_per_s']:,.0f} samples/s")
    for name, table in summary["tables"].items():
        print(f"  table {name:9} {table['rows']:,d} rows, {table['bytes'] / 2**20:,.1f} MiB")
    print(f"  bad rows        {summary['bad_rows']}")
    print("Where the time went (busy fraction of each stage)")
    print("  " + Telemetry.table(summary["runtime"]).replace("\n", "\n  "))
    print(json.dumps({"eval_auc": evaluation["auc"]["label"], "ceiling_auc": ceiling_auc,
                      "samples_per_s": summary["samples_per_s"]}))
