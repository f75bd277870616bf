"""Each target's training loss, logged beside the weighted total when a run has several."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from runtime.test_engine import EXACT, _trainer


@pytest.fixture(scope="module")
def two_targets(tmp_path_factory) -> dict:
    """A click and a rarer purchase, both driven by the item."""
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    items = rng.integers(0, 200, 4096)
    click = (rng.random(4096) < 0.2 + 0.6 * (items % 2)).astype(np.int64)
    buy = click * (rng.random(4096) < 0.3 + 0.5 * (items % 3 == 0))
    pq.write_table(pa.table({"item": items, "user": rng.integers(0, 500, 4096), "click": click, "buy": buy}),
                   folder / "part-0.parquet")
    return {
        "data": {"train": [str(folder / "part-0.parquet")], "batch_size": 256},
        "features": [{"kind": "sparse", "name": "item", "columns": ["item"], "table": "ids"},
                     {"kind": "sparse", "name": "user", "columns": ["user"], "table": "ids"},
                     {"kind": "label", "name": "click", "column": "click"},
                     {"kind": "label", "name": "buy", "column": "buy", "weight": 3.0}],
        "tables": [{"name": "ids", "dim": 8, "optimizer": {"kind": "adagrad", "lr": 0.05}}],
        "model": {"kind": "dlrm", "bottom_sizes": [8], "hidden_sizes": [16], "head": "mmoe", "experts": 2},
        "training": {"lr": 0.01, "log_every": 4},
    }


def _train_records(run_dir) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["event"] == "train"]


def test_each_targets_loss_is_logged_and_weighs_into_the_total(two_targets, tmp_path, capsys):
    trainer = _trainer(two_targets, tmp_path / "run", None)
    trainer.fit()
    records = _train_records(tmp_path / "run")
    assert len(records) == 4 and all(set(r["target_loss"]) == {"click", "buy"} for r in records)
    for r in records:
        assert r["loss"] == pytest.approx((r["target_loss"]["click"] + 3.0 * r["target_loss"]["buy"]) / 4.0, rel=1e-6)
    assert records[-1]["target_loss"]["buy"] < records[0]["target_loss"]["buy"]  # it learns
    first = records[0]["target_loss"]
    shown = f"loss {records[0]['loss']:.4f} (click {first['click']:.4f}, buy {first['buy']:.4f})"
    assert shown in capsys.readouterr().out


def test_the_engine_logs_the_reference_trainers_target_losses(two_targets, tmp_path):
    _trainer(two_targets, tmp_path / "reference", None).fit()
    _trainer(two_targets, tmp_path / "engine", {"sparse_workers": 2, "dense_workers": 2, **EXACT}).fit()
    for a, b in zip(_train_records(tmp_path / "reference"), _train_records(tmp_path / "engine"), strict=True):
        assert a["target_loss"] == pytest.approx(b["target_loss"], rel=1e-4)


def test_a_resumed_run_logs_the_target_losses_of_one_never_stopped(two_targets, tmp_path):
    config = {**two_targets, "training": {**two_targets["training"], "checkpoint_every": 6}}
    _trainer(config, tmp_path / "whole", None).fit()
    _trainer(config, tmp_path / "split", None).fit(max_steps=7)  # saved at 6, within a log record's steps
    _trainer(config, tmp_path / "split", None).fit(resume=True)
    whole, split = _train_records(tmp_path / "whole"), _train_records(tmp_path / "split")
    assert [r["target_loss"] for r in whole] == [r["target_loss"] for r in split]


def test_one_target_logs_its_loss_once(two_targets, tmp_path):
    config = {**two_targets, "features": two_targets["features"][:3],
              "model": {"kind": "dlrm", "bottom_sizes": [8], "hidden_sizes": [16]}}
    _trainer(config, tmp_path / "run", None).fit()
    assert all("target_loss" not in r for r in _train_records(tmp_path / "run"))


def test_the_plot_draws_each_targets_loss(two_targets, tmp_path, monkeypatch):
    from tidal.runtime import plots

    drawn = []
    original = plots.plt.Axes.plot

    def plot(axes, x, y, *args, **kwargs):  # type: ignore[no-untyped-def]
        drawn.append(kwargs.get("label"))
        return original(axes, x, y, *args, **kwargs)

    monkeypatch.setattr(plots.plt.Axes, "plot", plot)
    _trainer(two_targets, tmp_path / "run", None).fit()
    assert drawn[:3] == ["weighted", "buy", "click"] and (tmp_path / "run" / "metrics.png").stat().st_size > 0


@pytest.mark.parametrize(("records", "notes"), [
    ([{"event": "eval", "step": 25, "auc": {"click": 0.7}}],
     ["no loss logged: the run took\nfewer steps than training.log_every"]),
    ([{"event": "train", "step": 10, "loss": 0.6}, {"event": "eval", "step": 10, "auc": {"click": None}}],
     ["no AUC: every evaluation\nsaw one class only"]),
    ([{"event": "train", "step": 10, "loss": 0.6}], ["no AUC: no evaluation"]),
])
def test_a_panel_with_nothing_to_draw_says_why(tmp_path, monkeypatch, records, notes):
    from tidal.runtime import plots

    written = []
    monkeypatch.setattr(plots, "_say", lambda axes, note: written.append(note))
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    plots.plot_metrics(metrics, tmp_path / "metrics.png")
    assert written == notes and (tmp_path / "metrics.png").read_bytes().startswith(b"\x89PNG")
