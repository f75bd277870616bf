"""The single-process trainer, end to end on generated data."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from tidal.cli import main
from tidal.config import RunConfig
from tidal.data import SparseBatch, generate, readers
from tidal.data.criteo import CRITEO_DENSE, CRITEO_SPARSE
from tidal.errors import BatchError, ConfigError, DataError, TidalError
from tidal.runtime import Trainer, checkpoint
from tidal.runtime import trainer as trainer_module
from tidal.runtime.trainer import shown_table
from trainer_helpers import assert_same_state


def _config(tmp_path, **training) -> dict:
    train = generate(tmp_path / "train", rows=12_000, seed=1)
    held_out = generate(tmp_path / "eval", rows=4_000, seed=1, split=1)
    return {
        "data": {"train": train.paths, "eval": held_out.paths, "batch_size": 512},
        "features": [
            *({"kind": "sparse", "name": c, "columns": [c], "table": "ids"} for c in CRITEO_SPARSE),
            *({"kind": "dense", "name": c, "column": c, "transform": "log"} for c in CRITEO_DENSE),
            {"kind": "label", "name": "click", "column": "label"},
        ],
        "tables": [{"name": "ids", "dim": 8, "optimizer": {"kind": "adagrad", "lr": 0.05}}],
        "model": {"kind": "dlrm", "bottom_sizes": [16], "hidden_sizes": [32]},
        "training": {"epochs": 2, "lr": 0.003, "log_every": 10, "run_dir": str(tmp_path / "run"), **training},
    }


def test_training_learns_the_planted_signal_and_logs_it(tmp_path):
    trainer = Trainer(RunConfig(**_config(tmp_path, eval_every=20)))
    summary = trainer.fit()
    assert summary["rows"] == 24_000 and summary["bad_rows"] == 0 and summary["compile_s"] >= 0.0
    assert summary["eval"]["auc"]["click"] > 0.62  # chance is 0.5; the data's ceiling is about 0.93
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["event"] == "train"]
    assert losses[-1] < losses[0]
    times = [r["time"] for r in records]  # when each was written, to plot against or to see a resume's gap
    assert times == sorted(times) and abs(times[-1] - time.time()) < 60
    assert records[-1]["event"] == "end" and records[-1]["tables"]["ids"]["rows"] > 1_000
    evals = [r for r in records if r["event"] == "eval"]
    assert len(evals) >= 3 and evals[-1]["auc"]["click"] == summary["eval"]["auc"]["click"]
    assert (tmp_path / "run" / "metrics.png").read_bytes().startswith(b"\x89PNG")


def test_cli_trains_from_yaml_and_reports_bad_rows(tmp_path, capsys, monkeypatch):
    import tidal.cli

    monkeypatch.setattr(tidal.cli, "_NOTED_COMPILE_S", 0.0)  # say it however little compiled
    config = _config(tmp_path, epochs=1, eval_every=10)
    with open(config["data"]["train"][0], "a") as f:
        f.write("1\t2\tnot-a-number\n" * 23)
    with open(config["data"]["eval"][0], "a") as f:
        f.write("1\t2\n" * 2)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "bad rows: 23" in out and out.count("expected 40 columns, found 3") == 20 and "\n  ... and 3 more\n" in out
    assert "(2 bad rows skipped)" in out  # each evaluation counts the eval data's own, afresh
    assert "eval data: 2 bad rows skipped" in out and f"{config['data']['eval'][0]}:4001: expected 40 columns" in out
    assert "s of the run went to compiling Tidal's kernels on their first use here" in out
    assert "eval click: AUC" in out


def test_cli_prints_the_config_as_the_run_would_use_it_with_set_overrides(tmp_path, capsys):
    config = _config(tmp_path, epochs=1)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(path), "--set", "training.epochs=3", "--set", "tables.ids.dim=4",
                 "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == RunConfig.from_yaml(str(path), ["training.epochs=3", "tables.ids.dim=4"]).model_dump(mode="json")
    assert printed["training"]["epochs"] == 3 and printed["tables"][0]["dim"] == 4
    assert printed["training"]["evict_every"] == 100 and printed["tables"][0]["initializer"]["kind"]  # defaults shown
    assert not (tmp_path / "run").exists()  # nothing trained
    assert main(["train", "--config", str(path), "--set", "tables.items.dim=4"]) == 2
    assert "tidal train: --set tables.items.dim: tables has no element named 'items'" in capsys.readouterr().err
    assert main(["train", "--config", str(path), "--set", "tables.ids.memory_bytes=10", "--print-config"]) == 2
    assert re.search(r"tables\.0.*: .*memory_bytes 10 pays for no row of \d+ bytes", capsys.readouterr().err)


def test_a_run_whose_data_is_mostly_bad_rows_stops_saying_so_unless_max_bad_fraction_allows_them(tmp_path, capsys):
    config = _config(tmp_path, epochs=1)
    config["data"]["eval"] = None
    good = open(config["data"]["train"][0]).read()
    wrong = tmp_path / "train" / "commas.tsv"  # one good line, then another file's rows comma-separated: one column each
    wrong.write_text(good[:good.index("\n") + 1] + good.replace("\t", ","))
    config["data"]["train"] = [*config["data"]["train"], str(wrong)]
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(path)]) == 2
    assert re.search(rf"of the (\d|,)+ rows read of {wrong} were bad \((\d|\.)+%\), more than the (\d|,)+ that max_bad_fraction 0\.1 allows.*"
                     rf"The first: {wrong}:2: expected 40 columns, found 1", capsys.readouterr().err)
    wrong.write_text(good.replace("\t", ","))  # no good line to begin with: refused before anything trains
    assert main(["train", "--config", str(path)]) == 2
    assert f"data.train: {wrong}: its first 20 records have 1 field (tab-separated), expected 40" in capsys.readouterr().err
    config["data"]["max_bad_fraction"] = 1.0  # any share of bad rows taken: the file is read, and skipped
    summary = Trainer(RunConfig(**config)).fit()
    assert summary["bad_rows"] == 12_000 and summary["rows"] == 12_000


def _empty_data_config(tmp_path, train: list[str]) -> dict:
    return {"data": {"train": train, "batch_size": 64},
            "features": [{"kind": "sparse", "name": "C1", "columns": ["C1"], "table": "ids"},
                         {"kind": "label", "name": "click", "column": "label"}],
            "tables": [{"name": "ids", "dim": 4}], "training": {"run_dir": str(tmp_path / "run")}}


@pytest.mark.parametrize("runtime", [None, {"mode": "sync"}])
def test_training_files_without_rows_are_named_when_nothing_trains(tmp_path, runtime):
    (tmp_path / "bad").mkdir()
    empty = tmp_path / "bad" / "empty.tsv"
    empty.touch()
    trainer = Trainer(RunConfig(**_empty_data_config(tmp_path, [str(empty)]), runtime=runtime))
    with pytest.raises(DataError, match=rf"^data.train: {re.escape(str(empty))} holds no rows$"):
        trainer.fit()  # before anything trains
    with pytest.raises(DataError, match=rf"^no valid rows to evaluate in .*: {re.escape(str(empty))} holds no rows$"):
        trainer.evaluate([str(empty)])


def test_an_empty_parquet_training_file_is_refused_as_unreadable(tmp_path):
    empty = tmp_path / "empty.parquet"
    empty.touch()
    with pytest.raises(DataError, match=r"empty\.parquet: not a readable Parquet file \(.*0 bytes\)"):
        Trainer(RunConfig(**_empty_data_config(tmp_path, [str(empty)]))).fit()


def test_config_errors_name_the_key_path(tmp_path, capsys):
    config = _config(tmp_path)
    config["features"][0]["table"] = "nowhere"
    with pytest.raises(ConfigError, match="feature 'C1' uses table 'nowhere', which is not defined"):
        RunConfig(**config)
    config = _config(tmp_path)
    config["tables"][0]["dim"] = 0
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(path)]) == 2
    assert "tables.0.dim: Input should be greater than 0, got 0" in capsys.readouterr().err
    config = _config(tmp_path)
    config["training"]["precision"] = "float8"
    with pytest.raises(ConfigError, match="training.precision: Input should be 'float32', 'bfloat16' or 'auto'"):
        RunConfig(**config)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"))])
def test_resume_reaches_the_same_weights_and_tables_as_an_uninterrupted_run(tmp_path, device):
    """With TTL eviction, so that the rows' steps must agree too: saves take no step."""
    import numpy as np

    config = _config(tmp_path, checkpoint_every=7, device=device, evict_every=3)
    config["data"]["eval"] = None
    config["tables"][0]["eviction"] = {"ttl_steps": 4}

    def in_dir(name: str, **training) -> RunConfig:
        return RunConfig(**{**config, "training": {**config["training"], "run_dir": str(tmp_path / name), **training}})

    whole = Trainer(in_dir("whole"))
    total_steps = whole.fit()["steps"]
    Trainer(in_dir("split")).fit(max_steps=21)  # stops right after the checkpoint of step 21
    resumed = Trainer(in_dir("split"))
    assert resumed.fit(resume=True)["steps"] == total_steps
    other_saves = Trainer(in_dir("other", checkpoint_every=5))
    other_saves.fit()
    for run in (resumed, other_saves):
        for name, tensor in whole.model.state_dict().items():
            assert torch.equal(tensor, run.model.state_dict()[name]), name
        a, b = whole.collection.tables[0], run.collection.tables[0]
        keys = np.concatenate([a.snapshot_shard(s, since_save=False)["keys"] for s in range(a.num_shards)])
        assert a.stats().rows == b.stats().rows == len(keys) and a.stats().evicted == b.stats().evicted > 0
        (rows_a, found_a), (rows_b, found_b) = a.pull_rows(keys), b.pull_rows(keys)
        assert found_a.all() and found_b.all()
        np.testing.assert_array_equal(rows_a.values, rows_b.values)
        np.testing.assert_array_equal(rows_a.state, rows_b.state)
        np.testing.assert_array_equal(rows_a.last_seen, rows_b.last_seen)


def test_a_run_resumed_with_more_epochs_matches_one_that_had_them_from_the_start(tmp_path):
    """24 steps an epoch, a safe point every 5: the first run ends off the schedule, and
    its end once evicted there, baking an eviction the longer run never made into the
    checkpoint it resumes from."""
    config = _config(tmp_path, evict_every=5)
    config["data"]["eval"] = None
    config["tables"][0] |= {"eviction": {"ttl_steps": 4, "capacity_policy": "lfu"}, "max_rows": 3000}

    def in_dir(name: str, **training) -> RunConfig:
        return RunConfig(**{**config, "training": {**config["training"], "run_dir": str(tmp_path / name), **training}})

    Trainer(in_dir("extended", epochs=1)).fit()
    saved = Trainer(in_dir("extended", epochs=1))
    checkpoint.restore(saved, checkpoint.latest(tmp_path / "extended"))
    assert saved.collection.tables[0].stats().rows > 3000  # the rows of steps 21-24
    extended = Trainer(in_dir("extended", epochs=2))
    assert extended.fit(resume=True)["resumed_from"] == 24
    whole = Trainer(in_dir("whole", epochs=2))
    whole.fit()
    assert_same_state(whole, extended)
    assert whole.collection.tables[0].stats().evicted > 0


def test_the_final_evaluation_and_tidal_eval_score_the_tables_within_their_caps_as_exported(tmp_path, capsys,
                                                                                          monkeypatch):
    config = _config(tmp_path, epochs=1, evict_every=5)  # 24 steps: the last safe point is step 20
    config["tables"][0] |= {"eviction": {"capacity_policy": "lfu"}, "max_rows": 3000}
    trainer = Trainer(RunConfig(**config))
    summary = trainer.fit()
    table = summary["tables"]["ids"]
    assert table["rows"] <= 3000 and table["evicted"] > 0 and table["admitted"] == table["rows"] + table["evicted"]
    assert f"({table['admitted']:,d} created, {table['evicted']:,d} evicted)" in shown_table("ids", table)
    stats = trainer.collection.tables[0].stats()  # the memory held: chunks of the most rows it had, not the rows kept
    assert table["bytes"] == stats.allocated_bytes + stats.index_bytes + stats.metadata_bytes
    assert stats.allocated_bytes > stats.value_bytes + stats.state_bytes
    assert f"{table['rows']:,d} rows, {table['bytes'] / 2**20:.1f} MiB held (" in shown_table("ids", table)
    capsys.readouterr()
    monkeypatch.setattr(trainer_module, "_PROGRESS_S", 0.0)  # a long evaluation's progress, at every batch here
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--data", *config["data"]["eval"]]) == 0
    out = capsys.readouterr().out
    assert f"AUC {summary['eval']['auc']['click']:.4f}" in out and out.startswith("checkpoint step-00000024")
    assert re.search(r"\n  evaluating: 512 rows so far \([\d,]+ rows/s\)\n", out) and "evaluating: 4,000 rows" in out


def test_tidal_eval_reserves_no_rows_for_the_tables_it_loads(tmp_path, capsys, monkeypatch):
    """The tables come from the checkpoint: a reservation trainer.json names (as a
    hostile one may, resealed) allocates nothing."""
    from tidal.embedding import EmbeddingTable

    config = _config(tmp_path, epochs=1)
    config["tables"][0]["reserve_rows"] = 50_000
    Trainer(RunConfig(**config)).fit()
    reserved, reserve = [], EmbeddingTable._reserve
    monkeypatch.setattr(EmbeddingTable, "_reserve", lambda table, rows: reserved.append(rows) or reserve(table, rows))
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--data", *config["data"]["eval"]]) == 0
    assert reserved and set(reserved) == {0}


def test_a_run_saved_with_fields_now_refused_for_having_no_effect_resumes_without_them(tmp_path):
    config = _config(tmp_path, epochs=2, checkpoint_every=10)
    config["data"]["eval"] = None
    config["tables"][0] |= {"initializer": {"kind": "zeros", "scale": 0.5}, "eviction": {"capacity_policy": "lfu",
                                                                                         "ttl_steps": 1000},
                            "admission": {"kind": "count", "min_count": 1}}
    config["tables"].append({"name": "spare", "dim": 8})
    config["features"][-1]["weight"] = 3.0
    config["features"][0]["pooling"] = "mean"  # of one id a row
    Trainer(RunConfig.from_saved(config)).fit(max_steps=30)  # as a run saved before these were refused
    with pytest.raises(ConfigError, match="would have no effect"):
        RunConfig(**config)
    clean = {**config, "tables": [{**config["tables"][0], "initializer": {"kind": "zeros"},
                                   "eviction": {"ttl_steps": 1000}, "admission": None}],
             "features": [{k: v for k, v in config["features"][0].items() if k != "pooling"}, *config["features"][1:-1],
                          {k: v for k, v in config["features"][-1].items() if k != "weight"}]}
    assert Trainer(RunConfig(**clean)).fit(resume=True)["steps"] == 48
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "bundle")]) == 0


def test_the_summary_says_how_many_ids_a_full_table_without_eviction_turned_away(tmp_path):
    config = _config(tmp_path, epochs=1)
    config["data"]["eval"] = None
    config["tables"][0]["max_rows"] = 500
    table = Trainer(RunConfig(**config)).fit()["tables"]["ids"]
    assert table["rows"] == 500 and table["dropped_full"] > 100_000
    assert (f"{table['dropped_full']:,d} sightings of new ids got no row: the table was at its row cap with no "
            f"eviction") in shown_table("ids", table)


def test_a_resumed_finished_run_logs_one_final_evaluation_as_an_uninterrupted_run(tmp_path):
    config = _config(tmp_path, eval_every=10)

    def evals(name: str, epochs: int, resume: bool = False) -> list[tuple[int, bool]]:
        run = RunConfig(**{**config, "training": {**config["training"], "run_dir": str(tmp_path / name), "epochs": epochs}})
        Trainer(run).fit(resume=resume)
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r.get("final", False)) for r in records if r["event"] == "eval"]

    assert evals("resumed", epochs=1) == [(10, False), (20, False), (24, True)]
    whole = evals("whole", epochs=2)
    assert whole == [(10, False), (20, False), (30, False), (40, False), (48, True)]
    assert evals("resumed", epochs=2, resume=True) == whole
    assert evals("resumed", epochs=2, resume=True) == whole  # nothing left to train: the end is made again


def test_a_resumed_run_logs_rows_and_losses_as_an_uninterrupted_run(tmp_path):
    config = _config(tmp_path, epochs=1, log_every=4, checkpoint_every=5)
    config["data"]["eval"] = None

    def logged(name: str) -> list[tuple]:
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["rows"], r["loss"]) for r in records if r["event"] == "train"]

    def in_dir(name: str) -> RunConfig:
        return RunConfig(**{**config, "training": {**config["training"], "run_dir": str(tmp_path / name)}})

    Trainer(in_dir("whole")).fit()
    Trainer(in_dir("resumed")).fit(max_steps=7)  # resumes after step 5, inside the window of steps 5-8
    Trainer(in_dir("resumed")).fit(resume=True)
    assert logged("resumed") == logged("whole") and len(logged("whole")) == 6
    assert logged("whole")[-1][1] == 12_000


def test_the_logged_speed_leaves_out_evaluation_as_the_summary_does(tmp_path, monkeypatch):
    evaluate = Trainer.evaluate

    def slow(trainer, paths):
        time.sleep(1.0)
        return evaluate(trainer, paths)

    monkeypatch.setattr(Trainer, "evaluate", slow)
    summary = Trainer(RunConfig(**_config(tmp_path, epochs=1, log_every=20, eval_every=10))).fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r["samples_per_s"] for r in records if r["event"] == "train"]
    assert len(logged) == 1 and logged[0] > 0.6 * summary["samples_per_s"]  # 2 s of evaluation would make it < 0.4


def test_the_progress_line_shows_the_speed_since_the_previous_line():
    """It showed the mean since the run started, which after a slow start climbs for a long while."""
    progress = trainer_module.RunProgress(["label"])
    progress.start -= 10.0  # the first 1000 rows took 10 s
    progress.add(1000, np.array([0.5]))
    first = progress.record(0, 1, 0)
    progress.start -= 90.0  # the next 1000 took 90 s
    progress.add(1000, np.array([0.5]))
    second = progress.record(0, 2, 0)
    assert first["samples_per_s"] == pytest.approx(100, rel=0.01) == first["recent_samples_per_s"]
    assert second["samples_per_s"] == pytest.approx(20, rel=0.01)
    assert second["recent_samples_per_s"] == pytest.approx(1000 / 90, rel=0.01)


@pytest.mark.parametrize("way", [{}, {"runtime": {"mode": "sync"}}, {"passmode": {"batches_per_pass": 4}}],
                         ids=["reference", "sync", "passmode"])
def test_a_run_whose_loss_is_not_finite_stops_saying_at_which_step(tmp_path, way):
    """Before the sparse update of that step, which would refuse its gradient."""
    config = _config(tmp_path, epochs=1, lr=1000.0)
    config["tables"][0]["optimizer"] = {"kind": "sgd", "lr": 1e30}
    config["data"]["eval"] = None
    with pytest.raises(TidalError, match=r"training diverged at step (\d+): its loss is nan(; .*\. Else lower|\. Lower) "
                                         r"training.lr"):
        Trainer(RunConfig(**config, **way)).fit()


def test_a_run_whose_loss_is_not_finite_at_its_first_step_points_at_the_starting_values(tmp_path):
    """No learning rate has acted at step 1: lowering one would not help."""
    config = _config(tmp_path, epochs=1)
    config["tables"][0]["initializer"] = {"kind": "uniform", "scale": 3e38}
    config["data"]["eval"] = None
    with pytest.raises(TidalError, match=r"training diverged at step 1: its loss is nan\. Look at the starting values: "
                                         r"the tables' initializer scale"):
        Trainer(RunConfig(**config)).fit()


def test_cli_says_which_steps_a_resumed_run_trained(tmp_path, capsys):
    config = _config(tmp_path, checkpoint_every=5, epochs=1)
    config["data"]["eval"] = None
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    trainer = Trainer(RunConfig(**config))
    trainer.fit(max_steps=5)
    assert main(["train", "--config", str(path), "--resume"]) == 0
    end = json.loads((trainer.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    last, rows = end["steps"], end["rows"]
    assert end["resumed_from"] == 5 and (last - 6) * config["data"]["batch_size"] < rows
    assert f"trained steps 6-{last} (resumed after step 5), {rows:,d} rows at" in capsys.readouterr().out
    assert main(["train", "--config", str(path), "--resume"]) == 0
    assert f"trained nothing: the run had ended at step {last}, 0 rows at" in capsys.readouterr().out


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    from tidal.errors import CheckpointError

    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        Trainer(RunConfig(**_config(tmp_path))).fit(resume=True)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_cli_eval_scores_the_latest_checkpoint(tmp_path, capsys):
    config = _config(tmp_path, epochs=1)
    with open(config["data"]["train"][0], "a") as f:
        f.write("1\t2\n")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(path)]) == 0
    capsys.readouterr()
    with open(config["data"]["eval"][0], "a") as f:
        f.write("2" + "\t1" * 39 + "\n")
    os.remove(config["data"]["train"][0])  # evaluating needs no training file
    assert main(["eval", "--checkpoint", config["training"]["run_dir"], "--data", *config["data"]["eval"]]) == 0
    out = capsys.readouterr().out
    assert "click: AUC 0." in out and "on 4,000 rows" in out
    assert f"bad rows: 1 bad row skipped:\n  {config['data']['eval'][0]}:4001: column 'label'" in out  # not training's
    assert main(["eval", "--checkpoint", str(tmp_path / "nowhere"), "--data", "x"]) == 2


def test_bad_rows_are_counted_once_however_many_epochs_and_resumes(tmp_path):
    config = _config(tmp_path, epochs=2)
    config["data"]["eval"] = None
    with open(config["data"]["train"][0], "a") as f:
        f.write("1\t2\tnot-a-number\n")
    trainer = Trainer(RunConfig(**config))
    assert trainer.fit()["bad_rows"] == 1
    assert Trainer(RunConfig(**config)).fit(resume=True)["bad_rows"] == 1  # a finished run, resumed


@pytest.mark.parametrize("runtime", [None, {"backend": "local", "sparse_workers": 1, "dense_workers": 1}],
                         ids=["reference", "engine"])
def test_a_training_file_changed_while_the_run_trains_stops_it_by_name(tmp_path, monkeypatch, runtime):
    """An audit's find: a file emptied mid-run was trained as empty and the run ended well."""
    config = _config(tmp_path, epochs=1, checkpoint_every=4)
    config["data"]["train"] = generate(tmp_path / "two", rows=6_000, files=2, seed=1).paths
    config["runtime"] = runtime
    last = Path(config["data"]["train"][-1])
    file_rows = readers._file_rows

    def emptying_the_last_file(path, *args):  # as the run opens its first file
        last.write_text("")
        return file_rows(path, *args)

    monkeypatch.setattr(readers, "_file_rows", emptying_the_last_file)
    with pytest.raises(DataError, match=rf"{last}: holds 0 bytes, but [\d,]+ when the run began: it changed while "
                                        rf"the run trained"):
        Trainer(RunConfig(**config)).fit()


def test_a_trainer_that_trained_refuses_a_fresh_fit_but_resumes(tmp_path):
    """An audit's find: a second fit() trained on top of the first one's tables and weights
    and recorded the result as a fresh run."""
    config = _config(tmp_path, epochs=1, checkpoint_every=3)
    config["data"]["eval"] = None
    trainer = Trainer(RunConfig(**config))
    trainer.fit(max_steps=3)
    with pytest.raises(ConfigError, match=r"^this Trainer trained already, and its tables and weights hold that "
                                          r"training: a fresh run needs a new Trainer\(config\)"):
        trainer.fit()
    with pytest.raises(ConfigError, match=r"^resume must be True or False, got 'no'$"):
        trainer.fit(resume="no")
    assert trainer.fit(resume=True)["resumed_from"] == 3


def test_resume_refuses_a_changed_config(tmp_path):
    from tidal.errors import CheckpointError

    config = _config(tmp_path, epochs=1, checkpoint_every=3)
    config["data"]["eval"] = None
    Trainer(RunConfig(**config)).fit(max_steps=3)
    config["model"]["hidden_sizes"] = [16]
    config["data"]["batch_size"] = 256
    with pytest.raises(CheckpointError, match=r"the config changed since this checkpoint \(data.batch_size: 512 there, "
                                              r"256 now; model.hidden_sizes\[0\]: 32 there, 16 now\); resume with the "
                                              r"config it was written with \(a resume may change the training, runtime, "
                                              r"passmode, serving sections, data.eval, data.eval_group_by, "
                                              r"data.on_bad_row, data.max_bad_fraction and the tables' reserve_rows, "
                                              r"nothing else\)$"):
        Trainer(RunConfig(**config)).fit(resume=True)
    config["model"]["hidden_sizes"], config["data"]["batch_size"] = [32], 512
    config["data"] |= {"max_bad_fraction": 0.5, "on_bad_row": "fail"}  # how bad rows are met may change
    assert Trainer(RunConfig(**config)).fit(resume=True)["steps"] > 3


def test_a_run_saved_with_a_field_now_refused_for_having_no_effect_still_evaluates_exports_and_resumes(tmp_path, capsys):
    from tidal.serving import load_bundle

    config = _config(tmp_path, epochs=1, checkpoint_every=3)
    config["model"]["cross_layers"] = 5  # no effect on a DLRM; accepted before such fields were refused
    Trainer(RunConfig.from_saved(config)).fit(max_steps=3)  # as a Tidal of that time wrote it
    run_dir = config["training"]["run_dir"]
    assert main(["eval", "--checkpoint", run_dir, "--data", *config["data"]["eval"], "--device", "cpu"]) == 0
    assert main(["export", "--checkpoint", run_dir, "--out", str(tmp_path / "bundle")]) == 0
    assert load_bundle(tmp_path / "bundle").config.model.cross_layers == 5
    with pytest.raises(ConfigError, match="cross_layers"):
        RunConfig(**config)  # written today, it is refused
    del config["model"]["cross_layers"]
    assert Trainer(RunConfig(**config)).fit(resume=True)["resumed_from"] == 3  # and may go
    assert "AUC" in capsys.readouterr().out


def test_resume_refuses_training_files_that_changed_since_the_checkpoint(tmp_path):
    from tidal.errors import CheckpointError

    config = _config(tmp_path, epochs=1, checkpoint_every=3)
    config["data"] |= {"eval": None, "train": str(tmp_path / "train" / "*.tsv")}
    Trainer(RunConfig(**config)).fit(max_steps=3)
    first = sorted((tmp_path / "train").glob("*.tsv"))[0]
    earlier = first.with_name("0" + first.name)  # sorts first: its batches would pass as trained
    earlier.write_text(first.read_text())
    with pytest.raises(CheckpointError, match=rf"no longer names the files this checkpoint was reading "
                                              rf"\({earlier} is new\)"):
        Trainer(RunConfig(**config)).fit(resume=True)
    earlier.unlink()
    with open(first, "a") as f:
        f.write(first.read_text().splitlines(keepends=True)[0])
    with pytest.raises(CheckpointError, match=r"\.tsv was [0-9,]+ bytes, now [0-9,]+\)"):
        Trainer(RunConfig(**config)).fit(resume=True)


def test_a_checkpoint_records_the_training_files_the_run_began_with(tmp_path, monkeypatch):
    """A file landing under the glob while the run trains is not among the ones it reads:
    the checkpoint must not record it, and one removed meanwhile must not fail the save."""
    from tidal.errors import CheckpointError

    config = _config(tmp_path, epochs=1, checkpoint_every=3)
    config["data"] |= {"eval": None, "train": str(tmp_path / "train" / "*.tsv")}
    first = sorted((tmp_path / "train").glob("*.tsv"))[0]
    landing = first.with_name("0" + first.name)
    step = Trainer.step

    def landing_at_step_2(trainer, batch, **kwargs):
        if kwargs.get("step") == 2:
            landing.write_text(first.read_text())
        return step(trainer, batch, **kwargs)

    monkeypatch.setattr(Trainer, "step", landing_at_step_2)
    Trainer(RunConfig(**config)).fit(max_steps=3)
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match=rf"\({landing} is new\)"):
        Trainer(RunConfig(**config)).fit(resume=True)
    config["data"]["train"] = str(landing)
    config["training"]["run_dir"] = str(tmp_path / "gone")
    trainer = Trainer(RunConfig(**config))
    monkeypatch.setattr(Trainer, "step", lambda t, batch, **kw: landing.unlink(missing_ok=True) or step(t, batch, **kw))
    assert trainer.fit(max_steps=3)["steps"] == 3  # its file was removed after it was opened: the save still works


def test_a_finished_run_resumed_with_fewer_epochs_trains_nothing_and_keeps_its_checkpoint(tmp_path):
    config = _config(tmp_path, epochs=2, checkpoint_every=30)
    config["data"]["eval"] = None

    def fit(epochs: int, **kwargs) -> dict:
        return Trainer(RunConfig(**{**config, "training": {**config["training"], "epochs": epochs}})).fit(**kwargs)

    fit(2, max_steps=30)  # a checkpoint inside the second epoch
    assert checkpoint.latest(tmp_path / "run").name == "step-00000030-epoch-1"
    assert fit(1, resume=True)["steps"] == 30
    assert checkpoint.latest(tmp_path / "run").name == "step-00000030-epoch-1"  # not moved back to epoch 1's end
    assert fit(2, resume=True)["steps"] == 48
    assert fit(1, resume=True)["steps"] == 48
    assert checkpoint.latest(tmp_path / "run").name == "step-00000048-epoch-2"
    assert fit(3, resume=True)["steps"] == 72


def test_compile_clock_counts_the_first_compile_of_a_kernel_and_not_its_later_calls():
    import numba

    from tidal.runtime.telemetry import compile_clock

    @numba.njit
    def twice(x):
        return 2 * x

    with compile_clock() as compiling:
        assert compiling() == 0.0
        twice(1)
        first = compiling()
        twice(2)
        assert compiling() == first > 0.0
    with compile_clock() as compiling:
        twice(3)
        assert compiling() == 0.0
        twice(1.5)  # a new signature compiles again
        assert compiling() > 0.0


class _Killed(BaseException):
    """A process killed at that point (not an error anything would catch)."""


@pytest.mark.parametrize("point", ["tables", "folder rename", "LATEST", "cleanup"])
def test_a_save_killed_half_way_leaves_the_previous_checkpoint_to_resume_from(tmp_path, monkeypatch, point):
    from tidal.runtime import checkpoint

    config = _config(tmp_path, epochs=1, checkpoint_every=7)
    config["data"]["eval"] = None

    def in_dir(name: str) -> RunConfig:
        return RunConfig(**{**config, "training": {**config["training"], "run_dir": str(tmp_path / name)}})

    def killed_at_step_14(real, hit):  # type: ignore[no-untyped-def]
        def call(*args, **kwargs):  # type: ignore[no-untyped-def]
            if hit(*args):
                raise _Killed(point)
            return real(*args, **kwargs)
        return call

    def in_save_14(path, *rest):  # type: ignore[no-untyped-def]
        return "step-00000014" in str(path)

    def latest_names_14(path):  # type: ignore[no-untyped-def]
        return (path.parent / "LATEST").exists() and "00000014" in (path.parent / "LATEST").read_text()

    owner, name, hit = {
        "tables": (checkpoint, "save_tables", in_save_14),
        "folder rename": (checkpoint.os, "replace", in_save_14),
        "LATEST": (checkpoint, "write_json_atomic", lambda path, value: path.name == "LATEST" and "00000014" in value["checkpoint"]),
        "cleanup": (checkpoint.shutil, "rmtree", lambda path, *rest: path.name == "step-00000007-epoch-0" and latest_names_14(path)),
    }[point]
    whole = Trainer(in_dir("whole"))
    whole.fit()
    with monkeypatch.context() as patched:
        patched.setattr(owner, name, killed_at_step_14(getattr(owner, name), hit))
        with pytest.raises(_Killed):
            Trainer(in_dir("killed")).fit()
    expected = "step-00000014-epoch-0" if point == "cleanup" else "step-00000007-epoch-0"
    assert checkpoint.latest(tmp_path / "killed").name == expected
    resumed = Trainer(in_dir("killed"))
    resumed.fit(resume=True)
    for name, tensor in whole.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_the_last_step_is_evaluated_once_when_eval_every_lands_on_it(tmp_path):
    summary = Trainer(RunConfig(**_config(tmp_path, epochs=1, eval_every=12))).fit()  # 24 steps
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "eval"] == [12, 24]
    assert summary["eval"]["auc"] == [r for r in records if r["event"] == "eval"][-1]["auc"]


class _Sharpened(torch.nn.Module):
    """A model's logits times `factor`: the same ranking, far more confident."""

    def __init__(self, model: torch.nn.Module, factor: float) -> None:
        super().__init__()
        self.model, self.factor = model, factor

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(*inputs) * self.factor


def test_evaluation_ranks_and_scores_logits_that_float32_probabilities_would_round_to_one(tmp_path):
    config = _config(tmp_path, epochs=1)
    trainer = Trainer(RunConfig(**config))
    trainer.fit(max_steps=5)
    plain = trainer.evaluate(config["data"]["eval"])
    trainer.model = _Sharpened(trainer.model, 1000.0)  # sigmoid of most logits is 0 or 1 in float32
    sharp = trainer.evaluate(config["data"]["eval"])
    assert sharp.auc["click"] == plain.auc["click"]
    assert sharp.logloss["click"] > 17.0  # clipped probabilities capped it at 16.1
    trainer.model = _Sharpened(trainer.model.model, float("inf"))  # sure of every answer: probabilities 0 and 1
    sure = trainer.evaluate(config["data"]["eval"])
    assert sure.rows == 4_000 and sure.bad_rows == 0 and sure.logloss["click"] == float("inf")
    assert sure.auc["click"] is not None and sure.calibration["click"] is not None
    trainer.model = _Sharpened(trainer.model, float("nan"))
    with pytest.raises(DataError, match=r"the model's outputs are not numbers for 4,000 of the 4,000 rows evaluated "
                                        r"\(100.0%, more than data.max_bad_fraction allows\): training most likely diverged"):
        trainer.evaluate(config["data"]["eval"])


def test_a_step_refuses_a_batch_laid_out_otherwise_than_the_config(tmp_path):
    config = _config(tmp_path, epochs=1)
    trainer = Trainer(RunConfig(**config))
    batch = next(trainer.batches(config["data"]["train"]))
    swapped = replace(batch.select(list(reversed(batch.keys))), dense=batch.dense, labels=batch.labels)
    with pytest.raises(BatchError, match=r"sparse features must be the config's, in its order: expected \['C1', 'C2'"):
        trainer.step(swapped)
    with pytest.raises(BatchError, match=r"labels must be \[B, 1\] = \[512, 1\] \(one column per target\), got None"):
        trainer.step(replace(batch, labels=None))
    with pytest.raises(BatchError, match=r"dense must be \[B, 13\] = \[512, 13\] \(one column per dense feature\), "
                                         r"got \(512, 12\)"):
        trainer.step(replace(batch, dense=batch.dense[:, :12]))
    with pytest.raises(BatchError, match="a training step needs at least one sample, got an empty batch"):
        trainer.step(SparseBatch(keys=batch.keys, batch_size=0, values=np.zeros(0, np.int64),
                                 lengths=np.zeros(0, np.int32), dense=np.zeros((0, 13)), labels=np.zeros((0, 1))))
    assert trainer.step(batch)[0] > 0.0


@pytest.mark.parametrize("max_steps", [0, -3, 2.5, True])
def test_fit_refuses_a_max_steps_that_is_not_a_step(tmp_path, max_steps):
    with pytest.raises(ConfigError, match=f"max_steps is the step to stop after: an integer >= 1, .* got {max_steps!r}"):
        Trainer(RunConfig(**_config(tmp_path))).fit(max_steps=max_steps)


def test_resume_refuses_a_max_steps_the_checkpoint_is_past(tmp_path):
    config = _config(tmp_path, epochs=1, checkpoint_every=4)
    Trainer(RunConfig(**config)).fit(max_steps=6)
    with pytest.raises(ConfigError, match="max_steps 3 is not past the checkpoint's step 4: nothing would train"):
        Trainer(RunConfig(**config)).fit(resume=True, max_steps=3)


def test_eval_data_of_one_class_has_no_auc_and_the_run_still_finishes(tmp_path, capsys):
    config = _config(tmp_path, epochs=1)
    one_class = tmp_path / "one_class.tsv"
    lines = [line for path in config["data"]["eval"] for line in open(path) if line.startswith("0\t")]
    one_class.write_text("".join(lines[:300]))
    config["data"]["eval"] = [str(one_class)]
    summary = Trainer(RunConfig(**config)).fit(max_steps=3)
    assert summary["eval"]["auc"] == {"click": None} and summary["eval"]["logloss"]["click"] > 0.0
    assert "click AUC n/a (one class in the data)" in capsys.readouterr().out


def test_csv_files_without_a_header_take_data_columns_and_a_setting_no_file_reads_is_refused(tmp_path):
    config = _config(tmp_path, epochs=1)
    names = ["label", *CRITEO_DENSE, *CRITEO_SPARSE]
    tsv = pa.csv.read_csv(config["data"]["eval"][0], read_options=pa.csv.ReadOptions(column_names=names),
                          parse_options=pa.csv.ParseOptions(delimiter="\t"),
                          convert_options=pa.csv.ConvertOptions(column_types={n: pa.string() for n in names}))
    pa.csv.write_csv(tsv, tmp_path / "bare.csv", pa.csv.WriteOptions(include_header=False))
    pa.csv.write_csv(tsv.select(names[::-1]), tmp_path / "headed.csv")  # its own order, named
    pq.write_table(tsv, tmp_path / "eval.parquet")
    shuffled = names[1:] + names[:1]  # a TSV layout that is not Criteo's
    with open(config["data"]["train"][0]) as source, open(tmp_path / "train.tsv", "w") as target:
        target.writelines("\t".join(line.rstrip("\n").split("\t")[1:] + line.split("\t")[:1]) + "\n" for line in source)

    def fit(name: str, **data) -> dict:
        run = {**config, "data": {**config["data"], "train": str(tmp_path / "train.tsv"), "columns": shuffled, **data},
               "training": {**config["training"], "run_dir": str(tmp_path / name)}}
        return Trainer(RunConfig(**run)).fit(max_steps=3)

    evals = {name: fit(name, eval=str(tmp_path / file), **extra)["eval"] for name, file, extra in [
        ("headed", "headed.csv", {}), ("parquet", "eval.parquet", {}),
        ("bare", "bare.csv", {"columns": names, "csv_header": False, "train": str(tmp_path / "bare.csv")})]}
    assert evals["headed"] == evals["parquet"] and evals["headed"]["rows"] == 4_000 and evals["headed"]["bad_rows"] == 0
    assert evals["bare"]["rows"] == 4_000 and evals["bare"]["bad_rows"] == 0
    with pytest.raises(ConfigError, match=r"data.columns names the columns of TSV files .* but the data files are "
                                          r"CSV with a header line and Parquet, which name their own: remove it"):
        fit("refused", train=str(tmp_path / "headed.csv"), eval=str(tmp_path / "eval.parquet"))
    with pytest.raises(ConfigError, match=r"data.csv_header is false, but no data file is CSV \(tsv\)"):
        fit("refused", eval=None, csv_header=False)


def test_a_trainer_of_a_dict_is_refused_naming_run_config(tmp_path):
    with pytest.raises(ConfigError, match=r"Trainer: config: expected RunConfig, got dict; build one with RunConfig"):
        Trainer(_config(tmp_path))


def test_a_feature_reading_a_column_the_layout_lacks_says_which_layout(tmp_path):
    config = _config(tmp_path, epochs=1)
    config["features"].append({"kind": "sparse", "name": "extra", "columns": ["C99"], "table": "ids"})
    with pytest.raises(DataError, match=r"the features read columns \['C99'\], which the default TSV layout "
                                        r"\(Criteo's: data.columns is not set\) lacks"):
        Trainer(RunConfig(**config)).fit()
    config["data"]["columns"] = ["label", "C1"]
    with pytest.raises(DataError, match=r"which data.columns lacks; it lists \['label', 'C1'\]"):
        Trainer(RunConfig(**config)).fit()


def test_a_parquet_list_column_trains_as_the_bags_of_its_values_joined(tmp_path):
    """Spark's and pandas' multi-valued column, read by a feature with a separator,
    trains bit for bit as the same bags written as text; read by any other feature it
    is refused before the run starts."""
    rng = np.random.default_rng(0)
    tags = [rng.integers(0, 50, rng.integers(0, 4)).tolist() for _ in range(2048)]
    columns = {"label": rng.integers(0, 2, 2048), "user": rng.integers(0, 300, 2048)}
    pq.write_table(pa.table({**columns, "tags": pa.array(tags, pa.list_(pa.int64()))}), tmp_path / "lists.parquet")
    pq.write_table(pa.table({**columns, "tags": ["|".join(map(str, t)) for t in tags]}), tmp_path / "text.parquet")

    def config(name: str, tags_feature: dict) -> dict:
        return {"data": {"train": [str(tmp_path / name)], "batch_size": 256},
                "features": [{"kind": "sparse", "name": "user", "columns": ["user"], "table": "ids"},
                             {"kind": "sparse", "name": "tags", "columns": ["tags"], "table": "ids", **tags_feature},
                             {"kind": "label", "name": "click", "column": "label"}],
                "tables": [{"name": "ids", "dim": 8, "optimizer": {"kind": "adagrad", "lr": 0.05}}],
                "training": {"run_dir": str(tmp_path / f"run-{name}")}}

    bag = {"separator": "|", "pooling": "mean"}
    lists, text = Trainer(RunConfig(**config("lists.parquet", bag))), Trainer(RunConfig(**config("text.parquet", bag)))
    lists.fit()
    text.fit()
    assert_same_state(lists, text)
    with pytest.raises(DataError, match=r"data.train: .*lists\.parquet: column 'tags' has type list<element: int64>; "
                                        r"expected strings or numbers, or lists of them for bags \(a list column"):
        Trainer(RunConfig(**config("lists.parquet", {}))).fit()
    twice = config("lists.parquet", bag)  # read by a second feature another way: refused, not joined for one of them
    twice["features"].append({"kind": "sparse", "name": "tags2", "columns": ["tags"], "table": "ids", "separator": ","})
    with pytest.raises(DataError, match=r"column 'tags' has type list<element: int64>; .*where every feature that "
                                        r"reads it is a sparse feature with the same separator"):
        Trainer(RunConfig(**twice)).fit()
