"""Whether a process that left files behind (a save's staging, a run's temporary
files) may still be writing them."""

from __future__ import annotations

import os

__all__ = ["process_running"]


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
