"""`tidal bench pass`: pass-mode training against Tidal's reference trainer.

Data: generated Criteo-like rows, extracted once into in-memory batches of 4096 (26
one-id features, 13 dense), so neither side pays for parsing. The model is `bench
train`'s embedding-heavy config: one collision-free table of dim 64 (SGD) and a DLRM
(Adam), the dense products in bfloat16 where the CPU has them. Peers, each training a
fresh model on all batches, twice, in turns (the order reversed in the second round;
the faster run counts):

- `reference`: the single-process trainer (`Trainer.step`: look up, pool, dense step,
  sparse update, batch after batch), the sparse kernels on every core;
- `passmode`: the same run in passes of `batches_per_pass` batches, the next pass
  planned on a second thread while one trains, rows and dense network on the training
  device (`training.device: auto`: a GPU when there is one, as for the reference).

Reports samples/s, the ratio, each side's AUC on held-out rows (the same training
twice: they must agree), and where pass mode's time went (`runtime_report`).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tidal.config import RunConfig
from tidal.data.batch import SparseBatch
from tidal.data.criteo import criteo_features
from tidal.data.extract import Extractor
from tidal.data.generate import auc, generate
from tidal.data.readers import read_batches
from tidal.embedding._parallel import cpu_count
from tidal.runtime import Trainer
from tidal.runtime.passes import train as train_in_passes

__all__ = ["run"]

BATCH = 4096
ROUNDS = 2
SIDES = ("reference", "passmode")


def run(*, rows: int = 400_000, batches_per_pass: int = 16, as_json: bool = False) -> dict:
    """Both sides on `rows` generated training rows (and a fifth as many held out)."""
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        data = generate(scratch / "train", rows=rows, seed=3)
        train, held_out = _batches(data.paths), _batches(generate(scratch / "eval", rows=max(rows // 5, 1_000), seed=3,
                                                                  split=1).paths)
        _train(_trainer(data.paths, scratch / "warm", None), train[:2])  # compile the kernels first
        _train(_trainer(data.paths, scratch / "warm_pass", batches_per_pass), train[:2])
        seconds: dict[str, list[float]] = {side: [] for side in SIDES}
        aucs: dict[str, list[float]] = {side: [] for side in SIDES}
        report: dict = {}
        device = "cpu"
        for round_ in range(ROUNDS):
            for side in SIDES if round_ % 2 == 0 else SIDES[::-1]:
                every = batches_per_pass if side == "passmode" else None
                trainer = _trainer(data.paths, scratch / f"{side}{round_}", every, seed=round_)
                seconds[side].append(_train(trainer, train))
                aucs[side].append(_auc(trainer, held_out))
                report = trainer.runtime_report if side == "passmode" else report
                device = trainer.device.type
    return _summary(train, seconds, aucs, report | {"device": device}, batches_per_pass, as_json)


def _batches(paths: list[str]) -> list[SparseBatch]:
    extractor = Extractor(criteo_features(table="ids"))
    return [extractor(t) for t in read_batches(paths, batch_rows=BATCH) if t.num_rows]


def _trainer(paths: list[str], run_dir: Path, batches_per_pass: int | None, seed: int = 0) -> Trainer:
    config = RunConfig(
        data={"train": paths}, features=[f.model_dump() for f in criteo_features(table="ids")],
        tables=[{"name": "ids", "dim": 64, "optimizer": {"kind": "sgd", "lr": 0.05}}],
        model={"kind": "dlrm", "bottom_sizes": [256], "hidden_sizes": [256]},
        training={"lr": 0.001, "run_dir": str(run_dir), "threads": cpu_count(), "log_every": 1 << 30,
                  "precision": "auto", "seed": seed, "device": "auto"},
        passmode=None if batches_per_pass is None else {"batches_per_pass": batches_per_pass})
    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(config)


def _train(trainer: Trainer, batches: list[SparseBatch]) -> float:
    """Seconds `trainer` takes to train on `batches`, in passes when its config says so."""
    start = time.perf_counter()
    if trainer.config.passmode is None:
        for step, batch in enumerate(batches, start=1):
            trainer.step(batch, step=step)
    else:
        with open(os.devnull, "w") as log:
            train_in_passes(trainer, log, {"step": 0, "epoch": 0, "batch": 0}, None,
                            [(0, n, batch) for n, batch in enumerate(batches)])
    if trainer.device.type == "cuda":
        torch.cuda.synchronize(trainer.device)
    return time.perf_counter() - start


@torch.no_grad()
def _auc(trainer: Trainer, batches: list[SparseBatch]) -> float:
    trainer.model.eval()
    scores = [trainer.model(trainer.collection.forward(b, train=False)[0].to(trainer.device),
                            torch.tensor(b.dense).to(trainer.device)).float().cpu().numpy().ravel() for b in batches]
    return auc(np.concatenate([b.labels.ravel() for b in batches]), np.concatenate(scores))


def _summary(train: list[SparseBatch], seconds: dict, aucs: dict, report: dict, batches_per_pass: int,
             as_json: bool) -> dict:
    rows = sum(b.batch_size for b in train)
    summary: dict = {"rows": rows, "batches_per_pass": batches_per_pass, "device": report["device"]}
    for side in SIDES:
        summary[f"{side}_samples_per_s"] = rows / min(seconds[side])
        summary[f"{side}_auc"] = float(np.mean(aucs[side]))
    summary["ratio_vs_reference"] = summary["passmode_samples_per_s"] / summary["reference_samples_per_s"]
    summary["passmode_report"] = report.get("passmode", {})
    print(f"reference: {summary['reference_samples_per_s']:,.0f} samples/s (AUC {summary['reference_auc']:.4f})")
    passes = summary["passmode_report"]
    print(f"pass mode: {summary['passmode_samples_per_s']:,.0f} samples/s (AUC {summary['passmode_auc']:.4f})  "
          f"x{summary['ratio_vs_reference']:.2f}; {passes.get('passes', 0)} passes of {batches_per_pass} batches, "
          f"{passes.get('kept_share', 0.0):.0%} of a pass's rows already on the device, planning "
          f"{passes.get('plan_s', 0.0):.1f} s (training waited {passes.get('wait_s', 0.0):.1f} s for it)", flush=True)
    if as_json:
        print(json.dumps(summary))
    return summary
