"""`tidal bench data` on a tiny workload: every figure is reported."""

from __future__ import annotations

import json

from tidal.bench.data import run
from tidal.cli import main


def test_summary_reports_parse_and_extract_rates_for_both_formats(capsys):
    summary = run(rows=2_000, batch_rows=512, as_json=True)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    for key in ("tsv_rows_per_s", "parquet_rows_per_s", "tsv_parse_rows_per_s", "tsv_extract_rows_per_s",
                "parquet_parse_rows_per_s", "parquet_extract_rows_per_s"):
        assert summary[key] > 0, key


def test_cli_refuses_an_empty_workload(capsys):
    assert main(["bench", "data", "--rows", "0"]) == 2
    assert "--rows must be >= 1, got 0" in capsys.readouterr().err
