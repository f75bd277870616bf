"""The ONNX Runtime backend: the dense network as an ONNX model, run on the CPU.

At small batches ONNX Runtime runs these networks several times faster than torch's
eager or exported modules (less dispatch per operator; `tidal bench dense`), which
is where a ranking server spends its dense time: a request of one user and a few
candidates pads to a bucket of 1, 4 or 16 rows.

`to_onnx` converts a `torch.export` program once, when a bundle is written (torch's
ONNX exporter, `onnxscript`), and checks the ONNX model against the program at every
bucket size before it is kept. `OnnxProgram` runs it (only `onnxruntime` is needed
where the bundle is served) and takes new dense weights by name, as a delta brings
them: the exporter keeps each parameter and buffer as an initializer of its own name,
which `to_onnx` checks, and a session created with those initializers replaced runs
the new weights.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch

from tidal.errors import CheckpointError, ConfigError

__all__ = ["ONNX_MISSING", "OnnxProgram", "to_onnx"]

ONNX_MISSING = "the onnxruntime backend needs the onnx extra: pip install 'tidal[onnx]'"
TOLERANCE = 1e-4  # largest difference from the program allowed, relative to its largest logit (at least 1)


def to_onnx(program: torch.export.ExportedProgram, example: tuple[torch.Tensor, torch.Tensor],
            buckets: Sequence[int], *, seed: int = 0) -> bytes:
    """The serialized ONNX model of `program` (inputs pooled `[B, F, D]` and dense
    `[B, Dd]` as in `example`, output logits `[B, T]`, B dynamic).

    Checked before it is returned, at every batch size of `buckets` on random inputs:
    against the program, and again with other weights put in by name (as a delta puts
    them) against the program running those. Refused (`CheckpointError`) when an
    output differs by more than `TOLERANCE`."""
    if importlib.util.find_spec("onnxscript") is None:  # torch's exporter needs it
        raise ConfigError(ONNX_MISSING)
    with _quiet_exporter():
        model = torch.onnx.export(program, example, dynamo=True, verbose=False).model_proto.SerializeToString()
    module = program.module()  # its weights are the program's own: never written here
    weights = {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}
    onnx_program = OnnxProgram(model, {n: t.numpy() for n, t in weights.items()}, threads=1)
    generator = torch.Generator().manual_seed(seed)
    _check_outputs(onnx_program, module, weights, example, buckets, generator)
    other = {n: t * 1.25 + 0.01 if t.is_floating_point() else t for n, t in weights.items()}
    _check_outputs(onnx_program.with_weights(other), module, other, example, buckets, generator)
    return model


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """torch's exporter logs a warning for every torchvision operator it cannot find,
    and warns about its own tree specs: neither concerns these networks."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        logger.setLevel(level)


def _check_outputs(onnx_program: OnnxProgram, module: torch.nn.Module, weights: dict[str, torch.Tensor],
                   example: tuple[torch.Tensor, torch.Tensor], buckets: Sequence[int],
                   generator: torch.Generator) -> None:
    """`onnx_program` against `module` running `weights`, on random inputs of every bucket size."""
    for rows in buckets:
        pooled = torch.randn(rows, *example[0].shape[1:], generator=generator)
        dense = torch.randn(rows, *example[1].shape[1:], generator=generator)
        with torch.no_grad():
            expected = torch.func.functional_call(module, weights, (pooled, dense)).numpy()
        found = onnx_program.forward(pooled, dense).numpy()
        error = float(np.max(np.abs(found - expected), initial=0.0)) if found.shape == expected.shape else np.inf
        allowed = TOLERANCE * max(1.0, float(np.max(np.abs(expected), initial=0.0)))
        if not error <= allowed:
            raise CheckpointError(f"the ONNX model of the dense network differs from its torch program at batch "
                                  f"{rows}: shape {list(found.shape)} against {list(expected.shape)}, largest "
                                  f"difference {error:.3g} (allowed {allowed:.3g}); serve it with backend torch")


class OnnxProgram:
    """An ONNX model of the dense network in an ONNX Runtime session on the CPU:
    ``program.forward(pooled [B, F, D], dense [B, Dd]) -> logits [B, T]`` (float32
    torch tensors). Thread-safe: ONNX Runtime runs concurrent calls of one session and
    releases the GIL while it runs.

    `weights` names the initializers that new dense weights may replace (the torch
    program's state dict); `threads` is ONNX Runtime's intra-op thread count (None:
    one per core)."""

    def __init__(self, model: bytes, weights: dict[str, np.ndarray], *, threads: int | None) -> None:
        try:
            import onnxruntime
        except ImportError:
            raise ConfigError(ONNX_MISSING) from None
        self._model, self._weights, self._threads = model, weights, threads
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or 0
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle threads sleep, as torch's
        self._values = {name: onnxruntime.OrtValue.ortvalue_from_numpy(array) for name, array in weights.items()}
        for name, value in self._values.items():
            options.add_initializer(name, value)  # replaces the model's initializer of that name
        try:
            self._session = onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own unexported error types
            raise CheckpointError(f"ONNX Runtime refused the dense network's ONNX model: {exc}") from None
        self._inputs = [i.name for i in self._session.get_inputs()]

    def forward(self, pooled: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """Logits `[B, T]` of pooled `[B, F, D]` and dense `[B, Dd]` (float32, on the CPU)."""
        feeds = {self._inputs[0]: pooled.contiguous().numpy(), self._inputs[1]: dense.contiguous().numpy()}
        return torch.from_numpy(self._session.run(None, feeds)[0])

    __call__ = forward

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights it runs, as torch tensors sharing their memory (read them only)."""
        return {name: torch.from_numpy(array) for name, array in self._weights.items()}

    def with_weights(self, weights: dict[str, torch.Tensor]) -> OnnxProgram:
        """A new session of the same model running `weights` (the same names, shapes and
        dtypes as `state_dict`); this one goes on running its own."""
        return OnnxProgram(self._model, {n: t.detach().cpu().numpy().copy() for n, t in weights.items()},
                           threads=self._threads)
