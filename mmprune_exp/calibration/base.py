"""Calibration registry and the record handed to pruners."""

from __future__ import annotations

from dataclasses import dataclass

from mmprune_exp.config.schema import CalibrationConfig
from mmprune_exp.errors import DataError
from mmprune_exp.models.base import Request
from mmprune_exp.registry import Registry


class CalibrationError(DataError):
    """Bad calibration data; the message names the file and the record index."""


@dataclass
class CalibrationData:
    """Calibration requests in the order they are fed, and the token budget per sample."""

    name: str
    requests: list[Request]
    max_length: int


CALIBRATION_SETS = Registry("calibration.name")  # name -> fn(CalibrationConfig) -> list[Request]
register_calibration = CALIBRATION_SETS.register


def build_calibration(cfg: CalibrationConfig) -> CalibrationData:
    requests = CALIBRATION_SETS.get_factory(cfg.name)(cfg)
    if not requests:  # each loader names its file; this catches a set that yields nothing without saying why
        source = f" (calibration.path={cfg.path!r})" if getattr(cfg, "path", None) else ""
        raise CalibrationError(f"calibration {cfg.name!r}{source} yielded no samples: nothing to calibrate on")
    return CalibrationData(cfg.name, requests, cfg.max_length)
