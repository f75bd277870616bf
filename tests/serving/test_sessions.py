"""The session cache: TTL, memory cap, and errors that say why a session is gone."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pytest
import torch

from tidal.errors import TidalError
from tidal.serving import SessionCache, SessionError, UserState
from tidal.serving.sessions import _ARRAY_BYTES, _ENTRY_BYTES

ENTRY = 104 + 1 + _ENTRY_BYTES  # a 3-feature state under a one-character id


NO_USER = pa.RecordBatch.from_pydict({})  # no user columns: the state's bytes are its tensors


def _state(features: int = 3) -> UserState:
    return UserState(pooled=torch.zeros(1, features, 8), dense=torch.zeros(1, 2), user=NO_USER,
                     position=None)  # 3 * 32 + 8 = 104 bytes


def test_idle_sessions_expire_after_the_ttl():
    now = [0.0]
    cache = SessionCache(ttl_s=10, memory_bytes=10_000, clock=lambda: now[0])
    cache.start("a", _state())
    cache.start("b", _state())
    now[0] = 8.0
    cache.get("a")  # used: its idle time restarts
    now[0] = 12.0
    assert cache.get("a") is not None
    with pytest.raises(SessionError, match="sequence \"b\" is expired: idle for more than 10 s"):
        cache.get("b")
    assert cache.expired == 1 and len(cache) == 1 and cache.bytes == ENTRY


def test_the_least_recently_used_session_goes_when_memory_runs_out():
    cache = SessionCache(ttl_s=100, memory_bytes=3 * ENTRY + 100)
    for name in "abc":
        cache.start(name, _state())
    cache.get("a")
    cache.start("d", _state())  # 4 entries > the cap: b, the least recently used, goes
    with pytest.raises(SessionError, match="sequence \"b\" is evicted: the session cache was full"):
        cache.get("b")
    assert (len(cache), cache.evicted, cache.bytes) == (3, 1, 3 * ENTRY)
    with pytest.raises(SessionError, match="exceeds the cache"):
        cache.start("huge", _state(features=150))


def test_an_entry_counts_its_id_its_shared_columns_and_its_objects():
    cache = SessionCache(ttl_s=100, memory_bytes=1 << 20)
    cache.start("x" * 200, _state())
    shared = {"C1": pa.array(["a-user-value"])}
    cache.start("y", UserState(pooled=torch.zeros(1, 3, 8), dense=torch.zeros(1, 2), user=NO_USER, position=None,
                               shared=shared))
    with_shared = 104 + shared["C1"].get_total_buffer_size() + _ARRAY_BYTES + 1 + _ENTRY_BYTES
    assert cache.bytes == (104 + 200 + _ENTRY_BYTES) + with_shared
    cache.end("x" * 200)
    assert cache.bytes == with_shared
    user = pa.RecordBatch.from_pydict({"C1": ["a-user-value"], "C2": ["another"]})
    cache.start("z", UserState(pooled=torch.zeros(1, 3, 8), dense=torch.zeros(1, 2), user=user, position=None))
    assert cache.bytes == with_shared + 104 + user.get_total_buffer_size() + 2 * _ARRAY_BYTES + 1 + _ENTRY_BYTES


def test_expire_drops_idle_sessions_without_a_session_request():
    now = [0.0]
    cache = SessionCache(ttl_s=10, memory_bytes=10_000, clock=lambda: now[0])
    cache.start("a", _state())
    now[0] = 11.0
    assert len(cache) == 1
    cache.expire()
    assert (len(cache), cache.bytes, cache.expired) == (0, 0, 1)


def test_ended_and_unknown_sessions_are_told_apart():
    cache = SessionCache(ttl_s=100, memory_bytes=10_000)
    cache.start("a", _state())
    cache.end("a")
    with pytest.raises(SessionError, match="sequence \"a\" is unknown: it has ended"):
        cache.get("a")
    with pytest.raises(SessionError, match="sequence \"z\" is unknown: never started"):
        cache.get("z")
    with pytest.raises(SessionError, match="sequence \"usuário-7\" is unknown"):  # as the client wrote it
        cache.get("usuário-7")
    assert cache.bytes == 0


def test_end_with_a_state_leaves_a_session_started_again_under_the_same_id():
    cache = SessionCache(ttl_s=100, memory_bytes=10_000)
    old, new = _state(), _state()
    cache.start("a", old)
    cache.start("a", new)  # the id starts again while a request of the old session runs
    cache.end("a", old)  # that request's sequence_end
    assert cache.get("a") is new and cache.bytes == ENTRY
    cache.end("a", new)
    with pytest.raises(SessionError, match="sequence \"a\" is unknown: it has ended"):
        cache.get("a")
    assert cache.bytes == 0


def test_a_refreshed_state_replaces_the_old_one_only_if_the_session_still_holds_it():
    cache = SessionCache(ttl_s=100, memory_bytes=1 << 20)
    old, new, other = _state(), _state(), _state()
    cache.start("a", old)
    cache.refresh("a", old, new)
    assert cache.get("a") is new
    cache.refresh("a", old, other)  # started again meanwhile (here: refreshed): not the old one any more
    assert cache.get("a") is new
    cache.end("a")
    cache.refresh("a", new, other)  # ended meanwhile
    with pytest.raises(SessionError, match="it has ended"):
        cache.get("a")
    assert cache.bytes == 0


@pytest.mark.parametrize("settings, expected", [
    ({"ttl_s": -1, "memory_bytes": 100}, "ttl_s must be a number of seconds > 0, got -1"),
    ({"ttl_s": float("nan"), "memory_bytes": 100}, "ttl_s must be a number of seconds > 0, got nan"),
    ({"ttl_s": 10, "memory_bytes": 1.5}, "memory_bytes must be a whole number >= 0, got 1.5"),
])
def test_a_cache_refuses_settings_that_would_expire_every_session_at_once(settings, expected):
    from tidal.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"^SessionCache: {expected}$"):
        SessionCache(**settings)
    assert SessionCache(ttl_s=float("inf"), memory_bytes=0).ttl_s == float("inf")  # never expire: taken


@pytest.mark.parametrize("sequence_id", [None, -5, 1.5, True, 1 << 64, b"a", 0, "", "x" * 257])
def test_an_id_that_no_request_could_carry_is_refused_naming_it(sequence_id):
    """None, -5 and 1.5 were taken as ids, and True reached session 1 (an audit's find)."""
    cache = SessionCache(ttl_s=100, memory_bytes=1 << 20)
    expected = (r"^a session's id is an unsigned 64-bit integer other than 0 or a string of 1 to 256 characters \(as "
                rf"in Triton, 0 and \"\" mean no session\), got {re.escape(repr(sequence_id))}$")
    for call in (lambda: cache.start(sequence_id, _state()), lambda: cache.get(sequence_id),
                 lambda: cache.end(sequence_id), lambda: cache.refresh(sequence_id, _state(), _state())):
        with pytest.raises(SessionError, match=expected):
            call()
    assert len(cache) == 0


def test_a_numpy_integer_id_is_the_session_of_its_value():
    cache = SessionCache(ttl_s=100, memory_bytes=1 << 20)
    state = _state()
    cache.start(np.uint64(5), state)
    assert cache.get(5) is state and cache.get(np.int32(5)) is state
    cache.end(5)
    assert len(cache) == 0


def test_a_state_that_is_not_a_user_state_is_refused():
    cache = SessionCache(ttl_s=100, memory_bytes=1 << 20)
    with pytest.raises(TidalError, match=r"^SessionCache.start: state must be a UserState \(Predictor.user_state "
                                         r"makes one\), got NoneType$"):
        cache.start(1, None)
