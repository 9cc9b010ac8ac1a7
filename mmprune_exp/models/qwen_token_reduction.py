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
from torch import nn

from mmprune_exp.errors import ConfigError
from mmprune_exp.models.attention_prior import rotate_half
from mmprune_exp.models.token_reduction import (
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

    def __init__(self, model: nn.Module, points: Sequence[ReductionPoint], vision_stats: bool = False):
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
        for i, layer in enumerate(self.text.layers):
            layer_input = hidden
            hidden = layer(hidden, attention_mask=mask, position_embeddings=cur.cos_sin, position_ids=cur.text_pos,
                           cache=cache, use_cache=use_cache, **kwargs)  # fmt: skip
            layouts.append(cur)
            for r, n in zip(records, cur.valid.sum(1).tolist()):
                r.tokens_per_layer.append(int(n))
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
            hidden = layer(hidden, attention_mask=masks[id(lay)], position_embeddings=cos_sin, position_ids=text_pos,
                           cache=cache, use_cache=use_cache, **kwargs)  # fmt: skip
        return hidden

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
