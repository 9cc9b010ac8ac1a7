"""`python run.py ... token_pruner=...` end to end: token pruning alone, at keep 1.0, and with weight pruning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mmprune_exp.tracking import read_offline_run
from tests.test_run_e2e import run_py


def rows(run_dir):
    return [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]


def test_keep_ratio_one_answers_exactly_like_the_dense_model(tmp_path):
    run_py(tmp_path / "r", "pruner=none", "token_pruner=fastv", "token_pruner.keep_ratio=1.0", "benchmark.limit=16",
           "logger=none")  # fmt: skip
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    dense = {r["id"]: r["response"] for r in rows(Path(results["dense_cache"]))}
    assert {r["id"]: r["response"] for r in rows(tmp_path / "r")} == dense
    assert results["choices"]["token_pruner"] == "fastv" and results["keep_ratio"] == 1.0
    assert results["tokens"]["kept_ratio"] == 1.0 and results["tokens"]["flops_ratio"] == 1.0


def test_weights_and_tokens_pruned_in_one_run_reported_in_results_samples_and_wandb(tmp_path):
    run_dir = tmp_path / "r"
    run_py(run_dir, "pruner=magnitude", "sparsity=s30", "token_pruner=fastv", "token_pruner.keep_ratio=0.5",
           "token_pruner.save_kept=2", "benchmark.limit=12", "logger=wandb")  # fmt: skip
    results = json.loads((run_dir / "results.json").read_text())
    assert results["sparsity"] == pytest.approx(0.3, abs=0.01)
    tokens = results["tokens"]
    assert tokens["samples"] == 12
    assert tokens["visual_kept"] == pytest.approx(tokens["visual_before"] * 0.5, abs=0.5)
    assert 0.0 < tokens["flops_ratio"] < 1.0 and tokens["kv_cache_bytes"] > 0 and tokens["prefill_s"] > 0
    for row in rows(run_dir):  # per sample
        assert row["tokens"]["visual_kept"] == round(row["tokens"]["visual_before"] * 0.5)
    assert len(list((run_dir / "kept_tokens").glob("*.png"))) == 2
    # the dense baseline is the unpruned, full-token model
    dense = rows(Path(results["dense_cache"]))
    assert all("tokens" not in r for r in dense)
    (offline,) = list((run_dir / "wandb").glob("offline-run-*"))
    logged = {k: v for step in read_offline_run(offline).history for k, v in step.items()}
    assert logged["tokens/kept_ratio"] == pytest.approx(tokens["kept_ratio"])
    assert logged["tokens/flops_ratio"] == pytest.approx(tokens["flops_ratio"])


def test_a_bad_token_pruner_value_fails_before_loading(tmp_path):
    proc = run_py(tmp_path / "r", "token_pruner=fastv", "token_pruner.keep_ratio=0", "logger=none", check=False)
    assert proc.returncode == 2
    assert "token_pruner.keep_ratio=0" in proc.stderr + proc.stdout


def test_yopo_calibrates_its_head_mask_in_the_run_and_reuses_it_by_path(tmp_path):
    first = tmp_path / "a"
    run_py(first, "pruner=none", "token_pruner=yopo", "token_pruner.keep_ratio=0.5", "benchmark.limit=8",
           "logger=none")  # fmt: skip
    mask = first / "yopo_head_mask.pt"
    assert mask.exists() and (first / "yopo_head_mask.json").exists()
    results = json.loads((first / "results.json").read_text())
    assert results["time_s"]["token_calibration"] > 0 and results["tokens"]["flops_ratio"] < 1.0
    second = tmp_path / "b"  # the saved mask by path: the same answers
    run_py(second, "pruner=none", "token_pruner=yopo", "token_pruner.keep_ratio=0.5", f"token_pruner.head_mask={mask}",
           "benchmark.limit=8", "logger=none")  # fmt: skip
    assert [r["response"] for r in rows(second)] == [r["response"] for r in rows(first)]
