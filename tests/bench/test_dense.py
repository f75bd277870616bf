"""`tidal bench dense`: every network and bucket is measured and the summary follows from the points."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tidal.bench import dense
from tidal.cli import main
from tidal.compile import AOTI_MISSING, aoti_available

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.mark.slow
@pytest.mark.parametrize("with_aoti", [True, False])
def test_every_network_and_bucket_is_measured_and_summarized(monkeypatch, capsys, with_aoti):
    if with_aoti and not aoti_available():
        pytest.skip(AOTI_MISSING)
    monkeypatch.setattr(dense, "aoti_available", lambda: with_aoti)
    monkeypatch.setattr(dense, "BUCKETS", [1, 16, 64, 256])
    monkeypatch.setattr(dense, "NETWORKS", {"dlrm": dense.NETWORKS["dlrm"], "dcn": dense.NETWORKS["dcn"]})
    rewritten, rewrite = [], dense.rewrite
    monkeypatch.setattr(dense, "rewrite", lambda module, inputs: rewritten.append(len(inputs)) or rewrite(module, inputs))
    assert main(["bench", "dense", "--quick", "--json"]) == 0
    assert rewritten == [4, 4]  # the torch peer runs as the torch backend serves it, checked at every bucket
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert [(p["network"], p["batch"]) for p in summary["points"]] == [
        (n, b) for n in ("dlrm", "dcn") for b in (1, 16, 64, 256)]
    met = {}
    for backend, prefix in (("onnxruntime", ""), ("aotinductor", "aotinductor_")):
        if backend == "aotinductor" and not with_aoti:
            assert all(p["aotinductor_ms"] is None and p["aotinductor_ratio_vs_torch"] is None
                       for p in summary["points"])
            assert summary["aotinductor_min_ratio_up_to_64"] is None and summary["aotinductor_target_met"] is None
            assert "Leaving out AOTInductor: the aotinductor backend compiles" in out
            continue
        for p in summary["points"]:
            ratio = p[f"{prefix}ratio_vs_torch"]
            assert p["torch_ms"] > 0 and p["torch_exported_ms"] > 0 and p[f"{backend}_ms"] > 0
            assert abs(ratio - p["torch_ms"] / p[f"{backend}_ms"]) < 0.01 + 1e-3 * ratio
        small = [p[f"{prefix}ratio_vs_torch"] for p in summary["points"] if p["batch"] <= 64]
        ratios = [p[f"{prefix}ratio_vs_torch"] for p in summary["points"]]
        assert summary[f"{prefix}min_ratio_up_to_64"] == min(small)
        assert summary[f"{prefix}geomean_ratio"] == round(float(np.exp(np.mean(np.log(ratios)))), 4)
        met[backend] = min(small) >= dense.TARGET
        assert f"{backend} at least 1.5x torch at batches up to 64: " in out
    assert summary["target_met"] == met["onnxruntime"] and summary["aotinductor_target_met"] == met.get("aotinductor")
    assert "dcn     batch   256: torch" in out


def test_a_ratio_just_under_the_target_is_not_met_whatever_it_rounds_to(capsys):
    """An audit's find: 1.4953x was rounded to 1.50 before it was judged, and met the 1.5x target."""
    points = [{"batch": 1, "ratio_vs_torch": 2.0}, {"batch": 64, "ratio_vs_torch": 1.4953}]
    summary, met = dense._backend_summary(points, "onnxruntime", "")
    assert met is False and summary["min_ratio_up_to_64"] == 1.4953
    assert "NOT met (lowest 1.495x)" in capsys.readouterr().out
