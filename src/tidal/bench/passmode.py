"""`tidal bench pass`: pass-mode training against Tidal's reference trainer and a plain
PyTorch DLRM.

Data, model and peer are `bench train`'s embedding-heavy config (a): generated
Criteo-like rows extracted once into in-memory batches of 4096 (26 one-id features, 13
dense), so no side pays for parsing; one collision-free table of dim 64 (SGD) and a
DLRM (Adam), the dense products in bfloat16 where the device computes them natively.
Sides, each training a fresh model on all batches, twice, in turns (the order
reversed in the second round; the faster run counts):

- `torch`: the usual PyTorch loop over 26 modulo-hashed `nn.EmbeddingBag(sparse=True)`
  tables of as many bytes as Tidal's table ends up holding (on the GPU when there is
  one, tables included), its dense products in the same precision as Tidal's;
- `reference`: Tidal's single-process trainer (`Trainer.step`: look up, pool, dense
  step, sparse update, batch after batch), the sparse kernels on every core;
- `passmode`: the same run in passes of `batches_per_pass` batches, the next pass
  planned on a second thread while one trains.

Tidal's sides run on `training.device: auto` (a GPU when there is one), their table
reserving the rows the run will create (as the peer's tables are allocated before the
clock starts). Reports
samples/s, the ratios, each side's AUC on held-out rows, and where pass mode's time
went (its `runtime_report`).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tidal.bench import train as bench_train
from tidal.config import RunConfig
from tidal.data.batch import SparseBatch
from tidal.data.criteo import criteo_features
from tidal.embedding._parallel import cpu_count
from tidal.runtime import Trainer
from tidal.runtime.passes import train as train_in_passes

__all__ = ["run"]

ROUNDS = 2
SIDES = ("torch", "reference", "passmode")
SHAPE = bench_train.CONFIGS[""]  # (a), embedding-heavy


def run(*, rows: int = 400_000, batches_per_pass: int = 16, as_json: bool = False) -> dict:
    """Every side on `rows` generated training rows (and a fifth as many held out)."""
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        paths, train, held_out, distinct_ids = bench_train.scratch_data(scratch, rows)
        torch_rows = bench_train.equal_bytes_rows(SHAPE, distinct_ids)
        for every in (None, batches_per_pass):  # compile the kernels first
            _train(_trainer(paths, scratch / f"warm{every}", every), train[:2])
        seconds: dict[str, list[float]] = {side: [] for side in SIDES}
        aucs: dict[str, list[float]] = {side: [] for side in SIDES}
        report: dict = {}
        for round_ in range(ROUNDS):
            for side in SIDES if round_ % 2 == 0 else SIDES[::-1]:
                torch.manual_seed(round_)
                if side == "torch":
                    peer, spent = bench_train.train_torch(SHAPE, torch_rows, train)
                    seconds[side].append(spent)
                    aucs[side].append(bench_train.auc_of(peer, held_out))
                    continue
                trainer = _trainer(paths, scratch / f"{side}{round_}", batches_per_pass if side == "passmode"
                                   else None, seed=round_, reserve_rows=distinct_ids)
                seconds[side].append(_train(trainer, train))
                aucs[side].append(_auc(trainer, held_out))
                report = trainer.runtime_report | {"device": trainer.device.type} if side == "passmode" else report
    return _summary(train, seconds, aucs, report, batches_per_pass, as_json)


def _trainer(paths: list[str], run_dir: Path, batches_per_pass: int | None, seed: int = 0,
             reserve_rows: int = 0) -> Trainer:
    """A fresh Tidal run (dense weights from `seed`); with `reserve_rows`, its table's
    memory is allocated before the clock starts, as the peer's fixed tables are."""
    config = RunConfig(
        data={"train": paths}, features=[f.model_dump() for f in criteo_features(table="ids")],
        tables=[bench_train.table_config(SHAPE, reserve_rows).model_dump()],
        model={"kind": "dlrm", "bottom_sizes": SHAPE.bottom, "hidden_sizes": SHAPE.top},
        training={"lr": bench_train.LR_DENSE, "run_dir": str(run_dir), "threads": cpu_count(), "log_every": 1 << 30,
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


def _auc(trainer: Trainer, batches: list[SparseBatch]) -> float:
    trainer.model.eval()
    return bench_train.auc_of(lambda b: trainer.model(trainer.collection.forward(b, train=False)[0].to(trainer.device),
                                                    torch.tensor(b.dense).to(trainer.device)).float(), batches)


def _summary(train: list[SparseBatch], seconds: dict, aucs: dict, report: dict, batches_per_pass: int,
             as_json: bool) -> dict:
    rows = sum(b.batch_size for b in train)
    summary: dict = {"rows": rows, "batches_per_pass": batches_per_pass, "device": report["device"]}
    for side in SIDES:
        summary[f"{side}_samples_per_s"] = rows / min(seconds[side])
        summary[f"{side}_auc"] = float(np.mean(aucs[side]))
    summary["ratio_vs_reference"] = summary["passmode_samples_per_s"] / summary["reference_samples_per_s"]
    summary["ratio_vs_torch"] = summary["passmode_samples_per_s"] / summary["torch_samples_per_s"]
    summary["passmode_report"] = report.get("passmode", {})
    for side in SIDES:
        print(f"{side:>9}: {summary[f'{side}_samples_per_s']:,.0f} samples/s (AUC {summary[f'{side}_auc']:.4f})")
    passes = summary["passmode_report"]
    print(f"pass mode x{summary['ratio_vs_reference']:.2f} the reference, x{summary['ratio_vs_torch']:.2f} torch; "
          f"{passes.get('passes', 0)} passes of up to {batches_per_pass} batches, "
          f"{passes.get('kept_share', 0.0):.0%} of a pass's rows already on the device, planning {passes.get('plan_s', 0.0):.1f} s (training waited "
          f"{passes.get('wait_s', 0.0):.1f} s for it)", flush=True)
    if as_json:
        print(json.dumps(summary))
    return summary
