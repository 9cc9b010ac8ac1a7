"""Magnitude (L1) pruning: zero the smallest |w| of each target matrix, one threshold per matrix."""

from __future__ import annotations

import torch

from mmprune_exp.models.base import ModelAdapter
from mmprune_exp.pruners.base import Pruner, register_pruner
from mmprune_exp.pruners.masks import structured_mask


@register_pruner("magnitude")
class MagnitudePruner(Pruner):
    needs_calibration = False

    @torch.no_grad()
    def prune(self, adapter: ModelAdapter, calibration=None) -> None:
        for linear in self.targets(adapter).values():
            weight = linear.weight
            # Scores in fp32 so bf16 ties do not depend on the storage dtype.
            mask = structured_mask(weight.detach().abs().float(), self.sparsity, per_row=False)
            weight[mask] = 0
