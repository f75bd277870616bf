"""Trainer checkpoints: tables, dense weights, optimizer state, data position, RNG.

Layout under ``<run_dir>/checkpoints``::

    LATEST                    the name of the newest complete checkpoint
    step-00000120/
      tables/                 the embedding tables (tidal.embedding.checkpoint format)
      dense.safetensors       model weights, dense optimizer state tensors, torch RNG state
      trainer.json            the run's id (made by a fresh run, kept by its resumes), the
                              checkpoint a warm-started run began from (origin), step,
                              epoch, batches done in the epoch, optimizer settings, config,
                              the rows trained and the losses not yet logged (for the log of
                              a resumed run), the training files it was reading (names and
                              sizes), the size and sha256 of dense.safetensors and of the
                              tables' CHAIN.json and manifests, and the sha256 of its own
                              content (content_sha256)

A checkpoint is written under a temporary name (``.tmp-<name>-<pid>``) and renamed
into place before LATEST is replaced (write, fsync, rename), so a crash at any point
leaves the previous one whole; a save that fails (a full disk) removes its temporary
folder. No pickle: tensors go to safetensors, everything else to JSON. Loading refuses
an altered or truncated trainer.json or dense.safetensors with a message naming it,
and tables that are not the ones saved with it (their manifests' fingerprints differ)
or whose configs are not the run's; a trainer.json written before these hashes
(neither files nor content_sha256) loads unchecked, but for the tables' configs. A
resume is refused when the training files differ from the ones the checkpoint was
reading (a file added, gone or resized): its position counts batches of those files.
A warm start (`start_from`) begins a fresh run on other data from another run's
checkpoint: its model and step, not its data position.

A save removes the checkpoints it supersedes, but not one being read: an export or an
evaluation holds the checkpoint it reads (`reading`, a shared lock on its
trainer.json), and its last reader removes it once the reading is over.

A run holds ``<run_dir>/run.lock`` (`hold_run_dir`) while it trains: a second run
into the same folder is refused, rather than removing the first one's checkpoints and
truncating its metrics.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tidal.config import TableConfig, effective_fields, effective_table_fields
from tidal.data.readers import expand_paths
from tidal.embedding import EmbeddingTable, load_tables, save_tables
from tidal.embedding.checkpoint import (CHAIN, MANIFEST, SEAL, as_umask_allows, check_file, check_seal, fingerprint,
                                        fsync_path, is_fingerprint, sealed, values_only_config, write_json_atomic)
from tidal.errors import CheckpointError, ConfigError, CorruptCheckpointError
from tidal.processes import deferring_interrupts, process_running

if TYPE_CHECKING:
    from tidal.runtime.trainer import Trainer

__all__ = ["check_start", "find", "hold_run_dir", "holds_checkpoints", "latest", "latest_name",
           "lineage", "load_checked_tables", "load_dense", "read_meta", "reading", "refuse_bundle", "restore",
           "restore_latest", "save", "start_from"]

LATEST = "LATEST"
DENSE = "dense.safetensors"
TABLES = "tables"
LOCK = "run.lock"
_META_KEYS = ("position", "config", "param_groups", "bad_rows")
_TABLE_FILE = re.compile(rf"{TABLES}/({re.escape(CHAIN)}|\d{{6}}-(full|delta)/{re.escape(MANIFEST)})")  # fingerprinted
_STAGING = re.compile(r"\.tmp-step-\d+-epoch-\d+-(\d+)")  # a save's temporary folder, ending with its pid
_MAY_CHANGE = ("training", "runtime", "passmode", "serving")  # config sections a resume may change
# what data a resume may change: what is evaluated and how, how bad rows are met
_DATA_MAY_CHANGE = ("eval", "eval_group_by", "on_bad_row", "max_bad_fraction")
_UNCHECKED_TABLE_FIELDS = {"reserve_rows"}  # memory set aside when a table is built: no part of its state
_WARM_START_KEEPS = ("a warm start keeps the features, tables and model; only the data, training, runtime, passmode "
                     "and serving sections may change")
_ANCESTORS_KEPT = 100  # the warm starts back that a run's origin records (a rollback is refused across them)
_HOLD_TRIES = 20  # a reader's tries at holding a run's latest checkpoint while saves replace it


@contextmanager
def hold_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir` for one run: an exclusive lock on its run.lock (which records the
    holder's pid) until the block ends; the system drops it if the process dies. A
    second run into the folder is refused at once: it would remove the first one's
    checkpoint staging and truncate its metrics."""
    path = run_dir / LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:  # a folder the run may not write to
        raise ConfigError(f"training.run_dir {run_dir}: cannot write there ({exc.strerror or exc}: {path}); give the "
                          f"run a folder it may write to") from None
    try:
        _lock_or_refuse(fd, run_dir)
        _record_holder(fd, f"{os.getpid()}\n")
        try:
            yield
        finally:
            _record_holder(fd, "")  # no pid of a run that has ended
    finally:
        os.close(fd)  # which releases the lock


def check_not_held(run_dir: Path) -> None:
    """Refuse `run_dir` while a run holds it (`hold_run_dir`), as a second run into it is."""
    try:
        fd = os.open(run_dir / LOCK, os.O_RDONLY)
    except OSError:  # no run has held it, or it cannot be read: nothing to say
        return
    try:
        _lock_or_refuse(fd, run_dir, fcntl.LOCK_SH)  # shared: a run's exclusive lock refuses it all the same
    except OSError:  # a file system that cannot tell: nothing to say
        pass
    finally:
        os.close(fd)  # which releases the lock


def _lock_or_refuse(fd: int, run_dir: Path, kind: int = fcntl.LOCK_EX) -> None:
    """Lock (`kind`) the run.lock open as `fd`, or refuse the run_dir naming the run that holds it."""
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        pid = f" (pid {holder})" if holder.isdigit() else ""
        raise ConfigError(f"training.run_dir {run_dir}: another run{pid} is using it ({run_dir / LOCK} is locked); "
                          f"wait for it to end, or choose another run_dir") from None


def _record_holder(fd: int, pid: str) -> None:
    """Write `pid` into the run's lock file, for the message of a run refused; only
    informative, so a full disk does not stop the run here."""
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, pid.encode(), 0)
    except OSError:
        pass


def save(trainer: Trainer, position: dict[str, int]) -> Path:
    """Write a checkpoint of `trainer` at `position` (step, epoch, batches done); a save
    that fails removes what it wrote and raises."""
    root = trainer.run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{position['step']:08d}-epoch-{position['epoch']}"
    if latest_name(trainer.run_dir) == name:
        return root / name  # this very position is already saved
    if (root / name).exists() and not (root / name).is_dir():
        raise CheckpointError(f"{root / name} is a file, where the checkpoint of step {position['step']} goes; move "
                              f"it away, then --resume goes on from the last checkpoint written")
    staging = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        _write(trainer, position, staging, _same_tables(trainer, root, position["step"]))
        _remove_unread(root / name, wait=True)  # left by a save that died before LATEST named it
        # Written whole: a Ctrl-C or SIGTERM waits until LATEST names it and what it
        # supersedes is gone (else a folder LATEST does not name, and a LATEST.partial)
        with deferring_interrupts():
            os.replace(staging, root / name)
            _commit(trainer, root, name, position["step"])
    except BaseException:  # a full or read-only disk, say: leave no half-written folder behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root / name


def _commit(trainer: Trainer, root: Path, name: str, step: int) -> None:
    """Make the checkpoint `name`, in place, the run's latest, and remove those it supersedes."""
    fsync_path(root)
    keep = trainer.config.training.keep_checkpoints
    write_json_atomic(root / LATEST, {"checkpoint": name, "keep": keep})  # readers remove none of those kept
    trainer.last_saved = (step, name)
    _remove_superseded(root, name, keep)


def _same_tables(trainer: Trainer, root: Path, step: int) -> Path | None:
    """The latest checkpoint, when this trainer saved it at `step` too (the periodic
    save of a run's last step, before the one of its end): no step ran since, so the
    tables are as it holds them, and the new checkpoint links their files."""
    if trainer.last_saved is None or trainer.last_saved[0] != step:
        return None
    name = trainer.last_saved[1]
    return root / name if latest_name(trainer.run_dir) == name else None


def _write(trainer: Trainer, position: dict[str, int], staging: Path, same_tables: Path | None) -> None:
    """The files of a checkpoint, in `staging`; trainer.json last, with the fingerprints
    of the dense tensors and of the tables' chain and manifests (which tie the tables,
    shard files included, to this checkpoint). The tables are linked from the checkpoint
    `same_tables` when given and the file system links files, else written."""
    tables = _linked_tables(same_tables, staging) if same_tables is not None else None
    if tables is None:
        save_tables(staging / TABLES, trainer.collection.tables)
        tables = {str(p.relative_to(staging)): fingerprint(p, sync=True) for p in _table_files(staging / TABLES)}
    save_file(_dense_tensors(trainer), str(staging / DENSE))
    as_umask_allows(staging / DENSE)
    write_json_atomic(staging / "trainer.json", sealed({
        "run_id": trainer.run_id, "origin": trainer.origin, "position": position,
        "config": trainer.config.model_dump(mode="json"),
        "param_groups": _param_groups(trainer.optimizer),
        "bad_rows": {"count": trainer.bad_rows.count, "examples": trainer.bad_rows.examples},
        "data_files": trainer.data_files, "progress": trainer.progress.state(),
        "files": {DENSE: fingerprint(staging / DENSE, sync=True), **tables}}))
    fsync_path(staging)


def _linked_tables(source: Path, staging: Path) -> dict[str, dict] | None:
    """Hard links in `staging` to the tables files of checkpoint `source`, and their
    fingerprints as its trainer.json records them; None (and no link left) where the
    file system does not link files or `source` went meanwhile."""
    try:
        recorded = json.loads((source / "trainer.json").read_text())["files"]
        shutil.copytree(source / TABLES, staging / TABLES, copy_function=os.link)
        for folder in [staging / TABLES, *(p for p in (staging / TABLES).rglob("*") if p.is_dir())]:
            fsync_path(folder)  # the links themselves
    except OSError:
        shutil.rmtree(staging / TABLES, ignore_errors=True)
        return None
    return {path: value for path, value in recorded.items() if path != DENSE}


def data_files(paths: str | list[str]) -> list[list[Any]]:
    """[name, bytes] of each training file at `paths`, in the order a run reads them."""
    return [[name, os.path.getsize(name)] for name in expand_paths(paths)]


def _table_files(root: Path) -> list[Path]:
    """The JSON files of a tables checkpoint: its chain and its entries' manifests."""
    return [root / CHAIN, *sorted(root.glob(f"*/{MANIFEST}"))]


def _remove_superseded(root: Path, name: str, keep: int) -> None:
    """Remove the checkpoints but `name` and the `keep` - 1 newest complete ones before it
    that no one is reading (`reading`; one being read goes when its last reader is done),
    and the temporary folders of saves that died: this process's or a process's that has
    ended (one still running may be saving)."""
    kept = _kept(root, name, keep)
    for entry in root.iterdir():
        if entry.name.startswith("step-") and entry.name not in kept:
            _remove_unread(entry)
        elif _stale_staging(entry.name):
            shutil.rmtree(entry, ignore_errors=True)


def _kept(root: Path, name: str, keep: int) -> set[str]:
    """The checkpoints of folder `root` a run keeps: `name`, its latest, and the `keep` - 1
    newest complete ones of earlier steps (not one of its own step: the periodic save of
    a run's last step, which the save at its end supersedes)."""
    step = _position_of(name)[0]
    earlier = [n for n in _folders_before(root.parent, name) if _position_of(n)[0] < step]
    return {name, *(earlier[max(0, len(earlier) - (keep - 1)):] if keep > 1 else [])}


def _remove_unread(directory: Path, *, wait: bool = False, inode: int | None = None) -> None:
    """Remove checkpoint `directory` unless a reader holds it (a shared lock on its
    trainer.json), or with `wait` once its readers are done, and (given `inode`) unless
    its trainer.json is another file than that one; the exclusive lock is held while it
    is removed."""
    try:
        fd = os.open(directory / "trainer.json", os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):  # an incomplete folder: no reader can hold it
        if inode is None:  # else the one read is gone already, and a save may be putting a new one there
            shutil.rmtree(directory, ignore_errors=True)
        return
    except OSError:  # cannot tell whether a reader holds it: left for a later save
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return
    try:
        if inode is None or os.fstat(fd).st_ino == inode:
            shutil.rmtree(directory, ignore_errors=True)
    finally:
        os.close(fd)


@contextmanager
def reading(path: Path) -> Iterator[Path]:
    """The checkpoint at `path` (a checkpoint directory, or a run directory's latest),
    held while the block reads it: a run training meanwhile does not remove it when a
    newer checkpoint supersedes it. The last reader of a superseded checkpoint removes
    it as its block ends (or a later save does). When a run's latest was removed
    before it could be held, the new latest is taken."""
    given = (path / "trainer.json").is_file()  # a checkpoint directory itself, not a run's latest
    for _ in range(_HOLD_TRIES):
        directory = find(path)
        try:
            fd = os.open(directory / "trainer.json", os.O_RDONLY)
        except FileNotFoundError:
            _check_not_gone(path, given)
            continue  # superseded and removed since LATEST was read
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits while a run removes it
            if _same_file(fd, directory / "trainer.json"):
                held = os.fstat(fd).st_ino
                try:
                    yield directory
                except CorruptCheckpointError as exc:
                    if not str(exc).startswith(f"{directory}{os.sep}"):  # another file's (a bundle's, say)
                        raise
                    raise CorruptCheckpointError(f"{exc}{_kept_before(directory)}") from None
                finally:
                    os.close(fd)
                    fd = -1
                    _remove_if_superseded(directory, held)
                return
        finally:
            if fd >= 0:
                os.close(fd)
        _check_not_gone(path, given)
    raise CheckpointError(f"{path}: its latest checkpoint was superseded and removed {_HOLD_TRIES} times while it "
                          f"was being opened; try again")


def _kept_before(directory: Path) -> str:
    """Which checkpoint to read instead of the damaged one in `directory`: the newest its
    run kept before it, if any."""
    earlier = _folders_before(directory.parent.parent, directory.name) if directory.parent.name == "checkpoints" else []
    return f"; the run kept an earlier checkpoint: name it instead, {directory.parent / earlier[-1]}" if earlier else ""


def _check_not_gone(path: Path, given: bool) -> None:
    """Refuse a checkpoint directory named by the caller that a save removed meanwhile."""
    if given:
        raise CheckpointError(f"{path}: a newer checkpoint of its run superseded it and the run removed it while it "
                              f"was being opened; name the run directory to read its latest checkpoint")


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` is still the file open as `fd` (not removed, nor made again)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _remove_if_superseded(directory: Path, held: int) -> None:
    """Remove a run's checkpoint that newer ones superseded (older than the latest, and
    not among those its run keeps: LATEST names the latest and how many it keeps),
    unless a reader holds it or it is no longer the one read (its trainer.json not the
    inode `held`: a save put a new checkpoint under its name). Where LATEST does not say
    (written by hand, or by a Tidal before it did), nothing: the run's next save
    removes what it supersedes."""
    try:
        pointer = _json(directory.parent / LATEST)
    except CheckpointError:  # no run's checkpoints folder (a copy, say): not ours to remove
        return
    latest, keep = pointer.get("checkpoint"), pointer.get("keep")
    if not (isinstance(latest, str) and latest.startswith("step-") and type(keep) is int and keep >= 1):
        return
    name = directory.name
    if name.startswith("step-") and _position_of(name) < _position_of(latest) \
            and name not in _kept(directory.parent, latest, keep):
        _remove_unread(directory, inode=held)


def _stale_staging(name: str) -> bool:
    """Whether `name` is a save's temporary folder whose process is this one or has
    ended (one without a pid was left by a Tidal that named none)."""
    if not name.startswith(".tmp-"):
        return False
    found = _STAGING.fullmatch(name)
    return found is None or int(found.group(1)) == os.getpid() or not process_running(int(found.group(1)))


def latest_name(run_dir: Path) -> str | None:
    """The name LATEST gives the newest checkpoint of the run in `run_dir`; None when the
    run has none (or LATEST names none)."""
    try:
        name = _json(run_dir / "checkpoints" / LATEST).get("checkpoint")
    except CheckpointError:
        return None
    return name if isinstance(name, str) else None


def _complete_folders(run_dir: Path) -> list[str]:
    """The names of the checkpoint folders in `run_dir` that were written whole (they
    hold trainer.json), oldest first, whatever LATEST says."""
    root = run_dir / "checkpoints"
    names = [p.name for p in root.glob("step-*") if (p / "trainer.json").is_file()] if root.is_dir() else []
    return sorted(names, key=_position_of)


def _folders_before(run_dir: Path, name: str) -> list[str]:
    """The complete checkpoint folders of `run_dir` of steps before checkpoint `name`'s, oldest first."""
    return [n for n in _complete_folders(run_dir) if _position_of(n) < _position_of(name)]


def _pointing_at(name: str) -> str:
    """What LATEST holds when it names checkpoint `name`."""
    return json.dumps({"checkpoint": name})


def _position_of(name: str) -> tuple[int, ...]:
    """(step, epoch) of a checkpoint folder's name, step-SSSSSSSS-epoch-E (the step may
    outgrow its 8 digits: names do not sort as their steps do)."""
    return tuple(int(part) for part in re.findall(r"\d+", name))


def holds_checkpoints(run_dir: Path) -> bool:
    """Whether `run_dir` holds a run's checkpoints (a fresh run there would replace them)."""
    return (run_dir / "checkpoints" / LATEST).exists() or bool(_complete_folders(run_dir))


def refuse_bundle(folder: Path) -> None:
    """A clear error where `folder`, given as a run or a checkpoint, is a serving bundle."""
    if (folder / "manifest.json").is_file() and (folder / "tables").is_dir() and not (folder / "checkpoints").exists():
        raise CheckpointError(f"{folder}: a serving bundle written by tidal export, not a training run; give the run "
                              f"directory it was exported from (the bundle's manifest.json names the checkpoint, "
                              f"source_checkpoint)")


def latest(run_dir: Path) -> Path:
    """The newest complete checkpoint of a run, or a clear error if there is none."""
    pointer = run_dir / "checkpoints" / LATEST
    if not pointer.exists():
        if way := _way_on(run_dir):  # the pointer was lost, not the checkpoints
            raise CheckpointError(f"{pointer} is missing, but {way}")
        refuse_bundle(run_dir)
        raise CheckpointError(f"{run_dir}: holds no checkpoint ({pointer} is missing); train a run there first "
                              f"(one that stopped before its first checkpoint starts again by its own command, "
                              f"--init-from included)")
    try:
        name = _json(pointer).get("checkpoint")
    except CorruptCheckpointError as exc:
        raise CorruptCheckpointError(f"{exc}{_also(_way_on(run_dir))}") from None
    if not isinstance(name, str) or not name.startswith("step-"):
        raise CorruptCheckpointError(f"{pointer}: expected {{\"checkpoint\": \"step-...\"}}, got "
                                     f"{pointer.read_text()[:200]!r}{_also(_way_on(run_dir))}")
    directory = run_dir / "checkpoints" / name
    if not (directory / "trainer.json").exists():
        raise CheckpointError(f"{pointer} names {directory.name}, which is incomplete or missing"
                              f"{_also(_way_on(run_dir))}")
    return directory


def _way_on(run_dir: Path) -> str:
    """How to go on when LATEST names no complete checkpoint: from the newest folder
    that is one ("" when there is none)."""
    folders = _complete_folders(run_dir)
    if not folders:
        return ""
    return (f"the run's checkpoints folder holds {', '.join(folders)}: to go on from the newest, write LATEST again "
            f"({_pointing_at(folders[-1])}), or name that folder where a checkpoint is asked for (tidal eval and "
            f"export --checkpoint)")


def _also(clause: str) -> str:
    return f"; {clause}" if clause else ""


def find(path: Path) -> Path:
    """The checkpoint at `path`: a checkpoint directory itself, or a run directory's latest."""
    if (path / "trainer.json").is_file():
        return path
    expected = "expected a run directory (holding checkpoints/) or one checkpoint folder (holding trainer.json)"
    if not path.exists():
        raise CheckpointError(f"{path}: no such folder; {expected}")
    if not path.is_dir():
        raise CheckpointError(f"{path}: a file; {expected}")
    if path.name == "checkpoints" and (path / LATEST).is_file():
        raise CheckpointError(f"{path}: a run's checkpoints folder; name the run directory ({path.parent}) for its "
                              f"latest checkpoint, or one checkpoint folder in it")
    return latest(path)


def read_meta(directory: Path) -> dict[str, Any]:
    """A checkpoint's trainer.json: position, config, optimizer settings, bad rows and
    the fingerprint of dense.safetensors (absent in checkpoints written before it was)."""
    path = directory / "trainer.json"
    meta = _json(path)
    hashed = SEAL in meta or "files" in meta  # neither: written by a Tidal that recorded no hashes
    if hashed:
        check_seal(path, meta)
    missing = [k for k in _META_KEYS + (("files",) if hashed else ()) if k not in meta]
    if missing:
        raise CorruptCheckpointError(f"{path}: lacks {missing}")
    if hashed and not is_fingerprint(_dense_entry(meta)):
        raise CorruptCheckpointError(f"{path}: expected files.{DENSE} with bytes and sha256, "
                                     f"got {meta['files']!r:.200}")
    if hashed and not _table_files_in_shape(meta["files"]):
        raise CorruptCheckpointError(f"{path}: expected files to list {DENSE} and the tables' {CHAIN} and "
                                     f"{MANIFEST} files, each with bytes and sha256, got {meta['files']!r:.300}")
    return meta


def _table_files_in_shape(files: dict[str, Any]) -> bool:
    """Whether trainer.json's files beside the dense one are tables' JSON files (never
    a path out of the checkpoint), each with a fingerprint."""
    return all(_TABLE_FILE.fullmatch(k) and is_fingerprint(v) for k, v in files.items() if k != DENSE)


def load_dense(directory: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's dense tensors: model weights, optimizer state, RNG state; checked
    against the size and sha256 that trainer.json records for them."""
    path = directory / DENSE
    expected = _dense_entry(read_meta(directory))
    if expected is not None:
        check_file(path, expected, listed_in="trainer.json")
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path}: missing; the checkpoint is incomplete") from None
    except (SafetensorError, OSError) as exc:
        raise CorruptCheckpointError(f"{path}: truncated or damaged ({exc})") from None


def _dense_entry(meta: dict[str, Any]) -> Any:
    files = meta.get("files")
    return files.get(DENSE) if isinstance(files, dict) else None


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path}: missing; the checkpoint is incomplete") from None
    except (ValueError, OSError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{path}: not valid JSON, truncated or damaged ({str(exc)[:200]})") from None
    if not isinstance(value, dict):
        raise CorruptCheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def restore(trainer: Trainer, directory: Path, *, check_data: bool = True) -> dict[str, int]:
    """Load the checkpoint in `directory` into `trainer`; the position to continue from.
    The training section may differ from the checkpoint's: its learning rate applies.
    With `check_data` (to train on), the training files must be the checkpoint's."""
    meta = read_meta(directory)
    _check_config(directory, meta, trainer, _kept_on_resume,
                  f"resume with the config it was written with (a resume may change the {', '.join(_MAY_CHANGE)} "
                  f"sections, data.{', data.'.join(_DATA_MAY_CHANGE)} and the tables' "
                  f"{', '.join(sorted(_UNCHECKED_TABLE_FIELDS))}, nothing else)")
    if check_data and "data_files" in meta:  # not in checkpoints written before it was recorded
        _check_data_files(directory, meta["data_files"], trainer.data_files or data_files(trainer.config.data.train))
    torch.set_rng_state(_load_model(trainer, directory, meta)["rng.torch"])
    trainer.bad_rows.count, trainer.bad_rows.examples = meta["bad_rows"]["count"], list(meta["bad_rows"]["examples"])
    trainer.run_id = meta.get("run_id", trainer.run_id)  # a resume goes on with its run's id
    trainer.origin = meta.get("origin")
    progress = meta.get("progress", {"rows": 0, "losses": []})  # absent in checkpoints written before it was kept
    trainer.progress.rows_before, trainer.progress.losses = progress["rows"], list(progress["losses"])
    trainer.progress.target_losses = list(progress.get("target_losses", []))  # absent before they were kept
    return meta["position"]


def restore_latest(trainer: Trainer) -> dict[str, int]:
    """`restore` the latest checkpoint of the trainer's run; a damaged one is refused
    saying how to go on (from an earlier checkpoint, where the run kept one)."""
    directory = latest(trainer.run_dir)
    try:
        return restore(trainer, directory)
    except CorruptCheckpointError as exc:
        earlier = _folders_before(trainer.run_dir, directory.name)
        if earlier:
            way = (f"the run kept an earlier checkpoint, {earlier[-1]}: to resume from it (the steps since are "
                   f"trained again), write LATEST naming it ({_pointing_at(earlier[-1])})")
        else:
            way = ("the run kept no earlier checkpoint (training.keep_checkpoints keeps as many as it says): restore "
                   "the file, or train again")
        raise CorruptCheckpointError(f"{exc}; {way}") from None


def start_from(trainer: Trainer, directory: Path) -> dict[str, int]:
    """Load the model of the checkpoint in `directory`, another run's, into `trainer`, a
    fresh run on data of its own (a warm start): the tables and the dense weights with
    their optimizer state, at the checkpoint's step, so that rows' ages and schedules go
    on from it. The data position, bad rows, logged progress, RNG and run id are the new
    run's, and the config may differ from the checkpoint's in its data and in what a
    resume may change. The position to train from; it says where it starts, and what
    the checkpoint's run left untrained when it was written before that run's end."""
    meta = read_meta(directory)
    _check_config(directory, meta, trainer, _kept_on_warm_start, _WARM_START_KEEPS)
    _load_model(trainer, directory, meta)
    trainer.origin = {"checkpoint": str(directory.resolve()), "run_id": meta.get("run_id"),
                      "step": meta["position"]["step"], "sha256": meta.get(SEAL),
                      "ancestors": lineage(meta.get("origin"))}
    unfinished = _unfinished(meta)
    print(f"  warm start from {directory} at its step {meta['position']['step']:,d}"
          + (f", {unfinished}" if unfinished else ""), flush=True)
    return {"step": meta["position"]["step"], "epoch": 0, "batch": 0}


def lineage(origin: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The checkpoints a run warm-started from `origin` (a trainer.json's or a manifest's)
    descends from: `origin` and those its run descends from, nearest first, the
    `_ANCESTORS_KEPT` nearest; each its checkpoint, run id and step."""
    if origin is None:
        return []
    own = {k: origin[k] for k in ("checkpoint", "run_id", "step")}
    return [own, *origin.get("ancestors", [])][:_ANCESTORS_KEPT]


def _unfinished(meta: dict[str, Any]) -> str | None:
    """What a checkpoint written part way through its run left untrained, in words; None
    for the one written at the run's end."""
    position, epochs = meta["position"], meta["config"]["training"]["epochs"]
    if position["epoch"] >= epochs:
        return None
    return (f"which its run wrote part way through (step {position['step']:,d}: {position['epoch']} of {epochs} "
            f"epochs done and {position['batch']:,d} batches into the next): the rest of that run's data is not trained")


def check_start(trainer: Trainer, directory: Path) -> None:
    """Refuse a warm start of `trainer` from the checkpoint in `directory` whose model
    is not the trainer's (`start_from` checks it again as it loads)."""
    _check_config(directory, read_meta(directory), trainer, _kept_on_warm_start, _WARM_START_KEEPS)


def _check_config(directory: Path, meta: dict[str, Any], trainer: Trainer,
                  kept: Callable[[dict[str, Any], dict[str, str]], dict[str, Any]], advice: str) -> None:
    """Refuse a checkpoint whose config differs from the trainer's in what `kept` keeps."""
    unused = trainer.config.model.unused_fields()
    changed = _changes(kept(meta["config"], unused), kept(trainer.config.model_dump(mode="json"), unused))
    if changed:
        shown = "; ".join(f"{path}: {old!r} there, {new!r} now" for path, old, new in changed[:5])
        more = f"; and {len(changed) - 5} more" if len(changed) > 5 else ""
        raise CheckpointError(f"{directory}: the config changed since this checkpoint ({shown}{more}); {advice}")


def _load_model(trainer: Trainer, directory: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The checkpoint's tables, dense weights and dense optimizer state into `trainer`
    (the learning rate is the trainer's config's); its dense tensors."""
    trainer.collection.tables = load_checked_tables(directory, meta, trainer.config.tables,
                                                     trainer.config.training.threads)
    tensors = load_dense(directory)
    trainer.model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    saved, chosen = _dense_optimizer_kind(meta["config"]), trainer.config.training.optimizer.kind
    if saved == chosen:  # its settings, the learning rate among them, are the config's
        trainer.optimizer.load_state_dict({"state": _optimizer_state(tensors),
                                           "param_groups": trainer.optimizer.state_dict()["param_groups"]})
    else:
        print(f"  the dense optimizer is {chosen}, {saved} in {directory}: {chosen}'s state starts afresh", flush=True)
    return tensors


def _dense_optimizer_kind(config: dict[str, Any]) -> str:
    """The dense optimizer of a saved config (Adam before there was a choice)."""
    return config["training"].get("optimizer", {}).get("kind", "adam")


def _kept_on_resume(config: dict[str, Any], unused: dict[str, str]) -> dict[str, Any]:
    """The part of a config a resume must keep: its sections but training, runtime,
    passmode and serving, without the data fields that say how bad rows are met, nor
    the rows a table reserves ahead, nor the fields without effect, the model's its kind does not read among them (saved
    set, before such fields were refused, they may go)."""
    kept = {k: v for k, v in effective_fields(config).items() if k not in _MAY_CHANGE}
    kept["data"] = {f: v for f, v in kept.get("data", {}).items() if f not in _DATA_MAY_CHANGE}
    kept["model"] = {f: v for f, v in kept.get("model", {}).items() if f not in unused}
    kept["tables"] = [{f: v for f, v in t.items() if f not in _UNCHECKED_TABLE_FIELDS} for t in kept.get("tables", [])]
    return kept


def _kept_on_warm_start(config: dict[str, Any], unused: dict[str, str]) -> dict[str, Any]:
    """The part of a config a warm start must keep: a resume's, but for the data."""
    return {k: v for k, v in _kept_on_resume(config, unused).items() if k != "data"}


def _changes(saved: Any, current: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """(key path, saved value, current value) of every leaf where two configs differ."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [change for key in sorted(saved.keys() | current.keys(), key=str)
                for change in _changes(saved.get(key), current.get(key), f"{path}.{key}" if path else str(key))]
    if isinstance(saved, list) and isinstance(current, list):
        if _names(saved) and _names(current) and _names(saved) != _names(current):
            return _named_changes(saved, current, path)
        if len(saved) == len(current):
            return [change for i, (a, b) in enumerate(zip(saved, current)) for change in _changes(a, b, f"{path}[{i}]")]
    return [] if saved == current else [(path, saved, current)]


def _names(items: list[Any]) -> list[str] | None:
    """The names of a list of named entries (features, tables), in order; None for another list."""
    if items and all(isinstance(i, dict) and isinstance(i.get("name"), str) for i in items):
        return [i["name"] for i in items]
    return None


def _named_changes(saved: list[dict], current: list[dict], path: str) -> list[tuple[str, Any, Any]]:
    """`_changes` of two lists of named entries, entry by name: those added, removed or
    changed, and their order where the ones in both come in another."""
    before, now = {i["name"]: i for i in saved}, {i["name"]: i for i in current}
    changes = [change for name in [*before, *(n for n in now if n not in before)]
               for change in _changes(before.get(name), now.get(name), f"{path}[{name!r}]")]
    kept_before, kept_now = [n for n in before if n in now], [n for n in now if n in before]
    if kept_before != kept_now:
        changes.append((f"{path} (order)", kept_before, kept_now))
    return changes


def _check_data_files(directory: Path, saved: list[list[Any]], current: list[list[Any]]) -> None:
    """Refuse a resume whose training files are not the checkpoint's: its position is a
    count of batches of those files, in their order."""
    if saved == current:
        return
    before, now = dict(map(tuple, saved)), dict(map(tuple, current))
    differences = ([f"{name} is new" for name in now if name not in before]
                   + [f"{name} is gone" for name in before if name not in now]
                   + [f"{name} was {before[name]:,d} bytes, now {now[name]:,d}"
                      for name in now if name in before and before[name] != now[name]])
    if not differences:
        differences = ["the files are read in another order"]
    shown = "; ".join(differences[:5]) + (f"; and {len(differences) - 5} more" if len(differences) > 5 else "")
    raise CheckpointError(f"{directory}: data.train no longer names the files this checkpoint was reading ({shown}); "
                          f"its position counts batches of those files, so resume with them as they were, or start "
                          f"a fresh run")


def load_checked_tables(directory: Path, meta: dict[str, Any], configs: Sequence[TableConfig],
                        threads: int = 1, values_only: bool = False) -> list[EmbeddingTable]:
    """The checkpoint's tables, in the order of `configs` (the run's), once they are the
    ones saved with it (trainer.json's fingerprints of their chain and manifests, where
    it has them) and each table's config is the run's. `values_only`: without their
    optimizer state (see `tidal.embedding.load_tables`), for exports."""
    _check_table_files(directory, meta)
    tables = load_tables(directory / TABLES, threads=threads, values_only=values_only)
    if values_only:
        configs = [values_only_config(c) for c in configs]
    missing = sorted({c.name for c in configs} - set(tables))
    if missing:
        raise CheckpointError(f"{directory / TABLES}: holds tables {sorted(tables)}; the run config's {missing} "
                              f"are not among them, so these tables belong to another run")
    for config in configs:
        _check_table_config(directory, tables[config.name].config, config)
    return [tables[c.name] for c in configs]


def _check_table_files(directory: Path, meta: dict[str, Any]) -> None:
    """Refuse tables whose chain or manifests are not the ones trainer.json recorded:
    a tables folder of another save would otherwise load as if it were this one's."""
    listed = {k: v for k, v in meta.get("files", {}).items() if k != DENSE}  # the chain pins its entries
    for relative, expected in listed.items():  # none in a trainer.json written before tables were fingerprinted
        path = directory / relative
        if not path.is_file():
            raise CorruptCheckpointError(f"{path}: missing; the checkpoint is incomplete")
        found = fingerprint(path)
        if found != expected:
            raise CorruptCheckpointError(
                f"{path}: not the file saved with this checkpoint ({found['bytes']} bytes, sha256 "
                f"{found['sha256'][:12]}...; trainer.json records {expected['bytes']} bytes, "
                f"{expected['sha256'][:12]}...): these tables belong to another save, or were altered")


def _check_table_config(directory: Path, saved: TableConfig, config: TableConfig) -> None:
    """Refuse a table whose saved config differs from the run's in what shapes its
    state or its training (dim, optimizer, admission, eviction, shards, ...)."""
    found, expected = (effective_table_fields(c.model_dump(mode="json")) for c in (saved, config))
    changed = sorted(k for k in expected if k not in _UNCHECKED_TABLE_FIELDS and found.get(k) != expected[k])
    if changed:
        shown = "; ".join(f"{k}: {found.get(k)!r} there, {expected[k]!r} in the run config" for k in changed)
        raise CheckpointError(f"{directory / TABLES}: table {config.name!r} was saved with another config ({shown}); "
                              f"these tables belong to another run")


def _dense_tensors(trainer: Trainer) -> dict[str, torch.Tensor]:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in trainer.model.state_dict().items()}
    for index, state in trainer.optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if value is not None:  # SGD's momentum buffer without momentum
                tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    return tensors


def _optimizer_state(tensors: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    return state


def _param_groups(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    groups = optimizer.state_dict()["param_groups"]
    return [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in groups]
