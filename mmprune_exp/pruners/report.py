"""Achieved sparsity of the target matrices: per matrix, per decoder layer, overall."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from torch import nn

from mmprune_exp.models.base import ModelAdapter


@dataclass
class SparsityReport:
    per_matrix: dict[str, float] = field(default_factory=dict)
    per_layer: dict[int, float] = field(default_factory=dict)
    overall: float = 0.0  # zeros / weights over all target matrices
    zeros: int = 0
    total: int = 0

    def to_dict(self) -> dict:
        return {
            "overall": self.overall,
            "zeros": self.zeros,
            "total": self.total,
            "per_layer": {str(k): v for k, v in self.per_layer.items()},
            "per_matrix": self.per_matrix,
        }


def sparsity_report(targets: dict[str, nn.Linear], adapter: ModelAdapter) -> SparsityReport:
    report = SparsityReport()
    layer_counts: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for name, linear in targets.items():
        zeros = int((linear.weight == 0).sum())
        total = linear.weight.numel()
        report.per_matrix[name] = zeros / total
        report.zeros += zeros
        report.total += total
        layer = adapter.layer_index(name)
        if layer is not None:
            layer_counts[layer][0] += zeros
            layer_counts[layer][1] += total
    report.per_layer = {k: z / t for k, (z, t) in sorted(layer_counts.items())}
    report.overall = report.zeros / report.total if report.total else 0.0
    return report
