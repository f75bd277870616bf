"""Online updates of a serving bundle: the rows a delta carries, and where a bundle stands.

`tidal export --delta` writes, into an existing bundle, what changed since the state
that bundle serves (its base and the deltas already in it); a running `tidal serve`
applies new deltas in place, between requests, without a restart. Layout::

    BUNDLE/
      manifest.json, tables/, dense.pt2     the base, as a full `tidal export` wrote it
      deltas/
        000001/
          manifest.json          format, sequence, base (the bundle manifest's
                                 content_sha256), previous (the delta before's, or
                                 null), source checkpoint, time, table dtype, rows
                                 changed and removed per table, the size and sha256 of
                                 every other file, and its own content_sha256
          tables/<name>.safetensors
                                 keys [n] int64 and values [n, D]: rows new or changed;
                                 removed [m] int64: keys no longer served (evicted)
          dense.safetensors      the dense network's weights at the delta's checkpoint
                                 (the base's program runs them: the model is the same)
        000002/ ...

A delta names the base and the delta it follows, so one applied out of order, or onto
another bundle, is refused. It carries weights and not a program: loading a
`torch.export` program takes some 150 ms, copying weights into a copy of the one served
under 10. The base and its deltas in order serve exactly what a full export of the last
delta's checkpoint would (a test checks it). A full export replaces the bundle, deltas
included.

    base rows         delta 1                        served after delta 1
    key  value        keys/values    removed         key  value
    3    a            5 -> e         7               3    a
    5    b            9 -> f                         5    e
    7    c                                           9    f
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

__all__ = ["DELTAS", "DELTA_FORMAT", "DELTA_VERSION", "Position", "RowChanges", "Source", "apply_rows",
           "delta_name", "delta_names", "diff_rows", "merge_changes"]

DELTAS = "deltas"  # the folder of a bundle that holds its deltas
DELTA_FORMAT = "tidal-serving-delta"
DELTA_VERSION = 1
_NAME = re.compile(r"\d{6,}")  # a finished delta's folder; a delta being written is `.tmp-<sequence>-<pid>`


def delta_name(sequence: int) -> str:
    return f"{sequence:06d}"


def delta_names(names: list[str]) -> list[str]:
    """The names of finished deltas among `names`, in sequence order."""
    return sorted((n for n in names if _NAME.fullmatch(n)), key=int)


@dataclass(frozen=True, kw_only=True)
class Position:
    """Where a bundle's served state stands: its base, and the last delta applied."""

    base: str  # the bundle manifest's content_sha256
    sequence: int = 0  # the last delta applied; 0: the base alone
    seal: str | None = None  # that delta manifest's content_sha256


@dataclass(frozen=True, kw_only=True)
class Source:
    """The training checkpoint a served state was exported from."""

    checkpoint: str  # its folder's name
    run: str | None  # its run's id (None: a checkpoint written before runs had one)
    step: int

    @classmethod
    def of(cls, manifest: dict) -> Source | None:
        """The source a bundle's or a delta's manifest records (None: a bundle exported
        before manifests recorded it)."""
        if "source_step" not in manifest:
            return None
        return cls(checkpoint=manifest["source_checkpoint"], run=manifest.get("source_run"),
                   step=manifest["source_step"])

    def __str__(self) -> str:
        """Its folder's name and, as two runs name theirs alike, its run's id (the start)."""
        return f"checkpoint {self.checkpoint}" + (f" of run {self.run[:8]}" if self.run else "")


@dataclass(frozen=True, kw_only=True)
class RowChanges:
    """One table's part of a delta.

    keys    [n]     int64, ascending   rows new or changed
    values  [n, D]  float32/float16    their values
    removed [m]     int64, ascending   keys no longer served
    """

    keys: np.ndarray
    values: np.ndarray
    removed: np.ndarray


def diff_rows(old_keys: np.ndarray, old_values: np.ndarray, keys: np.ndarray, values: np.ndarray) -> RowChanges:
    """What turns the rows (`old_keys`, `old_values`) into (`keys`, `values`); both sorted
    by key, keys distinct. A row counts as changed unless its value is bit for bit the
    same (a NaN that stays NaN is unchanged)."""
    at = np.minimum(np.searchsorted(old_keys, keys), max(len(old_keys) - 1, 0))
    known = old_keys[at] == keys if len(old_keys) else np.zeros(len(keys), bool)
    same = np.zeros(len(keys), bool)
    same[known] = (_bits(old_values[at[known]]) == _bits(values[known])).all(axis=1)
    kept = np.zeros(len(old_keys), bool)
    kept[at[known]] = True
    return RowChanges(keys=keys[~same], values=values[~same], removed=old_keys[~kept])


def apply_rows(old_keys: np.ndarray, old_values: np.ndarray, changes: RowChanges) -> tuple[np.ndarray, np.ndarray]:
    """The rows (`old_keys`, `old_values`, sorted by key) with `changes` applied, sorted by key."""
    gone = np.isin(old_keys, changes.removed) | np.isin(old_keys, changes.keys)
    keys = np.concatenate([old_keys[~gone], changes.keys])
    values = np.concatenate([old_values[~gone], changes.values.astype(old_values.dtype)])
    order = np.argsort(keys, kind="stable")
    return keys[order], values[order]


def merge_changes(first: RowChanges, then: RowChanges) -> RowChanges:
    """The changes of `first` followed by those of `then`, as one: a row `then` changes
    or removes is its; a key `first` removed and `then` brings back is no longer removed."""
    kept = ~np.isin(first.keys, then.keys) & ~np.isin(first.keys, then.removed)
    keys = np.concatenate([first.keys[kept], then.keys])
    values = np.concatenate([first.values[kept], then.values.astype(first.values.dtype)])
    order = np.argsort(keys, kind="stable")
    removed = np.union1d(first.removed[~np.isin(first.removed, then.keys)], then.removed)
    return RowChanges(keys=keys[order], values=values[order], removed=removed.astype(np.int64))


def _bits(values: np.ndarray) -> np.ndarray:
    """`values` as unsigned integers of the same width, so that equal means bit for bit equal."""
    return values.view(np.uint16 if values.dtype == np.float16 else np.uint32)
