"""Shared fixtures: compose configs exactly as run.py does, with Hydra's global state cleaned up."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from mmprune_exp.config import register_configs

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Tests never talk to a W&B server or the HF hub.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture
def compose_cfg():
    register_configs()

    def _compose(overrides=()):
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
            return compose("config", overrides=list(overrides), return_hydra_config=True)

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def random_tiny_dir(tmp_path_factory):
    """A randomly initialised model with the embedded model's architecture, tokenizer and processor.

    For tests of mechanics (capture/replay, masks, saving) that must not depend on the trained weights.
    """
    import torch

    from mmprune_exp.tiny.build import build_config, build_model, build_processor

    out = tmp_path_factory.mktemp("tiny_random")
    torch.manual_seed(0)
    processor = build_processor()
    model = build_model(build_config(processor.tokenizer))
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture
def random_tiny(random_tiny_dir):
    """A fresh adapter over the random model (each test may change its weights)."""
    from mmprune_exp.config.schema import ModelConfig
    from mmprune_exp.models import load_adapter

    return load_adapter(ModelConfig(path=str(random_tiny_dir), device="cpu"))
