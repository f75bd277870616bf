"""From record batches of string columns to `SparseBatch`es, vectorized (no per-row Python).

Each feature of the config says how its column(s) become ids or numbers; see
`tidal.config.SparseFeature`, `DenseFeature` and `LabelFeature`. The same `Extractor`
serves training and serving, so a row gives the same ids in both.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tidal.config import DenseFeature, FeatureConfig, LabelFeature, SparseFeature, require
from tidal.data.batch import SparseBatch
from tidal.data.hashing import hash_strings
from tidal.data.readers import FLOAT32_MAX, Bags, WeightedBags, split_bags, weighted_values
from tidal.errors import ConfigError, DataError
from tidal.mixing import mix64_array

__all__ = ["Extractor", "feature_seed"]

_MISSING = "\x00missing"  # what a missing value hashes as when the feature asks for a default id


def feature_seed(feature: SparseFeature) -> int:
    """The hash seed of a feature: from its namespace, or its name (stable everywhere)."""
    text = feature.namespace if feature.namespace is not None else feature.name
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


class Extractor:
    """Turns a record batch into a `SparseBatch`: sparse bags, dense matrix, labels."""

    def __init__(self, features: Sequence[FeatureConfig]) -> None:
        for f in features:
            require(f, (SparseFeature, DenseFeature, LabelFeature), "Extractor: each feature")
        names = [f.name for f in features]
        if len(set(names)) != len(names):
            raise ConfigError(f"features: names must be distinct, got {names}")
        self.sparse = [f for f in features if isinstance(f, SparseFeature)]
        self.dense = [f for f in features if isinstance(f, DenseFeature)]
        self.labels = [f for f in features if isinstance(f, LabelFeature)]
        self._one_reading()
        self._seeds = {f.name: feature_seed(f) for f in self.sparse}
        self._simple = {f.name: f for f in self.sparse  # one string column hashed to one id
                        if len(f.columns) == 1 and f.hashed and f.separator is None and f.buckets is None}
        self._simple_seeds = np.array([self._seeds[name] for name in self._simple], dtype=np.uint64)
        self._checked: pa.Schema | None = None  # the last schema found to hold what the features read

    def _one_reading(self) -> None:
        """A column of weighted bags is read only as such, with the same separators."""
        for f in self.sparse:
            if f.weight_separator is None:
                continue
            column, read = f.columns[0], (f.separator, f.weight_separator)
            others = [g.name for g in self.sparse if column in g.columns and (g.separator, g.weight_separator) != read]
            others += [g.name for g in (*self.dense, *self.labels) if g.column == column]
            if others:
                raise ConfigError(f"column {column!r} holds weighted bags for feature {f.name!r} (separator "
                                  f"{f.separator!r}, weight_separator {f.weight_separator!r}), but {others} read it "
                                  f"another way; read it with the same separators, or from a column of its own")

    @property
    def columns(self) -> list[str]:
        """Every input column the features read, in first-use order."""
        used = [c for f in self.sparse for c in f.columns] + [f.column for f in (*self.dense, *self.labels)]
        return list(dict.fromkeys(used))

    @property
    def checks(self) -> dict[str, str | Bags | WeightedBags]:
        """What the reader must check each column holds: labels 0 or 1, numbers, raw ids,
        bags (which a Parquet list column may hold), weighted bags. A column read in two
        ways gets the stricter check (an integer is also a number); weighted bags are
        read only as such (see `_one_reading`)."""
        checks: dict[str, str | Bags | WeightedBags] = {c: Bags(s) for c, s in self._bag_columns().items()}
        checks |= {f.columns[0]: "number" for f in self.sparse if f.buckets is not None}
        checks |= {f.column: "number" for f in self.dense}
        checks |= {f.columns[0]: "integer" for f in self.sparse if not f.hashed}
        checks |= {f.columns[0]: WeightedBags(f.separator, f.weight_separator)  # type: ignore[arg-type]
                   for f in self.sparse if f.weight_separator is not None}
        return checks | {f.column: "label" for f in self.labels}

    def _bag_columns(self) -> dict[str, str]:
        """The columns every feature reads as bags of one separator, and it (a Parquet
        list column is read only so: joined by that separator)."""
        readings: dict[str, set[str | None]] = {}
        for f in self.sparse:
            for column in f.columns:
                readings.setdefault(column, set()).add(f.separator if len(f.columns) == 1 else None)
        for g in (*self.dense, *self.labels):
            readings.setdefault(g.column, set()).add(None)
        return {c: next(iter(s)) for c, s in readings.items() if len(s) == 1 and None not in s}  # type: ignore[misc]

    def missing_id(self, name: str) -> int | None:
        """The id sparse feature `name` gives a row whose value is missing (`missing:
        default`); None when such a row has no id (`missing: empty`)."""
        feature = next(f for f in self.sparse if f.name == name)
        if feature.missing != "default":
            return None
        return _default_id(self._seeds[name])

    def __call__(self, batch: pa.RecordBatch) -> SparseBatch:
        """The `SparseBatch` of the rows of `batch` (string columns, as `read_batches`
        gives them, or typed ones): each sparse feature's ids in the features' order, the
        dense features `[B, Dd]` and the labels `[B, T]`."""
        if not isinstance(batch, pa.RecordBatch):
            hint = "; pass table.combine_chunks().to_batches()[0]" if isinstance(batch, pa.Table) else ""
            raise DataError(f"Extractor: expected a pyarrow.RecordBatch, got {type(batch).__name__}{hint}")
        self._check_schema(batch.schema)
        bags = self._simple_bags(batch) | {f.name: self._bags(f, batch) for f in self.sparse if f.name not in self._simple}
        bags = [bags[f.name] for f in self.sparse]
        dense = _dense(self.dense, batch) if self.dense else None
        labels = _labels(self.labels, batch) if self.labels else None
        return SparseBatch(keys=[f.name for f in self.sparse], batch_size=batch.num_rows,
                           values=np.concatenate([v for v, _, _ in bags]) if bags else np.zeros(0, np.int64),
                           lengths=np.concatenate([n for _, n, _ in bags]) if bags else np.zeros(0, np.int32),
                           weights=_weights(bags), dense=dense, labels=labels)

    def _check_schema(self, schema: pa.Schema) -> None:
        """Every column the features read must be there, and every column a sparse
        feature hashes or reads ids from must hold strings, as the readers give them
        (bucketed columns are numbers, of any type). Batches of the last schema that
        passed are not checked again (for a small served batch the check cost about 5%
        of the sparse stage)."""
        if self._checked is not None and schema.equals(self._checked):
            return
        names = set(schema.names)
        missing = [c for c in self.columns if c not in names]
        if missing:
            raise DataError(f"batch lacks columns {missing} that the features read; it has {schema.names}")
        for f in self.sparse:
            wrong = [f"column {c!r} of type {schema.field(c).type}" for c in f.columns if f.buckets is None
                     and not _is_text(schema.field(c).type)]
            if wrong:
                raise DataError(f"feature {f.name!r} reads its column(s) as text: expected string columns, got "
                                f"{', '.join(wrong)}; cast them with pyarrow.compute.cast(column, pyarrow.string())")
        self._checked = schema

    def _simple_bags(self, batch: pa.RecordBatch) -> dict[str, _Bags]:
        """(ids, bag lengths, no weights) of every feature that hashes one string column, in one
        kernel call over all their columns (the same ids as one call per feature)."""
        columns = [batch.column(f.columns[0]) for f in self._simple.values()]
        if not columns or len({c.type for c in columns}) > 1:
            return {name: self._bags(f, batch) for name, f in self._simple.items()}
        ids, missing = hash_strings(pa.concat_arrays(columns), self._simple_seeds)
        n = batch.num_rows
        return {name: _single_value(ids[k * n : (k + 1) * n], missing[k * n : (k + 1) * n], f.missing, self._seeds[name])
                for k, (name, f) in enumerate(self._simple.items())}

    def _bags(self, feature: SparseFeature, batch: pa.RecordBatch) -> _Bags:
        """(ids, bag lengths, weights or None) of one feature over the batch."""
        seed = self._seeds[feature.name]
        if len(feature.columns) > 1:
            ids, missing = _cross([batch.column(c) for c in feature.columns], seed)
        elif feature.separator is not None:
            bags = _multi_value(batch.column(feature.columns[0]), feature, seed)
            return _default_for_empty_bags(bags, seed) if feature.missing == "default" else bags
        elif feature.buckets is not None:
            ids, missing = _bucket(batch.column(feature.columns[0]), feature.buckets, seed, feature.name)
        elif feature.hashed:
            ids, missing = hash_strings(batch.column(feature.columns[0]), seed)
        else:
            ids, missing = _integer_ids(batch.column(feature.columns[0]), feature.name)
        return _single_value(ids, missing, feature.missing, seed)


_Bags = tuple[np.ndarray, np.ndarray, np.ndarray | None]  # ids, bag lengths, float32 weights or None


def _weights(bags: list[_Bags]) -> np.ndarray | None:
    """Every id's weight when a feature has weights (1 for the ids of the others), else None."""
    if all(w is None for _, _, w in bags):
        return None
    return np.concatenate([np.ones(ids.shape[0], np.float32) if w is None else w for ids, _, w in bags])


def _default_id(seed: int) -> int:
    """The id a feature of hash seed `seed` gives a missing value (`missing: default`)."""
    return int(hash_strings(pa.array([_MISSING]), seed)[0][0])


def _single_value(ids: np.ndarray, missing: np.ndarray, policy: str, seed: int) -> _Bags:
    if policy == "default":
        return np.where(missing, _default_id(seed), ids), np.ones(ids.shape[0], dtype=np.int32), None
    return ids[~missing], (~missing).astype(np.int32), None


def _default_for_empty_bags(bags: _Bags, seed: int) -> _Bags:
    """Give every empty bag the feature's default id (of weight 1)."""
    ids, lengths, weights = bags
    empty = lengths == 0
    if not empty.any():
        return bags
    default = _default_id(seed)
    starts = np.cumsum(lengths)[empty]  # each empty bag gets one id where it starts
    filled = np.where(empty, 1, lengths).astype(np.int32)
    return np.insert(ids, starts, default), filled, None if weights is None else np.insert(weights, starts, 1.0)


def _multi_value(column: pa.Array, feature: SparseFeature, seed: int) -> _Bags:
    """Split every row on the feature's separator, and each value into id and weight
    when it has a weight separator; empty values (and null rows) are dropped."""
    tokens, row_of_token = split_bags(column, feature.separator)  # type: ignore[arg-type]
    weights = None
    if feature.weight_separator is not None:
        values, (tokens, weights) = tokens, weighted_values(tokens, feature.weight_separator)
        bad = np.flatnonzero(np.isnan(weights))
        if bad.size:
            check = WeightedBags(feature.separator, feature.weight_separator)  # type: ignore[arg-type]
            problem = check.problem(values[int(bad[0])].as_py())
            raise DataError(f"feature {feature.name!r}, row {row_of_token[bad[0]]}: {problem}; expected "
                            f"{check.expected}; read files with read_batches(checks=extractor.checks) to skip such rows")
    ids, empty = hash_strings(tokens, seed)
    lengths = np.bincount(row_of_token[~empty], minlength=len(column)).astype(np.int32)
    return ids[~empty], lengths, None if weights is None else weights[~empty].astype(np.float32)


def _integer_ids(column: pa.Array, name: str) -> tuple[np.ndarray, np.ndarray]:
    missing = pc.equal(pc.utf8_length(column), 0).to_numpy(zero_copy_only=False)
    try:
        ids = pc.cast(pc.if_else(pc.cast(missing, pa.bool_()), "0", column), pa.int64()).to_numpy()
    except pa.ArrowInvalid as exc:
        raise DataError(f"feature {name!r}: hashed is false, so every value must be an integer id ({exc})") from None
    return ids, missing


def _bucket(column: pa.Array, boundaries: list[float], seed: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    values = _number(column, np.nan, f"feature {name!r}")
    missing = np.isnan(values)
    buckets = np.searchsorted(np.asarray(boundaries), values, side="right")
    return mix64_array(buckets.astype(np.int64) ^ np.int64(seed & 0x7FFFFFFFFFFFFFFF)), missing


def _cross(columns: list[pa.Array], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One id per row from the ids of every column (missing if any value is)."""
    combined = np.zeros(len(columns[0]), dtype=np.int64)
    missing = np.zeros(len(columns[0]), dtype=bool)
    for k, column in enumerate(columns):
        ids, absent = hash_strings(column, seed + k)
        combined = mix64_array(combined ^ ids)
        missing |= absent
    return combined, missing


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _number(column: pa.Array, missing_value: float, what: str) -> np.ndarray:
    """float64 of every value (strings as read from files, or numbers as a serving
    request sends them); empty strings and nulls give `missing_value`. A value that is
    not a number is a `DataError` naming `what` (the readers count such rows as bad)."""
    if _is_text(column.type):
        column = pc.if_else(pc.equal(pc.utf8_length(column), 0), None, column)
    try:
        numbers = pc.cast(column, pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise DataError(f"{what}: expected numbers (or nothing), got a value that is not one ({exc}); "
                        f"read files with read_batches(checks=extractor.checks) to skip such rows") from None
    return pc.fill_null(numbers, missing_value).to_numpy(zero_copy_only=False)


def _labels(features: list[LabelFeature], batch: pa.RecordBatch) -> np.ndarray:
    """`[B, T]` float64 of the labels: each must be there and within [0, 1]."""
    labels = np.stack([_number(batch.column(f.column), np.nan, _named(f)) for f in features], axis=1)
    if labels.size and not (labels.min() >= 0 and labels.max() <= 1):  # False for NaN too
        row, t = (int(i) for i in np.argwhere(~((labels >= 0) & (labels <= 1)))[0])
        value = batch.column(features[t].column)[row].as_py()
        if np.isnan(labels[row, t]):
            raise DataError(f"{_named(features[t])}: a label is missing in row {row}: the reader should have "
                            f"refused that row (read files with read_batches(checks=extractor.checks))")
        raise DataError(f"{_named(features[t])}: expected 0 or 1 (or a soft label in [0, 1]), got {value!r} "
                        f"in row {row}")
    return labels


def _joint_numbers(columns: list[pa.Array]) -> np.ndarray | None:
    """`[len(columns), rows]` float64 of columns of one type, parsed in one call; None if
    a value is not a number."""
    try:
        return _number(pa.concat_arrays(columns), np.nan, "dense").reshape(len(columns), -1)
    except DataError:
        return None


def _named(feature: DenseFeature | LabelFeature) -> str:
    return f"{feature.kind} feature {feature.name!r} (column {feature.column!r})"


def _dense(features: list[DenseFeature], batch: pa.RecordBatch) -> np.ndarray:
    """`[B, Dd]` float32 of the dense features, parsed in one call when their columns
    share a type; a missing value is the feature's `missing_value`, untransformed."""
    columns = [batch.column(f.column) for f in features]
    values = _joint_numbers(columns) if len({c.type for c in columns}) == 1 else None  # [Dd, B]
    if values is None:  # of several types, or a value that is not a number: named with its feature
        values = np.stack([_number(c, np.nan, _named(f)) for f, c in zip(features, columns)])
    with np.errstate(invalid="ignore"):  # NaN: missing
        beyond = np.abs(values) > FLOAT32_MAX  # before the log transform, which would bring them within it
    if beyond.any():
        d, row = (int(i) for i in np.argwhere(beyond)[0])
        raise DataError(f"{_named(features[d])}: expected numbers within float32's range (|x| <= 3.4028235e38), got "
                        f"{columns[d][row].as_py()!r} in row {row}; read files with read_batches("
                        f"checks=extractor.checks) to skip such rows")
    log = np.array([f.transform == "log" for f in features])[:, None]
    values = np.where(log, np.sign(values) * np.log1p(np.abs(values)), values)
    missing = np.array([f.missing_value for f in features])[:, None]
    return np.ascontiguousarray(np.where(np.isnan(values), missing, values).T, dtype=np.float32)
