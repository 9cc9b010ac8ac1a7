"""Pruning checkpoints (mmprune_exp/checkpointing.py): a pruning run stopped after some layers and started again
ends with the same weights and the same report() as a run that was never stopped, for every calibrated pruner.

In process, on the random tiny model: the stop is an ``Interrupted`` raised around ``PruneCheckpoint.save_layer``,
which is where a SIGTERM lands as far as the checkpoint is concerned (between two layers, or inside one).
The end-to-end kill (a real SIGTERM to run.py) is in tests/test_resume.py.
"""

from __future__ import annotations

import signal

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from mmprune_exp import checkpointing
from mmprune_exp.calibration import CalibrationData, shapes_calibration
from mmprune_exp.checkpointing import PruneCheckpoint
from mmprune_exp.config.schema import CalibrationConfig, ModelConfig, PrunerConfig, SparsityConfig
from mmprune_exp.errors import ConfigError
from mmprune_exp.interrupts import Interrupted
from mmprune_exp.models import load_adapter
from mmprune_exp.pruners import build_pruner, sequential
from mmprune_exp.pruners.owl import OWLConfig
from mmprune_exp.pruners.qwen_tamp import QwenTampConfig
from mmprune_exp.pruners.sparsegpt import SparseGPTConfig
from mmprune_exp.pruners.tamp import TampConfig

S50 = SparsityConfig(name="s50", value=0.5)
CONFIGS = {
    "wanda": PrunerConfig(name="wanda"),
    "sparsegpt": SparseGPTConfig(name="sparsegpt"),
    "owl": OWLConfig(name="owl"),
    "tamp": TampConfig(name="tamp"),
    "qwen_tamp": QwenTampConfig(name="qwen_tamp"),
}


@pytest.fixture(scope="module")
def calibration():
    return CalibrationData("shapes", shapes_calibration(CalibrationConfig(nsamples=4)), 512)


def _prune(model_dir, cfg, calibration, checkpoint: PruneCheckpoint | None):
    adapter = load_adapter(ModelConfig(path=str(model_dir), device="cpu"))
    pruner = build_pruner(cfg, S50)
    pruner.checkpoint = checkpoint
    pruner.prune(adapter, calibration)
    return adapter, pruner


def _stop_at(monkeypatch, index: int, before: bool) -> None:
    """SIGTERM's exception while layer ``index`` is pruned (``before`` its checkpoint) or right after it."""
    original = PruneCheckpoint.save_layer

    def save_layer(self, i, *args, **kwargs):
        if before and i == index:
            raise Interrupted(signal.SIGTERM)
        original(self, i, *args, **kwargs)
        if not before and i == index:
            raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(PruneCheckpoint, "save_layer", save_layer)


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name  # bit for bit, not close


@pytest.fixture(scope="module")
def uninterrupted(random_tiny_dir, calibration):
    """Each pruner's weights and report without a checkpoint: what a resumed run must reproduce."""
    out = {}
    for name, cfg in CONFIGS.items():
        adapter, pruner = _prune(random_tiny_dir, cfg, calibration, None)
        out[name] = (adapter.model.state_dict(), pruner.report())
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_stopped_after_two_layers_and_resumed_prunes_like_an_uninterrupted_run(
    name, random_tiny_dir, calibration, uninterrupted, tmp_path, monkeypatch
):
    with monkeypatch.context() as m:
        _stop_at(m, 1, before=False)
        with pytest.raises(Interrupted):
            _prune(random_tiny_dir, CONFIGS[name], calibration, PruneCheckpoint(tmp_path / "ckpt"))
    checkpoint = PruneCheckpoint(tmp_path / "ckpt")
    assert checkpoint.done == 2 and checkpoint.planned
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["layer-00000.safetensors",
                                                                     "layer-00001.safetensors", "state.pt"]  # fmt: skip
    adapter, pruner = _prune(random_tiny_dir, CONFIGS[name], calibration, checkpoint)
    weights, report = uninterrupted[name]
    _assert_same_weights(adapter.model.state_dict(), weights)
    assert pruner.report() == report  # the plan and per-layer records came back with the layers
    assert PruneCheckpoint(tmp_path / "ckpt").done == 4


@pytest.mark.parametrize("where", ["in_plan", "in_first_layer", "after_last_layer"])
def test_resume_from_every_kind_of_stop(where, random_tiny_dir, calibration, uninterrupted, tmp_path, monkeypatch):
    """In the plan (redone), after the plan (kept, not redone), after every layer (no calibration pass at all).

    TAMP: a plan (DAS's dense pass) and per-layer records (AMIA's tokens) to bring back."""
    name = "tamp"
    with monkeypatch.context() as m:
        if where == "in_plan":
            m.setattr(PruneCheckpoint, "save_plan", lambda self: (_ for _ in ()).throw(Interrupted(signal.SIGTERM)))
        else:
            _stop_at(m, 0 if where == "in_first_layer" else 3, before=where == "in_first_layer")
        with pytest.raises(Interrupted):
            _prune(random_tiny_dir, CONFIGS[name], calibration, PruneCheckpoint(tmp_path / "ckpt"))
    checkpoint = PruneCheckpoint(tmp_path / "ckpt")
    assert (checkpoint.planned, checkpoint.done) == {"in_plan": (False, 0), "in_first_layer": (True, 0),
                                                     "after_last_layer": (True, 4)}[where]  # fmt: skip
    calls = {"plan": 0, "inputs": 0}
    pruner_cls = type(build_pruner(CONFIGS[name], S50))
    original_plan, original_collect = pruner_cls.plan, sequential.collect_layer_inputs
    monkeypatch.setattr(pruner_cls, "plan", lambda self, *a: (calls.__setitem__("plan", calls["plan"] + 1),
                                                              original_plan(self, *a))[1])  # fmt: skip
    monkeypatch.setattr(sequential, "collect_layer_inputs", lambda *a, **k: (
        calls.__setitem__("inputs", calls["inputs"] + 1), original_collect(*a, **k))[1])  # fmt: skip
    adapter, pruner = _prune(random_tiny_dir, CONFIGS[name], calibration, checkpoint)
    weights, report = uninterrupted[name]
    _assert_same_weights(adapter.model.state_dict(), weights)
    assert pruner.report() == report
    expected = {"in_plan": {"plan": 1, "inputs": 1}, "in_first_layer": {"plan": 0, "inputs": 1},
                "after_last_layer": {"plan": 0, "inputs": 0}}[where]  # fmt: skip
    assert calls == expected


@pytest.mark.parametrize("stop_after", [1, 3], ids=["mid_prune", "after_last_layer"])
def test_streamed_run_resumes_from_the_layers_it_already_wrote(stop_after, random_tiny_dir, calibration, tmp_path,
                                                               monkeypatch):  # fmt: skip
    """model.offload=disk: the checkpoint points at pruned_model/'s layer files; the resumed run's output folder
    equals an uninterrupted streamed run's (also when every layer was done and only the folder's rest is written)."""
    cfg = CONFIGS["owl"]

    def streamed(out, checkpoint):
        adapter = load_adapter(ModelConfig(path=str(random_tiny_dir), device="cpu", offload="disk"))
        adapter.layer_streamer.begin_output(out)
        pruner = build_pruner(cfg, S50)
        pruner.checkpoint = checkpoint
        pruner.prune(adapter, calibration)
        adapter.layer_streamer.finalize()
        return pruner

    reference = streamed(tmp_path / "reference", None)
    with monkeypatch.context() as m:
        _stop_at(m, stop_after, before=False)
        with pytest.raises(Interrupted):
            streamed(tmp_path / "pruned", PruneCheckpoint(tmp_path / "ckpt", layer_dir=tmp_path / "pruned"))
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["state.pt"]  # no second copy of the layers
    resumed = streamed(tmp_path / "pruned", PruneCheckpoint(tmp_path / "ckpt", layer_dir=tmp_path / "pruned"))
    assert resumed.report() == reference.report()
    a = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "reference").state_dict()
    b = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "pruned").state_dict()
    _assert_same_weights(b, a)


def test_a_checkpoint_of_another_pruner_is_refused(random_tiny_dir, calibration, tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        _stop_at(m, 0, before=False)
        with pytest.raises(Interrupted):
            _prune(random_tiny_dir, CONFIGS["wanda"], calibration, PruneCheckpoint(tmp_path / "ckpt"))
    with pytest.raises(ConfigError, match="holds a pruning checkpoint of .* delete"):
        _prune(random_tiny_dir, CONFIGS["sparsegpt"], calibration, PruneCheckpoint(tmp_path / "ckpt"))


def test_a_state_is_never_ahead_of_its_layer_files(random_tiny_dir, calibration, tmp_path, monkeypatch):
    """Killed while a layer's file is written: the state still lists the layers before it, so it is pruned again."""
    with monkeypatch.context() as m:
        original = checkpointing.save_file

        def torn(tensors, file, metadata=None):
            if str(file).endswith("layer-00001.safetensors"):
                file.write_bytes(b"torn")  # half a file, then the signal
                raise Interrupted(signal.SIGTERM)
            original(tensors, file, metadata=metadata)

        m.setattr(checkpointing, "save_file", torn)
        with pytest.raises(Interrupted):
            _prune(random_tiny_dir, CONFIGS["wanda"], calibration, PruneCheckpoint(tmp_path / "ckpt"))
    assert PruneCheckpoint(tmp_path / "ckpt").done == 1
    adapter, _ = _prune(random_tiny_dir, CONFIGS["wanda"], calibration, PruneCheckpoint(tmp_path / "ckpt"))
    reference, _ = _prune(random_tiny_dir, CONFIGS["wanda"], calibration, None)
    _assert_same_weights(adapter.model.state_dict(), reference.model.state_dict())
