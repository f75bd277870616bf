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


@pytest.fixture(autouse=True)
def machine_taken_as_quiet(monkeypatch) -> object:  # type: ignore[no-untyped-def]
    """`tidal bench` warns first when other work keeps the machine busy: the tests' own
    load must not add that line to what they compare, nor each bench its half second of
    sampling. Returns the real sampler, for the tests of it."""
    from tidal import cli

    real = cli.busy_share
    monkeypatch.setattr(cli, "busy_share", lambda seconds=0.5: None)
    return real
