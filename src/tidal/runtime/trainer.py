"""The single-process reference trainer: files -> ids -> embeddings -> dense net -> loss.

One step: read and extract a batch, `lookup_or_insert` + pool every sparse feature,
run the dense network, take the weighted binary cross-entropy over the targets,
backpropagate, step the dense optimizer (`training.optimizer`) and apply the fused sparse update.
Progress goes to the terminal and, one JSON object per line, to
``<run_dir>/metrics.jsonl``; the loss and AUC curves to ``<run_dir>/metrics.png``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tidal.config import RunConfig, check_group_feature, is_whole_number, label_column_clash, require
from tidal.data.batch import SparseBatch
from tidal.data.criteo import CRITEO_COLUMNS
from tidal.data.extract import Extractor
from tidal.data.generate import auc
from tidal.data.readers import BadRows, check_layout, expand_paths, format_of, holds_rows
from tidal.embedding import EmbeddingCollection, TableStats
from tidal.embedding.checkpoint import fsync_path, write_text_atomic
from tidal.errors import BatchError, CheckpointError, ConfigError, DataError, TidalError
from tidal.models import PRECISIONS, RankingModel, compute_precision, resolve_precision, step_losses, weighted_bce
from tidal.processes import SIGTERM_CAME
from tidal.runtime import checkpoint
from tidal.runtime.plots import plot_metrics
from tidal.runtime.source import ReaderSpec
from tidal.runtime.telemetry import TELEMETRY_FILE, compile_clock
from tidal.runtime.workers import (check_loss, clip_gradients, dense_device, dense_optimizer, fix_gemm_threads,
                                   rows_not_finite, set_lr)

__all__ = ["Evaluation", "Trainer", "calibration", "group_auc", "normalized_entropy", "shown_auc", "shown_evaluation",
           "shown_figure", "shown_gauc"]


@dataclass(frozen=True, kw_only=True)
class Evaluation:
    """Exact AUC and log loss per target on held-out rows, and the bad rows skipped. A
    target whose rows hold one class only has no AUC (None): nothing to rank. The
    normalized entropy is the log loss over the entropy of the target's positive rate
    (1 for a model that predicts that rate for every row, lower is better; None with
    one class), the calibration the mean predicted probability over the positive rate
    (1 is calibrated; None without positives). With a
    group feature (a user id, say), also each target's group AUC (GAUC): the AUC within
    each group whose rows hold both classes, averaged weighted by the group's rows (rows
    without an id in that feature belong to no group)."""

    rows: int
    auc: dict[str, float | None]
    logloss: dict[str, float]
    normalized_entropy: dict[str, float | None] = field(default_factory=dict)
    calibration: dict[str, float | None] = field(default_factory=dict)
    bad_rows: int = 0
    bad_row_examples: list[str] = field(default_factory=list)
    group_by: str | None = None  # the feature whose ids group the rows for `gauc`
    gauc: dict[str, float | None] | None = None  # each target's group AUC: its groups' AUCs weighted by their rows
    gauc_groups: dict[str, int] | None = None  # the groups that hold both classes of the target: those it averages
    gauc_rows: int | None = None  # the rows with an id in the group feature (the others belong to no group)


def predictions_file(path: str | os.PathLike) -> Path:
    """`path` as a file evaluated rows' predictions can be written to: a `.parquet` name
    in a folder that exists, not a folder itself; a `ConfigError` saying which it is not."""
    path = Path(path)
    if path.suffix != ".parquet":
        raise ConfigError(f"predictions file {path}: expected a name ending in .parquet (they are written as Parquet)")
    if path.is_dir():
        raise ConfigError(f"predictions file {path}: is a folder; expected a .parquet file to write")
    if not path.parent.is_dir():
        raise ConfigError(f"predictions file {path}: its folder does not exist; create it first")
    if not os.access(path.parent, os.W_OK):
        raise ConfigError(f"predictions file {path}: its folder cannot be written to; choose another")
    return path


def write_predictions(path: Path, targets: list[str], logits: np.ndarray, labels: np.ndarray) -> None:
    """Each evaluated row's probability (float32, as the server answers it) and label
    per target, as columns `TARGET` and `TARGET_label`: the valid rows in the files'
    order, bad rows left out. Written to a temporary name first, flushed to disk, then
    renamed: an interrupted write or a crash leaves no partial file."""
    probabilities = torch.sigmoid(torch.from_numpy(logits.astype(np.float32))).numpy()
    columns: dict[str, np.ndarray] = {}
    for k, target in enumerate(targets):
        columns[target], columns[f"{target}_label"] = probabilities[:, k], labels[:, k].astype(np.float32)
    partial = path.with_name(f".tidal-predictions-{os.getpid()}.partial")  # of any name the system takes
    try:
        pq.write_table(pa.table(columns), partial)
        fsync_path(partial)
        os.replace(partial, path)
    except OSError as exc:  # a full disk, say
        raise ConfigError(f"predictions file {path}: cannot write it ({exc.strerror or exc}); the evaluation "
                          f"itself was done") from None
    finally:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)


def normalized_entropy(labels: np.ndarray, logits: np.ndarray) -> float | None:
    """The log loss of `logits` over the entropy of the positive rate of `labels` (0/1);
    None with one class."""
    rate = float(np.mean(labels))
    if rate in (0.0, 1.0):
        return None
    logloss = float(np.mean(np.where(labels > 0, np.logaddexp(0.0, -logits), np.logaddexp(0.0, logits))))
    return logloss / -(rate * math.log(rate) + (1.0 - rate) * math.log(1.0 - rate))


def calibration(labels: np.ndarray, logits: np.ndarray) -> float | None:
    """The mean predicted probability over the positive rate; None without positives."""
    rate = float(np.mean(labels))
    return None if rate == 0.0 else float(np.mean(np.exp(-np.logaddexp(0.0, -logits)))) / rate  # sigmoid, no overflow


def _target_auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """AUC of one target, None when its rows hold one class."""
    positives = np.count_nonzero(labels)
    return auc(labels, scores) if 0 < positives < len(labels) else None


def group_auc(groups: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> tuple[float | None, int]:
    """The group AUC of one target and the number of groups it averages: the exact AUC
    (ties counted half) within each group that holds both classes, weighted by the
    group's rows; None when no group holds both."""
    unknown = int(np.isnan(scores).sum())
    if unknown:
        raise DataError(f"group AUC needs numeric scores, got {unknown} NaN of {len(scores)}; leave out the rows "
                        f"whose scores are not numbers first")
    if len(groups) == 0:
        return None, 0
    order = np.lexsort((scores, groups))  # by group, then by score
    group, label, score = groups[order], labels[order].astype(bool), scores[order]
    new_group = np.r_[True, group[1:] != group[:-1]]
    starts = np.flatnonzero(new_group)
    ties = np.flatnonzero(new_group | np.r_[True, score[1:] != score[:-1]])  # runs of one score in one group
    tie_ends = np.r_[ties[1:], len(group)]
    ranks = np.repeat((ties + tie_ends + 1) / 2.0, tie_ends - ties) - starts[np.cumsum(new_group) - 1]
    sizes = np.diff(np.r_[starts, len(group)])
    positives = np.add.reduceat(label.astype(np.int64), starts)
    negatives = sizes - positives
    both = (positives > 0) & (negatives > 0)
    if not both.any():
        return None, 0
    rank_sums = np.add.reduceat(np.where(label, ranks, 0.0), starts)[both]
    p, n = positives[both], negatives[both]
    return float(np.average((rank_sums - p * (p + 1) / 2.0) / (p * n), weights=sizes[both])), int(both.sum())


def shown_auc(value: float | None) -> str:
    """An AUC as the CLI and the logs print it."""
    return "n/a (one class in the data)" if value is None else f"{value:.4f}"


def shown_figure(value: float) -> str:
    """A loss (or a ratio of losses) as the CLI and the logs print it: 4 decimals, or 4
    significant digits once it is too large for decimals to mean anything (a diverged
    model's log loss of 1e30 would print 35 digits)."""
    return f"{value:.4f}" if abs(value) < 1e6 else f"{value:.4g}"


def shown_evaluation(evaluation: Evaluation, target: str) -> str:
    """A target's evaluation as the CLI prints it."""
    ne, calibrated = evaluation.normalized_entropy.get(target), evaluation.calibration.get(target)
    return (f"AUC {shown_auc(evaluation.auc[target])}  log loss {shown_figure(evaluation.logloss[target])}  "
            f"NE {'n/a' if ne is None else shown_figure(ne)}  "
            f"calibration {'n/a' if calibrated is None else f'{calibrated:.3f}'} "
            f"on {evaluation.rows:,d} rows{shown_gauc(evaluation, target)}")


_PROGRESS_S = 10.0  # long work prints how far it got this often


class _Progress:
    """Long work's progress: a line every `_PROGRESS_S` seconds (none for short work)."""

    def __init__(self, what: str) -> None:
        self.what, self.rows = what, 0
        self.start = self.shown = time.monotonic()

    def add(self, rows: int) -> None:
        self.rows += rows
        now = time.monotonic()
        if now - self.shown >= _PROGRESS_S:
            print(f"  {self.what}: {self.rows:,d} rows so far ({self.rows / (now - self.start):,.0f} rows/s)",
                  flush=True)
            self.shown = now


def _table_summary(stats: TableStats) -> dict:
    """A table's size and what became of the ids it was given, over the whole run.
    Its bytes are the memory it holds: its rows' chunks (as many as its most rows ever
    needed, evicted rows' included), index and metadata."""
    return {"rows": stats.rows, "bytes": stats.allocated_bytes + stats.index_bytes + stats.metadata_bytes,
            "admitted": stats.admitted, "evicted": stats.evicted, "not_admitted": stats.not_admitted,
            "dropped_full": stats.dropped_full}


def shown_table(name: str, table: dict) -> str:
    """A table's line in the CLI's run summary: its size, and the ids that got no row."""
    line = f"table {name}: {table['rows']:,d} row{'' if table['rows'] == 1 else 's'}, {table['bytes'] / 2**20:.1f} MiB held"
    if table["evicted"]:
        line += f" ({table['admitted']:,d} created, {table['evicted']:,d} evicted)"
    if table["not_admitted"]:
        line += f"; {table['not_admitted']:,d} sightings of new ids not admitted (yet)"
    if table["dropped_full"]:
        line += (f"; {table['dropped_full']:,d} sightings of new ids got no row: the table was at its row cap with no "
                 f"eviction to make room (they read zeros; give the table an eviction, or a higher cap)")
    return line


def shown_gauc(evaluation: Evaluation, target: str) -> str:
    """A target's group AUC as the CLI and the logs print it after its AUC ('' without one)."""
    if evaluation.gauc is None:
        return ""
    value, groups, by = evaluation.gauc[target], evaluation.gauc_groups[target], evaluation.group_by
    notes = [] if value is not None else ["no group holds both classes"]
    if evaluation.gauc_rows != evaluation.rows:
        notes.append(f"{evaluation.rows - evaluation.gauc_rows:,d} rows without an id of {by} left out")
    shown = "n/a" if value is None else f"{value:.4f} over {groups:,d} group{'s' if groups != 1 else ''}"
    return f"  GAUC by {by} {shown}" + (f" ({'; '.join(notes)})" if notes else "")


def _keep_records_up_to(metrics: Path, step: int) -> None:
    """Drop the records of `metrics` (a run's metrics.jsonl) past `step`, the checkpoint
    a run resumes from, any line a killed run left torn, and the end of the part that
    stopped (its summary, and its final evaluation where `eval_every` made none): the
    resumed run logs those steps again and ends the log with its own, so that the log
    reads as one run. The file is replaced atomically."""
    if not metrics.exists():
        return
    lines = metrics.read_text().splitlines(keepends=True)
    kept = [line for line in lines if (logged := _logged_step(line)) is not None and logged <= step]
    if kept == lines:
        return
    write_text_atomic(metrics, "".join(line if line.endswith("\n") else line + "\n" for line in kept))


def _check_holds_rows(files: list[str], file_format: str | None, csv_header: bool) -> None:
    """Refuse data files of which none holds a row: nothing would train, or evaluate."""
    kinds = {f: file_format or format_of(f) for f in files}
    if not any(holds_rows(f, kind, csv_header) for f, kind in kinds.items()):
        shown = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
        aside = " (but a header line)" if csv_header and "csv" in kinds.values() else ""
        raise DataError(f"{shown} {'holds' if len(files) == 1 else 'hold'} no rows{aside}")


def _refuse_foreign_log(run_dir: Path) -> None:
    """Refuse a fresh run into `run_dir` where its metrics.jsonl, which the run writes
    anew, was not written by a Tidal run (whose records begin with their event, the
    first one too when a killed run left it torn)."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file() or metrics.stat().st_size == 0:
        return
    with open(metrics, "rb") as f:
        first = f.read(len(_RECORD_START))
    if first != _RECORD_START:
        raise ConfigError(f"training.run_dir {run_dir} holds a metrics.jsonl that no Tidal run wrote, which a run "
                          f"there would overwrite: choose another run_dir, or move that file away")


_RECORD_START = b'{"event": "'  # of every line of a run's metrics.jsonl


def _write_record(log: IO[str], record: dict) -> None:
    """One line of metrics.jsonl: `record` and when it was written (`time`, Unix seconds)."""
    log.write(json.dumps({**record, "time": round(time.time(), 3)}) + "\n")


def _logged_step(line: str) -> int | None:
    """The step a metrics.jsonl line was logged at (0 for a record of none), or None
    for a line to drop on resume: not a JSON record (torn), a run's end summary or its
    final evaluation."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or record.get("event") == "end" or record.get("final") is True:
        return None
    logged = record.get("step", 0)
    return logged if isinstance(logged, int) else 0


class RunProgress:
    """What a run's log counts: rows from the run's first step (a resumed run goes on
    from its checkpoint's count), the losses since the last log record (each target's
    too, when there are several `targets`), and the speed, evaluation left out: this
    call's mean, and since the last record (what the progress line shows)."""

    def __init__(self, targets: list[str]) -> None:
        self.targets = targets
        self.rows_before = 0  # trained before this call: by the run a resume continues (set by restore)
        self.rows = 0  # trained by this call
        self.losses: list[float] = []  # of the steps since the last log record
        self.target_losses: list[list[float]] = []  # of the same steps (not in checkpoints of before they were kept)
        self.start, self.eval_s = time.perf_counter(), 0.0
        self.stopped: float | None = None  # when training ended, if it was before its workers stopped
        self._recorded = (0, 0.0)  # (rows, training seconds) at the last record

    def training_s(self) -> float:
        """Seconds spent training by this call: from `start` (its workers ready) to the
        end of its last step, evaluations left out."""
        return (self.stopped or time.perf_counter()) - self.start - self.eval_s

    def add(self, rows: int, losses: np.ndarray) -> None:
        """Count a trained step of `losses` (`tidal.models.step_losses`); a SIGTERM that
        Python dropped (it landed in a finalizer) stops the run here as one that was not."""
        if SIGTERM_CAME.is_set():
            raise KeyboardInterrupt
        self.rows += rows
        self.losses.append(float(losses[0]))
        self.target_losses.append([float(x) for x in losses[1:]])

    def record(self, epoch: int, step: int, bad_rows: int) -> dict:
        """The log record at `step`; the losses start again."""
        seconds = self.training_s()
        rows, since = self.rows - self._recorded[0], seconds - self._recorded[1]
        self._recorded = (self.rows, seconds)
        record = {"event": "train", "epoch": epoch, "step": step, "rows": self.rows_before + self.rows,
                  "loss": float(np.mean(self.losses)), "samples_per_s": self.rows / max(seconds, 1e-9),
                  "recent_samples_per_s": rows / max(since, 1e-9), "bad_rows": bad_rows}
        if len(self.targets) > 1 and len(self.target_losses) == len(self.losses):  # all of them (see restore)
            record["target_loss"] = dict(zip(self.targets, np.mean(self.target_losses, axis=0).tolist()))
        self.losses, self.target_losses = [], []
        return record

    def state(self) -> dict:
        """What a checkpoint keeps, for the log of a run resumed from it."""
        return {"rows": self.rows_before + self.rows, "losses": list(self.losses),
                "target_losses": list(self.target_losses)}


@dataclass(frozen=True)
class Due:
    """What falls after a step: an eviction (tables that evict or admit), an
    evaluation, a checkpoint."""

    evict: bool
    evaluate: bool
    checkpoint: bool

    def __bool__(self) -> bool:
        return self.evict or self.evaluate or self.checkpoint


class Trainer:
    """Builds the tables, the extractor and the model of a `RunConfig`, and trains them."""

    def __init__(self, config: RunConfig) -> None:
        require(config, RunConfig, "Trainer: config")
        self.config = config
        self.run_id = uuid.uuid4().hex  # this run's, in its checkpoints; a resume takes its checkpoint's
        self.origin: dict | None = None  # the checkpoint a warm start began this run from (checkpoint.start_from)
        self.last_saved: tuple[int, str] | None = None  # (step, folder) of the checkpoint it last wrote
        fix_gemm_threads()  # the same splits of every matrix product in every run, busy machine or not
        torch.manual_seed(config.training.seed)
        self.extractor = Extractor(config.features)
        training = config.training
        self.collection = EmbeddingCollection(config.tables, [f.embedding() for f in self.extractor.sparse],
                                              threads=training.threads,
                                              lr_scale=training.table_lr_scale if training.schedules_tables else None)
        self.device = dense_device(config.training.device, key="training.device")
        if config.runtime is not None and config.runtime.backend == "local":  # refused here, before the run makes
            dense_device(config.runtime.device)  # its run_dir (a Ray cluster's devices are its nodes')
        self.model = RankingModel(config.model, num_features=len(self.extractor.sparse), dim=self.collection.dim,
                                  dense_features=len(self.extractor.dense), num_targets=len(self.extractor.labels))
        self.model.to(self.device)
        self.precision = resolve_precision(self.device, config.training.precision)
        self.optimizer = dense_optimizer(self.model, config.training)
        self.loss_weights = torch.tensor([f.weight for f in self.extractor.labels])
        self.targets = [f.name for f in self.extractor.labels]
        self.bad_rows = BadRows()  # of the training data, counted on its first pass
        self.run_dir = Path(config.training.run_dir)
        self.elapsed_s = 0.0
        self.runtime_report: dict | None = None  # telemetry and faults of a heterogeneous run
        self.engine = None  # the heterogeneous engine while one trains
        self.progress = RunProgress(self.targets)  # of the run fit trains
        self.data_files: list[list] = []  # [name, bytes] of the training files, when fit began (for checkpoints)
        self._trained = False  # whether a fit changed the tables and weights from their fresh state
        self._last_eval: tuple[int, Evaluation] | None = None  # (step, result) of the latest evaluation

    # ------------------------------------------------------------------ data

    def batches(self, paths: str | list[str], bad_rows: BadRows | None = None) -> Iterator[SparseBatch]:
        """Extracted batches of the files at `paths`; bad rows are counted in `bad_rows`."""
        for table in self._tables(paths, bad_rows if bad_rows is not None else BadRows()):
            yield self.extract(table)

    def extract(self, table: pa.RecordBatch) -> SparseBatch:
        """One record batch as a SparseBatch (the one place training and eval extract)."""
        return self.extractor(table)

    def _tables(self, paths: str | list[str], bad_rows: BadRows,
                sizes: dict[str, int] | None = None) -> Iterator[pa.RecordBatch]:
        yield from self.reader_spec(paths, sizes=sizes).epoch(bad_rows)

    @property
    def data_sizes(self) -> dict[str, int]:
        """The bytes of each training file when fit began (`data_files`)."""
        return dict(self.data_files)

    def reader_spec(self, paths: str | list[str], *, epochs: int = 1, start_epoch: int = 0,
                    start_batch: int = 0, sizes: dict[str, int] | None = None) -> ReaderSpec:
        """How to read the files at `paths` as this run's batches (checked, columns resolved);
        `sizes` as `read_batches` takes them."""
        data = self.config.data
        files = expand_paths(paths)
        formats = {f: data.format or format_of(f) for f in files}
        if len(set(formats.values())) > 1:
            examples = {kind: f for f, kind in formats.items()}
            raise DataError(f"the data files mix formats ({', '.join(f'{f} is {k}' for k, f in examples.items())}); "
                            f"every file of a list must have the same format and columns")
        positional = self._positional(formats[files[0]])  # columns by position, not by a header's names
        layout = (data.columns or list(CRITEO_COLUMNS)) if positional else None
        missing = [c for c in self.extractor.columns if layout and c not in layout]
        if missing:
            listed = "data.columns" if data.columns else "the default TSV layout (Criteo's: data.columns is not set)"
            raise DataError(f"the features read columns {missing}, which {listed} lacks; it lists {layout}")
        return ReaderSpec(files=files, columns=list(self.extractor.columns), layout=layout,
                          checks=dict(self.extractor.checks), file_format=data.format, batch_rows=data.batch_size,
                          on_bad_row=data.on_bad_row, epochs=epochs, start_epoch=start_epoch, start_batch=start_batch,
                          csv_header=data.csv_header, max_bad_fraction=data.max_bad_fraction, sizes=sizes)

    def _positional(self, kind: str) -> bool:
        """Whether files of format `kind` have their columns by position (`data.columns`,
        Criteo's by default): TSV, and CSV without a header line."""
        return kind == "tsv" or (kind == "csv" and not self.config.data.csv_header)

    # ------------------------------------------------------------------ training

    def set_sparse_workers(self, count: int) -> None:
        """Change the number of sparse workers of the heterogeneous run training now
        (from any thread; batches of a removed worker go to the others)."""
        if self.engine is None:
            raise TidalError("no heterogeneous run is training: set_sparse_workers needs a config with "
                             "a runtime section, called while fit() runs")
        self.engine.resize(count, asked_by="Trainer.set_sparse_workers")

    def step(self, batch: SparseBatch, *, step: int | None = None) -> np.ndarray:
        """One training step on `batch`; its losses: the weighted total, then each
        target's (`tidal.models.step_losses`). The batch holds the config's sparse
        features in the config's order, its dense features and its labels, as
        `extract` makes them. `step` is the tables' step of its lookups (default: the one
        after the latest; `fit` gives the run's step, as the heterogeneous engine does)."""
        self.check_batch(batch)
        ctx = self.collection.lookup(batch, step=step)
        loss, grad = self.dense_step(batch, self.collection.pool(batch, ctx, dtype=PRECISIONS[self.precision]),
                                     step=self.collection.tables[0].step if step is None else step)
        self.collection.backward(ctx, grad.cpu(), check_finite=False)  # dense_step checked the loss
        return loss

    def dense_step(self, batch: SparseBatch, pooled: torch.Tensor, *, step: int) -> tuple[np.ndarray, torch.Tensor]:
        """The dense network's training step on `batch`, the run's step `step` (its
        learning rate follows `training.lr_schedule`), given its pooled embeddings
        `[B, F, D]`: its losses (as `step`'s), and the gradient of `pooled` (on the training device)."""
        set_lr(self.optimizer, self.config.training.lr_at(step))
        self.model.train()
        pooled = pooled.to(self.device, PRECISIONS[self.precision]).requires_grad_(True)
        with compute_precision(self.device, self.precision):
            logits = self.model(pooled, self._dense(batch))  # [B, T]
        labels = torch.tensor(batch.labels).to(self.device)
        loss, per_target = weighted_bce(logits.float(), labels, self.loss_weights.to(self.device), batch.batch_size)
        if not math.isfinite(value := loss.item()):  # stop before any weight takes the step
            check_loss(value, step, rows_not_finite(logits.detach()), batch.batch_size)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(self.model, self.config.training)
        self.optimizer.step()
        return step_losses(loss, per_target), pooled.grad

    def check_batch(self, batch: SparseBatch) -> None:
        """A BatchError unless `batch` is laid out as `extract` lays it out."""
        if not isinstance(batch, SparseBatch):
            raise BatchError(f"a training step takes a SparseBatch, got {type(batch).__name__}")
        if batch.batch_size == 0:
            raise BatchError("a training step needs at least one sample, got an empty batch")
        sparse = tuple(f.name for f in self.extractor.sparse)
        if batch.keys != sparse:
            raise BatchError(f"the batch's sparse features must be the config's, in its order: expected {list(sparse)}, "
                             f"got {list(batch.keys)} (Trainer.extract makes batches in that order)")
        shapes = {"labels": (batch.labels, len(self.targets)), "dense": (batch.dense, len(self.extractor.dense))}
        for name, (array, width) in shapes.items():
            shape = None if array is None else tuple(np.shape(array))
            if shape != (batch.batch_size, width) and not (name == "dense" and width == 0 and array is None):
                raise BatchError(f"the batch's {name} must be [B, {width}] = [{batch.batch_size}, {width}] "
                                 f"(one column per {'target' if name == 'labels' else 'dense feature'}), got {shape}")

    def _dense(self, batch: SparseBatch) -> torch.Tensor:
        """The dense features `[B, Dd]` on the trainer's device."""
        if batch.dense is None:
            return torch.zeros(batch.batch_size, 0, device=self.device)
        return torch.tensor(batch.dense).to(self.device)

    def fit(self, *, resume: bool = False, max_steps: int | None = None,
            init_from: str | os.PathLike | None = None) -> dict:
        """Train for the configured epochs (or `max_steps`), checkpointing on the way
        and at the end (stopping at `max_steps` writes no extra checkpoint). The
        summary's `steps` is the last step trained, `resumed_from` the checkpoint's step
        it started after (0 for a fresh run), `origin` the checkpoint a warm start began
        the run from (None for others); its rows and speed count this call's steps;
        speed leaves out evaluation.
        Its `compile_s` is the part of the run numba spent compiling kernels on their
        first use on this machine (0 once its disk cache holds them).

        With `resume`, continue from the run's latest checkpoint: the same batches in
        the same order, so the result equals an uninterrupted run's (metrics.jsonl
        loses the records past that checkpoint, which this run logs again, and the
        stopped part's end summary and final evaluation; a checkpoint written before
        checkpoints kept the run's row count resumes counting rows from 0). Without
        it, a run_dir that holds a run's checkpoints is refused rather than mixed with
        them. A run holds its run_dir while it trains: a second one into it is refused.

        With `init_from` (a run directory, for its latest checkpoint, or a checkpoint
        directory of another run), a fresh run starts from that checkpoint's model: its
        tables and dense weights with their optimizer state, at its step (steps and
        `max_steps` go on from there), on this config's data from its start. The
        features, tables and model must be the checkpoint's (`checkpoint.start_from`).
        """
        if max_steps is not None and (not is_whole_number(max_steps) or max_steps < 1):
            raise ConfigError(f"max_steps is the step to stop after: an integer >= 1, or None for every epoch; "
                              f"got {max_steps!r}")
        if resume and init_from is not None:
            raise ConfigError("resume continues this run from its own checkpoint, init_from starts it from another "
                              "run's: give one of them")
        if not isinstance(resume, bool):
            raise ConfigError(f"resume must be True or False, got {resume!r}")
        if self._trained and not resume and init_from is None:
            raise ConfigError("this Trainer trained already, and its tables and weights hold that training: a fresh "
                              "run needs a new Trainer(config); fit(resume=True) goes on from the run's latest "
                              "checkpoint")
        self._check_data_paths()
        self.data_files = checkpoint.data_files(self.config.data.train)  # what the positions of this run count
        origin = None if init_from is None else Path(init_from)
        if origin is not None:  # a clear error before anything is written: no checkpoint there, or another model's
            with checkpoint.reading(origin) as directory:
                checkpoint.check_start(self, directory)
        self._check_run_dir(resume)
        with checkpoint.hold_run_dir(self.run_dir):
            summary = self._fit(resume, max_steps, origin)
            plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "metrics.png")
        return summary

    def _fit(self, resume: bool, max_steps: int | None, origin: Path | None) -> dict:
        """`fit` once the run holds its run_dir."""
        position = self._start(resume, origin)
        self._trained = True
        if max_steps is not None and max_steps <= position["step"]:
            raise ConfigError(f"max_steps {max_steps} is not past the checkpoint's step {position['step']}: "
                              f"nothing would train")
        if resume:
            _keep_records_up_to(self.run_dir / "metrics.jsonl", position["step"])
        first = position["step"]
        with open(self.run_dir / "metrics.jsonl", "a" if resume else "w") as log, compile_clock() as compiling:
            self.progress.start = time.perf_counter()
            if position["epoch"] >= self.config.training.epochs:  # a resume of a finished run: no reader, no
                step, finished = first, True                          # worker, its telemetry left as it was
            elif self.config.runtime is not None:
                from tidal.runtime.hetero import train

                step, finished = train(self, log, position, max_steps)
            else:  # an engine command's telemetry, before this resume, does not describe this run
                (self.run_dir / TELEMETRY_FILE).unlink(missing_ok=True)
                if self.config.passmode is not None:
                    from tidal.runtime.passes import train

                    step, finished = train(self, log, position, max_steps)
                else:
                    step, finished = self._train(log, position, max_steps)
            rows = self.progress.rows
            self.elapsed_s = self.progress.training_s()
            if step == first and not resume:  # a resume may find nothing left to train
                raise DataError(f"no valid rows to train on in data.train: {self._why_no_rows().none_valid()}")
            if finished and step > first:  # no eviction off the evict_every schedule: a longer run
                # resumed here must match; a resume that trained nothing keeps its checkpoint (and its position)
                checkpoint.save(self, {"step": step, "epoch": self.config.training.epochs, "batch": 0})
            # the tables as `tidal export` serves them, within their caps (past the checkpoint: a resumed run must
            # match one that had more epochs, which evict only every evict_every steps)
            evicted = self.collection.evict() if self.collection.evicts else 0
            evaluation = self._final_eval(log, step, evicted) if self.config.data.eval else None
            summary = self._summary(step, rows, evaluation) | {"compile_s": compiling(), "resumed_from": first,
                                                                "origin": self.origin}
            _write_record(log, {"event": "end", **summary})
        return summary

    def _start(self, resume: bool, origin: Path | None) -> dict[str, int]:
        """The position the run trains from: its own latest checkpoint's (`resume`),
        the start of its data at the step of the checkpoint `origin` (a warm start), or
        the start; the checkpoint is loaded, held meanwhile against a run replacing it."""
        self.progress = RunProgress(self.targets)
        if resume:
            return checkpoint.restore_latest(self)  # its progress too
        if checkpoint.holds_checkpoints(self.run_dir):
            if origin is not None:
                raise ConfigError(f"training.run_dir {self.run_dir} holds an earlier run's checkpoints; a warm start "
                                  f"is a fresh run: give it a run_dir of its own")
            raise ConfigError(f"training.run_dir {self.run_dir} holds an earlier run's checkpoints: pass --resume "
                              f"(fit(resume=True)) to continue it, or choose another run_dir, or delete that one")
        if origin is None:
            return {"step": 0, "epoch": 0, "batch": 0}
        with checkpoint.reading(origin) as directory:
            return checkpoint.start_from(self, directory)

    def _why_no_rows(self) -> BadRows:
        """The training data's report, once no row trained. A run whose batches came
        from the engine has none (its bad rows are counted with the batches): the files,
        which hold no valid row, are read again to say why."""
        if self.bad_rows.count or self.bad_rows.empty_files:
            return self.bad_rows
        report = BadRows()
        for _ in self._tables(self.config.data.train, report):
            pass
        return report

    def _check_data_paths(self) -> None:
        """Every data file named, found and readable as the config says before anything
        trains, a file that names its columns naming the ones read, and one that does not
        holding as many fields in one of its first records (but where any share of bad
        rows is taken); an error names its key. The layout settings apply to some of them."""
        data = self.config.data
        kinds = set()
        for key, paths in (("data.train", data.train), ("data.eval", data.eval)):
            try:
                if paths:
                    spec = self.reader_spec(paths)
                    kinds |= {data.format or format_of(f) for f in spec.files}
                    check_layout(spec.files, spec.columns, spec.file_format, spec.csv_header, layout=spec.layout,
                                 widths=data.max_bad_fraction < 1.0, checks=spec.checks)
                    _check_holds_rows(spec.files, data.format, data.csv_header)
            except DataError as exc:
                raise DataError(f"{key}: {exc}") from None
        self._check_reading_settings(kinds)

    def _check_reading_settings(self, kinds: set[str]) -> None:
        """Refuse data.columns and data.csv_header: false where no file of the formats
        `kinds` reads them."""
        data = self.config.data
        if data.columns is not None and not any(map(self._positional, kinds)):
            shown = " and ".join({"csv": "CSV with a header line", "parquet": "Parquet"}[k] for k in sorted(kinds))
            raise ConfigError(f"data.columns names the columns of TSV files and of CSV files without a header line "
                              f"(data.csv_header: false), but the data files are {shown}, which name their own: "
                              f"remove it")
        if not data.csv_header and "csv" not in kinds:
            raise ConfigError(f"data.csv_header is false, but no data file is CSV ({' and '.join(sorted(kinds))}): "
                              f"remove it")

    def _check_run_dir(self, resume: bool) -> None:
        """The run_dir can take this run: a folder (made for a fresh run) whose
        checkpoints, if there, are a folder too, and which holds one to resume from."""
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ConfigError(f"training.run_dir {self.run_dir} is a file; expected a folder for the run")
        checkpoints = self.run_dir / "checkpoints"
        if checkpoints.exists() and not checkpoints.is_dir():
            raise ConfigError(f"training.run_dir {self.run_dir}: {checkpoints} is a file; expected the folder of the "
                              f"run's checkpoints there (or nothing): move that file away, or choose another run_dir")
        if resume:
            try:
                checkpoint.latest(self.run_dir)  # a clear error, before anything is written, when there is none
            except CheckpointError:
                checkpoint.check_not_held(self.run_dir)  # a run training there has not saved one yet: say that
                raise
        else:
            _refuse_foreign_log(self.run_dir)
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # a file on the way, no permission, ...
                raise ConfigError(f"training.run_dir {self.run_dir}: cannot make the folder ({exc.strerror or exc}"
                                  f"{f': {exc.filename}' if exc.filename else ''}); choose another run_dir") from None

    def due(self, step: int) -> Due:
        """What falls after `step` by the config: an eviction, an evaluation, a checkpoint."""
        training, data = self.config.training, self.config.data
        return Due(evict=self.collection.evicts and step % training.evict_every == 0,
                   evaluate=bool(training.eval_every and data.eval and step % training.eval_every == 0),
                   checkpoint=bool(training.checkpoint_every and step % training.checkpoint_every == 0))

    def training_batches(self, position: dict) -> Iterator[tuple[int, int, SparseBatch]]:
        """The run's batches from `position` on, as (epoch, number in the epoch, batch);
        the first epoch's bad rows are counted in `bad_rows` as it is read."""
        skip = position["batch"]  # past its epoch's end (an engine run's lost batches): into the next, as BatchSource
        for epoch in range(position["epoch"], self.config.training.epochs):
            report, n = BadRows(), -1
            if epoch == 0:  # the first pass reads every row, skipped or not: it counts each bad row once
                self.bad_rows = report
            for n, table in enumerate(self._tables(self.config.data.train, report, self.data_sizes)):
                if n >= skip:  # the others were done before the checkpoint we resumed from
                    yield epoch, n, self.extract(table)
            skip = max(0, skip - (n + 1))

    def _train(self, log, position: dict, max_steps: int | None) -> tuple[int, bool]:  # type: ignore[no-untyped-def]
        """Steps up to the end (or `max_steps`): (last step, finished)."""
        step = position["step"]
        for epoch, n, batch in self.training_batches(position):
            step += 1
            self.count_step(log, epoch, step, batch.batch_size, self.step(batch, step=step))
            due = self.due(step)
            if due.evict:
                self.collection.evict()  # a safe point: this step's update has landed
            self.evaluate_and_save(log, step, due, {"step": step, "epoch": epoch, "batch": n + 1})
            if max_steps is not None and step >= max_steps:
                return step, False
        return step, True

    def evaluate_and_save(self, log, step: int, due: Due,  # type: ignore[no-untyped-def]
                          position: dict[str, int]) -> None:
        """Evaluate and save a checkpoint at `position` (of `step`) as `due` says. An
        evaluation that fails stops the run once the checkpoint of this step is saved,
        due or not: the steps since the last one are not lost to it."""
        if due.evaluate:
            try:
                self._log_eval(log, step)
            except DataError as exc:
                checkpoint.save(self, position)
                raise DataError(f"the evaluation at step {step:,d} failed: {exc}\nThe run saved its checkpoint of that "
                                f"step: give data.eval files it can evaluate and resume the run (--resume)") from None
        if due.checkpoint:
            checkpoint.save(self, position)

    def _check_writable_beside(self, predictions: Path, files: list[str]) -> None:
        """Refuse a predictions file that would replace one of the evaluated `files`, or
        whose columns would mix up this model's targets."""
        if predictions.resolve() in {Path(f).resolve() for f in files}:
            raise ConfigError(f"predictions file {predictions}: is one of the files evaluated; choose another name")
        if clash := label_column_clash(self.targets):
            raise ConfigError(f"predictions file {predictions}: {clash}")

    def _final_eval(self, log, step: int, evicted: int) -> Evaluation:  # type: ignore[no-untyped-def]
        """The evaluation at the last step: the one `eval_every` made there, if it did and
        no row was `evicted` since. One that fails says that the training is done and saved."""
        if self._last_eval is not None and self._last_eval[0] == step and not evicted:
            return self._last_eval[1]
        try:
            return self._log_eval(log, step, final=True)
        except DataError as exc:
            saved = " and saved its checkpoint" if self._saved_at(step) else ""
            raise DataError(f"the run trained to step {step:,d}{saved}, but its final evaluation failed: {exc}\nTo "
                            f"evaluate it, give data.eval files in the layout of the training data and resume the run "
                            f"(--resume, without --init-from; a run that reached the end of its data trains nothing "
                            f"more)") from None

    def _saved_at(self, step: int) -> bool:
        """Whether the run's latest checkpoint is the one of `step`."""
        return (checkpoint.latest_name(self.run_dir) or "").startswith(f"step-{step:08d}-")

    def _log_eval(self, log, step: int, final: bool = False) -> Evaluation:  # type: ignore[no-untyped-def]
        """Evaluate and log it; `final` marks the run's closing evaluation, which a
        resumed run drops from the log and makes again at its own end."""
        start = time.perf_counter()
        evaluation = self.evaluate(self.config.data.eval)
        self.progress.eval_s += time.perf_counter() - start
        final_mark = {"final": True} if final else {}
        _write_record(log, {"event": "eval", "step": step, **final_mark, **asdict(evaluation)})
        log.flush()
        shown = "  ".join(f"{t} AUC {shown_auc(a)}{shown_gauc(evaluation, t)}" for t, a in evaluation.auc.items())
        bad = evaluation.bad_rows
        skipped = f"  ({bad:,} bad row{'s' if bad != 1 else ''} skipped)" if bad else ""
        print(f"  eval at step {step}: {shown}{skipped}", flush=True)
        self._last_eval = (step, evaluation)
        return evaluation

    def count_step(self, log, epoch: int, step: int, rows: int,  # type: ignore[no-untyped-def]
                   losses: np.ndarray) -> None:
        """Count a finished step's rows and losses; log the progress every `log_every` steps."""
        self.progress.add(rows, losses)
        if step % self.config.training.log_every == 0:
            self._log(log, epoch, step)

    def _log(self, log, epoch: int, step: int) -> None:  # type: ignore[no-untyped-def]
        """Log the progress at `step` (rows from the run's start; the speed since the last line)."""
        training = self.config.training
        rates = {"lr": training.lr_at(step)} | ({"table_lr_scale": training.table_lr_scale(step)}
                                                if training.schedules_tables else {})
        record = self.progress.record(epoch, step, self.bad_rows.count) | rates
        _write_record(log, record)
        log.flush()
        targets = ", ".join(f"{t} {shown_figure(v)}" for t, v in record.get("target_loss", {}).items())
        shown = f" ({targets})" if targets else ""
        shown += f"  lr {rates['lr']:.3g}" if training.lr_schedule is not None else ""
        print(f"  epoch {epoch}  step {step:6d}  loss {shown_figure(record['loss'])}{shown}  "
              f"{record['recent_samples_per_s']:,.0f} samples/s  bad rows {self.bad_rows.count:,}", flush=True)

    def _summary(self, steps: int, rows: int, evaluation: Evaluation | None) -> dict:
        return {"steps": steps, "rows": rows, "run_rows": self.progress.rows_before + rows,
                "samples_per_s": rows / max(self.elapsed_s, 1e-9),
                "bad_rows": self.bad_rows.count, "bad_row_examples": self.bad_rows.examples,
                "runtime": self.runtime_report,
                "eval": asdict(evaluation) if evaluation else None,
                "tables": {t.name: _table_summary(t.stats()) for t in self.collection.tables}}

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, paths: str | list[str], *, group_by: str | Literal[False] | None = None,
                 predictions: str | os.PathLike | None = None) -> Evaluation:
        """Exact AUC and log loss of every target over the files at `paths` (no updates),
        with the bad rows met in them, and the group AUC over the ids of the sparse
        feature `group_by` (by default the config's `data.eval_group_by`; False: none,
        as `tidal eval --no-group-by`). AUCs are
        computed from the logits, which keep apart the scores that float32
        probabilities would round to 1. With `predictions`, each evaluated row's
        probability and label per target are written to that Parquet file
        (`write_predictions`)."""
        if predictions is not None:
            predictions = predictions_file(predictions)
        group_by = self.config.data.eval_group_by if group_by is None else None if group_by is False else group_by
        group_index = self._group_index(group_by)
        spec = self.reader_spec(paths)
        check_layout(spec.files, spec.columns, spec.file_format, spec.csv_header, layout=spec.layout,
                     widths=self.config.data.max_bad_fraction < 1.0, checks=spec.checks)
        if predictions is not None:
            self._check_writable_beside(predictions, spec.files)
        missing_id = None if group_by is None else self.extractor.missing_id(group_by)
        self.model.eval()
        logits, labels, groups, has_id, bad_rows = [], [], [], [], BadRows()
        progress = _Progress("evaluating")
        for batch in self.batches(paths, bad_rows):
            progress.add(batch.batch_size)
            pooled, _ = self.collection.forward(batch, train=False)
            logits.append(self.model(pooled.to(self.device), self._dense(batch)).float().cpu().numpy())
            labels.append(batch.labels)
            if group_index is not None:
                ids, present = _row_ids(batch, group_index)
                groups.append(ids)
                has_id.append(present if missing_id is None else present & (ids != missing_id))
        if not logits:
            raise DataError(f"no valid rows to evaluate in {paths}: {bad_rows.none_valid()}")
        z, y = np.concatenate(logits).astype(np.float64), np.concatenate(labels)
        scored = self._scored_rows(z, bad_rows)
        z, y = z[scored], y[scored]
        if predictions is not None:
            write_predictions(predictions, self.targets, z, y)
        aucs = {t: _target_auc(y[:, k], z[:, k]) for k, t in enumerate(self.targets)}
        logloss = np.where(y > 0, np.logaddexp(0.0, -z), np.logaddexp(0.0, z)).mean(0)  # binary cross-entropy of the
        # logits, infinite ones included (a sure, right answer costs 0; a sure, wrong one costs infinity)
        evaluation = Evaluation(
            rows=len(y), auc=aucs, logloss={t: float(logloss[k]) for k, t in enumerate(self.targets)},
            normalized_entropy={t: normalized_entropy(y[:, k], z[:, k]) for k, t in enumerate(self.targets)},
            calibration={t: calibration(y[:, k], z[:, k]) for k, t in enumerate(self.targets)},
            bad_rows=bad_rows.count, bad_row_examples=bad_rows.examples)
        if group_index is None:
            return evaluation
        with_id = np.concatenate(has_id)[scored]  # rows without an id in the group feature belong to no group
        grouped = {t: group_auc(np.concatenate(groups)[scored][with_id], y[with_id, k], z[with_id, k])
                   for k, t in enumerate(self.targets)}
        return replace(evaluation, group_by=group_by, gauc={t: g for t, (g, _) in grouped.items()},
                       gauc_groups={t: n for t, (_, n) in grouped.items()}, gauc_rows=int(with_id.sum()))

    def _scored_rows(self, logits: np.ndarray, bad_rows: BadRows) -> np.ndarray:
        """Which evaluated rows have outputs that are numbers (an infinite logit is one: a
        probability of 0 or 1, as served). The others are bad rows: a row's inputs may
        pass every check and still overflow the network (a weighted bag's weight near
        float32's limit, say); more of them than `data.max_bad_fraction` allows, and
        training most likely diverged."""
        scored = ~np.isnan(logits).any(axis=1)
        if scored.all():
            return scored
        unscored = np.flatnonzero(~scored)
        share = unscored.size / len(logits)
        if share > self.config.data.max_bad_fraction or not scored.any():
            raise DataError(f"the model's outputs are not numbers for {unscored.size:,d} of the {len(logits):,d} "
                            f"rows evaluated ({share:.1%}, more than data.max_bad_fraction allows): training most "
                            f"likely diverged (try a lower learning rate)")
        why = [f"valid row {i} of the evaluation (from 0, in the files' order, bad rows left out): the model's "
               f"outputs are not numbers; its inputs overflow the network (a weighted bag's weight or a dense number "
               f"too large, say)" for i in unscored[:5]]
        if self.config.data.on_bad_row == "fail":
            raise DataError(f"{why[0]} (data.on_bad_row is 'fail')")
        bad_rows.extend(int(unscored.size), why)
        return scored

    def _group_index(self, group_by: str | None) -> int | None:
        """The position of feature `group_by` among the batches' sparse features."""
        if group_by is None:
            return None
        if not isinstance(group_by, str):
            raise ConfigError(f"the group feature (data.eval_group_by, --group-by) is a sparse feature's name, got "
                              f"{group_by!r}")
        try:
            check_group_feature(self.config.features, group_by, "the group feature (data.eval_group_by, --group-by)")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return [f.name for f in self.extractor.sparse].index(group_by)


def _row_ids(batch: SparseBatch, feature: int) -> tuple[np.ndarray, np.ndarray]:
    """The id of sparse feature `feature` in each row of `batch` (a feature of one id a
    row), and whether the row has one (not a missing value)."""
    b = batch.batch_size
    offsets = batch.offsets[feature * b:(feature + 1) * b + 1]
    present = np.diff(offsets) > 0
    ids = np.zeros(b, dtype=np.int64)
    ids[present] = batch.values[offsets[:-1][present]]
    return ids, present
