"""Calibration sets: registered builders that return requests (prompt + answer) for activation statistics."""

from __future__ import annotations

from collections.abc import Callable

from mmprune_exp.config.schema import CalibrationConfig
from mmprune_exp.models.base import Request

CALIBRATION_SETS: dict[str, Callable[[CalibrationConfig], list[Request]]] = {}


def register_calibration(name: str):
    def decorator(fn):
        CALIBRATION_SETS[name] = fn
        return fn

    return decorator


def build_calibration(cfg: CalibrationConfig) -> list[Request]:
    if cfg.name not in CALIBRATION_SETS:
        raise KeyError(f"calibration.name={cfg.name!r} is not registered; known: {sorted(CALIBRATION_SETS)}")
    return CALIBRATION_SETS[cfg.name](cfg)


@register_calibration("shapes")
def shapes_calibration(cfg: CalibrationConfig) -> list[Request]:
    """Full conversations from the calibration split (disjoint seeds), VQA and grounding interleaved."""
    from mmprune_exp.data import scenes

    n_ground = cfg.nsamples // 4
    n_vqa = cfg.nsamples - n_ground
    start = cfg.seed * cfg.nsamples  # a different seed draws different scenes of the same split
    requests = [Request(it.question, images=[it.image], answer=it.answer) for it in scenes.vqa_items("calibration", n_vqa, start)]
    requests += [
        Request(it.prompt, images=[it.image], answer=it.answer) for it in scenes.grounding_items("calibration", n_ground, start)
    ]
    return requests
