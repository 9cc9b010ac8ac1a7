"""A small real sweep, shared by the report and tracking tests: `python run.py -m ...` as a user runs it.

Built once per test session under pytest's base temp dir (whichever module asks first builds it; the other
reads the same folders), so the report and the W&B read-back look at the same jobs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

ENV_OVERRIDES = {"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}
#: The grid: the dense model (pruner=none, job_type dense_eval) and two pruners at two sparsities, 6 jobs.
GRID = ("pruner=none,magnitude,wanda", "sparsity=s30,s50")
TASK_NAME = "report_test"
#: Hydra's default layout (outputs/multirun/<date>/<time>), so the W&B group carries the sweep id <date>_<time>
SWEEP_SUBDIR = "multirun/2026-01-02/03-04-05"
SWEEP_GROUP = f"{TASK_NAME}-2026-01-02_03-04-05"


def run_cmd(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    import os

    proc = subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, env=os.environ | ENV_OVERRIDES,
                          capture_output=True, text=True, timeout=timeout, check=False)  # fmt: skip
    return proc


def small_sweep(base: Path) -> Path:
    """The sweep directory: jobs 0-5 from the grid, 6 a run that failed, 7 a job killed before it wrote anything."""
    sweep = base / SWEEP_SUBDIR
    done = base / "done.json"
    if done.exists():
        return sweep
    proc = run_cmd([
        "-m", *GRID, f"task_name={TASK_NAME}", "benchmark.limit=4", "calibration.nsamples=2", "model.device=cpu",
        "logger=wandb", f"hydra.sweep.dir={sweep}", f"paths.cache_dir={base / 'cache'}",
    ])  # fmt: skip
    if proc.returncode != 0:
        raise AssertionError(f"the sweep failed ({proc.returncode}):\n{proc.stderr[-5000:]}")
    # A job that failed: a real run.py run into the sweep folder that stops on a bad model path (exit code 2).
    failed = run_cmd([f"hydra.run.dir={sweep / '6'}", "pruner=sparsegpt", "model.path=/nonexistent/model",
                      "logger=none", f"paths.cache_dir={base / 'cache'}"])  # fmt: skip
    assert failed.returncode == 2, failed.stderr[-3000:]
    # A job killed before it wrote anything but Hydra's own files (what a SLURM array task looks like when the
    # node died right after it started): job 0's .hydra with other overrides.
    killed = sweep / "7" / ".hydra"
    killed.mkdir(parents=True)
    for name in ("config.yaml", "hydra.yaml"):
        (killed / name).write_text((sweep / "0" / ".hydra" / name).read_text())
    (killed / "overrides.yaml").write_text("- pruner=sparsegpt\n- sparsity=s50\n")
    done.write_text(json.dumps({"sweep": str(sweep)}))
    return sweep
