"""`tidal bench train`: end-to-end training samples/s, Tidal against plain PyTorch DLRM.

Data: generated Criteo-like rows, extracted once into in-memory batches of 4096, so
neither side pays for parsing. Tidal trains its collision-free tables (SGD) and the
DLRM (Adam) on its heterogeneous engine (local backend: one sparse worker feeding one
dense worker), the dense network's products in bfloat16 where the CPU has them
(`training.precision: auto`; weights and optimizer float32). It trains in sync mode,
where every batch reads the rows the previous one updated, as the peer's loop does,
each stage on every core (the `tidal_` figures: the peer's kind of training, so their
AUCs compare); in config (a) also async, at most two batches in flight, each stage on
one thread (`async_tidal_`: faster, but a batch may miss the previous one's update,
which costs AUC on longer runs). Tidal's table reserves the rows the run will create,
as the peer's tables are allocated before the clock starts. The peer is the
usual PyTorch loop, its dense products in the same precision (torch's autocast to
bfloat16 where the CPU or GPU computes it natively, as Tidal's `auto`), over the same DLRM on 26 modulo-hashed
`nn.EmbeddingBag(sparse=True)` tables holding as many bytes in all as Tidal's table
ends up holding, with `torch.optim.SGD` on the tables and Adam on the dense net, torch
using every core. Each side trains a fresh model on all batches, twice, in turns
(peer, Tidal sync, Tidal async, then the other way round: a run right after another
side's pays for what it left behind); the faster of its two runs counts. AUC is
the mean over the rounds' models on held-out rows (round r starts every dense network
from seed r: one seed's AUC moves by about 0.001).
With a GPU, Tidal's dense workers run on it and the whole peer model too (tables
included), as a PyTorch user would place it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tidal.config import ModelConfig, RunConfig, Sgd, TableConfig
from tidal.data.batch import SparseBatch
from tidal.embedding import EmbeddingTable
from tidal.embedding._parallel import cpu_count
from tidal.data.criteo import criteo_features
from tidal.data.extract import Extractor
from tidal.data.generate import auc, generate
from tidal.data.readers import read_batches
from tidal.models import RankingModel, compute_precision
from tidal.runtime import Trainer
from tidal.runtime.hetero import train as train_on_engine
from tidal.runtime.source import MemorySpec
from tidal.runtime.workers import dense_device

__all__ = ["CONFIGS", "run"]

BATCH = 4096
LR_SPARSE, LR_DENSE = 0.05, 0.001
RUNTIME = {"backend": "local", "sparse_workers": 1, "dense_workers": 1, "telemetry_every_s": 1e6}
# Threads of the dense network and of the sparse kernels, by mode. Async overlaps the
# stages, so each takes one core; sync runs them mostly one after the other, so each
# takes every core (2026-11-29, sync, 200k rows, three rounds: 51-60k samples/s with one
# thread each, 72-79k with every core for both).
THREADS = {"async": 1, "sync": cpu_count()}
ROUNDS = 2
_PREFIX = {"sync": "", "async": "async_"}  # of each mode's figures: tidal_..., async_tidal_...


@dataclass(frozen=True, kw_only=True)
class _Shape:
    dim: int
    bottom: list[int]  # the bottom MLP before its last layer, which has `dim` outputs
    top: list[int]  # the top MLP before the single-logit head
    modes: tuple[str, ...]  # the engine modes Tidal trains in


CONFIGS = {
    "": _Shape(dim=64, bottom=[256], top=[256], modes=("sync", "async")),  # (a) embedding-heavy
    "kaggle_": _Shape(dim=16, bottom=[512, 256, 64], top=[512, 256], modes=("sync",)),  # (b) the Criteo Kaggle DLRM
}


def batches_of(paths: list[str]) -> list[SparseBatch]:
    extractor = Extractor(criteo_features(table="ids"))
    return [extractor(t) for t in read_batches(paths, batch_rows=BATCH) if t.num_rows]


def table_config(shape: _Shape, reserve_rows: int = 0) -> TableConfig:
    return TableConfig(name="ids", dim=shape.dim, optimizer=Sgd(lr=LR_SPARSE), reserve_rows=reserve_rows)


def _tidal(shape: _Shape, paths: list[str], run_dir: Path, seed: int, mode: str, reserve_rows: int) -> Trainer:
    config = RunConfig(
        data={"train": paths}, features=[f.model_dump() for f in criteo_features(table="ids")],
        tables=[table_config(shape, reserve_rows).model_dump()],
        model={"kind": "dlrm", "bottom_sizes": shape.bottom, "hidden_sizes": shape.top},
        training={"lr": LR_DENSE, "run_dir": str(run_dir), "threads": THREADS[mode], "log_every": 1 << 30,
                  "precision": "auto", "seed": seed},
        runtime=RUNTIME | {"mode": mode, "dense_threads": THREADS[mode]} | ({"max_inflight": 2} if mode == "async" else {}))
    return Trainer(config)


def _train_tidal(shape: _Shape, paths: list[str], run_dir: Path, batches: list[SparseBatch],
                 seed: int = 0, mode: str = "async", reserve_rows: int = 0) -> tuple[Trainer, float]:
    """A fresh Tidal model (dense weights from `seed`) trained on `batches` by the
    engine in `mode`, and the seconds it took. With `reserve_rows`, the table's memory
    is allocated before the clock starts, as the peer's fixed tables are."""
    trainer = _tidal(shape, paths, run_dir, seed, mode, reserve_rows)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(os.devnull, "w") as log:
        start = time.perf_counter()
        train_on_engine(trainer, log, {"step": 0, "epoch": 0, "batch": 0}, None, MemorySpec(batches=batches))
        return trainer, time.perf_counter() - start


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
        device = self.tables[0].weight.device
        pooled = []
        for f, table in enumerate(self.tables):
            lo, hi = offsets[f * b], offsets[(f + 1) * b]
            ids = torch.from_numpy(batch.values[lo:hi] % self.rows).to(device)
            bag_starts = torch.from_numpy(offsets[f * b : (f + 1) * b] - lo).to(device)
            pooled.append(table(ids, bag_starts))
        with compute_precision(device, "auto"):  # the dense products in Tidal's precision, bfloat16 where native
            logits = self.dense_net(torch.stack(pooled, dim=1), torch.tensor(batch.dense).to(device))  # [B, 1]
        return logits.float()


def train_torch(shape: _Shape, rows_per_table: int, batches: list[SparseBatch]) -> tuple[_TorchDLRM, float]:
    """A fresh peer trained on `batches` in the usual PyTorch loop, and the seconds it took."""
    device = dense_device("auto")
    model = _TorchDLRM(shape, rows_per_table).to(device)
    sparse = torch.optim.SGD(model.tables.parameters(), lr=LR_SPARSE)
    dense = torch.optim.Adam(model.dense_net.parameters(), lr=LR_DENSE)
    start = time.perf_counter()
    for batch in batches:
        labels = torch.tensor(batch.labels).to(device)
        loss = nn.functional.binary_cross_entropy_with_logits(model(batch), labels)
        sparse.zero_grad(set_to_none=True)
        dense.zero_grad(set_to_none=True)
        loss.backward()
        sparse.step()
        dense.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return model, time.perf_counter() - start


@torch.no_grad()
def auc_of(score, batches: list[SparseBatch]) -> float:  # type: ignore[no-untyped-def]
    scores = np.concatenate([score(b).cpu().numpy().ravel() for b in batches])
    return auc(np.concatenate([b.labels.ravel() for b in batches]), scores)


def equal_bytes_rows(shape: _Shape, distinct_ids: int) -> int:
    """Rows per peer table so that 26 of them hold the bytes Tidal's table will hold:
    one row (values + index and metadata) per distinct id of the training data."""
    return max(1, distinct_ids * EmbeddingTable(table_config(shape)).bytes_per_row // (4 * shape.dim) // 26)


def _run_config(prefix: str, shape: _Shape, train: list[SparseBatch], held_out: list[SparseBatch],
                paths: list[str], scratch: Path, distinct_ids: int) -> dict:
    rows_per_table = equal_bytes_rows(shape, distinct_ids)
    sides = ["torch", *(f"{_PREFIX[mode]}tidal" for mode in shape.modes)]
    seconds: dict[str, list[float]] = {side: [] for side in sides}
    aucs: dict[str, list[float]] = {side: [] for side in sides}
    busy: dict[str, dict] = {}  # busy fractions of each stage, by side, in the last round
    modes = {f"{_PREFIX[mode]}tidal": mode for mode in shape.modes}
    for round_ in range(ROUNDS):  # round r: every side's dense weights from seed r
        for side in sides if round_ % 2 == 0 else sides[::-1]:  # reversed each round: no side always follows one
            if side == "torch":
                torch.manual_seed(round_)
                peer, spent = train_torch(shape, rows_per_table, train)
                seconds[side].append(spent)
                aucs[side].append(auc_of(peer, held_out))
                continue
            run_dir = scratch / f"{side}{prefix}{round_}"
            tidal, spent = _train_tidal(shape, paths, run_dir, train, seed=round_, mode=modes[side],
                                        reserve_rows=distinct_ids)
            seconds[side].append(spent)
            tidal.model.eval()
            aucs[side].append(auc_of(lambda b: tidal.model(tidal.collection.forward(b, train=False)[0],
                                                            torch.tensor(b.dense)), held_out))
            busy[side] = {role: {k: round(v, 3) for k, v in stages.items()}
                          for role, stages in tidal.runtime_report["busy"].items()}  # type: ignore[index]
    rows = sum(b.batch_size for b in train)
    result = {f"{side}_{key}": value for side in sides for key, value in
              (("samples_per_s", rows / min(seconds[side])), ("auc", float(np.mean(aucs[side]))))}
    result |= {f"{side}_busy": stages for side, stages in busy.items()}
    print(f"{prefix or 'heavy_':>8} dim {shape.dim}: torch {result['torch_samples_per_s']:,.0f} samples/s "
          f"(AUC {result['torch_auc']:.4f}, {rows_per_table:,d} rows x 26 tables)", flush=True)
    for mode in shape.modes:
        side = f"{_PREFIX[mode]}tidal"
        ratio = result[f"{_PREFIX[mode]}ratio_vs_torch"] = result[f"{side}_samples_per_s"] / result["torch_samples_per_s"]
        print(f"          tidal {mode}: {result[f'{side}_samples_per_s']:,.0f} samples/s "
              f"(AUC {result[f'{side}_auc']:.4f})  x{ratio:.2f}", flush=True)
    for side, stages in busy.items():
        print(f"          {side} busy: " + "  ".join(f"{role}.{stage} {v:.0%}" for role, parts in stages.items()
                                                   for stage, v in parts.items()), flush=True)
    return {f"{prefix}{k}": v for k, v in result.items()}


def scratch_data(scratch: Path, rows: int) -> tuple[list[str], list[SparseBatch], list[SparseBatch], int]:
    """`rows` generated training rows under `scratch` and a fifth as many held out: the
    training files, their batches, the held-out batches and the training ids' count."""
    print(f"generating {rows:,d} training rows and their batches, then compiling Tidal's kernels ...", flush=True)
    paths = generate(scratch / "train", rows=rows, seed=3).paths
    held_out = batches_of(generate(scratch / "eval", rows=max(rows // 5, 1_000), seed=3, split=1).paths)
    train = batches_of(paths)
    return paths, train, held_out, np.unique(np.concatenate([b.values for b in train])).shape[0]


def run(rows: int = 1_000_000, as_json: bool = False) -> dict:
    """Both configs on `rows` generated training rows (and a fifth as many held out)."""
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        paths, train, held_out, distinct_ids = scratch_data(scratch, rows)
        torch.manual_seed(0)
        _train_tidal(next(iter(CONFIGS.values())), paths, scratch / "warm", train[:2])  # compile the kernels first
        summary: dict = {}
        for prefix, shape in CONFIGS.items():
            summary |= _run_config(prefix, shape, train, held_out, paths, scratch, distinct_ids)
    if as_json:
        print(json.dumps(summary))
    return summary
