"""What a run directory remembers about the config that produced it, so a resume cannot mix configs.

``evaluate`` resumes from the rows already in ``samples.jsonl``, and pruning from the layers in ``prune_ckpt/``.
That is only right when they came from the same experiment: the same checkpoint, pruner, sparsity, calibration
data, benchmark and generation settings. The first run writes ``fingerprint.json`` (those values, flattened to dotted keys); a later run
into the same directory compares and refuses with the differing keys before anything loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mmprune_exp.errors import ConfigError

FINGERPRINT_FILE = "fingerprint.json"
#: What a run leaves that a later run into the directory continues from (checkpointing.CHECKPOINT_DIR's state).
RESULT_FILES = ("samples.jsonl", "results.json", "prune_ckpt/state.pt")
# Groups and root keys that decide what a run computes (logger, paths, tags and caching do not).
_GROUPS = ("model", "pruner", "sparsity", "calibration", "benchmark", "token_pruner")
_ROOT_KEYS = ("seed",)
# Keys that may change between a run and its resume without changing any row already written.
_FREE_KEYS = {
    "benchmark.limit",  # more or fewer records: the rows of the shared ids are the same
    "sparsity.name",  # a label, derived from the values that are compared
    "model.name",  # a label
}


def checkpoint_fingerprint(path: str) -> dict[str, Any]:
    """Sizes and mtimes of a local checkpoint's files (rebuilding the weights changes it); the id of a hub model.

    Sizes and times, not hashes: hashing a 15 GB checkpoint at every start would cost minutes.
    """
    root = Path(os.path.expanduser(path))
    if not root.is_dir():
        return {"id": path}
    return {p.name: [p.stat().st_size, int(p.stat().st_mtime)] for p in sorted(root.iterdir()) if p.is_file()}


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for key, value in obj.items():
            out |= _flatten(value, f"{prefix}{key}.")
        return out or {prefix[:-1]: {}}
    return {prefix[:-1]: obj}


def fingerprint(cfg: DictConfig) -> dict[str, Any]:
    """The resolved values that decide a run's results, as ``{"pruner.name": "wanda", ...}``."""
    tree = {g: OmegaConf.to_container(cfg[g], resolve=True) for g in _GROUPS if g in cfg}
    tree |= {k: cfg[k] for k in _ROOT_KEYS if k in cfg}
    tree["checkpoint"] = checkpoint_fingerprint(cfg.model.path)
    return {k: v for k, v in _flatten(tree).items() if k not in _FREE_KEYS}


def _differences(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    keys = sorted(set(before) | set(now))
    missing = object()
    out = []
    for key in keys:
        a, b = before.get(key, missing), now.get(key, missing)
        if a != b:
            show = lambda v: "(unset)" if v is missing else repr(v)
            out.append(f"{key}: {show(a)} there, {show(b)} now")
    return out


def claim(run_dir: Path, cfg: DictConfig) -> bool:
    """Make ``run_dir`` this config's directory; returns True when it resumes an earlier run of it.

    Raises :class:`ConfigError` naming the differing keys when the directory holds results of another config,
    or results without a fingerprint (written before fingerprints existed: their config cannot be told).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    now = json.loads(json.dumps(fingerprint(cfg), default=str))  # as it reads back from the file
    file = run_dir / FINGERPRINT_FILE
    # A pruning checkpoint is a result too: resuming it under another config would mix two configs' layers.
    has_results = any((run_dir / name).exists() for name in RESULT_FILES)
    if file.exists() and has_results:  # a fingerprint without results (a run that failed early) is replaced
        before = json.loads(file.read_text())
        diff = _differences(before, now)
        if diff:
            shown = "; ".join(diff[:8]) + (f"; and {len(diff) - 8} more" if len(diff) > 8 else "")
            raise ConfigError(
                f"{run_dir} holds a run of another config, refusing to resume into it ({shown}). "
                f"Run without hydra.run.dir=... for a fresh directory, or delete {run_dir}."
            )
        return has_results
    if has_results:
        raise ConfigError(
            f"{run_dir} holds results but no {FINGERPRINT_FILE}, so its config cannot be checked; refusing to "
            f"resume into it. Run without hydra.run.dir=... for a fresh directory, or delete {run_dir}."
        )
    tmp = file.with_suffix(".tmp")
    tmp.write_text(json.dumps(now, indent=2, sort_keys=True))
    tmp.replace(file)
    return False
