"""The loss and AUC curves of a run, drawn from its metrics.jsonl into a PNG."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["plot_metrics"]


def plot_metrics(metrics: Path, out: Path) -> None:
    """Training loss by step, the weighted and each target's (left), and eval AUC per target
    by step (right)."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    train = [r for r in records if r.get("event") == "train"]
    evals = [r for r in records if r.get("event") == "eval"]
    figure, (loss_axes, auc_axes) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axes.plot([r["step"] for r in train], [r["loss"] for r in train], marker=".", label="weighted")
    for target in sorted({t for r in train for t in r.get("target_loss", {})}):  # with several targets
        loss_axes.plot([r["step"] for r in train], [r.get("target_loss", {}).get(target, np.nan) for r in train],
                       marker=".", label=target)
    loss_axes.set(title="training loss", xlabel="step", ylabel="BCE")
    if any("target_loss" in r for r in train):
        loss_axes.legend()
    if not train:
        _say(loss_axes, "no loss logged: the run took\nfewer steps than training.log_every")
    for target in sorted({t for r in evals for t in r["auc"]}):
        values = [np.nan if r["auc"][target] is None else r["auc"][target] for r in evals]  # None: one class
        auc_axes.plot([r["step"] for r in evals], values, marker="o", label=target)
    auc_axes.set(title="eval AUC", xlabel="step", ylabel="AUC")
    if evals:
        auc_axes.legend()
    if not any(v is not None for r in evals for v in r["auc"].values()):
        _say(auc_axes, "no AUC: no evaluation" if not evals else "no AUC: every evaluation\nsaw one class only")
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)


def _say(axes, note: str) -> None:  # type: ignore[no-untyped-def]
    """Write `note` across `axes`, which have nothing to draw."""
    axes.text(0.5, 0.5, note, ha="center", va="center", transform=axes.transAxes, color="gray")
