"""The ONNX Runtime backend: conversion checked against the torch program, new weights by name."""

from __future__ import annotations

import sys
import threading
from types import SimpleNamespace

import pytest
import torch

from tidal.compile import OnnxProgram, export_program, to_onnx
from tidal.config import ModelConfig
from tidal.errors import BatchError, CheckpointError, ConfigError
from tidal.models import RankingModel

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

BUCKETS = [1, 4, 64]
KINDS = [("dlrm", {}, 3), ("dcn", {}, 3), ("deepfm", {}, 0), ("wide_deep", {}, 2), ("dlrm", {"head": "mmoe"}, 3),
         ("dlrm", {}, 0)]  # without dense features, its bottom layer is a learned constant


def _program(kind: str, extra: dict, dense: int, seed: int = 0) -> tuple:  # type: ignore[type-arg]
    torch.manual_seed(seed)
    model = RankingModel(ModelConfig(kind=kind, **extra), num_features=4, dim=8, dense_features=dense,
                         num_targets=2).eval()
    example = (torch.zeros(2, 4, 8), torch.zeros(2, dense))
    return export_program(model, example, BUCKETS[-1]), example


def _onnx(program, example) -> OnnxProgram:  # type: ignore[no-untyped-def]
    return OnnxProgram.of(to_onnx(program, example, BUCKETS), program, threads=1)


@pytest.mark.parametrize(("kind", "extra", "dense"), KINDS)
def test_every_network_converts_and_scores_as_its_program_at_every_bucket(kind, extra, dense):
    program, example = _program(kind, extra, dense)
    onnx = _onnx(program, example)
    module = program.module()
    for rows in [*BUCKETS, 7]:  # any batch size up to the largest bucket runs
        pooled, dense_in = torch.randn(rows, 4, 8), torch.randn(rows, dense)
        with torch.no_grad():
            expected = module(pooled, dense_in)
        found = onnx.forward(pooled, dense_in)
        assert found.shape == (rows, 2) and found.dtype == torch.float32
        torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-5)


def test_converting_leaves_the_programs_weights_as_they_were():
    program, example = _program("dlrm", {}, 3)
    before = {n: t.detach().clone() for n, t in program.state_dict.items()}
    to_onnx(program, example, BUCKETS)
    assert all(torch.equal(program.state_dict[n], t) for n, t in before.items())
    assert all(torch.equal(program.module().state_dict()[n], t) for n, t in before.items())


@pytest.mark.parametrize(("kind", "extra", "dense"), [KINDS[0], KINDS[1], KINDS[4], KINDS[5]])
def test_new_weights_put_in_by_name_score_as_the_program_with_those_weights(kind, extra, dense):
    program, example = _program(kind, extra, dense)
    onnx = _onnx(program, example)
    trained, _ = _program(kind, extra, dense, seed=1)  # the same network, other weights
    new = trained.module().state_dict()
    updated = onnx.with_weights(new)
    pooled, dense_in = torch.randn(9, 4, 8), torch.randn(9, dense)
    with torch.no_grad():
        expected, before = trained.module()(pooled, dense_in), program.module()(pooled, dense_in)
    torch.testing.assert_close(updated.forward(pooled, dense_in), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(onnx.forward(pooled, dense_in), before, rtol=1e-4, atol=1e-5)  # the old one goes on
    assert not torch.allclose(expected, before)
    assert all(torch.equal(updated.state_dict()[n], t) for n, t in new.items())


def test_a_conversion_that_does_not_score_as_the_program_is_refused(monkeypatch):
    program, example = _program("dlrm", {}, 3)
    convert = torch.onnx.export

    def mistaken(*args, **kwargs):  # type: ignore[no-untyped-def]
        proto = convert(*args, **kwargs).model_proto
        next(n for n in proto.graph.node if n.op_type == "Relu").op_type = "Sigmoid"  # a model of another network
        return SimpleNamespace(model_proto=proto)

    monkeypatch.setattr(torch.onnx, "export", mistaken)
    with pytest.raises(CheckpointError, match=r"the ONNX model of the dense network differs from its torch program "
                                              r"at batch 1: shape \[1, 2\] against \[1, 2\], largest difference"):
        to_onnx(program, example, BUCKETS)


def test_a_conversion_that_folds_a_weight_away_is_refused(monkeypatch):
    program, example = _program("dlrm", {}, 3)
    convert = torch.onnx.export

    def folded(*args, **kwargs):  # type: ignore[no-untyped-def]
        proto = convert(*args, **kwargs).model_proto
        next(i for i in proto.graph.initializer if i.name == "head.out.bias").name = "val_folded"
        return SimpleNamespace(model_proto=proto)

    monkeypatch.setattr(torch.onnx, "export", folded)
    with pytest.raises(CheckpointError, match=r"holds no initializer of the name and shape of weights "
                                              r"\['head.out.bias'\], so new weights could not reach them"):
        to_onnx(program, example, BUCKETS)


def test_new_weights_of_other_names_shapes_or_dtypes_are_refused():
    program, example = _program("dlrm", {}, 3)
    onnx = _onnx(program, example)
    weights = onnx.state_dict()
    for name, change in (("head.out.bias", lambda w: w.pop("head.out.bias")),
                         ("head.out.bias", lambda w: w.update({"head.out.bias": torch.zeros(3)})),
                         ("head.out.bias", lambda w: w.update({"head.out.bias": w["head.out.bias"].double()})),
                         ("extra", lambda w: w.update({"extra": torch.zeros(1)}))):
        other = dict(weights)
        change(other)
        with pytest.raises(CheckpointError, match=rf"new dense weights must be the ONNX model's .* \(names, shapes "
                                                  rf"and dtypes\); these differ: .*'{name}'"):
            onnx.with_weights(other)


def test_its_state_dict_is_a_copy_and_its_inputs_must_be_float32():
    program, example = _program("dlrm", {}, 3)
    onnx = _onnx(program, example)
    pooled, dense = torch.randn(4, 4, 8), torch.randn(4, 3)
    before = onnx.forward(pooled, dense)
    for tensor in onnx.state_dict().values():
        tensor.zero_()
    assert torch.equal(onnx.forward(pooled, dense), before)
    with pytest.raises(BatchError, match=r"takes float32 pooled and dense inputs, got torch.float64 and torch.float32"):
        onnx.forward(pooled.double(), dense)


def test_a_network_with_a_weight_that_is_one_number_converts_and_takes_new_weights():
    class Tempered(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.out, self.temperature = torch.nn.Linear(35, 2), torch.nn.Parameter(torch.tensor(2.0))

        def forward(self, pooled: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
            return self.out(torch.cat([pooled.flatten(1), dense], dim=1)) / self.temperature

    example = (torch.zeros(2, 4, 8), torch.zeros(2, 3))
    program = export_program(Tempered().eval(), example, BUCKETS[-1])
    onnx = _onnx(program, example)
    assert onnx.state_dict()["temperature"].shape == ()
    weights = {**onnx.state_dict(), "temperature": torch.tensor(4.0)}
    pooled, dense = torch.randn(3, 4, 8), torch.randn(3, 3)
    torch.testing.assert_close(onnx.with_weights(weights).forward(pooled, dense), onnx.forward(pooled, dense) / 2)


@pytest.mark.parametrize(("owner", "name", "error", "match"), [
    (torch.onnx, "export", "no ONNX function for aten::frobnicate",
     r"torch's ONNX exporter could not convert the dense network \(RuntimeError: no ONNX function"),
    (OnnxProgram, "forward", "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Got invalid dimensions",
     r"ONNX Runtime could not run the ONNX model of the dense network at batch 1 \(RuntimeError: .*INVALID_ARGUMENT"),
])
def test_a_network_the_exporter_or_onnx_runtime_fails_on_is_refused_with_what_to_do(owner, name, error, match,
                                                                                   monkeypatch):
    program, example = _program("dlrm", {}, 3)

    def failing(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError(error)

    monkeypatch.setattr(owner, name, failing)
    with pytest.raises(CheckpointError, match=match + r".*\); export it with backend torch"):
        to_onnx(program, example, BUCKETS)


def test_concurrent_calls_of_one_session_each_get_their_own_scores():
    program, example = _program("dcn", {}, 3)
    onnx = _onnx(program, example)
    inputs = [(torch.randn(r, 4, 8), torch.randn(r, 3)) for r in (1, 4, 17, 64) * 4]
    expected = [onnx.forward(*i) for i in inputs]
    found: dict[int, torch.Tensor] = {}

    def score(k: int) -> None:
        for _ in range(20):
            found[k] = onnx.forward(*inputs[k])

    threads = [threading.Thread(target=score, args=(k,)) for k in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(found[k], expected[k]) for k in range(len(inputs)))


def test_a_damaged_model_is_refused_by_onnx_runtime():
    with pytest.raises(CheckpointError, match="ONNX Runtime refused the dense network's ONNX model"):
        OnnxProgram(b"not an onnx model", {}, threads=1)


def test_without_the_onnx_extra_the_error_says_what_to_install(monkeypatch):
    import importlib.util

    program, example = _program("dlrm", {}, 3)
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else find(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'tidal\[onnx\]'"):
        to_onnx(program, example, BUCKETS)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now fails
    with pytest.raises(ConfigError, match=r"pip install 'tidal\[onnx\]'"):
        OnnxProgram(b"", {}, threads=1)
