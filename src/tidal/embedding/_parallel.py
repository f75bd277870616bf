"""Split a range of work over threads that run GIL-free compiled kernels."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

__all__ = ["cpu_count", "run_split", "run_tasks"]

_MIN_ITEMS_PER_THREAD = 1024
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def cpu_count() -> int:
    """Cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=cpu_count(), thread_name_prefix="tidal-kernel")
        return _pool


def run_split(kernel: Callable[..., Any], n_items: int, threads: int, *args: Any) -> None:
    """Run ``kernel(*args, lo, hi)`` over [0, n_items) in up to `threads` disjoint parts.

    The kernels release the GIL, so the parts run on separate cores; the calling thread
    runs the first part itself. An exception in any part is raised here.
    """
    parts = max(1, min(threads, n_items // _MIN_ITEMS_PER_THREAD))
    if parts == 1:
        kernel(*args, 0, n_items)
        return
    bounds = [n_items * p // parts for p in range(parts + 1)]
    futures = [_executor().submit(kernel, *args, bounds[p], bounds[p + 1]) for p in range(1, parts)]
    kernel(*args, bounds[0], bounds[1])
    for future in futures:
        future.result()


def run_tasks(tasks: list[Callable[[], Any]], threads: int) -> None:
    """Run independent GIL-free tasks on up to `threads` threads; raise the first error.

    Each thread, the calling one included, takes the next task not yet started, so
    tasks of uneven size even out (give the largest first). Returns once every task
    has ended, even when one failed.
    """
    lanes = min(threads, len(tasks))
    if lanes <= 1:
        for task in tasks:
            task()
        return
    queue = iter(tasks)  # taking the next task is atomic under the GIL
    futures = [_executor().submit(_drain, queue) for _ in range(lanes - 1)]
    try:
        _drain(queue)
    finally:
        wait(futures)
    for future in futures:
        future.result()


def _drain(queue: Iterator[Callable[[], Any]]) -> None:
    for task in queue:
        task()
