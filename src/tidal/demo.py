"""`tidal demo`: generate data, train DLRM on collision-free tables, evaluate, summarize,
then export the model and serve a few requests through the KServe v2 server (the dense
network on ONNX Runtime when the onnx extra is installed); while it serves, train on the
next day's data from the first run's checkpoint (a warm start) and update the server
online with a delta.

The generated data plants a logistic truth over Zipf-distributed raw ids, so the best
AUC any model can reach is known and printed beside the one Tidal reached. Training
runs on the heterogeneous engine: two sparse workers feed one dense worker, in sync
mode (the result is bitwise the single-process trainer's). C1-C3, I1 and I2 play the
user's features, so the server can score one user's candidates and keep a session.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa

from tidal.compile import ONNX_MISSING, onnx_available
from tidal.config import RunConfig
from tidal.data import BadRows
from tidal.data.criteo import criteo_features
from tidal.data.generate import generate
from tidal.errors import CheckpointError
from tidal.runtime import Telemetry, Trainer
from tidal.runtime.trainer import shown_auc
from tidal.serving import Service, export, export_delta, load_bundle, start_server
from tidal.serving.protocol import infer_request

_USER_COLUMNS = ("C1", "C2", "C3", "I1", "I2")

__all__ = ["run"]


def _config(train: list[str], held_out: list[str], run_dir: Path) -> RunConfig:
    return RunConfig(
        data={"train": train, "eval": held_out, "batch_size": 2048, "eval_group_by": "C1"},  # C1: the user
        features=[{**f.model_dump(), **({"side": "user"} if f.name in _USER_COLUMNS else {})}
                  for f in criteo_features(table="ids")],
        tables=[{"name": "ids", "dim": 16, "optimizer": {"kind": "adagrad", "lr": 0.05}}],
        model={"kind": "dlrm", "bottom_sizes": [64], "hidden_sizes": [128, 64]},
        training={"epochs": 1, "lr": 0.002, "log_every": 25, "eval_every": 50, "run_dir": str(run_dir),
                  "precision": "auto"},
        runtime={"backend": "local", "sparse_workers": 2, "dense_workers": 1, "mode": "sync"},
    )


def run(rows: int = 300_000) -> dict:
    """The whole path on `rows` generated training rows (and a quarter as many held out)."""
    with tempfile.TemporaryDirectory() as scratch:
        print(f"Generating {rows:,d} training, {rows // 4:,d} held-out and {rows // 4:,d} next-day rows (Criteo "
              f"layout, planted truth)")
        train = generate(Path(scratch) / "train", rows=rows, files=2, seed=0)
        held_out = generate(Path(scratch) / "eval", rows=rows // 4, seed=0, split=1)
        next_day = generate(Path(scratch) / "next-day", rows=rows // 4, seed=0, split=2)
        _compile_kernels(Path(scratch))
        print("Training DLRM, every raw id in its own row: 2 sparse workers feed 1 dense worker "
              "(in a temporary run directory)")
        trainer = Trainer(_config(train.paths, held_out.paths, Path(scratch) / "run"))
        summary = trainer.fit()
        _print_summary(summary, held_out.ceiling_auc)
        bundle = _export(trainer.run_dir, Path(scratch) / "bundle")
        candidates = next(iter(trainer.reader_spec(held_out.paths).epoch(BadRows()))).slice(0, 200)
        day_two = _config(next_day.paths, held_out.paths, Path(scratch) / "run-next-day")
        summary["serving"] = _serve(bundle, candidates, day_two, trainer.run_dir)
    print(json.dumps({"eval_auc": summary["eval"]["auc"]["label"], "ceiling_auc": held_out.ceiling_auc,
                      "samples_per_s": summary["samples_per_s"], "served_candidates": summary["serving"]["candidates"]}))
    return summary


def _export(run_dir: Path, out: Path) -> Path:
    """The serving bundle, its dense network for ONNX Runtime when the onnx extra is
    installed (make installs it) and the conversion holds, else for torch."""
    if not onnx_available():
        print(f"Exporting the serving bundle for the torch backend ({ONNX_MISSING})", flush=True)
        return export(run_dir, out, backend="torch")
    print("Exporting the serving bundle, its dense network converted for ONNX Runtime and checked against "
          "its torch program", flush=True)
    try:
        return export(run_dir, out, backend="onnxruntime")
    except CheckpointError as exc:
        print(f"  {exc}: exporting for the torch backend instead", flush=True)
        return export(run_dir, out, backend="torch")


def _compile_kernels(scratch: Path) -> None:
    """Train the same model for two steps on a few rows, quietly, so that the timed run
    finds every kernel compiled: numba compiles each on first use (some 20 s on a fresh
    checkout here, in the first steps of training otherwise) and caches it on disk."""
    print("Compiling Tidal's kernels (once per checkout: numba caches them on disk)", flush=True)
    start = time.perf_counter()
    data = generate(scratch / "warm-up", rows=4096, seed=1)
    shown = io.StringIO()
    try:
        with contextlib.redirect_stdout(shown):
            Trainer(_config(data.paths, data.paths, scratch / "warm-up-run")).fit()
    except BaseException:
        print(shown.getvalue(), end="")
        raise
    print(f"  ready in {time.perf_counter() - start:.1f} s")


def _shown(value: float | None, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _print_summary(summary: dict, ceiling_auc: float) -> None:
    evaluation = summary["eval"]
    print("Summary")
    print(f"  eval AUC        {shown_auc(evaluation['auc']['label'])}   (planted ceiling {ceiling_auc:.4f})")
    print(f"  eval log loss   {evaluation['logloss']['label']:.4f}   on {evaluation['rows']:,d} rows (normalized "
          f"entropy {_shown(evaluation['normalized_entropy']['label'], 4)}, calibration "
          f"{_shown(evaluation['calibration']['label'], 3)})")
    gauc, users = evaluation["gauc"]["label"], evaluation["gauc_groups"]["label"]
    print(f"  eval GAUC       {_shown(gauc, 4)}   by user (C1), over {users:,d} users with "
          f"both labels")
    print(f"  training        {summary['rows']:,d} rows at {summary['samples_per_s']:,.0f} samples/s")
    for name, table in summary["tables"].items():
        print(f"  table {name:9} {table['rows']:,d} rows, {table['bytes'] / 2**20:,.1f} MiB held")
    print(f"  bad rows        {summary['bad_rows']:,}")
    print("Where the time went (busy fraction of each stage)")
    print("  " + Telemetry.table(summary["runtime"]).replace("\n", "\n  "))


def _serve(bundle: Path, candidates: pa.RecordBatch, day_two: RunConfig, day_one: Path) -> dict:
    """Serve the bundle on a free local port, send it a few requests, then update it
    online from the run of `day_two`, warm-started from the run in `day_one`."""
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    running = start_server(Service(load_bundle(bundle), name="ctr"))
    print(f"Serving the exported bundle ({size / 2**20:.1f} MiB, no pickle) over KServe v2 HTTP on 127.0.0.1, "
          f"its dense network on {running.service.predictor.backend}")
    try:
        specs = running.service.specs
        url = f"{running.url}/v2/models/ctr/infer"
        stateless, ms = _post(url, infer_request(candidates.slice(0, 100), specs))
        scores = np.array(stateless["outputs"][-1]["data"])
        print(f"  1 user x 100 candidates     {ms:5.1f} ms   best candidate {int(scores.argmax())}, "
              f"scores {scores.min():.3f}..{scores.max():.3f}")
        session = {"sequence_id": 7}
        _, start_ms = _post(url, infer_request(candidates.slice(100, 50), specs, parameters={**session, "sequence_start": True}))
        _, page_ms = _post(url, infer_request(candidates.slice(150, 50), specs, with_user=False, parameters=session))
        _, end_ms = _post(url, infer_request(candidates.slice(150, 50), specs, with_user=False,
                                             parameters={**session, "sequence_end": True}))
        print(f"  session 7: start + 50       {start_ms:5.1f} ms, page of 50 {page_ms:.1f} ms, "
              f"last page and end {end_ms:.1f} ms")
        bad = infer_request(candidates.slice(0, 3), specs)
        next(t for t in bad["inputs"] if t["name"] == "I5")["data"][1] = "inf"
        print(f"  a malformed request         400: {_post(url, bad)[0]['error']}")
        _update_online(running.url, bundle, day_two, day_one, infer_request(candidates.slice(0, 100), specs))
    finally:
        running.stop()
    return {"candidates": len(scores), "best": int(scores.argmax())}


def _update_online(url: str, bundle: Path, day_two: RunConfig, day_one: Path, request: dict) -> None:
    """Train on the next day's data from the first run's checkpoint while the server
    serves, export the delta into its bundle, have the server apply it, and score the
    same request again."""
    print("Training on the next day's data while the server serves (tidal train --init-from the first run), "
          "then tidal export --delta", flush=True)
    with contextlib.redirect_stdout(io.StringIO()):
        summary = Trainer(day_two).fit(init_from=day_one)
    steps, first = summary["steps"] - summary["resumed_from"], summary["resumed_from"]
    print(f"  next day                    {steps:,d} step{'s' if steps != 1 else ''} on from the first run's step "
          f"{first:,d}, eval AUC {shown_auc(summary['eval']['auc']['label'])}")
    delta = export_delta(day_two.training.run_dir, bundle)
    update, _ = _post(f"{url}/v2/repository/models/ctr/load", {})
    if "error" in update:
        print(f"  online update               refused: {update['error']}")
        return
    answer, ms = _post(f"{url}/v2/models/ctr/infer", request)
    scores = np.array(answer["outputs"][-1]["data"])
    print(f"  online update               delta {delta.name}: {update['rows_changed']:,d} rows changed, applied in "
          f"{update['seconds'] * 1e3:.0f} ms (batches waited {update['paused_s'] * 1e3:.1f} ms)")
    print(f"  1 user x 100 candidates     {ms:5.1f} ms   best candidate {int(scores.argmax())}, "
          f"scores {scores.min():.3f}..{scores.max():.3f}")


def _post(url: str, body: dict) -> tuple[dict, float]:
    """The JSON answer (or error) and the milliseconds it took."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        answer = json.loads(exc.read())
    return answer, (time.perf_counter() - start) * 1000
