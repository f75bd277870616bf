"""`tidal bench dense`: the serving dense stage, ONNX Runtime and AOTInductor against torch.

The networks a ranking server runs (DLRM, DCN-v2 and DeepFM of the serve benchmark's
sizes: 26 sparse features of dim 16, 13 dense features, two targets), at every bucket
size a request pads to, on one thread (`serving.dense_threads`' default). Peers, taking
turns on the same inputs: the bundle's `torch.export` program as the torch backend runs
it, rewritten by the graph rules (`tidal bench rewrite` times it against the program
as exported, which is also reported here), its ONNX model in ONNX Runtime as the onnxruntime backend runs it
(`tidal.compile.OnnxProgram`, converted and checked by `to_onnx`), and its AOTInductor
package as the aotinductor backend runs it (`tidal.compile.AotiProgram`, compiled and
checked by `to_aoti`; left out without a C++ compiler). Reports the median
milliseconds per call and each backend's ratio torch / backend per network and bucket.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from tidal.compile import (AOTI_MISSING, ONNX_MISSING, AotiProgram, OnnxProgram, aoti_available, export_program,
                           onnx_available, rewrite, to_aoti, to_onnx)
from tidal.config import ModelConfig
from tidal.errors import ConfigError
from tidal.models import RankingModel

__all__ = ["medians_ms", "run"]

BUCKETS = [1, 4, 16, 64, 256, 1024]  # serving.buckets' default
NETWORKS = {"dlrm": {"kind": "dlrm", "bottom_sizes": [64], "hidden_sizes": [128, 64]},
            "dcn": {"kind": "dcn", "hidden_sizes": [256, 128]},
            "deepfm": {"kind": "deepfm", "hidden_sizes": [256, 128]}}
FEATURES, DIM, DENSE, TARGETS = 26, 16, 13, 2
SMALL = 64  # the target: ONNX Runtime (and, separately, AOTInductor) at least TARGET x torch up to this size
TARGET = 1.5
BACKENDS, PREFIXES = ("onnxruntime", "aotinductor"), ("", "aotinductor_")  # of their figures' names


def run(*, quick: bool = False, as_json: bool = False) -> dict:
    if not onnx_available():
        raise ConfigError(ONNX_MISSING)
    if not aoti_available():
        print(f"Leaving out AOTInductor: {AOTI_MISSING}", flush=True)
    calls = 100 if quick else 400
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            points = [_measure(name, bucket, programs, calls) for name, programs in _programs(Path(scratch))
                      for bucket in BUCKETS]
    finally:
        torch.set_num_threads(threads)
    (onnx, onnx_met), (aoti, aoti_met) = (_backend_summary(points, b, p) for b, p in zip(BACKENDS, PREFIXES))
    summary = {"threads": 1, "points": points, **onnx, **aoti, "target_met": onnx_met,
               "aotinductor_target_met": aoti_met}
    if as_json:
        print(json.dumps(summary))
    return summary


def _backend_summary(points: list[dict], backend: str, prefix: str) -> tuple[dict, bool | None]:
    """The lowest ratio up to batch SMALL and the geometric mean of one backend, and
    whether it met the target (None where it was left out)."""
    measured = [p for p in points if p[f"{prefix}ratio_vs_torch"] is not None]
    if not measured:
        return {f"{prefix}min_ratio_up_to_64": None, f"{prefix}geomean_ratio": None}, None
    ratios = [p[f"{prefix}ratio_vs_torch"] for p in measured]
    small = min(p[f"{prefix}ratio_vs_torch"] for p in measured if p["batch"] <= SMALL)
    print(f"{backend} at least {TARGET}x torch at batches up to {SMALL}: {'met' if small >= TARGET else 'NOT met'} "
          f"(lowest {small:.3f}x)")
    return {f"{prefix}min_ratio_up_to_64": small,
            f"{prefix}geomean_ratio": round(float(np.exp(np.mean(np.log(ratios)))), 4)}, small >= TARGET


def _programs(scratch: Path) -> list[tuple[str, dict[str, Callable]]]:
    """(name, {peer: forward}) of each network, with random weights."""
    out = []
    for name, spec in NETWORKS.items():
        torch.manual_seed(0)
        model = RankingModel(ModelConfig(**spec), num_features=FEATURES, dim=DIM, dense_features=DENSE,
                             num_targets=TARGETS).eval()
        example = (torch.zeros(2, FEATURES, DIM), torch.zeros(2, DENSE))
        program = export_program(model, example, BUCKETS[-1])  # as tidal export writes them
        module = program.module()
        served = rewrite(module, [(torch.randn(b, FEATURES, DIM), torch.randn(b, DENSE)) for b in BUCKETS]).module
        peers = {"torch": served.forward, "exported": module.forward,
                 "onnxruntime": OnnxProgram.of(to_onnx(program, example, BUCKETS), program, threads=1).forward}
        if aoti_available():
            print(f"  compiling {name} with AOTInductor", flush=True)
            to_aoti(program, example, BUCKETS, scratch / f"{name}.pt2")
            peers["aotinductor"] = AotiProgram.of(scratch / f"{name}.pt2", program).forward
        out.append((name, peers))
    return out


def _measure(name: str, bucket: int, programs: dict[str, Callable], calls: int) -> dict:
    medians = dict(zip(programs, medians_ms(list(programs.values()),
                                            (torch.randn(bucket, FEATURES, DIM), torch.randn(bucket, DENSE)), calls)))
    point: dict = {"network": name, "batch": bucket, "torch_ms": round(medians["torch"], 5),
                   "torch_exported_ms": round(medians["exported"], 5)}
    line = f"  {name:<7} batch {bucket:>5}: torch {medians['torch']:7.3f} ms (as exported {medians['exported']:7.3f})"
    for backend, prefix in zip(BACKENDS, PREFIXES):
        found = medians.get(backend)
        point[f"{backend}_ms"] = None if found is None else round(found, 5)
        point[f"{prefix}ratio_vs_torch"] = None if found is None else round(medians["torch"] / found, 4)  # judged unrounded
        if found is not None:
            line += f"  {backend} {found:7.3f} ms {point[f'{prefix}ratio_vs_torch']:5.2f}x"
    print(line, flush=True)
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
