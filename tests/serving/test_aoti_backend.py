"""The dense network compiled by AOTInductor: bundles that carry its package, and the
predictor and server running it."""

from __future__ import annotations

import json

import pytest
from serving_helpers import assert_damaged_file_refused, assert_scores_as_torch

from tidal.cli import main
from tidal.compile import AOTI_MISSING, AotiProgram, aoti, aoti_available, compiled_for
from tidal.config import ServingConfig
from tidal.errors import ConfigError
from tidal.serving import Predictor, export, load_bundle

pytestmark = [pytest.mark.skipif(not aoti_available(), reason=AOTI_MISSING), pytest.mark.slow]


@pytest.fixture(scope="module")
def aoti_bundle_dir(trainer, tmp_path_factory):
    return export(trainer.run_dir, tmp_path_factory.mktemp("aoti") / "bundle", backend="aotinductor")


@pytest.fixture(scope="module")
def aoti_predictor(aoti_bundle_dir):
    return Predictor(load_bundle(aoti_bundle_dir))


def test_an_aotinductor_bundle_holds_its_package_and_the_cpu_it_was_compiled_for(aoti_bundle_dir, tmp_path):
    manifest = json.loads((aoti_bundle_dir / "manifest.json").read_text())
    assert "dense-aotinductor.pt2" in manifest["files"] and manifest["config"]["serving"]["backend"] == "aotinductor"
    assert manifest["aotinductor"] == compiled_for()  # the torch and the CPU extensions it was compiled for
    assert_damaged_file_refused(aoti_bundle_dir, "dense-aotinductor.pt2", tmp_path)


@pytest.mark.parametrize("sizes", [[1], [3, 1, 5], [100], [64, 200]])
def test_aotinductor_scores_as_the_torch_program_whatever_the_batch(trainer, aoti_predictor, bundle, sizes):
    assert isinstance(aoti_predictor._program, AotiProgram) and aoti_predictor.backend == "aotinductor"
    assert_scores_as_torch(aoti_predictor, bundle, trainer, sizes)


def test_aotinductor_needs_its_package_a_cpu_like_the_exporters_and_no_gpu(aoti_bundle_dir, bundle, monkeypatch):
    serving = ServingConfig(**{**bundle.config.serving.model_dump(), "backend": "aotinductor"})
    with pytest.raises(ConfigError, match=r"backend: aotinductor needs the AOTInductor package, and bundle .* holds "
                                          r"none \(it was exported for backend torch\)"):
        Predictor(bundle, serving=serving)
    compiled = load_bundle(aoti_bundle_dir)
    with pytest.raises(ConfigError, match=r"is 'cuda', but backend aotinductor runs the dense network on the CPU"):
        Predictor(compiled, device="cuda")
    monkeypatch.setattr(aoti.torch, "__version__", "2.0.0")  # another torch than the exporter's
    with pytest.raises(ConfigError, match=r"backend: aotinductor cannot run the package of bundle .* here: it was "
                                          r"compiled by torch .*, and this is torch 2.0.0; export it again on a "
                                          r"machine like this one, or serve it with backend torch"):
        Predictor(compiled)
    monkeypatch.undo()
    if not compiled.manifest["aotinductor"]["cpu_features"]:
        pytest.skip("/proc/cpuinfo could not be read where the bundle was exported: no CPU extensions to check")
    monkeypatch.setattr(aoti, "cpu_features", lambda: ["sse2"])  # an older CPU than the exporter's
    with pytest.raises(ConfigError, match=r"here: it was compiled for a CPU with \[.*\], which this one lacks"):
        Predictor(compiled)


def test_serve_takes_aotinductor_on_the_command_line(aoti_bundle_dir, bundle_dir, capsys, monkeypatch):
    from tidal import serving

    served = []
    monkeypatch.setattr(serving, "serve", lambda service, sock, **kwargs: served.append(service.predictor.backend))
    assert main(["serve", str(aoti_bundle_dir), "--port", "0"]) == 0
    assert served == ["aotinductor"] and "(dense network on aotinductor;" in capsys.readouterr().out
    assert main(["serve", str(bundle_dir), "--backend", "aotinductor", "--port", "0"]) == 2
    assert "tidal serve: --backend: aotinductor needs the AOTInductor package" in capsys.readouterr().err
    assert served == ["aotinductor"]
