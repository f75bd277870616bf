"""What every compiled form of the dense network is checked by: its outputs against
the torch program's on random inputs."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from tidal.errors import CheckpointError

TOLERANCE = 1e-4  # largest difference from the program allowed, relative to its largest logit (at least 1)


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
