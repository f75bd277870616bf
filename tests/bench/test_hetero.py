"""`tidal bench hetero` on a tiny workload: every figure is reported."""

from __future__ import annotations

import json

import pytest

from tidal.bench import hetero
from tidal.cli import main


@pytest.mark.slow
def test_summary_reports_every_figure(capsys, monkeypatch):
    monkeypatch.setattr(hetero, "BATCH", 512)
    summary = hetero.run(rows=4_096, as_json=True)
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == json.loads(json.dumps(summary))
    for key in ("sequential_samples_per_s", "hetero_samples_per_s", "ray_samples_per_s", "speedup",
                "dense_utilization", "bottleneck_utilization"):
        assert summary[key] > 0, key
    assert summary["best_sparse_workers"] in (1, 2, 3) and summary["best_dense_workers"] in (1, 2)
    assert abs(summary["bf16_auc_delta"]) < 0.05
    assert "dense   dense" in out  # the utilization table


def test_cli_refuses_a_workload_of_less_than_two_batches(capsys):
    assert main(["bench", "hetero", "--rows", "100"]) == 2
    assert "--rows must be at least 8192, got 100" in capsys.readouterr().err


def test_no_ray_leaves_the_ray_run_out(monkeypatch):
    runs = []

    def fake_fit(train, held_out, run_dir, runtime, precision="auto"):
        runs.append(runtime)
        busy = {"dense": {"dense": 0.5}}
        report = {"utilization": {"dense": 0.5}, "bottleneck_utilization": 0.5, "busy": busy, "bottleneck": "dense",
                  "queues": {}, "staleness": {"mean": 0.0, "max": 0}}
        return {"samples_per_s": 1000.0 + len(runs), "eval": {"auc": {"label": 0.6}}, "runtime": report}

    monkeypatch.setattr(hetero, "_fit", fake_fit)
    monkeypatch.setattr(hetero, "BATCH", 512)
    summary = hetero.run(rows=1_024, with_ray=False)
    assert summary["ray_samples_per_s"] is None
    assert not any(r and r.get("backend") == "ray" for r in runs) and len(runs) == 11  # 2 to warm up, the best again


def test_figures_follow_from_the_runs(monkeypatch, capsys):
    """Made-up runs: the faster sequential run is the peer, the faster run of the fastest
    engine configuration the headline, and the bfloat16 AUC delta is float32's AUC minus
    bfloat16's."""
    speeds = {"seq": 100.0, "seq2": 120.0, "n1": 150.0, "n2": 300.0, "n3": 250.0, "m2": 280.0, "ray": 200.0,
              "float32": 90.0, "bfloat16": 95.0, "again": 330.0, "warm-seq": 1.0, "warm-engine": 1.0}
    runtimes = {}
    aucs = {"float32": 0.80, "bfloat16": 0.79}
    report = {"utilization": {"reader": 0.3, "sparse": 0.4, "dense": 0.6}, "bottleneck_utilization": 0.6,
              "busy": {"dense": {"dense": 0.6}}, "queues": {}, "staleness": {"mean": 0.0, "max": 0}}

    def fake_fit(train, held_out, run_dir, runtime, precision="auto"):
        runtimes[run_dir.name] = runtime
        return {"samples_per_s": speeds[run_dir.name], "eval": {"auc": {"label": aucs.get(run_dir.name, 0.75)}},
                "runtime": report if runtime else None}

    monkeypatch.setattr(hetero, "_fit", fake_fit)
    monkeypatch.setattr(hetero, "generate", lambda path, **kw: type("Data", (), {"paths": [str(path)]})())
    summary = hetero.run(rows=10_000)
    assert (summary["sequential_samples_per_s"], summary["hetero_samples_per_s"]) == (120.0, 330.0)
    assert (summary["best_sparse_workers"], summary["best_dense_workers"]) == (2, 1)
    assert runtimes["again"] == {"sparse_workers": 2, "mode": "async"} and list(runtimes)[-1] == "again"
    assert summary["speedup"] == 2.75 and summary["ray_samples_per_s"] == 200.0
    assert summary["one_dense_worker_samples_per_s"] == {1: 150.0, 2: 300.0, 3: 250.0}
    assert summary["bf16_auc_delta"] == pytest.approx(0.01)
    assert summary["dense_utilization"] == 0.6 and "speedup x2.75 with N=2" in capsys.readouterr().out
