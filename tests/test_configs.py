"""Every option of every group composes and validates; bad values fail naming the key."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from mmprune_exp.config import ConfigError, validate
from tests.conftest import CONF

GROUPS = ["model", "pruner", "sparsity", "calibration", "benchmark", "token_pruner", "logger", "experiment", "debug"]
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


@pytest.mark.parametrize(
    "override,message",
    [
        ("+foo=1", "foo=1 is not a config key"),
        ("+pruner_name=wanda", "pruner_name='wanda' is not a config key"),
        ("seed=-1", "seed=-1 is invalid"),
        ("save_model=maybe", "save_model='maybe' is invalid"),
    ],
)
def test_root_keys_are_checked_too(compose_cfg, override, message):
    cfg = compose_cfg([override])
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


def test_sparsity_label_follows_the_value_not_the_option_name(compose_cfg):
    cfg = compose_cfg(["logger=wandb", "sparsity=s50", "sparsity.value=0.3"])
    validate(cfg)
    assert cfg.sparsity.name == "s30"
    assert OmegaConf.to_container(cfg.logger, resolve=True)["run_name"] == "qwen2_5_vl_tiny-magnitude-s30-shapes_vqa-seed0"
    assert compose_cfg(["sparsity.value=0.625"]).sparsity.name == "s62.5"
    assert compose_cfg(["sparsity=4of8"]).sparsity.name == "4of8"


def test_pruner_targets_are_checked_against_the_model_family_before_loading():
    from mmprune_exp.models.base import check_targets

    check_targets("qwen2_5_vl", ["language", "vision"], ["q_proj", "down_proj"])
    with pytest.raises(ConfigError, match=r"pruner\.modules=\['q_proj', 'nope'\].*has no linear\(s\) \['nope'\]"):
        check_targets("qwen2_5_vl", ["language"], ["q_proj", "nope"])


def test_a_family_without_a_part_rejects_it_in_scope():
    from mmprune_exp.models.base import ModelAdapter

    class TextOnly(ModelAdapter):  # a family with no vision tower (abstract: never instantiated)
        model_parts = ("language", "lm_head")
        decoder_linears = ("q_proj",)

    with pytest.raises(ConfigError, match=r"pruner\.scope=\['language', 'vision'\].*no part\(s\) \['vision'\]"):
        TextOnly.check_targets(["language", "vision"], ["q_proj"], "text_only")


def test_a_sparsity_built_in_python_gets_the_same_label():
    from mmprune_exp.config.schema import SparsityConfig

    assert SparsityConfig(value=0.3).name == "s30"
    assert SparsityConfig(value=0.5, structure="nm", n=2, m=4).name == "2of4"
