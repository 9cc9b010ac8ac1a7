"""Qwen-TAMP: the Qwen2.5-VL variant of TAMP from the qwen_tamp prototype (shared/reference/weight_pruners.md §6),
with the prototype's defects fixed.

What it keeps from the prototype:

- only the attention's q/k/v projections are pruned (``modules: [q_proj, k_proj, v_proj]``);
- one sparsity per decoder layer, inversely proportional to the diversity of the layer's *input* tokens
  (``diversity.modality_similarity`` of the hidden states entering the layer, averaged over calibration
  samples on the dense model), normalised so the layers average to the target (``das.paper_sparsities``; all
  layers have the same q/k/v size, so the parameter-weighted mean is the plain mean) and capped at
  ``max_sparsity``;
- tokens selected from the layer's input tokens (not each Linear's outputs, as TAMP does), shared by q/k/v,
  with AMIA's rule (``amia.select_tokens``), and the activation statistic over the selected tokens only.

What it fixes (the prototype's defects, §6): visual tokens are found by token id, not assumed to come first;
the prior is the last query's real attention probabilities (``ModelAdapter.last_query_attention``), not the
attention output's last hidden channel; only the prefill is seen (the engine never decodes); calibration
comes from the calibration set, never the evaluation set; the mask is Wanda's, per output row with a stable
order, not one global argsort over the matrix. The prototype's own selection tweaks (no 0.2 damping factor,
a ``|S| > N/3`` cut, a +0.0012 offset in the stopping rule) are not reproduced: the selection is TAMP's.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from mmprune_exp.config.schema import SparsityConfig, require
from mmprune_exp.errors import ConfigError
from mmprune_exp.pruners.amia import select_tokens, selected_sum_of_squares
from mmprune_exp.pruners.base import register_pruner
from mmprune_exp.pruners.das import paper_sparsities
from mmprune_exp.pruners.diversity import RunningSimilarity, modality_similarity
from mmprune_exp.pruners.engine import LayerInputs, Sample, SequentialEngine
from mmprune_exp.pruners.tamp import AMIAConfig
from mmprune_exp.pruners.wanda import WandaPruner

log = logging.getLogger(__name__)


@dataclass
class QwenTampConfig(AMIAConfig):
    """Qwen-TAMP knobs; the token selection's are AMIA's (``AMIAConfig``)."""

    modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])
    # Per-layer cap. The prototype caps at 1 (a layer's q/k/v fully pruned); a sparsity must stay below 1 here.
    max_sparsity: float = 0.99

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0.0 < self.max_sparsity < 1.0, "max_sparsity", f"must be in (0, 1), got {self.max_sparsity}")


class SelectedInputScaler:
    """Σx² of a Linear's inputs over the tokens selected for its layer (``sample.values["selected"]``), per
    input channel, divided by the number of selected tokens over all samples."""

    uses_output = True  # for the sample: the output itself is not used

    def __init__(self, linear: nn.Linear):
        self.sum = torch.zeros(linear.in_features, dtype=torch.float32, device=linear.weight.device)
        self.count = 0

    def add(self, x: torch.Tensor, y: torch.Tensor, sample: Sample) -> None:
        sums, count = selected_sum_of_squares(x, sample.values["selected"])
        self.sum += sums.to(self.sum.device)
        self.count += count

    @property
    def scaler(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)


@register_pruner("qwen_tamp", schema=QwenTampConfig)
class QwenTampPruner(WandaPruner):
    # the plan and the per-layer token records (checkpointing: SequentialPruner.state_attrs)
    state_attrs = ("layer_scores", "layer_values", "tokens", "fallbacks")

    def __init__(self, cfg: QwenTampConfig, sparsity: SparsityConfig):
        super().__init__(cfg, sparsity)
        if sparsity.structure != "unstructured":
            raise ConfigError("pruner=qwen_tamp sets one sparsity per layer: use an unstructured sparsity (s10 ... s90)")
        if cfg.max_sparsity < sparsity.value:
            raise ConfigError(f"pruner.max_sparsity={cfg.max_sparsity} is invalid: below sparsity.value={sparsity.value}")
        self.layer_scores: dict[int, float] = {}
        self.layer_values: dict[int, float] = {}
        self.tokens: dict[int, list[tuple[int, int, int]]] = {}  # layer -> (visual, text, total) per sample
        self.fallbacks: dict[str, int] = {}

    def prune(self, adapter, calibration) -> None:
        self.adapter = adapter  # the attention prior comes from it
        super().prune(adapter, calibration)

    def plan(self, engine: SequentialEngine, inputs: list[LayerInputs]) -> None:
        """A dense pass: the diversity of every layer's input tokens, then the per-layer sparsities."""
        running: dict[int, RunningSimilarity] = {}

        def measure(index: int, layer: nn.Module, x: LayerInputs) -> dict:
            running.setdefault(index, RunningSimilarity()).add(modality_similarity(x.hidden, x.visual))
            return {}

        # No targets: nothing is hooked and the dense outputs feed the next layer.
        SequentialEngine(self.adapter, {}).run(inputs, lambda linear: None, lambda *a: False,
                                               desc="qwen_tamp input diversity", prepare_sample=measure)  # fmt: skip
        self.layer_scores = {i: r.value.diversity for i, r in sorted(running.items()) if i in engine.by_layer}
        missing = [i for i, v in self.layer_scores.items() if math.isnan(v)]
        if missing:
            raise ConfigError(f"pruner=qwen_tamp: layer {missing[0]} has no diversity score: calibration samples need "
                              "both visual and text tokens (calibration=shapes or llava_json)")  # fmt: skip
        sizes = {i: sum(lin.weight.numel() for lin in engine.by_layer[i].values()) for i in self.layer_scores}
        values = paper_sparsities({str(i): v for i, v in self.layer_scores.items()}, {str(i): n for i, n in sizes.items()},
                                  self.sparsity.value, self.cfg.max_sparsity)  # fmt: skip
        self.layer_values = {int(i): v for i, v in values.items()}
        log.info("qwen_tamp layer sparsities: %s", {i: round(v, 4) for i, v in self.layer_values.items()})

    def layer_sparsity(self, index: int) -> SparsityConfig:
        return replace(self.sparsity, value=self.layer_values[index])

    def make_stat(self, linear: nn.Linear) -> SelectedInputScaler:
        return SelectedInputScaler(linear)

    def sample_preparer(self):
        return self._select_input_tokens

    def _select_input_tokens(self, index: int, layer: nn.Module, inputs: LayerInputs) -> dict:
        """The tokens of this sample that q/k/v's statistic keeps: AMIA's rule on the layer's input tokens."""
        cfg = self.cfg
        prior = self.adapter.last_query_attention(layer, inputs)
        picked = select_tokens(inputs.hidden, inputs.visual, prior, k=cfg.knn, sigma=cfg.sigma, decay=cfg.decay,
                               gamma=cfg.gamma, threshold_scale=cfg.threshold_scale)  # fmt: skip
        if picked.fallback:
            for reason in picked.fallback.split("; "):
                self.fallbacks[reason] = self.fallbacks.get(reason, 0) + 1
        self.tokens.setdefault(index, []).append((picked.n_visual_selected, picked.n_text_selected, picked.n_tokens))
        return {"selected": picked.indices}

    def report(self) -> dict:
        tokens = {str(i): {key: sum(c[k] for c in calls) / len(calls) for k, key in enumerate(("visual", "text", "total"))}
                  for i, calls in self.tokens.items()}  # fmt: skip
        out = {"layer_diversity": {str(i): v for i, v in self.layer_scores.items()},
               "layer_sparsity": {str(i): v for i, v in self.layer_values.items()},
               "tokens_per_layer": tokens}  # fmt: skip
        if self.fallbacks:
            out["selection_fallbacks"] = self.fallbacks
        return out
