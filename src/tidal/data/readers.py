"""Streaming readers of Criteo-style TSV, CSV and Parquet files (pyarrow).

Files are read in record batches, one file after the other, so no file has to fit in
memory. Every column comes out as a string column (Parquet columns are cast, booleans
as 1 and 0; a Parquet list column checked as bags, `Bags` or `WeightedBags`, as its
values joined by the bags' separator, a row whose values hold it being a bad row),
and checked columns are checked row by row without Python loops: a row with the
wrong number of columns, an empty line, a line holding a carriage return
other than in a CRLF line end, a field that is not UTF-8 text, an unparsable number,
a label that is not 0 or 1, or a weighted bag value without its weight, is a bad row.
Bad rows are counted and described (file, line, reason) in a `BadRows` report and
skipped, or, with ``on_bad_row="fail"``, stop the run with a `DataError` naming the
first one. Skipped, they may be at most `max_bad_fraction` of the rows read, and of
each file's (judged after each piece of a file, from `JUDGED_FROM` rows on: a share of
fewer says little, so `on_bad_row="fail"` is the way to allow none at all): more, and
the files are most likely not what the run expects (another delimiter, other columns),
so the read stops with a `DataError` saying so.

Text files are cut here into pieces of whole records (lines, or CSV records whose
quoted values span lines), each handed to pyarrow's parser whole. Lines end at a line
feed (``\\n``, or ``\\r\\n``), as `wc -l` and editors count them, so every row keeps the
number of the physical line it starts on; a line of any length (up to 1 GiB) is read.
"""

from __future__ import annotations

import codecs
import contextlib
import difflib
import glob
import gzip
import os
import re
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from tidal.config import is_finite_number, is_whole_number, weighted_bag_problem
from tidal.data.criteo import CRITEO_COLUMNS, CRITEO_DENSE
from tidal.errors import DataError, DataPathError

__all__ = ["BadRows", "Bags", "CRITEO_CHECKS", "INTEGER_PATTERN", "WeightedBags", "check_layout", "expand_paths",
           "format_of", "holds_rows", "read_batches", "split_bags", "weighted_values"]

_INT64_MAX, _INT64_MIN = "9223372036854775807", "-9223372036854775808"  # 2**63 - 1 and -2**63, written out
FLOAT32_MAX = 3.4028235e38  # float32's largest value as numpy writes it (it reads back as that value)
_NUMBER = r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
INTEGER_PATTERN = r"^-?[0-9]+$"  # an integer id or number as files hold it (and within int64's range)
_PATTERNS = {  # what a checked column must hold; "label" may not be empty, the others may
    "integer": INTEGER_PATTERN,  # and within int64's range: see `_within_int64`
    "number": f"^(?:{_NUMBER}|[+-]?[nN][aA][nN])$",  # NaN as Spark and numpy write it: a missing value
    "label": r"^[01](?:\.0*)?$",  # 1.0 too, as a float column's text (and Parquet's 1.0) has it
}
_WITHIN_FLOAT32 = "within float32's range (|x| <= 3.4028235e38)"
_EXPECTED = {"integer": f"an integer within int64's range ({_INT64_MIN} to {_INT64_MAX}) or nothing",
             "number": f"a number {_WITHIN_FLOAT32} or nothing", "label": "0 or 1 (or 0.0 or 1.0)"}
_BEYOND_INT64 = " (if it is an id, a uint64 one say, a feature that hashes its ids reads it: hashed: true)"
_TO_STRING = pc.CastOptions(pa.string(), allow_invalid_utf8=True)  # binary fields are checked row by row
CRITEO_CHECKS: dict[str, str] = {"label": "label", **{c: "integer" for c in CRITEO_DENSE}}


@dataclass(frozen=True)
class Bags:
    """A column of bags of ids such as "a|b|c": its values between `separator`s. Text
    holds them so; a Parquet list column's values are read joined by `separator`."""

    separator: str


@dataclass(frozen=True)
class WeightedBags:
    """The check of a column of weighted bags such as "a:0.5|b:2": every value (between
    `separator`s; empty ones are left out) is an id, `weight_separator` and a weight
    within float32's range."""

    separator: str
    weight_separator: str

    def __post_init__(self) -> None:
        problem = weighted_bag_problem(self.separator, self.weight_separator)
        if problem:
            raise DataError(f"WeightedBags: {problem}")

    @property
    def expected(self) -> str:
        """What a field must be."""
        return f"bag values split by {self.separator!r}, each {self.value_expected}, or nothing"

    @property
    def value_expected(self) -> str:
        """What one value of a bag must be."""
        return f"an id, {self.weight_separator!r} and a weight {_WITHIN_FLOAT32}"

    def refused(self, column: pa.Array) -> tuple[np.ndarray, list[str]]:
        """The rows of a string column that hold a value that is not so, and the first
        such value of each."""
        values, rows = split_bags(column, self.separator)
        refused = np.flatnonzero(np.isnan(weighted_values(values, self.weight_separator)[1]))
        bad_rows, first = np.unique(rows[refused], return_index=True)
        return bad_rows, values.take(pa.array(refused[first], pa.int64())).to_pylist()

    def problem(self, value: str) -> str:
        """What is wrong with one bag value the check refused."""
        key, split, weight = value.rpartition(self.weight_separator)
        if not split or not key:
            return f"the value {value!r} is not an id, {self.weight_separator!r} and a weight"
        if re.fullmatch(_NUMBER, weight):
            return f"the value {value!r} has a weight beyond float32's range"
        return f"the value {value!r} has a weight that is not a number"


_Check = str | Bags | WeightedBags  # what a checked column must hold: a pattern's name, or bags


def split_bags(column: pa.Array, separator: str) -> tuple[pa.Array, np.ndarray]:
    """(every row's values split on `separator`, flat; the row each one is in). A null
    row reads as an empty one, which holds one empty value."""
    lists = pc.split_pattern(pc.fill_null(column, ""), separator)
    rows = np.repeat(np.arange(len(lists)), pc.list_value_length(lists).to_numpy(zero_copy_only=False))
    return pc.list_flatten(lists), rows


def weighted_values(values: pa.Array, weight_separator: str) -> tuple[pa.Array, np.ndarray]:
    """(ids, weights) of weighted bag values "id<weight_separator>weight", split at the
    separator's last occurrence (ids may hold it): the id strings, and the weights as
    float64, NaN for a value without an id or a weight within float32's range. An
    empty value (or null) gives an empty id of weight 1 (bags leave empty values out)."""
    values = pc.fill_null(values, "")
    parts = pc.split_pattern(values, weight_separator, max_splits=1, reverse=True)
    starts = parts.offsets.to_numpy()[:-1] - parts.offsets[0].as_py()
    pieces = pc.list_flatten(parts)
    two = pc.list_value_length(parts).to_numpy(zero_copy_only=False) == 2
    ids = pieces.take(pa.array(starts))
    text = pieces.take(pa.array(np.where(two, starts + 1, starts)))
    fine = pc.and_(pc.match_substring_regex(text, f"^{_NUMBER}$"), pc.greater(pc.utf8_length(ids), 0))
    fine = pc.and_(fine, pa.array(two))
    weights = np.array(pc.cast(pc.if_else(fine, text, None), pa.float64()))  # a copy: NaN where not fine
    with np.errstate(invalid="ignore"):
        weights[np.abs(weights) > FLOAT32_MAX] = np.nan
    weights[np.asarray(pc.equal(pc.utf8_length(values), 0))] = 1.0
    return ids, weights


_MAX_EXAMPLES = 20
JUDGED_FROM = 10_000  # rows read before the share of bad ones is judged: fewer say little
_FORMATS = ("tsv", "csv", "parquet")
_ASCII = bytes(range(128)) + b"?" * 128  # a translation: bytes from 0x80 on to '?'
_PIECE_BYTES = 1 << 22  # how much text is read and parsed at a time (more when one record is longer)
_SAMPLE_RECORDS, _SAMPLE_BYTES = 20, 1 << 16  # the records `check_layout` reads, and how much text at a time
_MAX_RECORD_BYTES = 1 << 30  # a longer record is an error: pyarrow's string columns hold at most 2 GiB
_STRAY_QUOTE_BYTES = 64 << 20  # a CSV quote no quote closes within this much text opens no value: a stray one
_CR_INSIDE = "a carriage return (\\r) inside the line; lines end at \\n or \\r\\n"
_UNCLOSED = "a quote opens a value that no quote closes"
_EMPTY_LINE = "an empty line"


@dataclass
class BadRows:
    """How many rows were bad and why, with the first few as examples."""

    count: int = 0
    examples: list[str] = field(default_factory=list)
    read: int = 0  # rows read, good and bad (counted by the reader; not kept in checkpoints)
    empty_files: list[str] = field(default_factory=list)  # files that held no rows at all (as `read`)

    def add(self, path: str, line: int | None, reason: str) -> None:
        self.count += 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(f"{path}:{line if line is not None else '?'}: {reason}")

    def extend(self, count: int, examples: list[str]) -> None:
        """Count `count` more bad rows, described (the first of them) by `examples`."""
        self.count += count
        self.examples += examples[: max(0, _MAX_EXAMPLES - len(self.examples))]

    def listed(self) -> list[str]:
        """The examples kept, then how many more bad rows there were."""
        left = self.count - len(self.examples)
        return [*self.examples, *([f"... and {left:,} more"] if left > 0 else [])]

    def summary(self) -> str:
        if not self.count:
            return "no bad rows"
        shown = "\n  ".join(self.listed())
        return f"{self.count:,} bad row{'s' if self.count != 1 else ''} skipped:\n  {shown}"

    def none_valid(self) -> str:
        """Why no valid row came: the files that held no rows at all, then the bad rows."""
        files = self.empty_files
        shown = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
        said = [f"{shown} {'holds' if len(files) == 1 else 'hold'} no rows"] if files else []
        if self.count or not said:
            said.append(self.summary())
        return "; ".join(said)


def expand_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """A file, a glob, or a list of them, as a sorted list of existing files. A glob's
    matches that are folders are passed over (data/* may match data/old/); a file named
    twice (or by a name and a glob) is refused, as it would be read twice."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths) if isinstance(paths, Sequence) else None
    if items is None or not all(isinstance(item, (str, os.PathLike)) for item in items):
        raise DataPathError(f"expected a file name, a glob or a list of them (str or path), got {paths!r}")
    found: list[str] = []
    for item in map(str, items):
        if Path(item).is_file():  # named as it is, even where its name holds [, ] or * (glob.escape for a glob)
            found.append(item)
        elif glob.has_magic(item):
            found += _files_matching(item)
        elif Path(item).is_dir():
            raise DataPathError(f"{item} is a folder; expected a data file, a glob matching files (such as "
                                f"{os.path.join(item, '*.parquet')} or {os.path.join(item, '*.tsv')}), or a list of "
                                f"them")
        else:
            raise DataPathError(f"no data file at {item}: expected a file, a glob matching files, or a list of them")
    real = [os.path.realpath(f) for f in found]
    twice = next((f for f, r in zip(found, real) if real.count(r) > 1), None)
    if twice is not None:
        raise DataPathError(f"{twice} is named more than once (by two names or globs that match it), so its rows "
                            f"would be read twice; name each file once (training.epochs reads all of them again)")
    return found


def _files_matching(pattern: str) -> list[str]:
    """The files that `pattern` matches (`**` any depth of folders), sorted, but those
    whose names, or the names of the folders the pattern's wildcards matched, begin with
    "_" or "." (as Spark and Hive leave `_SUCCESS` and `_temporary/` beside their data);
    an error if none."""
    parts = Path(pattern).parts
    fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))  # folders named as they are
    named = {part for part in parts[fixed:] if not glob.has_magic(part)}
    matches = sorted(glob.glob(pattern, recursive=True))
    files = [m for m in matches if Path(m).is_file() and not _passed_over(Path(m).parts[fixed:], named)]
    if not files:
        what = f"it matches only folders, and files whose names or folders' names begin with _ or . " \
            f"({', '.join(matches[:3])}{', ...' if len(matches) > 3 else ''})" if matches else "it matches nothing"
        raise DataPathError(f"no data file at {pattern}: {what}; expected a file, a glob matching files, or a list of "
                            f"them")
    return files


def _passed_over(names: Sequence[str], named: set[str]) -> bool:
    """Whether a glob's match, by the `names` its wildcards matched (and those the pattern
    `named` as they are), is in a folder or of a name beginning with _ or ."""
    return any(name.startswith(("_", ".")) and name not in named and name != ".." for name in names)


def read_batches(paths: str | os.PathLike | Sequence[str | os.PathLike], *,
                 columns: Sequence[str] = CRITEO_COLUMNS, checks: Mapping[str, _Check] | None = None,
                 file_format: Literal["tsv", "csv", "parquet"] | None = None, batch_rows: int = 65536,
                 on_bad_row: Literal["skip", "fail"] = "skip", bad_rows: BadRows | None = None,
                 csv_header: bool = True, max_bad_fraction: float = 0.1,
                 layout: Sequence[str] | None = None, sizes: Mapping[str, int] | None = None) -> Iterator[pa.RecordBatch]:
    """Record batches of the string columns `columns` from every file, bad rows removed.

    TSV files have no header and the columns of `layout` by position (`columns` when
    not given; Criteo's layout by default), of which `columns` are read and checked;
    CSV files have a header line (without `csv_header`, none: their columns are those
    of `layout`, as a TSV file's), and quoted values may span lines; Parquet files must
    hold every column of `columns`. The format follows the file suffix unless
    `file_format` says otherwise; a name ending in .gz (d.tsv.gz, d.tsv.GZ) is read
    gunzipped, and an empty file has no rows. Lines end at \\n or \\r\\n. Batches hold
    exactly `batch_rows` rows, the last one fewer. Empty fields are kept as empty
    strings (missing values), as are Parquet nulls. `checks` maps columns to what they
    must hold: "integer" (int64) or "number" (float32), or nothing, or "label" (0 or
    1), or weighted bags (a `WeightedBags`); by default, Criteo's label and counts
    among `columns`. Bad rows are skipped while they are at most `max_bad_fraction` of
    the rows read (1.0: however many); see the module docstring. `sizes`: the bytes each
    file held when a run began; a file of another size when its turn comes is refused
    (a run trains on the files it recorded).
    """
    columns = _check_options(columns, file_format, batch_rows, on_bad_row)
    layout = _checked_layout(layout, columns)
    if not is_finite_number(max_bad_fraction) or not 0.0 <= max_bad_fraction <= 1.0:
        raise DataError(f"max_bad_fraction must be a share of the rows read, from 0 to 1, got {max_bad_fraction!r}")
    if checks is None:
        checks = {c: k for c, k in CRITEO_CHECKS.items() if c in columns}
    unknown = {c: k for c, k in checks.items() if not (isinstance(k, (Bags, WeightedBags)) or k in _PATTERNS)
               or c not in columns}
    if unknown:
        raise DataError(f"checks must name read columns and one of {sorted(_PATTERNS)}, a Bags or a WeightedBags, "
                        f"got {unknown}")
    if bad_rows is not None and not isinstance(bad_rows, BadRows):
        raise DataError(f"bad_rows must be a BadRows to count the skipped rows in, got {type(bad_rows).__name__}")
    report = bad_rows if bad_rows is not None else BadRows()
    files = expand_paths(paths)
    if sizes is not None:
        _check_same_files(files, sizes)
    checked = _checked(files, (columns, layout), checks, file_format, batch_rows, report, on_bad_row,
                       csv_header, max_bad_fraction, sizes)
    yield from _exactly(checked, batch_rows)


def _check_options(columns: Sequence[str], file_format: str | None, batch_rows: int, on_bad_row: str) -> list[str]:
    """`columns` as a list, once the options are ones `read_batches` reads as documented."""
    _check_names(columns, "columns")
    if on_bad_row not in ("skip", "fail"):
        raise DataError(f"on_bad_row must be 'skip' or 'fail', got {on_bad_row!r}")
    if file_format is not None and file_format not in _FORMATS:
        raise DataError(f"file_format must be one of {list(_FORMATS)} (lowercase), or None to follow each file's "
                        f"suffix; got {file_format!r}")
    if not is_whole_number(batch_rows) or batch_rows < 1:
        raise DataError(f"batch_rows must be an integer >= 1, got {batch_rows!r}")
    return list(columns)


def _check_names(columns: Sequence[str], what: str) -> None:
    """Refuse `columns` (called `what`) unless it is a list of distinct names."""
    if isinstance(columns, (str, bytes)) or not isinstance(columns, Iterable):
        raise DataError(f"{what} must be a list of column names, got {columns!r}; write [{columns!r}] for one column")
    names = list(columns)
    if not names or not all(isinstance(c, str) for c in names):
        raise DataError(f"{what} must be a non-empty list of names (strings), got {names!r}")
    twice = sorted({c for c in names if names.count(c) > 1})
    if twice:
        raise DataError(f"{what} must name each column once, got {twice} more than once in {names}")


def _checked_layout(layout: Sequence[str] | None, columns: list[str]) -> list[str]:
    """The columns of files without a header line, by position: `layout`, once it holds
    every one of `columns`, or `columns`."""
    if layout is None:
        return columns
    _check_names(layout, "layout")
    if missing := [c for c in columns if c not in layout]:
        raise DataError(f"columns {missing} are not in the layout {list(layout)}; files without a header line hold "
                        f"the columns of the layout by position, and only those can be read")
    return list(layout)


def _checked(paths: list[str], names: tuple[list[str], list[str]], checks: Mapping[str, _Check],
             file_format: str | None, batch_rows: int, report: BadRows, on_bad_row: str, csv_header: bool,
             max_bad_fraction: float, sizes: Mapping[str, int] | None) -> Iterator[pa.RecordBatch]:
    """The valid rows of every file; `names` = (the columns read, the layout of files
    without a header line)."""
    for path in paths:
        _check_unchanged(path, sizes)
        kind = file_format or format_of(path)
        positional = kind == "tsv" or (kind == "csv" and not csv_header)  # columns by the layout's order
        in_file = BadRows()  # this file's, added to `report` piece by piece
        try:
            for batch, lines, dropped in _file_rows(path, kind, names, batch_rows, csv_header, _separators(checks)):
                counted, shown, read = in_file.count, len(in_file.examples), in_file.read
                valid = _valid_rows(batch, path, lines, checks, in_file, on_bad_row, dropped)
                report.extend(in_file.count - counted, in_file.examples[shown:])
                report.read += in_file.read - read
                _check_bad_share(in_file, max_bad_fraction, f" of {path}", positional)
                _check_bad_share(report, max_bad_fraction, positional=positional)
                yield valid
            if in_file.read == 0 and path not in report.empty_files:
                report.empty_files.append(path)
        except (OSError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:  # gone since the run started, damaged
            raise DataError(f"{path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None


def _check_same_files(files: list[str], sizes: Mapping[str, int]) -> None:
    """Refuse a list of files other than the one `sizes` recorded when the run began."""
    added, gone = sorted(set(files) - set(sizes)), sorted(set(sizes) - set(files))
    if added or gone:
        changes = ", ".join([*(f"{f} appeared" for f in added), *(f"{f} is gone" for f in gone)])
        raise DataError(f"the training files changed while the run trained ({changes}); a run trains on the files "
                        f"it began with (write new data to new files, for a run of their own)")


def _check_unchanged(path: str, sizes: Mapping[str, int] | None) -> None:
    """Refuse a file whose size is not the one `sizes` recorded for it."""
    if sizes is None:
        return
    try:
        now = os.path.getsize(path)
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({exc.strerror})") from None
    if now != sizes[path]:
        raise DataError(f"{path}: holds {now:,d} bytes, but {sizes[path]:,d} when the run began: it changed while the "
                        f"run trained, which trains on the files it began with (write new data to new files, for a run "
                        f"of their own)")


def _separators(checks: Mapping[str, _Check]) -> dict[str, str]:
    """The columns checked as bags, and their bags' separators."""
    return {c: k.separator for c, k in checks.items() if isinstance(k, (Bags, WeightedBags))}


def check_layout(paths: Sequence[str], columns: Sequence[str], file_format: str | None = None,
                 csv_header: bool = True, *, widths: bool = True,
                 checks: Mapping[str, _Check] | None = None, layout: Sequence[str] | None = None) -> None:
    """Refuse, before a row is read, each file whose own layout lacks one of `columns`:
    a Parquet file by its footer, a CSV file by its header line. TSV files, and CSV
    files without a header line, name no columns: the columns of `layout` (default:
    `columns`) are theirs by position, and such a file is refused when none of its
    first 20 records (`_SAMPLE_RECORDS`; empty lines passed over) has as many fields,
    unless `widths` is False (a run that takes any share of bad rows). (A single record
    of another width is a bad row, counted as the file is read.) An empty file is left
    to the read. A Parquet list column is read only where `checks` reads it as bags."""
    bags = _separators(checks or {})
    layout = _checked_layout(layout, list(columns))
    for path in paths:
        kind = file_format or format_of(path)
        try:
            _check_file_layout(path, kind, (list(columns), layout), csv_header, widths, bags)
        except OSError as exc:  # gone or unreadable since it was found
            raise DataError(f"{path}: cannot read it ({exc.strerror or exc})") from None


def holds_rows(path: str, kind: str, csv_header: bool = True) -> bool:
    """Whether the data file at `path` (of format `kind`) holds a record, a CSV file's
    header line aside (blank lines are none); read only as far as the first one."""
    if kind == "parquet":
        return _open_parquet(path, [], {}).metadata.num_rows > 0
    header = kind == "csv" and csv_header
    for piece in _pieces(path, kind, _SAMPLE_BYTES):
        text = _split_first_record(piece.text)[1] if header else piece.text
        header = False
        if text.strip():
            return True
    return False


def _check_file_layout(path: str, kind: str, names: tuple[list[str], list[str]], csv_header: bool, widths: bool,
                       bags: Mapping[str, str]) -> None:
    """`check_layout` of one file, of format `kind`; `names` as in `_checked`."""
    columns, layout = names
    if kind == "parquet":
        _open_parquet(path, columns, bags)
    elif os.path.getsize(path):
        _check_plain_text(path, kind)
        if kind == "csv" and csv_header:
            first = next(_pieces(path, kind, _SAMPLE_BYTES), None)
            if first is not None:
                _header_names(path, _split_first_record(first.text)[0], columns)
        elif widths:
            _check_widths(path, kind, layout)


def _check_widths(path: str, kind: str, columns: Sequence[str]) -> None:
    """Refuse the TSV or CSV file at `path` (without a header) when none of its first
    records has a field for each of `columns`."""
    widths = _first_widths(path, kind, _SAMPLE_RECORDS)
    if len(widths) and not (widths == len(columns)).any():
        first = f"first {len(widths)} records have" if len(widths) > 1 else "first record has"
        separated = "tab-separated" if kind == "tsv" else "comma-separated"
        counts = _counts(widths)
        shown = ", ".join(columns) if len(columns) <= 6 else f"{', '.join(columns[:3])}, ..., {columns[-1]}"
        raise DataError(f"{path}: its {first} {counts} field{'' if counts == '1' else 's'} ({separated}), expected "
                        f"{len(columns)}, the columns {shown} by position (data.columns in a run config, or "
                        f"Criteo's layout when not set)")


def _first_widths(path: str, kind: str, most: int) -> np.ndarray:
    """How many fields each of the first `most` records of a TSV or CSV file holds,
    empty lines passed over; the file is read only that far, and at most about
    `_PIECE_BYTES` (or one longer record) of it."""
    widths, read = np.array([], np.int64), 0
    for piece in _pieces(path, kind, _SAMPLE_BYTES):
        widths = np.concatenate([widths, _Records(piece.text, piece.line, kind).widths(kind)])[:most]
        read += len(piece.text)
        if len(widths) == most or read >= _PIECE_BYTES:
            break
    return widths


def _counts(widths: np.ndarray) -> str:
    """The numbers of fields of some records, in words: 39, 39 or 41, from 2 to 41."""
    seen = np.unique(widths).tolist()
    if len(seen) > 2:
        return f"from {seen[0]} to {seen[-1]}"
    return " or ".join(map(str, seen))


def _file_rows(path: str, kind: str, names: tuple[list[str], list[str]], batch_rows: int, csv_header: bool,
               bags: Mapping[str, str]) -> Iterator[_Rows]:
    """The rows of one file (`names` as in `_checked`; the columns in `bags` hold bags
    of that separator). An empty text file has none, like a CSV file of just a header;
    an empty Parquet file is no Parquet file (it has no footer) and is refused."""
    columns, layout = names
    if kind == "parquet":
        return _parquet(path, columns, batch_rows, bags)
    if os.path.getsize(path) == 0:
        return iter(())
    return _text(path, kind, columns, None if kind == "csv" and csv_header else layout)


def _check_bad_share(rows: BadRows, most: float, where: str = "", positional: bool = False) -> None:
    """Stop the read when more than `most` of the rows read (`where`: of one file, or
    of all so far) were bad, from `JUDGED_FROM` rows on; every row of a file whose
    columns go by position (`positional`) bad points at the layout."""
    bad, read = rows.count, rows.read
    if read < JUDGED_FROM or bad <= most * read:
        return
    first = f" The first: {rows.examples[0]}." if rows.examples else ""
    advice = (" Every row was bad, so the files' columns are likely in another order than the layout given: give "
              "them in the files' order (data.columns; read_batches: layout), or fix the files"
              if bad == read and positional else " Fix the files, or raise data.max_bad_fraction (read_batches: "
              "max_bad_fraction; 1.0 skips any number)")
    raise DataError(f"{bad:,d} of the {read:,d} rows read{where} were bad ({bad / read:.1%}), more than the "
                    f"{int(most * read):,d} that max_bad_fraction {most:g} allows: the files may not have the layout "
                    f"the run expects.{first}{advice}")


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
    suffix = Path(name.removesuffix(".gz")).suffix  # d.tsv.gz is read gunzipped
    formats = {".tsv": "tsv", ".txt": "tsv", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
    if name.endswith(".gz") and formats.get(suffix) == "parquet":
        raise DataError(f"{path}: a gzip-compressed Parquet file; {_GUNZIP_PARQUET}")
    if suffix not in formats:
        raise DataError(f"{path}: cannot tell the format from the suffix {Path(path).suffix.lower()!r}; "
                        f"use .tsv, .csv or .parquet (.tsv.gz or .csv.gz if gzip-compressed), or name the format "
                        f"(data.format in a run config, file_format in read_batches)")
    return formats[suffix]


_Rows = tuple[pa.RecordBatch, np.ndarray, list[tuple[int, str]]]  # a batch, each row's line, (line, why) of bad ones


def _text(path: str, kind: str, columns: Sequence[str], layout: list[str] | None) -> Iterator[_Rows]:
    """(batch of `columns`, the line each of its rows starts on, (line, reason) of the
    records left out of it: of the wrong width, empty, holding a stray carriage return,
    or not UTF-8 text where a read column is) for each piece of a TSV or CSV file. The
    file's columns are those of `layout` by position, or (None) its first record is
    its header."""
    _check_plain_text(path, kind)
    names = layout
    for piece in _pieces(path, kind):
        if names is None:
            header, text = _split_first_record(piece.text)
            names = _header_names(path, header, columns)
            feeds = header.count(b"\n")
            piece = _Piece(text, piece.line + feeds, piece.feeds - feeds, piece.last)
        if piece.text:
            yield _read_piece(path, piece, kind, names, columns)


class _Piece(NamedTuple):
    """Whole records of a TSV or CSV file."""

    text: bytes
    line: int  # the number of its first line in the file
    feeds: int  # how many line feeds it holds
    last: bool  # whether the file ends with it (or a stray quote's record does: `_STRAY_QUOTE_BYTES`)


def _pieces(path: str, kind: str, piece_bytes: int | None = None) -> Iterator[_Piece]:
    """The text of a TSV or CSV file, gunzipped if its name ends in .gz (whatever the
    case), in pieces of about `piece_bytes` (`_PIECE_BYTES` by default) that end where a
    record ends: a piece grows to hold a longer record. A UTF-8 byte order mark opening
    the file is dropped."""
    piece_bytes = piece_bytes or _PIECE_BYTES
    line, rest, size, start = 1, b"", piece_bytes, True
    with pa.input_stream(path, compression="gzip" if path.lower().endswith(".gz") else None) as stream:
        while True:
            data = _read(stream, size, path)
            text = rest + data
            if start and not (data and codecs.BOM_UTF8.startswith(text)):  # past where a byte order mark would end
                text, start = text.removeprefix(codecs.BOM_UTF8), False
            if not data:  # the end: the last record may lack its line feed
                yield from _last_pieces(text, line, kind)
                return
            cut = _end_of_last_record(text, kind)
            stray = None if cut or kind != "csv" or len(text) <= _STRAY_QUOTE_BYTES else _after_unclosed_quote(text)
            if stray:  # a quote that nothing closes in that much text: a stray one, its line a bad row
                feeds = text.count(b"\n", 0, stray)
                yield _Piece(text[:stray], line, feeds, last=True)
                line, rest, size = line + feeds, text[stray:], piece_bytes
                continue
            if not cut:  # no record ends in `text` yet: read as much again
                if len(text) > _MAX_RECORD_BYTES:
                    raise DataError(f"{path}:{line}: a record longer than {_MAX_RECORD_BYTES >> 20} MiB starts on this "
                                    f"line; expected lines (records) that end within it"
                                    + (" (does a quote open a value that is never closed?)" if kind == "csv" else ""))
                rest, size = text, max(len(text), piece_bytes)
                continue
            feeds = text.count(b"\n", 0, cut)
            yield _Piece(text[:cut], line, feeds, last=False)
            line += feeds
            rest, size = text[cut:], piece_bytes


def _last_pieces(text: bytes, line: int, kind: str) -> Iterator[_Piece]:
    """The end of a file, from line `line`. In CSV, a quote opening a value that is
    never closed would make the rest of the file that value: the text is cut after the
    line that quote is on instead (that record a bad row), and the lines after it are
    read as records of their own."""
    while text:
        cut = _after_unclosed_quote(text) if kind == "csv" else None
        if cut is None:
            yield _Piece(text, line, text.count(b"\n"), last=True)
            return
        feeds = text.count(b"\n", 0, cut)
        yield _Piece(text[:cut], line, feeds, last=True)  # whose record of the quote is refused as unclosed
        text, line = text[cut:], line + feeds


def _after_unclosed_quote(text: bytes) -> int | None:
    """Where the line after that of a quote left open at the end of CSV `text` starts;
    None when every quoted value closes, or when that quote is on the last line."""
    if b'"' not in text:
        return None
    quotes = _Quotes(text)
    if not quotes.unclosed:
        return None
    feed = text.find(b"\n", int(quotes.opens[-1]))
    return feed + 1 if 0 <= feed < len(text) - 1 else None


def _read(stream: pa.NativeFile, size: int, path: str) -> bytes:
    try:
        return stream.read(size)
    except (OSError, pa.ArrowInvalid) as exc:  # a damaged or cut-off .gz file
        raise DataError(f"{path}: cannot read it ({exc})") from None


def _end_of_last_record(text: bytes, kind: str) -> int:
    """Where the last whole record of `text` ends, after its line feed; 0 if none does."""
    last = text.rfind(b"\n")
    if kind == "tsv" or last < 0 or b'"' not in text:
        return last + 1
    quotes = _Quotes(text)
    if not quotes.inside(np.array([last]))[0]:  # as a rule: no quoted value spans the last line end
        return last + 1
    ends = _record_ends(text, quotes)
    return int(ends[-1]) + 1 if len(ends) else 0


def _record_ends(text: bytes, quotes: _Quotes | None) -> np.ndarray:
    """Where the line feeds that end records are in `text`: all of them, but those inside
    quoted values of CSV text."""
    feeds = np.flatnonzero(np.frombuffer(text, np.uint8) == ord("\n"))
    return feeds if quotes is None else feeds[~quotes.inside(feeds)]


class _Quotes:
    """Where the quoted values of CSV text open and close, as pyarrow reads them: a quote
    opens a value at the start of a field; within one, two quotes stand for one and a
    single one closes it. Inside quotes, line feeds and carriage returns are text."""

    def __init__(self, text: bytes) -> None:
        quotes = np.flatnonzero(np.frombuffer(text, np.uint8) == ord('"'))
        self.opens, self.closes = quotes[0::2], quotes[1::2]  # as when every quote is where RFC 4180 puts it
        if not _open_fields(text, self.opens):  # a quote inside an unquoted value (5 "inch): text to pyarrow
            self.opens, self.closes = _paired_quotes(text, quotes)
        self.unclosed = len(self.closes) < len(self.opens)  # open at the end of the text
        if self.unclosed:
            self.closes = np.append(self.closes, len(text))

    def inside(self, positions: np.ndarray) -> np.ndarray:
        """Whether each of `positions` (of bytes that are not quotes) is inside a quoted value."""
        return np.searchsorted(self.opens, positions) > np.searchsorted(self.closes, positions)


def _open_fields(text: bytes, opens: np.ndarray) -> bool:
    """Whether every quote of `opens` starts a field (after a comma, a line end or the
    start of the text) or follows a quote (two quotes inside a value): then pairing
    the quotes in order finds the quoted values as pyarrow does."""
    before = np.frombuffer(text, np.uint8)[opens[opens > 0] - 1]
    return bool(np.isin(before, np.frombuffer(b',\n\r"', np.uint8)).all())


def _paired_quotes(text: bytes, quotes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(opens, closes) of the quoted values, quote by quote as pyarrow's parser goes:
    slower than pairing them in order, for CSV text with quotes inside unquoted values."""
    opens: list[int] = []
    closes: list[int] = []
    escaped = -1  # the second quote of a pair inside a value
    for q in quotes.tolist():
        if q == escaped:
            continue
        if len(opens) > len(closes):  # inside a quoted value
            if text[q + 1: q + 2] == b'"':
                escaped = q + 1
            else:
                closes.append(q)
        elif q == 0 or text[q - 1] in b",\n\r":
            opens.append(q)
    return np.array(opens, np.int64), np.array(closes, np.int64)


def _split_first_record(text: bytes) -> tuple[bytes, bytes]:
    """(the first record of CSV text, with its line feed; the rest)."""
    ends = _record_ends(text, _Quotes(text) if b'"' in text else None)
    cut = int(ends[0]) + 1 if len(ends) else len(text)
    return text[:cut], text[cut:]


def _header_names(path: str, header: bytes, columns: Sequence[str]) -> list[str]:
    """The column names of a CSV file's header (its first record), which must name each
    of `columns` once. Bytes that are not UTF-8 text read as U+FFFD."""
    line = header.removesuffix(b"\n").removesuffix(b"\r").decode("utf-8", "replace").encode()
    try:
        names = pacsv.read_csv(pa.BufferReader(line + b"\n"), read_options=pacsv.ReadOptions(use_threads=False),
                               parse_options=pacsv.ParseOptions(newlines_in_values=True)).column_names
    except pa.ArrowInvalid as exc:
        raise DataError(f"{path}:1: cannot read the CSV header ({exc}); expected a line of column names") from None
    twice = sorted({c for c in columns if names.count(c) > 1})
    if twice:
        raise DataError(f"{path}: the CSV header names columns {twice} more than once; expected each once, got {names}")
    missing = [c for c in columns if c not in names]
    if missing and len(names) == 1 and b"\t" in line:
        raise DataError(f"{path}: its first line holds tabs and no commas: a tab-separated file, read as CSV; "
                        f"read it as TSV (format: tsv)")
    if missing:
        headless = "" if len(missing) < len(columns) else (
            "; if that first line is a record, not column names, the files have no header line: set "
            "data.csv_header: false, with their columns in data.columns")
        raise DataError(f"{path}: the CSV header lacks columns {missing}{_lacking(missing, names, columns)}{headless}")
    return names


_NAMES_SHOWN = 20  # of a file's columns, in a message about those it lacks


def _lacking(missing: list[str], names: list[str], columns: Sequence[str]) -> str:
    """What a file has instead of the columns `missing` (of those read, `columns`): the
    closest of its names that no feature reads, and its columns (the first
    `_NAMES_SHOWN` of a wide file)."""
    unread = [n for n in names if n not in columns]
    close = {m: found[0] for m in missing if (found := difflib.get_close_matches(m, unread, n=1))}
    hint = f" (did you mean {', '.join(f'{found!r} for {m!r}' for m, found in close.items())}?)" if close else ""
    shown = names if len(names) <= _NAMES_SHOWN else [*names[:_NAMES_SHOWN], f"... {len(names) - _NAMES_SHOWN} more"]
    return f"{hint}; it has {len(names)} columns: {shown}"


def _read_piece(path: str, piece: _Piece, kind: str, names: list[str], columns: Sequence[str]) -> _Rows:
    """The rows of `piece` (of the columns `names`) as a batch of `columns`, the line
    each row starts on, and (line, reason) of the records left out. Most text is read
    as it stands, each line a record; text with lines that are not (empty ones, which
    pyarrow skips, or CSV values spanning lines) or that pyarrow would misread goes
    through `_Records`."""
    text, line = piece.text, piece.line
    lines = line + np.arange(piece.feeds + (not text.endswith(b"\n")))
    spans = np.ones(len(lines), np.int64)  # the lines each record covers
    batch, wrong = _parse(text, kind, names, columns) if _is_plain(text, kind, piece.last) else (None, [])
    dropped: list[tuple[int, str]] = []
    if batch is None or batch.num_rows + len(wrong) != len(lines):  # a line that is not one record as it stands
        records = _Records(text, line, kind)
        bad = records.bad(kind, names, columns)
        kept, lines = records.without(bad)
        all_spans, spans = records.spans(), np.delete(records.spans(), list(bad))
        dropped = [entry for k, why in bad.items() for entry in _bad_lines(int(records.lines[k]), all_spans[k], why)]
        batch, wrong = _parse(kept, kind, names, columns)
    if batch.num_rows + len(wrong) != len(lines):  # never hand on rows under the wrong line numbers
        raise DataError(f"{path}:{line}: pyarrow read {batch.num_rows + len(wrong)} records from this line on, where "
                        f"there are {len(lines)}; the reader cannot tell which line each row is on")
    dropped += [entry for k, expected, found in wrong
                for entry in _bad_lines(int(lines[k]), spans[k], f"expected {expected} columns, found {found}")]
    lines = np.delete(lines, [k for k, _, _ in wrong])
    batch, lines = _without_non_utf8(batch, lines, columns, dropped)
    return batch, lines, dropped


def _bad_lines(first: int, span: int, why: str) -> list[tuple[int, str]]:
    """(line, reason) of a bad record beginning on line `first` and covering `span`
    lines: each line counts, so that a quote opening a value across thousands of lines
    is thousands of bad rows (judged by max_bad_fraction), not one."""
    if span == 1:
        return [(first, why)]
    return [(first, f"{why}, in a record of lines {first} to {first + span - 1} (does a quote open a value there "
                    f"that a later one closes?)"),
            *((first + j, f"inside the bad record that begins on line {first}") for j in range(1, span))]


def _is_plain(text: bytes, kind: str, last: bool) -> bool:
    """Whether pyarrow reads `text` (whole records; `last`: the file's end) as it
    stands, as far as its bytes tell: no carriage return but in a \\r\\n line end
    (pyarrow would end a row there), nothing that is not UTF-8 text (pyarrow cannot
    hand such a line to the bad-row handler) and, in CSV, no quoted value left open at
    the end of the file (pyarrow would take the rest of it as the value). Lines that
    are not one record each (empty ones, quoted line feeds) show as records missing."""
    if (b"\r" in text and text.count(b"\r") != text.count(b"\r\n")) or not (text.isascii() or _is_utf8(text)):
        return False
    return not (kind == "csv" and last and b'"' in text and _Quotes(text).unclosed)


class _Records:
    """The records of a piece of TSV or CSV text: where each starts and stops (its line
    feed left out), and the line it starts on. Finds those pyarrow would misread (see
    `bad`) and leaves them out (`without`), so that every other line is read as it is."""

    def __init__(self, text: bytes, line: int, kind: str) -> None:
        self.text, self.bytes = text, np.frombuffer(text, np.uint8)
        self.quotes = _Quotes(text) if kind == "csv" and b'"' in text else None
        ends = _record_ends(text, self.quotes)
        self.starts, self.stops = np.concatenate([[0], ends + 1]), np.concatenate([ends, [len(text)]])
        if self.starts[-1] == len(text):  # the text ends with a line feed: no record after it
            self.starts, self.stops = self.starts[:-1], self.stops[:-1]
        feeds = np.flatnonzero(self.bytes == ord("\n"))
        self.lines = line + np.searchsorted(feeds, self.starts)

    def bad(self, kind: str, names: list[str], columns: Sequence[str]) -> dict[int, str]:
        """{record: why} of the records that are empty lines, that hold a carriage return
        other than in a \\r\\n line end (pyarrow would end a row there, but `wc -l` and
        editors do not end a line), whose quoted value is never closed, or that are not
        UTF-8 text and of the wrong width (pyarrow cannot hand those to the bad-row handler)."""
        why = dict.fromkeys(np.flatnonzero(self._empty()).tolist(), _EMPTY_LINE)
        for k in self._of(self._stray_returns()).tolist():
            why.setdefault(k, _CR_INSIDE)
        if self.quotes is not None and self.quotes.unclosed:
            why.setdefault(int(self._of(self.quotes.opens[-1:])[0]), _UNCLOSED)
        for k, (expected, found) in self._non_utf8_of_wrong_width(kind, names, columns, set(why)).items():
            why[k] = f"expected {expected} columns, found {found}, in a line that is not UTF-8 text"
        return dict(sorted(why.items()))

    def spans(self) -> np.ndarray:
        """How many lines each record covers (more than one: a quoted value spans them)."""
        feeds = np.flatnonzero(self.bytes == ord("\n"))
        inner = np.searchsorted(feeds, self.stops) - np.searchsorted(feeds, self.starts)
        ends_line = (self.stops > self.starts) & (self.bytes[np.maximum(self.stops - 1, 0)] == ord("\n"))
        return 1 + inner - ends_line  # a record left open to the end of its text holds that text's last line feed

    def without(self, bad: Iterable[int]) -> tuple[bytes, np.ndarray]:
        """The text without the records `bad`, and the line each record left starts on."""
        bad = sorted(bad)
        if not bad:
            return self.text, self.lines
        parts, at = [], 0
        for k in bad:
            parts.append(self.text[at: self.starts[k]])
            at = int(self.starts[k + 1]) if k + 1 < len(self.starts) else len(self.text)
        parts.append(self.text[at:])
        keep = np.ones(len(self.starts), dtype=bool)
        keep[bad] = False
        return b"".join(parts), self.lines[keep]

    def widths(self, kind: str) -> np.ndarray:
        """How many fields each record holds (its delimiters outside quoted values, plus
        one), but empty lines and the records the reader refuses for their line ends or
        an unclosed quote (`bad` says why)."""
        delimiters = np.flatnonzero(self.bytes == ord("\t" if kind == "tsv" else ","))
        if self.quotes is not None:
            delimiters = delimiters[~self.quotes.inside(delimiters)]
        skipped = self._empty()
        skipped[self._of(self._stray_returns())] = True
        if self.quotes is not None and self.quotes.unclosed:
            skipped[self._of(self.quotes.opens[-1:])] = True
        return (np.bincount(self._of(delimiters), minlength=len(self.starts)) + 1)[~skipped]

    def _of(self, positions: np.ndarray) -> np.ndarray:
        """The record that holds each byte of `positions`."""
        return np.searchsorted(self.starts, positions, side="right") - 1

    def _record(self, k: int) -> bytes:
        return self.text[self.starts[k]: self.stops[k]]

    def _empty(self) -> np.ndarray:
        """Whether each record is an empty line (nothing, or just the \\r of \\r\\n)."""
        length = self.stops - self.starts
        return (length == 0) | ((length == 1) & (self.bytes[np.minimum(self.starts, len(self.text) - 1)] == ord("\r")))

    def _stray_returns(self) -> np.ndarray:
        """Where the carriage returns are that are not followed by a line feed (nor inside
        a quoted CSV value)."""
        returns = np.flatnonzero(self.bytes == ord("\r"))
        after = np.minimum(returns + 1, len(self.text) - 1)
        stray = returns[(returns + 1 == len(self.text)) | (self.bytes[after] != ord("\n"))]
        return stray if self.quotes is None else stray[~self.quotes.inside(stray)]

    def _non_utf8_of_wrong_width(self, kind: str, names: list[str], columns: Sequence[str],
                                 passed: set[int]) -> dict[int, tuple[int, int]]:
        """{record: (columns expected, columns found)} of the records, but those `passed`,
        that are not UTF-8 text and of the wrong width, found by parsing them with their
        bytes from 0x80 on read as '?' (a field count the same)."""
        if self.text.isascii() or _is_utf8(self.text):
            return {}
        near = np.unique(self._of(np.flatnonzero(self.bytes >= 0x80))).tolist()
        odd = [k for k in near if k not in passed and not _is_utf8(self._record(k))]
        if not odd:
            return {}
        _, wrong = _parse(b"\n".join(self._record(k).translate(_ASCII) for k in odd) + b"\n", kind, names, columns[:1])
        return {odd[k]: (expected, found) for k, expected, found in wrong}


def _parse(text: bytes, kind: str, names: list[str], columns: Sequence[str],
           ) -> tuple[pa.RecordBatch, list[tuple[int, int, int]]]:
    """The string columns `columns` of the records of `text` (whole records, of the
    columns `names`, each record UTF-8 text or of the right width), parsed by pyarrow in
    one block, and (record, columns expected, columns found) of those of the wrong
    width, which it leaves out. Records are counted from 0."""
    wrong: list[tuple[int, int, int]] = []
    if not text:
        return pa.RecordBatch.from_pydict({c: pa.array([], pa.string()) for c in columns}), wrong

    def handle(row: pacsv.InvalidRow) -> str:
        wrong.append((row.number - 1, row.expected_columns, row.actual_columns))
        return "skip"

    if text.startswith(codecs.BOM_UTF8):  # a value's, not the file's (dropped already): pyarrow would drop it
        text = codecs.BOM_UTF8 + text
    table = pacsv.read_csv(
        pa.BufferReader(text),
        read_options=pacsv.ReadOptions(column_names=names, use_threads=False, block_size=len(text) + 1),
        parse_options=pacsv.ParseOptions(delimiter="\t" if kind == "tsv" else ",", invalid_row_handler=handle,
                                         quote_char=False if kind == "tsv" else '"',  # TSV has no quoting
                                         newlines_in_values=kind == "csv"),  # and empty lines skipped
        convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in columns},
                                             include_columns=list(columns), strings_can_be_null=False,
                                             check_utf8=False),  # checked row by row instead
    )
    batches = table.select(list(columns)).combine_chunks().to_batches()
    return (batches[0] if batches else pa.RecordBatch.from_pydict({c: pa.array([], pa.string()) for c in columns}),
            wrong)


_LINE_ENDS_BYTES = 1 << 16  # of a text file's start, looked at for its line ends
_FIRST_LINE_BYTES = 64 << 20  # how far a first line holding a \r is read for its end
_DECOMPRESS = "decompress it (gzip, in a file named .gz, is read as it is)"
_GUNZIP_PARQUET = "gunzip it and read it as Parquet (Parquet files are read as they are: they compress their own columns)"
_NOT_TEXT = (  # (how a file starts, what it then is, what to do) of files that are not TSV or CSV text
    (re.compile(rb"PAR1"), "a Parquet file", "read it as Parquet (data.format: parquet, or a name ending in .parquet)"),
    (re.compile(rb"BZh[1-9]1AY&SY"), "bzip2-compressed", _DECOMPRESS),
    (re.compile(rb"\xfd7zXZ\x00"), "xz-compressed", _DECOMPRESS),
    (re.compile(rb"\x28\xb5\x2f\xfd"), "zstd-compressed", _DECOMPRESS),
    (re.compile(rb"PK\x03\x04"), "a zip archive (an Excel .xlsx file is one)", "unzip it, or export it as CSV"),
    (re.compile(rb"\xff\xfe\x00\x00|\x00\x00\xfe\xff"), "UTF-32 text", "write it again as UTF-8"),
    (re.compile(rb"\xff\xfe|\xfe\xff"), "UTF-16 text", "write it again as UTF-8"),
)


def _check_plain_text(path: str, kind: str) -> None:
    """A TSV or CSV file must be text whose lines end in \\n or \\r\\n; only a name ending
    in .gz is read gunzipped."""
    gzipped = path.lower().endswith(".gz")
    whole = True  # whether `start` holds the whole text
    with open(path, "rb") as file:
        start = file.read(16)
        compressed = start.startswith(b"\x1f\x8b")
        if gzipped and compressed:  # its text, not its compressed bytes
            file.seek(0)
            try:
                with gzip.open(file) as text:
                    start, whole = _start_of_text(text)
            except (OSError, EOFError):  # not gzip after all, or cut short: reading it says so
                start = b""
            except zlib.error as exc:  # damaged compressed data
                raise DataError(f"{path}: cannot read it (its gzip-compressed data is damaged: {exc}); gzip it "
                                f"again, or leave it out of the files read") from None
        else:
            file.seek(0)
            start, whole = _start_of_text(file)
    if compressed and not gzipped:
        raise DataError(f"{path}: the file looks gzip-compressed (it starts with bytes 1f 8b) but its name "
                        f"does not end in .gz; name it {Path(path).name}.gz, or gunzip it")
    if gzipped and not compressed and start:
        raise DataError(f"{path}: the name ends in .gz but the file is not gzip-compressed (it starts with bytes "
                        f"{start[:4].hex(' ')}, not 1f 8b); name it {Path(path).name[:-3]}, or gzip it")
    for signature, what, advice in _NOT_TEXT:
        if signature.match(start) and (what != "a Parquet file" or _is_parquet(path, start, gzipped)):
            if gzipped and what == "a Parquet file":
                what, advice = "a gzip-compressed Parquet file", _GUNZIP_PARQUET
            raise DataError(f"{path}: expected {kind.upper()} text, got {what} (it starts with bytes "
                            f"{start[:4].hex(' ')}); {advice}")
    _check_line_ends(path, start, whole)


def _start_of_text(text: IO[bytes]) -> tuple[bytes, bool]:
    """(the first bytes of `text`, whether they are all of it): `_LINE_ENDS_BYTES`, and
    while those hold one carriage return and no line feed, on to the next line end (up
    to `_FIRST_LINE_BYTES`): a stray \\r in a long first line, or the first line end of
    a file whose lines end in a bare \\r?"""
    start, ended = _read_on(text, _LINE_ENDS_BYTES)
    if ended or b"\n" in start or start.count(b"\r") != 1:
        return start, ended
    pieces, size = [start], len(start)
    while not ended and size < _FIRST_LINE_BYTES:
        more, ended = _read_on(text, 1 << 20)
        end = re.search(rb"\r\n?|\n", more)
        if end is not None:
            pieces.append(more[: end.end()])
            return b"".join(pieces), False
        pieces.append(more)
        size += len(more)
    return b"".join(pieces), ended


def _read_on(text: IO[bytes], size: int) -> tuple[bytes, bool]:
    """`size` bytes of `text` (one more after a closing \\r: the \\n of a \\r\\n the read
    would split), and whether the text ended."""
    data = text.read(size)
    if len(data) < size:
        return data, True
    if data.endswith(b"\r"):
        extra = text.read(1)
        return data + extra, not extra
    return data, False


def _is_parquet(path: str, start: bytes, gzipped: bool) -> bool:
    """Whether the file at `path`, whose text starts with PAR1, is a Parquet file (a text
    file may start so: an id PAR1023, say): a plain one ends as every Parquet file does,
    and a gzipped one (whose end only a whole read would show) has a control byte no
    text holds in its first bytes."""
    if gzipped:
        return re.search(rb"[\x00-\x08\x0e-\x1f]", start[4:64]) is not None
    with open(path, "rb") as file:
        file.seek(0, os.SEEK_END)
        if file.tell() < 8:
            return False
        file.seek(-4, os.SEEK_END)
        return file.read(4) == b"PAR1"


def _check_line_ends(path: str, start: bytes, whole: bool) -> None:
    """Refuse text (`start`: its first bytes, `whole`: all of it) whose lines end in a
    bare \\r, as old Mac text files' do, or in \\r\\r\\n: its rows would be one bad line,
    or lines holding a stray \\r."""
    first = start.split(b"\n", 1)[0]
    returns = (start.rstrip(b"\r") if whole else start).count(b"\r")  # the text's last line may end in one
    # No line feed, and carriage returns: all of the text, or more than one of them (a stray \r in a long
    # first line, the next line end a \n, makes that line a bad row, not the whole file one).
    if len(first) == len(start) and returns and (returns > 1 or whole):
        raise DataError(f"{path}: its lines seem to end in a bare carriage return (\\r, as old Mac text files' "
                        f"do); expected lines ending in \\n or \\r\\n (write it again so, e.g. with tr '\\r' '\\n')")
    if first.endswith(b"\r\r"):
        raise DataError(f"{path}:1: the line ends in \\r\\r\\n; expected lines ending in \\n or \\r\\n (write it "
                        f"again so, e.g. with sed 's/\\r*$//')")


def _without_non_utf8(batch: pa.RecordBatch, lines: np.ndarray, names: Sequence[str],
                      dropped: list[tuple[int, str]],
                      bad: dict[int, str] | None = None) -> tuple[pa.RecordBatch, np.ndarray]:
    """`batch` without the rows whose fields in `names` are not UTF-8 text and those
    already `bad` (row -> why), added to `dropped`, and the lines of the rows left."""
    bad = dict(bad or {})
    for name in names:
        for row in _not_utf8(batch.column(name)):
            bad.setdefault(row, f"column {name!r}: not UTF-8 text")
    if not bad:
        return batch, lines
    dropped += [(int(lines[row]), why) for row, why in bad.items()]
    keep = np.ones(batch.num_rows, dtype=bool)
    keep[list(bad)] = False
    return batch.filter(pa.array(keep)), lines[keep]


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


def _parquet(path: str, columns: Sequence[str], batch_rows: int, bags: Mapping[str, str]) -> Iterator[_Rows]:
    source = _open_parquet(path, columns, bags)
    row = 1
    for read in source.iter_batches(batch_size=batch_rows, columns=list(columns)):
        bad: dict[int, str] = {}  # row -> why: a list value holding its bags' separator
        strings = pa.RecordBatch.from_arrays([_column_strings(read.column(c), c, bags, bad) for c in columns],
                                             names=list(columns))
        dropped: list[tuple[int, str]] = []  # string and binary columns may hold more than UTF-8 text
        batch, lines = _without_non_utf8(strings, np.arange(row, row + read.num_rows), columns, dropped, bad)
        yield batch, lines, dropped
        row += read.num_rows


def _column_strings(column: pa.Array, name: str, bags: Mapping[str, str], bad: dict[int, str]) -> pa.Array:
    """A Parquet column as strings; a list column (of bags) as its values joined by its
    bags' separator, the rows where a value holds that separator added to `bad`."""
    if not _is_list(column.type):
        return _as_strings(column)
    separator = bags[name]
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)  # a null list: none
    values = _as_strings(pc.list_flatten(column))  # sliced arrays and null lists' offsets taken care of
    holding = pc.match_substring(values, separator).to_numpy(zero_copy_only=False)
    for row in np.unique(np.repeat(np.arange(len(column)), lengths)[holding]).tolist():
        bad.setdefault(row, f"column {name!r}: a value of its list holds the bags' separator {separator!r}")
    lists = pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(lengths)]), pa.int32()), values)
    return pc.binary_join(lists, separator)


def _is_list(kind: pa.DataType) -> bool:
    return pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)


def _as_strings(column: pa.Array) -> pa.Array:
    """A Parquet column as strings, as a text file would hold it: booleans as 1 and 0,
    nulls and floating-point NaN (pandas' missing value) as empty strings (missing
    values, as the server reads a NaN too), and whole floating-point numbers as the
    integers they are (pandas writes an integer column with nulls as doubles: an id
    947926754721.0 is the id 947926754721, not "9.47926754721e+11")."""
    if pa.types.is_boolean(column.type):
        column = pc.cast(column, pa.int8())
    elif pa.types.is_floating(column.type):
        if pa.types.is_float16(column.type):  # exactly a float32, for which pyarrow has the kernels below
            column = pc.cast(column, pa.float32())
        column = pc.if_else(pc.is_nan(column), pa.scalar(None, column.type), column)
        return pc.fill_null(_whole_as_integers(column), "")
    return pc.fill_null(pc.cast(column, options=_TO_STRING), "")


def _whole_as_integers(column: pa.Array) -> pa.Array:
    """Floating-point values as strings, those that are whole numbers (up to 2^24 for
    float32, 2^53 for float64: where the shortest decimal of each is that integer, so a
    dense value reads the same either way) as integers."""
    limit = float(1 << (24 if column.type == pa.float32() else 53))
    whole = pc.and_(pc.equal(pc.floor(column), column), pc.less_equal(pc.abs(column), limit))
    integers = pc.cast(pc.if_else(whole, column, pa.scalar(0, column.type)), pa.int64(), safe=False)
    return pc.if_else(whole, pc.cast(integers, pa.string()), pc.cast(column, options=_TO_STRING))


def _open_parquet(path: str, columns: Sequence[str], bags: Mapping[str, str]) -> pq.ParquetFile:
    try:
        source = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        if _starts_with(path, b"\x1f\x8b"):
            raise DataError(f"{path}: a gzip-compressed file, not a Parquet file; {_GUNZIP_PARQUET}") from None
        raise DataError(f"{path}: not a readable Parquet file ({exc}); write it again, or leave it out of the files "
                        f"read") from None
    schema = source.schema_arrow
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise DataError(f"{path}: Parquet file lacks columns {missing}{_lacking(missing, schema.names, columns)}")
    twice = sorted({c for c in columns if schema.names.count(c) > 1})
    if twice:
        raise DataError(f"{path}: the Parquet file holds columns {twice} more than once; expected each column the "
                        f"features read once (select the columns before writing the file)")
    types = {c: schema.field(c).type for c in columns}
    readable = {c: _to_string(t.value_type) if _is_list(t) and c in bags else _to_string(t) for c, t in types.items()}
    unreadable = [f"column {c!r} has type {t}" for c, t in types.items() if not readable[c]]
    if unreadable:
        lists = any(_is_list(t) and c not in bags for c, t in types.items())
        hint = (" (a list column is read as bags, where every feature that reads it is a sparse feature with the "
                "same separator: a feature of one id a row, a cross, a bucketed or dense feature or a label reads "
                "strings or numbers)") if lists else ""
        raise DataError(f"{path}: {'; '.join(unreadable)}; expected strings or numbers, or lists of them for "
                        f"bags{hint}")
    return source


def _starts_with(path: str, signature: bytes) -> bool:
    with contextlib.suppress(OSError), open(path, "rb") as file:
        return file.read(len(signature)) == signature
    return False


def _to_string(kind: pa.DataType) -> bool:
    """Whether pyarrow casts `kind` to strings (not lists, structs or maps)."""
    try:
        pc.cast(pa.nulls(0, kind), options=_TO_STRING)
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
        return False
    return True


def _valid_rows(batch: pa.RecordBatch, path: str, lines: np.ndarray, checks: Mapping[str, _Check], report: BadRows,
                on_bad_row: str, dropped: list[tuple[int, str]]) -> pa.RecordBatch:
    """`batch` without the rows whose checked fields do not hold what they must. Those
    and the rows `dropped` among them are reported in line order, or, in fail mode,
    the first of them stops the run."""
    bad: dict[int, str] = {}  # row -> why (its first bad column)
    for name, kind in checks.items():
        for row, reason in _refused(name, kind, batch.column(name)):
            bad.setdefault(row, reason)
    found = sorted([(int(lines[row]), why) for row, why in bad.items()] + dropped)
    report.read += batch.num_rows + len(dropped)
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


def _shown(value: str) -> str:
    """A field's value as a bad row's reason shows it."""
    return repr(value) if value else "a missing value (an empty field, or null)"


def _refused(name: str, kind: _Check, column: pa.Array) -> Iterator[tuple[int, str]]:
    """Each row of column `name` that does not hold what `kind` asks for, and why."""
    if isinstance(kind, Bags):  # any text splits into values
        return
    if isinstance(kind, WeightedBags):
        rows, values = kind.refused(column)
        for row, value in zip(rows.tolist(), values):
            yield row, f"column {name!r}: {kind.problem(value)}; expected {kind.expected}"
        return
    for row in np.flatnonzero(~_fine(column, kind).to_numpy(zero_copy_only=False)):
        value = column[row].as_py()
        beyond = _BEYOND_INT64 if kind == "integer" and re.fullmatch(INTEGER_PATTERN, value) else ""
        yield int(row), f"column {name!r}: expected {_EXPECTED[kind]}, got {_shown(value)}{beyond}"


def _fine(column: pa.Array, kind: str) -> pa.Array:
    """Which fields of `column` hold what `kind` asks for."""
    fine = pc.match_substring_regex(column, _PATTERNS[kind])
    if kind == "integer" and len(column) and pc.max(pc.utf8_length(column)).as_py() >= 19:
        fine = pc.and_(fine, _within_int64(column))
    if kind == "number":  # written as a number, yet 1e999 reads as infinity and 1e39 overflows float32
        values = pc.cast(pc.if_else(fine, column, "0"), pa.float64())
        fine = pc.and_(fine, pc.or_(pc.less_equal(pc.abs(values), FLOAT32_MAX), pc.is_nan(values)))
    if kind != "label":
        fine = pc.or_(fine, pc.equal(pc.utf8_length(column), 0))
    return fine


def _within_int64(column: pa.Array) -> pa.Array:
    """Whether each integer of `column` (as the "integer" pattern has them) is within
    int64's range: its digits, leading zeros left out, compared as text with int64's
    bounds, since no number type holds every such integer."""
    digits = pc.replace_substring_regex(column, r"^-?0*", "")
    count = pc.utf8_length(digits)
    bound = pc.if_else(pc.starts_with(column, "-"), _INT64_MIN[1:], _INT64_MAX)
    return pc.or_(pc.less(count, 19), pc.and_(pc.equal(count, 19), pc.less_equal(digits, bound)))
