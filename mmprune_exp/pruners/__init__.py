"""Pruners: registered methods that change weights (weight pruners) before evaluation."""

from mmprune_exp.pruners import magnitude, owl, qwen_tamp, sparsegpt, tamp, wanda  # noqa: F401  (register the pruners)
from mmprune_exp.pruners.base import PRUNERS, Pruner, build_pruner, register_pruner
from mmprune_exp.pruners.report import SparsityReport, sparsity_report

__all__ = ["PRUNERS", "Pruner", "SparsityReport", "build_pruner", "register_pruner", "sparsity_report"]
