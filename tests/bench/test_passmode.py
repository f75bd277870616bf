"""`tidal bench pass`: both sides train the same batches and the summary follows from the runs."""

from __future__ import annotations

import json

import pytest

from tidal.bench import passmode
from tidal.bench import train as bench_train
from tidal.cli import main


def test_every_side_trains_every_batch_and_the_summary_follows(monkeypatch, capsys):
    monkeypatch.setattr(bench_train, "BATCH", 512)
    summary = passmode.run(rows=6_000, batches_per_pass=4, as_json=True)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    assert summary["rows"] == 6_000 and summary["device"] in ("cpu", "cuda")
    ratio = summary["passmode_samples_per_s"] / summary["reference_samples_per_s"]
    assert summary["ratio_vs_reference"] == pytest.approx(ratio)
    assert summary["ratio_vs_torch"] == pytest.approx(summary["passmode_samples_per_s"] / summary["torch_samples_per_s"])
    assert 0.0 < summary["torch_auc"] < 1.0 and summary["torch_samples_per_s"] > 0
    if summary["device"] == "cpu":
        assert summary["passmode_auc"] == summary["reference_auc"]  # the same training, bit for bit
    assert abs(summary["passmode_auc"] - summary["reference_auc"]) < 0.01  # on a GPU, to rounding
    report = summary["passmode_report"]
    assert report["passes"] == 3 and 0.0 < report["kept_share"] < 1.0  # 12 batches in passes of 4
    assert report["rows_in"] > report["rows_per_pass"]  # the first pass brings all its rows, the others some
    assert 0 < report["rows_out"] < report["rows_in"]  # the last pass's rows go back at the end, not as leaving


@pytest.mark.parametrize("batches", [0, 2_000_000])
def test_the_cli_refuses_a_pass_it_cannot_run_before_it_generates_data(capsys, batches):
    """Over the config's bound, it generated data for 7 s, then stopped with a raw traceback."""
    assert main(["bench", "pass", "--batches-per-pass", str(batches)]) == 2
    assert f"--batches-per-pass must be from 1 to 1,048,576, got {batches}" in capsys.readouterr().err
