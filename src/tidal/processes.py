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

__all__ = ["SIGTERM_CAME", "deferring_interrupts", "interrupting_signals", "keeping_sigterm", "process_running",
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

    Where Python handles the signal decides how it ends: inside numba's boxing of the
    arrays a kernel returns (where one that came while the kernel ran is handled), the
    caller got a SystemError; inside a finalizer, a weak reference's callback or a ctypes
    callback (LLVM's, as numba compiles), Python dropped the KeyboardInterrupt. The
    kernel's caller gets the KeyboardInterrupt in place of the SystemError; the code
    that ran the finalizer gets it as it returns or goes round its loop
    (`_raise_on_leaving`). (`SIGTERM_CAME` still tells whether a
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
    unraisablehook, tracing = sys.unraisablehook, sys.gettrace()
    sys.unraisablehook = _raising_dropped_interrupts(unraisablehook)
    left: BaseException | None = None
    try:
        yield
    finally:
        for waiting, (exc, lines) in list(_PENDING.items()):  # not left yet: raised here instead
            waiting.f_trace, waiting.f_trace_lines = None, lines
            left = left or exc
        _PENDING.clear()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sys.unraisablehook = unraisablehook  # after the handlers: no interrupt is dropped meanwhile
        # tracing as before: Python turned it off where `_raise_on_leaving` raised, and it
        # is still on where one was waiting
        if sys.gettrace() in (None, _no_other_frames):
            sys.settrace(tracing)
    if left is not None:
        raise left


def interrupting_signals() -> list[int]:
    """The signals that raise KeyboardInterrupt here: Ctrl-C's unless it is ignored or
    another's handler takes it, and SIGTERM in a `sigterm_interrupts` block."""
    raising = (signal.default_int_handler, _interrupt)
    return [sig for sig in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(sig) in raising]


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
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signals = [sig for sig, handler in previous.items() if handler != signal.SIG_IGN]  # an ignored one stays so
    came: list[int] = []

    def note(sig: int, frame: FrameType | None) -> None:
        if came:
            _interrupt(sig, frame)
        came.append(sig)

    try:
        for sig in signals:
            signal.signal(sig, note)
        yield
    finally:
        for sig in signals:
            signal.signal(sig, previous[sig] if previous[sig] is not None else signal.SIG_DFL)
    for sig in came:
        signal.raise_signal(sig)


SIGTERM_CAME = threading.Event()

# the frames `_raise_on_leaving` waits on, with what it raises and their line tracing before
_PENDING: dict[FrameType, tuple[BaseException, bool]] = {}


def _interrupt(sig: int, frame: FrameType | None) -> None:
    if sig == signal.SIGTERM:
        SIGTERM_CAME.set()
    boxing = _numba_boxing(frame)
    if boxing is not None and boxing.f_back is not None:
        _raise_on_leaving(boxing.f_back, KeyboardInterrupt())  # in place of the SystemError it gets
    raise KeyboardInterrupt


# numba boxes the arrays a kernel returns by calling this function from the compiled
# code, which turns an exception raised in it into a SystemError; a signal that came
# while the kernel ran is handled at its start
_NUMBA_BOXING = ("numba.core.serialize", "_numba_unpickle")


def _numba_boxing(frame: FrameType | None) -> FrameType | None:
    """The outermost frame of numba's boxing (`_NUMBA_BOXING`) that `frame` runs in, if
    any: an exception raised anywhere inside it leaves through the compiled code."""
    outermost = None
    while frame is not None:
        if (frame.f_globals.get("__name__"), frame.f_code.co_name) == _NUMBA_BOXING:
            outermost = frame
        frame = frame.f_back
    return outermost


def _raising_dropped_interrupts(previous: Callable[[Any], object]) -> Callable[[Any], object]:
    """A `sys.unraisablehook` that raises a KeyboardInterrupt Python dropped in the main
    thread (one raised in a finalizer, a weak reference's callback or a ctypes callback)
    as the code that was running is left (`_raise_on_leaving`); it passes anything else (a worker thread's,
    say: signals raise in the main thread only) to `previous`."""

    def hook(unraisable: Any) -> None:
        running = None
        if issubclass(unraisable.exc_type, KeyboardInterrupt) and threading.current_thread() is threading.main_thread():
            try:
                running = sys._getframe(1)  # the frame that ran when the finalizer was called
            except ValueError:  # none did
                pass
            boxing = _numba_boxing(running)
            running = boxing.f_back if boxing is not None else running
        if running is None:
            previous(unraisable)
        else:
            _raise_on_leaving(running, unraisable.exc_value or KeyboardInterrupt())

    return hook


def _raise_on_leaving(frame: FrameType, exc: BaseException) -> None:
    """Raise `exc` as `frame` is left: in place of the exception it meets (where it
    meets it: its `finally` and `with` exits run), as it returns, or at its loop's next
    turn; at the end of the `sigterm_interrupts` block at the latest. A trace function
    of that frame alone does it; Python turns all tracing off where a trace function
    raises, and `sigterm_interrupts` puts back what there was."""
    lines, start = frame.f_trace_lines, frame.f_lasti

    def stop(traced: FrameType, event: str, arg: object) -> Callable[..., object]:
        # a line before the one it ran (a loop's next turn): the statement it was in, and
        # any with or finally inside the loop around it, are done; blocks outside still hold it
        if event in ("exception", "return") or (event == "line" and traced.f_lasti < start):
            _PENDING.pop(traced, None)
            traced.f_trace_lines = lines
            raise exc
        return stop

    _PENDING[frame] = (exc, lines)
    frame.f_trace, frame.f_trace_lines = stop, True
    sys.settrace(sys.gettrace() or _no_other_frames)  # a frame's own trace function is called only while tracing is on


def _no_other_frames(frame: FrameType, event: str, arg: object) -> None:
    return None
