"""The torch backend serves the program rewritten by the graph rules: the same scores as
the program as exported, before and after a delta brings new dense weights."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch
from serving_helpers import file_rows, serving_config

from tidal.config import RunConfig, ServingConfig
from tidal.errors import CheckpointError
from tidal.runtime import Trainer
from tidal.serving import Piece, Predictor, export, export_delta, load_bundle
from tidal.serving.bundle import read_deltas

MMOE_RULES = ["gather_slices", "merge_linears", "stack_slices", "einsum_bmm"]
CUDA_MISSING = "needs a CUDA device (torch.cuda.is_available() is False)"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A DLRM with an MMoE head exported half way (`base`), then trained to its end (`full`)."""
    root = tmp_path_factory.mktemp("rewrite")
    saved = serving_config(root).model_dump()
    config = RunConfig(**{**saved, "training": {**saved["training"], "checkpoint_every": 8},
                          "model": {**saved["model"], "head": "mmoe", "experts": 3, "expert_sizes": [16],
                                    "tower_sizes": [8]}})
    Trainer(config).fit(max_steps=8)
    base = export(config.training.run_dir, root / "base")
    trainer = Trainer(config)
    trainer.fit(resume=True)
    return SimpleNamespace(run_dir=Path(config.training.run_dir), base=base, trainer=trainer,
                           full=export(config.training.run_dir, root / "full"))


def _piece(predictor: Predictor, rows: pa.RecordBatch) -> Piece:
    return Piece(items=pa.RecordBatch.from_pydict({c: rows.column(c) for c in predictor.item_columns}),
                 user=pa.RecordBatch.from_pydict({c: rows.column(c).slice(0, 1) for c in predictor.user_columns}))


def _predictor(bundle_dir: Path, *, rewrite: bool, device: str = "cpu") -> Predictor:
    bundle = load_bundle(bundle_dir)
    settings = ServingConfig(**{**bundle.config.serving.model_dump(), "rewrite": rewrite})
    return Predictor(bundle, serving=settings, device=device)


def test_the_rewritten_program_scores_as_the_program_exported(run):
    rewritten, exported = _predictor(run.base, rewrite=True), _predictor(run.base, rewrite=False)
    assert [o.rule for o in rewritten.rewrites if o.kept] == MMOE_RULES and exported.rewrites == ()
    rows = file_rows(run.trainer, 100)
    for size in (1, 3, 64, 100):  # 100 rows: a bucket of 256
        piece = _piece(rewritten, rows.slice(0, size))
        np.testing.assert_allclose(rewritten.predict([piece]), exported.predict([piece]), rtol=1e-5, atol=1e-6)


def test_a_delta_reaches_the_rewritten_program(run, tmp_path):
    bundle_dir = Path(shutil.copytree(run.base, tmp_path / "bundle"))
    predictor = _predictor(bundle_dir, rewrite=True)
    piece = _piece(predictor, file_rows(run.trainer, 50))
    before = predictor.predict([piece])
    merged_before = _merged_weight(predictor).clone()
    export_delta(run.run_dir, bundle_dir)
    predictor.update(read_deltas(bundle_dir, predictor.position, predictor.config))
    after, full = predictor.predict([piece]), _predictor(run.full, rewrite=False).predict([piece])
    np.testing.assert_allclose(after, full, rtol=1e-5, atol=1e-6)
    assert not np.allclose(after, before, rtol=1e-4) and not torch.equal(_merged_weight(predictor), merged_before)
    assert [o.rule for o in predictor.rewrites if o.kept] == MMOE_RULES


def test_batches_under_way_keep_their_program_and_a_delta_applied_twice_is_refused(run, tmp_path):
    bundle_dir = Path(shutil.copytree(run.base, tmp_path / "bundle"))
    predictor = _predictor(bundle_dir, rewrite=True)
    piece = _piece(predictor, file_rows(run.trainer, 20))
    before = predictor.predict([piece])
    under_way = predictor.sparse([piece])  # its dense stage comes after the update
    export_delta(run.run_dir, bundle_dir)
    deltas = read_deltas(bundle_dir, predictor.position, predictor.config)
    predictor.update(deltas)
    np.testing.assert_array_equal(predictor.dense(under_way), before)  # the old rows and the old program
    assert not np.allclose(predictor.predict([piece]), before, rtol=1e-4)
    program = predictor._program
    with pytest.raises(CheckpointError, match=r"delta 1 does not follow the delta served, 1; read the deltas that "
                                              r"follow it"):
        predictor.update(deltas)
    assert predictor._program is program and predictor.position.sequence == 1


def _merged_weight(predictor: Predictor) -> torch.Tensor:
    """The weight of the rewritten program's one linear layer of the MMoE experts and gates."""
    module = predictor._program
    (name,) = [n.target for n in module.graph.nodes if n.op == "get_attr" and "linear_weight" in n.target]
    return getattr(module, name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_MISSING)
def test_the_rewritten_program_on_a_gpu_scores_as_on_the_cpu(run):
    gpu, cpu = _predictor(run.base, rewrite=True, device="cuda"), _predictor(run.base, rewrite=False)
    assert [o.rule for o in gpu.rewrites if o.kept] == MMOE_RULES
    piece = _piece(gpu, file_rows(run.trainer, 70))
    np.testing.assert_allclose(gpu.predict([piece]), cpu.predict([piece]), rtol=1e-4, atol=1e-5)


def test_tidal_serve_names_the_rules_kept_and_those_left_out_with_why():
    from tidal.cli import _dense_backend
    from tidal.compile import NOT_FOUND, RuleOutcome

    outcomes = (RuleOutcome(rule="gather_slices", places=1, kept=True, difference=0.0, reason="same outputs"),
                RuleOutcome(rule="merge_linears", places=1, kept=False, difference=0.5, reason="its outputs differ"),
                RuleOutcome(rule="stack_slices", places=0, kept=False, difference=None, reason="it failed: KeyError"),
                RuleOutcome(rule="einsum_bmm", places=0, kept=False, difference=None, reason=NOT_FOUND),
                RuleOutcome(rule="more", places=0, kept=False, difference=None, reason="it failed: KeyError"))
    line = _dense_backend(SimpleNamespace(backend="torch", rewrites=outcomes))
    assert line == ("torch, rewritten by gather_slices; merge_linears left out: its outputs differ; stack_slices, more "
                    "left out: it failed: KeyError")
    assert _dense_backend(SimpleNamespace(backend="onnxruntime", rewrites=())) == "onnxruntime"
