"""One job: compose -> validate -> seed -> load -> dense baseline (cached) -> calibrate -> prune ->
sparsity report -> evaluate -> log.

Every run directory ends up with ``results.json`` (headline figures + group choices), ``samples.jsonl``,
``sparsity.json`` and Hydra's ``.hydra/`` config, so other tools can read a run without this package.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from mmprune_exp.config.schema import register_configs, validate

log = logging.getLogger("mmprune_exp")

register_configs()

GROUPS = ("model", "pruner", "sparsity", "calibration", "benchmark", "logger")
_CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def _obj(node: DictConfig) -> Any:
    return OmegaConf.to_object(node)


def _checkpoint_fingerprint(path: str) -> dict[str, Any]:
    """Sizes and mtimes of a local checkpoint's files: rebuilding the weights invalidates cached baselines."""
    root = Path(os.path.expanduser(path))
    if not root.is_dir():
        return {"id": path}
    return {p.name: [p.stat().st_size, int(p.stat().st_mtime)] for p in sorted(root.iterdir()) if p.is_file()}


def dense_cache_key(cfg: DictConfig, device: str) -> str:
    """Everything that changes the dense model's answers: weights, numerics, data, generation args."""
    from mmprune_exp.utils import stable_hash

    model = OmegaConf.to_container(cfg.model, resolve=True)
    model.pop("name", None)
    model["device"] = device
    model["fingerprint"] = _checkpoint_fingerprint(cfg.model.path)
    return stable_hash({"model": model, "benchmark": OmegaConf.to_container(cfg.benchmark, resolve=True)})


def dense_baseline(cfg: DictConfig, adapter, benchmark):
    """Evaluate the unpruned model, or read the result a previous run cached under the same key."""
    from mmprune_exp.evaluation import EvalResult, evaluate, read_rows

    key = dense_cache_key(cfg, adapter.device.type)
    cache = Path(cfg.paths.cache_dir) / "dense" / f"{cfg.benchmark.name}-{key}"
    done = cache / "metrics.json"
    if cfg.use_dense_cache and done.exists():
        log.info("dense baseline: reusing %s", cache)
        rows = list(read_rows(cache / "samples.jsonl").values())
        return EvalResult(json.loads(done.read_text()), rows, 0.0, resumed=len(rows)), cache
    result = evaluate(adapter, benchmark, cache / "samples.jsonl", desc=f"{cfg.benchmark.name} dense")
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(result.metrics, indent=2))
    tmp.replace(done)  # atomic: parallel sweep jobs never read a half-written file
    return result, cache


def run(cfg: DictConfig) -> float:
    """Run one job; returns the pruned score (what a Hydra sweeper would optimise)."""
    validate(cfg)  # before anything expensive: a bad value fails in seconds, naming its key
    from mmprune_exp.benchmarks import build_benchmark
    from mmprune_exp.calibration import build_calibration
    from mmprune_exp.evaluation import evaluate
    from mmprune_exp.models import load_adapter
    from mmprune_exp.pruners import build_pruner, sparsity_report
    from mmprune_exp.tracking import build_tracker
    from mmprune_exp.utils import StageTimer, peak_memory, seed_everything

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    choices = {g: hydra_cfg.runtime.choices.get(g) for g in GROUPS}
    seed_everything(cfg.seed)
    benchmark = build_benchmark(_obj(cfg.benchmark))
    pruner = build_pruner(_obj(cfg.pruner), _obj(cfg.sparsity))

    tracker = build_tracker(_obj(cfg.logger), OmegaConf.to_container(cfg, resolve=True), run_dir)
    exit_code = 1
    try:
        timer = StageTimer()
        calibration = None
        if pruner.needs_calibration:
            # Read and check the calibration data before the model: a missing image fails in seconds.
            with timer("calibration_data"):
                calibration = build_calibration(_obj(cfg.calibration))
        model_cfg = _obj(cfg.model)
        streamed = model_cfg.offload == "disk"
        with timer("load"):
            adapter = load_adapter(model_cfg)
        dense, dense_dir = None, None
        if cfg.dense_baseline:
            with timer("dense_eval"):
                # A disk-offloaded model cannot generate; the baseline loads the whole checkpoint once.
                dense_adapter = load_adapter(replace(model_cfg, offload="none")) if streamed else adapter
                dense, dense_dir = dense_baseline(cfg, dense_adapter, benchmark)
                del dense_adapter
            log.info("dense %s score: %.4f", cfg.benchmark.name, dense.metrics["score"])
        pruned_dir = run_dir / "pruned_model"
        if streamed:  # pruned layers are written to pruned_dir as they finish
            adapter.layer_streamer.begin_output(pruned_dir)
        with timer("prune"):
            pruner.prune(adapter, calibration)
        if streamed:
            with timer("save"):
                adapter.layer_streamer.finalize()
            del adapter  # evaluate the pruned checkpoint just written
            with timer("load"):
                adapter = load_adapter(replace(model_cfg, path=str(pruned_dir), offload="none"))
        report = sparsity_report(pruner.targets(adapter), adapter)
        (run_dir / "sparsity.json").write_text(json.dumps(report.to_dict(), indent=2))
        log.info("sparsity over %d target matrices: %.4f", len(report.per_matrix), report.overall)
        if cfg.save_model or streamed:
            with timer("save"):
                if not streamed:
                    adapter.save(pruned_dir)
                (pruned_dir / "sparsity.json").write_text(json.dumps(report.to_dict(), indent=2))
            log.info("pruned model saved to %s", pruned_dir)
        with timer("eval"):
            result = evaluate(adapter, benchmark, run_dir / "samples.jsonl", desc=f"{cfg.benchmark.name} pruned")
        benchmark.write_tables(result.rows, run_dir)  # per-subject/per-subset tables, official-format files

        score = result.metrics["score"]
        dense_score = dense.metrics["score"] if dense else None
        recovery = score / dense_score if dense_score else None
        results = {
            "score": score,
            "dense_score": dense_score,
            "recovery": recovery,
            "sparsity": report.overall,
            "target_sparsity": cfg.sparsity.value if cfg.pruner.name != "none" else 0.0,
            "benchmark": cfg.benchmark.name,
            "n_samples": len(result.rows),
            "metrics": result.metrics,
            "dense_metrics": dense.metrics if dense else None,
            "dense_cache": str(dense_dir) if dense_dir else None,
            "choices": choices,
            "overrides": list(hydra_cfg.overrides.task),
            "time_s": timer.seconds,
            "eval_samples_per_s": len(result.rows) / result.seconds if result.seconds else None,
            "mem": peak_memory(),
            "seed": cfg.seed,
            "wandb_run_id": tracker.run_id,
        }
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))

        bench = cfg.benchmark.name
        metrics = {f"bench/{bench}/{k}": v for k, v in result.metrics.items()}
        if dense:
            metrics |= {f"dense/{bench}/{k}": v for k, v in dense.metrics.items()}
            metrics[f"recovery/{bench}/score"] = recovery
        metrics["sparsity/overall"] = report.overall
        metrics |= {f"sparsity/layer/{k}": v for k, v in report.per_layer.items()}
        metrics |= {f"time/{k}_s": v for k, v in timer.seconds.items()}
        metrics |= {f"mem/{k}": v for k, v in results["mem"].items()}
        tracker.log(metrics)
        tracker.summary({"score": score, "dense_score": dense_score, "recovery": recovery, "sparsity": report.overall})
        if cfg.logger.get("log_samples", False):
            tracker.log_table(f"samples/{bench}", result.rows)
        log.info(
            "%s: score %.4f | dense %s | recovery %s | sparsity %.4f | results in %s",
            bench,
            score,
            f"{dense_score:.4f}" if dense_score is not None else "n/a",
            f"{recovery:.4f}" if recovery is not None else "n/a",
            report.overall,
            run_dir,
        )
        exit_code = 0
        return score
    finally:
        tracker.finish(exit_code)


@hydra.main(version_base="1.3", config_path=_CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    return run(cfg)


if __name__ == "__main__":
    main()
