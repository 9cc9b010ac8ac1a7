"""A pruned model saved with save_pretrained reloads with identical weights and outputs."""

from __future__ import annotations

import json

import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from mmprune_exp.config.schema import ModelConfig, PrunerConfig, SparsityConfig
from mmprune_exp.models import load_adapter
from mmprune_exp.models.base import Request
from mmprune_exp.pruners import build_pruner, sparsity_report


def test_pruned_model_round_trips(random_tiny, tmp_path):
    pruner = build_pruner(PrunerConfig(name="magnitude"), SparsityConfig(name="s70", value=0.7))
    pruner.prune(random_tiny, None)
    report = sparsity_report(pruner.targets(random_tiny), random_tiny)
    random_tiny.save(tmp_path)
    (tmp_path / "sparsity.json").write_text(json.dumps(report.to_dict()))

    plain = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path)  # plain transformers, no package code
    for name, param in random_tiny.model.state_dict().items():
        assert torch.equal(param, plain.state_dict()[name]), name

    reloaded = load_adapter(ModelConfig(path=str(tmp_path), device="cpu"))
    assert sparsity_report(pruner.targets(reloaded), reloaded).per_matrix == report.per_matrix
    from PIL import Image

    request = Request("How many circles are there?", images=[Image.new("RGB", (112, 112), "white")])
    with torch.no_grad():
        a = random_tiny.model(**random_tiny.encode([request])).logits
        b = reloaded.model(**reloaded.encode([request])).logits
    assert torch.equal(a, b)
    assert json.loads((tmp_path / "sparsity.json").read_text())["overall"] == report.overall
