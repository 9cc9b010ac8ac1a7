"""Adapter interface, the generation request record, and the adapter registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torch import nn

from mmprune_exp.config.schema import ModelConfig

if TYPE_CHECKING:
    from mmprune_exp.models.offload import LayerStreamer
from mmprune_exp.errors import ConfigError, ModelLoadError
from mmprune_exp.models.token_reduction import DecoderShape, LayerPlan, ReductionPoint
from mmprune_exp.registry import Registry


@dataclass
class Request:
    """One prompt for the model: a user turn with images/videos placed before the text.

    ``answer`` is set for calibration conversations (prompt + answer), and left ``None`` for generation.
    ``turns`` holds further (user, assistant) exchanges of a multi-turn calibration conversation. ``raw``
    feeds ``text`` as plain tokens without the chat template (text-only calibration, like Wanda's C4).
    """

    text: str
    images: list[Image.Image] = field(default_factory=list)
    videos: list[list[Image.Image]] = field(default_factory=list)
    answer: str | None = None
    turns: list[tuple[str, str]] = field(default_factory=list)
    raw: bool = False


class ModelAdapter(ABC):
    """What the rest of the package may ask of a loaded model.

    The class attributes describe the family without loading anything, so a config naming parts or
    linears the family does not have fails at validation (:meth:`check_targets`), before the model loads.
    """

    #: parts of the model ``pruner.scope`` may name
    model_parts: tuple[str, ...] = ()
    #: attribute names of the linears inside one language-decoder layer (what ``pruner.modules`` may name)
    decoder_linears: tuple[str, ...] = ()
    #: module path of the language decoder's layer list; a target under it is a decoder linear
    decoder_prefix: str = ""

    model: nn.Module
    processor: object
    device: torch.device
    #: streams decoder layers from disk while pruning (``model.offload=disk``); None when fully loaded
    layer_streamer: LayerStreamer | None = None

    @classmethod
    def check_targets(cls, scope: list[str], modules: list[str], family: str = "") -> None:
        """Raise :class:`ConfigError` naming ``pruner.scope`` / ``pruner.modules`` entries this family lacks."""
        family = f"model.family={family}" if family else cls.__name__
        bad = [p for p in scope if p not in cls.model_parts]
        if bad:
            raise ConfigError(
                f"pruner.scope={list(scope)} is invalid: {family} has no part(s) {bad}; "
                f"choose from {list(cls.model_parts)}"
            )
        bad = [m for m in modules if m not in cls.decoder_linears]
        if bad:
            raise ConfigError(
                f"pruner.modules={list(modules)} is invalid: a {family} decoder layer has no linear(s) {bad}; "
                f"choose from {list(cls.decoder_linears)}"
            )

    def decoder_layer_of(self, module_name: str) -> int | None:
        """Decoder layer index of a language-decoder linear (``<decoder_prefix>.3.mlp.up_proj``), else None."""
        if not module_name.startswith(self.decoder_prefix + "."):
            return None
        return self.layer_index(module_name)

    @abstractmethod
    def generate(self, requests: list[Request], max_new_tokens: int) -> list[str]:
        """Greedy-decode a batch; returns the new text of each request, special tokens removed."""

    @abstractmethod
    def encode(self, requests: list[Request]) -> dict[str, torch.Tensor]:
        """Processor outputs (input_ids, attention_mask, pixel_values, grid sizes) on the model's device."""

    @abstractmethod
    def decoder_layers(self) -> nn.ModuleList:
        """The language model's decoder layers, in order."""

    @abstractmethod
    def target_linears(self, scope: list[str], modules: list[str]) -> dict[str, nn.Linear]:
        """Linear layers to prune, by full module name, for the given model parts and decoder linears."""

    @abstractmethod
    def modality_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Bool tensor, True where a token is a visual (image or video) placeholder token."""

    def last_query_attention(self, layer: nn.Module, inputs) -> torch.Tensor:
        """How much the last token attends to each token of one sample in decoder ``layer`` (mean over heads,
        fp32 ``[N]``), from the layer's captured inputs: TAMP's AMIA prior. A family that supports it overrides."""
        raise NotImplementedError(f"{type(self).__name__} cannot compute the last-query attention prior")

    def token_reduction(self, points: list[ReductionPoint], vision_stats: bool = False,
                        plans: dict[int, LayerPlan] | None = None):  # fmt: skip
        """A context manager that installs visual-token reduction ``points`` into the model's forward (see
        :mod:`mmprune_exp.models.token_reduction`); its ``records`` and ``timing`` describe the latest prefill.
        ``vision_stats``: also collect the vision tower's per-token attention statistics (VisionZip). ``plans``:
        per decoder layer, what it computes for visual tokens or observes (YOPO)."""
        raise NotImplementedError(f"{type(self).__name__} does not support token pruning")

    def decoder_shape(self) -> DecoderShape:
        """Sizes the analytic FLOPs and KV-cache figures of the token report need."""
        raise NotImplementedError(f"{type(self).__name__} does not describe its decoder shape")

    def save(self, path: Path) -> None:
        """Write a checkpoint plain transformers can load: pruned weights are dense tensors with zeros."""
        self.model.save_pretrained(path, safe_serialization=True)
        self.processor.save_pretrained(path)

    def input_groups(self, names: list[str]) -> list[list[str]]:
        """Partition linear names into groups that always receive the same input tensor.

        Default: no sharing (each linear alone). Adapters that know their layers override this.
        """
        return [[n] for n in names]

    @staticmethod
    def layer_index(module_name: str) -> int | None:
        """Decoder layer index of a module name like ``...layers.3.mlp.up_proj`` (None outside layers)."""
        parts = module_name.split(".")
        for i, part in enumerate(parts[:-1]):
            if part == "layers" and parts[i + 1].isdigit():
                return int(parts[i + 1])
        return None


ADAPTERS = Registry("model.family", ModelLoadError)
register_adapter = ADAPTERS.register


def load_adapter(cfg: ModelConfig) -> ModelAdapter:
    return ADAPTERS.get_factory(cfg.family)(cfg)


def check_targets(family: str, scope: list[str], modules: list[str]) -> None:
    """Check ``pruner.scope`` and ``pruner.modules`` against what ``model.family`` offers (nothing loads)."""
    ADAPTERS.get_factory(family).check_targets(scope, modules, family)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"model.device={name!r} but CUDA is not available here; use model.device=cpu")
    return device
