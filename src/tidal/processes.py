"""Processes: whether one that left files behind (a save's staging, a run's temporary
files) may still be writing them, and a SIGTERM met as a Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

__all__ = ["SIGTERM_CAME", "deferring_interrupts", "keeping_sigterm", "process_running", "sigterm_interrupts"]


def process_running(pid: int) -> bool:
    """Whether process `pid` exists on this machine (files it began may still be being
    written). A pid of 0 or less names no one process (os.kill would signal a group)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # no signal: only whether the process exists
    except PermissionError:  # another user's
        return True
    except (OSError, OverflowError):  # ProcessLookupError: none has that id
        return False
    return True


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """A block in which SIGTERM raises KeyboardInterrupt, as Ctrl-C does (in the main
    thread; elsewhere signals cannot be handled, and nothing changes): a job stopped by
    its scheduler (Kubernetes, Slurm, systemd) ends as one stopped by hand. Python
    drops an exception raised where the signal lands inside a finalizer (a weakref's
    callback, say), so `SIGTERM_CAME` tells whether one came all the same."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if signal.getsignal(signal.SIGTERM) is not _interrupt:  # the outermost such block
        SIGTERM_CAME.clear()
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def keeping_sigterm() -> Iterator[None]:
    """A block after which SIGTERM is handled as before it, whatever a library did in it
    (Ray's start installs handlers that exit with status 15, or abort with a stack dump).
    A SIGTERM that such a handler met in the block, exiting with its number, stops the
    run as a Ctrl-C does."""
    handler = signal.getsignal(signal.SIGTERM)
    try:
        yield
    except SystemExit as exc:
        if exc.code != signal.SIGTERM:
            raise
        SIGTERM_CAME.set()
        raise KeyboardInterrupt from None
    finally:
        if handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, handler)  # at the C level too, where Ray's own may sit


@contextlib.contextmanager
def deferring_interrupts() -> Iterator[None]:
    """A block that a Ctrl-C or a SIGTERM does not break into (one that stops Ray half way
    leaves its processes running): it reaches the handler it had before once the block
    ends (unless the block ends by an exception), and a second one meanwhile at once, as
    a KeyboardInterrupt, so that a block that hangs can still be stopped. Not nested."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.getsignal(sig) for sig in signals}
    came: list[int] = []

    def note(sig: int, frame: object) -> None:
        if came:
            raise KeyboardInterrupt
        came.append(sig)

    try:
        for sig in signals:
            signal.signal(sig, note)
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    for sig in came:
        signal.raise_signal(sig)


SIGTERM_CAME = threading.Event()


def _interrupt(sig: int, frame: object) -> None:
    SIGTERM_CAME.set()
    raise KeyboardInterrupt
