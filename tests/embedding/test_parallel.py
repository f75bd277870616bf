"""Kernels release the GIL, and work asked to run on several threads does."""

from __future__ import annotations

import importlib
import threading

import pytest
from numba.core.dispatcher import Dispatcher

from tidal.embedding._parallel import run_split, run_tasks

KERNEL_MODULES = ["tidal.mixing", "tidal.data.batch", "tidal.data.hashing", "tidal.embedding._memory",
                  "tidal.embedding.hashing", "tidal.embedding.index", "tidal.embedding.pooling",
                  "tidal.optim.rowwise", "tidal.serving.protocol"]


def _kernels() -> dict[str, Dispatcher]:
    found = {}
    for name in KERNEL_MODULES:
        module = importlib.import_module(name)
        found |= {f"{name}.{attr}": value for attr, value in vars(module).items()
                  if isinstance(value, Dispatcher) and value.py_func.__module__ == name}
    return found


def test_every_compiled_kernel_releases_the_gil():
    kernels = _kernels()
    assert len(kernels) >= 50  # the modules above hold them all
    assert [name for name, kernel in kernels.items() if kernel.targetoptions.get("nogil") is not True] == []


@pytest.mark.parametrize("threads", [1, 2])
def test_run_split_covers_the_range_in_disjoint_parts_one_per_thread(threads):
    parts = []
    run_split(lambda tag, lo, hi: parts.append((threading.get_ident(), lo, hi)), 10_000, threads, "tag")
    expected = [(0, 5000), (5000, 10_000)] if threads == 2 else [(0, 10_000)]
    assert sorted((lo, hi) for _, lo, hi in parts) == expected
    assert len({ident for ident, _, _ in parts}) == threads
    assert threading.get_ident() in {ident for ident, _, _ in parts}  # the caller works too


def test_run_tasks_on_two_threads_runs_two_tasks_at_once():
    both_running = threading.Barrier(2, timeout=10)  # broken, and raising, if the tasks ran one after the other
    ran = []

    def task(n):
        both_running.wait()
        ran.append(n)

    run_tasks([lambda n=n: task(n) for n in range(4)], threads=2)
    assert sorted(ran) == [0, 1, 2, 3]


def test_run_tasks_raises_the_first_error_after_every_task_ended():
    ended = []

    def fail():
        raise ValueError("task failed")

    with pytest.raises(ValueError, match="task failed"):
        run_tasks([fail, lambda: ended.append(1), lambda: ended.append(2)], threads=2)
    assert sorted(ended) == [1, 2]
