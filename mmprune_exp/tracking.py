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
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmprune_exp.config.schema import LoggerConfig
from mmprune_exp.registry import Registry

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
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        init_kwargs = {
            "project": cfg.project,
            "entity": cfg.entity,
            "group": cfg.group,
            "job_type": cfg.job_type,
            "name": cfg.run_name,
            "tags": list(cfg.tags),
            "config": config,
            "dir": str(run_dir),
            "id": run_id,
            "resume": "allow",
            "reinit": "finish_previous",
        }
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


TRACKERS = Registry("logger.name")
TRACKERS.register("none")(lambda cfg, config, run_dir: Tracker())
TRACKERS.register("wandb")(WandbTracker)


def build_tracker(cfg: LoggerConfig, config: dict[str, Any], run_dir: Path) -> Tracker:
    return TRACKERS.get_factory(cfg.name)(cfg, config, run_dir)


# -- reading an offline run back ------------------------------------------------------------------


@dataclass
class OfflineRun:
    """What an offline W&B run holds, read from its ``run-<id>.wandb`` file without a server."""

    run_id: str = ""
    name: str = ""
    group: str = ""
    job_type: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None


# The .wandb file is a LevelDB-style log: a 7-byte file header, then 32 KiB blocks of records, each with a
# 7-byte header (crc32, length, type) where type 1 = whole record, 2/3/4 = first/middle/last fragment.
_BLOCK = 32768
_HEADER = 7


def _log_records(data: bytes):
    pos, pending = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
            pending = b""


def _items(items) -> dict[str, Any]:
    return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items}


def read_offline_run(path: Path) -> OfflineRun:
    """Parse an offline run (its ``offline-run-*`` directory or the ``.wandb`` file inside it)."""
    from wandb.proto import wandb_internal_pb2

    path = Path(path)
    file = path if path.is_file() else next(path.glob("run-*.wandb"))
    run = OfflineRun()
    for raw in _log_records(file.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.run_id, run.name, run.group, run.job_type = r.run_id, r.display_name, r.run_group, r.job_type
            run.config |= _items(r.config.update)
        elif kind == "config":
            run.config |= _items(record.config.update)
        elif kind == "history":
            run.history.append(_items(record.history.item))
        elif kind == "summary":
            run.summary |= _items(record.summary.update)
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run
