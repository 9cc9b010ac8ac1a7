"""Calibration sets: registered builders that return requests (prompt + answer) for activation statistics."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mmprune_exp.config.schema import CalibrationConfig
from mmprune_exp.models.base import Request


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


@register_calibration("shapes")
def shapes_calibration(cfg: CalibrationConfig) -> list[Request]:
    """Full conversations from the calibration split (disjoint seeds), VQA and grounding mixed 3:1."""
    from mmprune_exp.data import scenes

    n_ground = cfg.nsamples // 4
    n_vqa = cfg.nsamples - n_ground
    start = cfg.seed * cfg.nsamples  # another seed draws other scenes of the same split
    vqa = [Request(it.question, images=[it.image], answer=it.answer) for it in scenes.vqa_items("calibration", n_vqa, start)]
    ground = [
        Request(it.prompt, images=[it.image], answer=it.answer)
        for it in scenes.grounding_items("calibration", n_ground, start)
    ]
    return vqa + ground
