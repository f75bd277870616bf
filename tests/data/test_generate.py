"""`generate` / `tidal gen-data`: reproducible files with a known best AUC; exact AUC."""

from __future__ import annotations

import fcntl
import importlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidal.cli import main
from tidal.data import auc, generate
from tidal.errors import ConfigError, DataError

generate_module = importlib.import_module("tidal.data.generate")  # the package exports the function under its name


def _brute_auc(labels, scores):
    pos, neg = scores[labels == 1], scores[labels == 0]
    return float(((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg)))


@settings(max_examples=60, deadline=None)
@given(scores=st.lists(st.integers(0, 5), min_size=2, max_size=40), seed=st.integers(0, 100))
def test_auc_matches_pairwise_count_with_ties(scores, seed):
    labels = np.random.default_rng(seed).integers(0, 2, len(scores))
    labels[0], labels[1] = 0, 1
    assert auc(labels, np.array(scores, float)) == pytest.approx(_brute_auc(labels, np.array(scores, float)))


def test_auc_refuses_labels_and_scores_that_do_not_pair_up():
    with pytest.raises(DataError, match=r"^AUC needs one label per score, in two flat arrays; got labels of shape "
                                        r"\(3,\) and scores of shape \(2,\)$"):
        auc(np.array([0, 1, 1]), np.array([0.2, 0.4]))


def test_same_seed_writes_the_same_files_and_truth(tmp_path):
    a = generate(tmp_path / "a", rows=1_000, files=3, seed=9)
    b = generate(tmp_path / "b", rows=1_000, files=3, seed=9)
    assert [open(p).read() for p in a.paths] == [open(p).read() for p in b.paths]
    assert sum(len(open(p).readlines()) for p in a.paths) == 1_000
    truth = json.loads((tmp_path / "a" / "truth.json").read_text())
    assert truth["ceiling_auc"] == a.ceiling_auc and 0.7 < a.ceiling_auc < 1.0
    assert 0.05 < a.positive_rate < 0.6


def test_cli_writes_data_and_refuses_bad_arguments(tmp_path, capsys):
    assert main(["gen-data", "--out", str(tmp_path), "--rows", "200", "--format", "parquet"]) == 0
    assert "wrote 200 rows in 1 file to" in capsys.readouterr().out
    assert (tmp_path / "part-00000.parquet").exists()
    assert main(["gen-data", "--out", str(tmp_path), "--rows", "10", "--files", "20"]) == 2
    assert "--files must be between 1 and --rows (10), got 20" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="zipf_a must be > 1"):
        generate(tmp_path, rows=5, zipf_a=1.0)
    for arg, value in [("zipf_a", float("inf")), ("zipf_a", "2"), ("bias", float("nan")), ("sparse_scale", None)]:
        with pytest.raises(ConfigError, match=rf"^gen-data: {arg} must be a finite number"):  # an audit's find: NaN
            generate(tmp_path / "y", rows=5, **{arg: value})                                  # wrote all negatives
    assert not (tmp_path / "y").exists()
    with pytest.raises(ConfigError, match=r"^gen-data: out_dir must be a folder's path \(a str or a Path\), got NoneType"):
        generate(None, rows=5)
    for flag, value in [("--seed", "-1"), ("--split", "-1"), ("--seed", str(2**70))]:
        assert main(["gen-data", "--out", str(tmp_path / "x"), "--rows", "10", flag, value]) == 2
        assert f"gen-data: {flag} must be between 0 and 2**32 - 1, got {value}" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("x")
    assert main(["gen-data", "--out", str(tmp_path / "a-file"), "--rows", "10"]) == 2
    assert "a-file is a file" in capsys.readouterr().err


def test_a_second_run_replaces_the_first_runs_files_and_one_class_has_no_ceiling(tmp_path):
    generate(tmp_path, rows=40, files=4)
    (tmp_path / "notes.txt").write_text("mine")
    data = generate(tmp_path, rows=40, files=2, file_format="parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "part-00000.parquet", "part-00001.parquet",
                                                          "truth.json"]
    assert data.replaced == ["part-00000.tsv", "part-00001.tsv", "part-00002.tsv", "part-00003.tsv", "truth.json"]
    assert "replaced" not in json.loads((tmp_path / "truth.json").read_text())
    assert json.loads((tmp_path / "truth.json").read_text())["paths"] == [Path(p).name for p in data.paths]
    one_row = generate(tmp_path / "one", rows=1)
    assert one_row.ceiling_auc is None


def test_cli_passes_seed_and_split_on(tmp_path):
    written = []
    for seed, split in ((3, 0), (4, 0), (3, 1)):
        out = tmp_path / f"cli-{seed}-{split}"
        assert main(["gen-data", "--out", str(out), "--rows", "300", "--seed", str(seed), "--split", str(split)]) == 0
        same = generate(tmp_path / f"api-{seed}-{split}", rows=300, seed=seed, split=split)
        written.append((out / "part-00000.tsv").read_text())
        assert written[-1] == open(same.paths[0]).read()
    assert len(set(written)) == 3


def test_splits_share_the_truth_but_not_the_rows(tmp_path):
    train = generate(tmp_path / "train", rows=500, seed=5)
    held_out = generate(tmp_path / "eval", rows=500, seed=5, split=1)
    assert open(train.paths[0]).read() != open(held_out.paths[0]).read()
    assert abs(train.ceiling_auc - held_out.ceiling_auc) < 0.05


def test_out_folder_that_cannot_be_created_is_a_config_error(tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match=r"--out .*a-file/sub: cannot create the folder \(Not a directory\)"):
        generate(tmp_path / "a-file" / "sub", rows=10)
    assert main(["gen-data", "--out", str(tmp_path / "a-file" / "sub"), "--rows", "10"]) == 2
    assert "cannot create the folder (Not a directory)" in capsys.readouterr().err
    assert main(["gen-data", "--out", "", "--rows", "10"]) == 2
    assert "--out is empty; expected a folder to write the data to" in capsys.readouterr().err


def test_a_file_that_cannot_be_written_is_reported_without_a_traceback(tmp_path, capsys, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "part-00000.tsv"))

    monkeypatch.setattr(importlib.import_module("tidal.data.generate"), "generate", full_disk)  # the module, not the function
    assert main(["gen-data", "--out", str(tmp_path), "--rows", "10"]) == 2
    assert f"cannot write to --out {tmp_path}: No space left on device ({tmp_path / 'part-00000.tsv'})" in \
        capsys.readouterr().err


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"rows": 10.5}, "rows must be an integer, got 10.5"),
    ({"rows": "10"}, "rows must be an integer, got '10'"),
    ({"rows": 10, "files": 2.0}, "files must be an integer, got 2.0"),
    ({"rows": 10, "seed": True}, "seed must be an integer, got True"),
])
def test_counts_that_are_not_integers_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        generate(tmp_path, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_cli_messages_name_the_flags_and_count_in_the_singular(tmp_path, capsys):
    for args, message in [(["--rows", "0"], "tidal gen-data: --rows must be >= 1, got 0"),
                          (["--rows", "5", "--files", "0"], "tidal gen-data: --files must be between 1 and --rows (5), got 0")]:
        assert main(["gen-data", "--out", str(tmp_path / "x"), *args]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before anything is written
    with pytest.raises(ConfigError, match="gen-data: rows must be >= 1, got 0"):  # the API names its arguments
        generate(tmp_path / "y", rows=0)
    assert main(["gen-data", "--out", str(tmp_path / "one"), "--rows", "1"]) == 0
    assert f"wrote 1 row in 1 file to {tmp_path / 'one'}:" in capsys.readouterr().out
    assert main(["gen-data", "--out", str(tmp_path / "two"), "--rows", "1500", "--files", "2"]) == 0
    assert f"wrote 1,500 rows in 2 files to {tmp_path / 'two'}:" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["gen-data", "--help"])
    assert re.search(r"--files FILES\s+how many files", capsys.readouterr().out)


def _contents(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_cli_says_which_earlier_files_it_replaced(tmp_path, capsys):
    assert main(["gen-data", "--out", str(tmp_path), "--rows", "30", "--files", "2"]) == 0
    assert "replaced" not in capsys.readouterr().out  # nothing was there
    assert main(["gen-data", "--out", str(tmp_path), "--rows", "30"]) == 0
    assert f"  replaced 3 earlier files in {tmp_path} (part-00000.tsv, part-00001.tsv, truth.json)" in \
        capsys.readouterr().out.splitlines()
    assert sorted(_contents(tmp_path)) == ["part-00000.tsv", "truth.json"]


@pytest.mark.parametrize("failure", [KeyboardInterrupt, OSError])
def test_an_interrupted_or_failed_run_leaves_the_folder_as_it_was(tmp_path, monkeypatch, capsys, failure):
    generate(tmp_path, rows=40, files=2, seed=5)
    before = _contents(tmp_path)
    write = generate_module._write_file

    def stops_in_the_second_file(path, *args):  # type: ignore[no-untyped-def]
        if path.name.startswith(".part-00001"):
            path.write_text("1\t2\n")  # a few complete lines, as a run stopped part way leaves
            raise failure()
        return write(path, *args)

    monkeypatch.setattr(generate_module, "_write_file", stops_in_the_second_file)
    code = main(["gen-data", "--out", str(tmp_path), "--rows", "30", "--files", "3"])
    err = capsys.readouterr().err
    if failure is KeyboardInterrupt:
        assert code == 130
        assert err == f"tidal gen-data: interrupted; the files being written were removed: {tmp_path} holds what it " \
                      f"held before\n"
    else:
        assert code == 2 and err.startswith(f"tidal gen-data: cannot write to --out {tmp_path}")
    assert _contents(tmp_path) == before  # no new file, no temporary one, the earlier ones as they were
    new = tmp_path / "new" / "day"
    assert main(["gen-data", "--out", str(new), "--rows", "30", "--files", "3"]) == (130 if failure is
                                                                                      KeyboardInterrupt else 2)
    assert not (tmp_path / "new").exists()  # the folders it made are gone, those that were there before are not
    assert _contents(tmp_path) == before


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_as_the_files_are_renamed_takes_effect_once_they_all_are(sig, tmp_path, monkeypatch, capsys,
                                                                        ctrl_c_raises):
    """A SIGTERM there (a scheduler's stop) removed truth.json and left old and new files."""
    generate(tmp_path, rows=40, files=2, seed=5)
    replace, sigterm_handler = generate_module.os.replace, signal.getsignal(signal.SIGTERM)

    def interrupted_between(*args):  # type: ignore[no-untyped-def]
        replace(*args)
        signal.raise_signal(sig)

    monkeypatch.setattr(generate_module.os, "replace", interrupted_between)
    assert main(["gen-data", "--out", str(tmp_path), "--rows", "30", "--seed", "6"]) == 130
    assert capsys.readouterr().err == f"tidal gen-data: interrupted; {tmp_path} holds the whole new data set, which " \
                                      f"was being put in place\n"
    assert sorted(_contents(tmp_path)) == ["part-00000.tsv", "truth.json"]
    assert len((tmp_path / "part-00000.tsv").read_text().splitlines()) == 30
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C works as before again
    assert signal.getsignal(signal.SIGTERM) is sigterm_handler


def test_a_rename_that_fails_leaves_no_truth_json_and_its_error_is_not_hidden_by_ctrl_c(tmp_path, monkeypatch,
                                                                                          ctrl_c_raises):
    generate(tmp_path, rows=40, files=2, seed=5)
    replace, calls = generate_module.os.replace, []

    def second_fails(*args):  # type: ignore[no-untyped-def]
        calls.append(args)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)  # and a Ctrl-C meanwhile
            raise PermissionError(13, "Permission denied")
        return replace(*args)

    monkeypatch.setattr(generate_module.os, "replace", second_fails)
    with pytest.raises(PermissionError):
        generate(tmp_path, rows=30, files=2, seed=6)
    assert "truth.json" not in _contents(tmp_path)  # not a whole data set, and it does not say it is


def test_a_run_killed_outright_leaves_temporary_files_the_next_run_removes(tmp_path):
    (tmp_path / ".part-00000.tsv.partial").write_text("1\t2\n")
    (tmp_path / ".truth.json.partial").write_text("{")
    (tmp_path / ".notes.partial").write_text("mine")
    generate(tmp_path, rows=10)
    assert sorted(_contents(tmp_path)) == [".notes.partial", "part-00000.tsv", "truth.json"]


def _ended_process_id() -> int:
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


def test_a_run_removes_the_temporary_files_of_ended_runs_only(tmp_path):
    live, ended = os.getppid(), _ended_process_id()
    still_writing = [f".part-00000.tsv.{live}-0a1b2c3d.partial", f".truth.json.{live}-0a1b2c3d.partial"]
    for name in [*still_writing, f".part-00000.tsv.{ended}-99ff.partial", f".truth.json.{ended}-99ff.partial"]:
        (tmp_path / name).write_text("1\t2\n")
    generate(tmp_path, rows=10)
    assert sorted(_contents(tmp_path)) == [*sorted(still_writing), "part-00000.tsv", "truth.json"]


def test_runs_into_one_folder_at_once_do_not_touch_each_others_temporary_files(tmp_path, monkeypatch):
    write, names = generate_module._write_file, []

    def another_run_meanwhile(path, *args):  # type: ignore[no-untyped-def]
        names.append(path.name)
        if path.name.startswith(".part-00001") and len(names) == 2:  # the first run, half way
            generate(tmp_path, rows=20, files=2, seed=7)  # the same process: its files are of a live one
        return write(path, *args)

    monkeypatch.setattr(generate_module, "_write_file", another_run_meanwhile)
    first = generate(tmp_path, rows=30, files=2, seed=5)
    assert all(re.fullmatch(rf"\.part-0000[01]\.tsv\.{os.getpid()}-[0-9a-f]{{8}}\.partial", name) for name in names)
    assert len({name.split(".")[3] for name in names}) == 2  # each run its own token
    assert sorted(_contents(tmp_path)) == ["part-00000.tsv", "part-00001.tsv", "truth.json"]
    assert json.loads((tmp_path / "truth.json").read_text())["paths"] == [Path(p).name for p in first.paths]
    assert sum(len(open(p).readlines()) for p in first.paths) == 30  # the first run's files, whole
    assert first.replaced == ["part-00000.tsv", "part-00001.tsv", "truth.json"]  # the second run's


def test_a_run_puts_its_files_in_place_while_no_other_run_into_the_folder_does(tmp_path):
    """Runs into one folder take turns at renaming, so it ends with one run's files."""
    out = tmp_path / "data"
    out.mkdir()
    other = os.open(out, os.O_RDONLY)
    fcntl.flock(other, fcntl.LOCK_EX)  # as another run putting its files in place holds it
    done = []
    run = threading.Thread(target=lambda: done.append(generate(out, rows=200, seed=1)))
    run.start()
    run.join(timeout=3.0)
    assert run.is_alive() and not (out / "truth.json").exists()  # written, waiting to be put in place
    os.close(other)
    run.join(timeout=30)
    assert done and (out / "truth.json").exists()
