"""Scorers as plain functions: answer parsing, exact match, Qwen2.5-VL box JSON parsing, COCO AP.

None of these raise on model output: text that cannot be parsed yields ``None`` (a scored miss that the
caller logs), never an exception.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from dataclasses import dataclass

_NUMBER_WORDS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5,
    "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
}  # fmt: skip


def normalize_text(text: str) -> str:
    """Lower-case, trim, drop a trailing full stop and collapse whitespace."""
    text = re.sub(r"\s+", " ", text.strip().lower())
    return text.rstrip(".").strip()


def parse_choice(text: str, letters: str = "ABCDEFGH") -> str | None:
    """The option letter a response picks: "B", "B.", "(B)", "B) red", "The answer is B"."""
    text = text.strip()
    m = re.match(rf"^\(?([{letters}])(?:[\s.:)]|$)", text)
    if m:
        return m.group(1)
    m = re.search(rf"answer is:?\s*\(?([{letters}])\b", text, flags=re.IGNORECASE)
    return m.group(1).upper() if m else None


def parse_number(text: str) -> str | None:
    """The first integer in a response ("3", "3 shapes", "three") as a canonical string."""
    text = normalize_text(text)
    m = re.search(r"-?\d+", text)
    if m:
        return str(int(m.group(0)))
    for word in re.findall(r"[a-z]+", text):
        if word in _NUMBER_WORDS:
            return str(_NUMBER_WORDS[word])
    return None


def parse_word(text: str) -> str | None:
    """The first word of a response, normalised ("Yes." -> "yes"); None for an empty response."""
    words = re.findall(r"[a-z]+", normalize_text(text))
    return words[0] if words else None


def parse_short_answer(text: str, target: str) -> str | None:
    """Parse a response in the form the target has: option letter, integer, or a word."""
    if re.fullmatch(r"[A-H]", target):
        return parse_choice(text)
    if re.fullmatch(r"-?\d+", target):
        return parse_number(text)
    return parse_word(text)


# -- grounding ------------------------------------------------------------------------------------


@dataclass
class PredBox:
    """A predicted box in pixels of the frame the model saw, ``[x1, y1, x2, y2]``."""

    bbox: tuple[float, float, float, float]
    label: str = ""


_FENCE = re.compile(r"```(?:json)?\s*(.*?)(?:```|$)", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL | re.IGNORECASE)
_BOX_OBJECT = re.compile(r"\{[^{}]*\}")


def _boxes_from_items(items: list) -> list[PredBox]:
    boxes = []
    for item in items:
        if not isinstance(item, dict):
            continue
        bbox = item.get("bbox_2d")
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            continue
        try:
            coords = tuple(float(v) for v in bbox)
        except (TypeError, ValueError):
            continue
        boxes.append(PredBox(coords, str(item.get("label", ""))))
    return boxes


def parse_bbox_json(text: str) -> list[PredBox] | None:
    """Boxes from a Qwen2.5-VL grounding answer; ``[]`` for "None"; ``None`` when nothing parses.

    Accepts a fenced ```json block or bare JSON, inside ``<answer>`` tags or not, a single dict instead of a
    list, and truncated JSON (generation cut by max_new_tokens): the complete ``{...}`` objects are kept.
    """
    answers = _ANSWER.findall(text)
    body = answers[-1] if answers else text
    fences = _FENCE.findall(body)
    body = (fences[-1] if fences else body).strip()
    if normalize_text(body) in ("none", "[]", ""):
        return [] if body or answers or fences else None
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        data = None
        items = []
        for chunk in _BOX_OBJECT.findall(body):
            try:
                items.append(json.loads(chunk))
            except json.JSONDecodeError:
                continue
        boxes = _boxes_from_items(items)
        return boxes if boxes else None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        return None
    return _boxes_from_items(data)


def coco_ap(
    gt_boxes: dict[int, list[tuple[float, float, float, float]]],
    pred_boxes: dict[int, list[tuple[tuple[float, float, float, float], float]]],
    image_sizes: dict[int, tuple[int, int]] | None = None,
) -> dict[str, float]:
    """Class-agnostic COCO box AP with pycocotools.

    ``gt_boxes[image_id]`` lists xyxy boxes; ``pred_boxes[image_id]`` lists ``(xyxy, score)``. Returns
    ``ap`` (AP@[.5:.95]), ``ap50``, ``ap75`` and ``ar100``. Annotation ids start at 1 because pycocotools
    treats id 0 as "no match" in its matching arrays. No predictions at all gives zeros (pycocotools' loadRes
    cannot take an empty list).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    image_ids = sorted(set(gt_boxes) | set(pred_boxes))
    sizes = image_sizes or {}
    dataset = {
        "images": [{"id": i, "width": sizes.get(i, (0, 0))[0], "height": sizes.get(i, (0, 0))[1]} for i in image_ids],
        "categories": [{"id": 1, "name": "target"}],
        "annotations": [],
    }
    for image_id in image_ids:
        for x1, y1, x2, y2 in gt_boxes.get(image_id, []):
            w, h = x2 - x1, y2 - y1
            dataset["annotations"].append(
                {"id": len(dataset["annotations"]) + 1, "image_id": image_id, "category_id": 1,
                 "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": 0}
            )  # fmt: skip
    results = [
        {"image_id": i, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)}
        for i, preds in pred_boxes.items()
        for (x1, y1, x2, y2), score in preds
    ]
    zeros = {"ap": 0.0, "ap50": 0.0, "ap75": 0.0, "ar100": 0.0}
    if not results or not dataset["annotations"]:
        return zeros
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.imgIds = image_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [max(float(s), 0.0) for s in ev.stats]  # -1 means "no ground truth in this bucket"
    return {"ap": stats[0], "ap50": stats[1], "ap75": stats[2], "ar100": stats[8]}


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """IoU of two xyxy boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def greedy_matches(gt: list, pred: list, threshold: float = 0.5) -> int:
    """Number of ground-truth boxes matched one-to-one by a prediction with IoU >= threshold."""
    used: set[int] = set()
    hits = 0
    for g in gt:
        ious = [(box_iou(g, p), j) for j, p in enumerate(pred) if j not in used]
        if ious:
            best, j = max(ious)
            if best >= threshold:
                used.add(j)
                hits += 1
    return hits


__all__ = [
    "PredBox", "box_iou", "coco_ap", "greedy_matches", "normalize_text", "parse_bbox_json",
    "parse_choice", "parse_number", "parse_short_answer", "parse_word",
]  # fmt: skip
