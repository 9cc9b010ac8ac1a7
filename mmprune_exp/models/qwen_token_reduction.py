"""Visual-token reduction inside a Qwen2.5-VL forward (transformers 5.x), owned by the Qwen2.5-VL adapter.

While the context manager is active, the language model's ``forward`` is replaced by :meth:`_forward`, which does
what the stock one does (masks from ``create_causal_mask``, the same decoder layers, the same cache) plus the
reduction points of a token pruner during prefill:

- dropped slots leave every tensor (hidden states, rotary tables, masks): later layers compute on fewer tokens;
- every kept token keeps its original 3-D M-RoPE position (positions are gathered, never recomputed);
- each cache layout (full prompt for layers before a point, the kept set after it) gets its own 2-D mask, at prefill
  and at every decode step, so left padding and a different number of kept tokens per sample stay correct;
- decode positions come from ``generate``'s own 4-row ``position_ids`` (original coordinates), so decoding continues
  at the unpruned maximum position + 1 whatever the cache length.

Layer plans (:class:`~mmprune_exp.models.token_reduction.LayerPlan`, YOPO) change what a decoder layer computes
for visual tokens. Such a layer is run by :meth:`QwenTokenReduction._planned_layer` instead of the stock call: the
same projections, rotary embedding, cache update and residual structure, but the queries are split by modality
(one sample at a time, padding left out) so that visual queries are computed only in the kept heads, only
against their window's keys, and through only the kept MLP neurons; text queries attend as in the stock layer.
Its attention is computed with ``scaled_dot_product_attention`` (or explicit softmax where probabilities are
edited), so its outputs equal the stock layer's only up to float rounding; a layer whose plan changes nothing,
and every layer without a plan, is the stock call.

With no point, or a point that keeps every slot, the computation is the stock one, op for op (same mask tensors,
same layer calls), so the logits are bitwise equal to the unpruned model's. Eager and SDPA attention are supported;
flash-attention derives its varlen layout from positions and is refused.
"""

from __future__ import annotations

import functools
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Self

import torch
import torch.nn.functional as F
from torch import nn

from mmprune_exp.errors import ConfigError
from mmprune_exp.models.attention_prior import rotate_half
from mmprune_exp.models.token_reduction import (
    LayerObservation,
    LayerPlan,
    LayerWork,
    ReductionContext,
    ReductionPoint,
    TokenRecord,
    VisualItem,
    gather_seq,
    left_pad_layout,
)

_gather = gather_seq


@dataclass
class _Layout:
    """One arrangement of the prompt's slots (see :mod:`mmprune_exp.models.token_reduction`)."""

    origin: torch.Tensor  # [B, S] original index, -1 = padding
    valid: torch.Tensor  # [B, S] bool
    visual: torch.Tensor  # [B, S] bool
    mrope: torch.Tensor  # [3, B, S]
    cos_sin: tuple[torch.Tensor, torch.Tensor]  # [B, S, head_dim] each
    mask2d: torch.Tensor | None  # what create_causal_mask gets (None only for the stock, unpadded layout)
    text_pos: torch.Tensor | None  # generate's text-row positions (stock layout only; used for FA2 packing only)

    def gather(self, index: torch.Tensor, valid: torch.Tensor) -> _Layout:
        cos, sin = self.cos_sin
        return _Layout(
            origin=torch.where(valid, _gather(self.origin, index, 0, 1), -1),
            valid=valid,
            visual=_gather(self.visual, index, 0, 1) & valid,
            mrope=_gather(self.mrope, index, 1, 2),
            cos_sin=(_gather(cos, index, 0, 1), _gather(sin, index, 0, 1)),
            mask2d=valid.long(),
            text_pos=None,
        )


class QwenTokenReduction:
    """Context manager: install ``points`` into a Qwen2.5-VL model's forward; records land in ``records``."""

    def __init__(self, model: nn.Module, points: Sequence[ReductionPoint], vision_stats: bool = False,
                 plans: dict[int, LayerPlan] | None = None):  # fmt: skip
        self.model = model
        self.wrapper = model.model  # Qwen2_5_VLModel: .visual, .language_model
        self.text = self.wrapper.language_model
        self.visual = self.wrapper.visual
        config = self.text.config
        n_layers = len(self.text.layers)
        for p in points:
            if not -1 <= p.after_layer < n_layers - 1:
                raise ConfigError(
                    f"token pruner point {p.name or p.after_layer!r}: after_layer={p.after_layer} is outside "
                    f"-1..{n_layers - 2} (the model has {n_layers} decoder layers)"
                )
        if getattr(config, "_attn_implementation", "sdpa") not in ("eager", "sdpa"):
            raise ConfigError(
                f"token pruning supports model.attn_implementation=eager or sdpa, not "
                f"{config._attn_implementation!r} (flash-attention derives its layout from positions)"
            )
        if "sliding_attention" in getattr(config, "layer_types", []):
            raise ConfigError("token pruning does not support sliding-window decoder layers")
        self.points = sorted(points, key=lambda p: p.after_layer)
        self.plans = dict(plans or {})
        self._check_plans(n_layers)
        self._slices: dict[tuple[int, str], torch.Tensor | None] = {}  # kept rows/columns of a layer's weights
        self._neighbours: dict[tuple[int, int, int, bool], tuple[torch.Tensor, torch.Tensor, float]] = {}
        self.vision_stats = vision_stats
        mc = model.config
        self.visual_ids = torch.tensor([mc.image_token_id, mc.video_token_id])
        self.image_token_id, self.video_token_id = mc.image_token_id, mc.video_token_id
        self.merge = mc.vision_config.spatial_merge_size
        #: per sample of the latest prefill
        self.records: list[TokenRecord] = []
        #: seconds of the latest generate call: vision tower, prefill forward (LLM), decode forwards
        self.timing = {"vision_s": 0.0, "prefill_s": 0.0, "decode_s": 0.0, "decode_steps": 0}
        self._handles: list = []
        self._input_ids: torch.Tensor | None = None
        self._pending: list[dict] = []  # images/videos encoded for the next prefill
        self._consumed = False
        self._current: dict | None = None
        self._vision_s = 0.0
        self._layouts: list[_Layout] = []  # per layer: the layout its cache holds
        self._prompt_len = 0
        self._initial: _Layout | None = None
        self._t0 = 0.0
        self._prefill_now = False

    def _check_plans(self, n_layers: int) -> None:
        tc = self.text.config
        heads = tc.num_attention_heads
        for i, plan in self.plans.items():
            where = f"layer plan {i}"
            if not 0 <= i < n_layers:
                raise ConfigError(f"{where}: the model has decoder layers 0..{n_layers - 1}")
            if plan.visual_window is not None and plan.visual_window < 1:
                raise ConfigError(f"{where}: visual_window must be >= 1, got {plan.visual_window}")
            if plan.visual_heads is not None:
                vh = plan.visual_heads
                if vh.dtype != torch.bool or tuple(vh.shape) != (heads,):
                    raise ConfigError(f"{where}: visual_heads must be a bool tensor of shape [{heads}], got "
                                      f"{vh.dtype} {tuple(vh.shape)}")  # fmt: skip
            if plan.zero_visual_keys and plan.visual_heads is None:
                raise ConfigError(f"{where}: zero_visual_keys needs visual_heads (the heads that keep them)")
            if plan.visual_neurons is not None:
                vn = plan.visual_neurons
                if vn.dim() != 1 or vn.dtype != torch.long or (vn.numel() and not 0 <= int(vn.min()) <= int(vn.max())
                                                                < tc.intermediate_size):  # fmt: skip
                    raise ConfigError(f"{where}: visual_neurons must be a 1-D long tensor of neuron indices in "
                                      f"0..{tc.intermediate_size - 1}")  # fmt: skip
                if torch.unique(vn).numel() != vn.numel():
                    raise ConfigError(f"{where}: visual_neurons names a neuron twice")
            if plan.probe_mlp and plan.changes_compute:
                raise ConfigError(f"{where}: probe_mlp observes the stock layer; it cannot be combined with a plan "
                                  "that changes the computation")  # fmt: skip

    # -- install / remove -------------------------------------------------------------------------
    def __enter__(self) -> Self:
        self._handles.append(self.wrapper.register_forward_pre_hook(self._begin_call, with_kwargs=True))
        self._handles.append(self.wrapper.register_forward_hook(self._end_call))
        for kind in ("image", "video"):
            name = f"get_{kind}_features"
            # generate() inspects this method's signature to pick its arguments: keep the original's.
            original = getattr(self.wrapper, name)
            setattr(self.wrapper, name, functools.wraps(original)(functools.partial(self._features, kind, original)))
        if self.vision_stats:
            self._handles.append(
                self.visual.blocks[-1].register_forward_pre_hook(self._vision_block, with_kwargs=True)
            )
        self.text.forward = self._forward  # instance attribute: shadows the class's forward until __exit__
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.text.__dict__.pop("forward", None)
        for kind in ("image", "video"):
            self.wrapper.__dict__.pop(f"get_{kind}_features", None)
        self._slices.clear()
        self._neighbours.clear()

    # -- hooks around the multimodal wrapper --------------------------------------------------------
    def _sync(self) -> None:
        device = self.text.embed_tokens.weight.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def _begin_call(self, module, args, kwargs) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        self._prefill_now = cache is None or cache.get_seq_length() == 0
        if self._prefill_now:
            self._input_ids = kwargs.get("input_ids", args[0] if args else None)
            self.timing = {"vision_s": 0.0, "prefill_s": 0.0, "decode_s": 0.0, "decode_steps": 0}
        self._sync()
        self._t0 = time.perf_counter()

    def _end_call(self, module, args, output) -> None:
        self._sync()
        seconds = time.perf_counter() - self._t0
        if self._prefill_now:
            self.timing["prefill_s"] += seconds
        else:
            self.timing["decode_s"] += seconds
            self.timing["decode_steps"] += 1

    # -- the vision tower: grids of each image/video, statistics for VisionZip ---------------------------
    # transformers 5.x ``generate`` encodes images and videos *before* the first forward and hands the model
    # ``mm_encoder_outputs`` without grids, so the grids are taken where the features are computed.
    def _features(self, kind: str, original, *args, **kwargs):
        grid_thw = kwargs.get(f"{kind}_grid_thw", args[1] if len(args) > 1 else None)
        if grid_thw is None:
            raise RuntimeError(f"get_{kind}_features was called without {kind}_grid_thw")
        if self._consumed:  # a new prompt: the previous prefill used what was collected before
            self._pending, self._consumed = [], False
        entry = {"kind": kind, "grid": grid_thw, "stats": None}
        self._pending.append(entry)
        self._current = entry
        self._sync()
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            self._current = None
            self._sync()
            self._vision_s += time.perf_counter() - start

    @torch.no_grad()
    def _vision_block(self, block, args, kwargs) -> None:
        """Attention each merged token receives in the last vision block (mean over heads, summed over queries,
        averaged over its 2x2 patches) and its keys (mean over patches and heads), in raster order per item."""
        from transformers.vision_utils import get_vision_window_index

        entry = self._current
        if entry is None:
            return
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        cu = kwargs["cu_seqlens"]
        cos, sin = kwargs["position_embeddings"]
        attn = block.attn
        n = hidden.shape[0]
        x = block.norm1(hidden)
        q, k, _ = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)  # [n, heads, d]
        cos, sin = cos.unsqueeze(-2).float(), sin.unsqueeze(-2).float()
        q = q.float() * cos + rotate_half(q.float()) * sin
        k = k.float() * cos + rotate_half(k.float()) * sin
        received = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        bounds = cu.tolist()
        for s, e in itertools.pairwise(bounds):
            for h in range(attn.num_heads):  # one head at a time: an n x n map per head, not heads x n x n
                a = torch.softmax(q[s:e, h] @ k[s:e, h].T * attn.scaling, dim=-1)
                received[s:e] += a.sum(0) / attn.num_heads
        unit = self.merge**2
        score = received.view(-1, unit).mean(1)  # window order, one per merged token
        keys = k.mean(1).view(-1, unit, k.shape[-1]).mean(1)
        vc = self.visual.config
        window_index, _ = get_vision_window_index(
            entry["grid"], spatial_merge_size=vc.spatial_merge_size, window_size=vc.window_size,
            patch_size=vc.patch_size,
        )  # fmt: skip
        reverse = torch.argsort(window_index.to(score.device))
        score, keys = score[reverse], keys[reverse]
        sizes = [int(t * h * w) // unit for t, h, w in entry["grid"].tolist()]
        entry["stats"] = [{"score": s, "keys": kk} for s, kk in zip(score.split(sizes), keys.split(sizes))]

    def _take_vision(self) -> tuple[dict[str, torch.Tensor | None], dict[tuple[str, int], dict] | None]:
        """Grids by kind (the processor's order) and per-item vision statistics of the prompt being prefilled."""
        self._consumed = True
        self.timing["vision_s"] = self._vision_s
        self._vision_s = 0.0
        grids: dict[str, list] = {"image": [], "video": []}
        stats: dict[tuple[str, int], dict] = {}
        for entry in self._pending:
            for g, st in zip(entry["grid"].tolist(), entry["stats"] or [None] * len(entry["grid"])):
                if st is not None:
                    stats[(entry["kind"], len(grids[entry["kind"]]))] = st
                grids[entry["kind"]].append(g)
        return grids, (stats if self.vision_stats else None)

    # -- the language model's forward ---------------------------------------------------------------
    def _items(self, input_ids: torch.Tensor, grids: dict[str, list]) -> list[list[VisualItem]]:
        """Images/videos of each sample from the placeholder runs and the processor's grids, in sequence order."""
        cursor = {"image": 0, "video": 0}
        items: list[list[VisualItem]] = []
        for b, row in enumerate(input_ids.tolist()):
            found: list[VisualItem] = []
            j = 0
            while j < len(row):
                kind = "image" if row[j] == self.image_token_id else "video" if row[j] == self.video_token_id else None
                if kind is None:
                    j += 1
                    continue
                if cursor[kind] >= len(grids[kind]):
                    raise RuntimeError(f"more {kind} placeholders than encoded {kind}s in the prompt")
                t, h, w = (int(v) for v in grids[kind][cursor[kind]])
                grid = (t, h // self.merge, w // self.merge)
                found.append(VisualItem(b, kind, cursor[kind], j, grid))
                cursor[kind] += 1
                j += grid[0] * grid[1] * grid[2]
            items.append(found)
        return items

    def _forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                 use_cache=None, past_key_values=None, **kwargs):  # fmt: skip
        from transformers.cache_utils import DynamicCache
        from transformers.modeling_outputs import BaseModelOutputWithPast

        text = self.text
        cache = cache if cache is not None else past_key_values
        if isinstance(attention_mask, dict):
            raise NotImplementedError("token pruning needs a 2-D attention mask, not prepared 4-D masks")
        for key in ("output_attentions", "output_hidden_states"):
            if kwargs.pop(key, False):
                raise NotImplementedError(f"{key}=True is not available while a token pruner is attached")
        kwargs.pop("return_dict", None)
        if use_cache is None:
            use_cache = text.config.use_cache
        if inputs_embeds is None:
            inputs_embeds = text.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = DynamicCache(config=text.config)
        b, s, _ = inputs_embeds.shape
        # Positions exactly as the stock forward derives them.
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(s, device=inputs_embeds.device) + past
            position_ids = position_ids.view(1, 1, -1).expand(3, b, -1)
        elif position_ids.ndim == 2:
            position_ids = position_ids[None, ...].expand(3, position_ids.shape[0], -1)
        if position_ids.ndim == 3 and position_ids.shape[0] == 4:
            text_pos, mrope = position_ids[0], position_ids[1:]
        else:
            text_pos, mrope = None, position_ids
        prefill = cache is None or cache.get_seq_length() == 0
        if prefill:
            hidden = self._prefill(inputs_embeds, attention_mask, mrope, text_pos, cache, use_cache, kwargs)
        else:
            hidden = self._decode(inputs_embeds, attention_mask, mrope, text_pos, cache, use_cache, kwargs)
        return BaseModelOutputWithPast(last_hidden_state=text.norm(hidden), cache=cache)

    def _mask(self, hidden, mask2d, cache, text_pos, layer_idx: int):
        from transformers.masking_utils import create_causal_mask

        return create_causal_mask(config=self.text.config, inputs_embeds=hidden, attention_mask=mask2d, cache=cache,
                                  position_ids=text_pos, layer_idx=layer_idx)  # fmt: skip

    def _prefill(self, embeds, mask2d, mrope, text_pos, cache, use_cache, kwargs) -> torch.Tensor:
        b, s, _ = embeds.shape
        device = embeds.device
        valid = mask2d.bool() if mask2d is not None else torch.ones(b, s, dtype=torch.bool, device=device)
        input_ids = self._input_ids
        grids, vision = self._take_vision()
        if input_ids is None or input_ids.shape != (b, s):
            if self.points:
                raise RuntimeError("token pruning needs the prompt's input_ids (call the model with input_ids)")
            visual = torch.zeros(b, s, dtype=torch.bool, device=device)
            items: list[list[VisualItem]] = [[] for _ in range(b)]
        else:
            input_ids = input_ids.to(device)
            visual = torch.isin(input_ids, self.visual_ids.to(device)) & valid
            items = self._items(input_ids, grids)
        arange = torch.arange(s, device=device).expand(b, s)
        cur = _Layout(
            origin=torch.where(valid, arange, -1), valid=valid, visual=visual, mrope=mrope,
            cos_sin=self.text.rotary_emb(embeds, mrope), mask2d=mask2d, text_pos=text_pos,
        )  # fmt: skip
        self._initial = cur
        records = [TokenRecord(visual_before=int(visual[i].sum()), tokens_before=int(valid[i].sum()), items=items[i])
                   for i in range(b)]  # fmt: skip
        state: dict = {}
        mask = self._mask(embeds, mask2d, cache, text_pos, 0)
        hidden = embeds
        layouts: list[_Layout] = []
        by_layer: dict[int, list[ReductionPoint]] = {}
        for p in self.points:
            by_layer.setdefault(p.after_layer, []).append(p)
        for point in by_layer.get(-1, []):
            hidden, cur, mask = self._reduce(point, hidden, None, None, cur, items, state, vision, records,
                                             cache, layouts)  # fmt: skip
        self._neighbours.clear()
        for i, layer in enumerate(self.text.layers):
            layer_input = hidden
            plan = self.plans.get(i)
            captured: dict[str, torch.Tensor] = {}
            if plan is not None and plan.changes_compute and bool(cur.visual.any()):
                hidden, works = self._planned_layer(i, layer, hidden, cur, items, plan, cache if use_cache else None)
            else:
                handle = None
                if plan is not None and plan.probe_mlp:
                    handle = layer.mlp.down_proj.register_forward_pre_hook(functools.partial(_grab_input, captured))
                try:
                    hidden = layer(hidden, attention_mask=mask, position_embeddings=cur.cos_sin,
                                   position_ids=cur.text_pos, cache=cache, use_cache=use_cache, **kwargs)  # fmt: skip
                finally:
                    if handle is not None:
                        handle.remove()
                works = [LayerWork(int(n), int(v)) for n, v in zip(cur.valid.sum(1).tolist(), cur.visual.sum(1).tolist())]
            layouts.append(cur)
            for r, n, w in zip(records, cur.valid.sum(1).tolist(), works):
                r.tokens_per_layer.append(int(n))
                r.layer_work.append(w)
            if plan is not None and plan.probe is not None:
                plan.probe(LayerObservation(
                    point=None, hidden=layer_input, layer_input=layer_input, position_ids=cur.mrope,
                    attention_mask=cur.valid.long(), origin=cur.origin, visual=cur.visual, items=items, state=state,
                    attention=functools.partial(self._attention, layer, layer_input, cur), vision=vision, layer=i,
                    output=hidden, mlp_activations=captured.get("x"),
                ))  # fmt: skip
            for point in by_layer.get(i, []):
                hidden, cur, mask = self._reduce(point, hidden, layer_input, layer, cur, items, state, vision,
                                                 records, cache, layouts)  # fmt: skip
        for r, n in zip(records, cur.visual.sum(1).tolist()):
            r.visual_kept = int(n)
        for i, r in enumerate(records):
            r.kv_cache_tokens = sum(int(lay.valid[i].sum()) for lay in layouts)
        self.records = records
        self._layouts = layouts
        self._prompt_len = s
        return hidden

    def _reduce(self, point, hidden, layer_input, layer, cur: _Layout, items, state, vision, records, cache,
                layouts: list[_Layout]):  # fmt: skip
        ctx = ReductionContext(
            point=point, hidden=hidden, layer_input=layer_input, position_ids=cur.mrope,
            attention_mask=cur.valid.long(), origin=cur.origin, visual=cur.visual, items=items, state=state,
            attention=functools.partial(self._attention, layer, layer_input, cur) if layer is not None else None,
            vision=vision,
        )  # fmt: skip
        selection = point.select(ctx)
        b, s, _ = hidden.shape
        if len(selection.keep) != b:
            raise ValueError(f"point {point.name!r}: selection has {len(selection.keep)} samples, the batch {b}")
        keep = []
        for i, k in enumerate(selection.keep):
            k = torch.as_tensor(k, dtype=torch.long, device=hidden.device)
            chosen = torch.zeros(s, dtype=torch.bool, device=hidden.device)
            chosen[k] = True
            if bool((chosen & ~cur.valid[i]).any()):
                raise ValueError(f"point {point.name!r}: sample {i}: a padding slot was selected")
            if bool((cur.valid[i] & ~cur.visual[i] & ~chosen).any()):
                raise ValueError(f"point {point.name!r}: sample {i}: a text token was dropped (only visual tokens may be)")
            keep.append(k)
        if selection.replace:
            hidden = hidden.clone()
            for i, rep in enumerate(selection.replace):
                if rep is not None:
                    slots, vectors = rep
                    hidden[i, slots.to(hidden.device)] = vectors.to(hidden.dtype)
        index, valid = left_pad_layout(keep, s)
        new = cur.gather(index, valid)
        hidden = _gather(hidden, index, 0, 1)
        for i, r in enumerate(records):
            r.kept_by_point[point.name or f"after_layer_{point.after_layer}"] = new.origin[i][new.visual[i]].tolist()
        if point.compress_cache and cache is not None:
            for j, lay in enumerate(layouts):
                idx = self._remap(lay, new)
                cache.layers[j].keys = _gather(cache.layers[j].keys, idx, 0, 2)
                cache.layers[j].values = _gather(cache.layers[j].values, idx, 0, 2)
                layouts[j] = new
        mask = self._mask(hidden, new.mask2d, cache, None, point.after_layer + 1)
        return hidden, new, mask

    @staticmethod
    def _remap(old: _Layout, new: _Layout) -> torch.Tensor:
        """Index into ``old``'s slots for each slot of ``new`` (matched by original index; padding -> 0)."""
        b = old.origin.shape[0]
        width = int(max(old.origin.max(), new.origin.max())) + 1
        lookup = torch.zeros(b, width, dtype=torch.long, device=old.origin.device)
        slots = torch.arange(old.origin.shape[1], device=old.origin.device).expand(b, -1)
        lookup.scatter_(1, old.origin.clamp(min=0), torch.where(old.valid, slots, 0))
        return torch.where(new.valid, torch.gather(lookup, 1, new.origin.clamp(min=0)), 0)

    def _decode(self, embeds, mask2d, mrope, text_pos, cache, use_cache, kwargs) -> torch.Tensor:
        if not self._layouts:
            raise RuntimeError("decode step without a prefill under this token pruner")
        b, t, _ = embeds.shape
        cos_sin = self.text.rotary_emb(embeds, mrope)
        masks: dict[int, torch.Tensor | None] = {}
        hidden = embeds
        for i, layer in enumerate(self.text.layers):
            lay = self._layouts[i]
            if id(lay) not in masks:
                if lay is self._initial:  # never reduced: the stock mask, from generate's own 2-D mask
                    masks[id(lay)] = self._mask(embeds, mask2d, cache, text_pos, i)
                else:  # the kept prompt slots, then every token decoded so far (generate's columns past the prompt)
                    if mask2d is not None:
                        new_cols = mask2d[:, self._prompt_len :]
                    else:
                        decoded = cache.layers[i].get_seq_length() - lay.valid.shape[1] + t
                        new_cols = torch.ones(b, decoded, dtype=torch.long, device=embeds.device)
                    full = torch.cat([lay.valid.long(), new_cols.to(lay.valid.device)], dim=1)
                    masks[id(lay)] = self._mask(embeds, full, cache, None, i)
            plan = self.plans.get(i)
            if plan is not None and plan.zero_visual_keys and bool(lay.visual.any()) and cache is not None:
                hidden = self._zeroing_decode_layer(i, layer, hidden, cos_sin, lay, mask2d, cache)
                continue
            hidden = layer(hidden, attention_mask=masks[id(lay)], position_embeddings=cos_sin, position_ids=text_pos,
                           cache=cache, use_cache=use_cache, **kwargs)  # fmt: skip
        return hidden

    # -- layer plans: what a decoder layer computes for visual tokens ------------------------------------
    def _slice(self, i: int, layer: nn.Module, plan: LayerPlan, what: str) -> torch.Tensor | None:
        """Rows/columns of layer ``i``'s weights for the kept heads / neurons, cut once per attachment (a copy:
        slicing on every forward would copy them each time)."""
        key = (i, what)
        if key not in self._slices:
            attn, mlp = layer.self_attn, layer.mlp
            hd = attn.head_dim
            heads = torch.nonzero(plan.visual_heads).flatten() if plan.visual_heads is not None else None
            neurons = plan.visual_neurons
            if what in ("q_w", "q_b"):
                t = attn.q_proj.weight if what == "q_w" else attn.q_proj.bias
                out = None if t is None else t.view(attn.config.num_attention_heads, hd, *t.shape[1:])[
                    heads.to(t.device)].reshape(-1, *t.shape[1:])  # fmt: skip
            elif what == "o_w":
                w = attn.o_proj.weight
                out = w.view(w.shape[0], -1, hd)[:, heads.to(w.device)].reshape(w.shape[0], -1)
            else:  # gate/up rows and down columns of the kept neurons
                proj = getattr(mlp, what[:-2])
                t = proj.weight if what.endswith("_w") else proj.bias
                if t is None:
                    out = None
                elif what.startswith("down") and what.endswith("_w"):
                    out = t[:, neurons.to(t.device)]
                elif what.startswith("down"):
                    out = t
                else:
                    out = t[neurons.to(t.device)]
            self._slices[key] = None if out is None else out.contiguous()
        return self._slices[key]

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The model's rotary embedding of ``x`` ``[..., heads, rows, d]`` with ``cos``/``sin`` ``[..., rows, d]``."""
        cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)
        return (x * cos) + (rotate_half(x) * sin)

    def _planned_layer(self, i: int, layer: nn.Module, hidden: torch.Tensor, cur: _Layout, items, plan: LayerPlan,
                       cache) -> tuple[torch.Tensor, list[LayerWork]]:  # fmt: skip
        """Decoder layer ``i`` at prefill under ``plan`` (see the module docstring); returns its output and, per
        sample, the work it did. Padding slots pass through unchanged (nothing reads them)."""
        attn, mlp = layer.self_attn, layer.mlp
        b, s, _ = hidden.shape
        n_heads, hd = attn.config.num_attention_heads, attn.head_dim
        groups = attn.num_key_value_groups
        x = layer.input_layernorm(hidden)
        cos, sin = cur.cos_sin
        k = attn.k_proj(x).view(b, s, -1, hd).transpose(1, 2)
        v = attn.v_proj(x).view(b, s, -1, hd).transpose(1, 2)
        k = self._rope(k, cos, sin)
        if cache is not None:  # the cache holds every slot of the layout (text queries read the visual keys)
            k, v = cache.update(k, v, i)
        all_heads = torch.arange(n_heads, device=x.device)
        kept = torch.nonzero(plan.visual_heads.to(x.device)).flatten() if plan.visual_heads is not None else all_heads
        dropped = all_heads[~plan.visual_heads.to(x.device)] if plan.visual_heads is not None else all_heads[:0]
        kv_of = all_heads // groups  # query head j reads KV head j // groups
        attn_out = torch.zeros_like(hidden)
        works = []
        for bi in range(b):
            valid, vis = cur.valid[bi], cur.visual[bi] & cur.valid[bi]
            slots = torch.nonzero(valid).flatten()  # key slots, in order
            kb, vb = k[bi][:, slots], v[bi][:, slots]  # [kv, n, hd]
            key_visual = vis[slots]
            t_rows = torch.nonzero(valid & ~vis).flatten()
            v_rows = torch.nonzero(vis).flatten()
            if t_rows.numel():
                q = attn.q_proj(x[bi, t_rows]).view(-1, n_heads, hd).transpose(0, 1)
                q = self._rope(q, cos[bi, t_rows], sin[bi, t_rows])
                allowed = slots[None, :] <= t_rows[:, None]  # causal over the sample's real slots
                if plan.zero_visual_keys and dropped.numel():
                    o = torch.empty_like(q)
                    o[kept] = _sdpa(q[kept], kb[kv_of[kept]], vb[kv_of[kept]], allowed, attn.scaling)
                    o[dropped] = _zeroed_visual_keys(q[dropped], kb[kv_of[dropped]], vb[kv_of[dropped]], allowed,
                                                     key_visual, attn.scaling)  # fmt: skip
                else:
                    o = _sdpa(q, kb[kv_of], vb[kv_of], allowed, attn.scaling)
                attn_out[bi, t_rows] = attn.o_proj(o.transpose(0, 1).reshape(t_rows.numel(), -1))
            keys = None
            if v_rows.numel() and kept.numel():
                if plan.visual_heads is None:
                    q = attn.q_proj(x[bi, v_rows])
                else:
                    q = F.linear(x[bi, v_rows], self._slice(i, layer, plan, "q_w"), self._slice(i, layer, plan, "q_b"))
                q = self._rope(q.view(-1, kept.numel(), hd).transpose(0, 1), cos[bi, v_rows], sin[bi, v_rows])
                if plan.visual_window is None:
                    o = _sdpa(q, kb[kv_of[kept]], vb[kv_of[kept]], slots[None, :] <= v_rows[:, None], attn.scaling)
                else:
                    o, keys = self._window_attention(q, kb, vb, kv_of[kept], slots, key_visual, v_rows, cur, items,
                                                     bi, plan, attn.scaling)  # fmt: skip
                o = o.transpose(0, 1).reshape(v_rows.numel(), -1)
                if plan.visual_heads is None:
                    attn_out[bi, v_rows] = attn.o_proj(o)
                else:
                    attn_out[bi, v_rows] = F.linear(o, self._slice(i, layer, plan, "o_w"), attn.o_proj.bias)
            elif v_rows.numel() and attn.o_proj.bias is not None:  # no head computed: only o_proj's bias remains
                attn_out[bi, v_rows] = attn.o_proj.bias
            works.append(LayerWork(
                tokens=int(slots.numel()), visual=int(v_rows.numel()),
                visual_head_share=kept.numel() / n_heads, visual_keys=keys,
                visual_neuron_share=(plan.visual_neurons.numel() / mlp.intermediate_size
                                     if plan.visual_neurons is not None else 1.0),
            ))  # fmt: skip
        hidden = hidden + attn_out
        y = layer.post_attention_layernorm(hidden)
        mlp_out = torch.zeros_like(hidden)
        text = cur.valid & ~cur.visual
        visual = cur.valid & cur.visual
        if bool(text.any()):
            mlp_out[text] = mlp(y[text])
        if bool(visual.any()):
            if plan.visual_neurons is None:
                mlp_out[visual] = mlp(y[visual])
            else:
                yv = y[visual]
                gate = F.linear(yv, self._slice(i, layer, plan, "gate_proj_w"), self._slice(i, layer, plan, "gate_proj_b"))
                up = F.linear(yv, self._slice(i, layer, plan, "up_proj_w"), self._slice(i, layer, plan, "up_proj_b"))
                mlp_out[visual] = F.linear(mlp.act_fn(gate) * up, self._slice(i, layer, plan, "down_proj_w"),
                                           self._slice(i, layer, plan, "down_proj_b"))  # fmt: skip
        return hidden + mlp_out, works

    def _window_attention(self, q, k, v, kv_heads, slots, key_visual, v_rows, cur: _Layout, items, bi: int,
                          plan: LayerPlan, scale: float) -> tuple[torch.Tensor, float]:  # fmt: skip
        """Visual queries ``q`` ``[h, nv, d]`` over the text keys before them and the visual keys of their window;
        ``k``/``v`` ``[kv, n, d]`` are the sample's real slots ``slots`` per KV head and ``kv_heads`` ``[h]`` the KV
        head each query head reads. Returns ``[h, nv, d]`` and the mean number of keys per query the window needs
        (all text keys + its in-grid neighbours, the full-square count)."""
        nbr, ok, neighbours = self._neighbour_keys(cur, items, bi, plan, slots, v_rows)  # [nv, W] each
        text_pos = torch.nonzero(~key_visual).flatten()
        text_ok = slots[text_pos][None, :] <= v_rows[:, None]  # [nv, nt] causal
        out = torch.empty_like(q)
        # Neighbour keys are gathered once per KV head (not per query head: GQA shares them) as [rows, W, d]; a
        # chunk of query rows at a time bounds that memory.
        chunk = max(1, (1 << 24) // max(1, nbr.shape[1] * q.shape[-1]))
        for g in torch.unique(kv_heads).tolist():
            heads = torch.nonzero(kv_heads == g).flatten()
            kt, vt = k[g, text_pos], v[g, text_pos]  # [nt, d]
            for c in range(0, q.shape[1], chunk):
                qc = q[heads, c : c + chunk]  # [hg, rows, d]
                idx, okc = nbr[c : c + chunk], ok[c : c + chunk]
                kn, vn = k[g][idx], v[g][idx]  # [rows, W, d]
                st = torch.matmul(qc, kt.T) * scale
                sn = torch.einsum("hqd,qwd->hqw", qc, kn) * scale
                st = st.masked_fill(~text_ok[c : c + chunk], float("-inf"))
                sn = sn.masked_fill(~okc, float("-inf"))
                p = torch.softmax(torch.cat([st, sn], dim=-1), dim=-1, dtype=torch.float32).to(q.dtype)
                pt, pn = p[..., : kt.shape[0]], p[..., kt.shape[0] :]
                out[heads, c : c + chunk] = torch.matmul(pt, vt) + torch.einsum("hqw,qwd->hqd", pn, vn)
        return out, float(text_pos.numel()) + neighbours

    def _neighbour_keys(self, cur: _Layout, items, bi: int, plan: LayerPlan, slots: torch.Tensor,
                        v_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:  # fmt: skip
        """For each visual query slot of sample ``bi``: the positions (in ``slots``) of the visual tokens of its own
        item within ``(w-1)//2`` cells on every grid axis (itself included), and which of them exist (in the grid,
        still in the layout, and before the query when the window is causal); ``[nv, W]`` each, padded; and the
        mean neighbour count per query. Every layer of one prefill with the same layout and window shares them."""
        window, causal = plan.visual_window, plan.visual_window_causal
        key = (id(cur), bi, window, causal)
        if key in self._neighbours:
            return self._neighbours[key]
        device = slots.device
        origin = cur.origin[bi]
        position = torch.full((int(origin.max()) + 1,), -1, dtype=torch.long, device=device)
        position[origin[slots]] = torch.arange(slots.numel(), device=device)  # original index -> key position
        o = origin[v_rows]
        r = (window - 1) // 2
        found, widest = [], 1
        for item in items[bi]:
            member = (o >= item.start) & (o < item.stop)
            if not bool(member.any()):
                continue
            t, h, w = item.grid
            rel = o[member] - item.start
            ti, hi, wi = rel // (h * w), (rel // w) % h, rel % w
            # offsets beyond the grid's extent can never land inside it: a single-frame image gets no t offsets
            dt, dh, dw = torch.meshgrid(*(torch.arange(-min(r, e - 1), min(r, e - 1) + 1, device=device)
                                          for e in (t, h, w)), indexing="ij")  # fmt: skip
            nt, nh, nw = ti[:, None] + dt.flatten(), hi[:, None] + dh.flatten(), wi[:, None] + dw.flatten()
            inside = (nt >= 0) & (nt < t) & (nh >= 0) & (nh < h) & (nw >= 0) & (nw < w)
            orig = (item.start + (nt * h + nh) * w + nw).clamp(0, position.numel() - 1)
            found.append((member, torch.where(inside, position[orig], -1)))
            widest = max(widest, found[-1][1].shape[1])
        rows = torch.full((v_rows.numel(), widest), -1, dtype=torch.long, device=device)
        for member, pos in found:
            rows[member, : pos.shape[1]] = pos
        ok = rows >= 0
        # the analytic count: every neighbour in the window, before and after (the full-square convention of
        # DecoderShape.layer_flops, which counts all n keys of a causal query too)
        count = float(ok.sum(1).float().mean()) if v_rows.numel() else 0.0
        rows = rows.clamp(min=0)
        if causal:
            ok &= slots[rows] <= v_rows[:, None]
        self._neighbours[key] = (rows, ok, count)
        return self._neighbours[key]

    def _zeroing_decode_layer(self, i: int, layer: nn.Module, hidden, cos_sin, lay: _Layout, mask2d, cache):
        """A decode step of layer ``i`` whose plan zeroes, in the heads visual tokens do not use, every query's
        probabilities toward the prompt's visual keys after the softmax (no renormalisation); the rest is the
        stock layer's arithmetic."""
        attn = layer.self_attn
        plan = self.plans[i]
        b, t, _ = hidden.shape
        n_heads, hd = attn.config.num_attention_heads, attn.head_dim
        x = layer.input_layernorm(hidden)
        cos, sin = cos_sin
        q = self._rope(attn.q_proj(x).view(b, t, -1, hd).transpose(1, 2), cos, sin)
        k = self._rope(attn.k_proj(x).view(b, t, -1, hd).transpose(1, 2), cos, sin)
        v = attn.v_proj(x).view(b, t, -1, hd).transpose(1, 2)
        k, v = cache.update(k, v, i)
        total = k.shape[2]
        prompt = lay.valid.shape[1]
        if lay is self._initial and mask2d is not None:
            valid = mask2d.bool()
        elif mask2d is not None:
            valid = torch.cat([lay.valid, mask2d[:, self._prompt_len :].bool()], dim=1)
        else:
            valid = torch.cat([lay.valid, torch.ones(b, total - prompt, dtype=torch.bool, device=x.device)], dim=1)
        valid = valid[:, -total:].to(x.device)
        key_visual = torch.cat([lay.visual, torch.zeros(b, total - prompt, dtype=torch.bool, device=x.device)], dim=1)
        allowed = valid[:, None, :] & (torch.arange(total, device=x.device)[None, :] <= total - t +
                                       torch.arange(t, device=x.device)[:, None])[None]  # fmt: skip
        kv_of = torch.arange(n_heads, device=x.device) // attn.num_key_value_groups
        kr, vr = k[:, kv_of], v[:, kv_of]  # [B, heads, K, d]
        scores = torch.matmul(q, kr.transpose(-1, -2)) * attn.scaling
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        dropped = ~plan.visual_heads.to(x.device)
        zero = dropped[None, :, None, None] & key_visual[:, None, None, :]
        p = p.masked_fill(zero, 0.0)
        o = torch.matmul(p, vr).transpose(1, 2).reshape(b, t, -1)
        hidden = hidden + attn.o_proj(o)
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    # -- attention rows for selection rules -----------------------------------------------------------
    @torch.no_grad()
    def _attention(self, layer: nn.Module, layer_input: torch.Tensor, cur: _Layout, queries: torch.Tensor,
                   rope: bool = True, causal: bool = True) -> torch.Tensor:  # fmt: skip
        """Attention probabilities of decoder ``layer`` for the query slots ``queries`` ``[B, R]`` over all slots,
        fp32 ``[B, heads, R, S]``, from the layer's input. ``rope=False``: from the projections before the rotary
        embedding (PruneVid's reference); ``causal=False``: keys after the query are not masked. Padding keys are
        always masked; a query slot of -1 gives a row of zeros."""
        attn = layer.self_attn
        b, s, _ = layer_input.shape
        r = queries.shape[1]
        d = attn.head_dim
        h = layer.input_layernorm(layer_input)
        qi = queries.clamp(min=0)
        q = attn.q_proj(_gather(h, qi, 0, 1)).float().view(b, r, -1, d).transpose(1, 2)  # [B, heads, R, d]
        k = attn.k_proj(h).float().view(b, s, -1, d).transpose(1, 2)  # [B, kv, S, d]
        if rope:
            cos, sin = (c.float().unsqueeze(1) for c in cur.cos_sin)
            qcos, qsin = (_gather(c.squeeze(1), qi, 0, 1).unsqueeze(1) for c in (cos, sin))
            q = q * qcos + rotate_half(q) * qsin
            k = k * cos + rotate_half(k) * sin
        k = k.repeat_interleave(attn.num_key_value_groups, dim=1)  # query head j reads KV head j // groups
        scores = torch.matmul(q, k.transpose(-1, -2)) * attn.scaling  # [B, heads, R, S]
        allowed = cur.valid[:, None, None, :].expand(b, 1, r, s)
        if causal:
            allowed = allowed & (torch.arange(s, device=q.device)[None, None, :] <= qi[:, :, None])[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        return torch.where((queries >= 0)[:, None, :, None], probs, torch.zeros_like(probs))


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of queries ``q`` ``[h, r, d]`` over ``k``/``v`` ``[h, n, d]`` where ``allowed`` ``[r, n]``."""
    return F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=allowed[None, None], scale=scale)[0]


def _zeroed_visual_keys(q, k, v, allowed, key_visual, scale: float) -> torch.Tensor:
    """Like :func:`_sdpa`, but the probabilities toward visual keys are set to zero after the softmax, without
    renormalising (the released YOPO code's head mask, applied to every query of a dropped head)."""
    scores = (torch.matmul(q, k.transpose(-1, -2)) * scale).masked_fill(~allowed, float("-inf"))
    p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p.masked_fill(key_visual[None, None, :], 0.0), v)


def _grab_input(store: dict, module: nn.Module, args: tuple) -> None:
    store["x"] = args[0].detach()
