"""The learning rate schedule (`training.lr_schedule`): warmup, then a linear or cosine
decay, by the run's step, of the dense network's rate and (with `tables`) the tables',
on every way a run trains."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from runtime.test_engine import EXACT, _assert_bitwise_equal, _tables, _trainer
from runtime.test_trainer import _config
from tidal import EmbeddingCollection, EmbeddingFeature, SparseBatch, TableConfig
from tidal.config import RunConfig, TrainingConfig
from tidal.errors import BatchError, ConfigError
from trainer_helpers import assert_same_state

SCHEDULE = {"warmup_steps": 5, "decay": "cosine", "decay_steps": 15, "min_lr": 1e-4}


def test_the_learning_rate_warms_up_then_decays_to_its_floor():
    training = TrainingConfig(lr=0.01, lr_schedule=SCHEDULE)
    assert [training.lr_at(s) for s in (1, 3, 5)] == pytest.approx([0.002, 0.006, 0.01])
    assert training.lr_at(5 + 15 / 2) == pytest.approx(1e-4 + (0.01 - 1e-4) / 2)  # half way down the cosine
    assert training.lr_at(20) == training.lr_at(1_000) == pytest.approx(1e-4)
    linear = TrainingConfig(lr=0.01, lr_schedule={"decay": "linear", "decay_steps": 10})
    assert [linear.lr_at(s) for s in (1, 5, 10, 11)] == pytest.approx([0.009, 0.005, 0.0, 0.0])
    assert TrainingConfig(lr=0.01).lr_at(7) == 0.01
    cosine = TrainingConfig(lr=1.0, lr_schedule={"decay": "cosine", "decay_steps": 4})
    assert cosine.lr_at(1) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_a_schedule_is_checked_with_the_config(tmp_path):
    with pytest.raises(ConfigError, match="decay is 'cosine': give decay_steps"):
        TrainingConfig(lr_schedule={"decay": "cosine"})
    with pytest.raises(ConfigError, match="decay_steps and min_lr apply to a decay"):
        TrainingConfig(lr_schedule={"decay_steps": 10})
    warmup = TrainingConfig(lr_schedule={"warmup_steps": 10})  # as a checkpoint or --print-config writes it back:
    assert TrainingConfig(**warmup.model_dump(mode="json")) == warmup  # every field, the unset ones at their defaults
    config = _scheduled(_config(tmp_path, epochs=1), tables=True)
    config["tables"][0]["optimizer"] = {"kind": "ftrl"}
    with pytest.raises(ConfigError, match=r"training.lr_schedule.tables: tables \['ids'\] use FTRL, whose alpha sets "
                                          r"the scale of the weights rather than a step size"):
        RunConfig(**config)
    with pytest.raises(ConfigError, match=r"lr_schedule.min_lr is 0.5, above lr \(0.001\): a decay goes down to "
                                          r"min_lr; give one of at most 0.001"):
        TrainingConfig(lr=0.001, lr_schedule={"decay": "linear", "decay_steps": 10, "min_lr": 0.5})
    with pytest.raises(ConfigError, match=r"lr_schedule.min_lr is 0.01, lr itself: the cosine decay would keep lr at "
                                          r"every step after the warmup; give a min_lr below 0.01, or leave the decay out"):
        TrainingConfig(lr=0.01, lr_schedule={"decay": "cosine", "decay_steps": 10, "min_lr": 0.01})


def test_the_tables_share_of_the_schedule_is_the_dense_rates_share_of_its_peak():
    training = TrainingConfig(lr=0.01, lr_schedule={**SCHEDULE, "tables": True})
    assert training.schedules_tables and not TrainingConfig(lr=0.01, lr_schedule=SCHEDULE).schedules_tables
    assert [training.table_lr_scale(s) for s in (1, 5, 1_000)] == pytest.approx([0.2, 1.0, 0.01])


@pytest.mark.parametrize("optimizer,threads", [({"kind": "sgd", "lr": 0.1}, 1), ({"kind": "sgd", "lr": 0.1}, 2),
                                               ({"kind": "adagrad", "lr": 0.1}, 1),
                                               ({"kind": "ftrl", "alpha": 0.1}, 1)],
                         ids=["sgd", "sgd-2-threads", "adagrad", "ftrl"])
def test_a_collections_lr_scale_multiplies_every_tables_rate_at_its_lookups_step(optimizer, threads):
    """Scaled by a half, each optimizer lands where one at half the rate does, bit for bit;
    the scale is asked for each update at the step its batch was looked up at."""
    halved = {k: v / 2 if k in ("lr", "alpha") else v for k, v in optimizer.items()}
    features = [EmbeddingFeature(name="a", table="t"), EmbeddingFeature(name="b", table="t", pooling="mean")]
    steps: list[int] = []

    def collection(config: dict, lr_scale=None) -> EmbeddingCollection:  # type: ignore[no-untyped-def]
        return EmbeddingCollection([TableConfig(name="t", dim=4, optimizer=config)], features, threads=threads,
                                   lr_scale=lr_scale)

    scaled = collection(optimizer, lambda step: steps.append(step) or 0.5)
    slower, unscaled = collection(halved), collection(optimizer)
    batch = SparseBatch.from_lists({"a": [[1], [2], [1]], "b": [[1, 3], [], [2, 2]]})
    grad = torch.linspace(-1.0, 1.0, 3 * 2 * 4).reshape(3, 2, 4)
    for _ in range(3):
        for trained in (scaled, slower, unscaled):
            _, ctx = trained.forward(batch)
            trained.backward(ctx, grad)
    keys = np.array([1, 2, 3])
    assert steps == [1, 2, 3]
    assert np.array_equal(scaled.table("t").lookup(keys), slower.table("t").lookup(keys))
    assert not np.array_equal(scaled.table("t").lookup(keys), unscaled.table("t").lookup(keys))


@pytest.mark.parametrize("optimizer, threads, factor", [({"kind": "sgd", "lr": 0.1}, 1, float("nan")),
                                                       ({"kind": "adagrad", "lr": 0.1}, 1, -1.0),
                                                       ({"kind": "sgd", "lr": 0.1}, 2, float("inf")),
                                                       ({"kind": "ftrl", "alpha": 0.1}, 1, 0.0),
                                                       ("adagrad and ftrl", 2, 0.0)])
def test_a_factor_that_is_no_rate_is_refused_before_any_row_moves(optimizer, threads, factor):
    """A NaN factor would stay in every row it updated, a negative one climbs the
    gradient, and FTRL divides by its alpha (an audit's ZeroDivisionError)."""
    optimizers = ["adagrad", "ftrl"] if optimizer == "adagrad and ftrl" else [optimizer]  # the first takes 0
    tables = [TableConfig(name=f"t{k}", dim=4, optimizer=o) for k, o in enumerate(optimizers)]
    collection = EmbeddingCollection(tables, [EmbeddingFeature(name=f"f{k}", table=t.name) for k, t in enumerate(tables)],
                                     threads=threads, lr_scale=lambda step: factor)
    batch = SparseBatch.from_lists({f"f{k}": [[1], [2, 1]] for k in range(len(tables))})
    pooled, ctx = collection.forward(batch)
    before = [collection.table(t.name).lookup(np.array([1, 2])).copy() for t in tables]
    with pytest.raises(BatchError, match=rf"lr_scale\) must be a finite number >= 0.*, got {factor}"):
        collection.backward(ctx, torch.ones_like(pooled))
    for t, rows in zip(tables, before):
        assert np.array_equal(collection.table(t.name).lookup(np.array([1, 2])), rows)
        assert collection.table(t.name).clocks()["updates"] == 0


def _scheduled(config: dict, tables: bool = False) -> dict:
    return {**config, "training": {**config["training"], "lr_schedule": {**SCHEDULE, "tables": tables}}}


def test_the_tables_follow_the_schedule_when_it_says_so(tmp_path):
    config = _config(tmp_path, epochs=1)
    config["data"]["eval"] = None
    dense_only = _trainer(_scheduled(config), tmp_path / "dense", None)
    dense_only.fit()
    both = _trainer(_scheduled(config, tables=True), tmp_path / "both", None)
    both.fit()
    rows, scheduled_rows = _tables(dense_only), _tables(both)
    assert rows.keys() == scheduled_rows.keys()
    assert not any(np.array_equal(rows[k], scheduled_rows[k]) for k in rows)  # each row's first update was smaller


def test_the_reference_trainer_follows_the_schedule_and_resumes_on_it(tmp_path):
    config = _config(tmp_path, epochs=1, checkpoint_every=7)
    config["data"]["eval"] = None
    plain = _trainer(config, tmp_path / "plain", None)
    plain.fit()
    whole = _trainer(_scheduled(config, tables=True), tmp_path / "whole", None)
    steps = whole.fit()["steps"]
    assert whole.optimizer.param_groups[0]["lr"] == pytest.approx(whole.config.training.lr_at(steps))
    logged = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    training = whole.config.training  # each train record says the rates of its step
    assert [(r["lr"], r["table_lr_scale"]) for r in logged if r["event"] == "train"] == \
        [(training.lr_at(r["step"]), training.table_lr_scale(r["step"])) for r in logged if r["event"] == "train"]
    assert not all(torch.equal(a, b) for a, b in zip(plain.model.parameters(), whole.model.parameters()))
    _trainer(_scheduled(config, tables=True), tmp_path / "split", None).fit(max_steps=10)  # saved at 7
    resumed = _trainer(_scheduled(config, tables=True), tmp_path / "split", None)
    resumed.fit(resume=True)
    assert_same_state(whole, resumed)


@pytest.mark.parametrize("mode", [{"runtime": {"mode": "sync", "sparse_workers": 2, **EXACT}},
                                  {"passmode": {"batches_per_pass": 4}}], ids=["sync", "passmode"])
def test_the_engine_and_pass_mode_follow_the_schedule_as_the_reference_trainer(tmp_path, mode):
    config = _config(tmp_path, epochs=1)
    config["data"]["eval"] = None
    reference = _trainer(_scheduled(config, tables=True), tmp_path / "reference", None)
    reference.fit()
    trainer = _trainer({**_scheduled(config, tables=True), **mode}, tmp_path / "run", None)
    trainer.fit()
    if "runtime" in mode:
        _assert_bitwise_equal(reference, trainer)
    else:  # pass mode trains to rounding of the reference (sums in another order)
        for a, b in zip(reference.model.parameters(), trainer.model.parameters()):
            assert torch.allclose(a, b, atol=1e-4)
        rows, passed = _tables(reference), _tables(trainer)
        assert rows.keys() == passed.keys() and all(np.allclose(rows[k], passed[k], atol=1e-4) for k in rows)
    assert trainer.optimizer.param_groups[0]["lr"] == reference.optimizer.param_groups[0]["lr"]
