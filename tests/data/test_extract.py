"""Extraction: vectorized columns-to-SparseBatch, against a plain per-row reference."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidal.config import DenseFeature, LabelFeature, SparseFeature
from tidal.data import hash_strings
from tidal.data.extract import Extractor, feature_seed
from tidal.data.readers import WeightedBags
from tidal.errors import ConfigError, DataError


def _hash(text: str, seed: int) -> int:
    return int(hash_strings(pa.array([text]), seed)[0][0])


def _reference_bag(feature: SparseFeature, row: dict) -> list[int]:
    """The ids of one row, computed the slow, obvious way."""
    seed = feature_seed(feature)
    value = row[feature.columns[0]]
    if feature.separator is not None:
        return [_hash(t, seed) for t in value.split(feature.separator) if t]
    if value == "":
        return [_hash("\x00missing", seed)] if feature.missing == "default" else []
    return [int(value)] if not feature.hashed else [_hash(value, seed)]


FEATURES = [
    SparseFeature(name="user", columns=["u"], table="t"),
    SparseFeature(name="user_default", columns=["u"], table="t", missing="default"),
    SparseFeature(name="tags", columns=["tags"], table="t", separator="|", pooling="mean"),
    SparseFeature(name="item", columns=["i"], table="t", hashed=False),
]
text = st.text(alphabet="ab|", max_size=6)


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.fixed_dictionaries({"u": st.text(alphabet="xyz", max_size=3), "tags": text,
                                            "i": st.one_of(st.just(""), st.integers(-(2**62), 2**62).map(str))}),
                     max_size=12))
def test_sparse_bags_match_the_per_row_reference(rows):
    batch = pa.RecordBatch.from_pylist(rows, schema=pa.schema([(c, pa.string()) for c in ("u", "tags", "i")]))
    out = Extractor(FEATURES)(batch)
    offsets = out.offsets
    for f, feature in enumerate(FEATURES):
        for b, row in enumerate(rows):
            k = f * len(rows) + b
            assert out.values[offsets[k]:offsets[k + 1]].tolist() == _reference_bag(feature, row)


def test_crosses_buckets_dense_and_labels():
    features = [
        SparseFeature(name="cross", columns=["a", "b"], table="t"),
        SparseFeature(name="size", columns=["n"], table="t", buckets=[1, 10, 100]),
        DenseFeature(name="log_n", column="n", transform="log", missing_value=-1.0),
        LabelFeature(name="click", column="y"),
    ]
    batch = pa.record_batch({"a": ["p", "p", "q", ""], "b": ["r", "r", "r", "r"], "n": ["5", "50", "", "-3"],
                             "y": ["1", "0", "1", "0"]})
    out = Extractor(features)(batch)
    cross, size = out.values[:3], out.values[3:]
    assert out.lengths.tolist() == [1, 1, 1, 0, 1, 1, 0, 1]  # a missing part: no cross id; no number: no bucket
    assert cross[0] == cross[1] != cross[2]
    assert len(set(size.tolist())) == 3  # 5, 50 and -3 fall in three different buckets
    np.testing.assert_allclose(out.dense.ravel(), [math.log1p(5), math.log1p(50), -1.0, -math.log1p(3)], rtol=1e-6)
    assert out.labels.ravel().tolist() == [1.0, 0.0, 1.0, 0.0]


def test_a_cross_reads_every_column_in_order():
    cross = Extractor([SparseFeature(name="ab", columns=["a", "b"], table="t")])
    ids = cross(pa.record_batch({"a": ["p", "p", "r", "s", "p"], "b": ["r", "s", "p", "p", "r"]})).values.tolist()
    assert ids[0] != ids[1] and ids[1] != ids[3] and ids[0] != ids[2] and ids[0] == ids[4]
    three = Extractor([SparseFeature(name="abc", columns=["a", "b", "c"], table="t")])
    assert len(set(three(pa.record_batch({"a": ["p"] * 3, "b": ["r"] * 3, "c": ["x", "y", "z"]})).values.tolist())) == 3


def test_every_dense_feature_takes_its_own_column_and_transform():
    features = [DenseFeature(name="x_log", column="x", transform="log"), DenseFeature(name="y", column="y"),
                DenseFeature(name="z_log", column="z", transform="log", missing_value=7.0)]
    batch = pa.record_batch({"x": ["1", "2", "3"], "y": ["10", "20", "-30"], "z": ["100", "", "-1"]})
    expected = [[math.log1p(1), 10, math.log1p(100)], [math.log1p(2), 20, 7.0], [math.log1p(3), -30, -math.log1p(1)]]
    np.testing.assert_allclose(Extractor(features)(batch).dense, expected, rtol=1e-6)


def test_a_value_on_a_bucket_boundary_falls_in_the_bucket_above():
    size = Extractor([SparseFeature(name="size", columns=["n"], table="t", buckets=[1, 10])])
    ids = size(pa.record_batch({"n": ["0.5", "1", "9.9", "10", "11"]})).values.tolist()
    assert ids[0] != ids[1] == ids[2] != ids[3] == ids[4]
    other = Extractor([SparseFeature(name="other", columns=["n"], table="t", buckets=[1, 10])])
    assert other(pa.record_batch({"n": ["1"]})).values[0] != ids[1]  # its own namespace


def test_a_multi_value_feature_splits_on_its_own_separator():
    tags = Extractor([SparseFeature(name="tags", columns=["t"], table="t", separator=",")])
    out = tags(pa.record_batch({"t": ["a,b|c", "a"]}))
    assert out.lengths.tolist() == [2, 1] and out.values[0] == out.values[2]


def test_a_column_read_as_raw_ids_and_as_a_number_is_checked_as_an_integer():
    features = [SparseFeature(name="id", columns=["i"], table="t", hashed=False),
                DenseFeature(name="i_log", column="i", transform="log"),
                SparseFeature(name="i_size", columns=["i"], table="t", buckets=[10])]
    assert Extractor(features).checks == {"i": "integer"}
    assert Extractor(features[1:]).checks == {"i": "number"}


def test_equal_strings_differ_across_features_unless_they_share_a_namespace():
    batch = pa.record_batch({"a": ["same"], "b": ["same"]})
    apart = Extractor([SparseFeature(name="a", columns=["a"], table="t"),
                       SparseFeature(name="b", columns=["b"], table="t")])(batch)
    shared = Extractor([SparseFeature(name="a", columns=["a"], table="t", namespace="words"),
                        SparseFeature(name="b", columns=["b"], table="t", namespace="words")])(batch)
    assert apart.values[0] != apart.values[1]
    assert shared.values[0] == shared.values[1]


def test_bad_inputs_are_named():
    with pytest.raises(ConfigError, match="names must be distinct"):
        Extractor([LabelFeature(name="y", column="y"), LabelFeature(name="y", column="z")])
    with pytest.raises(DataError, match=r"batch lacks columns \['u'\]"):
        Extractor(FEATURES[:1])(pa.record_batch({"v": ["1"]}))
    with pytest.raises(DataError, match="'item': hashed is false, so every value must be an integer id"):
        Extractor(FEATURES[3:])(pa.record_batch({"i": ["abc"]}))
    with pytest.raises(ConfigError, match="a cross .* takes single hashed values"):
        SparseFeature(name="x", columns=["a", "b"], table="t", separator="|")


def test_multi_value_bags_survive_nulls_and_take_a_default_when_empty():
    feature = SparseFeature(name="tags", columns=["tags"], table="t", separator="|", missing="default")
    out = Extractor([feature])(pa.record_batch({"tags": pa.array(["a|b", None, "||", "c"])}))
    assert out.lengths.tolist() == [2, 1, 1, 1]
    default = _hash("\x00missing", feature_seed(feature))
    assert out.values[2] == default and out.values[3] == default
    with pytest.raises(ConfigError, match="choose one of separator, buckets and hashed=false"):
        SparseFeature(name="x", columns=["a"], table="t", separator="|", hashed=False)


def test_weighted_bags_split_each_value_at_its_last_weight_separator():
    tags = SparseFeature(name="tags", columns=["t"], table="t", separator="|", weight_separator=":", missing="default")
    plain = SparseFeature(name="plain", columns=["t"], table="t", separator="|", namespace="tags")
    out = Extractor([tags, SparseFeature(name="u", columns=["u"], table="t")])(
        pa.record_batch({"t": ["url:a:b:2|x:-0.5", None, "x:1e-3||"], "u": ["p", "q", "r"]}))
    assert out.lengths.tolist() == [2, 1, 1, 1, 1, 1]  # the empty bag takes the default id
    np.testing.assert_array_equal(out.weights, np.float32([2, -0.5, 1, 1e-3, 1, 1, 1]))
    assert out.values[0] == _hash("url:a:b", feature_seed(tags)) and out.values[2] == _hash("\x00missing", feature_seed(tags))
    assert Extractor([plain])(pa.record_batch({"t": ["url:a:b"]})).values[0] == out.values[0]  # the id part, hashed
    assert Extractor([tags]).checks == {"t": WeightedBags("|", ":")}
    with pytest.raises(DataError, match=r"feature 'tags', row 1: the value 'b' is not an id, ':' and a weight; "
                                        r"expected bag values split by '\|', .* read files with read_batches\(checks="):
        Extractor([tags])(pa.record_batch({"t": ["a:1", "a:1|b"]}))


@pytest.mark.parametrize(("settings", "message"), [
    ({"weight_separator": ":"}, "weight_separator ':' splits the values of a bag: it needs a separator"),
    ({"separator": "::", "weight_separator": ":"}, "weight_separator ':' and separator '::' must not hold one another"),
    ({"separator": "|", "weight_separator": "e"}, r"weight_separator 'e' holds a character of a number"),
    ({"separator": ".", "weight_separator": ":"}, r"separator '\.' holds a character of a number"),
])
def test_a_weight_separator_needs_a_separator_apart_from_it_and_from_numbers(settings, message):
    with pytest.raises(ConfigError, match=message):
        SparseFeature(name="x", columns=["a"], table="t", **settings)


_DIRECT = [SparseFeature(name="user", columns=["u"], table="t"), DenseFeature(name="n", column="n"),
           DenseFeature(name="m", column="m", transform="log"), LabelFeature(name="click", column="y")]


@pytest.mark.parametrize(("column", "values", "message"), [
    ("y", ["1", "yes"], r"label feature 'click' \(column 'y'\): expected numbers .*'yes'"),
    ("y", ["1", "2"], r"label feature 'click' \(column 'y'\): expected 0 or 1 \(or a soft label in \[0, 1\]\), "
                      r"got '2' in row 1"),
    ("y", pa.array([-1.0, 0.0]), r"label feature 'click' .*: expected 0 or 1 .*, got -1\.0 in row 0"),
    ("y", ["", "1"], r"label feature 'click' .*: a label is missing in row 0"),
    ("m", ["3", "abc"], r"dense feature 'm' \(column 'm'\): expected numbers \(or nothing\), .*'abc'"),
    ("n", ["1", "1e400"], r"dense feature 'n' \(column 'n'\): expected numbers within float32's range .*, "
                          r"got '1e400' in row 1"),
    ("n", ["1e39", "1"], r"dense feature 'n' .*: expected numbers within float32's range .*, got '1e39' in row 0"),
    ("n", pa.array([1.0, float("inf")]), r"dense feature 'n' .*: expected numbers within float32's range .*, got inf"),
    # as training's readers and the server refuse it: the log transform would bring it within the range
    ("m", ["1", "1e39"], r"dense feature 'm' .*: expected numbers within float32's range .*, got '1e39' in row 1"),
    ("m", pa.array([-1e300, 1.0]), r"dense feature 'm' .*: expected numbers within float32's range .*, got -1e\+300 in row 0"),
    ("u", pa.array([1, 2]), r"feature 'user' reads its column\(s\) as text: expected string columns, "
                            r"got column 'u' of type int64"),
])
def test_bad_values_from_direct_callers_are_named_with_their_feature(column, values, message):
    batch = {"u": ["x", "y"], "n": ["1", "2"], "m": ["3", "4"], "y": ["1", "0"], column: values}
    with pytest.raises(DataError, match=message):
        Extractor(_DIRECT)(pa.record_batch(batch))


def test_a_table_or_a_dict_is_refused_naming_what_came():
    batch = {"u": ["x"], "n": ["1"], "m": ["3"], "y": ["1"]}
    with pytest.raises(DataError, match=r"expected a pyarrow\.RecordBatch, got Table; pass table\.combine_chunks"):
        Extractor(_DIRECT)(pa.table(batch))
    with pytest.raises(DataError, match=r"expected a pyarrow\.RecordBatch, got dict$"):
        Extractor(_DIRECT)(batch)


def test_soft_labels_numeric_columns_and_large_logs_are_still_read():
    batch = pa.record_batch({"u": ["x", "y"], "n": pa.array([1.0, float("nan")]), "m": ["3.4028235e38", ""],
                             "y": pa.array([0.25, 1.0])})
    out = Extractor(_DIRECT)(batch)
    assert out.labels.ravel().tolist() == [0.25, 1.0]
    np.testing.assert_allclose(out.dense, [[1.0, math.log1p(3.4028235e38)], [0.0, 0.0]], rtol=1e-6)  # NaN: missing


def test_a_dict_where_a_feature_config_goes_is_refused_naming_the_classes():
    with pytest.raises(ConfigError, match=r"Extractor: each feature: expected SparseFeature or DenseFeature or LabelFeature"):
        Extractor([{"kind": "sparse", "name": "u", "columns": ["C1"], "table": "ids"}])


def test_float32s_largest_value_is_a_number_and_the_range_message_is_exact():
    """3.4028235e38 (float32's maximum as numpy writes it) is in range; the message
    says exactly where the range ends (it once said |x| < 3.4e38)."""
    dense = Extractor([DenseFeature(name="n", column="n")])(pa.record_batch({"n": ["3.4028235e38", "-3.4028235e38"]}))
    assert dense.dense.ravel().tolist() == [float(np.finfo(np.float32).max), -float(np.finfo(np.float32).max)]
    with pytest.raises(DataError, match=r"expected numbers within float32's range \(\|x\| <= 3\.4028235e38\), "
                                        r"got '3\.5e38' in row 0"):
        Extractor([DenseFeature(name="n", column="n")])(pa.record_batch({"n": ["3.5e38"]}))


@pytest.mark.parametrize("text, id_", [("-9223372036854775808", -2**63), ("9223372036854775807", 2**63 - 1),
                                       ("0009223372036854775807", 2**63 - 1), ("-0", 0)])
def test_raw_ids_span_int64(text, id_):
    out = Extractor([SparseFeature(name="item", columns=["i"], table="t", hashed=False)])(pa.record_batch({"i": [text]}))
    assert out.values.tolist() == [id_]


def test_a_batch_of_another_schema_is_checked_after_one_that_passed():
    extract = Extractor(_DIRECT)
    good = {"u": ["x", "y"], "n": ["1", "2"], "m": ["3", "4"], "y": ["1", "0"]}
    assert extract(pa.record_batch(good)).batch_size == 2
    assert extract(pa.record_batch(good)).batch_size == 2  # the same schema again
    with pytest.raises(DataError, match=r"feature 'user' reads its column\(s\) as text: .*column 'u' of type int64"):
        extract(pa.record_batch({**good, "u": pa.array([1, 2])}))
    with pytest.raises(DataError, match=r"batch lacks columns \['u'\]"):
        extract(pa.record_batch({k: v for k, v in good.items() if k != "u"}))
    assert extract(pa.record_batch(good)).batch_size == 2
