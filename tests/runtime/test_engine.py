"""The heterogeneous engine on the local backend: equality with the reference trainer,
async staleness, transfer dtypes, faults, resizing, checkpoints and clean shutdown."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import yaml

from runtime.test_trainer import _config
from tidal.config import EmbeddingFeature, Initializer, RunConfig, Sgd, TableConfig, TrainingConfig
from tidal.data.batch import SparseBatch
from tidal.embedding import EmbeddingCollection
from tidal.errors import DataError, RunStoppedError, TidalError
from tidal.models import resolve_precision
from tidal.runtime import Trainer, checkpoint
from tidal.runtime.workers import (DenseWorker, EmbeddingShard, SparseWorker, _fp16_scale, decode, encode,
                                   lower_priority)
from trainer_helpers import stop_with_sigterm


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    config = _config(root, epochs=1)
    config["data"]["eval"] = None
    return config


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    trainer = _trainer(data, tmp_path_factory.mktemp("ref"), None)
    trainer.fit()
    return trainer


def _trainer(config: dict, run_dir, runtime: dict | None, **training) -> Trainer:
    config = {**config, "training": {**config["training"], "run_dir": str(run_dir), **training}}
    if runtime is not None:
        config["runtime"] = runtime
    return Trainer(RunConfig(**config))


# compared bit for bit with the reference trainer, which runs on the CPU
EXACT = {"transfer_dtype": "float32", "device": "cpu"}


def _tables(trainer: Trainer) -> dict[int, np.ndarray]:
    table = trainer.collection.tables[0]
    shards = [table.snapshot_shard(s, since_save=False) for s in range(table.num_shards)]
    keys = np.concatenate([s["keys"] for s in shards])
    rows = np.concatenate([np.hstack([s["values"], s["state"]]) for s in shards])
    return dict(zip(keys.tolist(), rows))


def _metadata(trainer: Trainer) -> list[dict[int, tuple[int, int]]]:
    """Each table's key -> (last seen step, count)."""
    found = []
    for table in trainer.collection.tables:
        shards = [table.snapshot_shard(s, since_save=False) for s in range(table.num_shards)]
        keys, seen, counts = (np.concatenate([s[name] for s in shards]).tolist() for name in ("keys", "last_seen", "counts"))
        found.append(dict(zip(keys, zip(seen, counts))))
    return found


def _assert_bitwise_equal(a: Trainer, b: Trainer) -> None:
    """Weights, rows and row metadata (so a resumed run evicts alike) bit for bit."""
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), name
    rows_a, rows_b = _tables(a), _tables(b)
    assert rows_a.keys() == rows_b.keys()
    assert all(np.array_equal(rows_a[k], rows_b[k]) for k in rows_a)
    assert _metadata(a) == _metadata(b)
    assert [t.step for t in a.collection.tables] == [t.step for t in b.collection.tables]


def _no_worker_threads() -> bool:
    left = [t.name for t in threading.enumerate() if t.name.startswith(("tidal-sparse", "tidal-dense"))]
    assert not left, f"threads left behind: {left}"
    return True


@pytest.mark.parametrize("sparse_workers", [1, 2, 3])
def test_sync_fp32_with_one_dense_worker_is_bitwise_the_reference(data, reference, tmp_path, monkeypatch, sparse_workers):
    served, forward = [], SparseWorker.forward
    monkeypatch.setattr(SparseWorker, "forward", lambda worker, batch_id: served.append(worker.index) or forward(worker, batch_id))
    trainer = _trainer(data, tmp_path, {"sparse_workers": sparse_workers, **EXACT})
    summary = trainer.fit()
    assert summary["rows"] == 12_000 and summary["runtime"]["lost_samples"] == 0
    _assert_bitwise_equal(reference, trainer)
    shares = np.bincount(served, minlength=sparse_workers) / len(served)
    assert shares.min() >= 0.5 / sparse_workers, shares  # every worker takes its turn
    assert _no_worker_threads()


def test_sync_with_two_dense_workers_agrees_with_the_reference_to_round_off(data, reference, tmp_path):
    """Two workers sum the batch's gradient in another order. Adam (dense) and Adagrad
    (tables) move an element whose gradient is within round-off of zero by up to lr
    either way, so a few elements differ by more than round-off (on one machine, 504 of
    1.4M table elements by more than 1e-6, one of them by 1.4e-3); the rest agree."""
    trainer = _trainer(data, tmp_path, {"sparse_workers": 2, "dense_workers": 2, **EXACT})
    trainer.fit()
    for name, x in reference.model.state_dict().items():
        y = trainer.model.state_dict()[name]
        assert float((x - y).norm()) <= 1e-5 * max(float(x.norm()), 1e-3), name
    rows_a, rows_b = _tables(reference), _tables(trainer)
    assert rows_a.keys() == rows_b.keys()
    a, b = np.stack(list(rows_a.values())), np.stack([rows_b[k] for k in rows_a])
    assert np.mean(np.abs(a - b) > 1e-6) <= 1e-3
    assert np.linalg.norm(a - b) <= 1e-4 * np.linalg.norm(a)


def test_async_reports_bounded_staleness_and_still_learns(data, reference, tmp_path):
    trainer = _trainer(data, tmp_path, {"sparse_workers": 2, "mode": "async", "max_inflight": 3})
    summary = trainer.fit()
    staleness = summary["runtime"]["staleness"]
    assert staleness["max"] == 2 and staleness["mean"] > 0, staleness  # max_inflight - 1
    assert summary["rows"] == 12_000
    saved = json.loads((tmp_path / "telemetry.json").read_text())["final"]
    assert saved["staleness"] == staleness and 0 < saved["busy"]["dense"]["dense"] <= 1.0
    assert saved == json.loads(json.dumps(summary["runtime"]))  # the fault report included: lost samples, failures
    assert saved["lost_samples"] == 0 and saved["sparse_worker_failures"] == []


def test_sync_bf16_precision_with_one_dense_worker_is_bitwise_the_reference_in_bf16(data, reference, tmp_path):
    single = _trainer(data, tmp_path / "single", None, precision="bfloat16")
    single.fit()
    engine = _trainer(data, tmp_path / "engine", {"sparse_workers": 2, "device": "cpu"}, precision="bfloat16")
    engine.fit()
    _assert_bitwise_equal(single, engine)  # rows pooled and sent in bfloat16, the products in bfloat16 on both
    x = torch.cat([p.reshape(-1) for p in reference.model.parameters()])
    y = torch.cat([p.reshape(-1) for p in engine.model.parameters()])
    assert 0 < float((x - y).abs().max().detach()) < 0.1  # bfloat16 moved the weights, a little


def test_auto_precision_is_bfloat16_only_where_the_cpu_has_it(monkeypatch):
    cpu = torch.device("cpu")
    for amx, avx512_bf16, expected in [(False, False, "float32"), (True, False, "bfloat16"), (False, True, "bfloat16")]:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda amx=amx: amx)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda a=avx512_bf16: a)
        assert resolve_precision(cpu, "auto") == expected
        assert resolve_precision(cpu, "float32") == "float32" and resolve_precision(cpu, "bfloat16") == "bfloat16"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_transfer_stays_close_to_fp32(data, reference, tmp_path, dtype):
    trainer = _trainer(data, tmp_path, {"sparse_workers": 2, "transfer_dtype": dtype})
    trainer.fit()
    x = torch.cat([p.reshape(-1) for p in reference.model.parameters()])
    y = torch.cat([p.reshape(-1) for p in trainer.model.parameters()])
    assert 0 < float((x - y).abs().max().detach()) < 0.05


def test_encode_round_trips_and_fp16_scale_avoids_overflow():
    x = torch.randn(64, 3, 8)
    assert torch.equal(decode(encode(x, "float32"), "float32"), x)
    assert torch.allclose(decode(encode(x, "bfloat16"), "bfloat16"), x, rtol=1e-2)
    assert encode(x, "bfloat16").dtype == np.int16
    assert _fp16_scale(torch.full((4,), 1e-6), 1024.0) == 1024.0
    for peak in (1000.0, 1e6):  # the second needs a scale below 1
        scale = _fp16_scale(torch.full((4,), peak), 1024.0)
        assert scale * peak < 65504 and scale * 2 * peak >= 65504
    assert _fp16_scale(torch.tensor([1.0, float("inf")]), 1024.0) == 1024.0  # a broken gradient stays visible


@pytest.mark.parametrize("peak", [1e-3, 100.0])  # float16: scaled up 1024x, and a scale held down to stay finite
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_a_pooled_gradient_crosses_the_cut_and_reaches_the_store_at_its_own_scale(dtype, peak):
    from types import SimpleNamespace

    grad = torch.randn(8, 3, 4, generator=torch.Generator().manual_seed(0))
    grad = grad / grad.abs().max() * peak
    payload = DenseWorker._grad_payload(SimpleNamespace(loss_scale=1024.0), grad, dtype)
    seen = {}
    store = SimpleNamespace(backward=lambda batch_id, g: seen.update(batch_id=batch_id, grad=g) or {})
    SparseWorker.backward(SimpleNamespace(nice=0, store=store), 7, payload)
    tolerance = {"float32": 0.0, "bfloat16": 8e-3, "float16": 1e-3}[dtype]
    assert seen["batch_id"] == 7
    torch.testing.assert_close(seen["grad"].float(), grad, rtol=tolerance, atol=tolerance * peak)


class _Flaky:
    """Makes one worker method raise once at a given batch, as a crashing worker would."""

    def __init__(self, monkeypatch, method: str, batch_id: int, owner: type = SparseWorker) -> None:
        original = getattr(owner, method)
        self.raised = 0

        def flaky(worker, k, *args):
            if k == batch_id and not self.raised:
                self.raised += 1
                raise RuntimeError(f"injected failure in {method} of batch {k}")
            return original(worker, k, *args)

        monkeypatch.setattr(owner, method, flaky)


@pytest.mark.parametrize("method", ["forward", "backward"])
def test_failed_sparse_worker_is_replaced_and_nothing_is_lost(data, reference, tmp_path, monkeypatch, method):
    flaky = _Flaky(monkeypatch, method, batch_id=5)
    trainer = _trainer(data, tmp_path, {"sparse_workers": 2, **EXACT})
    summary = trainer.fit()
    report = summary["runtime"]
    assert flaky.raised == 1 and report["lost_samples"] == 0 and summary["rows"] == 12_000
    assert [(f["batch"], f["stage"]) for f in report["sparse_worker_failures"]] == [(5, method)]
    _assert_bitwise_equal(reference, trainer)  # the failure struck before the lookup / the update
    assert _no_worker_threads()


def test_an_update_failing_once_inside_the_store_is_applied_by_the_replacement(data, reference, tmp_path, monkeypatch):
    original, calls = EmbeddingCollection.backward, []

    def fails_at_the_fifth(collection, ctx, grad, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise MemoryError("no memory for the update buffer")
        return original(collection, ctx, grad, **kwargs)

    monkeypatch.setattr(EmbeddingCollection, "backward", fails_at_the_fifth)
    trainer = _trainer(data, tmp_path, {"sparse_workers": 2, **EXACT})
    summary = trainer.fit()
    report = summary["runtime"]
    assert report["lost_samples"] == 0 and summary["rows"] == 12_000
    assert [f["stage"] for f in report["sparse_worker_failures"]] == ["backward"]
    _assert_bitwise_equal(reference, trainer)


def test_two_overlapping_updates_of_one_batch_land_once(monkeypatch):
    """A retry sent while the first call still runs (a replaced worker's, on a threaded
    shard actor) waits for it and then lands nothing."""
    collection = EmbeddingCollection([TableConfig(name="t", dim=2, optimizer=Sgd(lr=1.0),
                                                  initializer=Initializer(kind="zeros"))],
                                     [EmbeddingFeature(name="f", table="t")])
    store, batch = EmbeddingShard(collection), SparseBatch.from_lists({"f": [[1], [2]]})
    store.forward(0, batch)
    original = EmbeddingCollection.backward

    def slow(collection, ctx, grad, **kwargs):
        time.sleep(0.2)
        return original(collection, ctx, grad, **kwargs)

    monkeypatch.setattr(EmbeddingCollection, "backward", slow)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(store.backward, 0, torch.ones(2, 1, 2))
        time.sleep(0.05)
        second = pool.submit(store.backward, 0, torch.ones(2, 1, 2))
        assert first.result()["update"] > 0.0 and second.result() == {"update": 0.0}
    np.testing.assert_array_equal(collection.tables[0].lookup(np.array([1, 2])), -np.ones((2, 2)))
    assert store.evict() == 0  # nothing holds rows


def test_a_batch_given_up_while_its_update_runs_or_looked_up_late_holds_no_rows(monkeypatch):
    """A drop that meets its batch's update under way waits for it; a lookup of a batch
    whose update landed (a replaced worker's late call) keeps nothing: either would
    stop the run at the next eviction."""
    collection = EmbeddingCollection([TableConfig(name="t", dim=2, eviction={"ttl_steps": 100})],
                                     [EmbeddingFeature(name="f", table="t")])
    store, batch = EmbeddingShard(collection), SparseBatch.from_lists({"f": [[1], [2]]})
    original = EmbeddingCollection.backward

    def slow_then_failing(collection, ctx, grad, **kwargs):
        time.sleep(0.2)
        raise MemoryError("no memory for the update buffer")

    store.forward(0, batch)
    monkeypatch.setattr(EmbeddingCollection, "backward", slow_then_failing)
    with ThreadPoolExecutor(1) as pool:
        update = pool.submit(store.backward, 0, torch.ones(2, 1, 2))
        time.sleep(0.05)
        store.drop(0)  # the batch is given up while its update still runs
        with pytest.raises(MemoryError):
            update.result()
    monkeypatch.setattr(EmbeddingCollection, "backward", original)
    store.forward(1, batch)
    store.backward(1, torch.ones(2, 1, 2))
    store.look_up(1, batch)  # late
    assert store.evict() == 0


def test_a_retried_batch_is_looked_up_once_so_admission_counts_each_sighting_once():
    """A batch looked up ahead whose worker was replaced comes again from another worker
    (two calls at once, or one after the other): a second lookup would count its keys
    twice, admitting keys under min_count=2 that the batch saw once."""
    collection = EmbeddingCollection([TableConfig(name="t", dim=2, admission={"kind": "count", "min_count": 2})],
                                     [EmbeddingFeature(name="f", table="t")])
    store, batch = EmbeddingShard(collection), SparseBatch.from_lists({"f": [[1], [2], [3]]})
    original = EmbeddingCollection.lookup

    def slow(collection, batch, **kwargs):
        time.sleep(0.1)
        return original(collection, batch, **kwargs)

    with ThreadPoolExecutor(2) as pool, pytest.MonkeyPatch.context() as patched:
        patched.setattr(EmbeddingCollection, "lookup", slow)
        first, second = pool.submit(store.look_up, 0, batch), pool.submit(store.look_up, 0, batch)
        assert sorted(f.result()["lookup"] > 0.0 for f in (first, second)) == [False, True]
    assert store.look_up(0, batch) == {"lookup": 0.0}
    pooled, timings = store.forward(0, batch)
    assert "lookup" not in timings and collection.tables[0].stats().rows == 0
    store.backward(0, torch.ones(3, 1, 2))
    store.look_up(1, batch)  # the next batch: the second sighting admits them
    assert collection.tables[0].stats().rows == 3
    with ThreadPoolExecutor(1) as pool, pytest.MonkeyPatch.context() as patched:
        patched.setattr(EmbeddingCollection, "lookup", slow)
        late = pool.submit(store.look_up, 2, batch)  # a replaced worker's, still running when its batch is given up
        time.sleep(0.05)
        store.drop(2)
        late.result()
    store.drop(1)
    assert store.evict() == 0  # the dropped batch holds no rows


def test_failed_look_up_ahead_is_raised_by_the_forward_and_nothing_is_lost(data, reference, tmp_path, monkeypatch):
    looked_up = []
    original = EmbeddingShard.look_up
    monkeypatch.setattr(EmbeddingShard, "look_up",
                        lambda shard, k, batch: looked_up.append(k) or original(shard, k, batch))
    flaky = _Flaky(monkeypatch, "look_up", batch_id=5, owner=EmbeddingShard)
    trainer = _trainer(data, tmp_path, {"sparse_workers": 2, **EXACT})
    summary = trainer.fit()
    report = summary["runtime"]
    assert len(looked_up) >= 10  # sync mode found rows ahead for most batches
    assert flaky.raised == 1 and report["lost_samples"] == 0 and summary["rows"] == 12_000
    assert [(f["batch"], f["stage"]) for f in report["sparse_worker_failures"]] == [(5, "forward")]
    _assert_bitwise_equal(reference, trainer)
    assert _no_worker_threads()


def test_update_failing_every_time_is_counted_as_lost(data, tmp_path, monkeypatch):
    def broken(worker, k, *grads):
        raise RuntimeError("update refused")

    original = SparseWorker.backward
    monkeypatch.setattr(SparseWorker, "backward", lambda w, k, *g: broken(w, k) if k == 3 else original(w, k, *g))
    summary = _trainer(data, tmp_path, {"sparse_workers": 2, "mode": "async"}).fit()
    report = summary["runtime"]
    assert report["lost_batches"] == 1 and report["lost_samples"] == 512
    assert "backward failed 3 times" in report["lost_reasons"][0] and "update refused" in report["lost_reasons"][0]
    assert summary["rows"] == 12_000 - 512
    assert _no_worker_threads()


def test_batch_failing_every_forward_is_given_up_and_reported(data, tmp_path, monkeypatch):
    original = SparseWorker.forward

    def poison(worker, k):
        if k == 7:
            raise RuntimeError("cannot pool this batch")
        return original(worker, k)

    monkeypatch.setattr(SparseWorker, "forward", poison)
    summary = _trainer(data, tmp_path, {"sparse_workers": 2}).fit()
    report = summary["runtime"]
    assert report["lost_batches"] == 1 and report["lost_samples"] == 512
    assert "forward failed 3 times" in report["lost_reasons"][0]
    assert len(report["sparse_worker_failures"]) == 3 and summary["rows"] == 12_000 - 512
    assert _no_worker_threads()


def test_dense_failure_stops_the_run_with_a_clear_error(data, tmp_path, monkeypatch):
    from tidal.runtime.workers import DenseWorker

    def broken(worker, payload, step):
        raise RuntimeError("device lost")

    monkeypatch.setattr(DenseWorker, "step", broken)
    with pytest.raises(RunStoppedError, match="dense worker failed on batch 0 .*device lost.*The run stopped; its "
                                              "last checkpoint, if it wrote one, resumes it"):
        _trainer(data, tmp_path, {"sparse_workers": 2, "dense_workers": 2}).fit()
    assert _no_worker_threads()


def test_the_command_line_says_how_to_go_on_with_a_run_a_dead_worker_stopped(data, tmp_path, monkeypatch, capsys):
    from tidal.cli import main
    from tidal.runtime.workers import DenseWorker

    original, steps = DenseWorker.step, []

    def fails_at_the_3rd_step(worker, payload, step):  # type: ignore[no-untyped-def]
        steps.append(1)
        if len(steps) == 3:
            raise RuntimeError("device lost")
        return original(worker, payload, step)

    monkeypatch.setattr(DenseWorker, "step", fails_at_the_3rd_step)
    config = {**data, "training": {**data["training"], "run_dir": str(tmp_path / "run")},
              "runtime": {"sparse_workers": 1, "mode": "sync"}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(path)]) == 2
    assert capsys.readouterr().err == "tidal train: dense worker failed on batch 2 (step 3): RuntimeError('device " \
                                      "lost'). The run stopped; no checkpoint was written: run the same command again\n"
    steps.clear()
    path.write_text(yaml.safe_dump({**config, "training": {**config["training"], "checkpoint_every": 2}}))
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"The run stopped; `tidal train --config {re.escape(str(path))} --resume` continues from the last "
                     rf"checkpoint written, step-\d{{8}}-epoch-\d+\n$", err)


def test_run_stopped_by_a_dense_failure_resumes_from_its_checkpoint(data, reference, tmp_path, monkeypatch):
    from tidal.runtime.workers import DenseWorker

    original = DenseWorker.step
    steps = []

    def fails_at_the_13th_step(worker, payload, step):
        steps.append(1)
        if len(steps) == 13:
            raise RuntimeError("device lost")
        return original(worker, payload, step)

    runtime = {"sparse_workers": 2, **EXACT}
    monkeypatch.setattr(DenseWorker, "step", fails_at_the_13th_step)
    with pytest.raises(TidalError, match="dense worker failed on batch 12"):
        _trainer(data, tmp_path, runtime, checkpoint_every=10).fit()
    monkeypatch.setattr(DenseWorker, "step", original)
    resumed = _trainer(data, tmp_path, runtime, checkpoint_every=10)
    assert resumed.fit(resume=True)["steps"] == 24
    _assert_bitwise_equal(reference, resumed)


def test_colocated_sparse_worker_adds_one(data, tmp_path):
    summary = _trainer(data, tmp_path, {"sparse_workers": 2, "colocated_sparse_worker": True}).fit()
    assert summary["runtime"]["sparse_workers"] == [(0, 3)] and summary["rows"] == 12_000


def _nice_of_this_thread() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="threads have nice values of their own on Linux")
@pytest.mark.parametrize("nice", [0, 7])
def test_sparse_work_runs_at_the_configured_nice_and_dense_work_at_the_process_one(data, tmp_path, monkeypatch, nice):
    seen: dict[str, set[int]] = {"reader": set(), "sparse": set(), "dense": set()}

    def recorded(role, method):
        def call(self, *args, **kwargs):
            result = method(self, *args, **kwargs)
            seen[role].add(_nice_of_this_thread())
            return result
        return call

    monkeypatch.setattr(SparseWorker, "_extract", recorded("reader", SparseWorker._extract))
    monkeypatch.setattr(EmbeddingShard, "forward", recorded("sparse", EmbeddingShard.forward))
    monkeypatch.setattr(DenseWorker, "step", recorded("dense", DenseWorker.step))
    base = _nice_of_this_thread()
    _trainer(data, tmp_path, {"sparse_workers": 2, "mode": "async", "sparse_nice": nice}).fit()
    assert seen == {"reader": {max(base, nice)}, "sparse": {max(base, nice)}, "dense": {base}}
    assert _nice_of_this_thread() == base


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="threads have nice values of their own on Linux")
def test_lower_priority_only_raises_the_calling_threads_nice():
    base, seen = _nice_of_this_thread(), []

    def worker():
        lower_priority(base + 5)
        lower_priority(base + 3)  # lowering it back would need privileges: kept at +5
        seen.append(_nice_of_this_thread())

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == [min(base + 5, 19)] and _nice_of_this_thread() == base


def test_interrupt_joins_every_worker(data, tmp_path, monkeypatch):
    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_log", interrupt)
    with pytest.raises(KeyboardInterrupt):
        _trainer(data, tmp_path, {"sparse_workers": 3, "mode": "async"}).fit()
    assert _no_worker_threads()


def test_bad_row_with_fail_policy_stops_the_run(data, tmp_path):
    bad = tmp_path / "bad.tsv"
    lines = open(data["data"]["train"][0]).read().splitlines()[:600]
    lines[550] = "1\tnot-enough-columns"
    bad.write_text("\n".join(lines) + "\n")
    config = {**data, "data": {**data["data"], "train": [str(bad)], "on_bad_row": "fail"}}
    with pytest.raises(DataError, match="bad.tsv:551"):
        _trainer(config, tmp_path / "run", {"sparse_workers": 2}).fit()
    assert _no_worker_threads()


def test_sparse_workers_change_while_training(data, reference, tmp_path, monkeypatch):
    served, forward = [], SparseWorker.forward
    monkeypatch.setattr(SparseWorker, "forward", lambda worker, batch_id: served.append((worker.index, batch_id))
                        or forward(worker, batch_id))
    trainer = _trainer(data, tmp_path, {"sparse_workers": 1, **EXACT,
                                         "sparse_workers_at": {5: 3, 15: 2}})
    summary = trainer.fit()
    assert summary["rows"] == 12_000 and summary["runtime"]["sparse_workers"] == [(0, 1), (5, 3), (15, 2)]
    _assert_bitwise_equal(reference, trainer)
    by_worker = {w: [b for i, b in served if i == w] for w in range(3)}
    assert min(by_worker[0]) == 0 and max(by_worker[0]) > 15  # the first worker runs throughout
    assert by_worker[1] and min(by_worker[1]) >= 5 and max(by_worker[1]) > 15  # started at step 5, kept
    assert by_worker[2] and min(by_worker[2]) >= 5 and max(by_worker[2]) < 15  # started at 5, retired at 15


def test_set_sparse_workers_from_another_thread_while_training(data, tmp_path, monkeypatch):
    original, refused = Trainer._log, []

    def grow(trainer, *args):
        original(trainer, *args)
        for wrong in (0, 2.5, True, 257):  # an audit's find: 2.5 ended the run with a bare TypeError
            with pytest.raises(TidalError, match=rf"sparse workers must be a whole number from 1 to 256 \(as "
                                                 rf"runtime.sparse_workers\), got {re.escape(repr(wrong))}$"):
                trainer.set_sparse_workers(wrong)
            refused.append(wrong)
        threading.Thread(target=trainer.set_sparse_workers, args=(3,)).start()

    monkeypatch.setattr(Trainer, "_log", grow)
    trainer = _trainer(data, tmp_path, {"sparse_workers": 2})
    summary = trainer.fit()
    counts = summary["runtime"]["sparse_workers"]
    assert summary["rows"] == 12_000 and counts[0] == (0, 2) and counts[1][1] == 3 and counts[1][0] >= 10
    assert refused[:4] == [0, 2.5, True, 257]
    with pytest.raises(TidalError, match="no heterogeneous run is training"):
        trainer.set_sparse_workers(1)


def test_cli_train_prints_the_stage_table(data, tmp_path, capsys):
    from tidal.cli import main

    config = {**data, "training": {**data["training"], "run_dir": str(tmp_path / "run")},
              "runtime": {"sparse_workers": 2, "mode": "async", "telemetry_every_s": 0.02, "sparse_workers_at": {10: 1}}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "dense   dense" in out and "sparse  lookup" in out and "lost samples: 0" in out
    assert "sparse workers: 2 from step 0, 1 from step 10" in out
    assert re.search(r"\n  engine: [\d,]+ samples/s  busy: reader", out)  # the periodic line, told from the progress line
    assert "reader  parse" in out and "reader  transfer" not in out  # readers only parse and extract
    saved = json.loads((tmp_path / "run" / "telemetry.json").read_text())
    assert saved["snapshots"] and saved["final"]["samples"] == 12_000


def test_resume_from_an_engine_checkpoint_equals_an_uninterrupted_run(data, reference, tmp_path):
    runtime = {"sparse_workers": 2, **EXACT}
    _trainer(data, tmp_path, runtime, checkpoint_every=10).fit(max_steps=15)
    resumed = _trainer(data, tmp_path, {**runtime, "sparse_workers": 3}, checkpoint_every=10)
    summary = resumed.fit(resume=True)
    assert summary["steps"] == 24 and summary["rows"] == 12_000 - 10 * 512  # steps 11 to 24
    _assert_bitwise_equal(reference, resumed)


def test_a_resume_with_two_dense_workers_gives_each_its_own_optimizer_state(data, tmp_path):
    """Loading one state dict into two optimizers shares its tensors: each worker then
    stepped them, Adam's step count rising twice a step."""
    runtime = {"sparse_workers": 2, "dense_workers": 2, **EXACT}
    whole = _trainer(data, tmp_path / "whole", runtime)
    whole.fit()
    _trainer(data, tmp_path / "split", runtime, checkpoint_every=10).fit(max_steps=15)
    resumed = _trainer(data, tmp_path / "split", runtime, checkpoint_every=10)
    resumed.fit(resume=True)
    assert {float(state["step"]) for state in resumed.optimizer.state.values()} == {24.0}
    _assert_bitwise_equal(whole, resumed)


# 24 batches an epoch: lost just before a checkpoint, or across an epoch's end (23, 24)
@pytest.mark.parametrize("lost_ids, epochs, every", [({9}, 1, 10), ({23, 24}, 2, 25)], ids=["in_an_epoch", "across_epochs"])
def test_a_run_resumed_after_batches_lost_before_their_lookup_equals_an_unstopped_one(data, tmp_path, monkeypatch,
                                                                                       lost_ids, epochs, every):
    """The resumed run goes on after the lost batches, at the steps the unstopped run gives."""
    data = {**data, "training": {**data["training"], "epochs": epochs}}
    lost = set(lost_ids)  # these batches never look their rows up
    for method in ("look_up", "forward"):
        original = getattr(SparseWorker, method)

        def poisoned(worker, k, *args, _original=original):
            if k in lost:
                raise RuntimeError("cannot read this batch")
            return _original(worker, k, *args)

        monkeypatch.setattr(SparseWorker, method, poisoned)
    runtime = {"sparse_workers": 2, **EXACT}
    unstopped = _trainer(data, tmp_path / "unstopped", runtime)
    assert unstopped.fit()["runtime"]["lost_batches"] == len(lost_ids)
    _trainer(data, tmp_path / "stopped", runtime, checkpoint_every=every).fit(max_steps=every + 5)
    lost.clear()  # the resumed run's batch ids count from its checkpoint: none is lost
    shutil.copytree(tmp_path / "stopped", tmp_path / "by_the_reference")
    for run_dir, resumed_runtime in (("stopped", runtime), ("by_the_reference", None)):  # the engine's, or none
        resumed = _trainer(data, tmp_path / run_dir, resumed_runtime, checkpoint_every=every)
        resumed.fit(resume=True)
        _assert_bitwise_equal(unstopped, resumed)


NO_CUDA = not torch.cuda.is_available()
NO_CUDA_REASON = "needs a CUDA device (torch.cuda.is_available() is False)"


@pytest.mark.skipif(NO_CUDA, reason=NO_CUDA_REASON)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_dense_worker_on_cuda_matches_the_cpu_one(dtype):
    from tidal.config import ModelConfig
    from tidal.models import RankingModel
    from tidal.runtime.workers import DenseWorker

    torch.manual_seed(0)
    model = RankingModel(ModelConfig(), num_features=3, dim=8, dense_features=2, num_targets=1)
    pooled = torch.from_numpy(np.random.default_rng(0).standard_normal((64, 3, 8), dtype=np.float32))
    payload = {"pooled": encode(pooled, dtype), "dense": np.ones((64, 2), np.float32),
               "labels": np.ones((64, 1), np.float32), "first_row": 0, "total_rows": 64, "dtype": dtype}
    results = []
    for device in ("cpu", "cuda"):
        worker = DenseWorker(0, model=copy.deepcopy(model), training=TrainingConfig(lr=1e-3), optimizer_state=None,
                             loss_weights=torch.ones(1), all_reduce=None, loss_scale=1.0, device=device)
        for _ in range(2):  # the second step reuses the pinned buffers
            meta, grad = worker.step(payload, 1)
        results.append((meta["loss"], decode(grad["grad"], dtype) / grad["scale"], worker.state()["model"]))
    assert np.abs(results[0][0] - results[1][0]).max() < 1e-4
    assert torch.allclose(results[0][1], results[1][1], atol=1e-5 if dtype == "float32" else 1e-3)
    assert all(torch.allclose(a, results[1][2][k], atol=1e-5) for k, a in results[0][2].items())


@pytest.mark.skipif(NO_CUDA, reason=NO_CUDA_REASON)
def test_training_with_dense_workers_on_cuda_learns_and_leaves_the_model_on_the_cpu(data, reference, tmp_path):
    trainer = _trainer(data, tmp_path, {"sparse_workers": 2, "dense_workers": 2, "device": "cuda",
                                        "transfer_dtype": "float32"})
    summary = trainer.fit()
    assert summary["rows"] == 12_000 and summary["runtime"]["lost_samples"] == 0
    assert all(p.device.type == "cpu" for p in trainer.model.parameters())
    x = torch.cat([p.reshape(-1) for p in reference.model.parameters()])
    y = torch.cat([p.reshape(-1) for p in trainer.model.parameters()])
    assert float((x - y).abs().max().detach()) < 1e-3  # the same training, on another device


@pytest.mark.skipif(NO_CUDA, reason=NO_CUDA_REASON)
def test_sync_fp32_on_cuda_is_bitwise_the_reference_trainer_on_cuda(data, tmp_path):
    reference = _trainer(data, tmp_path / "ref", None, device="cuda")
    reference.fit()
    trainer = _trainer(data, tmp_path / "engine", {"sparse_workers": 2, "transfer_dtype": "float32", "device": "cuda"},
                       device="cuda")
    trainer.fit()
    assert next(trainer.model.parameters()).is_cuda  # the trainer's own model, trained in place
    _assert_bitwise_equal(reference, trainer)


@pytest.mark.skipif(not NO_CUDA, reason="checks the error seen without a CUDA device")
def test_asking_for_cuda_without_one_is_a_clear_error(data, tmp_path):
    with pytest.raises(TidalError, match="runtime.device is 'cuda', but torch sees no CUDA device"):
        _trainer(data, tmp_path, {"sparse_workers": 1, "device": "cuda"})  # refused before a run_dir is made
    assert _no_worker_threads() and not any(tmp_path.glob("**/metrics.jsonl"))
    with pytest.raises(TidalError, match="training.device is 'cuda:0', but torch sees no CUDA device"):
        _trainer(data, tmp_path, None, device="cuda:0")


def test_trainers_keep_gemm_threads_fixed(data, tmp_path):
    import ctypes
    from pathlib import Path

    try:
        mkl = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        mkl.mkl_serv_get_dynamic, mkl.MKL_Set_Dynamic  # noqa: B018
    except (OSError, AttributeError):
        pytest.skip("this torch has no MKL")
    for runtime in (None, {"sparse_workers": 1}):  # the reference trainer and the engine alike
        mkl.MKL_Set_Dynamic(1)
        _trainer(data, tmp_path / str(runtime is None), runtime).fit(max_steps=1)
        assert mkl.mkl_serv_get_dynamic() == 0  # else products split their sums by the machine's load


def test_device_names_are_validated(data, tmp_path):
    with pytest.raises(TidalError, match="runtime.device"):
        _trainer(data, tmp_path, {"device": "gpu0"})


def test_bad_rows_after_the_last_full_batch_are_counted(data, tmp_path):
    bad = tmp_path / "tail.tsv"
    lines = open(data["data"]["train"][0]).read().splitlines()[:1024] + ["1\tshort", "0\talso-short"]
    bad.write_text("\n".join(lines) + "\n")
    config = {**data, "data": {**data["data"], "train": [str(bad)]}}
    summary = _trainer(config, tmp_path / "run", {"sparse_workers": 2}).fit()
    assert summary["rows"] == 1024 and summary["bad_rows"] == 2
    assert [":1025:" in summary["bad_row_examples"][0], ":1026:" in summary["bad_row_examples"][1]] == [True, True]


def test_tables_evict_at_safe_points_as_the_reference_does(data, tmp_path):
    config = {**data, "tables": [{**data["tables"][0], "eviction": {"ttl_steps": 2}, "max_rows": 8000}]}
    single = _trainer(config, tmp_path / "single", None, evict_every=5)
    single.fit()
    engine = _trainer(config, tmp_path / "engine", {"sparse_workers": 2, **EXACT}, evict_every=5)
    engine.fit()
    _assert_bitwise_equal(single, engine)  # rows keep the step of their batch, whatever was looked up ahead
    stats = engine.collection.tables[0].stats()  # evicted at the end too, as a bundle serves it
    assert stats.rows <= 8000 and stats.evicted > 10_000
    grown = _trainer(data, tmp_path / "grown", {"sparse_workers": 2, **EXACT})
    grown.fit()
    assert grown.collection.tables[0].stats().rows > 3 * stats.rows  # without eviction


def test_a_run_stopped_by_max_steps_does_what_is_due_at_that_step_as_the_reference_does(data, tmp_path):
    """The eviction, evaluation and checkpoint of step max_steps happen before the run
    stops (they once were skipped), so sync mode is the reference trainer there too."""
    held_out = tmp_path / "held_out.tsv"
    held_out.write_text("".join(open(data["data"]["train"][0]).readlines()[:1000]))
    config = {**data, "data": {**data["data"], "eval": [str(held_out)]},
              "tables": [{**data["tables"][0], "eviction": {"ttl_steps": 2}}]}
    summaries = {}
    for name, runtime in (("reference", None), ("engine", {"sparse_workers": 2, **EXACT})):
        trainer = _trainer(config, tmp_path / name, runtime, evict_every=5, eval_every=5, checkpoint_every=5)
        summaries[name] = (trainer, trainer.fit(max_steps=10))
    (reference, expected), (engine, summary) = summaries["reference"], summaries["engine"]
    _assert_bitwise_equal(reference, engine)
    assert summary["eval"] == expected["eval"] and summary["tables"] == expected["tables"]
    for trainer in (reference, engine):
        assert checkpoint.latest(trainer.run_dir).name == "step-00000010-epoch-0"
        records = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if r["event"] == "eval"] == [5, 10]


@pytest.mark.parametrize("runtime", [None, {"sparse_workers": 2}])
def test_a_data_file_gone_mid_run_stops_it_naming_the_file(data, tmp_path, monkeypatch, runtime):
    lines = open(data["data"]["train"][0]).read().splitlines(keepends=True)
    halves = [tmp_path / "a.tsv", tmp_path / "b.tsv"]
    halves[0].write_text("".join(lines[:6000]))
    halves[1].write_text("".join(lines[6000:]))
    original = Trainer._log

    def delete_on_first_log(trainer, *args):  # type: ignore[no-untyped-def]
        original(trainer, *args)
        halves[1].unlink(missing_ok=True)  # the next epoch cannot open it again

    monkeypatch.setattr(Trainer, "_log", delete_on_first_log)
    config = {**data, "data": {**data["data"], "train": [str(p) for p in halves]}}
    # the engine's source lists an epoch's files as it starts it; the reader opens each in turn
    with pytest.raises(DataError, match=r"b.tsv(: cannot read it \(No such file or directory\)|: expected a file)"):
        _trainer(config, tmp_path / "run", runtime, epochs=2).fit()
    assert _no_worker_threads()


def test_a_resumed_run_keeps_the_worker_schedule_it_had_reached(data, tmp_path):
    runtime = {"sparse_workers": 1, **EXACT, "sparse_workers_at": {5: 3}}
    first = _trainer(data, tmp_path, runtime, checkpoint_every=10)
    assert first.fit(max_steps=12)["runtime"]["sparse_workers"] == [(0, 1), (5, 3)]
    resumed = _trainer(data, tmp_path, runtime, checkpoint_every=10)
    assert resumed.fit(resume=True)["runtime"]["sparse_workers"] == [(10, 3)]


def test_a_batch_whose_worker_went_for_another_batch_is_retried_without_losing_a_try():
    """Replacing a worker fails the calls queued on it: those are not their batches'
    failures, and three of them in a row once lost a healthy batch."""
    from types import SimpleNamespace

    from tidal.config import RuntimeConfig
    from tidal.runtime.engine import Engine, _Flight

    class Backend:
        def start_sparse(self, slot):
            return object()

        def stop(self, worker):
            pass

        def forget(self, batch_id):
            pass

    trainer = SimpleNamespace(config=SimpleNamespace(runtime=RuntimeConfig(sparse_workers=2, mode="async"),
                                                     data=SimpleNamespace(batch_size=512)))
    engine = Engine(trainer, Backend(), telemetry=None)
    engine.sparse = {0: object(), 1: object()}
    for _ in range(3):  # batch 5 was on slot 1's worker each time another batch's failure replaced it
        engine.flights[5] = _Flight(slot=1, worker=object(), staleness=0)
        engine._failed("forward", 5, RuntimeError("sparse worker 1 closed before batch 5 was read"))
    assert engine.retry == [5, 5, 5] and engine.lost["batches"] == 0 and engine.failures == []
    for attempt in range(3):  # its own failures: the worker in its slot failed
        engine.flights[5] = _Flight(slot=1, worker=engine.sparse[1], staleness=0)
        engine._failed("forward", 5, RuntimeError("cannot pool this batch"))
    assert engine.lost["batches"] == 1 and len(engine.failures) == 4  # three replacements, one loss


@pytest.mark.slow
@pytest.mark.parametrize("runtime", [None, {"mode": "sync", "sparse_workers": 2}], ids=["reference", "engine"])
def test_a_sigterm_stops_a_training_run_as_ctrl_c_does(tmp_path, runtime):
    """As a scheduler (Kubernetes, Slurm, systemd) ends a job: one line, exit code 130,
    no worker left; it used to end the process by the signal, saying nothing."""
    config = _config(tmp_path, epochs=50, log_every=1, checkpoint_every=5)
    config["data"]["eval"] = None
    done = stop_with_sigterm({**config, "runtime": runtime}, tmp_path)
    assert done.returncode == 130, done.stderr
    assert "tidal train: interrupted; `tidal train --config " in done.stderr
    assert "--resume` continues from the last checkpoint written" in done.stderr and "Traceback" not in done.stderr


def test_the_speed_leaves_out_the_workers_start_and_stop(data, tmp_path, monkeypatch):
    """Ray's actors take seconds to start and to stop, and the speed counted them: a run
    training for 4 s over 14 s of them said a third of its speed."""
    from tidal.runtime.local import LocalBackend

    def slowly(method):  # type: ignore[no-untyped-def]
        return lambda *args: time.sleep(1.5) or method(*args)

    monkeypatch.setattr(LocalBackend, "wait_ready", staticmethod(slowly(LocalBackend.wait_ready)))
    monkeypatch.setattr(LocalBackend, "shutdown", slowly(LocalBackend.shutdown))
    trainer = _trainer(data, tmp_path, {"sparse_workers": 1})
    start = time.perf_counter()
    summary = trainer.fit()
    wall = time.perf_counter() - start
    assert summary["rows"] / summary["samples_per_s"] < wall - 3.0
    assert json.loads((tmp_path / "telemetry.json").read_text())["final"]["elapsed_s"] < wall - 3.0


def test_a_resume_without_the_engine_leaves_no_telemetry_of_the_stopped_command(data, tmp_path):
    """It stayed, the figures of a command whose rows past the checkpoint the resume trained again."""
    _trainer(data, tmp_path, {"mode": "sync", "sparse_workers": 1}, checkpoint_every=5).fit(max_steps=7)
    assert (tmp_path / "telemetry.json").is_file()
    assert _trainer(data, tmp_path, None).fit(resume=True)["rows"] > 0  # the reference trainer
    assert not (tmp_path / "telemetry.json").exists()


def test_a_resume_with_nothing_left_to_train_leaves_the_runs_telemetry_as_it_was(data, tmp_path, monkeypatch):
    import tidal.runtime.hetero

    _trainer(data, tmp_path, {"sparse_workers": 1}).fit()
    telemetry = (tmp_path / "telemetry.json").read_bytes()
    monkeypatch.setattr(tidal.runtime.hetero, "make_backend", lambda *args: pytest.fail("a worker started"))
    summary = _trainer(data, tmp_path, {"sparse_workers": 1}).fit(resume=True)
    assert summary["rows"] == 0 and summary["run_rows"] == 12_000
    assert (tmp_path / "telemetry.json").read_bytes() == telemetry
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["event"] == "end" and records[-1]["run_rows"] == 12_000
