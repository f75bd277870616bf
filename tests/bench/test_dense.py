"""`tidal bench dense`: every network and bucket is measured and the summary follows from the points."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tidal.bench import dense
from tidal.cli import main

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def test_every_network_and_bucket_is_measured_and_summarized(monkeypatch, capsys):
    monkeypatch.setattr(dense, "BUCKETS", [1, 16, 64, 256])
    monkeypatch.setattr(dense, "NETWORKS", {"dlrm": dense.NETWORKS["dlrm"], "dcn": dense.NETWORKS["dcn"]})
    assert main(["bench", "dense", "--quick", "--json"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert [(p["network"], p["batch"]) for p in summary["points"]] == [
        (n, b) for n in ("dlrm", "dcn") for b in (1, 16, 64, 256)]
    for p in summary["points"]:
        assert p["torch_ms"] > 0 and p["onnxruntime_ms"] > 0
        assert abs(p["ratio_vs_torch"] - p["torch_ms"] / p["onnxruntime_ms"]) < 0.01 + 1e-3 * p["ratio_vs_torch"]
    small = [p["ratio_vs_torch"] for p in summary["points"] if p["batch"] <= 64]
    assert summary["min_ratio_up_to_64"] == min(small) and summary["target_met"] == (min(small) >= dense.TARGET)
    ratios = [p["ratio_vs_torch"] for p in summary["points"]]
    assert summary["geomean_ratio"] == round(float(np.exp(np.mean(np.log(ratios)))), 2)
    assert "dcn     batch   256: torch" in out and "at batches up to 64: " in out
