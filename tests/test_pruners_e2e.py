"""The pruners end to end on the embedded tiny model, as one local Hydra sweep (`run.py -m`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

LIMIT = 100


def run_sweep(out, *grid):
    env = os.environ | {"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    args = [
        sys.executable, "run.py", "-m", *grid, f"benchmark.limit={LIMIT}", "logger=none", "model.device=cpu",
        f"hydra.sweep.dir={out}", f"paths.cache_dir={out.parent / 'cache'}",
    ]  # fmt: skip
    proc = subprocess.run(args, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-5000:]
    results = {}
    for job in out.iterdir():
        if (job / "results.json").exists():
            r = json.loads((job / "results.json").read_text())
            results[(r["choices"]["pruner"], r["choices"]["sparsity"])] = r
    return results


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two local sweeps sharing one dense-baseline cache: three methods at 50%, magnitude at 30% and 70%."""
    base = tmp_path_factory.mktemp("sweep")
    results = run_sweep(base / "methods", "pruner=magnitude,wanda,sparsegpt", "sparsity=s50")
    results |= run_sweep(base / "curve", "pruner=magnitude", "sparsity=s30,s70")
    assert len(results) == 5
    return results


def test_dense_baseline_is_strong_and_shared(sweep):
    dense = {r["dense_score"] for r in sweep.values()}
    assert len(dense) == 1 and dense.pop() >= 0.9  # one cached baseline for the whole sweep


def test_calibrated_pruners_recover_at_least_95_percent_and_beat_magnitude_at_50(sweep):
    magnitude = sweep[("magnitude", "s50")]["recovery"]
    for method in ("wanda", "sparsegpt"):
        recovery = sweep[(method, "s50")]["recovery"]
        assert recovery >= 0.95, (method, recovery)
        assert recovery >= magnitude, (method, recovery, magnitude)


def test_more_sparsity_costs_more_accuracy(sweep):
    assert sweep[("magnitude", "s70")]["recovery"] < sweep[("magnitude", "s30")]["recovery"]
    assert sweep[("magnitude", "s70")]["sparsity"] > sweep[("magnitude", "s30")]["sparsity"]
