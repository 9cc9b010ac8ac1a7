"""TAMP (Lee et al., G-JWLee/TAMP) on the sequential engine: diversity-aware per-matrix sparsity (DAS), then
Wanda inside each matrix. See shared/reference/weight_pruners.md §5.4-5.5.

``pruner=tamp_das``, as the reference runs it:

1. A dense pass over every decoder layer (weights untouched, dense outputs fed forward). For every target
   Linear and calibration sample, the modality similarity of that Linear's *output* tokens
   (``diversity.modality_similarity``: positive-only upper-triangle means within visual and within text
   tokens, the plain visual-text mean), averaged over samples; the matrix's score is its diversity
   ``3 − (vv + ll + vl)``.
2. Per-matrix sparsities from the scores: ``allocation=code`` is the reference's budget loop
   (``das.das_sparsities``, capped at ``max_sparsity``, default ``s + 0.1`` as in ``tamp.sh``);
   ``allocation=paper`` is the paper's prose, sparsity inversely proportional to the score
   (``das.paper_sparsities``).
3. Wanda, sequentially, each matrix at its own sparsity.

N:M sparsity ignores DAS, as the reference does (its N:M branch never reads the sparsity dict): every matrix
gets n:m and the dense pass is skipped.

The AMIA half of TAMP (token-selected input activations) is not wired yet; ``tamp_das`` is DAS + plain Wanda.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

from torch import nn

from mmprune_exp.config.schema import PrunerConfig, SparsityConfig, require
from mmprune_exp.errors import ConfigError
from mmprune_exp.pruners.base import register_pruner
from mmprune_exp.pruners.das import das_sparsities, paper_sparsities
from mmprune_exp.pruners.diversity import RunningSimilarity, modality_similarity
from mmprune_exp.pruners.engine import LayerInputs, Sample, SequentialEngine
from mmprune_exp.pruners.wanda import WandaPruner

log = logging.getLogger(__name__)

ALLOCATIONS = ("code", "paper")


@dataclass
class TampConfig(PrunerConfig):
    """TAMP knobs (reference defaults from ``scripts/prune/tamp.sh``)."""

    allocation: str = "code"  # code: the reference's budget loop | paper: sparsity ∝ 1/diversity
    max_sparsity: float | None = None  # per-matrix cap of DAS; null = target sparsity + 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.allocation in ALLOCATIONS, "allocation", f"got {self.allocation!r}; choose one of {ALLOCATIONS}")
        require(
            self.max_sparsity is None or 0.0 <= self.max_sparsity < 1.0,
            "max_sparsity",
            f"must be in [0, 1) or null, got {self.max_sparsity}",
        )


class OutputDiversity:
    """Output statistic: the running modality similarity of one Linear's output tokens over samples."""

    uses_output = True

    def __init__(self) -> None:
        self.similarity = RunningSimilarity()

    def add(self, x, y, sample: Sample) -> None:
        self.similarity.add(modality_similarity(y, sample.visual))


@register_pruner("tamp_das", schema=TampConfig)
class TampPruner(WandaPruner):
    def __init__(self, cfg: TampConfig, sparsity: SparsityConfig):
        super().__init__(cfg, sparsity)
        self.max_sparsity = cfg.max_sparsity if cfg.max_sparsity is not None else min(sparsity.value + 0.1, 0.99)
        if sparsity.structure == "unstructured" and self.max_sparsity < sparsity.value:
            raise ConfigError(
                f"pruner.max_sparsity={cfg.max_sparsity} is invalid: below the target sparsity.value={sparsity.value}"
            )
        self.matrix_values: dict[str, float] = {}
        self.scores: dict[str, float] = {}

    def plan(self, engine: SequentialEngine, inputs: list[LayerInputs]) -> None:
        if self.sparsity.structure == "nm":
            log.info("%s: N:M sparsity ignores DAS (as the reference does); every matrix at %d:%d",
                     self.cfg.name, self.sparsity.n, self.sparsity.m)  # fmt: skip
            return
        sizes: dict[str, int] = {}

        def measure(index: int, linears: dict[str, nn.Linear], stats: dict[str, OutputDiversity]) -> bool:
            for name, linear in linears.items():
                self.scores[name] = stats[name].similarity.value.diversity
                sizes[name] = linear.weight.numel()
            return False  # a dense pass: the weights stay, dense outputs feed the next layer

        engine.run(inputs, lambda linear: OutputDiversity(), measure, desc=f"{self.cfg.name} diversity",
                   keep_dense_outputs=True)  # fmt: skip
        missing = [n for n, v in self.scores.items() if math.isnan(v)]  # a modality absent from every sample
        if missing:
            raise ConfigError(
                f"pruner={self.cfg.name}: no diversity score for {missing[0]} (and {len(missing) - 1} more): DAS "
                "needs calibration samples with both visual and text tokens (calibration=shapes or llava_json)"
            )
        allocate = das_sparsities if self.cfg.allocation == "code" else paper_sparsities
        self.matrix_values = allocate(self.scores, sizes, self.sparsity.value, self.max_sparsity)
        log.info("%s (%s allocation, cap %.3f): per-matrix sparsity from %.4f to %.4f",
                 self.cfg.name, self.cfg.allocation, self.max_sparsity, min(self.matrix_values.values()),
                 max(self.matrix_values.values()))  # fmt: skip

    def matrix_sparsity(self, name: str, index: int) -> SparsityConfig:
        if name not in self.matrix_values:  # N:M, or DAS off
            return super().matrix_sparsity(name, index)
        return replace(self.sparsity, value=self.matrix_values[name])
