"""Triton's model configuration and inference statistics, for the `tritonclient` calls
beyond the Open Inference Protocol: `get_model_config`, `get_inference_statistics` and
`get_model_repository_index`.

The configuration says what the server does, in Triton's terms: `max_batch_size` 0
(a request carries its own candidate dimension, which the server merges and splits
itself), the inputs and outputs of the model's metadata, and Tidal's serving settings
(but the fusion) and the checkpoint served as `parameters`. Neither `dynamic_batching` (which Triton allows only
with a `max_batch_size` above 0) nor `sequence_batching` (which would tell Triton's tools
that every request needs a sequence id: here sessions are optional) is set.
Statistics have Triton's fields, counted in Tidal's units where the two differ: requests
that succeeded or failed with their time end to end, and `compute_output` (response
encoding), per request as in Triton; but `queue` per piece waiting (a request cut into
chunks counts each chunk's wait) and `compute_input` (the sparse stage) and
`compute_infer` (the dense stage) per batch, so each phase's `ns / count` is the mean
of its own unit. `inference_count` is the candidates scored (a request given up after
its batch took it included) and `execution_count` the batches run.
"""

from __future__ import annotations

import threading
import time

from tidal.config import ServingConfig
from tidal.serving.batcher import BatchRecord
from tidal.serving.delta import Source

__all__ = ["Statistics", "model_config"]

_TYPES = {"BYTES": "TYPE_STRING", "FP64": "TYPE_FP64", "FP32": "TYPE_FP32", "INT64": "TYPE_INT64",
          "INT32": "TYPE_INT32"}


def model_config(metadata: dict, settings: ServingConfig, source: Source | None) -> dict:
    """Triton's configuration of a model with this metadata, served with `settings`:
    its parameters are the settings (but the fusion, which has a route of its own, and
    those unset) and the checkpoint served (`source`, when recorded)."""
    inputs = [{"name": i["name"], "data_type": _TYPES[i["datatype"]], "format": "FORMAT_NONE", "dims": i["shape"],
               "optional": i.get("optional", False)} for i in metadata["inputs"]]
    outputs = [{"name": o["name"], "data_type": _TYPES[o["datatype"]], "dims": o["shape"]} for o in metadata["outputs"]]
    tidal = {k: v for k, v in settings.model_dump().items() if k != "fusion" and v is not None}  # fusion: its route
    tidal["buckets"] = ",".join(map(str, settings.buckets))
    if source is not None:
        tidal |= {"source_step": source.step, "source_checkpoint": source.checkpoint, "source_run": source.run or ""}
    return {"name": metadata["name"], "platform": metadata["platform"], "backend": "tidal", "max_batch_size": 0,
            "input": inputs, "output": outputs, "parameters": {k: {"string_value": str(v)} for k, v in tidal.items()}}


class _Duration:
    """A count and the nanoseconds they took, as Triton reports them."""

    def __init__(self) -> None:
        self.count = self.ns = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += round(seconds * 1e9)

    def json(self) -> dict:
        return {"count": self.count, "ns": self.ns}


class Statistics:
    """One model's inference statistics, kept as requests and batches finish (thread-safe)."""

    _PHASES = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit",
               "cache_miss")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._phases = {p: _Duration() for p in self._PHASES}  # no response cache: its two stay at 0
        self._by_size: dict[int, tuple[_Duration, _Duration]] = {}
        self._candidates = self._batches = self._last_ms = 0

    def request(self, ok: bool, seconds: float) -> None:
        """One infer request answered: a success or a failure (bad request, overload, error)."""
        with self._lock:
            self._phases["success" if ok else "fail"].add(seconds)
            if ok:
                self._last_ms = int(time.time() * 1000)

    def output(self, seconds: float) -> None:
        with self._lock:
            self._phases["compute_output"].add(seconds)

    def batch(self, record: BatchRecord) -> None:
        with self._lock:
            self._candidates += record.rows
            self._batches += 1
            self._phases["queue"].add(record.waited_s, record.pieces)
            self._phases["compute_input"].add(record.sparse_s)
            self._phases["compute_infer"].add(record.dense_s)
            sparse, dense = self._by_size.setdefault(record.rows, (_Duration(), _Duration()))
            sparse.add(record.sparse_s)
            dense.add(record.dense_s)

    def json(self, name: str) -> dict:
        """Triton's statistics response for the model `name` (its one version, '1')."""
        with self._lock:
            batches = [{"batch_size": size, "compute_input": sparse.json(), "compute_infer": dense.json(),
                        "compute_output": {"count": 0, "ns": 0}}
                       for size, (sparse, dense) in sorted(self._by_size.items())]
            return {"model_stats": [{
                "name": name, "version": "1", "last_inference": self._last_ms, "inference_count": self._candidates,
                "execution_count": self._batches,
                "inference_stats": {p: d.json() for p, d in self._phases.items()}, "batch_stats": batches}]}
