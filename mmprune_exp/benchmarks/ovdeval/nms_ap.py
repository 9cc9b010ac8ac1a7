"""NMS-AP as OVDEval's official ``eval.py`` computes it, and plain COCO AP (shared/reference/benchmarks.md §1.5-1.6).

GT-anchored, class-agnostic suppression (eval.py L7-75, L109-135, re-implemented): for every ground-truth
box of an image, the predictions of any category with IoU strictly above the threshold are ranked by
score; the best is kept and the rest removed, unless another ground truth kept them. Then stock
pycocotools COCOeval (its annotation-id-0 behaviour included unless ``fix_ann_id_zero``).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

STAT_NAMES = (
    "ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large",
    "ar1", "ar10", "ar100", "ar_small", "ar_medium", "ar_large",
)  # fmt: skip


def iou_xywh(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one ``[x, y, w, h]`` box with each row of ``boxes``: no +1 pixel, no clipping, 0 for union 0.

    Same arithmetic in the same order as the official ``calculate_iou`` (eval.py L7-28), so values sitting
    exactly on the threshold compare the same way.
    """
    x1, y1, w1, h1 = box
    x2, y2, w2, h2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    inter_w = np.maximum(0, np.minimum(x1 + w1, x2 + w2) - np.maximum(x1, x2))
    inter_h = np.maximum(0, np.minimum(y1 + h1, y2 + h2) - np.maximum(y1, y2))
    inter = inter_w * inter_h
    union = w1 * h1 + w2 * h2 - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union == 0, 0, inter / union)


def _rank(scores: np.ndarray, tie_order: str) -> np.ndarray:
    """Indices of ``scores`` from best to worst; see the module docstring for ``tie_order``."""
    if tie_order == "numpy":
        return np.argsort(scores)[::-1]  # the official call, default (unstable) kind
    if tie_order == "stable":
        return np.argsort(scores, kind="stable")[::-1]
    if tie_order == "first":
        return np.argsort(-scores, kind="stable")
    raise ValueError(f"tie_order must be numpy, stable or first, got {tie_order!r}")


def suppress_on_gt(
    gt_boxes: list, pred_boxes: list, scores: list, iou_threshold: float = 0.5, tie_order: str = "numpy"
) -> list[int]:
    """Indices (in input order) of the predictions of one image that survive GT-anchored suppression."""
    if not pred_boxes:
        return []
    boxes = np.array(pred_boxes)
    score_arr = np.array(scores)  # dtype as the official np.array(scores): it decides the sort kernel
    gts = np.array(gt_boxes)
    kept: set[int] = set()
    removed: list[int] = []
    for gt_box in gts:
        over = np.where(iou_xywh(gt_box, boxes) > iou_threshold)[0].tolist()
        if not over:
            continue
        ranked = [over[j] for j in _rank(score_arr[over], tie_order).tolist()]
        kept.add(ranked[0])
        removed += ranked[1:]
    dropped = {i for i in removed if i not in kept}  # kept for any ground truth wins
    return [i for i in range(len(pred_boxes)) if i not in dropped]


def gt_anchored_nms(
    results: list[dict], annotations: list[dict], iou_threshold: float = 0.5, tie_order: str = "numpy"
) -> list[dict]:
    """Official eval.py L109-130: per image (in order of first appearance), suppress duplicates on objects."""
    by_image: dict[Any, list[dict]] = defaultdict(list)
    for det in results:
        by_image[det["image_id"]].append(det)
    gt_by_image: dict[Any, list[dict]] = defaultdict(list)
    for ann in annotations:
        gt_by_image[ann["image_id"]].append(ann)
    out: list[dict] = []
    for image_id, dets in by_image.items():
        gts = gt_by_image.get(image_id, [])
        keep = suppress_on_gt(
            [g["bbox"] for g in gts], [d["bbox"] for d in dets], [d["score"] for d in dets], iou_threshold, tie_order
        )
        out += [dets[i] for i in keep]
    return out


@dataclass
class CocoStats:
    stats: list[float]  # the 12 numbers of COCOeval.summarize(), full precision (-1: no ground truth there)
    per_category: dict[int, float]  # AP@[.5:.95] per category id with ground truth
    summary: str  # summarize()'s printed table

    def as_dict(self) -> dict[str, float]:
        return dict(zip(STAT_NAMES, self.stats))


def _gt_coco(dataset: dict, fix_ann_id_zero: bool):
    from pycocotools.coco import COCO

    data = copy.deepcopy(dataset)
    anns = data.get("annotations", [])
    if fix_ann_id_zero and anns:
        low = min(a["id"] for a in anns)
        if low <= 0:
            for a in anns:
                a["id"] += 1 - low
    gt = COCO()
    gt.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def coco_eval(
    dataset: dict, results: list[dict], img_ids: list | None = None, fix_ann_id_zero: bool = False
) -> CocoStats:
    """Stock pycocotools bbox COCOeval of ``results`` against the ground-truth ``dataset`` dict.

    ``results`` must only hold image ids of ``dataset`` (see :func:`known_image_results`). An empty list
    scores 0 for every category with ground truth (pycocotools' loadRes cannot take one).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = _gt_coco(dataset, fix_ann_id_zero)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        if results:
            dt = gt.loadRes(copy.deepcopy(results))  # loadRes adds keys to the dicts it is given
        else:
            dt = COCO()
            dt.dataset = {"images": list(gt.dataset.get("images", [])), "categories": copy.deepcopy(
                gt.dataset.get("categories", [])), "annotations": []}  # fmt: skip
            dt.createIndex()
        ev = COCOeval(gt, dt, "bbox")
        if img_ids is not None:
            ev.params.imgIds = sorted(img_ids)
        ev.evaluate()
        ev.accumulate()
        buffer.seek(0)
        buffer.truncate()
        ev.summarize()
    precision = ev.eval["precision"][:, :, :, 0, -1]  # T x R x K at area=all, maxDets=100
    per_category = {}
    for k, cat_id in enumerate(ev.params.catIds):
        p = precision[:, :, k]
        if (p > -1).any():
            per_category[int(cat_id)] = float(np.mean(p[p > -1]))
    return CocoStats([float(s) for s in ev.stats], per_category, buffer.getvalue())


def known_image_results(dataset: dict, results: list[dict]) -> tuple[list[dict], list]:
    """``results`` on images of ``dataset``, and the unknown image ids (the official loadRes asserts)."""
    known = {img["id"] for img in dataset.get("images", [])}
    kept = [r for r in results if r["image_id"] in known]
    unknown = list(dict.fromkeys(r["image_id"] for r in results if r["image_id"] not in known))
    return kept, unknown


@dataclass
class SubsetScore:
    nms: CocoStats
    plain: CocoStats
    before: int
    after: int
    kept: list[dict]  # post-NMS results, in the official output order
    unknown_image_ids: list = field(default_factory=list)


def score_detections(
    dataset: dict,
    results: list[dict],
    iou_threshold: float = 0.5,
    tie_order: str = "numpy",
    fix_ann_id_zero: bool = False,
    img_ids: list | None = None,
) -> SubsetScore:
    """NMS-AP and plain AP of COCO-format ``results`` against one subset's ground truth."""
    results, unknown = known_image_results(dataset, results)
    if unknown:
        log.warning("%d image id(s) of the results are not in the ground truth; dropped: %s", len(unknown),
                    unknown[:20])  # fmt: skip
    kept = gt_anchored_nms(results, dataset.get("annotations", []), iou_threshold, tie_order)
    nms = coco_eval(dataset, kept, img_ids, fix_ann_id_zero)
    plain = coco_eval(dataset, results, img_ids, fix_ann_id_zero)
    return SubsetScore(nms, plain, len(results), len(kept), kept, unknown)


def check_results(results: Any) -> str | None:
    """Why ``results`` is not a COCO detection list, or None when it is."""
    if not isinstance(results, list):
        return "the results file must hold a JSON list of detections"
    for i, r in enumerate(results):
        if not isinstance(r, dict) or not {"image_id", "category_id", "bbox", "score"} <= set(r):
            return f"detection {i} needs image_id, category_id, bbox and score: {str(r)[:200]}"
        box = r["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            return f"detection {i} has no [x, y, w, h] bbox: {str(r)[:200]}"
    return None


