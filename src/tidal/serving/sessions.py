"""The session cache: per-user state of stateful requests, keyed by `sequence_id`.

An id is an unsigned 64-bit integer or a string of up to 256 characters, as in Triton: 5
and "5" are two sessions (a numpy integer is its value), 0 and "" mean no session, and
messages name a string id in quotes.

Three requests make a session (Triton's sequence parameters): `sequence_start`
computes the user side once and caches it; continuing requests score pages of
candidates against it; `sequence_end` releases it. Idle state expires after
`ttl_s`, and the least recently used goes first when the cache is over `memory_bytes`.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from tidal.config import is_finite_number, is_whole_number
from tidal.errors import ConfigError, TidalError
from tidal.serving.predictor import UserState, check_user_state
from tidal.serving.protocol import MAX_SEQUENCE_ID

__all__ = ["SessionCache", "SessionError"]

_REMEMBERED = 10_000  # ids of recently expired or evicted sessions, to say why one is gone
# Memory a session keeps beyond its arrays' bytes, measured as the RSS of 50,000 of them:
# the entry and its state's two tensors cost about 1,700 bytes (with 68 bytes of data),
# and each shared Arrow array about 1,000 more (with 12 bytes of buffers).
_ENTRY_BYTES = 1_700
_ARRAY_BYTES = 1_000


SequenceId = int | str


def _checked(sequence_id: object) -> SequenceId:
    """`sequence_id` as a session's id (a numpy integer as Python's), or a `SessionError`
    unless it is one a request could carry."""
    if is_whole_number(sequence_id) and 0 < sequence_id < 1 << 64:
        return int(sequence_id)
    if isinstance(sequence_id, str) and 0 < len(sequence_id) <= MAX_SEQUENCE_ID:
        return sequence_id
    raise SessionError(f"a session's id is an unsigned 64-bit integer other than 0 or a string of 1 to "
                       f"{MAX_SEQUENCE_ID} characters (as in Triton, 0 and \"\" mean no session), got {sequence_id!r}")


def _named(sequence_id: SequenceId) -> str:
    """`sequence 5` or `sequence "5"`, as a message names a session."""
    return f"sequence {json.dumps(sequence_id, ensure_ascii=False)}"


class SessionError(TidalError):
    """A request names a session that does not exist (unknown, ended, expired or evicted)."""


class SessionCache:
    """Thread-safe LRU of `UserState`s with an idle TTL and a memory cap."""

    def __init__(self, *, ttl_s: float, memory_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        if not (is_finite_number(ttl_s) or ttl_s == math.inf) or ttl_s <= 0:  # inf: sessions never expire
            raise ConfigError(f"SessionCache: ttl_s must be a number of seconds > 0, got {ttl_s!r}")
        if not is_whole_number(memory_bytes) or memory_bytes < 0:
            raise ConfigError(f"SessionCache: memory_bytes must be a whole number >= 0, got {memory_bytes!r}")
        self.ttl_s = ttl_s
        self.memory_bytes = memory_bytes
        self._clock = clock
        self._entries: OrderedDict[SequenceId, tuple[UserState, float, int]] = OrderedDict()  # (state, last use, bytes), oldest use first
        self._gone: OrderedDict[SequenceId, str] = OrderedDict()  # id -> why it left
        self._lock = threading.Lock()
        self.bytes = 0
        self.expired = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def start(self, sequence_id: SequenceId, state: UserState) -> None:
        """Cache `state` for `sequence_id` (replacing any earlier one)."""
        check_user_state(state, "SessionCache.start: state")
        sequence_id = _checked(sequence_id)
        size = self._size(sequence_id, state)
        if size > self.memory_bytes:
            raise SessionError(f"{_named(sequence_id)}: its state ({size} bytes) exceeds the cache "
                               f"({self.memory_bytes} bytes)")
        with self._lock:
            self._store(sequence_id, state, size)

    def refresh(self, sequence_id: SequenceId, old: UserState, new: UserState) -> None:
        """Put `new` in the place of `old` (a state pooled again after an online update),
        unless the session ended or started again meanwhile."""
        check_user_state(new, "SessionCache.refresh: new")
        sequence_id = _checked(sequence_id)
        size = self._size(sequence_id, new)
        with self._lock:
            entry = self._entries.get(sequence_id)
            if entry is not None and entry[0] is old and size <= self.memory_bytes:
                self._store(sequence_id, new, size)

    @staticmethod
    def _size(sequence_id: SequenceId, state: UserState) -> int:
        arrays = len(state.shared) + state.user.num_columns
        return state.nbytes + len(str(sequence_id)) + _ENTRY_BYTES + _ARRAY_BYTES * arrays

    def _store(self, sequence_id: SequenceId, state: UserState, size: int) -> None:
        """Cache `state` as the most recently used (under the lock), evicting others over the cap."""
        self._expire()
        self._remove(sequence_id, None)
        self._entries[sequence_id] = (state, self._clock(), size)
        self.bytes += size
        while self.bytes > self.memory_bytes:
            self.evicted += 1
            self._remove(next(iter(self._entries)), "evicted: the session cache was full")

    def expire(self) -> None:
        """Drop the sessions idle past the TTL now (`start` and `get` do it too; the
        server also calls it on every infer request and metrics scrape, so that
        expired state leaves without session traffic)."""
        with self._lock:
            self._expire()

    def get(self, sequence_id: SequenceId) -> UserState:
        """The state of a live session (its idle time restarts), or a `SessionError` saying why not."""
        sequence_id = _checked(sequence_id)
        with self._lock:
            self._expire()
            entry = self._entries.get(sequence_id)
            if entry is None:
                why = self._gone.get(sequence_id, "unknown: never started, or already ended")
                raise SessionError(f"{_named(sequence_id)} is {why}; send sequence_start with its user features")
            self._entries[sequence_id] = (entry[0], self._clock(), entry[2])
            self._entries.move_to_end(sequence_id)
            return entry[0]

    def end(self, sequence_id: SequenceId, state: UserState | None = None) -> None:
        """Release a session's state; with `state`, only if it is still the one under
        `sequence_id` (not a session started again under that id meanwhile)."""
        sequence_id = _checked(sequence_id)
        with self._lock:
            entry = self._entries.get(sequence_id)
            if state is None or entry is None or entry[0] is state:
                self._remove(sequence_id, "unknown: it has ended")

    def _expire(self) -> None:
        deadline = self._clock() - self.ttl_s
        while self._entries:
            sequence_id, (_, used, _) = next(iter(self._entries.items()))
            if used > deadline:
                return
            self.expired += 1
            self._remove(sequence_id, f"expired: idle for more than {self.ttl_s:g} s")

    def _remove(self, sequence_id: SequenceId, why: str | None) -> None:
        entry = self._entries.pop(sequence_id, None)
        if entry is not None:
            self.bytes -= entry[2]
        if why is not None:
            self._gone[sequence_id] = why
            self._gone.move_to_end(sequence_id)
            if len(self._gone) > _REMEMBERED:
                self._gone.popitem(last=False)
