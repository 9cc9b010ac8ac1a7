"""Every option of every group composes and validates; bad values fail naming the key."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from mmprune_exp.config import ConfigError, validate
from tests.conftest import CONF

GROUPS = ["model", "pruner", "sparsity", "calibration", "benchmark", "logger", "experiment", "debug"]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_validates(compose_cfg, group, option):
    cfg = compose_cfg([f"{group}={option}"])
    validate(cfg)
    if group not in ("experiment", "debug"):
        assert cfg[group].name == option  # the option file's name is the run's label for that group


def test_every_group_has_options():
    for group in GROUPS:
        assert any((CONF / group).glob("*.yaml")), group


def test_defaults_are_the_embedded_model(compose_cfg):
    cfg = compose_cfg()
    validate(cfg)
    assert cfg.model.name == "qwen2_5_vl_tiny"
    assert cfg.model.path.endswith("assets/qwen2_5_vl_tiny")
    assert cfg.pruner.name == "magnitude" and cfg.sparsity.value == 0.5


@pytest.mark.parametrize(
    "override,key",
    [
        ("sparsity.value=1.5", "sparsity.value"),
        ("sparsity.value=-0.1", "sparsity.value"),
        ("benchmark.limit=-1", "benchmark.limit"),
        ("benchmark.batch_size=0", "benchmark.batch_size"),
        ("model.device=tpu", "model.device"),
        ("model.dtype=float8", "model.dtype"),
        ("pruner.scope=[language,decoder]", "pruner.scope"),
        ("logger.mode=sometimes", "logger.mode"),
        ("calibration.nsamples=0", "calibration.nsamples"),
        ("+pruner.blocksize=128", "pruner.blocksize"),
    ],
)
def test_bad_values_fail_naming_the_key(compose_cfg, override, key):
    cfg = compose_cfg([override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


@pytest.mark.parametrize("override", ["sparsity.value=abc", "benchmark.limit=ten", "pruner.nonexistent=1"])
def test_wrong_types_and_unknown_keys_fail_at_compose(compose_cfg, override):
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg([override])
    full = f"{err.value} {err.value.__cause__}"
    assert override.split("=")[0] in full


def test_sparsity_options_match_their_names(compose_cfg):
    for p in sorted((CONF / "sparsity").glob("s*.yaml")):
        cfg = compose_cfg([f"sparsity={p.stem}"])
        assert cfg.sparsity.value == pytest.approx(int(p.stem[1:]) / 100)


def test_wandb_logger_names_the_run_from_group_choices(compose_cfg):
    cfg = compose_cfg(["logger=wandb", "pruner=magnitude", "sparsity=s70"])
    resolved = OmegaConf.to_container(cfg.logger, resolve=True)
    assert resolved["run_name"] == "qwen2_5_vl_tiny-magnitude-s70-shapes_vqa-seed0"
    assert resolved["group"] == "prune_eval"
