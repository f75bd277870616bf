"""The command line: `tidal demo` runs the whole path; arguments are checked."""

from __future__ import annotations

import json

from tidal.cli import main


def test_demo_trains_and_reports_auc_beside_the_ceiling(capsys):
    assert main(["demo", "--rows", "6000"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert 0.5 < result["eval_auc"] < result["ceiling_auc"] <= 1.0
    assert "planted ceiling" in out and "bad rows        0" in out
    assert out.index("Compiling Tidal's kernels") < out.index("  ready in") < out.index("Training DLRM")
    assert "eval at step 2:" not in out  # the two warm-up steps train quietly
    assert "sparse  lookup" in out and "dense   dense" in out  # the engine's stage table
    assert result["served_candidates"] == 100 and "session 7: start + 50" in out
    assert "a malformed request         400: input 'I5': values must be finite, got inf at position 1" in out


def test_demo_refuses_too_few_rows(capsys):
    assert main(["demo", "--rows", "10"]) == 2
    assert "--rows must be at least 1,000, got 10" in capsys.readouterr().err
