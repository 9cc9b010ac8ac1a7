"""One job, in stages:

    prepare   validate the config (root keys, groups, targets the model family has), claim the run directory
              (fingerprint: a resume with another config is refused), read the benchmark and calibration data
    load      the model (a disk-streamed run reloads its pruned checkpoint after pruning)
    dense     evaluate the unpruned model, or reuse the cached baseline of the same model + benchmark
    prune     calibrate and prune, layer by layer, each finished layer checkpointed in the run directory (a disk-
              streamed model is written out and reloaded)
    report    achieved sparsity per matrix / layer / overall; save the pruned model if asked
    evaluate  the pruned model, resuming from the rows already in samples.jsonl
    results   results.json and W&B

Every run directory ends up with ``results.json`` (headline figures + group labels), ``samples.jsonl``,
``sparsity.json``, ``fingerprint.json`` and Hydra's ``.hydra/`` config, so other tools can read a run without
this package. Errors the user can fix (:class:`~mmprune_exp.errors.UserError`) end the job with one line and
exit code 2; SIGTERM/SIGINT end it with 143/130 after logging, finishing the W&B run as failed and keeping
the pruned layers and samples written so far: the same command into the same run directory continues from them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from mmprune_exp.config.schema import register_configs, validate
from mmprune_exp.errors import USER_ERROR_EXIT, UserError

if TYPE_CHECKING:
    from mmprune_exp.benchmarks import Benchmark
    from mmprune_exp.calibration import CalibrationData
    from mmprune_exp.evaluation import EvalResult
    from mmprune_exp.models import ModelAdapter
    from mmprune_exp.pruners import Pruner, SparsityReport
    from mmprune_exp.token_pruners import TokenPruner
    from mmprune_exp.tracking import Tracker
    from mmprune_exp.utils import StageTimer

log = logging.getLogger("mmprune_exp")

register_configs()

GROUPS = ("model", "pruner", "sparsity", "calibration", "benchmark", "token_pruner", "logger")
#: version of results.json's layout; readers (``mmprune_exp.report``) check it. Bump when a key changes meaning.
RESULTS_SCHEMA_VERSION = 1
_CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def _obj(node: DictConfig) -> Any:
    return OmegaConf.to_object(node)


def _numeric_leaves(tree: dict, prefix: str) -> dict[str, float]:
    """``{"a": {"b": 1.5}}`` -> ``{"<prefix>/a/b": 1.5}``: the numbers of a nested dict, for the tracker."""
    out: dict[str, float] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out |= _numeric_leaves(value, f"{prefix}/{key}")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}/{key}"] = value
    return out


def dense_cache_key(cfg: DictConfig, device: str) -> str:
    """Everything that changes the dense model's answers: weights, numerics, data, generation args."""
    from mmprune_exp.rundir import checkpoint_fingerprint
    from mmprune_exp.utils import stable_hash

    model = OmegaConf.to_container(cfg.model, resolve=True)
    model.pop("name", None)
    model["device"] = device
    model["fingerprint"] = checkpoint_fingerprint(cfg.model.path)
    return stable_hash({"model": model, "benchmark": OmegaConf.to_container(cfg.benchmark, resolve=True)})


@dataclass
class Job:
    """What the stages of one run share."""

    cfg: DictConfig
    run_dir: Path
    labels: dict[str, str]  # group -> label (the option's ``name``; sparsity's follows its value)
    overrides: list[str]
    benchmark: Benchmark
    pruner: Pruner
    calibration: CalibrationData | None
    token_pruner: TokenPruner
    timer: StageTimer
    tracker: Tracker | None = None

    @property
    def streamed(self) -> bool:
        return self.cfg.model.offload == "disk"


# -- stages -----------------------------------------------------------------------------------------


def prepare(cfg: DictConfig) -> Job:
    """Everything that can fail on bad input, before the model loads: a bad sweep point fails in seconds."""
    validate(cfg)
    from mmprune_exp import rundir
    from mmprune_exp.benchmarks import build_benchmark
    from mmprune_exp.calibration import build_calibration
    from mmprune_exp.models.base import check_targets
    from mmprune_exp.pruners import build_pruner
    from mmprune_exp.token_pruners import build_token_pruner
    from mmprune_exp.utils import StageTimer, seed_everything

    if cfg.pruner.name != "none":
        check_targets(cfg.model.family, list(cfg.pruner.scope), list(cfg.pruner.modules))
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if rundir.claim(run_dir, cfg):
        log.info("%s holds an earlier run of this config: resuming it", run_dir)
    labels = {g: str(cfg[g].name) for g in GROUPS}
    for group, choice in hydra_cfg.runtime.choices.items():
        if group in labels and choice is not None and choice != labels[group]:
            log.info("%s=%s is labelled %s (its values were overridden)", group, choice, labels[group])
    seed_everything(cfg.seed)
    timer = StageTimer()
    benchmark = build_benchmark(_obj(cfg.benchmark))
    with timer("data"):
        benchmark.records()  # read and check the data files now, not after the model and the dense baseline
    pruner = build_pruner(_obj(cfg.pruner), _obj(cfg.sparsity))
    token_pruner = build_token_pruner(_obj(cfg.token_pruner))
    token_pruner.check_model(_obj(cfg.model))
    calibration = None
    if pruner.needs_calibration or token_pruner.needs_calibration:
        with timer("calibration_data"):  # a missing calibration image fails here, in seconds
            calibration = build_calibration(_obj(cfg.calibration))
    return Job(cfg, run_dir, labels, list(hydra_cfg.overrides.task), benchmark, pruner, calibration, token_pruner,
               timer)  # fmt: skip


def load(job: Job, pruned_dir: Path | None = None) -> ModelAdapter:
    """The configured model, or (``pruned_dir``) the pruned checkpoint a disk-streamed run wrote, in memory."""
    from mmprune_exp.models import load_adapter

    model_cfg = _obj(job.cfg.model)
    if pruned_dir is not None:
        model_cfg = replace(model_cfg, path=str(pruned_dir), offload="none")
    with job.timer("load"):
        return load_adapter(model_cfg)


def dense(job: Job, adapter: ModelAdapter) -> tuple[EvalResult | None, Path | None]:
    """The unpruned model's result, evaluated once per cache key and shared by every run that has the key.

    Jobs of a sweep that share the key may run at the same time (a SLURM array, parallel local jobs). The cache
    folder's lock makes one of them evaluate while the others wait, then read its metrics; without it every job
    would find no ``metrics.json`` and append to the same ``samples.jsonl`` at once.
    """
    from mmprune_exp.evaluation import EvalResult, evaluate, read_rows

    if not job.cfg.dense_baseline:
        return None, None
    with job.timer("dense_eval"):
        # The disk-streamed adapter resolves the device as the fully loaded one would, so the key is the same.
        key = dense_cache_key(job.cfg, adapter.device.type)
        cache = Path(job.cfg.paths.cache_dir) / "dense" / f"{job.cfg.benchmark.name}-{key}"
        done = cache / "metrics.json"
        with dense_cache_lock(cache):
            if job.cfg.use_dense_cache and done.exists():
                log.info("dense baseline: reusing %s", cache)
                rows = list(read_rows(cache / "samples.jsonl").values())
                result = EvalResult(json.loads(done.read_text()), rows, 0.0, resumed=len(rows))
            else:
                if job.streamed:  # a disk-offloaded model cannot generate: load the whole checkpoint, this once
                    from mmprune_exp.models import load_adapter

                    adapter = load_adapter(replace(_obj(job.cfg.model), offload="none"))
                # Rows an earlier, killed holder of the lock wrote are kept: evaluate resumes from them.
                result = evaluate(adapter, job.benchmark, cache / "samples.jsonl", desc=f"{job.cfg.benchmark.name} dense")
                tmp = done.with_suffix(".tmp")
                tmp.write_text(json.dumps(result.metrics, indent=2))
                tmp.replace(done)  # atomic: a job killed while writing leaves no half file that reads as done
    log.info("dense %s score: %.4f", job.cfg.benchmark.name, result.metrics["score"])
    return result, cache


@contextmanager
def dense_cache_lock(cache: Path) -> Iterator[None]:
    """Hold ``<cache>/.lock`` (an OS file lock) while the dense baseline in ``cache`` is read or written.

    flock is released by the kernel when its holder dies, however it dies (SIGKILL, OOM killer, a node's
    scancel), so a killed job never leaves the others waiting; the lock file itself stays, unlocked. On a
    filesystem without flock, filelock falls back to a marker file that it breaks only when the dead holder
    ran on the same host (README, "Dense baseline cache").
    """
    from filelock import FileLock, Timeout

    cache.mkdir(parents=True, exist_ok=True)
    lock = FileLock(cache / ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("dense baseline %s: another job holds %s (it is evaluating the dense model); waiting for it",
                 cache.name, lock.lock_file)  # fmt: skip
        start = time.monotonic()
        lock.acquire()  # no timeout: a dense evaluation may take hours; a dead holder frees the lock at once
        log.info("dense baseline: waited %.1f s for the job that held the lock", time.monotonic() - start)
    try:
        yield
    finally:
        lock.release()


def prune(job: Job, adapter: ModelAdapter) -> Path | None:
    """Prune in place. A disk-streamed model is written to ``pruned_model/`` instead; returns that folder.

    A calibrated pruner checkpoints every finished decoder layer in ``<run dir>/prune_ckpt`` (``prune_checkpoint``),
    and continues from there when an earlier attempt of this run stopped (checkpointing.py).
    """
    from mmprune_exp.checkpointing import CHECKPOINT_DIR, PruneCheckpoint
    from mmprune_exp.pruners.sequential import SequentialPruner

    pruned_dir = job.run_dir / "pruned_model"
    if job.streamed:  # pruned layers are written to pruned_dir as they finish
        adapter.layer_streamer.begin_output(pruned_dir)
    if isinstance(job.pruner, SequentialPruner):
        if job.cfg.prune_checkpoint:
            job.pruner.checkpoint = PruneCheckpoint(job.run_dir / CHECKPOINT_DIR, pruned_dir if job.streamed else None)
        elif (job.run_dir / CHECKPOINT_DIR).exists():
            log.warning("prune_checkpoint=false: pruning from the start; the earlier attempt's %s is not used",
                        job.run_dir / CHECKPOINT_DIR)  # fmt: skip
    with job.timer("prune"):
        job.pruner.prune(adapter, job.calibration)
    if not job.streamed:
        return None
    with job.timer("save"):
        adapter.layer_streamer.finalize()
    return pruned_dir


def report(job: Job, adapter: ModelAdapter) -> SparsityReport:
    from mmprune_exp.pruners import sparsity_report
    from mmprune_exp.pruners.report import sparsity_heatmap

    result = sparsity_report(job.pruner.targets(adapter), adapter)
    method = job.pruner.report()
    (job.run_dir / "sparsity.json").write_text(json.dumps(result.to_dict() | ({"method": method} if method else {}), indent=2))
    title = f"{job.labels['pruner']} {job.labels['sparsity']}: overall {result.overall:.3f}"
    heatmap = sparsity_heatmap(result, job.run_dir / "sparsity.png", title) if job.cfg.pruner.name != "none" else None
    if heatmap is not None:
        job.tracker.log_image("sparsity/heatmap", heatmap)
    if method:  # what the method measured (DAS scores, AMIA's tokens per layer, ...) as W&B scalars
        job.tracker.log(_numeric_leaves(method, f"method/{job.cfg.pruner.name}"))
    log.info("sparsity over %d target matrices: %.4f", len(result.per_matrix), result.overall)
    if job.cfg.save_model or job.streamed:
        pruned_dir = job.run_dir / "pruned_model"
        with job.timer("save"):
            if not job.streamed:  # a streamed run wrote it while pruning
                adapter.save(pruned_dir)
            (pruned_dir / "sparsity.json").write_text(json.dumps(result.to_dict(), indent=2))
        log.info("pruned model saved to %s", pruned_dir)
    return result


def evaluate_pruned(job: Job, adapter: ModelAdapter) -> EvalResult:
    """The pruned model (weights and/or tokens): the token pruner is attached for this evaluation only, after it
    has calibrated what it needs on the model it will prune (YOPO's head mask, written to the run dir)."""
    from mmprune_exp.evaluation import evaluate

    if job.token_pruner.needs_calibration:  # also copies a given artifact (e.g. token_pruner.head_mask) to the run dir
        with job.timer("token_calibration"):
            job.token_pruner.prepare(adapter, job.calibration, job.run_dir)

    with job.timer("eval"), job.token_pruner.attach(adapter, job.run_dir) as tokens:
        result = evaluate(adapter, job.benchmark, job.run_dir / "samples.jsonl",
                          desc=f"{job.cfg.benchmark.name} pruned", observer=tokens)  # fmt: skip
    job.benchmark.write_tables(result.rows, job.run_dir)  # per-subject/per-subset tables, official-format files
    return result


def results(job: Job, result: EvalResult, dense_result: EvalResult | None, dense_dir: Path | None,
            sparsity: SparsityReport) -> dict[str, Any]:  # fmt: skip
    """Write ``results.json`` and log the same figures to the tracker."""
    from mmprune_exp.token_pruners import summarize
    from mmprune_exp.utils import peak_memory

    cfg = job.cfg
    score = result.metrics["score"]
    dense_score = dense_result.metrics["score"] if dense_result else None
    recovery = score / dense_score if dense_score else None
    out = {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "score": score,
        "dense_score": dense_score,
        "recovery": recovery,
        "sparsity": sparsity.overall,
        "tokens": summarize(result.rows),  # visual tokens kept, FLOPs ratio, prefill/decode s, KV bytes (means)
        "keep_ratio": cfg.token_pruner.keep_ratio,
        "target_sparsity": cfg.sparsity.value if cfg.pruner.name != "none" else 0.0,
        "benchmark": cfg.benchmark.name,
        "n_samples": len(result.rows),
        "metrics": result.metrics,
        "dense_metrics": dense_result.metrics if dense_result else None,
        "dense_cache": str(dense_dir) if dense_dir else None,
        "dense_from_cache": dense_result.generated == 0 if dense_result else None,  # read, not evaluated, here
        "choices": job.labels,
        "overrides": job.overrides,
        "time_s": job.timer.seconds,
        "eval_samples_per_s": result.samples_per_s,  # samples generated by this run only, resumed ones excluded
        "resumed_samples": result.resumed,
        "mem": peak_memory(),
        "seed": cfg.seed,
        "wandb_run_id": job.tracker.run_id if job.tracker else None,
    }
    (job.run_dir / "results.json").write_text(json.dumps(out, indent=2))

    bench = cfg.benchmark.name
    metrics = {f"bench/{bench}/{k}": v for k, v in result.metrics.items()}
    if dense_result:
        metrics |= {f"dense/{bench}/{k}": v for k, v in dense_result.metrics.items()}
        metrics[f"recovery/{bench}/score"] = recovery
    metrics["sparsity/overall"] = sparsity.overall
    if out["tokens"]:
        metrics |= {f"tokens/{k}": v for k, v in out["tokens"].items()}
    metrics |= {f"sparsity/layer/{k}": v for k, v in sparsity.per_layer.items()}
    metrics |= {f"time/{k}_s": v for k, v in job.timer.seconds.items()}
    metrics |= {f"mem/{k}": v for k, v in out["mem"].items()}
    job.tracker.log(metrics)
    job.tracker.summary({"score": score, "dense_score": dense_score, "recovery": recovery, "sparsity": sparsity.overall})
    if cfg.logger.get("log_samples", False):
        job.tracker.log_table(f"samples/{bench}", result.rows)
    log.info(
        "%s: score %.4f | dense %s | recovery %s | sparsity %.4f | results in %s",
        bench,
        score,
        f"{dense_score:.4f}" if dense_score is not None else "n/a",
        f"{recovery:.4f}" if recovery is not None else "n/a",
        sparsity.overall,
        job.run_dir,
    )
    return out


# -- the job ----------------------------------------------------------------------------------------


def run(cfg: DictConfig) -> float:
    """Run one job; returns the pruned score (what a Hydra sweeper would optimise)."""
    from mmprune_exp.checkpointing import remove_checkpoint
    from mmprune_exp.interrupts import Interrupted, signals_as_exceptions
    from mmprune_exp.tracking import build_tracker

    with signals_as_exceptions():
        try:
            job = prepare(cfg)
        except Interrupted as stop:
            log.error("interrupted by %s before the run started; nothing was computed", stop)
            raise SystemExit(stop.exit_code) from None
        exit_code = 1
        try:
            # Inside the try: a signal while W&B waits for its server still ends in the handler below.
            job.tracker = build_tracker(_obj(cfg.logger), OmegaConf.to_container(cfg, resolve=True), job.run_dir)
            adapter = load(job)
            dense_result, dense_dir = dense(job, adapter)
            pruned_dir = prune(job, adapter)
            if pruned_dir is not None:  # streamed: free the streamed model, evaluate the checkpoint just written
                del adapter
                adapter = load(job, pruned_dir)
            sparsity = report(job, adapter)
            result = evaluate_pruned(job, adapter)
            score = results(job, result, dense_result, dense_dir, sparsity)["score"]
            remove_checkpoint(job.run_dir)  # results.json supersedes it; a rerun of a finished run prunes afresh
            exit_code = 0
            return score
        except Interrupted as stop:
            exit_code = stop.exit_code
            log.error(
                "interrupted by %s: pruned layers and samples written so far are kept in %s; rerun the same "
                "command with hydra.run.dir=%s to resume", stop, job.run_dir, job.run_dir,
            )  # fmt: skip
            raise SystemExit(exit_code) from None
        except SystemExit as stop:
            # sys.exit() inside a stage: submitit's handler of SLURM's SIGUSR2 (time limit near, or preemption)
            # exits this way right after it requeued the job. The requeued job runs this config in this directory.
            # SLURM cancels the steps of a job it requeues (SIGTERM, right then): that must not cut this cleanup
            # short with an Interrupted raised in the middle of the log call or the W&B finish below.
            _ignore_signals_while_exiting()
            exit_code = stop.code if isinstance(stop.code, int) and stop.code else 1
            log.error("stopped by sys.exit(%s) (submitit does this after requeueing the job); pruned layers and "
                      "samples written so far are kept in %s for the next attempt", stop.code, job.run_dir)  # fmt: skip
            raise
        except UserError:
            exit_code = USER_ERROR_EXIT  # the W&B run shows the process's exit code
            raise
        finally:
            if job.tracker is not None:
                job.tracker.finish(exit_code)


def _ignore_signals_while_exiting() -> None:
    """SIGTERM/SIGINT from here on are logged, not raised (``signals_as_exceptions`` restores the handlers)."""
    import signal
    import threading

    from mmprune_exp.interrupts import HANDLED

    def note(signum, frame):
        log.warning("%s while exiting; still finishing up", signal.Signals(signum).name)

    if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
        for signum in HANDLED:
            signal.signal(signum, note)


@hydra.main(version_base="1.3", config_path=_CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        return run(cfg)
    except UserError as err:
        # One line, no traceback: the message names what to change. Programming errors keep their traceback.
        log.error("%s", err)
        raise SystemExit(USER_ERROR_EXIT) from None


if __name__ == "__main__":
    main()
