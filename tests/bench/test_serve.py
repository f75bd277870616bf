"""`tidal bench serve` on short runs: every figure is reported, no request fails."""

from __future__ import annotations

import json
import multiprocessing
import signal
from pathlib import Path

import pytest

from tidal.bench import serve
from tidal.cli import main
from tidal.compile import aoti_available, onnx_available
from tidal.serving import load_bundle


@pytest.mark.slow
def test_summary_reports_every_figure(capsys):
    summary = serve.run(quick=True, seconds=1.0, as_json=True)
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == json.loads(json.dumps(summary))
    compiled = [b for b, available in (("onnxruntime", onnx_available()), ("aotinductor", aoti_available()))
                if available]
    systems = ("tidal", *(f"tidal_{b}" for b in compiled), "unbatched", "rayserve")
    for system in systems:
        for shape in (1, 100):
            assert summary[f"{system}_qps_{shape}"] > 0 and summary[f"{system}_p99_ms_{shape}"] > 0
    ratios = [f"ratio_{b}_vs_torch_{shape}" for b in compiled for shape in (1, 100)]
    for key in ("ratio_vs_unbatched", "ratio_vs_rayserve", "session_speedup", *ratios):
        assert summary[key] > 0, key
    assert all(point["errors"] == 0 for point in summary["points"]) and len(summary["points"]) == 2 * len(systems)
    assert "session page of 100" in out
    assert summary["update_speedup"] > 0 and 0 < summary["update_rows_changed"] <= summary["table_rows"]
    assert "online update (000001: " in out


def test_an_online_update_is_measured_against_a_full_reload(tmp_path, capsys, monkeypatch):
    bundle, rows, run_dir = serve._train_and_export(tmp_path, rows=8192)
    assert rows.num_rows == 100 * serve._BODIES and load_bundle(bundle).manifest["source_checkpoint"].startswith("step-00000002-")
    for backend, available, held in (("onnxruntime", onnx_available(), "onnx"), ("aotinductor", aoti_available(), "aoti")):
        if available:  # the same checkpoint, for the compiled backend
            compiled = load_bundle(serve._compiled_bundle(bundle, backend))
            assert getattr(compiled, held) is not None
            assert compiled.manifest["source_checkpoint"] == load_bundle(bundle).manifest["source_checkpoint"]
    changed, export_delta = [], serve.export_delta

    def counted(*args):  # type: ignore[no-untyped-def]
        folder = export_delta(*args)
        changed.append(json.loads((folder / "manifest.json").read_text())["tables"]["ids"]["changed"])
        return folder

    monkeypatch.setattr(serve, "export_delta", counted)
    figures = serve._update_cost(bundle, run_dir, repeats=2)
    assert figures["update_rows_changed"] == changed[0] > 0
    assert not (bundle / "deltas").exists()  # the full export replaced the bundle and its delta
    assert figures["table_rows"] == len(load_bundle(bundle).tables["ids"][0])
    assert 0 < figures["update_pause_ms"] < figures["update_ms"] and figures["reload_ms"] > 0
    assert figures["update_speedup"] == pytest.approx(figures["reload_ms"] / figures["update_ms"], rel=0.02)
    assert 0 < figures["reload_in_place_pause_ms"] < figures["reload_in_place_ms"]
    out = capsys.readouterr().out
    assert "against" in out and "a full export loaded in place by a running predictor: " in out


@pytest.mark.parametrize("seconds", ["0", "0.001", "inf", "nan"])
def test_cli_refuses_a_run_of_no_time_or_no_end(capsys, seconds):
    assert main(["bench", "serve", "--seconds", seconds]) == 2
    assert f"--seconds must be from 1 to 3600 (a shorter window may get no answer to measure), got {float(seconds)}" \
        in capsys.readouterr().err


def test_a_sigterm_while_ray_serve_starts_stops_the_benchmark_as_ctrl_c_and_stops_ray(monkeypatch):
    """Ray's start installs SIGTERM handlers that exit (or abort with a stack dump): the
    benchmark went down with no line of its own, and Ray's handler stayed after it."""
    import ray
    from ray import serve as ray_serve

    started: list[bool] = []

    def init(**kwargs):  # type: ignore[no-untyped-def]
        started.append(True)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as Ray does
        raise SystemExit(signal.SIGTERM)  # its handler meeting a SIGTERM

    stopped: list[str] = []
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "is_initialized", lambda: bool(started))
    monkeypatch.setattr(ray_serve, "shutdown", lambda: stopped.append("serve"))
    monkeypatch.setattr(ray, "shutdown", lambda: stopped.append("ray"))
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        serve._start_ray_serve(Path("bundle"))
    assert stopped == ["serve", "ray"] and signal.getsignal(signal.SIGTERM) is handler
    def fails(**kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("no Ray here")

    monkeypatch.setattr(ray, "init", fails)
    started.clear()
    stopped.clear()
    with pytest.raises(RuntimeError, match="no Ray here"):  # nothing started: serve.shutdown would start a Ray
        serve._start_ray_serve(Path("bundle"))
    assert stopped == []


def test_the_load_generator_leaves_a_terminals_ctrl_c_to_the_benchmark():
    with multiprocessing.get_context("spawn").Pool(1, initializer=serve._ignoring_interrupts) as pool:
        assert pool.apply(signal.getsignal, (signal.SIGINT,)) == signal.SIG_IGN


def test_qps_counts_every_answer_the_window_saw():
    """A server answering every request 0.4 s after it came, to 4 connections: 10 QPS,
    however long each request took against the window (2 s)."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Slow(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):  # noqa: N802 - the stdlib's name
            self.rfile.read(int(self.headers["Content-Length"]))
            time.sleep(0.4)
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")  # one write: no Nagle delay

        def log_message(self, *args):  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        measured = serve._load_process(server.server_address[1], [b"{}"], 4, 2.0)
    finally:
        server.shutdown()
    assert 9.0 <= measured["qps"] <= 10.5 and measured["errors"] == 0  # counting only whole requests gave 8
    assert 390 <= measured["p50_ms"] <= 600


def test_summary_figures_follow_from_the_points():
    """Ratios at the top concurrency: against the unbatched server on one-candidate
    requests, against Ray Serve on 100-candidate ones, each compiled backend against torch
    on both; sessions by their p50s."""
    def point(qps, p99):
        return {"qps": qps, "p50_ms": 1.0, "p99_ms": p99, "errors": 0}

    results = {system: {(shape, c): point(base * shape_gain * c, 5.0 * c) for shape, shape_gain in ((1, 10), (100, 1))
                        for c in (1, 8)}
               for system, base in (("tidal", 4.0), ("tidal_onnxruntime", 5.0), ("tidal_aotinductor", 6.0),
                                    ("unbatched", 1.0), ("rayserve", 2.0))}
    session = {"stateless": {"p50_ms": 30.0}, "page": {"p50_ms": 12.0}}
    summary = serve._summary(results, session)
    assert summary["concurrency"] == 8
    assert (summary["tidal_qps_1"], summary["unbatched_qps_1"], summary["tidal_qps_100"]) == (320.0, 80.0, 32.0)
    assert (summary["ratio_vs_unbatched"], summary["ratio_vs_rayserve"], summary["session_speedup"]) == (4.0, 2.0, 2.5)
    assert summary["ratio_onnxruntime_vs_torch_1"] == summary["ratio_onnxruntime_vs_torch_100"] == 1.25
    assert summary["ratio_aotinductor_vs_torch_1"] == summary["ratio_aotinductor_vs_torch_100"] == 1.5
    assert summary["tidal_p99_ms_100"] == 40.0 and len(summary["points"]) == 20
