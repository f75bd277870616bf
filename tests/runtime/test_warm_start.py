"""Warm starts: a fresh run on new data from another run's checkpoint (`init_from`)."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from tidal.cli import main
from tidal.config import RunConfig
from tidal.data import generate
from tidal.data.criteo import CRITEO_DENSE, CRITEO_SPARSE
from tidal.errors import CheckpointError, ConfigError, DataError
from tidal.runtime import Trainer, checkpoint
from trainer_helpers import assert_same_state

DAY_ROWS, BATCH = 6_000, 500  # 12 whole batches a day: a run over both days reads the same batches


@pytest.fixture(scope="module")
def days(tmp_path_factory) -> dict[str, list[str]]:
    root = tmp_path_factory.mktemp("days")
    return {"day1": generate(root / "day1", rows=DAY_ROWS, seed=1).paths,
            "day2": generate(root / "day2", rows=DAY_ROWS, seed=1, split=1).paths}


def _config(train: list[str], run_dir, *, runtime: dict | None = None, passmode: dict | None = None,
            **training) -> RunConfig:
    """TTL eviction and an admission count, so that rows' ages and counts must go on
    across the warm start."""
    return RunConfig(**{
        "data": {"train": train, "batch_size": BATCH},
        "features": [
            *({"kind": "sparse", "name": c, "columns": [c], "table": "ids"} for c in CRITEO_SPARSE),
            *({"kind": "dense", "name": c, "column": c, "transform": "log"} for c in CRITEO_DENSE),
            {"kind": "label", "name": "click", "column": "label"},
        ],
        "tables": [{"name": "ids", "dim": 8, "optimizer": {"kind": "adagrad", "lr": 0.05},
                    "admission": {"kind": "count", "min_count": 2}, "eviction": {"ttl_steps": 6}}],
        "model": {"kind": "dlrm", "bottom_sizes": [16], "hidden_sizes": [32]},
        "training": {"epochs": 1, "lr": 0.003, "log_every": 5, "evict_every": 5, "checkpoint_every": 7,
                     "run_dir": str(run_dir), **training},
        "runtime": runtime, "passmode": passmode})


@pytest.mark.parametrize("mode", [{}, {"runtime": {"mode": "sync", "sparse_workers": 2}},
                                  {"passmode": {"batches_per_pass": 4}, "checkpoint_every": 8, "evict_every": 4}], ids=["reference", "sync", "passmode"])
def test_a_warm_start_on_the_next_days_data_equals_one_run_over_both_days(days, tmp_path, mode):
    first = Trainer(_config(days["day1"], tmp_path / "day1", **mode))
    assert first.fit()["steps"] == 12
    second = Trainer(_config(days["day2"], tmp_path / "day2", **mode))
    summary = second.fit(init_from=tmp_path / "day1")
    assert summary["steps"] == 24 and summary["resumed_from"] == 12 and summary["rows"] == DAY_ROWS
    assert summary["origin"]["run_id"] == first.run_id != second.run_id and summary["origin"]["step"] == 12
    both = Trainer(_config(days["day1"] + days["day2"], tmp_path / "both", **mode))
    assert both.fit()["steps"] == 24
    assert_same_state(both, second)
    assert both.collection.tables[0].stats().evicted > 0


def test_a_warm_start_may_change_the_data_and_the_training_but_not_the_model(days, tmp_path):
    Trainer(_config(days["day1"], tmp_path / "day1")).fit()
    other = _config(days["day2"], tmp_path / "day2").model_dump()
    other["tables"][0]["dim"] = 16
    with pytest.raises(CheckpointError, match=r"tables\[0\]\.dim: 8 there, 16 now\); a warm start keeps the features, "
                                              r"tables and model; only the data, training, runtime, passmode and "
                                              r"serving sections may change"):
        Trainer(RunConfig(**other)).fit(init_from=tmp_path / "day1")
    assert not (tmp_path / "day2").exists()  # refused before anything was written
    other = _config(days["day2"], tmp_path / "day2").model_dump()
    other["features"].insert(1, {**other["features"][0], "name": "C1b"})
    with pytest.raises(CheckpointError, match=r"\(features\['C1b'\]: None there, \{.*\} now\); a warm start"):
        Trainer(RunConfig(**other)).fit(init_from=tmp_path / "day1")
    changed = _config(days["day2"], tmp_path / "day2", lr=0.001, epochs=2).model_dump()
    changed["data"] |= {"batch_size": 300, "eval": days["day1"]}
    trainer = Trainer(RunConfig(**changed))
    summary = trainer.fit(init_from=tmp_path / "day1" / "checkpoints" / "step-00000012-epoch-1")
    assert summary["steps"] == 12 + 2 * 20 and trainer.optimizer.param_groups[0]["lr"] == 0.001
    assert summary["eval"]["rows"] == DAY_ROWS


def test_a_warm_start_is_refused_where_it_cannot_begin(days, tmp_path):
    Trainer(_config(days["day1"], tmp_path / "day1")).fit()
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").touch()
    for given, reason in [("nowhere", "no such folder; expected a run directory"), ("a-file", "a file; expected"),
                          ("empty", "holds no checkpoint"), ("day1/checkpoints", "a run's checkpoints folder; name the "
                                                                                 "run directory")]:
        with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / given}: {reason}")):
            Trainer(_config(days["day2"], tmp_path / "day2")).fit(init_from=tmp_path / given)
    assert not (tmp_path / "day2").exists()  # refused before anything was written
    with pytest.raises(ConfigError, match="give one of them"):
        Trainer(_config(days["day2"], tmp_path / "day2")).fit(resume=True, init_from=tmp_path / "day1")
    with pytest.raises(ConfigError, match="max_steps 12 is not past the checkpoint's step 12"):
        Trainer(_config(days["day2"], tmp_path / "day2")).fit(init_from=tmp_path / "day1", max_steps=12)
    with pytest.raises(ConfigError, match="holds an earlier run's checkpoints; a warm start is a fresh run: give it "
                                          "a run_dir of its own"):
        Trainer(_config(days["day2"], tmp_path / "day1")).fit(init_from=tmp_path / "day1")
    empty = tmp_path / "empty.tsv"
    empty.touch()
    with pytest.raises(DataError, match="data.train: .*empty.tsv holds no rows"):
        Trainer(_config([str(empty)], tmp_path / "no-rows")).fit(init_from=tmp_path / "day1")


def test_a_warm_started_run_resumes_to_the_state_of_one_never_stopped(days, tmp_path):
    Trainer(_config(days["day1"], tmp_path / "day1")).fit()
    whole = Trainer(_config(days["day2"], tmp_path / "whole"))
    whole.fit(init_from=tmp_path / "day1")
    Trainer(_config(days["day2"], tmp_path / "split")).fit(init_from=tmp_path / "day1", max_steps=16)  # saved at 14
    resumed = Trainer(_config(days["day2"], tmp_path / "split"))
    summary = resumed.fit(resume=True)
    assert summary["resumed_from"] == 14 and summary["origin"] == whole.origin
    assert_same_state(whole, resumed)


def test_cli_starts_a_run_from_another_runs_checkpoint_and_exports_a_delta_of_it(days, tmp_path, capsys):
    from tidal.serving.bundle import export, export_delta

    Trainer(_config(days["day1"], tmp_path / "day1")).fit()
    path = tmp_path / "day2.yaml"
    path.write_text(yaml.safe_dump(_config(days["day2"], tmp_path / "day2").model_dump(mode="json")))
    assert main(["train", "--config", str(path), "--init-from", str(tmp_path / "day1")]) == 0
    assert f"trained steps 13-24 (started from {tmp_path / 'day1'} at its step 12), 6,000 rows" in capsys.readouterr().out
    end = json.loads((tmp_path / "day2" / "metrics.jsonl").read_text().splitlines()[-1])
    assert end["origin"]["checkpoint"].endswith("step-00000012-epoch-1")
    with pytest.raises(SystemExit):
        main(["train", "--config", str(path), "--resume", "--init-from", str(tmp_path / "day1")])
    assert "not allowed with argument" in capsys.readouterr().err
    export(tmp_path / "day1", tmp_path / "bundle")
    delta = export_delta(tmp_path / "day2", tmp_path / "bundle")  # another run's later model: a delta of it is served
    manifest = json.loads((delta / "manifest.json").read_text())
    assert manifest["source_step"] == 24 and manifest["tables"]["ids"]["changed"] > 0


def test_a_warm_start_says_where_it_starts_and_what_an_unfinished_origin_left(days, tmp_path, capsys):
    Trainer(_config(days["day1"], tmp_path / "day1")).fit(max_steps=7)  # the checkpoint of step 7, of 12
    Trainer(_config(days["day2"], tmp_path / "day2")).fit(init_from=tmp_path / "day1")
    assert (f"  warm start from {tmp_path / 'day1' / 'checkpoints' / 'step-00000007-epoch-0'} at its step 7, which its "
            f"run wrote part way through (step 7: 0 of 1 epochs done and 7 batches into the next): the rest of that run's "
            f"data is not trained\n") in capsys.readouterr().out
    Trainer(_config(days["day2"], tmp_path / "day3")).fit(init_from=tmp_path / "day2")
    assert "at its step 19\n" in capsys.readouterr().out  # a finished run: nothing more to say


def test_a_failed_final_evaluation_says_the_training_is_done_and_how_to_evaluate_it(days, tmp_path):
    wrong = tmp_path / "wrong-eval.tsv"
    wrong.write_text(("2" + "\t" * 39 + "\n") * 3)  # Criteo's width, the label neither 0 nor 1
    config = _config(days["day1"], tmp_path / "day1").model_dump()
    config["data"]["eval"] = [str(wrong)]
    with pytest.raises(DataError, match=r"(?s)^the run trained to step 12 and saved its checkpoint, but its final "
                                        r"evaluation failed: no valid rows to evaluate .*\nTo evaluate it, give "
                                        r"data.eval files in the layout of the training data and resume the run"):
        Trainer(RunConfig(**config)).fit()
    config["data"]["eval"] = days["day2"]
    assert Trainer(RunConfig(**config)).fit(resume=True)["eval"]["rows"] == DAY_ROWS


@pytest.mark.parametrize("engine", [{}, {"runtime": {"sparse_workers": 1, "mode": "sync"}},
                                    {"passmode": {"batches_per_pass": 4}}], ids=["reference", "engine", "passmode"])
def test_a_failed_periodic_evaluation_stops_the_run_with_the_checkpoint_of_its_step(days, tmp_path, engine):
    """It stopped the run before the checkpoint due at that step: the steps since the last were lost."""
    wrong = tmp_path / "wrong-eval.tsv"
    wrong.write_text(("2" + "\t" * 39 + "\n") * 3)  # Criteo's width, the label neither 0 nor 1
    config = _config(days["day1"], tmp_path / "day1", checkpoint_every=100, evict_every=4, **engine).model_dump()
    config["data"]["eval"], config["training"]["eval_every"] = [str(wrong)], 8
    with pytest.raises(DataError, match=r"(?s)^the evaluation at step 8 failed: no valid rows to evaluate .*\nThe run "
                                        r"saved its checkpoint of that step: give data.eval files it can evaluate and "
                                        r"resume the run \(--resume\)"):
        Trainer(RunConfig(**config)).fit()
    assert checkpoint.latest_name(tmp_path / "day1") == "step-00000008-epoch-0"
    config["data"]["eval"] = days["day2"]
    assert Trainer(RunConfig(**config)).fit(resume=True)["steps"] == 12


def test_a_delta_of_the_run_a_served_model_was_warm_started_from_is_refused_as_a_rollback(days, tmp_path):
    from tidal.serving.bundle import export, export_delta

    Trainer(_config(days["day1"], tmp_path / "day1")).fit()
    Trainer(_config(days["day2"], tmp_path / "day2")).fit(init_from=tmp_path / "day1")
    Trainer(_config(days["day1"], tmp_path / "day3")).fit(init_from=tmp_path / "day2")
    export(tmp_path / "day1", tmp_path / "bundle")
    assert export_delta(tmp_path / "day3", tmp_path / "bundle") is not None  # two generations on
    for older in ("day1", "day2"):
        with pytest.raises(CheckpointError, match=r"of a run that the model .* serves \(step-00000036-epoch-1, in "
                                                  r"delta 1\) descends from by warm starts, from its step (12|24) .*; "
                                                  r"a delta from it would roll the served model back"):
            export_delta(tmp_path / older, tmp_path / "bundle")
