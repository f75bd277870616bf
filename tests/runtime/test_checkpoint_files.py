"""A run checkpoint's own files: dense.safetensors is checked against the size and sha256
in trainer.json, and trainer.json against the sha256 of its content; checkpoints written
before these hashes still load."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from runtime.test_trainer import _config

from tidal.cli import main
from tidal.config import RunConfig
from tidal.embedding.checkpoint import sealed, write_json_atomic
from tidal.errors import CheckpointError, CorruptCheckpointError
from tidal.runtime import Trainer, checkpoint
from tidal.serving import load_bundle


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished one-epoch run (no eval data): its config dict."""
    config = _config(tmp_path_factory.mktemp("checkpoint-files"), epochs=1)
    config["data"]["eval"] = None
    Trainer(RunConfig(**config)).fit()
    return config


@pytest.fixture
def saved(run, tmp_path):
    """A copy of the run's latest checkpoint, free to damage."""
    return shutil.copytree(checkpoint.latest(Path(run["training"]["run_dir"])), tmp_path / "step")


def _weight_offset(path) -> int:  # type: ignore[no-untyped-def]
    """Where the first float32 model weight starts in a safetensors file."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    name = next(k for k, v in sorted(header.items()) if k.startswith("model.") and v["dtype"] == "F32")
    return 8 + size + header[name]["data_offsets"][0]


def _refused_everywhere(run, directory, reason, capsys):  # type: ignore[no-untyped-def]
    with pytest.raises(CorruptCheckpointError, match=reason):
        checkpoint.restore(Trainer(RunConfig(**run)), directory)
    assert main(["eval", "--checkpoint", str(directory), "--data", *run["data"]["train"]]) == 2
    assert main(["export", "--checkpoint", str(directory), "--out", str(directory.parent / "bundle")]) == 2
    err = capsys.readouterr().err
    assert len(re.findall(reason, err)) == 2 and "Traceback" not in err
    assert not (directory.parent / "bundle").exists()


def test_a_checkpoint_records_its_dense_fingerprint_and_round_trips(run, saved, capsys):
    meta = json.loads((saved / "trainer.json").read_text())
    dense = saved / "dense.safetensors"
    assert meta["files"]["dense.safetensors"]["bytes"] == dense.stat().st_size
    assert len(meta["files"]["dense.safetensors"]["sha256"]) == 64 and len(meta["content_sha256"]) == 64
    trainer = Trainer(RunConfig(**run))
    assert checkpoint.restore(trainer, saved) == meta["position"]
    for name, tensor in checkpoint.load_dense(saved).items():
        if name.startswith("model."):
            assert torch.equal(trainer.model.state_dict()[name[len("model."):]], tensor), name
    assert main(["eval", "--checkpoint", str(saved), "--data", *run["data"]["train"]]) == 0
    assert main(["export", "--checkpoint", str(saved), "--out", str(saved.parent / "bundle")]) == 0
    assert load_bundle(saved.parent / "bundle").manifest["source_checkpoint"] == "step"
    assert "click: AUC 0." in capsys.readouterr().out


def test_a_checkpoint_being_read_outlives_the_save_that_supersedes_it_and_goes_with_its_reader(run, tmp_path):
    config = RunConfig(**{**run, "training": {**run["training"], "run_dir": str(tmp_path / "run")}})
    run_dir = Path(shutil.copytree(run["training"]["run_dir"], tmp_path / "run"))
    trainer = Trainer(config)
    position = checkpoint.restore(trainer, checkpoint.latest(run_dir))
    with checkpoint.reading(run_dir) as held, checkpoint.reading(held) as again:  # two readers
        second = checkpoint.save(trainer, {**position, "step": position["step"] + 1})
        assert checkpoint.latest(run_dir) == second and held == again != second
        assert checkpoint.restore(Trainer(config), held) == position  # superseded, still whole
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [checkpoint.LATEST, second.name]
    with checkpoint.reading(second):  # the latest stays
        pass
    assert checkpoint.latest(run_dir) == second


def test_a_reader_waiting_while_a_save_removes_its_checkpoint_takes_the_new_latest(run, tmp_path):
    run_dir = Path(shutil.copytree(run["training"]["run_dir"], tmp_path / "run"))
    old = checkpoint.latest(run_dir)
    removing = os.open(old / "trainer.json", os.O_RDONLY)
    fcntl.flock(removing, fcntl.LOCK_EX)  # as a save removing it holds it
    got = []

    def read() -> None:
        with checkpoint.reading(run_dir) as directory:
            got.append(directory)

    reader = threading.Thread(target=read)
    reader.start()
    time.sleep(0.3)  # the reader opened the old checkpoint and waits for it
    new = Path(shutil.copytree(old, old.parent / "step-99999999-epoch-9"))
    write_json_atomic(old.parent / checkpoint.LATEST, {"checkpoint": new.name})
    shutil.rmtree(old)
    os.close(removing)
    reader.join(timeout=30)
    assert got == [new]


def test_a_save_waits_for_the_reader_of_a_folder_a_dead_save_left_under_its_name(run, tmp_path):
    """A save that died after renaming its folder into place, before LATEST named it,
    leaves a whole checkpoint that a reader may name; the save of that step again
    replaces it once the reader is done, not under it, and the reader's leaving does
    not remove the new one."""
    run_dir = Path(shutil.copytree(run["training"]["run_dir"], tmp_path / "run"))
    trainer = Trainer(RunConfig(**{**run, "training": {**run["training"], "run_dir": str(run_dir)}}))
    position = checkpoint.restore(trainer, checkpoint.latest(run_dir))
    later = {**position, "step": position["step"] + 1}
    name = f"step-{later['step']:08d}-epoch-{later['epoch']}"
    left = Path(shutil.copytree(checkpoint.latest(run_dir), run_dir / "checkpoints" / name))
    holding, release, read, saved = threading.Event(), threading.Event(), [], []

    def reader() -> None:
        with checkpoint.reading(left) as directory:
            holding.set()
            release.wait(timeout=30)
            read.append(checkpoint.restore(Trainer(trainer.config), directory, check_data=False))

    threads = [threading.Thread(target=reader), threading.Thread(target=lambda: saved.append(checkpoint.save(
        trainer, later)))]
    threads[0].start()
    assert holding.wait(timeout=30)
    threads[1].start()
    threads[1].join(timeout=0.5)
    assert threads[1].is_alive()  # the save waits for the reader
    release.set()
    for thread in threads:
        thread.join(timeout=30)
    assert read == [position] and saved == [left] and checkpoint.latest(run_dir) == left
    assert checkpoint.read_meta(left)["position"] == later  # the new one, still there


def test_a_checkpoint_directory_removed_as_it_is_opened_is_refused_saying_so(run, tmp_path, monkeypatch):
    saved = Path(shutil.copytree(checkpoint.latest(Path(run["training"]["run_dir"])), tmp_path / "step"))
    monkeypatch.setattr(checkpoint, "find", lambda path: path / "gone")
    with pytest.raises(CheckpointError, match=r"step: a newer checkpoint of its run superseded it and the run removed "
                                              r"it while it was being opened; name the run directory"):
        with checkpoint.reading(saved):
            pass


def test_reading_a_run_whose_latest_went_meanwhile_takes_the_new_latest(run, monkeypatch):
    run_dir, find, calls = Path(run["training"]["run_dir"]), checkpoint.find, []

    def superseded_once(path):  # type: ignore[no-untyped-def]
        calls.append(path)
        return path / "checkpoints" / "step-00000001-epoch-0" if len(calls) == 1 else find(path)

    monkeypatch.setattr(checkpoint, "find", superseded_once)
    with checkpoint.reading(run_dir) as directory:
        assert directory == find(run_dir) and len(calls) == 2
    monkeypatch.setattr(checkpoint, "find", lambda path: path / "gone")
    with pytest.raises(CheckpointError, match=r"superseded and removed 20 times while it was being opened; try again"):
        with checkpoint.reading(run_dir):
            pass


def test_four_altered_bytes_of_a_weight_are_refused_naming_the_file(run, saved, capsys):
    dense = saved / "dense.safetensors"
    data = bytearray(dense.read_bytes())
    at = _weight_offset(dense)
    data[at:at + 4] = struct.pack("<f", 1234.5)
    dense.write_bytes(bytes(data))
    _refused_everywhere(run, saved, r"dense.safetensors: content does not match its sha256 in trainer.json", capsys)


@pytest.mark.parametrize("change", [lambda data: data[:-8], lambda data: data + b"\0" * 8])
def test_a_truncated_or_grown_dense_file_is_refused_naming_it(run, saved, capsys, change):
    dense = saved / "dense.safetensors"
    dense.write_bytes(change(dense.read_bytes()))
    _refused_everywhere(run, saved, r"dense.safetensors: expected \d+ bytes, found \d+ \(truncated or overwritten\)",
                        capsys)


def test_an_altered_trainer_json_is_refused_naming_it(run, saved, capsys):
    meta = saved / "trainer.json"
    text = meta.read_text()
    assert '"lr": 0.003' in text
    meta.write_text(text.replace('"lr": 0.003', '"lr": 0.009', 1))  # still valid JSON
    _refused_everywhere(run, saved, r"trainer.json: altered or damaged: its content's sha256", capsys)
    unsealed = json.loads(text)
    del unsealed["content_sha256"]
    meta.write_text(json.dumps(unsealed))
    _refused_everywhere(run, saved, r"trainer.json: lacks content_sha256", capsys)


def test_a_checkpoint_written_before_the_hashes_still_loads(run, saved, capsys):
    meta = json.loads((saved / "trainer.json").read_text())
    older = {k: v for k, v in meta.items() if k not in ("files", "content_sha256")}
    (saved / "trainer.json").write_text(json.dumps(older, indent=1))
    assert checkpoint.restore(Trainer(RunConfig(**run)), saved) == meta["position"]
    assert main(["eval", "--checkpoint", str(saved), "--data", *run["data"]["train"]]) == 0
    assert main(["export", "--checkpoint", str(saved), "--out", str(saved.parent / "bundle")]) == 0
    assert "click: AUC 0." in capsys.readouterr().out


@pytest.fixture(scope="module")
def other_tables(run, tmp_path_factory):
    """The tables folder of another run's checkpoint: the same table, trained with SGD."""
    config = {**run, "tables": [{**run["tables"][0], "optimizer": {"kind": "sgd", "lr": 0.5}}],
              "training": {**run["training"], "run_dir": str(tmp_path_factory.mktemp("other") / "run"),
                           "checkpoint_every": 5}}
    Trainer(RunConfig(**config)).fit(max_steps=5)
    return checkpoint.latest(Path(config["training"]["run_dir"])) / "tables"


def test_tables_of_another_save_are_refused(run, saved, other_tables, capsys):
    """trainer.json once fingerprinted dense.safetensors alone: another run's tables
    folder in their place restored silently, its optimizer state read as this run's."""
    shutil.rmtree(saved / "tables")
    shutil.copytree(other_tables, saved / "tables")
    reason = (r"tables/000001-full/manifest.json: not the file saved with this checkpoint \(\d+ bytes, sha256 \w{12}"
              r"\.\.\.; trainer.json records \d+ bytes, \w{12}\.\.\.\): these tables belong to another save")
    with pytest.raises(CorruptCheckpointError, match=reason):
        checkpoint.restore(Trainer(RunConfig(**run)), saved)
    assert main(["eval", "--checkpoint", str(saved), "--data", *run["data"]["train"]]) == 2
    assert re.search(reason, capsys.readouterr().err)
    assert main(["export", "--checkpoint", str(saved), "--out", str(saved.parent / "bundle")]) == 2
    assert re.search(reason, capsys.readouterr().err)


def test_tables_whose_config_is_not_the_runs_are_refused_naming_the_table(run, saved, other_tables):
    """Where trainer.json predates the tables' fingerprints, their configs still tell."""
    shutil.rmtree(saved / "tables")
    shutil.copytree(other_tables, saved / "tables")
    meta = json.loads((saved / "trainer.json").read_text())
    meta["files"] = {"dense.safetensors": meta["files"]["dense.safetensors"]}
    (saved / "trainer.json").write_text(json.dumps(sealed(meta)))
    with pytest.raises(CheckpointError, match=r"tables: table 'ids' was saved with another config \(optimizer: "
                                              r"\{'kind': 'sgd', 'lr': 0.5\} there, \{'kind': 'adagrad', .*\} in the run "
                                              r"config\); these tables belong to another run"):
        checkpoint.restore(Trainer(RunConfig(**run)), saved)


def test_a_checkpoint_lists_the_fingerprints_of_its_tables_json_files(saved):
    files = json.loads((saved / "trainer.json").read_text())["files"]
    assert sorted(files) == ["dense.safetensors", "tables/000001-full/manifest.json", "tables/CHAIN.json"]
    assert files["tables/CHAIN.json"]["bytes"] == (saved / "tables" / "CHAIN.json").stat().st_size


def _trainer_in(run, run_dir) -> Trainer:  # type: ignore[no-untyped-def]
    return Trainer(RunConfig(**{**run, "training": {**run["training"], "run_dir": str(run_dir)}}))


def test_a_failed_save_removes_its_staging_and_keeps_the_previous_checkpoint(run, tmp_path, monkeypatch):
    trainer = _trainer_in(run, tmp_path / "run")
    first = checkpoint.save(trainer, {"step": 3, "epoch": 0, "batch": 3})

    def disk_full(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        checkpoint.save(trainer, {"step": 4, "epoch": 0, "batch": 4})
    assert sorted(p.name for p in first.parent.iterdir()) == ["LATEST", first.name]
    assert checkpoint.latest(tmp_path / "run") == first


def test_a_save_removes_staging_of_ended_processes_not_of_running_ones(run, tmp_path):
    """Staging is named after its process: a save once removed every other save's,
    a running one's too (a second run into the same folder: a bare FileNotFoundError)."""
    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    staging = {owner: root / f".tmp-step-00000003-epoch-0{suffix}" for owner, suffix in [
        ("this process", f"-{os.getpid()}"), ("ended", f"-{int(ended.stdout)}"), ("running", f"-{os.getppid()}"),
        ("an older Tidal", "")]}
    for folder in staging.values():
        folder.mkdir()
    saved = checkpoint.save(_trainer_in(run, tmp_path / "run"), {"step": 4, "epoch": 0, "batch": 4})
    assert saved.name == "step-00000004-epoch-0"
    assert sorted(p.name for p in root.iterdir()) == sorted(["LATEST", saved.name, staging["running"].name])


def test_the_end_of_a_run_whose_last_step_was_just_saved_links_that_checkpoints_tables(run, tmp_path, monkeypatch):
    written = []
    save_tables = checkpoint.save_tables

    def counted(root, tables):  # type: ignore[no-untyped-def]
        written.append(Path(root).parent.name)
        return save_tables(root, tables)

    monkeypatch.setattr(checkpoint, "save_tables", counted)
    config = {**run, "training": {**run["training"], "run_dir": str(tmp_path / "run"), "checkpoint_every": 8}}
    trainer = Trainer(RunConfig(**config))
    assert trainer.fit()["steps"] == 24  # 12,000 rows in batches of 512
    assert written == [f".tmp-step-{step:08d}-epoch-0-{os.getpid()}" for step in (8, 16, 24)]  # the end's, at
    # step 24 too, linked the tables of step 24's
    final = checkpoint.latest(tmp_path / "run")
    assert final.name == "step-00000024-epoch-1" and sorted(p.name for p in final.parent.iterdir()) == \
        ["LATEST", final.name]
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "bundle")]) == 0  # checked
    keys, values = load_bundle(tmp_path / "bundle").tables["ids"]
    table = trainer.collection.table("ids")
    np.testing.assert_array_equal(table.lookup(keys), values)  # the tables as the run ended
    resumed = Trainer(RunConfig(**{**config, "training": {**config["training"], "epochs": 2}}))
    assert resumed.fit(resume=True)["steps"] == 48  # a longer run goes on from the linked checkpoint
