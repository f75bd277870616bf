"""The `ray` backend: the same workers as Ray actors, the tables in embedding-shard actors.

Placement: every sparse worker, dense worker and embedding shard is an actor; the
tables are placed table-wise over `embedding_shards` shard actors (a table's rows are
sharded inside its actor across threads), so every pooling mode pools exactly as on
one machine. Shard actors serve several calls at once (threaded actors: the kernels
release the GIL, the tables lock per shard). Each sparse worker reads the files itself and keeps the batches it is
given. Pooled slices and gradients move as ObjectRefs: the coordinator passes the
reference of a slice to a dense worker and the references of the gradients back to
the producer, never the tensors. Dense workers keep their replicas equal with a gloo
(NCCL on GPU) all-reduce in a torch.distributed group of their own.

`ray_address` joins an existing cluster; without it a local Ray starts on demand
(several seconds: Ray is the backend for many machines, not the default).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError, RayTaskError

from tidal.data.batch import SparseBatch
from tidal.data.extract import Extractor
from tidal.embedding import EmbeddingCollection, EmbeddingTable
from tidal.errors import ConfigError, RunStoppedError, TidalError
from tidal.processes import deferring_interrupts, keeping_sigterm
from tidal.runtime.source import BatchSource, ReaderSpec
from tidal.runtime.workers import (DenseWorker, EmbeddingShard, SparseWorker, encode, flatten, received, transfer_dtype,
                                   unflatten)

__all__ = ["RayBackend"]


def _collection(tables: list, features: list, threads: int, state: dict | None,
                lr_scale: Callable[[int], float] | None = None) -> EmbeddingCollection:
    """Tables built from their configs, loaded from `state` (snapshot arrays and clocks)."""
    built = [EmbeddingTable(t, threads=threads) for t in tables]
    for table in built:
        if state and table.name in state:
            for s, arrays in enumerate(state[table.name]["shards"]):
                table.restore_shard(s, arrays)
            table.restore_clocks(state[table.name]["clocks"])
    return EmbeddingCollection(built, features, threads=threads, lr_scale=lr_scale)


def _table_state(table: EmbeddingTable) -> dict:
    return {"shards": [table.snapshot_shard(s, since_save=False) for s in range(table.num_shards)],
            "clocks": table.clocks()}


class _ShardActor(EmbeddingShard):
    def __init__(self, tables: list, features: list, threads: int, state: dict | None, nice: int,
                 first_step: int, lr_scale: Callable[[int], float] | None) -> None:
        torch.set_num_threads(threads)  # a process of its own: more torch threads than cores only spin
        super().__init__(_collection(tables, features, threads, state, lr_scale), nice=nice, first_step=first_step)

    def forward(self, batch_id: int, batch: SparseBatch,  # type: ignore[override]
                dtype: torch.dtype = torch.float32) -> tuple[np.ndarray, dict[str, float]]:
        pooled, timings = super().forward(batch_id, batch, dtype)
        return encode(pooled, _name(dtype)), timings

    def backward(self, batch_id: int, grad: np.ndarray, dtype: str = "float32") -> dict[str, float]:  # type: ignore[override]
        # float32 is read in place (read-only, from the object store); bfloat16 bits become a tensor
        return super().backward(batch_id, grad if dtype == "float32" else received(grad, dtype))

    def state(self) -> dict:
        return {t.name: _table_state(t) for t in self.collection.tables}


class _RemoteStore:
    """A sparse worker's view of the shard actors: sends each shard the features whose
    table it holds and puts the pooled parts back in feature order."""

    def __init__(self, shards: list[Any], features_of: list[list[str]], keys: list[str]) -> None:
        self.parts = [(shard, [f for f, k in enumerate(keys) if k in held]) for shard, held in zip(shards, features_of)]
        self.parts = [(shard, at) for shard, at in self.parts if at]
        self.keys = keys

    def _split(self, batch: SparseBatch) -> list[tuple[Any, SparseBatch]]:
        """Each shard actor with the part of `batch` whose tables it holds."""
        if list(batch.keys) != self.keys:
            raise TidalError(f"batch features {list(batch.keys)} differ from the run's {self.keys}")
        return [(shard, batch.select([self.keys[f] for f in at])) for shard, at in self.parts]

    def look_up(self, batch_id: int, batch: SparseBatch) -> dict[str, float]:
        spent = _all_ended([shard.look_up.remote(batch_id, part) for shard, part in self._split(batch)])
        return {"lookup": sum(s["lookup"] for s in spent)}

    def forward(self, batch_id: int, batch: SparseBatch,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, dict[str, float]]:
        results = _all_ended([shard.forward.remote(batch_id, part, dtype) for shard, part in self._split(batch)])
        pooled = torch.empty((batch.batch_size, len(self.keys), results[0][0].shape[2]), dtype=dtype)  # [B, F, D]
        timings: dict[str, float] = {}
        for (_, at), (values, spent) in zip(self.parts, results):
            pooled[:, at] = received(values, _name(dtype))  # copied out of the read-only object store buffer
            timings = {k: timings.get(k, 0.0) + v for k, v in spent.items()}
        return pooled, timings

    def backward(self, batch_id: int, grad: torch.Tensor) -> dict[str, float]:
        dtype = _name(grad.dtype)
        refs = [shard.backward.remote(batch_id, encode(grad[:, at].contiguous(), dtype), dtype) for shard, at in self.parts]
        return {"update": sum(spent["update"] for spent in _all_ended(refs))}


def _all_ended(refs: list[Any]) -> list[Any]:
    """The results of calls to the shard actors, once every one has ended: a call that
    failed is raised only then, so its retry meets none of them still running. A shard
    actor that died stops the run: its tables died with it."""
    ray.wait(refs, num_returns=len(refs))
    try:
        return ray.get(refs)
    except RayActorError as exc:
        raise RunStoppedError(f"an embedding shard actor died ({type(exc).__name__}); its tables are gone with "
                              f"it") from None


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class _SparseActor(SparseWorker):
    def __init__(self, index: int, spec: ReaderSpec, features: list, shards: list, features_of: list,
                 dense_workers: int, transfer_dtype: str, nice: int) -> None:
        torch.set_num_threads(1)  # casts and slices only; the kernels run in the shard actors
        extractor = Extractor(features)
        store = _RemoteStore(shards, features_of, [f.name for f in extractor.sparse])
        super().__init__(index, source=BatchSource(spec, shared=False), extractor=extractor, store=store,
                         dense_workers=dense_workers, transfer_dtype=transfer_dtype, nice=nice)


class _DistributedAllReduce:
    """Sums gradients across the dense actors in a torch.distributed group (NCCL with a GPU, else gloo)."""

    def __init__(self, address: str, port: int, world: int, rank: int) -> None:
        import torch.distributed as dist

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank, world_size=world)
        self._dist = dist

    def __call__(self, rank: int, tensors: list[torch.Tensor]) -> None:
        flat = flatten(tensors)
        self._dist.all_reduce(flat)
        unflatten(flat, tensors)


class _DenseActor(DenseWorker):
    def __init__(self, rank: int, kwargs: dict) -> None:
        torch.set_num_threads(kwargs.pop("threads"))
        super().__init__(rank, all_reduce=None, **kwargs)

    @staticmethod
    def address() -> tuple[str, int]:
        """This node's address and a free port on it, for the group's rendezvous."""
        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    @staticmethod
    def node_id() -> str:
        return ray.get_runtime_context().get_node_id()

    def join_group(self, address: str, port: int, world: int) -> None:
        self.all_reduce = _DistributedAllReduce(address, port, world, self.rank)


_CONNECT_S = 5.0
# An HTTP/2 client's opening: the preface and an empty SETTINGS frame. Ray's GCS and
# its client server speak gRPC, so they answer with a SETTINGS frame of their own.
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
_SETTINGS_FRAME = 4


def _check_reachable(address: str | None, key: str = "runtime.ray_address") -> None:
    """Fail fast on a cluster address nothing answers at, or something other than Ray
    (a dashboard's port, say): Ray itself retries for minutes. `key` names where the
    address came from."""
    if address is None or address in ("auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not port.isdigit():
        raise ConfigError(f"{key} must be 'auto', 'host:port' or 'ray://host:port', got {address!r}")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=_CONNECT_S) as conn:
            if os.environ.get("RAY_USE_TLS", "0").lower() in ("0", "false", ""):
                _check_speaks_grpc(conn, address, key)
    except OSError as exc:
        raise ConfigError(f"{key} {address}: nothing answers there within {_CONNECT_S:g} s "
                          f"({exc.strerror or exc}); start the cluster (ray start --head) or fix the address") from None


def _check_speaks_grpc(conn: socket.socket, address: str, key: str) -> None:
    """A `ConfigError` unless the server at `conn` opens an HTTP/2 (gRPC) session."""
    conn.sendall(_HTTP2_PREFACE)
    head = b""
    try:
        while len(head) < 9 and (chunk := conn.recv(9 - len(head))):
            head += chunk
    except (TimeoutError, ConnectionError):
        pass
    if len(head) < 9 or head[3] != _SETTINGS_FRAME:
        raise ConfigError(f"{key} {address}: something answers there, but not a Ray cluster (no gRPC "
                          f"session; it sent {head[:40]!r}); use the address `ray start --head` prints (port 6379 by "
                          f"default; the dashboard's 8265 is not it)")


class RayBackend:
    """Sparse workers, dense workers and embedding shards as Ray actors."""

    def __init__(self, trainer: Any, spec: ReaderSpec, first_step: int = 0) -> None:
        self.trainer, self.runtime = trainer, trainer.config.runtime
        # the driver's paths: a cluster's workers run in the folder the cluster started in
        self.spec = replace(spec, files=[os.path.abspath(f) for f in spec.files],
                            sizes={os.path.abspath(f): n for f, n in spec.sizes.items()} if spec.sizes else spec.sizes)
        self.first_step = first_step
        self.started_ray = not ray.is_initialized()
        self.local_ray = False  # a Ray of Tidal's own on this machine
        first = self._sparse_actors_at_start
        most = max([first, *self.runtime.sparse_workers_at.values()])  # sparse actors at the schedule's peak
        if self.started_ray:
            # none: the cluster of a Ray job (RAY_ADDRESS), else a local Ray of its own, even beside a running one
            key = "runtime.ray_address" if self.runtime.ray_address else "RAY_ADDRESS"
            address = self.runtime.ray_address or os.environ.get("RAY_ADDRESS") or "local"
            _check_reachable(address, key)
            self.local_ray = address == "local"
            try:
                with keeping_sigterm():  # a SIGTERM stops the run as a Ctrl-C does, not by Ray's exit
                    ray.init(address=address, include_dashboard=False, log_to_driver=True,
                             num_cpus=max(os.cpu_count() or 1, self._actors_needed(most) + 1) if address == "local"
                             else None)
            except KeyboardInterrupt:  # while Ray started: stop what of it did
                with deferring_interrupts():
                    ray.shutdown()
                raise
            except RuntimeError as exc:  # Ray's refusal of a driver of another Ray or Python version
                if "mismatch" not in str(exc).lower():
                    raise
                versions = " ".join(str(exc).split())
                raise ConfigError(f"{key} {address}: the Ray cluster refused this driver ({versions}); run the "
                                  f"cluster's Ray and Python versions here") from None
            except ConnectionError as exc:  # no cluster at 'auto', or one that refused this driver
                if address not in ("auto", "local"):  # _check_reachable found a Ray there
                    raise ConfigError(f"{key} {address}: a Ray cluster answers there but refused this driver ({exc}); "
                                      f"check that both run the same Ray and share its authentication token") from None
                raise ConfigError(f"{key} {address}: no Ray cluster there ({exc}); start one (ray start --head) or "
                                  f"leave {key} out for a local Ray") from None
        self.threads = trainer.config.training.threads
        self.features = list(trainer.config.features)
        self.dense_node: str | None = None
        self._actors: list[Any] = []
        try:
            self.check_workers(most)
            self._say_if_cpus_are_taken(self._actors_needed(first))
            self.shards, self.features_of = self._start_shards()
        except BaseException:  # Ctrl-C while the tables are copied out, say: leave nothing running
            self.shutdown()
            raise

    @property
    def _sparse_actors_at_start(self) -> int:
        """The run's sparse workers at its start, the colocated one among them."""
        return self.runtime.sparse_workers + int(self.runtime.colocated_sparse_worker)

    def _actors_needed(self, sparse_workers: int) -> int:
        """Actors (of one CPU each) of a run with `sparse_workers` sparse workers in all
        (a colocated one included)."""
        shards = min(self.runtime.embedding_shards, len(self.trainer.collection.tables))
        return sparse_workers + self.runtime.dense_workers + shards

    def check_workers(self, sparse_workers: int, asked_by: str | None = None) -> None:
        """A `ConfigError` unless the cluster has a CPU for every actor of a run with
        `sparse_workers` sparse workers (else the last ones would wait for one forever).
        `asked_by`: the call asking for them while the run trains (None: its config)."""
        needed, cpus = self._actors_needed(sparse_workers), int(ray.cluster_resources().get("CPU", 0))
        if needed > cpus:
            dense, shards = self.runtime.dense_workers, needed - sparse_workers - self.runtime.dense_workers
            scheduled = sparse_workers > self._sparse_actors_at_start
            where = asked_by or ("runtime.sparse_workers_at" if scheduled else "runtime.sparse_workers")
            fits = cpus - dense - shards - (0 if scheduled else int(self.runtime.colocated_sparse_worker))
            advice = f"run at most {fits} sparse workers ({where})" if fits >= 1 else (
                "run fewer dense workers (runtime.dense_workers) or embedding shards (runtime.embedding_shards)")
            actors = ", ".join(f"{n} {what}{'s' * (n != 1)} ({key})" for n, what, key in (
                (sparse_workers, "sparse worker", where), (dense, "dense worker", "runtime.dense_workers"),
                (shards, "embedding shard", "runtime.embedding_shards")))
            grow = ("name the most sparse workers the run will use in runtime.sparse_workers_at (Tidal's own local "
                    "Ray has the machine's CPUs, or one for each actor the config asks for at the most and one more "
                    "if that is more), run on a Ray cluster (runtime.ray_address)," if self.local_ray else "add nodes")
            raise ConfigError(f"the Ray cluster has {cpus} CPUs, and the run needs {needed} actors of one CPU each: "
                              f"{actors}; {grow} or {advice}")

    def _say_if_cpus_are_taken(self, needed: int) -> None:
        """Say so when other work holds CPUs the run's first actors need: they wait until
        it frees them (or an autoscaling cluster grows)."""
        free = int(ray.available_resources().get("CPU", 0))
        if needed > free:
            print(f"  the Ray cluster has {free} free CPUs and the run starts {needed} actors of one CPU each; "
                  f"they wait until other work frees the rest", flush=True)

    def _start_shards(self) -> tuple[list[Any], list[list[str]]]:
        """Tables dealt over the shard actors, biggest first onto the least loaded."""
        count = min(self.runtime.embedding_shards, len(self.trainer.collection.tables))
        held: list[list[EmbeddingTable]] = [[] for _ in range(count)]
        for table in sorted(self.trainer.collection.tables, key=lambda t: -t.stats().rows):
            min(held, key=len).append(table)
        shards, features_of = [], []
        # threaded actors: the kernels release the GIL and the tables lock per shard, so
        # several sparse workers look up and update one shard actor at once
        concurrency = 2 * self._sparse_actors_at_start + 2
        actor = ray.remote(num_cpus=1, max_concurrency=concurrency)(_ShardActor)
        for tables in held:
            names = {t.name for t in tables}
            features = [f for f in self.trainer.collection.features.values() if f.table in names]
            state = {t.name: _table_state(t) for t in tables}
            shards.append(actor.remote([t.config for t in tables], features, self.threads, state,
                                       self.runtime.sparse_nice, self.first_step, self.trainer.collection.lr_scale))
            self._actors.append(shards[-1])
            features_of.append([f.name for f in features])
        return shards, features_of

    def start_sparse(self, index: int) -> Any:
        options: dict[str, Any] = {"num_cpus": 1}
        if self.runtime.colocated_sparse_worker and index == self.runtime.sparse_workers and self.dense_node:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id=self.dense_node, soft=True)
        actor = ray.remote(**options)(_SparseActor).remote(
            index, self.spec, self.features, self.shards, self.features_of, self.runtime.dense_workers,
            transfer_dtype(self.runtime, self.trainer.config.training.precision), self.runtime.sparse_nice)
        self._actors.append(actor)
        return actor

    def start_dense(self) -> list[Any]:
        trainer = self.trainer
        kwargs = {"model": trainer.model, "training": trainer.config.training,
                  "threads": self.runtime.dense_threads or torch.get_num_threads(),
                  "optimizer_state": trainer.optimizer.state_dict() if trainer.optimizer.state else None,
                  "loss_weights": trainer.loss_weights, "loss_scale": self.runtime.loss_scale,
                  "precision": trainer.config.training.precision}
        gpus = int(self.runtime.device != "cpu" and ray.cluster_resources().get("GPU", 0) >= self.runtime.dense_workers)
        if self.runtime.device.startswith("cuda") and not gpus:
            raise ConfigError(f"runtime.device is {self.runtime.device!r}, but the Ray cluster has fewer GPUs "
                              f"than the {self.runtime.dense_workers} dense workers; use 'auto' or 'cpu'")
        kwargs["device"] = "cuda" if gpus else "cpu"  # Ray shows an actor only its own GPU
        actor = ray.remote(num_cpus=1, num_gpus=gpus)(_DenseActor)
        self.dense = [actor.remote(rank, dict(kwargs)) for rank in range(self.runtime.dense_workers)]
        self._actors += self.dense
        self.dense_node = ray.get(self.dense[0].node_id.remote())
        if len(self.dense) > 1:
            address, port = ray.get(self.dense[0].address.remote())
            ray.get([d.join_group.remote(address, port, len(self.dense)) for d in self.dense])
        return self.dense

    def wait_ready(self, actors: list[Any]) -> None:
        """Wait until `actors` and the embedding shards have started (each its own process
        importing torch and the kernels, the shards loading their tables: seconds on a
        small machine, which are not training time)."""
        try:
            ray.get([actor.__ray_ready__.remote() for actor in [*self.shards, *actors]])
        except RayActorError as exc:
            raise TidalError(f"a Ray actor of the run failed to start: {str(exc)[:2000]}") from None

    @staticmethod
    def call(actor: Any, method: str, *args: Any, returns: int = 1) -> list[Any]:
        refs = getattr(actor, method).options(num_returns=returns).remote(*args)
        return [refs] if returns == 1 else list(refs)

    @staticmethod
    def wait(refs: list[Any], timeout_s: float) -> list[Any]:
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout_s)
        if ready:  # everything else that is ready too
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        return ready

    @staticmethod
    def get(ref: Any) -> Any:
        try:
            return ray.get(ref)
        except RayTaskError as exc:
            if isinstance(exc.cause, TidalError):
                raise exc.cause from None
            raise

    def forget(self, batch_id: int) -> None:
        ray.get([shard.drop.remote(batch_id) for shard in self.shards])  # done before a barrier's evict

    def stop(self, actor: Any) -> None:
        if actor in self._actors:
            self._actors.remove(actor)
        ray.kill(actor)

    def evict(self) -> None:
        """Apply the tables' eviction in every shard actor (at a barrier: nothing in flight)."""
        ray.get([shard.evict.remote() for shard in self.shards])

    def pull_state(self) -> None:
        """Copy the trained dense weights and tables into the trainer (for checkpoints,
        evaluation and the summary)."""
        dense = ray.get(self.dense[0].state.remote())
        self.trainer.model.load_state_dict(dense["model"])
        self.trainer.optimizer.load_state_dict(dense["optimizer"])
        states: dict = {}
        for part in ray.get([shard.state.remote() for shard in self.shards]):
            states |= part
        tables = self.trainer.collection.tables
        rebuilt = _collection([t.config for t in tables], list(self.trainer.collection.features.values()),
                              self.threads, states)
        self.trainer.collection.tables = rebuilt.tables

    def shutdown(self) -> None:
        """Kill every actor this backend started, and Ray itself if it started it (a Ctrl-C
        or a SIGTERM meanwhile is raised once all are stopped)."""
        with deferring_interrupts():
            for actor in list(self._actors):
                self.stop(actor)
            if self.started_ray:
                ray.shutdown()
