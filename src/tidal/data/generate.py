"""`tidal gen-data`: Criteo-like files with a planted logistic ground truth.

Each of the 26 categorical columns draws Zipf-distributed ids (written as 8 hex digits,
as in Criteo); each id has a fixed effect drawn from N(0, sparse_scale^2), so most of
the signal rides on ids that are individually rare. The 13 integer columns are
log-normal counts (about 10% missing) with fixed weights on log1p(count). The label is
Bernoulli(sigmoid(bias + sum of effects)). Because the true probability of every row is
known, so is the best AUC any model can reach on the data: `ceiling_auc`, written to
``truth.json`` beside the files.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import signal
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from tidal.config import is_finite_number, is_whole_number
from tidal.data.criteo import CRITEO_DENSE, CRITEO_SPARSE
from tidal.errors import ConfigError, DataError
from tidal.mixing import mix64_array
from tidal.processes import interrupting_signals, process_running

__all__ = ["AFTER_THE_FILES_WERE_IN_PLACE", "GeneratedData", "auc", "check_arguments", "generate"]

_CHUNK_ROWS = 100_000
_VOCABULARY, _ZIPF_A = 1_000_000, 1.2  # the defaults of `generate` and `check_arguments`
_PARTIAL = ".partial"  # the suffix of a file being written (after a leading '.': hidden)
# a file being written, .NAME.PID-TOKEN.partial: NAME once whole, PID the writing process's (none: an earlier version's)
_TEMPORARY = re.compile(r"\.(?P<name>part-[0-9]{5}\.[^.]+|truth\.json)(?:\.(?P<pid>[0-9]+)-[0-9a-f]+)?\.partial")
# what a KeyboardInterrupt says when Ctrl-C or SIGTERM came as the files were put in place: it took effect once they were
AFTER_THE_FILES_WERE_IN_PLACE = "after the new files were in place"


@dataclass(frozen=True, kw_only=True)
class GeneratedData:
    """What `generate` wrote."""

    paths: list[str]
    rows: int
    positive_rate: float
    ceiling_auc: float | None  # AUC of the true probabilities: no model can do better; None with one class only
    replaced: list[str] = field(default_factory=list)  # earlier files in the folder it replaced (not in truth.json)


def generate(out_dir: str | Path, *, rows: int, files: int = 1, file_format: Literal["tsv", "parquet"] = "tsv",
             seed: int = 0, split: int = 0, vocabulary: int = _VOCABULARY, zipf_a: float = _ZIPF_A,
             sparse_scale: float = 0.6, bias: float = -1.2) -> GeneratedData:
    """Write `rows` rows over `files` files into `out_dir`, plus ``truth.json``.

    `seed` fixes the planted truth (every id's effect, the dense weights); `split`
    draws different rows from that same truth: train on split 0, evaluate on split 1.
    Every file is written under a temporary name of its own (.NAME.PID-TOKEN.partial:
    the process id and a random token, so runs into one folder at once do not touch
    each other's) and renamed into place once all are complete, truth.json last; files
    an earlier run wrote to `out_dir` (part-NNNNN.*, truth.json) are replaced then
    (`replaced` names them). A run that fails or is interrupted while it writes removes
    its temporary files and leaves `out_dir` as it was: a folder the run made is removed,
    with the parent folders it made (a run that fails as it renames leaves no truth.json); the temporary files of a run killed outright are removed by
    the next run, once the process that wrote them is no longer running;
    Ctrl-C (or SIGTERM, where it raises KeyboardInterrupt: `tidal.processes.sigterm_interrupts`)
    as the files are renamed takes effect once they all are (the KeyboardInterrupt then
    says `AFTER_THE_FILES_WERE_IN_PLACE`).
    """
    check_arguments(rows=rows, files=files, file_format=file_format, vocabulary=vocabulary, zipf_a=zipf_a, seed=seed,
                    split=split)
    for arg, value in {"sparse_scale": sparse_scale, "bias": bias}.items():
        if not is_finite_number(value):
            raise ConfigError(f"gen-data: {arg} must be a finite number, got {value!r}")
    if not isinstance(out_dir, (str, os.PathLike)):
        raise ConfigError(f"gen-data: out_dir must be a folder's path (a str or a Path), got {type(out_dir).__name__}")
    created = _missing_folders(Path(out_dir))
    out = _folder(out_dir)
    _remove_leftovers(out)
    run = f"{os.getpid()}-{secrets.token_hex(4)}"  # in this run's temporary names: its own
    temporary: list[Path] = []
    try:
        data = _write_files(out, temporary, run, rows=rows, files=files, file_format=file_format, seed=seed,
                            split=split, vocabulary=vocabulary, zipf_a=zipf_a, sparse_scale=sparse_scale, bias=bias)
        with _interrupts_deferred():  # the earlier files go and the new ones come at once
            return replace(data, replaced=_put_in_place(out, temporary))
    except BaseException:
        _remove(temporary)
        for folder in created:  # the folders this run made, left empty: absent, as they were
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    finally:
        _remove(temporary)  # none, once all were renamed


def _missing_folders(out: Path) -> list[Path]:
    """`out` and those of its parents that do not exist yet, deepest first."""
    missing = []
    for folder in (out, *out.parents):
        if folder.exists():
            break
        missing.append(folder)
    return missing


def _remove(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _remove_leftovers(out: Path) -> None:
    """Remove the temporary files in `out` of runs killed outright: those whose process
    is no longer running (or that name none), not those of a run still writing."""
    for path in out.glob(f".*{_PARTIAL}"):
        match = _TEMPORARY.fullmatch(path.name)
        if match and not (match["pid"] and process_running(int(match["pid"]))):
            path.unlink(missing_ok=True)


def _temporary(final: Path, run: str) -> Path:
    """The name `final` is written under by the run `run` (PID-TOKEN)."""
    return final.with_name(f".{final.name}.{run}{_PARTIAL}")


def _final(temporary: Path) -> Path:
    """The name a temporary file (.NAME.PID-TOKEN.partial) is renamed to once it is whole."""
    return temporary.with_name(temporary.name.removeprefix(".").rsplit(".", 2)[0])


def _write_files(out: Path, temporary: list[Path], run: str, *, rows: int, files: int, file_format: str, seed: int,
                 split: int, vocabulary: int, zipf_a: float, sparse_scale: float, bias: float) -> GeneratedData:
    """Write the files and truth.json under the temporary names of the run `run`
    (PID-TOKEN), each added to `temporary` before it is begun; what they hold."""
    dense_weights = np.random.default_rng(seed).normal(0.0, 0.15, len(CRITEO_DENSE))
    rng = np.random.default_rng([seed, split])
    paths, probabilities, labels = [], [], []
    for f in range(files):
        path = out / f"part-{f:05d}.{file_format}"
        temporary.append(_temporary(path, run))
        share = rows // files + (f < rows % files)
        p, y = _write_file(temporary[-1], share, file_format, rng, seed, vocabulary, zipf_a, sparse_scale, bias,
                           dense_weights)
        paths.append(str(path))
        probabilities.append(p)
        labels.append(y)
    p, y = np.concatenate(probabilities), np.concatenate(labels)
    ceiling = auc(y, p) if 0 < y.sum() < len(y) else None
    data = GeneratedData(paths=paths, rows=rows, positive_rate=float(y.mean()), ceiling_auc=ceiling)
    temporary.append(_temporary(out / "truth.json", run))
    truth = {k: v for k, v in asdict(data).items() if k != "replaced"}  # the files by name: truth.json's folder's
    temporary[-1].write_text(json.dumps({**truth, "paths": [Path(p).name for p in paths]}, indent=1))
    return data


def _put_in_place(out: Path, temporary: list[Path]) -> list[str]:
    """Rename each temporary file over its name, truth.json last, the earlier run's
    truth.json removed first and its other files last (so a failure part way leaves
    no truth.json to say the data set is whole); the earlier files' names, sorted. Runs
    into one folder put their files in place one at a time (a lock on the folder), so
    the folder ends holding one run's files, not a mix."""
    folder = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        earlier = [*out.glob("truth.json"), *out.glob("part-[0-9][0-9][0-9][0-9][0-9].tsv"),
                   *out.glob("part-[0-9][0-9][0-9][0-9][0-9].parquet")]
        (out / "truth.json").unlink(missing_ok=True)
        final = [_final(path) for path in temporary]
        for path, name in zip(temporary[:-1], final[:-1]):
            os.replace(path, name)
        for path in set(earlier) - set(final):
            path.unlink(missing_ok=True)
        os.replace(temporary[-1], final[-1])  # truth.json
    finally:
        os.close(folder)  # and with it the lock
    return sorted(path.name for path in earlier)


@contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """A block Ctrl-C or SIGTERM does not cut short (where either raises KeyboardInterrupt):
    it takes effect at the block's end. Unlike `tidal.processes.deferring_interrupts`, a
    second one waits too: the renames take milliseconds, and one cut short leaves two
    data sets mixed. (Python delivers signals to the main thread only, so elsewhere
    there is nothing to defer.)"""
    signals = interrupting_signals()
    if threading.current_thread() is not threading.main_thread() or not signals:
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.signal(sig, lambda number, frame: caught.append(number)) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:  # not when the block failed: its error says more
        raise KeyboardInterrupt(AFTER_THE_FILES_WERE_IN_PLACE)


def _folder(out_dir: str | Path) -> Path:
    """The folder `out_dir`, created if need be; a `ConfigError` if it cannot be."""
    if str(out_dir) == "":
        raise ConfigError("gen-data: --out is empty; expected a folder to write the data to "
                          "(--out . for the current folder)")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"gen-data: --out {out} is a file; expected a folder to write the data to")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"gen-data: --out {out}: cannot create the folder ({exc.strerror or exc}); "
                          f"expected a folder that can be created and written to") from None
    return out


def check_arguments(*, rows: int, files: int = 1, file_format: str = "tsv", vocabulary: int = _VOCABULARY,
                    zipf_a: float = _ZIPF_A, seed: int = 0, split: int = 0, names: Mapping[str, str] | None = None,
                    ) -> None:
    """A `ConfigError` naming the first of `generate`'s arguments it cannot write data
    with. `names` says how the message calls an argument (`tidal gen-data`: by its flag,
    {"rows": "--rows"}); by default, by its name."""
    name = {a: a for a in ("rows", "files", "file_format", "vocabulary", "zipf_a", "seed", "split")} | dict(names or {})
    for arg, value in {"rows": rows, "files": files, "vocabulary": vocabulary, "seed": seed, "split": split}.items():
        if not is_whole_number(value):
            raise ConfigError(f"gen-data: {name[arg]} must be an integer, got {value!r}")
    if not is_finite_number(zipf_a):
        raise ConfigError(f"gen-data: {name['zipf_a']} must be a finite number > 1, got {zipf_a!r}")
    problems = [
        (0 <= seed < 2**32, f"{name['seed']} must be between 0 and 2**32 - 1, got {seed}"),
        (0 <= split < 2**32, f"{name['split']} must be between 0 and 2**32 - 1, got {split}"),
        (rows >= 1, f"{name['rows']} must be >= 1, got {rows}"),
        (1 <= files <= rows, f"{name['files']} must be between 1 and {name['rows']} ({rows}), got {files}"),
        (file_format in ("tsv", "parquet"), f"{name['file_format']} must be 'tsv' or 'parquet', got {file_format!r}"),
        (1 <= vocabulary < 2**63, f"{name['vocabulary']} must be from 1 to 2**63 - 1, got {vocabulary}"),
        (zipf_a > 1.0, f"{name['zipf_a']} must be > 1, got {zipf_a}"),
    ]
    for ok, message in problems:
        if not ok:
            raise ConfigError(f"gen-data: {message}")


def _write_file(path: Path, rows: int, file_format: str, rng: np.random.Generator, seed: int, vocabulary: int,
                zipf_a: float, sparse_scale: float, bias: float, dense_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Write one file chunk by chunk; the true probabilities and labels of its rows."""
    probabilities, labels, writer = [], [], None
    try:
        for start in range(0, rows, _CHUNK_ROWS):
            n = min(_CHUNK_ROWS, rows - start)
            table, p, y = _chunk(n, rng, seed, vocabulary, zipf_a, sparse_scale, bias, dense_weights)
            if file_format == "parquet":
                writer = writer or pq.ParquetWriter(path, table.schema)
                writer.write_table(table)
            else:
                with open(path, "ab" if start else "wb") as sink:
                    pacsv.write_csv(table, sink, pacsv.WriteOptions(include_header=False, delimiter="\t",
                                                                    quoting_style="none"))
            probabilities.append(p)
            labels.append(y)
    finally:  # also on a failure: the file is then removed
        if writer is not None:
            writer.close()
    return np.concatenate(probabilities), np.concatenate(labels)


def _chunk(n: int, rng: np.random.Generator, seed: int, vocabulary: int, zipf_a: float, sparse_scale: float,
           bias: float, dense_weights: np.ndarray) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    logit = np.full(n, bias)
    columns: dict[str, pa.Array] = {}
    for j, name in enumerate(CRITEO_DENSE):
        counts = np.floor(rng.lognormal(1.0, 1.2, n)).astype(np.int64)
        missing = rng.random(n) < 0.1
        logit += np.where(missing, 0.0, dense_weights[j] * np.log1p(counts))
        columns[name] = pa.array(counts, mask=missing).cast(pa.string())
    for c, name in enumerate(CRITEO_SPARSE):
        ranks = (rng.zipf(zipf_a, n) - 1) % vocabulary
        ids = _mixed(ranks, seed * 1000 + c) & 0xFFFFFFFF  # the 32 bits written as 8 hex digits
        logit += sparse_scale * _standard_normal(_mixed(ids, seed * 1000 + c + 500))
        columns[name] = _hex8(ids)
    p = 1.0 / (1.0 + np.exp(-logit))
    y = (rng.random(n) < p).astype(np.int64)
    table = pa.table({"label": pa.array(y).cast(pa.string()), **columns})
    return table, p, y


_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def _hex8(ids: np.ndarray) -> pa.Array:
    """The low 32 bits of every id as 8 lowercase hex digits (Criteo's spelling)."""
    shifts = np.arange(28, -4, -4, dtype=np.uint64)
    digits = _HEX[(ids.view(np.uint64)[:, None] >> shifts) & np.uint64(15)]  # [n, 8] ASCII
    return pa.array(np.ascontiguousarray(digits).view("S8").ravel()).cast(pa.string())


def _mixed(values: np.ndarray, salt: int) -> np.ndarray:
    """A fixed pseudo-random int64 for each value (splitmix64 of value + salt)."""
    return mix64_array(values.astype(np.int64) + salt * 0x9E3779B9)


def _standard_normal(bits: np.ndarray) -> np.ndarray:
    """A fixed N(0, 1) value for each 64-bit pattern (Box-Muller on its two halves)."""
    u = bits.view(np.uint64)
    u1 = ((u >> np.uint64(40)).astype(np.float64) + 1.0) / 2.0**24
    u2 = ((u >> np.uint64(8)) & np.uint64(0xFFFFFF)).astype(np.float64) / 2.0**24
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact ROC AUC with ties counted half (the Mann-Whitney statistic), vectorized;
    one label per score, a nonzero label counting as a positive."""
    labels, scores = np.asarray(labels), np.asarray(scores)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise DataError(f"AUC needs one label per score, in two flat arrays; got labels of shape {labels.shape} and "
                        f"scores of shape {scores.shape}")
    unknown = int(np.isnan(scores).sum())
    if unknown:
        raise DataError(f"AUC needs numeric scores, got {unknown} NaN of {len(scores)}; the model's outputs are not "
                        f"numbers (did training diverge? try a lower learning rate)")
    labels = labels.astype(bool)
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        raise DataError(f"AUC needs both classes, got {positives} positives and {negatives} negatives; "
                        f"evaluate on more rows")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = np.asarray(scores)[order]
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], len(sorted_scores)]
    ranks = np.empty(len(sorted_scores))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)  # average rank of each tie group
    return float((ranks[labels].sum() - positives * (positives + 1) / 2.0) / (positives * negatives))
