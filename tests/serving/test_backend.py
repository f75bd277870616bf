"""The dense network on ONNX Runtime: bundles that carry its ONNX model, and the
predictor and server running it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import tritonclient.http as triton
from serving_helpers import assert_damaged_file_refused, assert_scores_as_torch, file_rows, with_user_of

from tidal.cli import main
from tidal.compile import OnnxProgram
from tidal.config import ServingConfig
from tidal.errors import ConfigError, CorruptCheckpointError
from tidal.serving import Predictor, Service, export, load_bundle, start_server
from tidal.serving.protocol import infer_request, input_specs

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def onnx_bundle_dir(trainer, tmp_path_factory):
    return export(trainer.run_dir, tmp_path_factory.mktemp("onnx") / "bundle", backend="onnxruntime")


@pytest.fixture(scope="module")
def onnx_predictor(onnx_bundle_dir):
    return Predictor(load_bundle(onnx_bundle_dir))


def test_an_onnxruntime_bundle_holds_its_onnx_model_checked_as_every_file(onnx_bundle_dir, bundle_dir, tmp_path):
    manifest = json.loads((onnx_bundle_dir / "manifest.json").read_text())
    assert "dense.onnx" in manifest["files"] and manifest["config"]["serving"]["backend"] == "onnxruntime"
    assert "dense.onnx" not in json.loads((bundle_dir / "manifest.json").read_text())["files"]  # torch: none
    assert_damaged_file_refused(onnx_bundle_dir, "dense.onnx", tmp_path)


@pytest.mark.parametrize("sizes", [[1], [3, 1, 5], [100], [64, 200]])
def test_onnxruntime_scores_as_the_torch_program_whatever_the_batch(trainer, onnx_predictor, bundle, sizes):
    assert isinstance(onnx_predictor._program, OnnxProgram) and onnx_predictor.backend == "onnxruntime"
    assert_scores_as_torch(onnx_predictor, bundle, trainer, sizes)


def test_either_backend_serves_an_onnxruntime_bundle_and_onnxruntime_needs_one(onnx_bundle_dir, bundle):
    onnx_bundle = load_bundle(onnx_bundle_dir)
    torch_serving = ServingConfig(**{**onnx_bundle.config.serving.model_dump(), "backend": "torch"})
    assert Predictor(onnx_bundle, serving=torch_serving).backend == "torch"
    onnx_serving = ServingConfig(**{**bundle.config.serving.model_dump(), "backend": "onnxruntime"})
    with pytest.raises(ConfigError, match=r"backend: onnxruntime needs the ONNX model, and bundle .* holds none \(it "
                                          r"was exported for backend torch\); export it with tidal export --backend "
                                          r"onnxruntime, or serve it with backend torch"):
        Predictor(bundle, serving=onnx_serving)


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_onnxruntime_runs_on_the_cpu_and_refuses_a_gpu(onnx_bundle_dir, device):
    onnx_bundle = load_bundle(onnx_bundle_dir)
    assert Predictor(onnx_bundle, device="auto").device.type == "cpu"
    with pytest.raises(ConfigError, match=rf"device=...\) is '{device}', but backend onnxruntime runs the dense "
                                          r"network on the CPU"):
        Predictor(onnx_bundle, device=device)


def test_a_server_on_onnxruntime_answers_tritonclient_as_one_on_torch(trainer, onnx_bundle_dir, bundle):
    specs = input_specs(trainer.config)
    rows = with_user_of(file_rows(trainer, 30), specs)
    scores = {}
    for backend, loaded in (("onnxruntime", load_bundle(onnx_bundle_dir)), ("torch", bundle)):
        running = start_server(Service(loaded, name="ctr"))
        try:
            client = triton.InferenceServerClient(running.url.removeprefix("http://"))
            request = infer_request(rows, specs)
            inputs = []
            for tensor in request["inputs"]:
                inputs.append(triton.InferInput(tensor["name"], tensor["shape"], "BYTES"))
                inputs[-1].set_data_from_numpy(np.array([v.encode() for v in tensor["data"]], dtype=object))
            scores[backend] = client.infer("ctr", inputs).as_numpy("score")
            assert running.service.predictor.backend == backend
        finally:
            running.stop()
    np.testing.assert_allclose(scores["onnxruntime"], scores["torch"], rtol=1e-4)  # torch may run on a GPU


def test_export_and_serve_take_the_backend_on_the_command_line(trainer, bundle_dir, tmp_path, capsys, monkeypatch):
    from tidal import serving

    out = tmp_path / "bundle"
    assert main(["export", "--checkpoint", str(trainer.run_dir), "--out", str(out), "--backend", "onnxruntime"]) == 0
    assert (out / "dense.onnx").is_file()
    assert main(["export", "--checkpoint", str(trainer.run_dir), "--out", str(out)]) == 0  # kept over the bundle it replaces
    assert (out / "dense.onnx").is_file() and "backend onnxruntime, float32 tables" in capsys.readouterr().out
    assert main(["export", "--checkpoint", str(trainer.run_dir), "--out", str(out), "--backend", "torch"]) == 0
    assert not (out / "dense.onnx").exists() and "backend torch" in capsys.readouterr().out
    monkeypatch.setattr(serving, "serve", lambda *args, **kwargs: pytest.fail("served a bundle it had to refuse"))
    assert main(["serve", str(bundle_dir), "--backend", "onnxruntime", "--port", "0"]) == 2
    assert "tidal serve: --backend: onnxruntime needs the ONNX model" in capsys.readouterr().err



def test_dense_weights_of_another_network_are_refused_by_the_deltas_file(onnx_predictor, tmp_path):
    from tidal.serving.bundle import Delta

    weights = {**onnx_predictor._program.state_dict(), "head.out.bias": torch.zeros(5)}
    delta = Delta(path=tmp_path / "000001", manifest={}, position=onnx_predictor.position, tables={}, weights=weights)
    with pytest.raises(CorruptCheckpointError, match=rf"{tmp_path / '000001' / 'dense.safetensors'}: new dense "
                                                     r"weights must be the ONNX model's .*'head.out.bias'"):
        onnx_predictor._source_with(delta)
