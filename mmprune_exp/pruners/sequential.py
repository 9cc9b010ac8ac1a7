"""Base class of the calibrated weight pruners: capture layer inputs, then prune layer by layer."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mmprune_exp.calibration import CalibrationData
from mmprune_exp.config.schema import SparsityConfig
from mmprune_exp.models.base import ModelAdapter
from mmprune_exp.pruners.base import Pruner
from mmprune_exp.pruners.engine import LayerInputs, SamplePreparer, SequentialEngine, collect_layer_inputs

if TYPE_CHECKING:
    from mmprune_exp.checkpointing import PruneCheckpoint

log = logging.getLogger(__name__)


class SequentialPruner(Pruner):
    """Subclasses set ``make_stat`` (statistic per target linear) and implement ``prune_linear``."""

    needs_calibration = True
    #: Attributes holding what the method computed besides the weights: its plan (per-layer or per-matrix
    #: sparsities) and per-layer records that ``report()`` writes to sparsity.json. They are saved with every
    #: finished layer, so a resumed run skips the plan and reports exactly what an uninterrupted one does. An
    #: attribute missing here would come back empty after a resume (tests/pruners/test_checkpoint.py checks
    #: that every calibrated pruner's report survives one).
    state_attrs: tuple[str, ...] = ()
    #: Set by the run before ``prune``: finished layers are recorded there, and an earlier attempt's are reused.
    checkpoint: PruneCheckpoint | None = None

    def make_stat(self, linear: nn.Linear) -> Any:
        raise NotImplementedError

    def prune_linear(self, name: str, linear: nn.Linear, stat: Any, sparsity: SparsityConfig) -> None:
        raise NotImplementedError

    def sample_preparer(self) -> SamplePreparer | None:
        """A function computing values for one sample and decoder layer from the layer's input, before the
        statistics hooks run (the layer still dense); output statistics receive them as ``sample.values``.
        Default None: nothing to prepare (and no extra copy of every sample to the device per layer)."""
        return None

    def plan(self, engine: SequentialEngine, inputs: list[LayerInputs]) -> None:
        """Hook before the pruning pass (OWL measures per-layer outlier ratios here)."""

    def layer_sparsity(self, index: int) -> SparsityConfig:
        """Sparsity of decoder layer ``index``; uniform unless a subclass allocates per layer (OWL)."""
        return self.sparsity

    def matrix_sparsity(self, name: str, index: int) -> SparsityConfig:
        """Sparsity of target matrix ``name`` in decoder layer ``index``; its layer's unless a subclass
        allocates per matrix (TAMP's DAS)."""
        return self.layer_sparsity(index)

    def state_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.state_attrs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            current = getattr(self, name)
            if isinstance(current, dict):  # in place: statistics made earlier may hold a reference to it
                current.clear()
                current.update(value)
            else:
                setattr(self, name, value)

    def prune(self, adapter: ModelAdapter, calibration: CalibrationData | None) -> None:
        if calibration is None or not calibration.requests:
            raise ValueError(f"pruner={self.cfg.name} needs calibration data; set calibration=<set> with nsamples > 0")
        engine = SequentialEngine(adapter, self.targets(adapter))
        checkpoint = self.checkpoint
        n_layers = len(adapter.decoder_layers())
        if checkpoint is not None:
            self.load_state_dict(checkpoint.bind(self.cfg.name, n_layers, self.state_dict))
        if checkpoint is not None and checkpoint.done == n_layers:
            # Every layer was pruned before the job stopped (in the evaluation, say): no calibration pass at all.
            inputs = []
        else:
            inputs = collect_layer_inputs(adapter, calibration.requests, calibration.max_length)
            if checkpoint is not None and checkpoint.planned:
                if type(self).plan is not SequentialPruner.plan:
                    log.info("%s: the plan comes from an earlier attempt of this run (%s)", self.cfg.name,
                             checkpoint.directory)  # fmt: skip
            else:
                self.plan(engine, inputs)
                if checkpoint is not None:
                    checkpoint.save_plan()
        engine.run(inputs, self.make_stat, self._prune_layer, desc=f"{self.cfg.name}", prepare_sample=self.sample_preparer(),
                   checkpoint=checkpoint)  # fmt: skip

    @torch.no_grad()
    def _prune_layer(self, index: int, linears: dict[str, nn.Linear], stats: dict[str, Any]) -> bool:
        for name, linear in linears.items():
            self.prune_linear(name, linear, stats[name], self.matrix_sparsity(name, index))
        return True
