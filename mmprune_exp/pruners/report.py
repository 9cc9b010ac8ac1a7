"""Achieved sparsity of the target matrices: per matrix, per decoder layer, overall."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

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


def sparsity_heatmap(report: SparsityReport, path: Path, title: str = "") -> Path | None:
    """The per-matrix sparsity profile as a PNG: decoder layers down, matrix kinds across, value in each cell.

    Only decoder-layer matrices are drawn (``...layers.<i>.<module path>``); returns None when there are none.
    """
    cells: dict[tuple[int, str], float] = {}
    for name, value in report.per_matrix.items():
        layer = ModelAdapter.layer_index(name)
        if layer is not None:
            cells[layer, name.split(f"layers.{layer}.", 1)[1]] = value
    if not cells:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    layers = sorted({layer for layer, _ in cells})
    kinds = list(dict.fromkeys(kind for _, kind in cells))  # model order: q, k, v, o, gate, up, down
    grid = [[cells.get((layer, kind), float("nan")) for kind in kinds] for layer in layers]
    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(kinds), 1.2 + 0.32 * len(layers)))
    image = ax.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(kinds)), [k.rsplit(".", 1)[-1] for k in kinds], rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), [str(i) for i in layers])
    ax.set_ylabel("decoder layer")
    if len(layers) * len(kinds) <= 400:  # numbers stay readable up to ~57 layers of 7 matrices
        for r, row in enumerate(grid):
            for c, value in enumerate(row):
                if not math.isnan(value):
                    ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if value < 0.6 else "black")  # fmt: skip
    fig.colorbar(image, ax=ax, label="sparsity")
    ax.set_title(title or f"sparsity per matrix (overall {report.overall:.3f})", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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
