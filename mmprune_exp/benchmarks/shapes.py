"""The project's synthetic benchmarks on held-out shape scenes (see ``mmprune_exp.data.scenes``)."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

from mmprune_exp.benchmarks.base import Benchmark, Record, register_benchmark
from mmprune_exp.benchmarks.scoring import coco_ap, greedy_matches, normalize_text, parse_bbox_json, parse_short_answer
from mmprune_exp.data import scenes
from mmprune_exp.models.base import Request

# Synthetic splits are unbounded; `limit: null` evaluates this many records.
FULL_SIZE = 500


@register_benchmark("shapes_vqa")
class ShapesVQA(Benchmark):
    """Counting, colour (multiple choice), shape and relative-position questions; exact-match accuracy."""

    def load_records(self, limit: int | None) -> list[Record]:
        items = scenes.vqa_items(self.cfg.split, limit or FULL_SIZE)
        return [
            Record(it.id, Request(it.question, images=[it.image]), it.answer, {"kind": it.kind, "question": it.question})
            for it in items
        ]

    def score(self, record: Record, response: str) -> dict[str, Any]:
        parsed = parse_short_answer(response, record.target)
        correct = parsed is not None and normalize_text(parsed) == normalize_text(record.target)
        return {"parsed": parsed, "score": float(correct)}

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        by_kind: dict[str, list[float]] = defaultdict(list)
        for row in rows:
            by_kind[row["kind"]].append(row["score"])
        metrics = {"score": _mean([r["score"] for r in rows]), "accuracy": _mean([r["score"] for r in rows])}
        metrics |= {f"accuracy_{kind}": _mean(v) for kind, v in sorted(by_kind.items())}
        metrics["unparsed"] = float(sum(r["parsed"] is None for r in rows))
        return metrics


@register_benchmark("shapes_video")
class ShapesVideo(ShapesVQA):
    """Questions on held-out 8-frame clips of moving and static shapes (``scenes.video_items``; kinds
    ``scenes.VIDEO_KINDS``). Exact-match accuracy, overall and per kind, as shapes_vqa; an answer naming an
    object ("red circle") must match in all its words.

    The clips go to the model as frame lists and take the same qwen-vl-utils path as a video file (see
    ``models.vision_inputs``), sampled at 2 fps.
    """

    def load_records(self, limit: int | None) -> list[Record]:
        items = scenes.video_items(self.cfg.split, limit or FULL_SIZE)
        return [
            Record(it.id, Request(it.question, videos=[it.frames]), it.answer, {"kind": it.kind, "question": it.question})
            for it in items
        ]

    def score(self, record: Record, response: str) -> dict[str, Any]:
        n_words = len(record.target.split())
        if n_words == 1:
            return super().score(record, response)
        # "Which shape moves?" is answered with colour and shape: compare that many leading words.
        words = re.findall(r"[a-z]+", normalize_text(response))
        parsed = " ".join(words[:n_words]) if len(words) >= n_words else None
        return {"parsed": parsed, "score": float(parsed == normalize_text(record.target))}


@register_benchmark("shapes_grounding")
class ShapesGrounding(Benchmark):
    """"Locate every <colour> <shape>": boxes in Qwen2.5-VL's JSON ``bbox_2d`` format; COCO AP and AP50.

    Boxes are matched class-agnostically per image, since each prompt asks for one phrase. The scenes are
    rendered at the processor's frame size (112x112 stays 112x112), so no rescaling is needed. Every
    predicted box gets score 1.0 (the model gives no confidence), as in VLM-R1's grounding evaluation.
    """

    def load_records(self, limit: int | None) -> list[Record]:
        items = scenes.grounding_items(self.cfg.split, limit or FULL_SIZE)
        return [
            Record(it.id, Request(it.prompt, images=[it.image]), [list(b) for b in it.boxes], {"label": it.label})
            for it in items
        ]

    def score(self, record: Record, response: str) -> dict[str, Any]:
        boxes = parse_bbox_json(response)
        pred = [list(b.bbox) for b in boxes] if boxes is not None else []
        hits = greedy_matches(record.target, pred)
        denom = max(len(record.target), len(pred))
        return {"parsed": pred if boxes is not None else None, "score": hits / denom if denom else 1.0}

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        gts = {i: [tuple(b) for b in row["target"]] for i, row in enumerate(rows)}
        preds = {i: [(tuple(b), 1.0) for b in (row["parsed"] or [])] for i, row in enumerate(rows)}
        ap = coco_ap(gts, preds)
        return {
            "score": ap["ap50"],
            **ap,
            "match_f1": _mean([r["score"] for r in rows]),
            "unparsed": float(sum(r["parsed"] is None for r in rows)),
        }


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0
