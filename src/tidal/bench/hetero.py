"""`tidal bench hetero`: the heterogeneous engine against the sequential trainer.

Same generated files, same embedding-heavy DLRM as `tidal bench train` config (a)
(26 sparse features of dim 64, bottom MLP [256, 64], top MLP [256, 1], batch 4096,
SGD on the tables, Adam on the dense net), read from TSV by every run. In order: the
sequential single-process trainer (every kernel and torch on all cores), the local
backend with 1..3 sparse workers and one dense worker, then with two single-threaded
dense workers (the CPU stand-in for two devices: data parallel, all-reduced), the Ray
backend at the best sparse worker count, and the AUC of bf16 against fp32 (sync mode,
the same batches: pooled rows sent and the dense network computed in one or the
other). Every other run computes the dense network in bf16 (`training.precision`,
weights and optimizer float32), as `tidal bench train` does. Sparse workers run their
kernels on one thread each; one dense worker runs torch on its default threads, two
dense workers on one each. A few batches of each side run first, untimed; the best
engine configuration then runs again, after the sequential trainer's second run, and
each side's faster run is compared.
Utilization is the busy fraction of every stage during the best pipelined run. With a
GPU, the sequential trainer and the dense workers alike run the dense network on it.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path

import torch

from tidal.config import RunConfig
from tidal.models import resolve_precision
from tidal.data.criteo import criteo_features
from tidal.data.generate import generate
from tidal.runtime import Trainer
from tidal.runtime.telemetry import Telemetry
from tidal.runtime.trainer import shown_auc
from tidal.runtime.workers import dense_device

__all__ = ["run"]

BATCH = 4096


def _config(train: list[str], held_out: list[str], run_dir: Path, runtime: dict | None, threads: int,
            precision: str) -> RunConfig:
    return RunConfig(
        data={"train": train, "eval": held_out, "batch_size": BATCH},
        features=[f.model_dump() for f in criteo_features(table="ids")],
        tables=[{"name": "ids", "dim": 64, "optimizer": {"kind": "sgd", "lr": 0.05}}],
        model={"kind": "dlrm", "bottom_sizes": [256], "hidden_sizes": [256]},
        training={"lr": 0.001, "log_every": 1_000_000, "run_dir": str(run_dir), "threads": threads, "device": "auto",
                  "precision": precision},
        runtime=runtime)


def _fit(train: list[str], held_out: list[str], run_dir: Path, runtime: dict | None,
         precision: str = "auto") -> dict:
    threads = torch.get_num_threads() if runtime is None else 1
    summary = Trainer(_config(train, held_out, run_dir, runtime, threads, precision)).fit()
    report = summary["runtime"] or {}
    shown = f"  bottleneck {report['bottleneck']} {report['bottleneck_utilization']:.0%}" if report else ""
    print(f"  {_name(runtime, precision):<44} {summary['samples_per_s']:>9,.0f} samples/s  "
          f"AUC {shown_auc(summary['eval']['auc']['label'])}{shown}", flush=True)
    return summary


def _warm_up(scratch: Path, mode: str) -> None:
    """A few batches of the sequential trainer and of the engine, not timed: the first
    run of a process pays for loading and compiling what every later run reuses."""
    rows = generate(scratch / "warm", rows=4 * BATCH, seed=4).paths
    with contextlib.redirect_stdout(io.StringIO()):
        for name, runtime in (("warm-seq", None), ("warm-engine", {"sparse_workers": 1, "mode": mode})):
            _fit(rows, rows, scratch / name, runtime)


def _name(runtime: dict | None, precision: str) -> str:
    precision = resolve_precision(dense_device("auto"), precision)
    if runtime is None:
        return f"sequential, dense in {precision}"
    return (f"{runtime.get('backend', 'local')} {runtime.get('mode', 'sync')} N={runtime['sparse_workers']} "
            f"M={runtime.get('dense_workers', 1)} sent {runtime.get('transfer_dtype', 'auto')}, dense in {precision}")


def run(rows: int = 400_000, mode: str = "async", with_ray: bool = True, as_json: bool = False) -> dict:
    """Every run on `rows` generated rows (and a quarter as many held out); the Ray
    run only `with_ray` (its `ray_samples_per_s` is null without it)."""
    with tempfile.TemporaryDirectory() as scratch_dir:
        scratch = Path(scratch_dir)
        train = generate(scratch / "train", rows=rows, seed=3).paths
        held_out = generate(scratch / "eval", rows=max(rows // 4, 1_000), seed=3, split=1).paths
        print(f"{rows:,d} rows of TSV, batch {BATCH}, dim 64, {torch.get_num_threads()} threads, "
              f"dense workers on {dense_device('auto')}", flush=True)
        _warm_up(scratch, mode)
        sequential = [_fit(train, held_out, scratch / "seq", None)]
        local = {(n, 1): _fit(train, held_out, scratch / f"n{n}", {"sparse_workers": n, "mode": mode}) for n in (1, 2, 3)}
        best_n = max((n for n, _ in local), key=lambda n: local[n, 1]["samples_per_s"])
        two_dense = {"sparse_workers": best_n, "dense_workers": 2, "dense_threads": 1, "mode": mode}
        local[best_n, 2] = _fit(train, held_out, scratch / "m2", two_dense)
        best = max(local, key=lambda nm: local[nm]["samples_per_s"])
        ray_run = _fit(train, held_out, scratch / "ray", {"backend": "ray", "sparse_workers": best_n, "mode": mode}) \
            if with_ray else None
        exact = {dtype: _fit(train, held_out, scratch / dtype, {"sparse_workers": best_n, "transfer_dtype": dtype},
                             precision=dtype) for dtype in ("float32", "bfloat16")}
        sequential.append(_fit(train, held_out, scratch / "seq2", None))  # each side's faster of two
        again = _fit(train, held_out, scratch / "again",
                     two_dense if best[1] == 2 else {"sparse_workers": best[0], "mode": mode})
    engine = max(local[best], again, key=lambda run: run["samples_per_s"])
    report = engine["runtime"]
    print(Telemetry.table(report))
    peer = max(run["samples_per_s"] for run in sequential)
    summary = {"sequential_samples_per_s": peer,
               "hetero_samples_per_s": engine["samples_per_s"], "best_sparse_workers": best[0],
               "best_dense_workers": best[1],
               "one_dense_worker_samples_per_s": {n: local[n, 1]["samples_per_s"] for n in (1, 2, 3)},
               "speedup": engine["samples_per_s"] / peer,
               "dense_utilization": report["utilization"]["dense"],
               "bottleneck_utilization": report["bottleneck_utilization"],
               "ray_samples_per_s": ray_run["samples_per_s"] if ray_run else None,
               "bf16_auc_delta": exact["float32"]["eval"]["auc"]["label"] - exact["bfloat16"]["eval"]["auc"]["label"],
               "busy": report["busy"]}
    print(f"speedup x{summary['speedup']:.2f} with N={best[0]} sparse and M={best[1]} dense workers; bottleneck busy "
          f"{summary['bottleneck_utilization']:.0%}; bf16 AUC delta {summary['bf16_auc_delta']:+.4f}")
    if as_json:
        print(json.dumps(summary))
    return summary
