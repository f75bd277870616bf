"""Streaming readers of Criteo-style TSV, CSV and Parquet files (pyarrow).

Files are read in record batches, one file after the other, so no file has to fit in
memory. Every column comes out as a string column (Parquet columns are cast), and
checked columns are checked row by row without Python loops: a row with the wrong
number of columns, an unparsable number or a label that is not 0 or 1 is a bad row. Bad rows are counted and
described (file, line, reason) in a `BadRows` report and skipped, or, with
``on_bad_row="fail"``, stop the run with a `DataError` naming the first one.
"""

from __future__ import annotations

import bisect
import glob
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from tidal.data.criteo import CRITEO_COLUMNS, CRITEO_DENSE
from tidal.errors import DataError

__all__ = ["BadRows", "CRITEO_CHECKS", "expand_paths", "read_batches"]

_PATTERNS = {  # what a checked column must hold; "label" may not be empty, the others may
    "integer": r"^-?[0-9]{1,18}$",  # up to 18 digits: always inside int64
    "number": r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$",
    "label": r"^[01]$",
}
_EXPECTED = {"integer": "an integer (up to 18 digits) or nothing",
             "number": "a number within float32's range (|x| < 3.4e38) or nothing", "label": "0 or 1"}
_FLOAT32_MAX = float(np.finfo(np.float32).max)
CRITEO_CHECKS: dict[str, str] = {"label": "label", **{c: "integer" for c in CRITEO_DENSE}}
_MAX_EXAMPLES = 20


@dataclass
class BadRows:
    """How many rows were bad and why, with the first few as examples."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, path: str, line: int | None, reason: str) -> None:
        self.count += 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(f"{path}:{line if line is not None else '?'}: {reason}")

    def extend(self, count: int, examples: list[str]) -> None:
        """Count `count` more bad rows, described (the first of them) by `examples`."""
        self.count += count
        self.examples += examples[: max(0, _MAX_EXAMPLES - len(self.examples))]

    def summary(self) -> str:
        if not self.count:
            return "no bad rows"
        shown = "\n  ".join(self.examples)
        more = f"\n  ... and {self.count - len(self.examples)} more" if self.count > len(self.examples) else ""
        return f"{self.count} bad rows skipped:\n  {shown}{more}"


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """A file, a glob, or a list of them, as a sorted list of existing files."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    found: list[str] = []
    for item in items:
        matches = sorted(glob.glob(str(item))) if glob.has_magic(str(item)) else [str(item)]
        if not matches or not all(Path(m).is_file() for m in matches):
            raise DataError(f"no data file at {item!s}: expected a file, a glob matching files, or a list of them")
        found += matches
    return found


def read_batches(paths: str | os.PathLike | Sequence[str | os.PathLike], *,
                 columns: Sequence[str] = CRITEO_COLUMNS, checks: Mapping[str, str] | None = None,
                 file_format: Literal["tsv", "csv", "parquet"] | None = None, batch_rows: int = 65536,
                 on_bad_row: Literal["skip", "fail"] = "skip", bad_rows: BadRows | None = None,
                 ) -> Iterator[pa.RecordBatch]:
    """Record batches of string columns from every file, bad rows removed.

    TSV files have no header and the columns of `columns` (Criteo's layout by default);
    CSV files have a header line; Parquet files must hold every column of `columns`.
    The format follows the file suffix unless `file_format` says otherwise. Batches
    hold exactly `batch_rows` rows, the last one fewer. Empty
    fields are kept as empty strings (missing values). `checks` maps columns to what
    they must hold: "integer" or "number" (or nothing), or "label" (0 or 1); by default,
    Criteo's label and counts among `columns`.
    """
    if on_bad_row not in ("skip", "fail"):
        raise DataError(f"on_bad_row must be 'skip' or 'fail', got {on_bad_row!r}")
    if checks is None:
        checks = {c: k for c, k in CRITEO_CHECKS.items() if c in columns}
    unknown = {c: k for c, k in checks.items() if k not in _PATTERNS or c not in columns}
    if unknown:
        raise DataError(f"checks must name read columns and one of {sorted(_PATTERNS)}, got {unknown}")
    report = bad_rows if bad_rows is not None else BadRows()
    yield from _exactly(_checked(expand_paths(paths), columns, checks, file_format, batch_rows, report, on_bad_row),
                        batch_rows)


def _checked(paths: list[str], columns: Sequence[str], checks: Mapping[str, str], file_format: str | None,
             batch_rows: int, report: BadRows, on_bad_row: str) -> Iterator[pa.RecordBatch]:
    for path in paths:
        kind = file_format or _format_of(path)
        batches = _parquet(path, columns, batch_rows) if kind == "parquet" else _text(path, kind, columns, batch_rows)
        for batch, lines, wrong_width in batches:
            yield _valid_rows(batch, path, lines, checks, report, on_bad_row, wrong_width)


def _exactly(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """The same rows in batches of exactly `rows` (the last may be shorter), across files."""
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        pending.append(batch)
        count += batch.num_rows
        while count >= rows:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, rows).combine_chunks().to_batches()[0]
            rest = table.slice(rows)
            pending, count = rest.to_batches(), rest.num_rows
    if count:
        yield pa.Table.from_batches(pending).combine_chunks().to_batches()[0]


def _format_of(path: str) -> str:
    suffix = Path(path).suffix.lower()
    formats = {".tsv": "tsv", ".txt": "tsv", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
    if suffix not in formats:
        raise DataError(f"{path}: cannot tell the format from the suffix {suffix!r}; "
                        f"use .tsv, .csv or .parquet, or pass file_format")
    return formats[suffix]


@dataclass(frozen=True)
class _Lines:
    """Where the rows of a batch came from: row r is the r-th line from `first` that is
    not in `skipped` (lines at or after `first` that the parser dropped, ascending)."""

    first: int
    skipped: tuple[int, ...] = ()

    def of(self, row: int) -> int:
        line = self.first + row
        for dropped in self.skipped:
            line += dropped <= line
        return line


def _text(path: str, kind: str, columns: Sequence[str],
          batch_rows: int) -> Iterator[tuple[pa.RecordBatch, _Lines, list[tuple[int, str]]]]:
    """(batch, where its rows came from, (line, reason) of the rows of the wrong width
    dropped up to its last line) from a TSV or CSV file; those after its last row come
    with an empty batch."""
    skipped: list[int] = []
    wrong_width: list[tuple[int, str]] = []  # not yet handed on with a batch

    def handle(row: pacsv.InvalidRow) -> str:
        wrong_width.append((row.number, f"expected {row.expected_columns} columns, found {row.actual_columns}"))
        skipped.append(row.number)
        return "skip"

    try:
        reader = _open_text(path, kind, columns, batch_rows, handle)
        next_line = 2 if kind == "csv" else 1  # a CSV file starts with its header
        for batch in reader:
            del skipped[: bisect.bisect_left(skipped, next_line)]  # lines of earlier batches
            lines = _Lines(next_line, tuple(skipped))
            next_line = lines.of(batch.num_rows - 1) + 1 if batch.num_rows else next_line
            yield batch, lines, _take_before(wrong_width, next_line)
    except (pa.ArrowInvalid, pa.ArrowKeyError) as exc:
        raise DataError(f"{path}: cannot read it as {kind.upper()} ({exc})") from None
    if wrong_width:
        empty = pa.RecordBatch.from_pydict({c: pa.array([], pa.string()) for c in columns})
        yield empty, _Lines(next_line), sorted(wrong_width)


def _take_before(found: list[tuple[int, str]], line: int) -> list[tuple[int, str]]:
    """Remove and return the entries of `found` before `line`, in line order."""
    taken = sorted(f for f in found if f[0] < line)
    found[:] = [f for f in found if f[0] >= line]
    return taken


def _open_text(path: str, kind: str, columns: Sequence[str], batch_rows: int,
               handler: Callable[[pacsv.InvalidRow], str]) -> pacsv.CSVStreamingReader:
    header = kind == "csv"
    return pacsv.open_csv(
        path,
        read_options=pacsv.ReadOptions(column_names=None if header else list(columns), use_threads=False,
                                       block_size=max(1 << 16, batch_rows * 300)),  # Criteo rows: ~300 bytes
        parse_options=pacsv.ParseOptions(delimiter="\t" if kind == "tsv" else ",", invalid_row_handler=handler,
                                         quote_char=False if kind == "tsv" else '"',  # TSV has no quoting
                                         ignore_empty_lines=False),  # a blank line is a bad row, and counts
        convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in columns},
                                             include_columns=list(columns), strings_can_be_null=False),
    )


def _parquet(path: str, columns: Sequence[str],
             batch_rows: int) -> Iterator[tuple[pa.RecordBatch, _Lines, list[tuple[int, str]]]]:
    try:
        source = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    missing = [c for c in columns if c not in source.schema_arrow.names]
    if missing:
        raise DataError(f"{path}: Parquet file lacks columns {missing}; it has {source.schema_arrow.names}")
    row = 1
    for batch in source.iter_batches(batch_size=batch_rows, columns=list(columns)):
        strings = [pc.fill_null(pc.cast(batch.column(c), pa.string()), "") for c in columns]
        yield pa.RecordBatch.from_arrays(strings, names=list(columns)), _Lines(row), []
        row += batch.num_rows


def _valid_rows(batch: pa.RecordBatch, path: str, lines: _Lines, checks: Mapping[str, str], report: BadRows,
                on_bad_row: str, wrong_width: list[tuple[int, str]]) -> pa.RecordBatch:
    """`batch` without the rows whose checked fields do not hold what they must. Those
    and the rows of the `wrong_width` dropped among them are reported in line order, or,
    in fail mode, the first of them stops the run."""
    bad: dict[int, str] = {}  # row -> why (its first bad column)
    for name, kind in checks.items():
        column = batch.column(name)
        for row in np.flatnonzero(~_fine(column, kind).to_numpy(zero_copy_only=False)):
            bad.setdefault(int(row), f"column {name!r}: expected {_EXPECTED[kind]}, got {column[row].as_py()!r}")
    found = sorted([(lines.of(row), why) for row, why in bad.items()] + wrong_width)
    if found and on_bad_row == "fail":
        line, reason = found[0]
        raise DataError(f"{path}:{line}: {reason} (on_bad_row is 'fail')")
    for line, reason in found:
        report.add(path, line, reason)
    if not bad:
        return batch
    good = np.ones(batch.num_rows, dtype=bool)
    good[list(bad)] = False
    return batch.filter(pa.array(good))


def _fine(column: pa.Array, kind: str) -> pa.Array:
    """Which fields of `column` hold what `kind` asks for."""
    fine = pc.match_substring_regex(column, _PATTERNS[kind])
    if kind == "number":  # written as a number, yet 1e999 reads as infinity and 1e39 overflows float32
        values = pc.cast(pc.if_else(fine, column, "0"), pa.float64())
        fine = pc.and_(fine, pc.less_equal(pc.abs(values), _FLOAT32_MAX))
    if kind != "label":
        fine = pc.or_(fine, pc.equal(pc.utf8_length(column), 0))
    return fine
