"""The plug-in registries: a wrong name fails naming the config key and the known names."""

from __future__ import annotations

import pytest

from mmprune_exp.benchmarks import BENCHMARKS
from mmprune_exp.calibration import CALIBRATION_SETS
from mmprune_exp.models import ADAPTERS, ModelLoadError
from mmprune_exp.pruners import PRUNERS
from mmprune_exp.registry import Registry
from mmprune_exp.tracking import TRACKERS


def test_unknown_names_name_the_key_and_the_choices():
    with pytest.raises(KeyError, match=r"pruner.name='nope' is not registered; known: \[.*'wanda'"):
        PRUNERS.get_factory("nope")
    with pytest.raises(ModelLoadError, match="model.family='llava'"):
        ADAPTERS.get_factory("llava")


def test_everything_in_the_config_tree_is_registered():
    from tests.conftest import CONF

    for group, registry in [("pruner", PRUNERS), ("benchmark", BENCHMARKS), ("calibration", CALIBRATION_SETS),
                            ("logger", TRACKERS)]:  # fmt: skip
        for yaml in (CONF / group).glob("*.yaml"):
            name = next(line.split(":", 1)[1].strip() for line in yaml.read_text().splitlines() if line.startswith("name:"))
            assert name in registry, f"{yaml} names {name!r}, which no module registers"


def test_registering_twice_is_an_error():
    reg = Registry("thing.name")
    reg.register("a")(object)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a")(dict)
