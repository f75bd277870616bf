"""The roles of the heterogeneous engine: plain classes that a backend places.

    SparseWorker    reads and extracts the batches it is given ahead of time (a thread
                    of its own), looks them up and pools them in the store, sends the
                    pooled rows out in the transfer dtype, cut into one row slice per
                    dense worker, and applies the sparse update when the gradient of
                    those rows comes back
    DenseWorker     the dense network on one row slice: forward, loss, backward,
                    all-reduce of the gradients with the other dense workers, optimizer step
    EmbeddingShard  tables and the lookups in flight (keyed by batch id); the sparse
                    workers of one process share one, on Ray each is an actor

Every call returns the seconds it spent per stage, so the engine can tell which stage
is busy. Payloads are dicts of numpy arrays, so Ray moves them zero-copy; bfloat16
travels as its raw 16 bits.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import queue
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tidal.config import DEVICE_PATTERN, TrainingConfig
from tidal.data.batch import SparseBatch
from tidal.data.extract import Extractor
from tidal.embedding import EmbeddingCollection
from tidal.errors import ConfigError, TidalError
from tidal.models import compute_precision, resolve_precision, step_losses, weighted_bce
from tidal.runtime.source import BatchSource, Item

__all__ = ["DenseWorker", "EmbeddingShard", "SparseWorker", "ThreadAllReduce", "check_loss", "decode", "dense_device",
           "encode", "fix_gemm_threads", "pool_dtype", "received", "rows_not_finite", "set_lr", "transfer_dtype"]

_FP16_MAX = 65504.0
_RECENT_UPDATES = 256  # batch ids whose update landed or was given up: a late or repeated call does nothing


def transfer_dtype(runtime: Any, precision: str) -> str:
    """The dtype pooled rows travel in: `auto` is bfloat16 across processes, to a GPU
    or to a dense network computing in bfloat16 (`precision`), float32 within one
    process's memory otherwise (no copy is made there)."""
    if runtime.transfer_dtype != "auto":
        return runtime.transfer_dtype
    device = dense_device(runtime.device)
    crosses = runtime.backend == "ray" or device.type == "cuda"
    return "bfloat16" if crosses or resolve_precision(device, precision) == "bfloat16" else "float32"


def dense_device(device: str, rank: int = 0, key: str = "runtime.device") -> torch.device:
    """Where dense worker `rank` runs (`device` as the config key `key` gives it):
    `auto` is one GPU per rank (round robin) when there are GPUs, else the CPU."""
    if not isinstance(device, str) or not re.fullmatch(DEVICE_PATTERN, device):
        raise ConfigError(f"{key} must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device == "auto":
        device = f"cuda:{rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{key} is {device!r}, but torch sees no CUDA device; use 'auto' or 'cpu'")
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    return torch.device(device)


def fix_gemm_threads() -> None:
    """Keep torch's CPU matrix products on their set thread count (process-wide).
    MKL's dynamic mode picks a product's threads by its size and by how busy the
    cores are, which changes how its sums are split: the bits of a run would vary
    with the load, and a pipelined run would not repeat the sequential one's."""
    try:
        libtorch = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        libtorch.MKL_Set_Dynamic(0)  # the C interface (by value); mkl_set_dynamic takes a pointer
    except (OSError, AttributeError):  # torch without MKL, or not a Linux build: nothing to fix
        pass


def lower_priority(nice: int) -> None:
    """Run the calling thread at nice value `nice` unless it already runs lower (Linux
    gives each thread its own; raising it needs no privilege, undoing it would). The
    threads doing sparse work call it, so the dense workers get a core first. Elsewhere,
    or where the system refuses, the thread runs as it was: a scheduling hint only."""
    if nice <= 0 or not sys.platform.startswith("linux"):
        return
    thread = threading.get_native_id()
    try:
        if os.getpriority(os.PRIO_PROCESS, thread) < nice:
            os.setpriority(os.PRIO_PROCESS, thread, nice)
    except OSError:
        pass


def encode(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    """A float32 tensor (on any device) as the numpy array that travels: float32,
    float16 or bfloat16 bits. The cast happens where the tensor is, so a GPU sends
    half the bytes back in 16 bits."""
    if dtype == "bfloat16":
        return tensor.to(torch.bfloat16).view(torch.int16).cpu().numpy()
    return tensor.to(getattr(torch, dtype)).cpu().numpy()


def received(array: np.ndarray, dtype: str) -> torch.Tensor:
    """The tensor of an `encode`d array, still in `dtype` (a read-only array, as Ray
    hands out, is copied)."""
    tensor = torch.from_numpy(array if array.flags.writeable else array.copy())
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


def decode(array: np.ndarray, dtype: str) -> torch.Tensor:
    """The float32 tensor of an `encode`d array."""
    return received(array, dtype).float()


def pool_dtype(dtype: str) -> torch.dtype:
    """The dtype the store pools into for transfer dtype `dtype`: bfloat16 is rounded
    in the pooling kernel itself; float16 is cast from float32 (its loss scale needs it)."""
    return torch.bfloat16 if dtype == "bfloat16" else torch.float32


def _fp16_scale(grad: torch.Tensor, loss_scale: float) -> float:
    """`loss_scale`, halved until it keeps `grad` finite in float16 (a power of two when
    `loss_scale` is one): below 1 for a gradient of 65504 or more (one already not
    finite stays so)."""
    peak = float(grad.abs().max()) if grad.numel() else 0.0
    scale = loss_scale
    while math.isfinite(peak) and peak * scale >= _FP16_MAX:
        scale /= 2.0
    return scale


class EmbeddingShard:
    """Tables that pool batches and keep each batch's lookup until its update comes."""

    def __init__(self, collection: EmbeddingCollection, *, nice: int = 0, first_step: int = 0) -> None:
        """`first_step`: the run's step before its first batch (a resumed run's checkpoint
        step). Batch k of the run is the tables' step first_step + k + 1, in whatever
        order the lookups come: rows keep the step of their batch, as in the reference
        trainer. Tables saved ahead of it (by a version whose saves took a step) go on
        from their own step."""
        self.collection, self.nice = collection, nice
        self._contexts: dict[int, Any] = {}
        self._looking: set[int] = set()  # lookups under way
        self._applying: set[int] = set()  # updates under way: their contexts are out of `_contexts`
        self._done: deque[int] = deque(maxlen=_RECENT_UPDATES)  # batches whose update landed or was given up
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._first_step = max([first_step] + [t.step for t in collection.tables])

    def look_up(self, batch_id: int, batch: SparseBatch) -> dict[str, float]:
        """Find (or create) the rows of `batch` for its later `forward`: this reads no
        values, so it may run while earlier batches' updates are still coming.

        A batch is looked up once: a retry of it (its worker was replaced after this
        lookup) and a replaced worker's late call find the first lookup and do nothing,
        so admission counts and LFU counts see each sighting once, as in a run without
        failures. Two calls at once take turns."""
        lower_priority(self.nice)
        start = time.perf_counter()
        with self._changed:
            self._changed.wait_for(lambda: batch_id not in self._looking)
            if batch_id in self._contexts or batch_id in self._applying or batch_id in self._done:
                return {"lookup": 0.0}
            self._looking.add(batch_id)
        ctx = None
        try:
            ctx = self.collection.lookup(batch, step=self._first_step + batch_id + 1)
        finally:
            with self._changed:
                self._looking.discard(batch_id)
                if ctx is not None and batch_id not in self._done:  # else dropped meanwhile: its rows are not held
                    self._contexts[batch_id] = ctx
                self._changed.notify_all()
        return {"lookup": time.perf_counter() - start}

    def forward(self, batch_id: int, batch: SparseBatch,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, dict[str, float]]:
        """Pooled `[B, F, D]` of `batch` in `dtype` (rows created as in training, unless
        `look_up` found them already)."""
        lower_priority(self.nice)
        with self._lock:
            found = batch_id in self._contexts
        timings = {} if found else self.look_up(batch_id, batch)
        start = time.perf_counter()
        with self._lock:
            ctx = self._contexts[batch_id]
        pooled = self.collection.pool(batch, ctx, dtype=dtype)
        return pooled, timings | {"pool": time.perf_counter() - start}

    def evict(self) -> int:
        """Apply the tables' eviction (a safe point: no batch between lookup and update)."""
        with self._lock:
            holding = sorted(self._contexts.keys() | self._applying)
            if holding:
                raise TidalError(f"evict() while batches {holding} hold rows; only at a safe point")
        return self.collection.evict()

    def backward(self, batch_id: int, grad: torch.Tensor | np.ndarray) -> dict[str, float]:
        """Apply the sparse update of batch `batch_id` given its pooled gradient `[B, F, D]`
        (float32, or bfloat16, which the kernel reads as it is)."""
        lower_priority(self.nice)
        start = time.perf_counter()
        ctx = self._claim(batch_id)
        if ctx is None:  # a retry of an update that landed here (another part of it failed)
            return {"update": 0.0}
        landed = False
        try:
            self.collection.backward(ctx, grad, check_finite=False)  # the engine checked the loss
            landed = True
        finally:
            with self._changed:
                self._applying.discard(batch_id)
                if landed:
                    self._done.append(batch_id)
                else:  # kept for the retry
                    self._contexts[batch_id] = ctx
                self._changed.notify_all()
        return {"update": time.perf_counter() - start}

    def _claim(self, batch_id: int) -> Any:
        """The context of batch `batch_id`, taken for its update; None if the update landed
        already. A call for an update under way waits for it to end (two calls at once come
        from a retry sent while the first still ran), so an update lands once."""
        with self._changed:
            self._changed.wait_for(lambda: batch_id not in self._applying)
            if batch_id in self._done:
                return None
            ctx = self._contexts.pop(batch_id)  # a KeyError for a batch never looked up here
            self._applying.add(batch_id)
            return ctx

    def drop(self, batch_id: int) -> None:
        """Forget batch `batch_id`: its update will not come (one under way ends first)."""
        with self._changed:
            self._changed.wait_for(lambda: batch_id not in self._applying)
            self._contexts.pop(batch_id, None)
            self._done.append(batch_id)


class SparseWorker:
    """Reads, extracts, looks up and pools its batches; applies their sparse updates.

    `prepare(k)` queues batch `k` for the reader thread (parse and extract run ahead);
    `look_up(k)` may find its rows ahead (an error is kept for `forward` to raise);
    `forward(k)` returns ``(meta, slice_0, ..., slice_{M-1})`` with the pooled rows of
    batch k cut into one row slice per dense worker, or ``(meta, None, ...)`` with
    ``meta["end"]`` when the data ends before k; `backward(k, *grad_slices)` applies
    the update. The `store` is an `EmbeddingShard` or anything with its three verbs.
    """

    def __init__(self, index: int, *, source: BatchSource, extractor: Extractor, store: Any,
                 dense_workers: int, transfer_dtype: str, nice: int = 0) -> None:
        self.index, self.nice = index, nice
        self.source, self.extractor, self.store = source, extractor, store
        self.dense_workers, self.transfer_dtype = dense_workers, transfer_dtype
        self._todo: queue.Queue[int | None] = queue.Queue()
        self._prepared: dict[int, Any] = {}
        self._looked_up: dict[int, tuple[Any, dict[str, float]]] = {}  # batch id -> (what _take gave, timings)
        self._ready = threading.Condition()
        self._closed = False
        self._reader = threading.Thread(target=self._read_loop, name=f"tidal-sparse-{index}-reader", daemon=True)
        self._reader.start()

    def prepare(self, batch_id: int) -> None:
        self._todo.put(batch_id)

    def _read_loop(self) -> None:
        lower_priority(self.nice)
        while (batch_id := self._todo.get()) is not None:
            result: Any
            try:
                item = self.source.get(batch_id)
                start = time.perf_counter()
                result = None if item is None else (item, self._extract(item), time.perf_counter() - start)
            except BaseException as exc:  # handed to forward(), which raises it to the engine
                result = exc
            with self._ready:
                self._prepared[batch_id] = result
                self._ready.notify_all()

    def _extract(self, item: Item) -> SparseBatch:
        return item.table if isinstance(item.table, SparseBatch) else self.extractor(item.table)

    def _take(self, batch_id: int) -> tuple[Item, SparseBatch, float] | None:
        with self._ready:
            self._ready.wait_for(lambda: batch_id in self._prepared or self._closed)
            if batch_id not in self._prepared:
                raise RuntimeError(f"sparse worker {self.index} closed before batch {batch_id} was read")
            result = self._prepared.pop(batch_id)
        if isinstance(result, BaseException):
            raise result
        return result

    def look_up(self, batch_id: int) -> None:
        lower_priority(self.nice)
        try:
            prepared = self._take(batch_id)
            self._looked_up[batch_id] = prepared, self.store.look_up(batch_id, prepared[1]) if prepared else {}
        except Exception as exc:  # forward raises it, and the engine retries the batch from there
            self._looked_up[batch_id] = exc, {}

    def forward(self, batch_id: int) -> tuple:
        lower_priority(self.nice)
        prepared, timings = self._looked_up.pop(batch_id, None) or (self._take(batch_id), {})
        if isinstance(prepared, Exception):
            raise prepared
        if prepared is None:
            return ({"batch_id": batch_id, "end": True}, *[None] * self.dense_workers)
        item, batch, extract_s = prepared
        pooled, spent = self.store.forward(batch_id, batch, pool_dtype(self.transfer_dtype))  # [B, F, D]
        timings = timings | spent
        start = time.perf_counter()
        slices = self._slices(encode(pooled, self.transfer_dtype), batch)
        timings |= {"parse": item.parse_s, "extract": extract_s, "transfer": time.perf_counter() - start}
        meta = {"batch_id": batch_id, "end": False, "rows": batch.batch_size, "epoch": item.epoch,
                "index": item.index, "bad_rows": item.bad_rows, "bad_examples": item.bad_examples,
                "timings": timings}
        return (meta, *slices)

    def _slices(self, pooled: np.ndarray, batch: SparseBatch) -> list[dict[str, Any]]:
        bounds = np.linspace(0, batch.batch_size, self.dense_workers + 1).astype(np.int64)
        dense = batch.dense if batch.dense is not None else np.zeros((batch.batch_size, 0), np.float32)
        return [{"pooled": pooled[lo:hi], "dense": dense[lo:hi], "labels": batch.labels[lo:hi], "first_row": int(lo),
                 "total_rows": batch.batch_size, "dtype": self.transfer_dtype}
                for lo, hi in zip(bounds[:-1], bounds[1:])]

    def backward(self, batch_id: int, *grads: dict[str, Any]) -> dict[str, float]:
        lower_priority(self.nice)
        start = time.perf_counter()
        parts = [received(g["grad"], g["dtype"]) for g in grads]  # bfloat16 stays so: the kernel reads it
        parts = [part.float() / g["scale"] if g["dtype"] == "float16" else part for part, g in zip(parts, grads)]
        grad = parts[0] if len(parts) == 1 else torch.cat(parts)  # [B, F, D]
        transfer_s = time.perf_counter() - start
        return {"transfer": transfer_s, **self.store.backward(batch_id, grad)}

    def close(self) -> None:
        """Stop reading ahead and fail a `forward` waiting for a batch not yet read."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        self._todo.put(None)
        self._reader.join()


class ThreadAllReduce:
    """Sums gradients across the dense workers of one process (threads), in rank order,
    so every replica gets the same bits. `abort()` frees ranks waiting for a dead one."""

    def __init__(self, world: int) -> None:
        self._parts: list[torch.Tensor | None] = [None] * world
        self._barrier = threading.Barrier(world)

    def __call__(self, rank: int, tensors: list[torch.Tensor]) -> None:
        self._parts[rank] = flatten(tensors)
        _finish_gpu_work(tensors)  # a part on a GPU is written before another rank reads it
        self._barrier.wait()
        total = self._parts[0].clone()  # type: ignore[union-attr]
        for part in self._parts[1:]:
            total += part.to(total.device)  # type: ignore[union-attr]
        _finish_gpu_work(tensors)
        self._barrier.wait()  # every rank has read every part before the next round
        unflatten(total, tensors)

    def abort(self) -> None:
        self._barrier.abort()


def _finish_gpu_work(tensors: list[torch.Tensor]) -> None:
    if tensors and tensors[0].is_cuda:
        torch.cuda.current_stream(tensors[0].device).synchronize()


def flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    """`tensors` as one flat tensor, for a single all-reduce."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Copy a `flatten`ed tensor back into `tensors`."""
    at = 0
    for t in tensors:
        t.copy_(flat[at : at + t.numel()].view_as(t))
        at += t.numel()


class DenseWorker:
    """The dense network on one row slice per batch; ranks stay equal by all-reduce.

    On a GPU the worker runs on a CUDA stream of its own: each input is copied into a
    pinned host buffer kept from step to step, sent with a non-blocking copy, and cast
    to float32 there (16-bit pooled rows cross the bus as 16 bits); the gradient is
    cast on the GPU before it comes back. With `precision` bfloat16 the network runs
    under autocast, and bfloat16 pooled rows enter it as they came.
    """

    def __init__(self, rank: int, *, model: torch.nn.Module, training: TrainingConfig, optimizer_state: dict | None,
                 loss_weights: torch.Tensor, all_reduce: Callable[[int, list[torch.Tensor]], None] | None,
                 loss_scale: float, device: str = "auto", precision: str = "float32") -> None:
        self.rank = rank
        self.device = dense_device(device, rank)
        self.precision = resolve_precision(self.device, precision)
        fix_gemm_threads()
        self.model = model.to(self.device)
        self.training = training  # its learning rate by step
        self.optimizer = dense_optimizer(self.model, training)
        if optimizer_state:
            self.optimizer.load_state_dict(optimizer_state)
        self.loss_weights = loss_weights.to(self.device)
        self.all_reduce, self.loss_scale = all_reduce, loss_scale
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._pinned: dict[str, torch.Tensor] = {}

    def step(self, payload: dict[str, Any], step: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """Train on one slice of the run's step `step`: (meta with its share of the
        losses (`step_losses`) and timings, gradient payload)."""
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            start = time.perf_counter()
            pooled, dense, labels = self._inputs(payload)
            middle = time.perf_counter()
            self.model.train()
            with compute_precision(self.device, self.precision):
                logits = self.model(pooled, dense)  # [b, T]
            loss, per_target = weighted_bce(logits.float(), labels, self.loss_weights, payload["total_rows"])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            set_lr(self.optimizer, self.training.lr_at(step))
            if self.all_reduce is not None:
                self.all_reduce(self.rank, [p.grad if p.grad is not None else torch.zeros_like(p)
                                            for p in self.model.parameters()])
            clip_gradients(self.model, self.training)  # the whole batch's gradient, after the all-reduce
            self.optimizer.step()
            grad = self._grad_payload(pooled.grad, payload["dtype"])  # waits for the stream
        timings = {"transfer": middle - start, "dense": time.perf_counter() - middle}
        losses = step_losses(loss, per_target)
        bad_rows = [] if np.isfinite(losses[0]) else rows_not_finite(logits.detach(), payload["first_row"])
        return {"loss": losses, "nonfinite_rows": bad_rows, "timings": timings}, grad

    def _inputs(self, payload: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        as_sent = payload["dtype"] == "bfloat16" and self.precision == "bfloat16"
        if self.device.type == "cpu":
            pooled = (received if as_sent else decode)(payload["pooled"], payload["dtype"])
            return pooled.requires_grad_(True), torch.tensor(payload["dense"]), torch.tensor(payload["labels"])
        pooled = self._to_device("pooled", payload["pooled"])
        if payload["dtype"] == "bfloat16":
            pooled = pooled.view(torch.bfloat16)
        tensors = (pooled if as_sent else pooled.float(), self._to_device("dense", payload["dense"]),
                   self._to_device("labels", payload["labels"]))
        self.stream.synchronize()  # type: ignore[union-attr]  # the copies, timed as the transfer
        return tensors[0].requires_grad_(True), tensors[1], tensors[2]

    def _to_device(self, name: str, array: np.ndarray) -> torch.Tensor:
        """`array` on the device, through this worker's pinned buffer for `name` (the
        previous step's copy out of it has finished: every step ends synchronized)."""
        pinned = self._pinned.get(name)
        dtype = torch.from_numpy(np.empty(0, array.dtype)).dtype
        if pinned is None or pinned.numel() < array.size or pinned.dtype != dtype:
            pinned = self._pinned[name] = torch.empty(max(array.size, 1), dtype=dtype, pin_memory=True)
        host = pinned[: array.size].view(array.shape)
        np.copyto(host.numpy(), array)  # read-only arrays (Ray's) too
        return host.to(self.device, non_blocking=True)

    def _grad_payload(self, grad: torch.Tensor, dtype: str) -> dict[str, Any]:
        scale = _fp16_scale(grad, self.loss_scale) if dtype == "float16" else 1.0
        return {"grad": encode(grad * scale if scale != 1.0 else grad, dtype), "dtype": dtype, "scale": scale}

    def state(self) -> dict[str, Any]:
        """The model's and the optimizer's state, on the CPU."""
        return {"model": {k: v.cpu() for k, v in self.model.state_dict().items()},
                "optimizer": self.optimizer.state_dict()}


def rows_not_finite(logits: torch.Tensor, first: int = 0) -> list[int]:
    """The rows (numbered from `first`) of `logits` `[B, T]` holding a NaN or an infinity."""
    return [first + row for row in torch.nonzero(~torch.isfinite(logits).all(dim=1)).flatten().tolist()]


def check_loss(loss: float, step: int, bad_rows: list[int], batch_rows: int) -> None:
    """A loss that is not finite stops the run at its step, before the sparse update
    (whose gradient would not be finite either), naming the rows of the batch of
    `batch_rows` whose outputs are not numbers (`bad_rows`, from `rows_not_finite`)."""
    if math.isfinite(loss):
        return
    culprits = ""
    if 0 < len(bad_rows) < batch_rows:
        shown = ", ".join(map(str, bad_rows[:10])) + (", ..." if len(bad_rows) > 10 else "")
        culprits = (f"; {len(bad_rows)} of the batch's {batch_rows} rows have outputs that are not numbers "
                    f"(rows {shown}, from 0): if it is only those, their inputs overflow the network (a weighted "
                    f"bag's weight or a dense number near float32's limit, say): fix or drop them")
    if step == 1:  # no update has acted yet
        verb, what = "look at", ("the starting values: the tables' initializer scale, the dense inputs and their "
                                 "transforms")
    else:
        verb, what = "lower", ("training.lr or the tables' learning rates, and resume from a checkpoint before this "
                               "step, or start again")
    advice = f"Else {verb}" if culprits else verb.capitalize()
    raise TidalError(f"training diverged at step {step}: its loss is {loss}{culprits}. {advice} {what}")


_DENSE_OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
                     "adagrad": torch.optim.Adagrad}


def dense_optimizer(model: torch.nn.Module, training: TrainingConfig) -> torch.optim.Optimizer:
    """The optimizer `training.optimizer` names, over `model`'s parameters."""
    chosen = training.optimizer
    return _DENSE_OPTIMIZERS[chosen.kind](model.parameters(), lr=training.lr, **chosen.torch_settings())


def clip_gradients(model: torch.nn.Module, training: TrainingConfig) -> None:
    """Scale `model`'s gradient down to the norm `training.clip_grad_norm`, when set."""
    if training.clip_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), training.clip_grad_norm)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give every parameter group of `optimizer` the learning rate `lr`."""
    for group in optimizer.param_groups:
        group["lr"] = lr
