"""`tidal bench train` on a tiny workload: both configs, every side, every figure."""

from __future__ import annotations

import json

import pytest

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
    monkeypatch.setattr(bench, "train_torch", fake_torch)
    monkeypatch.setattr(bench, "auc_of", lambda score, batches: 0.5)
    batch = SimpleNamespace(batch_size=10)
    result = bench._run_config("", bench.CONFIGS[""], [batch] * 3, [], [], Path("scratch"), distinct_ids=100)
    assert order == [("torch", 0), ("sync", 0), ("async", 0), ("async", 1), ("sync", 1), ("torch", 1)]
    assert result["ratio_vs_torch"] == 2.0 and result["async_ratio_vs_torch"] == 2.0


def test_figures_follow_from_the_rounds(monkeypatch, tmp_path):
    """Made-up rounds: each side's speed from its faster round, its AUC the mean of its
    rounds, the ratio Tidal's speed over torch's."""
    from types import SimpleNamespace

    from tidal.bench import train

    seconds = {"torch": [4.0, 2.0], "sync": [1.0, 2.0], "async": [0.5, 1.0]}
    aucs = {"torch": [0.70, 0.72], "sync": [0.74, 0.76], "async": [0.73, 0.73]}
    rounds = {side: iter(zip(seconds[side], aucs[side])) for side in seconds}

    def fake_torch(shape, rows_per_table, batches):
        spent, auc = next(rounds["torch"])
        return (lambda batch: auc), spent

    class Model:  # scores every batch with its round's AUC, which the faked `_auc` passes on
        def __init__(self, auc):
            self.auc = auc

        def eval(self):
            pass

        def __call__(self, pooled, dense):
            return self.auc

    def fake_tidal(shape, paths, run_dir, batches, seed, mode, reserve_rows):
        spent, auc = next(rounds[mode])
        return SimpleNamespace(model=Model(auc), collection=SimpleNamespace(forward=lambda batch, train: (None, None)),
                               runtime_report={"busy": {"sparse": {"lookup": 0.5}}}), spent

    monkeypatch.setattr(train, "equal_bytes_rows", lambda shape, distinct_ids: 10)
    monkeypatch.setattr(train, "train_torch", fake_torch)
    monkeypatch.setattr(train, "_train_tidal", fake_tidal)
    monkeypatch.setattr(train, "auc_of", lambda score, batches: score(batches[0]))
    batches = [SimpleNamespace(batch_size=100, dense=[[0.0]])] * 3
    result = train._run_config("", train.CONFIGS[""], batches, batches, [], tmp_path, 1000)
    assert (result["torch_samples_per_s"], result["tidal_samples_per_s"], result["async_tidal_samples_per_s"]) == \
        (150.0, 300.0, 600.0)
    assert (result["ratio_vs_torch"], result["async_ratio_vs_torch"]) == (2.0, 4.0)
    assert result["torch_auc"] == pytest.approx(0.71) and result["tidal_auc"] == pytest.approx(0.75)
