"""Serving bundles: what `tidal export` writes and `tidal serve` loads.

Layout::

    BUNDLE/
      manifest.json                format, version, creation time, the request's inputs
                                   (column, kind, side), targets, the run config
                                   (features, tables, model, serving: fusion and
                                   bucket sizes), the size and sha256 of every
                                   other file, and the sha256 of its own content
                                   (content_sha256, from version 2)
      tables/<name>.safetensors    keys [N] int64, values [N, D] float32 or float16
      dense.pt2                    the dense network as a `torch.export` program
      dense.onnx                   the same network as an ONNX model, for the
                                   onnxruntime backend (only when exported for it)
      dense-aotinductor.pt2        the same network compiled by AOTInductor, for the
                                   aotinductor backend (only when exported for it;
                                   the manifest records the torch and the CPU
                                   extensions it was compiled for)
      deltas/                      online updates written since (`tidal export --delta`;
                                   `tidal.serving.delta` draws their layout)

No pickle anywhere: tensors are safetensors, the program's graph is JSON with raw
weights, and its sample inputs are left out (the one member `torch.export.save` would
pickle is empty). Loading checks the manifest against its content_sha256 and every
other file against the manifest, and refuses a corrupt, altered or incomplete bundle
with a message naming the file. Version 1 bundles, written before the manifest carried
its own sha256, still load; their manifest alone goes unchecked (and take no deltas).
Loading applies the bundle's deltas in order; each is checked as the base is.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import time
import warnings
import weakref
import zipfile
from collections import Counter
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file
from safetensors.torch import load_file as load_torch
from safetensors.torch import save_file as save_torch

from tidal.compile import GeneratedSources, compiled_for, differing, export_program, to_aoti, to_onnx
from tidal.config import RunConfig
from tidal.data.extract import Extractor
from tidal.embedding.checkpoint import (SEAL, as_umask_allows, check_seal, fingerprint, fsync_path, listed_file,
                                        read_json_object, read_safetensors, sealed, write_json_atomic)
from tidal.embedding.pooling import nonfinite_note
from tidal.errors import CheckpointError, ConfigError, CorruptCheckpointError
from tidal.models import RankingModel
from tidal.runtime import checkpoint
from tidal.serving._folders import STAGING_EXTRA, put_in_place, remove_abandoned, staging
from tidal.serving.delta import (DELTA_FORMAT, DELTA_VERSION, DELTAS, Position, RowChanges, Source, apply_rows,
                                 delta_name, delta_names, diff_rows, merge_changes)
from tidal.serving.protocol import input_specs

__all__ = ["Bundle", "Delta", "Head", "export", "export_delta", "load_bundle", "merged", "moved_since", "peek",
           "read_deltas", "readable_deltas", "with_weights"]

FORMAT = "tidal-serving-bundle"
VERSION = 2  # 2: the manifest carries the sha256 of its own content
UNSEALED = 1  # the older version this one reads, whose manifest carries none
MANIFEST = "manifest.json"
PROGRAM = "dense.pt2"
ONNX = "dense.onnx"
AOTI = "dense-aotinductor.pt2"
WEIGHTS = "dense.safetensors"  # a delta's dense weights: the base's program runs them
NO_DELTAS = "a version 1 bundle takes no deltas; export it again in full"
_STAGING = re.compile(r"\.tmp-\d+-\d+-[0-9a-f]+")  # a delta being written: sequence, exporter's pid, a nonce
_SAMPLE_INPUTS = "data/sample_inputs/"  # the archive member torch.export would pickle


@dataclass(frozen=True, kw_only=True)
class Head:
    """What a bundle serves, from its manifest alone (`peek`)."""

    seal: str | None  # its base's fingerprint (None: a version 1 bundle, which takes no deltas)
    config: RunConfig
    targets: list[str]


@dataclass(frozen=True, kw_only=True)
class Bundle:
    """A loaded bundle: its manifest, config, tables as (keys, values) and dense program,
    its deltas applied (`position` says up to which)."""

    path: Path
    manifest: dict
    config: RunConfig
    tables: dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (keys [N] int64 ascending, values [N, D])
    program: torch.export.ExportedProgram
    onnx: bytes | None  # the ONNX model of the program, when exported for the onnxruntime backend
    aoti: Path | None  # the AOTInductor package of the program, when exported for the aotinductor backend
    position: Position | None  # None: a version 1 bundle, which takes no deltas
    source: Source | None  # the checkpoint of its last delta applied, or its own (None: not recorded)

    @property
    def targets(self) -> list[str]:
        return list(self.manifest["targets"])


def export(source: str | os.PathLike, out: str | os.PathLike, *, table_dtype: str | None = None,
           backend: str | None = None) -> Path:
    """Write the bundle of a run directory's latest checkpoint (or of one checkpoint
    directory) to `out`. `table_dtype` (float32 or float16) and `backend` (torch,
    onnxruntime or aotinductor: the bundle then holds an ONNX model or an AOTInductor
    package too) override the config's serving settings; left out, those of the bundle
    `out` holds, if any, are kept (a server of it needs the same backend).

    The tables are evicted first (TTL and row caps, on the copy loaded here): a
    checkpoint holds the state of the run at its step, rows created since the last
    `evict_every` safe point included, and a bundle serves within the caps. A run
    training meanwhile keeps the checkpoint until the export has read it."""
    source, out = _path(source, "export: source"), _path(out, "export: out")
    _check_name_fits(out)
    with _reading(source) as directory:
        return _export(directory, source, out, table_dtype, backend)


def _path(value: object, what: str) -> Path:
    """`value` as a Path, once it is one (or a str)."""
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"{what} must be a path (a str or an os.PathLike), got {value!r}")
    return Path(value)


def _check_name_fits(out: Path) -> None:
    """Refuse a bundle name too long for the names written beside it while it is written."""
    name_max = os.pathconf(out.parent if out.parent.is_dir() else ".", "PC_NAME_MAX")
    most = name_max - STAGING_EXTRA
    if len(os.fsencode(out.name)) > most:
        raise ConfigError(f"{out}: its name has {len(os.fsencode(out.name))} bytes; a bundle's name may have at most "
                          f"{most} ({name_max}, the system's most, less {STAGING_EXTRA} for the names an export "
                          f"writes beside it)")


def _export(directory: Path, source: Path, out: Path, table_dtype: str | None, backend: str | None) -> Path:
    meta = checkpoint.read_meta(directory)
    remove_abandoned(out.parent, _left_beside(out), restore_to=out)
    replaced = _replaced_settings(out)
    backend, table_dtype = backend or replaced.get("backend"), table_dtype or replaced.get("table_dtype")
    if table_dtype is not None:
        table_dtype = _dtype_name(table_dtype)
    config = _with_serving(RunConfig.from_saved(meta["config"]), backend=backend, table_dtype=table_dtype)
    dtype = np.dtype(config.serving.table_dtype)
    _check_replaceable(out, source)
    with staging(out.parent, out.name) as folder:
        (folder / "tables").mkdir()
        for table in checkpoint.load_checked_tables(directory, meta, config.tables, values_only=True):
            table.evict()  # the caps, on this copy: a checkpoint holds the rows of the steps since the last eviction
            keys, values = table.values_by_key()
            save_file({"keys": keys, "values": _cast(table.name, values, dtype)},
                      str(folder / "tables" / f"{table.name}.safetensors"))
        _save_program(_model(config, directory), config, folder)
        _readable_as_umask_allows(folder)
        write_json_atomic(folder / MANIFEST, _manifest(config, _source(directory, meta), folder, str(dtype)))
        fsync_path(folder)
        put_in_place(folder, out)  # a server reading `out` meanwhile finds the old or the new bundle, whole
    return out


def _left_beside(out: Path) -> re.Pattern:
    """The names of the folders exports into `out` write beside it: their staging, and
    (where the system cannot swap two folders at once) the bundle they set aside."""
    return re.compile(rf"\.(tmp|old)-{re.escape(out.name)}-\d+(-[0-9a-f]+)?")


def export_delta(source: str | os.PathLike, bundle_dir: str | os.PathLike) -> Path | None:
    """Write into the bundle at `bundle_dir` the delta from what it serves (its base and
    its deltas) to a checkpoint of the same model (a run directory's latest, or one
    checkpoint directory): rows new or changed, keys no longer served, and the dense
    weights. A running `tidal serve` of the bundle applies it without a restart.
    Returns the delta's folder, or None when the bundle already serves this very
    checkpoint (nothing to write). An earlier checkpoint of the run it serves is
    refused: its delta would roll the served model back. A run training meanwhile keeps the
    checkpoint until the export has read it."""
    with _reading(_path(source, "export_delta: source")) as directory:
        return _export_delta(directory, _path(bundle_dir, "export_delta: bundle_dir"))


def _export_delta(directory: Path, bundle_dir: Path) -> Path | None:
    remove_abandoned(bundle_dir.parent, _left_beside(bundle_dir), restore_to=bundle_dir)
    meta = checkpoint.read_meta(directory)
    config = RunConfig.from_saved(meta["config"])
    served = load_bundle(bundle_dir)
    if served.position is None:
        raise CheckpointError(f"{served.path}: {NO_DELTAS}")
    _check_same_model(served, config)
    if _serves_already(served, _source(directory, meta)):
        return None
    folder = _deltas_folder(served.path)
    sequence = served.position.sequence + 1
    with staging(folder, delta_name(sequence)) as written:
        (written / "tables").mkdir()
        tables = checkpoint.load_checked_tables(directory, meta, config.tables, values_only=True)
        counts = _write_changes(served, tables, written)
        save_torch({k: v.contiguous() for k, v in _model(config, directory).state_dict().items()},
                   str(written / WEIGHTS))
        _readable_as_umask_allows(written)
        manifest = _delta_manifest(served.position, served.manifest["table_dtype"], _source(directory, meta), written,
                                   counts)
        write_json_atomic(written / MANIFEST, manifest)
        fsync_path(written / "tables")
        fsync_path(written)
        return _publish(written, folder / delta_name(sequence), served.path, served.position)


def _readable_as_umask_allows(staging: Path) -> None:
    """Every file written under `staging` with the permissions open() would give it."""
    for path in staging.rglob("*"):
        if path.is_file():
            as_umask_allows(path)


def _deltas_folder(bundle: Path) -> Path:
    """The bundle's deltas folder, made (and flushed to disk) if new, without the
    temporary folders of delta exports that died."""
    folder = bundle / DELTAS
    if not folder.is_dir():
        folder.mkdir(exist_ok=True)  # another export may make it too
        fsync_path(bundle)
    remove_abandoned(folder, _STAGING)
    return folder


def _check_same_model(served: Bundle, config: RunConfig) -> None:
    """A delta must fit its bundle: the same features (so the same inputs and targets),
    model and tables; only the rows and the dense weights may change."""
    differ = [what for what, theirs, ours in (
        ("features", served.config.features, config.features), ("model", served.config.model, config.model),
        ("tables (names and dims)", {t.name: t.dim for t in served.config.tables},
         {t.name: t.dim for t in config.tables})) if theirs != ours]
    if differ:
        raise ConfigError(f"--delta: the checkpoint's {' and '.join(differ)} differ from the bundle's ({served.path}); "
                          f"a delta changes only rows and dense weights: export a full bundle instead")


def _write_changes(served: Bundle, tables: list, staging: Path) -> dict[str, dict[str, int]]:
    """Each table's changes from what `served` serves, written under `staging`; their counts."""
    dtype = np.dtype(served.manifest["table_dtype"])
    counts = {}
    for table in tables:
        table.evict()  # the caps, as a full export applies them
        keys, values = table.values_by_key()
        changes = diff_rows(*served.tables[table.name], keys, _cast(table.name, values, dtype))
        save_file({"keys": changes.keys, "values": changes.values, "removed": changes.removed},
                  str(staging / "tables" / f"{table.name}.safetensors"))
        counts[table.name] = {"changed": len(changes.keys), "removed": len(changes.removed)}
    return counts


def _delta_manifest(position: Position, table_dtype: str, source: dict, staging: Path, counts: dict) -> dict:
    return sealed({"format": DELTA_FORMAT, "version": DELTA_VERSION, "sequence": position.sequence + 1,
                   "base": position.base, "previous": position.seal, **_created(), **source,
                   "table_dtype": table_dtype, "tables": counts, "files": _files(staging)})


def _source(directory: Path, meta: dict) -> dict:
    """What a manifest records of the checkpoint it was exported from: its folder's
    name, its run's id, its step, its trainer.json's sha256 (the id and the sha256 are
    None in checkpoints written before them) and the checkpoint a warm start began its
    run from (`origin`, with that one's own; None for a run from scratch)."""
    return {"source_checkpoint": directory.name, "source_run": meta.get("run_id"),
            "source_step": meta["position"]["step"], "source_sha256": meta.get(SEAL),
            "source_origin": meta.get("origin")}


def _serves_already(served: Bundle, source: dict) -> bool:
    """Whether `served` already serves the checkpoint of `source` (`_source`); refused
    when that checkpoint is an earlier one of the same run. Checkpoints of another run
    (a retraining), or exported before manifests recorded their run, are not compared."""
    newest = _newest_manifest(served)
    if source["source_sha256"] is not None and source["source_sha256"] == newest.get("source_sha256"):
        return True
    if source["source_run"] is None:
        return False
    where = f"delta {served.position.sequence}" if served.position.sequence else "the base"
    if source["source_run"] == newest.get("source_run") and source["source_step"] < newest["source_step"]:
        raise CheckpointError(f"{source['source_checkpoint']}: a checkpoint of step {source['source_step']}, older "
                              f"than the one of the same run {served.path} serves ({newest['source_checkpoint']}, step "
                              f"{newest['source_step']}, in {where}); a delta from it would roll the served model "
                              f"back. Export it in full (without --delta) to serve it")
    for ancestor in checkpoint.lineage(newest.get("source_origin")):
        if ancestor["run_id"] == source["source_run"] and source["source_step"] <= ancestor["step"]:
            raise CheckpointError(
                f"{source['source_checkpoint']}: a checkpoint of step {source['source_step']} of a run that the "
                f"model {served.path} serves ({newest['source_checkpoint']}, in {where}) descends from by warm "
                f"starts, from its step {ancestor['step']} ({ancestor['checkpoint']}); a delta from it would roll the "
                f"served model back. Export it in full (without --delta) to serve it")
    return False


def _newest_manifest(served: Bundle) -> dict:
    """The manifest of what `served` serves last: its newest delta's, or its own."""
    if not served.position.sequence:
        return served.manifest
    return read_json_object(served.path / DELTAS / delta_name(served.position.sequence) / MANIFEST)


def _publish(staging: Path, final: Path, bundle: Path, position: Position) -> Path:
    """Rename a written delta into place; refused if the bundle left `position` meanwhile
    (a full export replaced it) or another export took this delta's sequence."""
    moved = _moved_from(bundle, _read_manifest(bundle), position)
    if moved:
        raise CheckpointError(f"{bundle}: {moved} while this delta was written; export the delta again")
    try:
        os.rename(staging, final)
    except OSError:
        if final.exists():
            raise CheckpointError(f"{final}: written by another export meanwhile; export the delta again") from None
        raise
    fsync_path(final.parent)
    return final


def _cast(name: str, values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`values` as `dtype`, refused where a finite value would become infinite (float16
    holds at most 65504); values already NaN or infinite stay so, as in float32."""
    with np.errstate(over="ignore"):  # an overflow is refused below, by name
        cast = values.astype(dtype)
    if np.finfo(dtype).max >= np.finfo(values.dtype).max:  # float32 to float32: nothing can overflow
        return cast
    overflow = np.isfinite(values) & ~np.isfinite(cast)
    if overflow.any():
        raise ConfigError(f"table {name!r}: {int(overflow.sum())} values do not fit {dtype} (largest magnitude "
                          f"{np.abs(values[overflow]).max():.6g}, {dtype}'s largest is {np.finfo(dtype).max:.6g}); "
                          f"export with table dtype float32")
    return cast


def _reading(source: Path) -> AbstractContextManager[Path]:
    """The checkpoint to export, held while it is read (`checkpoint.reading`)."""
    if not (source / "trainer.json").exists() and not (source / "checkpoints").is_dir():  # else reading says what is amiss
        checkpoint.refuse_bundle(source)
        what = "no such file or folder" if not source.exists() else "no checkpoint to export"
        raise CheckpointError(f"{source}: {what} (expected a run directory with checkpoints/{checkpoint.LATEST}, or a "
                              f"checkpoint directory with trainer.json){'; train first' if source.exists() else ''}")
    return checkpoint.reading(source)


def _check_replaceable(out: Path, source: Path) -> None:
    """`out` may be written: new, empty, or an earlier bundle, and holding no part of `source`."""
    if out.resolve() == source.resolve() or source.resolve().is_relative_to(out.resolve()):
        raise CheckpointError(f"--out {out} holds the checkpoint being exported ({source}); choose another folder")
    if out.is_symlink():  # the swap into place would replace the link, not the bundle it leads to
        raise CheckpointError(f"--out {out} is a symbolic link (to {os.readlink(out)}); a full export replaces the "
                              f"folder it is given: give the folder itself as --out ({out.resolve()})")
    if out.is_file():
        raise CheckpointError(f"--out {out} is a file; expected a folder to write the bundle to")
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise CheckpointError(f"--out {out}: {blocking} is a file, so no folder can be made there; choose another "
                              f"--out")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise CheckpointError(f"--out {out} is a folder that is not a serving bundle; a bundle replaces only an "
                              f"earlier bundle or an empty folder")


def _replaced_settings(out: Path) -> dict:
    """The serving backend and table dtype of the bundle at `out`, if one is there."""
    try:
        manifest = json.loads((out / MANIFEST).read_text())
        return {"backend": manifest["config"]["serving"]["backend"], "table_dtype": manifest["table_dtype"]}
    except (OSError, ValueError, KeyError, TypeError):  # no bundle there (or not one to go by)
        return {}


def _model(config: RunConfig, directory: Path) -> RankingModel:
    model = RankingModel(config.model, **model_sizes(config))
    tensors = checkpoint.load_dense(directory)
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    return model.eval()


def model_sizes(config: RunConfig) -> dict[str, int]:
    """The `RankingModel` sizes of a config: features, dim, dense features, targets."""
    extractor = Extractor(config.features)
    dims = {t.name: t.dim for t in config.tables}
    return {"num_features": len(extractor.sparse), "dim": dims[extractor.sparse[0].table],
            "dense_features": len(extractor.dense), "num_targets": len(extractor.labels)}


def _save_program(model: RankingModel, config: RunConfig, staging: Path) -> None:
    """`model` as a torch.export program whose batch size may be any of 1..largest
    bucket, and as an ONNX model checked against it for the onnxruntime backend."""
    sizes = model_sizes(config)
    example = (torch.zeros(2, sizes["num_features"], sizes["dim"]), torch.zeros(2, sizes["dense_features"]))
    program = export_program(model, example, config.serving.buckets[-1])
    if config.serving.backend == "onnxruntime":
        (staging / ONNX).write_bytes(to_onnx(program, example, config.serving.buckets))
    if config.serving.backend == "aotinductor":
        to_aoti(program, example, config.serving.buckets, staging / AOTI)
    program._example_inputs = None  # otherwise saved as a pickle
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No complete tensor found")  # torch's note on CPU weights
        torch.export.save(program, str(staging / PROGRAM))


def _dtype_name(table_dtype: object) -> str:
    """"float32" or "float16" for what names one of them ("f2", np.float16, ...)."""
    try:
        name = np.dtype(table_dtype).name  # type: ignore[call-overload]
    except TypeError:
        name = None
    if name not in ("float32", "float16"):
        raise ConfigError(f"table dtype must be float32 or float16, got {table_dtype!r}")
    return name


def _with_serving(config: RunConfig, **settings: str | None) -> RunConfig:
    """`config` (a checkpoint's) with the serving `settings` given (not None) replaced:
    the bundle's config says what it serves."""
    given = {k: v for k, v in settings.items() if v is not None}
    if not given:
        return config
    saved = config.model_dump(mode="json")
    return RunConfig.from_saved({**saved, "serving": {**saved["serving"], **given}})


def _manifest(config: RunConfig, source: dict, staging: Path, dtype: str) -> dict:
    extractor = Extractor(config.features)
    manifest = {"format": FORMAT, "version": VERSION, **_created(), **source, "table_dtype": dtype,
                "targets": [f.name for f in extractor.labels],
                "inputs": _inputs(config),  # what a request carries
                "config": config.model_dump(mode="json"),
                "files": _files(staging)}
    if config.serving.backend == "aotinductor":
        manifest["aotinductor"] = compiled_for()  # the torch and the CPU the package was compiled for
    return sealed(manifest)  # its own sha256, so that an edited manifest is refused


def _created() -> dict:
    return {"created_unix_s": time.time(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _files(staging: Path) -> dict[str, dict]:
    """The size and sha256 of every file under `staging`, by relative path (flushed to disk)."""
    return {str(p.relative_to(staging)): fingerprint(p, sync=True) for p in sorted(staging.rglob("*")) if p.is_file()}


def _inputs(config: RunConfig) -> list[dict]:
    """The request inputs of a config, as the manifest lists them (JSON values). An
    unweighted input leaves `weight_separator` out, as bundles made before it did."""
    specs = [asdict(spec) for spec in input_specs(config).values()]
    return json.loads(json.dumps([{k: v for k, v in spec.items() if k != "weight_separator" or v} for spec in specs]))


# ---------------------------------------------------------------------- loading


def load_bundle(path: str | os.PathLike) -> Bundle:
    """Load and check a bundle, its deltas applied in order; a missing, truncated or
    altered file is refused by name."""
    path = _path(path, "load_bundle: path")
    manifest = _read_manifest(path)
    for relative, expected in manifest["files"].items():
        _check_file(listed_file(path, relative, path / MANIFEST), expected)
    config = _config_of(path, manifest)
    if manifest.get("inputs") != _inputs(config):
        raise CorruptCheckpointError(f"{path / MANIFEST}: its inputs do not match its features; export it again")
    tables = {t.name: _read_table(path / "tables" / f"{t.name}.safetensors", t.dim) for t in config.tables}
    sources = GeneratedSources()
    with sources.made():
        program = _read_program(path / PROGRAM)
    position = Position(base=manifest[SEAL]) if SEAL in manifest else None
    onnx = (path / ONNX).read_bytes() if ONNX in manifest["files"] else None
    aoti = path / AOTI if AOTI in manifest["files"] else None
    deltas = read_deltas(path, position, config) if position else []
    source = Source.of(manifest)
    if deltas:
        changes = merged(deltas)
        tables = {name: apply_rows(*rows, changes[name]) for name, rows in tables.items()}
        position, source = deltas[-1].position, Source.of(deltas[-1].manifest)
        with_weights(program.state_dict, deltas[-1])  # the program of a fresh load is nobody else's
    bundle = Bundle(path=path, manifest=manifest, config=config, tables=tables, program=program, onnx=onnx,
                    aoti=aoti, position=position, source=source)
    weakref.finalize(bundle, sources.forget)  # its program's generated source, once the bundle is gone
    return bundle


def peek(path: str | os.PathLike) -> Head:
    """What the bundle at `path` serves, from its manifest alone (checked; no other file
    is read): to decide whether to load it."""
    path = Path(path)
    manifest = _read_manifest(path)
    return Head(seal=manifest.get(SEAL), config=_config_of(path, manifest), targets=list(manifest["targets"]))


def _config_of(path: Path, manifest: dict) -> RunConfig:
    try:
        return RunConfig.from_saved(manifest["config"])
    except ConfigError as exc:
        raise CorruptCheckpointError(f"{path / MANIFEST}: its config is not valid: {exc}") from None


def _read_manifest(path: Path) -> dict:
    file = path / MANIFEST
    if not path.exists():
        beside = _left_beside(path)
        aside = sorted(p for p in path.parent.glob(f".old-{path.name}-*") if beside.fullmatch(p.name)) \
            if path.parent.is_dir() else []
        if aside:
            raise CheckpointError(f"{path}: missing, and {aside[0]} holds the bundle an export killed part way "
                                  f"set aside; rename it back to serve it (the next tidal export --out {path} puts "
                                  f"it back before it replaces it)")
        raise CheckpointError(f"{path}: no such file or folder; give a bundle folder written by tidal export")
    if (path / "checkpoints").is_dir():
        raise CheckpointError(f"{path}: a training run's folder, not a serving bundle; write one from it with "
                              f"tidal export --checkpoint {path} --out BUNDLE")
    if not file.exists():
        raise CheckpointError(f"{path}: not a serving bundle ({MANIFEST} is missing); write one with tidal export")
    manifest = read_json_object(_inside(file, path))
    keys = {"format", "version", "targets", "config", "files"}
    if not keys <= set(manifest) or manifest["format"] != FORMAT \
            or not isinstance(manifest["config"], dict) or not isinstance(manifest["files"], dict):
        raise CorruptCheckpointError(f"{file}: expected a {FORMAT} manifest with {sorted(keys)} (config and files "
                                     f"objects)")
    if manifest["version"] not in (UNSEALED, VERSION):  # first: a later version may seal its own way
        raise CheckpointError(f"{file}: bundle version {manifest['version']!r}, this Tidal reads versions "
                              f"{UNSEALED} and {VERSION}")
    if SEAL in manifest or manifest["version"] == VERSION:
        check_seal(file, manifest)
    needed = {PROGRAM} | {f"tables/{t['name']}.safetensors" for t in manifest["config"].get("tables", [])}
    if not needed <= set(manifest["files"]):
        raise CorruptCheckpointError(f"{file}: lists no {sorted(needed - set(manifest['files']))}")
    return manifest


def _inside(path: Path, root: Path) -> Path:
    """`path`, refused unless it stays inside `root` once symbolic links are followed."""
    if not path.resolve().is_relative_to(root.resolve()):
        raise CorruptCheckpointError(f"{path}: leads outside {root} (through a symbolic link); a bundle reads only "
                                     f"its own files")
    return path


# ---------------------------------------------------------------------- deltas


@dataclass(frozen=True, kw_only=True)
class Delta:
    """One delta of a bundle, read and checked: its rows per table, the dense weights,
    and where the bundle stands once it is applied."""

    path: Path
    manifest: dict
    position: Position
    tables: dict[str, RowChanges]
    weights: dict[str, torch.Tensor]  # the dense network's state dict, for the base's program


def read_deltas(path: str | os.PathLike, position: Position, config: RunConfig) -> list[Delta]:
    """The deltas of the bundle at `path` that follow `position`, in order, each checked
    (its files, and that it follows the base and the delta before it). Refused when one
    cannot be applied, or when the bundle is no longer the base of `position` (a full
    export replaced it)."""
    deltas, stopped = readable_deltas(path, position, config)
    if stopped is not None:
        raise type(stopped)(f"{stopped}: remove them to serve the deltas before, or export the bundle in full")
    return deltas


def readable_deltas(path: str | os.PathLike, position: Position,
                    config: RunConfig) -> tuple[list[Delta], CheckpointError | None]:
    """As `read_deltas`, but up to the first delta that cannot be applied (damaged, or
    not following the one before it): the deltas before it, and the error that says
    why it cannot (None when every one can)."""
    path = Path(path)
    manifest = _read_manifest(path)
    moved = _moved_from(path, manifest, position)
    if moved:
        raise CheckpointError(f"{path}: {moved} since it was loaded; load it again to serve it (a running tidal serve "
                              f"does at its next update)")
    folder = path / DELTAS
    deltas: list[Delta] = []
    for name in delta_names([p.name for p in folder.iterdir()] if folder.is_dir() else []):
        if int(name) <= position.sequence:
            continue
        try:
            deltas.append(_read_delta(folder / name, position, config, manifest["table_dtype"]))
        except CheckpointError as exc:
            return deltas, type(exc)(f"{exc}. Delta {name} and those after it cannot be applied")
        position = deltas[-1].position
    return deltas, None


def merged(deltas: Sequence[Delta]) -> dict[str, RowChanges]:
    """The row changes of `deltas` in order, as one per table."""
    return {name: functools.reduce(merge_changes, [d.tables[name] for d in deltas]) for name in deltas[0].tables}


def moved_since(path: str | os.PathLike, position: Position | None) -> str | None:
    """Why the bundle at `path` no longer stands at `position`, in words (a full export
    replaced it, or its deltas were rewritten), or None: its new deltas follow (or,
    at position None, it is still a version 1 bundle, which takes none)."""
    path = Path(path)
    manifest = _read_manifest(path)
    if position is None:
        return "was replaced by a full export that takes deltas" if SEAL in manifest else None
    return _moved_from(path, manifest, position)


def _moved_from(path: Path, manifest: dict, position: Position) -> str | None:
    """Why the bundle at `path` (with `manifest`) no longer stands at `position`, or None."""
    if manifest.get(SEAL) != position.base:
        return "was replaced by another full export"
    if position.sequence:
        file = path / DELTAS / delta_name(position.sequence) / MANIFEST
        found = read_json_object(file) if file.exists() else None
        if found is None or found.get(SEAL) != position.seal:
            return f"had its deltas rewritten (delta {delta_name(position.sequence)} is gone or another one)"
    return None


def _read_delta(folder: Path, position: Position, config: RunConfig, table_dtype: str) -> Delta:
    file = folder / MANIFEST
    if not file.exists():
        raise CorruptCheckpointError(f"{file}: missing; the bundle is incomplete (export it again)")
    manifest = read_json_object(_inside(file, folder.parent.parent))  # deltas/NAME/manifest.json, all in the bundle
    keys = {"format", "version", "sequence", "base", "previous", "table_dtype", "files"}
    if not keys <= set(manifest) or manifest["format"] != DELTA_FORMAT \
            or not isinstance(manifest["files"], dict):
        raise CorruptCheckpointError(f"{file}: expected a {DELTA_FORMAT} manifest with {sorted(keys)} (files an "
                                     f"object)")
    if manifest["version"] != DELTA_VERSION:
        raise CheckpointError(f"{file}: delta version {manifest['version']}, this Tidal reads version {DELTA_VERSION}")
    check_seal(file, manifest)
    _check_follows(file, manifest, position)
    if manifest["table_dtype"] != table_dtype:
        raise CorruptCheckpointError(f"{file}: tables of {manifest['table_dtype']}, the bundle's are {table_dtype}")
    needed = {WEIGHTS} | {f"tables/{t.name}.safetensors" for t in config.tables}
    if not needed <= set(manifest["files"]):
        raise CorruptCheckpointError(f"{file}: lists no {sorted(needed - set(manifest['files']))}")
    for relative, expected in manifest["files"].items():
        _check_file(listed_file(folder, relative, file), expected)
    dtype = np.dtype(table_dtype)
    tables = {t.name: _read_changes(folder / "tables" / f"{t.name}.safetensors", t.dim, dtype) for t in config.tables}
    return Delta(path=folder, manifest=manifest, tables=tables, weights=read_safetensors(folder / WEIGHTS, load_torch),
                 position=Position(base=position.base, sequence=position.sequence + 1, seal=manifest[SEAL]))


def _check_follows(file: Path, manifest: dict, position: Position) -> None:
    """Refuse a delta that is not the next one for a bundle at `position`."""
    expected = position.sequence + 1
    if manifest["sequence"] != expected:
        raise CheckpointError(f"{file}: holds delta {manifest['sequence']}, but delta {expected} comes next after "
                              f"delta {position.sequence}")
    if file.parent.name != delta_name(expected):
        raise CheckpointError(f"{file}: holds delta {expected}, which comes next after delta {position.sequence}, but "
                              f"its folder is {file.parent.name}, not {delta_name(expected)}: a delta folder was "
                              f"renamed or copied")
    if manifest["base"] != position.base:
        raise CheckpointError(f"{file}: written for another bundle (base sha256 {str(manifest['base'])[:12]}..., this "
                              f"one's is {position.base[:12]}...)")
    if manifest["previous"] != position.seal:
        raise CheckpointError(f"{file}: follows another delta {position.sequence} than this bundle's")


def _check_file(file: Path, expected: dict) -> None:
    if not file.exists():
        raise CorruptCheckpointError(f"{file}: missing; the bundle is incomplete (export it again)")
    if not file.is_file():
        raise CorruptCheckpointError(f"{file}: not a regular file")
    found = fingerprint(file)
    if found != expected:
        raise CorruptCheckpointError(f"{file}: {found['bytes']} bytes with sha256 {found['sha256'][:12]}..., the manifest "
                                     f"says {expected['bytes']} bytes, {expected['sha256'][:12]}...: corrupt or altered")


def _read_table(file: Path, dim: int) -> tuple[np.ndarray, np.ndarray]:
    arrays = read_safetensors(file)
    keys, values = arrays.get("keys"), arrays.get("values")
    if keys is None or values is None or not _ascending_keys(keys) or values.ndim != 2 \
            or values.shape != (keys.shape[0], dim) or values.dtype not in (np.float32, np.float16):
        raise CorruptCheckpointError(f"{file}: expected keys [N] int64 and ascending, and values [N, {dim}] "
                                     f"float32/float16")
    _check_finite(file, keys, values)
    return keys, values


def _check_finite(file: Path, keys: np.ndarray, values: np.ndarray) -> None:
    """Refuse rows holding a NaN or an infinity: no trained table holds one, and every
    score of their ids would be refused."""
    if note := nonfinite_note(values, keys):
        raise CorruptCheckpointError(f"{file}: 'values' holds {note}, which training never writes")


def _read_changes(file: Path, dim: int, dtype: np.dtype) -> RowChanges:
    arrays = read_safetensors(file)
    keys, values, removed = arrays.get("keys"), arrays.get("values"), arrays.get("removed")
    if keys is None or values is None or removed is None or not _ascending_keys(keys) \
            or not _ascending_keys(removed) or values.shape != (keys.shape[0], dim) or values.dtype != dtype:
        raise CorruptCheckpointError(f"{file}: expected keys [n] and removed [m], int64 and ascending, and values "
                                     f"[n, {dim}] {dtype}")
    _check_finite(file, keys, values)
    return RowChanges(keys=keys, values=values, removed=removed)


def _ascending_keys(keys: np.ndarray) -> bool:
    return keys.dtype == np.int64 and keys.ndim == 1 and bool(np.all(keys[1:] > keys[:-1]))


# what torch.export.save writes under the archive's one top folder; torch.export.load
# unpickles other members (legacy weight files, opaque and custom objects)
_PROGRAM_MEMBERS = re.compile(r"data/weights/(weight_\d+|model_weights_config\.json)|data/constants/(tensor_\d+|"
                              r"model_constants_config\.json)|models/model\.json|data/sample_inputs/model\.pt|"
                              r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id")
_TENSOR_FILE = re.compile(r"weight_\d+|tensor_\d+")  # the path_name of a tensor stored as its bytes


def _unsafe_members(archive: zipfile.ZipFile) -> list[str]:
    """What a torch.export archive holds besides the tensors, configs and graph that
    torch.export.save writes, each a member torch.export.load could unpickle (running
    whatever code it names): another member, one named twice (torch reads one copy,
    this check another), a non-empty sample input, a weight or constant whose config
    entry is pickled or not a tensor file; a config that is not the JSON torch writes."""
    names = archive.namelist()
    root = names[0].partition("/")[0] if names else ""
    found = [n for n, count in Counter(names).items() if count > 1]
    found += [n for n in names if not (n.startswith(root + "/") and _PROGRAM_MEMBERS.fullmatch(n[len(root) + 1:]))]
    found += [i.filename for i in archive.infolist() if _SAMPLE_INPUTS in i.filename and i.file_size]
    for name in names:
        if name.endswith("_config.json"):
            try:
                entries = json.loads(archive.read(name))["config"].items()
                found += [f"{name}: {key}" for key, entry in entries
                          if entry.get("use_pickle") is not False or not _TENSOR_FILE.fullmatch(entry.get("path_name"))]
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
                found.append(name)
    return found


def with_weights(state: dict[str, torch.Tensor], delta: Delta) -> None:
    """Copy `delta`'s dense weights into `state` (a program's state dict, in place),
    refused unless they are the same tensors: names, shapes and dtypes."""
    differ = differing(delta.weights, state)
    if differ:
        raise CorruptCheckpointError(f"{delta.path / WEIGHTS}: expected the bundle's dense weights {sorted(state)} "
                                     f"(names, shapes and dtypes); these differ: {differ}")
    with torch.no_grad():
        for name, tensor in delta.weights.items():
            state[name].copy_(tensor)


def _read_program(file: Path) -> torch.export.ExportedProgram:
    """The program in `file`, read once: torch loads the very bytes checked, not a file
    that someone could replace between the check and the load."""
    archive_bytes = file.read_bytes()
    with zipfile.ZipFile(io.BytesIO(archive_bytes)) as archive:
        unsafe = _unsafe_members(archive)
    if unsafe:
        raise CorruptCheckpointError(f"{file}: holds what torch would unpickle or torch.export.save does not write "
                                     f"({unsafe[0]}); bundles never do, export it again")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="No complete tensor found")
        return torch.export.load(io.BytesIO(archive_bytes))
