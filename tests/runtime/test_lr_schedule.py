"""The dense network's learning rate schedule (`training.lr_schedule`): warmup, then a
linear or cosine decay, by the run's step, on every way a run trains."""

from __future__ import annotations

import math

import pytest
import torch

from runtime.test_engine import EXACT, _assert_bitwise_equal, _trainer
from runtime.test_trainer import _config
from tidal.config import TrainingConfig
from tidal.errors import ConfigError
from trainer_helpers import assert_same_state

SCHEDULE = {"warmup_steps": 5, "decay": "cosine", "decay_steps": 15, "min_lr": 1e-4}


def test_the_learning_rate_warms_up_then_decays_to_its_floor():
    training = TrainingConfig(lr=0.01, lr_schedule=SCHEDULE)
    assert [training.lr_at(s) for s in (1, 3, 5)] == pytest.approx([0.002, 0.006, 0.01])
    assert training.lr_at(5 + 15 / 2) == pytest.approx(1e-4 + (0.01 - 1e-4) / 2)  # half way down the cosine
    assert training.lr_at(20) == training.lr_at(1_000) == pytest.approx(1e-4)
    linear = TrainingConfig(lr=0.01, lr_schedule={"decay": "linear", "decay_steps": 10})
    assert [linear.lr_at(s) for s in (1, 5, 10, 11)] == pytest.approx([0.009, 0.005, 0.0, 0.0])
    assert TrainingConfig(lr=0.01).lr_at(7) == TrainingConfig(lr=0.01, lr_schedule={}).lr_at(7) == 0.01
    cosine = TrainingConfig(lr=1.0, lr_schedule={"decay": "cosine", "decay_steps": 4})
    assert cosine.lr_at(1) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_a_schedule_is_checked_with_the_config():
    with pytest.raises(ConfigError, match="decay is 'cosine': give decay_steps"):
        TrainingConfig(lr_schedule={"decay": "cosine"})
    with pytest.raises(ConfigError, match="decay_steps and min_lr apply to a decay"):
        TrainingConfig(lr_schedule={"decay_steps": 10})


def _scheduled(config: dict) -> dict:
    return {**config, "training": {**config["training"], "lr_schedule": SCHEDULE}}


def test_the_reference_trainer_follows_the_schedule_and_resumes_on_it(tmp_path):
    config = _config(tmp_path, epochs=1, checkpoint_every=7)
    config["data"]["eval"] = None
    plain = _trainer(config, tmp_path / "plain", None)
    plain.fit()
    whole = _trainer(_scheduled(config), tmp_path / "whole", None)
    steps = whole.fit()["steps"]
    assert whole.optimizer.param_groups[0]["lr"] == pytest.approx(whole.config.training.lr_at(steps))
    assert not all(torch.equal(a, b) for a, b in zip(plain.model.parameters(), whole.model.parameters()))
    _trainer(_scheduled(config), tmp_path / "split", None).fit(max_steps=10)  # saved at 7
    resumed = _trainer(_scheduled(config), tmp_path / "split", None)
    resumed.fit(resume=True)
    assert_same_state(whole, resumed)


@pytest.mark.parametrize("mode", [{"runtime": {"mode": "sync", "sparse_workers": 2, **EXACT}},
                                  {"passmode": {"batches_per_pass": 4}}], ids=["sync", "passmode"])
def test_the_engine_and_pass_mode_follow_the_schedule_as_the_reference_trainer(tmp_path, mode):
    config = _config(tmp_path, epochs=1)
    config["data"]["eval"] = None
    reference = _trainer(_scheduled(config), tmp_path / "reference", None)
    reference.fit()
    trainer = _trainer({**_scheduled(config), **mode}, tmp_path / "run", None)
    trainer.fit()
    if "runtime" in mode:
        _assert_bitwise_equal(reference, trainer)
    else:  # pass mode trains to rounding of the reference (sums in another order)
        for a, b in zip(reference.model.parameters(), trainer.model.parameters()):
            assert torch.allclose(a, b, atol=1e-4)
    assert trainer.optimizer.param_groups[0]["lr"] == reference.optimizer.param_groups[0]["lr"]
