"""SparseBatch: the jagged layout, derived offsets, and errors on batches that do not add up."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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
        ({"values": [True, False, True]}, "values must be integers, got dtype bool"),
        ({"lengths": [True, True, True]}, "lengths must be integers, got dtype bool"),
        ({"weights": [1.0]}, r"weights must have one entry per id \(3\), got 1"),
        ({"dense": np.ones((2, 4))}, "dense must have B = 3 rows, got 2"),
        ({"labels": np.ones(3)}, r"labels must be 2-D \[B, T\], one column per target \(labels\[:, None\] for a single "
                                  r"target\), got shape \(3,\)"),
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
    with pytest.raises(BatchError, match="batch_size must be 0 or more, got -1"):
        SparseBatch(keys=(), values=[], lengths=[], batch_size=-1)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"weights": [1.0, np.nan, 1.0]}, r"weights must be finite numbers .*; 1 of 3 are not, e\.g\. nan at id 1"),
    ({"weights": [np.inf, -np.inf, 1.0]}, r"weights must be finite numbers .*; 2 of 3 are not, e\.g\. inf at id 0"),
    ({"dense": [[0.0, 1.0], [np.nan, 2.0], [1.0, np.inf]]},
     r"dense must be finite numbers .*; 2 of 6 are not, e\.g\. nan at row 1, column 0"),
    ({"dense": np.full((3, 1), 1e39)}, r"dense must be finite numbers .*; 3 of 3 are not, e\.g\. inf at row 0"),
])
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # 1e39 as float32
def test_non_finite_weights_or_dense_are_refused_naming_the_field(kwargs, message):
    base = {"keys": ("a",), "values": [1, 2, 3], "lengths": [1, 1, 1], "batch_size": 3}
    with pytest.raises(BatchError, match=message):
        SparseBatch(**{**base, **kwargs})


@pytest.mark.parametrize(("labels", "example"), [
    ([[1.0], [2.0], [0.0]], r"2\.0 at row 1, column 0"),
    ([[-1.0], [0.0], [1.0]], r"-1\.0 at row 0, column 0"),
    ([[0.0], [1.0], [np.nan]], r"nan at row 2, column 0"),
    ([[0.0], [np.inf], [1.0]], r"inf at row 1, column 0"),
])
def test_labels_outside_zero_to_one_are_refused(labels, example):
    with pytest.raises(BatchError, match=rf"labels must be numbers in \[0, 1\] .*; 1 of 3 are not, e\.g\. {example}"):
        SparseBatch(keys=("a",), values=[1, 2, 3], lengths=[1, 1, 1], batch_size=3, labels=labels)


def test_soft_labels_and_empty_batches_are_accepted():
    batch = SparseBatch(keys=("a",), values=[1, 2, 3], lengths=[1, 1, 1], batch_size=3,
                        labels=[[0.0], [0.25], [1.0]], dense=np.zeros((3, 2)), weights=[0.5, 1.0, -2.0])
    assert batch.labels.ravel().tolist() == [0.0, 0.25, 1.0]
    empty = SparseBatch(keys=("a",), values=[], lengths=[], batch_size=0, labels=np.zeros((0, 1)),
                        dense=np.zeros((0, 2)), weights=[])
    assert empty.labels.shape == (0, 1)


@pytest.mark.parametrize(("weights", "message"), [
    ({"a": [[0.5], [1.0, 9.0]]}, r"feature 'a', sample 0: 2 ids but 1 weights; give one weight per id"),
    ({"a": [[0.5, 1.0]]}, r"weights of 'a' must have one bag per sample \(2\), got 1"),
    ({"a": [[0.5, 1.0], [2.0]], "typo": [[1.0]]}, r"weights name features \['typo'\] that have no ids; the features are \['a'\]"),
    ({"a": [0.5, 1.0]}, r"weights of 'a', sample 0: expected a bag"),
])
def test_from_lists_weights_misaligned_with_ids_are_refused(weights, message):
    with pytest.raises(BatchError, match=message):
        SparseBatch.from_lists({"a": [[1, 2], [3]]}, weights=weights)


def test_from_lists_weighs_the_features_weights_leaves_out_1():
    batch = SparseBatch.from_lists({"a": [[1, 2], [3]], "b": [[4], []]}, weights={"b": [[0.5], []]})
    assert batch.weights.tolist() == [1.0, 1.0, 1.0, 0.5]
    unweighted = SparseBatch.from_lists({"a": [[1, 2], [3]]}, weights={})
    assert unweighted.weights.tolist() == [1.0, 1.0, 1.0]


def test_torch_tensors_are_taken_as_their_values():
    weights = torch.tensor([0.5, 2.0], requires_grad=True)  # off a model, say
    batch = SparseBatch(keys=("a",), values=torch.tensor([7, 8]), lengths=torch.tensor([1, 1]), batch_size=2,
                        weights=weights * 1.0, labels=torch.tensor([[1.0], [0.0]]))
    assert batch.values.tolist() == [7, 8] and batch.weights.tolist() == [0.5, 2.0]
    assert batch.labels.dtype == np.float32 and not batch.weights.flags.writeable


@pytest.mark.parametrize(("bags", "message"), [
    ({"a": [1, 2]}, r"feature 'a', sample 0: expected a bag \(a list, maybe empty\), got int 1"),
    ({"a": ["12"]}, r"feature 'a', sample 0: expected a bag \(a list, maybe empty\), got str '12'"),
    ({"a": 5}, r"feature 'a' must be a list of bags, one per sample, got int 5"),
    ({"a": [[2**64]]}, r"ids must fit in 64 bits \(int64, or uint64\), got 18446744073709551616"),
    ({"a": [[-(2**63) - 1]]}, r"ids must fit in 64 bits \(int64, or uint64\), got -9223372036854775809"),
])
def test_from_lists_refuses_bags_that_are_not_lists_of_64_bit_ids(bags, message):
    with pytest.raises(BatchError, match=message):
        SparseBatch.from_lists(bags)


def test_from_lists_takes_uint64_ids_as_the_constructor_does():
    ids = [2**64 - 1, 2**63, 5, np.uint64(2**64 - 2)]
    from_lists = SparseBatch.from_lists({"a": [ids]})
    built = SparseBatch(keys=("a",), values=np.array(ids, np.uint64), lengths=[4], batch_size=1)
    assert from_lists.values.tolist() == built.values.tolist() == [-1, -(2**63), 5, -2]
    mixed = [-1, 2**64 - 1]  # one numpy integer type holds neither list: numpy alone made it float64
    assert SparseBatch(keys=("a",), values=mixed, lengths=[2], batch_size=1).values.tolist() == [-1, -1]
    assert SparseBatch.from_lists({"a": [mixed]}).values.tolist() == [-1, -1]


def test_from_lists_takes_bags_of_numpy_arrays_and_torch_tensors():
    import torch

    batch = SparseBatch.from_lists({"a": [torch.tensor([1, 2]), np.array([3]), torch.tensor([], dtype=torch.int64)]})
    assert batch.values.tolist() == [1, 2, 3] and batch.lengths.tolist() == [2, 1, 0]
    with pytest.raises(BatchError, match=r"sample 0: ids must be integers, got 1.5 \(float\)"):
        SparseBatch.from_lists({"a": [torch.tensor([1.5])]})


def test_unknown_feature_is_named_by_select_and_feature_range():
    batch = SparseBatch.from_lists({"a": [[1]], "b": [[2]]})
    with pytest.raises(BatchError, match=r"no feature 'zz'; the batch has features \['a', 'b'\]"):
        batch.select(["b", "zz"])
    with pytest.raises(BatchError, match=r"no feature 'zz'; the batch has features \['a', 'b'\]"):
        batch.feature_range("zz")
    with pytest.raises(BatchError, match="keys must be a list of feature names, got the string 'ab'"):
        batch.select("ab")


@pytest.mark.parametrize(("keys", "message"), [
    ("ab", r"keys must be a sequence of feature names, got the string 'ab'; write \('ab',\) for one feature"),
    ((1, 2), r"feature keys must be strings, got 1 \(int\) in \(1, 2\)"),
    (None, "keys must be a sequence of feature names, got None"),
])
def test_keys_that_are_not_a_sequence_of_strings_are_refused(keys, message):
    with pytest.raises(BatchError, match=message):
        SparseBatch(keys=keys, values=[1, 2], lengths=[1, 1], batch_size=1)
