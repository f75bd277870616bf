"""Folders an export writes whole: staged under a temporary name, locked while written,
then put in place; what a killed export left is found by its lock, not its pid.

A process id says nothing across containers (in each, an export may be process 1), so
a staging folder is held by an exclusive `flock` on a lock file beside it (made before
the folder, removed after it; a file, as NFS locks no folder) while it is written: the
system drops the lock when the writer dies, and a later export removes the folders
nobody holds, with their lock files. A bundle replaced in full is swapped with its new
version in one `renameat2(RENAME_EXCHANGE)` where Linux and the filesystem allow it, so
that its path never goes missing; elsewhere by two renames, and a bundle left aside by
an export killed between them is put back by the next one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from tidal.embedding.checkpoint import fsync_path

__all__ = ["STAGING_EXTRA", "put_in_place", "remove_abandoned", "staging"]

_SETTLING_S = 60.0  # a folder without a lock file, younger than this, may be an older Tidal's still written
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2
# the bytes `staging` (and `put_in_place`'s set-aside name) adds to a folder's name: .tmp-NAME-PID-NONCE.lock
STAGING_EXTRA = len(".tmp--4194304-0123abcd.lock")


@contextlib.contextmanager
def staging(parent: Path, prefix: str) -> Iterator[Path]:
    """A new folder `parent/.tmp-{prefix}-{pid}-{nonce}`, locked while the block runs and
    removed after it unless it was renamed away (into place)."""
    folder = parent / f".tmp-{prefix}-{os.getpid()}-{secrets.token_hex(4)}"
    parent.mkdir(parents=True, exist_ok=True)
    with _held(folder):
        try:
            folder.mkdir()
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)


def remove_abandoned(parent: Path, pattern: re.Pattern, restore_to: Path | None = None) -> None:
    """Remove the entries of `parent` named as `pattern` says whose writer is gone; with
    `restore_to`, one named `.old-...` (a bundle set aside) goes back there instead if
    nothing is there any more."""
    for entry in parent.iterdir() if parent.is_dir() else []:
        if not pattern.fullmatch(entry.name) or not _abandoned(entry):
            continue
        if restore_to is not None and entry.name.startswith(".old-") and not restore_to.exists():
            os.rename(entry, restore_to)
            fsync_path(parent)
        else:
            shutil.rmtree(entry, ignore_errors=True)
        _lock_file(entry).unlink(missing_ok=True)


def put_in_place(new: Path, out: Path) -> None:
    """Put folder `new` in the place of folder `out` (which may not exist): at once
    where the system swaps them; else by two renames, the old folder going back if the
    second fails. `new` is gone after."""
    if out.exists() and _exchange(new, out):
        fsync_path(out.parent)
        shutil.rmtree(new, ignore_errors=True)  # the old folder now
        return
    old = out.parent / f".old-{out.name}-{os.getpid()}-{secrets.token_hex(4)}"
    with _held(old):  # set aside, it is this export's: no other may put it back meanwhile
        if out.exists():
            os.rename(out, old)
        try:
            os.replace(new, out)
        except BaseException:
            if old.exists():
                os.rename(old, out)
            raise
        fsync_path(out.parent)
        shutil.rmtree(old, ignore_errors=True)


def _lock_file(folder: Path) -> Path:
    return folder.with_name(folder.name + ".lock")


@contextlib.contextmanager
def _held(folder: Path) -> Iterator[None]:
    """An exclusive lock on `folder`'s lock file, made for the block and removed after it."""
    lock = _lock_file(folder)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def _abandoned(folder: Path) -> bool:
    """Whether no writer holds `folder`: its lock file is free, or gone with a folder old
    enough (one left by a Tidal that made none)."""
    try:
        fd = os.open(_lock_file(folder), os.O_RDWR)
    except FileNotFoundError:
        try:
            return time.time() - folder.stat().st_mtime > _SETTLING_S
        except OSError:  # gone meanwhile
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held (or this filesystem locks nothing: leave it)
        return False
    finally:
        os.close(fd)
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths `a` and `b` in one step; False where the system or filesystem cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))
