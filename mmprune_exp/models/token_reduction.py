"""The token-reduction contract between token pruners and model adapters (no model family inside).

A token pruner describes *what* to keep as a list of :class:`ReductionPoint`: "after decoder layer L (``-1``:
before the first one), call ``select`` and keep the slots it returns". The adapter's
``token_reduction(points)`` context manager does the rest for its family: it runs the prefill layer by layer,
hands each point a :class:`ReductionContext`, removes the dropped slots from the sequence (they leave the
tensors: later layers really compute on fewer tokens), keeps every kept token's original M-RoPE position,
rebuilds the attention masks for each cache layout, optionally compresses the caches of the earlier layers, and
keeps generation consistent afterwards (decode positions continue at the original maximum position + 1). What it
measured for each sample is left in :class:`TokenRecord` rows.

Besides dropping tokens, a pruner may change what each decoder layer *computes* for the visual tokens it keeps
(YOPO): a :class:`LayerPlan` per layer asks for neighbour-only visual-to-visual attention, a subset of attention
heads for visual queries, a subset of MLP neurons for visual tokens, or just observes the layer (calibration
statistics). The adapter computes only what is asked for (the skipped heads and neurons are not computed, not
masked) and records each layer's work as a :class:`LayerWork`, from which the analytic FLOPs follow
(:meth:`DecoderShape.work_flops`). A layer without a plan, or whose plan changes nothing, is the stock layer call.

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

    point: ReductionPoint | None  # None in a LayerObservation (a probe, not a reduction point)
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
class LayerObservation(ReductionContext):
    """What a :attr:`LayerPlan.probe` sees of decoder layer ``layer`` at prefill (``point`` is None).

    ``hidden`` and ``layer_input`` are the layer's input and ``attention`` is this layer's; ``output`` is what the
    layer returned; ``mlp_activations`` ``[B, S, m]`` is the input of its MLP down projection (``act(gate)·up``),
    only when the plan set ``probe_mlp``.
    """

    layer: int = 0
    output: torch.Tensor | None = None
    mlp_activations: torch.Tensor | None = None


@dataclass
class LayerPlan:
    """What one decoder layer computes for the visual tokens during prefill (every field at its default: stock).

    - ``visual_window`` (w): a visual query attends to the visual keys of its own image/video within
      ``(w-1)//2`` cells on every grid axis (t, h, w), in both directions (YOPO's local mask replaces the causal
      visual block), and to the text keys before it as usual; other visual keys are not computed.
      ``visual_window_causal`` keeps the causal order inside the window (only the neighbours before the query).
    - ``visual_heads`` ``[heads]`` bool: the attention heads visual queries are computed in; in the others a
      visual token's attention output is zero (its query, scores, weighted values and output-projection columns
      are skipped). Text queries keep every head.
    - ``zero_visual_keys``: also, in the heads not in ``visual_heads``, every query's probabilities toward visual
      keys are set to zero after the softmax, without renormalising, at prefill and at every decode step (what
      the released YOPO code simulates for all queries).
    - ``visual_neurons`` ``[m']`` long: the MLP neurons (rows of gate/up, columns of down) computed for visual
      tokens; the others contribute nothing to them. Text tokens use every neuron.
    - ``probe``: called after the layer with a :class:`LayerObservation` (statistics; the computation is
      unchanged); ``probe_mlp`` also captures the MLP activations for it.
    """

    visual_window: int | None = None
    visual_window_causal: bool = False
    visual_heads: torch.Tensor | None = None
    zero_visual_keys: bool = False
    visual_neurons: torch.Tensor | None = None
    probe: Callable[[LayerObservation], None] | None = None
    probe_mlp: bool = False

    @property
    def changes_compute(self) -> bool:
        return self.visual_window is not None or self.visual_heads is not None or self.visual_neurons is not None


@dataclass(frozen=True)
class LayerWork:
    """What one decoder layer computed for one sample at prefill (the analytic FLOPs' input).

    ``tokens`` slots, ``visual`` of them visual tokens. For the visual queries: ``visual_head_share`` of the
    heads, ``visual_keys`` keys per query on average (None: all ``tokens``, the stock full-square count);
    ``visual_neuron_share`` of the MLP neurons for visual tokens.
    """

    tokens: int
    visual: int = 0
    visual_head_share: float = 1.0
    visual_keys: float | None = None
    visual_neuron_share: float = 1.0

    @property
    def stock(self) -> bool:
        return self.visual_head_share == 1.0 and self.visual_keys is None and self.visual_neuron_share == 1.0


@dataclass
class TokenRecord:
    """What one sample's prefill did (filled by the adapter's mechanism)."""

    visual_before: int = 0
    visual_kept: int = 0
    tokens_before: int = 0  # prompt tokens (valid, no padding)
    tokens_per_layer: list[int] = field(default_factory=list)  # tokens each decoder layer computed on
    layer_work: list[LayerWork] = field(default_factory=list)  # per decoder layer: what it computed
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

    def work_flops(self, work: LayerWork) -> float:
        """Prefill FLOPs of one layer that computed ``work``: :meth:`layer_flops` with the visual queries' q/o
        projections, scores and weighted values in ``visual_head_share`` of the heads over ``visual_keys`` keys,
        and their MLP in ``visual_neuron_share`` of the neurons (k/v projections are computed for every token:
        text queries read the visual keys). Equals ``layer_flops(tokens)`` for stock work."""
        if work.stock or work.visual == 0:
            return float(self.layer_flops(work.tokens))
        n, v = work.tokens, work.visual
        return 4 * n * self.hidden * self.kv_dim + self._query_side(n - v, n) + self._query_side(v, n, work)

    def visual_flops(self, work: LayerWork) -> float:
        """The part of :meth:`work_flops` spent on visual tokens: their k/v projections, their queries (q/o
        projections, scores, weighted values) and their MLP (YOPO's "visual computation")."""
        v = work.visual
        return 4 * v * self.hidden * self.kv_dim + self._query_side(v, work.tokens, None if work.stock else work)

    def _query_side(self, rows: int, n: int, work: LayerWork | None = None) -> float:
        d, m = self.hidden, self.intermediate
        heads = work.visual_head_share if work else 1.0
        keys = work.visual_keys if work and work.visual_keys is not None else n
        neurons = work.visual_neuron_share if work else 1.0
        return rows * (4 * d * d * heads + 4 * d * keys * heads + 6 * d * m * neurons)

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
