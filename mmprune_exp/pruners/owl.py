"""OWL (Yin et al. 2024, luuyin/OWL): outlier-weighed layer-wise sparsity, then Wanda inside each layer.

Pass 1 walks the *dense* model layer by layer and measures each decoder layer's outlier ratio
``LOD = 100 * #(A > M * mean(A)) / numel(A)`` over the Wanda metrics ``A`` of all its target linears.
The ratios are min-max scaled to ``[0, 2*lambda]``, centred, and turned into densities around ``1 - s``:
``sparsity_l = 1 - (D_l - mean(D) + 1 - s)``. Layers with more outliers are pruned *less*; the sparsities
average to ``s`` and span exactly ``2*lambda``. (TAMP's in-repo "OWL" baseline adds the centred term to the
sparsity instead, which inverts this; we follow the OWL paper and code.) Pass 2 is Wanda with those
per-layer sparsities.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch
from torch import nn

from mmprune_exp.config.schema import PrunerConfig, SparsityConfig, require
from mmprune_exp.pruners.base import register_pruner
from mmprune_exp.pruners.engine import LayerInputs, SequentialEngine
from mmprune_exp.pruners.stats import RowScaler
from mmprune_exp.pruners.wanda import WandaPruner, wanda_scores

log = logging.getLogger(__name__)


def outlier_ratio(metric: torch.Tensor, m: float) -> float:
    """Percentage of entries larger than ``m`` times the mean (OWL's layer outlier distribution, LOD)."""
    metric = metric.float().flatten()
    return float((metric > m * metric.mean()).sum() * 100.0 / metric.numel())


def owl_layer_sparsities(ratios: list[float], sparsity: float, lam: float) -> list[float]:
    """Per-layer sparsities from outlier ratios (OWL ``prune_wanda_outlier``).

    Equal ratios (max == min) give the uniform sparsity; the reference would divide by zero there. A
    non-positive result is floored at 0.01 as in the reference; results are capped at 0.99.
    """
    r = torch.tensor(ratios, dtype=torch.float64)
    span = r.max() - r.min()
    scaled = (r - r.min()) / span * (2 * lam) if span > 0 else torch.zeros_like(r)
    density = scaled - scaled.mean() + (1 - sparsity)
    out = 1 - density
    out[out <= 0] = 0.01
    # Not in the reference: near s = 1 a layer could exceed 100%, which no mask can realise.
    return out.clamp(max=0.99).tolist()


@dataclass
class OWLConfig(PrunerConfig):
    """OWL knobs: outlier threshold M and the sparsity span 2*lambda (README defaults M=5, lambda=0.08)."""

    m: float = 5.0
    lam: float = 0.08

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.m > 0, "m", f"must be positive, got {self.m}")
        require(0 <= self.lam < 0.5, "lam", f"must be in [0, 0.5), got {self.lam}")


@register_pruner("owl", schema=OWLConfig)
class OWLPruner(WandaPruner):
    state_attrs = ("outlier_ratios", "layer_values")  # the plan (checkpointing: SequentialPruner.state_attrs)

    def __init__(self, cfg, sparsity: SparsityConfig):
        super().__init__(cfg, sparsity)
        if sparsity.structure != "unstructured":
            raise ValueError(
                f"pruner=owl allocates unstructured sparsity per layer; sparsity={sparsity.name} is "
                f"{sparsity.n}:{sparsity.m}. Use an unstructured sparsity (s10 ... s90)."
            )
        self.layer_values: dict[int, float] = {}
        self.outlier_ratios: dict[int, float] = {}

    def plan(self, engine: SequentialEngine, inputs: list[LayerInputs]) -> None:
        def measure(index: int, linears: dict[str, nn.Linear], stats: dict[str, RowScaler]) -> bool:
            metric = torch.cat([wanda_scores(lin.weight, stats[n].scaler).flatten() for n, lin in linears.items()])
            self.outlier_ratios[index] = outlier_ratio(metric, self.cfg.m)
            return False  # dense pass: weights unchanged, dense outputs feed the next layer

        engine.run(inputs, self.make_stat, measure, desc="owl outliers", keep_dense_outputs=True)
        layers = sorted(self.outlier_ratios)
        values = owl_layer_sparsities([self.outlier_ratios[i] for i in layers], self.sparsity.value, self.cfg.lam)
        self.layer_values = dict(zip(layers, values))
        log.info("OWL layer sparsities: %s", {i: round(v, 4) for i, v in self.layer_values.items()})

    def layer_sparsity(self, index: int) -> SparsityConfig:
        return replace(self.sparsity, value=self.layer_values[index])
