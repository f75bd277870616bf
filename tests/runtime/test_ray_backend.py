"""The Ray backend on a local Ray started by the tests: the same end-to-end checks as
the local backend, smaller."""

from __future__ import annotations

import os
import time

import pytest

from runtime.test_engine import EXACT, _assert_bitwise_equal, _trainer
from runtime.test_trainer import _config
from tidal.runtime.engine import Engine
from trainer_helpers import stop_with_sigterm

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False)  # even beside another Ray
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two tables, so the embedding shards hold one each."""
    config = _config(tmp_path_factory.mktemp("data"), epochs=1)
    config["data"]["eval"] = None
    sparse = [f for f in config["features"] if f["kind"] == "sparse"]
    for f in sparse[::2]:
        f["table"] = "other"
    config["tables"].append({**config["tables"][0], "name": "other"})
    return config


def _all_actors_gone(timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]:
            return True
        time.sleep(0.2)
    return False


def test_ray_sync_with_two_shards_is_bitwise_the_reference(cluster, data, tmp_path):
    """With eviction on, so that the shard actors evict at the same safe points too, and the
    tables' learning rates on a schedule, which the shard actors follow by each batch's step."""
    schedule = {"warmup_steps": 4, "decay": "linear", "decay_steps": 20, "tables": True}
    evicting = {**data, "tables": [{**t, "eviction": {"ttl_steps": 2}, "max_rows": 4000} for t in data["tables"]],
                "training": {**data["training"], "lr_schedule": schedule}}
    reference = _trainer(evicting, tmp_path / "ref", None, evict_every=5)
    reference.fit()
    trainer = _trainer(evicting, tmp_path / "ray", {"backend": "ray", "sparse_workers": 2, "embedding_shards": 2,
                                                     **EXACT}, evict_every=5)
    summary = trainer.fit()
    assert summary["rows"] == 12_000 and summary["runtime"]["lost_samples"] == 0
    _assert_bitwise_equal(reference, trainer)
    assert all(t.stats().rows <= 4000 for t in trainer.collection.tables)  # evicted at the end, as a bundle serves it
    assert _all_actors_gone()


def test_a_ray_run_warm_started_from_a_checkpoint_is_bitwise_the_reference_one(cluster, data, tmp_path):
    """The shard actors take the rows of the checkpoint the run starts from, the dense
    workers its dense optimizer's state (SGD's momentum here)."""
    data = {**data, "training": {**data["training"], "optimizer": {"kind": "sgd", "momentum": 0.9}}}
    _trainer(data, tmp_path / "day1", None).fit()
    reference = _trainer(data, tmp_path / "ref", None)
    reference.fit(init_from=tmp_path / "day1")
    trainer = _trainer(data, tmp_path / "ray", {"backend": "ray", "sparse_workers": 2, "embedding_shards": 2, **EXACT})
    summary = trainer.fit(init_from=tmp_path / "day1")
    assert summary["resumed_from"] == summary["steps"] // 2 > 0
    _assert_bitwise_equal(reference, trainer)
    assert _all_actors_gone()


def test_ray_async_with_two_dense_workers_all_reduces(cluster, data, tmp_path):
    trainer = _trainer(data, tmp_path, {"backend": "ray", "sparse_workers": 2, "dense_workers": 2,
                                         "mode": "async", "max_inflight": 3})
    summary = trainer.fit()
    assert summary["rows"] == 12_000 and summary["runtime"]["staleness"]["max"] <= 2
    assert summary["tables"]["ids"]["rows"] > 1_000
    assert _all_actors_gone()


def test_killed_sparse_actor_is_replaced_without_loss(cluster, data, tmp_path, monkeypatch):
    original = Engine._backward_done
    killed = []

    def kill_once(engine, batch_id, timings):
        original(engine, batch_id, timings)
        if batch_id == 5 and not killed:
            killed.append(engine.sparse[0])
            ray.kill(engine.sparse[0])

    monkeypatch.setattr(Engine, "_backward_done", kill_once)
    summary = _trainer(data, tmp_path, {"backend": "ray", "sparse_workers": 2}).fit()
    report = summary["runtime"]
    assert killed and report["sparse_worker_failures"] and report["sparse_worker_failures"][0]["worker"] == 0
    assert report["lost_samples"] == 0 and summary["rows"] == 12_000
    assert _all_actors_gone()


def test_relative_data_paths_are_the_drivers_not_the_cluster_workers(cluster, data, tmp_path, monkeypatch):
    """A cluster's workers run in the folder the cluster started in, not the driver's."""
    driver = tmp_path / "driver"
    driver.mkdir()
    monkeypatch.chdir(driver)  # the cluster started elsewhere
    relative = {**data, "data": {**data["data"], "train": [os.path.relpath(p, driver) for p in data["data"]["train"]]}}
    assert not any(map(os.path.isabs, relative["data"]["train"]))
    summary = _trainer(relative, tmp_path / "run", {"backend": "ray", "sparse_workers": 1}).fit()
    assert summary["rows"] == 12_000 and summary["runtime"]["lost_samples"] == 0


def test_an_address_nothing_answers_at_fails_in_seconds_naming_it():
    import socket

    from tidal.errors import ConfigError
    from tidal.runtime.ray_backend import _check_reachable

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # closed again before the check: nothing listens there
    start = time.monotonic()
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(ConfigError, match=f"runtime.ray_address {address}: nothing answers there"):
            _check_reachable(address)
    assert time.monotonic() - start < 10
    with pytest.raises(ConfigError, match="must be 'auto', 'host:port' or 'ray://host:port'"):
        _check_reachable("somewhere")
    _check_reachable("auto")
    _check_reachable(None)


def test_an_address_where_something_else_answers_fails_in_seconds(monkeypatch):
    """A dashboard's port (HTTP/1.1) or a listener that never answers is not taken for a
    cluster: ray.init would wait there for minutes."""
    import socket
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from tidal.errors import ConfigError
    from tidal.runtime import ray_backend

    monkeypatch.setattr(ray_backend, "_CONNECT_S", 1.0)
    web = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        start = time.monotonic()
        for port in (web.server_address[1], silent.getsockname()[1]):
            with pytest.raises(ConfigError, match=f"127.0.0.1:{port}: something answers there, but not a Ray cluster"):
                ray_backend._check_reachable(f"127.0.0.1:{port}")
        assert time.monotonic() - start < 5
    finally:
        web.shutdown()
        silent.close()


def test_a_real_cluster_passes_the_address_check(cluster):
    from tidal.runtime.ray_backend import _check_reachable

    _check_reachable(ray.get_runtime_context().gcs_address)


@pytest.mark.parametrize(("address", "message"), [
    ("auto", "runtime.ray_address auto: no Ray cluster there"),
    ("10.0.0.1:6379", "runtime.ray_address 10.0.0.1:6379: a Ray cluster answers there but refused this driver "
                      r"\(.*\); check that both run the same Ray and share its authentication token")])
def test_no_ray_cluster_at_the_address_or_one_that_refuses_is_a_config_error(data, tmp_path, monkeypatch, address,
                                                                            message):
    from tidal.errors import ConfigError
    from tidal.runtime.ray_backend import RayBackend

    def no_cluster(**kwargs):  # type: ignore[no-untyped-def]
        raise ConnectionError("Could not find any running Ray instance")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_cluster)
    monkeypatch.setattr("tidal.runtime.ray_backend._check_reachable", lambda address, key: None)  # a Ray answers there
    trainer = _trainer(data, tmp_path, {"backend": "ray", "ray_address": address})
    with pytest.raises(ConfigError, match=message):
        RayBackend(trainer, trainer.reader_spec(data["data"]["train"]))


@pytest.mark.parametrize(("address", "env", "expected"), [(None, None, "local"), (None, "10.0.0.1:6379", "10.0.0.1:6379"),
                                                     ("auto", "10.0.0.1:6379", "auto")])
def test_without_an_address_a_run_starts_a_local_ray_of_its_own_or_joins_its_jobs(data, tmp_path, monkeypatch, address,
                                                                                   env, expected):
    """A local Ray of its own even when another runs on the machine (ray.init without an
    address would join that one, and refuse the CPU count given)."""
    from tidal.runtime.ray_backend import RayBackend

    calls = []

    def init(**kwargs):  # type: ignore[no-untyped-def]
        calls.append(kwargs)
        raise KeyboardInterrupt  # stop there

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))  # of the Ray it started: none here
    checked = []
    monkeypatch.setattr("tidal.runtime.ray_backend._check_reachable", lambda *where: checked.append(where))
    if env:
        monkeypatch.setenv("RAY_ADDRESS", env)
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    trainer = _trainer(data, tmp_path, {"backend": "ray", **({"ray_address": address} if address else {})})
    with pytest.raises(KeyboardInterrupt):
        RayBackend(trainer, trainer.reader_spec(data["data"]["train"]))
    assert calls[0]["address"] == expected and (calls[0]["num_cpus"] is None) == (expected != "local")
    assert calls[1:] == ["shutdown"]  # an interrupted start stops what of Ray it started
    assert checked == [(expected, "runtime.ray_address" if address else "RAY_ADDRESS")]  # RAY_ADDRESS's too, in seconds


def test_a_cluster_of_another_ray_or_python_version_is_a_config_error(data, tmp_path, monkeypatch):
    from tidal.errors import ConfigError
    from tidal.runtime.ray_backend import RayBackend

    def mismatch(**kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("Version mismatch: The cluster was started with:\n    Ray: 2.60.0\n    Python: 3.11.7\n"
                           "This process on node 10.0.0.2 was started with:\n    Ray: 2.59.0\n    Python: 3.11.7\n")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", mismatch)
    monkeypatch.setattr("tidal.runtime.ray_backend._check_reachable", lambda address, key: None)
    trainer = _trainer(data, tmp_path, {"backend": "ray", "ray_address": "10.0.0.1:6379"})
    with pytest.raises(ConfigError, match=r"runtime.ray_address 10.0.0.1:6379: the Ray cluster refused this driver "
                                          r"\(Version mismatch: The cluster was started with: Ray: 2.60.0 Python: 3.11.7 "
                                          r"This process .* Ray: 2.59.0 .*\); run the cluster's Ray and Python versions "
                                          r"here"):
        RayBackend(trainer, trainer.reader_spec(data["data"]["train"]))


@pytest.mark.parametrize("runtime", [{"sparse_workers": 4}, {"sparse_workers": 1, "sparse_workers_at": {4: 4}}],
                         ids=["at_start", "by_the_schedule"])
def test_more_actors_than_the_cluster_has_cpus_are_refused_before_any_starts(cluster, data, tmp_path, runtime):
    from tidal.errors import ConfigError

    trainer = _trainer(data, tmp_path, {"backend": "ray", "embedding_shards": 2, **runtime})
    where = "runtime.sparse_workers_at" if "sparse_workers_at" in runtime else "runtime.sparse_workers"
    with pytest.raises(ConfigError, match=rf"the Ray cluster has 6 CPUs, and the run needs 7 actors of one CPU each: 4 "
                                          rf"sparse workers \({where}\), 1 dense worker \(runtime.dense_workers\), 2 "
                                          rf"embedding shards \(runtime.embedding_shards\); add nodes or run at most 3 "
                                          rf"sparse workers \({where}\)"):
        trainer.fit()
    assert _all_actors_gone()


def test_a_run_waiting_for_cpus_other_work_holds_says_so_and_runs_once_they_free(cluster, data, tmp_path, capsys):
    import threading

    holder = ray.remote(num_cpus=5)(type("Holder", (), {"ready": lambda self: True})).remote()
    ray.get(holder.ready.remote())
    threading.Timer(3.0, ray.kill, args=(holder,)).start()
    summary = _trainer(data, tmp_path, {"backend": "ray", "sparse_workers": 1, "embedding_shards": 2}).fit()
    assert "the Ray cluster has 1 free CPUs and the run starts 4 actors" in capsys.readouterr().out
    assert summary["rows"] == 12_000
    assert _all_actors_gone()


def test_a_dead_shard_actor_stops_the_run_naming_it(cluster, data, tmp_path, monkeypatch):
    from tidal.errors import RunStoppedError

    original = Engine._backward_done

    def kill_a_shard(engine, batch_id, timings):
        original(engine, batch_id, timings)
        if batch_id == 5:
            ray.kill(engine.backend.shards[0])

    monkeypatch.setattr(Engine, "_backward_done", kill_a_shard)
    trainer = _trainer(data, tmp_path, {"backend": "ray", "sparse_workers": 2, "embedding_shards": 2})
    with pytest.raises(RunStoppedError, match="an embedding shard actor died .* its last checkpoint, if it wrote one, "
                                              "resumes it") as stopped:
        trainer.fit()
    assert str(stopped.value).count("The run stopped") == 1  # raised in a Ray actor, and brought over whole
    assert stopped.value.what.startswith("an embedding shard actor died")
    assert _all_actors_gone()


def test_an_interrupt_while_the_shards_start_leaves_no_actor(cluster, data, tmp_path, monkeypatch):
    from tidal.runtime.ray_backend import RayBackend

    original = RayBackend._start_shards

    def interrupted(backend):
        original(backend)
        raise KeyboardInterrupt

    monkeypatch.setattr(RayBackend, "_start_shards", interrupted)
    trainer = _trainer(data, tmp_path, {"backend": "ray", "embedding_shards": 2})
    with pytest.raises(KeyboardInterrupt):
        RayBackend(trainer, trainer.reader_spec(data["data"]["train"]))
    assert _all_actors_gone()


def test_the_colocated_sparse_worker_counts_once_among_the_actors(data, tmp_path, monkeypatch):
    from tidal.errors import ConfigError
    from tidal.runtime.ray_backend import RayBackend

    trainer = _trainer(data, tmp_path, {"backend": "ray", "sparse_workers": 2, "colocated_sparse_worker": True})
    backend = RayBackend.__new__(RayBackend)  # its checks only: no actor started
    backend.trainer, backend.runtime, backend.local_ray = trainer, trainer.config.runtime, False
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 5.0})
    backend.check_workers(3)  # the run's 3 sparse actors (the colocated one among them), 1 dense, 1 shard
    with pytest.raises(ConfigError, match=r"the Ray cluster has 5 CPUs, and the run needs 6 actors of one CPU each: 4 "
                                          r"sparse workers \(runtime.sparse_workers_at\)"):
        backend.check_workers(4)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    with pytest.raises(ConfigError, match=r"add nodes or run at most 1 sparse workers \(runtime.sparse_workers\)$"):
        backend.check_workers(3)  # the setting counts the workers besides the colocated one
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    with pytest.raises(ConfigError, match=r"add nodes or run fewer dense workers \(runtime.dense_workers\) or embedding "
                                          r"shards \(runtime.embedding_shards\)$"):  # not "at most 0 sparse workers"
        backend.check_workers(3)
    backend.local_ray = True  # Tidal's own: no nodes to add; asked for while training, not by the config
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 5.0})
    with pytest.raises(ConfigError, match=r"4 sparse workers \(Trainer.set_sparse_workers\), .*; name the most sparse "
                                          r"workers the run will use in runtime.sparse_workers_at \(Tidal's own local Ray "
                                          r".*\), run on a Ray cluster \(runtime.ray_address\), or run at most 3 sparse "
                                          r"workers \(Trainer.set_sparse_workers\)$"):
        backend.check_workers(4, asked_by="Trainer.set_sparse_workers")


def test_a_sigterm_stops_a_ray_run_as_ctrl_c_does(data, tmp_path):
    """Ray's start replaces Python's SIGTERM handler with one that aborts the process
    with a stack dump (exit 134); the run takes it back."""
    config = {**data, "training": {**data["training"], "epochs": 50, "log_every": 1, "checkpoint_every": 5,
                                   "run_dir": str(tmp_path / "run")},
              "runtime": {"backend": "ray", "sparse_workers": 1, "embedding_shards": 1}}
    done = stop_with_sigterm(config, tmp_path)
    assert done.returncode == 130, done.stderr
    assert "tidal train: interrupted; `tidal train --config " in done.stderr and "SIGTERM received" not in done.stderr
