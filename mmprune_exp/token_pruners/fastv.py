"""FastV (Chen et al., ECCV'24, ``pkunlp-icler/FastV``): after decoder layer K-1, keep the visual tokens the last
token attends to most.

Reference behaviour (reference/token_pruners.md §4.1): layer K-1's softmax attention *with* RoPE and the causal
mask, the last query row, mean over heads; keep the top ``round(N·keep_ratio)`` visual tokens (the reference's
``round(N·(1-R))`` with R its drop ratio); pruned once at prefill, kept tokens keep their original positions,
layers before K keep the full prompt in their KV cache (the HF KV-cache version). Only the last query's row is
computed (O(N·d)), not ``output_attentions`` over the whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmprune_exp.config.schema import require
from mmprune_exp.models.base import ModelAdapter
from mmprune_exp.models.token_reduction import ReductionContext, ReductionPoint, Selection
from mmprune_exp.token_pruners.base import TokenPruner, TokenPrunerConfig, keep_count, register_token_pruner


@dataclass
class FastVConfig(TokenPrunerConfig):
    name: str = "fastv"
    keep_ratio: float = 0.5
    # K: tokens are dropped before decoder layer K, ranked by layer K-1's attention (the paper's default K=2)
    layer: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.layer >= 1, "layer", f"FastV ranks by layer K-1's attention, so K must be >= 1, got {self.layer}")


def fastv_select(ctx: ReductionContext, keep_ratio: float) -> Selection:
    """Top visual tokens by the last token's head-mean attention in the layer just run."""
    b, s = ctx.attention_mask.shape
    last = torch.full((b, 1), s - 1, dtype=torch.long, device=ctx.hidden.device)  # left-padded: last slot is real
    scores = ctx.attention(last, rope=True, causal=True)[:, :, 0, :].mean(1)  # [B, S]
    keep = []
    for i in range(b):
        visual = ctx.visual_slots(i)
        k = keep_count(int(visual.numel()), keep_ratio)
        top = visual[torch.topk(scores[i, visual], k).indices] if k else visual[:0]
        keep.append(ctx.keep_all_but(i, top))
    return Selection(keep)


@register_token_pruner("fastv", schema=FastVConfig)
class FastV(TokenPruner):
    def points(self, adapter: ModelAdapter) -> list[ReductionPoint]:
        cfg: FastVConfig = self.cfg
        n = adapter.decoder_shape().layers
        if cfg.layer >= n:
            from mmprune_exp.errors import ConfigError

            raise ConfigError(f"token_pruner.layer={cfg.layer} but the model has {n} decoder layers (K must be < {n})")
        return [ReductionPoint(cfg.layer - 1, lambda ctx: fastv_select(ctx, cfg.keep_ratio), name="fastv")]
