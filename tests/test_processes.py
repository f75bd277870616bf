"""A SIGTERM met as a Ctrl-C: through a library's start, and not in the middle of stopping one."""

from __future__ import annotations

import os
import signal
import sys
import threading

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
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


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


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_during_a_numba_kernel_is_raised_as_itself_once_the_kernel_returns(sig, ctrl_c_raises):
    """Raised in numba's callback, it reached the caller as a SystemError (a Ctrl-C or a
    SIGTERM during training ended in a traceback and exit code 1)."""
    kernel = _kernel_returning_arrays()
    with sigterm_interrupts():
        timer = threading.Timer(0.2, os.kill, (os.getpid(), sig))
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            for _ in range(10_000):
                kernel(20_000_000)  # ~20 ms: the signal comes while one runs, and is met at its return
        timer.join()
    assert SIGTERM_CAME.is_set() == (sig == signal.SIGTERM)
    SIGTERM_CAME.clear()  # lest a later test's training stop at its first step


def test_a_ctrl_c_that_the_process_ignores_stays_ignored_in_a_sigterm_block():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with sigterm_interrupts():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_as_llvm_hands_numba_its_machine_code_stops_the_compile(sig, ctrl_c_raises, monkeypatch):
    """Raised in LLVM's call back, Python dropped it: the first run's compile went on."""
    import numba
    from numba.core.registry import cpu_target

    engine = cpu_target.target_context.codegen()._engine._ee
    hand_over = engine._object_cache_notify

    def signal_then_hand_over(*args):  # type: ignore[no-untyped-def]
        os.kill(os.getpid(), sig)  # handled at the next line, inside LLVM's call back
        hand_over(*args)

    monkeypatch.setattr(engine, "_object_cache_notify", signal_then_hand_over)
    with sigterm_interrupts(), pytest.raises(KeyboardInterrupt):
        numba.njit(lambda x: x + 1)(1)
    SIGTERM_CAME.clear()


class _SignalsAsItIsCollected:
    def __init__(self, sig: int) -> None:
        self.sig = sig

    def __del__(self) -> None:
        os.kill(os.getpid(), self.sig)  # handled at the next line, inside the finalizer
        self.sig = 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_in_a_finalizer_is_raised_in_the_code_that_ran(sig, ctrl_c_raises):
    """Python drops an exception a finalizer raises: the interrupt was lost."""
    done = []
    with sigterm_interrupts(), pytest.raises(KeyboardInterrupt):
        _SignalsAsItIsCollected(sig)  # collected at once
        done.append("the next line")
        done.append("the line after")
    assert done == []
    SIGTERM_CAME.clear()
