"""model.offload=disk: layers streamed from the shards give the same pruned weights as the in-memory model."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from mmprune_exp.calibration import CalibrationData, shapes_calibration
from mmprune_exp.config.schema import CalibrationConfig, ModelConfig, OWLConfig, PrunerConfig, SparsityConfig
from mmprune_exp.models import load_adapter
from mmprune_exp.pruners import build_pruner


@pytest.mark.parametrize("cfg", [PrunerConfig(name="wanda"), OWLConfig(name="owl")], ids=["wanda", "owl"])
def test_streamed_pruning_equals_in_memory_pruning(random_tiny_dir, tmp_path, cfg):
    calib = CalibrationData("shapes", shapes_calibration(CalibrationConfig(nsamples=4)), 512)
    sparsity = SparsityConfig(name="s50", value=0.5)

    memory = load_adapter(ModelConfig(path=str(random_tiny_dir), device="cpu"))
    build_pruner(cfg, sparsity).prune(memory, calib)

    streamed = load_adapter(ModelConfig(path=str(random_tiny_dir), device="cpu", offload="disk"))
    assert all(p.is_meta for p in streamed.decoder_layers().parameters())  # nothing of the layers in memory
    streamed.layer_streamer.begin_output(tmp_path / "pruned")
    build_pruner(cfg, sparsity).prune(streamed, calib)
    assert all(p.is_meta for p in streamed.decoder_layers().parameters())
    streamed.layer_streamer.finalize()

    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "pruned")
    expected = memory.model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.allclose(tensor, expected[name], atol=1e-6), name
    assert (tmp_path / "pruned" / "chat_template.jinja").exists()  # processor files travel along
