"""`tidal export` and `tidal serve` from the command line, the server in its own process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from serving_helpers import file_rows, pieces, until

from tidal.cli import main
from tidal.runtime import checkpoint
from tidal.serving import Predictor


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(url: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read()
        try:
            with urllib.request.urlopen(url + "/v2/health/ready", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("the server did not become ready")


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_export_then_serve_then_stop_with_ctrl_c_or_sigterm(trainer, tmp_path, capsys, stop):
    bundle = tmp_path / "ranker"
    assert main(["export", "--checkpoint", str(trainer.run_dir), "--out", str(bundle), "--table-dtype", "float16"]) == 0
    out = capsys.readouterr().out
    assert f"serve it with: tidal serve {bundle}" in out and f"wrote the serving bundle {bundle} of step " in out
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "tidal.cli", "serve", str(bundle), "--port", str(port),
                                "--set", "fusion={kind: sum, weights: {ctr: 2.0}}"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, process)
        with urllib.request.urlopen(url + "/v2/models/ranker") as response:
            assert [o["name"] for o in json.loads(response.read())["outputs"]] == ["ctr", "cvr", "score"]
        with urllib.request.urlopen(url + "/v2/models/ranker/fusion") as response:  # as --set gave it
            assert json.loads(response.read()) == {"kind": "sum", "weights": {"ctr": 2.0}}
    finally:
        process.send_signal(stop)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    served = f"{checkpoint.latest_name(trainer.run_dir)} of run {trainer.run_id[:8]}"
    assert f"serving 'ranker' (checkpoint {served}) at {url}/v2/models/ranker (dense network on torch, rewritten by " \
           f"gather_slices;" in out and out.endswith("stopped serving 'ranker'\n")


def test_eval_writes_each_rows_probabilities_as_the_server_answers_them(trainer, bundle, tmp_path, capsys):
    """`tidal eval --predictions` gives, row by row, what a server of the same
    checkpoint answers: each row scored as a request of its own user."""
    out = tmp_path / "predictions.parquet"
    assert main(["eval", "--checkpoint", str(trainer.run_dir), "--data", *trainer.config.data.train,
                 "--predictions", str(out)]) == 0
    written = pq.read_table(out)
    assert written.column_names == ["ctr", "ctr_label", "cvr", "cvr_label"]
    assert f"predictions of the {written.num_rows:,d} rows evaluated written to {out}" in capsys.readouterr().out
    rows = file_rows(trainer, 40)
    predictor = Predictor(bundle, device="cpu")
    served = predictor.predict(pieces(predictor, rows, [1] * 40))
    np.testing.assert_allclose(np.stack([written["ctr"].to_numpy()[:40], written["cvr"].to_numpy()[:40]], 1), served,
                               rtol=1e-5, atol=1e-6)
    labels = np.array(rows.column("label").to_pylist(), dtype=np.float32)
    np.testing.assert_array_equal(written["ctr_label"].to_numpy()[:40], labels)
    assert not [p for p in tmp_path.iterdir() if p.name != out.name]  # no temporary file left


@pytest.mark.parametrize("name, reason", [
    ("predictions.csv", "expected a name ending in .parquet (they are written as Parquet)"),
    ("missing/predictions.parquet", "its folder does not exist; create it first"),
    ("folder.parquet", "is a folder; expected a .parquet file to write"),
])
def test_eval_refuses_a_predictions_file_it_cannot_write_before_it_evaluates(trainer, tmp_path, capsys, name, reason,
                                                                               monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder.parquet").mkdir()
    monkeypatch.setattr("tidal.runtime.checkpoint.reading", lambda *a: pytest.fail("the checkpoint was read"))
    assert main(["eval", "--checkpoint", str(trainer.run_dir), "--data", *trainer.config.data.train,
                 "--predictions", name]) == 2
    assert capsys.readouterr().err == f"tidal eval: predictions file {name}: {reason}\n"


def test_eval_refuses_a_predictions_file_that_is_one_it_evaluates(trainer, tmp_path, capsys):
    data = tmp_path / "eval.parquet"
    pq.write_table(pa.Table.from_batches([file_rows(trainer, 40)]), data)
    written = data.read_bytes()
    assert main(["eval", "--checkpoint", str(trainer.run_dir), "--data", str(data), "--predictions", str(data)]) == 2
    assert capsys.readouterr().err == (f"tidal eval: predictions file {data}: is one of the files evaluated; choose "
                                       f"another name\n")
    assert data.read_bytes() == written


def test_eval_writes_predictions_under_the_longest_name_the_system_takes(trainer, tmp_path):
    longest = tmp_path / ("p" * (os.pathconf(tmp_path, "PC_NAME_MAX") - len(".parquet")) + ".parquet")
    data = tmp_path / "eval.parquet"
    pq.write_table(pa.Table.from_batches([file_rows(trainer, 40)]), data)
    assert main(["eval", "--checkpoint", str(trainer.run_dir), "--data", str(data), "--predictions", str(longest)]) == 0
    assert pq.read_table(longest).num_rows == 40


def test_export_takes_the_longest_bundle_name_its_staging_names_leave_room_for(trainer, tmp_path, capsys):
    most = os.pathconf(tmp_path, "PC_NAME_MAX") - len(".tmp--4194304-0123abcd.lock")
    too_long = tmp_path / ("b" * (most + 1))
    assert main(["export", "--checkpoint", str(trainer.run_dir), "--out", str(too_long)]) == 2
    assert capsys.readouterr().err == (f"tidal export: {too_long}: its name has {most + 1} bytes; a bundle's name may "
                                       f"have at most {most} ({most + 27}, the system's most, less 27 for the names "
                                       f"an export writes beside it)\n")
    assert main(["export", "--checkpoint", str(trainer.run_dir), "--out", str(tmp_path / ("b" * most))]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b" * most]


def test_eval_says_when_its_predictions_cannot_be_written_after_all(trainer, tmp_path, capsys, monkeypatch):
    def full_disk(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pyarrow.parquet.write_table", full_disk)
    out = tmp_path / "predictions.parquet"
    assert main(["eval", "--checkpoint", str(trainer.run_dir), "--data", *trainer.config.data.train,
                 "--predictions", str(out)]) == 2
    assert capsys.readouterr().err == f"tidal eval: predictions file {out}: cannot write it (No space left on " \
                                      f"device); the evaluation itself was done\n"
    assert list(tmp_path.iterdir()) == []  # nothing half written


def test_export_and_serve_refuse_what_is_not_there(tmp_path, capsys):  # on any free port: 8000 may be taken
    assert main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "b")]) == 2
    assert "no checkpoint to export" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--port", "0"]) == 2
    assert "not a serving bundle" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "nope"), "--port", "0"]) == 2
    assert f"{tmp_path / 'nope'}: no such file or folder; give a bundle folder written by tidal export" in \
        capsys.readouterr().err
    (tmp_path / "checkpoints").mkdir()
    assert main(["serve", str(tmp_path), "--port", "0"]) == 2
    assert f"a training run's folder, not a serving bundle; write one from it with tidal export --checkpoint " \
           f"{tmp_path} --out BUNDLE" in capsys.readouterr().err


def test_a_bundle_given_where_a_run_is_expected_is_named_a_bundle(tmp_path, capsys):
    bundle = tmp_path / "bundle"  # what tidal export writes, as far as telling it apart goes
    (bundle / "tables").mkdir(parents=True)
    (bundle / "manifest.json").write_text("{}")
    expected = f"{bundle}: a serving bundle written by tidal export, not a training run; give the run directory it " \
               f"was exported from"
    assert main(["export", "--checkpoint", str(bundle), "--out", str(tmp_path / "b")]) == 2
    assert expected in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(bundle), "--data", str(bundle / "manifest.json")]) == 2
    assert expected in capsys.readouterr().err


def test_serve_refuses_a_port_in_use_before_loading_anything(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(tmp_path / "not-even-a-bundle"), "--port", str(port)]) == 2
    captured = capsys.readouterr()
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in captured.err and "serving" not in captured.out


def test_serve_refuses_a_port_another_server_holds_while_it_loads_its_bundle(tmp_path, capsys):
    from tidal.serving import listen

    with listen("127.0.0.1", 0) as first:  # another tidal serve, still loading its bundle
        port = first.getsockname()[1]
        assert main(["serve", str(tmp_path / "not-even-a-bundle"), "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in capsys.readouterr().err


def test_while_the_bundle_loads_live_answers_200_and_every_other_request_503(tmp_path):
    from urllib.error import HTTPError

    from tidal.serving import LoadingAnswers, listen

    bundle = tmp_path / "ranker"
    with listen("127.0.0.1", 0) as sock:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        loading = LoadingAnswers(sock, f"bundle {bundle}")
        silent = socket.create_connection(sock.getsockname(), timeout=10)  # sends nothing: holds up no one
        try:
            start = time.monotonic()
            assert urllib.request.urlopen(url + "/v2/health/live", timeout=10).status == 200
            assert time.monotonic() - start < 1.0
            for path, body in [("/v2/health/ready", None), ("/v2/models/ranker/infer", b'{"inputs": []}'),
                               ("/v2/models/ranker/infer", b"x" * (4 << 20))]:  # a body it does not read: no reset
                with pytest.raises(HTTPError) as refused:
                    urllib.request.urlopen(urllib.request.Request(url + path, data=body), timeout=10)
                assert refused.value.code == 503 and refused.value.headers["Retry-After"] == "1"
                assert json.loads(refused.value.read()) == {"error": f"not ready: loading bundle {bundle}"}
            assert silent.recv(100) == b""  # let go at its deadline
        finally:
            silent.close()
            loading.stop()
        with socket.create_connection(sock.getsockname(), timeout=0.5) as waiting:  # in the backlog, for the server
            waiting.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            with pytest.raises(TimeoutError):
                waiting.recv(100)


def test_while_the_bundle_loads_connections_past_those_answered_at_once_wait_their_turn(monkeypatch):
    import tidal.serving.server as server_module
    from tidal.serving import LoadingAnswers, listen

    monkeypatch.setattr(server_module, "_LOADING_ANSWERS_MOST", 2)
    answering = lambda: sum(t.name == "tidal-loading-answer" for t in threading.enumerate())  # noqa: E731
    with listen("127.0.0.1", 0) as sock:
        loading = LoadingAnswers(sock, "bundle ranker")
        silent = [socket.create_connection(sock.getsockname(), timeout=10) for _ in range(2)]
        try:
            until(lambda: answering() == 2, "both silent connections taken")
            start = time.monotonic()
            probe = f"http://127.0.0.1:{sock.getsockname()[1]}/v2/health/live"
            assert urllib.request.urlopen(probe, timeout=10).status == 200
            assert time.monotonic() - start > 1.0  # answered once a silent one was let go, at its 2 s deadline
        finally:
            for conn in silent:
                conn.close()
            loading.stop()


def test_serve_refuses_a_port_out_of_range(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["serve", "bundle", "--port", "70000"])
    assert exited.value.code == 2 and "a port is 0-65535, got 70000" in capsys.readouterr().err


def test_serve_refuses_batching_settings_beside_no_batching(capsys):
    assert main(["serve", "bundle", "--no-batching", "--max-batch-rows", "8", "--set", "max_delay_ms=1"]) == 2
    assert capsys.readouterr().err == "tidal serve: --no-batching runs every request alone, so --max-batch-rows, " \
                                      "--set max_delay_ms would have no effect: remove them, or --no-batching\n"


def test_serve_names_the_flag_of_a_value_out_of_range(trainer, tmp_path, capsys):
    bundle = tmp_path / "ranker"
    assert main(["export", "--checkpoint", str(trainer.run_dir), "--out", str(bundle)]) == 0
    capsys.readouterr()
    assert main(["serve", str(bundle), "--port", str(_free_port()), "--max-batch-rows", "0"]) == 2
    err = capsys.readouterr().err
    assert "--max-batch-rows: Input should be greater than or equal to 1, got 0" in err and "max_batch_rows" not in err
    assert main(["serve", str(bundle), "--port", str(_free_port()), "--delta-poll-s", "1e-9"]) == 2
    assert "--delta-poll-s: Input should be greater than or equal to 0.01, got 1e-09" in capsys.readouterr().err
    for setting, expected in [("max_queue_rows=0", "--set max_queue_rows: Input should be greater than or equal to 1"),
                              ("max_queue_rows=1e-1", "--set max_queue_rows: Input should be a valid integer, got a "
                                                      "number with a fractional part, got 0.1"),
                              ("nonsense=1", "--set nonsense: no such serving field; the fields are fusion, buckets"),
                              ("max_queu_rows=5", "--set max_queu_rows: no such serving field; did you mean "
                                                  "'max_queue_rows'? the fields are fusion, buckets"),
                              ("fusion.weights.click=2", "--set fusion.weights.click: a serving field is set "
                                                         "whole, not a part of it: give fusion's whole value as YAML"),
                              ("table_dtype=float16", "fixed when the bundle is written (tidal export --table-dtype)"),
                              ("table_dtype.x=1", "--set table_dtype.x: the tables' dtype is fixed when the bundle"),
                              ("chunk_rows", "--set takes FIELD=VALUE, got 'chunk_rows'"),
                              ("buckets=[1, 2", "--set buckets: the value is not YAML"),
                              ("max_batch_rows=60000", "--set max_batch_rows (60000) must fit the largest bucket")]:
        assert main(["serve", str(bundle), "--port", str(_free_port()), "--set", setting]) == 2
        assert expected in capsys.readouterr().err, setting
    assert main(["serve", str(bundle), "--port", str(_free_port()), "--chunk-rows", "8", "--set", "chunk_rows=4"]) == 2
    assert "--set chunk_rows: given twice" in capsys.readouterr().err


@pytest.mark.parametrize("when", ["loading", "loading, in a finalizer", "starting"])
def test_serve_stopped_by_sigterm_before_it_serves_exits_as_ctrl_c_does(trainer, tmp_path, when):
    """A SIGTERM before serving (while the bundle loads, or while the server starts)
    ends the process as a Ctrl-C does, saying so, with status 0; it used to die of the
    signal (143). One landing in a finalizer, which drops the KeyboardInterrupt it
    raises, is not lost: the server served anyway."""
    bundle = tmp_path / "ranker"
    assert main(["export", "--checkpoint", str(trainer.run_dir), "--out", str(bundle)]) == 0
    patched = "tidal.serving.load_bundle" if when.startswith("loading") else "tidal.serving.server.create_app"
    stop = ("    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(60)\n" if when != "loading, in a finalizer" else
            "    try:\n        os.kill(os.getpid(), signal.SIGTERM)\n        time.sleep(1)\n"
            "    except KeyboardInterrupt:\n        pass  # as Python drops it in a weakref's callback\n"
            "    return loaded(*args)\n")
    script = ("import os, signal, sys, time\n"
              "import tidal.serving, tidal.serving.server\n"
              "from tidal.cli import main\n"
              f"loaded = {patched}\n"
              "def stopped_here(*args):\n"
              f"{stop}"
              f"{patched} = stopped_here\n"
              f"sys.exit(main(['serve', {str(bundle)!r}, '--port', '{_free_port()}']))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    if when.startswith("loading"):
        assert done.stdout == "stopped before serving\n"
    else:
        assert done.stdout.startswith("serving 'ranker' (checkpoint step-") and done.stdout.endswith("\nstopped serving 'ranker'\n")


def test_a_second_sigterm_makes_a_stopping_server_stop_at_once_as_a_second_ctrl_c_does(bundle):
    from tidal.serving import Service
    from tidal.serving.server import _Server

    service = Service(bundle)
    server = _Server(service, exit_timeout_s=30.0)
    try:
        server.handle_exit(signal.SIGTERM, None)
        assert server.should_exit and not server.force_exit  # the first lets the requests held finish
        server.handle_exit(signal.SIGTERM, None)
        assert server.force_exit
    finally:
        server.end()
        service.close()
