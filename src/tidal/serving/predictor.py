"""The request pipeline of a bundle: extraction, lookup and pooling, dense network,
per-target probabilities and the value-model fusion.

A request scores the candidates of one user. Each feature declares its side: the
`user` features come once per request (one row, or a session's cached state), the
`item` features once per candidate, the `context` features once per candidate or
once for all of them. Pieces (a request, or a chunk of
a big one) are scored together::

    piece 0: user u0 (1 row)  items i0 i1 i2      piece 1: state of u1  items i3 i4
    item rows    [i0, i1, i2, i3, i4]     -> extract, look up, pool -> [5, Fi, D]
    user rows    [u0]                     -> extract, look up, pool -> [1, Fu, D]
    user of row  [u0, u0, u0, u1, u1]     -> gathered               -> [5, Fu, D]
    both, in the model's feature order                              -> [5, F, D]

The extraction is training's own `Extractor` (per side), so a row gives the same ids
as in training; ids the tables do not hold read as zeros and are counted.

Online updates (`Predictor.update`) apply a bundle's new deltas in place, between
sparse stages: a batch is scored with the rows and the dense weights from before a
delta, or with both from after it, never a mix (a request of more candidates than
`chunk_rows` is scored in several batches, and an update may come between them). A
session's cached user state pooled before an update is pooled again from its user row
by each batch that scores it after.
"""

from __future__ import annotations

import copy
import ctypes
import re
import time
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
import torch
from torch.export.passes import move_to_device_pass

from tidal.compile import AotiProgram, GeneratedSources, OnnxProgram, RuleOutcome, rewrite, unfit_here
from tidal.config import (DEVICE_PATTERN, DenseFeature, Fusion, RunConfig, ServingConfig, SparseFeature, TableConfig,
                          is_whole_number, require)
from tidal.data.extract import Extractor
from tidal.embedding import EmbeddingCollection, EmbeddingTable, RowBlock
from tidal.errors import BatchError, CheckpointError, ConfigError, CorruptCheckpointError
from tidal.gate import Gate
from tidal.serving.bundle import (AOTI, NO_DELTAS, ONNX, PROGRAM, WEIGHTS, Bundle, Delta, load_bundle, merged,
                                  model_sizes, peek, with_weights)
from tidal.serving.delta import Position, Source
from tidal.serving.protocol import context_inputs

__all__ = ["Applied", "Piece", "Predictor", "SparseOutput", "UserState", "check_user_state", "fuse"]

_Held = TypeVar("_Held")  # a compiled form a bundle may hold: the ONNX model's bytes, the package's path


@dataclass(frozen=True, kw_only=True)
class UserState:
    """The user side of a request, pooled: what a session caches. `shared` holds the
    user's raw values of the columns that item features read too (a user x item
    cross, say): a continuing request takes them from here. `user` is the user row
    itself, pooled again when the bundle was updated since (`position`)."""

    pooled: torch.Tensor  # [1, Fu, D]
    dense: torch.Tensor  # [1, Du]
    user: pa.RecordBatch  # the one user row
    position: Position | None  # the bundle's state it was pooled at
    shared: dict[str, pa.Array] = field(default_factory=dict)  # column -> its one value

    @property
    def nbytes(self) -> int:
        """The bytes this state keeps alive (an Arrow slice keeps its whole buffers)."""
        arrays = [*self.user.columns, *self.shared.values()]
        return self.pooled.nbytes + self.dense.nbytes + sum(a.get_total_buffer_size() for a in arrays)


@dataclass(frozen=True, kw_only=True)
class Applied:
    """What `Predictor.update` changed, and how long new batches waited for it."""

    rows_changed: int
    rows_removed: int
    paused_s: float


@dataclass(frozen=True, kw_only=True)
class SparseOutput:
    """The sparse stage's output for the dense stage: the inputs, and the dense program
    of the same state of the bundle (an update may come between the two stages)."""

    pooled: torch.Tensor  # [N, F, D]
    dense: torch.Tensor  # [N, Dd]
    program: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (pooled, dense) -> logits


@dataclass(frozen=True, kw_only=True)
class Piece:
    """Candidates of one request scored together: `items` (n rows of item and
    context columns) and either `user` (1 row of user columns) or a cached `state`."""

    items: pa.RecordBatch
    user: pa.RecordBatch | None = None
    state: UserState | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.items, pa.RecordBatch):
            raise BatchError(f"Piece: items must be a pyarrow RecordBatch, got {type(self.items).__name__}")
        if self.user is not None:
            _check_one_user_row(self.user, "Piece: user")
        if self.state is not None:
            check_user_state(self.state, "Piece: state")

    @property
    def rows(self) -> int:
        return self.items.num_rows


def check_user_state(state: object, where: str) -> None:
    """A `BatchError` unless `state` is a `UserState`; `where` names the argument."""
    if not isinstance(state, UserState):
        raise BatchError(f"{where} must be a UserState (Predictor.user_state makes one), got {type(state).__name__}")


def _check_one_user_row(user: object, where: str) -> None:
    """A `BatchError` unless `user` is a RecordBatch of one row: one request's user."""
    if not isinstance(user, pa.RecordBatch) or user.num_rows != 1:
        got = f"{user.num_rows} rows" if isinstance(user, pa.RecordBatch) else type(user).__name__
        raise BatchError(f"{where} must be one request's user row, a pyarrow RecordBatch of 1 row; got {got}")


def fuse(fusion: Fusion, probabilities: np.ndarray, targets: Sequence[str]) -> np.ndarray:
    """The fused score `[n]` of probabilities `[n, T]` (see `tidal.config.Fusion`). Only
    the weighted targets are read: one left out (or weighted 0) does not count, even NaN."""
    require(fusion, Fusion, "fuse: fusion")
    _check_probabilities(probabilities, targets)
    every = [fusion.weights.get(t, 0.0) if fusion.weights else 1.0 for t in targets]
    counted = [k for k, w in enumerate(every) if w != 0.0]
    weights = np.array([every[k] for k in counted], dtype=np.float64)
    p = probabilities[:, counted].astype(np.float64)
    if fusion.kind == "sum":
        return (p @ weights).astype(np.float32)
    return np.prod(np.power(p, weights), axis=1).astype(np.float32)


def _check_probabilities(probabilities: object, targets: Sequence[str]) -> None:
    """A `BatchError` unless `probabilities` is an `[n, T]` array of one column per target."""
    shape = getattr(probabilities, "shape", None)
    if not isinstance(probabilities, np.ndarray) or shape[1:] != (len(targets),) or len(shape) != 2:
        got = f"shape {list(shape)}" if isinstance(probabilities, np.ndarray) else type(probabilities).__name__
        raise BatchError(f"probabilities must be a numpy array [n, {len(targets)}] (one column per target: "
                         f"{list(targets)}), got {got}")


class Predictor:
    """Scores pieces with a bundle's tables and dense program (thread-safe).

    On the torch backend the program runs rewritten by the graph rules
    (`tidal.compile.rules`; `serving.rewrite`); `rewrites` holds each rule's outcome
    (empty on onnxruntime and aotinductor, or with `rewrite: false`)."""

    def __init__(self, bundle: Bundle, *, device: str | torch.device | None = None,
                 serving: ServingConfig | None = None) -> None:
        """`device`: auto (or None: a GPU if torch sees one and the backend is torch), cpu,
        cuda or cuda:N. `serving` replaces the bundle's serving settings (its buckets,
        fusion, backend and dense threads are used here); its largest bucket must fit
        the bundle's dense program."""
        require(bundle, Bundle, "Predictor: bundle")
        if serving is not None:
            require(serving, ServingConfig, "Predictor: serving")
        self.config = bundle.config
        self.targets = bundle.targets
        serving = serving or self.config.serving
        self.serving = serving
        self.device = _device(device, serving.backend)
        largest = self.config.serving.buckets[-1]
        if serving.buckets[-1] > largest:
            raise ConfigError(f"buckets: the largest, {serving.buckets[-1]}, is over the largest batch the bundle's "
                              f"dense program takes, {largest} (its serving.buckets when it was exported)")
        self.buckets = list(serving.buckets)
        extractor = Extractor(self.config.features)
        self._sizes = model_sizes(self.config)
        self._user_extract, self._item_extract = _sided(extractor.sparse, extractor.dense)
        self._user_sparse, self._item_sparse = _positions(extractor.sparse)  # [Fu], [Fi] positions in the model
        self._user_dense, self._item_dense = _positions(extractor.dense)
        self.user_columns = self._user_extract.columns
        self.item_columns = self._item_extract.columns
        # the columns of one value per candidate, never broadcast: item features', not the user's nor context's
        self._per_candidate = frozenset(self.item_columns) - set(self.user_columns) - context_inputs(self.config)
        self.collection = EmbeddingCollection(_serving_tables(bundle), [f.embedding() for f in extractor.sparse])
        self._rewrite = serving.rewrite
        self._sources = GeneratedSources()  # of the programs below, forgotten when they are replaced or dropped
        weakref.finalize(self, self._sources.forget)
        with self._sources.made():
            self._source = _dense_program(bundle, serving, self.device)  # as exported, with the last delta's weights
            self._check_fits(bundle)
            self._program, self.rewrites = self._rewritten(self._source)  # what scores
        self._gate = Gate()  # scoring shares it; an update takes it alone
        self.position: Position | None = bundle.position  # the last delta applied (None: a version 1 bundle)
        self.source: Source | None = bundle.source  # the checkpoint of what it serves
        self.torn: str | None = None  # why the tables are between two deltas, after a failed update
        self._counting = ((0, 0), self.collection)  # (id counts of the tables reloads replaced, the tables now)
        self.set_fusion(serving.fusion)
        if not self.item_columns:
            raise ConfigError("serving needs at least one item or context feature: candidates are scored by them")

    def _check_fits(self, bundle: Bundle) -> None:
        """Refuse (`CorruptCheckpointError`) a dense program that does not take inputs of
        the bundle's sizes or give one output per target (another model's file in its
        place, resealed): it would fail every request."""
        f, d, dd, t = (self._sizes[k] for k in ("num_features", "dim", "dense_features", "num_targets"))
        file = bundle.path / {"onnxruntime": ONNX, "aotinductor": AOTI}.get(self.serving.backend, PROGRAM)
        try:
            with torch.no_grad():
                logits = self._source.forward(torch.zeros(1, f, d, device=self.device),
                                              torch.zeros(1, dd, device=self.device))
        except (MemoryError, torch.cuda.OutOfMemoryError):  # the machine's state, not the file's
            raise
        except Exception as exc:  # whatever the backend raises
            raise CorruptCheckpointError(f"{file}: does not run on inputs of this bundle's sizes ({f} features of dim "
                                         f"{d}, {dd} dense): {type(exc).__name__}: {str(exc)[:300]}") from None
        if tuple(logits.shape) != (1, t):
            raise CorruptCheckpointError(f"{file}: gives outputs of shape {list(logits.shape)} for one row; this "
                                         f"bundle's {t} targets need [1, {t}]")

    @property
    def backend(self) -> str:
        """What runs the dense network: `torch`, `onnxruntime` or `aotinductor`."""
        if isinstance(self._program, OnnxProgram):
            return "onnxruntime"
        return "aotinductor" if isinstance(self._program, AotiProgram) else "torch"

    # ------------------------------------------------------------------ online updates

    def update(self, deltas: Sequence[Delta],
               between: Callable[[], AbstractContextManager[object]] = nullcontext) -> Applied:
        """Apply `deltas` (those following `position`, in order, as `tidal.serving.bundle.read_deltas` gives
        them) to the tables and take the last one's dense weights. Waits for the sparse
        stages under way; those that come meanwhile wait for it (the weights are loaded
        and the rows converted before). The change runs inside `between()` too: a
        batcher's `between_requests`, so that no request is scored part before it.

        An update that fails part way (memory ran out) leaves the tables between two
        deltas: `torn` then says so, and further updates are refused (restart, or
        `reload` a full export)."""
        if not isinstance(deltas, Sequence) or not all(isinstance(d, Delta) for d in deltas):
            held = " holding other objects" if isinstance(deltas, Sequence) else ""
            raise ConfigError(f"update takes a list of Deltas (tidal.serving.bundle.read_deltas reads them), got "
                              f"{type(deltas).__name__}{held}")
        if not deltas:
            return Applied(rows_changed=0, rows_removed=0, paused_s=0.0)
        made = GeneratedSources()
        try:
            return self._update(deltas, between, made)
        finally:
            made.forget()  # the programs made, unless they are served now

    def _update(self, deltas: Sequence[Delta], between: Callable[[], AbstractContextManager[object]],
                made: GeneratedSources) -> Applied:
        """`update` of a non-empty list, the programs it makes noted in `made`."""
        self._check_follows(deltas[0])  # before the work below (checked again under the gate)
        with made.made():
            source = self._source_with(deltas[-1])  # before taking the gate
            program, rewrites = self._rewritten(source)
        changes = merged(deltas)
        blocks = [(self.collection.table(name), c.removed, _row_block(c.keys, c.values)) for name, c in changes.items()]
        start = time.perf_counter()  # new batches wait from here: for those under way, then for the update
        with between(), self._gate.exclusive():
            self._check_follows(deltas[0])
            try:
                for table, removed, block in blocks:
                    table.remove(removed)
                    table.push_rows(block)
            except BaseException as exc:
                self.torn = (f"the tables were left part way between delta {self.position.sequence} and delta "
                             f"{deltas[-1].position.sequence} by a failed update ({type(exc).__name__}: {exc})")
                raise
            self._source, self._program, self.rewrites = source, program, rewrites
            self._sources.forget()  # of the programs replaced
            self._sources.keys = made.take()
            self.position, self.source = deltas[-1].position, Source.of(deltas[-1].manifest)
            return Applied(rows_changed=sum(len(c.keys) for c in changes.values()),
                           rows_removed=sum(len(c.removed) for c in changes.values()),
                           paused_s=time.perf_counter() - start)

    def reload(self, path: Path, between: Callable[[], AbstractContextManager[object]] = nullcontext) -> Applied:
        """Serve the bundle at `path` from now on: a full export that replaced the bundle
        served, of a model with the same inputs and outputs (features, targets and
        sizes, checked from its manifest first; else `CheckpointError`: restart). Its
        tables and program are loaded beside those served, with this predictor's
        serving settings, then swapped in inside `between()` and the gate, as an update
        is; a torn state ends. Returns the rows loaded and how long new batches waited."""
        if not isinstance(path, (str, PathLike)):
            raise ConfigError(f"reload takes the bundle's folder (a str or Path), got {type(path).__name__}")
        head = peek(path)
        self._check_serves_like(path, head.config, head.targets)
        bundle = load_bundle(path)
        self._check_serves_like(path, bundle.config, bundle.targets)  # another export may have come meanwhile
        rows = sum(len(keys) for keys, _ in bundle.tables.values())
        fresh = Predictor(bundle, device=self.device, serving=self.serving)
        serving = self.serving.model_copy(update={"table_dtype": bundle.config.serving.table_dtype})  # as now stored
        del bundle  # its arrays: the fresh tables hold copies
        start = time.perf_counter()
        with between(), self._gate.exclusive():
            self._counting = (self.id_counts(), fresh.collection)  # one assignment: metrics read it without the gate
            self.config, self.collection = fresh.config, fresh.collection
            self._source, self._program, self.rewrites = fresh._source, fresh._program, fresh.rewrites
            self.position, self.source, self.torn, self.serving = fresh.position, fresh.source, None, serving
            self._sources.forget()  # of the programs replaced
            self._sources.keys = fresh._sources.take()
        paused_s = time.perf_counter() - start
        give_back_freed_memory()  # the tables replaced
        return Applied(rows_changed=rows, rows_removed=0, paused_s=paused_s)

    def _check_serves_like(self, path: Path, config: RunConfig, targets: list[str]) -> None:
        """Refuse (`CheckpointError`) a bundle whose requests or responses would differ."""
        differ = [what for what, mine, its in (("features", self.config.features, config.features),
                                               ("targets", self.targets, targets),
                                               ("sizes", self._sizes, model_sizes(config))) if mine != its]
        if differ:
            raise CheckpointError(f"{path}: a full export of another model replaced the bundle (its "
                                  f"{' and '.join(differ)} differ from those served); restart tidal serve to serve it")

    def check_whole(self) -> None:
        """Refuse (`CheckpointError`) while a failed update has left the tables torn."""
        if self.torn is not None:
            raise CheckpointError(f"{self.torn}; restart, or export the bundle in full, to serve a whole state")

    def _check_follows(self, delta: Delta) -> None:
        self.check_whole()
        if self.position is None:
            raise CheckpointError(NO_DELTAS)
        if (delta.position.base, delta.position.sequence, delta.manifest["previous"]) != \
                (self.position.base, self.position.sequence + 1, self.position.seal):
            raise CheckpointError(f"{delta.path}: delta {delta.position.sequence} does not follow the delta "
                                  f"served, {self.position.sequence}; read the deltas that follow it")

    def _source_with(self, delta: Delta) -> torch.nn.Module | OnnxProgram | AotiProgram:
        """A copy of the program as exported, with `delta`'s dense weights (batches
        under way keep the one they took)."""
        if isinstance(self._source, (OnnxProgram, AotiProgram)):
            try:
                return self._source.with_weights(delta.weights)  # checked there; a new session owns them
            except CheckpointError as exc:
                raise CorruptCheckpointError(f"{delta.path / WEIGHTS}: {exc}") from None
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)  # torch's own, from its tree specs
            module = copy.deepcopy(self._source)
        with_weights(module.state_dict(), delta)  # its tensors, on its device
        return module

    def _rewritten(self, source: torch.nn.Module | OnnxProgram | AotiProgram) \
            -> tuple[torch.nn.Module | OnnxProgram | AotiProgram, tuple[RuleOutcome, ...]]:
        """The program that scores: `source` rewritten by `tidal.compile.rules` (torch
        backend, `serving.rewrite`), each rule checked on random inputs of every bucket
        size; `source` itself otherwise."""
        if isinstance(source, (OnnxProgram, AotiProgram)) or not self._rewrite:
            return source, ()
        generator = torch.Generator().manual_seed(0)
        f, d, dd = self._sizes["num_features"], self._sizes["dim"], self._sizes["dense_features"]
        inputs = [(torch.randn(rows, f, d, generator=generator).to(self.device),
                   torch.randn(rows, dd, generator=generator).to(self.device)) for rows in self.buckets]
        done = rewrite(source, inputs)
        return done.module, done.outcomes

    # ------------------------------------------------------------------ fusion

    @property
    def fusion(self) -> Fusion:
        return self._fusion

    def set_fusion(self, fusion: Fusion) -> None:
        """Change the value model; requests scored from now on use it."""
        require(fusion, Fusion, "set_fusion: fusion")
        unknown = sorted(set(fusion.weights) - set(self.targets))
        if unknown:
            raise ConfigError(f"fusion.weights names {unknown}, which are not targets; targets: {self.targets}")
        self._fusion = fusion

    def fuse(self, probabilities: np.ndarray) -> np.ndarray:
        """The fused score `[n]` of probabilities `[n, T]` by the value model now set."""
        return fuse(self._fusion, probabilities, self.targets)

    def outputs(self, probabilities: np.ndarray) -> dict[str, np.ndarray]:
        """The response tensors of probabilities `[n, T]`: one per target, and `score`."""
        score = self.fuse(probabilities)  # which checks them first
        return {t: probabilities[:, k] for k, t in enumerate(self.targets)} | {"score": score}

    # ------------------------------------------------------------------ stages

    def piece(self, columns: dict[str, pa.Array], rows: int, state: UserState | None = None) -> Piece:
        """The piece of one request's columns (one-value context columns, and the user's
        columns an item feature reads, broadcast to `rows`); with `state`, the user
        columns are not needed. A missing column, an item column of other than `rows`
        values, or a context column of neither 1 nor `rows`, is refused (`BatchError`)."""
        if not is_whole_number(rows) or rows < 0:
            raise BatchError(f"rows is the number of candidates, a whole number >= 0; got {rows!r}")
        columns = _arrays(columns)
        if state is not None:
            check_user_state(state, "piece: state")
            columns = {**state.shared, **columns}
        _require(columns, self.item_columns, "item and context")
        items = _record_batch({c: _broadcast(c, columns[c], rows, c in self._per_candidate) for c in self.item_columns})
        user = self.user_row(columns) if state is None and self.user_columns else None
        return Piece(items=items, user=user, state=state)

    def user_row(self, columns: dict[str, pa.Array]) -> pa.RecordBatch:
        """The one-row user batch of a request's columns."""
        _require(columns, self.user_columns, "user")
        many = {c: len(columns[c]) for c in self.user_columns if len(columns[c]) != 1}
        if many:
            raise BatchError(f"user columns must hold one value (the user's); got {many} (column: values); "
                             f"send one value per user column")
        return _record_batch({c: columns[c] for c in self.user_columns})

    def predict(self, pieces: Sequence[Piece]) -> np.ndarray:
        """Probabilities `[sum of rows, T]` of the pieces' candidates, in order."""
        return self.dense(self.sparse(pieces))

    def user_state(self, user: pa.RecordBatch) -> UserState:
        """The pooled user side of one request's user row (what a session caches). A
        model without user features has none: its sessions cache an empty state."""
        if not self.user_columns and isinstance(user, pa.RecordBatch) and user.num_rows <= 1:
            return UserState(pooled=torch.empty(1, 0, self._sizes["dim"]), dense=torch.empty(1, 0), user=user,
                             position=self.position)
        _check_one_user_row(user, "user_state: user")
        # copies: the columns are slices of the request's strings, which they would keep alive
        user = _record_batch({c: pa.concat_arrays([user.column(c)]) for c in user.schema.names})
        with self._gate.shared():
            pooled, dense = self._user_side([user])
            position = self.position
        shared = {c: user.column(c) for c in self.item_columns if c in self.user_columns}
        return UserState(pooled=pooled, dense=dense, user=user, position=position, shared=shared)

    def sparse(self, pieces: Sequence[Piece]) -> SparseOutput:
        """The sparse stage: pooled `[N, F, D]` and dense features `[N, Dd]` of all rows."""
        if not isinstance(pieces, Sequence) or not all(isinstance(p, Piece) for p in pieces):
            raise BatchError(f"a list of Pieces (Predictor.piece makes one) is scored, got {type(pieces).__name__}"
                             + ("" if not isinstance(pieces, Sequence) else " holding other objects"))
        with self._gate.shared():  # every table and the program before an update, or all after it
            pooled, dense = self._sparse(pieces)
            # its forward: the module's own input checks (a pre-hook, 0.15-0.25 ms a call here) repeat _check_shapes
            return SparseOutput(pooled=pooled, dense=dense, program=self._program.forward)

    def _sparse(self, pieces: Sequence[Piece]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = sum(p.rows for p in pieces)
        f, d, dd = self._sizes["num_features"], self._sizes["dim"], self._sizes["dense_features"]
        pooled, dense = torch.empty(rows, f, d), torch.empty(rows, dd)
        if not pieces:  # no candidates: nothing to extract
            return pooled, dense
        items = _concat([p.items for p in pieces])
        pooled[:, self._item_sparse], dense[:, self._item_dense] = self._side(self._item_extract, items)
        if not self.user_columns:
            return pooled, dense
        user_pooled, user_dense = self._users(pieces)
        user_of_row = torch.from_numpy(np.repeat(np.arange(len(pieces)), [p.rows for p in pieces]))
        pooled[:, self._user_sparse] = user_pooled[user_of_row]
        dense[:, self._user_dense] = user_dense[user_of_row]
        return pooled, dense

    def dense(self, stage: SparseOutput) -> np.ndarray:
        """The dense stage on the device: probabilities `[n, T]`, in batches of the
        largest bucket at most, each padded to a bucket."""
        if not isinstance(stage, SparseOutput):
            raise BatchError(f"dense takes the SparseOutput of Predictor.sparse, got {type(stage).__name__}")
        step, pooled, dense = self.buckets[-1], stage.pooled, stage.dense
        parts = [self._dense_bucket(stage.program, pooled[i : i + step], dense[i : i + step])
                 for i in range(0, pooled.shape[0], step)]
        return np.concatenate(parts) if parts else np.zeros((0, len(self.targets)), np.float32)

    def _dense_bucket(self, program: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], pooled: torch.Tensor,
                      dense: torch.Tensor) -> np.ndarray:
        n = pooled.shape[0]
        padded, padded_dense = _padded(pooled, self.bucket(n)), _padded(dense, self.bucket(n))
        self._check_shapes(padded, padded_dense)
        if self.device.type == "cuda":  # pinned host buffers, so the copies overlap
            padded, padded_dense = padded.pin_memory(), padded_dense.pin_memory()
        with torch.no_grad():
            logits = program(padded.to(self.device, non_blocking=True),
                             padded_dense.to(self.device, non_blocking=True))  # [bucket, T]
        return torch.sigmoid(logits[:n]).float().cpu().numpy()

    def bucket(self, rows: int) -> int:
        """The smallest configured batch size that holds `rows`."""
        if not is_whole_number(rows) or rows < 0:
            raise BatchError(f"bucket: rows must be a whole number >= 0, got {rows!r}")
        for size in self.buckets:
            if size >= rows:
                return size
        raise BatchError(f"{rows} rows do not fit the largest bucket ({self.buckets[-1]}); split them first")

    def _check_shapes(self, pooled: torch.Tensor, dense: torch.Tensor) -> None:
        """The shape guard: a compiled program must see exactly a bucket's shapes."""
        expected = (self._sizes["num_features"], self._sizes["dim"])
        if pooled.shape[0] not in self.buckets or tuple(pooled.shape[1:]) != expected \
                or tuple(dense.shape) != (pooled.shape[0], self._sizes["dense_features"]):
            raise BatchError(f"dense stage: expected pooled [bucket, {expected[0]}, {expected[1]}] and dense "
                             f"[bucket, {self._sizes['dense_features']}] with bucket in {self.buckets}, "
                             f"got {list(pooled.shape)} and {list(dense.shape)}")

    def _users(self, pieces: Sequence[Piece]) -> tuple[torch.Tensor, torch.Tensor]:
        """One pooled user row per piece: cached, or computed at once for the stateless
        ones and those whose state was pooled before an update."""
        cached = [p.state is not None and p.state.position == self.position for p in pieces]
        fresh = [p.user if p.state is None else p.state.user for p, c in zip(pieces, cached) if not c]
        if any(u is None for u in fresh):
            raise BatchError("a piece needs its user row or a cached user state")
        pooled, dense = self._user_side(fresh) if fresh else (None, None)
        pooled_rows, dense_rows, k = [], [], 0
        for p, c in zip(pieces, cached):
            if c:
                pooled_rows.append(p.state.pooled)
                dense_rows.append(p.state.dense)
            else:
                pooled_rows.append(pooled[k : k + 1])
                dense_rows.append(dense[k : k + 1])
                k += 1
        return torch.cat(pooled_rows), torch.cat(dense_rows)

    def _user_side(self, users: Sequence[pa.RecordBatch]) -> tuple[torch.Tensor, torch.Tensor]:
        return self._side(self._user_extract, _concat(users))

    def _side(self, extract: Extractor, table: pa.RecordBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled `[n, Fs, D]` and dense `[n, Ds]` of one side's features over `table`."""
        batch = extract(table)
        if batch.keys:
            pooled, _ = self.collection.forward(batch, train=False)
        else:
            pooled = torch.empty(table.num_rows, 0, self._sizes["dim"])
        dense = torch.tensor(batch.dense) if batch.dense is not None else torch.empty(table.num_rows, 0)
        return pooled, dense

    # ------------------------------------------------------------------ statistics

    def id_counts(self) -> tuple[int, int]:
        """(ids looked up, ids the tables did not hold) since loading, reloads included."""
        (lookups, misses), collection = self._counting
        stats = [t.stats() for t in collection.tables]
        return lookups + sum(s.lookups for s in stats), misses + sum(s.misses for s in stats)


def _sided(sparse: list[SparseFeature], dense: list[DenseFeature]) -> tuple[Extractor, Extractor]:
    user = [f for f in (*sparse, *dense) if f.side == "user"]
    return Extractor(user), Extractor([f for f in (*sparse, *dense) if f.side != "user"])


def _positions(features: Sequence[SparseFeature | DenseFeature]) -> tuple[torch.Tensor, torch.Tensor]:
    user = [k for k, f in enumerate(features) if f.side == "user"]
    return torch.tensor(user, dtype=torch.long), torch.tensor([k for k in range(len(features)) if k not in user],
                                                              dtype=torch.long)


def _padded(rows: torch.Tensor, bucket: int) -> torch.Tensor:
    """`rows` followed by zero rows up to `bucket` (scored, then cut off)."""
    if rows.shape[0] == bucket:
        return rows
    padded = torch.zeros(bucket, *rows.shape[1:])
    padded[: rows.shape[0]] = rows
    return padded


def _record_batch(columns: dict[str, pa.Array]) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays(list(columns.values()), names=list(columns))


def _dense_program(bundle: Bundle, serving: ServingConfig,
                   device: torch.device) -> torch.nn.Module | OnnxProgram | AotiProgram:
    """What runs the dense network: the bundle's torch program on `device`, its ONNX
    model in ONNX Runtime or its AOTInductor package (with the program's weights: those
    of its last delta)."""
    if serving.backend == "onnxruntime":
        return OnnxProgram.of(_compiled(bundle, bundle.onnx, "onnxruntime", "the ONNX model"), bundle.program,
                              threads=serving.dense_threads)
    if serving.backend == "aotinductor":
        package = _compiled(bundle, bundle.aoti, "aotinductor", "the AOTInductor package")
        unfit = unfit_here(bundle.manifest.get("aotinductor", {}))
        if unfit:
            raise ConfigError(f"backend: aotinductor cannot run the package of bundle {bundle.path} here: {unfit}; "
                              f"export it again on a machine like this one, or serve it with backend torch")
        return AotiProgram.of(package, bundle.program)
    program = bundle.program if device.type == "cpu" else move_to_device_pass(bundle.program, device)
    return program.module()  # constants the graph made on the CPU move too


def _compiled(bundle: Bundle, held: _Held | None, backend: str, what: str) -> _Held:
    """`held` (the bundle's compiled form for `backend`), refused when it holds none."""
    if held is None:
        raise ConfigError(f"backend: {backend} needs {what}, and bundle {bundle.path} holds none (it was exported "
                          f"for backend {bundle.config.serving.backend}); export it with tidal export --backend "
                          f"{backend}, or serve it with backend torch")
    return held


def _device(device: str | torch.device | None, backend: str) -> torch.device:
    """The torch device of `Predictor`'s `device` argument, checked: onnxruntime and
    aotinductor run on the CPU."""
    name = "auto" if device is None else str(device) if isinstance(device, torch.device) else device
    if not isinstance(name, str) or not re.fullmatch(DEVICE_PATTERN, name):
        raise ConfigError(f"Predictor(device=...) must be 'auto', 'cpu', 'cuda' or 'cuda:N' (lower case), "
                          f"got {device!r}")
    if backend != "torch" and name != "cpu" and name != "auto":
        raise ConfigError(f"Predictor(device=...) is {name!r}, but backend {backend} runs the dense network on "
                          f"the CPU; use device 'cpu' (or 'auto'), or backend torch")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() and backend == "torch" else "cpu")
    count = torch.cuda.device_count()  # 0 without CUDA
    if name.startswith("cuda") and (torch.device(name).index or 0) >= count:
        seen = f"; use 'auto', 'cpu' or cuda:0 to cuda:{count - 1}" if count else "; use 'auto' or 'cpu'"
        raise ConfigError(f"Predictor(device=...) is {name!r}, but torch sees {count} CUDA devices{seen}")
    return torch.device(name)


def _arrays(columns: Mapping[str, pa.Array]) -> dict[str, pa.Array]:
    """A request's `columns` as pyarrow Arrays (a ChunkedArray's chunks joined); a
    `BatchError` naming what is not."""
    if not isinstance(columns, Mapping):
        raise BatchError(f"piece: columns must be a dict of column name -> pyarrow Array, got {type(columns).__name__}")
    arrays = {c: a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a for c, a in columns.items()}
    wrong = {c: type(a).__name__ for c, a in arrays.items() if not isinstance(a, pa.Array)}
    if wrong:
        raise BatchError(f"piece: columns must be pyarrow Arrays (pa.array(values)), got {wrong} (column: type)")
    return arrays


def _require(columns: dict[str, pa.Array], names: list[str], side: str) -> None:
    """Refuse `columns` without every one of `names`, naming those missing."""
    missing = [c for c in names if c not in columns]
    if missing:
        raise BatchError(f"missing {side} columns {missing}; a piece needs {names}, got {sorted(columns)}")


def _broadcast(name: str, array: pa.Array, rows: int, per_candidate: bool) -> pa.Array:
    """Column `name` with `rows` values, a one-value column repeated unless it is
    `per_candidate` (an item feature's); another length is refused."""
    if len(array) == rows:
        return array
    if per_candidate:
        raise BatchError(f"column {name!r} has {len(array)} value{'s' if len(array) != 1 else ''}; expected {rows} "
                         f"(one per candidate: an item feature reads it); send one value per candidate")
    if len(array) != 1:
        raise BatchError(f"column {name!r} has {len(array)} values; expected {rows} (one per candidate) "
                         f"or 1 (the same for every candidate)")
    return array.take(pa.array(np.zeros(rows, np.int64)))


def _concat(tables: Sequence[pa.RecordBatch]) -> pa.RecordBatch:
    """The rows of several batches of the same columns as one batch (one C++ call)."""
    return tables[0] if len(tables) == 1 else pa.concat_batches(tables)  # 60 us for 8 small ones, a table 160


def _serving_tables(bundle: Bundle) -> list[EmbeddingTable]:
    """The bundle's rows in read-only tables: no optimizer state, admission or eviction."""
    tables = []
    for config in bundle.config.tables:
        table = EmbeddingTable(TableConfig(name=config.name, dim=config.dim, num_shards=config.num_shards,
                                           initializer=config.initializer, seed=config.seed))
        table.push_rows(_row_block(*bundle.tables[config.name]))
        tables.append(table)
    return tables


def _row_block(keys: np.ndarray, values: np.ndarray) -> RowBlock:
    """Serving rows as a block to push: float32 values (a float32 bundle's as they are: a
    copy would be one more copy of the tables while they load), no optimizer state or counts."""
    n = len(keys)
    return RowBlock(keys=keys, values=values.astype(np.float32, copy=False), state=np.zeros((n, 0), np.float32),
                    last_seen=np.zeros(n, np.uint32), counts=np.zeros(n, np.uint32))


def give_back_freed_memory() -> None:
    """Return the memory freed in the process to the system where glibc's allocator
    kept it (`malloc_trim`): after freeing a full copy of the tables, glibc serves the
    next copy from the memory it kept and keeps that too, so a server reloading full
    exports otherwise stays near its reload peak for good. Nothing elsewhere."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)
