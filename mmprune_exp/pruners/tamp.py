"""TAMP (Lee et al., G-JWLee/TAMP) on the sequential engine: diversity-aware per-matrix sparsity (DAS) and
token-selected input activations (AMIA) on the Wanda metric. See shared/reference/weight_pruners.md §5.4-5.6.

``pruner=tamp`` is both (the paper's method); ``tamp_das`` and ``tamp_amia`` are each half alone, and with
both switched off (``pruner=tamp pruner.das=false pruner.amia=false``) it is Wanda exactly.

DAS, as the reference runs it:

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

AMIA, during the sequential pruning pass: for every decoder layer and sample, the last query's attention over
the tokens (the layer's input, layer still dense; the adapter's ``last_query_attention``); then for every target
Linear, the tokens ``amia.select_tokens`` picks from that Linear's outputs (3-NN graph score from the prior,
greedy pick with neighbour decay, MMD² stopping rule), and Wanda's Σx² over the *selected input* tokens only
(tokens counted over all samples). The reference never computes the prior for ``--token_selection amia`` (a
bug, §0): here it is computed. Guards that fire (no visual or no text tokens, a selection that never stops)
are counted and logged.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from mmprune_exp.config.schema import PrunerConfig, SparsityConfig, require
from mmprune_exp.errors import ConfigError
from mmprune_exp.pruners.amia import select_tokens, selected_sum_of_squares
from mmprune_exp.pruners.base import register_pruner
from mmprune_exp.pruners.das import das_sparsities, paper_sparsities
from mmprune_exp.pruners.diversity import RunningSimilarity, modality_similarity
from mmprune_exp.pruners.engine import LayerInputs, Sample, SequentialEngine
from mmprune_exp.pruners.wanda import WandaPruner

log = logging.getLogger(__name__)

ALLOCATIONS = ("code", "paper")


@dataclass
class AMIAConfig(PrunerConfig):
    """AMIA's token-selection knobs (reference values), shared by TAMP and Qwen-TAMP."""

    knn: int = 3  # neighbours in the token graph
    gamma: float = 1.0  # message-pass rate: g = a + Σ exp(−gamma·d)·a_nbr
    decay: float = 0.2  # neighbour damping after a pick: exp(−decay·d)·max(g_t, 0)
    sigma: float = 1.0  # RBF width of the MMD kernel
    threshold_scale: float = 0.1  # stop when MMD² < threshold_scale·sqrt(1 − mean similarity)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.knn > 0, "knn", f"must be positive, got {self.knn}")
        require(self.sigma > 0, "sigma", f"must be positive, got {self.sigma}")
        require(self.threshold_scale > 0, "threshold_scale", f"must be positive, got {self.threshold_scale}")


@dataclass
class TampConfig(AMIAConfig):
    """TAMP knobs (reference defaults from ``scripts/prune/tamp.sh``)."""

    das: bool = True  # per-matrix sparsity from output diversity (off: uniform)
    amia: bool = True  # Wanda statistic over AMIA-selected tokens (off: over all tokens)
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


class AMIAScaler:
    """Output statistic: Wanda's per-input-channel Σx² over the tokens AMIA selects, per Linear.

    ``scaler = Σ_samples Σ_selected x² / Σ_samples |selected|``: the reference's running form, which counts
    tokens (Wanda counts samples; the per-row ranking is the same either way).
    """

    uses_output = True

    def __init__(self, linear: nn.Linear, cfg: AMIAConfig, guards: dict[str, int], selected: dict[str, list]):
        self.sum = torch.zeros(linear.in_features, dtype=torch.float32, device=linear.weight.device)
        self.count = 0
        self.cfg = cfg
        self.guards = guards  # shared by the pruner: how often each fallback fired
        self.selected = selected  # shared: [visual, text, total tokens] per call

    def add(self, x: torch.Tensor, y: torch.Tensor, sample: Sample) -> None:
        cfg = self.cfg
        picked = select_tokens(y, sample.visual, sample.values["attention_prior"], k=cfg.knn, sigma=cfg.sigma,
                               decay=cfg.decay, gamma=cfg.gamma, threshold_scale=cfg.threshold_scale)  # fmt: skip
        if picked.fallback:
            for reason in picked.fallback.split("; "):
                self.guards[reason] = self.guards.get(reason, 0) + 1
        sums, count = selected_sum_of_squares(x, picked.indices)
        self.sum += sums.to(self.sum.device)
        self.count += count
        self.selected.setdefault("calls", []).append((picked.n_visual_selected, picked.n_text_selected, picked.n_tokens))

    @property
    def scaler(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)


@register_pruner("tamp", schema=TampConfig)
@register_pruner("tamp_das")
@register_pruner("tamp_amia")
class TampPruner(WandaPruner):
    # DAS's plan and AMIA's per-layer records (checkpointing: SequentialPruner.state_attrs)
    state_attrs = ("scores", "matrix_values", "amia_guards", "amia_tokens")

    def __init__(self, cfg: TampConfig, sparsity: SparsityConfig):
        super().__init__(cfg, sparsity)
        self.max_sparsity = cfg.max_sparsity if cfg.max_sparsity is not None else min(sparsity.value + 0.1, 0.99)
        if sparsity.structure == "unstructured" and self.max_sparsity < sparsity.value:
            raise ConfigError(
                f"pruner.max_sparsity={cfg.max_sparsity} is invalid: below the target sparsity.value={sparsity.value}"
            )
        self.matrix_values: dict[str, float] = {}
        self.scores: dict[str, float] = {}
        self.amia_guards: dict[str, int] = {}
        self.amia_tokens: dict[int, dict[str, float]] = {}  # layer -> mean selected visual/text tokens per sample
        self._layer_selected: dict[str, list] = {}

    def make_stat(self, linear: nn.Linear):
        if not self.cfg.amia:
            return super().make_stat(linear)
        return AMIAScaler(linear, self.cfg, self.amia_guards, self._layer_selected)

    def sample_preparer(self):
        return self._attention_prior if self.cfg.amia else None

    def _attention_prior(self, index: int, layer: nn.Module, inputs: LayerInputs) -> dict:
        return {"attention_prior": self.adapter.last_query_attention(layer, inputs)}

    def prune(self, adapter, calibration) -> None:
        self.adapter = adapter  # AMIA asks it for the attention prior
        super().prune(adapter, calibration)
        if self.amia_guards:
            log.warning("%s: AMIA fallbacks (token selection guard: times): %s", self.cfg.name, self.amia_guards)
        if self.amia_tokens:
            log.info("%s: AMIA tokens selected per sample and Linear (layer: visual, text of total): %s", self.cfg.name,
                     {i: f"{v['visual']:.1f}, {v['text']:.1f} of {v['total']:.1f}" for i, v in self.amia_tokens.items()})

    def _prune_layer(self, index: int, linears: dict[str, nn.Linear], stats: dict) -> bool:
        calls = self._layer_selected.pop("calls", [])
        if calls:
            self.amia_tokens[index] = {key: sum(c[k] for c in calls) / len(calls)
                                       for k, key in enumerate(("visual", "text", "total"))}  # fmt: skip
        return super()._prune_layer(index, linears, stats)

    def report(self) -> dict:
        out: dict = {}
        if self.scores:
            out["das_scores"] = self.scores
        if self.amia_tokens:
            out["amia_tokens_per_layer"] = {str(i): v for i, v in self.amia_tokens.items()}
        if self.amia_guards:
            out["amia_fallbacks"] = self.amia_guards
        return out

    def plan(self, engine: SequentialEngine, inputs: list[LayerInputs]) -> None:
        if not self.cfg.das:
            return
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
