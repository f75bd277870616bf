"""A SIGTERM met as a Ctrl-C: through a library's start, and not in the middle of stopping one."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator

import pytest

from tidal.processes import SIGTERM_CAME, deferring_interrupts, keeping_sigterm, sigterm_interrupts


def test_a_sigterm_that_a_library_s_handler_turns_into_its_exit_stops_as_a_ctrl_c_does():
    """As Ray's start does: its handler exits with the signal's number."""
    with sigterm_interrupts():
        handler = signal.getsignal(signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):
            with keeping_sigterm():
                signal.signal(signal.SIGTERM, lambda sig, frame: sys.exit(sig))
                os.kill(os.getpid(), signal.SIGTERM)
        assert SIGTERM_CAME.is_set() and signal.getsignal(signal.SIGTERM) is handler
        with pytest.raises(SystemExit):  # any other exit is the library's own
            with keeping_sigterm():
                sys.exit(3)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_during_a_deferring_block_is_raised_once_the_block_is_done(sig, ctrl_c_raises):
    with sigterm_interrupts():
        handlers = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
        done = []
        with pytest.raises(KeyboardInterrupt):
            with deferring_interrupts():
                os.kill(os.getpid(), sig)
                done.append("the rest of the block")
        assert done == ["the rest of the block"]
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
        assert SIGTERM_CAME.is_set() == (sig == signal.SIGTERM)
        with deferring_interrupts():  # none came: nothing raised
            pass


def test_a_second_interrupt_during_a_deferring_block_stops_it_at_once(ctrl_c_raises):
    with sigterm_interrupts():
        done = []
        with pytest.raises(KeyboardInterrupt):
            with deferring_interrupts():
                os.kill(os.getpid(), signal.SIGTERM)
                done.append("after the first")
                os.kill(os.getpid(), signal.SIGINT)
                done.append("after the second")
        assert done == ["after the first"]


def test_an_interrupt_the_process_ignores_stays_ignored_after_a_deferring_block():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with deferring_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # a second one stopped the block at once
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # not taken over at all
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture
def no_sigterm_left() -> Iterator[None]:
    """SIGTERM_CAME cleared after the test, lest a later test's training stop at its
    first step."""
    yield
    SIGTERM_CAME.clear()


def _kernel_returning_arrays():  # type: ignore[no-untyped-def]
    import numba
    import numpy as np

    @numba.njit(nogil=True)
    def kernel(n):  # type: ignore[no-untyped-def]
        total = np.zeros(1)
        for i in range(n):
            total[0] += np.sqrt(i)
        return total, total.copy()  # boxed by a call back into Python, where a pending signal is handled

    kernel(1)
    return kernel


def _free_for_other_threads(lock: threading.RLock) -> bool:
    """Whether another thread can take `lock` (an interrupt that skipped its release
    leaves every other thread waiting for it)."""
    taken = []

    def take() -> None:
        if lock.acquire(timeout=5):
            taken.append(True)
            lock.release()

    other = threading.Thread(target=take)
    other.start()
    other.join()
    return taken == [True]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_during_a_numba_kernel_is_raised_as_itself_once_the_kernel_returns(sig, ctrl_c_raises,
                                                                                      no_sigterm_left):
    """Raised in numba's callback, it reached the caller as a SystemError (a Ctrl-C or a
    SIGTERM during training ended in a traceback and exit code 1)."""
    kernel, lock = _kernel_returning_arrays(), threading.RLock()
    timer = threading.Timer(0.2, os.kill, (os.getpid(), sig))
    try:
        with sigterm_interrupts():
            timer.start()
            with pytest.raises(KeyboardInterrupt):
                for _ in range(10_000):
                    with lock:
                        kernel(20_000_000)  # ~20 ms: the signal comes while one runs, and is met at its return
    finally:
        timer.cancel()
        timer.join()
    assert SIGTERM_CAME.is_set() == (sig == signal.SIGTERM)
    assert _free_for_other_threads(lock)


def _numba_boxing_that_signals(sig: int):  # type: ignore[no-untyped-def]
    """numba's boxing as a signal that came during the kernel meets it: at its start."""
    from numba.core import serialize

    namespace = {"__name__": serialize.__name__, "signal": signal, "sig": sig}
    exec(f"def {serialize._numba_unpickle.__name__}():\n    signal.raise_signal(sig)\n    return 1\n", namespace)
    return namespace[serialize._numba_unpickle.__name__]


def _under(lock: threading.RLock, call):  # type: ignore[no-untyped-def]
    with lock:
        return call()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_met_in_numba_s_boxing_lets_the_caller_s_cleanup_run(sig, ctrl_c_raises, no_sigterm_left):
    boxing, lock, ran = _numba_boxing_that_signals(sig), threading.RLock(), []
    with sigterm_interrupts(), pytest.raises(KeyboardInterrupt):
        try:
            _under(lock, boxing)
        finally:
            ran.append("finally")
    assert ran == ["finally"] and _free_for_other_threads(lock)


def test_tracing_on_before_an_interrupt_met_in_numba_s_boxing_is_on_after_it(ctrl_c_raises):
    def tracer(frame, event, arg):  # type: ignore[no-untyped-def]
        return None

    sys.settrace(tracer)  # as coverage or a debugger has it
    try:
        with pytest.raises(KeyboardInterrupt), sigterm_interrupts():
            _numba_boxing_that_signals(signal.SIGINT)()
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(None)


def test_a_ctrl_c_that_the_process_ignores_stays_ignored_in_a_sigterm_block():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with sigterm_interrupts():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_as_llvm_hands_numba_its_machine_code_stops_the_compile(sig, ctrl_c_raises, monkeypatch,
                                                                            no_sigterm_left):
    """Raised in LLVM's ctypes callback, Python dropped it: the first run's compile went on."""
    import numba
    from llvmlite.binding import ffi
    from numba.core.registry import cpu_target

    engine = cpu_target.target_context.codegen()._engine._ee
    hand_over = engine._object_cache_notify

    def signal_then_hand_over(*args):  # type: ignore[no-untyped-def]
        os.kill(os.getpid(), sig)  # handled at the next line, inside LLVM's call back
        hand_over(*args)

    monkeypatch.setattr(engine, "_object_cache_notify", signal_then_hand_over)
    with sigterm_interrupts(), pytest.raises(KeyboardInterrupt):
        numba.njit(lambda x: x + 1)(1)
    assert _free_for_other_threads(ffi.lib._lock._lock)  # llvmlite's: other threads compile on


class _SignalsAsItIsCollected:
    def __init__(self, sig: int) -> None:
        self.sig = sig

    def __del__(self) -> None:
        os.kill(os.getpid(), self.sig)  # handled at the next line, inside the finalizer
        self.sig = 0


def _collect_one_that_signals(sig: int, done: list[str]) -> None:
    _SignalsAsItIsCollected(sig)  # collected at once
    done.append("the rest of the function")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_in_a_finalizer_is_raised_as_the_code_that_ran_returns(sig, ctrl_c_raises, no_sigterm_left):
    """Python drops an exception a finalizer raises: the interrupt was lost."""
    done: list[str] = []
    with sigterm_interrupts(), pytest.raises(KeyboardInterrupt):
        _collect_one_that_signals(sig, done)
        done.append("after the function")
    assert done == ["the rest of the function"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_in_a_finalizer_in_a_loop_is_raised_at_the_loop_s_next_turn(sig, ctrl_c_raises,
                                                                                 no_sigterm_left):
    """The frame that ran the finalizer may not return for the whole run."""
    turns, lock = [], threading.RLock()
    with sigterm_interrupts(), pytest.raises(KeyboardInterrupt):
        for turn in range(1_000):
            with lock:
                turns.append(turn)
                if turn == 3:
                    _SignalsAsItIsCollected(sig)
    assert turns == [0, 1, 2, 3] and _free_for_other_threads(lock)


def test_an_interrupt_that_waits_on_a_frame_beyond_the_block_is_raised_as_the_block_ends(ctrl_c_raises,
                                                                                      no_sigterm_left):
    """It was lost, and tracing was left on."""
    with pytest.raises(KeyboardInterrupt):
        with sigterm_interrupts():
            _SignalsAsItIsCollected(signal.SIGINT)  # its interrupt waits for this test to return
    assert sys.gettrace() is None


class _RaisesAsItIsCollected:
    def __del__(self) -> None:
        raise KeyboardInterrupt("from a worker's finalizer")


def test_an_interrupt_a_worker_thread_s_finalizer_raises_is_reported_as_before(monkeypatch):
    """No signal raises it there: it is the thread's own, and not the main thread's."""
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: reported.append(unraisable.exc_value.args))
    with sigterm_interrupts():
        worker = threading.Thread(target=_RaisesAsItIsCollected)
        worker.start()
        worker.join()
    assert reported == [("from a worker's finalizer",)]
