"""String ids: stable, seeded per feature, vectorized over Arrow buffers."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidal.data import hash_strings
from tidal.errors import DataError

M64 = (1 << 64) - 1


def _reference(text: str, seed: int) -> int:
    """FNV-1a 64 over UTF-8, then splitmix64's finalizer of (hash ^ seed), in plain Python."""
    h = 0xCBF29CE484222325
    for byte in text.encode():
        h = ((h ^ byte) * 0x100000001B3) & M64
    z = ((h ^ seed) + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    z ^= z >> 31
    return z - (1 << 64) if z >= 1 << 63 else z


@settings(max_examples=100, deadline=None)
@given(texts=st.lists(st.text(max_size=12), max_size=30), seed=st.integers(0, M64), start=st.integers(0, 5))
def test_hash_matches_the_reference_on_any_slice(texts, seed, start):
    array = pa.array(texts, type=pa.string()).slice(min(start, len(texts)))
    ids, missing = hash_strings(array, seed)
    assert ids.tolist() == [_reference(t, seed) for t in texts[min(start, len(texts)):]]
    assert missing.tolist() == [t == "" for t in texts[min(start, len(texts)):]]


def test_hash_is_pinned_so_ids_never_change_between_releases():
    ids, _ = hash_strings(pa.array(["68fd1e64", "user:42"]), 7)
    assert ids.tolist() == [_reference("68fd1e64", 7), _reference("user:42", 7)]
    assert ids[0] == 8611375452336852818


def test_seed_separates_features_and_nulls_count_as_missing():
    array = pa.array(["a", None, "a"])
    ids_a, missing = hash_strings(array, 1)
    ids_b, _ = hash_strings(array, 2)
    assert ids_a[0] == ids_a[2] and ids_a[0] != ids_b[0]
    assert missing.tolist() == [False, True, False]


def test_large_and_chunked_strings_hash_alike():
    plain, _ = hash_strings(pa.array(["x", "yz"]), 3)
    large, _ = hash_strings(pa.array(["x", "yz"], type=pa.large_string()), 3)
    chunked, _ = hash_strings(pa.chunked_array([["x"], ["yz"]]), 3)
    np.testing.assert_array_equal(plain, large)
    np.testing.assert_array_equal(plain, chunked)


@settings(max_examples=50, deadline=None)
@given(columns=st.integers(1, 4), rows=st.integers(0, 6), seeds=st.lists(st.integers(0, M64), min_size=4, max_size=4),
       data=st.data())
def test_several_columns_hash_in_one_call_with_a_seed_each(columns, rows, seeds, data):
    texts = data.draw(st.lists(st.text(max_size=6), min_size=columns * rows, max_size=columns * rows))
    ids, missing = hash_strings(pa.array(texts, pa.string()), np.array(seeds[:columns], np.uint64))
    assert ids.tolist() == [_reference(t, seeds[k // rows]) for k, t in enumerate(texts)]
    assert missing.tolist() == [t == "" for t in texts]


def test_what_is_not_a_string_array_is_refused_with_the_way_to_make_one():
    for values, got in ((pa.array([1, 2]), "int64"), (["a", "b"], "list")):
        with pytest.raises(DataError, match=rf"hash_strings needs a pyarrow string array, got {got}; pass pyarrow.array"):
            hash_strings(values, 7)


def test_a_seed_of_any_integer_type_hashes_as_its_64_bits_and_anything_else_is_refused():
    strings = pa.array(["x", "y"], pa.string())
    expected = [_reference(t, 7) for t in ("x", "y")]
    for seed in (7, np.int32(7), np.int64(7), np.uint64(7), np.array([7], np.int64)):
        assert hash_strings(strings, seed)[0].tolist() == expected, repr(seed)
    assert hash_strings(strings, np.int64(-1))[0].tolist() == hash_strings(strings, M64)[0].tolist()
    for seed, message in ((7.0, r"the seed must be an integer of 64 bits \(signed or not\), got 7.0"),
                          (True, "got True"), (M64 + 8, f"got {M64 + 8}"),
                          (np.array([], np.uint64), r"the seeds must be a 1-D array of integers, one per column, got "
                                                    r"uint64 of shape \(0,\)"),
                          (np.array([0.5]), "got float64 of shape"),
                          (np.array([1, 2, 3]), "2 strings do not split into 3 columns of equal length")):
        with pytest.raises(DataError, match=message):
            hash_strings(strings, seed)
