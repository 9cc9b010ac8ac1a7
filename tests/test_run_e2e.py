"""End to end: `python run.py` on the embedded tiny model, as a user runs it (subprocess, offline W&B)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mmprune_exp.tracking import read_offline_run
from tests.conftest import ROOT

# Development hook: run these tests against another checkpoint directory.
MODEL_OVERRIDE = [f"model.path={os.environ['MMPRUNE_TEST_MODEL']}"] if os.environ.get("MMPRUNE_TEST_MODEL") else []


ENV = os.environ | {"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}


def run_args(tmp: Path, *overrides: str) -> list[str]:
    own_model = any(o.startswith(("model=", "model.path=")) for o in overrides)
    return [
        sys.executable, "run.py", f"hydra.run.dir={tmp}", f"paths.cache_dir={tmp.parent / 'cache'}",
        "model.device=cpu", *([] if own_model else MODEL_OVERRIDE), *overrides,
    ]  # fmt: skip


def run_py(tmp: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    args = run_args(tmp, *overrides)
    proc = subprocess.run(args, check=False, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"run.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A dense run and a 50% magnitude run sharing one dense-baseline cache."""
    base = tmp_path_factory.mktemp("e2e")
    out = {}
    for name, pruner, sparsity in [("dense", "none", "s50"), ("magnitude", "magnitude", "s50")]:
        run_py(base / name, f"pruner={pruner}", f"sparsity={sparsity}", "benchmark.limit=24", "logger=wandb")
        out[name] = base / name
    return out


@pytest.mark.parametrize("name", ["dense", "magnitude"])
def test_run_writes_results_samples_and_config(runs, name):
    run_dir = runs[name]
    results = json.loads((run_dir / "results.json").read_text())
    for key in ("score", "dense_score", "recovery", "sparsity", "choices", "time_s", "mem"):
        assert key in results
    assert results["choices"]["pruner"] == ("none" if name == "dense" else "magnitude")
    assert results["n_samples"] == 24
    rows = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and results["score"] == pytest.approx(sum(r["score"] for r in rows) / 24)
    assert (run_dir / ".hydra" / "config.yaml").exists()
    assert (run_dir / "sparsity.json").exists()


def test_dense_run_matches_its_baseline_and_pruning_changes_weights(runs):
    dense = json.loads((runs["dense"] / "results.json").read_text())
    pruned = json.loads((runs["magnitude"] / "results.json").read_text())
    assert dense["sparsity"] < 0.01 and dense["recovery"] == pytest.approx(1.0)
    assert pruned["sparsity"] == pytest.approx(0.5, abs=1e-3)
    report = json.loads((runs["magnitude"] / "sparsity.json").read_text())
    assert all(abs(v - 0.5) < 1e-3 for v in report["per_matrix"].values())
    assert not any("visual" in k or "lm_head" in k for k in report["per_matrix"])  # language decoder only
    # the second run read the first run's dense baseline from the cache instead of regenerating it
    assert pruned["dense_cache"] == dense["dense_cache"]
    assert pruned["dense_score"] == dense["dense_score"]
    assert dense["dense_from_cache"] is False and pruned["dense_from_cache"] is True


@pytest.mark.parametrize("name", ["dense", "magnitude"])
def test_offline_wandb_run_holds_config_and_metrics(runs, name):
    run_dir = runs[name]
    results = json.loads((run_dir / "results.json").read_text())
    (offline,) = list((run_dir / "wandb").glob("offline-run-*"))
    run = read_offline_run(offline)
    assert run.run_id == results["wandb_run_id"] == (run_dir / "wandb_id.txt").read_text()
    assert run.exit_code == 0
    assert run.config["pruner"]["name"] == results["choices"]["pruner"]
    assert run.config["sparsity"]["value"] == 0.5
    logged = {k: v for step in run.history for k, v in step.items()}
    assert logged["bench/shapes_vqa/score"] == pytest.approx(results["score"])
    assert logged["dense/shapes_vqa/score"] == pytest.approx(results["dense_score"])
    assert logged["sparsity/overall"] == pytest.approx(results["sparsity"])
    assert "time/eval_s" in logged and "mem/peak_rss_gb" in logged
    if name == "magnitude":  # the per-matrix sparsity heatmap, in the run dir and on W&B
        assert (run_dir / "sparsity.png").exists() and logged["sparsity/heatmap/_type"] == "image-file"
    else:
        assert not (run_dir / "sparsity.png").exists()
    assert run.summary["recovery"] == pytest.approx(results["recovery"])
    # the per-sample table: one row per evaluated sample, stored in the run's media folder
    assert logged["samples/shapes_vqa/_type"] == "table-file" and logged["samples/shapes_vqa/nrows"] == 24
    table = json.loads((offline / "files" / logged["samples/shapes_vqa/path"]).read_text())
    assert [row[table["columns"].index("id")] for row in table["data"]] == [
        json.loads(x)["id"] for x in (run_dir / "samples.jsonl").read_text().splitlines()
    ]


def test_grounding_benchmark_end_to_end(tmp_path):
    run_py(tmp_path / "g", "pruner=none", "benchmark=shapes_grounding", "benchmark.limit=8", "logger=none",
           "dense_baseline=false")  # fmt: skip
    results = json.loads((tmp_path / "g" / "results.json").read_text())
    assert {"ap", "ap50", "ap75"} <= set(results["metrics"]) and results["score"] == results["metrics"]["ap50"]
    assert results["dense_score"] is None and results["recovery"] is None


def test_bad_value_fails_before_loading_naming_the_key(tmp_path):
    # model.path points nowhere: had the run got as far as loading, the error would name model.path instead
    proc = run_py(tmp_path / "bad", "sparsity.value=1.5", "model.path=/nonexistent/model", check=False)
    assert proc.returncode == 2
    assert "sparsity.value=1.5" in proc.stderr and "model.path" not in proc.stderr.replace("'model.path=", "")
    assert not (tmp_path / "bad" / "wandb").exists()


def test_missing_model_path_says_how_to_fix_it(tmp_path):
    proc = run_py(tmp_path / "nomodel", "model.path=/nonexistent/model", "logger=none", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = error_lines(proc)
    assert "model.path='/nonexistent/model' is not a directory" in line


def test_unknown_group_option_fails(tmp_path):
    proc = run_py(tmp_path / "unknown", "pruner=does_not_exist", check=False)
    assert proc.returncode != 0 and "does_not_exist" in proc.stderr


def test_hub_id_without_network_says_how_to_use_local_weights(tmp_path):
    proc = run_py(tmp_path / "hub", "model=qwen2_5_vl_3b", "logger=none", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = error_lines(proc)
    assert "Qwen/Qwen2.5-VL-3B-Instruct" in line and "model.path=/data/" in line


def test_failed_run_is_marked_failed_in_wandb(tmp_path):
    proc = run_py(tmp_path / "fail", "model.path=/nonexistent/model", "logger=wandb", check=False)
    assert proc.returncode == 2
    (offline,) = list((tmp_path / "fail" / "wandb").glob("offline-run-*"))
    assert read_offline_run(offline).exit_code == 2  # the same code as the process


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if "[ERROR]" in line]


@pytest.mark.parametrize(
    "override,message",
    [
        ("+foo=1", "foo=1 is not a config key"),
        ("pruner.modules=[q_proj,nope]", "pruner.modules=['q_proj', 'nope'] is invalid"),
    ],
)
def test_user_errors_are_one_line_exit_2_and_nothing_runs(tmp_path, override, message):
    # model.path points nowhere: had the run got as far as loading, the error would be about the model
    proc = run_py(tmp_path / "bad", override, "model.path=/nonexistent/model", "logger=wandb", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    (line,) = error_lines(proc)
    assert message in line
    assert not (tmp_path / "bad" / "wandb").exists() and not (tmp_path / "bad" / "samples.jsonl").exists()


def test_resume_with_another_config_is_refused_naming_the_keys(runs):
    run_dir = runs["magnitude"]
    samples = (run_dir / "samples.jsonl").read_text()
    proc = run_py(run_dir, "pruner=wanda", "sparsity=s90", "benchmark.limit=24", "logger=none", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = error_lines(proc)
    assert "refusing to resume" in line
    assert "pruner.name: 'magnitude' there, 'wanda' now" in line and "sparsity.value: 0.5 there, 0.9 now" in line
    assert (run_dir / "samples.jsonl").read_text() == samples  # the earlier run's rows are untouched


def test_sigterm_mid_evaluation_is_logged_kept_and_resumed(tmp_path):
    """What SLURM does on preemption: SIGTERM, then the same job again in the same directory."""
    run_dir = tmp_path / "preempted"
    overrides = ("pruner=magnitude", "benchmark.limit=48", "benchmark.batch_size=2", "dense_baseline=false",
                 "logger=wandb")  # fmt: skip
    proc = subprocess.Popen(run_args(run_dir, *overrides), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    samples = run_dir / "samples.jsonl"
    deadline = time.monotonic() + 300  # only a guard against a hang; the rows usually appear within seconds
    while not (samples.exists() and len(samples.read_text().splitlines()) >= 4):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "interrupted by SIGTERM" in stderr and "Traceback" not in stderr
    kept = len(samples.read_text().splitlines())
    assert 4 <= kept < 48
    assert "interrupted by SIGTERM" in (run_dir / "run.log").read_text()
    (offline,) = list((run_dir / "wandb").glob("offline-run-*"))
    first = read_offline_run(offline)
    assert first.exit_code == 128 + signal.SIGTERM  # the W&B run is finished, and marked failed

    rerun = run_py(run_dir, *overrides)
    assert "resuming" in rerun.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["n_samples"] == 48 and results["resumed_samples"] == kept
    rows = [json.loads(x) for x in samples.read_text().splitlines()]
    assert len({r["id"] for r in rows}) == 48
    # the same W&B run, in the same folder, now finished cleanly
    (offline,) = list((run_dir / "wandb").glob("offline-run-*"))
    second = read_offline_run(offline)
    assert second.run_id == first.run_id == results["wandb_run_id"] and second.exit_code == 0


def test_sparsegpt_keeps_most_of_the_dense_accuracy(tmp_path):
    """SparseGPT at 50% on the shipped model (README: 0.97-0.98 recovery); 64 questions keep this fast.

    0.9 leaves room for a few answers that flip with float rounding on another CPU or BLAS (each is 1/64).
    """
    run_py(tmp_path / "sgpt", "pruner=sparsegpt", "sparsity=s50", "benchmark.limit=64", "benchmark.batch_size=32",
           "logger=none")  # fmt: skip
    results = json.loads((tmp_path / "sgpt" / "results.json").read_text())
    assert results["dense_score"] >= 0.95
    assert results["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert results["recovery"] >= 0.9


def test_disk_streamed_run_prunes_like_the_in_memory_run(tmp_path):
    """model.offload=disk through run.py: layers streamed, pruned checkpoint written, reloaded and evaluated."""
    common = ("pruner=wanda", "sparsity=s50", "benchmark.limit=16", "logger=none")
    run_py(tmp_path / "disk", "model.offload=disk", *common)
    run_py(tmp_path / "memory", *common)
    disk = json.loads((tmp_path / "disk" / "results.json").read_text())
    memory = json.loads((tmp_path / "memory" / "results.json").read_text())
    assert disk["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert json.loads((tmp_path / "disk" / "pruned_model" / "sparsity.json").read_text())["overall"] == disk["sparsity"]
    # The two paths compute the same statistics (tests/pruners/test_offload.py: weights within 1e-6), so the
    # answers agree; one answer in 16 may flip where a near-tie mask entry rounds the other way.
    same = sum(a == b for a, b in zip(*(
        [json.loads(x)["response"] for x in (tmp_path / name / "samples.jsonl").read_text().splitlines()]
        for name in ("disk", "memory")
    )))  # fmt: skip
    assert same >= 15 and disk["score"] == pytest.approx(memory["score"], abs=1 / 16)


def test_tamp_run_reports_its_profile_scores_and_tokens(tmp_path):
    """`python run.py pruner=tamp sparsity=s60`: the per-matrix profile, DAS scores and AMIA's tokens, on disk and
    on W&B."""
    run_py(tmp_path / "tamp", "pruner=tamp", "sparsity=s60", "benchmark.limit=16", "logger=wandb")
    results = json.loads((tmp_path / "tamp" / "results.json").read_text())
    # Wanda's int(C·s) per row rounds every matrix down a little (C = 128 here); DAS's budget itself is exact
    assert results["sparsity"] == pytest.approx(0.6, abs=0.01)
    report = json.loads((tmp_path / "tamp" / "sparsity.json").read_text())
    kinds: dict[str, list[float]] = {}
    for name, value in report["per_matrix"].items():
        kinds.setdefault(name.rsplit(".", 1)[-1], []).append(value)
    mean = {k: sum(v) / len(v) for k, v in kinds.items()}
    assert max(mean["k_proj"], mean["v_proj"]) < min(mean["gate_proj"], mean["up_proj"], mean["down_proj"])
    method = report["method"]
    assert set(method["das_scores"]) == set(report["per_matrix"])
    assert set(method["amia_tokens_per_layer"]) == {"0", "1", "2", "3"}
    (offline,) = list((tmp_path / "tamp" / "wandb").glob("offline-run-*"))
    logged = {k: v for step in read_offline_run(offline).history for k, v in step.items()}
    assert logged["method/tamp/amia_tokens_per_layer/0/total"] == method["amia_tokens_per_layer"]["0"]["total"]
    assert (tmp_path / "tamp" / "sparsity.png").exists()
