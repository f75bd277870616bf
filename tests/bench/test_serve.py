"""`tidal bench serve` on short runs: every figure is reported, no request fails."""

from __future__ import annotations

import json

import pytest

from tidal.bench import serve
from tidal.cli import main


@pytest.mark.slow
def test_summary_reports_every_figure(capsys):
    summary = serve.run(quick=True, seconds=1.0, as_json=True)
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == json.loads(json.dumps(summary))
    for system in ("tidal", "unbatched", "rayserve"):
        for shape in (1, 100):
            assert summary[f"{system}_qps_{shape}"] > 0 and summary[f"{system}_p99_ms_{shape}"] > 0
    for key in ("ratio_vs_unbatched", "ratio_vs_rayserve", "session_speedup"):
        assert summary[key] > 0, key
    assert all(point["errors"] == 0 for point in summary["points"]) and len(summary["points"]) == 6
    assert "session page of 100" in out


def test_cli_refuses_a_run_of_no_time(capsys):
    assert main(["bench", "serve", "--seconds", "0"]) == 2
    assert "--seconds must be > 0, got 0.0" in capsys.readouterr().err
