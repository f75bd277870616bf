"""`tidal bench dense`: the serving dense stage, ONNX Runtime against torch.

The networks a ranking server runs (DLRM, DCN-v2 and DeepFM of the serve benchmark's
sizes: 26 sparse features of dim 16, 13 dense features, two targets), at every bucket
size a request pads to, on one thread (`serving.dense_threads`' default). Peers, taking
turns on the same inputs: the bundle's `torch.export` program as the torch backend
runs it (its module's `forward`), and its ONNX model in ONNX Runtime as the
onnxruntime backend runs it (`tidal.compile.OnnxProgram`, converted and checked by
`to_onnx`). Reports the median milliseconds per call and the ratio torch / ONNX
Runtime per network and bucket.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from tidal.compile import ONNX_MISSING, OnnxProgram, export_program, onnx_available, to_onnx
from tidal.config import ModelConfig
from tidal.errors import ConfigError
from tidal.models import RankingModel

__all__ = ["medians_ms", "run"]

BUCKETS = [1, 4, 16, 64, 256, 1024]  # serving.buckets' default
NETWORKS = {"dlrm": {"kind": "dlrm", "bottom_sizes": [64], "hidden_sizes": [128, 64]},
            "dcn": {"kind": "dcn", "hidden_sizes": [256, 128]},
            "deepfm": {"kind": "deepfm", "hidden_sizes": [256, 128]}}
FEATURES, DIM, DENSE, TARGETS = 26, 16, 13, 2
SMALL = 64  # the target: ONNX Runtime at least TARGET x torch at every bucket up to this size
TARGET = 1.5


def run(*, quick: bool = False, as_json: bool = False) -> dict:
    if not onnx_available():
        raise ConfigError(ONNX_MISSING)
    calls = 100 if quick else 400
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        points = [_measure(name, bucket, programs, calls) for name, programs in _programs()
                  for bucket in BUCKETS]
    finally:
        torch.set_num_threads(threads)
    small = [p["ratio_vs_torch"] for p in points if p["batch"] <= SMALL]
    summary = {"threads": 1, "points": points, "min_ratio_up_to_64": min(small),
               "geomean_ratio": round(float(np.exp(np.mean(np.log([p["ratio_vs_torch"] for p in points])))), 2),
               "target_met": min(small) >= TARGET}
    print(f"ONNX Runtime at least {TARGET}x torch at batches up to {SMALL}: "
          f"{'met' if summary['target_met'] else 'NOT met'} (lowest {min(small):.2f}x)")
    if as_json:
        print(json.dumps(summary))
    return summary


def _programs() -> list[tuple[str, tuple]]:
    """(name, (torch forward, ONNX Runtime program)) of each network, with random weights."""
    out = []
    for name, spec in NETWORKS.items():
        torch.manual_seed(0)
        model = RankingModel(ModelConfig(**spec), num_features=FEATURES, dim=DIM, dense_features=DENSE,
                             num_targets=TARGETS).eval()
        example = (torch.zeros(2, FEATURES, DIM), torch.zeros(2, DENSE))
        program = export_program(model, example, BUCKETS[-1])  # as tidal export writes them
        onnx = OnnxProgram.of(to_onnx(program, example, BUCKETS), program, threads=1)
        out.append((name, (program.module().forward, onnx.forward)))
    return out


def _measure(name: str, bucket: int, programs: tuple, calls: int) -> dict:
    torch_ms, onnx_ms = medians_ms(programs, (torch.randn(bucket, FEATURES, DIM), torch.randn(bucket, DENSE)), calls)
    point = {"network": name, "batch": bucket, "torch_ms": round(torch_ms, 4), "onnxruntime_ms": round(onnx_ms, 4),
             "ratio_vs_torch": round(torch_ms / onnx_ms, 2)}
    print(f"  {name:<7} batch {bucket:>5}: torch {torch_ms:7.3f} ms  onnxruntime {onnx_ms:7.3f} ms  "
          f"{point['ratio_vs_torch']:5.2f}x", flush=True)
    return point


def medians_ms(programs: Sequence[Callable[..., object]], inputs: tuple[torch.Tensor, ...], calls: int,
               block: int = 20) -> list[float]:
    """Median ms per call of each of `programs` on `inputs`, taking turns `block` calls
    at a time (the first call of a turn is not timed)."""
    times: list[list[float]] = [[] for _ in programs]
    with torch.no_grad():
        for _ in range(0, calls, block):
            for peer, forward in enumerate(programs):
                forward(*inputs)
                for _ in range(block):
                    start = time.perf_counter()
                    forward(*inputs)
                    times[peer].append(time.perf_counter() - start)
    return [float(np.median(t)) * 1e3 for t in times]
