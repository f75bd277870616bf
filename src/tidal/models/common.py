"""Building blocks shared by the dense models: MLPs and the output heads."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["LinearHead", "MMoEHead", "PRECISIONS", "compute_precision", "mlp", "resolve_precision", "step_losses",
           "weighted_bce"]


def mlp(in_features: int, sizes: Sequence[int], *, last_activation: bool = True) -> nn.Sequential:
    """Linear layers of `sizes` with ReLU between them (and after the last, by default).
    With no input features (a model without dense features) the first layer is its
    bias alone: a learned constant."""
    layers: list[nn.Module] = []
    for k, size in enumerate(sizes):
        with warnings.catch_warnings():  # torch warns that initializing a weight of no elements does nothing
            warnings.filterwarnings("ignore", "Initializing zero-element tensors is a no-op")
            layers.append(nn.Linear(in_features, size) if in_features else _LearnedConstant(size))
        if last_activation or k < len(sizes) - 1:
            layers.append(nn.ReLU())
        in_features = size
    return nn.Sequential(*layers)


class _LearnedConstant(nn.Linear):
    """A linear layer of no input features: its bias, the same for every row. Written
    out as such (not a product with an empty matrix), so that exporters keep the bias a
    weight a delta can reach rather than folding it into a constant."""

    def __init__(self, size: int) -> None:
        super().__init__(0, size)  # its weight has no element; kept, so checkpoints hold the layer as before
        # torch draws a bias from +-1/sqrt(fan in): all zeros here, where the ReLU after it
        # passes no gradient, and neither it nor the layer after would ever train
        nn.init.uniform_(self.bias, 0.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0], -1)


class LinearHead(nn.Module):
    """One logit per target from a shared representation: `[B, H]` -> `[B, T]`."""

    def __init__(self, in_features: int, num_targets: int) -> None:
        super().__init__()
        self.out = nn.Linear(in_features, num_targets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x)


class MMoEHead(nn.Module):
    """Multi-gate mixture of experts (Ma et al. 2018): `[B, H]` -> `[B, T]`.

    Every target mixes the same experts with its own softmax gate, then runs its own
    tower to one logit.
    """

    def __init__(self, in_features: int, num_targets: int, *, experts: int = 4,
                 expert_sizes: Sequence[int] = (128,), tower_sizes: Sequence[int] = (64,)) -> None:
        super().__init__()
        self.experts = nn.ModuleList(mlp(in_features, expert_sizes) for _ in range(experts))
        self.gates = nn.ModuleList(nn.Linear(in_features, experts) for _ in range(num_targets))
        width = expert_sizes[-1]
        self.towers = nn.ModuleList(nn.Sequential(mlp(width, tower_sizes), nn.Linear(tower_sizes[-1], 1))
                                    for _ in range(num_targets))

    def gate_weights(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, T, E]`: how much each target takes from each expert (rows sum to 1)."""
        return torch.stack([torch.softmax(gate(x), dim=-1) for gate in self.gates], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        experts = torch.stack([expert(x) for expert in self.experts], dim=1)  # [B, E, W]
        mixed = torch.einsum("bte,bew->btw", self.gate_weights(x), experts)  # [B, T, W]
        return torch.cat([tower(mixed[:, t]) for t, tower in enumerate(self.towers)], dim=1)  # [B, T]


def weighted_bce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                 total_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary cross-entropy per target, summed over these rows and divided by
    `total_rows`, then averaged over targets with `weights`: `[B, T]` -> (the scalar
    to train on, each target's loss `[T]`).

    With `total_rows` the batch size this is the mean loss of the batch; when a batch
    is cut into row slices, the slices' losses (and gradients) add up to it.
    """
    per_target = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none").sum(0) / total_rows
    return (per_target * weights).sum() / weights.sum(), per_target


def step_losses(loss: torch.Tensor, per_target: torch.Tensor) -> np.ndarray:
    """A step's losses as the run logs them: the weighted total, then each target's."""
    return torch.cat([loss.detach()[None], per_target.detach()]).double().cpu().numpy()  # one copy off a GPU


PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_precision(device: torch.device, precision: str) -> str:
    """`precision` ("float32", "bfloat16" or "auto") as run on `device`: `auto` is
    bfloat16 where the device computes it natively (a GPU with bfloat16, a CPU with
    AMX or AVX512-BF16) and float32 elsewhere, where bfloat16 is emulated and slower."""
    if precision == "auto":
        native = (torch.cuda.is_bf16_supported() if device.type == "cuda"
                  else torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
        return "bfloat16" if native else "float32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)} or 'auto', got {precision!r}")
    return precision


def compute_precision(device: torch.device, precision: str) -> torch.autocast:
    """The context the dense network runs in for `precision` (see `resolve_precision`):
    with bfloat16, torch's autocast runs the matrix products in bfloat16 (summed in
    float32) while weights, optimizer state and loss stay float32. CPUs with AMX or
    AVX512-BF16 and GPUs run them two to five times faster than in float32."""
    enabled = resolve_precision(device, precision) == "bfloat16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)
