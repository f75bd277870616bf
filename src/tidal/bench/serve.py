"""`tidal bench serve`: the server against itself unbatched and against Ray Serve.

One model, trained here on generated Criteo-like data (DLRM, dim 16; C1-C13 and
I1-I6 are the user's features, the rest the item's), exported and served five ways:
(a) Tidal with auto-batching, (b) the same with its dense network on ONNX Runtime
(`serving.backend: onnxruntime`; left out without the onnx extra) and compiled by
AOTInductor (`aotinductor`; left out without a C++ compiler), (c) Tidal with batching off (every request alone),
(d) the same predictor in a Ray Serve deployment whose `@serve.batch` merges
requests up to the same row budget. A closed-loop load generator in another process
keeps `concurrency` requests in flight over keep-alive connections, for two request
shapes: one user + one candidate, and one user + 100 candidates (the same JSON
bodies for every server). It reports QPS, p50 and p99 per point. The session
speedup is a continuing page of 100 candidates (the user cached by `sequence_start`)
against the same request sent stateless, both at concurrency 1 on (a).

The served bundle is exported half way through training; the delta to the end of
training (`tidal export --delta`) then measures an online update: the time a predictor
takes to read and apply it, the part of that time new batches wait, against reloading
the whole updated bundle into a new predictor (what a restart or a full model reload
costs, the process start left out). Last, a full export of the same checkpoint into the
bundle, which the updated predictors load in place: its time, and the part of it new
batches wait (the swap).
"""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing
import multiprocessing.pool
import signal
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from tidal.compile import AOTI_MISSING, ONNX_MISSING, aoti_available, onnx_available
from tidal.config import RunConfig
from tidal.data import BadRows
from tidal.data.criteo import criteo_features
from tidal.data.generate import generate
from tidal.processes import deferring_interrupts, keeping_sigterm
from tidal.runtime import Trainer
from tidal.serving import Predictor, Service, export, export_delta, load_bundle, start_server
from tidal.serving.online import Update, Updater
from tidal.serving.protocol import HEADER, decode_request, encode_response, infer_request, input_specs

__all__ = ["run"]

_USER = {*(f"C{i}" for i in range(1, 14)), *(f"I{i}" for i in range(1, 7))}
_PATH = "/v2/models/ctr/infer"
_BODIES = 64  # distinct requests per shape, cycled
_BATCH_ROWS = 2048  # the served model's training batch


def run(*, quick: bool = False, seconds: float | None = None, with_ray: bool = True, as_json: bool = False) -> dict:
    """`seconds` measured per point: by default 5, 3 when `quick`."""
    concurrencies = [64] if quick else [1, 16, 64]
    seconds = seconds if seconds is not None else 3.0 if quick else 5.0
    with tempfile.TemporaryDirectory() as scratch, \
            multiprocessing.get_context("spawn").Pool(1, initializer=_ignoring_interrupts) as load:
        bundle, rows, run_dir = _train_and_export(Path(scratch), rows=20_000 if quick else 100_000)
        specs = input_specs(load_bundle(bundle).config)
        bodies = {shape: _bodies(specs, rows, shape) for shape in (1, 100)}
        # first: measured after Ray Serve, it shared the cores with Ray's shutdown (0.61x, against 1.26x)
        session = _session_speedup(load, bundle, specs, rows, seconds)
        results = {}
        compiled = [f"tidal_{backend}" for backend in _compiled_backends()]
        for system in ["tidal", *compiled, "unbatched"] + (["rayserve"] if with_ray else []):
            served = _compiled_bundle(bundle, system.removeprefix("tidal_")) if system in compiled else bundle
            results[system] = _measure_system(load, system, served, bodies, concurrencies, seconds)
        update = _update_cost(bundle, run_dir)
    summary = _summary(results, session) | update
    if as_json:
        print(json.dumps(summary))
    return summary


def _train_and_export(root: Path, rows: int) -> tuple[Path, pa.RecordBatch, Path]:
    """The bundle of the run half way, the candidates' rows, and the run (trained to its end)."""
    print(f"Training the served model (DLRM, dim 16, {rows:,d} generated rows)", flush=True)
    data = generate(root / "data", rows=rows, seed=0)
    features = [{**f.model_dump(), **({"side": "user"} if f.name in _USER else {})} for f in criteo_features("ids")]
    half = max(1, math.ceil(rows / _BATCH_ROWS) // 2)
    config = RunConfig(data={"train": data.paths, "batch_size": _BATCH_ROWS}, features=features,
                       tables=[{"name": "ids", "dim": 16, "optimizer": {"kind": "adagrad", "lr": 0.05}}],
                       model={"kind": "dlrm", "bottom_sizes": [64], "hidden_sizes": [128, 64]},
                       training={"lr": 0.002, "log_every": 1_000_000, "run_dir": str(root / "run"),
                                 "checkpoint_every": half})
    Trainer(config).fit(max_steps=half)
    bundle = export(config.training.run_dir, root / "bundle")
    for backend in _compiled_backends():
        export(config.training.run_dir, _compiled_bundle(bundle, backend), backend=backend)
    trainer = Trainer(config)
    trainer.fit(resume=True)
    batches, needed = [], 100 * _BODIES
    for batch in trainer.reader_spec(data.paths).epoch(BadRows()):
        batches.append(batch)
        if sum(b.num_rows for b in batches) >= needed:
            break
    candidates = pa.Table.from_batches(batches).combine_chunks().slice(0, needed).to_batches()[0]
    return bundle, candidates, trainer.run_dir


def _compiled_backends() -> list[str]:
    """The compiled dense backends this machine can export for (the others reported)."""
    backends = []
    for backend, available, missing in (("onnxruntime", onnx_available, ONNX_MISSING),
                                        ("aotinductor", aoti_available, AOTI_MISSING)):
        if available():
            backends.append(backend)
        else:
            print(f"Leaving out the {backend} backend: {missing}", flush=True)
    return backends


def _compiled_bundle(bundle: Path, backend: str) -> Path:
    """Where the bundle of the same checkpoint for a compiled backend lies."""
    return bundle.with_name(f"{bundle.name}-{backend}")


def _bodies(specs: dict, rows: pa.RecordBatch, candidates: int, **options: object) -> list[bytes]:
    return [json.dumps(infer_request(rows.slice(k * candidates, candidates), specs, **options)).encode()
            for k in range(_BODIES)]


def _measure_system(load: multiprocessing.pool.Pool, system: str, bundle: Path, bodies: dict, concurrencies: list[int], seconds: float) -> dict:
    server = _start(system, bundle)
    try:
        points = {}
        for shape, shape_bodies in bodies.items():
            for concurrency in concurrencies:
                point = load.apply(_load_process, (server[0], shape_bodies, concurrency, seconds))
                print(f"  {system:<17} {shape:>3} candidate(s)  concurrency {concurrency:>2}: {point['qps']:8,.0f} QPS  "
                      f"p50 {point['p50_ms']:6.2f} ms  p99 {point['p99_ms']:7.2f} ms  errors {point['errors']}",
                      flush=True)
                points[(shape, concurrency)] = point
        return points
    finally:
        server[1]()


def _start(system: str, bundle: Path) -> tuple[int, object]:
    """(port, stop function) of a running server."""
    if system == "rayserve":
        return _start_ray_serve(bundle)
    running = start_server(Service(load_bundle(bundle), name="ctr", batching=system != "unbatched"))
    return int(running.url.rsplit(":", 1)[1]), running.stop


def _session_speedup(load: multiprocessing.pool.Pool, bundle: Path, specs: dict, rows: pa.RecordBatch,
                     seconds: float) -> dict:
    running = start_server(Service(load_bundle(bundle), name="ctr"))
    port = int(running.url.rsplit(":", 1)[1])
    try:
        stateless = load.apply(_load_process, (port, _bodies(specs, rows, 100), 1, seconds))
        start = _bodies(specs, rows, 100, parameters={"sequence_id": 1, "sequence_start": True})[0]
        status = asyncio.run(_one(port, start))
        if status != 200:
            raise RuntimeError(f"sequence_start was answered with HTTP {status}; the session speedup needs a session")
        pages = _bodies(specs, rows, 100, with_user=False, parameters={"sequence_id": 1})
        page = load.apply(_load_process, (port, pages, 1, seconds))
    finally:
        running.stop()
    print(f"  session page of 100: p50 {page['p50_ms']:.2f} ms against {stateless['p50_ms']:.2f} ms stateless",
          flush=True)
    return {"page": page, "stateless": stateless}


def _update_cost(bundle: Path, run_dir: Path, repeats: int = 3) -> dict:
    """An online update (the delta from half way to the end of training) against
    reloading the whole updated bundle; then a full export of the same checkpoint into
    the bundle, which the updated predictors load in place. Medians of `repeats`."""
    at_base = [Predictor(load_bundle(bundle)) for _ in range(repeats)]
    delta = export_delta(run_dir, bundle)
    updates = [Updater(p, bundle).update() for p in at_base]
    reloads = []
    for _ in range(repeats):
        start = time.perf_counter()
        Predictor(load_bundle(bundle))
        reloads.append(time.perf_counter() - start)
    update_ms, pause_ms = _median_ms(updates)
    reload_ms = float(np.median(reloads)) * 1e3
    rows = len(load_bundle(bundle).tables["ids"][0])
    print(f"  online update ({delta.name}: {updates[0].rows_changed:,d} of {rows:,d} rows changed): {update_ms:.1f} ms, "
          f"batches waiting {pause_ms:.1f} ms of it, against {reload_ms:.1f} ms reloading the bundle", flush=True)
    export(run_dir, bundle)
    in_place = [Updater(p, bundle).update() for p in at_base]
    in_place_ms, in_place_pause_ms = _median_ms(in_place)
    print(f"  a full export loaded in place by a running predictor: {in_place_ms:.1f} ms, batches waiting "
          f"{in_place_pause_ms:.2f} ms of it", flush=True)
    return {"update_ms": round(update_ms, 2), "update_pause_ms": round(pause_ms, 2), "reload_ms": round(reload_ms, 2),
            "update_speedup": round(reload_ms / update_ms, 2), "update_rows_changed": updates[0].rows_changed,
            "table_rows": rows, "reload_in_place_ms": round(in_place_ms, 2),
            "reload_in_place_pause_ms": round(in_place_pause_ms, 3)}


def _median_ms(updates: list[Update]) -> tuple[float, float]:
    """Median milliseconds of the updates' whole time and of new batches' wait."""
    return tuple(float(np.median([getattr(u, a) for u in updates])) * 1e3 for a in ("seconds", "paused_s"))


def _summary(results: dict, session: dict) -> dict:
    top = max(c for _, c in results["tidal"])
    summary: dict = {"concurrency": top}
    for system, points in results.items():
        for shape in (1, 100):
            summary[f"{system}_qps_{shape}"] = round(points[(shape, top)]["qps"], 1)
            summary[f"{system}_p99_ms_{shape}"] = round(points[(shape, top)]["p99_ms"], 2)
    summary["ratio_vs_unbatched"] = round(summary["tidal_qps_1"] / summary["unbatched_qps_1"], 2)
    for backend in ("onnxruntime", "aotinductor"):
        for shape in (1, 100) if f"tidal_{backend}" in results else ():
            summary[f"ratio_{backend}_vs_torch_{shape}"] = round(summary[f"tidal_{backend}_qps_{shape}"]
                                                                 / summary[f"tidal_qps_{shape}"], 2)
    if "rayserve" in results:
        summary["ratio_vs_rayserve"] = round(summary["tidal_qps_100"] / summary["rayserve_qps_100"], 2)
    summary["session_speedup"] = round(session["stateless"]["p50_ms"] / session["page"]["p50_ms"], 2)
    summary["points"] = [{"system": system, "candidates": shape, "concurrency": c, **point}
                         for system, points in results.items() for (shape, c), point in points.items()]
    return summary


# ---------------------------------------------------------------------- Ray Serve


class _RayServePredictor:
    """The same predictor and protocol code in a Ray Serve replica, batched by `@serve.batch`."""

    def __init__(self, bundle: str) -> None:
        self.predictor = Predictor(load_bundle(bundle))
        self.specs = input_specs(self.predictor.config)
        self.outputs = [*self.predictor.targets, "score"]

    async def __call__(self, request):  # type: ignore[no-untyped-def]
        from starlette.responses import Response

        decoded = decode_request(await request.body(), request.headers.get(HEADER), self.specs, self.outputs)
        probabilities = await self.score(self.predictor.piece(decoded.columns, decoded.rows))
        content, headers = encode_response("ctr", decoded, self.predictor.outputs(probabilities))
        return Response(content, headers=headers, media_type="application/json")

    async def score(self, pieces):  # type: ignore[no-untyped-def]
        probabilities = self.predictor.predict(pieces)
        bounds = np.cumsum([0] + [p.rows for p in pieces])
        return [probabilities[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _start_ray_serve(bundle: Path) -> tuple[int, object]:
    """Ray Serve on `bundle`: (port, stop function). Ray's start replaces the SIGTERM
    handler with ones that exit or abort: Tidal's comes back, so a SIGTERM stops the
    benchmark as a Ctrl-C does, and Ray stops with it."""
    import ray
    from ray import serve

    def stop() -> None:
        if not ray.is_initialized():  # its start failed: serve.shutdown would start a Ray to stop
            return
        with deferring_interrupts():  # stopped half way, Ray's processes would go on
            serve.shutdown()
            ray.shutdown()

    port = _free_port()
    try:
        with keeping_sigterm():
            ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
            serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "ERROR"})
            batched = type("RayServePredictor", (_RayServePredictor,), {
                "score": serve.batch(max_batch_size=1024, batch_wait_timeout_s=0.002,
                                     batch_size_fn=lambda pieces: sum(p.rows for p in pieces))(_RayServePredictor.score)})
            deployment = serve.deployment(max_ongoing_requests=256)(batched)
            serve.run(deployment.bind(str(bundle)), route_prefix=_PATH, name="tidal")
    except BaseException:
        stop()
        raise
    return port, stop


def _ignoring_interrupts() -> None:
    """The load generator's start: a terminal's Ctrl-C reaches its process group, and the
    benchmark's own process stops the pool."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------- load generator


def _load_process(port: int, bodies: list[bytes], concurrency: int, seconds: float) -> dict:
    """Closed-loop load (run in the load generator's process): QPS, p50 and p99 of the
    answers that came in the `seconds` after a one-second warm-up (nan when none did)."""
    latencies, errors = asyncio.run(_closed_loop(port, bodies, concurrency, seconds))
    p50, p99 = np.percentile(latencies, [50, 99]) * 1000 if latencies else (float("nan"),) * 2
    return {"qps": len(latencies) / seconds, "p50_ms": float(p50), "p99_ms": float(p99), "errors": errors}


async def _closed_loop(port: int, bodies: list[bytes], concurrency: int, seconds: float) -> tuple[list[float], int]:
    requests = [_http(port, body) for body in bodies]
    warm_until = time.perf_counter() + 1.0
    stop_at = warm_until + seconds
    latencies: list[float] = []
    errors = [0]

    async def connection(k: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        n = k
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            writer.write(requests[n % len(requests)])
            status = await _response(reader)
            end = time.perf_counter()
            if status != 200:
                errors[0] += 1
            elif warm_until <= end <= stop_at:  # every answer the window saw: QPS = answers / window
                latencies.append(end - start)
            n += concurrency
        writer.close()

    await asyncio.gather(*(connection(k) for k in range(concurrency)))
    return latencies, errors[0]


async def _one(port: int, body: bytes) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_http(port, body))
    status = await _response(reader)
    writer.close()
    return status


def _http(port: int, body: bytes) -> bytes:
    return (f"POST {_PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


async def _response(reader: asyncio.StreamReader) -> int:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in head[1:] if ": " in line)
    length = next((int(v) for k, v in fields.items() if k.lower() == "content-length"), None)
    if length is None:
        raise RuntimeError(f"the server answered without a Content-Length: {head}")
    await reader.readexactly(length)
    return int(head[0].split()[1])
