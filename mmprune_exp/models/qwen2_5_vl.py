"""Qwen2.5-VL adapter (transformers ``Qwen2_5_VLForConditionalGeneration`` + ``AutoProcessor``).

Layout in transformers 5.x: ``model.model.visual`` (vision tower with ``blocks`` and ``merger``),
``model.model.language_model.layers`` (decoder layers), ``model.lm_head``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from mmprune_exp.config.schema import ModelConfig
from mmprune_exp.models.base import ModelAdapter, ModelLoadError, Request, register_adapter, resolve_device
from mmprune_exp.models.offload import LayerStreamer
from mmprune_exp.models.token_reduction import DecoderShape

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "auto": "auto"}


def _looks_local(path: str) -> bool:
    # HF ids are "org/name"; anything absolute, relative-dotted or home-based is meant as a directory.
    return path.startswith(("/", "./", "../", "~")) or os.path.isdir(path)


def _offline_hint(path: str) -> str:
    return (
        f"model.path={path!r} could not be loaded from the Hugging Face hub (no network, or not in the local cache). "
        "Download the weights where there is network (e.g. `huggingface-cli download "
        f"{path} --local-dir /data/{Path(path).name}`) and pass model.path=/data/{Path(path).name}."
    )


def _checkpoint_names(name: str) -> list[str]:
    """Names a parameter may have in a checkpoint: transformers 5 keeps Qwen's original layout on disk."""
    for new, old in (("model.language_model.", "model."), ("model.visual.", "visual.")):
        if name.startswith(new):
            return [old + name[len(new) :], name]
    return [name]


def chat_prompt(processor, request: Request) -> str:
    """The text the model sees for ``request``: the processor's chat template, media placeholders before the text.

    The one prompt builder of this model family: the adapter uses it, and so does the tiny model's trainer
    (which has a processor but no adapter while it builds training batches).
    """
    if request.raw:
        return request.text
    content = [{"type": "image"} for _ in request.images]
    content += [{"type": "video"} for _ in request.videos]
    content.append({"type": "text", "text": request.text})
    messages = [{"role": "user", "content": content}]
    if request.answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": request.answer}]})
    for user, assistant in request.turns:
        messages.append({"role": "user", "content": [{"type": "text", "text": user}]})
        messages.append({"role": "assistant", "content": [{"type": "text", "text": assistant}]})
    if len(messages) == 1:  # a prompt: end with the assistant header so the model answers next
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # A conversation: every turn closed, nothing left open.
    return processor.apply_chat_template(messages, add_generation_prompt=False, tokenize=False).rstrip("\n")


@register_adapter("qwen2_5_vl")
class Qwen25VLAdapter(ModelAdapter):
    model_parts = ("language", "vision", "merger", "lm_head")
    decoder_linears = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    decoder_prefix = "model.language_model.layers"

    def __init__(self, cfg: ModelConfig):
        from transformers import AutoConfig, AutoProcessor, Qwen2_5_VLForConditionalGeneration

        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        path = os.path.expanduser(cfg.path)
        if _looks_local(path) and not os.path.isdir(path):
            raise ModelLoadError(
                f"model.path={cfg.path!r} is not a directory. Point model.path at a folder holding config.json "
                "and the safetensors weights (or at a Hugging Face id such as Qwen/Qwen2.5-VL-7B-Instruct)."
            )
        local_only = cfg.local_files_only or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
        # The config is tiny: loading it first turns a wrong path or a missing network into an error in
        # seconds, before gigabytes of weights are touched.
        try:
            hf_config = AutoConfig.from_pretrained(path, local_files_only=local_only)
        except OSError as err:
            if _looks_local(path):
                raise ModelLoadError(f"model.path={cfg.path!r}: no usable config.json there ({err})") from err
            raise ModelLoadError(_offline_hint(path)) from err
        if hf_config.model_type != "qwen2_5_vl":
            raise ModelLoadError(
                f"model.path={cfg.path!r} holds a {hf_config.model_type!r} checkpoint, but model.family=qwen2_5_vl"
            )
        self.layer_streamer = None
        try:
            self.processor = AutoProcessor.from_pretrained(
                path,
                size={"shortest_edge": cfg.min_pixels, "longest_edge": cfg.max_pixels},
                local_files_only=local_only,
            )
            if cfg.offload == "disk":
                self.model = self._load_streamed(path, hf_config, local_only)
            else:
                self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                    path,
                    dtype=DTYPES[cfg.dtype],
                    attn_implementation=cfg.attn_implementation,
                    local_files_only=local_only,
                ).to(self.device)
        except OSError as err:
            raise ModelLoadError(_offline_hint(path) if not _looks_local(path) else str(err)) from err
        self._finish_setup()

    @classmethod
    def from_loaded(cls, model: nn.Module, processor, device: torch.device | str | None = None) -> Qwen25VLAdapter:
        """Wrap a model and processor that are already in memory (e.g. the tiny model's trainer evaluating
        what it just trained). ``cfg`` is ``None``: nothing was loaded from a config. ``device`` defaults
        to where the model's parameters are; the model is not moved."""
        self = cls.__new__(cls)
        self.cfg = None
        self.model, self.processor, self.layer_streamer = model, processor, None
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self._finish_setup()
        return self

    def _finish_setup(self) -> None:
        self.model.eval()
        # Batched greedy generation needs the prompts aligned at the right edge.
        self.processor.tokenizer.padding_side = "left"
        self.tokenizer = self.processor.tokenizer
        config = self.model.config
        self.visual_token_ids = torch.tensor([config.image_token_id, config.video_token_id], device=self.device)

    def _load_streamed(self, path: str, hf_config, local_only: bool):
        """Build the model with decoder layers on ``meta`` and everything else loaded (``model.offload=disk``)."""
        from transformers import Qwen2_5_VLForConditionalGeneration

        if not os.path.isdir(path):
            from huggingface_hub import snapshot_download

            path = snapshot_download(path, local_files_only=local_only, allow_patterns=["*.json", "*.safetensors"])
        dtype = DTYPES[self.cfg.dtype]
        dtype = hf_config.get_text_config().dtype if dtype == "auto" else dtype
        hf_config._attn_implementation = self.cfg.attn_implementation
        with torch.device("meta"):
            model = Qwen2_5_VLForConditionalGeneration._from_config(hf_config, dtype=dtype)
        # Rotary tables are non-persistent buffers (not in the checkpoint): rebuild them for real.
        text, vision = model.model.language_model, model.model.visual
        text.rotary_emb = type(text.rotary_emb)(config=text.config).to(self.device)
        vision.rotary_pos_emb = type(vision.rotary_pos_emb)(vision.config).to(self.device)
        self.layer_streamer = LayerStreamer(model, self.decoder_prefix, Path(path), _checkpoint_names, dtype)
        self.layer_streamer.load_non_layer_weights(self.device)
        if model.config.get_text_config().tie_word_embeddings:
            model.lm_head.weight = text.embed_tokens.weight
        missing = [
            n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.is_meta and not n.startswith(self.decoder_prefix + ".")
        ]  # fmt: skip
        if missing:
            raise ModelLoadError(f"model.offload=disk: {len(missing)} tensors missing from {path}, e.g. {missing[:3]}")
        return model

    def save(self, path: Path) -> None:
        if self.layer_streamer is not None:
            raise RuntimeError("a disk-offloaded model is written by its LayerStreamer (pruned_model/), not save()")
        super().save(path)

    # -- prompts -----------------------------------------------------------------------------------
    def build_prompt(self, request: Request) -> str:
        return chat_prompt(self.processor, request)

    def encode(self, requests: list[Request]) -> dict[str, torch.Tensor]:
        from mmprune_exp.models.vision_inputs import processor_media

        # Images and videos (PIL, files, message dicts) load through qwen-vl-utils, see vision_inputs.
        images = [img for r in requests for img in r.images]
        videos = [vid for r in requests for vid in r.videos]
        kwargs = processor_media(self.processor, images, videos)
        batch = self.processor(
            text=[self.build_prompt(r) for r in requests], padding=True, return_tensors="pt", **kwargs
        )
        return {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}

    @torch.inference_mode()
    def generate(self, requests: list[Request], max_new_tokens: int) -> list[str]:
        inputs = self.encode(requests)
        out = self.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        new_tokens = out[:, inputs["input_ids"].shape[1] :]
        return [t.strip() for t in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    # -- structure ---------------------------------------------------------------------------------
    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.language_model.layers

    def target_linears(self, scope: list[str], modules: list[str]) -> dict[str, nn.Linear]:
        found: dict[str, nn.Linear] = {}
        parts = {
            "language": (self.decoder_prefix, lambda name: name.split(".")[-1] in modules),
            "vision": ("model.visual.blocks", lambda name: True),
            "merger": ("model.visual.merger", lambda name: True),
        }
        for part in scope:
            if part == "lm_head":
                if self.model.config.get_text_config().tie_word_embeddings:
                    raise ModelLoadError(
                        "pruner.scope includes lm_head, but this checkpoint ties lm_head to the input "
                        "embeddings; pruning it would prune the embeddings too. Remove lm_head from pruner.scope."
                    )
                found["lm_head"] = self.model.lm_head
                continue
            prefix, keep = parts[part]
            root = self.model.get_submodule(prefix)
            for name, module in root.named_modules():
                if isinstance(module, nn.Linear) and keep(name):
                    found[f"{prefix}.{name}"] = module
        if not found:
            raise ModelLoadError(f"no linear layers match pruner.scope={scope} and pruner.modules={modules}")
        return found

    # In a Qwen2.5-VL decoder layer q/k/v all read input_layernorm's output and gate/up read
    # post_attention_layernorm's output.
    _SHARED_INPUTS = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"})

    def input_groups(self, names: list[str]) -> list[list[str]]:
        groups: dict[tuple, list[str]] = {}
        for name in names:
            parent, _, leaf = name.rpartition(".")
            shared = next((i for i, members in enumerate(self._SHARED_INPUTS) if leaf in members), None)
            key = (parent, shared) if shared is not None and self.decoder_layer_of(name) is not None else (name,)
            groups.setdefault(key, []).append(name)
        return list(groups.values())

    def last_query_attention(self, layer: nn.Module, inputs) -> torch.Tensor:
        from mmprune_exp.models.attention_prior import last_query_attention

        return last_query_attention(layer, inputs)

    def token_reduction(self, points, vision_stats: bool = False, plans=None):
        from mmprune_exp.models.qwen_token_reduction import QwenTokenReduction

        return QwenTokenReduction(self.model, points, vision_stats, plans)

    def decoder_shape(self) -> DecoderShape:
        tc = self.model.config.get_text_config()
        head_dim = tc.hidden_size // tc.num_attention_heads
        return DecoderShape(
            layers=tc.num_hidden_layers, hidden=tc.hidden_size, kv_dim=tc.num_key_value_heads * head_dim,
            intermediate=tc.intermediate_size, dtype_bytes=self.model.dtype.itemsize,
        )  # fmt: skip

    def modality_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.isin(input_ids, self.visual_token_ids.to(input_ids.device))
