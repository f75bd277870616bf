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
    assert not any(r and r.get("backend") == "ray" for r in runs) and len(runs) == 8
