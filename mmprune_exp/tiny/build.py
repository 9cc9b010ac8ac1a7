"""Config, processor and chat template of the tiny Qwen2.5-VL-architecture model.

Everything here is stock transformers: ``Qwen2_5_VLConfig`` / ``Qwen2_5_VLForConditionalGeneration``, the
``Qwen2VLImageProcessor`` and ``Qwen2VLVideoProcessor`` and ``Qwen2_5_VLProcessor``. Only the sizes are
small, so code written against a real Qwen2.5-VL checkpoint runs unchanged on this one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from ..data.scenes import IMAGE_SIZE, VIDEO_SIZE
from .tokenizer import (
    IM_END,
    IMAGE_PAD,
    PAD_TOKEN,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    build_tokenizer,
)

# Qwen2.5-VL's message format without its default system prompt (it would add ~30 tokens to every
# sequence of a model whose whole prompt is ~40 tokens). An explicit system message is still rendered.
# The vision placeholders are the ones Qwen2_5_VLProcessor expands to one pad per merged visual token.
CHAT_TEMPLATE = r"""{%- for message in messages -%}
{{- '<|im_start|>' + message['role'] + '\n' -}}
{%- if message['content'] is string -%}
{{- message['content'] -}}
{%- else -%}
{%- for content in message['content'] -%}
{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}
{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
{%- elif content['type'] == 'video' or 'video' in content -%}
{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
{%- elif 'text' in content -%}
{{- content['text'] -}}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n' -}}
{%- endif -%}"""

# Patch 7 with Qwen's 2 x 2 merge: one merged visual token per 14 x 14 pixels, so a 112 x 112 scene gives
# 16 x 16 patches -> 8 x 8 = 64 merged tokens (each 28-pixel grid cell of the scenes is 2 x 2 tokens), enough
# for visual-token pruning to have something to choose from, at the scene size the model was always
# trained on. (224-pixel scenes at patch 14 give the same 64 tokens, but 4x the pixels per patch and a
# coordinate vocabulary twice as large.) qwen-vl-utils resizes by patch x merge = 14 pixels.
PATCH_SIZE = 7
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
# Pixel budget: images up to IMAGE_SIZE x IMAGE_SIZE keep their size (112 x 112 -> 64 merged tokens); larger
# inputs are downscaled to that budget, which is all this model was trained on. The minimum is the synthetic
# video frame (56 x 56 -> 16 merged tokens per temporal patch), so those frames are never upscaled.
MIN_PIXELS = VIDEO_SIZE * VIDEO_SIZE
MAX_PIXELS = IMAGE_SIZE * IMAGE_SIZE


@dataclass
class TinyArch:
    """Sizes of the tiny model (the defaults are what the shipped checkpoint uses)."""

    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 512
    mrope_section: list[int] = field(default_factory=lambda: [4, 6, 6])  # sums to head_dim / 2
    rope_theta: float = 10_000.0  # sequences are < 300 tokens; a long-context theta only wastes frequencies
    vision_hidden: int = 128
    vision_depth: int = 2
    vision_heads: int = 4
    vision_intermediate: int = 256
    tie_word_embeddings: bool = True
    # Qwen's 0.02 suits hidden sizes in the thousands; at 128 it makes every product of two fresh matrices
    # (value x output projection, embedding x head) tiny, which stalls learning from scratch.
    init_std: float = 0.06

    def to_dict(self) -> dict:
        return asdict(self)


def build_processor() -> Qwen2_5_VLProcessor:
    tokenizer = build_tokenizer(chat_template=CHAT_TEMPLATE)
    size = {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    image_processor = Qwen2VLImageProcessor(
        size=size, patch_size=PATCH_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE, merge_size=MERGE_SIZE
    )
    video_processor = Qwen2VLVideoProcessor(
        size=size,
        patch_size=PATCH_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        merge_size=MERGE_SIZE,
        # Frames are passed as already-sampled lists; cap_pixels_per_frame=True is the reference behaviour
        # (and silences the "default will change" warning).
        do_sample_frames=False,
        cap_pixels_per_frame=True,
    )
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(tokenizer, arch: TinyArch | None = None) -> Qwen2_5_VLConfig:
    arch = arch or TinyArch()
    specials = (PAD_TOKEN, IM_END, IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END)
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in specials}
    # Round the embedding table up to a multiple of 64 like real checkpoints do (unused rows are harmless).
    vocab_size = -(-len(tokenizer) // 64) * 64
    text_config = {
        "vocab_size": vocab_size,
        "hidden_size": arch.text_hidden,
        "intermediate_size": arch.text_intermediate,
        "num_hidden_layers": arch.text_layers,
        "num_attention_heads": arch.text_heads,
        "num_key_value_heads": arch.text_kv_heads,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": arch.rope_theta, "mrope_section": list(arch.mrope_section)},
        "bos_token_id": None,
        "eos_token_id": ids[IM_END],
        "pad_token_id": ids[PAD_TOKEN],
        "use_sliding_window": False,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "initializer_range": arch.init_std,
    }
    vision_config = {
        "depth": arch.vision_depth,
        "hidden_size": arch.vision_hidden,
        "intermediate_size": arch.vision_intermediate,
        "num_heads": arch.vision_heads,
        "out_hidden_size": arch.text_hidden,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": MERGE_SIZE,
        "temporal_patch_size": TEMPORAL_PATCH_SIZE,
        # A 112-pixel window (8 x 8 merged tokens at patch 7) covers a whole 112 x 112 image, so window
        # attention equals full attention here.
        "window_size": IMAGE_SIZE,
        "fullatt_block_indexes": [arch.vision_depth - 1],
        "tokens_per_second": 2,
        "initializer_range": arch.init_std,
    }
    head_dim = arch.text_hidden // arch.text_heads
    if sum(arch.mrope_section) * 2 != head_dim:
        raise ValueError(f"mrope_section {arch.mrope_section} must sum to head_dim/2 = {head_dim // 2}")
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=arch.tie_word_embeddings,
    )


def build_model(config: Qwen2_5_VLConfig, attn_implementation: str = "sdpa") -> Qwen2_5_VLForConditionalGeneration:
    """A freshly initialised model (seed torch before calling for reproducible weights)."""
    config._attn_implementation = attn_implementation
    return Qwen2_5_VLForConditionalGeneration(config)
