"""`tidal bench quality` on a tiny workload: both runs train and every figure is reported."""

from __future__ import annotations

import json

import pytest

from tidal.bench.quality import run


def test_summary_compares_tidal_hashed_and_ceiling(capsys):
    summary = run(rows=3_000, vocabulary=200, epochs=1, as_json=True)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    assert 0.5 < summary["ceiling_auc"] <= 1.0
    for key in ("tidal_auc", "hashed_auc"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["hashed_rows"] >= 1 and summary["tidal_rows"] >= 1 and summary["table_bytes"] > 0


def test_cli_refuses_too_few_rows_to_hold_out_both_classes(capsys):
    from tidal.cli import main

    assert main(["bench", "quality", "--rows", "5"]) == 2
    assert "tidal bench quality: --rows must be >= 1,000 (training rows; a quarter as many more are held out" \
        in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "value", "expected"), [
    ("--vocabulary", "0", "--vocabulary must be from 1 to 2**63 - 1, got 0"),
    ("--vocabulary", str(2**63), f"--vocabulary must be from 1 to 2**63 - 1, got {2**63}"),  # was a raw OverflowError
    ("--epochs", "0", "--epochs must be >= 1, got 0")])
def test_cli_names_the_option_it_refuses_and_warns_of_no_busy_machine_first(capsys, monkeypatch, flag, value, expected):
    from tidal import cli

    monkeypatch.setattr(cli, "busy_share", lambda seconds=0.5: 0.9)  # a busy machine: its warning is for runs only
    assert cli.main(["bench", "quality", flag, value]) == 2
    assert capsys.readouterr().err == f"tidal bench quality: {expected}\n"

