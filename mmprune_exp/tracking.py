"""Experiment tracking. The run directory is the source of truth; W&B mirrors it.

A tracking failure never fails a run: every W&B call is guarded and, on error, logged once and the
tracker turns itself off. ``finish`` is always called (the run's ``finally``) with the run's exit code,
so a failed job shows as failed on the dashboard instead of "finished".
"""

from __future__ import annotations

import json
import logging
import netrc
import os
from pathlib import Path
from typing import Any, Callable

from mmprune_exp.config.schema import LoggerConfig

log = logging.getLogger(__name__)


class Tracker:
    """No-op tracker (``logger=none``); also the interface."""

    run_id: str | None = None

    def log(self, metrics: dict[str, float]) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def log_table(self, key: str, rows: list[dict[str, Any]]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_mode(mode: str) -> str:
    """``auto``: honour ``WANDB_MODE`` if set, else online with an API key and offline without one."""
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled", "dryrun", "run"):
        return {"dryrun": "offline", "run": "online"}.get(env, env)
    return "online" if _has_api_key() else "offline"


def _cell(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return json.dumps(value)


class WandbTracker(Tracker):
    def __init__(self, cfg: LoggerConfig, config: dict[str, Any], run_dir: Path):
        self.run = None
        try:
            import wandb
        except ImportError:
            log.warning("logger=wandb but the wandb package is not installed; not tracking this run")
            return
        self._wandb = wandb
        mode = resolve_mode(cfg.mode)
        # A requeued job (SLURM preemption, rerun in the same dir) continues the same W&B run.
        id_file = run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
        init_kwargs = dict(
            project=cfg.project,
            entity=cfg.entity,
            group=cfg.group,
            job_type=cfg.job_type,
            name=cfg.run_name,
            tags=list(cfg.tags),
            config=config,
            dir=str(run_dir),
            id=run_id,
            resume="allow",
            reinit="finish_previous",
        )
        for attempt in (mode, "offline") if mode == "online" else (mode,):
            try:
                self.run = wandb.init(mode=attempt, **init_kwargs)
                break
            except Exception as err:  # noqa: BLE001 - any W&B failure must not fail the run
                log.warning("wandb.init(mode=%s) failed: %s", attempt, err)
        if self.run is None:
            log.warning("W&B tracking is off for this run; results are still in %s", run_dir)
            return
        self.run_id = self.run.id
        id_file.write_text(self.run.id)
        log.info("W&B run %s (mode=%s, dir=%s)", self.run.id, self.run.settings.mode, self.run.dir)

    def _guard(self, what: str, fn: Callable[[], Any]) -> None:
        if self.run is None:
            return
        try:
            fn()
        except Exception as err:  # noqa: BLE001
            log.warning("W&B %s failed (%s); tracking is off from here on", what, err)
            self.run = None

    def log(self, metrics: dict[str, float]) -> None:
        self._guard("log", lambda: self.run.log(metrics))

    def summary(self, values: dict[str, Any]) -> None:
        self._guard("summary", lambda: self.run.summary.update(values))

    def log_table(self, key: str, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        columns = list(dict.fromkeys(k for row in rows for k in row))
        data = [[_cell(row.get(c)) for c in columns] for row in rows]
        self._guard("table", lambda: self.run.log({key: self._wandb.Table(columns=columns, data=data)}))

    def finish(self, exit_code: int = 0) -> None:
        run, self.run = self.run, None
        if run is None:
            return
        try:
            run.finish(exit_code=exit_code)
        except Exception as err:  # noqa: BLE001
            log.warning("wandb finish failed: %s", err)


TRACKERS: dict[str, Callable[..., Tracker]] = {
    "none": lambda cfg, config, run_dir: Tracker(),
    "wandb": WandbTracker,
}


def build_tracker(cfg: LoggerConfig, config: dict[str, Any], run_dir: Path) -> Tracker:
    if cfg.name not in TRACKERS:
        raise KeyError(f"logger.name={cfg.name!r} is not registered; known: {sorted(TRACKERS)}")
    return TRACKERS[cfg.name](cfg, config, run_dir)
