"""What a run folder may hold, and what happens when it holds something else: earlier
runs, damaged checkpoints, no valid data, exports aimed at the wrong place."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from runtime.test_trainer import _config

from tidal.cli import main
from tidal.config import RunConfig
from tidal.data import generate
from tidal.data.criteo import CRITEO_COLUMNS
from tidal.embedding.checkpoint import sealed
from tidal.errors import CheckpointError, ConfigError, CorruptCheckpointError, DataError
from tidal.runtime import Trainer, checkpoint
from tidal.serving import export
from trainer_helpers import assert_same_state


@pytest.fixture
def run(tmp_path):
    """A finished one-epoch run (no eval data): its config dict."""
    config = _config(tmp_path, epochs=1)
    config["data"]["eval"] = None
    Trainer(RunConfig(**config)).fit()
    return config


def test_a_fresh_run_into_a_folder_holding_a_run_is_refused(run, tmp_path):
    before = checkpoint.latest(tmp_path / "run")
    written = (before / "trainer.json").read_bytes()
    other = {**run, "model": {**run["model"], "hidden_sizes": [64]}}
    with pytest.raises(ConfigError, match="holds an earlier run's checkpoints: pass --resume"):
        Trainer(RunConfig(**other)).fit()
    assert checkpoint.latest(tmp_path / "run") == before and (before / "trainer.json").read_bytes() == written


def test_a_run_whose_latest_pointer_was_lost_is_not_replaced_and_says_how_to_go_on(run, tmp_path):
    before = checkpoint.latest(tmp_path / "run")
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    (before.parent / "LATEST").unlink()
    with pytest.raises(ConfigError, match="holds an earlier run's checkpoints: pass --resume"):
        Trainer(RunConfig(**run)).fit()  # it would have removed the checkpoint at its first save
    assert (before / "trainer.json").is_file() and (tmp_path / "run" / "metrics.jsonl").read_text() == metrics
    with pytest.raises(CheckpointError, match=rf"LATEST is missing, but the run's checkpoints folder holds "
                                              rf"{before.name}: to go on from the newest, write LATEST again "
                                              rf"\({{\"checkpoint\": \"{before.name}\"}}\)"):
        Trainer(RunConfig(**run)).fit(resume=True)
    with pytest.raises(CheckpointError, match=rf"LATEST is missing, but the run's checkpoints folder holds "
                                              rf"{before.name}"):  # it said "no checkpoint to export; train first"
        export(tmp_path / "run", tmp_path / "bundle")


def test_keep_checkpoints_keeps_the_newest_and_a_damaged_latest_says_to_resume_from_the_one_before(tmp_path):
    config = _config(tmp_path, epochs=1, checkpoint_every=5, keep_checkpoints=2)
    config["data"]["eval"] = None
    Trainer(RunConfig(**config)).fit(max_steps=15)
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["LATEST", "step-00000010-epoch-0", "step-00000015-epoch-0"]
    (root / "step-00000015-epoch-0" / "dense.safetensors").write_bytes(b"damaged")
    with pytest.raises(CorruptCheckpointError, match=r"dense.safetensors: .*; the run kept an earlier checkpoint, "
                                                     r"step-00000010-epoch-0: to resume from it \(the steps since are "
                                                     r"trained again\), write LATEST naming it"):
        Trainer(RunConfig(**config)).fit(resume=True)
    with pytest.raises(CorruptCheckpointError, match=r"dense.safetensors: .*; the run kept an earlier checkpoint: "
                                                     r"name it instead, .*/step-00000010-epoch-0$"):
        export(tmp_path / "run", tmp_path / "bundle")  # an evaluation or a warm start reads it as an export does
    (root / "LATEST").write_text('{"checkpoint": "step-00000010-epoch-0"}')  # as it says
    whole = Trainer(RunConfig(**{**config, "training": {**config["training"], "run_dir": str(tmp_path / "whole")}}))
    whole.fit()
    resumed = Trainer(RunConfig(**config))
    resumed.fit(resume=True)
    assert_same_state(whole, resumed)


@pytest.mark.parametrize("damage", ["lost trainer.json", "LATEST names a missing folder", "LATEST cut short"])
def test_a_latest_pointer_to_no_complete_checkpoint_names_the_kept_one_to_go_on_from(tmp_path, damage):
    config = _config(tmp_path, epochs=1, checkpoint_every=5, keep_checkpoints=2)
    config["data"]["eval"] = None
    Trainer(RunConfig(**config)).fit(max_steps=15)
    root = tmp_path / "run" / "checkpoints"
    if damage == "lost trainer.json":  # the last file a copy of the run would write
        (root / "step-00000015-epoch-0" / "trainer.json").unlink()
    else:
        (root / "LATEST").write_text('{"checkpoint": "step-00000099-epoch-9"}' if "missing" in damage else '{"checkp')
    way = (r"the run's checkpoints folder holds step-00000010-epoch-0(, step-00000015-epoch-0)?: to go on from the "
           r"newest, write LATEST again \({\"checkpoint\": \"step-000000(10|15)-epoch-0\"}\), or name that folder")
    with pytest.raises(CheckpointError, match=rf"LATEST.*; {way}"):
        Trainer(RunConfig(**config)).fit(resume=True)
    with pytest.raises(CheckpointError, match=rf"LATEST.*; {way}"):
        export(tmp_path / "run", tmp_path / "bundle")


def test_the_periodic_save_of_a_runs_last_step_gives_way_to_the_save_at_its_end(tmp_path):
    """It counted as one of the kept checkpoints: with two kept, the run held the same
    step twice and no earlier one to fall back on."""
    config = _config(tmp_path, epochs=1, checkpoint_every=8, keep_checkpoints=2)
    config["data"]["eval"] = None
    assert Trainer(RunConfig(**config)).fit()["steps"] == 24  # a multiple of checkpoint_every
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-00000016-epoch-0", "step-00000024-epoch-1"]


def test_a_ctrl_c_as_a_save_commits_waits_until_latest_names_the_new_checkpoint(tmp_path, monkeypatch):
    """It left the new folder beside the old one, and a LATEST.partial, which no message named."""
    import signal

    config = _config(tmp_path, epochs=1, checkpoint_every=4)
    config["data"]["eval"] = None
    write = checkpoint.write_json_atomic

    def interrupted(path, content):  # the Ctrl-C comes as the save of step 8 writes LATEST
        if content.get("checkpoint", "").startswith("step-00000008-"):
            signal.raise_signal(signal.SIGINT)
        write(path, content)

    monkeypatch.setattr(checkpoint, "write_json_atomic", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Trainer(RunConfig(**config)).fit(max_steps=12)
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["LATEST", "step-00000008-epoch-0"]
    assert json.loads((root / "LATEST").read_text())["checkpoint"] == "step-00000008-epoch-0"


def test_reading_a_kept_earlier_checkpoint_leaves_it_there_and_a_warm_start_from_it_trains(tmp_path):
    config = _config(tmp_path, epochs=1, checkpoint_every=5, keep_checkpoints=3)
    config["data"]["eval"] = None
    Trainer(RunConfig(**config)).fit(max_steps=15)
    root = tmp_path / "run" / "checkpoints"

    def folders():
        return sorted(p.name for p in root.glob("step-*"))

    kept = ["step-00000005-epoch-0", "step-00000010-epoch-0", "step-00000015-epoch-0"]
    assert folders() == kept and json.loads((root / "LATEST").read_text()) == {"checkpoint": kept[-1], "keep": 3}
    with checkpoint.reading(root / kept[0]):  # as tidal eval and tidal export read it
        pass
    assert folders() == kept
    latest = (root / "LATEST").read_text()
    for pointer in ({"checkpoint": kept[-1]}, {"checkpoint": "foo", "keep": 1}):  # an earlier Tidal's, a hand's
        (root / "LATEST").write_text(json.dumps(pointer))
        with checkpoint.reading(root / kept[1]):
            pass
        assert folders() == kept  # not knowing what the run keeps, a reader removes nothing
    (root / "LATEST").write_text(latest)
    day2 = {**config, "training": {**config["training"], "run_dir": str(tmp_path / "day2")}}
    assert Trainer(RunConfig(**day2)).fit(init_from=root / kept[0], max_steps=8)["steps"] == 8
    assert folders() == kept
    Trainer(RunConfig(**config)).fit(resume=True, max_steps=20)  # a save removes the oldest, now not kept
    assert folders() == kept[1:] + ["step-00000020-epoch-0"]


def test_a_damaged_latest_checkpoint_of_a_run_keeping_one_says_so(run, tmp_path):
    (checkpoint.latest(tmp_path / "run") / "dense.safetensors").write_bytes(b"damaged")
    with pytest.raises(CorruptCheckpointError, match=r"the run kept no earlier checkpoint \(training.keep_checkpoints "
                                                     r"keeps as many as it says\): restore the file, or train again"):
        Trainer(RunConfig(**run)).fit(resume=True)


def test_a_file_where_a_checkpoint_goes_is_named(tmp_path):
    config = _config(tmp_path, epochs=1, checkpoint_every=5)
    config["data"]["eval"] = None
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step-00000010-epoch-0").write_text("x")
    with pytest.raises(CheckpointError, match=r"checkpoints/step-00000010-epoch-0 is a file, where the checkpoint of "
                                              r"step 10 goes; move it away, then --resume goes on"):
        Trainer(RunConfig(**config)).fit()
    assert checkpoint.latest(tmp_path / "run").name == "step-00000005-epoch-0"


def test_a_second_run_into_a_run_dir_in_use_is_refused_naming_the_first(tmp_path):
    """Two runs into one folder once removed each other's checkpoint staging and both
    truncated metrics.jsonl; the first holds run.lock while it trains."""
    config = _config(tmp_path, epochs=1, checkpoint_every=5)
    config["data"]["eval"] = None
    run_dir = tmp_path / "run"
    Trainer(RunConfig(**config)).fit(max_steps=5)
    files = _contents(run_dir)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(run_dir / "run.lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        for resume in (False, True):
            with pytest.raises(ConfigError, match=rf"training.run_dir .*run: another run \(pid {holder.pid}\) is using "
                                                  rf"it \(.*run.lock is locked\); wait for it to end"):
                Trainer(RunConfig(**config)).fit(resume=resume, max_steps=1)
    finally:
        holder.kill()
        holder.wait()
    assert _contents(run_dir) == files  # untouched
    assert Trainer(RunConfig(**config)).fit(resume=True, max_steps=6)["steps"] == 6  # the lock went with its process


def _contents(run_dir) -> dict:  # type: ignore[no-untyped-def]
    """Every file of a run folder but its lock, which names the holder: path -> bytes."""
    return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != checkpoint.LOCK}


def test_a_resume_into_a_run_dir_whose_run_has_not_saved_yet_names_that_run(tmp_path):
    config = _config(tmp_path, epochs=1)
    (tmp_path / "run").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(tmp_path / "run" / "run.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(ConfigError, match=rf"another run \(pid {holder.pid}\) is using it"):
            Trainer(RunConfig(**config)).fit(resume=True)
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(CheckpointError, match=r"holds no checkpoint .*; train a run there first \(one that stopped "
                                              r"before its first checkpoint starts again by its own command, "
                                              r"--init-from included\)"):
        Trainer(RunConfig(**config)).fit(resume=True)


_HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, f"{os.getpid()}\\n".encode())
print("locked", flush=True)
time.sleep(60)
"""


def test_a_fresh_run_whose_checkpoints_folder_is_a_file_is_refused_before_training(tmp_path):
    config = _config(tmp_path, epochs=1)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoints").write_text("x")
    with pytest.raises(ConfigError, match=r"training.run_dir .*run: .*checkpoints is a file; expected the folder of "
                                          r"the run's checkpoints there"):
        Trainer(RunConfig(**config)).fit()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints"]


def test_a_resumed_run_logs_each_step_once(tmp_path):
    """The records the abandoned continuation logged past the checkpoint, a torn last
    line among them, go, and so do the end summaries of the parts that stopped: the
    resumed run logs those steps again, and the log reads as one run."""
    config = _config(tmp_path, epochs=1, checkpoint_every=5, log_every=1)
    config["data"]["eval"] = None
    Trainer(RunConfig(**config)).fit(max_steps=7)  # steps 6 and 7 are trained again
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(metrics, "a") as log:
        log.write('{"event": "train", "epoch": 0, "st')  # killed while writing
    Trainer(RunConfig(**config)).fit(resume=True, max_steps=10)  # stops at its checkpoint
    Trainer(RunConfig(**config)).fit(resume=True)
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records if r["event"] == "train"] == list(range(1, 25))
    assert [r["event"] for r in records].count("end") == 1 and records[-1]["resumed_from"] == 10


def test_resume_applies_the_configs_learning_rate(run):
    changed = {**run, "training": {**run["training"], "epochs": 2, "lr": 0.0007}}
    trainer = Trainer(RunConfig(**changed))
    trainer.fit(resume=True)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [0.0007]


def test_a_run_resumed_with_other_eval_data_evaluates_that(run, tmp_path):
    """What a run evaluates is no part of what it trains: a run stopped by its eval data
    resumes with other data and finishes."""
    held_out = generate(tmp_path / "held-out", rows=1_000, seed=2, split=1)
    changed = {**run, "data": {**run["data"], "eval": held_out.paths}}
    summary = Trainer(RunConfig(**changed)).fit(resume=True)
    assert summary["eval"]["rows"] == 1_000


def test_no_valid_rows_fail_training_and_evaluation_saying_why(tmp_path):
    config = _config(tmp_path, epochs=1)
    bad = tmp_path / "bad.tsv"
    bad.write_text(("2" + "\t" * 39 + "\n") * 3)  # Criteo's 40 columns, the label neither 0 nor 1
    config["data"] = {**config["data"], "train": [str(bad)], "eval": None}
    with pytest.raises(DataError, match=r"no valid rows to train on in data.train: 3 bad rows skipped:\n  .*bad.tsv:1"):
        Trainer(RunConfig(**config)).fit()
    assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(DataError, match="no valid rows to evaluate in .*bad.tsv.*: 3 bad rows skipped"):
        Trainer(RunConfig(**config)).evaluate([str(bad)])


def test_data_files_are_looked_for_before_anything_trains(tmp_path):
    config = _config(tmp_path, epochs=1)
    config["data"]["eval"] = [str(tmp_path / "nope.tsv")]
    with pytest.raises(DataError, match="data.eval: no data file at .*nope.tsv"):
        Trainer(RunConfig(**config)).fit()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("key", ["train", "eval"])
def test_a_parquet_file_lacking_a_column_is_refused_before_anything_trains(tmp_path, key):
    import pyarrow.parquet as pq

    config = _config(tmp_path, epochs=1)
    good = generate(tmp_path / "parquet", rows=2_000, seed=1, file_format="parquet").paths
    lacking = tmp_path / "lacking.parquet"
    pq.write_table(pq.read_table(good[0]).drop_columns(["C1"]), lacking)
    config["data"] |= {"train": good, "eval": good, key: [*good, str(lacking)]}
    with pytest.raises(DataError, match=rf"data.{key}: .*lacking.parquet: Parquet file lacks columns \['C1'\]"):
        Trainer(RunConfig(**config)).fit()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("key", ["train", "eval"])
@pytest.mark.parametrize("name, content", [("none.tsv", ""), ("none.csv", ",".join(CRITEO_COLUMNS) + "\n"),
                                           ("none.tsv", "\n\n")], ids=["empty", "header only", "blank lines"])
def test_data_files_of_which_none_holds_a_row_are_refused_before_anything_trains(tmp_path, key, name, content):
    config = _config(tmp_path, epochs=1)
    (tmp_path / name).write_text(content)
    config["data"][key] = [str(tmp_path / name)]
    aside = r" \(but a header line\)" if name.endswith(".csv") else ""
    with pytest.raises(DataError, match=rf"data.{key}: .*{name} holds no rows{aside}$"):
        Trainer(RunConfig(**config)).fit()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_run_dir_that_is_a_file_is_refused(tmp_path):
    config = _config(tmp_path, epochs=1, run_dir=str(tmp_path / "a-file"))
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match="training.run_dir .*a-file is a file"):
        Trainer(RunConfig(**config)).fit()
    config["training"]["run_dir"] = str(tmp_path / "a-file" / "run")
    with pytest.raises(ConfigError, match=r"training.run_dir .*a-file/run: cannot make the folder \(Not a directory"):
        Trainer(RunConfig(**config)).fit()


def test_a_fresh_run_does_not_overwrite_a_metrics_log_no_tidal_run_wrote(tmp_path):
    config = _config(tmp_path, epochs=1, run_dir=str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"epoch": 1, "acc": 0.9}\n')
    with pytest.raises(ConfigError, match=r"training.run_dir .*run holds a metrics.jsonl that no Tidal run wrote"):
        Trainer(RunConfig(**config)).fit(max_steps=2)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == '{"epoch": 1, "acc": 0.9}\n'
    (tmp_path / "run" / "metrics.jsonl").unlink()
    Trainer(RunConfig(**config)).fit(max_steps=2)  # a Tidal run's log, of a run that wrote no checkpoint:
    Trainer(RunConfig(**config)).fit(max_steps=2)  # started again


def test_a_run_dir_whose_lock_cannot_be_written_is_refused(tmp_path):
    config = _config(tmp_path, epochs=1, run_dir=str(tmp_path / "run"))
    (tmp_path / "run" / "run.lock").mkdir(parents=True)  # as a read-only folder would, for root too
    with pytest.raises(ConfigError, match=r"training.run_dir .*run: cannot write there \(Is a directory: .*run.lock\)"):
        Trainer(RunConfig(**config)).fit()


@pytest.mark.parametrize("damage, reason", [
    (lambda ck: (ck.parent / "LATEST").write_text("garbage"), "LATEST: not valid JSON"),
    (lambda ck: (ck.parent / "LATEST").write_text('{"x": 1}'), "LATEST: expected"),
    (lambda ck: (ck / "trainer.json").write_text('{"position": '), "trainer.json: not valid JSON"),
    (lambda ck: (ck / "dense.safetensors").unlink(), "dense.safetensors: missing"),
    (lambda ck: (ck / "dense.safetensors").write_bytes((ck / "dense.safetensors").read_bytes()[:100]),
     "dense.safetensors: expected"),
])
def test_a_damaged_checkpoint_is_refused_naming_the_file(run, capsys, tmp_path, damage, reason):
    run_dir = tmp_path / "run"
    damage(checkpoint.latest(run_dir))
    with pytest.raises(CorruptCheckpointError, match=reason):
        Trainer(RunConfig(**run)).fit(resume=True)
    assert main(["eval", "--checkpoint", str(run_dir), "--data", *run["data"]["train"]]) == 2
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(tmp_path / "bundle")]) == 2
    err = capsys.readouterr().err
    assert err.count(reason) == 2 and "Traceback" not in err
    assert not list(tmp_path.glob(".tmp-*"))  # a failed export leaves nothing behind


def test_eval_takes_one_checkpoint_and_a_device(run, capsys, tmp_path):
    directory = checkpoint.latest(tmp_path / "run")
    meta = json.loads((directory / "trainer.json").read_text())
    meta["config"]["training"]["device"] = "cuda"  # trained on a GPU machine
    (directory / "trainer.json").write_text(json.dumps(sealed(meta)))
    assert main(["eval", "--checkpoint", str(directory), "--data", *run["data"]["train"], "--device", "cpu"]) == 0
    assert "click: AUC 0." in capsys.readouterr().out


def test_eval_says_which_flags_read_files_otherwise_where_files_could_not_be_read(run, capsys, tmp_path):
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "nothere.tsv")]) == 2
    assert capsys.readouterr().err == f"tidal eval: no data file at {tmp_path / 'nothere.tsv'}: expected a file, a " \
                                      f"glob matching files, or a list of them\n"  # no hint: no file to read otherwise
    (tmp_path / "wrong.tsv").write_text("1\t2\n" * 30)
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "wrong.tsv")]) == 2
    assert capsys.readouterr().err.endswith("--format, --columns, --csv-header, --max-bad-fraction and --on-bad-row "
                                            "say otherwise)\n")


def test_eval_names_the_device_flag_when_no_gpu_is_there(run, capsys, tmp_path, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--data", *run["data"]["train"], "--device", "cuda"]) == 2
    assert "--device is 'cuda', but torch sees no CUDA device" in capsys.readouterr().err
    for device in ("gpu", "CPU", "meta"):
        assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--data", *run["data"]["train"], "--device", device]) == 2
        assert f"--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}" in capsys.readouterr().err


def test_export_never_replaces_what_is_not_a_bundle(run, capsys, tmp_path):
    run_dir = tmp_path / "run"
    kept = sorted(p.name for p in run_dir.iterdir())
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    (tmp_path / "a-file").write_text("x")
    for out, reason in [(run_dir, "holds the checkpoint being exported"), (tmp_path, "holds the checkpoint"),
                        (tmp_path / "notes", "not a serving bundle"), (tmp_path / "a-file", "is a file"),
                        (tmp_path / "a-file" / "b", "a-file is a file, so no folder can be made there")]:
        assert main(["export", "--checkpoint", str(run_dir), "--out", str(out)]) == 2
        assert reason in capsys.readouterr().err
    assert sorted(p.name for p in run_dir.iterdir()) == kept and (tmp_path / "notes" / "todo.txt").exists()
    bundle = tmp_path / "bundle"
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(bundle)]) == 0
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(bundle)]) == 0  # an earlier bundle is replaced
    (tmp_path / "link").symlink_to("bundle")
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(tmp_path / "link")]) == 2
    assert (f"--out {tmp_path / 'link'} is a symbolic link (to bundle); a full export replaces the folder it is "
            f"given: give the folder itself as --out ({bundle.resolve()})") in capsys.readouterr().err  # "is a file"


def test_ctrl_c_in_train_says_how_to_go_on(run, capsys, tmp_path, monkeypatch):
    def interrupted(trainer, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "fit", interrupted)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    assert main(["train", "--config", str(path)]) == 130
    assert f"interrupted; `tidal train --config {path} --resume` continues" in capsys.readouterr().err
    assert main(["train", "--config", str(path), "--init-from", "elsewhere"]) == 130
    assert f"interrupted; `tidal train --config {path} --resume` (without --init-from) continues" in \
        capsys.readouterr().err


def test_a_list_of_files_in_two_formats_is_refused(tmp_path):
    config = _config(tmp_path, epochs=1)
    parquet = generate(tmp_path / "pq", rows=500, seed=1, split=2, file_format="parquet")
    config["data"] = {**config["data"], "train": parquet.paths + config["data"]["train"], "eval": None}
    with pytest.raises(DataError, match=r"the data files mix formats \(.*part-00000.parquet is parquet, .*tsv is tsv\)"):
        Trainer(RunConfig(**config)).fit()
    with pytest.raises(DataError, match="mix formats"):
        Trainer(RunConfig(**config)).evaluate(config["data"]["train"])
