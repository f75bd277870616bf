"""SparseBatch: the jagged layout, derived offsets, and errors on batches that do not add up."""

from __future__ import annotations

import numpy as np
import pytest

from tidal.data import SparseBatch
from tidal.errors import BatchError


def test_layout_matches_the_docstring_example():
    batch = SparseBatch.from_lists({"user": [[10], [], [21, 22]], "tag": [[30], [31, 32], [33]]})
    assert batch.keys == ("user", "tag") and batch.batch_size == 3
    np.testing.assert_array_equal(batch.lengths, [1, 0, 2, 1, 2, 1])
    np.testing.assert_array_equal(batch.offsets, [0, 1, 1, 3, 4, 6, 7])
    np.testing.assert_array_equal(batch.values, [10, 21, 22, 30, 31, 32, 33])
    assert batch.feature_range("tag") == (3, 7)
    assert batch.values.dtype == np.int64 and batch.lengths.dtype == np.int32


def test_weights_dense_and_labels_are_converted():
    batch = SparseBatch.from_lists({"a": [[1, 2]]}, weights={"a": [[0.5, 2.0]]},
                                   dense=np.ones((1, 3)), labels=np.zeros((1, 2)))
    assert batch.weights.dtype == np.float32 and batch.dense.dtype == np.float32
    assert batch.labels.shape == (1, 2)


def test_full_int64_range_is_kept():
    batch = SparseBatch.from_lists({"a": [[-(2**63), 2**63 - 1, -1, 0]]})
    assert batch.values.tolist() == [-(2**63), 2**63 - 1, -1, 0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lengths": [1, 1]}, r"lengths must have F \* B = 1 \* 3 = 3 entries"),
        ({"lengths": [1, 1, -1]}, "lengths must be >= 0"),
        ({"values": [1, 2, 3, 4]}, r"values must have sum\(lengths\) = 3 ids, got 4"),
        ({"values": [1.5, 2.0, 3.0]}, "values must be integers, got dtype float64"),
        ({"weights": [1.0]}, r"weights must have one entry per id \(3\), got 1"),
        ({"dense": np.ones((2, 4))}, "dense must have B = 3 rows, got 2"),
        ({"labels": np.ones(3)}, r"labels must be 2-D, got shape \(3,\)"),
    ],
)
def test_inconsistent_batch_is_refused_with_reason(kwargs, message):
    base = {"keys": ("a",), "values": [1, 2, 3], "lengths": [1, 1, 1], "batch_size": 3}
    with pytest.raises(BatchError, match=message):
        SparseBatch(**{**base, **kwargs})


def test_repeated_feature_keys_are_refused():
    with pytest.raises(BatchError, match="feature keys must be distinct"):
        SparseBatch(keys=("a", "a"), values=[1], lengths=[1, 0], batch_size=1)


def test_from_lists_requires_equal_sample_counts():
    with pytest.raises(BatchError, match="same number of samples"):
        SparseBatch.from_lists({"a": [[1]], "b": [[1], [2]]})


def test_batch_keeps_a_read_only_copy_of_its_arrays():
    lengths = np.array([1, 1], dtype=np.int32)
    batch = SparseBatch(keys=("a",), values=[5, 6], lengths=lengths, batch_size=2)
    lengths[0] = 1000
    np.testing.assert_array_equal(batch.offsets, [0, 1, 2])
    with pytest.raises(ValueError, match="read-only"):
        batch.lengths[0] = 7


def test_lengths_beyond_int32_and_fractional_batch_size_are_refused():
    with pytest.raises(BatchError, match=r"lengths must be >= 0 and < 2\*\*31, got values from 1 to 4294967297"):
        SparseBatch(keys=("a",), values=[1], lengths=np.array([2**32 + 1, 1], np.int64), batch_size=2)
    with pytest.raises(BatchError, match="batch_size must be an integer, got 2.0"):
        SparseBatch(keys=("a",), values=[1, 2], lengths=[1, 1], batch_size=2.0)
