"""The sequential layer engine shared by the calibrated weight pruners (Wanda, SparseGPT, OWL, ...).

1. :func:`collect_layer_inputs` runs the full model (vision tower included) on each calibration sample and
   stops at decoder layer 0, keeping what that layer receives: hidden states, the M-RoPE position
   embeddings (the layer does not recompute them), the attention mask and position ids, plus the sample's
   visual-token mask.
2. :class:`SequentialEngine` then walks the decoder layers. For each layer it hooks the target linears and
   pushes every sample through the still-dense layer once (all statistics in one pass, fp32), lets the
   pruner change the weights, and re-runs the pruned layer to produce the next layer's inputs, so that
   the error of earlier pruned layers propagates (Wanda ``prune_wanda``, SparseGPT ``llama_sequential``).

Samples go through one at a time (batch size 1, no padding, no KV cache). Captured activations live on
``offload_device`` (CPU by default) and only the sample being processed is moved to the compute device.

What a statistic sees. A statistic (``make_stat(linear)``) has ``add(x)``, called with the Linear's input.
One that sets ``uses_output = True`` instead gets ``add(x, y, sample)``: the Linear's input, its output and a
:class:`Sample` (index, visual-token mask, and the values the pruner computed for this sample and layer before
the hooks ran, e.g. TAMP's attention prior). Input statistics are shared by the linears that read the same
tensor (q/k/v; gate/up); output statistics are one per Linear.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from mmprune_exp.models.base import ModelAdapter, Request

if TYPE_CHECKING:
    from mmprune_exp.checkpointing import PruneCheckpoint

log = logging.getLogger(__name__)


@dataclass
class LayerInputs:
    """What one decoder layer receives for one calibration sample (batch of 1)."""

    hidden: torch.Tensor  # [1, seq, hidden]
    kwargs: dict[str, Any]  # position_embeddings (cos, sin), attention_mask, position_ids, ...
    visual: torch.Tensor  # [seq] bool, True at image/video placeholder tokens

    def to(self, device: torch.device) -> LayerInputs:
        return LayerInputs(self.hidden.to(device), _move(self.kwargs, device), self.visual.to(device))


def _move(obj: Any, device: torch.device) -> Any:
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_move(o, device) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


@dataclass
class Sample:
    """What an output statistic knows about the sample whose activations it is given."""

    index: int  # position in the calibration set
    visual: torch.Tensor  # [seq] bool on the compute device, True at image/video tokens
    values: dict[str, Any]  # the pruner's per-sample, per-layer values (``prepare_sample``)


# prepare_sample(layer_index, layer, inputs_on_device) -> values for this sample and layer, computed from the
# layer's input before any hook runs (the layer is still dense)
SamplePreparer = Callable[[int, nn.Module, "LayerInputs"], dict[str, Any]]


class _StopForward(Exception):
    """Raised by the layer-0 hook: nothing after the first decoder layer is needed while capturing."""


# Per-call state that must not be replayed: a KV cache would grow across samples.
_DROP_KWARGS = ("past_key_values", "past_key_value", "use_cache", "cache_position")


def _truncate(batch: dict[str, Any], max_length: int, visual: torch.Tensor, index: int) -> dict[str, Any]:
    """Cut trailing text tokens beyond ``max_length``; never cut into the visual tokens."""
    length = batch["input_ids"].shape[1]
    if length <= max_length:
        return batch
    last_visual = int(visual.nonzero().max()) if visual.any() else -1
    if last_visual >= max_length:
        raise ValueError(
            f"calibration sample {index} has visual tokens up to position {last_visual}, beyond "
            f"calibration.max_length={max_length}: raise calibration.max_length or lower model.max_pixels"
        )
    # Every per-token tensor (input_ids, attention_mask, mm_token_type_ids, ...) is [1, length].
    return {
        k: v[:, :max_length] if torch.is_tensor(v) and v.dim() == 2 and v.shape == (1, length) else v
        for k, v in batch.items()
    }


@torch.no_grad()
def collect_layer_inputs(
    adapter: ModelAdapter,
    requests: list[Request],
    max_length: int,
    offload_device: torch.device | str = "cpu",
) -> list[LayerInputs]:
    """Inputs of decoder layer 0 for every calibration request, in order."""
    layers = adapter.decoder_layers()
    captured: list[tuple[tuple, dict]] = []

    def grab(module, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    out: list[LayerInputs] = []
    try:
        for index, request in enumerate(tqdm(requests, desc="calibration inputs", unit="sample")):
            batch = adapter.encode([request])
            visual = adapter.modality_mask(batch["input_ids"])[0]
            batch = _truncate(batch, max_length, visual, index)
            visual = visual[: batch["input_ids"].shape[1]]
            try:
                adapter.model(**batch, use_cache=False)
            except _StopForward:
                pass
            else:  # pragma: no cover - the hook always fires
                raise RuntimeError("decoder layer 0 was never called")
            args, kwargs = captured.pop()
            kwargs = {k: v for k, v in kwargs.items() if k not in _DROP_KWARGS}
            hidden = args[0] if args else kwargs.pop("hidden_states")
            out.append(
                LayerInputs(hidden.detach().to(offload_device), _move(kwargs, offload_device), visual.to(offload_device))
            )
    finally:
        handle.remove()
    return out


def forward_layer(layer: nn.Module, inputs: LayerInputs, device: torch.device) -> torch.Tensor:
    """One decoder layer on one sample; returns hidden states on the device.

    Older transformers return ``(hidden_states,)`` from a decoder layer, newer ones the bare tensor; indexing
    a bare tensor with ``[0]`` would silently take batch row 0, so check the type.
    """
    x = inputs.to(device)
    out = layer(x.hidden, **x.kwargs, use_cache=False)
    return out[0] if isinstance(out, tuple) else out


def layer_targets(adapter: ModelAdapter, targets: dict[str, nn.Linear]) -> dict[int, dict[str, nn.Linear]]:
    """Group target linears by decoder layer index; every target must sit inside a decoder layer."""
    grouped: dict[int, dict[str, nn.Linear]] = defaultdict(dict)
    for name, linear in targets.items():
        index = adapter.decoder_layer_of(name)
        if index is None:
            raise ValueError(
                f"{name} is not a language-decoder linear; calibrated pruners prune the language decoder only "
                "(pruner.scope=[language]). Use pruner=magnitude to prune the vision tower, merger or lm_head."
            )
        grouped[index][name] = linear
    return dict(grouped)


# on_layer(layer_index, {name: linear}, {name: statistic}) -> True when it changed weights
LayerCallback = Callable[[int, dict[str, nn.Linear], dict[str, Any]], bool]


class SequentialEngine:
    """Walks the decoder layers once: collect statistics -> callback (prune) -> re-forward."""

    def __init__(self, adapter: ModelAdapter, targets: dict[str, nn.Linear]):
        self.adapter = adapter
        self.by_layer = layer_targets(adapter, targets)
        self.device = adapter.device

    @torch.no_grad()
    def run(
        self,
        inputs: list[LayerInputs],
        make_stat: Callable[[nn.Linear], Any],
        on_layer: LayerCallback,
        desc: str = "prune",
        keep_dense_outputs: bool = False,
        prepare_sample: SamplePreparer | None = None,
        checkpoint: PruneCheckpoint | None = None,
    ) -> list[LayerInputs]:
        """Returns the inputs of the layer after the last one (the final hidden states).

        When ``on_layer`` prunes (the usual case) the dense pass only has to deliver statistics, so each
        sample's pass stops as soon as the last hooked linear has seen its input: down_proj's matmul, about
        30% of a decoder layer, is skipped. Pass ``keep_dense_outputs=True`` for a measuring pass that leaves
        the weights alone (OWL's outlier pass): its dense outputs then feed the next layer directly.

        With a ``checkpoint`` (the pruning pass only), each finished layer is recorded in it, and the layers an
        earlier attempt finished get their pruned weights back instead of being pruned again; ``inputs`` are then
        run through them to reach the first unfinished layer (``inputs=[]`` when every layer is finished).
        """
        layers = self.adapter.decoder_layers()
        streamer = self.adapter.layer_streamer  # model.offload=disk
        restored = checkpoint.done if checkpoint is not None else 0
        if restored:
            log.info("%s: %d of %d layers were pruned by an earlier attempt of this run; restoring them from %s",
                     desc, restored, len(layers), checkpoint.directory)  # fmt: skip
        for index, layer in enumerate(tqdm(layers, desc=desc, unit="layer")):
            if index < restored:
                checkpoint.restore_layer(index, layer, self.device, streamer, load=bool(inputs))
                if inputs:  # the next layer's inputs, as the first attempt computed them
                    inputs = [replace(x, hidden=forward_layer(layer, x, self.device).to(x.hidden.device)) for x in inputs]
                    if streamer is not None:
                        streamer.offload(index, write=False)  # its pruned file is registered with the streamer
                continue
            if streamer is not None:
                streamer.onload(index, self.device)
            linears = self.by_layer.get(index, {})
            # Before any hook exists: preparing may run the layer's own Linears (AMIA's prior runs q/k_proj).
            values = [prepare_sample(index, layer, x.to(self.device)) if prepare_sample else {} for x in inputs]
            stats, handles, state = self._hook_statistics(linears, make_stat, keep_dense_outputs)
            dense_out: list[torch.Tensor] | None = []
            try:
                for sample_index, x in enumerate(inputs):
                    x = x.to(self.device)
                    state.update(seen=0, sample=Sample(sample_index, x.visual, values[sample_index]))
                    try:
                        dense_out.append(forward_layer(layer, x, self.device))
                    except _StopForward:
                        pass
            finally:
                for handle in handles:
                    handle.remove()
            if len(dense_out) < len(inputs):  # passes were cut short: no dense outputs to reuse
                dense_out = None
            changed = on_layer(index, linears, stats) if linears else False
            del stats
            if changed or dense_out is None:  # the pruned layer's outputs feed the next layer
                dense_out = None
                outs = [forward_layer(layer, x, self.device) for x in inputs]
            else:
                outs = dense_out
            inputs = [replace(x, hidden=o.to(x.hidden.device)) for x, o in zip(inputs, outs)]
            if streamer is not None:  # write the pruned layer out and free it before the next one
                streamer.offload(index, write=changed)
            if checkpoint is not None:  # after the streamer wrote it: the checkpoint points at that file
                checkpoint.save_layer(index, layer, changed, streamer)
        return inputs

    def _hook_statistics(self, linears: dict[str, nn.Linear], make_stat: Callable[[nn.Linear], Any],
                         keep_dense_outputs: bool) -> tuple[dict[str, Any], list, dict[str, Any]]:  # fmt: skip
        """Hook one statistic per input group (input statistics) or per Linear (output statistics).

        Linears fed the same tensor (q/k/v; gate/up) share one input statistic: accumulated once, and a pruner
        may cache work derived from it (SparseGPT's inverse Hessian factor). Unless dense outputs are kept,
        each sample's pass stops once the last statistic has its data.
        """
        stats: dict[str, Any] = {}
        handles = []
        state: dict[str, Any] = {"seen": 0, "sample": None, "expected": 0}

        def arrived() -> None:
            state["seen"] += 1
            if not keep_dense_outputs and state["seen"] == state["expected"]:
                raise _StopForward  # every statistic of this sample is in

        def on_input(mod, args, stat):
            stat.add(args[0])
            arrived()

        def on_output(mod, args, output, stat):
            stat.add(args[0], output, state["sample"])
            arrived()

        for group in self.adapter.input_groups(list(linears)):
            first = make_stat(linears[group[0]])
            if not getattr(first, "uses_output", False):
                stats.update(dict.fromkeys(group, first))
                handles.append(linears[group[0]].register_forward_pre_hook(lambda m, a, s=first: on_input(m, a, s)))
                continue
            for name in group:  # outputs differ per Linear: one statistic each
                stat = first if name == group[0] else make_stat(linears[name])
                stats[name] = stat
                handles.append(linears[name].register_forward_hook(lambda m, a, o, s=stat: on_output(m, a, o, s)))
        state["expected"] = len(handles)
        return stats, handles, state
