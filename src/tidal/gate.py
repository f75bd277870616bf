"""A gate shared by many users at once, or held by one exclusive holder."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["Gate"]


class Gate:
    """Many holders of `shared` at once, or one of `exclusive`: an exclusive holder
    waits for the shared ones under way and keeps new ones waiting (it goes first), so
    no shared holder sees the state half way through an exclusive change.

    The embedding tables guard their rows with one (lookups and updates share it, a
    removal of rows takes it alone); a serving predictor guards its tables and program
    with another (scoring shares it, an online update takes it alone). A thread holding
    `shared` may take it again at once (an exclusive holder waiting meanwhile would
    otherwise wait for it while it waits for the exclusive one), but not `exclusive`,
    which would wait for itself: that raises `RuntimeError`."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._users = 0
        self._exclusive_waiting = 0  # waiting or holding
        self._exclusive_held = False
        self._depth = threading.local()  # how many times this thread holds `shared`

    @contextmanager
    def shared(self) -> Iterator[None]:
        depth = getattr(self._depth, "n", 0)
        if not depth:
            with self._changed:
                self._changed.wait_for(lambda: not self._exclusive_waiting)
                self._users += 1
        self._depth.n = depth + 1
        try:
            yield
        finally:
            self._depth.n = depth
            if not depth:
                with self._changed:
                    self._users -= 1
                    self._changed.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        if getattr(self._depth, "n", 0):
            raise RuntimeError("this thread holds the gate shared (a table's holding_rows, a predictor's scoring): "
                               "taking it alone, to remove rows or update, would wait for itself forever")
        with self._changed:
            self._exclusive_waiting += 1
            try:
                self._changed.wait_for(lambda: not self._users and not self._exclusive_held)
            except BaseException:  # interrupted while waiting: the shared holders must not wait for it
                self._exclusive_waiting -= 1
                self._changed.notify_all()
                raise
            self._exclusive_held = True
        try:
            yield
        finally:
            with self._changed:
                self._exclusive_waiting -= 1
                self._exclusive_held = False
                self._changed.notify_all()
