"""PruneVid (Huang et al., ACL'25 Findings, ``Visual-AI/PruneVid``): merge redundant video tokens before the LLM,
keep the ones the question attends to at layer M, and cut the early layers' KV cache to match.

Reference behaviour (PLLaVA code, reference/token_pruners.md §1.2–1.5; the arithmetic is in
:mod:`mmprune_exp.token_pruners.clustering`):

- **Stage 1** (before the LLM, videos only; "frames" are the merged grid's temporal slices): DPC-KNN (k=7) over
  the frames' mean tokens into ``int(T·temporal_segment_ratio)`` clusters, made contiguous by ``refine_clusters``
  → segments. In each segment a spatial slot is static when its tokens' mean pairwise cosine similarity over the
  segment's frames exceeds ``tau``; static tokens are averaged over the segment, dynamic tokens stay per frame. A
  static set, and each frame's dynamic set, of more than 14 tokens is merged by DPC-KNN into
  ``int(n·cluster_ratio)`` cluster means.
- **Stage 2** (after decoder layer M): attention of layer M *without RoPE and without the causal mask*, rows = every
  token after the last visual token, max over heads then over rows; keep the top ``int(n·alpha)`` of each static
  group and of each frame of each dynamic group; text is never dropped.
- **Stage 3**: layers 0..M's KV cache is cut to the stage-2 set (``compress_cache``); otherwise those layers keep
  the full prompt.

Porting decisions (§1.7): a merged token sits at a representative's slot and keeps that slot's M-RoPE position
(PLLaVA renumbers its 1-D positions instead): a static token (or a static cluster) at the segment's first frame,
in its slot (the cluster centre's); a dynamic cluster at its centre's slot in its frame. Images get no stage 1 and
count as one dynamic frame in stage 2; with ``stage1`` off each temporal slice of a video is one dynamic frame.
Each image/video is reduced on its own (the reference takes one video, batch size 1). The DPC-KNN tie-breaking
noise comes from a generator seeded with ``seed`` (the reference draws from the global RNG). Stage 2's
probabilities are cast to the model's dtype before ranking, as the reference does; grid ``t`` slices with fewer
than ``k`` frames use ``k = T`` neighbours, and ``cluster_num`` is at least 1.

``keep_ratio`` is α: stage 2 keeps ``int(n·α)`` of each group of the stage-1 output, so a video keeps at most α of
its tokens (less where stage 1 merged). ``keep_ratio=1.0`` turns every stage off (the stock model, as for every
token pruner); ``stage2=false`` with ``keep_ratio < 1`` runs stage 1 alone.

Presets (``preset``; every key it sets can still be overridden, e.g. ``token_pruner.preset=aggressive
token_pruner.keep_ratio=0.3``), see :data:`PRESETS`. The seed port's README calls its higher-compression preset
"conservative"; here "conservative" keeps *more* tokens and "aggressive" fewer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import OmegaConf

from mmprune_exp.config.schema import require
from mmprune_exp.errors import ConfigError
from mmprune_exp.models.base import ModelAdapter
from mmprune_exp.models.token_reduction import ReductionContext, ReductionPoint, Selection, VisualItem
from mmprune_exp.token_pruners.base import TokenPruner, TokenPrunerConfig, register_token_pruner
from mmprune_exp.token_pruners.clustering import (
    cluster_means,
    dpc_knn,
    refine_clusters,
    segment_lengths,
    static_mask,
)

_ALL_STAGES = {"stage1": True, "stage2": True, "stage3": True}
#: what each preset sets (every other key keeps its own default)
PRESETS: dict[str, dict[str, Any]] = {
    # no pruning: the stock model, measured (the reference point of the other presets)
    "baseline": {"keep_ratio": 1.0, "tau": 0.8, "temporal_segment_ratio": 0.25, "cluster_ratio": 0.5,
                 "stage1": False, "stage2": False, "stage3": False},
    # the paper's and the reference scripts' values (scripts/eval.sh): alpha 0.4, tau 0.8, 0.25, 0.5
    "paper": {"keep_ratio": 0.4, "tau": 0.8, "temporal_segment_ratio": 0.25, "cluster_ratio": 0.5, **_ALL_STAGES},
    # keeps more: a stricter static test, shorter segments, milder spatial merging, higher alpha
    "conservative": {"keep_ratio": 0.6, "tau": 0.9, "temporal_segment_ratio": 0.5, "cluster_ratio": 0.75,
                     **_ALL_STAGES},
    # keeps fewer: a looser static test, stronger spatial merging, lower alpha
    "aggressive": {"keep_ratio": 0.25, "tau": 0.7, "temporal_segment_ratio": 0.25, "cluster_ratio": 0.35,
                   **_ALL_STAGES},
}  # fmt: skip
#: stage 1 merges a static set or a frame's dynamic set only when it has more than this many tokens (reference)
SPATIAL_MERGE_ABOVE = 14
#: the reference prunes after layer 10 of PLLaVA-7B's 32; other depths get the same fraction
PAPER_LAYER_FRACTION = 10 / 32


def _preset_value(preset: str, key: str) -> Any:
    """``${prunevid_preset:${.preset},key}`` in the yaml. An unknown preset resolves to the paper's values so that
    the schema's check of ``preset`` reports it (naming ``token_pruner.preset``)."""
    return PRESETS.get(preset, PRESETS["paper"])[key]


if not OmegaConf.has_resolver("prunevid_preset"):
    OmegaConf.register_new_resolver("prunevid_preset", _preset_value)


@dataclass
class PruneVidConfig(TokenPrunerConfig):
    """The Python defaults are the paper preset. Under Hydra the yaml fills the preset's keys from ``preset``; in
    Python ``PruneVidConfig(preset="aggressive")`` only labels the paper values, use :meth:`from_preset`."""

    name: str = "prunevid"
    preset: str = "paper"
    # α: share of each stage-1 group kept by stage 2
    keep_ratio: float = 0.4
    tau: float = 0.8  # static when the mean cosine similarity over the segment's frames is above tau (> 1: none)
    temporal_segment_ratio: float = 0.25  # temporal clusters per frame
    cluster_ratio: float = 0.5  # spatial clusters per token of a static set or a frame's dynamic set
    k: int = 7  # DPC-KNN neighbours (the reference passes 7 at every call site)
    # M: stage 2 after decoder layer M (ranked by layer M's attention); None = round(10/32 of the depth)
    layer: int | None = None
    aggregation: str = "max"  # over heads and question rows: max (reference) | mean
    stage1: bool = True
    stage2: bool = True
    stage3: bool = True  # stage 2's set in the KV cache of layers 0..M too (only with stage2)
    seed: int = 0  # DPC-KNN tie-breaking noise

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.preset in PRESETS, "preset", f"must be one of {sorted(PRESETS)}, got {self.preset!r}")
        require(0.0 < self.temporal_segment_ratio <= 1.0, "temporal_segment_ratio",
                f"must be in (0, 1], got {self.temporal_segment_ratio}")  # fmt: skip
        require(0.0 < self.cluster_ratio <= 1.0, "cluster_ratio", f"must be in (0, 1], got {self.cluster_ratio}")
        require(self.k >= 1, "k", f"must be >= 1, got {self.k}")
        require(self.layer is None or self.layer >= 0, "layer", f"must be >= 0 or null, got {self.layer}")
        require(self.aggregation in ("max", "mean"), "aggregation", f"must be max or mean, got {self.aggregation!r}")
        require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")

    @classmethod
    def from_preset(cls, preset: str, **overrides: Any) -> PruneVidConfig:
        """A preset's values with ``overrides`` on top (what the yaml's interpolations give under Hydra)."""
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        return cls(**{"preset": preset, **PRESETS[preset], **overrides})


def stage2_layer(cfg: PruneVidConfig, n_layers: int) -> int:
    """M for a decoder of ``n_layers`` layers (a point may sit after layers 0..n-2)."""
    if cfg.layer is not None:
        if cfg.layer > n_layers - 2:
            raise ConfigError(f"token_pruner.layer={cfg.layer} but the model has {n_layers} decoder layers "
                              f"(stage 2 needs a layer after M: M <= {n_layers - 2})")  # fmt: skip
        return cfg.layer
    return min(max(0, round(PAPER_LAYER_FRACTION * n_layers)), n_layers - 2)


# -- stage 1 ---------------------------------------------------------------------------------------------------


@dataclass
class Group:
    """One stage-1 output group of a video: its tokens' positions in the video's raster order (a kept token or a
    merge's representative) and, where they changed, their new vectors (fp32; None: the tokens as they were)."""

    kind: str  # "static" | "dynamic"
    frame: int  # the frame the tokens sit in (a static group: the segment's first frame)
    reps: torch.Tensor  # [n] raster indices t·L + l
    vectors: torch.Tensor | None  # [n, D]


def temporal_segments(frame_means: torch.Tensor, ratio: float, k: int, seed: int) -> list[int]:
    """Frame counts of the temporal segments, in order (sum = T)."""
    t = frame_means.shape[0]
    if t == 1:
        return [1]
    clusters = min(t, max(1, int(t * ratio)))
    assign, _ = dpc_knn(frame_means, clusters, k=k, seed=seed)
    return segment_lengths(refine_clusters(assign))


def _spatial_merge(vectors: torch.Tensor, slots: torch.Tensor, ratio: float, k: int, seed: int):
    """More than 14 tokens: DPC-KNN cluster means at the centres' slots (in cluster order, like the reference's
    output); otherwise the tokens as given. Returns (slots, vectors, merged)."""
    n = vectors.shape[0]
    if n <= SPATIAL_MERGE_ABOVE:
        return slots, vectors, False
    clusters = max(1, int(n * ratio))
    assign, centres = dpc_knn(vectors, clusters, k=k, seed=seed)
    return slots[centres], cluster_means(vectors, assign, clusters), True


def merge_video(x: torch.Tensor, tau: float, temporal_segment_ratio: float, cluster_ratio: float, k: int = 7,
                seed: int = 0) -> list[Group]:  # fmt: skip
    """Stage 1 on one video ``x`` ``[T, L, D]``: per segment its static group, then one dynamic group per frame
    (the reference's output order)."""
    _, n_slots, _ = x.shape
    xf = x.float()
    groups: list[Group] = []
    first = 0
    for width in temporal_segments(xf.mean(1), temporal_segment_ratio, k, seed):
        frames = xf[first : first + width]
        static = static_mask(frames, tau)
        static_slots = torch.nonzero(static).flatten()
        dynamic_slots = torch.nonzero(~static).flatten()
        if static_slots.numel():
            slots, vectors, _ = _spatial_merge(frames[:, static_slots].mean(0), static_slots, cluster_ratio, k, seed)
            groups.append(Group("static", first, first * n_slots + slots, vectors))
        if dynamic_slots.numel():
            for f in range(first, first + width):
                slots, vectors, merged = _spatial_merge(xf[f, dynamic_slots], dynamic_slots, cluster_ratio, k, seed)
                groups.append(Group("dynamic", f, f * n_slots + slots, vectors if merged else None))
        first += width
    return groups


def _state(ctx: ReductionContext) -> dict:
    return ctx.state.setdefault("prunevid", {})


def stage1_select(ctx: ReductionContext, cfg: PruneVidConfig) -> Selection:
    """Merge each video; record its groups (original indices of the representatives) for stage 2."""
    state = _state(ctx)
    keep, replace = [], []
    for b in range(ctx.batch_size):
        visual, rep_slots, rep_vectors = [], [], []
        for item in ctx.items[b]:
            slots = ctx.slots_of(b, item)  # before the LLM: the item's tokens in raster order
            if item.kind != "video":
                visual.append(slots)
                continue
            t, h, w = item.grid
            groups = merge_video(ctx.hidden[b, slots].view(t, h * w, -1), cfg.tau, cfg.temporal_segment_ratio,
                                 cfg.cluster_ratio, cfg.k, cfg.seed)  # fmt: skip
            origin = ctx.origin[b, slots]
            state[(b, item.kind, item.index)] = [(g.kind, g.frame, origin[g.reps]) for g in groups]
            for g in groups:
                visual.append(slots[g.reps])
                if g.vectors is not None:
                    rep_slots.append(slots[g.reps])
                    rep_vectors.append(g.vectors)
        keep.append(ctx.keep_all_but(b, torch.cat(visual) if visual else ctx.visual_slots(b)))
        replace.append((torch.cat(rep_slots), torch.cat(rep_vectors)) if rep_slots else None)
    return Selection(keep, replace)


# -- stage 2 ---------------------------------------------------------------------------------------------------


def frame_groups(item: VisualItem) -> list[tuple[str, int, torch.Tensor]]:
    """Groups of an item stage 1 did not merge: each temporal slice one dynamic frame (an image: one)."""
    t, h, w = item.grid
    return [("dynamic", f, item.start + f * h * w + torch.arange(h * w)) for f in range(t)]


def select_in_groups(score: torch.Tensor, groups: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """The top ``int(n·alpha)`` of each group (indices into ``score``), ascending."""
    kept = [g[torch.topk(score[g], int(g.numel() * alpha)).indices] for g in groups if g.numel()]
    return torch.sort(torch.cat(kept)).values if kept else torch.zeros(0, dtype=torch.long, device=score.device)


def question_scores(ctx: ReductionContext, aggregation: str) -> torch.Tensor:
    """``[B, S]``: attention each slot receives from the slots after the sample's last visual token, layer M
    without RoPE and causal mask; max (or mean) over heads and rows."""
    bsz, s = ctx.attention_mask.shape
    device = ctx.hidden.device
    rows = []
    for b in range(bsz):
        visual = ctx.visual_slots(b)
        start = int(visual.max()) + 1 if visual.numel() else s
        rows.append(torch.arange(start, s, device=device))
    width = max(1, max(r.numel() for r in rows))
    queries = torch.full((bsz, width), -1, dtype=torch.long, device=device)
    for b, r in enumerate(rows):
        queries[b, : r.numel()] = r
    # The reference ranks the probabilities cast back to the model's dtype (ties included).
    probs = ctx.attention(queries, rope=False, causal=False).to(ctx.hidden.dtype)  # [B, heads, R, S]
    if aggregation == "max":  # padding query rows are zeros: they never win a max of probabilities
        return probs.amax(dim=1).amax(dim=1)
    counts = torch.tensor([max(1, r.numel()) for r in rows], device=device, dtype=probs.dtype)
    return probs.mean(dim=1).sum(dim=1) / counts[:, None]


def stage2_select(ctx: ReductionContext, cfg: PruneVidConfig) -> Selection:
    state = _state(ctx)
    scores = question_scores(ctx, cfg.aggregation)
    keep = []
    for b in range(ctx.batch_size):
        valid = ctx.valid_slots(b)
        # original index -> current slot (the sample's last slot is text, so it has the largest original index)
        slot_of = torch.full((int(ctx.origin[b].max()) + 1,), -1, dtype=torch.long, device=valid.device)
        slot_of[ctx.origin[b, valid]] = valid
        visual = []
        for item in ctx.items[b]:
            groups = state.get((b, item.kind, item.index)) or frame_groups(item)
            slots = [slot_of[origin.to(valid.device)] for _, _, origin in groups]
            if any(bool((s < 0).any()) for s in slots):
                raise RuntimeError(f"prunevid stage 2: a token of {item.kind} {item.index} left before stage 2")
            visual.append(select_in_groups(scores[b], slots, cfg.keep_ratio))
        keep.append(ctx.keep_all_but(b, torch.cat(visual) if visual else ctx.visual_slots(b)))
    return Selection(keep)


@register_token_pruner("prunevid", schema=PruneVidConfig)
class PruneVid(TokenPruner):
    def points(self, adapter: ModelAdapter) -> list[ReductionPoint]:
        cfg: PruneVidConfig = self.cfg
        points = []
        if cfg.stage1:
            points.append(ReductionPoint(-1, lambda ctx: stage1_select(ctx, cfg), name="prunevid_stage1"))
        if cfg.stage2:
            m = stage2_layer(cfg, adapter.decoder_shape().layers)
            points.append(ReductionPoint(m, lambda ctx: stage2_select(ctx, cfg), compress_cache=cfg.stage3,
                                         name="prunevid_stage2"))  # fmt: skip
        return points
