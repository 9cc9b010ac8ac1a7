"""YOPO (Zhang et al., "Treat Visual Tokens as Text? But Your MLLM Only Needs Fewer Efforts to See", arXiv
2410.06169, ``ZhangAIPI/YOPO_MLLM_Pruning``): keep every visual token, but spend less computation on it.

Four strategies, each switchable and each with its own budget (reference/token_pruners.md §3):

1. **Neighbour-only visual attention** (``window``, ``window_size`` w): a visual query attends to the visual
   tokens of its own image/video within ``(w-1)//2`` cells on each grid axis and to the text before it. The
   reference (LLaVA ``local_mask``, w=5) *replaces* the causal visual block with the window mask, so a visual token
   sees its later neighbours too; ``window_causal=true`` keeps the causal order instead. The reference's images
   are a single 24x24 grid; here each image/video has its own window (t, h, w), and visual tokens of other items
   are out of reach.
2. **Visual attention-head dropping** (``heads``): per layer, the heads in which visual queries are computed,
   from a head mask calibrated on the calibration set (:func:`calibrate`): per sample, layer and head the share
   ``r = Σ attention to visual keys / Σ attention to the other keys`` over every query row (the reference's
   ``gen_mask_llava.py`` ratio); each sample votes for the heads with ``r > head_threshold`` (the reference's
   rule) or, by default, for its ``head_keep`` share (default: ``keep_ratio``) of heads with the highest ``r`` in
   each layer (a per-layer budget); a head is kept when more than ``head_vote`` of the samples vote for it
   (threshold rule), or the budget's heads with the most votes are kept (budget rule: exactly that many per layer,
   ties by mean ``r``). Layers before ``head_first_layer`` (2, the reference's) keep every head. The mask is
   written to ``<run dir>/yopo_head_mask.pt`` (+ ``.json``) and reused with ``token_pruner.head_mask=PATH``.
   ``head_scope``: ``visual_queries`` (default) skips a dropped head's computation for visual queries only, so
   the text queries of that layer are computed as before; ``reference`` also zeroes, in dropped heads, every
   text query's probabilities toward visual keys after the softmax without renormalising, at prefill and at
   decode: what the released LLaVA code does (its Qwen2-VL file zeroes those probabilities for every query but
   does not zero the visual rows' outputs).
3. **Sparse visual FFN** (``ffn``, ``ffn_keep``, default ``keep_ratio``): visual tokens use ``int(m·ffn_keep)``
   of the MLP's m neurons (the reference's ``mlpcut_ratio=2`` is ``ffn_keep=0.5``). ``ffn_rank=activation``
   (default) keeps, per layer, the neurons with the largest ``mean|a_j| · ||W_down[:, j]||`` over the calibration
   set's visual tokens, where ``a_j = act(gate_j)·up_j``: neuron j adds ``a_j·W_down[:, j]`` to a visual token, so
   this is the mean size of what skipping it removes, and the neurons whose removal disturbs visual hidden states
   least go first (Wanda's weight-times-activation idea at neuron granularity). ``ffn_rank=index`` keeps the first
   ones, as the reference does (there a fine-tuning adapts the model to that choice; training-free it is an
   arbitrary subset). The ranking is written to ``<run dir>/yopo_ffn_rank.pt`` and reused with
   ``ffn_rank_file=PATH``.
4. **Visual-token drop in the last L layers** (``layer_drop``, ``drop_layers`` L): the visual tokens leave the
   sequence before layer ``n-L`` (a reduction point that keeps only text); the reference masks every query's
   attention to visual keys there instead (Qwen2-VL: layers 24..27 of 28; ``drop_layers: null`` takes the same
   4/28 of the depth). Layers before keep the visual tokens in their cache, as in the reference.

Strategies 1-3 are layer plans carried out by the adapter's mechanism: the skipped heads, keys and neurons are not
computed (the released code only masks, with no saving); their FLOPs reach the token report through the per-layer
work records (``flops_ratio``, and ``visual_flops_ratio``: the FLOPs spent on visual tokens, YOPO's measure).
``keep_ratio``, the one budget every token pruner sweeps, is here the share of heads (``head_keep``) and of MLP
neurons (``ffn_keep``) that visual tokens keep wherever those two are not set themselves; YOPO keeps every visual
token until the last layers. As for every token pruner, ``keep_ratio=1.0`` is the stock model (every strategy off),
and so is every strategy switched off.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from mmprune_exp.config.schema import require
from mmprune_exp.errors import ConfigError
from mmprune_exp.models.base import ModelAdapter, Request
from mmprune_exp.models.token_reduction import LayerObservation, LayerPlan, ReductionContext, ReductionPoint, Selection
from mmprune_exp.token_pruners.base import TokenPruner, TokenPrunerConfig, register_token_pruner

if TYPE_CHECKING:
    from mmprune_exp.calibration import CalibrationData

log = logging.getLogger(__name__)

HEAD_MASK_FILE = "yopo_head_mask.pt"
FFN_RANK_FILE = "yopo_ffn_rank.pt"
#: the Qwen2-VL reference cuts visual computation from layer 24 of 28: the last 4/28 of the depth
REFERENCE_DROP_FRACTION = 4 / 28
#: calibration computes the attention of this many query rows at a time (memory: heads x rows x sequence)
QUERY_CHUNK = 512


@dataclass
class YopoConfig(TokenPrunerConfig):
    name: str = "yopo"
    keep_ratio: float = 0.5  # 1.0: the stock model; otherwise the default of head_keep and ffn_keep
    # (1) neighbour-only visual-to-visual attention
    window: bool = False
    window_size: int = 5
    window_causal: bool = False
    # (2) visual attention heads from a calibrated head mask
    heads: bool = True
    head_keep: float | None = None  # per-layer budget: share of heads each sample votes for (null: keep_ratio)
    head_threshold: float | None = None  # threshold rule: a sample votes for the heads with r > threshold
    head_vote: float = 0.5  # threshold rule: kept when more than this share of the samples vote for it
    head_first_layer: int = 2
    head_scope: str = "visual_queries"  # visual_queries | reference
    head_mask: str | None = None  # a saved head mask to reuse instead of calibrating
    # (3) sparse visual FFN
    ffn: bool = False
    ffn_keep: float | None = None  # share of MLP neurons for visual tokens (null: keep_ratio)
    ffn_rank: str = "activation"  # activation | index
    ffn_rank_file: str | None = None
    # (4) visual tokens leave the last L layers
    layer_drop: bool = True
    drop_layers: int | None = None  # null: round(depth · 4/28), at least 1

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.window_size >= 1, "window_size", f"must be >= 1, got {self.window_size}")
        require(self.head_keep is None or 0.0 <= self.head_keep <= 1.0, "head_keep",
                f"must be in [0, 1], got {self.head_keep}")  # fmt: skip
        require(self.head_threshold is None or self.head_threshold >= 0, "head_threshold",
                f"must be >= 0, got {self.head_threshold}")  # fmt: skip
        require(0.0 <= self.head_vote < 1.0, "head_vote", f"must be in [0, 1), got {self.head_vote}")
        require(self.head_first_layer >= 0, "head_first_layer", f"must be >= 0, got {self.head_first_layer}")
        require(self.head_scope in ("visual_queries", "reference"), "head_scope",
                f"got {self.head_scope!r}; use visual_queries or reference")  # fmt: skip
        require(self.ffn_keep is None or 0.0 < self.ffn_keep <= 1.0, "ffn_keep",
                f"must be in (0, 1], got {self.ffn_keep}")  # fmt: skip
        require(self.ffn_rank in ("activation", "index"), "ffn_rank", f"got {self.ffn_rank!r}; use activation or index")
        require(self.drop_layers is None or self.drop_layers >= 1, "drop_layers", f"must be >= 1, got {self.drop_layers}")

    @property
    def head_share(self) -> float:
        return self.keep_ratio if self.head_keep is None else self.head_keep

    @property
    def neuron_share(self) -> float:
        return self.keep_ratio if self.ffn_keep is None else self.ffn_keep


# -- calibration -------------------------------------------------------------------------------------


@dataclass
class Calibration:
    """What one pass over the calibration set measured (CPU tensors)."""

    ratios: torch.Tensor  # [samples, layers, heads] float64: attention to visual keys / to the other keys
    activations: torch.Tensor | None  # [layers, m] float64: mean |act(gate)·up| over the visual tokens
    samples: int
    visual_tokens: int


@torch.no_grad()
def calibrate(adapter: ModelAdapter, requests: list[Request], max_length: int, mlp: bool = False) -> Calibration:
    """Per calibration sample, layer and head: ``Σ_q Σ_{k visual} A / Σ_q Σ_{k other} A`` over every query row of the
    prompt (causal softmax attention with RoPE, the model's own); with ``mlp`` also the mean absolute MLP
    activation of every neuron over all visual tokens. One sample at a time, in order, through the stock forward
    (observed, not changed): the result depends on the calibration set only."""
    from mmprune_exp.pruners.engine import _truncate

    n_layers = adapter.decoder_shape().layers
    ratios: list[torch.Tensor] = []
    act_sum: torch.Tensor | None = None
    visual_total = 0
    current: dict[int, torch.Tensor] = {}

    def probe(obs: LayerObservation) -> None:
        nonlocal act_sum
        valid = obs.attention_mask[0].bool()  # a batch of one, no padding: every query row is real
        visual = obs.visual[0] & valid
        rows = torch.nonzero(valid).flatten()
        to_visual = to_other = 0.0
        for c in range(0, rows.numel(), QUERY_CHUNK):  # [heads, chunk, S] at a time, not [heads, S, S]
            probs = obs.attention(rows[None, c : c + QUERY_CHUNK], rope=True, causal=True)[0]  # fp32
            to_visual = to_visual + probs[:, :, visual].sum((1, 2)).double()
            to_other = to_other + probs[:, :, valid & ~visual].sum((1, 2)).double()
        current[obs.layer] = (to_visual / to_other).cpu()
        if mlp:
            a = obs.mlp_activations[0][visual].abs().double().sum(0).cpu()
            if act_sum is None:
                act_sum = torch.zeros(n_layers, a.numel(), dtype=torch.float64)
            act_sum[obs.layer] += a

    plans = {i: LayerPlan(probe=probe, probe_mlp=mlp) for i in range(n_layers)}
    with adapter.token_reduction([], plans=plans):
        for index, request in enumerate(tqdm(requests, desc="yopo calibration", unit="sample")):
            batch = adapter.encode([request])
            visual = adapter.modality_mask(batch["input_ids"])[0]
            batch = _truncate(batch, max_length, visual, index)
            n_visual = int(visual[: batch["input_ids"].shape[1]].sum())
            if n_visual == 0:  # a text-only sample says nothing about visual heads or visual neurons
                continue
            current.clear()
            adapter.model(**batch, use_cache=False)
            ratios.append(torch.stack([current[i] for i in range(n_layers)]))
            visual_total += n_visual
    if not ratios:
        raise ConfigError("token_pruner=yopo: no calibration sample has an image or a video; use a calibration set "
                          "with visual inputs (e.g. calibration=shapes)")  # fmt: skip
    activations = act_sum / visual_total if act_sum is not None else None
    return Calibration(torch.stack(ratios), activations, len(ratios), visual_total)


def head_mask_from_ratios(ratios: torch.Tensor, cfg: YopoConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept-head mask ``[layers, heads]`` and the votes behind it, from per-sample ratios ``[N, layers, heads]``
    (see the module docstring; layers before ``head_first_layer`` keep every head)."""
    n, layers, heads = ratios.shape
    if cfg.head_threshold is not None:
        votes = (ratios > cfg.head_threshold).sum(0)
        mask = votes > cfg.head_vote * n
    else:
        k = round(cfg.head_share * heads)
        top = torch.topk(ratios, k, dim=-1).indices if k else torch.empty(n, layers, 0, dtype=torch.long)
        votes = torch.zeros(n, layers, heads, dtype=torch.long).scatter_(-1, top, 1).sum(0)
        mean = ratios.mean(0)
        mask = torch.zeros(layers, heads, dtype=torch.bool)
        for layer in range(layers):
            # most votes first, then the larger mean ratio, then the lower index (a stable sort keeps index order)
            order = sorted(range(heads), key=lambda h: (-int(votes[layer, h]), -float(mean[layer, h])))
            mask[layer, order[:k]] = True
    mask[: cfg.head_first_layer] = True
    return mask, votes


def neuron_importance(adapter: ModelAdapter, activations: torch.Tensor) -> torch.Tensor:
    """``mean|a_j| · ||W_down[:, j]||₂`` per layer and neuron ``[layers, m]`` (the size of what neuron j adds)."""
    norms = torch.stack([layer.mlp.down_proj.weight.detach().float().norm(dim=0).cpu().double()
                         for layer in adapter.decoder_layers()])  # fmt: skip
    return activations * norms


def load_head_mask(path: str | Path, layers: int, heads: int) -> torch.Tensor:
    """A head mask ``[layers, heads]`` bool from a file this method wrote (``.pt`` dict or ``.json``), a bare
    tensor (``.pt``/``.pth``, the Qwen2-VL reference's format) or a NumPy array (``.npy``, the LLaVA masks)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"token_pruner.head_mask={str(path)!r} does not exist")
    if path.suffix == ".json":
        data: Any = json.loads(path.read_text())
        mask = torch.tensor(data["mask"] if isinstance(data, dict) else data)
    elif path.suffix == ".npy":
        import numpy as np

        mask = torch.from_numpy(np.load(path))
    else:
        data = torch.load(path, map_location="cpu", weights_only=True)
        mask = data["mask"] if isinstance(data, dict) else data
    mask = mask.bool()
    if tuple(mask.shape) != (layers, heads):
        raise ConfigError(f"token_pruner.head_mask={str(path)!r} has shape {tuple(mask.shape)}, but the model has "
                          f"{layers} decoder layers of {heads} heads")  # fmt: skip
    return mask


def load_ffn_rank(path: str | Path, layers: int, neurons: int) -> torch.Tensor:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"token_pruner.ffn_rank_file={str(path)!r} does not exist")
    data = torch.load(path, map_location="cpu", weights_only=True)
    importance = data["importance"] if isinstance(data, dict) else data
    if tuple(importance.shape) != (layers, neurons):
        raise ConfigError(f"token_pruner.ffn_rank_file={str(path)!r} has shape {tuple(importance.shape)}, but the "
                          f"model has {layers} decoder layers of {neurons} MLP neurons")  # fmt: skip
    return importance.double()


# -- the method ----------------------------------------------------------------------------------------


def keep_text_only(ctx: ReductionContext) -> Selection:
    """Strategy 4: every visual token leaves the sequence (text is always kept)."""
    return Selection([ctx.keep_all_but(b, ctx.visual_slots(b)[:0]) for b in range(ctx.batch_size)])


@register_token_pruner("yopo", schema=YopoConfig)
class Yopo(TokenPruner):

    def __init__(self, cfg: YopoConfig):
        super().__init__(cfg)
        self.head_mask: torch.Tensor | None = None  # [layers, heads] bool, kept heads
        self.neuron_importance: torch.Tensor | None = None  # [layers, m]

    @property
    def needs_calibration(self) -> bool:  # type: ignore[override]
        cfg: YopoConfig = self.cfg
        if cfg.keep_ratio == 1.0:  # the stock model: nothing to calibrate
            return False
        return (cfg.heads and cfg.head_mask is None) or (
            cfg.ffn and cfg.ffn_rank == "activation" and cfg.ffn_rank_file is None
        )

    # -- budgets --------------------------------------------------------------------------------------
    def drop_layers(self, n_layers: int) -> int:
        cfg: YopoConfig = self.cfg
        if not cfg.layer_drop:
            return 0
        drop = cfg.drop_layers if cfg.drop_layers is not None else max(1, round(n_layers * REFERENCE_DROP_FRACTION))
        if drop > n_layers:
            raise ConfigError(f"token_pruner.drop_layers={drop} but the model has {n_layers} decoder layers")
        return drop

    def points(self, adapter: ModelAdapter) -> list[ReductionPoint]:
        n = adapter.decoder_shape().layers
        drop = self.drop_layers(n)
        return [ReductionPoint(n - drop - 1, keep_text_only, name="yopo_layer_drop")] if drop else []

    def layer_plans(self, adapter: ModelAdapter) -> dict[int, LayerPlan]:
        cfg: YopoConfig = self.cfg
        shape = adapter.decoder_shape()
        self._load_given(adapter)
        if cfg.heads and self.head_mask is None:
            raise ConfigError("token_pruner=yopo with heads=true has no head mask: give token_pruner.head_mask=PATH "
                              "or call prepare() with a calibration set first")  # fmt: skip
        neurons = None
        if cfg.ffn:
            keep = max(1, int(shape.intermediate * cfg.neuron_share))  # the reference's int(m / mlpcut_ratio)
            if cfg.ffn_rank == "index":
                neurons = torch.arange(keep).expand(shape.layers, keep)
            else:
                if self.neuron_importance is None:
                    raise ConfigError("token_pruner=yopo with ffn_rank=activation has no neuron ranking: give "
                                      "token_pruner.ffn_rank_file=PATH or call prepare() first")  # fmt: skip
                # ascending neuron order: the kept rows stay in the weights' own order
                neurons = torch.sort(torch.topk(self.neuron_importance, keep, dim=1).indices, dim=1).values
        device = adapter.device
        plans = {}
        for i in range(shape.layers - self.drop_layers(shape.layers)):  # later layers hold no visual token
            plan = LayerPlan()
            if cfg.window:
                plan.visual_window, plan.visual_window_causal = cfg.window_size, cfg.window_causal
            if cfg.heads and not bool(self.head_mask[i].all()):
                plan.visual_heads = self.head_mask[i].to(device)
                plan.zero_visual_keys = cfg.head_scope == "reference"
            if neurons is not None and keep < shape.intermediate:
                plan.visual_neurons = neurons[i].contiguous().to(device)
            if plan.changes_compute:
                plans[i] = plan
        return plans

    # -- calibration and artifacts ----------------------------------------------------------------------
    def _load_given(self, adapter: ModelAdapter) -> None:
        cfg: YopoConfig = self.cfg
        shape = adapter.decoder_shape()
        if cfg.heads and self.head_mask is None and cfg.head_mask is not None:
            heads = adapter.model.config.get_text_config().num_attention_heads
            self.head_mask = load_head_mask(cfg.head_mask, shape.layers, heads)
            log.info("yopo: head mask from %s (%d of %d heads kept)", cfg.head_mask, int(self.head_mask.sum()),
                     self.head_mask.numel())  # fmt: skip
        if cfg.ffn and cfg.ffn_rank == "activation" and self.neuron_importance is None and cfg.ffn_rank_file:
            self.neuron_importance = load_ffn_rank(cfg.ffn_rank_file, shape.layers, shape.intermediate)

    def prepare(self, adapter: ModelAdapter, calibration: CalibrationData | None, run_dir: Path | None) -> None:
        """Load the given head mask / neuron ranking, calibrate what is missing on ``calibration``, and write both
        to ``run_dir`` (``yopo_head_mask.pt`` + ``.json``, ``yopo_ffn_rank.pt``)."""
        cfg: YopoConfig = self.cfg
        if cfg.keep_ratio == 1.0:  # the stock model is evaluated: nothing to prepare
            return
        self._load_given(adapter)
        want_heads = cfg.heads and self.head_mask is None
        want_mlp = cfg.ffn and cfg.ffn_rank == "activation" and self.neuron_importance is None
        cal = None
        if want_heads or want_mlp:
            if calibration is None:
                raise ConfigError("token_pruner=yopo needs the calibration set (head mask / neuron ranking), but "
                                  "none was built")  # fmt: skip
            cal = calibrate(adapter, calibration.requests, calibration.max_length, mlp=want_mlp)
            meta = {"calibration": calibration.name, "samples": cal.samples, "visual_tokens": cal.visual_tokens}
        if want_heads:
            self.head_mask, votes = head_mask_from_ratios(cal.ratios, cfg)
            kept = self.head_mask.sum(1).tolist()
            log.info("yopo: head mask from %d calibration samples, heads kept per layer %s", cal.samples, kept)
            self._save_head_mask(run_dir, cal.ratios, votes, meta)
        elif cfg.heads:
            self._save_head_mask(run_dir, None, None, {"source": str(cfg.head_mask)})
        if want_mlp:
            self.neuron_importance = neuron_importance(adapter, cal.activations)
        if cfg.ffn and cfg.ffn_rank == "activation" and run_dir is not None:
            torch.save({"importance": self.neuron_importance, "rank": "mean|act(gate)*up| * ||W_down[:, j]||",
                        **(meta if want_mlp else {"source": str(cfg.ffn_rank_file)})}, Path(run_dir) / FFN_RANK_FILE)

    def _save_head_mask(self, run_dir: Path | None, ratios, votes, meta: dict) -> None:
        if run_dir is None:
            return
        cfg: YopoConfig = self.cfg
        rule = {"head_threshold": cfg.head_threshold, "head_vote": cfg.head_vote} if cfg.head_threshold is not None \
            else {"head_keep": cfg.head_share}  # fmt: skip
        rule["head_first_layer"] = cfg.head_first_layer
        data: dict[str, Any] = {"mask": self.head_mask, "rule": rule, **meta}
        if ratios is not None:
            data |= {"ratios": ratios, "votes": votes}
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        torch.save(data, run_dir / HEAD_MASK_FILE)
        summary = {
            "mask": self.head_mask.int().tolist(),
            "kept_per_layer": self.head_mask.sum(1).tolist(),
            "rule": rule,
            **meta,
        }
        if ratios is not None:
            summary |= {"mean_ratio": ratios.mean(0).tolist(), "votes": votes.tolist()}
        # one key per line, each value on one line: a [layers, heads] table stays readable
        text = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in summary.items())
        (run_dir / HEAD_MASK_FILE).with_suffix(".json").write_text("{\n" + text + "\n}\n")
