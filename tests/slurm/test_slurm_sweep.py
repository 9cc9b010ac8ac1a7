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
ACCOUNT = "mmprune-test"  # made in the cluster's database below, as an admin would on a real cluster
QOS = "normal"  # the QOS every new SLURM database has


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


def _sweep_args(base: Path, *overrides: str) -> list[str]:
    """`run.py -m` on the local cluster, writing under `base`, with the tiny model and 4 benchmark samples."""
    return [
        sys.executable, "run.py", "-m", "hydra/launcher=slurm_local",
        f"hydra.sweep.dir={base / 'sweep'}", f"paths.cache_dir={base / 'cache'}",
        "model.device=cpu", "benchmark.limit=4", "logger=none", *overrides,
    ]  # fmt: skip


def _env(cluster) -> dict[str, str]:
    # sbatch passes the environment on to the tasks: they find the cluster and stay offline as this process does
    return cluster.env | {"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}


@pytest.fixture(scope="module")
def sweep(slurm_cluster, tmp_path_factory):
    # SLURM runs a job under the account it names only where the user has an association with it
    slurm_cluster.run("sacctmgr", "-i", "add", "account", ACCOUNT)
    slurm_cluster.run("sacctmgr", "-i", "add", "user", "root", f"account={ACCOUNT}")
    base = tmp_path_factory.mktemp("slurm_sweep")
    sweep_dir = base / "sweep"
    args = _sweep_args(
        base,
        # two tasks at a time at most, on top of what the node's two CPUs allow: checks the throttle reaches sbatch
        "hydra.launcher.array_parallelism=2", f"hydra.launcher.account={ACCOUNT}", f"hydra.launcher.qos={QOS}",
        "pruner=magnitude,wanda", "sparsity=s30,s50", "calibration.nsamples=8",
    )  # fmt: skip
    start = time.monotonic()
    try:
        # The launcher blocks until every task has finished; 4 tasks of ~10 s, two at a time, take well under this.
        proc = subprocess.run(args, check=False, cwd=ROOT, env=_env(slurm_cluster), capture_output=True, text=True,
                              timeout=300)  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"the SLURM sweep did not finish in 300 s:\n{_diagnostics(slurm_cluster, sweep_dir)}")
    seconds = time.monotonic() - start
    assert proc.returncode == 0, (
        f"run.py -m on SLURM failed ({proc.returncode}):\n{proc.stderr[-4000:]}\n{_diagnostics(slurm_cluster, sweep_dir)}"
    )
    print(f"SLURM sweep of 4 jobs: {seconds:.1f} s")
    return sweep_dir


def _jobs(sweep_dir: Path) -> list[Path]:
    return sorted((p for p in sweep_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))


def _array_id(sweep_dir: Path) -> str:
    # Each job's Hydra config records the SLURM job id submitit gave it: <array job id>_<task id>.
    ids = [str(OmegaConf.load(job / ".hydra" / "hydra.yaml").hydra.job.id) for job in _jobs(sweep_dir)]
    array_ids = {i.split("_")[0] for i in ids}
    assert len(array_ids) == 1 and all("_" in i for i in ids), ids
    (array_id,) = array_ids
    assert sorted(ids) == [f"{array_id}_{t}" for t in range(4)]
    return array_id


FIELDS = "JobID,State,ExitCode,Partition,Account,QOS,AllocCPUS,JobName"


@pytest.fixture(scope="module")
def accounting(sweep, slurm_cluster) -> list[dict[str, str]]:
    """sacct's records of the sweep's array (one row per task), once SLURM has closed every task.

    The launcher returns as soon as every task has written its result file; the task's process then still has
    to exit, and slurmctld to hand the record to slurmdbd, which takes a few seconds.
    """
    array_id = _array_id(sweep)
    deadline = time.monotonic() + 60
    while True:
        out = slurm_cluster.run("sacct", "-X", "-P", "-n", "-j", array_id, "-o", FIELDS)
        rows = sorted((dict(zip(FIELDS.split(","), line.split("|"))) for line in out.splitlines()),
                      key=lambda r: r["JobID"])  # fmt: skip
        if (len(rows) == 4 and all(r["State"] not in ("PENDING", "RUNNING", "COMPLETING") for r in rows)) or (
            time.monotonic() > deadline
        ):
            return rows
        time.sleep(0.5)


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


def test_the_sweep_was_one_job_array_of_four_tasks_that_slurm_completed(sweep, accounting, slurm_cluster):
    array_id = _array_id(sweep)
    shown = "\n".join(str(r) for r in accounting)
    assert [r["JobID"] for r in accounting] == [f"{array_id}_{t}" for t in range(4)], shown  # one array, 4 tasks
    for row in accounting:
        assert (row["State"], row["ExitCode"]) == ("COMPLETED", "0:0"), shown
        # the launcher config's values as SLURM ran them
        assert (row["Partition"], row["Account"], row["QOS"]) == ("debug", ACCOUNT, QOS), shown
        assert (row["AllocCPUS"], row["JobName"]) == ("1", "prune_eval"), shown
    # and the controller's own view agrees: one array job id, task ids 0-3
    out = slurm_cluster.run("squeue", "--states=all", "-r", "-h", "-j", array_id, "-o", "%F %K %T")
    assert sorted(out.split("\n")[:-1]) == [f"{array_id} {t} COMPLETED" for t in range(4)], out


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
    # one task evaluated the dense model; the others, running beside it or after it, read its baseline (the cache
    # folder's lock makes a task that starts while the baseline is being written wait for it)
    assert sum(r["dense_from_cache"] for r in results) == 3


def test_a_task_cancelled_on_slurm_fails_the_sweep_instead_of_hanging(slurm_cluster, tmp_path):
    """submitit learns the fate of a task that wrote no result from sacct, hence the cluster's slurmdbd.

    Without accounting the launcher would wait for ever on a task that was cancelled, killed for memory or lost
    with its node; here the sweep ends with an error naming the state.
    """
    name = "mmprune-cancel-me"  # finds the task in the queue
    log = tmp_path / "run.log"
    with log.open("w") as out:
        proc = subprocess.Popen(_sweep_args(tmp_path, f"hydra.launcher.name={name}", "pruner=magnitude"), cwd=ROOT,
                                env=_env(slurm_cluster), stdout=out, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        job = ""
        while not job:
            assert proc.poll() is None, f"run.py -m ended before its task ran:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the task never ran:\n{_diagnostics(slurm_cluster, tmp_path / 'sweep')}"
            time.sleep(0.25)
            job = slurm_cluster.run("squeue", "-h", "-r", "-n", name, "-t", "running", "-o", "%i").strip()
        slurm_cluster.run("scancel", job)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"run.py -m still waits 120 s after its only task ({job}) was cancelled")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log.read_text()
    assert proc.returncode != 0, output[-3000:]
    assert f"Job {job}" in output and "CANCELLED" in output, output[-3000:]  # submitit's message
    assert slurm_cluster.run("sacct", "-X", "-n", "-P", "-j", job, "-o", "State").startswith("CANCELLED")
