"""The server over real HTTP, driven by tritonclient and by raw bad requests."""

from __future__ import annotations

import asyncio
import gc
import gzip
import http.client
import json
import os
import re
import signal
import socket
import struct
import zlib
from email.message import Message
from pathlib import Path
import threading
import time
import urllib.error
import urllib.request
import weakref
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import numpy as np
import pytest
import tritonclient.http as triton
from starlette.requests import Request
from serving_helpers import file_rows, numpy_strings, until, with_user_of

from tidal.config import RunConfig
from tidal.errors import ConfigError
from tidal.runtime import Trainer
from tidal.serving import RequestError, Service, export, load_bundle, start_server
from tidal.serving.protocol import decode_request, infer_request, input_specs
from tidal.serving.server import _GC_THRESHOLD as SERVING_GC_THRESHOLD


@pytest.fixture(scope="module")
def server(bundle):
    running = start_server(Service(bundle, name="ctr", max_body_bytes=1 << 20))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return triton.InferenceServerClient(server.url.removeprefix("http://"), concurrency=8)


@pytest.fixture(scope="module")
def rows(trainer):
    return file_rows(trainer, 200)


def _inputs(rows, specs, *, binary: bool, skip_user: bool = False) -> list:
    inputs = []
    for spec in specs.values():
        if skip_user and spec.side != "item":
            continue
        values = rows.column(spec.name).to_pylist()
        values = values[:1] if spec.side != "item" else values
        tensor = triton.InferInput(spec.name, [len(values)], "BYTES")
        tensor.set_data_from_numpy(numpy_strings(values), binary_data=binary)
        inputs.append(tensor)
    return inputs


def _expected(server, rows) -> np.ndarray:
    return server.service.predictor.predict([_piece(server, rows)])


def _piece(server, rows):
    import pyarrow as pa

    from tidal.serving import Piece

    predictor = server.service.predictor
    return Piece(items=pa.RecordBatch.from_pydict({c: rows.column(c) for c in predictor.item_columns}),
                 user=pa.RecordBatch.from_pydict({c: rows.column(c).slice(0, 1) for c in predictor.user_columns}))


def _post(server, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict, Message]:
    request = urllib.request.Request(server.url + path, data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), exc.headers


def test_health_and_metadata_through_tritonclient(server, client):
    assert server.url.startswith("http://127.0.0.1:")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("ctr")
    assert set(client.get_server_metadata()["extensions"]) >= {  # the Triton extensions the tests here use
        "binary_tensor_data", "sequence", "model_repository", "model_configuration", "statistics", "parameters"}
    metadata = client.get_model_metadata("ctr")
    inputs = {i["name"]: i for i in metadata["inputs"]}
    assert inputs["C1"]["parameters"]["side"] == "both" and inputs["C9"]["shape"] == [-1]
    assert inputs["I3"]["datatype"] == "FP64" and inputs["C7.lengths"]["optional"]
    assert [o["name"] for o in metadata["outputs"]] == ["ctr", "cvr", "score"]
    assert not client.is_model_ready("other")


def test_model_metadata_says_side_context_when_an_input_may_come_once_for_every_candidate():
    from tidal.serving.protocol import InputSpec
    from tidal.serving.server import _input_parameters

    spec = InputSpec(name="hour", kind="ids", side="item")  # a context column's spec, as manifests hold it
    assert _input_parameters(spec, True) == {"side": "context"} and _input_parameters(spec, False) == {"side": "item"}


_LARGE_ID = 1 << 62  # past float64's exact integers: read as anything but int64, another id


def _integer_id_config(root) -> RunConfig:
    """One column of each kind: a hashed user, integer item ids (hashed: false), a price."""
    lines = ["label,user,item_id,price"]
    lines += [f"{k % 2},u{k % 7},{_LARGE_ID + k % 13},{k % 5 + 0.5}" for k in range(1_024)]
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return RunConfig(
        data={"train": str(root / "train.csv"), "batch_size": 256},
        features=[{"kind": "sparse", "name": "user", "columns": ["user"], "table": "ids", "side": "user"},
                  {"kind": "sparse", "name": "item", "columns": ["item_id"], "table": "ids", "hashed": False},
                  {"kind": "dense", "name": "price", "column": "price"},
                  {"kind": "label", "name": "click", "column": "label"}],
        tables=[{"name": "ids", "dim": 4}],
        model={"kind": "dlrm", "bottom_sizes": [4], "hidden_sizes": [8]},
        training={"epochs": 1, "log_every": 1000, "run_dir": str(root / "run")},
        serving={"buckets": [1, 8], "max_batch_rows": 8, "chunk_rows": 8})


def _from_metadata(metadata: dict, values: dict[str, list]) -> list:
    """tritonclient inputs of `values`, each of the datatype the model metadata gives it."""
    inputs = []
    for described in metadata["inputs"]:
        if described["name"] not in values:
            continue
        datatype, data = described["datatype"], values[described["name"]]
        array = numpy_strings(data) if datatype == "BYTES" else np.array(data, dtype=triton.triton_to_np_dtype(datatype))
        tensor = triton.InferInput(described["name"], [len(data)], datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def test_metadata_gives_integer_ids_as_int64_and_a_request_of_its_datatypes_scores_as_the_files_strings(tmp_path):
    trainer = Trainer(_integer_id_config(tmp_path))
    trainer.fit()
    running = start_server(Service(load_bundle(export(trainer.run_dir, tmp_path / "bundle")), name="ranker"))
    try:
        client = triton.InferenceServerClient(running.url.removeprefix("http://"))
        metadata, config = client.get_model_metadata("ranker"), client.get_model_config("ranker")
        assert {i["name"]: i["datatype"] for i in metadata["inputs"]} == \
               {"user": "BYTES", "item_id": "INT64", "price": "FP64"}
        assert {i["name"]: i["data_type"] for i in config["input"]} == \
               {"user": "TYPE_STRING", "item_id": "TYPE_INT64", "price": "TYPE_FP64"}
        ids = [_LARGE_ID + k for k in (3, 12, 0)]
        misses = running.service.predictor.id_counts()[1]
        typed = client.infer("ranker", _from_metadata(metadata, {"user": ["u2"], "item_id": ids,
                                                                 "price": [0.5, 2.5, 4.5]}))
        assert running.service.predictor.id_counts()[1] == misses  # every id found: read as it was sent
        strings = {"user": ["u2"], "item_id": [str(i) for i in ids], "price": ["0.5", "2.5", "4.5"]}
        body = {"inputs": [{"name": n, "datatype": "BYTES", "shape": [len(v)], "data": v} for n, v in strings.items()]}
        status, as_files, _ = _post(running, "/v2/models/ranker/infer", json.dumps(body).encode())
        assert status == 200
        np.testing.assert_array_equal(typed.as_numpy("score"), np.float32(as_files["outputs"][-1]["data"]))
    finally:
        running.stop()


def test_model_config_statistics_and_repository_index_through_tritonclient(bundle, rows):
    from tidal.serving import split_rows

    running = start_server(Service(bundle, name="ranker", chunk_rows=64))
    try:
        client = triton.InferenceServerClient(running.url.removeprefix("http://"))
        config, metadata = client.get_model_config("ranker"), client.get_model_metadata("ranker")
        assert [(i["name"], i["dims"]) for i in config["input"]] == [(i["name"], i["shape"]) for i in metadata["inputs"]]
        assert config["max_batch_size"] == 0 and config["output"][-1] == {"name": "score", "data_type": "TYPE_FP32",
                                                                          "dims": [-1]}
        assert "dynamic_batching" not in config and "sequence_batching" not in config  # not Triton's meanings
        buckets = ",".join(map(str, bundle.config.serving.buckets))
        assert config["parameters"]["buckets"] == {"string_value": buckets}
        assert config["parameters"]["chunk_rows"] == {"string_value": "64"}
        assert {"max_body_bytes", "session_memory_bytes", "dense_threads", "backend"} <= set(config["parameters"])
        assert "fusion" not in config["parameters"] and "delta_poll_s" not in config["parameters"]  # its route; unset
        assert client.get_model_config("ranker", "1") == config
        assert client.get_model_repository_index() == [{"name": "ranker", "version": "1", "state": "READY"}]
        assert client.get_inference_statistics("ranker")["model_stats"][0]["execution_count"] == 0
        specs = input_specs(bundle.config)
        candidates = with_user_of(rows.slice(0, 200), specs)
        for _ in range(3):
            client.infer("ranker", _inputs(candidates, specs, binary=True))
        assert _post(running, "/v2/models/ranker/infer", b"{")[0] == 400
        stats = client.get_inference_statistics("ranker")["model_stats"][0]
        phases, batches = stats["inference_stats"], stats["batch_stats"]
        assert (phases["success"]["count"], phases["fail"]["count"], stats["inference_count"]) == (3, 1, 600)
        assert phases["queue"]["count"] == 3 * len(split_rows(200, 64))
        assert stats["execution_count"] == phases["compute_infer"]["count"] == sum(b["compute_infer"]["count"]
                                                                                 for b in batches)
        assert sum(b["batch_size"] * b["compute_input"]["count"] for b in batches) == 600
        assert all(phases[p]["ns"] > 0 for p in ("success", "fail", "queue", "compute_input", "compute_infer"))
        assert stats["last_inference"] > 0
        assert client.get_inference_statistics()["model_stats"] == [stats]
        with pytest.raises(triton.InferenceServerException, match="unknown model 'other'"):
            client.get_model_config("other")
    finally:
        running.stop()


@pytest.mark.parametrize("binary", [False, True])
def test_infer_with_json_and_binary_tensors(server, client, rows, binary):
    specs = input_specs(server.service.predictor.config)
    candidates = with_user_of(rows.slice(0, 100), specs)
    result = client.infer("ctr", _inputs(candidates, specs, binary=binary),
                          outputs=[triton.InferRequestedOutput(n, binary_data=binary) for n in ("ctr", "cvr", "score")])
    expected = _expected(server, candidates)
    np.testing.assert_allclose(result.as_numpy("ctr"), expected[:, 0], rtol=1e-5)
    np.testing.assert_allclose(result.as_numpy("cvr"), expected[:, 1], rtol=1e-5)
    np.testing.assert_allclose(result.as_numpy("score"), expected[:, 0] * expected[:, 1] ** 0.5, rtol=1e-5)


def test_tritonclients_classification_request_gets_a_400(server, client, rows):
    specs = input_specs(server.service.predictor.config)
    with pytest.raises(triton.InferenceServerException, match="classification asks for Triton's classification "
                                                              "extension, which this server does not have"):
        client.infer("ctr", _inputs(with_user_of(rows.slice(0, 3), specs), specs, binary=True),
                     outputs=[triton.InferRequestedOutput("ctr", class_count=2)])


def test_a_full_sequence_start_pages_end(server, client, rows):
    specs = input_specs(server.service.predictor.config)
    candidates = with_user_of(rows.slice(0, 90), specs)
    expected = _expected(server, candidates)
    pages = [candidates.slice(k, 30) for k in (0, 30, 60)]
    scores = [client.infer("ctr", _inputs(pages[0], specs, binary=True), sequence_id=77, sequence_start=True)]
    scores.append(client.infer("ctr", _inputs(pages[1], specs, binary=True, skip_user=True), sequence_id=77))
    scores.append(client.infer("ctr", _inputs(pages[2], specs, binary=True, skip_user=True), sequence_id=77,
                               sequence_end=True))
    np.testing.assert_allclose(np.concatenate([s.as_numpy("ctr") for s in scores]), expected[:, 0], rtol=1e-5)
    with pytest.raises(triton.InferenceServerException, match="sequence 77 is unknown: it has ended"):
        client.infer("ctr", _inputs(pages[1], specs, binary=True, skip_user=True), sequence_id=77)
    assert len(server.service.sessions) == 0
    client.infer("ctr", _inputs(pages[0], specs, binary=True), sequence_id=78, sequence_start=True)
    assert len(server.service.sessions) == 1
    with pytest.raises(triton.InferenceServerException, match='sequence "78" is unknown: never started'):
        client.infer("ctr", _inputs(pages[1], specs, binary=True, skip_user=True), sequence_id="78")  # not 78
    ended = client.infer("ctr", [], sequence_id=78, sequence_end=True)  # an end without candidates
    assert ended.as_numpy("score").shape == (0,) and len(server.service.sessions) == 0


def test_expired_sessions_leave_on_a_stateless_request_or_a_metrics_scrape(bundle, rows):
    running = start_server(Service(bundle, name="ctr", session_ttl_s=0.2))
    try:
        client = triton.InferenceServerClient(running.url.removeprefix("http://"))
        specs = input_specs(running.service.predictor.config)
        page = with_user_of(rows.slice(0, 5), specs)
        for sequence in (1, 2):
            client.infer("ctr", _inputs(page, specs, binary=True), sequence_id=sequence, sequence_start=True)
        assert len(running.service.sessions) == 2
        time.sleep(0.3)
        metrics = urllib.request.urlopen(running.url + "/metrics").read().decode()
        assert "tidal_session_cache_entries 0.0" in metrics and "tidal_session_cache_expired_total 2.0" in metrics
        client.infer("ctr", _inputs(page, specs, binary=True), sequence_id=3, sequence_start=True)
        time.sleep(0.3)
        client.infer("ctr", _inputs(page, specs, binary=True))  # stateless
        assert len(running.service.sessions) == 0 and running.service.sessions.bytes == 0
    finally:
        running.stop()


def test_the_fusion_changes_on_the_running_server(server, rows):
    specs = input_specs(server.service.predictor.config)
    body = json.dumps(infer_request(with_user_of(rows.slice(0, 5), specs), specs)).encode()
    _, before, _ = _post(server, "/v2/models/ctr/infer", body)
    change = urllib.request.Request(server.url + "/v2/models/ctr/fusion", method="PUT",
                                    data=json.dumps({"kind": "sum", "weights": {"ctr": 2.0}}).encode())
    try:
        with urllib.request.urlopen(change) as response:
            assert json.loads(response.read()) == {"kind": "sum", "weights": {"ctr": 2.0}}
        _, after, _ = _post(server, "/v2/models/ctr/infer", body)
    finally:
        server.service.predictor.set_fusion(server.service.predictor.config.serving.fusion)
    ctr = np.array(after["outputs"][0]["data"])
    np.testing.assert_allclose(after["outputs"][2]["data"], 2 * ctr, rtol=1e-6)
    assert before["outputs"][2]["data"] != after["outputs"][2]["data"]


def _put_fusion(server, body: bytes) -> tuple[int, dict]:
    change = urllib.request.Request(server.url + "/v2/models/ctr/fusion", method="PUT", data=body)
    try:
        with urllib.request.urlopen(change, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize("body, reason", [
    (b'{"kind": "max"}', "kind"),
    (b'{"kind": "sum", "weights": {"ltv": 1.0}}', "ltv"),
    (b'{"kind": "product", "weights": {"ctr": -1.0}}', "powers must be >= 0"),
    (b'{"kind": "product", "weights": {"ctr": 0.0}}', "every weight is 0, so every candidate would score the same"),
    (b'{"kind": ', "not valid JSON"),
    (b'{"kind": "sum", "weights": {"ctr": 1e39}}', "add up (in absolute value) to at most 3.403e+38"),
    (b'{"kind": "sum", "weights": {"ctr": true}}', "weights.ctr: Input should be a valid number, got True"),
    (b'{"kind": "sum", "weights": {"ctr": ' + b"1" * 5000 + b"}}", "not valid JSON"),
    (b'{"kind": "sum", "weights": {"ctr": "' + b"a" * 50_000 + b'"}}', "... (50002 characters)"),
    (b'{"self": 1}', "unknown key 'self'; allowed: kind, weights"),
])
def test_a_bad_fusion_gets_a_400_naming_it_and_the_old_fusion_stays(server, body, reason):
    before = json.loads(urllib.request.urlopen(server.url + "/v2/models/ctr/fusion", timeout=30).read())
    code, answer = _put_fusion(server, body)
    assert code == 400 and answer["error"].startswith("fusion:") and reason in answer["error"], answer
    assert json.loads(urllib.request.urlopen(server.url + "/v2/models/ctr/fusion", timeout=30).read()) == before


def test_a_fusion_body_over_its_limit_gets_a_413(server):
    code, answer = _put_fusion(server, b'{"kind": "sum", "weights": {"ctr": "' + b"a" * (1 << 20) + b'"}}')
    assert code == 413 and answer["error"].endswith("over the limit of 65536") and len(answer["error"]) < 200


def test_a_session_idle_past_the_servers_ttl_has_expired(bundle, rows):
    running = start_server(Service(bundle, name="ctr", session_ttl_s=0.5))
    try:
        specs = input_specs(running.service.predictor.config)
        page = with_user_of(rows.slice(0, 4), specs)
        start = infer_request(page, specs) | {"parameters": {"sequence_id": 9, "sequence_start": True}}
        more = infer_request(page, specs) | {"parameters": {"sequence_id": 9}}
        more["inputs"] = [t for t in more["inputs"] if specs[t["name"]].side == "item"]  # the session holds those
        assert _post(running, "/v2/models/ctr/infer", json.dumps(start).encode())[0] == 200
        assert _post(running, "/v2/models/ctr/infer", json.dumps(more).encode())[0] == 200
        time.sleep(1.0)
        code, answer, _ = _post(running, "/v2/models/ctr/infer", json.dumps(more).encode())
        assert code == 400 and "expired" in answer["error"], answer
    finally:
        running.stop()


def test_serving_settings_given_to_the_service_replace_the_bundles(bundle, rows):
    """Buckets and fusion given at serve time are the ones used, and score as the
    bundle's own; a largest bucket over what the exported program takes is refused."""
    from tidal.config import Fusion
    from tidal.serving.protocol import decode_request

    fusion = Fusion(kind="sum", weights={"ctr": 2.0})
    plain, service = Service(bundle), Service(bundle, buckets=[2, 8, 32], fusion=fusion)
    try:
        assert service.predictor.buckets == [2, 8, 32] and service.predictor.fusion == fusion
        assert (service.settings.max_batch_rows, service.settings.chunk_rows) == (32, 32)  # lowered to fit
        specs = input_specs(bundle.config)
        page = with_user_of(rows.slice(0, 40), specs)
        columns = decode_request(json.dumps(infer_request(page, specs)).encode(), None, specs, []).columns
        probabilities = service.predictor.predict([service.predictor.piece(columns, 40)])
        assert np.allclose(probabilities, plain.predictor.predict([plain.predictor.piece(columns, 40)]), atol=1e-6)
        assert np.allclose(service.predictor.fuse(probabilities), 2.0 * probabilities[:, 0])
    finally:
        plain.close()
        service.close()
    largest = bundle.config.serving.buckets[-1]
    with pytest.raises(ConfigError, match=f"buckets: the largest, {2 * largest}, is over the largest batch the bundle"):
        Service(bundle, buckets=[1, 2 * largest])


def test_servers_overlapping_in_one_process_put_torchs_threads_and_the_gc_back_as_they_were(bundle):
    """Each server sets torch's thread count (dense_threads) and the collector's
    thresholds for the whole process: the latest one running holds, and once the last
    stops the values from before the first come back, in whatever order they stop."""
    torch = pytest.importorskip("torch")
    threads, thresholds = torch.get_num_threads(), gc.get_threshold()
    servers = [start_server(Service(bundle, name="first", dense_threads=threads + 2))]
    try:
        servers.append(start_server(Service(bundle, name="second", dense_threads=threads + 1)))
        assert (torch.get_num_threads(), gc.get_threshold()) == (threads + 1, SERVING_GC_THRESHOLD)
        servers.pop(0).stop()
        assert (torch.get_num_threads(), gc.get_threshold()) == (threads + 1, SERVING_GC_THRESHOLD)  # the second runs
    finally:
        for running in servers:
            running.stop()
    assert (torch.get_num_threads(), gc.get_threshold()) == (threads, thresholds)


def test_a_ctrl_c_while_a_server_starts_leaves_the_collector_and_the_port_as_they_were(bundle, monkeypatch,
                                                                                     ctrl_c_raises):
    thresholds, frozen, listening = gc.get_threshold(), gc.get_freeze_count(), _listening_sockets()
    service = Service(bundle, name="ctr")
    _signal_inside_the_next_collection(monkeypatch, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        start_server(service, port=0)
    service.close()
    assert (gc.get_threshold(), _listening_sockets()) == (thresholds, listening)
    assert frozen or gc.get_freeze_count() == 0  # unfrozen, unless another server of the process keeps it so


def _signal_inside_the_next_collection(monkeypatch, sig: int) -> None:
    """The next `gc.collect()` of the main thread sends `sig` from inside the collection,
    where finalizers run Python code. One that another thread's collection under way
    makes return at once (it collects nothing, calls no callback) is tried again."""
    collect, sent = gc.collect, []

    def inside(phase: str, info: dict) -> None:
        if phase == "start" and not sent and threading.current_thread() is threading.main_thread():
            sent.append(sig)
            signal.raise_signal(sig)
            (lambda: None)()  # Python code inside the collection: where the handler runs

    def collecting(*args: int) -> int:
        gc.callbacks.append(inside)
        try:
            while not sent:
                collect(*args)
        finally:
            gc.callbacks.remove(inside)
        return 0

    monkeypatch.setattr(gc, "collect", collecting)


def _listening_sockets() -> set[str]:
    """This process's listening sockets, by inode."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if not (inode := os.readlink(f"/proc/self/fd/{fd}")).startswith("socket:"):
                continue
            with socket.socket(fileno=os.dup(int(fd))) as probe:
                if probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    found.add(inode)
        except OSError:  # closed meanwhile
            continue
    return found


def test_a_sigterm_while_the_server_freezes_its_start_up_objects_stops_it(monkeypatch):
    """The collection at a server's start runs finalizers, in which a KeyboardInterrupt
    would be lost: the signal is taken once it is over, and stops the server then."""
    from tidal.processes import SIGTERM_CAME, sigterm_interrupts
    from tidal.serving.server import _serving_gc

    _signal_inside_the_next_collection(monkeypatch, signal.SIGTERM)
    try:
        with sigterm_interrupts(), pytest.raises(KeyboardInterrupt):
            with _serving_gc():
                pytest.fail("the server went on to serve")
    finally:
        SIGTERM_CAME.clear()  # it came: a training step of a later test would stop on it


def _bad_requests(rows, specs) -> list[tuple[bytes, dict, int, str]]:
    """(body, headers, status, reason) of every kind of bad request."""
    good = infer_request(rows, specs)

    def altered(change) -> bytes:  # type: ignore[no-untyped-def]
        body = json.loads(json.dumps(good))
        change(body)
        return json.dumps(body).encode()

    def tensor(body: dict, name: str) -> dict:
        return next(t for t in body["inputs"] if t["name"] == name)

    binary = json.dumps({"inputs": [{"name": "C9", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": 9}}]}).encode()
    fp32 = json.dumps({"inputs": [{"name": "I5", "datatype": "FP32", "shape": [2],
                                   "parameters": {"binary_data_size": 6}}]}).encode()
    huge = json.dumps({"inputs": [{"name": "C9", "datatype": "BYTES", "shape": [2**40],
                                   "parameters": {"binary_data_size": 8}}]}).encode()
    gzipped = gzip.compress(json.dumps(good).encode())
    return [
        (b'{"inputs": [', {}, 400, "not valid JSON"),
        (json.dumps(good).replace('"inputs"', '"inputs": [], "inputs"', 1).encode(), {}, 400,
         "the key 'inputs' comes twice in one JSON object"),
        (json.dumps(good).encode("utf-16"), {}, 400, "not UTF-8 text"),
        (b"", {}, 400, "the request has no body; expected"),
        (b"[1, 2]", {}, 400, "expected a JSON object"),
        (altered(lambda b: tensor(b, "C9").update(datatype="FP32", data=[1.5] * rows.num_rows)), {}, 400,
         "ids must be BYTES, INT64 or INT32"),
        (altered(lambda b: tensor(b, "C9").update(datatype="COMPLEX")), {}, 400, "datatype must be one of"),
        (altered(lambda b: tensor(b, "C9").update(shape=[rows.num_rows, 2])), {}, 400, "shape must be"),
        (altered(lambda b: tensor(b, "C9").update(shape=[rows.num_rows + 1])), {}, 400, "data must be a list of"),
        (altered(lambda b: b["inputs"].pop(5)), {}, 400, "missing inputs"),
        (altered(lambda b: b["inputs"].append({"name": "C99", "datatype": "BYTES", "shape": [1], "data": ["x"]})),
         {}, 400, "unknown inputs"),
        (altered(lambda b: tensor(b, "I5").update(data=["1"] * (rows.num_rows - 1) + ["inf"])), {}, 400,
         "must be finite"),
        (altered(lambda b: tensor(b, "I5").update(datatype="FP64", data=[float("inf")] * rows.num_rows)), {}, 400,
         "must be finite"),
        (altered(lambda b: tensor(b, "I5").update(data=["many"] * rows.num_rows)), {}, 400, "must be numbers"),
        (altered(lambda b: tensor(b, "I1").update(shape=[2], data=["1", "2"])), {}, 400, "one value per request"),
        (altered(lambda b: b.update(parameters={"sequence_id": 5})), {}, 400, "carries no user inputs"),
        (altered(lambda b: b.update(parameters={"sequence_id": 404, "sequence_start": False})
                 or [b["inputs"].remove(t) for t in list(b["inputs"]) if specs[t["name"]].side != "item"]),
         {}, 400, "sequence 404 is unknown"),
        (altered(lambda b: tensor(b, "C9").update(parameters=[1])), {}, 400, "parameters must be an object"),
        (altered(lambda b: b.update(outputs=[{"name": "score", "parameters": "yes"}])), {}, 400,
         "output 'score': parameters must be an object"),
        (b"[" * 100_000, {}, 400, "not valid JSON"),
        (altered(lambda b: tensor(b, "C9").update(data=["\ud800"] * rows.num_rows)), {}, 400, "strings of UTF-8 text"),
        (altered(lambda b: tensor(b, "C9").update(datatype="INT64", data=[1.5] * rows.num_rows)), {}, 400,
         "INT64 data must be integers"),
        (altered(lambda b: b["inputs"].extend([{"name": "C7.lengths", "datatype": "INT64", "shape": [rows.num_rows],
                                                "data": [2**62 + 1, 2**62, 2**62, 2**62 - 1] + [0] * (rows.num_rows - 4)}])
                 or tensor(b, "C7").update(shape=[0], data=[])), {}, 400, "a bag of"),
        (b"x" * (2 << 20), {}, 413, "over the limit"),
        (binary + b"\x05\x00\x00\x00ab", {"Inference-Header-Content-Length": str(len(binary))}, 400, "overruns"),
        (binary + b"\x09\x00\x00\x00abcde", {"Inference-Header-Content-Length": str(len(binary))}, 400,
         "not 1 length-prefixed BYTES"),
        (binary, {"Inference-Header-Content-Length": str(len(binary) + 50)}, 400, "but the body has"),
        (huge + b"\x00" * 8, {"Inference-Header-Content-Length": str(len(huge))}, 400, "need at least"),
        (altered(lambda b: b.update(parameters={"sequence_start": True})), {}, 400,
         "sequence_start needs a sequence: expected a non-zero sequence_id, got none"),
        (altered(lambda b: b.update(parameters={"sequence_id": 0, "sequence_start": True})), {}, 400,
         "expected a non-zero sequence_id, got 0, which is not a sequence id (as in Triton, 0"),
        (altered(lambda b: b.update(parameters={"sequence_id": 1.5})), {}, 400, "sequence_id must be an integer or a string"),
        (altered(lambda b: b["inputs"].extend([{"name": "C7.lengths", "datatype": "INT64", "shape": [rows.num_rows],
                                                "data": [-1] + [0] * (rows.num_rows - 1)}])
                 or tensor(b, "C7").update(shape=[0], data=[])), {}, 400, "lengths must be INT32 or INT64 values >= 0"),
        (fp32 + b"\x00" * 6, {"Inference-Header-Content-Length": str(len(fp32))}, 400, "values take 8 bytes"),
        (binary + b"\x05\x00\x00\x00\xff\xfe\xfd\xfc\xfb", {"Inference-Header-Content-Length": str(len(binary))}, 400,
         "must be UTF-8 text"),
        (binary.replace(b'"binary_data_size": 9', b'"binary_data_size": true') + b"\x01",
         {"Inference-Header-Content-Length": str(len(binary) + 3)}, 400, "binary_data_size must be a byte count"),
        (binary.replace(b'"binary_data_size": 9', b'"binary_data_size": -1'),
         {"Inference-Header-Content-Length": str(len(binary) + 1)}, 400, "binary_data_size must be a byte count"),
        (altered(lambda b: tensor(b, "C9").update(shape=[rows.num_rows - 2], data=tensor(b, "C9")["data"][:-2])),
         {}, 400, f"input 'C9' is an item feature: expected {rows.num_rows} values (one per candidate, as 'C4' has), "
                  f"got {rows.num_rows - 2}"),
        (altered(lambda b: tensor(b, "C9").update(shape=[1], data=tensor(b, "C9")["data"][:1])), {}, 400,
         f"input 'C9' is an item feature: expected {rows.num_rows} values (one per candidate, as 'C4' has), got 1"),
        (json.dumps(good).encode() + b"junk", {"Inference-Header-Content-Length": str(len(json.dumps(good).encode()))},
         400, "add up to 0 bytes, but 4 follow the header"),
        (b'{"inputs": [], "id": ' + b"1" * 5000 + b"}", {}, 400, "not valid JSON"),
        (altered(lambda b: b.update(parameters={"sequence_id": "s" * 257, "sequence_start": True})), {}, 400,
         "sequence_id is 257 characters long; at most 256"),
        (altered(lambda b: b.update(parameters={"sequence_id": 2**64, "sequence_start": True})), {}, 400,
         "an integer sequence_id must be an unsigned 64-bit number"),
        (altered(lambda b: b["inputs"].extend([{"name": "C7.lengths", "datatype": "INT64", "shape": [rows.num_rows],
                                                "data": [1] * rows.num_rows}])
                 or tensor(b, "C7").update(datatype="FP64", data=[2.5] * rows.num_rows)), {}, 400,
         "'C7': ids must be BYTES, INT64 or INT32, got floating point values"),
        (gzipped[:-20], {"Content-Encoding": "gzip"}, 400, "the gzip body ends before its data does"),
        (b"\x1f\x8bnot gzip", {"Content-Encoding": "gzip"}, 400, "not valid gzip data"),
        (gzip.compress(b" " * (2 << 20)), {"Content-Encoding": "gzip"}, 413, "decompresses to more than 1048576"),
        (gzipped, {"Content-Encoding": "br"}, 415, "Content-Encoding 'br' is not supported"),
    ]


def test_a_barrage_of_bad_requests_gets_400s_and_the_server_keeps_serving(server, rows):
    specs = input_specs(server.service.predictor.config)
    candidates = with_user_of(rows.slice(0, 20), specs)
    bad = _bad_requests(candidates, specs)
    good = json.dumps(infer_request(candidates, specs)).encode()
    expected = _expected(server, candidates)

    def send(k: int) -> None:
        body, headers, status, reason = bad[k % len(bad)]
        code, answer, _ = _post(server, "/v2/models/ctr/infer", body, headers)
        assert (code, reason) == (status, reason) and reason in answer["error"], answer
        if k % 10 == 0:
            code, answer, _ = _post(server, "/v2/models/ctr/infer", good)
            assert code == 200
            np.testing.assert_allclose(answer["outputs"][0]["data"], expected[:, 0], rtol=1e-5)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(send, range(20 * len(bad))))
    assert _post(server, "/v2/models/nope/infer", good)[0] == 404
    metrics = urllib.request.urlopen(server.url + "/metrics").read().decode()
    assert 'tidal_requests_total{outcome="bad_request"}' in metrics and "tidal_batch_rows_bucket" in metrics
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    named = readme[readme.index("`/metrics` serves Prometheus metrics"):readme.index("series of the online updates")]
    for name in [*re.findall(r"`(tidal_\w+?)(?:_\*)?`", named), "tidal_request_seconds_count", "tidal_ids_total",
                 'tidal_compute_seconds_count{stage="dense"}', "tidal_session_cache_bytes"]:
        assert name.rstrip("_") in metrics, name  # every series the README names


def test_an_item_input_of_one_value_gets_a_400_while_user_inputs_of_one_value_score(server, rows):
    specs = input_specs(server.service.predictor.config)
    candidates = with_user_of(rows.slice(0, 2), specs)
    good = infer_request(candidates, specs)
    assert {t["name"]: t["shape"] for t in good["inputs"] if t["name"] in ("C1", "C2", "I1", "C4", "C9")} == \
        {"C1": [1], "C2": [1], "I1": [1], "C4": [2], "C9": [2]}  # the user's values once, the items' per candidate
    code, answer, _ = _post(server, "/v2/models/ctr/infer", json.dumps(good).encode())
    assert code == 200, answer
    np.testing.assert_allclose(answer["outputs"][0]["data"], _expected(server, candidates)[:, 0], rtol=1e-5)
    truncated = json.loads(json.dumps(good))
    c9 = next(t for t in truncated["inputs"] if t["name"] == "C9")
    c9.update(shape=[1], data=c9["data"][:1])
    code, answer, _ = _post(server, "/v2/models/ctr/infer", json.dumps(truncated).encode())
    assert code == 400 and answer["error"].startswith("input 'C9' is an item feature: expected 2 values (one per "
                                                      "candidate, as 'C4' has), got 1; ")
    assert _post(server, "/v2/models/ctr/infer", json.dumps(good).encode())[0] == 200  # the server goes on


def test_a_request_of_more_candidates_than_max_queue_rows_gets_a_413(bundle, trainer):
    running = start_server(Service(bundle, name="ctr", max_queue_rows=20))
    specs = input_specs(bundle.config)
    try:
        code, answer, _ = _post(running, "/v2/models/ctr/infer", json.dumps(infer_request(
            with_user_of(file_rows(trainer, 21), specs), specs)).encode())
    finally:
        running.stop()
    assert (code, answer["error"]) == (413, "the request has 21 candidates; this server takes at most 20 in one "
                                            "request (max_queue_rows)")


def test_an_oversize_body_gets_its_413_not_a_reset(server):
    body = b"x" * (24 << 20)  # far more than the socket buffers hold: the server must read it to answer
    for _ in range(3):
        code, answer, _ = _post(server, "/v2/models/ctr/infer", body)
        assert code == 413 and answer["error"].endswith("over the limit of 1048576 (serving.max_body_bytes)")


def test_a_refused_or_broken_off_body_is_not_kept_in_memory(server):
    """A 413's body and the part of a body sent before a reset are freed with the
    request: cycles of its error's traceback would keep them until a full collection,
    which the server's collector settings make rare (32 MB kept for every 413)."""
    host, port = server.url.removeprefix("http://").split(":")
    assert _post(server, "/v2/models/ctr/infer", b"x" * (4 << 20))[0] == 413
    before = _outcomes(server).get("client_gone", 0)
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset, not a close
        conn.sendall(b"POST /v2/models/ctr/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 900000\r\n\r\n" + b"y" * 600_000)
        until(lambda: server.service.bodies.held >= 600_000, "the body's first part")
    until(lambda: _outcomes(server).get("client_gone", 0) == before + 1, "the reset")
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        kept = sum(len(part) for garbage in gc.garbage if isinstance(garbage, list) for part in garbage
                   if isinstance(part, (bytes, bytearray)))  # a body's pieces
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert kept < 100_000


@pytest.mark.parametrize("sends_at_once", [False, True])
def test_a_client_waiting_to_send_an_oversize_body_gets_its_413_without_being_asked_for_it(server, sends_at_once):
    """Not asked for (no 100 Continue); a client that sends it all the same, as HTTP
    allows, reads its 413 and goes on with its connection."""
    host, port = server.url.removeprefix("http://").split(":")
    body = b"x" * (3 << 20)
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(b"POST /v2/models/ctr/infer HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + (body if sends_at_once else b""))
        answer = conn.recv(65536)
        assert answer.startswith(b"HTTP/1.1 413 ") and b"100 Continue" not in answer
        if sends_at_once:
            conn.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
            assert until_answered(conn).startswith(b"HTTP/1.1 200")


def test_a_large_body_is_decoded_off_the_event_loop_and_scores_as_a_small_one(server, rows, monkeypatch):
    """A queue of large decodes would hold up health checks and small requests for their
    sum: a body past 64 KiB is decoded on the decoder thread (a bad one refused from it)."""
    import tidal.serving.server as server_module

    threads = []

    def recorded(*args, **kwargs):  # type: ignore[no-untyped-def]
        threads.append(threading.current_thread().name)
        return decode_request(*args, **kwargs)

    monkeypatch.setattr(server_module, "decode_request", recorded)
    specs = input_specs(server.service.predictor.config)
    small = json.dumps(infer_request(with_user_of(rows.slice(0, 5), specs), specs)).encode()
    large = small + b" " * (1 << 16)  # JSON's whitespace
    answers = [_post(server, "/v2/models/ctr/infer", body) for body in (small, large)]
    assert answers[0][0] == answers[1][0] == 200 and answers[0][1]["outputs"] == answers[1][1]["outputs"]
    code, answer, _ = _post(server, "/v2/models/ctr/infer", b"[" + large)
    assert code == 400 and "not valid JSON" in answer["error"]
    assert threads[0] == "tidal-server" and threads[1].startswith("tidal-decode") and threads[2] == threads[1]


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_score_as_plain_ones(server, rows, algorithm):
    specs = input_specs(server.service.predictor.config)
    candidates = with_user_of(rows.slice(0, 12), specs)
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    result = client.infer("ctr", _inputs(candidates, specs, binary=True), request_compression_algorithm=algorithm)
    np.testing.assert_allclose(result.as_numpy("ctr"), _expected(server, candidates)[:, 0], rtol=1e-5)
    raw = json.dumps(infer_request(candidates, specs)).encode()
    body = gzip.compress(raw) if algorithm == "gzip" else zlib.compress(raw)
    code, answer, _ = _post(server, "/v2/models/ctr/infer", body, {"Content-Encoding": algorithm})
    assert code == 200 and np.allclose(answer["outputs"][0]["data"], result.as_numpy("ctr"), rtol=1e-6)
    code, answer, _ = _post(server, "/v2/models/ctr/infer", body + b"\x00garbage", {"Content-Encoding": algorithm})
    assert code == 400 and ("not valid gzip data" if algorithm == "gzip" else "bytes after its data ends") \
        in answer["error"]


def _post_raw(server, body: bytes, headers: list[tuple[str, str]]) -> tuple[int, dict]:
    """POST `body` with `headers` as given, a header named twice included."""
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.putrequest("POST", "/v2/models/ctr/infer")
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_codings_a_body_is_not_decoded_by_are_refused(server, rows):
    """Two Content-Encoding headers are one list, as one header listing both; a transfer
    coding besides chunked is not taken off by the HTTP layer, so it is refused."""
    specs = input_specs(server.service.predictor.config)
    raw = json.dumps(infer_request(with_user_of(rows.slice(0, 5), specs), specs)).encode()
    gzipped = gzip.compress(raw)
    code, answer = _post_raw(server, gzipped, [("Content-Encoding", "gzip"), ("Content-Encoding", "identity"),
                                               ("Content-Length", str(len(gzipped)))])
    assert code == 415 and "Content-Encoding 'gzip, identity' is not supported" in answer["error"]
    chunked = f"{len(gzipped):x}\r\n".encode() + gzipped + b"\r\n0\r\n\r\n"
    code, answer = _post_raw(server, chunked, [("Transfer-Encoding", "gzip, chunked")])
    assert code == 501 and "Transfer-Encoding 'gzip, chunked' is not supported" in answer["error"]
    chunked = f"{len(raw):x}\r\n".encode() + raw + b"\r\n0\r\n\r\n"
    assert _post_raw(server, chunked, [("Transfer-Encoding", "chunked")])[0] == 200


@pytest.mark.parametrize("raw", [
    b"POST /v2/models/ctr/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    b"POST /v2/models/ctr/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n",
    b"POST /v2/models/ctr/infer HTTP/1.1\r\nHost x\r\n\r\n",
], ids=["chunk_size", "chunk_overrun", "header"])
def test_malformed_http_gets_a_400_with_the_parsers_reason_and_counts_as_a_bad_request(server, raw):
    before = _outcomes(server)
    answer = _exchange(server, raw)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"connection: close" in head.lower()
    assert json.loads(body)["error"].startswith("the request is not valid HTTP/1.1: ")
    if b"Transfer-Encoding" in raw:  # a body broke off: the request had begun
        until(lambda: _outcomes(server).get("bad_request", 0) == before.get("bad_request", 0) + 1, "the bad request")
        assert _outcomes(server).get("client_gone", 0) == before.get("client_gone", 0)
    assert urllib.request.urlopen(server.url + "/v2/health/ready", timeout=30).status == 200  # and it goes on


@pytest.mark.parametrize("raw, status, reason", [
    (b"GET /v2/health/ready HTTP/2.0\r\nHost: x\r\n\r\n", b"505", "HTTP/2.0 is not served here"),
    (b"GET /v2/health/ready HTTP/1.2\r\nHost: x\r\n\r\n", b"505", "Invalid HTTP version; send HTTP/1.1"),
    (b"GET /v2/health/ready HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", b"400", "carries one Host header; this one carries 2"),
    (b"GET /v2/health/ready HTTP/1.1\r\n\r\n", b"400", "carries one Host header; this one carries 0"),
    (b"POST /v2/models/ctr/infer HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", b"400",
     "an HTTP/1.0 request has no Transfer-Encoding"),
], ids=["http2", "http12", "two_hosts", "no_host", "chunked_http10"])
def test_framing_a_proxy_could_read_otherwise_is_refused(server, raw, status, reason):
    """Where RFC 9112 says to refuse a request (a proxy in front may frame it or route it
    otherwise than the server would), it is refused and the connection closed; /metrics
    counts it."""
    before = _refusals(server).get(status.decode(), 0)
    answer = _exchange(server, raw)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 " + status) and reason in json.loads(body)["error"]
    assert b"HTTP/1.1 200" not in answer  # nothing more was answered
    assert _refusals(server)[status.decode()] == before + 1


def test_requests_before_malformed_http_on_a_connection_are_answered_first(server, rows, caplog):
    """A client that pipelines requests and then sends what is not HTTP gets their
    answers in order, then the 400 (and no traceback is logged for them)."""
    specs = input_specs(server.service.predictor.config)
    body = json.dumps(infer_request(with_user_of(rows.slice(0, 5), specs), specs)).encode()
    infer = b"POST /v2/models/ctr/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    ready = b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = _exchange(server, infer + ready + infer + b"GET /\x00 HTTP/1.1\r\n\r\n")
    statuses = re.findall(rb"HTTP/1.1 (\d+) ", answer)
    assert statuses == [b"200", b"200", b"200", b"400"]
    assert answer.rstrip().endswith(b'"}') and b"not valid HTTP/1.1" in answer
    assert "Exception in ASGI application" not in caplog.text


def test_a_request_line_whose_url_cannot_be_read_is_refused_after_the_request_before_it(server, rows):
    specs = input_specs(server.service.predictor.config)
    body = json.dumps(infer_request(with_user_of(rows.slice(0, 2), specs), specs)).encode()
    before = _outcomes(server)
    answer = _exchange(server, b"POST /v2/models/ctr/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                               + b"GET http://a:99999/ HTTP/1.1\r\nHost: x\r\n\r\n")
    assert re.findall(rb"HTTP/1.1 (\d+) ", answer) == [b"200", b"400"]
    assert b"User callback error" not in answer and _outcomes(server)["ok"] == before.get("ok", 0) + 1


def test_a_gzip_body_of_several_members_reads_as_their_concatenation(server, rows):
    specs = input_specs(server.service.predictor.config)
    raw = json.dumps(infer_request(with_user_of(rows.slice(0, 5), specs), specs)).encode()
    whole = _post(server, "/v2/models/ctr/infer", raw)
    members = gzip.compress(raw[:100]) + gzip.compress(raw[100:])
    code, answer, _ = _post(server, "/v2/models/ctr/infer", members, {"Content-Encoding": "gzip"})
    assert code == whole[0] == 200 and answer["outputs"] == whole[1]["outputs"]


def test_a_body_of_many_gzip_members_or_one_of_many_pieces_decompresses_in_linear_time():
    from tidal.serving.server import _decompressed

    tiny = gzip.compress(b"x")
    start = time.perf_counter()
    assert _decompressed(tiny * 200_000, "gzip", 1 << 20) == b"x" * 200_000  # each member copied the rest: minutes
    assert time.perf_counter() - start < 20
    noise = np.random.default_rng(0).bytes(300_000)  # members across the pieces the inflater is given
    assert _decompressed(gzip.compress(noise) + gzip.compress(noise[:7]), "gzip", 1 << 20) == noise + noise[:7]
    assert _decompressed(zlib.compress(noise), "deflate", 1 << 20) == noise
    with pytest.raises(RequestError, match="decompresses to more than 299999 bytes"):
        _decompressed(gzip.compress(noise), "gzip", 299_999)


def test_the_one_version_has_its_routes_and_every_error_is_json(server, rows):
    specs = input_specs(server.service.predictor.config)
    candidates = with_user_of(rows.slice(0, 3), specs)
    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    assert client.is_model_ready("ctr", "1") and client.get_model_metadata("ctr", "1")["name"] == "ctr"
    result = client.infer("ctr", _inputs(candidates, specs, binary=False), model_version="1")
    np.testing.assert_allclose(result.as_numpy("ctr"), _expected(server, candidates)[:, 0], rtol=1e-5)
    body = json.dumps(infer_request(candidates, specs)).encode()
    assert _post(server, "/v2/models/ctr/versions/1/infer", body)[0] == 200
    code, answer, _ = _post(server, "/v2/models/ctr/versions/2/infer", body)
    assert code == 404 and "no version '2'" in answer["error"]
    for method, path, status in [("GET", "/v2/models/ctr/configs", 404), ("DELETE", "/v2/models/ctr/infer", 405),
                                 ("GET", "/v2/repository/index", 405)]:
        request = urllib.request.Request(server.url + path, method=method)
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=30)
        assert caught.value.code == status and path in json.loads(caught.value.read())["error"]


def _exchange(server, raw: bytes) -> bytes:  # type: ignore[no-untyped-def]
    """What the server answers to `raw` sent on a connection of its own, until it closes it."""
    host, port = server.url.removeprefix("http://").split(":")
    answer = b""
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(raw)
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


def until_answered(conn: socket.socket) -> bytes:
    """One answer of a keep-alive connection: its head and its Content-Length of body."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += conn.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head.lower()).group(1))
    while len(body) < length:
        body += conn.recv(65536)
    return answer


def _refusals(server) -> dict[str, float]:
    return _by_label(server, "tidal_http_refusals_total")


def _outcomes(server) -> dict[str, float]:
    return _by_label(server, "tidal_requests_total")


def _by_label(server, counter: str) -> dict[str, float]:
    """A counter of one label from the server's /metrics: {label value: count}."""
    metrics = urllib.request.urlopen(server.url + "/metrics", timeout=30).read().decode()
    return {line.split('"')[1]: float(line.split()[-1]) for line in metrics.splitlines()
            if line.startswith(counter + "{")}


def _partial_request(server, declared: int, sent: bytes) -> socket.socket:
    """A connection that sent the headers of an infer request and part of its body."""
    host, port = server.url.removeprefix("http://").split(":")
    conn = socket.create_connection((host, int(port)), timeout=30)
    conn.sendall(f"POST /v2/models/ctr/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {declared}\r\n\r\n".encode()
                 + sent)
    return conn


def test_a_body_that_stops_coming_gets_a_408(server, monkeypatch):
    import tidal.serving.server as server_module

    monkeypatch.setattr(server_module, "_BODY_TIMEOUT_S", 0.3)
    with _partial_request(server, 1000, b'{"inputs": [') as conn:
        answer = b""
        while chunk := conn.recv(4096):  # to the end: the rest of the body would be read as no request
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 0.3 s" in answer
    assert b"connection: close" in answer.lower()


def test_headers_that_trickle_in_or_never_come_get_a_408_and_the_server_keeps_serving(server, monkeypatch):
    """A slowloris client (headers a byte at a time) is cut off; one that connects and
    sends nothing is too, before and after a first request on the connection."""
    import tidal.serving.server as server_module

    monkeypatch.setattr(server_module, "_HEADER_TIMEOUT_S", 0.5)
    host, port = server.url.removeprefix("http://").split(":")
    start = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        for byte in b"POST /v2/models/ctr/infer HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            try:
                conn.sendall(bytes([byte]))
            except OSError:  # cut off
                break
            time.sleep(0.02)
        answer = conn.recv(4096).decode()
    assert answer.startswith("HTTP/1.1 408") and "headers did not arrive within 0.5 s" in answer
    assert time.monotonic() - start < 5
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        assert conn.recv(4096).startswith(b"HTTP/1.1 408")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(f"GET /v2/health/live HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        first = conn.recv(4096)
        time.sleep(0.1)
        conn.sendall(b"GET /v2/health/live HTTP/1.1\r\n")  # the second request's headers never end
        second = conn.recv(4096)
    assert first.startswith(b"HTTP/1.1 200") and second.startswith(b"HTTP/1.1 408")
    monkeypatch.setattr(server_module, "_HEADER_TIMEOUT_S", 10.0)
    assert urllib.request.urlopen(server.url + "/v2/health/ready", timeout=30).status == 200


def test_headers_over_the_size_limit_get_a_431_and_the_server_keeps_serving(server):
    import tidal.serving.server as server_module

    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        # just past the limit, so that the server has read it all when it answers (no reset)
        conn.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * server_module._HEADER_BYTES)
        answer = conn.recv(4096).decode()
    assert answer.startswith("HTTP/1.1 431") and f"take more than {server_module._HEADER_BYTES} bytes" in answer
    with socket.create_connection((host, int(port)), timeout=30) as conn:  # ended, and read with the rest: counted too
        conn.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
        assert conn.recv(4096).startswith(b"HTTP/1.1 431")
    body = b"x" * 100_000
    with socket.create_connection((host, int(port)), timeout=30) as conn:  # headers ended across tiny reads: no body
        for piece in (f"POST /v2/models/ctr/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n".encode(),
                      b"\r", b"\n" + body):  # a read of 1 byte between
            conn.sendall(piece)
            time.sleep(0.2)
        assert conn.recv(4096).startswith(b"HTTP/1.1 400")  # not JSON: read as a request, not refused as headers
    request = urllib.request.Request(server.url + "/v2/health/ready", headers={"X-Fine": "a" * 8000})
    assert urllib.request.urlopen(request, timeout=30).status == 200


def test_a_client_still_sending_when_refused_reads_its_answer_not_a_reset(server):
    """Megabytes of headers are refused at 64 KiB; what still comes is read and dropped
    until the client stops, so that the answer reaches it before the connection closes."""
    host, port = server.url.removeprefix("http://").split(":")
    failed: list[OSError] = []

    def send(conn: socket.socket) -> None:
        try:
            conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (10 << 20))
        except OSError as exc:  # a reset: the server closed with the bytes unread
            failed.append(exc)

    with socket.create_connection((host, int(port)), timeout=30) as conn:
        sender = threading.Thread(target=send, args=(conn,))
        sender.start()
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
        sender.join()
    assert answer.startswith(b"HTTP/1.1 431") and answer.rstrip().endswith(b'"}') and failed == []


def test_a_body_answered_unread_does_not_count_as_the_next_request_s_headers(server):
    """A 404 is answered before its body has come; the body's bytes are not headers."""
    host, port = server.url.removeprefix("http://").split(":")
    body = b"x" * 600_000  # more than the headers may take
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(f"POST /v2/models/nope/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                     + body + b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        answers = b""
        while answers.count(b"HTTP/1.1") < 2:
            answers += conn.recv(65536)
    assert answers.startswith(b"HTTP/1.1 404") and b"HTTP/1.1 200" in answers


def test_a_client_sending_requests_without_reading_the_answers_is_not_read_on(server):
    """Else the server parses and queues every request it sends (gigabytes of them)."""
    host, port = server.url.removeprefix("http://").split(":")
    requests = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n" * 100_000  # 4.1 MB
    sent = 0
    with socket.create_connection((host, int(port)), timeout=2) as conn:
        try:
            for _ in range(20):  # up to 82 MB, while the server reads on
                conn.sendall(requests)
                sent += len(requests)
        except TimeoutError:  # the server stopped reading
            pass
    assert sent < 20 * len(requests)
    assert urllib.request.urlopen(server.url + "/v2/health/ready", timeout=30).status == 200


def test_a_refused_request_holds_no_reference_cycle_that_would_keep_its_body():
    """Serving collects garbage rarely (`_serving_gc`): a cycle kept 63 MB a refused request."""
    from tidal.serving.server import _unless_gone

    class Body:
        pass

    async def refuse(body: Body) -> None:
        raise RequestError("refused")

    async def never_disconnects() -> dict:
        await asyncio.Event().wait()
        return {}

    async def answer() -> None:
        body = Body()
        held = weakref.ref(body)
        with pytest.raises(RequestError):
            await _unless_gone(Request({"type": "http"}, never_disconnects), refuse(body))
        del body
        assert held() is None

    gc.disable()
    try:
        asyncio.run(answer())
    finally:
        gc.enable()


def test_an_error_naming_a_lone_surrogate_a_request_sent_is_a_400_not_a_500(server):
    request = {"parameters": {"sequence_id": "\udc80", "sequence_end": True}, "inputs": []}  # never started
    code, answer, _ = _post(server, "/v2/models/ctr/infer", json.dumps(request).encode())
    assert code == 400 and answer["error"].startswith('sequence "\\udc80" is unknown'), answer


def test_hang_ups_and_unknown_models_are_counted_apart_from_server_errors(server, rows):
    before = _outcomes(server)
    for _ in range(3):
        _partial_request(server, 1000, b'{"inputs": [').close()
    specs = input_specs(server.service.predictor.config)
    body = json.dumps(infer_request(with_user_of(rows.slice(0, 2), specs), specs)).encode()
    assert _post(server, "/v2/models/nope/infer", body)[0] == 404
    deadline = time.monotonic() + 10
    while _outcomes(server).get("client_gone", 0) < before.get("client_gone", 0) + 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    after = _outcomes(server)
    assert after["client_gone"] == before.get("client_gone", 0) + 3
    assert after["not_found"] == before.get("not_found", 0) + 1
    assert after.get("error", 0) == before.get("error", 0)


def _gated(service: Service) -> tuple[threading.Event, list[int]]:
    """Hold every batch of `service` at a gate until it is set; the rows of each batch
    scored are listed as they pass."""
    gate, original, scored = threading.Event(), service.predictor.sparse, []

    def gated(pieces):  # type: ignore[no-untyped-def]
        gate.wait()
        scored.append(sum(p.rows for p in pieces))
        return original(pieces)

    service.predictor.sparse = gated
    return gate, scored


def test_a_client_that_hangs_up_while_its_request_waits_is_counted_gone_and_not_scored(bundle, trainer):
    service = Service(bundle, name="ctr")
    running = start_server(service)
    gate, scored = _gated(service)
    specs = input_specs(bundle.config)
    first = json.dumps(infer_request(with_user_of(file_rows(trainer, 3), specs), specs)).encode()
    second = json.dumps(infer_request(with_user_of(file_rows(trainer, 5), specs), specs)).encode()
    try:
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(_post, running, "/v2/models/ctr/infer", first)  # held at the gate
            while not service.batcher._in_flight:
                time.sleep(0.01)
            with _partial_request(running, len(second), second):  # the whole body, then a hang-up
                time.sleep(0.3)
            deadline = time.monotonic() + 10
            while _outcomes(running).get("client_gone", 0) < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            gate.set()
            assert answer.result()[0] == 200
        time.sleep(0.3)  # a batch holding the second request would have been scored by now
        outcomes = _outcomes(running)
    finally:
        gate.set()
        running.stop()
    assert outcomes["client_gone"] == 1 and outcomes["ok"] == 1
    assert scored == [3]  # the second request left the queue unscored


def test_a_stopping_server_finishes_running_batches_and_answers_queued_requests_503_before_its_deadline(bundle, trainer):
    service = Service(bundle, name="ctr", max_batch_rows=4, chunk_rows=4, sparse_threads=1)
    running = start_server(service, exit_timeout_s=1.5)
    gate, scored = _gated(service)
    specs = input_specs(bundle.config)
    held, *queued = (json.dumps(infer_request(with_user_of(file_rows(trainer, n), specs), specs)).encode()
                     for n in (3, 4, 2))
    pool = ThreadPoolExecutor(4)
    try:
        answer = pool.submit(_post, running, "/v2/models/ctr/infer", held)  # held at the gate
        until(lambda: service.batcher._in_flight, "the first request's batch")
        refused = [pool.submit(_post, running, "/v2/models/ctr/infer", body) for body in queued]
        until(lambda: service.batcher._waiting_rows == 6, "the queued requests")
        stopping = pool.submit(running.stop)
        for future in refused:  # half a second into the stop, not at its deadline
            status, body, headers = future.result()
            assert (status, body) == (503, {"error": "the server shut down before this request ran"})
        gate.set()
        assert answer.result()[0] == 200  # the batch that ran finished
        stopping.result()
    finally:
        gate.set()
        pool.shutdown()
    assert scored == [3]


def test_waiting_chunks_leave_the_queue_when_their_client_hangs_up(bundle, trainer):
    """A request cut into chunks whose client hangs up: none of its chunks is scored, and
    its rows stop counting toward max_queue_rows at once."""
    service = Service(bundle, name="ctr", max_batch_rows=4, chunk_rows=4, sparse_threads=1, max_queue_rows=20)
    running = start_server(service)
    gate, scored = _gated(service)
    specs = input_specs(bundle.config)
    first, second, third = (json.dumps(infer_request(with_user_of(file_rows(trainer, n), specs), specs)).encode()
                            for n in (3, 12, 15))
    pool = ThreadPoolExecutor(2)
    try:
        answer = pool.submit(_post, running, "/v2/models/ctr/infer", first)  # held at the gate
        until(lambda: service.batcher._in_flight, "the first request's batch")
        with _partial_request(running, len(second), second):  # the whole body: 3 chunks of 4
            until(lambda: service.batcher._waiting_rows == 12, "the second request's chunks")
        until(lambda: _outcomes(running).get("client_gone", 0) == 1, "the hang-up")
        until(lambda: service.batcher._waiting_rows == 0, "the given-up chunks to leave the queue")
        late = pool.submit(_post, running, "/v2/models/ctr/infer", third)  # 503 if the 12 rows still counted
        until(lambda: service.batcher._waiting_rows == 15, "the third request's chunks")
        gate.set()
        assert answer.result()[0] == 200 and late.result()[0] == 200
    finally:
        gate.set()  # before the pool waits for the requests held at it
        pool.shutdown()
        running.stop()
    assert sum(scored) == 3 + 15


def test_sequence_end_leaves_the_new_session_when_its_id_started_again_meanwhile(bundle, trainer):
    service = Service(bundle, name="ctr", batching=False)  # each request a batch of its own, on 2 sparse threads
    running = start_server(service)
    gate, original = threading.Event(), service.predictor.sparse
    specs = input_specs(bundle.config)
    page = with_user_of(file_rows(trainer, 4), specs)
    start = infer_request(page, specs) | {"parameters": {"sequence_id": "s", "sequence_start": True}}
    more = infer_request(page, specs) | {"parameters": {"sequence_id": "s"}}
    more["inputs"] = [t for t in more["inputs"] if specs[t["name"]].side == "item"]  # the session holds those
    last = more | {"parameters": {"sequence_id": "s", "sequence_end": True}}

    def post(body: dict) -> tuple[int, dict, Message]:
        return _post(running, "/v2/models/ctr/infer", json.dumps(body).encode())

    pool = ThreadPoolExecutor(2)
    try:
        assert post(start)[0] == 200
        old = service.sessions.get("s")
        held = []

        def sparse(pieces):  # type: ignore[no-untyped-def]
            if not held:  # the first batch, the old session's last page: held at the gate
                held.append(pieces)
                gate.wait()
            return original(pieces)

        service.predictor.sparse = sparse
        ending = pool.submit(post, last)
        until(lambda: held, "the last page's batch")
        restarted = pool.submit(post, start)  # scored on the second sparse thread, and cached
        assert restarted.result()[0] == 200 and service.sessions._entries["s"][0] is not old
        gate.set()
        assert ending.result()[0] == 200
        code, answer, _ = post(more)
        assert code == 200, answer  # the new session goes on
    finally:
        gate.set()  # before the pool waits for the requests held at it
        pool.shutdown()
        running.stop()


def test_overload_answers_503_with_retry_after(bundle, trainer):
    service = Service(bundle, name="ctr", max_queue_rows=20)
    running = start_server(service)
    gate, original = threading.Event(), service.predictor.sparse
    service.predictor.sparse = lambda pieces: gate.wait() and original(pieces)
    specs = input_specs(bundle.config)
    request = infer_request(with_user_of(file_rows(trainer, 15), specs), specs)
    bodies = [json.dumps(request | {"parameters": {"sequence_id": s, "sequence_start": True}}).encode()
              for s in range(1, 5)]
    try:
        with ThreadPoolExecutor(4) as pool:
            answers = [pool.submit(_post, running, "/v2/models/ctr/infer", body) for body in bodies]
            wait(answers, return_when=FIRST_COMPLETED)  # the refused one: the others wait at the gate
            gate.set()
            results = [a.result() for a in answers]
    finally:
        gate.set()
        running.stop()
    codes = sorted(code for code, _, _ in results)
    assert codes[0] == 200 and codes[-1] == 503
    overloaded = next(r for r in results if r[0] == 503)
    assert overloaded[2]["Retry-After"] == "1" and "rows are waiting" in overloaded[1]["error"]
    started = {s for s, (code, _, _) in zip(range(1, 5), results) if code == 200}
    assert set(service.sessions._entries) == started  # a refused start starts no session


def test_a_closed_service_an_unservable_name_or_no_bundle_is_refused_before_serving(bundle):
    """A stopped server's service answered every request 503 while health said ready;
    a name no URL can carry answered every model route 404."""
    running = start_server(Service(bundle, name="ctr"))
    running.stop()
    with pytest.raises(ConfigError, match=r"this Service was closed .*; serve a new Service of the bundle"):
        start_server(running.service)
    again = start_server(Service(bundle, name="ctr"))  # a new one serves
    again.stop()
    for name in ("x/y", "", ".."):
        with pytest.raises(ConfigError, match=rf"Service: name must be made of letters, .* got {name!r}"):
            Service(bundle, name=name)
    with pytest.raises(ConfigError, match=r"Service: bundle: expected Bundle, got str"):
        Service("bundle")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^Service: batching must be True or False, got 'no'$"):
        Service(bundle, batching="no")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"set_fusion: fusion: expected Fusion, got dict; build one with Fusion"):
        again.service.predictor.set_fusion({"kind": "sum"})  # type: ignore[arg-type]


def test_a_max_batch_rows_below_chunk_rows_lowers_chunk_rows_unless_both_are_given(bundle):
    assert bundle.config.serving.chunk_rows == 64
    for overrides, chunk_rows in [({"max_batch_rows": 40}, 40), ({"max_batch_rows": 200}, 64),
                                  ({"max_batch_rows": 40, "chunk_rows": 20}, 20)]:
        service = Service(bundle, name="ctr", **overrides)
        try:
            assert (service.settings.chunk_rows, service.batcher.chunk_rows) == (chunk_rows, chunk_rows)
        finally:
            service.close()
    with pytest.raises(ConfigError, match=r"chunk_rows \(50\) must be at most max_batch_rows \(40\)"):
        Service(bundle, name="ctr", max_batch_rows=40, chunk_rows=50)


def test_bodies_held_at_once_past_their_budget_get_a_503_and_the_budget_comes_back(bundle, rows):
    """A slow client holding most of the budget: another request's body would pass it,
    and is refused (read to its end first) until the slow one is answered."""
    running = start_server(Service(bundle, name="ctr", max_body_bytes=4096, max_held_body_bytes=6000))
    specs = input_specs(bundle.config)
    body = json.dumps(infer_request(with_user_of(rows.slice(0, 2), specs), specs)).encode()
    body += b" " * (3000 - len(body))  # JSON's whitespace
    try:
        slow = _partial_request(running, 4000, b" " * 3500)
        until(lambda: running.service.bodies.held == 3500, "the server holding what came")
        code, answer, headers = _post(running, "/v2/models/ctr/infer", body)
        assert (code, headers["Retry-After"]) == (503, "1")
        assert answer["error"] == ("the server holds 3,500 bytes of request bodies, and this one would pass the limit "
                                   "of 6,000 (serving.max_held_body_bytes); retry later")
        with slow:
            slow.sendall(b" " * 500)  # a body of spaces: not JSON
            assert slow.recv(4096).decode().startswith("HTTP/1.1 400")
        assert _post(running, "/v2/models/ctr/infer", body)[0] == 200
        assert running.service.bodies.held == 0 and _outcomes(running)["overloaded"] == 1
    finally:
        running.stop()


def test_the_held_bodies_budget_is_checked_with_the_serving_config():
    from tidal.config import ServingConfig

    assert ServingConfig().held_body_bytes == 16 * (32 << 20)
    with pytest.raises(ConfigError, match=r"max_held_body_bytes \(2048\) must be at least max_body_bytes \(4096\)"):
        ServingConfig(max_body_bytes=4096, max_held_body_bytes=2048)


def test_a_body_still_arriving_at_the_exit_deadline_gets_a_503(bundle):
    """uvicorn cancels what runs at the deadline: a bare 500 and a logged traceback before."""
    running = start_server(Service(bundle, name="ctr"), exit_timeout_s=1.5)
    try:
        with _partial_request(running, 1000, b'{"inputs": [') as conn:  # its body still coming
            until(lambda: running.service.bodies.held > 0, "the server reading the body")
            running.stop()
            answer = conn.recv(4096).decode()
    finally:
        running.stop()
    assert answer.startswith("HTTP/1.1 503") and ("the server stopped at the end of its exit timeout "
                                                  "(--exit-timeout-s) before this request was answered") in answer


def test_a_request_under_way_when_the_server_is_stopped_at_once_gets_a_503(bundle):
    """A second SIGTERM cuts off the requests under way: each is told so, not given a
    bare 500 (and the log no traceback)."""
    import signal

    running = start_server(Service(bundle, name="ctr"))
    try:
        with _partial_request(running, 1000, b'{"inputs": [') as conn:  # its body still coming
            until(lambda: running.service.bodies.held > 0, "the server reading the body")
            running._server.handle_exit(signal.SIGTERM, None)
            running._server.handle_exit(signal.SIGTERM, None)
            running._thread.join(timeout=30)
            answer = conn.recv(4096).decode()
    finally:
        running.stop()
    assert answer.startswith("HTTP/1.1 503") and "the server was stopped at once (a second Ctrl-C or SIGTERM)" in answer


def test_a_service_s_infer_takes_a_body_of_bytes(server):
    """A str body gave a raw AttributeError from the decoder, None a TypeError."""
    for body in ("{}", None):
        with pytest.raises(RequestError, match=rf"^infer takes the request's body as bytes, got {type(body).__name__}$"):
            asyncio.run(server.service.infer(body, None))


def test_a_session_of_a_model_without_user_features_caches_an_empty_user_side(tmp_path):
    """Its sequence_start was a 500 (an audit's find): the user row it pooled had no columns, so no row."""
    config = _integer_id_config(tmp_path).model_dump()
    config["features"][0]["side"] = "item"
    trainer = Trainer(RunConfig(**config))
    trainer.fit()
    running = start_server(Service(load_bundle(export(trainer.run_dir, tmp_path / "bundle")), name="ranker"))
    try:
        request = {"inputs": [{"name": "user", "datatype": "BYTES", "shape": [2], "data": ["u2", "u3"]},
                              {"name": "item_id", "datatype": "INT64", "shape": [2], "data": [_LARGE_ID, _LARGE_ID + 3]},
                              {"name": "price", "datatype": "FP64", "shape": [2], "data": [0.5, 2.5]}]}
        answers = []
        for flags in ({"sequence_start": True}, {}, {"sequence_end": True}, {}):
            body = json.dumps({**request, "parameters": {"sequence_id": 7, **flags}}).encode()
            answers.append(_post(running, "/v2/models/ranker/infer", body)[:2])
        stateless = _post(running, "/v2/models/ranker/infer", json.dumps(request).encode())[1]
        assert [code for code, _ in answers] == [200, 200, 200, 400]
        assert all(answer["outputs"] == stateless["outputs"] for _, answer in answers[:3])
        assert answers[3][1]["error"] == ("sequence 7 is unknown: it has ended; send sequence_start with its user "
                                          "features")
    finally:
        running.stop()


def test_a_fresh_server_s_labelled_metrics_are_there_at_zero(bundle):
    """They appeared with their first event: an alert on errors saw no series, not 0 (an audit's note)."""
    from prometheus_client.parser import text_string_to_metric_families

    running = start_server(Service(bundle, name="ctr"))
    try:
        text = urllib.request.urlopen(running.url + "/metrics", timeout=30).read().decode()
    finally:
        running.stop()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    for outcome in ("ok", "bad_request", "overloaded", "shutting_down", "not_found", "client_gone", "error"):
        assert samples[("tidal_requests_total", (("outcome", outcome),))] == 0
    for status in ("400", "408", "431", "505"):
        assert samples[("tidal_http_refusals_total", (("status", status),))] == 0
    for stage in ("sparse", "dense"):
        assert samples[("tidal_compute_seconds_count", (("stage", stage),))] == 0
