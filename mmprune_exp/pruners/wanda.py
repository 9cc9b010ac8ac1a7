"""Wanda (Sun et al. 2023, locuslab/wanda): prune by |W| * ||x||, compared within each output row."""

from __future__ import annotations

import torch
from torch import nn

from mmprune_exp.config.schema import SparsityConfig
from mmprune_exp.pruners.base import register_pruner
from mmprune_exp.pruners.masks import structured_mask
from mmprune_exp.pruners.sequential import SequentialPruner
from mmprune_exp.pruners.stats import RowScaler


def wanda_scores(weight: torch.Tensor, scaler: torch.Tensor) -> torch.Tensor:
    """``|W| * sqrt(scaler)`` in fp32 (``scaler`` = per-input-channel mean of x^2 over samples)."""
    return weight.detach().abs().float() * scaler.float().sqrt().reshape(1, -1)


def wanda_mask(weight: torch.Tensor, scaler: torch.Tensor, sparsity: SparsityConfig) -> torch.Tensor:
    """Unstructured: ``int(in * s)`` lowest scores of every output row (stable order); N:M: per group."""
    return structured_mask(wanda_scores(weight, scaler), sparsity, per_row=True)


@register_pruner("wanda")
class WandaPruner(SequentialPruner):
    def make_stat(self, linear: nn.Linear) -> RowScaler:
        return RowScaler(linear.in_features, linear.weight.device)

    def prune_linear(self, name: str, linear: nn.Linear, stat: RowScaler, sparsity: SparsityConfig) -> None:
        linear.weight[wanda_mask(linear.weight, stat.scaler, sparsity)] = 0
