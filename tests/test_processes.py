"""A SIGTERM met as a Ctrl-C: through a library's start, and not in the middle of stopping one."""

from __future__ import annotations

import os
import signal
import sys

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
