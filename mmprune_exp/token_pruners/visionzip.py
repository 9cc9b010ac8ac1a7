"""VisionZip (Yang et al., CVPR'25, ``dvlab-research/VisionZip``), its Qwen2.5-VL form: before the LLM, each image
or video keeps its dominant tokens and a few contextual tokens that absorb the rest.

Reference behaviour (the official Qwen2.5-VL file, vendored at ``HVision-NKU/GlimpsePrune``
``qwen_visionzip/qwen2_5vl_visionzip.py``; reference/token_pruners.md §4.2):

- score of a merged token = attention it receives in the last vision block (head mean, summed over queries, mean
  over its 2×2 patches); dominant tokens = the top ``D`` by score;
- among the other tokens, in raster order, ``C`` targets at a uniform stride ``max(1, M // C)`` (the first ``C`` of
  ``0, step, 2·step, …``, ``M`` tokens left); every remaining token goes to the target whose key (keys averaged
  over heads and patches) has the highest cosine similarity;
- contextual token = **target + mean of the tokens assigned to it** (the target's own vector plus the plain mean of
  the others, ``target_hidden + bmm(one_hot, hidden) / counts``; not the mean with the target included), written at
  the target's slot, which keeps its original M-RoPE position; a target nothing joined stays as it is.

Budget: ``keep_ratio`` = (D + C) / N per item, ``K = keep_count(N, keep_ratio)`` (round, like FastV), and
``C = max(1, round(K·contextual_share))`` (the reference always keeps at least one contextual token), ``D = K − C``.
``contextual_share`` defaults to 10/64, the paper's split (54+10, 108+20, 162+30 for 64/128/192 tokens: the same
share at every budget, which is what a keep-ratio sweep needs). The Qwen file instead fixes C at 5% of N (0.65+0.05,
README 0.45+0.05 at 50%), which would make half of the budget contextual at keep 0.1;
``contextual_share=0.1`` reproduces the README's 50% split.

Deviations: the reference (batch size 1) ranks the concatenation of all images of the prompt at once; here each
image/video is reduced on its own, so a sample's selection does not depend on its batch. The contextual vectors are
computed in fp32 and cast to the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmprune_exp.config.schema import require
from mmprune_exp.models.base import ModelAdapter
from mmprune_exp.models.token_reduction import ReductionContext, ReductionPoint, Selection
from mmprune_exp.token_pruners.base import TokenPruner, TokenPrunerConfig, keep_count, register_token_pruner

PAPER_CONTEXTUAL_SHARE = 10 / 64


@dataclass
class VisionZipConfig(TokenPrunerConfig):
    name: str = "visionzip"
    keep_ratio: float = 0.5
    # share of each item's kept tokens that are contextual (merged) tokens; the rest are dominant
    contextual_share: float = PAPER_CONTEXTUAL_SHARE

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0.0 <= self.contextual_share < 1.0, "contextual_share",
                f"must be in [0, 1), got {self.contextual_share}")  # fmt: skip


def budget(n: int, keep_ratio: float, contextual_share: float) -> tuple[int, int]:
    """``(dominant, contextual)`` token counts for an item of ``n`` tokens."""
    k = keep_count(n, keep_ratio)
    c = min(k, max(1, round(k * contextual_share))) if contextual_share > 0 and k else 0
    return k - c, c


@dataclass
class ZipResult:
    """One item's selection, in indices ``0..n-1`` of its raster order."""

    keep: torch.Tensor  # dominant and target tokens, ascending
    dominant: torch.Tensor
    targets: torch.Tensor  # contextual tokens' positions (ascending)
    merged: torch.Tensor  # targets that absorbed at least one token
    vectors: torch.Tensor  # [len(merged), D] fp32: target + mean of its assigned tokens


def zip_item(score: torch.Tensor, keys: torch.Tensor, hidden: torch.Tensor, dominant: int, contextual: int) -> ZipResult:
    """VisionZip on one item: ``score`` [n], ``keys`` [n, d], ``hidden`` [n, D] (the LLM input embeddings)."""
    n = score.numel()
    device = hidden.device
    top = torch.topk(score.float(), dominant).indices if dominant else torch.zeros(0, dtype=torch.long, device=device)
    is_dominant = torch.zeros(n, dtype=torch.bool, device=score.device)
    is_dominant[top] = True
    rest = torch.nonzero(~is_dominant).flatten().to(device)  # raster order
    empty = torch.zeros(0, dtype=torch.long, device=device)
    if contextual == 0:
        dom = torch.sort(top.to(device)).values
        return ZipResult(dom, dom, empty, empty, hidden.new_zeros(0, hidden.shape[1], dtype=torch.float32))
    step = max(1, rest.numel() // contextual)
    picks = torch.arange(0, rest.numel(), step, device=device)[:contextual]
    targets = rest[picks]
    is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=device)
    is_target[picks] = True
    others = rest[~is_target]
    unit = torch.nn.functional.normalize(keys.float().to(device), dim=-1)
    vectors = hidden.new_zeros(0, hidden.shape[1], dtype=torch.float32)
    merged = empty
    if others.numel():
        nearest = (unit[others] @ unit[targets].T).argmax(1)  # [len(others)] index into targets
        sums = torch.zeros(contextual, hidden.shape[1], dtype=torch.float32, device=device)
        sums.index_add_(0, nearest, hidden[others].float())
        counts = torch.bincount(nearest, minlength=contextual)
        has = counts > 0
        merged = targets[has]
        vectors = hidden[merged].float() + sums[has] / counts[has, None].float()
    keep = torch.sort(torch.cat([top.to(device), targets])).values
    return ZipResult(keep, torch.sort(top.to(device)).values, targets, merged, vectors)


def visionzip_select(ctx: ReductionContext, keep_ratio: float, contextual_share: float) -> Selection:
    if ctx.vision is None:
        raise RuntimeError("VisionZip needs the vision tower's statistics (needs_vision_stats) at its point")
    keep, replace = [], []
    for b in range(ctx.batch_size):
        visual_keep, rep_slots, rep_vectors = [], [], []
        for item in ctx.items[b]:
            slots = ctx.slots_of(b, item)  # before the LLM: every token of the item, in raster order
            stats = ctx.vision[(item.kind, item.index)]
            if slots.numel() != stats["score"].numel():
                raise RuntimeError(f"{item.kind} {item.index}: {slots.numel()} slots but "
                                   f"{stats['score'].numel()} vision scores")  # fmt: skip
            d, c = budget(slots.numel(), keep_ratio, contextual_share)
            z = zip_item(stats["score"], stats["keys"], ctx.hidden[b, slots], d, c)
            visual_keep.append(slots[z.keep])
            rep_slots.append(slots[z.merged])
            rep_vectors.append(z.vectors)
        visual = torch.cat(visual_keep) if visual_keep else ctx.visual_slots(b)
        keep.append(ctx.keep_all_but(b, visual))
        merged = torch.cat(rep_slots) if rep_slots else None
        replace.append((merged, torch.cat(rep_vectors)) if merged is not None and merged.numel() else None)
    return Selection(keep, replace)


@register_token_pruner("visionzip", schema=VisionZipConfig)
class VisionZip(TokenPruner):
    needs_vision_stats = True

    def points(self, adapter: ModelAdapter) -> list[ReductionPoint]:
        cfg: VisionZipConfig = self.cfg
        return [ReductionPoint(-1, lambda ctx: visionzip_select(ctx, cfg.keep_ratio, cfg.contextual_share),
                               name="visionzip")]  # fmt: skip
