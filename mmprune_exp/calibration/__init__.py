"""Calibration sets: registered builders that return requests for activation statistics."""

from mmprune_exp.calibration import llava_json, shapes, text  # noqa: F401  (register the sets)
from mmprune_exp.calibration.base import (
    CALIBRATION_SETS,
    CalibrationData,
    CalibrationError,
    build_calibration,
    register_calibration,
)
from mmprune_exp.calibration.shapes import shapes_calibration

__all__ = [
    "CALIBRATION_SETS", "CalibrationData", "CalibrationError", "build_calibration", "register_calibration",
    "shapes_calibration",
]  # fmt: skip
