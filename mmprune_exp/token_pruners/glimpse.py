"""GlimpsePrune (arXiv 2508.01548, ``HVision-NKU/GlimpsePrune``): a learned glimpse token looks at the image at
decoder layer K, a small visual importance predictor (VIP) turns its attention logits and several vision-tower
layers into one logit per visual token, and the tokens with ``σ(logit) > threshold`` stay (a dynamic count per image
and question). Reference facts: reference/token_pruners.md §2.3-§2.8.

What carries over from the reference:

- the glimpse embedding of layer ℓ is ``dropout(RMSNorm(le_proj(E[ℓ])))``; it enters layer 0 as an extra token
  *after the last prompt token*, at M-RoPE position ``last + 1`` on all three axes, and is *added* to that token's
  hidden state before every later layer up to K (§2.3, deep-prompt style);
- layer K's raw attention logits of the glimpse query against the image keys (after M-RoPE, ``q·k/√d``, every
  head, no mask, no softmax; §2.4) are the VIP's attention features;
- the VIP is ``AttnFuserV1`` (§2.5): ``Linear(heads → fuse)``, then one block per selected vision-tower layer
  (that layer's hidden states averaged over each 2x2 merge group, projected to ``cond``): conditional attention
  ``q, k = Linear([x ‖ c])``, ``v = Linear(x)`` with a 2-D RoPE over the (h, w) grid, restricted to the image, then a
  SiLU-gated MLP with bias, each pre-RMSNorm and residual; ``Linear(fuse → 1)`` at the end;
- the keep rule (§2.6): ``σ > threshold``; if a cap is set and more than ``cap`` of the image's tokens pass, the top
  ``⌊cap·N⌋`` by probability; at least ``min_keep``; text always kept;
- the reduction happens after layer K: layers 0..K run on every token, the later ones and decoding on the kept set,
  kept tokens keep their original positions (§2.7; the adapter's mechanism does this for every token pruner).

Design choice vs the reference: the glimpse token never enters the model's sequence. It is the last token, so no
prompt token attends to it (causal mask) and the reference crops it before reducing (§2.7): its presence changes
nothing but its own hidden state. Here that hidden state is computed *beside* the prefill: after each decoder layer
ℓ < K a probe (a :class:`LayerPlan` that observes only) takes layer ℓ's input, recomputes that layer's keys and values
for the real tokens and advances the glimpse token through layer ℓ (its query over the real keys and itself, the
layer's MLP); at the point after layer K its layer-K query is scored against layer K's keys. The arithmetic is the
reference's (up to float rounding of the separate matmuls), the prompt's own computation is untouched (so with every
token kept the logits are bitwise the stock model's), and nothing has to be cropped from caches or masks. Cost:
re-projecting keys and values in layers 0..K (GQA: ``2·kv/d`` of a layer's q/k/v/o work), not the whole layer;
the token report counts it (:class:`GlimpseSession`).

Not carried over: the training's next-token loss on the answer with the glimpse token inserted in the sequence
(§2.8 ``le_weight``) — it teaches the answer tokens to tolerate a glimpse token placed before them during training,
which never happens here (the glimpse token is never in the sequence); the training loss is the localisation loss
(Dice + 0.1·BCE) alone. Videos keep all their tokens (the reference prunes images only, §2.7).

``token_pruner.keep_ratio`` is the cap (the reference's ``max_remain_ratio``; 1.0 = no cap, the threshold alone
decides). Unlike the fixed-budget methods, GlimpsePrune therefore prunes at ``keep_ratio=1.0`` too; ``threshold=0``
keeps every token.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Self

import torch
import torch.nn.functional as F
from torch import nn

from mmprune_exp.config.schema import require
from mmprune_exp.errors import ConfigError
from mmprune_exp.models.attention_prior import rotate_half
from mmprune_exp.models.base import ModelAdapter
from mmprune_exp.models.token_reduction import (
    LayerObservation,
    LayerPlan,
    ReductionContext,
    ReductionPoint,
    Selection,
)
from mmprune_exp.token_pruners.base import TokenPruner, TokenPrunerConfig, TokenSession, register_token_pruner

MODULE_DIR = "glimpse"  # the trained module's default folder, beside the model's weights
STATE_FILE = "glimpse.pt"
CONFIG_FILE = "glimpse.json"


# -- the module -------------------------------------------------------------------------------------------------


@dataclass
class GlimpseModuleConfig:
    """Sizes of a glimpse module and where in the model it reads (saved with its weights)."""

    layer: int  # K: the glimpse query's attention logits come from decoder layer K; tokens are dropped after it
    vision_layers: list[int]  # vision-tower blocks whose outputs condition the VIP (the reference's [31, 23, 15, 7])
    text_hidden: int
    text_heads: int
    vision_hidden: int
    fuse_size: int = 64  # the reference's 256 (for a 3584-wide model); the tiny model is 128 wide
    cond_size: int = 64  # the reference's 512
    fuse_heads: int = 4
    dropout: float = 0.1  # on the glimpse embeddings, training only (§2.3)

    def __post_init__(self) -> None:
        if (self.fuse_size + self.cond_size) % (4 * self.fuse_heads) or self.fuse_size % self.fuse_heads:
            raise ConfigError(f"glimpse module: fuse_size + cond_size ({self.fuse_size + self.cond_size}) must be a "
                              f"multiple of 4·fuse_heads and fuse_size of fuse_heads (2-D RoPE halves per head)")  # fmt: skip
        if not self.vision_layers:
            raise ConfigError("glimpse module: vision_layers must name at least one vision-tower block")

    @classmethod
    def for_model(cls, adapter: ModelAdapter, layer: int | None = None, vision_layers: list[int] | None = None,
                  **sizes) -> GlimpseModuleConfig:  # fmt: skip
        """The reference's choices scaled to ``adapter``'s depth: K at 18/28 of the decoder (3B: 23/36) but at most
        the second-to-last layer (some layer must run on the reduced set), vision blocks every quarter of the tower
        from its last one ([31, 23, 15, 7] of 32)."""
        mc = adapter.model.config
        tc, vc = mc.get_text_config(), mc.vision_config
        n, depth = tc.num_hidden_layers, vc.depth
        if layer is None:
            layer = max(0, min(n - 2, round(n * 18 / 28)))
        if not 0 <= layer <= n - 2:
            raise ConfigError(f"glimpse layer K={layer}: the model has {n} decoder layers, K must be in 0..{n - 2}")
        if vision_layers is None:
            vision_layers = sorted({max(0, depth - 1 - round(i * depth / 4)) for i in range(4)}, reverse=True)
        bad = [v for v in vision_layers if not 0 <= v < depth]
        if bad:
            raise ConfigError(f"glimpse vision_layers {bad}: the vision tower has blocks 0..{depth - 1}")
        return cls(layer=layer, vision_layers=list(vision_layers), text_hidden=tc.hidden_size,
                   text_heads=tc.num_attention_heads, vision_hidden=vc.hidden_size, **sizes)  # fmt: skip


def _rope2d(x: torch.Tensor, hw: torch.Tensor) -> torch.Tensor:
    """2-D rotary embedding of ``x`` ``[heads, N, d]``: the first half of each head rotates with the row, the second
    with the column (``hw`` ``[N, 2]``)."""
    d = x.shape[-1] // 2
    inv = 1.0 / (100.0 ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))  # grids are small
    parts = []
    for axis, part in enumerate(x.split(d, dim=-1)):
        ang = hw[:, axis, None].float() * inv[None]  # [N, d/2]
        cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
        parts.append(part * cos + rotate_half(part) * sin)
    return torch.cat(parts, dim=-1)


class _FuserLayer(nn.Module):
    """One AttnFuserV1 block: conditional self-attention over one image's tokens, then a gated MLP."""

    def __init__(self, cfg: GlimpseModuleConfig):
        super().__init__()
        f, c, h = cfg.fuse_size, cfg.cond_size, cfg.fuse_heads
        self.heads = h
        self.cond_in = nn.Linear(cfg.vision_hidden, c)
        self.norm1 = nn.RMSNorm(f, eps=1e-6)
        self.q = nn.Linear(f + c, f + c)
        self.k = nn.Linear(f + c, f + c)
        self.v = nn.Linear(f, f)
        self.norm2 = nn.RMSNorm(f, eps=1e-6)
        self.gate = nn.Linear(f, 2 * f)
        self.up = nn.Linear(f, 2 * f)
        self.down = nn.Linear(2 * f, f)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, hw: torch.Tensor) -> torch.Tensor:
        n, h = x.shape[0], self.heads
        c = self.cond_in(cond)
        y = torch.cat([self.norm1(x), c], dim=-1)
        q = _rope2d(self.q(y).view(n, h, -1).transpose(0, 1), hw)
        k = _rope2d(self.k(y).view(n, h, -1).transpose(0, 1), hw)
        v = self.v(self.norm1(x)).view(n, h, -1).transpose(0, 1)
        o = F.scaled_dot_product_attention(q[None], k[None], v[None])[0]  # one image: every token sees every other
        x = x + o.transpose(0, 1).reshape(n, -1)
        y = self.norm2(x)
        return x + self.down(F.silu(self.gate(y)) * self.up(y))


class GlimpseModule(nn.Module):
    """The new parameters: glimpse embeddings (one per layer 0..K) with their projection and norm, and the VIP."""

    def __init__(self, cfg: GlimpseModuleConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.text_hidden
        self.embeddings = nn.Parameter(torch.randn(cfg.layer + 1, d) * 0.02)  # N(0, 0.02) as the reference
        self.le_proj = nn.Linear(d, d)
        self.le_norm = nn.RMSNorm(d, eps=1e-6)
        self.dropout = nn.Dropout(cfg.dropout)
        self.attn_in = nn.Linear(cfg.text_heads, cfg.fuse_size)
        self.fuser = nn.ModuleList(_FuserLayer(cfg) for _ in cfg.vision_layers)
        self.out = nn.Linear(cfg.fuse_size, 1)

    def embedding(self, layer: int) -> torch.Tensor:
        """``e_ℓ`` ``[D]``: what enters layer 0 as the glimpse token / is added to it before layer ℓ."""
        return self.dropout(self.le_norm(self.le_proj(self.embeddings[layer])))

    def vip(self, attn_logits: torch.Tensor, vision: list[torch.Tensor], grid: tuple[int, int, int]) -> torch.Tensor:
        """Logits ``[N]`` for one image's tokens from layer K's glimpse logits ``[N, heads]`` and the vision-tower
        features ``[N, vision_hidden]`` of each of ``cfg.vision_layers`` (raster order over ``grid``)."""
        t, h, w = grid
        idx = torch.arange(t * h * w, device=attn_logits.device)
        hw = torch.stack([(idx // w) % h, idx % w], dim=-1)
        x = self.attn_in(attn_logits.float())
        for layer, cond in zip(self.fuser, vision):
            x = layer(x, cond.float(), hw)
        return self.out(x).squeeze(-1)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), directory / STATE_FILE)
        (directory / CONFIG_FILE).write_text(json.dumps(asdict(self.cfg), indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: torch.device | str = "cpu") -> GlimpseModule:
        directory = Path(directory)
        cfg = GlimpseModuleConfig(**json.loads((directory / CONFIG_FILE).read_text()))
        module = cls(cfg)
        module.load_state_dict(torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True))
        return module.to(device).eval()


# -- the glimpse token's path through the decoder (beside the prefill) ------------------------------------------


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` ``[B, heads, S, d]`` with the decoder's ``cos``/``sin`` ``[B, S, d]``."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def glimpse_positions(mrope: torch.Tensor) -> torch.Tensor:
    """``[3, B, 1]``: the last slot's M-RoPE position + 1 on every axis (left padding: the last slot is real, and the
    last prompt token holds the largest position)."""
    return mrope[:, :, -1:] + 1


def _keys_values(layer: nn.Module, layer_input: torch.Tensor, cos_sin) -> tuple[torch.Tensor, torch.Tensor]:
    attn = layer.self_attn
    b, s, _ = layer_input.shape
    x = layer.input_layernorm(layer_input)
    k = _rope(attn.k_proj(x).view(b, s, -1, attn.head_dim).transpose(1, 2), *cos_sin)
    v = attn.v_proj(x).view(b, s, -1, attn.head_dim).transpose(1, 2)
    return k, v


def _query(layer: nn.Module, g: torch.Tensor, g_cos_sin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The glimpse token's query, key and value ``[B, heads|kv, 1, d]`` in decoder ``layer`` (``g`` ``[B, D]``)."""
    attn = layer.self_attn
    b, d = g.shape[0], attn.head_dim
    x = layer.input_layernorm(g[:, None])
    q = _rope(attn.q_proj(x).view(b, 1, -1, d).transpose(1, 2), *g_cos_sin)
    k = _rope(attn.k_proj(x).view(b, 1, -1, d).transpose(1, 2), *g_cos_sin)
    v = attn.v_proj(x).view(b, 1, -1, d).transpose(1, 2)
    return q, k, v


def glimpse_step(layer: nn.Module, g: torch.Tensor, layer_input: torch.Tensor, valid: torch.Tensor, cos_sin,
                 g_cos_sin) -> torch.Tensor:  # fmt: skip
    """The glimpse token's output of decoder ``layer`` (``g`` ``[B, D]`` its input): its query over the real tokens'
    keys (``layer_input`` ``[B, S, D]``, ``valid`` ``[B, S]``) and its own key, then the layer's MLP."""
    attn = layer.self_attn
    k, v = _keys_values(layer, layer_input, cos_sin)
    q, kg, vg = _query(layer, g, g_cos_sin)
    k, v = torch.cat([k, kg], dim=2), torch.cat([v, vg], dim=2)
    groups = attn.num_key_value_groups
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    allowed = torch.cat([valid.bool(), torch.ones_like(valid[:, :1], dtype=torch.bool)], dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * attn.scaling  # [B, heads, 1, S+1]
    scores = scores.masked_fill(~allowed[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    o = torch.matmul(p, v).transpose(1, 2).reshape(g.shape[0], -1)
    g = g + attn.o_proj(o)
    return g + layer.mlp(layer.post_attention_layernorm(g))


def glimpse_logits(layer: nn.Module, g: torch.Tensor, layer_input: torch.Tensor, cos_sin, g_cos_sin) -> torch.Tensor:
    """Decoder ``layer``'s raw attention logits ``q·k·scale`` of the glimpse query (input ``g``) against every slot,
    ``[B, heads, S]`` fp32 (no mask, no softmax: the reference's ``use_attention_logits``)."""
    attn = layer.self_attn
    k, _ = _keys_values(layer, layer_input, cos_sin)
    q, _, _ = _query(layer, g, g_cos_sin)
    k = k.repeat_interleave(attn.num_key_value_groups, dim=1)
    return (torch.matmul(q.float(), k.float().transpose(-1, -2)) * attn.scaling)[:, :, 0]


# -- the keep rule ----------------------------------------------------------------------------------------------


def keep_rule(logits: torch.Tensor, threshold: float, cap: float | None, min_keep: int) -> torch.Tensor:
    """Bool ``[N]``: which of one image's ``N`` tokens stay (§2.6): ``σ(logit) > threshold``; when ``cap`` < 1 and
    more than ``cap·N`` pass, the top ``⌊cap·N⌋`` by probability; at least ``min(min_keep, N)`` (the top ones)."""
    n = logits.numel()
    p = torch.sigmoid(logits.float())
    keep = p > threshold
    if cap is not None and cap < 1.0 and keep.float().mean() > cap:
        keep = torch.zeros_like(keep)
        keep[torch.topk(p, math.floor(cap * n)).indices] = True
    need = min(min_keep, n)
    if int(keep.sum()) < need:
        keep[torch.topk(p, need).indices] = True
    return keep


# -- vision-tower features --------------------------------------------------------------------------------------


class VisionTap:
    """Hooks on the vision tower: the outputs of ``blocks`` averaged over each 2x2 merge group, in the LLM's raster
    order, per encoded item, for the prompt being prefilled (a call of the tower after a consumed prompt starts a
    new prompt, as the mechanism's own vision statistics do)."""

    def __init__(self, visual: nn.Module, blocks: list[int]):
        self.visual, self.blocks = visual, list(blocks)
        self.calls: list[dict] = []  # per tower call: grid [n, 3], features {block: [n_merged, hidden]}
        self.consumed = False
        self._handles: list = []

    def __enter__(self) -> Self:
        self._handles.append(self.visual.register_forward_pre_hook(self._begin, with_kwargs=True))
        for b in self.blocks:
            self._handles.append(self.visual.blocks[b].register_forward_hook(self._block(b)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _begin(self, module, args, kwargs) -> None:
        if self.consumed:
            self.calls, self.consumed = [], False
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        self.calls.append({"grid": grid.detach().cpu(), "features": {}})

    def _block(self, index: int):
        def hook(module, args, output) -> None:
            out = output[0] if isinstance(output, tuple) else output
            self.calls[-1]["features"][index] = out.detach()

        return hook

    def take(self, items_by_kind: dict[str, list[tuple[int, int, int]]]) -> dict[tuple[str, int], list[torch.Tensor]]:
        """Per image ``("image", index)``: one ``[N, hidden]`` tensor per block (``self.blocks`` order). The tower
        call of the images is the one whose grids are the prompt's image grids (videos are encoded in another call)."""
        from transformers.vision_utils import get_vision_window_index

        self.consumed = True
        want = items_by_kind.get("image", [])
        if not want:
            return {}
        vc = self.visual.config
        m = vc.spatial_merge_size
        for call in self.calls:
            grids = [(int(t), int(h) // m, int(w) // m) for t, h, w in call["grid"].tolist()]
            if grids != want:
                continue
            window_index, _ = get_vision_window_index(call["grid"], spatial_merge_size=m, window_size=vc.window_size,
                                                      patch_size=vc.patch_size)  # fmt: skip
            reverse = torch.argsort(window_index)
            sizes = [t * h * w for t, h, w in grids]
            per_block = []
            for b in self.blocks:
                f = call["features"][b]
                f = f.view(-1, m * m, f.shape[-1]).mean(1)[reverse.to(f.device)]  # window order -> raster order
                per_block.append(f.split(sizes))
            return {("image", i): [pb[i] for pb in per_block] for i in range(len(grids))}
        raise RuntimeError(f"glimpse: no vision-tower call encoded this prompt's images (grids {want})")


# -- the token pruner -------------------------------------------------------------------------------------------


@dataclass
class GlimpseConfig(TokenPrunerConfig):
    name: str = "glimpse"
    # The cap on the kept share of an image's tokens (the reference's max_remain_ratio); 1.0: no cap.
    keep_ratio: float = 1.0
    # A token stays when σ(VIP logit) > threshold (0: every token stays).
    threshold: float = 0.5
    # At least this many tokens per image (the reference's min_remain_num).
    min_keep: int = 1
    # The trained module: a folder holding glimpse.pt + glimpse.json, or a name looked up beside the model's
    # weights (<model.path>/<name>; null: <model.path>/glimpse, what `make glimpse-model` writes).
    module: str | None = None
    save_kept: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0.0 <= self.threshold < 1.0, "threshold", f"must be in [0, 1), got {self.threshold}")
        require(self.min_keep >= 1, "min_keep", f"must be >= 1 (a selection keeps a token), got {self.min_keep}")
        # A path is checked here, at validation, before the model and the dense baseline; a bare name is looked up
        # beside the model's weights by check_model (the model's path is not known here).
        if self.module is not None and ("/" in self.module or self.module.startswith(("~", "."))):
            require((Path(self.module).expanduser() / CONFIG_FILE).is_file(), "module",
                    f"no trained glimpse module there (a folder with {CONFIG_FILE} and {STATE_FILE})")  # fmt: skip


def resolve_module_dir(spec: str | None, model_path: str | None) -> Path:
    """``token_pruner.module`` -> the folder holding the module: an existing path, else ``<model dir>/<name>``."""
    if spec is not None and (Path(spec).expanduser() / CONFIG_FILE).is_file():
        return Path(spec).expanduser()
    if model_path is not None:
        candidate = Path(model_path).expanduser() / (spec or MODULE_DIR)
        if (candidate / CONFIG_FILE).is_file():
            return candidate
    where = f"{spec!r}" if spec else f"{MODULE_DIR!r} beside the model ({model_path})"
    raise ConfigError(f"token_pruner=glimpse: no trained glimpse module at {where} (a folder with {CONFIG_FILE} and "
                      f"{STATE_FILE}); train one with `make glimpse-model` / `python -m mmprune_exp.train_glimpse`, "
                      "or point token_pruner.module at one")  # fmt: skip


class GlimpseSelector:
    """The glimpse path and the VIP for one attachment: probes for layers 0..K-1, the selection after layer K.

    ``capture`` (training) receives, per sample, what the selection read: the attention logits of every visual
    slot, the vision features, grids and slots; the selection still applies the keep rule."""

    def __init__(self, adapter: ModelAdapter, module: GlimpseModule, cfg: GlimpseConfig | None = None):
        self.adapter = adapter
        self.module = module
        self.cfg = cfg or GlimpseConfig(threshold=0.0)
        self.text = adapter.model.model.language_model
        self.tap = VisionTap(adapter.model.model.visual, module.cfg.vision_layers)
        #: of the latest prefill: per sample {item (kind, index): VIP logits [N]}, and layer K's glimpse attention
        #: logits [B, heads, S] (reports, tests)
        self.last_logits: list[dict[tuple[str, int], torch.Tensor]] = []
        self.last_attention: torch.Tensor | None = None

    def _cos_sin(self, x: torch.Tensor, mrope: torch.Tensor):
        return self.text.rotary_emb(x, mrope)

    def plans(self) -> dict[int, LayerPlan]:
        return {i: LayerPlan(probe=self._probe) for i in range(self.module.cfg.layer)}

    def point(self) -> ReductionPoint:
        return ReductionPoint(self.module.cfg.layer, self.select, name="glimpse")

    @staticmethod
    def _has_images(items) -> bool:
        return any(it.kind == "image" for its in items for it in its)

    @torch.no_grad()
    def _probe(self, obs: LayerObservation) -> None:
        if not self._has_images(obs.items):  # nothing to score (videos are kept): no glimpse path either
            return
        x = obs.layer_input
        e = self.module.embedding(obs.layer).to(x.dtype)
        g = obs.state.get("glimpse")
        g = e.expand(x.shape[0], -1) if g is None else g + e
        g_pos = glimpse_positions(obs.position_ids)
        layer = self.text.layers[obs.layer]
        obs.state["glimpse"] = glimpse_step(layer, g, x, obs.attention_mask, self._cos_sin(x, obs.position_ids),
                                            self._cos_sin(x, g_pos))  # fmt: skip

    @torch.no_grad()
    def select(self, ctx: ReductionContext) -> Selection:
        if not self._has_images(ctx.items):
            self.tap.consumed = True  # the next prompt's tower calls start afresh
            self.last_logits, self.last_attention = [{} for _ in range(ctx.batch_size)], None
            return Selection([ctx.valid_slots(b) for b in range(ctx.batch_size)])
        x = ctx.layer_input
        k = self.module.cfg.layer
        e = self.module.embedding(k).to(x.dtype)
        g = ctx.state.get("glimpse")
        g = e.expand(x.shape[0], -1) if g is None else g + e
        logits = glimpse_logits(self.text.layers[k], g, x, self._cos_sin(x, ctx.position_ids),
                                self._cos_sin(x, glimpse_positions(ctx.position_ids)))  # fmt: skip
        self.last_attention = logits
        want: dict[str, list[tuple[int, int, int]]] = {"image": [], "video": []}
        for item in sorted((it for its in ctx.items for it in its), key=lambda it: (it.kind, it.index)):
            want[item.kind].append(item.grid)
        vision = self.tap.take(want)
        cap = self.cfg.keep_ratio if self.cfg.keep_ratio < 1.0 else None
        keep, self.last_logits = [], []
        for b in range(ctx.batch_size):
            visual_keep, found = [], {}
            for item in ctx.items[b]:
                slots = ctx.slots_of(b, item)
                if item.kind != "image":  # videos are not pruned (the reference prunes images only)
                    visual_keep.append(slots)
                    continue
                out = self.module.vip(logits[b, :, slots].T, vision[(item.kind, item.index)], item.grid)
                found[(item.kind, item.index)] = out
                visual_keep.append(slots[keep_rule(out, self.cfg.threshold, cap, self.cfg.min_keep)])
            self.last_logits.append(found)
            vk = torch.cat(visual_keep) if visual_keep else ctx.visual_slots(b)[:0]
            keep.append(ctx.keep_all_but(b, vk))
        return Selection(keep)


@register_token_pruner("glimpse", schema=GlimpseConfig)
class Glimpse(TokenPruner):
    # The threshold decides how many tokens stay: the point runs whatever keep_ratio (the cap) is.
    always_reduce = True

    def __init__(self, cfg: GlimpseConfig):
        super().__init__(cfg)
        self.selector: GlimpseSelector | None = None

    def check_model(self, model_cfg) -> None:
        # A module given by name (or the default) lives beside a local checkpoint's weights: look now, before the
        # model and the dense baseline. A hub id's folder is only known once it loads; attach looks then.
        if model_cfg.path is not None and Path(model_cfg.path).expanduser().is_dir():
            resolve_module_dir(self.cfg.module, model_cfg.path)

    def _selector(self, adapter: ModelAdapter) -> GlimpseSelector:
        if self.selector is None or self.selector.adapter is not adapter:
            cfg: GlimpseConfig = self.cfg
            model_path = adapter.cfg.path if getattr(adapter, "cfg", None) is not None else None
            module = GlimpseModule.load(resolve_module_dir(cfg.module, model_path), adapter.device)
            n = adapter.decoder_shape().layers
            if module.cfg.layer > n - 2 or module.cfg.text_hidden != adapter.model.config.get_text_config().hidden_size:
                raise ConfigError(f"token_pruner.module: the glimpse module (K={module.cfg.layer}, hidden "
                                  f"{module.cfg.text_hidden}) was not trained for this model")  # fmt: skip
            self.selector = GlimpseSelector(adapter, module, cfg)
        return self.selector

    def points(self, adapter: ModelAdapter) -> list[ReductionPoint]:
        return [self._selector(adapter).point()]

    def layer_plans(self, adapter: ModelAdapter) -> dict[int, LayerPlan]:
        return self._selector(adapter).plans()

    @contextmanager
    def attach(self, adapter: ModelAdapter, out_dir: Path | None = None) -> Iterator[TokenSession]:
        selector = self._selector(adapter)
        with selector.tap, super().attach(adapter, out_dir) as session:
            if session is not None:
                session = GlimpseSession(session.mechanism, session.shape, session.cfg, session.out_dir,
                                         selector.module.cfg.layer)  # fmt: skip
            yield session


class GlimpseSession(TokenSession):
    """The token report with the glimpse path's own prefill work in ``flops_ratio``: the keys and values of every
    prompt token re-projected in layers 0..K (``(K+1)·4·n·d·kv``; the glimpse token's single row and the VIP are
    O(n) and left out), for a prompt with an image (an image-less prompt runs no glimpse path)."""

    def __init__(self, mechanism, shape, cfg, out_dir, layer: int):
        super().__init__(mechanism, shape, cfg, out_dir)
        self.layer = layer

    def glimpse_flops(self, record) -> int:
        if not any(it.kind == "image" for it in record.items):
            return 0
        return (self.layer + 1) * 4 * record.tokens_before * self.shape.hidden * self.shape.kv_dim

    def sample_row(self, record, batch_size: int) -> dict:
        row = super().sample_row(record, batch_size)
        dense = self.shape.layer_flops(record.tokens_before) * self.shape.layers
        extra = self.glimpse_flops(record)
        if dense and extra:
            row["flops_ratio"] += extra / dense
            row["glimpse_flops_ratio"] = extra / dense
        return row
