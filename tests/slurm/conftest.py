"""A real one-node SLURM cluster for the tests in this folder, started once per session.

launchers/slurm_local.sh does the work (the same script `make slurm-up` runs): munged, slurmdbd with its own
MariaDB, slurmctld and slurmd on localhost with every file in a temporary folder. Where it cannot run (not root,
or the Debian packages missing) the tests that use it are skipped with the script's reason, unless
MMPRUNE_REQUIRE_SLURM=1 (.ci/run sets it as root), where that is a failure: CI must not go green by skipping.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "launchers" / "slurm_local.sh"
CANNOT_RUN_HERE = 3  # the script's exit code for "prerequisites missing"


@dataclass(frozen=True)
class LocalCluster:
    dir: Path
    env: dict[str, str]  # the environment for SLURM commands and for `run.py -m` aimed at this cluster

    def run(self, *args: str) -> str:
        """A SLURM client command (squeue, scontrol, ...) against this cluster; its stdout."""
        return subprocess.run(args, env=self.env, check=True, capture_output=True, text=True, timeout=30).stdout

    def logs(self) -> str:
        """The daemons' last log lines, for failure messages."""
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.dir / "log" / name
            if path.exists():
                parts.append(f"--- {name}\n" + "\n".join(path.read_text().splitlines()[-15:]))
        return "\n".join(parts)


def _slurm_free_environ() -> dict[str, str]:
    # Run from inside a SLURM job (make test on a compute node), the SLURM_* variables of that job would leak into
    # sbatch and srun here and point them at the wrong job or cluster.
    return {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}


def _script(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], check=False, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> LocalCluster:
    check = _script("check")
    if check.returncode == CANNOT_RUN_HERE:
        reason = check.stderr.strip().removeprefix("slurm_local: ")
        if os.environ.get("MMPRUNE_REQUIRE_SLURM") == "1":
            pytest.fail(f"MMPRUNE_REQUIRE_SLURM=1 but the local SLURM cluster cannot start: {reason}")
        pytest.skip(f"no local SLURM cluster: {reason}")
    assert check.returncode == 0, f"launchers/slurm_local.sh check failed ({check.returncode}): {check.stderr}"

    # pytest's folders are short enough for munged's socket path (a sockaddr_un holds 108 bytes)
    directory = tmp_path_factory.mktemp("slurm")
    env = _slurm_free_environ()
    # The prerequisites are there, so a cluster that does not come up is a failure to report, not a skip.
    up = _script("up", str(directory), env=env)
    assert up.returncode == 0, f"local SLURM cluster did not start ({up.returncode}):\n{up.stderr}"
    conf = directory / "etc" / "slurm.conf"
    assert up.stdout.strip().splitlines()[-1] == f"export SLURM_CONF={conf}"
    try:
        yield LocalCluster(dir=directory, env=env | {"SLURM_CONF": str(conf)})
    finally:
        down = _script("down", str(directory), env=env)
        if down.returncode != 0:
            print(f"launchers/slurm_local.sh down failed ({down.returncode}): {down.stderr}")
