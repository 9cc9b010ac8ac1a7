"""AMIA's attention prior: the last query's attention over all tokens, mean over heads (TAMP, §5.6 / §8).

TAMP weighs each token by how much the *last* token attends to it in the current (still dense) decoder layer,
given that layer's input. Only one query row is needed, so this module projects q for the last position and K for
all positions and computes one softmax row per head: O(N·d) time and memory, no N×N matrix, no
``output_attentions`` (which needs eager attention and materialises every head's full map).

Model-family boundary: :func:`last_query_attention` knows the internals of a Qwen2-style decoder layer
(Qwen2-VL / Qwen2.5-VL in transformers: ``input_layernorm``, ``self_attn.{q,k}_proj`` with bias,
``head_dim``, ``num_key_value_groups``, ``scaling``, multimodal rotary embedding). Another family needs its own
function of the same signature; the model adapter is the natural owner of that choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # models/ does not import the pruners at run time
    from mmprune_exp.pruners.engine import LayerInputs

try:  # the same rotation the model applies (x·cos + rotate_half(x)·sin); present in transformers 4.x and 5.x
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import rotate_half
except ImportError:  # pragma: no cover - very old transformers

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


__all__ = ["last_query_attention", "mrope_cos_sin"]


def _mrope_section(attn: nn.Module) -> list[int]:
    """The temporal/height/width split of the rotary half-dimension (e.g. [16, 24, 24] for the 7B)."""
    config = getattr(attn, "config", None)
    for name in ("rope_parameters", "rope_scaling"):  # transformers 5.x, 4.x
        params = getattr(config, name, None)
        if isinstance(params, dict) and params.get("mrope_section"):
            return list(params["mrope_section"])
    raise ValueError(f"{type(attn).__name__} has no mrope_section in its config (not a Qwen2/2.5-VL attention?)")


def mrope_cos_sin(
    cos: torch.Tensor, sin: torch.Tensor, mrope_section: Sequence[int] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The captured rotary (cos, sin) as ``[batch, seq, head_dim]``, whatever transformers' layout.

    - transformers 5.x: the model's rotary embedding already interleaves the temporal/height/width frequencies
      by ``mrope_section`` and hands every layer ``[batch, seq, head_dim]``; returned unchanged.
    - transformers 4.x: the layer receives one table per axis, ``[3, batch, seq, head_dim]``, and
      ``apply_multimodal_rotary_pos_emb`` interleaves them on each call: chunk c of the head dimension, split by
      ``mrope_section * 2`` (the section repeated for the two rotated halves), comes from axis ``c % 3``.
      Done here once, exactly as that function does, so that q and K rotate with the same tables.
    """
    if cos.dim() == 3:
        return cos, sin
    if cos.dim() != 4 or cos.shape[0] != 3:
        raise ValueError(
            f"unexpected rotary table shape {tuple(cos.shape)}: want [batch, seq, d] or [3, batch, seq, d]"
        )
    if mrope_section is None:
        raise ValueError("per-axis rotary tables ([3, batch, seq, d]) need the config's mrope_section")
    split = list(mrope_section) * 2
    if sum(split) != cos.shape[-1]:
        raise ValueError(f"mrope_section {list(mrope_section)} does not cover head_dim {cos.shape[-1]} (×2 halves)")

    def interleave(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([chunk[i % 3] for i, chunk in enumerate(t.split(split, dim=-1))], dim=-1)

    return interleave(cos), interleave(sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on x [batch, heads, seq, d] with cos/sin [batch, seq, d] (transformers' apply_rotary_pos_emb)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def _last_row_mask(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """The additive fp32 mask of the last query row, [1 or heads, n], or None when nothing is masked.

    Accepts the forms a decoder layer receives: a 4D ``[batch, 1|heads, q, n]`` mask (additive float, eager
    attention; or bool, True = attend) or a 2D ``[batch, n]`` padding mask (1 = token, 0 = padding). Causal
    masking never removes a key from the last row, so with the engine's unpadded batch-1 samples the row is all
    zeros (eager) or the mask is absent (SDPA, flash). A padding or sliding-window mask would matter, and is applied.
    """
    if mask is None:
        return None
    if not torch.is_tensor(mask):
        raise TypeError(f"unsupported attention_mask of type {type(mask).__name__}")
    if mask.dim() == 4:
        row = mask[0, :, -1, :]
    elif mask.dim() == 2:
        row = mask[0:1].bool()
        if not bool(row[0, -1]):
            raise ValueError("the last token is padding (right-padded batch): its attention row is not the prior")
    else:
        raise ValueError(f"unsupported attention_mask shape {tuple(mask.shape)}")
    if row.shape[-1] != n:
        raise ValueError(f"attention_mask covers {row.shape[-1]} keys, the sequence has {n}")
    if row.dtype == torch.bool:
        return torch.zeros(row.shape, dtype=torch.float32, device=row.device).masked_fill(~row, float("-inf"))
    return row.float()


@torch.no_grad()
def last_query_attention(
    layer: nn.Module,
    inputs: LayerInputs | tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]],
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention probabilities of the last query over all N keys, mean over heads: fp32 ``[N]`` summing to 1.

    Qwen2 / Qwen2.5-VL decoder layers only (see the module docstring). ``inputs`` is what the layer receives
    for one sample (batch 1), as :func:`~mmprune_exp.pruners.engine.collect_layer_inputs` captures it: a
    :class:`LayerInputs` (its ``position_embeddings`` and ``attention_mask`` kwargs are used), or a pair
    ``(hidden [1, N, H], (cos, sin))`` with ``attention_mask`` passed separately. Inputs are moved to the layer's
    device; the projections run in the layer's dtype, everything after them in fp32.

    Equals ``softmax(q_N·Kᵀ·scaling + mask_N)`` averaged over heads, i.e. row N of eager attention's
    ``attn_weights[0].mean(0)``: h = input_layernorm(x); q = q_proj(h_N), K = k_proj(h) (with their biases);
    both rotated with the captured multimodal rotary tables; each query head reads the KV head that
    ``repeat_kv`` gives it (head // num_key_value_groups), done as a grouped matmul instead of copying K.
    """
    if hasattr(inputs, "hidden"):  # a LayerInputs
        hidden = inputs.hidden
        position_embeddings = inputs.kwargs.get("position_embeddings")
        if attention_mask is None:
            attention_mask = inputs.kwargs.get("attention_mask")
    else:
        hidden, position_embeddings = inputs
    if position_embeddings is None:
        raise ValueError("no position_embeddings: pass the (cos, sin) the decoder layer receives")
    if hidden.dim() != 3 or hidden.shape[0] != 1:
        raise ValueError(f"one sample at a time: hidden must be [1, N, H], got {tuple(hidden.shape)}")

    attn = layer.self_attn
    weight = attn.q_proj.weight
    device = weight.device
    hidden = hidden.to(device=device, dtype=weight.dtype)
    n = hidden.shape[1]
    head_dim = attn.head_dim
    groups = attn.num_key_value_groups
    scaling = getattr(attn, "scaling", head_dim**-0.5)

    cos, sin = (t.to(device) for t in position_embeddings)
    section = _mrope_section(attn) if cos.dim() == 4 else None
    cos, sin = mrope_cos_sin(cos.float(), sin.float(), section)
    if cos.shape[-2] != n:
        raise ValueError(f"rotary tables cover {cos.shape[-2]} positions, the sequence has {n}")

    h = layer.input_layernorm(hidden)
    q = attn.q_proj(h[:, -1:]).float().view(1, 1, -1, head_dim).transpose(1, 2)  # [1, heads, 1, d]
    k = attn.k_proj(h).float().view(1, n, -1, head_dim).transpose(1, 2)  # [1, kv_heads, N, d]
    q = _rotate(q, cos[:, -1:], sin[:, -1:])
    k = _rotate(k, cos, sin)

    kv_heads = k.shape[1]
    if q.shape[1] != kv_heads * groups:
        raise ValueError(f"{q.shape[1]} query heads do not split into {kv_heads} KV heads × {groups}")
    # query head j uses KV head j // groups, as repeat_kv lays them out
    q = q.view(kv_heads, groups, head_dim)
    scores = torch.matmul(q, k[0].transpose(1, 2)).reshape(kv_heads * groups, n) * scaling  # [heads, N]
    mask = _last_row_mask(attention_mask.to(device) if torch.is_tensor(attention_mask) else attention_mask, n)
    if mask is not None:
        scores = scores + mask
    return torch.softmax(scores, dim=-1).mean(0)
