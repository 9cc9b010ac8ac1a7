"""Pruned decoder layers checkpointed in the run directory as they finish, so a killed job resumes its pruning.

The sequential engine prunes decoder layer after layer; the layer-``i+1`` inputs are the pruned layer ``i``'s
outputs. After each layer, ``<run dir>/prune_ckpt/state.pt`` records that the layer is done, where its pruned
weights are, and the pruner's own state (a plan's per-layer values, per-layer records that ``report()`` turns into
``sparsity.json``). A job started again with the same config and run directory (a SLURM requeue, a rerun after
SIGTERM) loads the finished layers' weights and starts with the first unfinished one, and ends with the same
weights, masks and report as a job that was never stopped.

What is saved, and why not the next layer's inputs. The engine's per-layer state is the pruned weights and the
inputs of the next layer. The inputs are not saved: for a 7B model and 128 calibration samples of 2048 tokens
they are ~1.9 GB, rewritten after every one of 28 layers (53 GB written per run, in every job of a sweep). A
resumed job recomputes them instead: it captures the layer-0 inputs again (the model up to the first decoder
layer) and runs them through the already pruned layers, one forward per layer and sample, the same operations in
the same order as the first attempt (so the same values; bitwise on CPU). That forward is one of the three
passes a pruned layer costs (statistics, pruning, re-forward), and far less than SparseGPT's or TAMP's work.
So the only disk cost is the pruned layers, and with ``model.offload=disk`` not even that: the streamer already
writes each pruned layer to ``pruned_model/``, and the checkpoint points at those files. In memory, the layers
go to ``prune_ckpt/layer-XXXXX.safetensors`` (at most the decoder's size, ~13 GB for 7B in bf16); the folder is
removed once ``results.json`` is written, and ``prune_checkpoint=false`` turns it off.

Consistency: a layer's weights are written and flushed to disk before the state that lists them replaces the
previous state atomically; a job killed in between leaves a state that does not list the layer, which is then
pruned again and its file overwritten.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from mmprune_exp.errors import ConfigError

if TYPE_CHECKING:
    from mmprune_exp.models.offload import LayerStreamer

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "prune_ckpt"
STATE_FILE = "state.pt"
FORMAT_VERSION = 1


def _fsync(path: Path) -> None:
    """Flush a file's data to disk: a node that crashes must not leave a state pointing at unwritten weights."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PruneCheckpoint:
    """``<run dir>/prune_ckpt``: the decoder layers finished so far, their pruned weights and the pruner's state.

    ``layer_dir`` is where the pruned layers' weights are: the checkpoint folder itself for a model in memory, or
    the streamer's output folder (``pruned_model/``) for ``model.offload=disk``, whose files are reused.
    """

    def __init__(self, directory: Path, layer_dir: Path | None = None):
        self.directory = Path(directory)
        self.layer_dir = Path(layer_dir) if layer_dir is not None else self.directory
        self.state: dict[str, Any] = self._read()
        self._snapshot: Callable[[], dict[str, Any]] = dict

    def _read(self) -> dict[str, Any]:
        file = self.directory / STATE_FILE
        if not file.exists():
            return {}
        return torch.load(file, map_location="cpu", weights_only=True)

    # -- what an earlier attempt finished ------------------------------------------------------------------

    @property
    def done(self) -> int:
        """Decoder layers finished (always a prefix: layers are pruned in order)."""
        return int(self.state.get("done", 0))

    @property
    def planned(self) -> bool:
        """The pruner's plan (OWL's outlier pass, TAMP's diversity pass) is in the saved state."""
        return bool(self.state.get("planned", False))

    def bind(self, pruner_name: str, n_layers: int, snapshot: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Attach the pruner (``snapshot`` returns its state to save) and return the state saved before, if any.

        The run directory's fingerprint already guarantees the same config; a mismatch here means the code
        changed its layer count or pruner under a checkpoint, which is refused rather than mixed.
        """
        self._snapshot = snapshot
        if not self.state:
            self.state = {"version": FORMAT_VERSION, "pruner": pruner_name, "n_layers": n_layers, "done": 0,
                          "planned": False, "files": {}, "pruner_state": {}}  # fmt: skip
            return {}
        saved = (self.state.get("version"), self.state.get("pruner"), self.state.get("n_layers"))
        if saved != (FORMAT_VERSION, pruner_name, n_layers):
            raise ConfigError(
                f"{self.directory} holds a pruning checkpoint of (format, pruner, layers) {saved}, not "
                f"{(FORMAT_VERSION, pruner_name, n_layers)}; delete {self.directory} to prune from the start"
            )
        return self.state["pruner_state"]

    # -- writing ---------------------------------------------------------------------------------------

    def _commit(self) -> None:
        self.state["pruner_state"] = self._snapshot()
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / (STATE_FILE + ".tmp")
        torch.save(self.state, tmp)
        _fsync(tmp)
        tmp.replace(self.directory / STATE_FILE)

    def save_plan(self) -> None:
        self.state["planned"] = True
        self._commit()

    def save_layer(self, index: int, layer: nn.Module, changed: bool, streamer: LayerStreamer | None) -> None:
        """Record decoder layer ``index`` as finished. Call after the streamer (if any) wrote it out."""
        if index != self.done:
            raise RuntimeError(f"pruning checkpoint: layer {index} finished after {self.done} layers, out of order")
        if changed:
            if streamer is not None:
                file = streamer.written[index]  # pruned_model/layer-XXXXX.safetensors, written by offload()
            else:
                self.directory.mkdir(parents=True, exist_ok=True)
                file = self.directory / f"layer-{index:05d}.safetensors"
                tensors = {k: t.detach().to("cpu").contiguous() for k, t in layer.state_dict().items()}
                save_file(tensors, file, metadata={"format": "pt"})
            _fsync(file)
            self.state["files"][index] = file.name
        self.state["done"] = index + 1
        self._commit()

    # -- reading back ----------------------------------------------------------------------------------

    def restore_layer(self, index: int, layer: nn.Module, device: torch.device, streamer: LayerStreamer | None,
                      load: bool) -> None:  # fmt: skip
        """Give finished layer ``index`` its pruned weights.

        In memory the layer holds the original weights: the pruned ones are copied in. Streamed, the layer is on
        ``meta``: with ``load`` it is read from the pruned file (or, untouched by the pruner, from the source
        checkpoint) for a forward pass; the pruned file is registered with the streamer either way, so the final
        checkpoint uses it instead of the source's layer.
        """
        name = self.state["files"].get(index)
        file = self.layer_dir / name if name is not None else None
        if file is not None and not file.is_file():
            raise FileNotFoundError(f"pruning checkpoint {self.directory}: layer {index}'s weights {file} are missing")
        if streamer is None:
            if file is not None:
                layer.load_state_dict(load_file(file, device=str(device)), strict=True)
            return
        if file is not None:
            streamer.written[index] = file
        if not load:
            return
        if file is None:
            streamer.onload(index, device)
            return
        # As LayerStreamer.onload, but from the pruned layer's file (it keeps the source checkpoint's names).
        prefix = f"{streamer.layers_prefix}.{index}."
        with safe_open(file, "pt") as f:
            state = {n: f.get_tensor(streamer.key(prefix + n)).to(device=device, dtype=streamer.dtype)
                     for n in layer.state_dict()}  # fmt: skip
        layer.load_state_dict(state, strict=True, assign=True)

    def remove(self) -> None:
        """Delete the checkpoint (the run's results supersede it); streamed layer files stay, they are the output."""
        if self.directory.exists():
            shutil.rmtree(self.directory)


def remove_checkpoint(run_dir: Path) -> None:
    """Remove ``<run_dir>/prune_ckpt`` once the run's results are written."""
    path = Path(run_dir) / CHECKPOINT_DIR
    if path.exists():
        shutil.rmtree(path)
