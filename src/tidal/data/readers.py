"""Streaming readers of Criteo-style TSV, CSV and Parquet files (pyarrow).

Files are read in record batches, one file after the other, so no file has to fit in
memory. Every column comes out as a string column (Parquet columns are cast), and
checked columns are checked row by row without Python loops: a row with the wrong
number of columns, an empty line, a field that is not UTF-8 text, an unparsable number
or a label that is not 0 or 1 is a bad row. Bad rows are counted and described (file,
line, reason) in a `BadRows` report and skipped, or, with ``on_bad_row="fail"``, stop
the run with a `DataError` naming the first one.
"""

from __future__ import annotations

import bisect
import functools
import glob
import os
import re
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from tidal.config import is_whole_number
from tidal.data.criteo import CRITEO_COLUMNS, CRITEO_DENSE
from tidal.errors import DataError

__all__ = ["BadRows", "CRITEO_CHECKS", "expand_paths", "format_of", "read_batches"]

_PATTERNS = {  # what a checked column must hold; "label" may not be empty, the others may
    "integer": r"^-?[0-9]{1,18}$",  # up to 18 digits: always inside int64
    "number": r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$",
    "label": r"^[01]$",
}
_EXPECTED = {"integer": "an integer (up to 18 digits) or nothing",
             "number": "a number within float32's range (|x| < 3.4e38) or nothing", "label": "0 or 1"}
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_TO_STRING = pc.CastOptions(pa.string(), allow_invalid_utf8=True)  # binary fields are checked row by row
CRITEO_CHECKS: dict[str, str] = {"label": "label", **{c: "integer" for c in CRITEO_DENSE}}
_MAX_EXAMPLES = 20
_FORMATS = ("tsv", "csv", "parquet")
_WIDTH_ERROR = re.compile(r"Row #(\d+): Expected (\d+) columns, got (\d+)")  # pyarrow's, when its handler fails
_ASCII = bytes(range(128)) + b"?" * 128  # a translation: bytes from 0x80 on to '?'


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
    The format follows the file suffix unless `file_format` says otherwise; a name
    ending in .gz (d.tsv.gz) is read gunzipped, and an empty file has no rows. Batches
    hold exactly `batch_rows` rows, the last one fewer. Empty
    fields are kept as empty strings (missing values). `checks` maps columns to what
    they must hold: "integer" or "number" (or nothing), or "label" (0 or 1); by default,
    Criteo's label and counts among `columns`.
    """
    columns = _check_options(columns, file_format, batch_rows, on_bad_row)
    if checks is None:
        checks = {c: k for c, k in CRITEO_CHECKS.items() if c in columns}
    unknown = {c: k for c, k in checks.items() if k not in _PATTERNS or c not in columns}
    if unknown:
        raise DataError(f"checks must name read columns and one of {sorted(_PATTERNS)}, got {unknown}")
    report = bad_rows if bad_rows is not None else BadRows()
    yield from _exactly(_checked(expand_paths(paths), columns, checks, file_format, batch_rows, report, on_bad_row),
                        batch_rows)


def _check_options(columns: Sequence[str], file_format: str | None, batch_rows: int, on_bad_row: str) -> list[str]:
    """`columns` as a list, once the options are ones `read_batches` reads as documented."""
    if on_bad_row not in ("skip", "fail"):
        raise DataError(f"on_bad_row must be 'skip' or 'fail', got {on_bad_row!r}")
    if file_format is not None and file_format not in _FORMATS:
        raise DataError(f"file_format must be one of {list(_FORMATS)} (lowercase), or None to follow each file's "
                        f"suffix; got {file_format!r}")
    if not is_whole_number(batch_rows) or batch_rows < 1:
        raise DataError(f"batch_rows must be an integer >= 1, got {batch_rows!r}")
    if isinstance(columns, (str, bytes)) or not isinstance(columns, Iterable):
        raise DataError(f"columns must be a list of column names, got {columns!r}; write [{columns!r}] for one column")
    names = list(columns)
    if not names or not all(isinstance(c, str) for c in names):
        raise DataError(f"columns must be a non-empty list of names (strings), got {names!r}")
    twice = sorted({c for c in names if names.count(c) > 1})
    if twice:
        raise DataError(f"columns must name each column once, got {twice} more than once in {names}")
    return names


def _checked(paths: list[str], columns: Sequence[str], checks: Mapping[str, str], file_format: str | None,
             batch_rows: int, report: BadRows, on_bad_row: str) -> Iterator[pa.RecordBatch]:
    for path in paths:
        kind = file_format or format_of(path)
        try:
            if os.path.getsize(path) == 0:  # no rows, like a CSV file of just a header
                continue
            batches = _parquet(path, columns, batch_rows) if kind == "parquet" else _text(path, kind, columns, batch_rows)
            for batch, lines, dropped in batches:
                yield _valid_rows(batch, path, lines, checks, report, on_bad_row, dropped)
        except OSError as exc:  # gone or unreadable since the run started
            raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from None


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


def format_of(path: str) -> str:
    """tsv, csv or parquet, from the file name (d.tsv.gz is tsv)."""
    name = Path(path).name.lower()
    suffix = Path(name.removesuffix(".gz")).suffix  # pyarrow gunzips d.tsv.gz itself
    formats = {".tsv": "tsv", ".txt": "tsv", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
    if suffix not in formats or (name.endswith(".gz") and formats[suffix] == "parquet"):
        raise DataError(f"{path}: cannot tell the format from the suffix {Path(path).suffix.lower()!r}; "
                        f"use .tsv, .csv or .parquet (.tsv.gz or .csv.gz if gzip-compressed), or pass file_format")
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
    """(batch, where its rows came from, (line, reason) of the rows dropped up to its
    last line: of the wrong width or not UTF-8 text) from a TSV or CSV file; those
    after its last row come with an empty batch. pyarrow fails on a line of the wrong
    width that is not UTF-8 text (it cannot hand it to the bad-row handler): such a file
    is read again through `_Mended`, its rows handed on already passed over (the parser
    numbers rows, not physical lines, so the file is parsed again from its start)."""
    _check_not_gzip(path)
    if kind == "csv":
        _check_header(path, columns)
    skipped: list[int] = []
    dropped: list[tuple[int, str]] = []  # not yet handed on with a batch
    mended: set[int] = set()  # lines `_Mended` mended

    def handle(row: pacsv.InvalidRow) -> str:
        why = f"expected {row.expected_columns} columns, found {row.actual_columns}"
        if row.number >= resume:  # else reported before the file was read again
            dropped.append((row.number, why + (", in a line that is not UTF-8 text" if row.number in mended else "")))
        skipped.append(row.number)
        return "skip"

    setattr(handle, _QUIET, True)
    _quiet_undecodable_rows()

    block_bytes = max(1 << 16, batch_rows * 300)  # Criteo rows: ~300 bytes
    first_line = next_line = resume = 2 if kind == "csv" else 1  # a CSV file starts with its header
    source: str | _Mended = path
    while True:
        try:
            for batch in _open_text(source, kind, columns, block_bytes, handle):
                del skipped[: bisect.bisect_left(skipped, next_line)]  # lines of earlier batches
                lines = _Lines(next_line, tuple(skipped))
                next_line = lines.of(batch.num_rows - 1) + 1 if batch.num_rows else next_line
                batch, lines = _from_line(batch, lines, resume)
                batch, lines = _without_non_utf8(batch, lines, columns, dropped)
                yield batch, lines, _take_before(dropped, next_line)
            break
        except (pa.ArrowInvalid, pa.ArrowKeyError, OSError) as exc:  # OSError: a broken .gz file
            if isinstance(source, _Mended) or not _WIDTH_ERROR.search(str(exc)):
                raise _read_error(path, kind, exc, block_bytes, next_line) from None
            del skipped[:], dropped[:]  # all from `next_line` on: read again
            source, resume, next_line = _Mended(path, kind, columns, mended), next_line, first_line
    if dropped:
        empty = pa.RecordBatch.from_pydict({c: pa.array([], pa.string()) for c in columns})
        yield empty, _Lines(next_line), sorted(dropped)


_QUIET = "_tidal_bad_row_handler"  # marks the handlers whose undecodable rows pyarrow may not report
_quiet_lock = threading.Lock()
_quiet_installed = False


def _quiet_undecodable_rows() -> None:
    """Have Python drop pyarrow's report (through sys.unraisablehook) that it could not
    hand one of our bad-row handlers a line that is not UTF-8 text: the read error that
    follows is handled, and the line counted. Installed once, in front of whatever hook
    is there; every other report passes through."""
    global _quiet_installed
    with _quiet_lock:
        if _quiet_installed:
            return
        previous = sys.unraisablehook

        def hook(unraisable: Any) -> None:
            ours = getattr(unraisable.object, _QUIET, False) and issubclass(unraisable.exc_type, UnicodeDecodeError)
            if not ours:
                previous(unraisable)

        sys.unraisablehook = hook
        _quiet_installed = True


def _from_line(batch: pa.RecordBatch, lines: _Lines, first: int) -> tuple[pa.RecordBatch, _Lines]:
    """`batch` without its rows on lines before `first`, and where the rest came from."""
    if not batch.num_rows or lines.of(0) >= first:
        return batch, lines
    before = bisect.bisect_left([lines.of(r) for r in range(batch.num_rows)], first)
    return batch.slice(before), _Lines(lines.of(before) if before < batch.num_rows else first, lines.skipped)


class _Mended:
    """The TSV or CSV file `path` as a stream for pyarrow, in which each line that is
    not UTF-8 text and of the wrong width has '?' for its bytes from 0x80 on (its fields
    stay as many), so that pyarrow can hand it to the bad-row handler. Their numbers go
    to `mended`. Slower than pyarrow reading the file itself (each line is looked at in
    Python)."""

    closed = False

    def __init__(self, path: str, kind: str, columns: Sequence[str], mended: set[int]) -> None:
        self.kind, self.columns, self.mended = kind, columns, mended
        self._stream = pa.input_stream(path)  # gunzips d.tsv.gz as pyarrow's reader does
        self._line, self._rest = 1, b""  # the number of the line `_rest` begins, and that line so far
        self._header = b""  # a CSV file's first line
        self._ready, self._ended = b"", False

    def read(self, size: int = -1) -> bytes:
        while not self._ready and not self._ended:
            self._ready = self._next_lines(max(size, 1 << 16))
        size = size if size >= 0 else len(self._ready)
        taken, self._ready = self._ready[:size], self._ready[size:]
        return taken

    def close(self) -> None:
        self._stream.close()
        self.closed = True

    def _next_lines(self, size: int) -> bytes:
        data = self._stream.read(size)
        *lines, self._rest = (self._rest + data).split(b"\n")
        if not data:  # the end: the last line may lack its newline
            self._ended = True
            lines, self._rest = [self._rest] if self._rest else [], b""
        first = self._line
        self._line += len(lines)
        if self.kind == "csv" and first == 1 and lines:
            self._header = lines[0]
        odd = {n: line.translate(_ASCII) for n, line in enumerate(lines, first)
               if not (n == 1 and self.kind == "csv") and not line.isascii() and not _is_utf8(line)}
        wrong = _of_wrong_width(list(odd.values()), self._header, self.kind, self.columns)
        for n in (n for n, is_wrong in zip(odd, wrong) if is_wrong):
            lines[n - first] = odd[n]
            self.mended.add(n)
        return b"\n".join(lines) + b"\n" if lines else b""


def _of_wrong_width(lines: list[bytes], header: bytes, kind: str, columns: Sequence[str]) -> list[bool]:
    """Whether pyarrow reads each of `lines` (ASCII, below `header` for CSV) with the
    wrong number of fields."""
    if not lines:
        return []
    wrong = [False] * len(lines)
    before = 2 if kind == "csv" else 1  # the row number of lines[0]

    def handle(row: pacsv.InvalidRow) -> str:
        wrong[row.number - before] = True
        return "skip"

    data = b"\n".join([header, *lines] if kind == "csv" else lines) + b"\n"
    _open_text(pa.BufferReader(data), kind, columns, max(1 << 16, len(data)), handle).read_all()
    return wrong


def _check_not_gzip(path: str) -> None:
    """pyarrow gunzips a file only when its name ends in .gz."""
    with open(path, "rb") as file:
        if file.read(2) == b"\x1f\x8b" and not path.lower().endswith(".gz"):
            raise DataError(f"{path}: the file looks gzip-compressed (it starts with bytes 1f 8b) but its name "
                            f"does not end in .gz; name it {Path(path).name}.gz, or gunzip it")


def _check_header(path: str, columns: Sequence[str]) -> None:
    try:
        with pa.input_stream(path) as stream:  # gunzips d.csv.gz as pyarrow's reader does
            first_line = stream.read(1 << 20).split(b"\n", 1)[0] + b"\n"
        names = pacsv.read_csv(pa.BufferReader(first_line)).column_names
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError):
        return  # pyarrow's reader says what is wrong
    twice = sorted({c for c in columns if names.count(c) > 1})
    if twice:
        raise DataError(f"{path}: the CSV header names columns {twice} more than once; expected each once, got {names}")
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(f"{path}: the CSV header lacks columns {missing}; it has {names}")


def _read_error(path: str, kind: str, exc: Exception, block_bytes: int, next_line: int) -> DataError:
    message = str(exc)
    if "straddl" in message:  # "straddling object straddles two block boundaries"
        line = _first_long_line(path, block_bytes, next_line)
        where = f"{path}:{line}: the line" if line else f"{path}: a row from line {next_line} on"
        return DataError(f"{where} is longer than the parser's block ({block_bytes} bytes); shorten it, or raise "
                         f"batch_rows (the block holds 300 bytes a batch row, at least 64 KiB)")
    width = _WIDTH_ERROR.search(message)
    if width:  # our handler skips such a row unless pyarrow fails to decode it for the handler
        row, expected, found = width.groups()
        return DataError(f"{path}:{row}: expected {expected} columns, found {found}, "
                         f"in a line that is not UTF-8 text")
    return DataError(f"{path}: cannot read it as {kind.upper()} ({message})")


def _first_long_line(path: str, max_bytes: int, start: int) -> int | None:
    """The number of the first line from line `start` on that is longer than `max_bytes`."""
    line, length = 1, 0  # of the line read so far
    with pa.input_stream(path) as stream:
        while chunk := stream.read(1 << 20):
            *ended, rest = chunk.split(b"\n")
            for part in ended:
                if length + len(part) > max_bytes and line >= start:
                    return line
                line, length = line + 1, 0
            length += len(rest)
    return line if length > max_bytes and line >= start else None


def _without_non_utf8(batch: pa.RecordBatch, lines: _Lines, names: Sequence[str],
                      dropped: list[tuple[int, str]]) -> tuple[pa.RecordBatch, _Lines]:
    """`batch` without the rows whose fields in `names` are not UTF-8 text, added to
    `dropped`, and where its rows came from."""
    bad: dict[int, str] = {}  # row -> why
    for name in names:
        for row in _not_utf8(batch.column(name)):
            bad.setdefault(row, f"column {name!r}: not UTF-8 text")
    if not bad:
        return batch, lines
    dropped += [(lines.of(row), why) for row, why in bad.items()]
    keep = np.ones(batch.num_rows, dtype=bool)
    keep[list(bad)] = False
    return batch.filter(pa.array(keep)), _Lines(lines.first, tuple(sorted([*lines.skipped, *map(lines.of, bad)])))


def _not_utf8(column: pa.Array) -> list[int]:
    """The rows of a string `column` (read unchecked) that are not UTF-8 text."""
    data = column.buffers()[2]
    if data is None or data.size == 0 or np.frombuffer(data, np.uint8).max() < 0x80:
        return []  # ASCII: five times faster to see than pyarrow's own check
    try:
        column.validate(full=True)
        return []
    except pa.ArrowInvalid:
        return [row for row, raw in enumerate(column.cast(pa.binary()).to_pylist()) if not _is_utf8(raw)]


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _take_before(found: list[tuple[int, str]], line: int) -> list[tuple[int, str]]:
    """Remove and return the entries of `found` before `line`, in line order."""
    taken = sorted(f for f in found if f[0] < line)
    found[:] = [f for f in found if f[0] >= line]
    return taken


def _open_text(source: str | _Mended | pa.NativeFile, kind: str, columns: Sequence[str], block_bytes: int,
               handler: Callable[[pacsv.InvalidRow], str]) -> pacsv.CSVStreamingReader:
    header = kind == "csv"
    return pacsv.open_csv(
        source,
        read_options=pacsv.ReadOptions(column_names=None if header else list(columns), use_threads=False,
                                       block_size=block_bytes),
        parse_options=pacsv.ParseOptions(delimiter="\t" if kind == "tsv" else ",", invalid_row_handler=handler,
                                         quote_char=False if kind == "tsv" else '"',  # TSV has no quoting
                                         ignore_empty_lines=False),  # a blank line is a bad row, and counts
        convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in columns},
                                             include_columns=list(columns), strings_can_be_null=False,
                                             check_utf8=False),  # checked row by row instead
    )


def _parquet(path: str, columns: Sequence[str],
             batch_rows: int) -> Iterator[tuple[pa.RecordBatch, _Lines, list[tuple[int, str]]]]:
    source = _open_parquet(path, columns)
    binary = [c for c in columns if _is_binary(source.schema_arrow.field(c).type)]  # may hold more than UTF-8
    row = 1
    for read in source.iter_batches(batch_size=batch_rows, columns=list(columns)):
        strings = [pc.fill_null(pc.cast(read.column(c), options=_TO_STRING), "") for c in columns]
        dropped: list[tuple[int, str]] = []
        batch, lines = _without_non_utf8(pa.RecordBatch.from_arrays(strings, names=list(columns)), _Lines(row),
                                         binary, dropped)
        yield batch, lines, dropped
        row += read.num_rows


def _open_parquet(path: str, columns: Sequence[str]) -> pq.ParquetFile:
    try:
        source = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    schema = source.schema_arrow
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise DataError(f"{path}: Parquet file lacks columns {missing}; it has {schema.names}")
    types = {c: schema.field(c).type for c in columns}
    unreadable = [f"column {c!r} has type {t}" for c, t in types.items() if not _to_string(t)]
    if unreadable:
        raise DataError(f"{path}: {'; '.join(unreadable)}; expected strings or numbers")
    return source


def _to_string(kind: pa.DataType) -> bool:
    """Whether pyarrow casts `kind` to strings (not lists, structs or maps)."""
    try:
        pc.cast(pa.nulls(0, kind), options=_TO_STRING)
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
        return False
    return True


def _is_binary(kind: pa.DataType) -> bool:
    return any(f(kind) for f in (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_fixed_size_binary,
                                 pa.types.is_binary_view))


def _valid_rows(batch: pa.RecordBatch, path: str, lines: _Lines, checks: Mapping[str, str], report: BadRows,
                on_bad_row: str, dropped: list[tuple[int, str]]) -> pa.RecordBatch:
    """`batch` without the rows whose checked fields do not hold what they must. Those
    and the rows `dropped` among them are reported in line order, or, in fail mode,
    the first of them stops the run."""
    bad: dict[int, str] = {}  # row -> why (its first bad column)
    for name, kind in checks.items():
        column = batch.column(name)
        for row in np.flatnonzero(~_fine(column, kind).to_numpy(zero_copy_only=False)):
            bad.setdefault(int(row), f"column {name!r}: expected {_EXPECTED[kind]}, got {column[row].as_py()!r}")
    bad.update(dict.fromkeys(_empty_rows(batch, list(bad)), "an empty line (every field empty)"))
    found = sorted([(lines.of(row), why) for row, why in bad.items()] + dropped)
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


def _empty_rows(batch: pa.RecordBatch, rows: list[int]) -> list[int]:
    """Those of `rows` whose every field is empty, as pyarrow reads a blank line."""
    if not rows:
        return []
    taken = batch.take(rows)
    empty = functools.reduce(pc.and_, [pc.equal(pc.binary_length(c), 0) for c in taken.columns])
    return [row for row, is_empty in zip(rows, empty.to_pylist()) if is_empty]


def _fine(column: pa.Array, kind: str) -> pa.Array:
    """Which fields of `column` hold what `kind` asks for."""
    fine = pc.match_substring_regex(column, _PATTERNS[kind])
    if kind == "number":  # written as a number, yet 1e999 reads as infinity and 1e39 overflows float32
        values = pc.cast(pc.if_else(fine, column, "0"), pa.float64())
        fine = pc.and_(fine, pc.less_equal(pc.abs(values), _FLOAT32_MAX))
    if kind != "label":
        fine = pc.or_(fine, pc.equal(pc.utf8_length(column), 0))
    return fine
