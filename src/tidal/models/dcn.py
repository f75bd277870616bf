"""DCN-v2 (Wang et al. 2021): full-rank cross layers stacked before a deep MLP."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tidal.models.common import mlp

__all__ = ["DCNv2"]


class DCNv2(nn.Module):
    """pooled `[B, F, D]`, dense `[B, Dd]` -> representation `[B, deep_sizes[-1]]`.

    Cross layer l: ``x_{l+1} = x0 * (W_l x_l + b_l) + x_l`` on x0 = [flat pooled, dense].
    """

    def __init__(self, num_features: int, dim: int, dense_features: int, *, cross_layers: int = 2,
                 deep_sizes: Sequence[int] = (128, 64)) -> None:
        super().__init__()
        inputs = num_features * dim + dense_features
        self.cross = nn.ModuleList(nn.Linear(inputs, inputs) for _ in range(cross_layers))
        self.deep = mlp(inputs, deep_sizes)
        self.out_features = deep_sizes[-1]

    def forward(self, pooled: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        x0 = torch.cat([pooled.flatten(1), dense], dim=1)
        x = x0
        for layer in self.cross:
            x = x0 * layer(x) + x
        return self.deep(x)
