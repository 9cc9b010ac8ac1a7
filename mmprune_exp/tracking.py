"""Experiment tracking. The run directory is the source of truth; W&B mirrors it.

A tracking failure never fails a run: every W&B call is guarded and, on error, logged once and the
tracker turns itself off. ``finish`` is always called (the run's ``finally``) with the run's exit code,
so a failed job shows as failed on the dashboard instead of "finished".

Three things make the W&B record trustworthy:

- An unreachable server costs at most ``logger.init_timeout`` seconds (default 30; wandb's own
  default is 90 plus retries), then the half-made online run is torn down and the run goes on offline
  with the same id.
- A rerun in the same run directory (``wandb_id.txt``) continues the same W&B id. Online, the server
  resumes the run. Offline, wandb cannot resume and always opens a new ``offline-run-*`` folder, so the
  tracker copies the earlier attempt's history (same steps and timestamps, tables rebuilt from their
  files) and explicit summary values into the new run, and removes the earlier folder once the new run
  has finished: one folder per run, written by wandb itself, which ``wandb sync`` uploads as one run.
- W&B calls are not cut in half by SIGTERM/SIGINT: a signal that arrives during one is handed to the
  previous handler right after the call returns (a second signal during the call is passed on at once).
  So ``finish`` from the run's ``finally`` after an interrupt writes the exit code (143, 130, ...);
  it is idempotent.

A sweep is one W&B group with one run per job (``run_identity``): the group comes from the sweep directory,
so local, SLURM and requeued jobs of one sweep share it; each run's config carries the group labels as flat
``choice/<group>`` keys, and ``METRIC_SUMMARIES`` declares how the runs table summarises each metric.
``python -m mmprune_exp.report`` adds the sweep's table to the group as a ``job_type=report`` run.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import shutil
import signal
import struct
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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

    def log_image(self, key: str, path: Path) -> None:
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


_DEFERRED_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGTERM/SIGINT while a W&B call runs, then hand them to the handlers that were installed.

    An exception raised by a handler in the middle of wandb's code (the run's ``Interrupted``) could leave
    the run half-written and its ``finish`` unable to complete. The first signal waits for the call to
    return; a second one is passed on at once, so a hung call can still be interrupted.
    """
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield
        return
    previous: dict[int, Any] = {}
    held: list[int] = []
    state = {"restored": False, "passed": False}

    def _restore() -> None:
        if not state["restored"]:
            state["restored"] = True
            for signum, handler in previous.items():
                signal.signal(signum, signal.SIG_DFL if handler is None else handler)

    def _pass_on(signum: int) -> None:
        state["passed"] = True
        handler = previous[signum]
        if callable(handler):
            handler(signum, None)
        elif handler in (signal.SIG_DFL, None):
            signal.raise_signal(signum)  # the default action, now that the default handler is back

    def _hold(signum, frame):
        if held:  # asked twice: stop waiting for W&B
            _restore()
            _pass_on(signum)
        else:
            held.append(signum)

    for signum in _DEFERRED_SIGNALS:
        previous[signum] = signal.signal(signum, _hold)
    try:
        yield
    finally:
        _restore()
        if held and not state["passed"]:
            _pass_on(held[0])


def _cell(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return json.dumps(value)


# -- one W&B run per sweep job -------------------------------------------------------------------------

#: Summary aggregations of the run's metrics (``run.define_metric``), so dashboards and the runs table read the
#: same figure for every job. Each key is logged once per job (``run.results``); a job resumed offline replays
#: its earlier steps, so "last" is the figure results.json holds and "max"/"min" the best any attempt logged.
METRIC_SUMMARIES = {
    "bench/*": "last,max",
    "recovery/*": "last,max",
    "dense/*": "last",
    # not sparsity/*: the heatmap image is logged there too, and an image's summary must stay the image
    "sparsity/overall": "last",
    "sparsity/layer/*": "last",
    "time/*": "last,min",
    "mem/*": "max",
}


def _hydra_runtime() -> Any | None:
    """The running Hydra job's own config (``hydra.*``), or None outside a Hydra job (tests, the report)."""
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:
        return None
    return HydraConfig.get() if HydraConfig.initialized() else None


def sweep_id(sweep_dir: str | Path) -> str:
    """A sweep's id from its directory: ``outputs/multirun/2026-12-01/10-00-00`` -> ``2026-12-01_10-00-00``.

    The path below the last ``multirun`` folder (Hydra's default layout), else the folder's name. The directory
    and not ``SLURM_ARRAY_JOB_ID``: a requeued or resubmitted array writes into the same sweep directory, and
    the report finds the sweep by its directory too.
    """
    parts = Path(sweep_dir).parts
    if "multirun" in parts[:-1]:
        last = len(parts) - 1 - parts[::-1].index("multirun")
        return "_".join(parts[last + 1 :])
    return Path(sweep_dir).name


def run_identity(cfg: LoggerConfig, config: dict[str, Any], hydra: Any | None = None) -> dict[str, Any]:
    """The W&B ``group``, ``job_type`` and the flat config keys that let a dashboard group a sweep's runs.

    - ``group``: in a multirun, the sweep: ``<task_name>-<sweep id>`` (one group per sweep, shared by every
      job, local or SLURM) unless ``logger.group`` names another group than the default ``${task_name}``;
      in a single run, ``logger.group`` (the task name by default).
    - ``job_type``: ``logger.job_type``; ``auto`` is ``dense_eval`` for ``pruner=none`` and ``prune_eval``
      otherwise, so dense reference runs can be told apart from pruned ones.
    - config keys ``choice/<group>``: every config group's label as a plain string (``choice/pruner: wanda``,
      ``choice/sparsity: s50``; the experiment too). The nested group configs keep their names (``pruner``,
      ``sparsity``, ...), so the labels cannot also be top-level keys of those names; one flat key per group is
      what W&B's group-by and filters take.
    """
    task_name = config.get("task_name")
    group = cfg.group or task_name
    multirun = hydra is not None and getattr(hydra.mode, "name", hydra.mode) == "MULTIRUN"  # RunMode or its name
    if multirun and group in (None, task_name):
        group = f"{task_name or 'sweep'}-{sweep_id(hydra.sweep.dir)}"
    job_type = cfg.job_type
    if job_type == "auto":
        pruner = config.get("pruner")
        job_type = "dense_eval" if isinstance(pruner, dict) and pruner.get("name") == "none" else "prune_eval"
    choices = {f"choice/{key}": str(node["name"]) for key, node in config.items()
               if isinstance(node, dict) and isinstance(node.get("name"), str)}  # fmt: skip
    if hydra is not None and hydra.runtime.choices.get("experiment"):
        choices["choice/experiment"] = str(hydra.runtime.choices["experiment"])
    return {"group": group, "job_type": job_type, "choices": choices}


class WandbTracker(Tracker):
    def __init__(self, cfg: LoggerConfig, config: dict[str, Any], run_dir: Path):
        self.run = None
        self._earlier: list[Path] = []  # offline folders of earlier attempts, removed once this run finished
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
        identity = run_identity(cfg, config, _hydra_runtime())
        init_kwargs = {
            "project": cfg.project,
            "entity": cfg.entity,
            "group": identity["group"],
            "job_type": identity["job_type"],
            "name": cfg.run_name,
            "tags": list(cfg.tags),
            "config": {**config, **identity["choices"], "run_dir": str(run_dir)},
            "dir": str(run_dir),
            "id": run_id,
            "resume": "allow",
            "reinit": "finish_previous",
            "settings": wandb.Settings(init_timeout=cfg.init_timeout),
        }
        for attempt in (mode, "offline") if mode == "online" else (mode,):
            try:
                self.run = wandb.init(mode=attempt, **init_kwargs)
                break
            except Exception as err:  # noqa: BLE001 - any W&B failure must not fail the run
                log.warning("wandb.init(mode=%s) failed: %s", attempt, err)
                # The failed attempt still holds the run id in wandb's service process ("run ID ... is in
                # use" on the retry): shut the service down so the offline attempt starts clean.
                self._teardown()
        if self.run is None:
            log.warning("W&B tracking is off for this run; results are still in %s", run_dir)
            return
        self.run_id = self.run.id
        id_file.write_text(self.run.id)
        # Where this job's W&B run lives, for readers of the run directory (the sweep report logs its summary
        # table into the same project and group).
        info = {"id": self.run.id, "project": cfg.project, "entity": cfg.entity, "group": identity["group"],
                "job_type": identity["job_type"], "name": cfg.run_name, "mode": self.run.settings.mode}  # fmt: skip
        (run_dir / "wandb_run.json").write_text(json.dumps(info, indent=2))
        self._guard("define_metric", self._define_metrics)  # before an earlier attempt's history is replayed
        if self.run is None:
            return
        if self.run.offline:
            self._continue_offline()
        log.info("W&B run %s (mode=%s, dir=%s)", self.run.id, self.run.settings.mode, self.run.dir)

    def _define_metrics(self) -> None:
        for name, summary in METRIC_SUMMARIES.items():
            self.run.define_metric(name, summary=summary)

    def _teardown(self) -> None:
        try:
            self._wandb.teardown()
        except Exception as err:  # noqa: BLE001
            log.debug("wandb.teardown failed: %s", err)

    def _continue_offline(self) -> None:
        """Copy the earlier offline attempt of this run id with the longest history into the new run (module docstring)."""
        current = Path(self.run.settings.sync_dir).resolve()
        earlier = [d for d in current.parent.glob("offline-run-*") if d.resolve() != current
                   and (d / f"run-{self.run.id}.wandb").is_file()]  # fmt: skip
        if not earlier:
            return
        source = None
        try:
            # Each attempt holds its predecessors' history, so the longest log is the one to continue;
            # an attempt killed before it wrote anything loses to the one before it.
            source, (rows, summary) = max(
                ((d, _raw_history(d / f"run-{self.run.id}.wandb")) for d in earlier),
                key=lambda item: (len(item[1][0]), item[0].name),
            )
            with _signals_deferred():
                history_keys = set()
                for row in rows:
                    history_keys |= set(row)
                    step = row.pop("_step", None)
                    row.pop("_runtime", None)  # wandb measures its own; _timestamp is kept as logged
                    data = {k: v for k, v in ((k, self._revive(v, source)) for k, v in row.items()) if v is not None}
                    self.run.log(data, step=step, commit=True)
                explicit = {k: v for k, v in summary.items() if not k.startswith("_") and k not in history_keys}
                if explicit:
                    self.run.summary.update(explicit)
        except Exception as err:  # noqa: BLE001
            log.warning("could not carry the earlier W&B attempt in %s over (%s); it stays where it is",
                        source or current.parent, err)  # fmt: skip
            return
        self._earlier = earlier
        log.info("W&B offline run %s continues %d logged steps of %s", self.run.id, len(rows), source.name)

    def _revive(self, value: Any, source: Path) -> Any:
        """A history value as ``run.log`` takes it: logged tables are rebuilt from their files."""
        if not isinstance(value, dict) or "_type" not in value:
            return value
        if value["_type"] == "table-file":
            table = json.loads((source / "files" / value["path"]).read_text())
            return self._wandb.Table(columns=table["columns"], data=table["data"])
        log.warning("W&B media of type %s from the earlier attempt is not carried over", value["_type"])
        return None

    def _guard(self, what: str, fn: Callable[[], Any]) -> None:
        if self.run is None:
            return
        try:
            with _signals_deferred():
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

    def log_image(self, key: str, path: Path) -> None:
        self._guard("image", lambda: self.run.log({key: self._wandb.Image(str(path))}))

    def finish(self, exit_code: int = 0) -> None:
        """Finish the W&B run with the job's exit code (nonzero: failed). Only the first call does anything."""
        run, self.run = self.run, None
        if run is None:
            return
        with _signals_deferred():
            try:
                run.finish(exit_code=exit_code)
            except Exception as err:  # noqa: BLE001
                log.warning("wandb finish failed: %s", err)
                return
            # run.finish can return before wandb's service has written the run's log (offline, about one
            # time in ten here); shutting the service down waits for it, so the exit code is on disk when
            # finish returns, however soon the process is killed after. The next run starts a new service.
            self._teardown()
            for folder in self._earlier:  # their history is in this run's folder now
                shutil.rmtree(folder, ignore_errors=True)


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
    #: ``define_metric`` calls: metric name or glob -> the summary aggregations asked for (``["last", "max"]``)
    defined_metrics: dict[str, list[str]] = field(default_factory=dict)


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
        if len(chunk) < length:  # cut short: the writer was killed mid-record
            return
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


def _nested(items) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i in items:
        path = [i.key] if i.key else list(i.nested_key)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = json.loads(i.value_json)
    return out


def _raw_history(file: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """History rows and summary of a ``.wandb`` file with nested values as logged (tables stay one dict)."""
    from wandb.proto import wandb_internal_pb2

    rows, summary = [], {}
    for raw in _log_records(file.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            rows.append(_nested(record.history.item))
        elif kind == "summary":
            summary |= _nested(record.summary.update)
    return rows, summary


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
        elif kind == "metric":
            m = record.metric
            aggregations = [f.name for f, on in m.summary.ListFields() if on is True]
            run.defined_metrics[m.name or m.glob_name] = aggregations
    return run
