"""Where the time of a heterogeneous run goes: busy fraction of every stage, queue
depths and staleness, sampled every few seconds and summed up at the end."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from numba.core import event

from tidal.embedding.checkpoint import write_json_atomic

__all__ = ["ROLES", "STAGES", "TELEMETRY_FILE", "Telemetry", "compile_clock"]

TELEMETRY_FILE = "telemetry.json"  # in the run folder: an engine run's telemetry

# stage -> roles whose threads run it; transfer is counted on both sides of the cut.
# Every sparse worker has two threads: its reader parses and extracts ahead while it
# looks up, pools and updates, so each is a role of its own and no role passes 100%.
STAGES = {"parse": ("reader",), "extract": ("reader",), "lookup": ("sparse",), "pool": ("sparse",),
          "transfer": ("sparse", "dense"), "update": ("sparse",), "dense": ("dense",)}
ROLES = ("reader", "sparse", "dense")


class Telemetry:
    """Stage seconds reported by the workers, over the worker-seconds each role had."""

    def __init__(self, path: Path, every_s: float) -> None:
        self.path, self.every_s = path, every_s
        self.restart()
        self.stage_s = {role: {stage: 0.0 for stage in STAGES} for role in ROLES}
        self.worker_s = {role: 0.0 for role in ROLES}
        self.depths: dict[str, list[int]] = {}  # queue -> [samples, sum, max]
        self.staleness = [0, 0, 0]  # batches, sum, max
        self.samples = 0
        self.snapshots: list[dict] = []

    def restart(self) -> None:
        """Count time from now."""
        self.start = self._last = self._shown = time.perf_counter()
        self.skipped_s = 0.0

    def skip(self) -> None:
        """Leave the time since the last sample out (checkpoints, evaluations)."""
        now = time.perf_counter()
        self.skipped_s += now - self._last
        self._last = now

    def note_staleness(self, batches: int) -> None:
        _note(self.staleness, batches)

    def add(self, role: str, timings: dict[str, float]) -> None:
        """Seconds per stage that a worker of `role` (sparse or dense) reported."""
        for stage, seconds in timings.items():
            self.stage_s["reader" if STAGES[stage] == ("reader",) else role][stage] += seconds

    def sample(self, workers: dict[str, int], depths: dict[str, int]) -> None:
        """Account the time since the last sample to the workers running now."""
        now = time.perf_counter()
        for role, count in (workers | {"reader": workers["sparse"]}).items():
            self.worker_s[role] += count * (now - self._last)
        self._last = now
        for name, depth in depths.items():
            _note(self.depths.setdefault(name, [0, 0, 0]), depth)
        if now - self._shown >= self.every_s:
            self._shown = now
            self.snapshots.append(self.report())
            print("  engine: " + self.line(self.snapshots[-1]), flush=True)  # its speed since the run began

    def report(self) -> dict:
        wall = max(self._last - self.start - self.skipped_s, 1e-9)
        busy = {role: {stage: s / max(self.worker_s[role], 1e-9) for stage, s in stages.items()
                       if role in STAGES[stage]}
                for role, stages in self.stage_s.items()}
        utilization = {role: sum(fractions.values()) for role, fractions in busy.items()}
        return {"elapsed_s": wall, "samples": self.samples, "samples_per_s": self.samples / wall,
                "busy": busy, "utilization": utilization,
                "bottleneck": max(utilization, key=utilization.get), "bottleneck_utilization": max(utilization.values()),
                "queues": {name: _summary(seen) for name, seen in self.depths.items()},
                "staleness": _summary(self.staleness)}

    @staticmethod
    def line(report: dict) -> str:
        util = "  ".join(f"{role} {value:.0%}" for role, value in report["utilization"].items())
        return (f"{report['samples_per_s']:,.0f} samples/s  busy: {util}  "
                f"staleness mean {report['staleness']['mean']:.2f} max {report['staleness']['max']}")

    def finish(self, extra: dict | None = None) -> dict:
        """The final report with `extra` (the engine's fault report) merged in, saved as
        JSON next to the periodic snapshots."""
        final = self.report() | (extra or {})
        write_json_atomic(self.path, {"final": final, "snapshots": self.snapshots})
        return final

    @staticmethod
    def table(report: dict) -> str:
        """The busy fraction of every stage of every role, as a text table."""
        lines = [f"{'role':<8}{'stage':<10}{'busy':>8}"]
        for role, stages in report["busy"].items():
            lines += [f"{role:<8}{stage:<10}{fraction:>8.1%}" for stage, fraction in stages.items()]
            lines.append(f"{role:<8}{'total':<10}{report['utilization'][role]:>8.1%}")
        lines += [f"queue {name}: mean {q['mean']:.1f}, max {q['max']}" for name, q in report["queues"].items()]
        lines.append(f"staleness: mean {report['staleness']['mean']:.2f}, max {report['staleness']['max']}")
        return "\n".join(lines)


def _note(seen: list[int], value: int) -> None:
    seen[0] += 1
    seen[1] += value
    seen[2] = max(seen[2], value)


def _summary(seen: list[int]) -> dict:
    return {"mean": seen[1] / seen[0] if seen[0] else 0.0, "max": seen[2]}


@contextmanager
def compile_clock() -> Iterator[Callable[[], float]]:
    """Yields a function giving the wall seconds numba has spent compiling kernels inside
    the block so far. A kernel compiles on its first use on a machine and loads from
    numba's disk cache afterwards, so a first run is slower by that much."""
    listener = event.TimingListener()  # outermost compiles only; numba compiles one at a time
    with event.install_listener("numba:compile", listener):
        yield lambda: listener.duration if listener.done else 0.0
