"""`tidal bench rewrite`: the torch serving backend's program rewritten by the graph
rules (`tidal.compile.rules`), against the program as exported.

The networks of `tidal bench dense` (DLRM, DCN-v2, DeepFM: 26 sparse features of dim
16, 13 dense features, two targets) and two more, Wide & Deep and a DLRM with an MMoE
head (four experts), at every bucket size a request pads to, on one thread
(`serving.dense_threads`' default). Peers, taking turns on the same inputs: the
`torch.export` program as the torch backend ran it before the rules (its module's
`forward`), and the same program rewritten, as the torch backend runs it now. Reports
the median milliseconds per call, the ratio exported / rewritten per network and
bucket, and the rules each network was rewritten by; a network no rule rewrites is
served as exported, and not timed (two runs of one program would only measure noise).
`--device cuda` runs both on a GPU, as the torch backend runs there.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import torch
from torch.export.passes import move_to_device_pass

from tidal.bench.dense import BUCKETS, DENSE, DIM, FEATURES, NETWORKS, TARGETS, medians_ms
from tidal.compile import export_program, rewrite
from tidal.config import ModelConfig
from tidal.models import RankingModel

__all__ = ["run"]

MORE_NETWORKS = {"wide_deep": {"kind": "wide_deep", "hidden_sizes": [256, 128]},
                 "dlrm_mmoe": {**NETWORKS["dlrm"], "head": "mmoe", "experts": 4, "expert_sizes": [64],
                               "tower_sizes": [32]}}
SMALL = 16  # the target: the rewritten program at least TARGET x the exported at every batch up to this size,
TARGET = 1.5  # on every network a rule rewrites,
FLOOR = 0.95  # and nowhere below FLOOR x (the noise of these runs)


def run(*, quick: bool = False, as_json: bool = False, device: str = "cpu") -> dict:
    """The benchmark on `device` (cpu, or cuda: the programs moved there as the torch
    backend moves them, each call waited for)."""
    calls = 100 if quick else 400
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        networks = _networks(torch.device(device))
        points = [_measure(name, bucket, programs, calls, torch.device(device)) for name, (programs, kept)
                  in networks.items() if kept for bucket in BUCKETS]  # the others run as exported
    finally:
        torch.set_num_threads(threads)
    summary = {"device": device, **_summary(points, {name: rules for name, (_, rules) in networks.items()})}
    print(f"rewritten at least {TARGET}x the program at batches up to {SMALL} on every rewritten network, and "
          f"nowhere below {FLOOR}x: {'met' if summary['target_met'] else 'NOT met'} (lowest up to {SMALL} "
          f"{summary['min_ratio_up_to_16']:.3f}x, lowest anywhere {summary['min_ratio']:.3f}x)")
    if as_json:
        print(json.dumps(summary))
    return summary


def _networks(device: torch.device) -> dict[str, tuple[tuple, list[str]]]:
    """name -> ((exported forward, rewritten forward), the rules kept) of each network,
    with random weights, rewritten as the torch backend does (checked at every bucket)."""
    out = {}
    for name, spec in {**NETWORKS, **MORE_NETWORKS}.items():
        torch.manual_seed(0)
        model = RankingModel(ModelConfig(**spec), num_features=FEATURES, dim=DIM, dense_features=DENSE,
                             num_targets=TARGETS).eval()
        program = export_program(model, (torch.zeros(2, FEATURES, DIM), torch.zeros(2, DENSE)), BUCKETS[-1])
        module = (program if device.type == "cpu" else move_to_device_pass(program, device)).module()
        done = rewrite(module, [_inputs(b, device) for b in BUCKETS])
        print(f"  {name:<9} rewritten by {', '.join(done.kept) or 'no rule (served as exported: not timed)'}",
              flush=True)
        out[name] = ((_waited(module.forward, device), _waited(done.module.forward, device)), done.kept)
    return out


def _inputs(rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(rows, FEATURES, DIM, device=device), torch.randn(rows, DENSE, device=device)


def _waited(forward: Callable[..., torch.Tensor], device: torch.device) -> Callable[..., torch.Tensor]:
    """`forward`, returning once its work on `device` is done (a GPU's kernels run on after the call)."""
    if device.type == "cpu":
        return forward

    def waited(*args: torch.Tensor) -> torch.Tensor:
        out = forward(*args)
        torch.cuda.synchronize(device)
        return out

    return waited


def _measure(name: str, bucket: int, programs: tuple, calls: int, device: torch.device) -> dict:
    exported_ms, rewritten_ms = medians_ms(programs, _inputs(bucket, device), calls)
    point = {"network": name, "batch": bucket, "exported_ms": round(exported_ms, 4),
             "rewritten_ms": round(rewritten_ms, 4), "ratio_vs_exported": round(exported_ms / rewritten_ms, 4)}
    print(f"  {name:<9} batch {bucket:>5}: exported {exported_ms:7.3f} ms  rewritten {rewritten_ms:7.3f} ms  "
          f"{point['ratio_vs_exported']:5.2f}x", flush=True)
    return point


def _summary(points: list[dict], rules: dict[str, list[str]]) -> dict:
    """The figures over the points, those of rewritten networks (no network rewritten: not met)."""
    ratios = [p["ratio_vs_exported"] for p in points]
    lowest_small = min((p["ratio_vs_exported"] for p in points if p["batch"] <= SMALL), default=0.0)
    return {"threads": 1, "rules": rules, "points": points, "min_ratio_up_to_16": lowest_small,
            "min_ratio": min(ratios, default=0.0),
            "geomean_ratio": round(float(np.exp(np.mean(np.log(ratios)))), 4) if ratios else 0.0,
            "target_met": lowest_small >= TARGET and min(ratios, default=0.0) >= FLOOR}
