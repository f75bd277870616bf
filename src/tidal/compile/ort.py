"""The ONNX Runtime backend: the dense network as an ONNX model, run on the CPU.

At small batches ONNX Runtime runs these networks several times faster than torch's
exported modules (less dispatch per operator; `tidal bench dense`), and a request of
one user and a few candidates pads to a bucket of 1, 4 or 16 rows.

`to_onnx` converts a `torch.export` program once, when a bundle is written (torch's
ONNX exporter, `onnxscript`), and checks the ONNX model before it is kept. `OnnxProgram`
runs it (only `onnxruntime` is needed where the bundle is served) and takes new dense
weights by name, as a delta brings them: the exporter keeps each parameter and buffer
as an initializer of its own name, and a session created with those initializers
replaced runs the new weights.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from tidal.compile._checks import check_compiled, differing
from tidal.errors import BatchError, CheckpointError, ConfigError

__all__ = ["ONNX_MISSING", "OnnxProgram", "export_program", "onnx_available", "to_onnx"]

ONNX_MISSING = "the onnxruntime backend needs the onnx extra: pip install 'tidal[onnx]'"


def onnx_available() -> bool:
    """Whether the onnx extra is installed: the exporter's `onnxscript` and `onnxruntime`."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxscript", "onnxruntime"))


def export_program(model: torch.nn.Module, example: tuple[torch.Tensor, torch.Tensor],
                   largest: int) -> torch.export.ExportedProgram:
    """`model(pooled, dense)` as a `torch.export` program whose batch size may be any of
    1..`largest` (`example` gives the other dimensions)."""
    batch = torch.export.Dim("batch", min=1, max=largest)
    return torch.export.export(model, example, dynamic_shapes=({0: batch}, {0: batch}))


def to_onnx(program: torch.export.ExportedProgram, example: tuple[torch.Tensor, torch.Tensor],
            buckets: Sequence[int], *, seed: int = 0) -> bytes:
    """The serialized ONNX model of `program` (inputs pooled `[B, F, D]` and dense
    `[B, Dd]` as in `example`, output logits `[B, T]`, B dynamic).

    Checked before it is returned: every weight of the program must be an initializer
    of its name and shape, and the model must score as the program at every batch size
    of `buckets` on random inputs, then again with other weights put in by name (as a
    delta puts them) against the program running those. Sizes between buckets run as
    well (the batch dimension is dynamic). Refused (`CheckpointError`) otherwise."""
    if not onnx_available():
        raise ConfigError(ONNX_MISSING)
    with _quiet_exporter():
        try:
            proto = torch.onnx.export(program, example, dynamo=True, verbose=False).model_proto
        except Exception as exc:  # noqa: BLE001 - the exporter raises many kinds; all mean "not convertible"
            raise CheckpointError(f"torch's ONNX exporter could not convert the dense network ({type(exc).__name__}: "
                                  f"{exc}); export it with backend torch") from None
    module = program.module()  # its weights are the program's own: never written here
    weights = {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}
    _check_initializers(weights, {i.name: tuple(i.dims) for i in proto.graph.initializer})
    model = proto.SerializeToString()
    check_compiled(OnnxProgram(model, weights, threads=1), module, weights, example, buckets, seed,
                   runner="ONNX Runtime", what="the ONNX model of the dense network")
    return model


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """torch's exporter logs a warning for every torchvision operator it cannot find
    (none of which these networks use), and warns about its own tree specs."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*treespec", category=FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def _check_initializers(weights: dict[str, torch.Tensor], held: dict[str, tuple[int, ...]]) -> None:
    """Refuse a model that lacks an initializer for a weight of the program (but one of
    no element, as the weight of a layer of no input: nothing to reach)."""
    lost = sorted(n for n, t in weights.items() if t.numel() and held.get(n) != tuple(t.shape))
    if lost:
        raise CheckpointError(f"the ONNX model of the dense network holds no initializer of the name and shape of "
                              f"weights {lost[:4]}, so new weights could not reach them; export it with backend torch")


class OnnxProgram:
    """An ONNX model of the dense network in an ONNX Runtime session on the CPU:
    ``program.forward(pooled [B, F, D], dense [B, Dd]) -> logits [B, T]`` (float32
    torch tensors). Thread-safe: ONNX Runtime runs concurrent calls of one session and
    releases the GIL while it runs.

    `weights`, the torch program's state dict (`to_onnx` checked that the model holds
    an initializer of each name and shape), replace the model's initializers of their
    names; `threads` is ONNX Runtime's intra-op thread count (None: one per core). The
    session keeps the weights' memory: the caller must not write them."""

    def __init__(self, model: bytes, weights: dict[str, torch.Tensor], *, threads: int | None) -> None:
        try:
            import onnxruntime
        except ImportError:
            raise ConfigError(ONNX_MISSING) from None
        self._model, self._threads = model, threads
        self._weights = {name: t.detach().cpu().contiguous().numpy() for name, t in weights.items()}
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or 0
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads sleep, as torch's
        held = {name: a for name, a in self._weights.items() if a.size}  # a weight of no element holds nothing
        self._values = [onnxruntime.OrtValue.ortvalue_from_numpy(a) for a in held.values()]  # kept alive
        for name, value in zip(held, self._values):
            options.add_initializer(name, value)  # replaces the model's initializer of that name
        try:
            self._session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own unexported error types
            raise CheckpointError(f"ONNX Runtime refused the dense network's ONNX model or its weights: {exc}") from None
        self._inputs = [i.name for i in self._session.get_inputs()]

    @classmethod
    def of(cls, model: bytes, program: torch.export.ExportedProgram, *, threads: int | None) -> OnnxProgram:
        """The ONNX model of `program` (`to_onnx`'s), running the program's weights."""
        return cls(model, {n: t.detach().clone() for n, t in program.state_dict.items()}, threads=threads)

    def forward(self, pooled: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """Logits `[B, T]` of pooled `[B, F, D]` and dense `[B, Dd]` (float32, on the CPU)."""
        if pooled.dtype != torch.float32 or dense.dtype != torch.float32:
            raise BatchError(f"the ONNX model takes float32 pooled and dense inputs, got {pooled.dtype} and "
                             f"{dense.dtype}")
        feeds = {self._inputs[0]: pooled.contiguous().numpy(), self._inputs[1]: dense.contiguous().numpy()}
        return torch.from_numpy(self._session.run(None, feeds)[0])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A copy of the weights it runs, as torch tensors."""
        return {name: torch.from_numpy(array.copy()) for name, array in self._weights.items()}

    def with_weights(self, weights: dict[str, torch.Tensor]) -> OnnxProgram:
        """A new session of the same model running `weights`, which must be the same
        tensors as `state_dict`'s (names, shapes and dtypes); this one goes on running
        its own. The new session keeps the tensors' memory."""
        differ = differing(weights, self._weights)
        if differ:
            raise CheckpointError(f"new dense weights must be the ONNX model's {sorted(self._weights)} (names, shapes and "
                                  f"dtypes); these differ: {differ}")
        return OnnxProgram(self._model, weights, threads=self._threads)
