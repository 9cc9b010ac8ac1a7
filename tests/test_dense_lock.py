"""Parallel jobs of one sweep on one dense-baseline cache (run.py `dense`): computed once, never written twice.

Real `python run.py` processes, as a local sweep or a SLURM array runs them. The test process holds the cache's
lock while the jobs start, so all four are sure to meet at the lock (however fast or slow the machine is); when
it lets go, the jobs race for it among themselves.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from filelock import FileLock, Timeout

from mmprune_exp.run import dense_cache_key
from tests.conftest import ROOT
from tests.test_run_e2e import ENV, MODEL_OVERRIDE, run_args, run_py

JOBS = 4
WAITING = "waiting for it"  # what a job logs when another job holds the lock
HANG_GUARD_S = 300  # only against a hang: the conditions below are usually met within seconds


def _cache_dir(compose_cfg, cache_root: Path, overrides: tuple[str, ...]) -> Path:
    """The cache folder run.py will use for these overrides (same key function, same composed config)."""
    cfg = compose_cfg([f"paths.cache_dir={cache_root}", "model.device=cpu", *MODEL_OVERRIDE, *overrides])
    return cache_root / "dense" / f"{cfg.benchmark.name}-{dense_cache_key(cfg, 'cpu')}"


def _start(run_dir: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(run_args(run_dir, *overrides), cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def _log(run_dir: Path) -> str:
    path = run_dir / "run.log"
    return path.read_text() if path.exists() else ""


def _rows(samples: Path) -> list[dict]:
    """Every line of a samples.jsonl, parsed: a torn line fails the test here."""
    return [json.loads(line) for line in samples.read_text().splitlines()]


def test_four_jobs_on_one_dense_cache_compute_it_once(tmp_path, compose_cfg):
    overrides = ("pruner=magnitude", "benchmark.limit=12", "benchmark.batch_size=4", "logger=none")
    cache = _cache_dir(compose_cfg, tmp_path / "cache", overrides)
    cache.mkdir(parents=True)
    held = FileLock(cache / ".lock")
    held.acquire()
    dirs = [tmp_path / f"job{i}" for i in range(JOBS)]
    procs = [_start(d, *overrides) for d in dirs]
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while not all(WAITING in _log(d) for d in dirs):
            for p in procs:  # a job that ends here went past the lock: the lock does not work
                assert p.poll() is None, f"a job ended ({p.returncode}) without waiting at the lock"
            assert time.monotonic() < deadline, "the jobs never reached the dense baseline's lock"
            time.sleep(0.2)
        assert not (cache / "samples.jsonl").exists()  # nobody evaluated while the lock was held
    finally:
        held.release()
    for p in procs:
        _, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-3000:]

    results = [json.loads((d / "results.json").read_text()) for d in dirs]
    # exactly one job evaluated the dense model; the three others read what it wrote
    assert sorted(r["dense_from_cache"] for r in results) == [False, True, True, True]
    assert {r["dense_cache"] for r in results} == {str(cache)}
    assert len({json.dumps(r["dense_metrics"], sort_keys=True) for r in results}) == 1
    assert len({r["dense_score"] for r in results}) == 1
    for d, r in zip(dirs, results):
        if r["dense_from_cache"]:  # it waited for the one that evaluated, and says so
            assert "waited" in _log(d) and "reusing" in _log(d)
    # the cache's samples were written once: every line whole, every id once, the metrics their mean
    rows = _rows(cache / "samples.jsonl")
    assert len(rows) == 12 and len({r["id"] for r in rows}) == 12
    metrics = json.loads((cache / "metrics.json").read_text())
    assert metrics["score"] == pytest.approx(sum(r["score"] for r in rows) / 12)
    assert results[0]["dense_score"] == metrics["score"]


def test_a_job_killed_holding_the_lock_does_not_block_the_next_and_its_rows_are_kept(tmp_path, compose_cfg):
    """SIGKILL (no handler, no finally) while evaluating the dense model: the kernel frees the flock."""
    overrides = ("pruner=magnitude", "benchmark.limit=24", "benchmark.batch_size=2", "logger=none")
    cache = _cache_dir(compose_cfg, tmp_path / "cache", overrides)
    samples = cache / "samples.jsonl"
    proc = _start(tmp_path / "killed", *overrides)
    deadline = time.monotonic() + HANG_GUARD_S
    while not (samples.exists() and len(samples.read_text().splitlines()) >= 4):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    probe = FileLock(cache / ".lock")
    with pytest.raises(Timeout):  # the job is evaluating and holds the lock
        probe.acquire(timeout=0)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert (cache / ".lock").exists() and not (cache / "metrics.json").exists()
    probe.acquire(timeout=0)  # free at once: no stale lock to wait out or delete by hand
    probe.release()
    kept = len({r["id"] for r in map(json.loads, _valid_lines(samples))})
    assert 4 <= kept < 24

    rerun = run_py(tmp_path / "next", *overrides)
    assert f"resuming, {kept} of 24 samples" in rerun.stderr  # the killed job's rows are not evaluated again
    results = json.loads((tmp_path / "next" / "results.json").read_text())
    assert results["dense_from_cache"] is False
    rows = _rows(samples)  # a line torn by the kill is gone, every id is there once
    assert len(rows) == 24 and len({r["id"] for r in rows}) == 24
    assert results["dense_score"] == pytest.approx(sum(r["score"] for r in rows) / 24)


def _valid_lines(path: Path) -> list[str]:
    """Lines that parse (the last one may be torn by SIGKILL mid-write)."""
    out = []
    for line in path.read_text().splitlines():
        try:
            json.loads(line)
        except json.JSONDecodeError:
            continue
        out.append(line)
    return out
