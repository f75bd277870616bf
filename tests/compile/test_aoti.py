"""The AOTInductor backend: the compiled package scores as the torch program at any batch
size, takes new weights by name as a delta brings them, and is refused when it would
not (weights baked into its code, outputs that differ, no compiler, a CPU it was not
compiled for)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tidal.compile import AOTI_MISSING, AotiProgram, aoti_available, compiled_for, export_program, to_aoti, unfit_here
from tidal.compile import aoti
from tidal.compile.aoti import missing_cpu_features
from tidal.config import ModelConfig
from tidal.errors import CheckpointError, ConfigError
from tidal.models import RankingModel

pytestmark = pytest.mark.skipif(not aoti_available(), reason=AOTI_MISSING)
FEATURES, DIM, DENSE = 5, 4, 3
BUCKETS = [1, 4, 16]
MMOE = {"kind": "dlrm", "bottom_sizes": [8], "hidden_sizes": [16], "head": "mmoe", "experts": 2,
        "expert_sizes": [8], "tower_sizes": [4]}  # small biases: gates of 2, towers' last of 1
EXAMPLE = (torch.zeros(2, FEATURES, DIM), torch.zeros(2, DENSE))


def _program() -> torch.export.ExportedProgram:
    torch.manual_seed(0)
    model = RankingModel(ModelConfig(**MMOE), num_features=FEATURES, dim=DIM, dense_features=DENSE,
                         num_targets=2).eval()
    return export_program(model, EXAMPLE, BUCKETS[-1])


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    program = _program()
    path = tmp_path_factory.mktemp("aoti") / "dense-aotinductor.pt2"
    to_aoti(program, EXAMPLE, BUCKETS, path)
    return program, path


def _inputs(rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, FEATURES, DIM, generator=generator), torch.randn(rows, DENSE, generator=generator)


@pytest.mark.slow
def test_the_package_scores_as_the_program_at_every_size_up_to_the_largest_bucket(compiled):
    program, path = compiled
    package = AotiProgram.of(path, program)
    assert package.constants == set(program.state_dict)  # every weight, biases of one value included
    for rows in (1, 2, 4, 7, 16):
        pooled, dense = _inputs(rows, seed=rows)
        torch.testing.assert_close(package.forward(pooled, dense), program.module()(pooled, dense), rtol=1e-5,
                                   atol=1e-5)


@pytest.mark.slow
def test_new_weights_reach_a_new_runner_and_the_old_one_keeps_its_own(compiled):
    program, path = compiled
    old = AotiProgram.of(path, program)
    other = {n: t * 0.5 - 0.1 for n, t in program.state_dict.items()}
    new = old.with_weights(other)
    pooled, dense = _inputs(4)
    expected_new = torch.func.functional_call(program.module(), other, (pooled, dense))
    torch.testing.assert_close(new.forward(pooled, dense), expected_new, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(old.forward(pooled, dense), program.module()(pooled, dense), rtol=1e-5, atol=1e-5)
    assert torch.equal(new.state_dict()["head.gates.0.bias"], other["head.gates.0.bias"])


@pytest.mark.slow
def test_weights_of_another_network_are_refused_by_name(compiled):
    program, path = compiled
    package = AotiProgram.of(path, program)
    wrong = {**program.state_dict, "head.gates.0.bias": torch.zeros(5)}
    with pytest.raises(CheckpointError, match=r"new dense weights must be the AOTInductor package's .* these differ: "
                                              r".*head.gates.0.bias"):
        package.with_weights(wrong)
    with pytest.raises(CheckpointError, match=r"holds no constant of the name of weights \['unknown.weight'\]"):
        AotiProgram(path, {"unknown.weight": torch.zeros(1)})


@pytest.mark.slow
def test_a_network_without_dense_features_compiles_and_takes_new_weights(tmp_path):
    """Its bottom layer's weight holds no values, and the package keeps no constant of
    it: an audit's export was refused for that."""
    torch.manual_seed(0)
    model = RankingModel(ModelConfig(kind="dlrm", bottom_sizes=[8], hidden_sizes=[16]), num_features=FEATURES,
                         dim=DIM, dense_features=0, num_targets=1).eval()
    example = (torch.zeros(2, FEATURES, DIM), torch.zeros(2, 0))
    program = export_program(model, example, BUCKETS[-1])
    assert program.state_dict["body.bottom.0.weight"].numel() == 0
    to_aoti(program, example, BUCKETS, tmp_path / "dense-aotinductor.pt2")
    other = {n: t * 0.5 - 0.1 for n, t in program.state_dict.items()}
    package = AotiProgram.of(tmp_path / "dense-aotinductor.pt2", program).with_weights(other)
    pooled, dense = torch.randn(4, FEATURES, DIM), torch.zeros(4, 0)
    torch.testing.assert_close(package.forward(pooled, dense),
                               torch.func.functional_call(program.module(), other, (pooled, dense)), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_package_that_differs_from_the_program_is_refused(compiled, monkeypatch):
    program, path = compiled
    forward = AotiProgram.forward
    monkeypatch.setattr(AotiProgram, "forward", lambda self, p, d: forward(self, p, d) + 1.0)
    with pytest.raises(CheckpointError, match=r"the AOTInductor package of the dense network differs from its torch "
                                              r"program at batch 1: .*largest difference 1"):
        aoti._check(path, program, EXAMPLE, BUCKETS, seed=0)


@pytest.mark.slow
def test_a_package_with_weights_baked_into_its_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(aoti, "_INDUCTOR", {})  # AOTInductor's default: small weights become literals
    out = tmp_path / "dense-aotinductor.pt2"
    with pytest.raises(CheckpointError, match=r"holds no constant of the name of weights \[.*bias.*\], so new "
                                              r"weights could not reach them"):
        to_aoti(_program(), EXAMPLE, BUCKETS, out)
    assert not out.exists()


def test_a_failed_compile_or_a_missing_compiler_is_reported(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("C++ compile error")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fail)
    out = tmp_path / "dense-aotinductor.pt2"
    with pytest.raises(CheckpointError, match=r"AOTInductor could not compile the dense network \(RuntimeError: C\+\+ "
                                              r"compile error\); export it with backend torch"):
        to_aoti(_program(), EXAMPLE, BUCKETS, out)
    monkeypatch.setattr(aoti.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="compiles the dense network with a C\\+\\+ compiler"):
        to_aoti(_program(), EXAMPLE, BUCKETS, out)
    assert not out.exists()


def test_a_package_runs_only_with_the_torch_and_the_cpu_extensions_it_was_compiled_for(monkeypatch):
    here = compiled_for()
    assert unfit_here(here) is None and here["torch_version"] == torch.__version__
    if Path("/proc/cpuinfo").exists():  # x86's LZCNT shows as abm, and -march=native uses it
        flags = Path("/proc/cpuinfo").read_text()
        assert here["cpu_features"] and all(aoti._ISA.match(f) for f in here["cpu_features"])
        assert ("abm" in flags.split()) == ("abm" in here["cpu_features"])
    assert unfit_here({**here, "torch_version": "2.0.0"}) == (f"it was compiled by torch 2.0.0, and this is torch "
                                                            f"{torch.__version__}")
    assert unfit_here({}) == ("its bundle does not record the torch and the CPU it was compiled for (an older Tidal "
                              "exported it)")
    monkeypatch.setattr(aoti, "cpu_features", lambda: ["sse2"])  # an older CPU than the compiler's
    assert missing_cpu_features(["sse2", "avx2", "fma"]) == ["avx2", "fma"]
    assert unfit_here({**here, "cpu_features": ["sse2", "avx2"]}) == ("it was compiled for a CPU with ['avx2'], "
                                                                      "which this one lacks")
    monkeypatch.setattr(aoti, "cpu_features", lambda: [])  # /proc/cpuinfo unreadable: nothing to check against
    assert missing_cpu_features(["avx2"]) == []
