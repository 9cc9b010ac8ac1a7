"""A Hydra multirun submitted to a real SLURM cluster (tests/slurm/conftest.py) through hydra-submitit-launcher.

`run.py -m hydra/launcher=slurm_local` with a 2x2 grid must become one job array of four tasks that SLURM runs
to completion, each task writing its own run directory, with the dense baseline shared through one cache.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import ROOT

GRID = {("magnitude", "s30"), ("magnitude", "s50"), ("wanda", "s30"), ("wanda", "s50")}
ACCOUNT = "mmprune-test"  # any name: the local cluster keeps no accounts, but shows what sbatch was given


def _diagnostics(cluster, sweep: Path) -> str:
    """What a failed or hung sweep leaves behind: the queue, the tasks' own logs, the daemons' logs."""
    parts = []
    try:
        parts.append(cluster.run("squeue", "--states=all", "-r", "-o", "%i %T %r %e"))
    except subprocess.SubprocessError as e:
        parts.append(f"squeue failed: {e}")
    for log in sorted(sweep.glob(".submitit/*/*_log.err")):
        parts.append(f"--- {log.relative_to(sweep)}\n" + "\n".join(log.read_text().splitlines()[-20:]))
    parts.append(cluster.logs())
    return "\n".join(parts)


@pytest.fixture(scope="module")
def sweep(slurm_cluster, tmp_path_factory):
    base = tmp_path_factory.mktemp("slurm_sweep")
    sweep_dir = base / "sweep"
    args = [
        sys.executable, "run.py", "-m", "hydra/launcher=slurm_local",
        f"hydra.sweep.dir={sweep_dir}", f"paths.cache_dir={base / 'cache'}",
        # two tasks at a time at most, on top of what the node's two CPUs allow: checks the throttle reaches sbatch
        "hydra.launcher.array_parallelism=2", f"hydra.launcher.account={ACCOUNT}",
        "model.device=cpu", "pruner=magnitude,wanda", "sparsity=s30,s50",
        "benchmark.limit=4", "calibration.nsamples=8", "logger=none",
    ]  # fmt: skip
    env = slurm_cluster.env | {"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}
    start = time.monotonic()
    try:
        # The launcher blocks until every task has finished; 4 tasks of ~10 s, two at a time, take well under this.
        proc = subprocess.run(args, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the SLURM sweep did not finish in 300 s:\n{_diagnostics(slurm_cluster, sweep_dir)}")
    seconds = time.monotonic() - start
    assert proc.returncode == 0, (
        f"run.py -m on SLURM failed ({proc.returncode}):\n{proc.stderr[-4000:]}\n{_diagnostics(slurm_cluster, sweep_dir)}"
    )
    print(f"SLURM sweep of 4 jobs: {seconds:.1f} s")
    return sweep_dir


def _array_id(sweep_dir: Path) -> str:
    # Each job's Hydra config records the SLURM job id submitit gave it: <array job id>_<task id>.
    ids = [str(OmegaConf.load(job / ".hydra" / "hydra.yaml").hydra.job.id) for job in _jobs(sweep_dir)]
    array_ids = {i.split("_")[0] for i in ids}
    assert len(array_ids) == 1 and all("_" in i for i in ids), ids
    (array_id,) = array_ids
    assert sorted(ids) == [f"{array_id}_{t}" for t in range(4)]
    return array_id


@pytest.fixture(scope="module")
def queue(sweep, slurm_cluster) -> list[list[str]]:
    """squeue's rows for the sweep's array once SLURM has closed every task.

    The launcher returns as soon as every task has written its result file; the task's process then still has
    to exit and SLURM to record it, which takes a few seconds. Finished jobs stay listed for the cluster's MinJobAge
    (an hour), so this reads the controller's own record, not a file the job wrote.
    """
    array_id = _array_id(sweep)
    deadline = time.monotonic() + 60
    while True:
        out = slurm_cluster.run("squeue", "--states=all", "-r", "-h", "-j", array_id, "-o", "%F|%K|%T|%P|%a|%C|%j")
        rows = sorted(line.split("|") for line in out.splitlines())
        if all(r[2] not in ("PENDING", "RUNNING", "COMPLETING") for r in rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def _jobs(sweep_dir: Path) -> list[Path]:
    return sorted((p for p in sweep_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def test_every_sweep_point_ran_and_wrote_results(sweep):
    jobs = _jobs(sweep)
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    points = set()
    for job in jobs:
        results = json.loads((job / "results.json").read_text())
        pruner, sparsity = results["choices"]["pruner"], results["choices"]["sparsity"]
        points.add((pruner, sparsity))
        assert results["n_samples"] == 4
        assert results["sparsity"] == pytest.approx(int(sparsity[1:]) / 100, abs=0.01)
        assert results["score"] is not None and results["recovery"] is not None
    assert points == GRID


def test_the_sweep_was_one_job_array_of_four_tasks_that_slurm_completed(sweep, queue):
    array_id = _array_id(sweep)
    shown = "\n".join("|".join(r) for r in queue)
    assert [r[0] for r in queue] == [array_id] * 4, shown  # one array
    assert [r[1] for r in queue] == ["0", "1", "2", "3"], shown  # its four tasks
    for _, _, state, partition, account, cpus, name in queue:
        assert state == "COMPLETED", shown
        # the launcher config's values as SLURM received them
        assert (partition, account, cpus, name) == ("debug", ACCOUNT, "1", "prune_eval"), shown


def test_jobs_ran_with_this_venvs_python_and_the_launcher_setup(sweep):
    (script,) = sweep.glob(".submitit/*/*_submission.sh")
    text = script.read_text()
    assert "#SBATCH --array=0-3%2" in text  # one array, throttled as asked
    assert "#SBATCH --partition=debug" in text and "#SBATCH --mem=2GB" in text and "#SBATCH --time=30" in text
    assert "export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK" in text
    # submitit starts each task with the interpreter that ran `run.py -m`: here the repository's .venv
    assert f"{sys.executable} -u -m submitit.core._submit" in text


def test_dense_baseline_is_shared_through_the_cache(sweep):
    results = [json.loads((job / "results.json").read_text()) for job in _jobs(sweep)]
    caches = {r["dense_cache"] for r in results}
    assert len(caches) == 1 and Path(caches.pop()).parent.parent == sweep.parent / "cache"
    assert len({r["dense_score"] for r in results}) == 1
    # two tasks at a time: at least the second pair finds the baseline the first pair wrote
    assert sum(r["dense_from_cache"] for r in results) >= 2
