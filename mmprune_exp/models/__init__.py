"""Model adapters: the one place that knows a model family's internals.

Pruners, calibration and benchmarks talk to an adapter (prompts, generation, decoder layers, target
linears, modality masks), never to transformers classes directly.
"""

from mmprune_exp.models import qwen2_5_vl  # noqa: F401  (registers the adapter)
from mmprune_exp.models.base import ADAPTERS, ModelAdapter, ModelLoadError, Request, load_adapter, register_adapter

__all__ = ["ADAPTERS", "ModelAdapter", "ModelLoadError", "Request", "load_adapter", "register_adapter"]
