"""DeepFM (Guo et al. 2017): a factorization machine beside a deep MLP."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tidal.models.common import mlp

__all__ = ["DeepFM"]


class DeepFM(nn.Module):
    """pooled `[B, F, D]`, dense `[B, Dd]` -> representation `[B, deep_sizes[-1] + 2]`.

    The representation holds the deep MLP's output, the FM's second-order term
    (sum over feature pairs of <v_i, v_j>) and a first-order linear term.
    """

    def __init__(self, num_features: int, dim: int, dense_features: int, *,
                 deep_sizes: Sequence[int] = (128, 64)) -> None:
        super().__init__()
        inputs = num_features * dim + dense_features
        self.first_order = nn.Linear(inputs, 1)
        self.deep = mlp(inputs, deep_sizes)
        self.out_features = deep_sizes[-1] + 2

    def forward(self, pooled: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        flat = torch.cat([pooled.flatten(1), dense], dim=1)  # [B, F D + Dd]
        square_of_sum = pooled.sum(dim=1).pow(2)  # [B, D]
        sum_of_squares = pooled.pow(2).sum(dim=1)  # [B, D]
        second_order = 0.5 * (square_of_sum - sum_of_squares).sum(dim=1, keepdim=True)  # [B, 1]
        return torch.cat([self.deep(flat), second_order, self.first_order(flat)], dim=1)
