"""The AOTInductor backend: the dense network compiled ahead of time to native code for
the CPU, run without Python between its operators.

`to_aoti` compiles a `torch.export` program once, when a bundle is written (torch's
AOTInductor, which needs a C++ compiler there), into a package whose batch dimension
may be any size up to the largest bucket, and checks it before it is kept. `AotiProgram`
runs the package (only torch is needed where the bundle is served) and takes new dense
weights by name, as a delta brings them: every parameter and buffer stays a constant of
its own name in the package (`always_keep_tensor_constants`; without it AOTInductor
bakes small ones, biases of a few values, into the code, where no delta could reach
them), and a new runner of the same package is loaded with them.

The package is compiled for the instruction set of the exporting CPU (`-march=native`)
and links the torch that compiled it: `compiled_for()` says both, the bundle records
it, and `unfit_here` refuses another torch or a CPU lacking any of those extensions
before the package is loaded (it would stop at an illegal instruction, or compute wrong
values with one that older CPUs run as another).
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from tidal.compile._checks import check_compiled, differing
from tidal.errors import BatchError, CheckpointError, ConfigError

__all__ = ["AOTI_MISSING", "AotiProgram", "aoti_available", "compiled_for", "cpu_features", "missing_cpu_features",
           "to_aoti", "unfit_here"]

AOTI_MISSING = ("the aotinductor backend compiles the dense network with a C++ compiler where the bundle is written, "
                "and none was found (g++, c++ or clang++ on PATH); install one, or export with backend torch")
_INDUCTOR = {"always_keep_tensor_constants": True}  # every weight a constant of its name: deltas reach them all
_ISA = re.compile(r"(sse|ssse|avx|fma|f16c|bmi|abm|amx|adx|aes|pclmul|popcnt|lzcnt|movbe|vpclmul|gfni|vaes|sha|"
                  r"asimd|sve|neon|bf16|i8mm)")  # instruction-set extensions -march=native may use


def aoti_available() -> bool:
    """Whether a C++ compiler is on PATH for AOTInductor (and this torch has it)."""
    has_compiler = any(shutil.which(name) for name in ("g++", "c++", "clang++"))
    return has_compiler and hasattr(torch._inductor, "aoti_compile_and_package")


def compiled_for() -> dict:
    """What a package compiled here is tied to, as a bundle's manifest records it: the
    torch that compiled it (its runtime links that torch) and this CPU's extensions."""
    return {"torch_version": torch.__version__, "cpu_features": cpu_features()}


def unfit_here(recorded: dict) -> str | None:
    """Why a package compiled for `recorded` (`compiled_for()` where it was compiled)
    cannot run here, or None. The torch must be the same build (`2.13.0+cpu` is not
    `2.13.0+cu128`): the package links the one that compiled it."""
    if not recorded:
        return "its bundle does not record the torch and the CPU it was compiled for (an older Tidal exported it)"
    if recorded.get("torch_version") != torch.__version__:
        return f"it was compiled by torch {recorded.get('torch_version')}, and this is torch {torch.__version__}"
    missing = missing_cpu_features(recorded.get("cpu_features", []))
    return f"it was compiled for a CPU with {missing}, which this one lacks" if missing else None


def cpu_features() -> list[str]:
    """The instruction-set extensions of this CPU a package compiled here may use
    (sorted; from /proc/cpuinfo, empty where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith(("flags", "Features"))), [])
    return sorted({flag for flag in flags if _ISA.match(flag)})


def missing_cpu_features(needed: Sequence[str]) -> list[str]:
    """Those of `needed` (a package's `cpu_features` when compiled) this CPU lacks
    (none where /proc/cpuinfo cannot be read: nothing to check against)."""
    here = set(cpu_features())
    return sorted(set(needed) - here) if here else []


def to_aoti(program: torch.export.ExportedProgram, example: tuple[torch.Tensor, torch.Tensor],
            buckets: Sequence[int], path: Path, *, seed: int = 0) -> None:
    """Compile `program` (inputs pooled `[B, F, D]` and dense `[B, Dd]` as in
    `example`, output logits `[B, T]`, B dynamic) into an AOTInductor package at `path`.

    Checked before it is kept: every weight of the program must be a constant of the
    package of its name, and the package must score as the program at every batch size
    of `buckets` and at sizes between them on random inputs, then again with other
    weights loaded by name (as a delta loads them) against the program running those.
    Refused (`CheckpointError`) otherwise; `path` is then not written."""
    if not aoti_available():
        raise ConfigError(AOTI_MISSING)
    with tempfile.TemporaryDirectory() as scratch:
        staged = Path(scratch) / path.name
        with _quiet_compiler():
            try:
                torch._inductor.aoti_compile_and_package(program, package_path=str(staged), inductor_configs=_INDUCTOR)
            except Exception as exc:  # noqa: BLE001 - the compiler raises many kinds; all mean "not compiled"
                raise CheckpointError(f"AOTInductor could not compile the dense network ({type(exc).__name__}: "
                                      f"{str(exc)[:500]}); export it with backend torch") from None
        _check(staged, program, example, buckets, seed)
        shutil.copyfile(staged, path)


def _check(package: Path, program: torch.export.ExportedProgram, example: tuple[torch.Tensor, torch.Tensor],
           buckets: Sequence[int], seed: int) -> None:
    module = program.module()  # its weights are the program's own: never written here
    weights = {name: tensor.detach().clone() for name, tensor in program.state_dict.items()}
    compiled = AotiProgram(package, weights)  # refused unless every weight is a constant of its name
    sizes = sorted({*buckets, *(max(1, (a + b) // 2) for a, b in zip([0, *buckets], buckets))})
    check_compiled(compiled, module, weights, example, sizes, seed, runner="AOTInductor",
                   what="the AOTInductor package of the dense network")


@contextmanager
def _quiet_compiler() -> Iterator[None]:
    """AOTInductor logs and warns about its own internals while it compiles."""
    logger = logging.getLogger("torch._inductor")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


class AotiProgram:
    """An AOTInductor package of the dense network, loaded: ``program.forward(pooled
    [B, F, D], dense [B, Dd]) -> logits [B, T]`` (float32 torch tensors on the CPU).
    Thread-safe: concurrent calls take turns inside the package's runner.

    `weights` (a state dict of the program the package was compiled from) replace the
    package's constants of their names."""

    def __init__(self, package: Path, weights: dict[str, torch.Tensor]) -> None:
        self._package = package
        try:
            self._model = torch._inductor.aoti_load_package(str(package))
            self.constants = frozenset(self._model.get_constant_fqns())
        except Exception as exc:  # noqa: BLE001 - the loader raises its own error types
            raise CheckpointError(f"{package}: AOTInductor could not load the package ({type(exc).__name__}: {exc}); "
                                  f"export the bundle again with this torch, or serve it with backend torch") from None
        self._weights = {n: t.detach().cpu().contiguous() for n, t in weights.items()}
        self._load(self._weights)

    @classmethod
    def of(cls, package: Path, program: torch.export.ExportedProgram) -> AotiProgram:
        """The package of `program` (`to_aoti`'s), running the program's weights."""
        return cls(package, {n: t.detach().clone() for n, t in program.state_dict.items()})

    def _load(self, weights: dict[str, torch.Tensor]) -> None:
        weights = {name: tensor for name, tensor in weights.items() if tensor.numel()}  # the package keeps no
        unknown = sorted(set(weights) - self.constants)  # constant of a weight without values (no dense features')
        if unknown:
            raise CheckpointError(f"the AOTInductor package {self._package.name} holds no constant of the name of "
                                  f"weights {unknown[:4]}, so new weights could not reach them; export it with "
                                  f"backend torch")
        try:
            self._model.load_constants(weights, check_full_update=False)
        except RuntimeError as exc:
            raise CheckpointError(f"the AOTInductor package {self._package.name} refused new dense weights: "
                                  f"{exc}") from None

    def forward(self, pooled: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """Logits `[B, T]` of pooled `[B, F, D]` and dense `[B, Dd]` (float32, on the CPU)."""
        if pooled.dtype != torch.float32 or dense.dtype != torch.float32:
            raise BatchError(f"the AOTInductor package takes float32 pooled and dense inputs, got {pooled.dtype} and "
                             f"{dense.dtype}")
        return self._model.loader.boxed_run([pooled.contiguous(), dense.contiguous()])[0]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A copy of the weights it was given."""
        return {name: tensor.clone() for name, tensor in self._weights.items()}

    def with_weights(self, weights: dict[str, torch.Tensor]) -> AotiProgram:
        """A new runner of the same package running `weights`, which must be the same
        tensors as `state_dict`'s (names, shapes and dtypes); this one goes on running
        its own."""
        differ = differing(weights, self._weights)
        if differ:
            raise CheckpointError(f"new dense weights must be the AOTInductor package's {sorted(self._weights)} (names, "
                                  f"shapes and dtypes); these differ: {differ}")
        return AotiProgram(self._package, weights)
