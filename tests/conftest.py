"""Fixtures shared by tests in several folders."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest


@pytest.fixture
def ctrl_c_raises() -> Iterator[None]:
    """Ctrl-C (SIGINT) raising KeyboardInterrupt, as in a terminal, for a test that sends
    one: a test run started in the background (`make test &`) inherits SIGINT ignored,
    and Python then leaves it so."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
