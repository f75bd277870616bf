"""The dense network's optimizer (`training.optimizer`): torch's Adam, AdamW, SGD or
Adagrad with the config's settings, in every way a run trains, through checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch

from runtime.test_engine import EXACT, _assert_bitwise_equal, _trainer
from runtime.test_trainer import _config
from tidal.config import TrainingConfig
from tidal.errors import ConfigError
from tidal.runtime import checkpoint
from trainer_helpers import assert_same_state

MOMENTUM = {"kind": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}


@pytest.mark.parametrize("optimizer,torch_class,settings", [
    (None, torch.optim.Adam, {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}),
    ({"eps": 1e-6}, torch.optim.Adam, {"eps": 1e-6}),  # settings without a kind: Adam's
    ({"kind": "adam", "beta1": 0.8, "weight_decay": 0.01}, torch.optim.Adam,
     {"betas": (0.8, 0.999), "weight_decay": 0.01}),
    ({"kind": "adamw"}, torch.optim.AdamW, {"weight_decay": 0.01}),
    (MOMENTUM, torch.optim.SGD, {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-4}),
    ({"kind": "adagrad", "initial_accumulator_value": 0.1}, torch.optim.Adagrad,
     {"eps": 1e-10, "initial_accumulator_value": 0.1, "lr_decay": 0}),
], ids=["default", "no-kind", "adam", "adamw", "sgd", "adagrad"])
def test_the_dense_optimizer_is_torchs_with_the_configs_settings(tmp_path, optimizer, torch_class, settings):
    config = _config(tmp_path, epochs=1)
    if optimizer is not None:
        config["training"]["optimizer"] = optimizer
    trainer = _trainer(config, tmp_path / "run", None)
    group = trainer.optimizer.param_groups[0]
    assert type(trainer.optimizer) is torch_class and group["lr"] == 0.003
    assert {k: group[k] for k in settings} == settings


def test_sgd_without_momentum_takes_the_plain_gradient_step(tmp_path):
    config = _config(tmp_path, epochs=1)
    config["training"]["optimizer"] = {"kind": "sgd", "weight_decay": 0.5}
    trainer = _trainer(config, tmp_path / "run", None)
    batch = next(trainer.batches(config["data"]["train"]))
    pooled = trainer.collection.pool(batch, trainer.collection.lookup(batch, step=1))
    before = copy.deepcopy(trainer.model)
    trainer.dense_step(batch, pooled, step=1)
    replica = copy.deepcopy(before)  # the gradient at the weights before the step, by hand
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        replica(pooled, torch.tensor(batch.dense)).float(), torch.tensor(batch.labels))
    loss.backward()
    for (name, old), new, moved in zip(before.named_parameters(), trainer.model.parameters(), replica.parameters()):
        assert torch.allclose(new, old - 0.003 * (moved.grad + 0.5 * old), atol=1e-7), name


def test_a_run_resumes_sgd_with_momentum_to_the_state_of_one_never_stopped(tmp_path):
    config = _config(tmp_path, epochs=1, checkpoint_every=7)
    config["data"]["eval"] = None
    config["training"]["optimizer"] = MOMENTUM
    whole = _trainer(config, tmp_path / "whole", None)
    whole.fit()
    _trainer(config, tmp_path / "split", None).fit(max_steps=10)  # saved at 7, momentum buffers with it
    resumed = _trainer(config, tmp_path / "split", None)
    resumed.fit(resume=True)
    assert_same_state(whole, resumed)
    adam = _trainer({**config, "training": {**config["training"], "optimizer": {}}}, tmp_path / "adam", None)
    adam.fit()
    assert not all(torch.equal(a, b) for a, b in zip(adam.model.parameters(), whole.model.parameters()))


@pytest.mark.parametrize("optimizer", [MOMENTUM, {"kind": "adagrad"}], ids=["sgd", "adagrad"])
def test_the_engine_takes_the_reference_trainers_dense_steps(tmp_path, optimizer):
    config = _config(tmp_path, epochs=1)
    config["data"]["eval"] = None
    config["training"]["optimizer"] = optimizer
    reference = _trainer(config, tmp_path / "reference", None)
    reference.fit()
    engine = _trainer(config, tmp_path / "engine", {"mode": "sync", "sparse_workers": 2, **EXACT})
    engine.fit()
    _assert_bitwise_equal(reference, engine)


def test_a_resume_that_changes_the_optimizer_starts_its_state_afresh_and_says_so(tmp_path, capsys):
    config = _config(tmp_path, epochs=1, checkpoint_every=5)
    config["data"]["eval"] = None
    _trainer(config, tmp_path / "run", None).fit(max_steps=5)
    changed = {**config, "training": {**config["training"], "optimizer": {"kind": "sgd", "momentum": 0.5}}}
    resumed = _trainer(changed, tmp_path / "run", None)
    resumed.fit(max_steps=10, resume=True)  # saved at 10
    assert "the dense optimizer is sgd, adam in" in capsys.readouterr().out
    assert type(resumed.optimizer) is torch.optim.SGD and resumed.optimizer.param_groups[0]["momentum"] == 0.5
    assert all(set(state) == {"momentum_buffer"} for state in resumed.optimizer.state.values())
    buffers = [state["momentum_buffer"].clone() for state in resumed.optimizer.state.values()]
    again = _trainer({**changed, "training": {**changed["training"], "optimizer": {"kind": "sgd", "momentum": 0.5,
                                                                                  "weight_decay": 0.25}}},
                     tmp_path / "run", None)  # the same kind: its state goes on, its settings are the config's
    checkpoint.restore(again, checkpoint.latest(again.run_dir))
    out = capsys.readouterr().out
    assert "afresh" not in out, out
    assert again.optimizer.param_groups[0]["weight_decay"] == 0.25
    assert all(torch.equal(a, s["momentum_buffer"]) for a, s in zip(buffers, again.optimizer.state.values()))


def test_an_optimizer_given_by_its_kind_alone_takes_its_defaults():
    from tidal.config import TableConfig

    assert TrainingConfig(optimizer="sgd").optimizer.model_dump() == {"kind": "sgd", "momentum": 0.0,
                                                                       "nesterov": False, "weight_decay": 0.0}
    assert TableConfig(name="t", dim=4, optimizer="adagrad").optimizer.kind == "adagrad"
    with pytest.raises(ConfigError, match=r"settings without a kind are those of the default optimizer, adam, and "
                                          r"\['momentum'\] are not adam's: give the kind too \(one of 'adam', "
                                          r"'adamw', 'sgd', 'adagrad'\)"):
        TrainingConfig(optimizer={"momentum": 0.9})


def test_dense_optimizer_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"nesterov \(it needs a momentum above 0\) would have no effect"):
        TrainingConfig(optimizer={"kind": "sgd", "nesterov": True})
    with pytest.raises(ConfigError, match="optimizer"):
        TrainingConfig(optimizer={"kind": "lamb"})
    with pytest.raises(ConfigError, match="momentum"):
        TrainingConfig(optimizer={"kind": "adam", "momentum": 0.9})


def test_clip_grad_norm_scales_the_dense_gradient_down_to_it(tmp_path):
    config = _config(tmp_path, epochs=1)
    config["training"] |= {"optimizer": {"kind": "sgd"}, "clip_grad_norm": 1e-3}
    trainer = _trainer(config, tmp_path / "run", None)
    batch = next(trainer.batches(config["data"]["train"]))
    pooled = trainer.collection.pool(batch, trainer.collection.lookup(batch, step=1))
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.dense_step(batch, pooled, step=1)
    moved = torch.cat([(old - new.detach()).flatten() for old, new in zip(before, trainer.model.parameters())]) / 0.003
    assert float(moved.norm()) == pytest.approx(1e-3, rel=1e-3)  # the gradient's norm is far above it


def test_the_engine_clips_as_the_reference_trainer(tmp_path):
    config = _config(tmp_path, epochs=1)
    config["data"]["eval"] = None
    config["training"] |= {"optimizer": MOMENTUM, "clip_grad_norm": 0.05}
    reference = _trainer(config, tmp_path / "reference", None)
    reference.fit()
    engine = _trainer(config, tmp_path / "engine", {"mode": "sync", "sparse_workers": 2, **EXACT})
    engine.fit()
    _assert_bitwise_equal(reference, engine)
    plain = {**config, "training": {**config["training"], "clip_grad_norm": None}}
    unclipped = _trainer(plain, tmp_path / "plain", None)
    unclipped.fit()
    assert not all(torch.equal(a, b) for a, b in zip(unclipped.model.parameters(), reference.model.parameters()))
    two = _trainer(config, tmp_path / "two", {"mode": "sync", "sparse_workers": 2, "dense_workers": 2, **EXACT})
    two.fit()  # clipped after their all-reduce: the whole batch's gradient, as one worker clips it (to round-off)
    for a, b in zip(reference.model.parameters(), two.model.parameters()):
        assert torch.allclose(a, b, atol=1e-5)
