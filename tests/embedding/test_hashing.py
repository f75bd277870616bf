"""Row initial values are a pure function of (seed, table name, key)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import tidal
from tidal.config import Initializer, TableConfig
from tidal.embedding import EmbeddingTable
from tidal.embedding.hashing import INIT_KINDS, init_row, mix64, table_seed
from tidal.mixing import GOLDEN

from keys import ADVERSARIAL, INT64_MAX, INT64_MIN, M64, as_int64, unmix64



def make_table(*, name="emb", seed=0, kind="uniform", scale=0.05, dim=8, num_shards=8, threads=1):
    config = TableConfig(name=name, dim=dim, seed=seed, num_shards=num_shards,
                         initializer=Initializer(kind=kind, **({"scale": scale} if kind != "zeros" else {})))
    return EmbeddingTable(config, threads=threads)


def initial_values(table, keys, batch=None):
    """Create the rows of `keys` (in batches of `batch`) and read them back."""
    keys = np.asarray(keys, dtype=np.int64)
    batch = batch or max(len(keys), 1)
    for lo in range(0, len(keys), batch):
        table.lookup_or_insert(keys[lo : lo + batch])
    return table.lookup(keys)


def some_keys(n=600, seed=1):
    rng = np.random.default_rng(seed)
    return np.unique(np.concatenate([rng.integers(INT64_MIN, INT64_MAX, n, dtype=np.int64),
                                     np.array(ADVERSARIAL, dtype=np.int64)]))


# ------------------------------------------------------------------ purity


@pytest.mark.parametrize("kind", ["uniform", "normal"])
def test_initial_values_identical_when_shards_threads_and_order_differ(kind):
    keys = some_keys()
    reference = initial_values(make_table(kind=kind, num_shards=1), keys)
    shuffled = np.random.default_rng(3).permutation(keys)
    for num_shards, order, batch in [(8, keys[::-1], 7), (64, shuffled, None), (2, np.repeat(keys, 3), 50)]:
        table = make_table(kind=kind, num_shards=num_shards, threads=4)
        initial_values(table, order, batch=batch)
        np.testing.assert_array_equal(table.lookup(keys), reference)


@pytest.mark.parametrize("kind", ["uniform", "normal", "zeros"])
def test_table_values_equal_init_row_when_computed_directly(kind):
    keys = some_keys(100)
    values = initial_values(make_table(kind=kind, seed=7, name="items", dim=5), keys)
    seed = table_seed(7, "items")
    for key, row in zip(keys, values):
        expected = np.empty(5, dtype=np.float32)
        init_row(expected, np.int64(key), seed, INIT_KINDS[kind], 0.05)
        np.testing.assert_array_equal(row, expected)


def test_initial_values_stable_when_key_removed_and_created_again():
    table = make_table()
    keys = some_keys(200)
    first = initial_values(table, keys)
    table.remove(keys[::2])
    np.testing.assert_array_equal(initial_values(table, keys), first)


def test_initial_values_differ_when_seed_or_table_name_differs():
    keys = some_keys(300)
    base = initial_values(make_table(seed=0, name="emb"), keys)
    for other in (make_table(seed=1, name="emb"), make_table(seed=0, name="emb2")):
        values = initial_values(other, keys)
        assert (values != base).mean() > 0.99


def test_table_seed_stable_when_python_hash_seed_differs():
    code = "from tidal.embedding.hashing import table_seed; print(int(table_seed(5, 'user_id')))"
    src = os.path.dirname(os.path.dirname(tidal.__file__))  # found however tidal was imported here
    path = os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=path)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout) == int(table_seed(5, "user_id"))
    assert table_seed(5, "user_id") != table_seed(6, "user_id") != table_seed(5, "user")


_ROWS_OF_KEYS = """
import sys, numba, numpy as np
from tidal.embedding.hashing import init_row

@numba.njit
def rows_of(keys, seed, kind, out):
    for i in range(keys.shape[0]):
        init_row(out[i], keys[i], seed, kind, 0.05)

def initial_rows(keys, seed, kind):
    out = np.empty((keys.shape[0], 64), np.float32)
    rows_of(keys, np.uint64(seed), kind, out)
    return out
"""


def test_initial_values_identical_when_compiled_for_another_cpu(tmp_path):
    """A worker on an older CPU (here: numba's generic x86-64 target, without FMA or
    AVX) creates the same rows bit for bit: no kernel may let the compiler reorder or
    fuse float operations by the CPU it compiles for (the table's rows are `init_row`'s,
    as checked above)."""
    keys, seed = np.arange(-3000, 3000), int(table_seed(0, "x"))
    code = _ROWS_OF_KEYS + (f"for kind in (1, 2):\n    np.save(sys.argv[1] + str(kind) + '.npy', "
                            f"initial_rows(np.arange({keys[0]}, {keys[-1] + 1}), {seed}, kind))\n")
    src = os.path.dirname(os.path.dirname(tidal.__file__))
    env = dict(os.environ, NUMBA_CPU_NAME="generic", NUMBA_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "generic_")], env=env, check=True)
    here: dict = {}
    exec(_ROWS_OF_KEYS, here)  # the same driver, compiled for this CPU
    for kind in (INIT_KINDS["uniform"], INIT_KINDS["normal"]):
        np.testing.assert_array_equal(np.load(tmp_path / f"generic_{kind}.npy"), here["initial_rows"](keys, seed, kind),
                                      err_msg=f"kind {kind}")


# ------------------------------------------------------------------ distributions


@pytest.mark.parametrize("dim", [8, 3])
def test_uniform_init_within_scale_when_many_keys(dim):
    scale = 0.05
    values = initial_values(make_table(kind="uniform", scale=scale, dim=dim), some_keys(20_000)).ravel()
    assert values.min() >= -scale and values.max() < scale
    assert abs(values.mean()) < 0.01 * scale
    assert values.std() == pytest.approx(scale / np.sqrt(3), rel=0.02)
    counts, _ = np.histogram(values, bins=10, range=(-scale, scale))
    assert counts.min() > 0.9 * counts.mean()


def test_uniform_init_below_scale_when_mixed_bits_are_all_ones():
    """Uniform is documented as [-scale, scale): +scale itself must never come out.

    Dim 0 of a key takes its value from the top 24 bits of mix64(mix64(key ^ seed));
    this key makes them all ones.
    """
    seed = int(table_seed(0, "emb"))
    wanted = (0xFFFFFF << 40) | 0x5A5A5A
    key = as_int64(unmix64(unmix64(wanted)) ^ seed)
    assert int(mix64(np.uint64(int(mix64(np.uint64((key & M64) ^ seed)))))) == wanted
    values = initial_values(make_table(kind="uniform", scale=0.5, dim=2), [key])
    assert values[0, 0] < 0.5, f"uniform init gave {values[0, 0]} for scale 0.5"


@pytest.mark.parametrize("dim", [8, 5])
def test_normal_init_has_zero_mean_and_scale_std_when_many_values(dim):
    scale = 0.1
    values = initial_values(make_table(kind="normal", scale=scale, dim=dim), some_keys(20_000)).ravel()
    assert np.isfinite(values).all()
    assert abs(values.mean()) < 5 * scale / np.sqrt(values.size)
    assert values.std() == pytest.approx(scale, rel=0.02)
    assert np.mean(np.abs(values) < scale) == pytest.approx(0.6827, abs=0.01)


def test_normal_init_equals_box_muller_with_exact_functions_when_same_bits():
    """The polynomial log, sine and cosine stay within float32 rounding of the exact ones."""
    seed, scale, dim = table_seed(3, "emb"), 0.5, 7
    for key in some_keys(2000):
        row = np.empty(dim, dtype=np.float32)
        init_row(row, np.int64(key), seed, INIT_KINDS["normal"], scale)
        state = int(mix64(np.uint64((int(key) & M64) ^ int(seed))))
        expected = []
        for p in range((dim + 1) // 2):
            bits = int(mix64(np.uint64((state + 2 * p * int(GOLDEN)) & M64)))
            u1, u2 = (bits >> 40) / 2**24, ((bits >> 8) & 0xFFFFFF) / 2**24
            radius = scale * np.sqrt(-2.0 * np.log(1.0 - u1))
            expected += [radius * np.cos(2 * np.pi * u2), radius * np.sin(2 * np.pi * u2)]
        np.testing.assert_allclose(row, expected[:dim], rtol=0, atol=2e-6 * scale)


def test_zeros_init_gives_zero_rows_when_kind_zeros():
    table = make_table(kind="zeros")
    keys = some_keys(500)
    np.testing.assert_array_equal(initial_values(table, keys), 0.0)
    assert table.stats().rows == len(keys)


def test_scale_zero_gives_zero_rows_when_uniform_or_normal():
    for kind in ("uniform", "normal"):
        np.testing.assert_array_equal(initial_values(make_table(kind=kind, scale=0.0), some_keys(50)), 0.0)
