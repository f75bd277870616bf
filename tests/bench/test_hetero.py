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
