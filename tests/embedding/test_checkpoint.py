"""Full and delta checkpoints: exact round trips, no pickle, refusal of damaged files,
and atomicity against a save killed half way (in a child process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import torch

from tidal.config import Adagrad, Adam, CountAdmission, EmbeddingFeature, Eviction, Sgd, TableConfig
from tidal.data.batch import SparseBatch
from tidal.embedding import EmbeddingCollection, EmbeddingTable, load_tables, save_tables, save_tables_delta
from tidal.embedding.checkpoint import SEAL, sealed
from tidal.errors import CheckpointError, CorruptCheckpointError

DIM = 6
HIGH = 3000  # keys are drawn from [-HIGH/2, HIGH/2)
ALL_KEYS = np.arange(-HIGH // 2, HIGH // 2, dtype=np.int64)  # every key ever used, live or not
COUNTERS = ("rows", "lookups", "misses", "admitted", "not_admitted", "evicted", "dropped_full")
SRC = Path(__file__).resolve().parents[2] / "src"


def _config(name: str = "emb", **overrides) -> TableConfig:
    settings = dict(name=name, dim=DIM, optimizer=Adam(lr=0.01, per_row_bias_correction=True),
                    admission=CountAdmission(min_count=2, sketch_width=1024),
                    eviction=Eviction(capacity_policy="lfu", ttl_steps=4), max_rows=1200,
                    num_shards=4, seed=7)
    return TableConfig(**(settings | overrides))


def _train(table: EmbeddingTable, seed: int, n: int = 400) -> np.ndarray:
    """One training step (lookup_or_insert + apply_gradients), a function of `seed` only."""
    rng = np.random.default_rng(seed)
    keys = np.concatenate([rng.integers(-HIGH // 2, HIGH // 2, n), rng.integers(0, 50, n // 4)])
    table.lookup_or_insert(keys)
    table.apply_gradients(keys, rng.standard_normal((len(keys), table.dim)).astype(np.float32))
    return keys


def _rows(table: EmbeddingTable, keys: np.ndarray = ALL_KEYS) -> dict[str, np.ndarray]:
    block, found = table.pull_rows(keys)
    return {"found": found, "values": block.values.copy(), "state": block.state.copy(),
            "last_seen": block.last_seen.copy(), "counts": block.counts.copy()}


def _counters(table: EmbeddingTable) -> dict[str, int]:
    stats = table.stats()
    return {name: getattr(stats, name) for name in COUNTERS}


def _assert_same_table(live: EmbeddingTable, loaded: EmbeddingTable) -> None:
    assert loaded.config == live.config
    assert loaded.step == live.step
    assert loaded.clocks_after_save() == live.clocks_after_save()
    assert _counters(loaded) == _counters(live)
    expected, found = _rows(live), _rows(loaded)
    for name, array in expected.items():
        np.testing.assert_array_equal(found[name], array, err_msg=name)


def _trained(seed: int = 0, steps: int = 6, **overrides) -> EmbeddingTable:
    table = EmbeddingTable(_config(**overrides))
    for step in range(steps):
        _train(table, seed * 1000 + step)
    return table


def _shard_arrays(directory: Path, table: str = "emb") -> list[dict[str, np.ndarray]]:
    return [load_file(str(f)) for f in sorted((directory / table).glob("shard-*.safetensors"))]


# ---------------------------------------------------------------------- round trips


def test_delta_holds_rows_written_by_push_rows(tmp_path):
    table = _trained()
    table.save(tmp_path)
    source = _trained(seed=5)
    block, found = source.pull_rows(ALL_KEYS[:300])
    table.push_rows(type(block)(keys=block.keys[found], values=block.values[found], state=block.state[found],
                                last_seen=block.last_seen[found], counts=block.counts[found]))
    table.save_delta(tmp_path)
    np.testing.assert_array_equal(_rows(EmbeddingTable.load(tmp_path))["values"], _rows(table)["values"])


def test_delta_refused_when_tables_were_last_saved_elsewhere(tmp_path):
    table = _trained()
    table.save(tmp_path / "a")
    table.save(tmp_path / "b")
    with pytest.raises(CheckpointError, match="last saved to another checkpoint"):
        table.save_delta(tmp_path / "a")
    table.save_delta(tmp_path / "b")
    with pytest.raises(CheckpointError, match=r"tables \['emb'\] were never saved nor loaded \(with their optimizer "
                                              r"state\), so a delta here would miss rows; save a full checkpoint here"):
        _trained().save_delta(tmp_path / "b")


def test_a_second_writer_of_one_root_is_refused_a_delta_that_would_mix_two_histories(tmp_path):
    _trained().save(tmp_path)
    first, second = EmbeddingTable.load(tmp_path), EmbeddingTable.load(tmp_path)  # a run and its twin
    _train(first, 11)
    _train(second, 12)
    first.save_delta(tmp_path)
    with pytest.raises(CheckpointError, match=r"CHAIN.json: ends with 000002-delta, but tables \['emb'\] were last "
                                              r"saved to or loaded from \['000001-full'\]: another writer saved"):
        second.save_delta(tmp_path)
    _assert_same_table(first, EmbeddingTable.load(tmp_path))
    _train(first, 13)
    first.save_delta(tmp_path)  # the writer the chain ends with goes on
    second.save(tmp_path)  # a full checkpoint starts the chain afresh: then the other is behind
    _assert_same_table(second, EmbeddingTable.load(tmp_path))
    with pytest.raises(CheckpointError, match="last saved to another checkpoint"):
        first.save_delta(tmp_path)


def test_two_writers_saving_at_once_take_turns_and_the_second_is_refused(tmp_path, monkeypatch):
    """Without the root's lock both read the same chain, numbered their deltas alike,
    and the second replaced the first one's folder: a mixed state that loaded."""
    import threading

    import tidal.embedding.checkpoint as ckpt

    _trained().save(tmp_path)
    first, second = EmbeddingTable.load(tmp_path), EmbeddingTable.load(tmp_path)
    _train(first, 11)
    _train(second, 12)
    writing, go_on = threading.Event(), threading.Event()
    write_table = ckpt._write_table

    def slow_write(staging, table, delta):  # the first writer holds on while writing
        if table is first:
            writing.set()
            go_on.wait(10)
        return write_table(staging, table, delta)

    monkeypatch.setattr(ckpt, "_write_table", slow_write)
    saving = threading.Thread(target=first.save_delta, args=(tmp_path,))
    saving.start()
    assert writing.wait(10)
    refused = []

    def second_save():
        try:
            second.save_delta(tmp_path)
        except CheckpointError as exc:
            refused.append(str(exc))

    other = threading.Thread(target=second_save)
    other.start()
    other.join(0.5)
    assert other.is_alive()  # waiting for the first save to commit
    go_on.set()
    saving.join(10)
    other.join(10)
    assert refused and "another writer saved" in refused[0]
    _assert_same_table(first, EmbeddingTable.load(tmp_path))
    with pytest.raises(CheckpointError, match="no tables to save"):
        ckpt.save_delta(tmp_path / "fresh", [])


def test_cleanup_leaves_foreign_directories_alone(tmp_path):
    (tmp_path / "123456-my-notes").mkdir()
    table = _trained()
    table.save(tmp_path)
    table.save(tmp_path)
    assert (tmp_path / "123456-my-notes").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith("-full")) == ["000002-full"]



def test_full_save_load_reproduces_table_with_adam_admission_lfu(tmp_path):
    table = _trained()
    assert table.evict() > 0
    _train(table, 99)
    assert table.stats().not_admitted > 0 and table.stats().evicted > 0 and table.stats().rows > 0
    table.save(tmp_path)
    _assert_same_table(table, EmbeddingTable.load(tmp_path))


@pytest.mark.parametrize("optimizer", [Adam(lr=0.01, per_row_bias_correction=True), Sgd(lr=0.1), Adagrad(lr=0.1)],
                         ids=["adam", "sgd", "adagrad"])
def test_full_plus_deltas_reproduce_live_table_with_evictions_and_reinsertion(tmp_path, optimizer):
    table = _trained(steps=6, eviction=Eviction(capacity_policy="lfu", ttl_steps=10), max_rows=600, optimizer=optimizer)
    at_save = np.arange(30, 60, dtype=np.int64)
    table.lookup_or_insert(at_save)
    table.save(tmp_path)
    for round_ in range(3):
        # a delta holds the rows seen since the save and those of the save's own step
        touched = [at_save] + [_train(table, 100 * round_ + i, n=150) for i in range(3)]
        evicted = table.evict()
        removed_keys = np.arange(0, 30, dtype=np.int64) + round_  # hot keys, surely present
        removed = table.remove(removed_keys)
        assert evicted > 0 and removed > 0
        # the removed keys come back (twice, so count admission lets them in again)
        touched += [_train(table, 100 * round_ + 50 + i, n=150) for i in range(2)]
        for _ in range(2):
            table.lookup_or_insert(removed_keys)
        touched.append(removed_keys)
        at_save = removed_keys
        touched_keys = np.unique(np.concatenate(touched))
        live_touched = touched_keys[table.pull_rows(touched_keys)[1]]  # before: pulls count as lookups
        table.save_delta(tmp_path)

        delta = _shard_arrays(sorted(tmp_path.glob("*-delta"))[-1])
        delta_keys = np.concatenate([a["keys"] for a in delta])
        assert np.array_equal(np.sort(delta_keys), live_touched)
        assert 0 < len(delta_keys) < table.stats().rows  # fewer than a full save would hold
        assert sum(len(a["evicted"]) for a in delta) == evicted + removed
        assert set(removed_keys) <= set(np.concatenate([a["evicted"] for a in delta]))

    full = _shard_arrays(next(tmp_path.glob("*-full")))
    assert all("evicted" not in a for a in full) and sum(len(a["keys"]) for a in full) > 0
    assert len(list(tmp_path.glob("0*"))) == 4  # full + 3 deltas, all in the chain

    loaded = EmbeddingTable.load(tmp_path)
    _assert_same_table(table, loaded)
    for t in (table, loaded):  # one more identical step: same clocks, same optimizer step
        _train(t, 12345)
    _assert_same_table(table, loaded)


@pytest.mark.parametrize("cap", [{"max_rows": 500}, {"memory_bytes": 50_000}],
                         ids=["max_rows", "memory_bytes"])
def test_a_values_only_load_holds_the_values_and_evicts_as_the_full_load_but_keeps_no_state(tmp_path, cap):
    table = _trained(steps=6, eviction=Eviction(capacity_policy="lfu", ttl_steps=3), **({"max_rows": None} | cap))
    table.save(tmp_path)
    _train(table, 77)
    table.save_delta(tmp_path)
    full, values_only = load_tables(tmp_path)["emb"], load_tables(tmp_path, values_only=True)["emb"]
    assert full.row_cap == 500  # what 50,000 bytes pay for at 100 bytes a row (values, Adam's state, index)
    assert values_only.config == full.config.model_copy(update={"optimizer": Sgd(), "max_rows": 500,
                                                                "memory_bytes": None})
    assert values_only.stats().state_bytes == 0 < full.stats().state_bytes
    assert values_only.clocks() == full.clocks() and _counters(values_only) == _counters(full)
    for loaded in (full, values_only):
        assert loaded.evict() > 0
    expected, found = _rows(full), _rows(values_only)
    for name in ("found", "values", "last_seen", "counts"):
        np.testing.assert_array_equal(found[name], expected[name], err_msg=name)
    keys, values = values_only.values_by_key()
    assert np.all(keys[1:] > keys[:-1]) and np.array_equal(keys, ALL_KEYS[expected["found"]])
    np.testing.assert_array_equal(values, expected["values"][expected["found"]])
    chain = (tmp_path / "CHAIN.json").read_text()
    for save in (values_only.save_delta, values_only.save):  # an audit's find: a full save replaced Adam's state
        with pytest.raises(CheckpointError, match=r"tables \['emb'\] were loaded with values_only=True, without "
                                                  r"their optimizer state: saved, they would train on as plain SGD"):
            save(tmp_path)
    assert (tmp_path / "CHAIN.json").read_text() == chain and EmbeddingTable.load(tmp_path).stats().state_bytes > 0


@pytest.mark.parametrize("optimizer", [Sgd(lr=0.1), Adagrad(lr=0.1)], ids=["sgd", "adagrad"])
@pytest.mark.parametrize("threads", [1, 2])
def test_rows_looked_up_before_a_save_and_updated_after_are_in_the_next_delta(tmp_path, threads, optimizer):
    """An update marks its rows seen again when a save came after the step of its lookup
    (here a later batch's lookup came first, as in a pipeline, so the lookup's step is
    before the save's): plain SGD on one thread updates in place, otherwise shard by
    shard (Adagrad from the rows its lookup listed, SGD from the keys' handles)."""
    config = _config(num_shards=2, optimizer=optimizer, admission=None, eviction=None, max_rows=None)
    collection = EmbeddingCollection([config], [EmbeddingFeature(name="f", table="emb")], threads=threads)
    table = collection.tables[0]
    keys = np.arange(3000, dtype=np.int64)
    batch = SparseBatch(keys=["f"], values=keys, lengths=np.ones(3000, np.int32), batch_size=3000)
    _, ctx = collection.forward(batch)
    table.lookup_or_insert(keys[:1])  # the next batch's lookup
    table.save(tmp_path)
    collection.backward(ctx, torch.ones(3000, 1, table.dim))
    table.save_delta(tmp_path)
    assert table.stats().rows == 3000
    np.testing.assert_array_equal(EmbeddingTable.load(tmp_path).lookup(keys), table.lookup(keys))


def test_lfu_count_of_new_key_starts_at_one_when_row_was_freed_before_save(tmp_path):
    """A freed row keeps its LFU count; a new key given that row inherits it on the live
    table but not on the loaded one (no free rows there), so the two diverge."""
    table = EmbeddingTable(_config(admission=None, num_shards=1))
    for _ in range(10):
        table.lookup_or_insert(np.array([5, 6]))
    table.remove(np.array([5]))
    table.save(tmp_path)
    loaded = EmbeddingTable.load(tmp_path)
    for t in (table, loaded):
        t.lookup_or_insert(np.array([7]))
    assert loaded.pull_rows(np.array([7]))[0].counts.tolist() == [1]
    assert table.pull_rows(np.array([7]))[0].counts.tolist() == [1]


@pytest.mark.parametrize("case", ["empty_table", "delta_with_nothing_touched", "delta_only_removals"])
def test_load_succeeds_when_shard_has_no_rows(tmp_path, case):
    table = EmbeddingTable(_config()) if case == "empty_table" else _trained(steps=3)
    table.save(tmp_path)
    if case != "empty_table":
        if case == "delta_only_removals":
            table.remove(np.arange(-HIGH // 2, HIGH // 2))
        table.save_delta(tmp_path)
    _assert_same_table(table, EmbeddingTable.load(tmp_path))


def test_save_tables_round_trips_several_tables_with_deltas(tmp_path):
    tables = [_trained(1, name="users"),
              _trained(2, name="items", optimizer=Adagrad(lr=0.1), admission=None, eviction=None,
                       max_rows=None, num_shards=2),
              _trained(3, name="tags", optimizer=Sgd(lr=0.5), admission=None, num_shards=8)]
    assert save_tables(tmp_path, tables).name == "000001-full"
    for i in range(2):
        for t in tables:
            _train(t, 500 + i)
        tables[0].evict()
        assert save_tables_delta(tmp_path, tables).name == f"00000{i + 2}-delta"
    loaded = load_tables(tmp_path)
    assert sorted(loaded) == ["items", "tags", "users"]
    for t in tables:
        _assert_same_table(t, loaded[t.name])
    with pytest.raises(CheckpointError, match="same tables"):
        save_tables_delta(tmp_path, tables[:2])


def test_a_loaded_table_reserves_no_rows_whatever_its_manifest_says(tmp_path):
    """A manifest's reservation would allocate memory that no file bounds (an audit's
    hostile checkpoint asked for 51 GB): the rows loaded take what they need."""
    table = EmbeddingTable(TableConfig(name="users", dim=4, reserve_rows=40_000, num_shards=2))
    table.lookup_or_insert(np.arange(10))
    save_tables(tmp_path, [table])
    loaded = load_tables(tmp_path)["users"]
    assert loaded.config.reserve_rows == 0 and loaded.stats().rows == 10
    assert loaded.stats().allocated_bytes < table.stats().allocated_bytes
    np.testing.assert_array_equal(loaded.lookup(np.arange(10)), table.lookup(np.arange(10)))


def test_save_tables_refuses_a_table_name_twice_and_leaves_nothing_behind(tmp_path):
    table = _trained(1, name="users")
    with pytest.raises(CheckpointError, match=r"\['users'\] more than once"):
        save_tables(tmp_path / "ckpt", [table, _trained(2, name="users")])
    assert not (tmp_path / "ckpt").exists()


def test_failed_save_removes_its_staging_folder_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    table = _trained(1, name="users")
    save_tables(tmp_path, [table])

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("tidal.embedding.checkpoint.save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_tables(tmp_path, [table])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000001-full", "CHAIN.json"]
    _assert_same_table(table, load_tables(tmp_path)["users"])


def test_removed_keys_are_kept_for_a_delta_only_up_to_the_rows_a_shard_holds(tmp_path):
    """A run that never writes deltas must not keep every evicted key: past what a shard
    holds (at least 65,536 keys), the record is dropped and a delta refused until a full
    save."""
    table = EmbeddingTable(_config(admission=None, eviction=None, max_rows=None, num_shards=1))
    table.lookup_or_insert(np.arange(70_000, dtype=np.int64))
    table.save(tmp_path)
    table.remove(np.arange(60_000, dtype=np.int64))
    assert table._shards[0].evicted_count == 60_000  # kept: a delta can list them
    table.remove(np.arange(60_000, 70_000, dtype=np.int64))
    assert table._shards[0].evicted == [] and table._shards[0].evicted_dropped
    with pytest.raises(CheckpointError, match=r"shard 0 lost more rows since the last save \(70000\) than it holds"):
        table.save_delta(tmp_path)
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["000001-full", "CHAIN.json"]
    table.lookup_or_insert(np.arange(5, dtype=np.int64))
    table.save(tmp_path)
    table.remove(np.arange(2, dtype=np.int64))
    table.save_delta(tmp_path)
    _assert_same_table(table, EmbeddingTable.load(tmp_path))


def test_checkpoint_files_are_json_or_safetensors_without_pickle(tmp_path):
    table = _trained()
    table.save(tmp_path)
    _train(table, 7)
    table.remove(np.arange(10))
    table.save_delta(tmp_path)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"CHAIN.json", "manifest.json"}
    for path in files:
        if path.suffix == ".json":
            assert isinstance(json.loads(path.read_text()), dict)
        else:
            assert path.suffix == ".safetensors", path
            assert all(isinstance(a, np.ndarray) for a in load_file(str(path)).values())


# ---------------------------------------------------------------------- damaged files


@pytest.fixture
def saved(tmp_path) -> Path:
    table = _trained(steps=3)
    table.save(tmp_path)
    _train(table, 8)
    table.save_delta(tmp_path)
    return tmp_path


def _shard_file(root: Path, kind: str = "delta") -> Path:
    return next(root.glob(f"*-{kind}")) / "emb" / "shard-01.safetensors"


@pytest.mark.parametrize("kind", ["full", "delta"])
def test_load_refuses_shard_when_bytes_flipped(saved, kind):
    path = _shard_file(saved, kind)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="does not match") as error:
        EmbeddingTable.load(saved)
    assert str(path) in str(error.value)


def _resealed_shard(root: Path, change) -> tuple[Path, dict]:  # type: ignore[no-untyped-def]
    """The full checkpoint's shard file after `change` of its arrays, resealed by hand (a
    seal proves no more than that the files agree), and its arrays."""
    from safetensors.numpy import save_file

    from tidal.embedding.checkpoint import fingerprint

    path = _shard_file(root, "full")
    arrays = load_file(str(path))
    change(arrays)
    save_file(arrays, str(path))
    manifest = path.parent.parent / "manifest.json"
    _edit_json(manifest, lambda c: c["tables"]["emb"]["files"].update({f"emb/{path.name}": fingerprint(path)}))
    return path, arrays


@pytest.mark.parametrize("name", ["values", "state"])
def test_load_refuses_a_shard_holding_numbers_that_are_not_finite(tmp_path, name):
    """No trained table holds a NaN, and one would be served and trained from for good."""
    _trained(steps=3, optimizer=Adagrad(lr=0.1)).save(tmp_path)
    path, arrays = _resealed_shard(tmp_path, lambda arrays: arrays[name].__setitem__((1, 0), np.nan))
    with pytest.raises(CorruptCheckpointError, match=rf"{path}: '{name}' holds NaN or infinite numbers in 1 row \(the "
                                                     rf"first of key {int(arrays['keys'][1])}\), which training never"):
        EmbeddingTable.load(tmp_path)


def test_load_refuses_a_shard_holding_a_negative_sum_of_squares(tmp_path):
    _trained(steps=3, optimizer=Adagrad(lr=0.1)).save(tmp_path)
    path, arrays = _resealed_shard(tmp_path, lambda arrays: arrays["state"].__setitem__((2, 1), -1.0))
    with pytest.raises(CorruptCheckpointError, match=rf"{path}: 'state' holds a negative sum of squares or step in 1 "
                                                     rf"row \(the first of key {int(arrays['keys'][2])}\), which "
                                                     rf"training never writes"):
        EmbeddingTable.load(tmp_path)


@pytest.mark.parametrize("state", [np.zeros((1, 3), np.float32), np.zeros((1, 12), np.float64)],
                         ids=["narrower", "float64"])
def test_a_values_only_load_still_refuses_a_state_of_another_shape_or_type(tmp_path, state):
    _trained(steps=3, optimizer=Adagrad(lr=0.1)).save(tmp_path)
    path, arrays = _resealed_shard(tmp_path, lambda arrays: arrays.__setitem__(
        "state", np.resize(state, (len(arrays["keys"]), state.shape[1]))))
    n = len(arrays["keys"])
    with pytest.raises(CorruptCheckpointError, match=rf"{path}: 'state' should be float32 \({n}, 6\), "
                                                     rf"got {state.dtype} \({n}, {state.shape[1]}\)"):
        load_tables(tmp_path, values_only=True)


def test_load_refuses_a_shard_holding_a_key_twice_naming_it(tmp_path):
    _trained(steps=3).save(tmp_path)
    path, arrays = _resealed_shard(tmp_path, lambda arrays: arrays["keys"].__setitem__(1, arrays["keys"][0]))
    with pytest.raises(CorruptCheckpointError, match=rf"{path}: 'keys' holds key {int(arrays['keys'][0])} twice"):
        EmbeddingTable.load(tmp_path)


def test_a_table_whose_rows_overflowed_is_not_saved_and_the_checkpoints_before_still_load(tmp_path):
    table = EmbeddingTable(TableConfig(name="emb", dim=4, optimizer=Sgd(lr=10.0), num_shards=1))
    table.lookup_or_insert(np.array([1, 2, 3]))
    table.save(tmp_path)
    table.apply_gradients(np.array([3]), np.full((1, 4), 3e38, np.float32))  # finite, but lr times it is not
    for save in (table.save_delta, table.save):
        with pytest.raises(CheckpointError, match=r"table 'emb': values holds NaN or infinite numbers in 1 row \(the "
                                                  r"first of key 3\): an update overflowed float32"):
            save(tmp_path)
    assert EmbeddingTable.load(tmp_path).stats().rows == 3 and not list(tmp_path.glob(".tmp-*"))


def test_load_refuses_shard_when_truncated(saved):
    path = _shard_file(saved)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])
    with pytest.raises(CorruptCheckpointError, match="bytes.*truncated") as error:
        EmbeddingTable.load(saved)
    assert str(path) in str(error.value)


def test_load_refuses_shard_when_deleted(saved):
    path = _shard_file(saved, "full")
    path.unlink()
    with pytest.raises(CorruptCheckpointError, match="missing") as error:
        EmbeddingTable.load(saved)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("name", ["CHAIN.json", "000001-full/manifest.json", "000002-delta/manifest.json"])
def test_load_refuses_json_when_garbled(saved, name):
    path = saved / name
    path.write_text(path.read_text()[:40])
    with pytest.raises(CorruptCheckpointError, match="JSON") as error:
        EmbeddingTable.load(saved)
    assert str(path) in str(error.value)


def _edit_json(path: Path, change) -> None:  # type: ignore[no-untyped-def]
    """Change a JSON file; a sealed one is sealed again, so that what its reader checks
    beyond the seal is what is tested."""
    content = json.loads(path.read_text())
    change(content)
    path.write_text(json.dumps(sealed(content) if SEAL in content else content))


@pytest.mark.parametrize("name, change, reason", [
    ("CHAIN.json", lambda c: c["chain"].append("../elsewhere/000001-full"), "which are not checkpoint folders"),
    ("000002-delta/manifest.json", lambda c: c["tables"]["emb"]["files"].update({"shard-00.safetensors": {}}),
     "each with bytes and sha256"),
    ("000002-delta/manifest.json", lambda c: c["tables"]["emb"].update(files=[]), "each with bytes and sha256"),
    ("000002-delta/manifest.json", lambda c: c["tables"]["emb"]["clocks"].update(step=-5), "clocks need integer"),
])
def test_load_refuses_a_manifest_or_chain_edited_out_of_shape(saved, name, change, reason):
    _edit_json(saved / name, change)
    with pytest.raises(CorruptCheckpointError, match=reason) as error:
        EmbeddingTable.load(saved)
    assert str(saved / name) in str(error.value)


@pytest.fixture
def chain_of_two_deltas(saved) -> Path:
    table = EmbeddingTable.load(saved)
    _train(table, 9)
    table.save_delta(saved)
    return saved


def _other_chains_delta(root: Path) -> None:
    """Put in `root` the first delta of another chain of a table with the same config."""
    other = _trained(seed=4, steps=3)
    other.save(root.parent / "other")
    _train(other, 5)
    other.save_delta(root.parent / "other")
    (root / "000002-delta" / "manifest.json").write_bytes((root.parent / "other" / "000002-delta" / "manifest.json").read_bytes())
    for shard in (root / "000002-delta" / "emb").iterdir():
        shard.write_bytes((root.parent / "other" / "000002-delta" / "emb" / shard.name).read_bytes())


def _as_full(root: Path) -> None:
    _edit_json(root / "000002-delta" / "manifest.json", lambda c: c.update(kind="full"))


@pytest.mark.parametrize("damage, reason", [
    (lambda root: _edit_json(root / "CHAIN.json", lambda c: c["chain"].__setitem__(2, "000002-delta")),
     r"lists 000002-delta where 000003-delta should come: a chain is one full checkpoint, then deltas numbered"),
    (lambda root: _edit_json(root / "CHAIN.json", lambda c: c["chain"].__setitem__(1, "000003-delta")),
     r"lists 000003-delta where 000002-delta should come"),
    (lambda root: _edit_json(root / "CHAIN.json", lambda c: c["chain"].__setitem__(2, "000004-delta")),
     r"lists 000004-delta where 000003-delta should come"),
    (lambda root: _edit_json(root / "CHAIN.json", lambda c: c["chain"].insert(1, "000001-full")),
     r"lists 000001-full where 000002-delta should come"),
    (lambda root: _edit_json(root / "CHAIN.json", lambda c: c.update(format="tidal-embedding-checkpoinu")),
     r"expected format 'tidal-embedding-checkpoint' version 1 or 2, got 'tidal-embedding-checkpoinu' version 2"),
    (lambda root: _edit_json(root / "CHAIN.json", lambda c: c.update(version=3)), r"got .* version 3"),
    (lambda root: _edit_json(root / "CHAIN.json", lambda c: c.pop("version")), r"got .* version None"),
    (_other_chains_delta, r"lists 000002-delta, a delta of another full checkpoint \(id \w{12}\.\.\., the chain's"),
    (_as_full, r"lists 000002-delta, whose manifest.json is of a full checkpoint, not a delta one"),
])
def test_load_refuses_a_chain_that_no_save_writes_naming_chain_json(chain_of_two_deltas, damage, reason):
    """One flipped bit of CHAIN.json (000003 -> 000002) once loaded the state of the save before."""
    damage(chain_of_two_deltas)
    with pytest.raises(CorruptCheckpointError, match=reason) as error:
        EmbeddingTable.load(chain_of_two_deltas)
    assert str(chain_of_two_deltas / "CHAIN.json") in str(error.value)


def test_load_refuses_a_manifest_edited_without_its_seal_and_reads_one_written_before_seals(saved):
    path = saved / "000002-delta" / "manifest.json"
    text = path.read_text()
    content = json.loads(text)
    content["tables"]["emb"]["config"]["optimizer"]["lr"] *= 2  # still valid JSON, still a valid config
    path.write_text(json.dumps(content))
    with pytest.raises(CorruptCheckpointError, match="manifest.json: altered or damaged: its content's sha256"):
        EmbeddingTable.load(saved)
    older = {**json.loads(text), "version": 1}
    del older[SEAL]
    path.write_text(json.dumps(older))
    EmbeddingTable.load(saved)


def test_load_raises_checkpoint_error_when_root_missing(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        EmbeddingTable.load(tmp_path / "nowhere")
    with pytest.raises(CheckpointError):
        load_tables(tmp_path / "nowhere")


# ---------------------------------------------------------------------- killed saves

_CHILD = """
import os, signal, sys
import numpy as np
from safetensors.numpy import save
from tidal.embedding import checkpoint
from tidal.embedding.table import EmbeddingTable

root, mode = sys.argv[1], sys.argv[2]
table = EmbeddingTable.load(root)
for seed in range(3):  # train a bit so the new save differs from the old one
    rng = np.random.default_rng(seed)
    keys = rng.integers(-1500, 1500, 400)
    table.lookup_or_insert(keys)
    table.apply_gradients(keys, rng.standard_normal((len(keys), table.dim)).astype(np.float32))

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if mode == "shard":  # half of the second shard file is written, then the process dies
    written = []
    real_save_file = checkpoint.save_file
    def save_file(arrays, path, *args, **kwargs):
        written.append(path)
        if len(written) == 2:
            data = save(arrays)
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
            die()
        return real_save_file(arrays, path, *args, **kwargs)
    checkpoint.save_file = save_file
else:  # the new directory is in place, CHAIN.json is not yet replaced
    realwrite_json_atomic = checkpoint.write_json_atomic
    def write_json(path, content):
        if path.name == "CHAIN.json":
            die()
        return realwrite_json_atomic(path, content)
    checkpoint.write_json_atomic = write_json
checkpoint.save(root, [table])
print("save finished, should have been killed")
"""


def _kill_a_save(root: Path, mode: str) -> None:
    paths = [str(SRC)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(paths)}
    child = subprocess.run([sys.executable, "-c", _CHILD, str(root), mode], env=env,
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == -9, child.stdout + child.stderr


@pytest.fixture
def chain_then_killed_save(tmp_path, request):
    """(live table, rows before the child, root) after a full + delta save and a killed save."""
    table = _trained(steps=4)
    table.save(tmp_path)
    _train(table, 9)
    table.evict()
    table.save_delta(tmp_path)
    before, chain = _rows(table), (tmp_path / "CHAIN.json").read_text()
    _kill_a_save(tmp_path, request.param)
    assert (tmp_path / "CHAIN.json").read_text() == chain
    leftover = ".tmp-000003-full-" if request.param == "shard" else "000003-full"
    assert any(p.name.startswith(leftover) for p in tmp_path.iterdir())
    return table, before, tmp_path


@pytest.mark.parametrize("chain_then_killed_save", ["shard", "chain"], indirect=True)
def test_killed_save_leaves_previous_checkpoint_loadable(chain_then_killed_save):
    _, before, root = chain_then_killed_save
    after = _rows(EmbeddingTable.load(root))
    for name, array in before.items():
        np.testing.assert_array_equal(after[name], array, err_msg=name)


@pytest.mark.parametrize("save", ["save", "save_delta"])
@pytest.mark.parametrize("chain_then_killed_save", ["shard", "chain"], indirect=True)
def test_save_after_killed_save_succeeds_and_cleans_up(chain_then_killed_save, save):
    table, _, root = chain_then_killed_save
    _train(table, 10)
    getattr(table, save)(root)  # numbered 000003 like the killed one
    kept = ["000003-full"] if save == "save" else ["000001-full", "000002-delta", "000003-delta"]
    assert sorted(p.name for p in root.iterdir()) == kept + ["CHAIN.json"]
    _assert_same_table(table, EmbeddingTable.load(root))


def test_a_removal_or_an_update_during_a_save_waits_for_it_and_the_next_delta_holds_it(tmp_path, monkeypatch):
    """Saves took no hold on the table: a removal that came half way was in no delta, and
    a load brought the keys back for good (an audit's find)."""
    table = EmbeddingTable(TableConfig(name="t", dim=4, num_shards=2, optimizer=Sgd(lr=0.5)))
    table.lookup_or_insert(np.arange(100))
    save_tables(tmp_path, [table])
    snapshot, changes = EmbeddingTable.snapshot_shard, []

    def snapshot_then_change(self, s, *, since_save):  # type: ignore[no-untyped-def]
        arrays = snapshot(self, s, since_save=since_save)
        if not changes:  # after the first shard: a removal and an update from other threads
            changes.extend([threading.Thread(target=self.remove, args=(np.arange(50),)),
                            threading.Thread(target=self.apply_gradients,
                                             args=(np.arange(50, 60), np.ones((10, 4), np.float32)))])
            for thread in changes:
                thread.start()
                thread.join(0.2)
                assert thread.is_alive()  # it waits for the save
        return arrays

    monkeypatch.setattr(EmbeddingTable, "snapshot_shard", snapshot_then_change)
    save_tables_delta(tmp_path, [table])
    for thread in changes:
        thread.join()
    monkeypatch.undo()
    save_tables_delta(tmp_path, [table])  # at a safe point: it holds what came during the last save
    loaded = load_tables(tmp_path)["t"]
    keys, values = table.values_by_key()
    loaded_keys, loaded_values = loaded.values_by_key()
    assert len(keys) == 50
    np.testing.assert_array_equal(loaded_keys, keys)
    np.testing.assert_array_equal(loaded_values, values)
