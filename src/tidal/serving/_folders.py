"""Folders an export writes whole: staged under a temporary name, locked while written,
then put in place; what a killed export left is found by its lock, not its pid.

A process id says nothing across containers (in each, an export may be process 1), so
a staging folder is held by an exclusive `flock` on the folder itself while it is
written: the system drops the lock when the writer dies, and a later export removes
the folders nobody holds. A bundle replaced in full is swapped with its new version in
one `renameat2(RENAME_EXCHANGE)` where Linux and the filesystem allow it, so that its
path never goes missing; elsewhere by two renames, and a bundle left aside by an export
killed between them is put back by the next one.
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

__all__ = ["put_in_place", "remove_abandoned", "staging"]

_SETTLING_S = 10.0  # a folder younger than this may be a writer's that has not taken its lock yet
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


@contextlib.contextmanager
def staging(parent: Path, prefix: str) -> Iterator[Path]:
    """A new folder `parent/.tmp-{prefix}-{pid}-{nonce}`, locked while the block runs and
    removed after it unless it was renamed away (into place)."""
    folder = parent / f".tmp-{prefix}-{os.getpid()}-{secrets.token_hex(4)}"
    folder.mkdir(parents=True)
    try:
        with _held(folder):
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


def put_in_place(new: Path, out: Path) -> None:
    """Put folder `new` in the place of folder `out` (which may not exist): at once
    where the system swaps them; else by two renames, the old folder going back if the
    second fails. `new` is gone after."""
    if out.exists() and _exchange(new, out):
        fsync_path(out.parent)
        shutil.rmtree(new, ignore_errors=True)  # the old folder now
        return
    old = out.parent / f".old-{out.name}-{os.getpid()}-{secrets.token_hex(4)}"
    with _held(out):  # aside, it is this export's: no other may put it back meanwhile
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


@contextlib.contextmanager
def _held(folder: Path) -> Iterator[None]:
    """An exclusive lock on `folder`, if it exists, while the block runs."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except FileNotFoundError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _abandoned(path: Path) -> bool:
    """Whether no writer holds folder `path` (and it is old enough to have been locked)."""
    try:
        if time.time() - path.stat().st_mtime < _SETTLING_S:
            return False
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # gone meanwhile, or not ours to read
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
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
