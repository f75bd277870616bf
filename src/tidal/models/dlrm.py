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
        pairs = torch.arange(rows.numel())
        pair_of = torch.full((vectors * vectors,), rows.numel(), dtype=torch.long)  # the diagonal: a zero column
        pair_of[rows * vectors + cols] = pair_of[cols * vectors + rows] = pairs
        self.register_buffer("pair_of", pair_of, persistent=False)  # Gram entry (i, j) -> its pair, both ways
        place = torch.zeros(rows.numel(), vectors * vectors)  # pair -> its two Gram entries, as a 0/1 matrix
        place[pairs, rows * vectors + cols] = place[pairs, cols * vectors + rows] = 1.0
        self.register_buffer("place", place, persistent=False)
        self.top = mlp(dim + rows.numel(), top_sizes)
        self.out_features = top_sizes[-1]

    def forward(self, pooled: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        bottom = self.bottom(dense)  # [B, D]
        if self.training and torch.is_grad_enabled():
            return self.top(_Interaction.apply(bottom, pooled, self.pair_of, self.place))
        return self.top(_interaction(bottom, pooled)[0])


def _interaction(bottom: torch.Tensor, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The top MLP's input `[B, D + V (V - 1) / 2]`: `bottom` `[B, D]`, then the dot
    products of every pair i < j of the V = F + 1 vectors (bottom, then `pooled`
    `[B, F, D]`), row by row of the Gram matrix's upper triangle; and those vectors."""
    vectors = torch.cat([bottom.unsqueeze(1), pooled], dim=1)  # [B, V, D]
    gram = torch.bmm(vectors, vectors.transpose(1, 2))  # [B, V, V]
    count = gram.shape[1]
    return torch.cat([bottom, *(gram[:, i, i + 1 :] for i in range(count - 1))], dim=1), vectors


class _Interaction(torch.autograd.Function):
    """`_interaction` with a backward of one batched product instead of autograd's
    steps through every slice: the gradient of the Gram matrix V V^T is (G + G^T) V,
    and G + G^T is built from the pairs' gradient in one step (`_symmetric`). Under
    autocast the products run in bfloat16."""

    @staticmethod
    def forward(ctx, bottom: torch.Tensor, pooled: torch.Tensor,  # type: ignore[override]
                pair_of: torch.Tensor, place: torch.Tensor) -> torch.Tensor:
        out, vectors = _interaction(bottom, pooled)
        ctx.save_for_backward(vectors, pair_of, place)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:  # type: ignore[override]
        vectors, pair_of, place = ctx.saved_tensors
        batch, count, dim = vectors.shape
        symmetric = _symmetric(grad[:, dim:], pair_of, place).view(batch, count, count).to(vectors.dtype)
        grad_vectors = torch.bmm(symmetric, vectors)  # [B, V, D]
        return grad[:, :dim] + grad_vectors[:, 0], grad_vectors[:, 1:], None, None


def _symmetric(pairs: torch.Tensor, pair_of: torch.Tensor, place: torch.Tensor) -> torch.Tensor:
    """G + G^T, flattened `[B, V * V]`: each pair's gradient at its two Gram entries.

    In float32, a gather (`pair_of`). In bfloat16 or float16, a product with the 0/1
    matrix `place`: exact, since each entry sums one nonzero term, and several times
    faster than torch's gathers of 16-bit values."""
    if pairs.dtype == torch.float32:
        padded = torch.cat([pairs, pairs.new_zeros(pairs.shape[0], 1)], dim=1)
        return padded.index_select(1, pair_of)
    return pairs @ place.to(pairs.dtype)
