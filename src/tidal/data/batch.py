"""`SparseBatch`: the jagged batch of sparse ids that every layer of Tidal passes on."""

from __future__ import annotations

import functools
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numba
import numpy as np

from tidal.config import is_whole_number
from tidal.errors import BatchError

__all__ = ["SparseBatch"]


@dataclass(frozen=True, kw_only=True)
class SparseBatch:
    """A batch of B samples with F sparse features, laid out like TorchRec's
    KeyedJaggedTensor (feature-major), plus dense features and labels.

    Example, B = 3 samples, F = 2 features::

        sample          0          1           2
        "user"     [u0]       []          [u2a, u2b]
        "tag"      [t0]       [t1a, t1b]  [t2]

        keys     = ("user", "tag")
        lengths  = [1, 0, 2,  1, 2, 1]                 [F * B] int32, bag k = f * B + b
        offsets  = [0, 1, 1, 3, 4, 6, 7]               [F * B + 1] int64, derived
        values   = [u0, u2a, u2b, t0, t1a, t1b, t2]    [sum(lengths)] int64 raw ids
        weights  = None, or one float32 per value      optional per-id weights
        dense    = [B, Dd] float32 or None              dense features
        labels   = [B, T] float32 or None               one column per target

    Arrays are converted to the dtypes above and checked on construction; a batch that
    does not add up raises `BatchError` saying which array is wrong and how. Weights and
    dense features must be finite, labels within [0, 1] (soft labels are fine). The
    batch keeps read-only copies (`torch.tensor(batch.labels)` copies them for a model;
    `torch.from_numpy` would warn that they are not writable).
    """

    keys: tuple[str, ...]
    values: np.ndarray
    lengths: np.ndarray
    batch_size: int
    weights: np.ndarray | None = None
    dense: np.ndarray | None = None
    labels: np.ndarray | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "keys", _keys(self.keys))
        if not is_whole_number(self.batch_size):
            raise BatchError(f"SparseBatch: batch_size must be an integer, got {self.batch_size!r}")
        values = int64_ids(self.values, "SparseBatch") if whole_numbers(self.values) else self.values
        set_(self, "values", _array(values, np.int64, "values", 1))
        set_(self, "lengths", _lengths(self.lengths))
        if self.weights is not None:
            set_(self, "weights", _finite(_array(self.weights, np.float32, "weights", 1), "weights"))
        if self.dense is not None:
            set_(self, "dense", _finite(_array(self.dense, np.float32, "dense", 2), "dense"))
        if self.labels is not None:
            set_(self, "labels", _labels(_array(self.labels, np.float32, "labels", 2)))
        self._check()

    def _check(self) -> None:
        f, b = len(self.keys), self.batch_size
        if len(set(self.keys)) != f:
            raise BatchError(f"SparseBatch: feature keys must be distinct, got {self.keys}")
        if b < 0:
            raise BatchError(f"SparseBatch: batch_size must be 0 or more, got {b}")
        if self.lengths.shape[0] != f * b:
            raise BatchError(
                f"SparseBatch: lengths must have F * B = {f} * {b} = {f * b} entries "
                f"(feature-major), got {self.lengths.shape[0]}"
            )
        total = int(self.offsets[-1])  # computed here, where the batch is built, not on the step
        if self.values.shape[0] != total:
            raise BatchError(f"SparseBatch: values must have sum(lengths) = {total} ids, got {self.values.shape[0]}")
        if self.weights is not None and self.weights.shape[0] != total:
            raise BatchError(f"SparseBatch: weights must have one entry per id ({total}), got {self.weights.shape[0]}")
        for name in ("dense", "labels"):
            array = getattr(self, name)
            if array is not None and array.shape[0] != b:
                raise BatchError(f"SparseBatch: {name} must have B = {b} rows, got {array.shape[0]}")

    @functools.cached_property
    def offsets(self) -> np.ndarray:
        """`[F * B + 1]` int64: ids of bag k are ``values[offsets[k]:offsets[k + 1]]``
        (computed once, when the batch is built; read-only)."""
        offsets = _offsets(self.lengths)
        offsets.flags.writeable = False
        return offsets

    def feature_range(self, key: str) -> tuple[int, int]:
        """The [start, end) positions of feature `key`'s ids in `values`."""
        f = self._index(key)
        offsets = self.offsets
        return int(offsets[f * self.batch_size]), int(offsets[(f + 1) * self.batch_size])

    def select(self, keys: Sequence[str]) -> SparseBatch:
        """The features `keys` of this batch (in that order), without dense or labels."""
        if isinstance(keys, str):
            raise BatchError(f"SparseBatch.select: keys must be a list of feature names, got the string {keys!r}")
        b = self.batch_size
        spans = [self.feature_range(key) for key in keys]
        pick = np.concatenate([np.arange(lo, hi) for lo, hi in spans]) if spans else np.zeros(0, np.int64)
        lengths = [self.lengths[f * b : (f + 1) * b] for f in map(self._index, keys)]
        return SparseBatch(keys=tuple(keys), batch_size=b, values=self.values[pick],
                           lengths=np.concatenate(lengths or [np.zeros(0, np.int32)]),
                           weights=None if self.weights is None else self.weights[pick])

    def _index(self, key: str) -> int:
        """The position of feature `key` in `keys`."""
        if key not in self.keys:
            raise BatchError(f"SparseBatch: no feature {key!r}; the batch has features {list(self.keys)}")
        return self.keys.index(key)

    @classmethod
    def from_lists(cls, bags: Mapping[str, Sequence[Sequence[int]]], *,
                   weights: Mapping[str, Sequence[Sequence[float]]] | None = None,
                   **extra: np.ndarray) -> SparseBatch:
        """Build a batch from ``{feature: [ids of sample 0, ids of sample 1, ...]}``; ids
        are int64, or uint64 as the constructor takes them (2**64 - 1 is id -1), and
        `weights` gives one weight per id of the features it names (the others weigh 1)."""
        keys = tuple(bags)
        for key in keys:
            _check_bags(bags[key], f"feature {key!r}")
        bags = {key: [bag.tolist() if hasattr(bag, "tolist") else bag for bag in bags[key]]  # arrays, tensors
                for key in keys}
        sizes = {len(samples) for samples in bags.values()}
        if len(sizes) > 1:
            raise BatchError(f"SparseBatch.from_lists: every feature needs the same number of samples, got {sizes}")
        for key in keys:
            for sample, bag in enumerate(bags[key]):
                for wrong in (i for i in bag if not is_whole_number(i)):
                    raise BatchError(f"SparseBatch.from_lists: feature {key!r}, sample {sample}: ids must be "
                                     f"integers, got {wrong!r} ({type(wrong).__name__})")
        flat = [bag for key in keys for bag in bags[key]]
        flat_weights = None if weights is None else _flat_weights(bags, weights)
        return cls(
            keys=keys, batch_size=sizes.pop() if sizes else 0,
            values=int64_ids([i for bag in flat for i in bag], "SparseBatch.from_lists"),
            lengths=np.array([len(bag) for bag in flat], dtype=np.int32),
            weights=None if flat_weights is None else np.array(flat_weights, np.float32), **extra,
        )


def _check_bags(samples: object, what: str) -> None:
    """`samples` must be a list of bags (lists of ids or weights), one per sample."""
    def is_list(x: object) -> bool:
        return isinstance(x, Collection) and not isinstance(x, (str, bytes, Mapping))

    if not is_list(samples):
        raise BatchError(f"SparseBatch.from_lists: {what} must be a list of bags, one per sample, "
                         f"got {type(samples).__name__} {samples!r:.60}")
    bad = next((b for b, bag in enumerate(samples) if not is_list(bag)), None)  # type: ignore[arg-type]
    if bad is not None:
        bag = list(samples)[bad]  # type: ignore[call-overload]
        raise BatchError(f"SparseBatch.from_lists: {what}, sample {bad}: expected a bag (a list, maybe empty), "
                         f"got {type(bag).__name__} {bag!r:.60}; write [[1], [2, 3]] for bags of one and two ids")


def _flat_weights(bags: Mapping[str, Sequence[Sequence[int]]],
                  weights: Mapping[str, Sequence[Sequence[float]]]) -> list[float]:
    """Every weight in the order of the ids, once each bag of weights matches its bag of
    ids; a feature `weights` does not name weighs 1 an id."""
    unknown = [k for k in weights if k not in bags]
    if unknown:
        raise BatchError(f"SparseBatch.from_lists: weights name features {unknown} that have no ids; "
                         f"the features are {list(bags)}")
    weights = {key: weights.get(key, [[1.0] * len(bag) for bag in samples]) for key, samples in bags.items()}
    for key, samples in bags.items():
        _check_bags(weights[key], f"weights of {key!r}")
        if len(weights[key]) != len(samples):
            raise BatchError(f"SparseBatch.from_lists: weights of {key!r} must have one bag per sample "
                             f"({len(samples)}), got {len(weights[key])}")
        for b, (ids, ws) in enumerate(zip(samples, weights[key])):
            if len(ids) != len(ws):
                raise BatchError(f"SparseBatch.from_lists: feature {key!r}, sample {b}: {len(ids)} ids but "
                                 f"{len(ws)} weights; give one weight per id")
    return [w for key in bags for bag in weights[key] for w in bag]


def int64_ids(ids: Sequence[int], where: str) -> np.ndarray:
    """A list of whole-number ids as int64; those from 2**63 to 2**64 - 1 (uint64) wrap
    around as a uint64 array's do, whatever other ids the list holds (numpy alone makes
    a list of -1 and 2**64 - 1 float64). `where` names the caller in the error."""
    try:
        return np.array(ids, dtype=np.int64)
    except OverflowError:
        pass
    ids = [int(i) for i in ids]
    outside = next((i for i in ids if not -(1 << 63) <= i < 1 << 64), None)
    if outside is not None:
        raise BatchError(f"{where}: ids must fit in 64 bits (int64, or uint64), got {outside}; "
                         f"hash larger ids into that range first")
    return np.array([i - (1 << 64) if i >= 1 << 63 else i for i in ids], dtype=np.int64)


def whole_numbers(values: object) -> bool:
    """Whether `values` is a non-empty Python list or tuple of integers."""
    return isinstance(values, (list, tuple)) and bool(values) and all(map(is_whole_number, values))


@numba.njit(nogil=True, cache=True)
def _offsets(lengths: np.ndarray) -> np.ndarray:
    """The running sum of `lengths` after a leading 0 (a loop: numpy's cumsum is slower)."""
    offsets = np.empty(lengths.shape[0] + 1, dtype=np.int64)
    total = 0
    offsets[0] = 0
    for k in range(lengths.shape[0]):
        total += lengths[k]
        offsets[k + 1] = total
    return offsets


def _array(value: object, dtype: type, name: str, ndim: int) -> np.ndarray:
    """A read-only copy with `dtype`: the batch cannot change under the kernels reading it.
    A torch tensor is taken as its values: detached, and copied to the CPU from a device."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch, without importing it in the data layer
        value = value.detach().cpu()
    array = np.asarray(value)
    if array.ndim != ndim:
        raise BatchError(f"SparseBatch: {name} must be {ndim}-D{_SHAPES.get(name, '')}, got shape {array.shape}")
    if array.size and array.dtype.kind not in "iufb":
        raise BatchError(f"SparseBatch: {name} must be numeric, got dtype {array.dtype}")
    if np.dtype(dtype).kind == "i" and array.size and array.dtype.kind in "fb":
        raise BatchError(f"SparseBatch: {name} must be integers, got dtype {array.dtype}")
    copy = np.array(array, dtype=dtype, order="C")
    copy.flags.writeable = False
    return copy


_SHAPES = {"labels": " [B, T], one column per target (labels[:, None] for a single target)",
           "dense": " [B, Dd], one column per dense feature"}


def _keys(keys: object) -> tuple[str, ...]:
    """The feature names as a tuple: a sequence of strings, not one string."""
    if isinstance(keys, (str, bytes)):
        raise BatchError(f"SparseBatch: keys must be a sequence of feature names, got the string {keys!r}; "
                         f"write ({keys!r},) for one feature")
    try:
        names = tuple(keys)  # type: ignore[arg-type]
    except TypeError:
        raise BatchError(f"SparseBatch: keys must be a sequence of feature names, got {keys!r}") from None
    wrong = [k for k in names if not isinstance(k, str)]
    if wrong:
        raise BatchError(f"SparseBatch: feature keys must be strings, got {wrong[0]!r} ({type(wrong[0]).__name__}) "
                         f"in {names}")
    return names


def _finite(array: np.ndarray, name: str) -> np.ndarray:
    """`array`, refused if it holds NaN or an infinity (one vectorized pass when it does not)."""
    if not np.isfinite(array).all():
        _refuse(array, ~np.isfinite(array), name, "finite numbers (no NaN or infinity, |x| < 3.4e38)")
    return array


def _labels(array: np.ndarray) -> np.ndarray:
    """`array`, refused if a label is outside [0, 1] or NaN (two cheap reductions when none is)."""
    if array.size and not (array.min() >= 0 and array.max() <= 1):  # False for NaN too
        _refuse(array, ~((array >= 0) & (array <= 1)), "labels", "numbers in [0, 1] (soft labels are fine)")
    return array


def _refuse(array: np.ndarray, bad: np.ndarray, name: str, expected: str) -> None:
    at = tuple(int(i) for i in np.argwhere(bad)[0])
    where = f"id {at[0]}" if len(at) == 1 else f"row {at[0]}, column {at[1]}"
    raise BatchError(f"SparseBatch: {name} must be {expected}; {int(bad.sum())} of {array.size} are not, e.g. "
                     f"{array[at]} at {where}; clean or drop those rows before building the batch")


def _lengths(value: object) -> np.ndarray:
    array = np.asarray(value)
    if array.size and array.dtype.kind in "iu" and (array.min() < 0 or array.max() > np.iinfo(np.int32).max):
        raise BatchError(f"SparseBatch: lengths must be >= 0 and < 2**31, got values from {array.min()} to {array.max()}")
    return _array(array, np.int32, "lengths", 1)
