"""W&B tracker: fallback from an unreachable server, resume in the same folder, finish with the exit code.

Real wandb (offline, or online against a local socket that never answers); no mocks of wandb itself.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import pytest

from mmprune_exp.config.schema import LoggerConfig
from mmprune_exp.tracking import (
    METRIC_SUMMARIES,
    WandbTracker,
    _signals_deferred,
    read_offline_run,
    run_identity,
    sweep_id,
)

pytest.importorskip("wandb")


@pytest.fixture(autouse=True)
def wandb_home(tmp_path, monkeypatch):
    """Keep wandb's settings, caches and credentials out of the user's home."""
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)


def offline_runs(run_dir):
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def tracker(run_dir, mode="auto", **kw):
    run_dir.mkdir(parents=True, exist_ok=True)
    return WandbTracker(LoggerConfig(name="wandb", mode=mode, **kw), {"pruner": {"name": "wanda"}}, run_dir)


@pytest.fixture
def silent_server():
    """A W&B "server" that accepts connections and never answers (a dead proxy, a firewalled host)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_unreachable_server_falls_back_to_offline_with_the_same_id(tmp_path, monkeypatch, silent_server):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", silent_server)
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    start = time.monotonic()
    tr = tracker(tmp_path / "run", init_timeout=2.0)
    waited = time.monotonic() - start
    assert tr.run is not None and tr.run.offline
    tr.log({"bench/score": 0.75})
    tr.finish(0)
    (offline,) = offline_runs(tmp_path / "run")
    run = read_offline_run(offline)
    assert run.run_id == tr.run_id == (tmp_path / "run" / "wandb_id.txt").read_text()
    assert run.exit_code == 0
    assert [step["bench/score"] for step in run.history] == [0.75]
    # wandb's own init timeout is 90 s: only the tracker's shorter one lets the online attempt give up sooner
    assert waited < 85


def test_rerun_in_the_same_dir_continues_the_run_in_one_folder(tmp_path):
    run_dir = tmp_path / "run"
    first = tracker(run_dir)
    first.log({"calib/seconds": 3.0})
    first.log_table("samples/shapes_vqa", [{"id": "a", "correct": True}, {"id": "b", "correct": False}])
    first.summary({"stage": "pruned"})
    first.finish(1)  # the interrupted attempt
    (earlier,) = offline_runs(run_dir)

    second = tracker(run_dir)
    assert second.run_id == first.run_id
    second.log({"bench/score": 0.5})
    second.summary({"recovery": 0.9})
    second.finish(0)

    (offline,) = offline_runs(run_dir)
    assert offline != earlier
    run = read_offline_run(offline)
    assert run.run_id == first.run_id and run.exit_code == 0
    assert [s["_step"] for s in run.history] == [0, 1, 2]
    assert run.history[0]["calib/seconds"] == 3.0 and run.history[2]["bench/score"] == 0.5
    table = run.history[1]
    assert table["samples/shapes_vqa/_type"] == "table-file" and table["samples/shapes_vqa/nrows"] == 2
    assert (offline / "files" / table["samples/shapes_vqa/path"]).is_file()
    assert run.summary["stage"] == "pruned" and run.summary["recovery"] == 0.9

    third = tracker(run_dir)  # and again: still one folder, one more step
    third.log({"bench/score": 0.6})
    third.finish(0)
    (offline,) = offline_runs(run_dir)
    assert [s["_step"] for s in read_offline_run(offline).history] == [0, 1, 2, 3]


@pytest.mark.parametrize("code", [143, 130, 1])
def test_finish_records_a_failing_exit_code_once(tmp_path, code):
    tr = tracker(tmp_path / "run")
    tr.log({"x": 1.0})
    tr.finish(code)
    tr.finish(0)  # the run's finally after a signal handler already finished it: no effect
    tr.log({"x": 2.0})
    (offline,) = offline_runs(tmp_path / "run")
    run = read_offline_run(offline)
    assert run.exit_code == code and [s["x"] for s in run.history] == [1.0]


class Stop(KeyboardInterrupt):
    pass


@pytest.fixture
def raising_sigterm():
    """A SIGTERM handler like run.py's: raise in the main thread."""
    calls = []

    def handler(signum, frame):
        calls.append(signum)
        raise Stop

    previous = signal.signal(signal.SIGTERM, handler)
    yield calls
    signal.signal(signal.SIGTERM, previous)


def test_a_signal_waits_for_the_wandb_call_then_reaches_the_handler(raising_sigterm):
    done = []
    with pytest.raises(Stop), _signals_deferred():
        signal.raise_signal(signal.SIGTERM)
        time.sleep(0.05)  # the handler would have run by now
        done.append(True)
    assert done == [True] and raising_sigterm == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is not None and signal.getsignal(signal.SIGTERM).__name__ == "handler"


def test_a_second_signal_interrupts_the_wandb_call(raising_sigterm):
    done = []
    with pytest.raises(Stop), _signals_deferred():
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)
        time.sleep(0.05)
        done.append(True)
    assert done == [] and raising_sigterm == [signal.SIGTERM]


def test_interrupted_run_finishes_with_the_signal_exit_code(tmp_path, raising_sigterm):
    tr = tracker(tmp_path / "run")
    exit_code = 1
    with pytest.raises(Stop):
        try:
            tr.log({"x": 1.0})
            signal.raise_signal(signal.SIGTERM)
            time.sleep(0.05)
            exit_code = 0
        except Stop:
            exit_code = 143
            raise
        finally:
            tr.finish(exit_code)
    (offline,) = offline_runs(tmp_path / "run")
    assert read_offline_run(offline).exit_code == 143


def test_rerun_in_a_new_process_continues_the_run(tmp_path):
    """The real requeue: the first attempt is another process, stopped by SIGTERM (exit code 143)."""
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    first = (
        "import sys\n"
        "from pathlib import Path\n"
        "from mmprune_exp.config.schema import LoggerConfig\n"
        "from mmprune_exp.tracking import WandbTracker\n"
        "run_dir = Path(sys.argv[1]); run_dir.mkdir()\n"
        "tr = WandbTracker(LoggerConfig(name='wandb'), {}, run_dir)\n"
        "tr.log({'calib/seconds': 3.0})\n"
        "tr.finish(143)\n"
    )
    subprocess.run([sys.executable, "-c", first, str(run_dir)], check=True, timeout=300)
    second = tracker(run_dir)
    second.log({"bench/score": 0.5})
    second.finish(0)
    (offline,) = offline_runs(run_dir)
    run = read_offline_run(offline)
    assert run.run_id == (run_dir / "wandb_id.txt").read_text() and run.exit_code == 0
    assert [(s["_step"], s.get("calib/seconds"), s.get("bench/score")) for s in run.history] == [
        (0, 3.0, None), (1, None, 0.5)
    ]


# -- sweeps: one run per job, grouped by the sweep ---------------------------------------------------------


def hydra_runtime(mode="MULTIRUN", sweep_dir="outputs/multirun/2026-12-01/10-00-00", experiment=None):
    """The parts of Hydra's job config (``HydraConfig.get()``) that name a sweep."""
    from omegaconf import OmegaConf

    return OmegaConf.create({"mode": mode, "sweep": {"dir": sweep_dir},
                             "runtime": {"choices": {"experiment": experiment, "pruner": "wanda"}}})  # fmt: skip


CONFIG = {"task_name": "pruner_curve", "pruner": {"name": "wanda", "scope": ["language"]}, "sparsity": {"name": "s50"},
          "benchmark": {"name": "shapes_vqa"}, "seed": 0}  # fmt: skip


@pytest.mark.parametrize(
    "sweep_dir,expected",
    [
        ("outputs/multirun/2026-12-01/10-00-00", "2026-12-01_10-00-00"),
        ("/scratch/me/mmprune/outputs/multirun/2026-12-01/10-00-00", "2026-12-01_10-00-00"),
        ("/scratch/me/curve_v2", "curve_v2"),
    ],
)
def test_sweep_id_is_the_sweep_directory(sweep_dir, expected):
    assert sweep_id(sweep_dir) == expected


def test_jobs_of_a_multirun_share_the_sweeps_group():
    default = LoggerConfig(name="wandb", group="pruner_curve")  # conf/logger/wandb.yaml: group: ${task_name}
    identity = run_identity(default, CONFIG, hydra_runtime(experiment="pruner_curve"))
    assert identity["group"] == "pruner_curve-2026-12-01_10-00-00"
    # another sweep of the same experiment is another group; a single run is grouped by its task
    assert run_identity(default, CONFIG, hydra_runtime(sweep_dir="outputs/multirun/2026-12-02/09-00-00"))["group"] \
        == "pruner_curve-2026-12-02_09-00-00"  # fmt: skip
    assert run_identity(default, CONFIG, hydra_runtime(mode="RUN"))["group"] == "pruner_curve"
    assert run_identity(default, CONFIG, None)["group"] == "pruner_curve"
    # a group the user named is kept as it is, in a sweep too
    assert run_identity(LoggerConfig(name="wandb", group="curves"), CONFIG, hydra_runtime())["group"] == "curves"


def test_job_type_and_choices_for_dashboards():
    auto = LoggerConfig(name="wandb", job_type="auto")
    identity = run_identity(auto, CONFIG, hydra_runtime(experiment="pruner_curve"))
    assert identity["job_type"] == "prune_eval"
    assert identity["choices"] == {"choice/pruner": "wanda", "choice/sparsity": "s50",
                                   "choice/benchmark": "shapes_vqa", "choice/experiment": "pruner_curve"}  # fmt: skip
    dense = CONFIG | {"pruner": {"name": "none"}}
    assert run_identity(auto, dense, None)["job_type"] == "dense_eval"
    assert run_identity(LoggerConfig(name="wandb", job_type="calib_stats"), dense, None)["job_type"] == "calib_stats"


def test_a_run_holds_its_choices_metric_summaries_and_says_where_it_is(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tr = WandbTracker(LoggerConfig(name="wandb", project="p", group="g", job_type="auto"), CONFIG, run_dir)
    tr.log({"bench/shapes_vqa/score": 0.5, "time/eval_s": 3.0, "mem/peak_rss_gb": 1.5})
    tr.log({"bench/shapes_vqa/score": 0.25, "time/eval_s": 2.0, "mem/peak_rss_gb": 1.0})
    tr.summary({"score": 0.25})
    tr.finish(0)
    info = json.loads((run_dir / "wandb_run.json").read_text())
    assert info == {"id": tr.run_id, "project": "p", "entity": None, "group": "g", "job_type": "prune_eval",
                    "name": None, "mode": "offline"}  # fmt: skip
    (offline,) = offline_runs(run_dir)
    run = read_offline_run(offline)
    assert run.config["choice/pruner"] == "wanda" and run.config["pruner"]["scope"] == ["language"]
    assert run.config["run_dir"] == str(run_dir)
    assert set(run.defined_metrics) == set(METRIC_SUMMARIES)
    assert sorted(run.defined_metrics["time/*"]) == ["last", "min"]
    assert run.summary["bench/shapes_vqa/score"] == {"last": 0.25, "max": 0.5}
    assert run.summary["time/eval_s"] == {"last": 2.0, "min": 2.0} and run.summary["mem/peak_rss_gb"] == {"max": 1.5}
    assert run.summary["score"] == 0.25  # explicit summary values stay plain


def test_a_resumed_run_keeps_its_metric_summaries(tmp_path):
    run_dir = tmp_path / "run"
    first = tracker(run_dir)
    first.log({"bench/t/score": 0.75})
    first.finish(143)
    second = tracker(run_dir)
    second.log({"bench/t/score": 0.5})
    second.finish(0)
    (offline,) = offline_runs(run_dir)
    run = read_offline_run(offline)
    assert run.summary["bench/t/score"] == {"last": 0.5, "max": 0.75}  # over both attempts


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    from tests.sweeps import small_sweep

    return small_sweep(tmp_path_factory.getbasetemp() / "small_sweep")


def test_a_sweep_has_one_offline_run_per_job_in_one_group(sweep):
    from tests.sweeps import SWEEP_GROUP

    jobs = sorted((p.parent for p in sweep.glob("[0-9]*/results.json")), key=lambda p: int(p.name))
    assert len(jobs) == 6
    runs = {}
    for job in jobs:
        (offline,) = offline_runs(job)  # one run per job
        run = read_offline_run(offline)
        results = json.loads((job / "results.json").read_text())
        assert run.run_id == results["wandb_run_id"] and run.exit_code == 0
        assert run.group == SWEEP_GROUP
        assert run.job_type == ("dense_eval" if results["choices"]["pruner"] == "none" else "prune_eval")
        assert {k: run.config[f"choice/{k}"] for k in results["choices"]} == results["choices"]
        assert run.summary["recovery"] == pytest.approx(results["recovery"])
        runs[run.run_id] = job
    assert len(runs) == len(jobs)  # no two jobs share a run


def test_make_wandb_sync_finds_every_offline_run_of_the_sweep(sweep):
    """`make wandb-sync` hands wandb every offline run below SYNC_DIR (--dry-run: list, upload nothing)."""
    import os
    import subprocess

    from tests.conftest import ROOT

    proc = subprocess.run(["make", "-s", "-o", "install", "wandb-sync", f"SYNC_DIR={sweep}", "SYNC_ARGS=--dry-run"],
                          cwd=ROOT, env=os.environ | {"WANDB_MODE": "offline"}, capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    listed = proc.stdout + proc.stderr
    for job in (p.parent for p in sweep.glob("[0-9]*/results.json")):
        (offline,) = offline_runs(job)
        assert str(offline) in listed


@pytest.mark.slow
def test_jobs_started_apart_in_their_own_processes_share_the_sweeps_group(tmp_path):
    """What a SLURM array does: each job is its own process, started when a slot frees. hydra/launcher=
    submitit_local takes the same path (pickled job config, `${now:}` of the sweep dir resolved at launch)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from tests.sweeps import run_cmd

    base = tmp_path / "multirun"
    proc = run_cmd(["-m", "hydra/launcher=submitit_local", "pruner=magnitude", "sparsity=s30,s50", "debug=default",
                    "logger=wandb", "benchmark.limit=2", "hydra.sweep.dir=" + str(base) + "/${now:%Y-%m-%d}/${now:%H-%M-%S}",
                    f"paths.cache_dir={tmp_path / 'cache'}"])  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = [d for d in base.glob("*/*") if d.is_dir()]
    groups = {json.loads(f.read_text())["group"] for f in sweep.glob("*/wandb_run.json")}
    assert groups == {f"debug-{sweep.parent.name}_{sweep.name}"}
    assert len(list(sweep.glob("*/wandb/offline-run-*"))) == 2
