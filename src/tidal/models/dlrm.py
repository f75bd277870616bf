"""DLRM (Naumov et al. 2019): bottom MLP, pairwise dot interaction, top MLP."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tidal.models.common import mlp

__all__ = ["DLRM"]


class DLRM(nn.Module):
    """pooled `[B, F, D]`, dense `[B, Dd]` -> representation `[B, top_sizes[-1]]`.

    The bottom MLP maps the dense features to one more D-vector; the dot products of
    every pair of the F + 1 vectors, with the bottom output, feed the top MLP.
    """

    def __init__(self, num_features: int, dim: int, dense_features: int, *,
                 bottom_sizes: Sequence[int] = (64,), top_sizes: Sequence[int] = (128, 64)) -> None:
        super().__init__()
        self.bottom = mlp(dense_features, [*bottom_sizes, dim])
        vectors = num_features + 1
        rows, cols = torch.triu_indices(vectors, vectors, offset=1)
        self.register_buffer("pairs_row", rows, persistent=False)
        self.register_buffer("pairs_col", cols, persistent=False)
        self.top = mlp(dim + rows.numel(), top_sizes)
        self.out_features = top_sizes[-1]

    def forward(self, pooled: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        bottom = self.bottom(dense)  # [B, D]
        vectors = torch.cat([bottom.unsqueeze(1), pooled], dim=1)  # [B, F + 1, D]
        dots = torch.bmm(vectors, vectors.transpose(1, 2))  # [B, F + 1, F + 1]
        pairs = dots[:, self.pairs_row, self.pairs_col]  # [B, (F + 1) F / 2]
        return self.top(torch.cat([bottom, pairs], dim=1))
