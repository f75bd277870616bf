"""Serving bundles: written without pickle, checked on load, refused when damaged."""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from serving_helpers import serving_config
from tidal.cli import main
from tidal.config import RunConfig
from tidal.embedding import EmbeddingTable, load_tables
from tidal.errors import CheckpointError, ConfigError, CorruptCheckpointError
from tidal.embedding.checkpoint import sealed
from tidal.runtime import Trainer, checkpoint
from tidal.serving import export, load_bundle
from tidal.serving import bundle as bundle_module


def test_bundle_holds_manifest_tables_and_program_without_pickle(bundle_dir, bundle, trainer):
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert manifest["targets"] == ["ctr", "cvr"] and manifest["version"] == 2 and manifest["created"]
    assert manifest["inputs"][0] == {"name": "C1", "kind": "ids", "side": "both", "separator": None, "also": []}
    assert manifest["config"]["serving"]["buckets"] == [1, 4, 16, 64, 256]
    assert manifest["config"]["serving"]["fusion"] == {"kind": "product", "weights": {"ctr": 1.0, "cvr": 0.5}}
    assert set(manifest["files"]) == {"dense.pt2", "tables/ids.safetensors"}
    for path in bundle_dir.rglob("*"):
        if path.is_file():
            assert b"\x80\x02" not in path.read_bytes()[:2] and b"data.pkl" not in path.read_bytes()
    with zipfile.ZipFile(bundle_dir / "dense.pt2") as archive:
        assert all(i.file_size == 0 for i in archive.infolist() if "sample_inputs" in i.filename)
    keys, values = bundle.tables["ids"]
    table = trainer.collection.table("ids")
    assert keys.shape[0] == table.stats().rows and np.all(np.diff(keys) > 0)
    np.testing.assert_array_equal(values, table.lookup(keys))


def _reseal(bundle: Path, name: str) -> None:
    """Record file `name`'s new size and sha256 in the bundle's manifest, and seal it
    again: what anyone who may write the bundle can do."""
    from tidal.embedding.checkpoint import fingerprint

    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"][name] = fingerprint(bundle / name)
    (bundle / "manifest.json").write_text(json.dumps(sealed({k: v for k, v in manifest.items() if k != "content_sha256"})))


def test_a_program_of_other_sizes_is_refused_naming_its_file(bundle_dir, tmp_path):
    """Another model's program, resealed in: every request would have failed."""
    from tidal.compile import export_program
    from tidal.models import RankingModel
    from tidal.serving import Predictor
    from tidal.serving.bundle import model_sizes

    hostile = Path(shutil.copytree(bundle_dir, tmp_path / "hostile"))
    config = load_bundle(bundle_dir).config
    sizes = {**model_sizes(config), "dense_features": model_sizes(config)["dense_features"] + 1}
    example = (torch.zeros(2, sizes["num_features"], sizes["dim"]), torch.zeros(2, sizes["dense_features"]))
    program = export_program(RankingModel(config.model, **sizes).eval(), example, config.serving.buckets[-1])
    program._example_inputs = None  # as an export saves it: no pickle
    torch.export.save(program, str(hostile / "dense.pt2"))
    _reseal(hostile, "dense.pt2")
    with pytest.raises(CorruptCheckpointError, match=rf"{hostile / 'dense.pt2'}: does not run on inputs of this "
                                                      rf"bundle's sizes .*: RuntimeError"):
        Predictor(load_bundle(hostile))


def test_a_table_holding_a_key_twice_or_no_safetensors_is_refused_naming_its_file(bundle_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    hostile = Path(shutil.copytree(bundle_dir, tmp_path / "hostile"))
    table = hostile / "tables" / "ids.safetensors"
    arrays = load_file(str(table))
    arrays["keys"][1] = arrays["keys"][0]
    save_file(arrays, str(table))
    _reseal(hostile, "tables/ids.safetensors")
    with pytest.raises(CorruptCheckpointError, match=rf"{table}: expected keys \[N\] int64 and ascending"):
        load_bundle(hostile)
    table.write_bytes(b"\xff" * 64)  # a header length past the file
    _reseal(hostile, "tables/ids.safetensors")
    with pytest.raises(CorruptCheckpointError, match=rf"{table}: not a readable safetensors file"):
        load_bundle(hostile)


def _first_entry(edit, member: str = "weights/model_weights_config.json"):  # type: ignore[no-untyped-def]
    """A change of one of the archive's configs, `member`: `edit` on its first entry."""
    def change(name: str, data: bytes) -> list[tuple[str, bytes]]:
        if not name.endswith(member):
            return [(name, data)]
        config = json.loads(data)
        edit(next(iter(config["config"].values())))
        return [(name, json.dumps(config).encode())]
    return change


def _extra_member(name: str, data: bytes) -> list[tuple[str, bytes]]:
    """A legacy weights file beside the config, which torch.export.load would unpickle."""
    return [(name, data)] + ([(name.replace("model_weights_config.json", "model.pt"), b"pickle")]
                             if name.endswith("weights/model_weights_config.json") else [])


def _config_twice(name: str, data: bytes) -> list[tuple[str, bytes]]:
    """A hostile config, then a harmless copy of the same name: torch reads the first."""
    if not name.endswith("weights/model_weights_config.json"):
        return [(name, data)]
    hostile = json.loads(data)
    next(iter(hostile["config"].values()))["use_pickle"] = True
    return [(name, json.dumps(hostile).encode()), (name, data)]


@pytest.mark.parametrize("change, unsafe", [
    (_first_entry(lambda entry: entry.update(use_pickle=True)), r"model_weights_config\.json: body"),
    (_first_entry(lambda entry: entry.update(path_name="opaque_obj_0"), "constants/model_constants_config.json"),
     r"model_constants_config\.json: body"),  # torch unpickles an opaque constant whatever use_pickle says
    (_extra_member, r"data/weights/model\.pt"),
    (_config_twice, r"model_weights_config\.json"),
], ids=["use_pickle", "opaque_object", "legacy_weights_file", "config_twice"])
def test_a_program_torch_would_unpickle_from_is_refused_before_anything_is_unpickled(bundle_dir, tmp_path, monkeypatch,
                                                                                      change, unsafe):
    """torch.export.load would unpickle such a member, running what it names: a hostile
    bundle's author reseals its manifest and hashes, so only the archive tells."""
    hostile = Path(shutil.copytree(bundle_dir, tmp_path / "hostile"))
    with zipfile.ZipFile(bundle_dir / "dense.pt2") as source, \
            zipfile.ZipFile(hostile / "dense.pt2", "w", zipfile.ZIP_STORED) as out, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile's "Duplicate name"
        for info in source.infolist():
            for name, data in change(info.filename, source.read(info.filename)):
                out.writestr(name, data)
    _reseal(hostile, "dense.pt2")
    monkeypatch.setattr(torch.export, "load", lambda *args, **kwargs: pytest.fail("the archive was loaded"))
    with pytest.raises(CorruptCheckpointError, match=rf"dense\.pt2: holds what torch would unpickle or "
                                                      rf"torch.export.save does not write \(.*{unsafe}"):
        load_bundle(hostile)


def test_a_program_replaced_after_its_check_is_not_the_one_loaded(bundle_dir, tmp_path, monkeypatch):
    """torch loads the bytes that were checked: a hostile archive put in the program's
    place right after the check is never opened."""
    racing = Path(shutil.copytree(bundle_dir, tmp_path / "racing"))
    hostile = tmp_path / "hostile.pt2"
    with zipfile.ZipFile(bundle_dir / "dense.pt2") as source, zipfile.ZipFile(hostile, "w") as out:
        for info in source.infolist():
            for name, data in _extra_member(info.filename, source.read(info.filename)):
                out.writestr(name, data)
    checked = bundle_module._unsafe_members

    def check_then_swap(archive):  # type: ignore[no-untyped-def]
        found = checked(archive)
        shutil.copyfile(hostile, racing / "dense.pt2")
        return found

    monkeypatch.setattr(bundle_module, "_unsafe_members", check_then_swap)
    loaded = []
    real_load = torch.export.load
    monkeypatch.setattr(torch.export, "load", lambda f, **kw: loaded.append(f) or real_load(f, **kw))
    bundle = load_bundle(racing)
    assert (racing / "dense.pt2").read_bytes() == hostile.read_bytes()  # swapped on disk...
    assert len(loaded) == 1 and not isinstance(loaded[0], (str, os.PathLike))  # ...but torch read the checked bytes
    assert sorted(bundle.program.state_dict) == sorted(load_bundle(bundle_dir).program.state_dict)


def test_an_export_that_fails_to_put_the_new_bundle_in_place_leaves_the_old_one_and_cleans_up_dead_exports(
        trainer, bundle_dir, tmp_path, monkeypatch):
    from tidal.serving import _folders

    out = shutil.copytree(bundle_dir, tmp_path / "served")
    dead = [tmp_path / ".tmp-served-1-0a1b", tmp_path / ".old-served-1-2c3d"]  # exports killed part way
    for folder in dead:
        folder.mkdir()
        os.utime(folder, (time.time() - 120, time.time() - 120))
    monkeypatch.setattr(_folders, "_exchange", lambda a, b: False)  # a system that swaps no folders: two renames
    real_replace = os.replace

    def fails(source, target):  # type: ignore[no-untyped-def]
        if str(target) == str(out):
            raise OSError("no room")
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", fails)
    with pytest.raises(OSError, match="no room"):
        export(trainer.run_dir, out)
    assert load_bundle(out).manifest == load_bundle(bundle_dir).manifest  # the old bundle, back in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["served"]  # no staging, old or dead exports' folders


def test_a_delta_export_cleans_up_what_killed_full_exports_left_beside_the_bundle(trainer, bundle_dir, tmp_path):
    """An audit's find: only the next full export did, so a loop of deltas kept a whole bundle's staging."""
    from tidal.serving import export_delta

    out = shutil.copytree(bundle_dir, tmp_path / "served")
    dead = tmp_path / ".tmp-served-1-0a1b"
    dead.mkdir()
    os.utime(dead, (time.time() - 120, time.time() - 120))
    assert export_delta(trainer.run_dir, out) is None  # it serves this checkpoint already
    assert sorted(p.name for p in tmp_path.iterdir()) == ["served"]


def test_paths_of_another_type_are_refused_by_argument(trainer, tmp_path):
    from tidal.serving import export_delta

    for call, what in [(lambda: export(None, tmp_path / "b"), "export: source"),
                       (lambda: export(trainer.run_dir, 5), "export: out"),
                       (lambda: export_delta(trainer.run_dir, None), "export_delta: bundle_dir"),
                       (lambda: load_bundle(None), "load_bundle: path")]:
        with pytest.raises(ConfigError, match=rf"^{what} must be a path \(a str or an os.PathLike\), got "):
            call()


def _fails(*args: object) -> None:
    raise CheckpointError("stopped here")


def test_a_bundle_set_aside_by_an_export_killed_between_its_renames_is_named_and_put_back(trainer, bundle_dir,
                                                                                          tmp_path, monkeypatch):
    from tidal.serving import bundle as bundle_module

    out = tmp_path / "served"
    aside = shutil.copytree(bundle_dir, tmp_path / ".old-served-1-0a1b")  # out renamed aside, the new one not in
    os.utime(aside, (time.time() - 120, time.time() - 120))
    with pytest.raises(CheckpointError, match=rf"served: missing, and {aside} holds the bundle an export killed part "
                                              rf"way set aside; rename it back to serve it \(the next tidal export --out {out} puts it back"):
        load_bundle(out)
    monkeypatch.setattr(bundle_module, "_check_replaceable", _fails)  # the next export stops once it is put back
    with pytest.raises(CheckpointError, match="stopped here"):
        export(trainer.run_dir, out)
    assert load_bundle(out).manifest == load_bundle(bundle_dir).manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["served"]


def test_an_export_over_a_bundle_swaps_them_at_once(trainer, bundle_dir, tmp_path, monkeypatch):
    from tidal.serving import _folders

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    if not _folders._exchange(tmp_path / "a", tmp_path / "b"):
        pytest.skip("this system or filesystem cannot swap two folders at once")
    out = shutil.copytree(bundle_dir, tmp_path / "served")
    monkeypatch.setattr(os, "rename", lambda *args: pytest.fail("set aside first"))  # the two renames' first
    export(trainer.run_dir, out, table_dtype="float16")
    assert load_bundle(out).manifest["table_dtype"] == "float16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "served"]


def test_float16_tables_halve_the_bytes(trainer, bundle_dir, tmp_path):
    half = load_bundle(export(trainer.run_dir, tmp_path / "half", table_dtype="float16"))
    keys, values = half.tables["ids"]
    assert values.dtype == np.float16
    np.testing.assert_allclose(values, load_bundle(bundle_dir).tables["ids"][1], atol=1e-3)


def test_float16_export_is_refused_when_values_would_overflow(trainer, tmp_path, monkeypatch):
    rows = EmbeddingTable.values_by_key

    def huge(table):  # type: ignore[no-untyped-def]
        keys, values = rows(table)
        values[:3, 0] = [7e4, -1e5, 65519.0]  # 65519 rounds to 65504: no overflow
        return keys, values

    monkeypatch.setattr(EmbeddingTable, "values_by_key", huge)
    with pytest.raises(ConfigError, match=r"table 'ids': 2 values do not fit float16 \(largest magnitude 100000, "
                                          r"float16's largest is 65504\); export with table dtype float32"):
        export(trainer.run_dir, tmp_path / "half", table_dtype="float16")
    assert list(tmp_path.iterdir()) == []  # nothing written, no staging left
    values = load_bundle(export(trainer.run_dir, tmp_path / "full", table_dtype="float32")).tables["ids"][1]
    assert values[1, 0] == -1e5


def test_a_damaged_bundle_is_refused_naming_the_file(bundle_dir, tmp_path):
    copy = shutil.copytree(bundle_dir, tmp_path / "copy")
    table = copy / "tables" / "ids.safetensors"
    table.write_bytes(table.read_bytes()[:-10])
    with pytest.raises(CorruptCheckpointError, match="ids.safetensors.*corrupt or altered"):
        load_bundle(copy)
    table.unlink()
    with pytest.raises(CorruptCheckpointError, match="ids.safetensors: missing"):
        load_bundle(copy)
    for damaged in ("{not json", '{"version": ' + "1" * 5000 + "}", "[" * 100_000):  # digits, nesting past limits
        (copy / "manifest.json").write_text(damaged)
        with pytest.raises(CorruptCheckpointError, match="manifest.json: not valid JSON"):
            load_bundle(copy)
    (copy / "manifest.json").write_text(json.dumps({**json.loads((bundle_dir / "manifest.json").read_text()),
                                                    "files": ["dense.pt2"]}))
    with pytest.raises(CorruptCheckpointError, match=r"manifest.json: expected a .* \(config and files objects\)"):
        load_bundle(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="not a serving bundle"):
        load_bundle(copy)


def _with_manifest(bundle_dir, tmp_path, change, *, seal=True) -> object:  # type: ignore[no-untyped-def]
    """A copy of the bundle whose manifest `change` rewrote, with its sha256 updated (`seal`) or left as it was."""
    copy = shutil.copytree(bundle_dir, tmp_path / "copy")
    manifest = json.loads((copy / "manifest.json").read_text())
    change(manifest)
    (copy / "manifest.json").write_text(json.dumps(sealed(manifest) if seal else manifest))
    return copy


def test_a_manifest_listing_a_file_outside_its_folder_or_one_that_is_not_a_regular_file_is_refused(bundle_dir,
                                                                                                 tmp_path):
    outside = tmp_path / "secret"
    outside.write_bytes(b"not the bundle's")
    escaping = _with_manifest(bundle_dir, tmp_path, lambda m: m["files"].update({"../secret": {"bytes": 1, "sha256": ""}}))
    with pytest.raises(CorruptCheckpointError, match=r"manifest\.json: lists '\.\./secret', which is not a file inside"):
        load_bundle(escaping)
    shutil.rmtree(escaping)
    linked = _with_manifest(bundle_dir, tmp_path, lambda m: m["files"].update({"link": {"bytes": 1, "sha256": ""}}))
    (linked / "link").symlink_to(outside)  # a link out of the folder
    with pytest.raises(CorruptCheckpointError, match=r"lists 'link', which is not a file inside"):
        load_bundle(linked)
    (linked / "link").unlink()
    os.mkfifo(linked / "link")  # reading it would wait for ever
    with pytest.raises(CorruptCheckpointError, match=r"link: not a regular file"):
        load_bundle(linked)


def test_an_edited_manifest_is_refused_naming_it(bundle_dir, tmp_path, capsys):
    copy = shutil.copytree(bundle_dir, tmp_path / "copy")
    text = (copy / "manifest.json").read_text()
    assert '"transform": "log"' in text
    (copy / "manifest.json").write_text(text.replace('"transform": "log"', '"transform": "none"', 1))
    with pytest.raises(CorruptCheckpointError, match="manifest.json: altered or damaged: its content's sha256"):
        load_bundle(copy)
    assert main(["serve", str(copy), "--port", "0"]) == 2
    captured = capsys.readouterr()
    assert "manifest.json: altered or damaged" in captured.err and "serving" not in captured.out


def test_a_manifest_without_its_sha256_loads_only_as_a_version_1_bundle(bundle_dir, tmp_path):
    unsealed = _with_manifest(bundle_dir, tmp_path, lambda m: m.pop("content_sha256"), seal=False)
    with pytest.raises(CorruptCheckpointError, match="manifest.json: lacks content_sha256"):
        load_bundle(unsealed)
    shutil.rmtree(unsealed)
    demoted = _with_manifest(bundle_dir, tmp_path, lambda m: m.update(version=1), seal=False)
    with pytest.raises(CorruptCheckpointError, match="manifest.json: altered or damaged"):
        load_bundle(demoted)
    shutil.rmtree(demoted)
    older = _with_manifest(bundle_dir, tmp_path, lambda m: [m.update(version=1), m.pop("content_sha256")], seal=False)
    assert load_bundle(older).targets == ["ctr", "cvr"]  # as a Tidal before version 2 wrote it


def test_a_manifest_of_another_version_or_with_other_inputs_is_refused(bundle_dir, tmp_path):
    newer = _with_manifest(bundle_dir, tmp_path, lambda m: m.update(version=3), seal=False)  # sealed its own way
    with pytest.raises(CheckpointError, match="bundle version 3, this Tidal reads versions 1 and 2"):
        load_bundle(newer)
    shutil.rmtree(newer)
    text = _with_manifest(bundle_dir, tmp_path, lambda m: m.update(version="2"))  # an audit's find: "version 2, ... 2"
    with pytest.raises(CheckpointError, match="bundle version '2', this Tidal reads versions 1 and 2"):
        load_bundle(text)
    shutil.rmtree(text)
    moved = _with_manifest(bundle_dir, tmp_path, lambda m: m["inputs"][0].update(side="item"))
    with pytest.raises(CorruptCheckpointError, match="its inputs do not match its features"):
        load_bundle(moved)
    shutil.rmtree(moved)
    untabled = _with_manifest(bundle_dir, tmp_path, lambda m: m["files"].pop("tables/ids.safetensors"))
    with pytest.raises(CorruptCheckpointError, match="lists no .'tables/ids.safetensors'."):
        load_bundle(untabled)


def test_export_without_a_checkpoint_says_so(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint to export .*; train first$"):
        export(tmp_path, tmp_path / "bundle")
    with pytest.raises(CheckpointError, match=r"gone: no such file or folder \(expected a run directory with "
                                              r"checkpoints/LATEST, or a checkpoint directory with trainer\.json\)$"):
        export(tmp_path / "gone", tmp_path / "bundle")  # not told to train first


def test_export_applies_the_caps_that_the_checkpoint_at_a_runs_end_may_exceed(tmp_path):
    """A run ends off its evict_every schedule (16 steps, a safe point every 5) with the
    rows of its last step: its checkpoint is an uninterrupted run's state there, and the
    bundle holds the rows that the TTL and the row cap keep."""
    config = serving_config(tmp_path).model_dump(mode="json")
    config["tables"][0] |= {"eviction": {"ttl_steps": 3, "capacity_policy": "lfu"}, "max_rows": 2000}
    config["training"]["evict_every"] = 5
    trainer = Trainer(RunConfig(**config))
    trainer.fit()
    saved = load_tables(checkpoint.latest(trainer.run_dir) / "tables")["ids"]
    assert saved.stats().rows > 2000
    keys, values = load_bundle(export(trainer.run_dir, tmp_path / "bundle")).tables["ids"]
    assert saved.evict() > 0 and len(keys) == saved.stats().rows <= 2000
    np.testing.assert_array_equal(values, saved.lookup(keys))


def test_the_serving_settings_of_a_saved_config_are_replaced_as_the_checkpoint_reads_it(trainer):
    from tidal.config import RunConfig
    from tidal.serving.bundle import _with_serving

    saved = trainer.config.model_dump(mode="json")
    # a field a new config refuses without data.eval, which a checkpoint's config may hold
    old = RunConfig.from_saved({**saved, "training": {**saved["training"], "eval_every": 10}})
    config = _with_serving(old, backend="onnxruntime", table_dtype=None)
    assert config.serving.backend == "onnxruntime" and config.training.eval_every == 10
    assert _with_serving(old, backend=None, table_dtype=None) is old


def test_a_float16_bundles_config_says_its_tables_are_float16(trainer, tmp_path):
    """The model config endpoint reports the bundle config's table dtype: it said float32."""
    bundle = load_bundle(export(trainer.run_dir, tmp_path / "half", table_dtype="float16"))
    assert bundle.config.serving.table_dtype == "float16" == bundle.manifest["table_dtype"]
    again = load_bundle(export(trainer.run_dir, tmp_path / "half"))  # an export over it keeps its dtype
    assert again.config.serving.table_dtype == "float16" and again.tables["ids"][1].dtype == np.float16
    for named in (np.float16, "f2"):  # what numpy calls float16
        assert load_bundle(export(trainer.run_dir, tmp_path / "f2", table_dtype=named)).manifest["table_dtype"] == "float16"
    with pytest.raises(ConfigError, match=r"table dtype must be float32 or float16, got 'int8'"):
        export(trainer.run_dir, tmp_path / "int8", table_dtype="int8")
