"""Atomic full and delta checkpoints of embedding tables (safetensors + JSON, no pickle).

Layout of a checkpoint root::

    root/
      CHAIN.json                    which checkpoints to apply, in order
      000001-full/
        manifest.json               tables: config, clocks, files with size and sha256;
                                    the sha256 of its own content (content_sha256)
        <table>/shard-00.safetensors    keys, values, state, last_seen, counts, ...
      000002-delta/
        manifest.json
        <table>/shard-00.safetensors    rows touched from 000001's step on + keys removed since

A save writes its directory under a temporary name, fsyncs every file, renames the
directory into place, and only then replaces CHAIN.json (write, fsync, rename). A save
killed at any point leaves the previous CHAIN.json, and so the previous checkpoint,
loadable. Loading checks each manifest against its own sha256 and every file's size
and sha256 before reading it, and refuses a truncated, altered or missing file with a
message naming it (version 1 manifests, written before they carried their sha256, are
read unchecked). CHAIN.json is checked for what a save writes: its format and version,
one full checkpoint, then deltas numbered on from it with no repeat or gap, each of
them written for that full checkpoint (its id); so a damaged chain is refused rather
than loaded as an older state. A chain cut back to one of its earlier entries is not
damaged in this sense: it is what a save killed before its commit leaves, and it loads
as that earlier checkpoint (the next save removes the folders after it).

One writer per root: a table remembers the chain entry it last wrote or was loaded
from, and a delta is refused when the chain ends elsewhere (another writer saved to
the root since): its rows would mix with that writer's into a state neither had. Saves
to one root take turns (each locks the folder from reading CHAIN.json to writing it).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from tidal.config import Sgd, TableConfig
from tidal.embedding import index as ix
from tidal.embedding.pooling import nonfinite_note
from tidal.embedding.table import EmbeddingTable
from tidal.errors import CheckpointError, ConfigError, CorruptCheckpointError

__all__ = ["as_umask_allows", "fsync_path", "load", "read_json_object", "save", "save_delta", "write_json_atomic",
           "write_text_atomic"]

_UMASK = os.umask(0o022)  # read once, as a module loads: os.umask can only be read by setting it
os.umask(_UMASK)
FORMAT = "tidal-embedding-checkpoint"
VERSION = 2  # 2: a manifest carries the sha256 of its own content
UNSEALED = 1  # the older version still read, whose manifests carry none
SEAL = "content_sha256"  # the key of a JSON file's sha256 of its own content
CHAIN = "CHAIN.json"
MANIFEST = "manifest.json"
_OURS = re.compile(r"\d{6}-(full|delta)|\.tmp-\d{6}-(full|delta)-\d+")  # directories a save writes
_SAVED = re.compile(r"\d{6}-(full|delta)")  # those of a finished save


def save(root: str | os.PathLike, tables: Sequence[EmbeddingTable]) -> Path:
    """A full checkpoint of `tables` under `root`; earlier checkpoints are then removed.

    It holds the tables still while it writes (`EmbeddingTable.saving`): the lookups,
    updates and removals under way end first, and those that come meanwhile wait. Call
    it between training steps, so that it holds the rows of whole steps.
    """
    root = _checked(root, tables)
    with _one_save_at_a_time(root):
        return _save(root, tables, delta=False)


def save_delta(root: str | os.PathLike, tables: Sequence[EmbeddingTable]) -> Path:
    """A delta checkpoint: for each table, rows touched and keys removed since its last
    save. The chain under `root` must start with a full checkpoint of the same tables.

    It holds the tables still while it writes, as `save` does.
    """
    root = _checked(root, tables)
    with _one_save_at_a_time(root):
        _check_extends_chain(root, tables)
        return _save(root, tables, delta=True)


def _check_extends_chain(root: Path, tables: Sequence[EmbeddingTable]) -> None:
    """Refuse a delta of `tables` that the chain under `root` cannot take: one of other
    tables, of tables last saved elsewhere, or after another writer's entries."""
    chain = _chain(root) if (root / CHAIN).exists() else []
    full = _read_manifest(root / chain[0]) if chain else {"tables": {}}
    names = set(full["tables"])
    if names != {t.name for t in tables}:
        raise CheckpointError(
            f"{root}: a delta needs a full checkpoint of the same tables first; the chain holds "
            f"{sorted(names) or 'nothing'}, the delta {sorted(t.name for t in tables)}"
        )
    never = [t.name for t in tables if t.checkpoint_id is None]
    if never:
        raise CheckpointError(f"{root}: tables {never} were never saved nor loaded (with their optimizer state), "
                              f"so a delta here would miss rows; save a full checkpoint here first (or load this one)")
    strangers = [t.name for t in tables if _full_id(t.checkpoint_id) != full.get("id")]
    if strangers:
        raise CheckpointError(
            f"{root}: tables {strangers} were last saved to another checkpoint, so a delta here "
            f"would miss rows; save a full checkpoint here first"
        )
    _check_one_writer(root, tables, _head(full["id"], chain[-1]))


@contextmanager
def _one_save_at_a_time(root: Path) -> Iterator[None]:
    """Lock the folder `root` while a save reads CHAIN.json, writes and commits: a
    second writer's save waits, then finds the first one's entry (and its delta is
    refused) instead of both numbering theirs the same."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # which releases the lock


def load(root: str | os.PathLike, *, threads: int = 1, values_only: bool = False) -> dict[str, EmbeddingTable]:
    """The tables of the checkpoint under `root`: the full one, then each delta in order.

    With `values_only` the tables hold no optimizer state (their config is
    `values_only_config`'s): the state in the files is checked for its shape but never
    read, so a table takes the memory of its values alone. For reading and serving:
    `save` and `save_delta` refuse such a table (saved, it would train on as plain SGD)."""
    root = Path(root)
    tables: dict[str, EmbeddingTable] = {}
    chain = _chain(root)
    full_id = None
    for name in chain:
        manifest = _read_manifest(root / name)
        full_id = _check_in_chain(root, name, manifest, full_id)
        for table_name, entry in manifest["tables"].items():
            if manifest["kind"] == "full":
                config = _config(root / name, entry)
                tables[table_name] = EmbeddingTable(values_only_config(config) if values_only else config,
                                                    threads=threads)
            elif table_name not in tables:
                raise CorruptCheckpointError(f"{root / name / MANIFEST}: table {table_name!r} is not in the full checkpoint")
            _restore(root / name, tables[table_name], entry)
    for table in tables.values():
        table.checkpoint_id = None if values_only else _head(full_id, chain[-1])
        table.values_only = values_only
    return tables


def values_only_config(config: TableConfig) -> TableConfig:
    """`config` with an optimizer that keeps no state (plain SGD), for tables read only;
    its row cap as it was (a `memory_bytes` cap paid for the state too)."""
    return config.model_copy(update={"optimizer": Sgd(), "max_rows": config.row_cap, "memory_bytes": None})


def _head(full_id: str, entry: str) -> str:
    """What a table records as the checkpoint a delta of it extends: the id of the
    chain's full checkpoint and the chain entry it last wrote or was loaded from."""
    return f"{full_id}/{entry}"


def _full_id(head: str | None) -> str | None:
    """The full checkpoint's id in a table's `_head` (None: never saved or loaded)."""
    return None if head is None else head.split("/")[0]


def _check_one_writer(root: Path, tables: Sequence[EmbeddingTable], head: str) -> None:
    """Refuse a delta of tables whose last save or load is not the chain's last entry:
    another writer (a second copy loaded from this root) saved here since, and a delta
    on top of its entries would load as a state neither writer had."""
    behind = {t.name: str(t.checkpoint_id).split("/")[-1] for t in tables if t.checkpoint_id != head}
    if behind:
        raise CheckpointError(
            f"{root / CHAIN}: ends with {head.split('/')[-1]}, but tables {sorted(behind)} were last saved to or "
            f"loaded from {sorted(set(behind.values()))}: another writer saved to this root since, and a delta "
            f"would mix its changes with theirs; save a full checkpoint instead (to this root or another)"
        )


# ---------------------------------------------------------------------- writing


def _checked(root: str | os.PathLike, tables: Sequence[EmbeddingTable]) -> Path:
    """`root` as a Path, once it can hold checkpoints of `tables`, a list of tables."""
    if isinstance(root, (list, tuple, EmbeddingTable)):
        raise CheckpointError(f"a save takes the folder first, then the tables (save_tables(root, tables)); got a "
                              f"{type(root).__name__} where the folder goes")
    if not isinstance(tables, (list, tuple)) or not all(isinstance(t, EmbeddingTable) for t in tables):
        got = type(tables).__name__ if not isinstance(tables, (list, tuple)) else \
            f"a list holding {sorted({type(t).__name__ for t in tables})}"
        raise CheckpointError(f"{root}: expected a list of EmbeddingTables to save, got {got}")
    if not tables:
        raise CheckpointError(f"{root}: no tables to save; expected a list of at least one EmbeddingTable")
    names = [t.name for t in tables]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise CheckpointError(f"{root}: a checkpoint holds each table once, by name; got {repeated} more than once")
    if read_only := [t.name for t in tables if t.values_only]:
        raise CheckpointError(f"{root}: tables {read_only} were loaded with values_only=True, without their optimizer "
                              f"state: saved, they would train on as plain SGD; load them without values_only to "
                              f"train and save")
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise CheckpointError(f"{root} is a file; expected a folder to hold the checkpoints")
    return root


def _save(root: Path, tables: Sequence[EmbeddingTable], *, delta: bool) -> Path:
    """Write and commit the checkpoint, each table held still meanwhile (`saving`): a
    lookup, update or removal that came half way would leave the checkpoint with no
    state the table ever had, and the next delta without what it changed."""
    with ExitStack() as held:
        for table in sorted(tables, key=id):  # one order, as every holder of several tables
            held.enter_context(table.saving())
        saved = _write_and_commit(root, tables, delta)
    _remove_unreferenced(root)
    return saved


def _write_and_commit(root: Path, tables: Sequence[EmbeddingTable], delta: bool) -> Path:
    chain = _chain(root) if (root / CHAIN).exists() else []
    number = int(chain[-1].split("-")[0]) + 1 if chain else 1
    name = f"{number:06d}-{'delta' if delta else 'full'}"
    checkpoint_id = _read_manifest(root / chain[0])["id"] if delta else uuid.uuid4().hex
    staging = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        manifest = {"format": FORMAT, "version": VERSION, "kind": "delta" if delta else "full", "id": checkpoint_id,
                    "tables": {t.name: _write_table(staging, t, delta) for t in tables}}
        write_json_atomic(staging / MANIFEST, sealed(manifest))
        fsync_path(staging)
    except BaseException:  # a full disk, say: leave no half-written folder behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(root / name, ignore_errors=True)  # left by a save killed before its commit
    os.replace(staging, root / name)
    fsync_path(root)
    write_json_atomic(root / CHAIN, {"format": FORMAT, "version": VERSION, "chain": (chain + [name]) if delta else [name]})
    fsync_path(root)
    for table in tables:
        table.mark_saved(manifest["tables"][table.name]["clocks"], _head(checkpoint_id, name))
    return root / name


def _write_table(directory: Path, table: EmbeddingTable, delta: bool) -> dict[str, Any]:
    (directory / table.name).mkdir()
    clocks = table.clocks_after_save()  # before the rows, as a save at a safe point sees them
    files = {}
    for s in range(table.num_shards):
        relative = f"{table.name}/shard-{s:02d}.safetensors"
        arrays = table.snapshot_shard(s, since_save=delta)
        _refuse_nonfinite(table.name, arrays)
        save_file(arrays, str(directory / relative))
        as_umask_allows(directory / relative)
        files[relative] = fingerprint(directory / relative, sync=True)
    fsync_path(directory / table.name)
    return {"config": table.config.model_dump(mode="json"), "clocks": clocks, "files": files}


def _refuse_nonfinite(table: str, arrays: dict[str, np.ndarray]) -> None:
    """A `CheckpointError` for a shard's rows holding a NaN or an infinity: a load would
    refuse them (no save is written that cannot be read back)."""
    for name in ("values", "state"):
        if note := nonfinite_note(arrays[name], arrays["keys"]):
            raise CheckpointError(f"table {table!r}: {name} holds {note}: an update overflowed float32 (a learning "
                                  f"rate or a gradient too large); nothing was saved")


def write_json_atomic(path: Path, content: dict[str, Any]) -> None:
    """Write JSON to `path` so that a crash leaves the old file or the new one."""
    write_text_atomic(path, json.dumps(content, indent=1))


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` so that a crash leaves the old file or the new one: write, fsync, rename."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def as_umask_allows(path: Path | str) -> None:
    """Give the file at `path` the permissions a file made by open() gets (0666 less the
    umask): safetensors writes its files readable by their owner alone, so a server run
    as another user could not read a bundle's tables."""
    os.chmod(path, 0o666 & ~_UMASK)


def fsync_path(path: Path) -> None:
    """Flush a file or a directory entry to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_unreferenced(root: Path) -> None:
    """Delete checkpoints no longer in the chain and staging left by killed saves."""
    keep = set(_chain(root))
    for entry in root.iterdir():
        if entry.name.endswith(".partial"):
            entry.unlink(missing_ok=True)
        elif entry.is_dir() and entry.name not in keep and _OURS.fullmatch(entry.name):
            shutil.rmtree(entry, ignore_errors=True)


def fingerprint(path: Path, *, sync: bool = False) -> dict[str, Any]:
    """The size and sha256 of a file (with `sync`, flushed to disk on the way)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
        if sync:
            os.fsync(f.fileno())
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def is_fingerprint(value: Any) -> bool:
    """Whether `value` is a file entry as `fingerprint` writes it."""
    return isinstance(value, dict) and isinstance(value.get("bytes"), int) and isinstance(value.get("sha256"), str)


def listed_file(folder: Path, relative: Any, listed_in: Path) -> Path:
    """`folder / relative`, a file that the manifest `listed_in` names: refused unless
    it is a relative path that stays inside `folder` (symbolic links followed)."""
    if not isinstance(relative, str) or Path(relative).is_absolute() or ".." in Path(relative).parts \
            or not (folder / relative).resolve().is_relative_to(folder.resolve()):
        raise CorruptCheckpointError(f"{listed_in}: lists {relative!r}, which is not a file inside {folder}")
    return folder / relative


def check_file(path: Path, expected: dict[str, Any], listed_in: str) -> None:
    """Refuse a missing file, one that is not a regular file, or one whose size or
    sha256 is not the `expected` fingerprint that `listed_in` records for it."""
    if not path.exists():
        raise CorruptCheckpointError(f"{path}: missing; the checkpoint is incomplete")
    if not path.is_file():
        raise CorruptCheckpointError(f"{path}: not a regular file")
    found = fingerprint(path)
    if found["bytes"] != expected["bytes"]:
        raise CorruptCheckpointError(f"{path}: expected {expected['bytes']} bytes, found {found['bytes']} "
                                     f"(truncated or overwritten)")
    if found["sha256"] != expected["sha256"]:
        raise CorruptCheckpointError(f"{path}: content does not match its sha256 in {listed_in} (altered or corrupted)")


def sealed(content: dict[str, Any]) -> dict[str, Any]:
    """`content` as JSON reads it back, plus the sha256 of that content under `SEAL`
    (any earlier one replaced): an edited or damaged file is then refused even where it
    is still valid JSON."""
    body = json.loads(json.dumps({k: v for k, v in content.items() if k != SEAL}))
    return {**body, SEAL: _content_sha256(body)}


def check_seal(path: Path, content: dict[str, Any]) -> None:
    """Refuse the JSON `content` read from `path` unless it carries its own sha256."""
    if SEAL not in content:
        raise CorruptCheckpointError(f"{path}: lacks {SEAL}, the sha256 of its content; damaged or edited")
    found = _content_sha256({k: v for k, v in content.items() if k != SEAL})
    if found != content[SEAL]:
        raise CorruptCheckpointError(f"{path}: altered or damaged: its content's sha256 is {found[:12]}..., "
                                     f"its {SEAL} says {str(content[SEAL])[:12]}...")


def _content_sha256(content: dict[str, Any]) -> str:
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


# ---------------------------------------------------------------------- reading


def _chain(root: Path) -> list[str]:
    """The checkpoint folders CHAIN.json lists, in order, once the list is one a save
    writes: a full checkpoint, then deltas numbered on from it, each number once."""
    path = root / CHAIN
    if not path.exists():
        raise CheckpointError(f"{root}: no checkpoint here ({CHAIN} is missing)")
    content = read_json_object(path)
    if content.get("format") != FORMAT or content.get("version") not in (UNSEALED, VERSION):
        raise CorruptCheckpointError(f"{path}: expected format {FORMAT!r} version {UNSEALED} or {VERSION}, "
                                     f"got {content.get('format')!r} version {content.get('version')!r}")
    chain = content.get("chain")
    if not isinstance(chain, list) or not chain or not str(chain[0]).endswith("-full"):
        raise CorruptCheckpointError(f"{path}: expected a chain starting with a full checkpoint, got {chain!r}")
    foreign = [name for name in chain if not (isinstance(name, str) and _SAVED.fullmatch(name))]
    if foreign:  # only folders a save wrote beside it: never a path out of the root
        raise CorruptCheckpointError(f"{path}: names {foreign}, which are not checkpoint folders (NNNNNN-full or -delta)")
    _check_numbering(path, chain)
    return chain


def _check_numbering(path: Path, chain: list[str]) -> None:
    """Refuse a chain that is not one full checkpoint, then deltas numbered on from it
    by one: a repeat or gap means CHAIN.json was damaged, and would load another state."""
    first = int(chain[0].split("-")[0])
    expected = [chain[0]] + [f"{first + k:06d}-delta" for k in range(1, len(chain))]
    if chain != expected:
        wrong, want = next((name, want) for name, want in zip(chain, expected) if name != want)
        raise CorruptCheckpointError(f"{path}: lists {wrong} where {want} should come: a chain "
                                     f"is one full checkpoint, then deltas numbered on from it by one, each once; "
                                     f"got {chain}")


def _check_in_chain(root: Path, name: str, manifest: dict[str, Any], full_id: str | None) -> str:
    """The chain's full checkpoint id (`full_id`, None at its first entry), once the
    manifest of entry `name` is of its folder's kind and, for a delta, of that full
    checkpoint: a delta of another chain would apply its rows to the wrong state."""
    kind = name.split("-")[1]
    if manifest["kind"] != kind:
        raise CorruptCheckpointError(f"{root / CHAIN}: lists {name}, whose {MANIFEST} is of a {manifest['kind']} "
                                     f"checkpoint, not a {kind} one")
    if full_id is not None and manifest["id"] != full_id:
        raise CorruptCheckpointError(f"{root / CHAIN}: lists {name}, a delta of another full checkpoint (id "
                                     f"{str(manifest['id'])[:12]}..., the chain's is {full_id[:12]}...); "
                                     f"the chain mixes two checkpoints")
    return manifest["id"] if full_id is None else full_id


def _read_manifest(directory: Path) -> dict[str, Any]:
    manifest = read_json_object(directory / MANIFEST)
    if manifest.get("format") != FORMAT or manifest.get("version") not in (UNSEALED, VERSION):
        raise CorruptCheckpointError(
            f"{directory / MANIFEST}: expected format {FORMAT!r} version {UNSEALED} or {VERSION}, "
            f"got {manifest.get('format')!r} version {manifest.get('version')!r}"
        )
    if SEAL in manifest or manifest["version"] == VERSION:
        check_seal(directory / MANIFEST, manifest)
    tables = manifest.get("tables")
    fields_ok = isinstance(tables, dict) and all(
        isinstance(e, dict) and {"config", "clocks", "files"} <= set(e) and isinstance(e["files"], dict)
        and all(is_fingerprint(f) for f in e["files"].values())
        for e in tables.values())
    if manifest.get("kind") not in ("full", "delta") or "id" not in manifest or not fields_ok:
        raise CorruptCheckpointError(
            f"{directory / MANIFEST}: expected kind, id and tables with config, clocks and files "
            f"(each with bytes and sha256); the manifest is incomplete"
        )
    return manifest


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in file `path`; a `CorruptCheckpointError` naming the file and its problem."""
    try:
        with open(path) as f:
            content = json.load(f)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path}: file is missing") from None
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, a number of 4,300+ digits, deep nesting
        raise CorruptCheckpointError(f"{path}: not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    except OSError as exc:  # a folder, unreadable
        raise CorruptCheckpointError(f"{path}: cannot be read ({exc.strerror})") from None
    if not isinstance(content, dict):
        raise CorruptCheckpointError(f"{path}: expected a JSON object, got {type(content).__name__}")
    return content


def _config(directory: Path, entry: dict[str, Any]) -> TableConfig:
    """A loaded table's config: as saved (one saved before a field without effect was
    refused, too), reserving no rows ahead: its rows take what they need as they load,
    and a manifest's reservation would allocate memory no file bounds."""
    try:
        return TableConfig.from_saved({**entry["config"], "reserve_rows": 0})
    except (ConfigError, KeyError, TypeError) as exc:
        raise CorruptCheckpointError(f"{directory / MANIFEST}: invalid table config ({exc})") from None


def _restore(directory: Path, table: EmbeddingTable, entry: dict[str, Any]) -> None:
    files = entry["files"]
    if len(files) != table.num_shards:
        raise CorruptCheckpointError(
            f"{directory / MANIFEST}: table {table.name!r} needs {table.num_shards} shard files, lists {len(files)}"
        )
    stored_state = table.optimizer.state_width or _stored_state_width(directory, entry)
    for s, (relative, expected) in enumerate(sorted(files.items())):
        path = listed_file(directory, relative, directory / MANIFEST)
        table.restore_shard(s, _read_shard(path, expected, table, stored_state))
    clocks = entry["clocks"]
    if not isinstance(clocks, dict) or not all(isinstance(clocks.get(k), int) and clocks[k] >= -1
                                               for k in ("step", "updates", "saved_step")):
        raise CorruptCheckpointError(f"{directory / MANIFEST}: table {table.name!r}: clocks need integer "
                                     f"step, updates and saved_step, got {clocks!r}")
    table.restore_clocks(clocks)


def _stored_state_width(directory: Path, entry: dict[str, Any]) -> int:
    """The optimizer state width of a row in the files of the manifest `entry`."""
    config = _config(directory, entry)
    return config.optimizer.state_width(config.dim)


def _read_shard(path: Path, expected: dict[str, Any], table: EmbeddingTable,
                stored_state: int) -> dict[str, np.ndarray]:
    """A shard file's arrays, checked; `stored_state` is the optimizer state width its
    table was saved with. A table keeping none (`values_only`) gets its state unread."""
    check_file(path, expected, listed_in="the manifest")
    unread = table.optimizer.state_width == 0 < stored_state
    arrays = read_safetensors(path, _state_unread if unread else load_file)
    _check_shapes(path, arrays, table, stored_state)
    if unread:
        arrays["state"] = np.zeros((arrays["keys"].shape[0], 0), np.float32)
    return arrays


def _state_unread(path: str) -> dict[str, np.ndarray]:
    """A shard file's arrays, its float32 optimizer state left unread: in its place a
    stand-in of its shape that takes no memory."""
    with safe_open(path, framework="np") as file:
        arrays = {name: file.get_tensor(name) for name in file.keys() if name != "state"}
        if "state" in file.keys():
            stored = file.get_slice("state")
            if stored.get_dtype() == "F32":
                arrays["state"] = np.broadcast_to(np.float32(0), tuple(stored.get_shape()))
            else:  # read, for the checks to name what it is
                arrays["state"] = file.get_tensor("state")
    return arrays


def read_safetensors(path: Path, load: Callable[[str], dict] = load_file) -> dict:
    """The tensors of the safetensors file `path` (`load`: numpy's or torch's reader),
    or a `CorruptCheckpointError` naming it."""
    try:
        return load(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CorruptCheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def _check_shapes(path: Path, arrays: dict[str, np.ndarray], table: EmbeddingTable, stored_state: int) -> None:
    n = arrays["keys"].shape[0] if "keys" in arrays else -1
    expected = {"keys": ((n,), np.int64), "values": ((n, table.dim), np.float32),
                "state": ((n, stored_state), np.float32), "last_seen": ((n,), np.uint32),
                "counts": ((n,), np.uint32), "counters": ((ix.C_SIZE - ix.C_LOOKUPS,), np.int64),
                "sketch": (table.sketch_shape, np.uint16)}
    for name, (shape, dtype) in expected.items():
        found = arrays.get(name)
        if found is None or found.shape != shape or found.dtype != dtype:
            got = f"{found.dtype} {found.shape}" if found is not None else "nothing"
            raise CorruptCheckpointError(f"{path}: {name!r} should be {np.dtype(dtype)} {shape}, got {got}")
    keys = np.sort(arrays["keys"])
    if n and (twice := keys[1:][keys[1:] == keys[:-1]]).size:
        raise CorruptCheckpointError(f"{path}: 'keys' holds key {int(twice[0])} twice; a table holds each once")
    if n and int(arrays["last_seen"].max()) >= ix.MARK:
        raise CorruptCheckpointError(f"{path}: 'last_seen' holds steps of {int(ix.MARK)} or more, which no table reaches")
    for name in ("values", "state") if table.optimizer.state_width else ("values",):
        if note := nonfinite_note(arrays[name], arrays["keys"], table.threads):
            raise CorruptCheckpointError(f"{path}: {name!r} holds {note}, which training never writes")
    if note := table.optimizer.negative_state_note(arrays["state"], arrays["keys"]):
        raise CorruptCheckpointError(f"{path}: 'state' holds {note}, which training never writes")
