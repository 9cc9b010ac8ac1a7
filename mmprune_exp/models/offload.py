"""Decoder layers streamed from the checkpoint on disk, one at a time (``model.offload=disk``).

The model is built with every decoder layer on the ``meta`` device (no memory), the rest of the model
(embeddings, vision tower, norms, lm_head) is loaded normally. The sequential engine asks for one layer
(:meth:`LayerStreamer.onload`): its tensors are read from the safetensors shards and assigned to the layer's
modules. When the layer is done (:meth:`LayerStreamer.offload`), its pruned tensors are written to a new
shard in the output folder and the layer goes back to ``meta``. :meth:`LayerStreamer.finalize` then writes
the remaining weights and an index, so the output folder is an ordinary checkpoint that
``from_pretrained`` loads. Peak memory is the non-layer weights plus one decoder layer, whatever the depth.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from mmprune_exp.utils import bound_heap, release_freed_memory

# Files of a checkpoint folder that are not weights and travel with the pruned model.
_SIDE_FILES = (".json", ".jinja", ".txt", ".model", ".py")


def checkpoint_shards(path: Path) -> dict[str, Path]:
    """Map every tensor name of a safetensors checkpoint folder to the shard that holds it."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: path / v for k, v in weight_map.items()}
    single = path / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{path} holds neither model.safetensors nor model.safetensors.index.json")
    with safe_open(single, "pt") as f:
        return dict.fromkeys(f.keys(), single)


class LayerStreamer:
    """Streams ``layers[i]`` of ``model`` from ``source`` and writes pruned layers to ``out_dir``.

    ``to_checkpoint`` maps a parameter name of the model (``model.language_model.layers.3.mlp.up_proj.weight``)
    to the candidate names it may have in the checkpoint (checkpoints keep the original Qwen layout
    ``model.layers.3...``); the first candidate present is used, and the output keeps the source's naming.
    """

    def __init__(
        self,
        model: nn.Module,
        layers_prefix: str,
        source: Path,
        to_checkpoint: Callable[[str], list[str]],
        dtype: torch.dtype,
    ):
        self.model = model
        self.layers_prefix = layers_prefix
        self.layers: nn.ModuleList = model.get_submodule(layers_prefix)
        self.source = Path(source)
        self.shards = checkpoint_shards(self.source)
        self.to_checkpoint = to_checkpoint
        self.dtype = dtype
        self.out_dir: Path | None = None
        self.written: dict[int, Path] = {}
        # Keep the resident set flat across layers (bench/prune_cost.py: 8 vs 2 layers 1.23x without this).
        bound_heap()

    def key(self, name: str) -> str:
        for candidate in self.to_checkpoint(name):
            if candidate in self.shards:
                return candidate
        raise KeyError(f"{name} not found in the checkpoint at {self.source} (tried {self.to_checkpoint(name)})")

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        by_shard: dict[Path, list[tuple[str, str]]] = {}
        for name in names:
            key = self.key(name)
            by_shard.setdefault(self.shards[key], []).append((name, key))
        out = {}
        for shard, pairs in by_shard.items():
            with safe_open(shard, "pt") as f:
                for name, key in pairs:
                    out[name] = f.get_tensor(key)
        return out

    def _layer_names(self, index: int) -> list[str]:
        """Parameter and persistent-buffer names of layer ``index`` (works while the layer is on meta)."""
        prefix = f"{self.layers_prefix}.{index}."
        return [prefix + n for n in self.layers[index].state_dict()]

    def load_non_layer_weights(self, device: torch.device) -> None:
        """Assign every parameter and persistent buffer outside the decoder layers from the checkpoint."""
        inside = self.layers_prefix + "."
        names = [n for n in self.model.state_dict() if not n.startswith(inside)]
        present = [n for n in names if any(c in self.shards for c in self.to_checkpoint(n))]
        tensors = self._read(present)
        state = {n: t.to(device=device, dtype=self.dtype if t.is_floating_point() else t.dtype) for n, t in tensors.items()}
        self.model.load_state_dict(state, strict=False, assign=True)

    def onload(self, index: int, device: torch.device) -> None:
        layer = self.layers[index]
        prefix = f"{self.layers_prefix}.{index}."
        tensors = self._read(self._layer_names(index))
        state = {n[len(prefix) :]: t.to(device=device, dtype=self.dtype) for n, t in tensors.items()}
        layer.load_state_dict(state, strict=True, assign=True)

    def offload(self, index: int, write: bool) -> None:
        """Write layer ``index`` (when ``write``) to the output folder, then free it."""
        if write:
            if self.out_dir is None:
                raise RuntimeError("LayerStreamer.offload(write=True) needs out_dir; call begin_output first")
            prefix = f"{self.layers_prefix}.{index}."
            tensors = {
                self.key(prefix + n): t.detach().to("cpu").contiguous() for n, t in self.layers[index].state_dict().items()
            }
            file = self.out_dir / f"layer-{index:05d}.safetensors"
            save_file(tensors, file, metadata={"format": "pt"})
            self.written[index] = file
        self.layers[index].to("meta")
        release_freed_memory()

    def begin_output(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def finalize(self) -> Path:
        """Complete the output folder: untouched layers, the non-layer weights, an index, config files."""
        assert self.out_dir is not None
        weight_map: dict[str, str] = {}
        for index in range(len(self.layers)):
            if index not in self.written:  # a layer no pruner touched: copy it through
                tensors = self._read(self._layer_names(index))
                tensors = {self.key(n): t for n, t in tensors.items()}
                file = self.out_dir / f"layer-{index:05d}.safetensors"
                save_file(tensors, file, metadata={"format": "pt"})
                self.written[index] = file
            with safe_open(self.written[index], "pt") as f:
                weight_map.update(dict.fromkeys(f.keys(), self.written[index].name))
        inside = self.layers_prefix + "."
        rest = {}
        for name, tensor in self.model.state_dict().items():
            if name.startswith(inside):
                continue
            candidates = [c for c in self.to_checkpoint(name) if c in self.shards]
            if candidates and candidates[0] not in weight_map:
                rest[candidates[0]] = tensor.detach().to("cpu").contiguous()
        # Tied tensors share storage; safetensors refuses to save shared storage twice.
        seen: dict[int, str] = {}
        for key in list(rest):
            ptr = rest[key].data_ptr()
            if ptr in seen:
                rest[key] = rest[key].clone()
            seen[ptr] = key
        save_file(rest, self.out_dir / "non-layer.safetensors", metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(rest, "non-layer.safetensors"))
        total = sum(f.stat().st_size for f in self.out_dir.glob("*.safetensors"))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        for file in self.source.iterdir():
            if file.suffix in _SIDE_FILES and file.name != "model.safetensors.index.json" and file.is_file():
                shutil.copy2(file, self.out_dir / file.name)
        return self.out_dir
