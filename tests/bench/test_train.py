"""`tidal bench train` on a tiny workload: both configs, every side, every figure."""

from __future__ import annotations

import json

from tidal.bench.train import run


def test_summary_has_speed_and_auc_of_every_side_for_both_configs(capsys):
    summary = run(rows=9_000, as_json=True)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    for prefix in ("", "kaggle_"):
        for key in ("tidal_samples_per_s", "torch_samples_per_s", "ratio_vs_torch"):
            assert summary[prefix + key] > 0, prefix + key
        for key in ("tidal_auc", "torch_auc"):
            assert 0.0 <= summary[prefix + key] <= 1.0
    assert summary["async_tidal_samples_per_s"] > 0 and summary["async_ratio_vs_torch"] > 0  # config (a) in async mode too
    assert 0.0 <= summary["async_tidal_auc"] <= 1.0
