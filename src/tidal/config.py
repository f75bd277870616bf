"""User-facing config models, validated on construction with clear messages.

A table is described by a `TableConfig`::

    TableConfig(
        name="user_id", dim=64,
        initializer=Initializer(kind="uniform", scale=0.01),
        optimizer=Adagrad(lr=0.05),
        admission=CountAdmission(min_count=2),
        eviction=Eviction(ttl_steps=10_000, capacity_policy="lfu"),
        max_rows=50_000_000, num_shards=8,
    )

Invalid values raise `ConfigError` naming the field, the value that came and the range
that is allowed, for example ``TableConfig 'user_id': dim: Input should be greater than 0, got 0``.
"""

from __future__ import annotations

import difflib
import math
import numbers
import re
import shlex
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Annotated, Any, Literal, get_args, get_origin

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from tidal.errors import ConfigError

__all__ = [
    "Adagrad",
    "Adam",
    "AdamW",
    "CountAdmission",
    "DataConfig",
    "DenseAdagrad",
    "DenseAdam",
    "DenseAdamW",
    "DenseFeature",
    "DenseOptimizerConfig",
    "DenseSgd",
    "EmbeddingFeature",
    "Eviction",
    "FeatureConfig",
    "Ftrl",
    "Fusion",
    "Initializer",
    "LabelFeature",
    "LrSchedule",
    "MAX_SPARSE_WORKERS",
    "ModelConfig",
    "OptimizerConfig",
    "PassModeConfig",
    "ProbabilityAdmission",
    "RowWiseAdagrad",
    "RunConfig",
    "RuntimeConfig",
    "ServingConfig",
    "Sgd",
    "SparseFeature",
    "TableConfig",
    "TrainingConfig",
    "check_group_feature",
    "closest_match",
    "effective_fields",
    "effective_table_fields",
    "is_finite_number",
    "is_whole_number",
    "require",
    "require_threads",
    "weighted_bag_problem",
]

DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]+)?)$"  # a device for dense math
# optional sections, absent when null: one written with nothing under it (which YAML reads as null) is refused
_SECTIONS = ("runtime", "passmode", "eviction", "admission", "lr_schedule")
# sections with default settings (`data` has none), which a null cannot stand for
_SETTINGS = ("data", "model", "training", "serving", "fusion", "optimizer", "initializer")
_FLOAT32_MAX = 3.4028234663852886e38  # scores are float32
_FLOAT32_TINY = 1.401298464324817e-45  # float32's smallest positive number: a smaller eps is 0 there
MAX_SPARSE_WORKERS = 256
BAG_LENGTHS = ".lengths"  # a served bag column's lengths come as the input named COLUMN.lengths
# names a table's checkpoint folder cannot take (tidal.embedding.checkpoint): the
# folders themselves, and the manifest beside them and the file it is written through
_RESERVED_TABLE_NAMES = (".", "..", "manifest.json", "manifest.json.partial")


def _refuse_boolean(value: Any) -> Any:
    """A number field's check: pydantic would read `true` and `false` as 1 and 0."""
    if isinstance(value, bool) or getattr(getattr(value, "dtype", None), "kind", None) == "b":  # numpy's too
        raise ValueError(f"expected a number, got the boolean {value}")
    return value


_Int = Annotated[int, pydantic.BeforeValidator(_refuse_boolean)]
_Float = Annotated[float, pydantic.BeforeValidator(_refuse_boolean)]


class _Model(BaseModel):
    """A frozen model whose validation errors are `ConfigError`s with readable lines."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def __init__(model, /, **values: Any) -> None:  # noqa: N805 - not `self`: a config may hold a key 'self'
        try:
            super().__init__(**values)
        except pydantic.ValidationError as exc:
            name = values.get("name")
            where = type(model).__name__ + (f" {name!r}" if isinstance(name, str) else "")
            error = ConfigError(_describe(where, exc, values, type(model)))
            error.problems = _problems(exc, values, type(model))  # read by an enclosing model's validation
            raise error from None

    def __setattr__(self, name: str, value: Any) -> None:
        kind = type(self).__name__
        raise ConfigError(f"{kind} is frozen, so {name} cannot be set; make a changed copy: "
                          f"{kind}(**{{**config.model_dump(), {name!r}: ...}})")


_SAVED = ContextVar("saved", default=False)  # reading a saved config back: fields without effect pass


def _unused(needs: dict[str, tuple[bool, str]]) -> dict[str, str]:
    """Of fields mapped to (whether they apply, what they need): those that do not apply."""
    return {name: need for name, (applies, need) in needs.items() if not applies}


def _kind_alone(value: Any) -> Any:
    """An optimizer given by its kind alone (`optimizer: adagrad`): that kind, its
    settings at their defaults."""
    return {"kind": value} if isinstance(value, str) else value


def _refuse_unused(model: BaseModel, unused: dict[str, str], where: str = "") -> None:
    """Refuse fields given a value other than their default where they would have no
    effect: `unused` maps such a field to what it needs; `where` is the path to `model`
    within the one validated. A saved config, written before these checks, passes
    (`RunConfig.from_saved`)."""
    if _SAVED.get():
        return
    unused = [f"{where}{name} (it needs {need})" for name, need in unused.items()
              if getattr(model, name) != type(model).model_fields[name].get_default(call_default_factory=True)]
    if unused:
        them = "them, or set what they need" if len(unused) > 1 else "it, or set what it needs"
        raise ValueError(f"{', '.join(unused)} would have no effect here: remove {them}")


_NORMAL_REACH = 6.0  # a normal row's values stay within 5.8 scales (Box-Muller from 24-bit uniforms)
_NORMAL_SCALE_MAX = _FLOAT32_MAX / _NORMAL_REACH


class Initializer(_Model):
    """Initial row values: `uniform` U(-scale, scale), `normal` N(0, scale²) or `zeros`.

    Rows are created during training steps, so the initializer is on the hot path:
    `normal` costs about two and a half times `uniform` per row (0.86 against 0.32 ms
    for 11,000 rows of dim 64).
    """

    kind: Literal["uniform", "normal", "zeros"] = "uniform"  # the distribution, as above
    scale: _Float = Field(0.01, ge=0.0, le=_FLOAT32_MAX, allow_inf_nan=False)  # uniform's bound, normal's sd

    @pydantic.model_validator(mode="after")
    def _scale_applies(self) -> Initializer:
        _refuse_unused(self, _unused({"scale": (self.kind != "zeros", "kind: uniform or normal")}))
        if self.kind == "normal" and self.scale > _NORMAL_SCALE_MAX:
            raise ValueError(f"a normal initializer's scale must be at most {_NORMAL_SCALE_MAX:.4g}, got "
                             f"{self.scale:g}: its draws reach {_NORMAL_REACH:g} times the scale, which must stay "
                             f"within float32")
        return self


class Sgd(_Model):
    """Plain SGD: ``w -= lr * g``."""

    kind: Literal["sgd"] = "sgd"  # chooses it: a table's `optimizer: {kind: sgd, ...}`, or `optimizer: sgd`
    lr: _Float = Field(0.01, gt=0.0, le=_FLOAT32_MAX, allow_inf_nan=False)  # the learning rate

    def state_width(self, dim: int) -> int:
        """The float32s of optimizer state a row of `dim` values keeps."""
        return 0


class Adagrad(_Model):
    """Adagrad as `torch.optim.Adagrad` (lr_decay 0): one accumulator per element."""

    kind: Literal["adagrad"] = "adagrad"  # chooses it: `optimizer: {kind: adagrad, ...}`, or `optimizer: adagrad`
    lr: _Float = Field(0.01, gt=0.0, le=_FLOAT32_MAX, allow_inf_nan=False)  # the learning rate
    eps: _Float = Field(1e-10, ge=_FLOAT32_TINY, le=_FLOAT32_MAX, allow_inf_nan=False)  # added to the accumulator's
    # root, in the denominator
    initial_accumulator_value: _Float = Field(0.0, ge=0.0, le=_FLOAT32_MAX, allow_inf_nan=False)  # new rows'
    # accumulators start at it

    def state_width(self, dim: int) -> int:
        return dim


class RowWiseAdagrad(_Model):
    """Row-wise Adagrad (fbgemm style): one accumulator per row, the mean of g²."""

    kind: Literal["rowwise_adagrad"] = "rowwise_adagrad"  # chooses it: `optimizer: {kind: rowwise_adagrad, ...}`
    lr: _Float = Field(0.01, gt=0.0, le=_FLOAT32_MAX, allow_inf_nan=False)  # the learning rate
    eps: _Float = Field(1e-10, ge=_FLOAT32_TINY, le=_FLOAT32_MAX, allow_inf_nan=False)  # added to the accumulator's
    # root, in the denominator

    def state_width(self, dim: int) -> int:
        return 1


class Adam(_Model):
    """Lazy Adam: only rows present in the batch move.

    By default the bias correction uses the table's global step, exactly as
    `torch.optim.SparseAdam`. With ``per_row_bias_correction=True`` each row keeps its
    own step count (one extra float per row), so a rare row is corrected as if it were
    the only parameter, which is what one `torch.optim.SparseAdam` per row would do.
    Either way eps is added before the bias correction, as SparseAdam adds it
    (`torch.optim.Adam` adds it after: early steps of small gradients differ).
    """

    kind: Literal["adam"] = "adam"  # chooses it: `optimizer: {kind: adam, ...}`, or `optimizer: adam`
    lr: _Float = Field(1e-3, gt=0.0, le=_FLOAT32_MAX, allow_inf_nan=False)  # the learning rate
    beta1: _Float = Field(0.9, ge=0.0, lt=1.0)  # decay rate of the gradient's running mean (m)
    beta2: _Float = Field(0.999, ge=0.0, lt=1.0)  # decay rate of the squared gradient's running mean (v)
    eps: _Float = Field(1e-8, ge=_FLOAT32_TINY, le=_FLOAT32_MAX, allow_inf_nan=False)  # added to the denominator
    per_row_bias_correction: bool = False  # correct by each row's own step count (see above)

    def state_width(self, dim: int) -> int:
        return 2 * dim + int(self.per_row_bias_correction)


class AdamW(Adam):
    """Lazy Adam with decoupled weight decay (`torch.optim.AdamW`) on present rows:
    each update first scales the row by 1 - lr * `weight_decay`."""

    kind: Literal["adamw"] = "adamw"  # type: ignore[assignment]
    weight_decay: _Float = Field(0.01, ge=0.0, le=_FLOAT32_MAX, allow_inf_nan=False)


class Ftrl(_Model):
    """FTRL-proximal (McMahan et al. 2013), per coordinate, with L1 and L2.

    A coordinate's rate is `alpha` / (`beta` + sqrt(n)), n the sum of its squared
    gradients (`beta` keeps it bounded while n is small); `l1` and `l2` are the
    strengths of the penalties, and `l1` sets to exactly 0 every weight whose
    accumulated gradient term |z| is at most it.
    """

    kind: Literal["ftrl"] = "ftrl"  # chooses it: `optimizer: {kind: ftrl, ...}`, or `optimizer: ftrl`
    alpha: _Float = Field(0.05, gt=0.0, le=_FLOAT32_MAX, allow_inf_nan=False)
    beta: _Float = Field(1.0, gt=0.0, le=_FLOAT32_MAX, allow_inf_nan=False)
    l1: _Float = Field(0.0, ge=0.0, le=_FLOAT32_MAX, allow_inf_nan=False)
    l2: _Float = Field(0.0, ge=0.0, le=_FLOAT32_MAX, allow_inf_nan=False)

    def state_width(self, dim: int) -> int:
        return 2 * dim


OptimizerConfig = Annotated[
    Sgd | Adagrad | RowWiseAdagrad | Adam | AdamW | Ftrl, Field(discriminator="kind")
]


class CountAdmission(_Model):
    """Create a row only once its key was seen `min_count` times.

    Counts of keys not yet admitted live in a count-min sketch of `sketch_width` x 4
    counters per shard, so memory stays bounded however many rare keys arrive; a
    sketch may over-count (admit a key early), never under-count. The counts halve at
    every safe point (`EmbeddingTable.evict`, every `training.evict_every` steps in a
    run), so a key must keep coming back to earn its row: one seen once between two safe
    points never reaches 2. Every sighting of a key in the batch that admits it reads and
    updates its new row, the earlier ones too.
    """

    kind: Literal["count"] = "count"  # chooses it: a table's `admission: {kind: count, ...}`
    min_count: _Int = Field(2, ge=1, le=65535)
    sketch_width: _Int = Field(1 << 16, ge=64, le=1 << 30)


class ProbabilityAdmission(_Model):
    """Create a row with probability `probability`, drawn once per key and step (a key
    seen many times in one batch draws once; reproducible from the key, the table's
    seed and the step)."""

    kind: Literal["probability"] = "probability"  # chooses it: `admission: {kind: probability, probability: ...}`
    probability: _Float = Field(gt=0.0, le=1.0)


def label_column_clash(targets: Sequence[str]) -> str | None:
    """Why a predictions file cannot hold `targets` (None: it can): it holds target T's
    label as column T_label, which may be another target's name."""
    clashing = [t for t in targets if f"{t}_label" in targets]
    if not clashing:
        return None
    target = clashing[0]
    return (f"labels {target!r} and {target + '_label'!r}: a predictions file holds target {target!r}'s label as "
            f"column {target + '_label'!r}, the other target's probability; rename one of them")


def _admits_all(admission: CountAdmission | ProbabilityAdmission | dict | None) -> bool:
    """Whether `admission` (a config, or its saved values) admits every key on first sight."""
    if isinstance(admission, BaseModel):
        admission = admission.model_dump()
    return bool(admission) and (admission.get("min_count") == 1 or admission.get("probability") == 1.0)


class Eviction(_Model):
    """When rows leave the table; applied only at `EmbeddingTable.evict()` safe points.

    `ttl_steps`: a row not looked up for more than this many steps is evicted.
    `capacity_policy`: which rows go when the table is over its row cap: the least
    frequently (`lfu`) or least recently (`lru`) used.
    """

    ttl_steps: _Int | None = Field(None, gt=0)
    capacity_policy: Literal["lfu", "lru"] = "lru"


INDEX_BYTES_PER_ROW = 24  # what a row costs in a table's index and metadata: slots at load <= 0.75, key, last seen


class TableConfig(_Model):
    """One embedding table. See the module docstring for an example.

    `name` identifies it: sparse features name it in `table`, and its checkpoint files
    go in a folder of that name. `dim` is the width of its rows (every table of a run
    has the same). `initializer` gives new rows their values and `optimizer` updates
    them (a kind alone, `optimizer: adagrad`, takes that kind's defaults). `admission`
    decides which new keys get a row (none: every key, on first sight), `eviction`
    which rows leave (none: rows stay, and a table at its row cap refuses new keys).
    `max_rows` or `memory_bytes` caps the rows and `reserve_rows` allocates some ahead
    (see the comments below). `num_shards` is how many parts, each with its own index,
    the keys are spread over by hash, so that several threads (`training.threads`)
    work on them at once.
    """

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.\-]+$")
    dim: _Int = Field(gt=0, le=65536)
    initializer: Initializer = Initializer()
    optimizer: OptimizerConfig = Sgd()
    admission: CountAdmission | ProbabilityAdmission | None = Field(None, discriminator="kind")
    eviction: Eviction | None = None
    # The row cap: `max_rows`, or the rows `memory_bytes` pays for at 4 * (dim + state)
    # + 24 bytes a row. A row count: memory is allocated in chunks of 16,384 rows a shard
    # and the count-admission sketch comes on top.
    max_rows: _Int | None = Field(None, gt=0, lt=1 << 63)
    memory_bytes: _Int | None = Field(None, gt=0, lt=1 << 63)
    # Rows whose memory is allocated and written when the table is built, so that
    # creating them while training faults in no fresh page; the table grows past them.
    # A table loaded from a checkpoint reserves none (a resume may change it).
    reserve_rows: _Int = Field(0, ge=0)
    num_shards: Annotated[Literal[1, 2, 4, 8, 16, 32, 64], pydantic.BeforeValidator(_refuse_boolean)] = 8
    seed: _Int = Field(0, ge=0, lt=1 << 63)  # of the rows' initial values (not training.seed, the dense weights')

    @pydantic.field_validator("optimizer", mode="before")
    @classmethod
    def _optimizer_by_kind(cls, value: Any) -> Any:
        return _kind_alone(value)

    @classmethod
    def from_saved(cls, values: dict) -> TableConfig:
        """A table config read back from a checkpoint: one saved before a field without
        effect was refused still loads (the field has none)."""
        with _reading_saved():
            return cls(**values)

    @pydantic.model_validator(mode="after")
    def _policy_applies(self) -> TableConfig:
        capped = self.max_rows is not None or self.memory_bytes is not None
        if self.eviction is not None:
            _refuse_unused(self.eviction, _unused({"capacity_policy": (capped, "max_rows or memory_bytes")}),
                           "eviction.")
        if _SAVED.get():
            return self
        if self.eviction is not None and self.eviction.ttl_steps is None and not capped:
            raise ValueError("eviction would evict nothing: give it ttl_steps, or give the table max_rows or "
                             "memory_bytes (a cap), or remove it")
        if self.memory_bytes is not None and self.memory_bytes < self.bytes_per_row:
            raise ValueError(f"memory_bytes {self.memory_bytes} pays for no row of {self.bytes_per_row} bytes (4 x "
                             f"(dim + optimizer state) + {INDEX_BYTES_PER_ROW} of index); give at least "
                             f"{self.bytes_per_row}")
        cap = self.row_cap
        if self.eviction is None and cap is not None and cap < self.num_shards:
            setting = f"max_rows {cap}" if cap == self.max_rows else \
                f"memory_bytes {self.memory_bytes} (which pays for {cap} rows)"
            raise ValueError(f"{setting} is under num_shards ({self.num_shards}); without eviction each shard keeps "
                             f"an even share of the cap, so some would take no key: give a cap of at least "
                             f"{self.num_shards} rows, or fewer num_shards")
        if _admits_all(self.admission):
            setting = "min_count 1" if self.admission.kind == "count" else "probability 1.0"  # type: ignore[union-attr]
            raise ValueError(f"admission with {setting} admits every key on first sight, as no admission does: "
                             f"remove it")
        return self

    @property
    def bytes_per_row(self) -> int:
        """What one row costs against `memory_bytes`: values, optimizer state, and about
        `INDEX_BYTES_PER_ROW` of index and metadata."""
        return 4 * (self.dim + self.optimizer.state_width(self.dim)) + INDEX_BYTES_PER_ROW

    @property
    def row_cap(self) -> int | None:
        """The most rows the table keeps: `max_rows`, or what `memory_bytes` pays for."""
        caps = [self.max_rows] if self.max_rows is not None else []
        if self.memory_bytes is not None:
            caps.append(self.memory_bytes // self.bytes_per_row)
        return min(caps) if caps else None

    @pydantic.field_validator("name")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        """A table's checkpoint files go in a folder named after it, beside the
        checkpoint's manifest: names that are that manifest (or the file it is written
        through) or the current and parent folders would clash with the layout."""
        if name in _RESERVED_TABLE_NAMES:
            raise ValueError(f"{name!r} is reserved by the checkpoint layout (a table's files go in a folder named "
                             f"after it): table names may not be {', '.join(map(repr, _RESERVED_TABLE_NAMES))}")
        return name


class EmbeddingFeature(_Model):
    """A sparse feature looked up in `table` and pooled per sample by `pooling`.

    Several features may share one table. Per-id weights, when a batch has them,
    multiply each id's row before pooling (weighted sum / mean / sqrtn).
    """

    name: str = Field(min_length=1, max_length=128)  # the sparse feature's
    table: str = Field(min_length=1, max_length=128)
    pooling: Literal["sum", "mean", "sqrtn"] = "sum"


class SparseFeature(_Model):
    """Raw ids from one column (or a cross of several), looked up in `table`.

    - `separator`: the column holds several values per row ("a|b|c"): a multi-value bag.
    - `weight_separator`: each value of a bag carries its weight after this separator
      ("a:0.5|b:2" with ":"), split at its last occurrence, so ids may hold it (and a
      value without a weight whose id holds it, "item:5", reads as weight 5). The
      weight multiplies the id's row in the pooling: sum gives sum(w * row), mean
      sum(w * row) / n and sqrtn sum(w * row) / sqrt(n) over the n values of the bag.
      A value that is not an id, the separator and a number within float32's range
      is a bad row; neither separator may hold a character of a number.
    - `hashed`: strings become int64 ids with a stable 64-bit hash seeded by `namespace`
      (default: the feature name), so equal strings of two features get different ids
      unless they share a namespace; with ``hashed: false`` the column holds integer ids.
    - `buckets`: the column is a number; its id is the bucket it falls in (boundaries
      ascending; a value equal to a boundary falls in the bucket above it), hashed
      into the namespace.
    - `columns` of two or more: a cross, one id per row from the combined values.
    - `missing`: an empty value gives an empty bag, or the feature's default id.
    - `side`: whom the value describes when serving. A request carries one `user`
      row (a stateful session computes it once and caches it), one row per
      candidate for `item` features, and for `context` features one row per
      candidate or one for all of them.
    """

    kind: Literal["sparse"] = "sparse"  # in a run config's features: `kind: sparse`
    name: str = Field(min_length=1, max_length=128)  # distinct among the run's features; the hash namespace by default
    columns: list[str] = Field(min_length=1)
    table: str = Field(min_length=1, max_length=128)
    pooling: Literal["sum", "mean", "sqrtn"] = "sum"  # how a bag's rows combine: sum, mean, or sum / sqrt(n); bags only
    separator: str | None = Field(None, min_length=1)
    weight_separator: str | None = Field(None, min_length=1)
    hashed: bool = True
    namespace: str | None = None
    buckets: list[Annotated[_Float, Field(allow_inf_nan=False)]] | None = Field(None, min_length=1)
    missing: Literal["empty", "default"] = "empty"
    side: Literal["user", "item", "context"] = "item"

    @pydantic.model_validator(mode="after")
    def _one_shape(self) -> SparseFeature:
        if len(self.columns) > 1 and (self.separator or self.buckets or not self.hashed):
            raise ValueError("a cross (several columns) takes single hashed values: no separator, buckets or hashed=false")
        if sum([self.separator is not None, self.buckets is not None, not self.hashed]) > 1:
            raise ValueError("choose one of separator, buckets and hashed=false: they read the column differently")
        if self.buckets is not None and any(a >= b for a, b in zip(self.buckets, self.buckets[1:])):
            raise ValueError(f"buckets must be ascending, each boundary once, got {self.buckets}")
        if len(set(self.columns)) != len(self.columns):
            raise ValueError(f"a cross takes distinct columns, got {self.columns}")
        if self.weight_separator is not None:
            self._check_weight_separator()
        if self.namespace is not None and not self.hashed:
            raise ValueError("namespace seeds the hash of strings; with hashed=false the ids are read as they are, "
                             "so leave namespace out")
        _refuse_unused(self, _unused({"pooling": (self.separator is not None, "a separator: a bag of several ids "
                                                                               "a row; one id pools alike every way")}))
        return self

    def _check_weight_separator(self) -> None:
        if self.separator is None:
            raise ValueError(f"weight_separator {self.weight_separator!r} splits the values of a bag: it needs a "
                             f"separator (\"a:0.5|b:2\" is separator '|' and weight_separator ':')")
        problem = weighted_bag_problem(self.separator, self.weight_separator)  # type: ignore[arg-type]
        if problem:
            raise ValueError(problem)

    def embedding(self) -> EmbeddingFeature:
        return EmbeddingFeature(name=self.name, table=self.table, pooling=self.pooling)


_NUMBER_CHARS = "0123456789.eE+-"


def weighted_bag_problem(separator: str, weight_separator: str) -> str | None:
    """Why bags split by `separator`, each value "id<weight_separator>weight", could not
    be read (None when they can): neither separator may be empty, hold the other, or
    hold a character of a number."""
    if not separator or not weight_separator:
        return f"separator {separator!r} and weight_separator {weight_separator!r} may not be empty"
    if weight_separator in separator or separator in weight_separator:
        return (f"weight_separator {weight_separator!r} and separator {separator!r} must not hold one another, or a "
                f"bag could not be split")
    for name, text in (("weight_separator", weight_separator), ("separator", separator)):
        if any(c in _NUMBER_CHARS for c in text):
            return (f"{name} {text!r} holds a character of a number ({_NUMBER_CHARS}): a weight could not be told "
                    f"from it")
    return None


class DenseFeature(_Model):
    """A number from `column`; `transform: log` gives sign(x) * log1p(|x|). An empty
    value reads as `missing_value`, untransformed."""

    kind: Literal["dense"] = "dense"  # in a run config's features: `kind: dense`
    name: str = Field(min_length=1, max_length=128)  # distinct among the run's features
    column: str = Field(min_length=1)
    transform: Literal["none", "log"] = "none"  # none: the number as it is; log: as above
    missing_value: _Float = Field(0.0, ge=-_FLOAT32_MAX, le=_FLOAT32_MAX, allow_inf_nan=False)  # a float32
    side: Literal["user", "item", "context"] = "item"  # as for SparseFeature


class LabelFeature(_Model):
    """A prediction target in `column` (0 or 1). `weight` is its share of the loss: the
    loss is the weighted mean of the targets' log losses (the weights normalized to sum
    to 1), so only the targets' relative weights count, and one target's changes nothing."""

    kind: Literal["label"] = "label"  # in a run config's features: `kind: label`
    name: str = Field(min_length=1, max_length=128)  # the target's: in metrics, served outputs, fusion weights
    column: str = Field(min_length=1)
    weight: _Float = Field(1.0, ge=1e-30, le=1e30, allow_inf_nan=False)  # within float32's sums and products


FeatureConfig = Annotated[SparseFeature | DenseFeature | LabelFeature, Field(discriminator="kind")]


class ModelConfig(_Model):
    """The dense network on top of the pooled embeddings, and its output head.

    `kind`: dlrm (bottom MLP, dot interaction, top MLP), deepfm, dcn (DCN-v2) or
    wide_deep. `head`: one linear logit per target, or an MMoE multi-task head.

    `hidden_sizes` are the layer widths of the MLP on top (dlrm's top MLP, the deep MLP
    of the others); `bottom_sizes` those of dlrm's bottom MLP on the dense features,
    before its last layer (of the tables' dim); `cross_layers` is dcn's number of cross
    layers. An MMoE head has `experts` expert MLPs of widths `expert_sizes`, which every
    target mixes by its own gate, and one tower of widths `tower_sizes` per target.
    """

    kind: Literal["dlrm", "deepfm", "dcn", "wide_deep"] = "dlrm"
    bottom_sizes: list[Annotated[_Int, Field(gt=0)]] = Field(default_factory=lambda: [64], min_length=1)
    hidden_sizes: list[Annotated[_Int, Field(gt=0)]] = Field(default_factory=lambda: [128, 64], min_length=1)
    cross_layers: _Int = Field(2, ge=1, le=16)
    head: Literal["linear", "mmoe"] = "linear"
    experts: _Int = Field(4, ge=1, le=64)
    expert_sizes: list[Annotated[_Int, Field(gt=0)]] = Field(default_factory=lambda: [128], min_length=1)
    tower_sizes: list[Annotated[_Int, Field(gt=0)]] = Field(default_factory=lambda: [64], min_length=1)

    def unused_fields(self) -> dict[str, str]:
        """The fields this kind and head do not read, each with what it needs."""
        mmoe = (self.head == "mmoe", "head: mmoe")
        return _unused({"bottom_sizes": (self.kind == "dlrm", "kind: dlrm"),
                        "cross_layers": (self.kind == "dcn", "kind: dcn"),
                        "experts": mmoe, "expert_sizes": mmoe, "tower_sizes": mmoe})

    @pydantic.model_validator(mode="after")
    def _fields_apply(self) -> ModelConfig:
        _refuse_unused(self, self.unused_fields())
        return self


class DataConfig(_Model):
    """Where the samples come from and how they are read.

    `train` and `eval` are each a file, a glob or a list of them (no `eval`: no
    evaluation). `format` is tsv, csv or parquet (none: each file's, from its name:
    .tsv or .txt, .csv, .parquet or .pq, text files optionally gzipped, .gz).
    `on_bad_row`: `skip` counts and skips a bad row, `fail` stops the run at the first.
    `batch_size` is the rows of a batch: a training step's. For `columns`,
    `max_bad_fraction` and `eval_group_by`, see the comments above them.
    """

    train: str | Annotated[list[str], Field(min_length=1)]
    eval: str | list[str] | None = None
    format: Literal["tsv", "csv", "parquet"] | None = None
    # the columns of files without a header, in order: TSV files, and CSV files when csv_header is false
    # (default: Criteo's layout); CSV files with a header line and Parquet files name their own
    columns: list[str] | None = Field(None, min_length=1)
    csv_header: bool = True  # whether CSV files open with a line of column names
    on_bad_row: Literal["skip", "fail"] = "skip"
    # skipped bad rows may be at most this share of the rows read, and of each file's (judged from 10,000 rows on:
    # on_bad_row "fail" allows none at all); 1.0: any number
    max_bad_fraction: _Float = Field(0.1, ge=0.0, le=1.0)
    batch_size: _Int = Field(1024, ge=1, le=1 << 20)
    # a sparse feature of one id a row (a user id, say): evaluations also give the group AUC (GAUC) over its ids
    eval_group_by: str | None = Field(None, min_length=1)

    @pydantic.field_validator("train", "eval", mode="before")
    @classmethod
    def _paths(cls, value: Any, info: pydantic.ValidationInfo) -> Any:
        """A file, a glob or a non-empty list of them (eval may be none)."""
        if info.field_name == "eval" and value in (None, []):
            return value
        if info.field_name == "eval" and value == "" and _SAVED.get():  # no evaluation, as a config saved once said
            return None
        names = [value] if isinstance(value, str) else value
        if not (isinstance(names, list) and names and all(isinstance(v, str) for v in names)):
            raise ValueError(f"expected a file, a glob, or a non-empty list of them (strings), got {_shown(value)}")
        if not all(v.strip() for v in names):  # an unset variable templated in, say: not "no files"
            unset = " (for no evaluation, leave data.eval out or set it to null)" if info.field_name == "eval" else ""
            raise ValueError(f"expected a file, a glob, or a non-empty list of them, got an empty name "
                             f"{_shown(value)}{unset}")
        return value

    @pydantic.field_validator("columns")
    @classmethod
    def _columns_unique(cls, columns: list[str] | None) -> list[str] | None:
        repeated = sorted({c for c in columns or [] if columns.count(c) > 1})
        if repeated:
            raise ValueError(f"data.columns names {repeated} more than once")
        return columns


def check_group_feature(features: Sequence[FeatureConfig], name: str, key: str) -> None:
    """Refuse `name` (at `key`) as the group of a group AUC unless it is a sparse
    feature of one id a row: a multi-value bag has no one group."""
    sparse = {f.name: f for f in features if isinstance(f, SparseFeature)}
    if name not in sparse:
        kind = next((f" (a {f.kind} feature)" for f in features if f.name == name), "")
        single = [n for n, f in sparse.items() if f.separator is None]
        raise ValueError(f"{key} is {name!r}{kind}; expected a sparse feature of one id a row"
                         f"{closest_match(name, single, f' one of {sorted(single)}')}")
    if sparse[name].separator is not None:
        raise ValueError(f"{key} is {name!r}, a multi-value bag (separator {sparse[name].separator!r}); expected a "
                         f"feature of one id a row, whose id is the row's group")


class LrSchedule(_Model):
    """The dense network's learning rate by step: from `training.lr / warmup_steps` up to
    `training.lr` over the first `warmup_steps` steps, then (`decay`: linear or cosine)
    down to `min_lr` over the next `decay_steps`, and `min_lr` after them. The step is the
    run's, so a resumed or warm-started run goes on where its checkpoint was. With
    `tables`, every table's optimizer follows the same curve relative to its own rate:
    its `lr` times the dense rate's share of `training.lr` at that step (FTRL's alpha is
    no step size: a run with FTRL tables refuses `tables`)."""

    warmup_steps: _Int = Field(0, ge=0)
    decay: Literal["none", "linear", "cosine"] = "none"
    decay_steps: _Int | None = Field(None, ge=1)
    min_lr: _Float = Field(0.0, ge=0.0, allow_inf_nan=False)
    tables: bool = False  # the tables' learning rates follow it too

    @pydantic.model_validator(mode="after")
    def _decay_settings(self) -> LrSchedule:
        if self.decay != "none" and self.decay_steps is None:
            raise ValueError(f"decay is {self.decay!r}: give decay_steps, the steps it takes to reach min_lr")
        if self.decay == "none" and (self.decay_steps is not None or self.min_lr != 0.0):
            raise ValueError("decay_steps and min_lr apply to a decay (linear or cosine); decay is 'none': set it, "
                             "or remove them")
        if self.decay == "none" and self.warmup_steps <= 1 and not _SAVED.get():
            raise ValueError(f"a schedule of warmup_steps {self.warmup_steps} and no decay keeps training.lr at every "
                             f"step: give warmup_steps over 1 or a decay, or remove lr_schedule")
        return self

    def lr_at(self, lr: float, step: int) -> float:
        """The learning rate of step `step` (from 1) for a peak of `lr`."""
        if step <= self.warmup_steps:
            return lr * step / self.warmup_steps
        if self.decay == "none":
            return lr
        done = min(1.0, (step - self.warmup_steps) / self.decay_steps)
        share = 1.0 - done if self.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))
        return self.min_lr + (lr - self.min_lr) * share


class DenseAdam(_Model):
    """The dense network's default optimizer, `torch.optim.Adam`; `weight_decay` is an
    L2 term added to the gradient."""

    kind: Literal["adam"] = "adam"  # chooses it: `training.optimizer: {kind: adam, ...}`; the default
    beta1: _Float = Field(0.9, ge=0.0, lt=1.0)  # torch's betas[0]: decay rate of the gradient's running mean
    beta2: _Float = Field(0.999, ge=0.0, lt=1.0)  # torch's betas[1]: decay rate of the squared gradient's running mean
    eps: _Float = Field(1e-8, gt=0.0, allow_inf_nan=False)  # added to the denominator, as torch's
    weight_decay: _Float = Field(0.0, ge=0.0, allow_inf_nan=False)

    def torch_settings(self) -> dict[str, Any]:
        """The keyword arguments of the torch optimizer, the learning rate aside."""
        return {"betas": (self.beta1, self.beta2), "eps": self.eps, "weight_decay": self.weight_decay}


class DenseAdamW(DenseAdam):
    """`torch.optim.AdamW`: Adam with decoupled weight decay: each step first scales
    the weights by 1 - lr * `weight_decay`."""

    kind: Literal["adamw"] = "adamw"  # type: ignore[assignment]
    weight_decay: _Float = Field(0.01, ge=0.0, allow_inf_nan=False)


class DenseSgd(_Model):
    """`torch.optim.SGD`, with `momentum` (and Nesterov's) and an L2 `weight_decay`."""

    kind: Literal["sgd"] = "sgd"  # chooses it: `training.optimizer: {kind: sgd, ...}`, or `optimizer: sgd`
    momentum: _Float = Field(0.0, ge=0.0, lt=1.0)
    nesterov: bool = False  # Nesterov momentum (needs a momentum above 0)
    weight_decay: _Float = Field(0.0, ge=0.0, allow_inf_nan=False)

    @pydantic.model_validator(mode="after")
    def _nesterov_has_momentum(self) -> DenseSgd:
        _refuse_unused(self, _unused({"nesterov": (self.momentum > 0.0, "a momentum above 0")}))
        return self

    def torch_settings(self) -> dict[str, Any]:
        return {"momentum": self.momentum, "nesterov": self.nesterov, "weight_decay": self.weight_decay}


class DenseAdagrad(_Model):
    """`torch.optim.Adagrad` (lr_decay 0), with an L2 `weight_decay`."""

    kind: Literal["adagrad"] = "adagrad"  # chooses it: `training.optimizer: {kind: adagrad, ...}`
    eps: _Float = Field(1e-10, gt=0.0, allow_inf_nan=False)  # added to the accumulator's root, in the denominator
    initial_accumulator_value: _Float = Field(0.0, ge=0.0, allow_inf_nan=False)  # the accumulators' starting value
    weight_decay: _Float = Field(0.0, ge=0.0, allow_inf_nan=False)

    def torch_settings(self) -> dict[str, Any]:
        return {"eps": self.eps, "initial_accumulator_value": self.initial_accumulator_value,
                "weight_decay": self.weight_decay}


DenseOptimizerConfig = Annotated[DenseAdam | DenseAdamW | DenseSgd | DenseAdagrad, Field(discriminator="kind")]


class TrainingConfig(_Model):
    """How long and how fast to train, and where the run writes its logs.

    `device` is where the single-process trainer runs the dense network (`cpu`, the
    reference, by default; `auto` takes a GPU when there is one); the heterogeneous
    engine places its dense workers by `runtime.device`, and keeps the trainer's model
    (evaluated there) on `device`: when the two are one device, the first dense worker
    trains that model in place. `precision: bfloat16`
    trains the dense network under autocast (see `tidal.models.compute_precision`):
    its matrix products run in bfloat16, its weights and optimizer stay float32, and the
    pooled embeddings enter it as bfloat16. `auto` is bfloat16 where the device computes
    it natively (GPUs, CPUs with AMX or AVX512-BF16), float32 elsewhere.
    """

    epochs: _Int = Field(1, ge=1)  # passes over data.train
    lr: _Float = Field(1e-3, gt=0.0, allow_inf_nan=False)  # the dense network's optimizer's
    optimizer: DenseOptimizerConfig = Field(default_factory=DenseAdam)  # the dense network's: adam, adamw, sgd, adagrad
    clip_grad_norm: _Float | None = Field(None, gt=0.0, allow_inf_nan=False)  # of the dense weights' gradient
    seed: _Int = Field(0, ge=0, lt=1 << 63)  # the dense weights'; each table's rows follow its own `seed`
    log_every: _Int = Field(50, ge=1)  # steps between progress records (metrics.jsonl, and a printed line)
    threads: _Int = Field(1, ge=1, le=256)  # of the tables' lookups, pooling and updates
    device: str = Field("cpu", pattern=DEVICE_PATTERN)
    run_dir: str = Field("runs/latest", min_length=1)  # the run's folder: metrics.jsonl, checkpoints/, telemetry.json
    checkpoint_every: _Int | None = Field(None, ge=1)  # steps between checkpoints; None: only at the end
    keep_checkpoints: _Int = Field(1, ge=1, le=10_000)  # the newest kept, each whole (an older one to fall back on)
    eval_every: _Int | None = Field(None, ge=1)  # steps between evaluations on data.eval; None: only at the end
    evict_every: _Int = Field(100, ge=1)  # steps between the safe points where tables with eviction or admission evict
    precision: Literal["float32", "bfloat16", "auto"] = "float32"  # of the dense network's products in training
    lr_schedule: LrSchedule | None = None  # warmup and decay of `lr`; None: `lr` throughout

    @pydantic.field_validator("optimizer", mode="before")
    @classmethod
    def _adam_by_default(cls, value: Any) -> Any:
        """A kind alone (`optimizer: sgd`) takes that optimizer's defaults; settings
        without a kind are the default optimizer's (Adam's)."""
        value = _kind_alone(value)
        if not isinstance(value, dict) or "kind" in value:
            return value
        foreign = sorted(set(value) - set(DenseAdam.model_fields))
        if foreign:
            kinds = ", ".join(repr(k) for k in _tags_in(DenseOptimizerConfig, "kind"))
            raise ValueError(f"settings without a kind are those of the default optimizer, adam, and {foreign} are "
                             f"not adam's: give the kind too (one of {kinds})")
        return {"kind": "adam", **value}

    @pydantic.model_validator(mode="after")
    def _decays_down(self) -> TrainingConfig:
        schedule = self.lr_schedule
        if schedule is not None and schedule.min_lr > self.lr:
            raise ValueError(f"lr_schedule.min_lr is {schedule.min_lr}, above lr ({self.lr}): a decay goes "
                             f"down to min_lr; give one of at most {self.lr}")
        if schedule is not None and schedule.decay != "none" and schedule.min_lr == self.lr and not _SAVED.get():
            raise ValueError(f"lr_schedule.min_lr is {schedule.min_lr}, lr itself: the {schedule.decay} decay would "
                             f"keep lr at every step after the warmup; give a min_lr below {self.lr}, or leave the "
                             f"decay out (decay: none, without decay_steps and min_lr)")
        return self

    def lr_at(self, step: int) -> float:
        """The dense network's learning rate at step `step` of the run."""
        return self.lr if self.lr_schedule is None else self.lr_schedule.lr_at(self.lr, step)

    @property
    def schedules_tables(self) -> bool:
        """Whether the tables' learning rates follow the schedule (`lr_schedule.tables`)."""
        return self.lr_schedule is not None and self.lr_schedule.tables

    def table_lr_scale(self, step: int) -> float:
        """The factor on every table's learning rate at step `step` (with `schedules_tables`)."""
        return self.lr_at(step) / self.lr


class RuntimeConfig(_Model):
    """The heterogeneous engine: N sparse workers feeding M dense workers.

    `backend`: `local` (threads in this process, shared tables) or `ray` (the same
    workers as Ray actors, tables in embedding-shard actors; `ray_address` names an
    existing cluster; none: that of the Ray job the run is (`RAY_ADDRESS`), else a local
    Ray of the run's own, even where another Ray runs). `mode`: `sync` lands every batch's
    sparse update before the next batch's lookup (parsing and extraction run ahead);
    `async` lets up to `max_inflight` batches sit between lookup and update.
    `transfer_dtype` is how pooled embeddings and their gradients travel; `auto` is
    bfloat16 when they leave the process or go to a GPU, and float32 when they stay
    in the same memory (local backend on CPU: passed without a copy, so a cast would
    only cost time). float16 gradients are scaled by up to `loss_scale` (less when
    they would overflow). `dense_threads` sets torch's threads for the dense math
    (process-wide on the local backend); none leaves torch's default. `device` places
    the dense workers: `auto` is one GPU per dense worker when there are GPUs (round
    robin), else the CPU; `cpu`, `cuda` or `cuda:N` force it.
    `sparse_workers_at` changes the number of sparse workers at given steps, for
    example ``{1000: 4, 5000: 2}``; the number counts the colocated worker when there
    is one (`{10: 2}` after 2 sparse workers and the colocated one retires one).
    `sparse_nice` is the nice value (0-19, Linux) the threads doing sparse work run at:
    the dense workers, the usual bottleneck on a CPU and the feeders of a GPU, then get
    a core as soon as they want one, and the sparse work fills the time they leave; 0
    runs everything alike.
    """

    backend: Literal["local", "ray"] = "local"
    sparse_workers: _Int = Field(1, ge=1, le=MAX_SPARSE_WORKERS)  # N: each reads and pools batches and applies their sparse updates
    dense_workers: _Int = Field(1, ge=1, le=64)  # M: each trains on a row slice of every batch; gradients all-reduced
    mode: Literal["sync", "async"] = "sync"
    max_inflight: _Int = Field(4, ge=1, le=1024)
    read_ahead: _Int = Field(4, ge=1, le=1024)  # batches parsed and extracted ahead, per sparse worker
    transfer_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    dense_threads: _Int | None = Field(None, ge=1, le=256)
    device: str = Field("auto", pattern=DEVICE_PATTERN)
    loss_scale: _Float = Field(1024.0, ge=1.0, le=2.0**24)
    colocated_sparse_worker: bool = False  # one more sparse worker beside the first dense worker
    embedding_shards: _Int = Field(1, ge=1, le=256)  # ray: embedding-shard actors (tables placed table-wise)
    ray_address: str | None = None
    telemetry_every_s: _Float = Field(5.0, gt=0.0)  # seconds between telemetry lines (kept in telemetry.json)
    sparse_nice: _Int = Field(10, ge=0, le=19)
    sparse_workers_at: dict[Annotated[_Int, Field(ge=1)], Annotated[_Int, Field(ge=1, le=MAX_SPARSE_WORKERS)]] = \
        Field(default_factory=dict)

    @pydantic.model_validator(mode="after")
    def _fields_apply(self) -> RuntimeConfig:
        ray = (self.backend == "ray", "backend: ray")
        _refuse_unused(self, _unused({"ray_address": ray, "embedding_shards": ray,
                                      "max_inflight": (self.mode == "async", "mode: async"),
                                      "loss_scale": (self.transfer_dtype == "float16", "transfer_dtype: float16")}))
        if _SAVED.get():  # a saved run's schedule, accepted when it ran
            return self
        workers = self.sparse_workers + int(self.colocated_sparse_worker)
        among = " (the colocated one among them)" if self.colocated_sparse_worker else ""
        for step, count in sorted(self.sparse_workers_at.items()):
            if count == workers:
                raise ValueError(f"sparse_workers_at {{{step}: {count}}} changes nothing: the run has {count} sparse "
                                 f"worker{'s' * (count != 1)} then already{among}; give each step a new count, or "
                                 f"leave it out")
            workers = count
        return self


MAX_BATCHES_PER_PASS = 1 << 20


class PassModeConfig(_Model):
    """HPC pass mode (as AIBox and HugeCTR's HBM parameter server train): the run trains
    in passes of `batches_per_pass` batches.

    Before a pass, each table looks its keys up (each key once, at the step of the
    batch that first holds it; every sighting in a table with admission, LFU eviction
    or a row cap without eviction), creating, admitting and refusing rows as the
    reference trainer does, and the pass's rows move to `training.device` by their
    difference with the last pass's: rows both use stay there, and only the others
    move. The pass then trains with plain index gathers and adds on that device. Every
    row goes back to its table before a checkpoint, an evaluation, an eviction and the
    end of the run, which therefore fall at the ends of passes:
    `training.checkpoint_every`, `eval_every` and (for tables that evict or admit)
    `evict_every` must be multiples of `batches_per_pass`.
    With `look_ahead`, the next pass is read, extracted and planned, and its rows
    pulled, while this one trains (not across those points, where the tables change).
    """

    batches_per_pass: _Int = Field(50, ge=1, le=MAX_BATCHES_PER_PASS)  # 50 divides evict_every's default, 100
    look_ahead: bool = True


class Fusion(_Model):
    """The value model: one score per candidate from the targets' probabilities.

    `product`: score = prod_t p_t ** weights[t] (a weighted product of powers);
    `sum`: score = sum_t weights[t] * p_t. Targets left out of `weights` do not count;
    empty `weights` gives every target the weight 1.
    """

    kind: Literal["product", "sum"] = "product"  # product or sum, as above
    weights: dict[str, Annotated[pydantic.StrictFloat, Field(allow_inf_nan=False)]] = Field(default_factory=dict)

    @pydantic.model_validator(mode="after")
    def _scores_finite(self) -> Fusion:
        negative = {t: w for t, w in self.weights.items() if w < 0}
        if self.kind == "product" and negative:
            raise ValueError(f"a product's powers must be >= 0 (a zero probability would score infinity), got {negative}")
        total = sum(abs(w) for w in self.weights.values())
        if self.weights and total == 0.0:
            raise ValueError(f"every weight is 0, so every candidate would score the same; give a target a weight "
                             f"(or leave weights out: 1 each), got {dict(self.weights)}")
        if self.kind == "sum" and total > _FLOAT32_MAX:
            raise ValueError(f"a sum's weights must add up (in absolute value) to at most {_FLOAT32_MAX:.4g}, "
                             f"float32's largest number, so that scores stay finite; got {total:.4g}")
        return self


class ServingConfig(_Model):
    """How `tidal serve` batches, splits, pads and caches (see `tidal.serving`).

    Rows of concurrent requests merge into one batch up to `max_batch_rows`, a batch
    lingering up to `max_delay_ms` for more rows while requests come closer than that
    (see `tidal.serving.batcher`); a request of more than
    `chunk_rows` candidates is cut into about equal chunks that run in parallel. The
    dense network only sees batch sizes from `buckets` (batches are padded).
    `max_queue_rows` bounds the rows waiting; beyond it a request gets 503. A request
    body may hold `max_body_bytes` (413 beyond), and the bodies of the requests under
    way together `max_held_body_bytes` (compressed and decompressed; by default 16
    bodies of the largest size, 512 MiB; a request that would pass it gets 503): many
    slow or big requests at once hold bounded memory (decoded, a body's inputs may take
    some ten times its bytes).
    `dense_threads` is the dense network's thread count in the serving process (torch's,
    process-wide, which the aotinductor backend's products use too: of Services open at
    once in one process, the latest one's holds, and the last to close puts the count
    from before back; or ONNX Runtime's intra-op threads): 1 by default, since serving
    batches are small and idle OpenMP threads spin on the cores the sparse stage and
    the HTTP loop need. With `delta_poll_s`, the server looks for new
    deltas of its bundle (`tidal export --delta`) that often and applies them; without
    it, on `POST /v2/repository/models/{name}/load`. `backend` runs the dense network:
    `torch` (its `torch.export` program, on the CPU or a GPU) or `onnxruntime` (ONNX
    Runtime on the CPU, several times faster at small batches; the bundle then holds
    an ONNX model as well, checked against the program when it is written: `tidal
    export --backend onnxruntime`) or `aotinductor` (the network compiled to native code
    for the exporting CPU by AOTInductor, which needs a C++ compiler where the bundle is
    written: `tidal export --backend aotinductor`; checked as the ONNX model is). With `rewrite` (the default), the torch backend runs
    the program rewritten by `tidal.compile.rules`, each checked against the
    program when the bundle (or a delta) is loaded: the same scores from fewer
    operators, up to twice as fast at small batches (`tidal bench rewrite`).
    """

    fusion: Fusion = Fusion()  # the value model: a candidate's score from its targets' probabilities
    buckets: list[Annotated[_Int, Field(gt=0, le=1 << 16)]] = Field(default_factory=lambda: [1, 4, 16, 64, 256, 1024],
                                                                   min_length=1)
    max_batch_rows: _Int = Field(1024, ge=1, le=1 << 16)
    max_delay_ms: _Float = Field(2.0, ge=0.0, le=10_000.0)
    chunk_rows: _Int = Field(256, ge=1, le=1 << 16)
    sparse_threads: _Int = Field(2, ge=1, le=256)  # the sparse stage's (extract, look up, pool); each runs one batch
    dense_threads: _Int | None = Field(1, ge=1, le=256)  # None: torch's default, or one per core for onnxruntime
    max_queue_rows: _Int = Field(65_536, ge=1)
    max_body_bytes: _Int = Field(32 << 20, ge=1024)
    max_held_body_bytes: _Int | None = Field(None, ge=1024)  # None: 16 x max_body_bytes
    session_ttl_s: _Float = Field(300.0, gt=0.0)  # seconds a stateful session may sit idle before it is dropped
    session_memory_bytes: _Int = Field(256 << 20, ge=1024)  # the session cache's cap: the least recently used go first
    table_dtype: Literal["float32", "float16"] = "float32"  # how the bundle stores the tables
    delta_poll_s: _Float | None = Field(None, ge=0.01, le=86_400.0)  # between looks for new deltas; None: on request
    backend: Literal["torch", "onnxruntime", "aotinductor"] = "torch"  # what runs the dense network
    rewrite: bool = True  # the torch backend runs the program rewritten (false: as exported)

    @pydantic.model_validator(mode="after")
    def _fits_buckets(self) -> ServingConfig:
        if sorted(set(self.buckets)) != self.buckets:
            raise ValueError(f"buckets must be distinct and ascending, got {self.buckets}")
        if self.max_batch_rows > self.buckets[-1]:
            raise ValueError(f"max_batch_rows ({self.max_batch_rows}) must fit the largest bucket ({self.buckets[-1]})")
        if self.chunk_rows > self.max_batch_rows:
            raise ValueError(f"chunk_rows ({self.chunk_rows}) must be at most max_batch_rows ({self.max_batch_rows})")
        if self.max_held_body_bytes is not None and self.max_held_body_bytes < self.max_body_bytes:
            raise ValueError(f"max_held_body_bytes ({self.max_held_body_bytes}) must be at least max_body_bytes "
                             f"({self.max_body_bytes}): else a body of the allowed size could never be held")
        return self

    @property
    def held_body_bytes(self) -> int:
        """The bytes of request bodies the server holds at once, at most."""
        return self.max_held_body_bytes if self.max_held_body_bytes is not None else 16 * self.max_body_bytes


class RunConfig(_Model):
    """One YAML file: data, features, tables, model and training; with `runtime`, the
    heterogeneous engine trains it, with `passmode` the pass-mode trainer, with
    neither the single-process reference trainer. `data`, `features` (at least one
    label and one sparse feature), `tables` (those the sparse features read), `model`,
    `training` and `serving` are the sections of those names."""

    data: DataConfig
    features: list[FeatureConfig] = Field(min_length=1)
    tables: list[TableConfig] = Field(min_length=1)
    model: ModelConfig = ModelConfig()
    training: TrainingConfig = TrainingConfig()
    runtime: RuntimeConfig | None = None
    passmode: PassModeConfig | None = None
    serving: ServingConfig = ServingConfig()

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        for kind, names in (("feature", [f.name for f in self.features]), ("table", [t.name for t in self.tables])):
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise ValueError(f"{kind} names must be distinct, got {repeated} more than once")
        dims = {t.name: t.dim for t in self.tables}
        if len(set(dims.values())) > 1:
            raise ValueError(f"every table must have the same dim (pooled embeddings are [B, F, D]), got {dims}")
        tables = {t.name for t in self.tables}
        for feature in self.features:
            if isinstance(feature, SparseFeature) and feature.table not in tables:
                raise ValueError(f"feature {feature.name!r} uses table {feature.table!r}, which is not defined; "
                                 f"tables: {sorted(tables)}")
        if not any(isinstance(f, LabelFeature) for f in self.features):
            raise ValueError("features need at least one label (kind: label)")
        if not any(isinstance(f, SparseFeature) for f in self.features):
            raise ValueError("features need at least one sparse feature (kind: sparse)")
        targets = [f.name for f in self.features if isinstance(f, LabelFeature)]
        if "score" in targets:
            raise ValueError("a label may not be named 'score': the server's fused score has that name, and would "
                             "hide the target's probability; rename the label")
        if (clash := label_column_clash(targets)) and not _SAVED.get():
            raise ValueError(clash)
        unknown = sorted(set(self.serving.fusion.weights) - set(targets))
        if unknown:
            raise ValueError(f"serving.fusion.weights names {unknown}, which are not targets; targets: {targets}")
        self._check_eval_group()
        if self.training.eval_every is not None and not self.data.eval and not _SAVED.get():
            raise ValueError(f"training.eval_every is {self.training.eval_every}, but data.eval names no files to "
                             f"evaluate on: set data.eval, or remove eval_every")
        self._check_passmode()
        self._check_unused()
        self._check_input_columns()
        ftrl = [t.name for t in self.tables if isinstance(t.optimizer, Ftrl)]
        if self.training.schedules_tables and ftrl:
            raise ValueError(f"training.lr_schedule.tables: tables {ftrl} use FTRL, whose alpha sets the scale of "
                             f"the weights rather than a step size (a schedule would move every weight, and a rate "
                             f"of 0 divides by 0); use another optimizer there, or leave tables out of the schedule")
        return self

    @property
    def evicts(self) -> bool:
        """Whether some table evicts or admits: `training.evict_every` has work then."""
        return any(t.eviction is not None or t.admission is not None for t in self.tables)

    def _check_unused(self) -> None:
        """Refuse what would have no effect: a table no feature reads, the weight of a
        lone label, `evict_every` where no table evicts or admits, embedding shards
        beyond the tables."""
        if _SAVED.get():
            return
        read = {f.table for f in self.features if isinstance(f, SparseFeature)}
        unread = [t.name for t in self.tables if t.name not in read]
        if unread:
            raise ValueError(f"tables {unread} are read by no sparse feature: remove them, or name them in a "
                             f"feature's table")
        labels = [f for f in self.features if isinstance(f, LabelFeature)]
        if len(labels) == 1 and labels[0].weight != 1.0:
            raise ValueError(f"label {labels[0].name!r}: weight {labels[0].weight:g} would have no effect (a weight "
                             f"is a target's share of the loss, and this is the only target): remove it")
        if self.training.evict_every != TrainingConfig.model_fields["evict_every"].default and not self.evicts:
            raise ValueError(f"training.evict_every ({self.training.evict_every}) would have no effect: no table has "
                             f"an eviction or admission policy; remove it")
        if self.runtime is not None and self.runtime.embedding_shards > len(self.tables):
            raise ValueError(f"runtime.embedding_shards is {self.runtime.embedding_shards}, but tables go to shard "
                             f"actors whole and there are {len(self.tables)}: give at most {len(self.tables)}")

    def _check_input_columns(self) -> None:
        """Refuse a label column read by an input feature: the model would learn the
        target from itself, and ask it of every request served; and an input column
        of the name a bag column's lengths are served under (`BAG_LENGTHS`)."""
        if _SAVED.get():
            return
        labels = {f.column: f.name for f in self.features if isinstance(f, LabelFeature)}
        lengths = {c + BAG_LENGTHS for f in self.features if isinstance(f, SparseFeature) and f.separator
                   for c in f.columns}
        for feature in self.features:
            columns = feature.columns if isinstance(feature, SparseFeature) else \
                [feature.column] if isinstance(feature, DenseFeature) else []
            leaked = [c for c in columns if c in labels]
            if leaked:
                raise ValueError(f"feature {feature.name!r} reads column {leaked[0]!r}, which label "
                                 f"{labels[leaked[0]]!r} reads: a model given its target as an input learns nothing "
                                 f"it could serve; read another column")
            clash = [c for c in columns if c in lengths]
            if clash:
                raise ValueError(f"feature {feature.name!r} reads column {clash[0]!r}, the name of the served input "
                                 f"that may carry bag column {clash[0].removesuffix(BAG_LENGTHS)!r}'s lengths; "
                                 f"rename the column")

    def _check_eval_group(self) -> None:
        group = self.data.eval_group_by
        if group is None:
            return
        if not self.data.eval and not _SAVED.get():
            raise ValueError(f"data.eval_group_by is {group!r}, but data.eval names no files to evaluate on: set "
                             f"data.eval, or remove eval_group_by")
        check_group_feature(self.features, group, "data.eval_group_by")

    def _check_passmode(self) -> None:
        if self.passmode is None:
            return
        if self.runtime is not None:
            raise ValueError("runtime (the heterogeneous engine) and passmode are two ways to train a run: keep one")
        every = self.passmode.batches_per_pass
        due = {"checkpoint_every": self.training.checkpoint_every, "eval_every": self.training.eval_every,
               "evict_every": self.training.evict_every if self.evicts else None}
        for key, steps in due.items():
            if steps is not None and steps % every:
                default = "" if key in self.training.model_fields_set else " (its default)"
                raise ValueError(f"training.{key} is {steps}{default}, but in pass mode it falls at the end of a pass: "
                                 f"give a multiple of passmode.batches_per_pass ({every}), e.g. "
                                 f"{max(1, round(steps / every)) * every}")

    @classmethod
    def from_saved(cls, values: dict) -> RunConfig:
        """A config read back from a checkpoint or a bundle: one saved before a field
        without effect was refused still loads (the field has none)."""
        with _reading_saved():
            return cls(**values)

    @classmethod
    def from_yaml(cls, path: str, overrides: Sequence[str] = ()) -> RunConfig:
        """Load and validate a YAML run config; errors name the key path and the value.
        `overrides` are `KEY.PATH=VALUE` entries (`tidal train --set`) applied to what the
        file gives before it is validated (`override`)."""
        import yaml

        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            content = yaml.load(text, Loader=yaml_loader())
        except ConfigError as exc:  # from the loader
            raise ConfigError(f"{path}: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the config ({exc.strerror})") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text ({exc})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML{_yaml_problem(exc)}") from None
        if not isinstance(content, dict):
            got = "nothing (the file is empty, or comments only)" if content is None else type(content).__name__
            raise ConfigError(f"{path}: expected a mapping with data, features, tables, model, training; got {got}")
        if overrides:
            content = _unshared(content)  # a YAML alias shares its anchor's mapping: --set changes one place
        for entry in overrides:
            override(content, entry)
        try:
            _check_keys(content)
            return cls(**content)
        except ConfigError as exc:
            given = "".join(f" --set {shlex.quote(entry)}" for entry in overrides)
            given = f" with{given}" if given else ""
            raise ConfigError(f"{path}{given}: {exc}") from None


_NUMBERED = ("sparse_workers_at",)  # the mappings whose keys are numbers (steps), not names


def _check_keys(node: Any, where: str = "", checked: set[int] | None = None) -> None:
    """Refuse a key that is not a name anywhere in YAML content (but in `_NUMBERED`):
    YAML reads an unquoted `on`, `yes`, `null` or `1` as a boolean, null or number. A
    mapping or list that aliases share is checked once (`checked`: their ids)."""
    checked = set() if checked is None else checked
    if id(node) in checked:
        return
    checked.add(id(node))
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        if isinstance(node, dict) and not isinstance(key, str) and where.rpartition(".")[2] not in _NUMBERED:
            raise ConfigError(f"{where or 'the config'}: the key {key!r} is not a name (YAML reads an unquoted on, "
                              f"off, yes, no, null or number as {type(key).__name__}); quote it, or remove it")
        if isinstance(value, (dict, list)):
            _check_keys(value, f"{where}.{key}" if where else str(key), checked)


def _unshared(node: Any, budget: list[int] | None = None) -> Any:
    """A copy of YAML content in which no mapping or list appears twice (as an anchor
    and its aliases do; `copy.deepcopy` keeps them shared). Aliases of aliases expand
    exponentially: past `_MOST_VALUES` values, refused."""
    budget = [_MOST_VALUES] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0:
        raise ConfigError(f"the config holds more than {_MOST_VALUES:,d} values once its YAML aliases are expanded")
    if isinstance(node, dict):
        return {key: _unshared(value, budget) for key, value in node.items()}
    if isinstance(node, list):
        return [_unshared(value, budget) for value in node]
    return node


_MOST_VALUES = 1_000_000


def override(content: dict, entry: str) -> None:
    """Set one value of a run config's YAML content from `KEY.PATH=VALUE` (`--set`): the
    value is read as YAML; a list's element is named by its `name` (`tables.items.dim`)
    or its index (`features.0.table`); missing mappings on the way are made."""
    import yaml

    key, equals, text = entry.partition("=")
    parts = key.strip().split(".")
    if not equals or not all(parts) or not text.strip():
        raise ConfigError(f"--set takes KEY.PATH=VALUE (training.lr=0.01, tables.items.dim=32), got {entry!r}")
    try:
        value = yaml.load(text, Loader=yaml_loader())
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: the value is not YAML: {exc}") from None
    node: Any = content
    depth = 0
    while depth < len(parts):
        where, part = ".".join(parts[:depth]) or "the config", parts[depth]
        if isinstance(node, list):
            index, used = _element(node, parts[depth:], key, where)
            depth += used
            if depth == len(parts):
                node[index] = value
            node = node[index]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {where} is {node!r}, not a mapping or a list to set {part!r} in")
        depth += 1
        if depth == len(parts):
            node[part] = value
        elif node.get(part) is None:
            node[part] = {}
        node = node[part]


def _element(items: list, parts: list[str], key: str, where: str) -> tuple[int, int]:
    """The index of the element the first of `parts` names in the list `items`, and how
    many parts the name took: its `name` (which `parts` joined by dots may spell, since
    a name may hold dots; a key that spells two names is refused), or its index."""
    names = [item.get("name") if isinstance(item, dict) else None for item in items]
    spelled = [used for used in range(1, len(parts) + 1) if ".".join(parts[:used]) in names]
    if len(spelled) > 1:
        them = " and ".join(repr(".".join(parts[:used])) for used in spelled)
        raise ConfigError(f"--set {key}: {where} has elements named {them}, so the key could mean either; name the "
                          f"element by its index")
    if spelled:
        return names.index(".".join(parts[: spelled[0]])), spelled[0]
    if parts[0].isdigit() and int(parts[0]) < len(items):
        return int(parts[0]), 1
    named = ", ".join(str(n) for n in names if n is not None) or "none"
    indexes = f"; or an index from 0 to {len(items) - 1}" if items else "; it is empty"
    raise ConfigError(f"--set {key}: {where} has no element named {parts[0]!r} (its names: {named}{indexes})")


def effective_fields(config: dict) -> dict:
    """A run config's values (as `model_dump(mode="json")` gives them) without the
    fields that have no effect, which a config saved before they were refused may hold:
    the tables no sparse feature reads, a lone label's weight, the pooling of a feature of
    one id a row, and a table's (`effective_table_fields`). Two configs that differ only
    there train alike."""
    features = config.get("features", [])
    read = {f.get("table") for f in features if f.get("kind") == "sparse"}
    labels = [f for f in features if f.get("kind") == "label"]
    return {**config, "tables": [effective_table_fields(t) for t in config.get("tables", []) if t.get("name") in read],
            "features": [_effective_feature_fields(f, lone_label=len(labels) == 1) for f in features]}


def _effective_feature_fields(feature: dict, *, lone_label: bool) -> dict:
    if feature.get("kind") == "label" and lone_label:
        return {k: v for k, v in feature.items() if k != "weight"}
    if feature.get("kind") == "sparse" and feature.get("separator") is None:
        return {k: v for k, v in feature.items() if k != "pooling"}
    return feature


def effective_table_fields(table: dict) -> dict:
    """A table config's values without a zeros initializer's scale, an eviction's
    capacity policy without a row cap, an eviction that evicts nothing and an admission
    of every key (see `effective_fields`)."""
    table = dict(table)
    capped = table.get("max_rows") is not None or table.get("memory_bytes") is not None
    if (table.get("initializer") or {}).get("kind") == "zeros":
        table["initializer"] = {k: v for k, v in table["initializer"].items() if k != "scale"}
    if table.get("eviction") and not capped:
        table["eviction"] = {k: v for k, v in table["eviction"].items() if k != "capacity_policy"}
        if table["eviction"].get("ttl_steps") is None:
            table["eviction"] = None
    if _admits_all(table.get("admission")):
        table["admission"] = None
    return table


@contextmanager
def _reading_saved() -> Iterator[None]:
    token = _SAVED.set(True)
    try:
        yield
    finally:
        _SAVED.reset(token)


def require(value: Any, kind: type | tuple[type, ...], where: str) -> None:
    """A `ConfigError` unless `value` is a `kind` (a config object where a dict came, say)."""
    if not isinstance(value, kind):
        kinds = kind if isinstance(kind, tuple) else (kind,)
        hint = f"; build one with {kinds[0].__name__}(**values)" if isinstance(value, dict) else ""
        raise ConfigError(f"{where}: expected {' or '.join(k.__name__ for k in kinds)}, got {type(value).__name__}{hint}")


def is_whole_number(value: Any) -> bool:
    """Whether `value` is an integer (Python's or numpy's), and not a boolean."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """Whether `value` is a finite real number (an integer or a float), and not a boolean."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def require_threads(threads: Any, where: str) -> None:
    """A `ConfigError` unless `threads` is a whole number of threads, 1 or more."""
    if not is_whole_number(threads) or threads < 1:
        raise ConfigError(f"{where}: threads must be an integer >= 1, got {threads!r}")


def _yaml_problem(exc: Exception) -> str:
    """Where and what a YAML error is, on one line: " at line 3, column 6: expected ... (while
    parsing a flow sequence at line 2)"."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if mark is None or problem is None:
        return f" ({exc})"
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    started = f" ({context} at line {context_mark.line + 1})" if context and context_mark else ""
    return f" at line {mark.line + 1}, column {mark.column + 1}: {problem}{started}"


def yaml_loader() -> type:
    """yaml's safe loader, with YAML 1.2's floats (`1e3` and `1e-3` are numbers, not strings), refusing a
    mapping that names a key twice (plain YAML keeps the last silently) and, with a
    `ConfigError`, an optional section written with nothing under it (YAML reads it as
    null, which would mean no such section: `eviction:` would turn eviction off)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):  # type: ignore[no-untyped-def]
            seen = set()
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys, which the base loader merges
                    continue
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, (str, int, float, bool, type(None))):
                    continue  # an unhashable key: the base loader says so
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} appears twice in one mapping",
                                                            key_node.start_mark)
                seen.add(key)
                if value_node.tag == "tag:yaml.org,2002:null" and value_node.value == "":
                    _refuse_blank_section(key, key_node.start_mark.line + 1)
            return super().construct_mapping(node, deep=deep)

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))
    return Loader


def _refuse_blank_section(key: Any, line: int) -> None:
    """A section written with nothing under it (YAML's null) where settings belong."""
    if key in _SECTIONS:
        defaults = " ({} for the defaults)" if key in ("runtime", "passmode") else ""
        raise ConfigError(f"line {line}: {key}: has no value; give its settings{defaults}, or remove it (or write "
                          f"{key}: null)")
    if key in _SETTINGS:
        remove = "" if key == "data" else ", or remove it for the defaults"
        raise ConfigError(f"line {line}: {key}: has no value; give its settings{remove}")


_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


def _describe(where: str, exc: pydantic.ValidationError, values: dict, model: type[BaseModel] | None = None) -> str:
    return "\n".join(f"{where}: {msg}" if path == "(root)" else f"{where}: {path}: {msg}"
                     for path, msg in _problems(exc, values, model))


def _problems(exc: pydantic.ValidationError, values: dict,
              model: type[BaseModel] | None = None) -> list[tuple[str, str]]:
    """(dotted path, 'what is wrong, got value') for every error, nested ones flattened.
    `model` is the class `values` were given to: an unknown key's message lists its keys."""
    found = []
    for err in exc.errors(include_url=False):
        inner = err.get("ctx", {}).get("error")
        nested = isinstance(inner, ConfigError) and hasattr(inner, "problems")
        parts = _keys_of(err["loc"], values, inside=nested)
        if nested:
            found += [(_joined(parts, sub, err["loc"], values), msg) for sub, msg in inner.problems]
        elif err["type"] in ("extra_forbidden", "missing"):  # the path ends at the key: name the place that has it
            place = _joined(parts[:-1], "(root)", err["loc"][:-1], values)
            found.append((place, _key_problem(err, model if len(err["loc"]) == 1 else None)))
        elif err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            found.append((_joined(parts, "(root)", err["loc"], values), _tag_problem(err, model)))
        elif err["type"] == "value_error":  # our own check: its message says what came
            found.append((".".join(parts) or "(root)", err["msg"].removeprefix("Value error, ")))
        else:
            found.append((".".join(parts) or "(root)", f"{_readable_bound(err)}, got {_shown(err.get('input'))}"))
    return found


_BOUNDS = {"less_than_equal": ("le", "less than or equal to"), "greater_than_equal": ("ge", "greater than or equal to"),
           "less_than": ("lt", "less than"), "greater_than": ("gt", "greater than")}


def _readable_bound(err: Any) -> str:
    """pydantic's message, with a bound it writes in 39 digits (float32's largest)
    or 30 decimals written as Python does: 3.4028234663852886e+38, 1e-30."""
    key, words = _BOUNDS.get(err["type"], (None, None))
    bound = err.get("ctx", {}).get(key)
    if isinstance(bound, float) and not 1e-4 <= abs(bound) < 1e16 and bound != 0:
        return f"Input should be {words} {bound!r}"
    return err["msg"]


def _joined(parts: list[str], sub: str, loc: tuple, values: Any) -> str:
    """`parts` then a nested model's own path `sub`; where `sub` is that model itself,
    a list item is named by its `name`: ``features.0 (user)``."""
    if sub != "(root)":
        return ".".join([*parts, sub])
    return ".".join(parts) + _item_name(loc, values) if parts else "(root)"


def _item_name(loc: tuple, values: Any) -> str:
    """" (NAME)" when `loc` reaches a list item with a string `name`, else ""."""
    index = None
    for part in loc:
        if _holds(values, part):
            index, values = (part if isinstance(values, list) else None), values[part]
    name = values.get("name") if isinstance(values, dict) else None
    return f" ({name})" if index is not None and isinstance(name, str) and 0 < len(name) <= 128 else ""


def _key_problem(err: dict, model: type[BaseModel] | None) -> str:
    """An unknown key, with the closest allowed one and the allowed keys, or a missing one."""
    key = str(err["loc"][-1])
    if err["type"] == "missing":
        return f"required key {key!r} is missing"
    allowed = sorted(model.model_fields) if model is not None else []
    listed = f" allowed: {', '.join(allowed)}" if allowed else ""
    sections = _sections()
    home = [name for name, section in sections.items() if key in section.model_fields and section is not model]
    if model in sections.values() and len(home) == 1:
        return f"unknown key {key!r}; it belongs under {home[0]} ({home[0]}.{key})"
    return f"unknown key {key!r}{closest_match(key, allowed, listed)}"


def _sections() -> dict[str, type[BaseModel]]:
    """The sections of a run config that are one model each (data, training, ...): their
    name and model."""
    found = {}
    for name, field in RunConfig.model_fields.items():
        options = (field.annotation, *(get_args(field.annotation) if get_origin(field.annotation) is not list else ()))
        models = [a for a in options if isinstance(a, type) and issubclass(a, BaseModel)]
        if models:
            found[name] = models[0]
    return found


def _tag_problem(err: dict, model: type[BaseModel] | None) -> str:
    """A `kind` that names no branch of a union, with the closest one, or a missing `kind`."""
    ctx = err.get("ctx", {})
    key = str(ctx.get("discriminator", "kind")).strip("'")
    if err["type"] == "union_tag_not_found":
        field = model.model_fields.get(err["loc"][0]) if model is not None and err["loc"] else None
        tags = _tags_in(field.annotation, key) if field is not None else []
        return f"required key {key!r} is missing" + (f"; allowed: {', '.join(map(repr, tags))}" if tags else "")
    expected = str(ctx.get("expected_tags", ""))
    tag, tags = str(ctx.get("tag")), re.findall(r"'([^']*)'", expected)
    return f"unknown {key} {tag!r}{closest_match(tag, tags, f' allowed: {expected}' if expected else '')}"


def closest_match(text: str, allowed: list[str], listed: str) -> str:
    """"; did you mean 'X'?" and then `listed` (which starts with a space), or ";" and it."""
    match = difflib.get_close_matches(text, allowed, n=1)
    if match:
        return f"; did you mean {match[0]!r}?{listed}"
    return f";{listed}" if listed else ""


def _tags_in(annotation: Any, key: str) -> list[str]:
    """The values of `key` that pick the models of a union inside `annotation` (in lists too)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        field = annotation.model_fields.get(key)
        return [a for a in get_args(field.annotation) if isinstance(a, str)] if field else []
    return [tag for arg in get_args(annotation) for tag in _tags_in(arg, key)]


def _keys_of(loc: tuple, values: Any, inside: bool = False) -> list[str]:
    """The parts of an error's location that are keys or indices of the config, without
    the union branches pydantic names on the way (``str``, ``list[str]``, ``adagrad``).
    `inside`: the location goes on inside the value it reaches (a nested model's error)."""
    parts = []
    for k, part in enumerate(loc):
        last = k + 1 == len(loc)
        if isinstance(values, dict) and values.get("kind") == part and \
                ((last and inside) or (not last and _holds(values, loc[k + 1]))):
            continue  # the branch a kind picks, though a key has its name (probability: {kind: probability})
        if _holds(values, part):
            parts.append(str(part))
            values = values[part]
        elif isinstance(values, dict) and not (last and inside) and not (not last and _holds(values, loc[k + 1])):
            parts.append(str(part))  # a missing or unknown key; else a tag before the key that failed
    return parts


def _holds(values: Any, part: Any) -> bool:
    if isinstance(values, dict):
        return part in values
    return isinstance(values, list) and isinstance(part, int) and 0 <= part < len(values)


def _shown(value: Any, limit: int = 200) -> str:
    """The repr of a value that came, cut short: a config or request may hold megabytes."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"

