"""The fused lookup + pooling operator over all sparse features of a batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np
import torch

from tidal.config import EmbeddingFeature, TableConfig, require, require_threads
from tidal.data.batch import SparseBatch
from tidal.embedding import pooling
from tidal.embedding._parallel import run_split
from tidal.embedding.table import EmbeddingTable, RowLookup
from tidal.errors import BatchError, ConfigError
from tidal.optim import rowwise as rw

__all__ = ["EmbeddingCollection", "PooledContext"]

_DTYPES = {torch.float32, torch.bfloat16, torch.float16}


@dataclass(kw_only=True)
class PooledContext:
    """What `backward` needs from `forward`: row handles and per-id scales of the batch.
    One `backward` uses it up; a `backward` that failed may be called again, and applies
    what the failed one had not."""

    lookups: dict[int, tuple[slice | np.ndarray, RowLookup]]  # table -> (its ids, their rows)
    offsets: np.ndarray  # [F * B + 1] int64
    scales: np.ndarray  # [n_ids] float32
    feature_tables: np.ndarray  # [F] int64, position in `tables`
    batch_size: int
    train: bool
    batch: tuple[tuple[str, ...], np.ndarray, np.ndarray | None]  # its batch's keys, values and weights
    applied: bool = False  # its update landed: a second backward would apply it twice
    updated: set[int] = field(default_factory=set)  # tables whose update landed


class EmbeddingCollection:
    """Tables plus the features that read them; pools a `SparseBatch` to `[B, F, D]`.

    Every table must have the same dim D. ``forward(batch)`` looks up (creating rows
    when training) and pools every feature in one pass; ``backward(ctx, grad)`` turns
    the gradient of the pooled output into one gradient per unique row (duplicates
    summed, mean/sqrtn scaling applied) and applies each table's fused optimizer.
    `lr_scale`, given a training step, gives the factor on every table's learning rate
    (FTRL's alpha) for the update of a batch looked up at that step (a schedule's; none:
    1 throughout): a finite number >= 0, and > 0 for FTRL (`BatchError` otherwise).
    """

    def __init__(self, tables: Sequence[TableConfig | EmbeddingTable],
                 features: Sequence[EmbeddingFeature], *, threads: int = 1,
                 lr_scale: Callable[[int], float] | None = None) -> None:
        require_threads(threads, "EmbeddingCollection")
        for t in _listed(tables, "tables"):
            require(t, (TableConfig, EmbeddingTable), "EmbeddingCollection: each table")
        for f in _listed(features, "features"):
            require(f, EmbeddingFeature, "EmbeddingCollection: each feature")
        self.threads = threads
        self.lr_scale = lr_scale
        self.tables = [t if isinstance(t, EmbeddingTable) else EmbeddingTable(t, threads=threads) for t in tables]
        self._table_index = {t.name: i for i, t in enumerate(self.tables)}
        self.features = {f.name: f for f in features}
        _check_distinct("table", [t.name for t in self.tables])
        _check_distinct("feature", [f.name for f in features])
        self._check_config()
        self.dim = self.tables[0].dim

    def _check_config(self) -> None:
        if not self.tables:
            raise ConfigError("EmbeddingCollection: needs at least one table, got none")
        dims = {t.name: t.dim for t in self.tables}
        if len(set(dims.values())) > 1:
            raise ConfigError(f"EmbeddingCollection: every table must have the same dim to pool into [B, F, D], got {dims}")
        for feature in self.features.values():
            if feature.table not in self._table_index:
                raise ConfigError(
                    f"feature {feature.name!r}: table {feature.table!r} is not defined; "
                    f"defined tables: {sorted(self._table_index)}"
                )

    @property
    def evicts(self) -> bool:
        """Whether `evict` has work: some table has an eviction policy or counts admissions."""
        return any(t.config.eviction is not None or t.config.admission is not None for t in self.tables)

    def evict(self) -> int:
        """Every table's `EmbeddingTable.evict` (a safe point: no lookup still in use);
        the rows evicted."""
        return sum(t.evict() for t in self.tables)

    def lr_scale_at(self, step: int) -> float:
        """The factor on every table's learning rate at training step `step`."""
        return 1.0 if self.lr_scale is None else float(self.lr_scale(step))

    def table(self, name: str) -> EmbeddingTable:
        """The table named `name` (a `ConfigError` naming those there are, if none)."""
        if name not in self._table_index:
            raise ConfigError(f"no table {name!r} in this collection; it has {sorted(self._table_index)}")
        return self.tables[self._table_index[name]]

    # ------------------------------------------------------------------ forward

    def forward(self, batch: SparseBatch, *, train: bool = True, dtype: torch.dtype = torch.float32,
                out: torch.Tensor | None = None) -> tuple[torch.Tensor, PooledContext]:
        """Pooled embeddings `[B, F, D]` of `batch` (F in `batch.keys` order) and the context.

        With `train`, each table takes one `lookup_or_insert` step (rows are created
        and admission applies); without it, lookups are read-only and absent ids read
        as zeros. `out`, a contiguous float32 `[B, F, D]` tensor, receives the pooled
        values instead of a new buffer (reuse one per batch in flight: a fresh 27 MB
        buffer costs page faults on every step). The two phases are also callable on
        their own: ``ctx = lookup(batch)`` then ``pool(batch, ctx)``.
        """
        ctx = self.lookup(batch, train=train)
        return self.pool(batch, ctx, dtype=dtype, out=out), ctx

    def lookup(self, batch: SparseBatch, *, train: bool = True, step: int | None = None) -> PooledContext:
        """Find (with `train`: find or create) the row of every id of `batch`; `step` is
        the training step of the tables' lookups (default: the next one, see
        `EmbeddingTable.lookup_or_insert`)."""
        feature_tables = self._feature_tables(batch)
        lookups = self._lookup(batch, feature_tables, train, step)
        return PooledContext(lookups=lookups, offsets=batch.offsets, scales=self.id_scales(batch),
                             feature_tables=feature_tables, batch_size=batch.batch_size, train=train,
                             batch=(batch.keys, batch.values, batch.weights))

    def id_scales(self, batch: SparseBatch) -> np.ndarray:
        """Each id's pooling scale `[n]` float32: its weight (1 without weights) times 1,
        1/n or 1/sqrt(n) by its feature's pooling (sum, mean, sqrtn) over its bag of n."""
        modes = np.array([pooling.MODES[self.features[k].pooling] for k in batch.keys], dtype=np.int64)
        weights = batch.weights if batch.weights is not None else np.zeros(0, np.float32)
        return pooling.id_scales(batch.offsets, weights, modes, batch.batch_size)

    def table_positions(self, batch: SparseBatch) -> dict[int, slice | np.ndarray]:
        """Where the ids of each table (by its position in `tables`) sit in
        `batch.values`: the runs of the features it serves, a slice when they are side
        by side. Tables no feature of the batch reads are left out."""
        return self._positions(batch, self._feature_tables(batch))

    def _positions(self, batch: SparseBatch, feature_tables: np.ndarray) -> dict[int, slice | np.ndarray]:
        starts = batch.offsets[np.arange(len(batch.keys) + 1) * batch.batch_size]  # feature f: starts[f]:starts[f+1]
        positions: dict[int, slice | np.ndarray] = {}
        for t in range(len(self.tables)):
            served = np.flatnonzero(feature_tables == t)
            if served.shape[0] == 0:
                continue
            if np.all(np.diff(served) == 1):  # one contiguous run of features: no copy
                positions[t] = slice(int(starts[served[0]]), int(starts[served[-1] + 1]))
            else:
                positions[t] = np.concatenate([np.arange(starts[f], starts[f + 1]) for f in served])
        return positions

    def pool(self, batch: SparseBatch, ctx: PooledContext, *, dtype: torch.dtype = torch.float32,
             out: torch.Tensor | None = None) -> torch.Tensor:
        """The pooled `[B, F, D]` embeddings of the rows `ctx` found for `batch`."""
        if dtype not in _DTYPES:
            raise BatchError(f"pooled dtype must be one of float32, bfloat16, float16, got {dtype}")
        _check_context(ctx, "pool(batch, ctx)")
        if out is not None and dtype != torch.float32:
            raise BatchError(f"out receives float32 output; pooling to {dtype} allocates its own")
        self._check_batch(batch, ctx)
        with ExitStack() as held:  # no row of the context is removed while it is pooled
            for t in sorted(ctx.lookups, key=lambda t: id(self.tables[t])):  # one order, whatever lists them
                held.enter_context(self.tables[t].holding_rows())
                self.tables[t].check_lookup(ctx.lookups[t][1])
            return self._pool(batch, ctx, dtype, out)

    def _pool(self, batch: SparseBatch, ctx: PooledContext, dtype: torch.dtype,
              out: torch.Tensor | None) -> torch.Tensor:
        handles = self._handles(ctx)
        directories, widths = self._directories()
        if dtype == torch.bfloat16:  # rounded in the kernel: no float32 buffer, no second pass
            pooled = torch.empty((batch.batch_size, len(batch.keys), self.dim), dtype=torch.bfloat16)
            run_split(pooling.pool_bf16, batch.batch_size, self.threads, directories, widths,
                      ctx.feature_tables, handles, ctx.offsets, ctx.scales, _bits(pooled))
            return pooled
        pooled = self._output(batch, out)  # [B, F, D]
        run_split(pooling.pool, batch.batch_size, self.threads, directories, widths,
                  ctx.feature_tables, handles, ctx.offsets, ctx.scales, pooled.numpy())
        return pooled.to(dtype)

    def _check_batch(self, batch: SparseBatch, ctx: PooledContext) -> None:
        """`ctx` is `lookup(batch)`'s: the same samples, features (in order), bags, ids and weights."""
        keys, values, weights = ctx.batch
        differ = [name for name, same in (
            ("samples", ctx.batch_size == batch.batch_size), ("features or their order", keys == batch.keys),
            ("bags", _same(ctx.offsets, batch.offsets)), ("ids", _same(values, batch.values)),
            ("weights", _same(weights, batch.weights))) if not same]
        if differ:
            raise BatchError(f"this context was looked up for another batch: its {', '.join(differ)} differ "
                             f"({ctx.batch_size} samples x {list(keys)}, {values.shape[0]} ids here; "
                             f"{batch.batch_size} x {list(batch.keys)}, {batch.values.shape[0]} ids given)")

    @staticmethod
    def _handles(ctx: PooledContext) -> np.ndarray:
        """The row handle of every id of the batch (-1: none), across its tables."""
        if len(ctx.lookups) == 1:
            positions, found = next(iter(ctx.lookups.values()))
            if positions == slice(0, ctx.scales.shape[0]):
                return found.handles
        handles = np.full(ctx.scales.shape[0], -1, dtype=np.int64)
        for positions, found in ctx.lookups.values():
            handles[positions] = found.handles
        return handles

    def _output(self, batch: SparseBatch, out: torch.Tensor | None) -> torch.Tensor:
        shape = (batch.batch_size, len(batch.keys), self.dim)
        if out is None:
            return torch.empty(shape, dtype=torch.float32)
        if not isinstance(out, torch.Tensor) or out.requires_grad:
            raise BatchError(f"out must be a torch tensor that does not require grad (the kernel writes into it), "
                             f"got {type(out).__name__}{' requiring grad' if isinstance(out, torch.Tensor) else ''}")
        if tuple(out.shape) != shape or out.dtype != torch.float32 or not out.is_contiguous() or out.device.type != "cpu":
            layout = "contiguous" if out.is_contiguous() else "not contiguous (use .contiguous() or a fresh torch.empty)"
            raise BatchError(
                f"out must be a contiguous float32 CPU tensor of shape [B, F, D] = {list(shape)}, "
                f"got {out.dtype} {list(out.shape)} on {out.device}, {layout}"
            )
        return out

    def _feature_tables(self, batch: SparseBatch) -> np.ndarray:
        if not isinstance(batch, SparseBatch):
            raise BatchError(f"EmbeddingCollection takes a SparseBatch, got {type(batch).__name__}; "
                             f"build one with SparseBatch(...) or SparseBatch.from_lists(...)")
        unknown = [k for k in batch.keys if k not in self.features]
        if unknown:
            raise BatchError(f"batch has features {unknown} that no table serves; known features: {sorted(self.features)}")
        return np.array([self._table_index[self.features[k].table] for k in batch.keys], dtype=np.int64)

    def _lookup(self, batch: SparseBatch, feature_tables: np.ndarray,
                train: bool, step: int | None) -> dict[int, tuple[slice | np.ndarray, RowLookup]]:
        """One lookup per table over the ids of all features it serves."""
        lookups = {}
        for t, positions in self._positions(batch, feature_tables).items():
            keys, table = batch.values[positions], self.tables[t]
            lookups[t] = (positions, table.lookup_or_insert(keys, step=step) if train else table.find(keys))
        return lookups

    def _directories(self) -> tuple[np.ndarray, np.ndarray]:
        """Every table's chunk directory stacked to `[T, shards, chunks]`, and widths `[T]`."""
        shards = max(t.arena.directory.shape[0] for t in self.tables)
        chunks = max(t.arena.directory.shape[1] for t in self.tables)
        stacked = np.zeros((len(self.tables), shards, chunks), dtype=np.int64)
        for t, table in enumerate(self.tables):
            directory = table.arena.directory
            stacked[t, : directory.shape[0], : directory.shape[1]] = directory
        return stacked, np.array([t.width for t in self.tables], dtype=np.int64)

    # ------------------------------------------------------------------ backward

    def backward(self, ctx: PooledContext, grad: torch.Tensor | np.ndarray, *, check_finite: bool = True) -> None:
        """Apply the sparse update for `grad`, the gradient of the pooled `[B, F, D]` output:
        each distinct row takes the sum of its ids' scaled gradients, then its table's
        fused optimizer step (plain SGD on one thread adds the sum term by term, see
        `_sgd_by_sample`).

        A gradient holding a NaN or an infinity is refused before any row moves (one
        would stay in its row for good). The check reads the whole gradient once more,
        2-3 ms of a 15 ms step of 106k ids on one thread, as much as a tenth of it:
        a trainer that has checked the loss first (a finite loss has a finite gradient)
        may leave it out with `check_finite=False`, as Tidal's do."""
        _check_context(ctx, "backward(ctx, grad)")
        if not ctx.train:
            raise BatchError("backward needs a context from forward(train=True); this one was read-only")
        if ctx.applied:
            raise BatchError("this context's update was applied already; look the batch up again for another step")
        grad_rows = self._grad_rows(ctx, grad).reshape(-1, self.dim)  # float32, or uint16 bfloat16 bits
        if check_finite:
            self._check_finite(grad_rows, ctx)
        lr_scale = self.lr_scale_at(max((lookup.seen_at for _, lookup in ctx.lookups.values()), default=0))
        for t in ctx.lookups:  # a factor one table refuses moves no row of another
            self.tables[t].optimizer.hyper_at(lr_scale)
        if self.threads == 1 and not ctx.updated and all(self.tables[t].optimizer.code == rw.SGD for t in ctx.lookups):
            self._sgd_by_sample(ctx, grad_rows, lr_scale)
        else:
            sources = pooling.id_sources(ctx.offsets, ctx.batch_size)
            for t, (positions, lookup) in ctx.lookups.items():
                if t not in ctx.updated:
                    self.tables[t].apply_grouped(lookup, grad_rows, sources[positions], ctx.scales[positions], lr_scale)
                    ctx.updated.add(t)
        ctx.applied = True

    def _sgd_by_sample(self, ctx: PooledContext, grad_rows: np.ndarray, lr_scale: float) -> None:
        """Plain SGD on one thread: each id's scaled gradient is subtracted from its row in
        sample order (`pooling.sgd_by_sample`), which reads the gradient front to back.
        Grouping a row's ids first would read it at random, and costs a tenth more time."""
        directories, widths = self._directories()
        rates = np.array([t.optimizer.hyper_at(lr_scale)[rw.LR] for t in self.tables], dtype=np.float32)
        with ExitStack() as held:
            # tables in one order, whatever collection lists them: no deadlock
            for t, (_, lookup) in sorted(ctx.lookups.items(), key=lambda item: id(self.tables[item[0]])):
                held.enter_context(self.tables[t].updating_in_place(lookup))
            pooling.sgd_by_sample(directories, widths, ctx.feature_tables, self._handles(ctx), ctx.offsets,
                                  ctx.scales, grad_rows, rates, 0, ctx.batch_size)

    def _check_finite(self, grad_rows: np.ndarray, ctx: PooledContext) -> None:
        """A `BatchError` naming the first NaN or infinity of the gradient, before any row
        takes it (one would stay in its row's values and state for good)."""
        bits = grad_rows.view(np.uint32 if grad_rows.dtype == np.float32 else np.uint16)
        exponent = bits.dtype.type(0x7F800000 if bits.dtype == np.uint32 else 0x7F80)
        flags = np.zeros(bits.shape[0], dtype=np.bool_)
        run_split(pooling.find_nonfinite, bits.shape[0], self.threads, bits.reshape(-1), bits.shape[1], exponent, flags)
        if flags.any():
            bad = (bits & exponent) == exponent
            first = int(np.flatnonzero(bad.any(axis=1))[0])
            features = ctx.feature_tables.shape[0]
            raise BatchError(f"gradient of the pooled output must be finite in float32 (magnitudes up to 3.4e38), got "
                             f"{int(bad.sum()):,d} NaN or infinite values (the first at sample {first // features}, "
                             f"feature {first % features}); no row was updated")

    def _grad_rows(self, ctx: PooledContext, grad: torch.Tensor | np.ndarray) -> np.ndarray:
        expected = (ctx.batch_size, ctx.feature_tables.shape[0], self.dim)
        if not isinstance(grad, (torch.Tensor, np.ndarray)):
            raise BatchError(f"gradient of the pooled output must be a torch tensor or numpy array {list(expected)}, "
                             f"got {type(grad).__name__}")
        if tuple(grad.shape) != expected:
            raise BatchError(f"gradient of the pooled output must have shape [B, F, D] = {list(expected)}, got {list(grad.shape)}")
        if not _holds_real_numbers(grad):
            raise BatchError(f"gradient of the pooled output must hold real numbers (float32, bfloat16, float16, "
                             f"float64 or integers), got dtype {grad.dtype}")
        if isinstance(grad, torch.Tensor):
            grad = grad.detach().cpu()
            if grad.dtype == torch.bfloat16:  # read as it is: widening is exact
                return _bits(grad.contiguous())
            grad = grad.to(torch.float32).contiguous().numpy()
        with np.errstate(over="ignore"):  # a value past float32's range becomes an infinity, refused by name
            return np.ascontiguousarray(grad, dtype=np.float32)


def _holds_real_numbers(grad: torch.Tensor | np.ndarray) -> bool:
    """Floats or integers: not complex numbers, not booleans."""
    if isinstance(grad, torch.Tensor):
        return not grad.is_complex() and grad.dtype != torch.bool
    return grad.dtype.kind in "iuf"


def _check_context(ctx: object, call: str) -> None:
    """`ctx` must be a `PooledContext` (from `forward` or `lookup`)."""
    if not isinstance(ctx, PooledContext):
        raise BatchError(f"{call} takes the PooledContext that forward() or lookup() returned, got "
                         f"{type(ctx).__name__}; are the arguments swapped?")


def _listed(items: object, what: str) -> Sequence:
    """`items` if it is a list (or tuple) of them; not a single one, a dict or a string."""
    if not isinstance(items, (list, tuple)):
        raise ConfigError(f"EmbeddingCollection: {what} must be a list, got {type(items).__name__}")
    return items


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    return a is b or (a is not None and b is not None and np.array_equal(a, b))


def _bits(tensor: torch.Tensor) -> np.ndarray:
    """The raw bits of a contiguous bfloat16 tensor, as a uint16 numpy view."""
    return tensor.view(torch.int16).numpy().view(np.uint16)


def _check_distinct(kind: str, names: list[str]) -> None:
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"EmbeddingCollection: {kind} names must be distinct, got {repeated} more than once")
