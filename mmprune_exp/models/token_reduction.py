"""The token-reduction contract between token pruners and model adapters (no model family inside).

A token pruner describes *what* to keep as a list of :class:`ReductionPoint`: "after decoder layer L (``-1``:
before the first one), call ``select`` and keep the slots it returns". The adapter's
``token_reduction(points)`` context manager does the rest for its family: it runs the prefill layer by layer,
hands each point a :class:`ReductionContext`, removes the dropped slots from the sequence (they leave the
tensors: later layers really compute on fewer tokens), keeps every kept token's original M-RoPE position,
rebuilds the attention masks for each cache layout, optionally compresses the caches of the earlier layers, and
keeps generation consistent afterwards (decode positions continue at the original maximum position + 1). What it
measured for each sample is left in :class:`TokenRecord` rows.

Layouts: a batch is left-padded. After a reduction each sample keeps a different number of slots, so the new
sequence is left-padded again to the longest; ``origin[b, j]`` is the index in the original (processor) sequence
of slot ``j`` (``-1`` for a padding slot). Selections name slots of the *current* layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class VisualItem:
    """One image or video of one sample, in original-sequence coordinates."""

    sample: int
    kind: str  # "image" | "video"
    index: int  # its rank among the batch's items of that kind (the processor's order: grids, pixel values)
    start: int  # original index of its first token
    grid: tuple[int, int, int]  # merged token grid (t, h, w); tokens are in raster order over (t, h, w)

    @property
    def length(self) -> int:
        t, h, w = self.grid
        return t * h * w

    @property
    def stop(self) -> int:
        return self.start + self.length


@dataclass
class Selection:
    """What one reduction point keeps.

    ``keep[b]``: slots (current layout) of sample ``b`` to keep, any order (sorted by the mechanism). Padding slots
    may not be named. ``replace[b]``: optional ``(slots, vectors)``: kept slots whose hidden state is replaced
    (merged tokens: a cluster's mean sits at its representative's slot and inherits that slot's position).
    """

    keep: list[torch.Tensor]
    replace: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None


@dataclass
class ReductionPoint:
    """Reduce after decoder layer ``after_layer`` (``-1``: the LLM's input embeddings, before layer 0).

    ``compress_cache``: also cut the KV cache of layers ``<= after_layer`` down to the kept tokens (PruneVid's
    stage 3); otherwise those layers keep the full prompt in their cache and decoding attends to it there (FastV).
    ``name`` labels the point in token reports and kept-token images.
    """

    after_layer: int
    select: Callable[[ReductionContext], Selection]
    compress_cache: bool = False
    name: str = ""


@dataclass
class ReductionContext:
    """What a selection rule may read at a reduction point (one batch, current layout)."""

    point: ReductionPoint
    hidden: torch.Tensor  # [B, S, D] the sequence entering layer ``after_layer + 1``
    layer_input: torch.Tensor | None  # [B, S, D] what layer ``after_layer`` received (None before the LLM)
    position_ids: torch.Tensor  # [3, B, S] original M-RoPE positions of the current slots
    attention_mask: torch.Tensor  # [B, S] 1 = token, 0 = padding
    origin: torch.Tensor  # [B, S] original index of each slot, -1 for padding
    visual: torch.Tensor  # [B, S] bool: the slot holds a visual token (or a merge of visual tokens)
    items: list[list[VisualItem]]  # per sample, in sequence order
    state: dict[str, Any]  # shared by the points of one prefill (a method's own bookkeeping between points)
    #: ``attention(queries [B, R], rope=True, causal=True)`` -> ``[B, heads, R, S]`` fp32 probabilities of layer
    #: ``after_layer`` computed from ``layer_input`` (None before the LLM)
    attention: Callable[..., torch.Tensor] | None = None
    #: vision-tower statistics per item, keyed by ``(item.kind, item.index)``: ``score`` [length] attention each
    #: merged token receives in the last vision block, ``keys`` [length, d] (only when the pruner asked for them)
    vision: dict[tuple[str, int], dict[str, torch.Tensor]] | None = None

    @property
    def batch_size(self) -> int:
        return self.hidden.shape[0]

    def slots_of(self, b: int, item: VisualItem) -> torch.Tensor:
        """Current slots of sample ``b`` that hold tokens of ``item`` (original index inside its span), in order."""
        o = self.origin[b]
        return torch.nonzero((o >= item.start) & (o < item.stop)).flatten()

    def visual_slots(self, b: int) -> torch.Tensor:
        return torch.nonzero(self.visual[b]).flatten()

    def valid_slots(self, b: int) -> torch.Tensor:
        return torch.nonzero(self.attention_mask[b].bool()).flatten()

    def keep_all_but(self, b: int, visual_keep: torch.Tensor) -> torch.Tensor:
        """Every non-visual valid slot of sample ``b`` plus ``visual_keep`` (visual slots)."""
        text = torch.nonzero(self.attention_mask[b].bool() & ~self.visual[b]).flatten()
        return torch.cat([text, visual_keep.to(text.device)])


@dataclass
class TokenRecord:
    """What one sample's prefill did (filled by the adapter's mechanism)."""

    visual_before: int = 0
    visual_kept: int = 0
    tokens_before: int = 0  # prompt tokens (valid, no padding)
    tokens_per_layer: list[int] = field(default_factory=list)  # tokens each decoder layer computed on
    kept_by_point: dict[str, list[int]] = field(default_factory=dict)  # point name -> original indices kept there
    kv_cache_tokens: int = 0  # prompt entries summed over layers' caches after prefill
    items: list[VisualItem] = field(default_factory=list)

    @property
    def kept_ratio(self) -> float:
        return self.visual_kept / self.visual_before if self.visual_before else 1.0


@dataclass(frozen=True)
class DecoderShape:
    """The language decoder's sizes (for analytic FLOPs and KV-cache bytes)."""

    layers: int
    hidden: int  # d
    kv_dim: int  # key/value heads x head_dim
    intermediate: int  # MLP width m
    dtype_bytes: int

    def layer_flops(self, n: int) -> int:
        """Prefill FLOPs of one decoder layer on ``n`` tokens (multiply-add = 2): q and o projections
        ``2·2nd²``, k and v ``2·2n·d·kv``, scores and weighted values ``2·2n²d`` (the full square, as FastV's
        ``4nd² + 2n²d + 2ndm`` counts it), gated MLP ``2·3ndm``."""
        d = self.hidden
        return 4 * n * d * d + 4 * n * d * self.kv_dim + 4 * n * n * d + 6 * n * d * self.intermediate

    def kv_bytes(self, entries: int) -> int:
        """Bytes of ``entries`` cached tokens summed over layers (one key and one value vector each)."""
        return entries * 2 * self.kv_dim * self.dtype_bytes


def left_pad_layout(keep: list[torch.Tensor], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather index ``[B, K]`` and validity ``[B, K]`` for kept slots, left-padded to the longest sample.

    Padding slots point at the sample's first kept slot (any real slot works: they are masked), so gathered
    values stay finite. ``length`` is the current sequence length (for the bounds check).
    """
    if not keep:
        raise ValueError("empty batch")
    widest = max(int(k.numel()) for k in keep)
    device = keep[0].device
    index = torch.zeros(len(keep), widest, dtype=torch.long, device=device)
    valid = torch.zeros(len(keep), widest, dtype=torch.bool, device=device)
    for b, k in enumerate(keep):
        k = torch.sort(torch.as_tensor(k, dtype=torch.long, device=device)).values
        if k.numel() == 0:
            raise ValueError(f"sample {b}: a selection must keep at least one slot")
        if int(k.min()) < 0 or int(k.max()) >= length:
            raise ValueError(f"sample {b}: selected slot out of range 0..{length - 1}")
        if torch.unique(k).numel() != k.numel():
            raise ValueError(f"sample {b}: a slot is selected twice")
        pad = widest - k.numel()
        index[b, :pad] = k[0]
        index[b, pad:] = k
        valid[b, pad:] = True
    return index, valid


def gather_seq(t: torch.Tensor, index: torch.Tensor, batch_dim: int, seq_dim: int) -> torch.Tensor:
    """``t`` gathered along ``seq_dim`` with a per-sample index ``[B, K]`` (``B`` lies on ``batch_dim``)."""
    view = [1] * t.dim()
    view[batch_dim], view[seq_dim] = index.shape
    shape = list(t.shape)
    shape[seq_dim] = index.shape[1]
    return torch.gather(t, seq_dim, index.view(view).expand(shape))
