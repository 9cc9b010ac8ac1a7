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
        raise CalibrationError(f"calibration.path={str(path)!r} does not exist")
    lines = [(i, line.strip()) for i, line in enumerate(path.read_text().splitlines()) if line.strip()]
    if len(lines) < cfg.nsamples:
        raise CalibrationError(f"calibration.nsamples={cfg.nsamples} but {path} has only {len(lines)} non-empty lines")
    chosen = np.random.RandomState(cfg.seed).choice(len(lines), size=cfg.nsamples, replace=False)
    return [Request(lines[i][1], raw=True) for i in chosen.tolist()]
