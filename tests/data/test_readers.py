"""Streaming readers: TSV, CSV and Parquet, with bad rows counted by file and line."""

from __future__ import annotations

import csv
import gzip
import re
import sys
import threading
from glob import escape as glob_escape

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from tidal.config import DenseFeature, LabelFeature, SparseFeature
from tidal.data import BadRows, Extractor, generate, read_batches
from tidal.data import readers
from tidal.data.readers import Bags
from tidal.data.criteo import CRITEO_COLUMNS
from tidal.errors import DataError, DataPathError

SMALL = ["label", "I1", "C1"]
CHECKS = {"label": "label", "I1": "integer"}
INT64 = "an integer within int64's range (-9223372036854775808 to 9223372036854775807) or nothing"


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
        f"{path}:2: column 'I1': expected {INT64}, got 'x'",
        f"{path}:3: expected 3 columns, found 2",
        f"{path}:5: column 'I1': expected {INT64}, got '3.5'",
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
def test_fail_mode_hands_out_no_row_from_the_bad_one_on(tmp_path, monkeypatch, bad):
    monkeypatch.setattr(readers, "_PIECE_BYTES", 1 << 16)  # read in several pieces
    path = tmp_path / "d.tsv"
    path.write_bytes(("1\t5\ta\n" * 70_000 + bad + "1\t5\ta\n" * 7).encode("latin-1"))  # several parser blocks
    handed = []
    with pytest.raises(DataError, match=r"d\.tsv:70001: .*\(on_bad_row is 'fail'\)$"):
        for batch in read_batches(path, columns=SMALL, checks=CHECKS, on_bad_row="fail", batch_rows=200):
            handed.append(batch.num_rows)
    assert 0 < sum(handed) <= 70_000


def _every_other_bad(tmp_path, rows: int, name: str = "d.tsv"):  # type: ignore[no-untyped-def]
    """A file of `rows` rows, every other one of the wrong width (half bad)."""
    return _write(tmp_path / name, "".join("1\t5\ta\n" if k % 2 else "1\t5\n" for k in range(rows)))


def test_a_read_whose_every_row_is_bad_points_at_the_layout_not_at_skipping_them(tmp_path):
    """It said to raise data.max_bad_fraction to 1.0, which would skip every row, where the
    columns were given in another order than the files' (an audit's find)."""
    path = _write(tmp_path / "d.tsv", "a1\t1\t5\n" * 12_000)  # C1, label, I1: read as label, I1, C1
    with pytest.raises(DataError, match=r"were bad \(100\.0%\), .* Every row was bad, so the files' columns are "
                                        r"likely in another order than the layout given: give them in the files' order "
                                        r"\(data\.columns; read_batches: layout\), or fix the files$"):
        list(read_batches(path, columns=SMALL, checks=CHECKS))
    csv = _write(tmp_path / "d.csv", "label,I1,C1\n" + "x,1,a\n" * 12_000)  # by name: the layout is not the cause
    with pytest.raises(DataError, match=r"were bad \(100\.0%\), .* Fix the files, or raise data\.max_bad_fraction"):
        list(read_batches(csv, columns=SMALL, checks=CHECKS))
    assert sum(b.num_rows for b in read_batches(path, columns=SMALL, checks=CHECKS, layout=["C1", "label", "I1"])) \
        == 12_000


@pytest.mark.parametrize("batch_rows", [100, 65536])
def test_more_bad_rows_than_max_bad_fraction_stop_the_read_part_way_saying_why(tmp_path, monkeypatch, batch_rows):
    monkeypatch.setattr(readers, "_PIECE_BYTES", 1 << 14)  # 2,000-odd rows a piece
    path = _every_other_bad(tmp_path, 100_000)
    handed = []
    with pytest.raises(DataError, match=rf"^(\d|,)+ of the (\d|,)+ rows read of {path} were bad \(50\.0%\), more than "
                                        rf"the (\d|,)+ that max_bad_fraction 0\.1 allows: the files may not have the "
                                        rf"layout the run expects\. The first: {path}:1: expected 3 columns, found 2\. "
                                        rf"Fix the files, or raise data\.max_bad_fraction \(read_batches: "
                                        rf"max_bad_fraction; 1\.0 skips any number\)$"):
        for batch in read_batches(path, columns=SMALL, checks=CHECKS, batch_rows=batch_rows):
            handed.append(batch.num_rows)
    assert sum(handed) < 10_000  # stopped soon after 10,000 rows read, not at the end of the file


def test_bad_rows_within_max_bad_fraction_or_fewer_rows_than_judged_are_skipped(tmp_path):
    path = _every_other_bad(tmp_path, 30_000)
    report = BadRows()
    assert sum(b.num_rows for b in read_batches(path, columns=SMALL, checks=CHECKS, bad_rows=report,
                                                max_bad_fraction=0.5)) == 15_000
    assert (report.count, report.read) == (15_000, 30_000)
    small = _every_other_bad(tmp_path, readers.JUDGED_FROM - 2, "small.tsv")  # too few rows to judge a share by
    assert sum(b.num_rows for b in read_batches(small, columns=SMALL, checks=CHECKS)) == readers.JUDGED_FROM // 2 - 1
    with pytest.raises(DataError, match=r"^15,000 of the 30,000 rows read of .*d\.tsv were bad \(50\.0%\), more than "
                                        r"the 14,700 that max_bad_fraction 0\.49 allows"):
        list(read_batches(path, columns=SMALL, checks=CHECKS, max_bad_fraction=0.49))
    for wrong in (1.5, "0.1"):
        with pytest.raises(DataError, match=rf"max_bad_fraction must be a share of the rows read, from 0 to 1, got "
                                            rf"{re.escape(repr(wrong))}"):
            list(read_batches(path, columns=SMALL, checks=CHECKS, max_bad_fraction=wrong))
    with pytest.raises(DataError, match=r"bad_rows must be a BadRows to count the skipped rows in, got dict"):
        list(read_batches(path, columns=SMALL, checks=CHECKS, bad_rows={}))


def test_a_file_of_another_layout_among_good_ones_is_judged_by_its_own_share_of_bad_rows(tmp_path):
    good = _write(tmp_path / "a.tsv", "1\t5\n" * 25 + "1\t5\ta\n" * 200_000)  # its bad rows fill the examples
    commas = _write(tmp_path / "b.tsv", "1,5,a\n" * 12_000)  # 5.7% of all rows, every one of its own bad
    report = BadRows()
    with pytest.raises(DataError, match=rf"^12,000 of the 12,000 rows read of {commas} were bad \(100\.0%\), more "
                                        rf"than the 1,200 that max_bad_fraction 0\.1 allows: .* The first: {commas}:1: expected 3 "
                                        rf"columns, found 1\."):
        list(read_batches([good, commas], columns=SMALL, checks=CHECKS, bad_rows=report))
    assert (report.count, report.read) == (12_025, 212_025)  # all rows together are within the bound


def test_bad_rows_of_many_files_too_small_to_judge_alone_are_judged_together(tmp_path):
    paths = [_every_other_bad(tmp_path, 4_000, f"{k}.tsv") for k in range(4)]
    with pytest.raises(DataError, match=r"^6,000 of the 12,000 rows read were bad \(50\.0%\)"):
        list(read_batches(paths, columns=SMALL, checks=CHECKS))


def test_numbers_beyond_float32_are_bad_rows_not_infinities(tmp_path):
    path = _write(tmp_path / "d.tsv", "".join(f"1\t{v}\t{k}\n" for k, v in
                                             enumerate(["3.4e38", "1e999", "-1e39", "3.5e38", "1e-999", "-2.5", ""])))
    report = BadRows()
    rows = pa.Table.from_batches(list(read_batches(path, columns=SMALL, checks={"I1": "number"}, bad_rows=report)))
    assert rows.column("C1").to_pylist() == ["0", "4", "5", "6"]
    assert report.count == 3 and report.examples[0] == (
        f"{path}:2: column 'I1': expected a number within float32's range (|x| <= 3.4028235e38) or nothing, got '1e999'")


def test_csv_has_a_header_and_parquet_must_hold_every_column(tmp_path):
    csv = _write(tmp_path / "d.csv", "C1,label,I1\nz,1,7\n")
    assert pa.Table.from_batches(list(read_batches(csv, columns=SMALL, checks=CHECKS))).to_pylist() == [
        {"label": "1", "I1": "7", "C1": "z"}]
    pq.write_table(pa.table({"label": [1], "C1": ["a"]}), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"lacks columns \['I1'\]; it has 2 columns: \['label', 'C1'\]$"):
        list(read_batches(tmp_path / "d.parquet", columns=SMALL))


def test_a_wide_file_lacking_a_column_names_the_closest_and_not_all_of_its_columns(tmp_path):
    pq.write_table(pa.table({"label": [1], "I_1": [2], **{f"f{k}": [k] for k in range(500)}}), tmp_path / "d.parquet")
    with pytest.raises(DataError) as caught:
        list(read_batches(tmp_path / "d.parquet", columns=["label", "I1"], checks={}))
    message = str(caught.value)
    assert message.endswith("Parquet file lacks columns ['I1'] (did you mean 'I_1' for 'I1'?); it has 502 columns: "
                            "['label', 'I_1', 'f0', 'f1', 'f2', 'f3', 'f4', 'f5', 'f6', 'f7', 'f8', 'f9', 'f10', 'f11', "
                            "'f12', 'f13', 'f14', 'f15', 'f16', 'f17', '... 482 more']")


def test_a_csv_without_a_header_takes_its_columns_by_position(tmp_path):
    csv = _write(tmp_path / "d.csv", '1,7,"z,1"\n0,,y\n')
    rows = list(read_batches(csv, columns=["label", "I1", "C1"], checks=CHECKS, csv_header=False))
    assert pa.Table.from_batches(rows).to_pylist() == [{"label": "1", "I1": "7", "C1": "z,1"},
                                                      {"label": "0", "I1": "", "C1": "y"}]


@pytest.mark.parametrize(("paths", "message"), [
    ("nowhere/*.tsv", "no data file at nowhere/\\*.tsv"),
    ("missing.tsv", "no data file at missing.tsv"),
])
def test_missing_files_are_a_clear_error(paths, message):
    with pytest.raises(DataError, match=message):
        list(read_batches(paths))


def test_unknown_suffix_asks_for_a_format(tmp_path):
    path = _write(tmp_path / "d.dat", "1\n")
    with pytest.raises(DataError, match=r"cannot tell the format from the suffix '\.dat'.* name the format "
                                        r"\(data.format in a run config, file_format in read_batches\)"):
        list(read_batches(path))


def test_weighted_bag_values_without_a_weight_within_float32_are_bad_rows(tmp_path):
    values = ["a:0.5|b:2", "a:0.5|b", "a:x", "x:y:-1.5e3||", "", "a:1e39", ":2", "a:1|b:inf", "a:nan"]
    path = _write(tmp_path / "d.tsv", "".join(f"1\t{k}\t{v}\n" for k, v in enumerate(values)))
    report = BadRows()
    check = readers.WeightedBags("|", ":")
    rows = pa.Table.from_batches(list(read_batches(path, columns=SMALL, checks={"C1": check}, bad_rows=report)))
    assert rows.column("I1").to_pylist() == ["0", "3", "4"]
    expected = ("expected bag values split by '|', each an id, ':' and a weight within float32's range "
                "(|x| <= 3.4028235e38), or nothing")
    assert report.count == 6 and report.examples[:4] == [
        f"{path}:2: column 'C1': the value 'b' is not an id, ':' and a weight; {expected}",
        f"{path}:3: column 'C1': the value 'a:x' has a weight that is not a number; {expected}",
        f"{path}:6: column 'C1': the value 'a:1e39' has a weight beyond float32's range; {expected}",
        f"{path}:7: column 'C1': the value ':2' is not an id, ':' and a weight; {expected}",
    ]
    with pytest.raises(DataError, match=r"d\.tsv:2: column 'C1': the value 'b' .* \(on_bad_row is 'fail'\)"):
        list(read_batches(path, columns=SMALL, checks={"C1": check}, on_bad_row="fail"))
    rows, first = check.refused(pa.array(["a:1", "b|c:x", None, "d:1|e:f|g"]))  # each row's first refused value
    assert rows.tolist() == [1, 3] and first == ["b", "e:f"]
    ids, weights = readers.weighted_values(pa.array([None, "a:1"]), ":")
    assert ids.to_pylist() == ["", "a"] and weights.tolist() == [1.0, 1.0]  # a null is an empty value
    quoted = _write(tmp_path / "d.csv", 'label,I1,C1\n1,0,"line\nbreak:0.5|b:2"\n')  # an id may span lines
    assert pa.Table.from_batches(list(read_batches(quoted, columns=SMALL, checks={"C1": check}))).num_rows == 1
    for separators in (("|", ""), ("|", "|"), (".", ":"), ("|", "1")):
        with pytest.raises(DataError, match=r"WeightedBags: .*separator"):
            readers.WeightedBags(*separators)


def test_a_row_without_its_label_is_a_bad_row(tmp_path):
    path = _write(tmp_path / "d.tsv", "1\t5\ta\n\t6\tb\n")
    report = BadRows()
    rows = pa.Table.from_batches(list(read_batches(path, columns=SMALL, checks=CHECKS, bad_rows=report)))
    assert rows.num_rows == 1
    assert report.examples == [f"{path}:2: column 'label': expected 0 or 1 (or 0.0 or 1.0), got a missing value (an empty field, or null)"]


def test_tsv_quotes_are_plain_characters_and_blank_lines_keep_their_numbers(tmp_path):
    path = _write(tmp_path / "d.tsv", '1\t2\t"x\n\n\n0\tbad\ty\n1\t3\t"z"\n')
    report = BadRows()
    rows = pa.Table.from_batches(list(read_batches(path, columns=SMALL, checks=CHECKS, bad_rows=report)))
    assert rows.column("C1").to_pylist() == ['"x', '"z"']  # no quoting: nothing swallowed or stripped
    assert sorted(report.examples) == sorted([
        f"{path}:2: an empty line",
        f"{path}:3: an empty line",
        f"{path}:4: column 'I1': expected {INT64}, got 'bad'",
    ])


def test_number_checks_accept_decimals_and_labels_must_be_zero_or_one(tmp_path):
    path = _write(tmp_path / "d.tsv", "1\t0.5\ta\n1.0\t1e3\tb\n2\t1\tc\n0.\t99999999999999999999\td\n0.5\t1\te\n")
    report = BadRows()
    rows = pa.Table.from_batches(list(read_batches(path, columns=SMALL, checks={"label": "label", "I1": "number"},
                                                   bad_rows=report)))
    assert rows.column("C1").to_pylist() == ["a", "b", "d"]  # 1.0 and 0. as a float column's text has them
    assert report.examples == [f"{path}:3: column 'label': expected 0 or 1 (or 0.0 or 1.0), got '2'",
                               f"{path}:5: column 'label': expected 0 or 1 (or 0.0 or 1.0), got '0.5'"]
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
    read in several pieces: each reported at its own line, no good row lost."""
    monkeypatch.setattr(readers, "_MAX_EXAMPLES", 1_000)
    monkeypatch.setattr(readers, "_PIECE_BYTES", 1 << 12)
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


def test_a_parquet_nan_is_a_missing_value_as_a_null_is_and_as_the_server_reads_it(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"label": [1, 0], "I1": pa.array([float("nan"), 2.5], pa.float32()), "C1": ["a", "b"]}),
                   path)
    report = BadRows()
    read = pa.Table.from_batches(list(read_batches(path, columns=SMALL, checks={"I1": "number"}, bad_rows=report)))
    assert read.column("I1").to_pylist() == ["", "2.5"] and report.count == 0


def test_whole_numbers_of_a_parquet_float_column_read_as_the_integers_they_are(tmp_path):
    """As pandas writes an integer id column with nulls: a double 947926754721.0 is the
    id 947926754721, as an int64 file and a request send it (not "9.47926754721e+11")."""
    doubles, ints = tmp_path / "doubles.parquet", tmp_path / "ints.parquet"
    pq.write_table(pa.table({"label": [1, 0, 1], "I1": pa.array([2.5, 1e20, 16777216.0], pa.float32()),
                             "C1": [947926754721.0, None, 1.5]}), doubles)
    pq.write_table(pa.table({"label": [1], "I1": [3], "C1": [947926754721]}), ints)
    read = pa.Table.from_batches(list(read_batches([doubles, ints], columns=SMALL, checks={})))
    assert read.column("C1").to_pylist() == ["947926754721", "", "1.5", "947926754721"]
    assert read.column("I1").to_pylist() == ["2.5", "1e+20", "16777216", "3"]  # numbers read as before


def test_criteo_columns_are_checked_by_default(tmp_path):
    data = generate(tmp_path, rows=50, seed=2)
    with open(data.paths[0], "a") as f:
        f.write("1\tx" + "\t1" * 12 + "\ta" * 26 + "\n")
    report = BadRows()
    assert sum(b.num_rows for b in read_batches(data.paths, bad_rows=report)) == 50
    assert report.count == 1 and "column 'I1': expected an integer" in report.examples[0]


def test_parquet_columns_of_lists_not_read_as_bags_or_of_structs_are_a_clear_error(tmp_path):
    pq.write_table(pa.table({"label": ["1"], "I1": [[1, 2]], "C1": [{"a": 1}]}), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d\.parquet: column 'I1' has type list<.*>; column 'C1' has type struct<.*>; "
                                        r"expected strings or numbers, or lists of them for bags \(a list column is "
                                        r"read as bags, where every feature that reads it is a sparse feature "):
        list(read_batches(tmp_path / "d.parquet", columns=SMALL))
    pq.write_table(pa.table({"label": ["1"], "I1": ["1"], "C1": [[{"a": 1}]]}), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"column 'C1' has type list<element: struct<a: int64>>; expected strings or "
                                        r"numbers, or lists of them for bags$"):
        list(read_batches(tmp_path / "d.parquet", columns=SMALL, checks={"C1": Bags("|")}))


def test_parquet_list_columns_read_as_bags_are_their_values_joined(tmp_path):
    """As Spark and pandas write multi-valued features: nulls (of a list or a value) and
    empty lists are empty bags or values, whole doubles integers; a value holding the
    separator is a bad row, reported by its row."""
    pq.write_table(pa.table({
        "label": [1, 0, 1, 0, 1],
        "I1": pa.array([[1, 2, 3], None, [], [4, None, 5], [6]], pa.list_(pa.int64())),
        "C1": pa.array([["a", "b"], ["c|d"], None, ["e"], []], pa.list_(pa.string())),
        "C2": pa.array([[1.0, 2.5], [3.0], [], None, [7.0]], pa.large_list(pa.float64()))}), tmp_path / "d.parquet")
    report = BadRows()
    read = pa.Table.from_batches(list(read_batches(tmp_path / "d.parquet", columns=["label", "I1", "C1", "C2"],
                                                   checks={"I1": Bags("|"), "C1": Bags("|"), "C2": Bags(",")},
                                                   bad_rows=report)))
    assert read.to_pydict() == {"label": ["1", "1", "0", "1"], "I1": ["1|2|3", "", "4||5", "6"],
                                "C1": ["a|b", "", "e", ""], "C2": ["1,2.5", "", "", "7"]}
    assert report.examples == [f"{tmp_path / 'd.parquet'}:2: column 'C1': a value of its list holds the bags' "
                               f"separator '|'"]


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


@pytest.mark.parametrize("header", [True, False], ids=["csv", "headerless csv"])
def test_only_the_columns_read_of_a_layout_are_parsed_and_checked(tmp_path, header):
    """A byte that is not UTF-8 in a column no feature reads costs no row, whatever the
    format (a Parquet file or a CSV file with a header reads only those columns too)."""
    for kind, sep in (("tsv", "\t"), ("csv", ",")):
        path = tmp_path / f"d.{kind}"
        rows = [f"1{sep}{k}{sep}c{k}{sep}note".encode() for k in range(4)]
        rows[1] = rows[1].replace(b"note", b"caf\xe9")
        path.write_bytes(f"label{sep}I1{sep}C1{sep}note\n".encode() * (kind == "csv" and header) + b"\n".join(rows))
        report, layout = BadRows(), [*SMALL, "note"]
        read = pa.Table.from_batches(list(read_batches(path, columns=SMALL, layout=layout, checks=CHECKS,
                                                       bad_rows=report, csv_header=header)))
        assert read.column_names == SMALL and read.column("I1").to_pylist() == ["0", "1", "2", "3"]
        assert report.count == 0
        readers.check_layout([str(path)], SMALL, csv_header=header, layout=layout)
    with pytest.raises(DataError, match=r"columns \['C2'\] are not in the layout \['label', 'I1', 'C1', 'note'\]"):
        list(read_batches(path, columns=[*SMALL, "C2"], layout=layout))
    with pytest.raises(DataError, match=r"its first 4 records have 4 fields .*expected 3, the columns label, I1, C1"):
        readers.check_layout([str(tmp_path / "d.tsv")], SMALL, layout=SMALL)


@pytest.mark.parametrize("name", ["d.tsv", "d.csv", "d.tsv.gz"])
def test_a_line_of_the_wrong_width_that_is_not_utf8_is_a_bad_row(tmp_path, monkeypatch, name):
    """pyarrow cannot hand such a line to the bad-row handler; it is skipped and reported
    all the same, as are the bad rows of every kind after it, and nothing is printed."""
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)  # what Python would print
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
    _write(tmp_path / "plain.tsv.gz", text)
    with pytest.raises(DataError, match=r"plain\.tsv\.gz: the name ends in \.gz but the file is not gzip-compressed "
                                        r"\(it starts with bytes 31 09 35 09, not 1f 8b\); name it plain\.tsv, or gzip it"):
        list(read_batches(tmp_path / "plain.tsv.gz", columns=SMALL))


def test_a_parquet_file_with_a_damaged_page_is_refused_naming_it(tmp_path):
    """Its footer reads, so the checks at start pass; the page fails as it is read."""
    path = tmp_path / "d.parquet"
    rows = 4000
    pq.write_table(pa.table({"label": np.arange(rows) % 2, "I1": np.arange(rows), "C1": [f"id{k}" for k in range(rows)]}),
                   path, row_group_size=1000, compression="none", use_dictionary=False)
    page = pq.ParquetFile(path).metadata.row_group(2).column(2).data_page_offset
    damaged = bytearray(path.read_bytes())
    damaged[page + 200 : page + 260] = bytes((b * 7 + 13) % 256 for b in damaged[page + 200 : page + 260])
    path.write_bytes(bytes(damaged))
    with pytest.raises(DataError, match=rf"{re.escape(str(path))}: cannot read it \(.+\)"):
        list(read_batches(path, columns=SMALL, checks=CHECKS, batch_rows=500))


@pytest.mark.parametrize("paths", [None, 5, [None], ["a.tsv", 3]])
def test_paths_of_another_type_are_refused_by_what_came(paths):
    with pytest.raises(DataPathError, match=rf"^expected a file name, a glob or a list of them \(str or path\), got "
                                            rf"{re.escape(repr(paths))}$"):
        list(read_batches(paths, columns=SMALL))


def test_a_file_whose_name_holds_glob_characters_is_read_by_that_name_or_an_escaped_glob(tmp_path):
    folder = tmp_path / "run[2024]"
    folder.mkdir()
    path = _write(folder / "day[1].tsv", "1\t5\ta\n")
    assert readers.expand_paths(str(path)) == [str(path)]
    assert readers.expand_paths(glob_escape(str(folder)) + "/*.tsv") == [str(path)]
    rows = pa.Table.from_batches(list(read_batches(readers.expand_paths(glob_escape(str(path))), columns=SMALL)))
    assert rows.column("C1").to_pylist() == ["a"]


def test_a_headless_csv_read_as_having_a_header_is_told_how_to_read_it(tmp_path):
    csv = _write(tmp_path / "d.csv", "1,7,z\n0,3,y\n")
    with pytest.raises(DataError, match=r"lacks columns .*; if that first line is a record, not column names, the "
                                        r"files have no header line: set data\.csv_header: false"):
        list(read_batches(csv, columns=SMALL, checks=CHECKS))


def test_a_line_longer_than_a_piece_is_read_whatever_the_batch_size(tmp_path, monkeypatch):
    """A piece of text grows to hold a long line (the audit's: a 488 KB field with
    batch_rows 1024, once refused as longer than the parser's block)."""
    monkeypatch.setattr(readers, "_PIECE_BYTES", 1 << 12)
    long = "|".join(f"item{k}" for k in range(5_000))  # 8 pieces long
    path = _write(tmp_path / "d.tsv", "1\t5\ta\n" * 3 + f"1\t5\t{long}\n" + "1\tx\ta\n" + "0\t6\tb\n" * 600)
    report = BadRows()
    read = pa.Table.from_batches(list(read_batches(path, columns=SMALL, checks=CHECKS, batch_rows=10, bad_rows=report)))
    assert read.column("C1").to_pylist() == ["a"] * 3 + [long] + ["b"] * 600
    assert report.examples == [f"{path}:5: column 'I1': expected {INT64}, got 'x'"]


@pytest.mark.parametrize("name", ["d.tsv", "d.csv"])
def test_an_empty_file_has_no_rows(tmp_path, name):
    (tmp_path / name).touch()
    report = BadRows()
    assert list(read_batches(tmp_path / name, columns=SMALL, bad_rows=report)) == []
    assert report.count == 0 and report.empty_files == [str(tmp_path / name)]


def test_files_without_rows_are_named_in_the_report_once_per_file(tmp_path):
    empty, header = (tmp_path / "a.tsv"), _write(tmp_path / "b.csv", "label,I1,C1\n")
    full = _write(tmp_path / "c.tsv", "1\t5\ta\n")
    empty.touch()
    report = BadRows()
    for _ in range(2):  # a second epoch over the same files names none again
        list(read_batches([empty, header, full], columns=SMALL, bad_rows=report))
    assert report.empty_files == [str(empty), str(header)]
    assert report.none_valid() == f"{empty}, {header} hold no rows"
    report.add("c.tsv", 1, "bad")
    assert report.none_valid() == f"{empty}, {header} hold no rows; 1 bad row skipped:\n  c.tsv:1: bad"
    assert BadRows().none_valid() == "no bad rows"


def test_an_empty_parquet_file_is_refused_as_unreadable(tmp_path):
    (tmp_path / "d.parquet").touch()
    with pytest.raises(DataError, match=r"d\.parquet: not a readable Parquet file \(.*0 bytes\); write it again"):
        list(read_batches(tmp_path / "d.parquet", columns=SMALL))


def test_files_changed_since_the_sizes_recorded_are_refused_at_their_turn(tmp_path):
    """An audit's find: a file emptied while a run trained was trained as empty, silently."""
    first, second = _write(tmp_path / "a.tsv", "1\t5\tx\n" * 10), _write(tmp_path / "b.tsv", "0\t6\ty\n" * 10)
    sizes = {str(p): p.stat().st_size for p in (first, second)}
    batches = read_batches(str(tmp_path / "*.tsv"), columns=SMALL, checks=CHECKS, batch_rows=10, sizes=sizes)
    assert next(batches).num_rows == 10
    second.write_text("0\t6\ty\n" * 3)  # cut short before its turn
    with pytest.raises(DataError, match=rf"^{second}: holds 18 bytes, but 60 when the run began: it changed while "
                                        rf"the run trained"):
        next(batches)
    second.write_text("0\t6\ty\n" * 11)  # grown
    with pytest.raises(DataError, match=r"holds 66 bytes, but 60 when the run began"):
        list(read_batches(str(second), columns=SMALL, checks=CHECKS, sizes={str(second): 60}))
    third = _write(tmp_path / "c.tsv", "1\t5\tx\n")
    with pytest.raises(DataError, match=rf"the training files changed while the run trained \({third} appeared\)"):
        list(read_batches(str(tmp_path / "*.tsv"), columns=SMALL, checks=CHECKS, sizes=sizes))
    third.unlink()
    first.unlink()
    with pytest.raises(DataError, match=rf"the training files changed while the run trained \({first} is gone\)"):
        list(read_batches(str(tmp_path / "*.tsv"), columns=SMALL, checks=CHECKS, sizes=sizes))


def test_a_tab_separated_file_read_as_csv_is_named_so(tmp_path):
    tabs = _write(tmp_path / "d.csv", "label\tI1\tC1\n1\t2\ta\n")
    with pytest.raises(DataError, match=r"d\.csv: its first line holds tabs and no commas: a tab-separated file, read "
                                        r"as CSV; read it as TSV \(format: tsv\)$"):
        readers.check_layout([str(tabs)], SMALL)


def test_layouts_are_checked_before_a_row_is_read_where_a_file_names_its_columns(tmp_path):
    csv = _write(tmp_path / "d.csv", "label,I1,C1\n1,2,a\n")
    tsv, empty = _write(tmp_path / "d.tsv", "1\t2\ta\n"), _write(tmp_path / "e.csv", "")
    readers.check_layout([str(csv), str(tsv), str(empty)], SMALL)
    with pytest.raises(DataError, match=r"d\.csv: the CSV header lacks columns \['C2'\]"):
        readers.check_layout([str(csv)], [*SMALL, "C2"])
    readers.check_layout([str(csv)], ["x", "y", "z"], csv_header=False)  # then its first line is a row
    with pytest.raises(DataError, match=r"gone\.tsv: cannot read it \(No such file or directory\)"):
        readers.check_layout([str(tmp_path / "gone.tsv")], SMALL)  # removed since it was found


_BY_POSITION = r"by position \(data\.columns in a run config, or Criteo's layout when not set\)"


@pytest.mark.parametrize("name", ["d.tsv", "d.tsv.gz"])
def test_a_tsv_file_of_another_width_is_refused_before_a_row_is_read(tmp_path, name):
    text = b"1\t2\n" * 30
    (tmp_path / name).write_bytes(gzip.compress(text) if name.endswith(".gz") else text)
    with pytest.raises(DataError, match=rf"{re.escape(name)}: its first 20 records have 2 fields \(tab-separated\), "
                                        rf"expected 3, the columns label, I1, C1 {_BY_POSITION}"):
        readers.check_layout([str(_write(tmp_path / "good.tsv", "1\t2\ta\n")), str(tmp_path / name)], SMALL)


def test_criteo_rows_without_their_label_are_refused_before_a_row_is_read(tmp_path):
    path = _write(tmp_path / "x.tsv", ("\t".join("7" * 39) + "\n\n") * 25)  # empty lines passed over
    with pytest.raises(DataError, match=r"x\.tsv: its first 20 records have 39 fields \(tab-separated\), expected 40, "
                                        r"the columns label, I1, I2, \.\.\., C26 by position"):
        readers.check_layout([str(path)], CRITEO_COLUMNS)


def test_a_csv_file_without_a_header_line_of_another_width_is_refused_before_a_row_is_read(tmp_path):
    path = _write(tmp_path / "d.csv", '1,"a,b\nc"\n\n0,"x,y"\r\n1,2,3,4\n')  # quoted commas and line feeds are text
    with pytest.raises(DataError, match=r"d\.csv: its first 3 records have 2 or 4 fields \(comma-separated\), "
                                        r"expected 3, the columns label, I1, C1 by position"):
        readers.check_layout([str(path)], SMALL, csv_header=False)
    with pytest.raises(DataError, match=r"d\.csv: its first record has 2 fields \(comma-separated\), expected 3"):
        readers.check_layout([str(_write(path, '"1,2",3\n'))], SMALL, csv_header=False)
    readers.check_layout([str(_write(path, '1,"2,3\n",4\n'))], SMALL, csv_header=False)


def test_the_width_check_leaves_quote_errors_to_the_reader_which_names_them(tmp_path):
    unclosed = _write(tmp_path / "q.csv", '1,2,"a\n1,2,b\n')  # a quote never closed: the rest is one value
    readers.check_layout([str(unclosed)], SMALL, csv_header=False)
    with pytest.raises(DataError, match="q\\.csv:1: a quote opens a value that no quote closes"):
        list(read_batches(unclosed, columns=SMALL, on_bad_row="fail", csv_header=False))


def test_a_file_whose_first_records_are_not_all_of_another_width_passes_and_its_bad_rows_are_counted(tmp_path):
    path = _write(tmp_path / "d.tsv", "1\t2\n" + "1\t2\ta\n" * 3)
    readers.check_layout([str(path)], SMALL)
    report = BadRows()
    assert sum(b.num_rows for b in read_batches(path, columns=SMALL, bad_rows=report)) == 3
    assert report.examples == [f"{path}:1: expected 3 columns, found 2"]
    readers.check_layout([str(_write(tmp_path / "blank.tsv", "\n\r\n" * 5))], SMALL)  # no record: left to the read
    only_first_20 = _write(tmp_path / "late.tsv", "1\t2\n" * 10 + "1\t2\t3\t4\n" * 10 + "1\t2\ta\n")
    with pytest.raises(DataError, match=r"late\.tsv: its first 20 records have 2 or 4 fields"):
        readers.check_layout([str(only_first_20)], SMALL)
    wide = _write(tmp_path / "wide.tsv", "1\t2\n" + ("1\t" + "x" * 70_000 + "\n") * 3 + "1\t2\ta\n")
    readers.check_layout([str(wide)], SMALL)  # records longer than a piece read: the sample grows to hold them


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
    assert report.examples == [f"{path}:2: an empty line"]
    with pytest.raises(DataError, match=r"d\.tsv:2: an empty line \(on_bad_row is 'fail'\)"):
        list(read_batches(path, columns=SMALL, on_bad_row="fail"))


@pytest.mark.parametrize("kind", ["tsv", "csv"])
def test_rows_after_a_quoted_line_feed_or_a_carriage_return_keep_their_lines(tmp_path, monkeypatch, kind):
    """The parser numbers records, not physical lines: a quoted line feed (CSV, one row
    over two lines) or a bare carriage return (TSV, a line end to the parser, a bad row
    here) must not shift the rows after it, several pieces of text on."""
    monkeypatch.setattr(readers, "_PIECE_BYTES", 1 << 16)
    sep = b"," if kind == "csv" else b"\t"
    rows = [b"%d%s%d%sc%d" % (k % 2, sep, k, sep, k) for k in range(40_000)]
    rows[5] = b'1,5,"c5\nmore"' if kind == "csv" else b"1\t5\tc5\rX"  # CSV: one row; TSV: "X" is a bad row
    rows[30_000] = b"1" + sep + b"\xff"
    path = tmp_path / f"d.{kind}"
    path.write_bytes((b"label,I1,C1\n" if kind == "csv" else b"") + b"\n".join(rows) + b"\n")
    report = BadRows()
    read = pa.Table.from_batches(list(read_batches(path, columns=SMALL, checks=CHECKS, bad_rows=report, batch_rows=50)))
    names = read.column("C1").to_pylist()
    expected = [f"c{k}" for k in range(40_000) if k != 30_000 and (k != 5 or kind == "csv")]
    if kind == "csv":
        expected[5] = "c5\nmore"
    assert names == expected
    first = 2 if kind == "csv" else 1  # the line of rows[0]
    assert report.examples == ([f"{path}:{first + 5}: {readers._CR_INSIDE}"] if kind == "tsv" else []) + [
        f"{path}:{first + 30_000 + (kind == 'csv')}: expected 3 columns, found 2, in a line that is not UTF-8 text"]


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


def test_integer_checks_accept_every_int64_and_refuse_the_rest(tmp_path):
    """19-digit ids (int64 hashes of ids, say) are ids: from -2**63 to 2**63 - 1, leading
    zeros or not; one beyond either bound is a bad row, and an Extractor reading the
    rows with hashed: false gets every id exactly."""
    inside = ["-9223372036854775808", "9223372036854775807", "1234567890123456789", "0009223372036854775807", "-0", ""]
    outside = ["9223372036854775808", "-9223372036854775809", "10000000000000000000", "99999999999999999999"]
    path = _write(tmp_path / "d.tsv", "".join(f"1\t{v}\tc{k}\n" for k, v in enumerate(inside + outside)))
    report = BadRows()
    rows = pa.Table.from_batches(list(read_batches(path, columns=SMALL, checks=CHECKS, bad_rows=report)))
    assert rows.column("I1").to_pylist() == inside
    assert report.examples == [f"{path}:{k}: column 'I1': expected {INT64}, got {v!r}{readers._BEYOND_INT64}"
                               for k, v in enumerate(outside, len(inside) + 1)]
    ids = Extractor([SparseFeature(name="id", columns=["I1"], table="t", hashed=False)])(rows.to_batches()[0])
    assert ids.values.tolist() == [-2**63, 2**63 - 1, 1234567890123456789, 2**63 - 1, 0]


def test_int64_ids_stored_as_parquet_integers_are_read(tmp_path):
    ids = np.array([-2**63, 2**63 - 1, -7, 6_000_000_000_000_000_000], dtype=np.int64)
    pq.write_table(pa.table({"label": [1, 0, 1, 0], "uid": ids}), tmp_path / "d.parquet")
    extractor = Extractor([SparseFeature(name="uid", columns=["uid"], table="t", hashed=False),
                           LabelFeature(name="y", column="label")])
    report = BadRows()
    batches = list(read_batches(tmp_path / "d.parquet", columns=extractor.columns, checks=extractor.checks,
                                bad_rows=report))
    assert report.count == 0 and extractor(batches[0]).values.tolist() == ids.tolist()


@pytest.mark.parametrize("end", ["\n", "\r\n"])
def test_a_carriage_return_inside_a_line_makes_it_a_bad_row(tmp_path, monkeypatch, end):
    """Lines end at \\n or \\r\\n, as `wc -l`, `sed -n Np` and editors count them. A bare
    \\r is no line end (pyarrow's parser would split the line there and shift every
    line number after it): the line holding it is one bad row, also when it is not
    UTF-8 text and of the wrong width (which once crashed the fallback re-read)."""
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    lines = [b"1\t5\tab\r0\t6\tcd", b"1\t7\tef", b"x\ry\rz\xff", b"1\tx\tgh", b"0\t8\tij\r"]
    path = tmp_path / "d.tsv"
    path.write_bytes(end.encode().join(lines) + end.encode())
    report = BadRows()
    rows = pa.Table.from_batches(list(read_batches(path, columns=SMALL, checks=CHECKS, bad_rows=report)))
    assert rows.column("C1").to_pylist() == ["ef"] + (["ij"] if end == "\n" else [])  # ij\r\n: a CRLF line end
    assert report.examples == [f"{path}:1: {readers._CR_INSIDE}", f"{path}:3: {readers._CR_INSIDE}",
                               f"{path}:4: column 'I1': expected {INT64}, got 'x'"] + (
        [f"{path}:5: {readers._CR_INSIDE}"] if end == "\r\n" else [])  # ij\r\r\n
    with pytest.raises(DataError, match=r"d\.tsv:1: a carriage return \(\\r\) inside the line; lines end at \\n or "
                                        r"\\r\\n \(on_bad_row is 'fail'\)"):
        list(read_batches(path, columns=SMALL, checks=CHECKS, on_bad_row="fail"))
    assert unraisable == []


def test_a_carriage_return_inside_a_quoted_csv_value_is_text(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b'label,I1,C1\r\n1,5,"a\rb"\r\n0,6,c\rd\r\n1,x,"e\r\nf"\r\n0,7,g\r\n')
    report = BadRows()
    rows = pa.Table.from_batches(list(read_batches(path, columns=SMALL, checks=CHECKS, bad_rows=report)))
    assert rows.column("C1").to_pylist() == ["a\rb", "g"]
    assert report.examples == [f"{path}:3: {readers._CR_INSIDE}", f"{path}:4: column 'I1': expected {INT64}, got 'x'"]


def test_pyarrow_reads_only_bytes_in_memory_and_calls_back_on_the_calling_thread(tmp_path, monkeypatch):
    """A Python stream handed to pyarrow (the fallback re-read of a file with a line
    that is not UTF-8 and of the wrong width) was read by pyarrow's own threads, and
    the process at times aborted at exit ("terminate called without an active
    exception"). pyarrow now parses bytes already read, in the calling thread."""
    sources, threads = [], set()
    read_csv = readers.pacsv.read_csv

    def spy(source, *, parse_options, **options):
        sources.append(source)
        handler = parse_options.invalid_row_handler
        if handler is not None:
            def on_thread(row):
                threads.add(threading.get_ident())
                return handler(row)
            parse_options.invalid_row_handler = on_thread
        return read_csv(source, parse_options=parse_options, **options)

    class Pacsv:
        def __getattr__(self, name):
            return spy if name == "read_csv" else getattr(pacsv, name)

    monkeypatch.setattr(readers, "pacsv", Pacsv())
    path = tmp_path / "d.tsv.gz"
    path.write_bytes(gzip.compress(b"1\t5\tab\n0\t6\tc\xffd\t9\n1\t7\n1\t8\tef\n"))
    report = BadRows()
    assert sum(b.num_rows for b in read_batches(path, columns=SMALL, checks=CHECKS, bad_rows=report)) == 2
    assert report.count == 2 and sources and all(isinstance(s, pa.BufferReader) for s in sources)
    assert threads == {threading.get_ident()}


@pytest.mark.parametrize("name", ["d.tsv.GZ", "d.TSV.Gz", "d.csv.GZ"])
def test_gzip_is_read_whatever_the_case_of_its_suffix(tmp_path, name):
    header = b"label,I1,C1\n" if ".csv" in name.lower() else b""
    sep = b"," if header else b"\t"
    (tmp_path / name).write_bytes(gzip.compress(header + b"".join(b"1%s%d%sc%d\n" % (sep, k, sep, k) for k in range(5))))
    report = BadRows()
    rows = pa.Table.from_batches(list(read_batches(tmp_path / name, columns=SMALL, checks=CHECKS, bad_rows=report)))
    assert rows.column("C1").to_pylist() == [f"c{k}" for k in range(5)] and report.count == 0


def test_csv_values_spanning_lines_are_read_and_rows_keep_their_physical_lines(tmp_path):
    """20,000 rows, each with a quoted value over two lines, across many pieces and
    batches (pyarrow's own chunker once lost track of them), and a bad row after such
    a value reported on its physical line, as `sed -n` would show it."""
    rows = [(str(k % 2), str(k), f"v{k}\nsecond line {k}") for k in range(20_000)]
    path = tmp_path / "d.csv"
    with open(path, "w", newline="") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(SMALL)
        writer.writerows(rows)
    report = BadRows()
    read = pa.Table.from_batches(list(read_batches(path, columns=SMALL, checks=CHECKS, batch_rows=100, bad_rows=report)))
    assert list(zip(*[read.column(c).to_pylist() for c in SMALL])) == rows and report.count == 0
    small = _write(tmp_path / "s.csv", 'label,I1,C1\n1,5,"a\nb"\n0,6,cd\n1,x,ef\n1,7,"\n\n"\n2,8,gh\n')
    list(read_batches(small, columns=SMALL, checks=CHECKS, bad_rows=report))
    assert report.examples == [f"{small}:5: column 'I1': expected {INT64}, got 'x'",
                               f"{small}:9: column 'label': expected 0 or 1 (or 0.0 or 1.0), got '2'"]


def test_a_csv_quote_that_is_never_closed_is_a_bad_row_not_the_rest_of_the_file(tmp_path, monkeypatch):
    """The line of the stray quote is the bad row, and those after it are read (two
    stray quotes pair up as one quoted value: CSV cannot tell them from one), however
    the file is cut into pieces."""
    path = _write(tmp_path / "d.csv", 'label,I1,C1\n1,5,ab\n1,6,"cd\n0,7,ef\n' + "0,9,h\n" * 2000)
    for piece_bytes in (1 << 22, 64):
        monkeypatch.setattr(readers, "_PIECE_BYTES", piece_bytes)
        report = BadRows()
        read = pa.Table.from_batches(list(read_batches(path, columns=SMALL, checks=CHECKS, bad_rows=report)))
        assert read.column("C1").to_pylist() == ["ab", "ef"] + ["h"] * 2000
        assert report.examples == [f"{path}:3: a quote opens a value that no quote closes"]
    last = _write(tmp_path / "e.csv", 'label,I1,C1\n1,5,ab\n1,6,"cd\n')  # on the last line
    assert sum(b.num_rows for b in read_batches(last, columns=SMALL, checks=CHECKS)) == 1


def test_a_stray_quote_that_nothing_closes_mid_file_is_cut_after_its_line(tmp_path, monkeypatch):
    """Not held to the end of the file: past `_STRAY_QUOTE_BYTES` of text no quote
    closed, the quote's line is the bad row and reading goes on."""
    monkeypatch.setattr(readers, "_STRAY_QUOTE_BYTES", 1 << 10)
    monkeypatch.setattr(readers, "_PIECE_BYTES", 256)
    lines = ["label,I1,C1", *(f"{k % 2},{k},id{k}" for k in range(3000))]
    lines[101] = '0,5,"idx'
    path = _write(tmp_path / "d.csv", "\n".join(lines) + "\n")
    report = BadRows()
    read = pa.Table.from_batches(list(read_batches(path, columns=SMALL, checks=CHECKS, bad_rows=report)))
    assert read.num_rows == 2999 and report.examples == [
        f"{path}:102: a quote opens a value that no quote closes"]


def test_a_value_spanning_lines_closed_by_a_quote_that_text_follows_reads_as_pyarrow_reads_it(tmp_path):
    path = _write(tmp_path / "d.csv", 'label,I1,C1\n1,5,"a\nb"x\n0,6,c\n1,7,"d"\n0,8,e\n')
    read = pa.Table.from_batches(list(read_batches(path, columns=SMALL, checks=CHECKS)))
    assert read.column("C1").to_pylist() == ["a\nbx", "c", "d", "e"]


def test_a_bad_record_spanning_lines_counts_each_line(tmp_path):
    """Every value quoted (pandas, Spark): one that lost its closing quote takes in the
    next line, and both lines count as bad rows."""
    lines = ['"label","I1","C1"', *(f'"{k % 2}","{k}","id{k}"' for k in range(50))]
    lines[11] = '"0","5","idx'
    path = _write(tmp_path / "d.csv", "\n".join(lines) + "\n")
    report = BadRows()
    assert sum(b.num_rows for b in read_batches(path, columns=SMALL, checks=CHECKS, bad_rows=report)) == 48
    assert report.examples == [
        f"{path}:12: expected 3 columns, found 5, in a record of lines 12 to 13 (does a quote open a value there that a "
        f"later one closes?)", f"{path}:13: inside the bad record that begins on line 12"]


def test_quotes_inside_unquoted_csv_values_are_text(tmp_path, monkeypatch):
    """A quote opens a value only at the start of a field (pyarrow's reading), so 5 "inch
    is text, and a quoted value after it still spans its lines, however the file is cut."""
    monkeypatch.setattr(readers, "_PIECE_BYTES", 8)
    path = _write(tmp_path / "d.csv", 'label,I1,C1\n1,5 "inch,"a\nb"\n0,6,c""d\n1,7,"e,""f"""\n')
    rows = pa.Table.from_batches(list(read_batches(path, columns=SMALL, checks={})))
    assert rows.to_pylist() == [{"label": "1", "I1": '5 "inch', "C1": "a\nb"}, {"label": "0", "I1": "6", "C1": 'c""d'},
                                {"label": "1", "I1": "7", "C1": 'e,"f"'}]


def test_a_blank_line_is_a_bad_row_even_when_no_column_is_checked(tmp_path):
    path = _write(tmp_path / "d.tsv", "u1\ti1\n\nu2\ti2\n\t\n\r\n")
    report = BadRows()
    rows = pa.Table.from_batches(list(read_batches(path, columns=["user", "item"], checks={}, bad_rows=report)))
    assert rows.to_pylist() == [{"user": "u1", "item": "i1"}, {"user": "u2", "item": "i2"}, {"user": "", "item": ""}]
    assert report.examples == [f"{path}:2: an empty line", f"{path}:5: an empty line"]


def test_parquet_string_fields_that_are_not_utf8_are_bad_rows(tmp_path):
    values = [b"ok", b"a\xffb", b"fine"]
    offsets = np.cumsum([0] + [len(v) for v in values]).astype(np.int32)
    unchecked = pa.Array.from_buffers(pa.string(), 3, [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(b"".join(values))])
    pq.write_table(pa.table({"label": [1, 0, 1], "I1": [1, 2, 3], "C1": unchecked}), tmp_path / "d.parquet")
    report = BadRows()
    rows = pa.Table.from_batches(list(read_batches(tmp_path / "d.parquet", columns=SMALL, bad_rows=report)))
    assert rows.column("C1").to_pylist() == ["ok", "fine"]
    assert report.examples == [f"{tmp_path / 'd.parquet'}:2: column 'C1': not UTF-8 text"]


def test_a_csv_of_just_a_header_has_no_rows_with_or_without_its_line_end(tmp_path):
    for k, text in enumerate(["label,I1,C1", "label,I1,C1\n", "label,I1,C1\r\n", "\ufefflabel,I1,C1"]):
        path = _write(tmp_path / f"d{k}.csv", text)
        report = BadRows()
        assert list(read_batches(path, columns=SMALL, bad_rows=report)) == [] and report.count == 0
    assert [b.num_rows for b in read_batches(_write(tmp_path / "e.csv", "label,I1,C1\n1,2,a"), columns=SMALL)] == [1]


def test_parquet_boolean_labels_read_as_1_and_0_and_a_null_one_is_named_missing(tmp_path):
    pq.write_table(pa.table({"clicked": [True, False, None, True], "C1": ["a", "b", "c", "d"]}), tmp_path / "d.parquet")
    extractor = Extractor([SparseFeature(name="C1", columns=["C1"], table="t"), LabelFeature(name="y", column="clicked")])
    report = BadRows()
    rows = pa.Table.from_batches(list(read_batches(tmp_path / "d.parquet", columns=extractor.columns,
                                                   checks=extractor.checks, bad_rows=report)))
    assert rows.column("clicked").to_pylist() == ["1", "0", "1"]
    assert extractor(rows.to_batches()[0]).labels.ravel().tolist() == [1.0, 0.0, 1.0]
    assert report.examples == [f"{tmp_path / 'd.parquet'}:3: column 'clicked': expected 0 or 1 (or 0.0 or 1.0), got a missing value "
                               f"(an empty field, or null)"]


def test_a_glob_passes_over_folders_and_spark_s_marker_files_and_a_folder_alone_is_named(tmp_path):
    (tmp_path / "old").mkdir()
    for name in ("a.tsv", "b.tsv"):
        _write(tmp_path / name, "1\t5\tab\n")
    (tmp_path / "_SUCCESS").touch()  # as Spark leaves beside its parts
    _write(tmp_path / "_hidden.tsv", "1\t5\tab\n")
    assert sum(b.num_rows for b in read_batches(str(tmp_path / "*"), columns=SMALL)) == 2
    with pytest.raises(DataError, match=r"no data file at .*/o\*: it matches only folders, and files whose names "
                                        r"or folders' names begin with _ or \. \(.*/old\)"):
        list(read_batches(str(tmp_path / "o*"), columns=SMALL))
    assert sum(b.num_rows for b in read_batches(tmp_path / "_hidden.tsv", columns=SMALL)) == 1  # named: read
    with pytest.raises(DataError, match=r"/old is a folder; expected a data file, a glob matching files \(such as "
                                        r".*/old/\*\.parquet or .*/old/\*\.tsv\)"):
        list(read_batches(tmp_path / "old", columns=SMALL))
    for twice in ([tmp_path / "a.tsv", tmp_path / "a.tsv"], [str(tmp_path / "*.tsv"), tmp_path / "b.tsv"],
                  [tmp_path / "a.tsv", str(tmp_path / "old" / ".." / "a.tsv")]):
        with pytest.raises(DataError, match=r"[ab].tsv is named more than once .*, so its rows would be read twice"):
            list(read_batches(twice, columns=SMALL))


def test_the_float32_maximum_is_a_number_and_the_message_says_so_exactly(tmp_path):
    path = _write(tmp_path / "d.tsv", "".join(f"1\t{v}\tc{k}\n" for k, v in
                                             enumerate(["3.4028235e38", "-3.4028235e38", "3.4028236e38"])))
    report = BadRows()
    rows = pa.Table.from_batches(list(read_batches(path, columns=SMALL, checks={"I1": "number"}, bad_rows=report)))
    assert rows.column("C1").to_pylist() == ["c0", "c1"]
    assert report.examples == [f"{path}:3: column 'I1': expected a number within float32's range "
                               f"(|x| <= 3.4028235e38) or nothing, got '3.4028236e38'"]
    dense = Extractor([DenseFeature(name="n", column="I1")])(rows.to_batches()[0]).dense
    assert dense.ravel().tolist() == [float(np.finfo(np.float32).max), -float(np.finfo(np.float32).max)]


def test_a_byte_order_mark_opening_the_file_is_dropped_however_the_file_is_cut(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "_PIECE_BYTES", 1)
    path = tmp_path / "d.tsv"
    path.write_bytes(b"\xef\xbb\xbf1\t5\tab\n\xef\xbb\xbf0\t6\tcd\n")  # the second: a value's, kept
    rows = pa.Table.from_batches(list(read_batches(path, columns=SMALL, checks={})))
    assert rows.column("label").to_pylist() == ["1", "\ufeff0"]


def test_a_glob_passes_over_what_its_wildcards_match_in_folders_named_with_an_underscore_or_a_dot(tmp_path):
    """As Spark leaves a task's uncommitted output in _temporary/; `**` is any depth of folders."""
    for folder in ("dt=1", "dt=2/hour=3", "_temporary/0", ".staging", "dt=4/_meta"):
        (tmp_path / folder).mkdir(parents=True)
        _write(tmp_path / folder / "part-0.tsv", "1\t5\tab\n")

    def rows(pattern):
        return sum(b.num_rows for b in read_batches(str(tmp_path / pattern), columns=SMALL))

    assert rows("*/*/*.tsv") == 1  # dt=2/hour=3, not _temporary/0 nor dt=4/_meta
    assert rows("**/*.tsv") == 2  # dt=1 and dt=2/hour=3
    assert rows("_temporary/*/*.tsv") == 1  # a folder the pattern names is read
    assert rows("*/_meta/*.tsv") == 1  # even after a wildcard


def test_half_precision_parquet_columns_read_as_their_float32_values(tmp_path):
    values = [0.5, float("nan"), 3.0, -1.25, 2048.0]
    half, single = tmp_path / "half.parquet", tmp_path / "single.parquet"
    for path, kind in ((half, pa.float16()), (single, pa.float32())):
        bags = pa.array([[v, 1.0] for v in values], pa.list_(kind))
        pq.write_table(pa.table({"label": pa.array([1, 0, 1, 0, 1], kind), "I1": pa.array(values, kind),
                                 "C1": bags}), path)
    checks = {"label": "label", "I1": "number", "C1": Bags(",")}
    read = [pa.Table.from_batches(list(read_batches(p, columns=SMALL, checks=checks))) for p in (half, single)]
    assert read[0].equals(read[1])
    assert read[0].column("I1").to_pylist() == ["0.5", "", "3", "-1.25", "2048"]


def test_a_parquet_file_holding_a_column_read_twice_is_refused_naming_it(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_arrays([pa.array([1]), pa.array([2]), pa.array(["a"]), pa.array(["b"])],
                                        names=["label", "I1", "C1", "C1"]), path)
    with pytest.raises(DataError, match=r"d\.parquet: the Parquet file holds columns \['C1'\] more than once"):
        list(read_batches(path, columns=SMALL))
    assert len(list(read_batches(path, columns=["label", "I1"]))) == 1  # a column no feature reads may repeat


@pytest.mark.parametrize("name, text, why", [
    ("mac.csv", b"label,I1,C1\r1,5,a\r0,6,b\r", r" its lines seem to end in a bare carriage return"),
    ("mac.tsv", b"1\t5\ta\r0\t6\tb\r", r" its lines seem to end in a bare carriage return"),
    ("twice.csv", b"label,I1,C1\r\r\n1,5,a\r\r\n", r"1: the line ends in \\r\\r\\n; .* sed 's/\\r\*\$//'"),
    ("twice.tsv.gz", gzip.compress(b"1\t5\ta\r\r\n"), r"1: the line ends in \\r\\r\\n"),
])
def test_a_text_file_whose_lines_end_in_a_bare_or_doubled_carriage_return_is_refused_saying_so(tmp_path, name,
                                                                                              text, why):
    path = tmp_path / name
    path.write_bytes(text)
    with pytest.raises(DataError, match=rf"{re.escape(name)}:{why}"):
        readers.check_layout([str(path)], SMALL)
    with pytest.raises(DataError, match=rf"{re.escape(name)}:{why}"):
        list(read_batches(path, columns=SMALL))


def test_a_number_column_s_nan_written_as_text_is_a_missing_value_as_a_parquet_nan_is(tmp_path):
    path = _write(tmp_path / "d.csv", "label,I1,C1\n1,NaN,a\n0,nan,b\n1,-NaN,c\n0,2.5,d\n1,NaNa,e\n")
    report = BadRows()
    read = list(read_batches(path, columns=SMALL, checks={"I1": "number"}, bad_rows=report))
    assert report.count == 1 and report.examples[0].startswith(f"{path}:6: column 'I1': expected a number")
    dense = Extractor([DenseFeature(name="price", column="I1", missing_value=-1.0)])(read[0]).dense
    assert dense.ravel().tolist() == [-1.0, -1.0, -1.0, 2.5]
    ids = read_batches(path, columns=["I1"], checks={"I1": "integer"}, bad_rows=BadRows(), max_bad_fraction=1.0)
    assert sum(b.num_rows for b in ids) == 0  # an id column's "nan" is not a number column's NaN


@pytest.mark.parametrize("start, what", [
    (b"PAR1\x15\x04", "a Parquet file"),
    (b"BZh91AY&SY\x00", "bzip2-compressed"),
    (b"\xfd7zXZ\x00\x00", "xz-compressed"),
    (b"\x28\xb5\x2f\xfd\x00", "zstd-compressed"),
    ("label,I1,C1\n1,2,a\n".encode("utf-16"), "UTF-16 text"),
    ("label,I1,C1\n1,2,a\n".encode("utf-32"), "UTF-32 text"),
    (b"PK\x03\x04\x14\x00", "a zip archive"),
])
@pytest.mark.parametrize("name", ["part-00000", "part-00000.gz"])
def test_a_file_read_as_text_that_is_not_text_is_refused_naming_what_it_is(tmp_path, start, what, name):
    path = tmp_path / name
    content = start + b"\x00" * 64 + b"PAR1"  # as a Parquet file ends
    path.write_bytes(gzip.compress(content) if name.endswith(".gz") else content)
    if name.endswith(".gz") and what == "a Parquet file":  # to be gunzipped, not read as Parquet as it is
        what = "a gzip-compressed Parquet file"
    with pytest.raises(DataError, match=rf"{name}: expected CSV text, got {re.escape(what)}.* \(it starts with "):
        list(read_batches(path, columns=SMALL, file_format="csv"))
    with pytest.raises(DataError, match=rf"{name}: expected TSV text, got {re.escape(what)}"):
        readers.check_layout([str(path)], SMALL, "tsv")


def test_text_whose_first_id_starts_with_the_parquet_magic_is_read_as_text(tmp_path):
    path = _write(tmp_path / "part-00000", "1\t5\tPAR1023\n")
    assert sum(b.num_rows for b in read_batches(path, columns=["a", "b", "c"], file_format="tsv")) == 1
    path.write_text("PAR1023\t5\t1\n")
    assert sum(b.num_rows for b in read_batches(path, columns=["a", "b", "c"], file_format="tsv")) == 1
    gzipped = tmp_path / "part-00001.gz"
    gzipped.write_bytes(gzip.compress(b"PAR1023\t5\t1\n"))
    assert sum(b.num_rows for b in read_batches(gzipped, columns=["a", "b", "c"], file_format="tsv")) == 1


def test_a_gzip_file_damaged_near_its_start_is_refused_by_name_not_with_a_zlib_traceback(tmp_path):
    damaged = bytearray(gzip.compress(b"".join(b"%d\t%d\tid%d\n" % (k % 2, k, k) for k in range(3000))))
    damaged[20:60] = bytes(b ^ 0x5A for b in damaged[20:60])
    path = tmp_path / "d.tsv.gz"
    path.write_bytes(bytes(damaged))
    for read in (lambda: readers.check_layout([str(path)], SMALL), lambda: list(read_batches(path, columns=SMALL))):
        with pytest.raises(DataError, match=r"d\.tsv\.gz: cannot read it \(its gzip-compressed data is damaged: "
                                            r"Error -3 .*\); gzip it again, or leave it out of the files read$"):
            read()


def test_a_stray_carriage_return_in_a_first_line_longer_than_the_look_at_line_ends_is_one_bad_row(tmp_path):
    long_line = "1\t5\t" + "a" * 1000 + "\r" + "b" * 70_000 + "\n"  # its \n past the first 64 KiB
    path = _write(tmp_path / "d.tsv", long_line + "".join(f"{k % 2}\t{k}\tid{k}\n" for k in range(1000)))
    report = BadRows()
    assert sum(b.num_rows for b in read_batches(path, columns=SMALL, checks=CHECKS, bad_rows=report)) == 1000
    assert report.count == 1  # was the whole file refused as old Mac text
    windows = tmp_path / "windows.tsv.gz"  # the same with \r\n line ends, gzipped: the \r\n is not a second bare \r
    windows.write_bytes(gzip.compress(path.read_bytes().replace(b"\n", b"\r\n")))
    report = BadRows()
    assert sum(b.num_rows for b in read_batches(windows, columns=SMALL, checks=CHECKS, bad_rows=report)) == 1000
    assert report.count == 1
    mac = tmp_path / "mac.tsv"  # lines ending in a bare \r, each longer than the first look at the text
    for first in (40_000, (1 << 16) - 5):  # its first \r inside the look, or its last byte
        mac.write_bytes(b"1\t5\t" + b"a" * first + b"\r0\t6\t" + b"b" * 40_000 + b"\r")
        with pytest.raises(DataError, match=r"mac\.tsv: its lines seem to end in a bare carriage return"):
            list(read_batches(mac, columns=SMALL, checks=CHECKS))


def test_gzip_compressed_parquet_is_told_to_be_gunzipped(tmp_path):
    pq.write_table(pa.table({"label": [1], "I1": [5], "C1": ["a"]}), tmp_path / "d.parquet")
    packed = gzip.compress((tmp_path / "d.parquet").read_bytes())
    for name, file_format in (("d.tsv.gz", None), ("d.parquet.gz", None), ("x.gz", "parquet")):
        (tmp_path / name).write_bytes(packed)
        with pytest.raises(DataError, match=rf"{re.escape(name)}: .*gzip-compressed.*; gunzip it and read it as Parquet"):
            list(read_batches(tmp_path / name, columns=SMALL, file_format=file_format))


def test_a_parquet_fixed_size_list_column_is_read_as_bags(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"label": [1, 0], "I1": [5, 6],
                             "C1": pa.array([["a", "b"], ["c", "d"]], pa.list_(pa.string(), 2))}), path)
    read = pa.Table.from_batches(list(read_batches(path, columns=SMALL, checks={"C1": Bags("|")})))
    assert read.column("C1").to_pylist() == ["a|b", "c|d"]
