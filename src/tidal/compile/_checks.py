"""What every compiled form of the dense network is checked by: its outputs against
the torch program's on random inputs, with the program's weights and with others
loaded by name (as a delta loads them)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch

from tidal.errors import CheckpointError

__all__ = ["TOLERANCE", "Compiled", "check_compiled", "check_outputs", "differing"]

TOLERANCE = 1e-4  # largest difference from the program allowed, relative to its largest logit (at least 1)


class Compiled(Protocol):
    """A compiled form of the dense network: it scores, and takes new weights by name."""

    def forward(self, pooled: torch.Tensor, dense: torch.Tensor) -> torch.Tensor: ...

    def with_weights(self, weights: dict[str, torch.Tensor]) -> Compiled: ...


def check_compiled(compiled: Compiled, module: torch.nn.Module, weights: dict[str, torch.Tensor],
                   example: tuple[torch.Tensor, torch.Tensor], sizes: Sequence[int], seed: int, *,
                   runner: str, what: str) -> None:
    """`compiled` (running `weights`) against `module` on random inputs of every size,
    then again with other weights loaded by name against `module` running those: a
    weight the compiled form folded into a constant would keep its old value."""
    generator = torch.Generator().manual_seed(seed)
    check_outputs(compiled.forward, module, weights, example, sizes, generator, runner=runner, what=what)
    other = {n: t * 1.25 + 0.01 if t.is_floating_point() else t for n, t in weights.items()}
    check_outputs(compiled.with_weights(other).forward, module, other, example, sizes, generator, runner=runner,
                  what=what)


def differing(found: Mapping[str, Any], expected: Mapping[str, Any]) -> list[tuple[str, tuple]]:
    """The first few names, with (shape, dtype), that `found` and `expected` (tensors or
    arrays by name) do not share: empty when they are the same tensors."""
    def signatures(tensors: Mapping[str, Any]) -> set[tuple[str, tuple]]:
        return {(n, (tuple(t.shape), str(t.dtype).removeprefix("torch."))) for n, t in tensors.items()}

    return sorted(signatures(found) ^ signatures(expected), key=str)[:4]


def check_outputs(run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], module: torch.nn.Module,
                  weights: dict[str, torch.Tensor], example: tuple[torch.Tensor, torch.Tensor],
                  sizes: Sequence[int], generator: torch.Generator, *, runner: str, what: str) -> None:
    """`run` (`runner` running `what`) against `module` running `weights`, on random
    inputs of every batch size of `sizes`; refused (`CheckpointError`) when it fails
    or differs by more than `TOLERANCE`."""
    for rows in sizes:
        pooled = torch.randn(rows, *example[0].shape[1:], generator=generator)
        dense = torch.randn(rows, *example[1].shape[1:], generator=generator)
        with torch.no_grad():
            expected = torch.func.functional_call(module, weights, (pooled, dense))
            try:
                found = run(pooled, dense)
            except Exception as exc:  # noqa: BLE001 - runtimes raise their own unexported error types
                raise CheckpointError(f"{runner} could not run {what} at batch {rows} ({type(exc).__name__}: {exc}); "
                                      f"export it with backend torch") from None
        error = float((found - expected).abs().max()) if found.shape == expected.shape else float("inf")
        allowed = TOLERANCE * max(1.0, float(expected.abs().max()))
        if not error <= allowed:
            raise CheckpointError(f"{what} differs from its torch program at batch {rows}: shape {list(found.shape)} "
                                  f"against {list(expected.shape)}, largest difference {error:.3g} (allowed "
                                  f"{allowed:.3g}); export it with backend torch")
