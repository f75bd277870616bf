"""Pass-mode training against the reference trainer, and its own resumes."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import yaml

from tidal.cli import main
from tidal.config import RunConfig
from tidal.data import generate
from tidal.data.criteo import CRITEO_DENSE, CRITEO_SPARSE
from tidal.errors import ConfigError
from tidal.runtime import Trainer


def _config(tmp_path, optimizer=None, passmode=None, **training) -> dict:
    train = generate(tmp_path / "train", rows=6_000, seed=1)
    return {
        "data": {"train": train.paths, "batch_size": 512},
        "features": [
            *({"kind": "sparse", "name": c, "columns": [c], "table": "ids" if k % 2 else "more"}
              for k, c in enumerate(CRITEO_SPARSE)),
            *({"kind": "dense", "name": c, "column": c, "transform": "log"} for c in CRITEO_DENSE),
            {"kind": "label", "name": "click", "column": "label"},
        ],
        "tables": [{"name": "ids", "dim": 8, "optimizer": optimizer or {"kind": "adagrad", "lr": 0.05}},
                   {"name": "more", "dim": 8, "optimizer": {"kind": "sgd", "lr": 0.05}}],
        "model": {"kind": "dlrm", "bottom_sizes": [16], "hidden_sizes": [32]},
        "training": {"epochs": 2, "lr": 0.003, "log_every": 5, "run_dir": str(tmp_path / "run"), **training},
        **({"passmode": passmode} if passmode is not None else {}),
    }


def _run(config: dict, tmp_path, name: str, **passmode) -> Trainer:
    config = {**config, "training": {**config["training"], "run_dir": str(tmp_path / name)}}
    if passmode:
        config["passmode"] = passmode
    trainer = Trainer(RunConfig(**config))
    trainer.fit()
    return trainer


def _rows(trainer: Trainer, t: int) -> tuple[np.ndarray, object]:
    table = trainer.collection.tables[t]
    keys = np.sort(np.concatenate([table.snapshot_shard(s, since_save=False)["keys"] for s in range(table.num_shards)]))
    block, found = table.pull_rows(keys)
    assert found.all()
    return keys, block


@pytest.mark.parametrize("optimizer", [{"kind": "adagrad", "lr": 0.05}, {"kind": "adam", "lr": 0.01},
                                       {"kind": "ftrl", "alpha": 0.05, "l1": 0.001}], ids=lambda o: o["kind"])
def test_pass_mode_trains_as_the_reference_trainer(tmp_path, optimizer):
    config = _config(tmp_path, optimizer)
    reference = _run(config, tmp_path, "reference")
    passes = _run(config, tmp_path, "passes", batches_per_pass=4)
    for t in range(2):
        (keys_a, a), (keys_b, b) = _rows(reference, t), _rows(passes, t)
        np.testing.assert_array_equal(keys_a, keys_b)
        np.testing.assert_allclose(b.values, a.values, rtol=1e-3, atol=1e-4)  # float rounding, 24 steps on
        np.testing.assert_allclose(b.state, a.state, rtol=1e-3, atol=1e-4)
        assert reference.collection.tables[t].clocks() == passes.collection.tables[t].clocks()
    for name, tensor in reference.model.state_dict().items():
        torch.testing.assert_close(passes.model.state_dict()[name], tensor, rtol=1e-3, atol=1e-4)
    assert passes.progress.rows == reference.progress.rows == 12_000


def _assert_same_tables_and_weights(a: Trainer, b: Trainer) -> None:
    for name, tensor in a.model.state_dict().items():
        assert torch.equal(tensor, b.model.state_dict()[name]), name
    for t in range(len(a.collection.tables)):
        (keys_a, rows_a), (keys_b, rows_b) = _rows(a, t), _rows(b, t)
        np.testing.assert_array_equal(keys_a, keys_b)
        for field in ("values", "state", "last_seen"):
            np.testing.assert_array_equal(getattr(rows_a, field), getattr(rows_b, field), err_msg=field)
        assert a.collection.tables[t].stats().evicted == b.collection.tables[t].stats().evicted


def test_a_resumed_pass_mode_run_matches_an_uninterrupted_one_bit_for_bit(tmp_path):
    """With TTL eviction, so that the rows' steps must agree too."""
    config = _config(tmp_path, checkpoint_every=6, evict_every=3, passmode={"batches_per_pass": 3})
    config["tables"][0]["eviction"] = {"ttl_steps": 4}
    whole = _run(config, tmp_path, "whole")
    assert whole.collection.tables[0].stats().evicted > 0
    split = {**config, "training": {**config["training"], "run_dir": str(tmp_path / "split")}}
    Trainer(RunConfig(**split)).fit(max_steps=12)
    resumed = Trainer(RunConfig(**split))
    assert resumed.fit(resume=True)["steps"] == 24  # 12 batches an epoch
    _assert_same_tables_and_weights(whole, resumed)


def test_planning_the_next_pass_ahead_changes_nothing(tmp_path):
    config = _config(tmp_path, passmode={"batches_per_pass": 5})
    ahead = _run(config, tmp_path, "ahead")
    in_turn = _run(config, tmp_path, "in_turn", batches_per_pass=5, look_ahead=False)
    _assert_same_tables_and_weights(ahead, in_turn)


def test_a_run_stopped_mid_pass_writes_its_rows_back(tmp_path):
    config = _config(tmp_path, passmode={"batches_per_pass": 8})
    config["training"]["run_dir"] = str(tmp_path / "stopped")
    stopped = Trainer(RunConfig(**config))
    summary = stopped.fit(max_steps=5)
    assert summary["steps"] == 5
    reference = Trainer(RunConfig(**{**config, "passmode": None,
                                     "training": {**config["training"], "run_dir": str(tmp_path / "reference")}}))
    reference.fit(max_steps=5)
    for t in range(2):
        (keys_a, a), (keys_b, b) = _rows(reference, t), _rows(stopped, t)
        np.testing.assert_array_equal(keys_a, keys_b)
        np.testing.assert_allclose(b.values, a.values, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(("training", "passmode", "expected"), [
    ({"checkpoint_every": 10}, {"batches_per_pass": 4}, "training.checkpoint_every is 10, but in pass mode it falls "
                                                         "at the end of a pass: give a multiple of passmode.batches_per_pass (4), e.g. 8"),
    ({"eval_every": 6}, {"batches_per_pass": 4}, "training.eval_every is 6"),
    ({}, {"batches_per_pass": 0}, "batches_per_pass"),
])
def test_pass_mode_settings_that_cannot_hold_are_refused(tmp_path, training, passmode, expected):
    config = _config(tmp_path, passmode=passmode, **training)
    config["data"]["eval"] = config["data"]["train"]
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        RunConfig(**config)


def test_pass_mode_and_the_heterogeneous_engine_are_refused_together(tmp_path):
    config = _config(tmp_path, passmode={"batches_per_pass": 4})
    with pytest.raises(ConfigError, match="runtime .* and passmode are two ways to train a run: keep one"):
        RunConfig(**{**config, "runtime": {"backend": "local"}})


def test_evict_every_must_fit_the_passes_only_when_a_table_evicts(tmp_path):
    config = _config(tmp_path, evict_every=10, passmode={"batches_per_pass": 4})
    with pytest.raises(ConfigError, match=r"training.evict_every \(10\) would have no effect"):
        RunConfig(**config)  # nothing evicts: no safe point is needed
    config["training"].pop("evict_every")
    RunConfig(**config)  # its default, 100, does not fit passes of 4 either, and needs not
    config["training"]["evict_every"] = 10
    config["tables"][1]["eviction"] = {"ttl_steps": 100}
    with pytest.raises(ConfigError, match="training.evict_every is 10"):
        RunConfig(**config)


def test_rows_written_back_and_dropped_for_an_eviction_count_as_moved_out(tmp_path):
    config = _config(tmp_path, epochs=1, evict_every=4, passmode={"batches_per_pass": 4})
    for table in config["tables"]:
        table["eviction"] = {"ttl_steps": 1000}
    trainer = Trainer(RunConfig(**config))
    trainer.fit()
    report = trainer.runtime_report["passmode"]
    assert report["kept_share"] == 0.0  # every pass starts without rows: the last one's left for the eviction
    assert report["rows_out"] == report["rows_in"] > 0  # each pass's rows left at its end's eviction (0 counted before)


def test_cli_trains_in_passes_and_says_what_moved(tmp_path, capsys):
    config = _config(tmp_path, checkpoint_every=8, passmode={"batches_per_pass": 4})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "trained 24 steps, 12,000 rows" in out
    assert "pass mode: 6 passes of " in out and "% of a pass's rows already on the device from the pass before" in out
    report = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["runtime"]["passmode"]
    assert report["passes"] == 6 and 0.0 < report["kept_share"] < 1.0
    assert f"({report['rows_in']:,d} rows moved in, {report['rows_out']:,d} out before the end)" in out
    assert (tmp_path / "run" / "checkpoints" / "LATEST").exists()
    one = {**config, "training": {**config["training"], "run_dir": str(tmp_path / "one")}, "passmode": {"batches_per_pass": 24}}
    del one["training"]["checkpoint_every"]
    path.write_text(yaml.safe_dump(one))
    assert main(["train", "--config", str(path)]) == 0
    assert re.search(r"pass mode: 1 pass of [\d,]+ rows on average, the whole run in it \(", capsys.readouterr().out)


def test_after_a_failed_step_the_tables_hold_every_step_before_it(tmp_path, monkeypatch):
    config = _config(tmp_path)
    config["training"]["epochs"] = 1
    failing_at = 7
    steps = {"n": 0}
    dense_step = Trainer.dense_step

    def fail_at_step(self, batch, pooled, *, step):
        steps["n"] += 1
        if steps["n"] == failing_at:
            raise RuntimeError("the dense network failed")
        return dense_step(self, batch, pooled, step=step)

    monkeypatch.setattr(Trainer, "dense_step", fail_at_step)
    trainers = []
    for name, passmode in (("reference", None), ("passes", {"batches_per_pass": 4})):
        steps["n"] = 0
        trainer = Trainer(RunConfig(**{**config, "passmode": passmode,
                                       "training": {**config["training"], "run_dir": str(tmp_path / name)}}))
        with pytest.raises(RuntimeError, match="the dense network failed"):
            trainer.fit()
        trainers.append(trainer)
    for t in range(2):  # pass mode made the rows of the whole failed pass (and maybe the next) when it planned them
        (keys_a, a), (keys_b, b) = _rows(trainers[0], t), _rows(trainers[1], t)
        at = np.searchsorted(keys_b, keys_a)
        np.testing.assert_array_equal(keys_b[at], keys_a)
        np.testing.assert_allclose(b.values[at], a.values, rtol=1e-3, atol=1e-4)  # steps 5 and 6 included


@pytest.mark.parametrize("settings", [
    {"admission": {"kind": "probability", "probability": 0.2}},
    {"admission": {"kind": "count", "min_count": 2}},
    {"max_rows": 800},  # full early: which keys get the rows is the order they came in
    {"eviction": {"ttl_steps": 2}},
    {"max_rows": 800, "eviction": {"capacity_policy": "lru"}},
    {"max_rows": 800, "eviction": {"capacity_policy": "lfu"}},
], ids=["probability", "count", "row_cap", "ttl", "lru", "lfu"])
def test_pass_mode_admits_caps_and_evicts_the_rows_the_reference_trainer_does(tmp_path, settings):
    config = _config(tmp_path, **({} if settings == {"max_rows": 800} else {"evict_every": 4}))  # a cap alone evicts nothing
    config["training"]["epochs"] = 1
    config["tables"][0] |= settings
    reference = _run(config, tmp_path, "reference")
    passes = _run(config, tmp_path, "passes", batches_per_pass=4)
    (keys_a, a), (keys_b, b) = _rows(reference, 0), _rows(passes, 0)
    np.testing.assert_array_equal(keys_b, keys_a)
    np.testing.assert_array_equal(b.last_seen, a.last_seen)  # TTL and LRU ages
    np.testing.assert_allclose(b.values, a.values, rtol=1e-3, atol=1e-4)
    stats_a, stats_b = reference.collection.tables[0].stats(), passes.collection.tables[0].stats()
    assert (stats_b.rows, stats_b.admitted, stats_b.evicted) == (stats_a.rows, stats_a.admitted, stats_a.evicted)
    assert (stats_b.dropped_full, stats_b.not_admitted) == (stats_a.dropped_full, stats_a.not_admitted)
    assert stats_b.lookups == stats_a.lookups
    np.testing.assert_array_equal(b.counts, a.counts)  # zeros but for LFU tables
    assert reference.collection.tables[0].clocks() == passes.collection.tables[0].clocks()


def test_a_table_no_feature_reads_keeps_its_step(tmp_path):
    config = _config(tmp_path, passmode={"batches_per_pass": 4})
    config["tables"].append({"name": "unused", "dim": 8})
    config["training"]["run_dir"] = str(tmp_path / "run")
    trainer = Trainer(RunConfig.from_saved(config))  # as a run saved before such a table was refused goes on
    trainer.fit()
    assert trainer.collection.table("unused").clocks()["step"] == 0
    assert trainer.collection.table("ids").clocks()["step"] == 24


def test_a_pass_mode_run_resumes_with_its_passes_changed_or_without_them(tmp_path):
    config = _config(tmp_path, checkpoint_every=8, passmode={"batches_per_pass": 4})
    Trainer(RunConfig(**config)).fit(max_steps=8)
    for passmode in ({"batches_per_pass": 8, "look_ahead": False}, None):
        resumed = Trainer(RunConfig(**{**config, "passmode": passmode}))
        assert resumed.fit(resume=True, max_steps=16 if passmode else 24)["steps"] == (16 if passmode else 24)


NO_CUDA = not torch.cuda.is_available()
NO_CUDA_REASON = "needs a CUDA device (torch.cuda.is_available() is False)"


@pytest.mark.skipif(NO_CUDA, reason=NO_CUDA_REASON)
def test_on_a_gpu_pass_mode_trains_as_on_the_cpu_and_repeats_itself_bit_for_bit(tmp_path):
    config = _config(tmp_path, {"kind": "adagrad", "lr": 0.05}, passmode={"batches_per_pass": 4})
    cpu = _run(config, tmp_path, "cpu")
    gpu = [_run({**config, "training": {**config["training"], "device": "cuda"}}, tmp_path, f"gpu{n}") for n in range(2)]
    assert gpu[0].device.type == "cuda"
    _assert_same_tables_and_weights(gpu[0], gpu[1])  # the sums of a row's gradients in a fixed order
    for t in range(2):
        (keys_a, a), (keys_b, b) = _rows(cpu, t), _rows(gpu[0], t)
        np.testing.assert_array_equal(keys_a, keys_b)
        _assert_close_but_for_a_few(b.values, a.values)


def _assert_close_but_for_a_few(actual: np.ndarray, desired: np.ndarray, share: float = 1e-4) -> None:
    """Close to float rounding, but for at most `share` of the values: the GPU's dense network rounds
    otherwise than the CPU's, and Adagrad scales a row's update by its own gradients' size, so a
    gradient that is a near-cancelling sum moves its row by a different step (seen on an H200: 1 value
    of 193,032 off by 1.6%)."""
    far = ~np.isclose(actual, desired, rtol=1e-3, atol=1e-4)
    assert far.sum() <= share * far.size, f"{far.sum()} of {far.size} values differ beyond float rounding"
