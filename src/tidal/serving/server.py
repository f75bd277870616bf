"""`tidal serve`: the Open Inference Protocol (KServe v2) over HTTP, on Starlette + uvicorn.

Routes::

    GET  /v2                              server metadata (name, version, extensions)
    GET  /v2/health/live | /v2/health/ready
    GET  /v2/models/{name}                model metadata: inputs and outputs
    GET  /v2/models/{name}/ready
    POST /v2/models/{name}/infer          JSON tensors or the binary tensor extension
    GET  /v2/models/{name}/config         Triton's model configuration (`tidal.serving.triton`)
    GET  /v2/models/{name}/stats          Triton's inference statistics (also /v2/models/stats)
    POST /v2/repository/index             the one model, READY
    POST /v2/repository/models/{name}/load
                                          apply the bundle's new deltas, or load the full
                                          export that replaced it (`tidal.serving.online`)
    POST /v2/repository/models/{name}/unload
                                          refused (400): the server serves its one bundle
                                          until it is stopped
    GET  /v2/models/{name}/fusion         the value model now in use (Tidal extension)
    PUT  /v2/models/{name}/fusion         change it without a restart: {"kind", "weights"}
    GET  /metrics                         Prometheus metrics

The model routes also answer under `/v2/models/{name}/versions/1/` (the one version).
Outputs are one FP32 probability tensor per target and the fused `score`. Triton's
sequence parameters (`sequence_id`, `sequence_start`, `sequence_end`) drive stateful
sessions. Bodies may come gzip- or deflate-compressed (`Content-Encoding`). Every
error is `{"error": reason}`: a malformed request gets 400 (malformed HTTP too, once the
requests before it on the connection are answered), a body over the limit or a
request with more candidates than `max_queue_rows` 413, headers over 64 KiB 431,
headers not sent within 10 s or a body within 30 s 408, an HTTP version other than 1.0
or 1.1 505, a Content-Encoding other than
gzip (x-gzip) or deflate 415, a transfer coding before chunked (`gzip, chunked`) 501,
an unknown model or route 404; under overload (more rows waiting than `max_queue_rows`, or the bodies of the requests
under way past `max_held_body_bytes`) the server answers 503 with Retry-After instead
of letting the queue or its memory grow. A body over 64 KiB is decoded on a thread of
its own, one at a time, so that health checks and small requests are not held up by a
queue of large ones. Binds to 127.0.0.1 unless told otherwise.

Stopping (Ctrl-C or SIGTERM, as Triton): the server stops accepting connections and
lets the requests it holds run for up to `exit_timeout_s` (30 s); a second before
that deadline, those still queued get a 503 ("the server shut down before this request
ran"), so that only a batch still running then could be cut off. A second Ctrl-C or
SIGTERM stops at once, answering the requests under way 503. The socket listens from
`listen` on; while the bundle loads, `LoadingAnswers` answers liveness probes 200 and
the rest 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import re
import select
import signal
import socket
import sys
import threading
import time
import zlib
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import httptools
import numpy as np
import torch
import uvicorn
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

import tidal
from tidal.config import Fusion, ServingConfig, require
from tidal.errors import ConfigError
from tidal.processes import deferring_interrupts, sigterm_interrupts
from tidal.serving.batcher import Batcher, BatchRecord, Overloaded, ShuttingDown
from tidal.serving.bundle import NO_DELTAS, Bundle
from tidal.serving.online import Updater, log_update, refusal
from tidal.serving.predictor import Predictor, UserState
from tidal.serving.protocol import HEADER, LENGTHS, DecodedRequest, InputSpec, RequestError, context_inputs, \
    decode_request, encode_response, input_specs, json_object
from tidal.serving.sessions import SessionCache, SessionError
from tidal.serving.triton import Statistics, model_config

__all__ = ["LoadingAnswers", "RunningServer", "Service", "create_app", "listen", "serve", "start_server"]

T = TypeVar("T")
# The datatype model metadata gives each kind of input, as training reads the column:
# ids are hashed as the file's strings are (as INT64, "007" would come as 7, another id);
# integer ids (`hashed: false`, one value a row) are read as int64, so INT64 values are
# those ids as they are (a missing one still comes as an empty BYTES string); numbers
# are parsed as float64.
_EXTENSIONS = ["binary_tensor_data", "sequence", "model_repository", "model_configuration", "statistics",
               "parameters", "tidal_fusion"]  # Triton's names, and Tidal's own
_DATATYPES = {"ids": "BYTES", "integer": "INT64", "number": "FP64"}
_DECODED_INLINE_BYTES = 1 << 16  # a larger infer body is decoded on the decoder thread (`Service._decoded`)


_MODEL_NAME = re.compile(r"[A-Za-z0-9._-]+")  # a URL path segment that needs no escaping
MODEL_NAME_RULE = ("must be made of letters, digits, '.', '_' and '-' (not '.' or '..' alone), as it is a segment of "
                   "the URLs' path (/v2/models/NAME)")


def is_model_name(name: object) -> bool:
    """Whether `name` can be a segment of a URL's path as it is (no escaping, no '/')."""
    return isinstance(name, str) and _MODEL_NAME.fullmatch(name) is not None and name not in (".", "..")


class Service:
    """One bundle behind the protocol: predictor, batcher, sessions and metrics."""

    def __init__(self, bundle: Bundle, *, name: str = "tidal", batching: bool = True, **overrides: object) -> None:
        """`overrides` replace fields of the bundle's `serving` config (see `_settings`)."""
        require(bundle, Bundle, "Service: bundle")
        if not is_model_name(name):
            raise ConfigError(f"Service: name {MODEL_NAME_RULE}; got {name!r}")
        if not isinstance(batching, bool):
            raise ConfigError(f"Service: batching must be True or False, got {batching!r}")
        self.name = name
        self.closed = False  # by `close`: a server's stop
        self.settings = _settings(bundle.config.serving, overrides)
        self.predictor = Predictor(bundle, serving=self.settings)
        if self.settings.delta_poll_s is not None and bundle.position is None:
            raise ConfigError(f"delta_poll_s: {bundle.path}: {NO_DELTAS}")
        self.specs = input_specs(bundle.config)
        self.context = context_inputs(bundle.config)  # item-side inputs that may come once for every candidate
        self.outputs = [*self.predictor.targets, "score"]
        self.sessions = SessionCache(ttl_s=self.settings.session_ttl_s, memory_bytes=self.settings.session_memory_bytes)
        self.bodies = BodyBudget(self.settings.held_body_bytes)
        self.stopped_at_once = False  # a second Ctrl-C or SIGTERM: the requests under way are cut off
        self.metrics = _Metrics(self)
        self.statistics = Statistics()
        s = self.settings
        self.batcher = Batcher(self.predictor, max_batch_rows=s.max_batch_rows, max_delay_ms=s.max_delay_ms,
                               chunk_rows=s.chunk_rows, sparse_threads=s.sparse_threads, max_queue_rows=s.max_queue_rows,
                               merge=batching, on_batch=self._batch_done)
        self._decoder = ThreadPoolExecutor(1, thread_name_prefix="tidal-decode")  # one at a time, as on the loop
        self.updater = Updater(self.predictor, bundle.path, poll_s=s.delta_poll_s,  # it may start a thread
                               between=self.batcher.between_requests)
        if s.dense_threads is not None:  # last: nothing after it fails, so close() gives it back
            _TORCH_THREADS.take(self, s.dense_threads)

    async def infer(self, body: bytes, header_length: str | None) -> tuple[bytes, dict[str, str]]:
        """Answer one infer request body: (response body, extra headers)."""
        if not isinstance(body, (bytes, bytearray)):
            raise RequestError(f"infer takes the request's body as bytes, got {type(body).__name__}")
        self.sessions.expire()
        decoded = await self._decoded(body, header_length)
        if decoded.rows > self.settings.max_queue_rows:
            raise RequestError(f"the request has {decoded.rows} candidates; this server takes at most "
                               f"{self.settings.max_queue_rows} in one request (max_queue_rows)", status=413)
        state = await self._session_state(decoded)
        probabilities = await self._score(decoded, state) if decoded.rows else \
            np.zeros((0, len(self.predictor.targets)), np.float32)
        outputs = self.predictor.outputs(probabilities)
        _refuse_unscored(outputs)  # before the session starts or ends: a refused request changes nothing
        if decoded.sequence_start:
            self.sessions.start(decoded.sequence_id, state)
        if decoded.sequence_end:  # this request's session only: the id may have started again meanwhile
            self.sessions.end(decoded.sequence_id, state)
        start = time.perf_counter()
        response = encode_response(self.name, decoded, outputs)
        self.statistics.output(time.perf_counter() - start)
        return response

    async def _decoded(self, body: bytes, header_length: str | None) -> DecodedRequest:
        """The request in `body`, decoded. A large body is decoded on the decoder thread:
        the event loop meanwhile gets the GIL between its steps, so health checks and
        small requests do not wait for a queue of large decodes (`json.loads` of a 32 MiB
        body takes about half a second)."""
        decode = functools.partial(decode_request, body, header_length, self.specs, self.outputs, context=self.context)
        if len(body) <= _DECODED_INLINE_BYTES:
            return decode()
        return await asyncio.get_running_loop().run_in_executor(self._decoder, decode)

    def _batch_done(self, record: BatchRecord) -> None:
        self.metrics.batch(record)
        self.statistics.batch(record)

    async def _session_state(self, decoded: DecodedRequest) -> UserState | None:
        if decoded.sequence_id is None:
            return None
        if not decoded.sequence_start:
            state = self.sessions.get(decoded.sequence_id)
            if state.position != self.predictor.position:  # pooled before an update: pool it again, once
                fresh = await asyncio.to_thread(self.predictor.user_state, state.user)
                self.sessions.refresh(decoded.sequence_id, state, fresh)
                state = fresh
            return state
        # cached once the request is scored (`infer`): one refused, a 503 say, starts no session
        return await asyncio.to_thread(self.predictor.user_state, self.predictor.user_row(decoded.columns))

    async def _score(self, decoded: DecodedRequest, state: UserState | None) -> np.ndarray:
        """The request's probabilities; if it is cancelled (the client hung up) or a chunk
        fails, its other chunks are given up too, and those still waiting leave the queue."""
        futures = self.batcher.submit(self.predictor.piece(decoded.columns, decoded.rows, state))
        try:
            return np.concatenate([await asyncio.wrap_future(f) for f in futures])
        except BaseException:
            self.batcher.cancel(futures)
            raise

    def metadata(self) -> dict:
        inputs = [{"name": s.name, "datatype": _DATATYPES[s.kind], "shape": [1 if s.side != "item" else -1],
                   "parameters": _input_parameters(s, s.name in self.context)} for s in self.specs.values()]
        inputs += [{"name": s.name + LENGTHS, "datatype": "INT32", "shape": [-1], "optional": True}
                   for s in self.specs.values() if s.separator]
        return {"name": self.name, "versions": ["1"], "platform": "tidal", "inputs": inputs,
                "outputs": [{"name": o, "datatype": "FP32", "shape": [-1]} for o in self.outputs]}

    def close(self) -> None:
        self.closed = True
        try:
            self.updater.close()
            self.batcher.close()
            self._decoder.shutdown(cancel_futures=True)
        finally:
            _TORCH_THREADS.give_back(self)


def _settings(serving: ServingConfig, overrides: dict) -> ServingConfig:
    """`serving` with `overrides`. Smaller buckets lower `max_batch_rows` to the largest,
    and a smaller `max_batch_rows` lowers `chunk_rows`, unless those are given too."""
    settings = {**serving.model_dump(), **overrides}
    buckets = overrides.get("buckets")
    if "max_batch_rows" not in overrides and isinstance(buckets, list) and buckets \
            and all(isinstance(b, int) for b in buckets):
        settings["max_batch_rows"] = min(settings["max_batch_rows"], max(buckets))
    rows = settings["max_batch_rows"]
    if "chunk_rows" not in overrides and isinstance(rows, int) and rows >= 1:  # else the config names it
        settings["chunk_rows"] = min(settings["chunk_rows"], rows)
    return ServingConfig(**settings)


_OUTCOMES = ("ok", "bad_request", "overloaded", "shutting_down", "not_found", "client_gone", "error")
_REFUSAL_STATUSES = ("400", "408", "431", "505")


class _Metrics:
    """The Prometheus metrics of one service (a registry of its own). Every labelled series
    is there from the start, at 0: an alert on errors sees 0 before the first one, not nothing."""

    def __init__(self, service: Service) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("tidal_requests", "Infer requests by outcome", ["outcome"], registry=self.registry)
        self.http_refusals = Counter("tidal_http_refusals", "Connections the HTTP layer refused (malformed, oversized "
                                     "or slow headers, framing, a body that broke off), by status", ["status"],
                                     registry=self.registry)
        self.latency = Histogram("tidal_request_seconds", "Infer request time, end to end", registry=self.registry,
                                 buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5))
        self.batch_rows = Histogram("tidal_batch_rows", "Rows per batch", registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096))
        self.queue = Histogram("tidal_queue_seconds", "Time a batch's oldest piece waited", registry=self.registry,
                               buckets=(0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 1))
        self.compute = Histogram("tidal_compute_seconds", "Batch compute time by stage", ["stage"],
                                 registry=self.registry, buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 1))
        self.sessions = Gauge("tidal_session_cache_entries", "Live sessions", registry=self.registry)
        self.session_bytes = Gauge("tidal_session_cache_bytes", "Bytes of cached session state", registry=self.registry)
        self.sessions.set_function(lambda: service.sessions.expire() or len(service.sessions))  # live ones only
        self.session_bytes.set_function(lambda: service.sessions.bytes)
        for outcome in _OUTCOMES:
            self.requests.labels(outcome)
        for status in _REFUSAL_STATUSES:
            self.http_refusals.labels(status)
        for stage in ("sparse", "dense"):
            self.compute.labels(stage)
        self.registry.register(_IdCounts(service.predictor))
        self.registry.register(_SessionsGone(service))
        self.registry.register(_Deltas(service))

    def batch(self, record: BatchRecord) -> None:
        self.batch_rows.observe(record.rows)
        self.queue.observe(record.queue_s)
        self.compute.labels("sparse").observe(record.sparse_s)
        self.compute.labels("dense").observe(record.dense_s)


class _IdCounts:
    """Ids looked up and ids unknown to the tables, read from the tables when scraped."""

    def __init__(self, predictor: Predictor) -> None:
        self._predictor = predictor

    def collect(self):  # type: ignore[no-untyped-def]
        lookups, misses = self._predictor.id_counts()
        yield CounterMetricFamily("tidal_ids", "Ids looked up", value=lookups)
        yield CounterMetricFamily("tidal_unknown_ids", "Ids the tables do not hold (read as zeros)", value=misses)


class _SessionsGone:
    """The sessions the cache let go before their end: evicted (it was full) or expired."""

    def __init__(self, service: Service) -> None:
        self._service = service

    def collect(self):  # type: ignore[no-untyped-def]
        sessions = self._service.sessions
        yield CounterMetricFamily("tidal_session_cache_evicted", "Sessions evicted: the cache was full (its "
                                  "session_memory_bytes)", value=sessions.evicted)
        yield CounterMetricFamily("tidal_session_cache_expired", "Sessions expired: idle past session_ttl_s",
                                  value=sessions.expired)


class _Deltas:
    """The bundle's deltas: the one served, how many were applied and refused, and when."""

    def __init__(self, service: Service) -> None:
        self._service = service  # its updater is made after the metrics

    def collect(self):  # type: ignore[no-untyped-def]
        u = self._service.updater
        yield GaugeMetricFamily("tidal_bundle_delta", "The bundle's last delta served (0: its base alone)",
                                value=u.delta)
        source = self._service.predictor.source
        if source is not None:
            yield GaugeMetricFamily("tidal_bundle_source_step", "The training step of the checkpoint served (of "
                                    "its last delta, when one is applied)", value=source.step)
        yield CounterMetricFamily("tidal_bundle_deltas_applied", "Deltas applied since the start",
                                  value=u.deltas_applied)
        yield CounterMetricFamily("tidal_bundle_reloads", "Loads of the whole bundle after a full export replaced it",
                                  value=u.reloads)
        yield CounterMetricFamily("tidal_bundle_updates_refused", "Updates refused, each refusal once however often "
                                  "it is met again", value=u.refused)
        if u.updated_unix_s is not None:
            yield GaugeMetricFamily("tidal_bundle_updated_unix_seconds", "When a delta or a full export was last loaded",
                                    value=u.updated_unix_s)


# ---------------------------------------------------------------------- HTTP


class _Handlers:
    """The HTTP endpoints of one `Service` (`create_app` routes them)."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def _model_or_404(self, request: Request) -> JSONResponse | None:
        name, version = request.path_params["name"], request.path_params.get("version", "1")
        if name != self.service.name:
            return _error(404, f"unknown model {name!r}; this server serves {self.service.name!r}")
        if version != "1":
            return _error(404, f"model {name!r} has no version {version!r}; its one version is '1'")
        return None

    async def server_metadata(self, request: Request) -> JSONResponse:
        return JSONResponse({"name": "tidal", "version": tidal.__version__, "extensions": _EXTENSIONS})

    async def live(self, request: Request) -> Response:
        return Response(status_code=200)

    def _torn(self) -> JSONResponse | None:
        """A 503 while a failed update has left the tables between two deltas."""
        torn = self.service.predictor.torn
        return torn and _error(503, f"not ready: {torn}; restart the server, or export its bundle in full")

    async def ready(self, request: Request) -> Response:
        return self._torn() or Response(status_code=200)

    async def model_metadata(self, request: Request) -> JSONResponse:
        return self._model_or_404(request) or JSONResponse(self.service.metadata())

    async def model_ready(self, request: Request) -> Response:
        return self._model_or_404(request) or self._torn() or Response(status_code=200)

    async def infer(self, request: Request) -> Response:
        missing = self._model_or_404(request)
        if missing is not None:
            self.service.metrics.requests.labels("not_found").inc()
            return missing
        if self.service.predictor.torn:  # its tables are between two states: no score from them
            self.service.metrics.requests.labels("error").inc()
            return self._torn()
        start = time.perf_counter()
        outcome, response = await self._answer(request)
        self.service.metrics.requests.labels(outcome).inc()
        self.service.statistics.request(outcome == "ok", time.perf_counter() - start)
        if outcome == "ok":
            self.service.metrics.latency.observe(time.perf_counter() - start)
        return response

    async def _answer(self, request: Request) -> tuple[str, Response]:
        """(outcome, response) of an infer request."""
        held = self.service.bodies.holding()
        try:
            body = await _read_body(request, self.service.settings.max_body_bytes, "serving.max_body_bytes", held)
            content, headers = await _unless_gone(request, self.service.infer(body, request.headers.get(HEADER)))
        except (RequestError, SessionError) as exc:
            closes = getattr(exc, "closes", False)  # what follows on the connection is the rest of a body
            closing = {"Connection": "close"} if closes else None
            return "bad_request", _error(getattr(exc, "status", 400), str(exc), closing)
        except Overloaded as exc:
            return "overloaded", _error(503, str(exc), {"Retry-After": "1"})
        except ShuttingDown as exc:  # another replica may take it
            return "shutting_down", _error(503, str(exc), {"Connection": "close"})
        except ClientDisconnect:  # the client hung up (nobody to answer, no fault of the server), or sent bad HTTP
            if _MALFORMED in request.scope:  # answered already, by the HTTP layer
                return "bad_request", _error(400, request.scope[_MALFORMED])
            return "client_gone", _error(400, "the client closed the connection before its answer")
        except asyncio.CancelledError:  # answered only when the runner cancels every task as the server stops
            if self.service.stopped_at_once:
                why = "the server was stopped at once (a second Ctrl-C or SIGTERM)"
            elif self.service.batcher.closed:  # a second before the exit deadline: a body still arriving, say
                why = "the server stopped at the end of its exit timeout (--exit-timeout-s)"
            else:
                raise
            return "shutting_down", _error(503, f"{why} before this request was answered", {"Connection": "close"})
        except Exception as exc:  # a failed batch: this request learns why, the server goes on
            return "error", _error(500, f"{type(exc).__name__}: {exc}")
        finally:
            held.release()
        return "ok", Response(content, media_type="application/json" if not headers else "application/octet-stream",
                              headers=headers)

    async def config(self, request: Request) -> JSONResponse:
        return self._model_or_404(request) or JSONResponse(
            model_config(self.service.metadata(), self.service.predictor.serving, self.service.predictor.source))

    async def stats(self, request: Request) -> JSONResponse:
        if "name" in request.path_params:
            missing = self._model_or_404(request)
            if missing is not None:
                return missing
        return JSONResponse(self.service.statistics.json(self.service.name))

    async def repository_index(self, request: Request) -> JSONResponse:
        return JSONResponse([{"name": self.service.name, "version": "1", "state": "READY"}])

    async def load(self, request: Request) -> JSONResponse:
        missing = self._model_or_404(request)
        if missing is not None:
            return missing
        try:
            body = json_object(await _read_body(request, _CONTROL_BODY_BYTES) or b"{}")
        except (RequestError, ClientDisconnect) as exc:
            return _error(getattr(exc, "status", 400), f"load: {exc}")
        if body.get("parameters"):
            given = sorted(body["parameters"]) if isinstance(body["parameters"], dict) else body["parameters"]
            return _error(400, f"load: this server loads only its bundle as it now stands, with no parameters; got "
                               f"{given!r}")
        try:
            update = await asyncio.to_thread(self.service.updater.update)
        except Exception as exc:  # noqa: BLE001 - the reason goes to the client and the log; the server goes on
            log_update(None, refusal(exc), self.service.updater.delta)
            return _error(409, f"the bundle was not updated ({refusal(exc)}); {self.service.updater.serving()}")
        log_update(update, update.refused, self.service.updater.delta)
        if update.refused:
            return _error(409, f"the bundle was updated only in part: {update.summary()}; the next delta was not "
                               f"({update.refused})")
        return JSONResponse({"delta": update.delta, "applied": update.applied, "rows_changed": update.rows_changed,
                             "rows_removed": update.rows_removed, "seconds": update.seconds,
                             "paused_s": update.paused_s, "reload_reason": update.reload_reason,
                             "source_checkpoint": update.source and update.source.checkpoint,
                             "source_step": update.source and update.source.step})

    async def unload(self, request: Request) -> JSONResponse:
        return self._model_or_404(request) or _error(
            400, f"unload: tidal serve does not unload its model {self.service.name!r}: it serves one bundle for its "
                 f"lifetime; stop the server (Ctrl-C or SIGTERM) to stop serving it (POST "
                 f"/v2/repository/models/{self.service.name}/load applies the bundle's new deltas)")

    async def fusion(self, request: Request) -> JSONResponse:
        missing = self._model_or_404(request)
        if missing is not None:
            return missing
        if request.method == "PUT":
            try:
                self.service.predictor.set_fusion(Fusion(**json_object(await _read_body(request, _CONTROL_BODY_BYTES))))
            except RequestError as exc:
                return _error(exc.status, f"fusion: {exc}")
            except (ConfigError, TypeError, ClientDisconnect) as exc:
                return _error(400, f"fusion: {exc}")
        return JSONResponse(self.service.predictor.fusion.model_dump())

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.service.metrics.registry), media_type="text/plain; version=0.0.4")

    async def http_error(self, request: Request, exc: HTTPException) -> JSONResponse:  # unknown routes and methods
        return _error(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", exc.headers)


def create_app(service: Service) -> Starlette:
    """The ASGI application of `service`."""
    h = _Handlers(service)
    model_routes = [("", h.model_metadata, ["GET"]), ("/ready", h.model_ready, ["GET"]), ("/infer", h.infer, ["POST"]),
                    ("/config", h.config, ["GET"]), ("/stats", h.stats, ["GET"]), ("/fusion", h.fusion, ["GET", "PUT"])]
    return Starlette(routes=[
        Route("/v2", h.server_metadata), Route("/v2/health/live", h.live), Route("/v2/health/ready", h.ready),
        Route("/v2/models/stats", h.stats), Route("/v2/repository/index", h.repository_index, methods=["POST"]),
        Route("/v2/repository/models/{name}/load", h.load, methods=["POST"]),
        Route("/v2/repository/models/{name}/unload", h.unload, methods=["POST"]),
        *[Route(f"/v2/models/{{name}}{version}{path}", endpoint, methods=methods)
          for version in ("", "/versions/{version}") for path, endpoint, methods in model_routes],
        Route("/metrics", h.metrics),
    ], exception_handlers={HTTPException: h.http_error})


_MESSAGE_CHARS = 2000  # an error message quoting what came is cut here
_CONTROL_BODY_BYTES = 1 << 16  # a fusion or load request's body
_DRAIN_BYTES = 64 << 20  # an oversize body up to this size is read and dropped before the 413
_BODY_TIMEOUT_S = 30.0  # a body must arrive within this
_MALFORMED = "tidal.malformed"  # in a request's ASGI scope: why its body is not valid HTTP
_HEADER_TIMEOUT_S = 10.0  # a request's headers must arrive within this
_HEADER_BYTES = 64 << 10  # and take at most this many bytes
_LOADING_READ_S = 2.0  # the most a request may take while the bundle loads (its head read, its body drained)
_LOADING_ANSWERS_MOST = 256  # connections answered at once while the bundle loads, each on a thread


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    if len(message) > _MESSAGE_CHARS:
        message = f"{message[:_MESSAGE_CHARS]}... ({len(message)} characters)"
    message = message.encode("utf-8", "backslashreplace").decode()  # a lone surrogate a request sent, shown as \udc80
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _unless_gone(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, unless the client hangs up first: then `work` is cancelled (its
    candidates leave the queue unless a batch took them already) and `ClientDisconnect`
    is raised."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(_hung_up(request))
    try:
        await asyncio.wait([task, gone], return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when this request itself is cancelled (the server shutting down)
        gone.cancel()
        abandoned = not task.done()
        if abandoned:
            task.cancel()
    if abandoned:
        raise ClientDisconnect()
    try:
        return task.result()
    finally:  # a refusal's traceback holds this frame, and the task its refusal: a cycle that would keep the
        del task, gone  # request's body until a full collection, which serving holds off (_serving_gc)


async def _hung_up(request: Request) -> None:
    """Return once the client has closed the connection (its body is read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class BodyBudget:
    """The bytes of request bodies held at once, up to `limit`: a request whose body
    would pass it is refused as an overload (503). The event loop's alone: no lock."""

    def __init__(self, limit: int) -> None:
        self.limit, self.held = limit, 0

    def holding(self) -> _Held:
        """What one request holds, given back by its `release`."""
        return _Held(self)


class _Held:
    """The bytes of a `BodyBudget` that one request holds."""

    def __init__(self, budget: BodyBudget) -> None:
        self.budget, self.size = budget, 0

    def take(self, size: int) -> None:
        """Hold `size` more bytes; `Overloaded` where the budget has not that many left."""
        budget = self.budget
        if budget.held + size > budget.limit:
            raise Overloaded(f"the server holds {budget.held:,d} bytes of request bodies, and this one would pass the "
                             f"limit of {budget.limit:,d} (serving.max_held_body_bytes); retry later")
        budget.held += size
        self.size += size

    def release(self) -> None:
        """Give back all this request holds."""
        self.budget.held -= self.size
        self.size = 0


async def _read_body(request: Request, limit: int, setting: str | None = None, held: _Held | None = None) -> bytes:
    """The body, decompressed, or a 413 for one over `limit` (before or after
    decompressing; naming the `setting` that sets it), a 408 for one not sent within 30 s;
    counted in `held` as it comes (an `Overloaded` past its budget)."""
    try:
        body = await asyncio.wait_for(_receive(request, limit, held), _BODY_TIMEOUT_S)
        _check_transfer_coding(request)
        plain = _decompressed(body, _content_coding(request), limit)
        if held is not None and plain is not body:
            held.take(len(plain))
        return plain
    except asyncio.TimeoutError:
        raise RequestError(f"the body did not arrive within {_BODY_TIMEOUT_S:g} s", status=408, closes=True) from None
    except RequestError as exc:
        if exc.status != 413 or setting is None:
            raise
        raise RequestError(f"{exc} ({setting})", status=413, closes=exc.closes) from None


async def _receive(request: Request, limit: int, held: _Held | None) -> bytes:
    """The body as sent, counted in `held`. An oversize body, or one past `held`'s
    budget, (up to 64 MiB) is read to its end before the 413 or 503: a server that
    answers and closes while the client is still sending makes the client's kernel see
    a reset instead of the answer. One declared oversize by a client that waits to be
    asked for it (`Expect: 100-continue`) is refused without asking (if it sends the body
    all the same, the HTTP layer drops it); one past 64 MiB closes the connection."""
    declared = request.headers.get("content-length")
    declared_size = int(declared) if declared is not None and declared.isdigit() else None
    waits = request.headers.get("expect", "").lower() == "100-continue"
    chunks: list[bytes] = []
    size, refused = 0, None
    unread = declared_size is not None and declared_size > _DRAIN_BYTES and not waits  # a body left coming
    try:
        if declared_size is None or (declared_size <= _DRAIN_BYTES and not (waits and declared_size > limit)):
            async for chunk in request.stream():
                size += len(chunk)
                if size <= limit and refused is None:
                    try:
                        if held is not None:
                            held.take(len(chunk))
                        chunks.append(chunk)
                    except Overloaded as exc:  # drained from here on, held no more
                        refused, chunks = exc, []
                        held.release()  # type: ignore[union-attr]
                elif size > _DRAIN_BYTES:
                    unread = True
                    break
        if declared_size is not None and declared_size > limit:
            raise RequestError(f"the body has {declared_size} bytes, over the limit of {limit}", status=413,
                               closes=unread)
        if size > limit:
            raise RequestError(f"the body has more than {limit} bytes, over the limit of {limit}", status=413,
                               closes=unread)
        if refused is not None:
            raise refused
        return b"".join(chunks)
    finally:  # the traceback of a refusal or a hang-up keeps this frame, in cycles only a full collection frees
        chunks.clear()


_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS}


_INFLATE_PIECE = 1 << 16  # bytes of a compressed body given to the inflater at a time


def _check_transfer_coding(request: Request) -> None:
    """Refuse (501) a transfer coding besides chunked (`gzip, chunked`; the HTTP layer
    answers one without chunked itself, 400): the HTTP layer only takes the chunks
    apart, and a body still gzipped would be read as it came."""
    coding = ", ".join(request.headers.getlist("transfer-encoding")).strip().lower()
    if coding not in ("", "chunked"):
        raise RequestError(f"Transfer-Encoding {coding!r} is not supported; send chunked or a Content-Length "
                           f"(compress with Content-Encoding)", status=501)


def _content_coding(request: Request) -> str:
    """The body's Content-Encoding; several such headers are one list (RFC 9110), refused
    by `_decompressed` as one header listing them is."""
    return ", ".join(request.headers.getlist("content-encoding")).strip().lower() or "identity"


def _decompressed(body: bytes, encoding: str, limit: int) -> bytes:
    """`body` decoded from its `Content-Encoding`, at most `limit` bytes of it."""
    if encoding == "identity":
        return body
    if encoding not in _WBITS:
        raise RequestError(f"Content-Encoding {encoding!r} is not supported; send gzip, deflate or none", status=415)
    view, offset, parts, size = memoryview(body), 0, [], 0
    while True:  # a gzip body may hold several members, one after another (RFC 1952)
        inflater = zlib.decompressobj(_WBITS[encoding])
        while not inflater.eof and offset < len(body):  # in pieces: a member's leftover input is a small copy
            piece = view[offset : offset + _INFLATE_PIECE]
            try:
                parts.append(inflater.decompress(piece, limit + 1 - size))
            except zlib.error as exc:
                raise RequestError(f"the body is not valid {encoding} data: {exc}") from None
            size += len(parts[-1])
            if size > limit:
                raise RequestError(f"the body decompresses to more than {limit} bytes, over the limit of {limit}",
                                   status=413)
            offset += len(piece) - len(inflater.unused_data)  # all of it, but what follows the member's end
        if not inflater.eof:
            raise RequestError(f"the {encoding} body ends before its data does")
        if offset == len(body):
            return b"".join(parts)
        if encoding == "deflate":
            raise RequestError(f"the deflate body has {len(body) - offset} bytes after its data ends")


# ---------------------------------------------------------------------- running


_LINGER_S = 2.0  # a refused connection reads and drops what still comes this long at most, then closes
_PIPELINED_MOST = 64  # requests a connection may have waiting behind the one answered before it is read on
_GC_THRESHOLD = (50_000, 50, 50)  # young collections every 50,000 allocations instead of 700


def _refuse_unscored(outputs: dict[str, np.ndarray]) -> None:
    """A 400 naming the candidates whose outputs are not numbers: inputs the checks let
    through (a weighted bag's weight near float32's limit, say) can overflow the network."""
    bad = np.flatnonzero(~np.all([np.isfinite(values) for values in outputs.values()], axis=0))
    if bad.size:
        shown = ", ".join(map(str, bad[:10])) + (", ..." if bad.size > 10 else "")
        raise RequestError(f"the model's outputs are not numbers for {bad.size} of the candidates ({shown}): "
                           f"their inputs overflow its arithmetic (a weight or a number too large, say); "
                           f"nothing was scored")


class _ProcessWide:
    """A setting of the whole process that servers change while they run: the value from
    before the first is put back once the last is done; meanwhile the latest one's holds."""

    def __init__(self, read: Callable[[], Any], write: Callable[[Any], None]) -> None:
        self._read, self._write = read, write
        self._lock = threading.Lock()
        self._users: list[tuple[object, Any]] = []
        self._before: Any = None

    def take(self, user: object, value: Any) -> None:
        with self._lock:
            if not self._users:
                self._before = self._read()
            self._users.append((user, value))
            self._write(value)

    def give_back(self, user: object) -> bool:
        """Whether `user` was the last one (a user that took nothing changes nothing)."""
        with self._lock:
            if all(u is not user for u, _ in self._users):
                return False
            self._users = [(u, v) for u, v in self._users if u is not user]
            self._write(self._users[-1][1] if self._users else self._before)
            return not self._users


_TORCH_THREADS = _ProcessWide(torch.get_num_threads, torch.set_num_threads)  # `serving.dense_threads`
_COLLECTOR = _ProcessWide(gc.get_threshold, lambda threshold: gc.set_threshold(*threshold))


@contextlib.contextmanager
def _serving_gc() -> Iterator[None]:
    """Keep the garbage collector off the request path while serving: objects made at
    start-up (torch, the bundle, the tables) are frozen out of its scans and young
    collections run less often. Measured at concurrency 64: p99 550 ms -> 250 ms,
    because a full collection over start-up objects paused every thread for up to
    300 ms. Restored once the last server of the process stops. A Ctrl-C or SIGTERM
    during the collection comes once it is over: raised in a finalizer the collection
    runs, it would be lost, and the server would serve on."""
    server = object()
    _COLLECTOR.take(server, _GC_THRESHOLD)
    try:
        with deferring_interrupts():
            gc.collect()
            gc.freeze()
        yield
    finally:
        if _COLLECTOR.give_back(server):
            gc.unfreeze()


@dataclass
class RunningServer:
    """A server running in a background thread; `stop()` shuts it down and joins it."""

    url: str
    service: Service
    _server: _Server
    _thread: threading.Thread
    _gc: contextlib.AbstractContextManager

    def stop(self) -> None:
        self._server.begin_exit()
        self._server.should_exit = True
        self._thread.join()
        self._server.end()
        try:
            self.service.close()
        finally:
            self._gc.__exit__(None, None, None)


def _framing_refusal(version: str, headers: list[tuple[bytes, bytes]]) -> tuple[bytes, str] | None:
    """(status, reason) for a request whose framing or host HTTP/1.1 (RFC 9112) refuses and
    a proxy in front might read otherwise; None for one it takes."""
    if version not in ("1.0", "1.1"):
        return b"505 HTTP Version Not Supported", f"HTTP/{version} is not served here; send HTTP/1.1"
    hosts = sum(name == b"host" for name, _ in headers)
    if hosts > 1 or (hosts == 0 and version == "1.1"):
        expected = "one Host header" if version == "1.1" else "at most one Host header"
        return b"400 Bad Request", f"an HTTP/{version} request carries {expected}; this one carries {hosts}"
    if version == "1.0" and any(name == b"transfer-encoding" for name, _ in headers):
        return b"400 Bad Request", "an HTTP/1.0 request has no Transfer-Encoding; send a Content-Length"
    return None


def _protocol_for(service: Service) -> type[_GuardedHttp]:
    """`_GuardedHttp` counting its refusals in `service`'s metrics."""
    return type("_ServiceHttp", (_GuardedHttp,), {"refusals": service.metrics.http_refusals})


class _GuardedHttp(HttpToolsProtocol):
    """uvicorn's HTTP protocol with a deadline and a size limit for each request's headers,
    the framing RFC 9112 refuses refused (`_framing_refusal`), malformed HTTP answered
    with a JSON 400 once the requests before it are (`send_400_response`), and every
    refusal counted and read to the client's end before the connection closes (`_refuse`).

    uvicorn waits as long as a client likes for headers (its keep-alive timeout only
    runs between requests, and any byte restarts it), so a few thousand clients
    trickling them in (slowloris) would hold every file descriptor of the server; and
    it buffers headers of any size. The clock starts when a connection opens and when a
    response completes with no request waiting; a client whose headers are not complete
    within `_HEADER_TIMEOUT_S` gets a 408, one whose headers run past `_HEADER_BYTES` a
    431 (counted from the end of the body of a request answered before it came, a 404
    say), and is disconnected. It also stops reading from a client that sends requests
    without reading the answers, while `_PIPELINED_MOST` wait (uvicorn reads on after
    each answer, parsing as many requests as a read brings).
    """

    _header_deadline: asyncio.TimerHandle | None = None
    _header_bytes = 0
    _header_tail = b""  # the last bytes of headers so far: their end may be split over two reads
    _body_read = True  # the last request's body has all come (one answered unread is still coming)
    _refusal: tuple[bytes, str] | None = None  # why the connection's bytes are no HTTP: answered once those before are
    _framing: tuple[bytes, str] | None = None  # why a request's framing is refused (`_framing_refusal`)
    _answering: RequestResponseCycle | None = None  # the request whose app runs, or last ran
    _lingering = False  # refused: the answer is sent, and the client's bytes are dropped until it stops
    refusals: Counter | None = None  # the service's count of refusals, by status (`_protocol_for`)

    def data_received(self, data: bytes) -> None:
        if self._lingering:  # refused: dropped until the client stops sending
            return
        if self._header_deadline is not None and self._body_read:  # headers under way: count them to their end
            seen = self._header_tail + data
            start = len(seen) - len(seen.lstrip(b"\r\n")) if not self._header_bytes else 0  # empty lines first
            end = seen.find(b"\r\n\r\n", start)
            self._header_bytes += len(data) if end < 0 else end + 4 - len(self._header_tail)
            self._header_tail = seen[-3:]
            if self._header_bytes > _HEADER_BYTES:
                self._stop_header_clock()
                self._refuse(b"431 Request Header Fields Too Large",
                             f"the request headers take more than {_HEADER_BYTES} bytes")
                return
        super().data_received(data)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_header_clock()

    def on_headers_complete(self) -> None:
        self._stop_header_clock()
        self._framing = _framing_refusal(self.parser.get_http_version(), self.headers)
        if self._framing is not None:  # the parser stops here, and uvicorn calls `send_400_response`
            raise RequestError(self._framing[1])
        super().on_headers_complete()  # which may refuse the URL: then no request began
        self._body_read = False

    def on_message_complete(self) -> None:
        self._body_read = True
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # which reads on, and starts the next request of the pipeline
        if self._refusal is not None:  # what follows on the connection is not HTTP: nothing more is read
            self.flow.pause_reading()
            self._refuse_once_answered()
            return
        if len(self.pipeline) >= _PIPELINED_MOST:  # a client sending requests without reading answers: wait
            self.flow.pause_reading()
        if self.cycle is None or self.cycle.response_complete:  # no request of the pipeline started
            self._start_header_clock()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_clock()
        super().connection_lost(exc)

    def _start_header_clock(self) -> None:
        self._stop_header_clock()
        self._header_bytes, self._header_tail = 0, b""
        self._header_deadline = self.loop.call_later(_HEADER_TIMEOUT_S, self._headers_too_late)

    def _stop_header_clock(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_late(self) -> None:
        self._header_deadline = None
        self._refuse(b"408 Request Timeout", f"the request headers did not arrive within {_HEADER_TIMEOUT_S:g} s")

    def send_400_response(self, msg: str) -> None:
        """What HTTP/1.1 cannot parse (a request line, a header, a chunk of a body) or
        `_framing_refusal` refuses: answered with the reason as every other refusal (a 505
        for another HTTP version, else a 400) once the requests before it on the
        connection are answered. A request whose body broke off this way counts as a bad
        request, not as a client that hung up."""
        parsing = sys.exc_info()[1]  # uvicorn calls this while handling the parser's error
        if isinstance(parsing, httptools.HttpParserCallbackError) and parsing.__context__ is not None:
            parsing = parsing.__context__  # what a callback refused, the URL say
        reason = str(parsing) if parsing is not None and str(parsing) else msg
        status, refusal = self._framing or (
            (b"505 HTTP Version Not Supported", f"{reason}; send HTTP/1.1") if reason == "Invalid HTTP version"
            else (b"400 Bad Request", f"the request is not valid HTTP/1.1: {reason}"))
        broken = self.cycle if not self._body_read else None  # the request whose body broke, if one did
        if broken is not None:
            broken.scope[_MALFORMED] = reason
            waiting = [entry for entry in self.pipeline if entry[0] is broken]
            if waiting:  # not started: never will be
                self.pipeline.remove(waiting[0])
            else:  # its app hears that the client is gone; its answer goes nowhere
                broken.disconnected = True
                broken.message_event.set()
        self._stop_header_clock()
        self.flow.pause_reading()
        self._refusal = (status, refusal)
        self._refuse_once_answered()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        self._answering = cycle
        super()._start_asgi_task(cycle, app)

    def _refuse_once_answered(self) -> None:
        """Send the pending refusal of malformed HTTP once no request is being answered."""
        answering = self._answering
        if self._refusal is not None and not self.pipeline and (
                answering is None or answering.response_complete or answering.disconnected):
            self._refuse(*self._refusal)

    def _refuse(self, status: bytes, message: str) -> None:
        """Answer `status` with `message` as the error and close the connection once the
        client stops sending, or after `_LINGER_S`: closed with its bytes unread, the
        connection would make the client's kernel see a reset, which can reach it
        before the answer does (headers of megabytes, say)."""
        if self.transport.is_closing() or self._lingering:
            return
        if self.refusals is not None:
            self.refusals.labels(status.split()[0].decode()).inc()
        self.transport.write(_raw_response(status, json.dumps({"error": message}).encode()))
        self._lingering = True  # what comes from here on is read and dropped
        self._stop_header_clock()
        self.flow.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(_LINGER_S, self.transport.close)


def _input_parameters(spec: InputSpec, is_context: bool) -> dict:
    """What a client needs to know of an input beyond its type: whose value it is (a
    context input may come once for every candidate), and how its bags are split
    (values, and a value's weight)."""
    splits = {"separator": spec.separator, "weight_separator": spec.weight_separator}
    return {"side": "context" if is_context else spec.side, **{k: v for k, v in splits.items() if v is not None}}


_EXIT_TIMEOUT_S = 30.0  # as Triton's --exit-timeout-secs
_LAST_ANSWERS_S = 1.0  # before the exit deadline: requests still queued are answered 503


class _Server(uvicorn.Server):
    """uvicorn's server that, once told to stop, answers the requests still queued a
    second before its deadline (uvicorn would cancel them, each with a bare 500)."""

    def __init__(self, service: Service, exit_timeout_s: float) -> None:
        if service.closed:
            raise ConfigError("this Service was closed (a server's stop closes the service it served): it would "
                              "answer every request 503; serve a new Service of the bundle")
        self._service = service
        super().__init__(uvicorn.Config(create_app(service), log_level="warning", access_log=False, lifespan="off",
                                        http=_protocol_for(service), loop="uvloop",
                                        timeout_graceful_shutdown=exit_timeout_s))
        self._refuse_queued = threading.Timer(max(0.0, exit_timeout_s - _LAST_ANSWERS_S), service.batcher.close)
        self._refuse_queued.daemon = True
        self._exiting = False

    def handle_exit(self, sig: int, frame: object) -> None:  # uvicorn's signal handler
        if self._exiting and sig == signal.SIGTERM:  # a second SIGTERM stops at once, as a second Ctrl-C does
            self.force_exit = True
        self.begin_exit()
        super().handle_exit(sig, frame)
        self._service.stopped_at_once = self.force_exit

    def begin_exit(self) -> None:
        """Start the clock of the requests still queued (once)."""
        if not self._exiting:
            self._exiting = True
            self._refuse_queued.start()

    def end(self) -> None:
        self._refuse_queued.cancel()


def listen(host: str, port: int) -> socket.socket:
    """A socket listening on (host, port) for `serve` (port 0: any free port); a port
    in use raises `OSError` here, before anything else starts (until the server runs,
    `LoadingAnswers` answers its connections, or they wait in its backlog)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # at once: two sockets that only bind may share a port, and the second never serves
    except OSError:
        sock.close()
        raise
    return sock


class LoadingAnswers:
    """Answers on a listening socket while the bundle loads, before the server takes it
    over: `GET /v2/health/live` 200 (the process is alive, as Triton answers during a
    load, so an orchestrator's liveness probe does not kill a server loading a large
    bundle) and every other request 503 with Retry-After, its `ready` included. Each
    connection, on a thread of its own (a slow client holds up no probe), gets one
    answer within `_LOADING_READ_S` and is closed; past `_LOADING_ANSWERS_MOST` at once,
    the next connections wait in the listen backlog. `stop` hands the socket on."""

    def __init__(self, sock: socket.socket, loading: str) -> None:
        self._sock = sock
        self._body = json.dumps({"error": f"not ready: loading {loading}"}).encode()
        self._stopping = threading.Event()
        self._answering = threading.BoundedSemaphore(_LOADING_ANSWERS_MOST)
        self._thread = threading.Thread(target=self._accept_until_stopped, name="tidal-loading", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Accept no more connections (those accepted end on their own, within their deadline)."""
        self._stopping.set()
        self._thread.join()

    def _accept_until_stopped(self) -> None:
        while not self._stopping.is_set():
            if not self._answering.acquire(timeout=0.05):
                continue
            try:
                conn = self._sock.accept()[0] if select.select([self._sock], [], [], 0.05)[0] else None
            except OSError:  # the client left already
                conn = None
            if conn is None:
                self._answering.release()
                continue
            try:
                threading.Thread(target=self._answer, args=(conn,), name="tidal-loading-answer", daemon=True).start()
            except RuntimeError:  # no thread to be had: this client retries
                conn.close()
                self._answering.release()

    def _answer(self, conn: socket.socket) -> None:
        deadline = time.monotonic() + _LOADING_READ_S
        with conn:
            try:
                head = _read_head(conn, deadline)
                method, _, rest = head.partition(b" ")
                live = method in (b"GET", b"HEAD") and rest.split(b" ", 1)[0].rstrip(b"/") == b"/v2/health/live"
                if live:
                    conn.sendall(_raw_response(b"200 OK", b""))
                elif head:
                    conn.sendall(_raw_response(b"503 Service Unavailable", self._body, b"retry-after: 1\r\n"))
                    conn.shutdown(socket.SHUT_WR)
                    _drain(conn, deadline)  # a body left unread would reset the connection before the answer is read
            except OSError:  # timed out, or the client left
                pass
            finally:
                self._answering.release()


def _read_head(conn: socket.socket, deadline: float) -> bytes:
    """A request's head (its bytes up to the empty line, or up to `_HEADER_BYTES`);
    b"" if the client sent none before `deadline`."""
    head = b""
    while b"\r\n\r\n" not in head and len(head) <= _HEADER_BYTES:
        conn.settimeout(max(0.0, deadline - time.monotonic()))
        chunk = conn.recv(65536)
        if not chunk:
            break
        head += chunk
    return head


def _drain(conn: socket.socket, deadline: float) -> None:
    """Read and drop what the client still sends, until it closes or `deadline`."""
    while time.monotonic() < deadline:
        conn.settimeout(max(0.0, deadline - time.monotonic()))
        if not conn.recv(65536):
            return


def _raw_response(status: bytes, body: bytes, headers: bytes = b"") -> bytes:
    """An HTTP/1.1 response that closes its connection, written out (off the ASGI app)."""
    return (b"HTTP/1.1 %s\r\ncontent-type: application/json\r\nconnection: close\r\n%scontent-length: %d\r\n\r\n%s"
            % (status, headers, len(body), body))


def start_server(service: Service, *, host: str = "127.0.0.1", port: int = 0,
                 exit_timeout_s: float = _EXIT_TIMEOUT_S) -> RunningServer:
    """Serve `service` from a background thread (port 0: any free port); returns once it listens."""
    sock = listen(host, port)
    server = _Server(service, exit_timeout_s)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="tidal-server", daemon=True)
    quiet_gc = _serving_gc()
    try:
        quiet_gc.__enter__()
    except BaseException:  # a Ctrl-C during its collection
        sock.close()
        raise
    thread.start()
    while not server.started:
        if not thread.is_alive():
            quiet_gc.__exit__(None, None, None)
            raise RuntimeError("the server thread stopped while starting")
        time.sleep(0.01)
    return RunningServer(url=f"http://{host}:{sock.getsockname()[1]}", service=service, _server=server, _thread=thread,
                         _gc=quiet_gc)


def serve(service: Service, sock: socket.socket, *, exit_timeout_s: float = _EXIT_TIMEOUT_S) -> None:
    """Serve `service` on `sock` (from `listen`) in this thread until interrupted (Ctrl-C
    or SIGTERM; see the module docstring). uvicorn passes the signal on once it has
    stopped: either one then raises KeyboardInterrupt here, after the service closed."""
    with sigterm_interrupts():
        server = None
        try:
            server = _Server(service, exit_timeout_s)
            with _serving_gc():
                server.run(sockets=[sock])
        finally:
            if server is not None:
                server.end()
            service.close()


