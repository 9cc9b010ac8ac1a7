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


pytestmark = pytest.mark.slow  # five runs on 100 questions each: minutes on 2 cores (make test-full)


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
    assert len(dense) == 1 and dense.pop() >= 0.85  # one cached baseline for the whole sweep


def test_recovery_at_50_percent(sweep):
    """Measured on the shipped checkpoint (100 held-out questions, dense 0.99): magnitude 0.92, Wanda 0.85,
    SparseGPT 1.00. On 400 questions (``bench/recovery_diagnosis.py``, dense 0.98): magnitude 0.916, Wanda 0.870,
    SparseGPT 0.995.

    The weight-pruning issue aims at >= 0.95 for Wanda and SparseGPT, and at least magnitude's. SparseGPT reaches
    it; Wanda does not, on this 1.8M-parameter model. Most of Wanda's loss is in the count questions, and almost
    every wrong count is too low: the heads that count (layers 1 and 2) read the number from their attention mass
    on the matching image tokens, and a mask without a weight update flattens that attention (head 1.2 at four
    objects: 0.52 dense, 0.45 after Wanda, about the dense mass at three objects). SparseGPT's update makes up for
    it (0.51).
    Wanda's advantage over magnitude comes from the large input features of big LLMs, which a model this size
    does not have. Tried for Wanda on the earlier 16-token model and not shipped (trainer options kept): two more
    counting heads (--count-heads 1:2,2:2,1:3,2:3: Wanda 0.85), a 256-wide text model (25 min, AP50 0.50: Wanda
    0.917), weight decay 0.5 (Wanda 0.868). Asserted here: SparseGPT's target, and that every method keeps most of the
    accuracy at the sparsity it was asked for.
    """
    recovery = {m: sweep[(m, "s50")]["recovery"] for m in ("magnitude", "wanda", "sparsegpt")}
    assert recovery["sparsegpt"] >= 0.95 and recovery["sparsegpt"] >= recovery["magnitude"], recovery
    assert all(r >= 0.7 for r in recovery.values()), recovery
    assert all(abs(sweep[(m, "s50")]["sparsity"] - 0.5) < 0.01 for m in recovery)


def test_more_sparsity_costs_more_accuracy(sweep):
    assert sweep[("magnitude", "s70")]["recovery"] < sweep[("magnitude", "s30")]["recovery"]
    assert sweep[("magnitude", "s70")]["sparsity"] > sweep[("magnitude", "s30")]["sparsity"]
