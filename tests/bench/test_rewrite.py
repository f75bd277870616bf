"""`tidal bench rewrite`: every rewritten network and bucket is measured, and the summary follows from the points."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tidal.bench import dense, rewrite
from tidal.cli import main

CUDA_MISSING = "needs a CUDA device (torch.cuda.is_available() is False)"


def test_every_rewritten_network_and_bucket_is_measured_and_summarized(monkeypatch, capsys):
    monkeypatch.setattr(rewrite, "BUCKETS", [1, 16, 64])
    monkeypatch.setattr(rewrite, "NETWORKS", {"dlrm": dense.NETWORKS["dlrm"], "dcn": dense.NETWORKS["dcn"]})
    monkeypatch.setattr(rewrite, "MORE_NETWORKS", {"dlrm_mmoe": rewrite.MORE_NETWORKS["dlrm_mmoe"]})
    assert main(["bench", "rewrite", "--quick", "--json"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["rules"] == {"dlrm": ["gather_slices"], "dcn": [],
                                "dlrm_mmoe": ["gather_slices", "merge_linears", "stack_slices", "einsum_bmm"]}
    assert [(p["network"], p["batch"]) for p in summary["points"]] == [  # dcn's program runs as exported
        (n, b) for n in ("dlrm", "dlrm_mmoe") for b in (1, 16, 64)]
    for p in summary["points"]:
        assert p["exported_ms"] > 0 and p["rewritten_ms"] > 0
        assert abs(p["ratio_vs_exported"] - p["exported_ms"] / p["rewritten_ms"]) < 0.01 + 1e-3 * p["ratio_vs_exported"]
    small = [p["ratio_vs_exported"] for p in summary["points"] if p["batch"] <= 16]
    ratios = [p["ratio_vs_exported"] for p in summary["points"]]
    assert summary["min_ratio_up_to_16"] == min(small) and summary["min_ratio"] == min(ratios)
    assert summary["target_met"] == (min(small) >= rewrite.TARGET and min(ratios) >= rewrite.FLOOR)
    assert summary["geomean_ratio"] == round(float(np.exp(np.mean(np.log(ratios)))), 4)
    assert "dcn       rewritten by no rule (served as exported: not timed)" in out and "dlrm_mmoe batch    64: exported" in out
    assert summary["device"] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="refuses cuda only where torch sees no CUDA device")
def test_cuda_is_refused_without_a_cuda_device(capsys):
    assert main(["bench", "rewrite", "--device", "cuda"]) == 2
    assert "--device cuda, but torch sees no CUDA device; use --device cpu" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_MISSING)
def test_the_programs_run_on_a_gpu_when_asked(monkeypatch):
    monkeypatch.setattr(rewrite, "BUCKETS", [1, 16])
    monkeypatch.setattr(rewrite, "NETWORKS", {"dlrm": dense.NETWORKS["dlrm"]})
    monkeypatch.setattr(rewrite, "MORE_NETWORKS", {})
    summary = rewrite.run(quick=True, device="cuda")
    assert summary["device"] == "cuda" and summary["rules"] == {"dlrm": ["gather_slices"]}
    assert all(p["exported_ms"] > 0 and p["rewritten_ms"] > 0 for p in summary["points"])
