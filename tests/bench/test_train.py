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


def test_sides_take_turns_in_an_order_reversed_each_round(monkeypatch):
    from pathlib import Path
    from types import SimpleNamespace

    import tidal.bench.train as bench

    order = []
    dummy = SimpleNamespace(model=SimpleNamespace(eval=lambda: None), runtime_report={"busy": {}})

    def fake_tidal(shape, paths, run_dir, batches, seed=0, mode="async", reserve_rows=0):
        order.append((mode, seed))
        return dummy, 1.0

    def fake_torch(shape, rows_per_table, batches):
        order.append(("torch", int(bench.torch.initial_seed())))
        return None, 2.0

    monkeypatch.setattr(bench, "_train_tidal", fake_tidal)
    monkeypatch.setattr(bench, "_train_torch", fake_torch)
    monkeypatch.setattr(bench, "_auc", lambda score, batches: 0.5)
    batch = SimpleNamespace(batch_size=10)
    result = bench._run_config("", bench.CONFIGS[""], [batch] * 3, [], [], Path("scratch"), distinct_ids=100)
    assert order == [("torch", 0), ("sync", 0), ("async", 0), ("async", 1), ("sync", 1), ("torch", 1)]
    assert result["ratio_vs_torch"] == 2.0 and result["async_ratio_vs_torch"] == 2.0
