"""Dense networks over pooled embeddings `[B, F, D]` and dense features `[B, Dd]`.

Each network (DLRM, DeepFM, DCN-v2, Wide & Deep) makes a representation; a head turns
it into one logit per target (`[B, T]`): a linear layer, or an MMoE multi-task head.
"""

from __future__ import annotations

import torch
from torch import nn

from tidal.config import ModelConfig, is_whole_number, require
from tidal.errors import BatchError, ConfigError
from tidal.models.common import (PRECISIONS, LinearHead, MMoEHead, compute_precision, mlp, resolve_precision,
                                 step_losses, weighted_bce)
from tidal.models.dcn import DCNv2
from tidal.models.deepfm import DeepFM
from tidal.models.dlrm import DLRM
from tidal.models.wide_deep import WideDeep

__all__ = ["DCNv2", "DLRM", "DeepFM", "LinearHead", "MMoEHead", "PRECISIONS", "RankingModel", "WideDeep",
           "compute_precision", "mlp", "resolve_precision", "step_losses", "weighted_bce"]


class RankingModel(nn.Module):
    """The configured network and head: ``model(pooled, dense) -> logits [B, T]``."""

    def __init__(self, config: ModelConfig, *, num_features: int, dim: int, dense_features: int,
                 num_targets: int) -> None:
        super().__init__()
        require(config, ModelConfig, "RankingModel: config")
        sizes = {"num_features": num_features, "dim": dim, "dense_features": dense_features, "num_targets": num_targets}
        bad = {k: v for k, v in sizes.items() if not is_whole_number(v) or v < (0 if k == "dense_features" else 1)}
        if bad:
            raise ConfigError(f"RankingModel: needs whole numbers, at least one feature, dim and target (dense may be 0), "
                              f"got {bad}")
        self.config = config
        self.num_features, self.dim, self.dense_features = num_features, dim, dense_features
        self.body = _body(config, num_features, dim, dense_features)
        width = self.body.out_features
        self.head = (LinearHead(width, num_targets) if config.head == "linear" else
                     MMoEHead(width, num_targets, experts=config.experts, expert_sizes=config.expert_sizes,
                              tower_sizes=config.tower_sizes))

    def forward(self, pooled: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        """Logits `[B, T]` of pooled embeddings `[B, F, D]` and dense features `[B, Dd]`."""
        pooled_shape, dense_shape = tuple(pooled.shape), tuple(dense.shape)
        if (len(pooled_shape), len(dense_shape)) != (3, 2) or pooled_shape[1:] != (self.num_features, self.dim) \
                or dense_shape[1] != self.dense_features or dense_shape[0] != pooled_shape[0]:
            raise BatchError(f"RankingModel: expected pooled [B, {self.num_features}, {self.dim}] and dense "
                             f"[B, {self.dense_features}], got {list(pooled_shape)} and {list(dense_shape)}")
        if pooled.dtype not in _INPUT_DTYPES or dense.dtype not in _INPUT_DTYPES:
            raise BatchError(f"RankingModel: expected pooled and dense of float32 (or bfloat16, float16), got "
                             f"{pooled.dtype} and {dense.dtype}")
        return self.head(self.body(pooled, dense))  # [B, T]


_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _body(config: ModelConfig, num_features: int, dim: int, dense_features: int) -> nn.Module:
    if config.kind == "dlrm":
        return DLRM(num_features, dim, dense_features, bottom_sizes=config.bottom_sizes, top_sizes=config.hidden_sizes)
    if config.kind == "dcn":
        return DCNv2(num_features, dim, dense_features, cross_layers=config.cross_layers, deep_sizes=config.hidden_sizes)
    kinds = {"deepfm": DeepFM, "wide_deep": WideDeep}
    return kinds[config.kind](num_features, dim, dense_features, deep_sizes=config.hidden_sizes)
