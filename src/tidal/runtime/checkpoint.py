"""Trainer checkpoints: tables, dense weights, optimizer state, data position, RNG.

Layout under ``<run_dir>/checkpoints``::

    LATEST                    the name of the newest complete checkpoint
    step-00000120/
      tables/                 the embedding tables (tidal.embedding.checkpoint format)
      dense.safetensors       model weights, Adam state tensors, torch RNG state
      trainer.json            step, epoch, batches done in the epoch, optimizer settings, config,
                              the size and sha256 of dense.safetensors, and the sha256 of its
                              own content (content_sha256)

A checkpoint is written under a temporary name and renamed into place before LATEST
is replaced (write, fsync, rename), so a crash at any point leaves the previous one
whole. No pickle: tensors go to safetensors, everything else to JSON. Loading refuses
an altered or truncated trainer.json or dense.safetensors with a message naming it;
a trainer.json written before these hashes (neither files nor content_sha256) loads
unchecked.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tidal.embedding import load_tables, save_tables
from tidal.embedding.checkpoint import (SEAL, check_file, check_seal, fingerprint, fsync_path, is_fingerprint, sealed,
                                        write_json_atomic)
from tidal.errors import CheckpointError, CorruptCheckpointError

if TYPE_CHECKING:
    from tidal.runtime.trainer import Trainer

__all__ = ["find", "latest", "load_dense", "read_meta", "restore", "save"]

LATEST = "LATEST"
DENSE = "dense.safetensors"
_META_KEYS = ("position", "config", "param_groups", "bad_rows")


def save(trainer: Trainer, position: dict[str, int]) -> Path:
    """Write a checkpoint of `trainer` at `position` (step, epoch, batches done)."""
    root = trainer.run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{position['step']:08d}-epoch-{position['epoch']}"
    if (root / LATEST).exists() and json.loads((root / LATEST).read_text())["checkpoint"] == name:
        return root / name  # this very position is already saved
    staging = root / f".tmp-{name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    save_tables(staging / "tables", trainer.collection.tables)
    save_file(_dense_tensors(trainer), str(staging / DENSE))
    write_json_atomic(staging / "trainer.json", sealed({
        "position": position, "config": trainer.config.model_dump(mode="json"),
        "param_groups": _param_groups(trainer.optimizer),
        "bad_rows": {"count": trainer.bad_rows.count, "examples": trainer.bad_rows.examples},
        "files": {DENSE: fingerprint(staging / DENSE, sync=True)}}))
    fsync_path(staging)
    shutil.rmtree(root / name, ignore_errors=True)  # left by a save that died before LATEST named it
    os.replace(staging, root / name)
    fsync_path(root)
    write_json_atomic(root / LATEST, {"checkpoint": name})
    for old in root.iterdir():
        if old.name not in (name, LATEST) and (old.name.startswith("step-") or old.name.startswith(".tmp-")):
            shutil.rmtree(old, ignore_errors=True)
    return root / name


def latest(run_dir: Path) -> Path:
    """The newest complete checkpoint of a run, or a clear error if there is none."""
    pointer = run_dir / "checkpoints" / LATEST
    if not pointer.exists():
        raise CheckpointError(f"{run_dir}: holds no checkpoint ({pointer} is missing); train a run there first")
    name = _json(pointer).get("checkpoint")
    if not isinstance(name, str) or not name.startswith("step-"):
        raise CorruptCheckpointError(f"{pointer}: expected {{\"checkpoint\": \"step-...\"}}, got {pointer.read_text()[:200]!r}")
    directory = run_dir / "checkpoints" / name
    if not (directory / "trainer.json").exists():
        raise CheckpointError(f"{pointer} names {directory.name}, which is incomplete or missing")
    return directory


def find(path: Path) -> Path:
    """The checkpoint at `path`: a checkpoint directory itself, or a run directory's latest."""
    return path if (path / "trainer.json").is_file() else latest(path)


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
    return meta


def load_dense(directory: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's dense tensors: model weights, Adam state, RNG state; checked
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
    except (ValueError, OSError) as exc:
        raise CorruptCheckpointError(f"{path}: not valid JSON, truncated or damaged ({exc})") from None
    if not isinstance(value, dict):
        raise CorruptCheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def restore(trainer: Trainer, directory: Path) -> dict[str, int]:
    """Load the checkpoint in `directory` into `trainer`; the position to continue from.
    The training section may differ from the checkpoint's: its learning rate applies."""
    meta = read_meta(directory)
    saved, current = meta["config"], trainer.config.model_dump(mode="json")
    changed = sorted(k for k in saved if saved[k] != current.get(k) and k not in ("training", "runtime", "serving"))
    if changed:
        raise CheckpointError(f"{directory}: the config changed since this checkpoint ({', '.join(changed)}); "
                              f"resume with the config it was written with")
    tables = load_tables(directory / "tables", threads=trainer.config.training.threads)
    trainer.collection.tables = [tables[t.name] for t in trainer.collection.tables]
    tensors = load_dense(directory)
    trainer.model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    trainer.optimizer.load_state_dict({"state": _optimizer_state(tensors), "param_groups": meta["param_groups"]})
    for group in trainer.optimizer.param_groups:
        group["lr"] = trainer.config.training.lr
    torch.set_rng_state(tensors["rng.torch"])
    trainer.bad_rows.count, trainer.bad_rows.examples = meta["bad_rows"]["count"], list(meta["bad_rows"]["examples"])
    return meta["position"]


def _dense_tensors(trainer: Trainer) -> dict[str, torch.Tensor]:
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in trainer.model.state_dict().items()}
    for index, state in trainer.optimizer.state_dict()["state"].items():
        for key, value in state.items():
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
