"""Synthetic shape scenes from the calibration split (seeds disjoint from training and evaluation)."""

from __future__ import annotations

from mmprune_exp.calibration.base import register_calibration
from mmprune_exp.config.schema import CalibrationConfig
from mmprune_exp.models.base import Request


@register_calibration("shapes")
def shapes_calibration(cfg: CalibrationConfig) -> list[Request]:
    """Full conversations (question + answer), VQA and grounding mixed 3:1."""
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
