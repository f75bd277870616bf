"""Online updates: deltas exported into a bundle, checked on load, applied by a running server."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import tritonclient.http as triton
from hypothesis import given, settings
from hypothesis import strategies as st
from serving_helpers import file_rows, serving_config, until, with_user_of

from tidal.cli import main
from tidal.compile import AOTI_MISSING, ONNX_MISSING, aoti_available, onnx_available
from tidal.config import RunConfig
from tidal.embedding import EmbeddingTable
from tidal.errors import CheckpointError, ConfigError, CorruptCheckpointError
from tidal.embedding.checkpoint import SEAL, sealed
from tidal.runtime import Trainer, checkpoint
from tidal.serving import Piece, Predictor, Service, export, export_delta, load_bundle, start_server
from tidal.serving import predictor as predictor_module
from tidal.serving.bundle import read_deltas, readable_deltas
from tidal.serving.delta import apply_rows, delta_names, diff_rows, merge_changes
from tidal.serving.protocol import infer_request, input_specs


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run exported as a bundle half way (`base`), then trained to its end (`full`:
    the full export of its last checkpoint)."""
    root = tmp_path_factory.mktemp("delta")
    saved = serving_config(root).model_dump()
    config = RunConfig(**{**saved, "training": {**saved["training"], "checkpoint_every": 8}})
    Trainer(config).fit(max_steps=8)
    base = export(config.training.run_dir, root / "base")
    compiled = {b: export(config.training.run_dir, root / f"{b}-base", backend=b) for b, available
                in (("onnxruntime", onnx_available()), ("aotinductor", aoti_available())) if available}
    trainer = Trainer(config)
    trainer.fit(resume=True)
    return SimpleNamespace(run_dir=Path(config.training.run_dir), base=base, compiled=compiled, config=config,
                           trainer=trainer, full=export(config.training.run_dir, root / "full"))


@pytest.fixture
def bundle_dir(run, tmp_path):
    return Path(shutil.copytree(run.base, tmp_path / "bundle"))


_LATER = itertools.count(1)


def _delta(run, bundle_dir: Path) -> Path:  # type: ignore[no-untyped-def]
    """Export into `bundle_dir` a delta of the run's last checkpoint, saved again at a
    later step each time (the same rows and weights): a bundle that serves a checkpoint
    takes no second delta of that very one."""
    return export_delta(_later_checkpoint(run.run_dir, next(_LATER)), bundle_dir)


def _later_checkpoint(run_dir: Path, steps: int, run_id: str | None = None) -> Path:
    """A copy of the run's latest checkpoint whose trainer.json says it was saved
    `steps` steps later (by another run, with `run_id`)."""
    source = checkpoint.latest(run_dir)
    meta = json.loads((source / "trainer.json").read_text())
    meta["position"]["step"] += steps
    meta["run_id"] = run_id or meta["run_id"]
    meta.pop(SEAL)
    copy = Path(shutil.copytree(source, run_dir.parent / "later" / str(steps) / source.name))
    (copy / "trainer.json").write_text(json.dumps(sealed(meta)))
    return copy


def _same_rows(a, b) -> None:  # type: ignore[no-untyped-def]
    for name in b.tables:
        np.testing.assert_array_equal(a.tables[name][0], b.tables[name][0])
        np.testing.assert_array_equal(a.tables[name][1], b.tables[name][1])


# ---------------------------------------------------------------------- the rows of a delta

_ROWS = st.dictionaries(st.integers(-(2**63), 2**63 - 1), st.integers(0, 3), max_size=40)


def _table(rows: dict[int, int], dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """Sorted keys and values [n, 2]; value code 3 is a row holding NaN."""
    keys = np.array(sorted(rows), dtype=np.int64)
    values = np.array([[rows[k], np.nan if rows[k] == 3 else -rows[k]] for k in keys], dtype=dtype).reshape(-1, 2)
    return keys, values


@settings(max_examples=200, deadline=None)
@given(old=_ROWS, new=_ROWS, dtype=st.sampled_from([np.float32, np.float16]))
def test_a_deltas_rows_turn_the_old_rows_into_the_new_ones(old, new, dtype):
    old_keys, old_values = _table(old, dtype)
    keys, values = _table(new, dtype)
    changes = diff_rows(old_keys, old_values, keys, values)
    applied_keys, applied_values = apply_rows(old_keys, old_values, changes)
    np.testing.assert_array_equal(applied_keys, keys)
    assert applied_values.tobytes() == values.tobytes()  # bit for bit, NaN rows included
    assert set(changes.removed.tolist()) == set(old) - set(new)
    assert set(changes.keys.tolist()) == {k for k in new if old.get(k) != new[k]}  # a NaN row kept is unchanged


@settings(max_examples=200, deadline=None)
@given(old=_ROWS, mid=_ROWS, new=_ROWS)
def test_two_deltas_merged_make_the_same_rows_as_applied_one_after_the_other(old, mid, new):
    tables = [_table(rows, np.float32) for rows in (old, mid, new)]
    first, then = diff_rows(*tables[0], *tables[1]), diff_rows(*tables[1], *tables[2])
    keys, values = apply_rows(*tables[0], merge_changes(first, then))
    np.testing.assert_array_equal(keys, tables[2][0])
    assert values.tobytes() == tables[2][1].tobytes()


def test_delta_folders_are_read_in_sequence_order_past_six_digits():
    names = ["000010", "1000000", ".tmp-000011-42", "999999", "notes", "000002"]
    assert delta_names(names) == ["000002", "000010", "999999", "1000000"]


# ---------------------------------------------------------------------- export and load


def test_the_base_and_its_delta_serve_what_a_full_export_of_the_checkpoint_does(run, bundle_dir):
    base = load_bundle(bundle_dir)
    assert base.position.sequence == 0 and base.position.base == base.manifest["content_sha256"]
    folder = _delta(run, bundle_dir)
    assert folder == bundle_dir / "deltas" / "000001"
    served, full = load_bundle(bundle_dir), load_bundle(run.full)
    _same_rows(served, full)
    pooled, dense = torch.randn(16, 28, 8), torch.randn(16, 13)
    assert torch.equal(served.program.module()(pooled, dense), full.program.module()(pooled, dense))
    assert not torch.equal(base.program.module()(pooled, dense), full.program.module()(pooled, dense))
    manifest = json.loads((folder / "manifest.json").read_text())
    old_keys, old_values = base.tables["ids"]
    keys, values = full.tables["ids"]
    stayed = np.isin(keys, old_keys)
    changed = (~stayed).sum() + (values[stayed] != old_values[np.isin(old_keys, keys)]).any(axis=1).sum()
    assert manifest["tables"] == {"ids": {"changed": int(changed), "removed": 0}} and 0 < changed < len(keys)
    assert (manifest["sequence"], manifest["previous"], manifest["base"]) == (1, None, base.position.base)
    assert served.position.sequence == 1 and served.position.seal == manifest["content_sha256"]


def test_exports_read_the_tables_without_their_optimizer_state(run, bundle_dir, tmp_path, monkeypatch):
    """A bundle serves values only: an export holding the Adagrad state too took twice the memory."""
    state_bytes, values_by_key = [], EmbeddingTable.values_by_key

    def recording(table):  # type: ignore[no-untyped-def]
        state_bytes.append(table.stats().state_bytes)
        return values_by_key(table)

    monkeypatch.setattr(EmbeddingTable, "values_by_key", recording)
    full = load_bundle(export(run.run_dir, tmp_path / "again"))
    _delta(run, bundle_dir)
    assert state_bytes == [0, 0] and run.config.tables[0].optimizer.kind == "adagrad"
    _same_rows(full, load_bundle(run.full))


def test_a_delta_of_an_unchanged_checkpoint_changes_no_row_and_follows_the_one_before(run, bundle_dir):
    first = json.loads((_delta(run, bundle_dir) / "manifest.json").read_text())
    second = json.loads((_delta(run, bundle_dir) / "manifest.json").read_text())
    assert second["tables"] == {"ids": {"changed": 0, "removed": 0}}
    assert (second["sequence"], second["previous"]) == (2, first["content_sha256"])
    assert load_bundle(bundle_dir).position.sequence == 2
    _same_rows(load_bundle(bundle_dir), load_bundle(run.full))


def test_keys_the_checkpoint_no_longer_holds_are_removed_by_the_delta(run, bundle_dir, monkeypatch):
    rows, gone = EmbeddingTable.values_by_key, load_bundle(bundle_dir).tables["ids"][0][:10]
    monkeypatch.setattr(EmbeddingTable, "values_by_key",
                        lambda table: tuple(a[~np.isin(rows(table)[0], gone)] for a in rows(table)))
    manifest = json.loads((_delta(run, bundle_dir) / "manifest.json").read_text())
    assert manifest["tables"]["ids"]["removed"] == 10
    keys, _ = load_bundle(bundle_dir).tables["ids"]
    assert not np.isin(gone, keys).any() and len(keys) == len(load_bundle(run.full).tables["ids"][0]) - 10
    predictor = Predictor(load_bundle(run.base))
    applied = predictor.update(read_deltas(bundle_dir, predictor.position, predictor.config))
    assert (applied.rows_changed, applied.rows_removed) == (manifest["tables"]["ids"]["changed"], 10)
    table = predictor.collection.table("ids")
    assert not table.lookup(gone).any() and table.stats().rows == len(keys)


def test_a_damaged_or_altered_delta_is_refused_by_name(run, bundle_dir):
    folder = _delta(run, bundle_dir)
    table = folder / "tables" / "ids.safetensors"
    table.write_bytes(table.read_bytes()[:-8])
    with pytest.raises(CorruptCheckpointError, match=rf"{table}: .* bytes with sha256 .*: corrupt or altered"):
        load_bundle(bundle_dir)
    shutil.rmtree(folder)
    manifest_file = _delta(run, bundle_dir) / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest_file.write_text(json.dumps({**manifest, "sequence": 1, "tables": {}}))
    with pytest.raises(CorruptCheckpointError, match=rf"{manifest_file}: altered or damaged"):
        load_bundle(bundle_dir)
    manifest_file.unlink()
    with pytest.raises(CorruptCheckpointError, match=rf"{manifest_file}: missing; the bundle is incomplete"):
        load_bundle(bundle_dir)


def test_the_deltas_before_one_past_the_json_limits_are_read_and_it_is_named(run, bundle_dir):
    """A number of 4,300 digits or deep nesting escaped as a bare ValueError or
    RecursionError, which held back the good deltas before it."""
    base = load_bundle(bundle_dir).position
    first = _delta(run, bundle_dir)
    manifest_file = _delta(run, bundle_dir) / "manifest.json"
    for damaged in ('{"sequence": ' + "1" * 5000 + "}", "[" * 100_000):
        manifest_file.write_text(damaged)
        deltas, stopped = readable_deltas(bundle_dir, base, run.config)
        assert [d.path for d in deltas] == [first]
        assert isinstance(stopped, CorruptCheckpointError) and f"{manifest_file}: not valid JSON" in str(stopped)


def test_a_delta_or_manifest_reached_through_a_link_out_of_the_bundle_is_refused(run, bundle_dir, tmp_path):
    base = load_bundle(bundle_dir).position
    folder = _delta(run, bundle_dir)
    outside = Path(shutil.move(folder, tmp_path / "elsewhere"))
    folder.symlink_to(outside, target_is_directory=True)
    deltas, stopped = readable_deltas(bundle_dir, base, run.config)
    assert deltas == [] and f"{folder / 'manifest.json'}: leads outside {bundle_dir}" in str(stopped)
    folder.unlink()
    manifest = bundle_dir / "manifest.json"
    shutil.move(manifest, tmp_path / "manifest.json")
    manifest.symlink_to(tmp_path / "manifest.json")
    with pytest.raises(CorruptCheckpointError, match=rf"{manifest}: leads outside {bundle_dir} \(through a symbolic"):
        load_bundle(bundle_dir)


def test_a_delta_of_the_checkpoint_served_is_not_written_and_one_of_an_older_is_refused(run, tmp_path):
    bundle = Path(shutil.copytree(run.full, tmp_path / "bundle"))  # serves the run's last checkpoint
    assert export_delta(run.run_dir, bundle) is None
    assert delta_names(os.listdir(bundle / "deltas") if (bundle / "deltas").exists() else []) == []
    step = json.loads((checkpoint.latest(run.run_dir) / "trainer.json").read_text())["position"]["step"]
    with pytest.raises(CheckpointError, match=rf"a checkpoint of step {step - 1}, older than the one .*bundle serves "
                                              rf"\(step-0+{step}-epoch-\d+, step {step}, in the base\); a delta from "
                                              rf"it would roll the served model back\. Export it in full"):
        export_delta(_later_checkpoint(run.run_dir, -1), bundle)
    retrained = _later_checkpoint(run.run_dir, -2, run_id="another run")  # of the same model, at an earlier step
    assert export_delta(retrained, bundle).name == "000001"
    shutil.rmtree(bundle / "deltas" / "000001")
    later = _later_checkpoint(run.run_dir, 1000)
    assert export_delta(later, bundle).name == "000001"
    assert export_delta(later, bundle) is None  # delta 1 serves it
    with pytest.raises(CheckpointError, match=rf"older than .*step {step + 1000}, in delta 1\)"):
        export_delta(run.run_dir, bundle)


def test_a_damaged_delta_met_by_an_export_is_not_blamed_on_the_checkpoint(run, bundle_dir):
    """The message pointed at an earlier checkpoint, which fails the same way."""
    table = _delta(run, bundle_dir) / "tables" / "ids.safetensors"
    table.write_bytes(table.read_bytes()[:-100])
    earlier = Path(shutil.copytree(checkpoint.latest(run.run_dir), run.run_dir / "checkpoints" / "step-00000001-epoch-0"))
    try:  # the run kept an earlier checkpoint
        with pytest.raises(CorruptCheckpointError, match=r"ids\.safetensors: .*corrupt or altered") as info:
            export_delta(run.run_dir, bundle_dir)
    finally:
        shutil.rmtree(earlier)
    assert "earlier checkpoint" not in str(info.value)


def test_a_missing_delta_one_for_another_bundle_or_a_rewritten_chain_is_refused(run, bundle_dir, tmp_path):
    _delta(run, bundle_dir)
    _delta(run, bundle_dir)
    other = Path(shutil.copytree(run.full, tmp_path / "other"))
    shutil.copytree(bundle_dir / "deltas", other / "deltas")
    with pytest.raises(CheckpointError, match=r"000001/manifest.json: written for another bundle \(base sha256 .*\)\. "
                                              r"Delta 000001 and those after it cannot be applied: remove them to "
                                              r"serve the deltas before, or export the bundle in full"):
        load_bundle(other)
    predictor = Predictor(load_bundle(bundle_dir))  # at delta 2
    shutil.rmtree(bundle_dir / "deltas" / "000002")
    _delta(run, bundle_dir)  # another delta 2
    _delta(run, bundle_dir)
    with pytest.raises(CheckpointError, match=r"bundle: had its deltas rewritten \(delta 000002 is gone or another "
                                              r"one\) since it was loaded; load it again to serve it \(a running tidal "
                                              r"serve does at its next update\)"):
        read_deltas(bundle_dir, predictor.position, predictor.config)
    shutil.rmtree(bundle_dir / "deltas" / "000002")  # rolled back to delta 1 ...
    with pytest.raises(CheckpointError, match=r"bundle: had its deltas rewritten \(delta 000002 is gone"):
        read_deltas(bundle_dir, predictor.position, predictor.config)  # ... which a server at delta 2 is told too
    shutil.rmtree(bundle_dir / "deltas" / "000001")
    with pytest.raises(CheckpointError, match=r"000003/manifest.json: holds delta 3, but delta 1 comes next after "
                                              r"delta 0\. Delta 000003 and those after it cannot be applied"):
        load_bundle(bundle_dir)


def test_a_delta_in_a_folder_of_another_number_is_refused_saying_so(run, bundle_dir):
    _delta(run, bundle_dir)
    _delta(run, bundle_dir)
    (bundle_dir / "deltas" / "000002").rename(bundle_dir / "deltas" / "000003")
    with pytest.raises(CheckpointError, match=r"000003/manifest.json: holds delta 2, which comes next after delta 1, "
                                              r"but its folder is 000003, not 000002: a delta folder was renamed"):
        load_bundle(bundle_dir)


def test_a_delta_being_written_is_not_read(run, bundle_dir):
    (bundle_dir / "deltas" / ".tmp-000001-4242" / "tables").mkdir(parents=True)
    assert load_bundle(bundle_dir).position.sequence == 0
    assert _delta(run, bundle_dir).name == "000001"


def test_a_delta_of_another_model_or_into_a_version_1_bundle_is_refused(run, bundle_dir):
    from tidal.serving.bundle import _check_same_model

    saved = run.config.model_dump()
    other = RunConfig(**{**saved, "model": {**saved["model"], "hidden_sizes": [8]}})
    with pytest.raises(ConfigError, match=r"--delta: the checkpoint's model differ from the bundle's .*export a full "
                                          r"bundle instead"):
        _check_same_model(load_bundle(bundle_dir), other)
    _as_version_1(bundle_dir)
    with pytest.raises(CheckpointError, match="a version 1 bundle takes no deltas; export it again in full"):
        _delta(run, bundle_dir)


def test_a_delta_whose_sequence_another_export_took_meanwhile_is_refused(run, bundle_dir, monkeypatch):
    from tidal.serving import bundle as module

    load = module.load_bundle

    def racing(path):  # type: ignore[no-untyped-def]
        served = load(path)
        (Path(path) / "deltas" / "000001" / "tables").mkdir(parents=True)  # the other export's
        return served

    monkeypatch.setattr(module, "load_bundle", racing)
    with pytest.raises(CheckpointError, match=r"000001: written by another export meanwhile; export the delta again"):
        _delta(run, bundle_dir)
    assert [p.name for p in (bundle_dir / "deltas").iterdir()] == ["000001"]  # no staging folder left


def test_a_delta_is_not_published_into_a_bundle_a_full_export_replaced_meanwhile(run, bundle_dir, monkeypatch):
    from tidal.serving import bundle as module

    load = module.load_bundle

    def replaced(path):  # type: ignore[no-untyped-def]
        served = load(path)
        export(run.run_dir, path)  # a full export lands while the delta is written
        return served

    monkeypatch.setattr(module, "load_bundle", replaced)
    with pytest.raises(CheckpointError, match=r"bundle: was replaced by another full export while this delta was "
                                              r"written; export the delta again"):
        _delta(run, bundle_dir)
    monkeypatch.undo()
    assert [p.name for p in (bundle_dir / "deltas").iterdir()] == []
    assert load_bundle(bundle_dir).position.sequence == 0


def test_the_folders_of_delta_exports_that_died_are_removed_by_the_next(run, bundle_dir):
    import fcntl

    # each by process 1, as exports in containers are: the lock file a writer holds tells them apart
    dead, running, unlocked, young = (bundle_dir / "deltas" / f".tmp-000001-1-{nonce}" for nonce in ("0a", "2c", "4e", "6f"))
    for folder in (dead, running, unlocked, young):
        (folder / "tables").mkdir(parents=True)
    for folder in (dead, running):
        (bundle_dir / "deltas" / f"{folder.name}.lock").touch()
    for folder in (dead, running, unlocked):
        os.utime(folder, (time.time() - 120, time.time() - 120))  # a young one without a lock file may be an older
    held = os.open(bundle_dir / "deltas" / f"{running.name}.lock", os.O_RDWR)  # Tidal's, still at work
    try:
        fcntl.flock(held, fcntl.LOCK_EX)  # its writer, still at work
        _delta(run, bundle_dir)
    finally:
        os.close(held)
    assert sorted(p.name for p in (bundle_dir / "deltas").iterdir()) == sorted(
        ["000001", running.name, f"{running.name}.lock", young.name])


def test_export_delta_on_the_command_line(run, bundle_dir, capsys):
    from tidal.cli import _served

    def announced() -> str:  # what tidal serve says it serves
        service = Service(load_bundle(bundle_dir))
        service.close()
        return _served(service)

    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    base = f"{manifest['source_checkpoint']} of run {manifest['source_run'][:8]}"
    assert announced() == f" (checkpoint {base})"
    assert main(["export", "--checkpoint", str(run.run_dir), "--out", str(bundle_dir), "--delta"]) == 0
    out = capsys.readouterr().out
    assert f"wrote delta 000001 into {bundle_dir}" in out and "table 'ids' " in out and "rows changed, 0 removed" in out
    latest = f"{checkpoint.latest_name(run.run_dir)} of run {manifest['source_run'][:8]}"  # the same run's
    assert announced() == f" (checkpoint {latest}, with its delta 1)"
    assert main(["export", "--checkpoint", str(run.run_dir), "--out", str(bundle_dir), "--delta"]) == 0
    assert capsys.readouterr().out == f"no delta written: {bundle_dir} already serves this checkpoint (nothing " \
                                      f"changed since)\n"
    assert announced() == f" (checkpoint {latest}, with its delta 1)"
    for flag, value in (("--table-dtype", "float16"), ("--backend", "onnxruntime")):
        assert main(["export", "--checkpoint", str(run.run_dir), "--out", str(bundle_dir), "--delta", flag, value]) == 2
        assert f"{flag} applies to a full export; a delta keeps its bundle's" in capsys.readouterr().err


# ---------------------------------------------------------------------- a running server


def _scores(client, rows, specs, *, with_user: bool = True, **sequence) -> np.ndarray:  # type: ignore[no-untyped-def]
    request = infer_request(rows, specs, with_user=with_user)
    inputs = []
    for tensor in request["inputs"]:
        inputs.append(triton.InferInput(tensor["name"], tensor["shape"], "BYTES"))
        inputs[-1].set_data_from_numpy(np.array([v.encode() for v in tensor["data"]], dtype=object))
    return client.infer("ctr", inputs, **sequence).as_numpy("score")


def _piece(predictor: Predictor, rows) -> Piece:  # type: ignore[no-untyped-def]
    import pyarrow as pa

    return Piece(items=pa.RecordBatch.from_pydict({c: rows.column(c) for c in predictor.item_columns}),
                 user=pa.RecordBatch.from_pydict({c: rows.column(c).slice(0, 1) for c in predictor.user_columns}))


@contextlib.contextmanager
def _serving(bundle_dir: Path):  # type: ignore[no-untyped-def]
    """A server of the bundle at `bundle_dir` and a tritonclient of it."""
    running = start_server(Service(load_bundle(bundle_dir), name="ctr"))
    try:
        yield running, triton.InferenceServerClient(running.url.removeprefix("http://"))
    finally:
        running.stop()


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=30) as response:
        line = next(line for line in response.read().decode().splitlines() if line.startswith(name + " "))
    return float(line.split()[1])


def test_a_running_server_applies_deltas_on_load_up_to_a_damaged_one(run, bundle_dir):
    specs = input_specs(run.config)
    rows = with_user_of(file_rows(run.trainer, 100), specs)
    full = Predictor(load_bundle(run.full))
    with _serving(bundle_dir) as (running, client):
        before = _scores(client, rows, specs)
        client.load_model("ctr")  # nothing new: nothing changes
        np.testing.assert_array_equal(_scores(client, rows, specs), before)
        base_step = _metric(running.url, "tidal_bundle_source_step")
        assert base_step == json.loads((bundle_dir / "manifest.json").read_text())["source_step"]
        delta = _delta(run, bundle_dir)
        client.load_model("ctr")
        after = _scores(client, rows, specs)
        np.testing.assert_allclose(after, full.outputs(full.predict([_piece(full, rows)]))["score"], rtol=1e-6)
        assert not np.allclose(after, before)
        assert _metric(running.url, "tidal_bundle_delta") == 1
        step = json.loads((delta / "manifest.json").read_text())["source_step"]
        assert step > base_step and _metric(running.url, "tidal_bundle_source_step") == step  # the delta's checkpoint
        assert client.get_model_config("ctr")["parameters"]["source_step"] == {"string_value": str(step)}
        assert _metric(running.url, "tidal_bundle_deltas_applied_total") == 1
        _delta(run, bundle_dir)
        table = _delta(run, bundle_dir) / "tables" / "ids.safetensors"
        table.write_bytes(b"not a table")
        with pytest.raises(triton.InferenceServerException, match=r"\[409\] the bundle was updated only in part: "
                                                                  r"applied 1 delta, now serving delta 2 of checkpoint "
                                                                  r"step-\d+-epoch-\d+ of run [0-9a-f]{8}: .*; the next "
                                                                  r"delta was not \(.*ids.safetensors: .*corrupt or "
                                                                  r"altered\. Delta 000003 and those after .*\)"):
            client.load_model("ctr")  # delta 2 applied, delta 3 not
        assert _metric(running.url, "tidal_bundle_delta") == 2
        with pytest.raises(triton.InferenceServerException, match=r"\[409\] the bundle was not updated \(.*ids"
                                                                  r".safetensors: .*corrupt or altered\. Delta 000003 "
                                                                  r"and those after .*\); still serving delta 2"):
            client.load_model("ctr")
        np.testing.assert_array_equal(_scores(client, rows, specs), after)  # delta 2: the same checkpoint again
        assert _metric(running.url, "tidal_bundle_updates_refused_total") == 1  # delta 3's refusal, met twice
        assert _metric(running.url, "tidal_bundle_deltas_applied_total") == 2
        with pytest.raises(triton.InferenceServerException, match=r"\[400\] load: this server loads only its bundle as "
                                                                  r"it now stands, with no parameters; got "
                                                                  r"\['config'\]"):
            client.load_model("ctr", config="{}")
        request = urllib.request.Request(running.url + "/v2/repository/models/ctr/load", method="POST",
                                         data=json.dumps({"parameters": 5}).encode())
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 400 and b"with no parameters; got 5" in refused.value.read()


@pytest.mark.parametrize("backend, missing", [("onnxruntime", ONNX_MISSING), ("aotinductor", AOTI_MISSING)])
def test_a_server_on_a_compiled_backend_applies_a_delta_and_scores_as_a_full_export(run, tmp_path, backend, missing):
    if backend not in run.compiled:
        pytest.skip(missing)
    bundle_dir = Path(shutil.copytree(run.compiled[backend], tmp_path / "bundle"))
    specs = input_specs(run.config)
    rows = with_user_of(file_rows(run.trainer, 100), specs)
    full = Predictor(load_bundle(run.full), device="cpu")
    expected = full.outputs(full.predict([_piece(full, rows)]))["score"]
    with _serving(bundle_dir) as (running, client):
        served = running.service.predictor._program
        assert running.service.predictor.backend == backend
        before = _scores(client, rows, specs)
        _delta(run, bundle_dir)
        client.load_model("ctr")
        after = _scores(client, rows, specs)
        assert running.service.predictor.backend == backend and running.service.predictor._program is not served
    np.testing.assert_allclose(after, expected, rtol=1e-5)
    assert not np.allclose(before, expected, rtol=1e-3)
    reloaded = Predictor(load_bundle(bundle_dir))  # the base and its delta, loaded afresh
    np.testing.assert_array_equal(reloaded.outputs(reloaded.predict([_piece(reloaded, rows)]))["score"], after)


def test_a_session_spanning_an_update_is_pooled_again_once_and_scores_with_the_new_rows(run, bundle_dir):
    specs = input_specs(run.config)
    rows = with_user_of(file_rows(run.trainer, 40), specs)
    full = Predictor(load_bundle(run.full))
    with _serving(bundle_dir) as (running, client):
        _scores(client, rows.slice(0, 20), specs, sequence_id=7, sequence_start=True)
        _delta(run, bundle_dir)
        client.load_model("ctr")
        page = rows.slice(20, 20)
        expected = full.outputs(full.predict([_piece(full, page)]))["score"]
        for _ in range(2):  # the first page pools the user again; the second finds the new state cached
            np.testing.assert_allclose(_scores(client, page, specs, with_user=False, sequence_id=7), expected,
                                       rtol=1e-6)
            assert running.service.sessions.get(7).position.sequence == 1


def _counted_polls(monkeypatch) -> list:  # type: ignore[no-untyped-def]
    """A list that grows by one each time an update reads the bundle's deltas."""
    from tidal.serving import online

    reads, polls = online.readable_deltas, []
    monkeypatch.setattr(online, "readable_deltas", lambda *args: polls.append(1) or reads(*args))
    return polls


def _more_polls(polls: list, count: int) -> None:
    seen = len(polls)
    until(lambda: len(polls) >= seen + count, f"{count} more polls")


def test_a_server_polling_its_bundle_applies_new_deltas_and_reports_a_refusal_once(run, bundle_dir, tmp_path,
                                                                                   capsys, monkeypatch):
    polls = _counted_polls(monkeypatch)
    service = Service(load_bundle(bundle_dir), delta_poll_s=0.02)
    try:
        _delta(run, bundle_dir)
        until(lambda: service.updater.delta == 1, "delta 1")
        damaged = _delta(run, Path(shutil.copytree(bundle_dir, tmp_path / "staged")))
        (damaged / "tables" / "ids.safetensors").write_bytes(b"damaged")
        damaged.rename(bundle_dir / "deltas" / damaged.name)  # whole and damaged at once: no poll applies it first
        until(lambda: service.updater.refused >= 1, "a refusal")
        _more_polls(polls, 5)
        assert service.updater.delta == 1
    finally:
        service.close()
    captured = capsys.readouterr()
    assert "tidal serve: applied 1 delta, now serving delta 1 of checkpoint step-" in captured.out
    refusals = captured.err.splitlines()  # five polls or more, the refusal reported and counted once
    assert len(refusals) == service.updater.refused == 1
    assert refusals[0].startswith("tidal serve: bundle not updated past delta 1: ")


def test_a_polling_server_applies_the_deltas_before_a_damaged_one_and_reports_it_once(run, bundle_dir, tmp_path,
                                                                                      capsys, monkeypatch):
    staged = Path(shutil.copytree(bundle_dir, tmp_path / "staged"))
    _delta(run, staged)
    (_delta(run, staged) / "tables" / "ids.safetensors").write_bytes(b"damaged")
    polls = _counted_polls(monkeypatch)
    service = Service(load_bundle(bundle_dir), delta_poll_s=0.02)
    try:
        (staged / "deltas").rename(bundle_dir / "deltas")  # both come before the next poll
        until(lambda: service.updater.refused >= 1, "a refusal")
        _more_polls(polls, 3)
        assert (service.updater.delta, service.updater.deltas_applied, service.updater.refused) == (1, 1, 1)
    finally:
        service.close()
    captured = capsys.readouterr()
    assert captured.out.count("tidal serve: applied 1 delta, now serving delta 1 of checkpoint step-") == 1
    assert captured.err.count("tidal serve: bundle not updated past delta 1: ") == 1
    assert "Delta 000002 and those after it cannot be applied: remove them or export them again" in captured.err


def _damage(file: Path, damaged: bytes) -> None:
    """Replace `file` by `damaged` at once: a poll reads the one or the other, never a part."""
    staged = file.with_name(file.name + ".new")
    staged.write_bytes(damaged)
    os.replace(staged, file)


def test_a_polling_server_counts_each_refusal_once_however_often_it_meets_it(run, bundle_dir, tmp_path, monkeypatch):
    staged = Path(shutil.copytree(bundle_dir, tmp_path / "staged"))
    table = _delta(run, staged) / "tables" / "ids.safetensors"
    table.write_bytes(b"damaged")
    polls = _counted_polls(monkeypatch)
    running = start_server(Service(load_bundle(bundle_dir), delta_poll_s=0.02))
    refused = lambda: _metric(running.url, "tidal_bundle_updates_refused_total")  # noqa: E731
    try:
        (staged / "deltas").rename(bundle_dir / "deltas")
        until(lambda: running.service.updater.refused >= 1, "a refusal")
        _more_polls(polls, 5)
        assert refused() == 1 and running.service.updater.refused == 1
        _damage(bundle_dir / "deltas" / "000001" / "tables" / "ids.safetensors", b"damaged again")  # another reason
        until(lambda: running.service.updater.refused >= 2, "another refusal")
        _more_polls(polls, 5)
        assert refused() == 2 and running.service.updater.delta == 0
    finally:
        running.stop()


def test_the_same_refusal_counts_once_until_its_delta_is_rewritten(run, bundle_dir, tmp_path):
    service = Service(load_bundle(bundle_dir))

    def damaged_delta(staging: str) -> None:
        staged = Path(shutil.copytree(bundle_dir, tmp_path / staging))
        (_delta(run, staged) / "tables" / "ids.safetensors").write_bytes(b"damaged")
        (staged / "deltas" / "000001").rename(bundle_dir / "deltas" / "000001")

    def refusals(updates: int) -> set[str]:
        reasons = set()
        for _ in range(updates):
            with pytest.raises(CorruptCheckpointError, match="Delta 000001 and those after it cannot be applied") \
                    as refused:
                service.updater.update()
            reasons.add(str(refused.value))
        return reasons

    try:
        (bundle_dir / "deltas").mkdir(exist_ok=True)
        damaged_delta("first")
        first = refusals(3)
        assert len(first) == 1 and service.updater.refused == 1
        shutil.rmtree(bundle_dir / "deltas" / "000001")
        damaged_delta("again")  # the same delta, damaged the same way: rewritten, so another refusal of the same reason
        assert refusals(3) == first and service.updater.refused == 2
    finally:
        service.close()


def test_batches_scored_while_a_delta_applies_see_the_old_state_or_the_new_one(run, bundle_dir):
    specs = input_specs(run.config)
    rows = with_user_of(file_rows(run.trainer, 200), specs)
    predictor = Predictor(load_bundle(bundle_dir))
    old = predictor.predict([_piece(predictor, rows)])
    _delta(run, bundle_dir)
    new = Predictor(load_bundle(run.full)).predict([_piece(predictor, rows)])
    results, stop = [], threading.Event()

    def score() -> None:
        while not stop.is_set():
            results.append(predictor.predict([_piece(predictor, rows)]))

    threads = [threading.Thread(target=score) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    predictor.update(read_deltas(bundle_dir, predictor.position, predictor.config))
    time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join()
    assert [np.allclose(r, old, rtol=1e-6) or np.allclose(r, new, rtol=1e-6) for r in results] == [True] * len(results)
    assert np.allclose(results[-1], new, rtol=1e-6) and np.allclose(results[0], old, rtol=1e-6)


def test_a_request_whose_chunks_span_an_update_is_scored_by_one_state(run, bundle_dir):
    specs = input_specs(run.config)
    rows = with_user_of(file_rows(run.trainer, 160), specs)
    service = Service(load_bundle(bundle_dir), chunk_rows=16, max_batch_rows=16, sparse_threads=1)
    predictor = service.predictor
    old = predictor.predict([_piece(predictor, rows)])
    new = Predictor(load_bundle(run.full)).predict([_piece(predictor, rows)])
    _delta(run, bundle_dir)
    original = predictor.sparse
    predictor.sparse = lambda pieces: time.sleep(0.05) or original(pieces)  # 10 chunks, 0.5 s at least
    try:
        chunks = service.batcher.submit(_piece(predictor, rows))
        until(lambda: chunks[0].running(), "the request under way")
        update = threading.Thread(target=service.updater.update)
        update.start()
        until(lambda: service.batcher._holds == 1, "the update waiting")
        assert not chunks[-1].done()  # it came while the request was part way
        scored = np.concatenate([f.result(timeout=30) for f in chunks])
        update.join(timeout=30)
        assert service.updater.delta == 1
        after = np.concatenate([f.result(timeout=30) for f in service.batcher.submit(_piece(predictor, rows))])
    finally:
        del predictor.sparse
        service.close()
    np.testing.assert_allclose(scored, old, rtol=1e-6)  # every chunk before the update
    np.testing.assert_allclose(after, new, rtol=1e-6)


def test_dense_weights_that_are_not_the_bundles_are_refused_by_name(run, bundle_dir):
    from safetensors.torch import save_file

    from tidal.embedding.checkpoint import fingerprint, sealed

    folder = _delta(run, bundle_dir)
    weights = folder / "dense.safetensors"
    good = load_bundle(run.full).program.state_dict
    for other in ({"head.out.weight": torch.zeros(2, 3)}, {k: v.double() for k, v in good.items()}):
        save_file({k: v.contiguous() for k, v in other.items()}, str(weights))
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["files"]["dense.safetensors"] = fingerprint(weights)
        (folder / "manifest.json").write_text(json.dumps(sealed(manifest)))  # a well-formed delta of another model
        with pytest.raises(CorruptCheckpointError, match=rf"{weights}: expected the bundle's dense weights "
                                                         rf"\['body.bottom.*\(names, shapes and dtypes\); these differ: "):
            load_bundle(bundle_dir)
    predictor = Predictor(load_bundle(run.base))
    with pytest.raises(CorruptCheckpointError, match=rf"{weights}: expected the bundle's dense weights"):
        predictor.update(read_deltas(bundle_dir, predictor.position, predictor.config))
    assert predictor.position.sequence == 0


def test_a_delta_of_rows_that_are_not_finite_is_refused_before_a_row_changes(run, bundle_dir):
    """A hand-resealed delta: the predictor keeps serving the state it has, whole."""
    from safetensors.numpy import load_file, save_file

    from tidal.embedding.checkpoint import fingerprint

    predictor = Predictor(load_bundle(run.base))
    folder = _delta(run, bundle_dir)
    table = folder / "tables" / "ids.safetensors"
    arrays = load_file(str(table))
    arrays["values"][0, 3] = np.inf
    save_file(arrays, str(table))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["tables/ids.safetensors"] = fingerprint(table)
    (folder / "manifest.json").write_text(json.dumps(sealed(manifest)))
    with pytest.raises(CorruptCheckpointError, match=rf"{table}: 'values' holds NaN or infinite numbers in 1 row \(the "
                                                     rf"first of key {int(arrays['keys'][0])}\), which training never"):
        predictor.update(read_deltas(bundle_dir, predictor.position, predictor.config))
    assert predictor.position.sequence == 0 and predictor.torn is None


def test_a_delta_of_another_table_dtype_is_refused(run, bundle_dir):
    from tidal.embedding.checkpoint import sealed

    folder = _delta(run, bundle_dir)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps(sealed({**manifest, "table_dtype": "float16"})))
    with pytest.raises(CorruptCheckpointError, match=r"000001/manifest.json: tables of float16, the bundle's are "
                                                     r"float32\. Delta 000001 and those after it cannot be applied"):
        load_bundle(bundle_dir)


def test_a_session_started_before_an_update_is_scored_with_the_new_rows_after_it(run, bundle_dir):
    specs = input_specs(run.config)
    rows = with_user_of(file_rows(run.trainer, 50), specs)
    predictor = Predictor(load_bundle(bundle_dir))
    piece = _piece(predictor, rows)
    state = predictor.user_state(piece.user)
    with_state = Piece(items=piece.items, state=state)
    np.testing.assert_array_equal(predictor.predict([with_state]), predictor.predict([piece]))
    _delta(run, bundle_dir)
    predictor.update(read_deltas(bundle_dir, predictor.position, predictor.config))
    full = Predictor(load_bundle(run.full))
    np.testing.assert_allclose(predictor.predict([with_state, piece]), full.predict([piece, piece]), rtol=1e-6)


def test_an_update_that_fails_part_way_makes_the_server_unready_and_refuses_more(run, bundle_dir, monkeypatch):
    from tidal.embedding import EmbeddingTable

    with _serving(bundle_dir) as (running, client):
        _delta(run, bundle_dir)

        def no_memory(self, block):  # type: ignore[no-untyped-def]
            raise MemoryError("no room for the rows")

        monkeypatch.setattr(EmbeddingTable, "push_rows", no_memory)
        with pytest.raises(triton.InferenceServerException, match=r"\[409\] .*\(MemoryError: no room for the rows\); "
                                                                  r"the tables were left part way between delta 0 and "
                                                                  r"delta 1 by a failed update"):
            client.load_model("ctr")
        monkeypatch.undo()
        assert not client.is_server_ready() and not client.is_model_ready("ctr") and client.is_server_live()
        rows = with_user_of(file_rows(run.trainer, 5), input_specs(run.config))
        with pytest.raises(triton.InferenceServerException, match=r"\[503\] not ready: the tables were left part way"):
            _scores(client, rows, input_specs(run.config))
        with pytest.raises(triton.InferenceServerException, match=r"part way between delta 0 and delta 1 .*; restart, "
                                                                  r"or export the bundle in full, to serve a whole "
                                                                  r"state"):
            client.load_model("ctr")
        export(run.run_dir, bundle_dir)  # a full export ends it
        client.load_model("ctr")
        assert client.is_server_ready() and client.is_model_ready("ctr")
        full = Predictor(load_bundle(run.full))
        np.testing.assert_allclose(_scores(client, rows, input_specs(run.config)),
                                   full.outputs(full.predict([_piece(full, rows)]))["score"], rtol=1e-6)


def test_a_full_export_that_replaced_the_bundle_is_loaded_and_served_without_a_restart(run, bundle_dir, capsys):
    specs = input_specs(run.config)
    rows = with_user_of(file_rows(run.trainer, 60), specs)
    full = Predictor(load_bundle(run.full))
    expected = full.outputs(full.predict([_piece(full, rows)]))["score"]
    service = Service(load_bundle(bundle_dir), delta_poll_s=0.02)
    try:
        before = service.predictor.predict([_piece(full, rows)])
        lookups = service.predictor.id_counts()[0]
        export(run.run_dir, bundle_dir)
        assert sorted(p.name for p in bundle_dir.parent.iterdir()) == ["bundle"]  # the old one moved aside, then gone
        until(lambda: service.updater.reloads == 1, "the bundle loaded again")
        np.testing.assert_allclose(service.predictor.outputs(service.predictor.predict([_piece(full, rows)]))["score"],
                                   expected, rtol=1e-6)
        assert not np.allclose(before, full.predict([_piece(full, rows)]), rtol=1e-3)
        assert service.predictor.id_counts()[0] > lookups  # counted on from before the reload
        _delta(run, bundle_dir)  # the new base's deltas follow it
        until(lambda: service.updater.delta == 1, "its delta 1")
        assert (service.updater.reloads, service.updater.deltas_applied, service.updater.refused) == (1, 1, 0)
    finally:
        service.close()
    assert "tidal serve: loaded the bundle again (it was replaced by another full export), now serving delta 0 of " \
           "checkpoint step-" in capsys.readouterr().out


def test_a_reloaded_full_export_s_table_dtype_is_the_one_the_server_reports(run, bundle_dir):
    with _serving(bundle_dir) as (running, client):
        assert client.get_model_config("ctr")["parameters"]["table_dtype"] == {"string_value": "float32"}
        export(run.run_dir, bundle_dir, table_dtype="float16")
        client.load_model("ctr")
        assert client.get_model_config("ctr")["parameters"]["table_dtype"] == {"string_value": "float16"}  # was float32


def test_deltas_removed_from_under_a_server_are_refused_not_rolled_back_to_its_base(run, bundle_dir):
    service = Service(load_bundle(bundle_dir))
    try:
        _delta(run, bundle_dir)
        _delta(run, bundle_dir)
        service.updater.update()
        shutil.rmtree(bundle_dir / "deltas")  # as one pruning them by hand
        with pytest.raises(CheckpointError, match=r"delta 000002, which this server serves, was removed but not the "
                                                  r"base it builds on: .*; to drop deltas, export the bundle in full"):
            service.updater.update()
        assert (service.updater.delta, service.updater.reloads, service.updater.refused) == (2, 0, 1)
        export(run.run_dir, bundle_dir)  # in full: loaded
        assert service.updater.update().reload_reason == "was replaced by another full export"
    finally:
        service.close()


def test_a_reload_gives_the_memory_of_the_tables_it_replaced_back_to_the_system(run, bundle_dir, monkeypatch):
    """glibc kept the freed tables' memory and served the next copy from it, so a
    server reloading full exports stayed near its reload peak: 8 reloads of a 75 MiB
    bundle, 621 to 835 MB, against 640 MB once the freed memory is given back."""
    service = Service(load_bundle(bundle_dir))
    replaced = weakref.ref(service.predictor.collection.tables[0])
    trimmed: list[bool] = []
    monkeypatch.setattr(predictor_module, "give_back_freed_memory", lambda: trimmed.append(replaced() is None))
    try:
        export(run.run_dir, bundle_dir)
        assert service.updater.update().reload_reason == "was replaced by another full export"
        assert trimmed == [True]  # given back once the replaced tables were freed
    finally:
        service.close()
    monkeypatch.undo()
    predictor_module.give_back_freed_memory()  # glibc's malloc_trim here; nothing where there is none


def test_a_full_export_landing_while_an_update_looks_for_deltas_is_loaded_not_refused(run, bundle_dir, monkeypatch):
    from tidal.serving import online

    service = Service(load_bundle(bundle_dir))
    looks = []

    def export_lands_after_the_look(path, position):  # type: ignore[no-untyped-def]
        looks.append(position)
        if len(looks) == 1:
            export(run.run_dir, bundle_dir)
            return None  # what the look saw: the bundle as loaded
        return online_moved_since(path, position)

    online_moved_since = online.moved_since
    monkeypatch.setattr(online, "moved_since", export_lands_after_the_look)
    try:
        update = service.updater.update()
        assert update.reload_reason is not None and len(looks) == 2
        assert (service.updater.reloads, service.updater.refused) == (1, 0)
    finally:
        service.close()


def test_a_full_export_landing_while_the_deltas_are_read_is_loaded_not_refused(run, bundle_dir, monkeypatch):
    """The delta read then no longer follows the bundle: that refusal is the export's landing."""
    from tidal.serving import online

    service = Service(load_bundle(bundle_dir))
    _delta(run, bundle_dir)

    def read_as_the_export_lands(path, position, config):  # type: ignore[no-untyped-def]
        export(run.run_dir, bundle_dir)
        return [], CheckpointError(f"{path}/deltas/000001/manifest.json: written for another bundle")

    monkeypatch.setattr(online, "readable_deltas", read_as_the_export_lands)
    try:
        assert service.updater.update().reload_reason is not None
        assert (service.updater.reloads, service.updater.refused) == (1, 0)
    finally:
        service.close()


def _as_version_1(bundle_dir: Path) -> None:
    manifest_file = bundle_dir / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    del manifest["content_sha256"]
    manifest_file.write_text(json.dumps({**manifest, "version": 1}))


def test_a_server_of_a_version_1_bundle_loads_a_full_export_that_replaced_it(run, bundle_dir):
    _as_version_1(bundle_dir)
    service = Service(load_bundle(bundle_dir))
    try:
        assert service.predictor.position is None
        with pytest.raises(CheckpointError, match="a version 1 bundle takes no deltas; export it again in full"):
            service.updater.update()
        export(run.run_dir, bundle_dir)
        update = service.updater.update()
        assert update.reload_reason == "was replaced by a full export that takes deltas"
        assert service.predictor.position is not None and update.rows_changed == len(load_bundle(run.full).tables["ids"][0])
    finally:
        service.close()


def test_a_full_export_of_another_model_is_refused_and_the_old_one_served(run, bundle_dir, tmp_path, monkeypatch):
    saved = run.config.model_dump()
    other = RunConfig(**{**saved, "tables": [{**saved["tables"][0], "dim": 4}],
                         "training": {**saved["training"], "run_dir": str(tmp_path / "other"), "checkpoint_every": 2}})
    Trainer(other).fit(max_steps=2)
    specs = input_specs(run.config)
    rows = with_user_of(file_rows(run.trainer, 20), specs)
    with _serving(bundle_dir) as (running, client):
        before = _scores(client, rows, specs)
        export(other.training.run_dir, bundle_dir)
        loads = []
        monkeypatch.setattr(predictor_module, "load_bundle", lambda path: loads.append(path))
        for _ in range(2):
            with pytest.raises(triton.InferenceServerException, match=r"\[409\] .*bundle: a full export of another "
                                                                      r"model replaced the bundle \(its sizes differ from "
                                                                      r"those served\); restart tidal serve to serve "
                                                                      r"it\); still serving delta 0"):
                client.load_model("ctr")
        assert loads == []  # refused from its manifest, before its tables are loaded
        np.testing.assert_array_equal(_scores(client, rows, specs), before)


def test_a_full_export_this_server_cannot_run_is_not_loaded_again_until_another_replaces_it(run, bundle_dir,
                                                                                             monkeypatch):
    service = Service(load_bundle(bundle_dir))
    export(run.run_dir, bundle_dir)
    loads, load_bundle_checked = [], predictor_module.load_bundle
    monkeypatch.setattr(predictor_module, "load_bundle", lambda path: loads.append(path) or load_bundle_checked(path))
    smaller = predictor_module.Predictor.__init__

    def refuse(error):  # type: ignore[no-untyped-def]
        def init(self, bundle, **settings):  # type: ignore[no-untyped-def]
            raise error
        return init

    try:
        monkeypatch.setattr(predictor_module.Predictor, "__init__", refuse(CorruptCheckpointError("a damaged file")))
        for _ in range(2):  # a file may be repaired: tried again
            with pytest.raises(CorruptCheckpointError, match="a damaged file"):
                service.updater.update()
        assert len(loads) == 2
        monkeypatch.setattr(predictor_module.Predictor, "__init__", refuse(ConfigError(
            "buckets: the largest is over the largest batch the bundle's dense program takes")))  # as built
        for _ in range(3):
            with pytest.raises(ConfigError, match="over the largest batch"):
                service.updater.update()
        assert len(loads) == 3 and service.predictor.position.sequence == 0
        assert service.updater.refused == 2  # two reasons, each met again by later updates
        monkeypatch.setattr(predictor_module.Predictor, "__init__", smaller)
        export(run.run_dir, bundle_dir)  # another export: tried again
        assert service.updater.update().reload_reason and len(loads) == 4
    finally:
        service.close()


def test_the_poller_goes_on_after_an_unexpected_error_and_its_period_is_bounded(run, bundle_dir, capsys, monkeypatch):
    from tidal.serving import online

    reads = online.readable_deltas
    calls = []

    def flaky(*args):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("a surprise")
        return reads(*args)

    monkeypatch.setattr(online, "readable_deltas", flaky)
    service = Service(load_bundle(bundle_dir), delta_poll_s=0.02)
    try:
        _delta(run, bundle_dir)
        until(lambda: service.updater.delta == 1, "delta 1 after the error")
    finally:
        service.close()
    assert "tidal serve: bundle not updated past delta 0: ValueError: a surprise" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="delta_poll_s"):
        Service(load_bundle(bundle_dir), delta_poll_s=1e10)


def test_checkpoints_bundles_and_deltas_are_readable_as_the_umask_allows(run, tmp_path):
    """safetensors writes its files for their owner alone: a server run as another user
    could not read the tables a training user exported."""
    umask = os.umask(0o022)
    os.umask(umask)
    bundle = export(run.run_dir, tmp_path / "bundle")
    delta = _delta(run, bundle)
    for folder in (checkpoint.latest(run.run_dir), bundle, delta):
        modes = {str(p.relative_to(folder)): oct(p.stat().st_mode & 0o777) for p in folder.rglob("*") if p.is_file()}
        assert any(name.endswith(".safetensors") for name in modes)
        assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


def test_updates_reloads_and_predictors_dropped_leave_no_generated_source_behind(run, bundle_dir):
    """torch.fx keeps the source of every program it makes, for tracebacks: each update
    and reload left about 60 kB behind for good (an audit's find)."""
    import gc

    from torch.fx.graph_module import _loader

    def cached() -> int:
        gc.collect()
        return len(_loader.eval_cache)

    before = cached()
    predictor = Predictor(load_bundle(bundle_dir))
    assert cached() > before  # it holds programs torch.fx made
    counts = []
    for _ in range(3):
        _delta(run, bundle_dir)
        predictor.update(read_deltas(bundle_dir, predictor.position, predictor.config))
        counts.append(cached())
    for _ in range(2):
        predictor.reload(run.full)
        counts.append(cached())
    assert counts[1:3] == counts[:1] * 2 and counts[4] == counts[3], counts
    del predictor
    assert cached() == before
