"""Calibration registry and the record handed to pruners."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mmprune_exp.config.schema import CalibrationConfig
from mmprune_exp.models.base import Request


class CalibrationError(ValueError):
    """Bad calibration data; the message names the file and the record index."""


@dataclass
class CalibrationData:
    """Calibration requests in the order they are fed, and the token budget per sample."""

    name: str
    requests: list[Request]
    max_length: int


CALIBRATION_SETS: dict[str, Callable[[CalibrationConfig], list[Request]]] = {}


def register_calibration(name: str):
    def decorator(fn):
        CALIBRATION_SETS[name] = fn
        return fn

    return decorator


def build_calibration(cfg: CalibrationConfig) -> CalibrationData:
    if cfg.name not in CALIBRATION_SETS:
        raise KeyError(f"calibration.name={cfg.name!r} is not registered; known: {sorted(CALIBRATION_SETS)}")
    return CalibrationData(cfg.name, CALIBRATION_SETS[cfg.name](cfg), cfg.max_length)
