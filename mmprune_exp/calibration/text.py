"""Plain text lines (one sample per non-empty line), fed without the chat template, like Wanda's C4 windows."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mmprune_exp.calibration.base import CalibrationError, register_calibration
from mmprune_exp.config.schema import CalibrationConfig
from mmprune_exp.models.base import Request


@register_calibration("text")
def text_calibration(cfg: CalibrationConfig) -> list[Request]:
    if not cfg.path:
        raise CalibrationError("calibration.path is not set: point it at a text file with one sample per line")
    path = Path(cfg.path).expanduser()
    if not path.is_file():
        raise CalibrationError(f"calibration.path={str(path)!r} does not exist" if not path.exists() else
                               f"calibration.path={str(path)!r} is not a file")  # fmt: skip
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise CalibrationError(f"{path}, line {line}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    lines = [(i, line.strip()) for i, line in enumerate(text.splitlines()) if line.strip()]
    if not lines:
        raise CalibrationError(f"{path}: no non-empty lines (the file is empty): nothing to calibrate on")
    if len(lines) < cfg.nsamples:
        raise CalibrationError(f"calibration.nsamples={cfg.nsamples} but {path} has only {len(lines)} non-empty lines")
    chosen = np.random.RandomState(cfg.seed).choice(len(lines), size=cfg.nsamples, replace=False)
    return [Request(lines[i][1], raw=True) for i in chosen.tolist()]
