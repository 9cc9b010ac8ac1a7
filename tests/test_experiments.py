"""Every `experiment=` file composes with every value of its grid, and runs through run.py in debug size.

As the lightning-hydra-template's sweep tests: the fast part composes and validates every grid value in process
and runs one job per experiment file (`-m 'experiment=glob(*)'`, each file's own settings); the slow part runs
each file's whole grid in debug size (a few questions per job).
"""

from __future__ import annotations

import itertools
import json

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from mmprune_exp.config import register_configs, validate
from tests.conftest import CONF
from tests.sweeps import run_cmd

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
#: what makes a job debug-sized; the experiment files' grids still apply on top (a grid key is not overridden)
DEBUG = ("debug=default", "benchmark.limit=2", "model.device=cpu")


@pytest.fixture
def hydra_conf():
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        yield lambda overrides: compose("config", overrides=list(overrides), return_hydra_config=True)
    GlobalHydra.instance().clear()


def axes(cfg) -> list[list[str]]:
    """``hydra.sweeper.params`` as Hydra's basic sweeper reads them: per key, its overrides (``pruner=wanda``)."""
    params = [f"{key}={value}" for key, value in cfg.hydra.sweeper.params.items()]
    parsed = OverridesParser.create().parse_overrides(params)
    return [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] for o in parsed]


def grid(cfg) -> list[list[str]]:
    """The sweep's jobs: the product of every key's values."""
    return [list(point) for point in itertools.product(*axes(cfg))]


def every_value(cfg) -> list[list[str]]:
    """Points that use every value of every key at least once (as many as the longest key has values).

    Options are validated one group at a time (and the pruner's targets against the model), so these catch what
    the whole product would, at a fraction of the composes; the slow test runs the whole product.
    """
    keys = axes(cfg)
    return [[values[i % len(values)] for values in keys] for i in range(max(map(len, keys)))]


def labels(cfg) -> dict[str, str]:
    return {g: str(cfg[g].name) for g in ("model", "pruner", "sparsity", "calibration", "benchmark")}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_grid_value_composes_and_validates(hydra_conf, name):
    from mmprune_exp.models.base import check_targets

    cfg = hydra_conf([f"experiment={name}"])
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"  # the one override runs the sweep
    assert cfg.task_name == name  # names the output and the W&B group (<task_name>-<sweep id>)
    assert len(grid(cfg)) > 1, f"experiment={name} sweeps nothing"
    points = every_value(cfg)
    seen = set()
    for point in points:
        job = hydra_conf([f"experiment={name}", *point])
        validate(job)
        if job.pruner.name != "none":  # what run.py checks before loading the model
            check_targets(job.model.family, list(job.pruner.scope), list(job.pruner.modules))
        for override in point:  # the grid value reached the job's config
            key, value = override.split("=", 1)
            if "." in key:
                assert str(OmegaConf.select(job, key)) == value, override
            else:
                assert job.hydra.runtime.choices[key] == value, override
        seen.add(tuple(point))
    assert len(seen) == len(points)


@pytest.fixture(scope="module")
def one_job_per_experiment(tmp_path_factory):
    base = tmp_path_factory.mktemp("experiments")
    sweep = base / "sweep"
    proc = run_cmd(["-m", "experiment=glob(*)", *DEBUG, "calibration.nsamples=2", f"hydra.sweep.dir={sweep}",
                    f"paths.cache_dir={base / 'cache'}"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-5000:]
    return sweep


def test_every_experiment_file_runs_one_debug_job(hydra_conf, one_job_per_experiment):
    jobs = {}
    for results in one_job_per_experiment.glob("*/results.json"):
        res = json.loads(results.read_text())
        (experiment,) = [o.split("=", 1)[1] for o in res["overrides"] if o.startswith("experiment=")]
        jobs[experiment] = res
    assert sorted(jobs) == EXPERIMENTS
    for name, res in jobs.items():
        expected = labels(hydra_conf([f"experiment={name}", *DEBUG, "calibration.nsamples=2"]))
        assert {k: res["choices"][k] for k in expected} == expected, name  # the file's own settings ran
        assert res["n_samples"] == 2 and res["score"] is not None


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_grid_point_runs_in_debug_size(hydra_conf, tmp_path, name):
    from mmprune_exp.report import main as report

    points = grid(hydra_conf([f"experiment={name}"]))
    sweep = tmp_path / "sweep"
    proc = run_cmd([f"experiment={name}", *DEBUG, f"hydra.sweep.dir={sweep}", f"paths.cache_dir={tmp_path / 'cache'}"],
                   timeout=3600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert len(list(sweep.glob("*/results.json"))) == len(points)
    assert report([str(sweep), "--wandb", "off"]) == 0
    assert "without results" not in (sweep / "report" / "report.md").read_text()
