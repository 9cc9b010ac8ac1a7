"""Pruner interface and registry.

A weight pruner changes weights once, in place, before evaluation. ``needs_calibration`` tells the run
whether to build calibration batches at all (magnitude pruning does not).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mmprune_exp.config.schema import PrunerConfig, SparsityConfig
from mmprune_exp.models.base import ModelAdapter
from mmprune_exp.registry import Registry

if TYPE_CHECKING:
    from mmprune_exp.calibration import CalibrationData


class Pruner:
    needs_calibration: bool = False

    def __init__(self, cfg: PrunerConfig, sparsity: SparsityConfig):
        self.cfg = cfg
        self.sparsity = sparsity

    def prune(self, adapter: ModelAdapter, calibration: CalibrationData | None) -> None:
        raise NotImplementedError

    def report(self) -> dict:
        """What the method measured on the way (scores, token counts, ...), saved in sparsity.json; default none."""
        return {}

    def targets(self, adapter: ModelAdapter):
        return adapter.target_linears(list(self.cfg.scope), list(self.cfg.modules))


PRUNERS = Registry("pruner.name")
register_pruner = PRUNERS.register


def build_pruner(cfg: PrunerConfig, sparsity: SparsityConfig) -> Pruner:
    return PRUNERS.get_factory(cfg.name)(cfg, sparsity)


@register_pruner("none")
class NoPruner(Pruner):
    """Leaves the weights as they are (a dense sweep point)."""

    def prune(self, adapter: ModelAdapter, calibration: CalibrationData | None) -> None:
        return None
