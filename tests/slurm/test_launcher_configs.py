"""The SLURM launcher configs compose, and the example per-machine files in launchers/local/ do what the guide says."""

from __future__ import annotations

import shutil

import pytest

from tests.conftest import ROOT

SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
OMP_LINE = "export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK"


@pytest.fixture
def machine(tmp_path):
    """A config search path holding copies of the example local/ files, as if copied into conf/local/."""

    def _machine(*files: str) -> str:
        for name in files:
            dest = tmp_path / "local" / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / "launchers" / "local" / name, dest)
        return f"hydra.searchpath=[file://{tmp_path}]"

    return _machine


def test_slurm_launcher_defaults(compose_cfg):
    launcher = compose_cfg(["hydra/launcher=slurm"]).hydra.launcher
    assert launcher._target_ == SLURM_LAUNCHER
    assert (launcher.gpus_per_node, launcher.cpus_per_task, launcher.mem_gb) == (1, 8, 64)
    assert launcher.timeout_min == 240 and launcher.array_parallelism == 16
    assert launcher.partition is None and launcher.account is None and launcher.qos is None
    assert any(OMP_LINE in line for line in launcher.setup)
    assert launcher.name == "prune_eval"  # the array is named after task_name


def test_overrides_on_the_command_line_reach_the_launcher(compose_cfg):
    launcher = compose_cfg(["hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.qos=high",
                            "hydra.launcher.gpus_per_node=2", "+hydra.launcher.additional_parameters.mail-type=END"]
                           ).hydra.launcher  # fmt: skip
    assert (launcher.partition, launcher.qos, launcher.gpus_per_node) == ("gpu", "high", 2)
    assert launcher.additional_parameters == {"mail-type": "END"}


def test_a_misspelt_launcher_key_fails_at_composition(compose_cfg):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="partion"):
        compose_cfg(["hydra/launcher=slurm", "hydra.launcher.partion=gpu"])


def test_example_cluster_file_fills_in_partition_account_and_setup(compose_cfg, machine):
    launcher = compose_cfg([machine("slurm/default.yaml"), "hydra/launcher=slurm"]).hydra.launcher
    assert (launcher.partition, launcher.account, launcher.qos, launcher.timeout_min) == ("gpu", "my_lab", "normal", 480)
    assert launcher.gpus_per_node == 1  # what the file leaves out keeps slurm.yaml's value
    assert OMP_LINE in launcher.setup[0] and "module load cuda/12.4" in launcher.setup
    # the file is about the cluster, so it stays out of local sweeps and of the throwaway test cluster
    assert compose_cfg([machine("slurm/default.yaml")]).hydra.runtime.choices["hydra/launcher"] == "basic"
    assert compose_cfg([machine("slurm/default.yaml"), "hydra/launcher=slurm_local"]).hydra.launcher.account is None


def test_example_machine_file_makes_slurm_the_default_and_basic_still_works(compose_cfg, machine):
    search = machine("default.yaml", "slurm/default.yaml")
    cfg = compose_cfg([search])
    assert cfg.hydra.launcher._target_ == SLURM_LAUNCHER and cfg.hydra.launcher.partition == "gpu"
    assert cfg.paths.cache_dir == "/scratch/my_user/mmprune/cache"
    local = compose_cfg([search, "hydra/launcher=basic"])
    assert local.hydra.launcher._target_.endswith("BasicLauncher")


def test_local_test_cluster_launcher(compose_cfg):
    launcher = compose_cfg(["hydra/launcher=slurm_local"]).hydra.launcher
    assert launcher._target_ == SLURM_LAUNCHER
    assert (launcher.partition, launcher.gpus_per_node, launcher.cpus_per_task, launcher.mem_gb) == ("debug", None, 1, 2)
