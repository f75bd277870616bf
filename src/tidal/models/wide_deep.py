"""Wide & Deep (Cheng et al. 2016): a linear model beside a deep MLP."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tidal.models.common import mlp

__all__ = ["WideDeep"]


class WideDeep(nn.Module):
    """pooled `[B, F, D]`, dense `[B, Dd]` -> representation `[B, deep_sizes[-1] + 1]`:
    the deep MLP's output and the wide (linear) score."""

    def __init__(self, num_features: int, dim: int, dense_features: int, *,
                 deep_sizes: Sequence[int] = (128, 64)) -> None:
        super().__init__()
        inputs = num_features * dim + dense_features
        self.wide = nn.Linear(inputs, 1)
        self.deep = mlp(inputs, deep_sizes)
        self.out_features = deep_sizes[-1] + 1

    def forward(self, pooled: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        flat = torch.cat([pooled.flatten(1), dense], dim=1)
        return torch.cat([self.deep(flat), self.wide(flat)], dim=1)
