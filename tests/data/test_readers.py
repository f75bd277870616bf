"""Streaming readers: TSV, CSV and Parquet, with bad rows counted by file and line."""

from __future__ import annotations

import gzip
import re
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tidal.data import BadRows, generate, read_batches
from tidal.data import readers
from tidal.data.criteo import CRITEO_COLUMNS
from tidal.errors import DataError

SMALL = ["label", "I1", "C1"]
CHECKS = {"label": "label", "I1": "integer"}


def _write(path, text: str):
    path.write_text(text)
    return path


def test_generated_tsv_reads_in_batches_with_criteo_columns(tmp_path):
    data = generate(tmp_path, rows=2_500, files=2, seed=1)
    batches = list(read_batches(str(tmp_path / "*.tsv"), batch_rows=500))
    assert sum(b.num_rows for b in batches) == 2_500
    assert len(batches) > 2
    assert batches[0].schema.names == list(CRITEO_COLUMNS)
    assert all(t == pa.string() for t in batches[0].schema.types)
    assert data.paths == sorted(str(p) for p in tmp_path.glob("*.tsv"))


def test_parquet_and_tsv_of_one_seed_hold_the_same_rows(tmp_path):
    tsv = generate(tmp_path / "t", rows=300, seed=4)
    parquet = generate(tmp_path / "p", rows=300, seed=4, file_format="parquet")
    from_tsv = pa.Table.from_batches(list(read_batches(tsv.paths)))
    from_parquet = pa.Table.from_batches(list(read_batches(parquet.paths)))
    assert from_tsv.equals(from_parquet)
    assert tsv.ceiling_auc == parquet.ceiling_auc


def test_bad_rows_are_skipped_counted_and_located(tmp_path):
    path = _write(tmp_path / "d.tsv", "1\t5\ta\n0\tx\tb\n1\t2\n0\t\tc\n1\t3.5\td\n")
    report = BadRows()
    rows = pa.Table.from_batches(list(read_batches(path, columns=SMALL, checks=CHECKS, bad_rows=report)))
    assert rows.column("C1").to_pylist() == ["a", "c"]
    assert report.count == 3
    assert report.examples == [  # in line order, whatever the kind
        f"{path}:2: column 'I1': expected an integer (up to 18 digits) or nothing, got 'x'",
        f"{path}:3: expected 3 columns, found 2",
        f"{path}:5: column 'I1': expected an integer (up to 18 digits) or nothing, got '3.5'",
    ]
    assert "3 bad rows skipped" in report.summary()


@pytest.mark.parametrize("text, first", [
    ("1\t5\ta\n1\t2\n", "2: expected 3 columns, found 2"),
    ("1\t5\ta\n1\tx\tb\n" + "0\t1\tc\n" * 10 + "1\t2\n", "2: column 'I1': expected an integer"),  # width found first
    ("1\t5\ta\n1\t2\n" + "0\t1\tc\n" * 10 + "1\tx\tb\n", "2: expected 3 columns"),
    ("1\t5\ta\n0\t1\tc\n2\t1\tc\n1\tx\tb\n", "3: column 'label': expected 0 or 1"),  # checked before I1
    ("1\t5\ta\n" * 3 + "1\t1\n", "4: expected 3 columns"),  # after the last full row
])
def test_fail_mode_stops_at_the_first_bad_row_naming_it(tmp_path, text, first):
    path = _write(tmp_path / "d.tsv", text)
    with pytest.raises(DataError, match=rf"d\.tsv:{first}.*\(on_bad_row is 'fail'\)"):
        list(read_batches(path, columns=SMALL, checks=CHECKS, on_bad_row="fail"))


@pytest.mark.parametrize("bad", ["1\tx\tb\n", "1\t5\n", "1\t\xff\n"])  # \xff: not UTF-8 once written as Latin-1
def test_fail_mode_hands_out_no_row_from_the_bad_one_on(tmp_path, bad):
    path = tmp_path / "d.tsv"
    path.write_bytes(("1\t5\ta\n" * 70_000 + bad + "1\t5\ta\n" * 7).encode("latin-1"))  # several parser blocks
    handed = []
    with pytest.raises(DataError, match=r"d\.tsv:70001: .*\(on_bad_row is 'fail'\)$"):
        for batch in read_batches(path, columns=SMALL, checks=CHECKS, on_bad_row="fail", batch_rows=200):
            handed.append(batch.num_rows)
    assert 0 < sum(handed) <= 70_000


def test_numbers_beyond_float32_are_bad_rows_not_infinities(tmp_path):
    path = _write(tmp_path / "d.tsv", "".join(f"1\t{v}\t{k}\n" for k, v in
                                             enumerate(["3.4e38", "1e999", "-1e39", "3.5e38", "1e-999", "-2.5", ""])))
    report = BadRows()
    rows = pa.Table.from_batches(list(read_batches(path, columns=SMALL, checks={"I1": "number"}, bad_rows=report)))
    assert rows.column("C1").to_pylist() == ["0", "4", "5", "6"]
    assert report.count == 3 and report.examples[0] == (
        f"{path}:2: column 'I1': expected a number within float32's range (|x| < 3.4e38) or nothing, got '1e999'")


def test_csv_has_a_header_and_parquet_must_hold_every_column(tmp_path):
    csv = _write(tmp_path / "d.csv", "C1,label,I1\nz,1,7\n")
    assert pa.Table.from_batches(list(read_batches(csv, columns=SMALL, checks=CHECKS))).to_pylist() == [
        {"label": "1", "I1": "7", "C1": "z"}]
    pq.write_table(pa.table({"label": [1], "C1": ["a"]}), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"lacks columns \['I1'\]"):
        list(read_batches(tmp_path / "d.parquet", columns=SMALL))


@pytest.mark.parametrize(("paths", "message"), [
    ("nowhere/*.tsv", "no data file at nowhere/\\*.tsv"),
    ("missing.tsv", "no data file at missing.tsv"),
])
def test_missing_files_are_a_clear_error(paths, message):
    with pytest.raises(DataError, match=message):
        list(read_batches(paths))


def test_unknown_suffix_asks_for_a_format(tmp_path):
    path = _write(tmp_path / "d.dat", "1\n")
    with pytest.raises(DataError, match=r"cannot tell the format from the suffix '\.dat'"):
        list(read_batches(path))


def test_a_row_without_its_label_is_a_bad_row(tmp_path):
    path = _write(tmp_path / "d.tsv", "1\t5\ta\n\t6\tb\n")
    report = BadRows()
    rows = pa.Table.from_batches(list(read_batches(path, columns=SMALL, checks=CHECKS, bad_rows=report)))
    assert rows.num_rows == 1
    assert report.examples == [f"{path}:2: column 'label': expected 0 or 1, got ''"]


def test_tsv_quotes_are_plain_characters_and_blank_lines_keep_their_numbers(tmp_path):
    path = _write(tmp_path / "d.tsv", '1\t2\t"x\n\n\n0\tbad\ty\n1\t3\t"z"\n')
    report = BadRows()
    rows = pa.Table.from_batches(list(read_batches(path, columns=SMALL, checks=CHECKS, bad_rows=report)))
    assert rows.column("C1").to_pylist() == ['"x', '"z"']  # no quoting: nothing swallowed or stripped
    assert sorted(report.examples) == sorted([
        f"{path}:2: an empty line (every field empty)",
        f"{path}:3: an empty line (every field empty)",
        f"{path}:4: column 'I1': expected an integer (up to 18 digits) or nothing, got 'bad'",
    ])


def test_number_checks_accept_decimals_and_labels_must_be_zero_or_one(tmp_path):
    path = _write(tmp_path / "d.tsv", "1\t0.5\ta\n1\t1e3\tb\n2\t1\tc\n1\t99999999999999999999\td\n")
    report = BadRows()
    rows = pa.Table.from_batches(list(read_batches(path, columns=SMALL, checks={"label": "label", "I1": "number"},
                                                   bad_rows=report)))
    assert rows.column("C1").to_pylist() == ["a", "b", "d"]
    assert report.examples == [f"{path}:3: column 'label': expected 0 or 1, got '2'"]
    strict = BadRows()
    list(read_batches(path, columns=SMALL, checks={"I1": "integer"}, bad_rows=strict))
    assert strict.count == 3  # 0.5, 1e3 and the 20-digit id are not int64 integers


def test_batches_hold_exactly_batch_rows_across_files(tmp_path):
    generate(tmp_path, rows=2_500, files=3, seed=2)
    sizes = [b.num_rows for b in read_batches(str(tmp_path / "*.tsv"), batch_rows=600)]
    assert sizes == [600, 600, 600, 600, 100]


@pytest.mark.parametrize("kind", ["tsv", "csv"])
@pytest.mark.parametrize("batch_rows", [50, 65536])
def test_every_bad_row_is_located_across_parser_blocks(tmp_path, monkeypatch, kind, batch_rows):
    """40 bad rows of six kinds, some right after another, at random lines of a file
    the parser reads in several blocks: each reported at its own line, no good row lost."""
    monkeypatch.setattr(readers, "_MAX_EXAMPLES", 1_000)
    sep, header = ("\t", "") if kind == "tsv" else (",", "label,I1,C1\n")
    rng = np.random.default_rng(1)
    rows = [f"{k % 2}{sep}{k}{sep}c{k}" for k in range(20_000)]
    spoilers = [lambda k: f"1{sep}{k}", lambda k: f"0{sep}x{k}{sep}c{k}", lambda k: "", lambda k: f"2{sep}{k}{sep}c{k}",
                lambda k: f"1{sep}{k}{sep}\xff{k}", lambda k: f"0{sep}\xfe{k}"]  # not UTF-8 once written as Latin-1
    starts = rng.choice(np.arange(1, 19_990, 2), 20, replace=False)
    bad = sorted({int(k) for s in starts for k in (s, s + 1)})  # pairs: a bad row right after a bad row
    for n, k in enumerate(bad):
        rows[k] = spoilers[n % len(spoilers)](k)
    path = tmp_path / f"d.{kind}"
    path.write_bytes((header + "\n".join(rows) + "\n").encode("latin-1"))
    report = BadRows()
    read = pa.Table.from_batches(list(read_batches(path, columns=SMALL, checks=CHECKS, batch_rows=batch_rows,
                                                   bad_rows=report)))
    first_line = 2 if header else 1
    assert [int(e.removeprefix(f"{path}:").split(":")[0]) for e in report.examples] == [k + first_line for k in bad]
    assert report.count == len(bad) == 40 and sum("not UTF-8" in e for e in report.examples) == 12
    assert read.column("C1").to_pylist() == [f"c{k}" for k in range(20_000) if k not in set(bad)]


def test_parquet_rows_are_checked_and_located_by_row_number(tmp_path):
    path = tmp_path / "d.parquet"
    labels = ["1"] * 700
    labels[299], labels[599] = None, "2"
    ints = [str(k) for k in range(700)]
    ints[449] = "abc"
    pq.write_table(pa.table({"label": labels, "I1": ints, "C1": [f"c{k}" for k in range(700)]}), path)
    report = BadRows()
    read = pa.Table.from_batches(list(read_batches(path, columns=SMALL, checks=CHECKS, batch_rows=256, bad_rows=report)))
    assert read.num_rows == 697 and report.count == 3
    assert [e.removeprefix(f"{path}:").split(":")[0] for e in report.examples] == ["300", "450", "600"]


def test_criteo_columns_are_checked_by_default(tmp_path):
    data = generate(tmp_path, rows=50, seed=2)
    with open(data.paths[0], "a") as f:
        f.write("1\tx" + "\t1" * 12 + "\ta" * 26 + "\n")
    report = BadRows()
    assert sum(b.num_rows for b in read_batches(data.paths, bad_rows=report)) == 50
    assert report.count == 1 and "column 'I1': expected an integer" in report.examples[0]


def test_parquet_columns_of_lists_or_structs_are_a_clear_error(tmp_path):
    pq.write_table(pa.table({"label": ["1"], "I1": [[1, 2]], "C1": [{"a": 1}]}), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d\.parquet: column 'I1' has type list<.*>; column 'C1' has type struct<.*>; "
                                        r"expected strings or numbers"):
        list(read_batches(tmp_path / "d.parquet", columns=SMALL))


def test_parquet_binary_fields_that_are_not_utf8_are_bad_rows(tmp_path):
    pq.write_table(pa.table({"label": ["1", "0", "1"], "I1": ["1", "2", "3"], "C1": [b"a", b"\xff", b"c"]}),
                   tmp_path / "d.parquet")
    report = BadRows()
    rows = pa.Table.from_batches(list(read_batches(tmp_path / "d.parquet", columns=SMALL, bad_rows=report)))
    assert rows.column("C1").to_pylist() == ["a", "c"]
    assert report.examples == [f"{tmp_path / 'd.parquet'}:2: column 'C1': not UTF-8 text"]


@pytest.mark.parametrize("kind", ["tsv", "csv"])
def test_a_field_that_is_not_utf8_is_a_bad_row_not_a_failed_file(tmp_path, kind):
    sep, header = ("\t", b"") if kind == "tsv" else (",", b"label,I1,C1\n")
    path = tmp_path / f"d.{kind}"
    rows = [f"1{sep}{k}{sep}c{k}".encode() for k in range(5)]
    rows[0], rows[2] = f"1{sep}0{sep}é".encode(), f"1{sep}2{sep}".encode() + b"\xff\xfe"
    path.write_bytes(header + b"\n".join(rows) + b"\n")
    report = BadRows()
    rows = pa.Table.from_batches(list(read_batches(path, columns=SMALL, checks=CHECKS, bad_rows=report)))
    assert rows.column("C1").to_pylist() == ["é", "c1", "c3", "c4"]
    line = 3 + bool(header)
    assert report.examples == [f"{path}:{line}: column 'C1': not UTF-8 text"]
    with pytest.raises(DataError, match=rf"d\.{kind}:{line}: column 'C1': not UTF-8 text \(on_bad_row is 'fail'\)"):
        list(read_batches(path, columns=SMALL, checks=CHECKS, on_bad_row="fail"))


@pytest.mark.parametrize("name", ["d.tsv", "d.csv", "d.tsv.gz"])
def test_a_line_of_the_wrong_width_that_is_not_utf8_is_a_bad_row(tmp_path, monkeypatch, name):
    """pyarrow cannot hand such a line to the bad-row handler; it is skipped and reported
    all the same, as are the bad rows of every kind after it, and nothing is printed."""
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)  # what Python would print
    monkeypatch.setattr(readers, "_quiet_installed", False)  # so the reader's filter goes in front of it
    sep, header = (b",", b"label,I1,C1\n") if ".csv" in name else (b"\t", b"")
    rows = [b"1%s%d%sc%d" % (sep, k, sep, k) for k in range(8)]
    rows[0] = b"1" + sep + b"\xff\xfe"  # the wrong width, not UTF-8: the file's first row
    rows[3] = b"1" + sep + b"3" + sep + b"\xff"  # not UTF-8
    rows[4] = b"1" + sep + b"4"  # the wrong width
    rows[6] = b"0\xff"  # the wrong width, not UTF-8
    data = header + b"\n".join(rows) + b"\n"
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    report = BadRows()
    read = pa.Table.from_batches(list(read_batches(path, columns=SMALL, checks=CHECKS, bad_rows=report)))
    assert read.column("C1").to_pylist() == ["c1", "c2", "c5", "c7"]
    line = [k + 1 + bool(header) for k in range(8)]
    assert report.examples == [
        f"{path}:{line[0]}: expected 3 columns, found 2, in a line that is not UTF-8 text",
        f"{path}:{line[3]}: column 'C1': not UTF-8 text",
        f"{path}:{line[4]}: expected 3 columns, found 2",
        f"{path}:{line[6]}: expected 3 columns, found 1, in a line that is not UTF-8 text",
    ]
    assert read.num_rows + report.count == len(rows)
    with pytest.raises(DataError, match=rf"{re.escape(name)}:{line[0]}: expected 3 columns, found 2, in a line that is "
                                        r"not UTF-8 text \(on_bad_row is 'fail'\)$"):
        list(read_batches(path, columns=SMALL, checks=CHECKS, on_bad_row="fail"))
    assert unraisable == []


def test_gzip_content_needs_a_name_ending_in_gz(tmp_path):
    text = "1\t5\ta\n0\t6\tb\n"
    with gzip.open(tmp_path / "d.tsv", "wt") as f:
        f.write(text)
    with pytest.raises(DataError, match=r"d\.tsv: the file looks gzip-compressed .* name it d\.tsv\.gz"):
        list(read_batches(tmp_path / "d.tsv", columns=SMALL))
    (tmp_path / "d.tsv").rename(tmp_path / "d.tsv.gz")
    rows = pa.Table.from_batches(list(read_batches(tmp_path / "d.tsv.gz", columns=SMALL)))
    assert rows.column("C1").to_pylist() == ["a", "b"]


def test_a_line_longer_than_the_parser_block_is_named(tmp_path):
    path = _write(tmp_path / "d.tsv", "1\t5\ta\n" * 3 + "1\t5\t" + "x" * 300_000 + "\n" + "1\t5\ta\n" * 3)
    with pytest.raises(DataError, match=r"d\.tsv:4: the line is longer than the parser's block \(65536 bytes\)"):
        list(read_batches(path, columns=SMALL, batch_rows=10))


@pytest.mark.parametrize("name", ["d.tsv", "d.csv", "d.parquet"])
def test_an_empty_file_has_no_rows(tmp_path, name):
    (tmp_path / name).touch()
    report = BadRows()
    assert list(read_batches(tmp_path / name, columns=SMALL, bad_rows=report)) == []
    assert report.count == 0


def test_a_csv_header_naming_a_column_twice_is_an_error(tmp_path):
    path = _write(tmp_path / "d.csv", "label,I1,C1,I1,x,x\n1,2,a,3,4,5\n")
    with pytest.raises(DataError, match=r"d\.csv: the CSV header names columns \['I1'\] more than once"):
        list(read_batches(path, columns=SMALL))
    with pytest.raises(DataError, match=r"d\.csv: the CSV header lacks columns \['C2'\]"):
        list(read_batches(_write(path, "label,I1,C1\n1,2,a\n"), columns=[*SMALL, "C2"]))


def test_a_blank_line_is_reported_as_an_empty_line(tmp_path):
    path = _write(tmp_path / "d.tsv", "1\t5\ta\n\n1\t\t\n")
    report = BadRows()
    assert sum(b.num_rows for b in read_batches(path, columns=SMALL, bad_rows=report)) == 2
    assert report.examples == [f"{path}:2: an empty line (every field empty)"]
    with pytest.raises(DataError, match=r"d\.tsv:2: an empty line \(every field empty\) \(on_bad_row is 'fail'\)"):
        list(read_batches(path, columns=SMALL, on_bad_row="fail"))


@pytest.mark.parametrize("kind", ["tsv", "csv"])
def test_a_file_read_again_past_such_a_line_hands_on_each_row_once(tmp_path, kind):
    """The parser numbers rows, not physical lines: a quoted newline (CSV) or a bare
    carriage return (a line end to the parser) before the line must not shift the row
    the second read starts from. The line lies several parser blocks in."""
    sep = b"," if kind == "csv" else b"\t"
    rows = [b"%d%s%d%sc%d" % (k % 2, sep, k, sep, k) for k in range(40_000)]
    rows[5] = b'1,5,"c5\nmore"' if kind == "csv" else b"1\t5\tc5\rX"  # CSV: one row; TSV: "X" is a bad row
    rows[30_000] = b"1" + sep + b"\xff"
    path = tmp_path / f"d.{kind}"
    path.write_bytes((b"label,I1,C1\n" if kind == "csv" else b"") + b"\n".join(rows) + b"\n")
    report = BadRows()
    read = pa.Table.from_batches(list(read_batches(path, columns=SMALL, checks=CHECKS, bad_rows=report, batch_rows=50)))
    names = read.column("C1").to_pylist()
    expected = [f"c{k}" for k in range(40_000) if k != 30_000]
    expected[5] = "c5\nmore" if kind == "csv" else "c5"
    assert names == expected
    assert report.count == (1 if kind == "csv" else 2)


@pytest.mark.parametrize(("options", "message"), [
    ({"file_format": "TSV"}, r"file_format must be one of \['tsv', 'csv', 'parquet'\] .*; got 'TSV'"),
    ({"file_format": "json"}, r"file_format must be one of \['tsv', 'csv', 'parquet'\] .*; got 'json'"),
    ({"batch_rows": 0}, "batch_rows must be an integer >= 1, got 0"),
    ({"batch_rows": -1}, "batch_rows must be an integer >= 1, got -1"),
    ({"batch_rows": 2.5}, "batch_rows must be an integer >= 1, got 2.5"),
    ({"columns": ["label", "label"], "checks": {}}, r"columns must name each column once, got \['label'\]"),
    ({"columns": "la", "checks": {}}, r"columns must be a list of column names, got 'la'; write \['la'\]"),
    ({"columns": [], "checks": {}}, r"columns must be a non-empty list of names \(strings\), got \[\]"),
    ({"columns": ["label", 1], "checks": {}}, r"columns must be a non-empty list of names \(strings\)"),
])
def test_read_options_that_would_be_misread_are_refused(tmp_path, options, message):
    path = _write(tmp_path / "d.tsv", "1\t5\ta\n0\t6\tb\n")
    with pytest.raises(DataError, match=message):
        list(read_batches(path, **{"columns": SMALL, **options}))


def test_read_options_given_as_documented_are_read(tmp_path):
    path = _write(tmp_path / "d.txt", "1\t5\ta\n0\t6\tb\n")
    rows = [b.num_rows for b in read_batches(path, columns=tuple(SMALL), file_format="tsv", batch_rows=np.int64(1))]
    assert rows == [1, 1]
