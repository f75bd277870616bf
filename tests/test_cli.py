"""The command line: `tidal demo` runs the whole path; arguments are checked."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tidal.cli import main
from tidal.compile import onnx_available
from tidal.serving.server import is_model_name


def test_demo_trains_and_reports_auc_beside_the_ceiling(capsys):
    assert main(["demo", "--rows", "6000"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    assert 0.5 < result["eval_auc"] < result["ceiling_auc"] <= 1.0
    assert "planted ceiling" in out and "bad rows        0" in out
    assert re.search(r"  eval GAUC       (0\.\d+|n/a)   by user \(C1\), over [\d,]+ users", out)
    assert out.index("Compiling Tidal's kernels") < out.index("  ready in") < out.index("Training DLRM")
    assert "eval at step 2:" not in out  # the two warm-up steps train quietly
    assert "sparse  lookup" in out and "dense   dense" in out  # the engine's stage table
    assert result["served_candidates"] == 100 and "session 7: start + 50" in out
    backend = "onnxruntime" if onnx_available() else "torch"  # the onnx extra, when installed
    assert f"over KServe v2 HTTP on 127.0.0.1, its dense network on {backend}" in out
    assert "a malformed request         400: input 'I5': values must be finite and within float32's range" in out
    assert re.search(r"  next day                    1 step on from the first run's step 3, eval AUC 0\.\d+\n", out)
    assert "  online update               delta 000001: " in out and " rows changed, applied in " in out
    assert out.count("1 user x 100 candidates") == 2  # again, after the update


def test_version_and_values_that_are_no_numbers(capsys):
    import tidal

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out == f"tidal {tidal.__version__}\n"
    for flag, expected in (("--port", "a port is a whole number 0-65535, got 'abc'"),
                           ("--exit-timeout-s", "seconds are a number 0-3600, got 'abc'")):
        with pytest.raises(SystemExit) as exited:
            main(["serve", "bundle", flag, "abc"])
        assert exited.value.code == 2 and f"argument {flag}: {expected}" in capsys.readouterr().err


@pytest.mark.parametrize("command, says", [(["bench", "sparse"], "A full sparse training step against torch EmbeddingBag."),
                                           (["bench", "serve"], "against unbatched and Ray Serve."),
                                           (["train"], "Train a model from a YAML run config.")])
def test_each_command_s_help_says_what_it_does_and_against_which_peer(command, says, capsys):
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0 and says in " ".join(capsys.readouterr().out.split())


def test_demo_refuses_too_few_rows(capsys):
    assert main(["demo", "--rows", "10"]) == 2
    assert "--rows must be at least 1,000, got 10" in capsys.readouterr().err


@pytest.mark.parametrize("argv, usage, unknown", [
    (["bench", "sparse", "--rows", "5"], "usage: tidal bench sparse [-h] [--quick]", "--rows 5"),
    (["train", "--config", "run.yaml", "--bogus"], "usage: tidal train [-h] --config CONFIG", "--bogus"),
])
def test_an_unknown_argument_is_refused_with_the_usage_of_the_command_typed(capsys, argv, usage, unknown):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith(usage)
    assert f"error: unrecognized arguments: {unknown}" in err


def test_train_and_export_report_a_full_disk_without_a_traceback(tmp_path, capsys, monkeypatch):
    import errno
    import shutil

    import yaml
    from runtime.test_trainer import _config

    import tidal.runtime.checkpoint
    import tidal.serving.bundle

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "checkpoints"))

    config = _config(tmp_path, checkpoint_every=5)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    save = tidal.runtime.checkpoint.save
    monkeypatch.setattr(tidal.runtime.checkpoint, "save", disk_full)
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "tidal train: a file could not be written or read: No space left on device" in err
    assert "no checkpoint was written" in err  # the first save failed
    calls = []

    def second_save_fails(*args, **kwargs):
        calls.append(1)
        return save(*args, **kwargs) if len(calls) == 1 else disk_full()

    monkeypatch.setattr(tidal.runtime.checkpoint, "save", second_save_fails)
    assert main(["train", "--config", str(path)]) == 2
    assert f"the last checkpoint written is intact: `tidal train --config {path} --resume` continues from it" in \
        capsys.readouterr().err
    monkeypatch.undo()
    shutil.rmtree(config["training"]["run_dir"])
    assert main(["train", "--config", str(path)]) == 0
    def disk_full_unnamed(*args, **kwargs):  # as safetensors reports it: no file named
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tidal.serving.bundle, "write_json_atomic", disk_full_unnamed)
    assert main(["export", "--checkpoint", config["training"]["run_dir"], "--out", str(tmp_path / "bundle")]) == 2
    err = capsys.readouterr().err
    assert (f"tidal export: a file could not be written or read: No space left on device (writing under "
            f"{tmp_path / 'bundle'})") in err and "nothing was left at --out" in err and not (tmp_path / "bundle").exists()


def test_a_reader_of_the_output_that_leaves_stops_the_printing_not_the_command(tmp_path):
    """`tidal gen-data | true`: the closed pipe failed the command with a traceback (and
    stopped a training run part way); the work now goes on, printing nothing more."""
    command = [sys.executable, "-m", "tidal.cli", "gen-data", "--out", str(tmp_path / "data"), "--rows", "1000"]
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # the line stays buffered to the end
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment)
    process.stdout.close()  # the reader leaves before the first line
    assert process.wait(timeout=120) == 0 and process.stderr.read() == b""
    assert (tmp_path / "data" / "part-00000.tsv").stat().st_size > 0
    closed = subprocess.run([*command[:5], str(tmp_path / "more"), *command[6:]], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=environment, pass_fds=(), close_fds=True,
                            preexec_fn=lambda: os.close(1))  # started with no standard output at all
    assert closed.returncode == 0 and closed.stderr == b""


def test_demo_and_bench_dense_say_what_to_install_without_the_onnx_extra(monkeypatch, capsys):
    from tidal import demo
    from tidal.bench import dense

    from tidal.errors import CheckpointError

    backends = []

    def export(run_dir, out, *, backend):  # type: ignore[no-untyped-def]
        backends.append(backend)
        if backend == "onnxruntime":
            raise CheckpointError("the ONNX model of the dense network differs from its torch program at batch 1")
        return out

    monkeypatch.setattr(demo, "export", export)
    monkeypatch.setattr(demo, "onnx_available", lambda: True)
    demo._export(Path("run"), Path("bundle"))  # the conversion refused: torch instead
    assert backends == ["onnxruntime", "torch"]
    assert "differs from its torch program at batch 1: exporting for the torch backend instead" in \
        capsys.readouterr().out
    monkeypatch.setattr(demo, "onnx_available", lambda: False)
    demo._export(Path("run"), Path("bundle"))
    assert backends[2:] == ["torch"]
    assert "for the torch backend (the onnxruntime backend needs the onnx extra: pip install 'tidal[onnx]')" in \
        capsys.readouterr().out
    monkeypatch.setattr(dense, "onnx_available", lambda: False)
    assert main(["bench", "dense", "--quick"]) == 2
    assert "tidal bench dense: the onnxruntime backend needs the onnx extra" in capsys.readouterr().err


def _interrupt(*args, **kwargs):  # type: ignore[no-untyped-def]
    raise KeyboardInterrupt


@pytest.mark.parametrize(("argv", "module", "function", "message"), [
    (["export", "--checkpoint", "run", "--out", "BUNDLE"], "tidal.serving", "export",
     "tidal export: interrupted; nothing is at BUNDLE, or the new one if the interrupt came as it was renamed into "
     "place"),
    (["export", "--delta", "--checkpoint", "run", "--out", "BUNDLE"], "tidal.serving", "export_delta",
     "tidal export: interrupted; the bundle at BUNDLE is whole: as it was, or with the new delta if the interrupt came "
     "as it was renamed into place"),
    (["eval", "--checkpoint", "run", "--data", "d.tsv"], "tidal.runtime.workers", "dense_device",
     "tidal eval: interrupted; nothing was written (eval writes no file)"),
    (["train", "--config", "run.yaml"], "tidal.config", "RunConfig.from_yaml",
     "tidal train: interrupted; no checkpoint was written: run the same command again"),
    (["train", "--config", "run.yaml"], "tidal.cli", "_train", "tidal train: interrupted; stopped before it finished"),
    (["bench", "sparse", "--quick"], "tidal.bench.sparse", "run",
     "tidal bench sparse: interrupted; stopped before it finished"),
])
def test_ctrl_c_says_in_one_line_what_it_left_and_exits_130(tmp_path, monkeypatch, capsys, argv, module, function,
                                                             message):
    owner, _, name = function.rpartition(".")
    monkeypatch.setattr(getattr(importlib.import_module(module), owner) if owner else importlib.import_module(module),
                        name, _interrupt)
    bundle = str(tmp_path / "bundle")
    assert main([bundle if a == "BUNDLE" else a for a in argv]) == 130
    err = capsys.readouterr().err
    assert err.startswith(message.replace("BUNDLE", bundle)) and err.count("\n") == 1


@pytest.mark.parametrize("name", ["my model/v2", "a/b", "..", "modèle", "a?b", ""])
def test_serve_refuses_a_model_name_that_cannot_be_a_url_path_segment(tmp_path, capsys, name):
    assert main(["serve", str(tmp_path), "--model-name", name]) == 2
    assert capsys.readouterr().err == f"tidal serve: --model-name must be made of letters, digits, '.', '_' and '-' " \
                                      f"(not '.' or '..' alone), as it is a segment of the URLs' path " \
                                      f"(/v2/models/NAME); got {name!r}\n"


def test_serve_refuses_a_bundle_folder_name_that_cannot_be_a_url_path_segment(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "ctr model")]) == 2
    assert capsys.readouterr().err.endswith("got 'ctr model' (the bundle folder's name; give another with "
                                            "--model-name)\n")


@pytest.mark.parametrize("name", ["dlrm", "ctr-v2.1_b", "A.B", "..."])
def test_a_model_name_of_letters_digits_dots_underscores_and_dashes_is_a_url_path_segment(name):
    assert is_model_name(name)


def test_the_resume_command_a_train_names_repeats_its_set_overrides_quoted_for_a_shell():
    from tidal.cli import _resume

    args = argparse.Namespace(config="run.yaml", settings=["training.lr=0.01", "features.0.columns=[C1, C2]"],
                              init_from=None)
    assert _resume(args) == "`tidal train --config run.yaml --set training.lr=0.01 --set 'features.0.columns=[C1, " \
                            "C2]' --resume`"
