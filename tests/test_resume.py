"""Kill and resume, end to end: `python run.py` stopped by SIGTERM in the pruning or in the evaluation and started
again with the same overrides and run directory ends with the same weights, masks, report and metrics as a run
that was never stopped, in the same W&B run.

What SLURM does on preemption (SIGTERM, then the same job again); the requeue through hydra-submitit-launcher's
``checkpoint`` (SIGUSR2, then submitit starts the task function again) is the last test. In-process checks of every
calibrated pruner's resume are in tests/pruners/test_checkpoint.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import open_dict
from safetensors.torch import load_file

from mmprune_exp.errors import ConfigError
from mmprune_exp.tracking import read_offline_run
from tests.conftest import ROOT
from tests.test_run_e2e import ENV, run_args, run_py

HANG_GUARD_S = 300  # only against a hang: what the loops wait for usually comes within seconds
SIGTERM_EXIT = 128 + signal.SIGTERM


def weights_hash(folder: Path) -> str:
    """sha256 over every tensor of a checkpoint folder, by name (independent of how the shards are split)."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors |= load_file(shard)
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def answers(run_dir: Path) -> dict[str, tuple]:
    """What each sample's row says about the model (its timings left out)."""
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == len({r["id"] for r in rows})
    return {r["id"]: (r["response"], r["parsed"], r["score"]) for r in rows}


def layers_done(run_dir: Path) -> int:
    state = run_dir / "prune_ckpt" / "state.pt"
    if not state.exists():
        return 0
    try:
        return torch.load(state, weights_only=True)["done"]
    except Exception:  # noqa: BLE001 - replaced while read (it is written to a temporary file and renamed)
        return 0


def kill_when(run_dir: Path, overrides: tuple[str, ...], ready, what: str) -> str:
    """Start run.py, SIGTERM it once ``ready()`` holds, check it stopped as SLURM expects; its stderr."""
    proc = subprocess.Popen(run_args(run_dir, *overrides), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + HANG_GUARD_S
    while not ready():
        assert proc.poll() is None, f"run.py ended before {what}:\n{proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {HANG_GUARD_S} s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == SIGTERM_EXIT, stderr[-3000:]  # SLURM and the shell see the signal's exit code
    assert "interrupted by SIGTERM" in stderr and "Traceback" not in stderr
    return stderr


def offline_run(run_dir: Path):
    (folder,) = list((run_dir / "wandb").glob("offline-run-*"))  # one W&B run folder per run, resumed or not
    return read_offline_run(folder)


def test_sigterm_mid_prune_then_mid_eval_resumes_to_the_uninterrupted_weights_and_metrics(tmp_path):
    """TAMP (a plan, per-layer records, weights) with save_model=true, stopped twice, against a run never stopped."""
    overrides = ("pruner=tamp", "sparsity=s50", "benchmark.limit=48", "benchmark.batch_size=2", "dense_baseline=false",
                 "save_model=true", "logger=wandb")  # fmt: skip
    reference = tmp_path / "reference"
    run_py(reference, *overrides)

    run_dir = tmp_path / "preempted"
    first = kill_when(run_dir, overrides, lambda: layers_done(run_dir) >= 1, "a pruned layer checkpointed")
    done = layers_done(run_dir)
    assert 1 <= done < 4, f"the SIGTERM was meant to land in the pruning; {done} of 4 layers were done"
    assert not (run_dir / "samples.jsonl").exists() and not (run_dir / "pruned_model").exists()
    assert offline_run(run_dir).exit_code == SIGTERM_EXIT
    assert "pruned layers and samples written so far are kept" in first

    samples = run_dir / "samples.jsonl"
    second = kill_when(run_dir, overrides, lambda: samples.exists() and len(samples.read_text().splitlines()) >= 4,
                       "4 evaluated samples")  # fmt: skip
    # it continued the pruning: the plan (DAS's dense pass) and the finished layers came from the first attempt
    assert "the plan comes from an earlier attempt" in second and "diversity" not in second
    assert f"{done} of 4 layers were pruned by an earlier attempt of this run" in second
    assert layers_done(run_dir) == 4
    kept = len(samples.read_text().splitlines())

    third = run_py(run_dir, *overrides).stderr
    # every layer was checkpointed before the evaluation: restored, with no calibration pass at all
    assert "4 of 4 layers were pruned by an earlier attempt of this run" in third and "calibration inputs" not in third
    assert f"resuming, {kept} of 48 samples" in third

    resumed = json.loads((run_dir / "results.json").read_text())
    expected = json.loads((reference / "results.json").read_text())
    assert weights_hash(run_dir / "pruned_model") == weights_hash(reference / "pruned_model")
    assert json.loads((run_dir / "sparsity.json").read_text()) == json.loads((reference / "sparsity.json").read_text())
    assert answers(run_dir) == answers(reference)
    for key in ("score", "metrics", "sparsity", "n_samples"):
        assert resumed[key] == expected[key], key
    assert resumed["resumed_samples"] == kept
    assert not (run_dir / "prune_ckpt").exists()  # results.json supersedes it
    # one W&B run through the three attempts, finished cleanly by the last
    wandb = offline_run(run_dir)
    assert wandb.run_id == resumed["wandb_run_id"] == (run_dir / "wandb_id.txt").read_text() and wandb.exit_code == 0


def test_streamed_run_killed_mid_prune_resumes_from_its_pruned_model_files(tmp_path):
    """model.offload=disk: the layers already in pruned_model/ are the checkpoint (no second copy)."""
    overrides = ("pruner=wanda", "sparsity=s50", "model.offload=disk", "benchmark.limit=8", "dense_baseline=false",
                 "logger=none")  # fmt: skip
    reference = tmp_path / "reference"
    run_py(reference, *overrides)

    run_dir = tmp_path / "preempted"
    kill_when(run_dir, overrides, lambda: layers_done(run_dir) >= 1, "a pruned layer checkpointed")
    done = layers_done(run_dir)
    assert 1 <= done < 4, f"the SIGTERM was meant to land in the pruning; {done} of 4 layers were done"
    assert sorted(p.name for p in (run_dir / "prune_ckpt").iterdir()) == ["state.pt"]
    assert (run_dir / "pruned_model" / "layer-00000.safetensors").exists()

    rerun = run_py(run_dir, *overrides).stderr
    assert f"{done} of 4 layers were pruned by an earlier attempt of this run" in rerun
    assert weights_hash(run_dir / "pruned_model") == weights_hash(reference / "pruned_model")
    assert answers(run_dir) == answers(reference)
    assert json.loads((run_dir / "results.json").read_text())["score"] == json.loads(
        (reference / "results.json").read_text())["score"]  # fmt: skip


def test_a_pruning_checkpoint_of_another_config_is_not_resumed(compose_cfg, tmp_path):
    """A run killed mid-prune has no samples yet; its checkpoint alone must stop another config from using it."""
    from mmprune_exp import rundir

    rundir.claim(tmp_path, compose_cfg(["pruner=wanda"]))
    (tmp_path / "prune_ckpt").mkdir()
    (tmp_path / "prune_ckpt" / "state.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="pruner.name: 'wanda' there, 'sparsegpt' now"):
        rundir.claim(tmp_path, compose_cfg(["pruner=sparsegpt"]))
    assert rundir.claim(tmp_path, compose_cfg(["pruner=wanda"])) is True  # the same config resumes


def _submitit_task(sweep_dir: Path) -> int | None:
    """pid of the submitit task process running a job of this sweep (submitit_local starts it), if any."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = (Path("/proc") / pid / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in cmdline and any(str(sweep_dir).encode() in part for part in cmdline):
            return int(pid)
    return None


def test_submitit_requeue_resumes_the_pruning_in_the_same_job_directory(tmp_path):
    """hydra-submitit-launcher's requeue, run by submitit's local executor as SLURM would run it.

    SIGUSR2 (what SLURM sends `signal_delay_s` before the time limit, or on preemption) reaches submitit's handler in
    the task, which pickles the launcher's ``checkpoint`` (the same Hydra job, same overrides) and exits; the
    executor starts the task again, which calls run.py's task function with the same config. The sweep dir has a
    ${now:} in it: the requeued job must land in the same folder and continue the pruning there.
    """
    sweep = tmp_path / "sweep"
    args = [sys.executable, "run.py", "-m", "hydra/launcher=submitit_local", f"hydra.sweep.dir={sweep}/${{now:%H-%M-%S-%f}}",
            f"paths.cache_dir={tmp_path / 'cache'}", "model.device=cpu", "pruner=wanda", "benchmark.limit=8",
            "dense_baseline=false", "save_model=true", "logger=wandb"]  # fmt: skip
    proc = subprocess.Popen(args, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + HANG_GUARD_S

    def job_dir() -> Path | None:
        found = list(sweep.glob("*/0"))
        return found[0] if found else None

    while not (job_dir() is not None and layers_done(job_dir()) >= 1):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no pruned layer checkpointed"
        time.sleep(0.05)
    task = _submitit_task(sweep)
    assert task is not None
    os.kill(task, signal.SIGUSR2)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    (only,) = sweep.iterdir()  # the requeued job wrote into the same sweep folder, not a new ${now:} one
    run_dir = only / "0"
    assert not (run_dir / "prune_ckpt").exists()  # gone once the job finished; its log tells where it resumed
    log = (run_dir / "run.log").read_text()
    assert "stopped by sys.exit" in log and "layers were pruned by an earlier attempt of this run" in log
    submitit_logs = "".join(p.read_text() for p in (only / ".submitit").rglob("*.err"))
    assert "this job is preempted" in submitit_logs and "Requeued job" in submitit_logs
    results = json.loads((run_dir / "results.json").read_text())
    assert results["n_samples"] == 8

    reference = tmp_path / "reference"
    run_py(reference, "pruner=wanda", "benchmark.limit=8", "dense_baseline=false", "save_model=true", "logger=none")
    assert weights_hash(run_dir / "pruned_model") == weights_hash(reference / "pruned_model")
    assert results["score"] == json.loads((reference / "results.json").read_text())["score"]
    # the requeued attempt continued the first attempt's W&B run
    wandb = offline_run(run_dir)
    assert wandb.run_id == results["wandb_run_id"] and wandb.exit_code == 0


def test_a_sigterm_during_the_cleanup_after_submitits_exit_does_not_cut_it_short(compose_cfg, tmp_path, monkeypatch):
    """On SLURM, `scontrol requeue` (submitit's, just before its sys.exit) cancels the job's steps: a SIGTERM lands
    while run.py finishes the W&B run. Seen on the local cluster: it raised Interrupted in the middle of the
    cleanup. The cleanup must end, and the task exit with submitit's code."""
    from mmprune_exp import run as run_module
    from mmprune_exp.tracking import Tracker

    finished = []

    class SignalledTracker(Tracker):
        def finish(self, exit_code: int = 0) -> None:
            os.kill(os.getpid(), signal.SIGTERM)  # SLURM cancelling the requeued job's step
            time.sleep(0.01)  # the handler runs at the next bytecode: here, inside the cleanup
            finished.append(exit_code)

    def requeued(job, pruned_dir=None):
        raise SystemExit(-1)  # what submitit's SIGUSR2 handler does after `scontrol requeue`

    monkeypatch.setattr(run_module, "prepare", lambda cfg: SimpleNamespace(run_dir=tmp_path, tracker=None))
    monkeypatch.setattr("mmprune_exp.tracking.build_tracker", lambda *a: SignalledTracker())
    monkeypatch.setattr(run_module, "load", requeued)
    cfg = compose_cfg(["logger=none", f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}"])
    with open_dict(cfg):
        del cfg["hydra"]  # outside a Hydra job its runtime values (job number, ...) cannot resolve
    with pytest.raises(SystemExit) as stop:
        run_module.run(cfg)
    assert stop.value.code == -1 and finished == [-1]
