"""Processes: whether one that left files behind (a save's staging, a run's temporary
files) may still be writing them, and a SIGTERM met as a Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

__all__ = ["SIGTERM_CAME", "ctrl_c_raises", "deferring_interrupts", "keeping_sigterm", "process_running",
           "sigterm_interrupts"]


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
    its scheduler (Kubernetes, Slurm, systemd) ends as one stopped by hand.

    Where Python handles the signal decides how it ends: inside numba's or LLVM's call
    back from compiled code (`_CALLBACKS`, where one that came while that code ran is
    handled), the caller got a SystemError or nothing; inside a finalizer (a weak
    reference's callback, say), Python dropped the KeyboardInterrupt. Either is raised
    at the next line of the code that was running. (`SIGTERM_CAME` still tells whether a
    SIGTERM came, should it be lost some other way. Ctrl-C is taken over only where it
    raised KeyboardInterrupt: one a background job ignores stays ignored.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if signal.getsignal(signal.SIGTERM) is not _interrupt:  # the outermost such block
        SIGTERM_CAME.clear()
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _interrupt)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, _interrupt)
    unraisablehook = sys.unraisablehook
    sys.unraisablehook = _raising_dropped_interrupts(unraisablehook)
    try:
        yield
    finally:
        sys.unraisablehook = unraisablehook
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def ctrl_c_raises() -> bool:
    """Whether a Ctrl-C raises KeyboardInterrupt here (not ignored, nor taken by a
    handler of another's)."""
    return signal.getsignal(signal.SIGINT) in (signal.default_int_handler, _interrupt)


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


def _interrupt(sig: int, frame: FrameType | None) -> None:
    if sig == signal.SIGTERM:
        SIGTERM_CAME.set()
    callback = _callback_from_c(frame)
    if callback is None or callback.f_back is None:
        raise KeyboardInterrupt
    _raise_when_back_in(callback.f_back)


# Python functions that compiled code calls, where an exception comes out of the
# compiled code as a SystemError or is dropped: numba boxing the arrays a kernel returns,
# LLVM handing numba the machine code it compiled. A signal that came while the
# compiled code ran is handled at the start of such a call.
_CALLBACKS = {("numba.core.serialize", "_numba_unpickle"),
              ("llvmlite.binding.executionengine", "_raw_object_cache_notify"),
              ("llvmlite.binding.executionengine", "_raw_object_cache_getbuffer")}


def _callback_from_c(frame: FrameType | None) -> FrameType | None:
    """The outermost frame of one of `_CALLBACKS` that `frame` runs in, if any."""
    outermost = None
    while frame is not None:
        if (frame.f_globals.get("__name__"), frame.f_code.co_name) in _CALLBACKS:
            outermost = frame
        frame = frame.f_back
    return outermost


def _raising_dropped_interrupts(previous: Callable[[Any], object]) -> Callable[[Any], object]:
    """A `sys.unraisablehook` that raises a KeyboardInterrupt Python dropped (one raised
    in a finalizer or a weak reference's callback) in the code that was running, at its
    next line; it passes anything else to `previous`."""

    def hook(unraisable: Any) -> None:
        caller = sys._getframe(1)  # the frame that ran when Python called the finalizer
        if issubclass(unraisable.exc_type, KeyboardInterrupt) and caller is not None:
            _raise_when_back_in(caller)
        else:
            previous(unraisable)

    return hook


def _raise_when_back_in(caller: FrameType | None) -> None:
    """Raise KeyboardInterrupt in `caller` (the frame whose C call called back) at its
    next line or its return, through a trace function of that frame alone; the tracing
    there was before is put back."""
    if caller is None:
        return
    outer, own = sys.gettrace(), caller.f_trace

    def stop(frame: FrameType, event: str, arg: object) -> None:
        frame.f_trace = own
        sys.settrace(outer)
        raise KeyboardInterrupt

    caller.f_trace = stop
    sys.settrace(outer or _no_other_frames)  # a frame's own trace function is called only while tracing is on


def _no_other_frames(frame: FrameType, event: str, arg: object) -> None:
    return None
