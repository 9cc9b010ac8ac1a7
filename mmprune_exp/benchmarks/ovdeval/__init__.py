"""OVDEval (om-ai-lab/OVDEval): open-vocabulary detection with hard negatives, scored by NMS-AP.

Data (shared/reference/benchmarks.md §1.2): ``annotations/<subset>.json`` (COCO-style, each image with its
positive ``text`` and hard-negative ``neg_text`` labels) and ``images/<subset>/<file_name>`` under
``benchmark.path``. The ninth subset, ``coco`` (COCO val2017), is expected in the same layout.

Protocol for a VLM (§2.2-2.4, the VLM-R1 evaluation): per image, the grounding prompt lists the image's
labels (``text + neg_text``; all category names for coco/celebrity/logo/landmark, as the official
``eval_glip.py`` does); Qwen2.5-VL answers JSON ``bbox_2d`` boxes in pixels of its resized input frame,
which are rescaled to the original image; each box gets score 1.0 and the category whose name is its
label. The results then go through the official ``eval.py`` computation, reproduced here:

NMS-AP (§1.5): for every ground-truth box of an image (any category, in annotation order), the predictions
(any category) with IoU strictly above 0.5 are ranked by ``np.argsort(scores)[::-1]``; the first is kept,
the others are removed unless some ground truth kept them. Predictions on no object are never
suppressed. Then stock pycocotools COCOeval; NMS-AP = ``stats[0]``. Plain AP = COCOeval without the step.

Two hazards of the official computation, each with a flag (faithful by default, §1.6):
- ``tie_order``: numpy's default argsort is not stable, so among equal scores (every VLM box scores 1.0)
  which box survives depends on numpy's sort kernel and the CPU. For all-equal scores it returns the
  identity, so the last-listed box is kept. ``numpy`` calls it as the official code does (bit-identical on
  the same machine); ``stable`` gives the same answer wherever numpy's happens to be stable (always the
  last listed among ties); ``first`` keeps the first listed.
- ``fix_ann_id_zero``: pycocotools records a match by the ground truth's annotation id and reads id 0 as
  "unmatched", so the annotation with id 0 (OVDEval's files start at 0) can never be detected. ``false``
  keeps that (the published numbers have it); ``true`` renumbers annotation ids from 1.

The official script crashes on an empty result list and on an image id not in the ground truth; here the
first scores 0 AP for every category with ground truth, and the second drops those results and reports
their ids.

Score-only::

    python -m mmprune_exp.benchmarks.ovdeval score --gt annotations/material.json --results results.json
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmprune_exp.benchmarks.base import Benchmark, BenchmarkDataError, Record, register_benchmark, report_user_error
from mmprune_exp.benchmarks.image_files import LazyImageRequest, image_size
from mmprune_exp.benchmarks.ovdeval.nms_ap import SubsetScore, score_detections
from mmprune_exp.benchmarks.scoring import greedy_matches, normalize_text, parse_bbox_json
from mmprune_exp.config.schema import BenchmarkConfig, require
from mmprune_exp.errors import UserError, where

log = logging.getLogger(__name__)

# The paper's aspects; VLM-R1 and the paper's OmDet row average the five non-COCO aspects (§1.7).
ASPECTS: dict[str, tuple[str, ...]] = {
    "proper_noun": ("celebrity", "logo", "landmark"),
    "attribute": ("color", "material"),
    "position": ("position",),
    "relationship": ("relationship",),
    "negation": ("negation",),
}
# eval_glip.py prompts these subsets with every category name instead of the image's text + neg_text.
ALL_CATEGORY_SUBSETS = ("coco", "celebrity", "logo", "landmark")

# VLM-R1's OVD question (blog 2025-03-24, reference §2.2): the label list is a Python list repr.
PROMPT = (
    "Please carefully check the image and detect the following objects: {labels}. Output the bbox coordinates "
    "of detected objects in <answer></answer>. The bbox coordinates in Markdown format should be: \n```json\n"
    '[{{"bbox_2d": [x1, y1, x2, y2], "label": "object name"}}]\n```\n If no targets are detected in the '
    'image, simply respond with "None".'
)


OVDEVAL_SUBSETS = ("material", "color", "position", "relationship", "negation", "celebrity", "logo", "landmark", "coco")
OVDEVAL_TIE_ORDERS = ("numpy", "stable", "first")


@dataclass
class OVDEvalCommonConfig(BenchmarkConfig):
    """Settings shared by ``benchmark=ovdeval`` (one subset) and ``benchmark=ovdeval_all``."""

    name: str = "ovdeval"
    split: str = "test"
    # Qwen2.5-VL answers in pixels of the processor's resized frame; rescale them to the original image
    # with the same smart_resize settings the model's processor uses.
    rescale: bool = True
    min_pixels: int = 3136
    max_pixels: int = 12845056
    resize_factor: int = 28  # patch_size * merge_size
    iou_threshold: float = 0.5  # GT-anchored suppression: IoU strictly above this
    # Order among equal scores in the suppression: numpy = the official np.argsort(...)[::-1] (faithful,
    # machine-dependent for mixed ties), stable = the same with a stable sort (last listed wins),
    # first = the first listed wins.
    tie_order: str = "numpy"
    # pycocotools never matches a ground truth whose annotation id is 0; true renumbers ids from 1.
    fix_ann_id_zero: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.min_pixels > 0, "min_pixels", f"must be positive, got {self.min_pixels}")
        require(self.max_pixels >= self.min_pixels, "max_pixels", f"must be >= min_pixels, got {self.max_pixels}")
        require(self.resize_factor > 0, "resize_factor", f"must be positive, got {self.resize_factor}")
        require(0.0 <= self.iou_threshold < 1.0, "iou_threshold", f"must be in [0, 1), got {self.iou_threshold}")
        require(
            self.tie_order in OVDEVAL_TIE_ORDERS,
            "tie_order",
            f"got {self.tie_order!r}; choose one of {OVDEVAL_TIE_ORDERS}",
        )


@dataclass
class OVDEvalConfig(OVDEvalCommonConfig):
    """OVDEval, one subset (``benchmark=ovdeval benchmark.subset=color``)."""

    subset: str = "material"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.subset in OVDEVAL_SUBSETS, "subset", f"got {self.subset!r}; choose one of {OVDEVAL_SUBSETS}")


@dataclass
class OVDEvalAllConfig(OVDEvalCommonConfig):
    """OVDEval over several subsets (``benchmark=ovdeval_all``), with the aspect averages."""

    name: str = "ovdeval_all"
    subsets: list[str] = field(default_factory=lambda: list(OVDEVAL_SUBSETS))

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [s for s in self.subsets if s not in OVDEVAL_SUBSETS]
        require(not bad, "subsets", f"unknown subset(s) {bad}; choose from {OVDEVAL_SUBSETS}")
        require(len(self.subsets) > 0, "subsets", "name at least one subset")
        require(len(set(self.subsets)) == len(self.subsets), "subsets", "lists a subset twice")


# -- data ---------------------------------------------------------------------------------------------


@dataclass
class OVDSubset:
    name: str
    dataset: dict  # the annotation file as loaded
    image_files: dict[Any, Path]  # image id -> file (present ones only)
    missing_images: list = field(default_factory=list)  # image ids whose file is absent
    ann_file: Path | None = None  # the annotation file, named in messages

    @property
    def category_by_name(self) -> dict[str, int]:
        return {c["name"]: c["id"] for c in self.dataset["categories"]}

    def labels(self, image: dict) -> list[str]:
        if self.name in ALL_CATEGORY_SUBSETS:
            return [c["name"] for c in self.dataset["categories"]]
        return list(image.get("text", [])) + list(image.get("neg_text", []))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _kind(value: Any) -> str:
    return f"{type(value).__name__} {value!r:.60}"


def _records(dataset: dict, section: str, path: str | Path):
    """``(index, record, at)`` for each record of ``dataset[section]``; ``at(key)`` locates a field in messages."""
    source = f"{path} ({section})"
    for i, record in enumerate(dataset[section]):
        if not isinstance(record, dict):
            raise BenchmarkDataError(f"{where(source, i)}: expected a JSON object, got {_kind(record)}")
        rid = record.get("id")
        shown = rid if _is_int(rid) or isinstance(rid, str) else None

        def at(key: str, i=i, shown=shown) -> str:
            return where(source, i, shown, key)

        yield i, record, at


def _require(record: dict, key: str, ok, expected: str, at) -> Any:
    if key not in record or record[key] is None:
        raise BenchmarkDataError(f"{at(key)}: missing (expected {expected})")
    if not ok(record[key]):
        raise BenchmarkDataError(f"{at(key)}: expected {expected}, got {_kind(record[key])}")
    return record[key]


def check_ground_truth(dataset: Any, path: str | Path) -> None:
    """Check an OVDEval/COCO annotation file's structure, every field the scorer and pycocotools read.

    Raises :class:`BenchmarkDataError` naming the file, the section and record (index and id) and the key:
    missing or empty ``images``/``annotations``/``categories``; an id used twice (images, annotations,
    categories; also a file name or category name used twice); a box that is not four finite numbers
    ``[x, y, w, h]`` with w, h >= 0; an annotation pointing at an unknown image or category; wrong types.
    """
    if not isinstance(dataset, dict):
        raise BenchmarkDataError(f"{path}: expected a JSON object with 'images', 'annotations' and 'categories', "
                                 f"got {type(dataset).__name__}: not an OVDEval/COCO annotation file")  # fmt: skip
    for key in ("images", "annotations", "categories"):
        if key not in dataset:
            raise BenchmarkDataError(f"{where(path, key=key)}: missing: not an OVDEval/COCO annotation file")
        if not isinstance(dataset[key], list):
            raise BenchmarkDataError(f"{where(path, key=key)}: expected a list, got {type(dataset[key]).__name__}")
        if not dataset[key]:
            raise BenchmarkDataError(f"{where(path, key=key)}: empty list (zero {key}): nothing to evaluate")

    categories: dict[int, int] = {}
    names: dict[str, int] = {}
    for i, cat, at in _records(dataset, "categories", path):
        cid = _require(cat, "id", _is_int, "an integer", at)
        name = _require(cat, "name", lambda v: isinstance(v, str) and v.strip(), "a non-empty string", at)
        if cid in categories:
            raise BenchmarkDataError(f"{at('id')}: duplicate id, record {categories[cid]} has the same one")
        if name in names:
            raise BenchmarkDataError(f"{at('name')}: duplicate name {name!r}, record {names[name]} has the same one "
                                     "(a predicted label could not be mapped to one category)")  # fmt: skip
        categories[cid], names[name] = i, i

    images: dict[int, int] = {}
    files: dict[str, int] = {}
    for i, image, at in _records(dataset, "images", path):
        iid = _require(image, "id", _is_int, "an integer", at)
        file_name = _require(image, "file_name", lambda v: isinstance(v, str) and v.strip(), "a non-empty string", at)
        for key in ("width", "height"):
            if image.get(key) is not None and not (_is_number(image[key]) and image[key] > 0):
                raise BenchmarkDataError(f"{at(key)}: expected a positive number of pixels, got {_kind(image[key])}")
        for key in ("text", "neg_text"):
            labels = image.get(key)
            if labels is not None and not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
                raise BenchmarkDataError(f"{at(key)}: expected a list of label strings, got {_kind(labels)}")
        if iid in images:
            raise BenchmarkDataError(f"{at('id')}: duplicate id, record {images[iid]} has the same one")
        if file_name in files:
            raise BenchmarkDataError(
                f"{at('file_name')}: duplicate file name {file_name!r}, record {files[file_name]} has the same one"
            )
        images[iid], files[file_name] = i, i

    annotations: dict[int, int] = {}
    for i, ann, at in _records(dataset, "annotations", path):
        aid = _require(ann, "id", _is_int, "an integer", at)
        if aid in annotations:
            raise BenchmarkDataError(f"{at('id')}: duplicate id, record {annotations[aid]} has the same one "
                                     "(pycocotools would keep only the later)")  # fmt: skip
        annotations[aid] = i
        if _require(ann, "image_id", _is_int, "an integer", at) not in images:
            raise BenchmarkDataError(f"{at('image_id')}: image id {ann['image_id']} is not in 'images'")
        if _require(ann, "category_id", _is_int, "an integer", at) not in categories:
            raise BenchmarkDataError(f"{at('category_id')}: category id {ann['category_id']} is not in 'categories'")
        box = _require(ann, "bbox", lambda v: isinstance(v, list) and len(v) == 4 and all(map(_is_number, v)),
                       "[x, y, w, h] (four numbers)", at)  # fmt: skip
        if box[2] < 0 or box[3] < 0:
            raise BenchmarkDataError(f"{at('bbox')}: negative width or height in {box} (COCO boxes: [x, y, w, h])")
        _require(ann, "area", lambda v: _is_number(v) and v >= 0, "a number >= 0", at)  # COCOeval's area ranges
        _require(ann, "iscrowd", lambda v: v in (0, 1), "0 or 1", at)  # read by COCOeval's IoU


def read_json(path: Path, what: str) -> Any:
    """``path`` parsed as JSON; a missing, unreadable or invalid file is a :class:`BenchmarkDataError`."""
    if not path.is_file():
        raise BenchmarkDataError(f"{what} {path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BenchmarkDataError(f"{path}: not valid JSON ({err})") from err
    except UnicodeDecodeError as err:
        raise BenchmarkDataError(f"{path}: not UTF-8 text ({err})") from err
    except OSError as err:
        raise BenchmarkDataError(f"{path}: cannot be read ({err})") from err


def load_subset(root: str | Path, subset: str) -> OVDSubset:
    root = Path(root).expanduser()
    ann_file = root / "annotations" / f"{subset}.json"
    if not ann_file.is_file():
        raise BenchmarkDataError(
            f"benchmark.path={str(root)!r} has no annotations/{subset}.json. Point benchmark.path at the OVDEval "
            "data (from the HF dataset omlab/OVDEval: annotations/<subset>.json and images/<subset>/)."
        )
    dataset = read_json(ann_file, "annotation file")
    check_ground_truth(dataset, ann_file)
    if subset not in ALL_CATEGORY_SUBSETS:  # the prompt lists the image's own labels: it needs some
        for index, image in enumerate(dataset["images"]):
            if not image.get("text") and not image.get("neg_text"):
                raise BenchmarkDataError(
                    f"{where(f'{ann_file} (images)', index, image['id'], 'text')}: no labels in 'text' or 'neg_text' "
                    f"(the {subset} prompt lists them; only {', '.join(ALL_CATEGORY_SUBSETS)} use all categories)"
                )
    image_dir = root / "images" / subset
    files, missing = {}, []
    for image in dataset["images"]:
        path = image_dir / image["file_name"]
        if path.is_file():
            files[image["id"]] = path
        else:
            missing.append(image["id"])
    if not files:
        first = dataset["images"][0]
        raise BenchmarkDataError(
            f"{where(f'{ann_file} (images)', 0, first['id'], 'file_name')}: {image_dir / first['file_name']} does not "
            f"exist, nor does the file of any of the {len(missing)} images "
            f"(expected under benchmark.path/images/{subset}/)"
        )
    return OVDSubset(subset, dataset, files, missing, ann_file)


def check_results_file(results: Any, path: str | Path) -> None:
    """Check a COCO detection results list: ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]``.

    Raises :class:`BenchmarkDataError` naming the file, the detection index and the key. An empty list is
    allowed (every AP is then 0), as are ids not in the ground truth (reported and left out by the scorer).
    """
    if not isinstance(results, list):
        raise BenchmarkDataError(f"{path}: the results file must hold a JSON list of detections, got "
                                 f"{type(results).__name__}")  # fmt: skip
    for i, det in enumerate(results):
        if not isinstance(det, dict):
            raise BenchmarkDataError(f"{path}, detection {i}: expected a JSON object, got {_kind(det)}")

        def at(key: str, i=i) -> str:
            return f"{path}, detection {i}, key {key!r}"

        _require(det, "image_id", _is_int, "an integer", at)
        _require(det, "category_id", _is_int, "an integer", at)
        _require(det, "bbox", lambda v: isinstance(v, list) and len(v) == 4 and all(map(_is_number, v)),
                 "[x, y, w, h] (four numbers)", at)  # fmt: skip
        _require(det, "score", _is_number, "a number", at)


def rescale_box(box: tuple[float, ...], width: int, height: int, cfg: OVDEvalCommonConfig) -> list[float]:
    """xyxy in the processor's resized frame -> xyxy in original pixels (Qwen2.5-VL smart_resize frame)."""
    if not cfg.rescale:
        return list(box)
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    frame_h, frame_w = smart_resize(height, width, cfg.resize_factor, cfg.min_pixels, cfg.max_pixels)
    sx, sy = width / frame_w, height / frame_h
    return [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy]


def _xyxy(box: list) -> tuple[float, float, float, float]:
    x, y, w, h = box
    return (x, y, x + w, y + h)


# -- benchmark ----------------------------------------------------------------------------------------


@register_benchmark("ovdeval", schema=OVDEvalConfig)
class OVDEval(Benchmark):
    """One OVDEval subset (``benchmark.subset``): NMS-AP (headline) and plain AP."""

    cfg: OVDEvalCommonConfig

    def __init__(self, cfg: OVDEvalCommonConfig):
        super().__init__(cfg)
        if not cfg.path:
            raise BenchmarkDataError(
                f"benchmark.path is not set: {self.name} reads OVDEval from disk. Pass benchmark.path=/path/to/OVDEval "
                "(holding annotations/<subset>.json and images/<subset>/, from the HF dataset omlab/OVDEval)."
            )
        self.subsets = {name: load_subset(cfg.path, name) for name in self.subset_names()}
        for subset in self.subsets.values():
            if subset.missing_images:
                images = subset.dataset["images"]
                first = next(i for i, img in enumerate(images) if img["id"] == subset.missing_images[0])
                image = images[first]
                log.warning(
                    "%s/%s: %d image file(s) missing under %s (skipped, their objects count as missed): image ids %s; "
                    "the first: %s: %s does not exist",
                    self.name, subset.name, len(subset.missing_images), cfg.path, subset.missing_images[:20],
                    where(f"{subset.ann_file} (images)", first, image["id"], "file_name"),
                    Path(cfg.path).expanduser() / "images" / subset.name / image["file_name"],
                )  # fmt: skip

    def subset_names(self) -> list[str]:
        assert isinstance(self.cfg, OVDEvalConfig)
        return [self.cfg.subset]

    # records ------------------------------------------------------------------------------------------
    def _images(self, subset: OVDSubset, limit: int | None) -> list[dict]:
        images = subset.dataset["images"]
        return images[:limit] if limit is not None else images

    def load_records(self, limit: int | None) -> list[Record]:
        records = []
        for subset in self.subsets.values():
            gt_by_image: dict[Any, list[dict]] = defaultdict(list)
            for ann in subset.dataset["annotations"]:
                gt_by_image[ann["image_id"]].append(ann)
            for index, image in enumerate(self._images(subset, limit)):
                path = subset.image_files.get(image["id"])
                if path is None:
                    continue
                origin = where(f"{subset.ann_file} (images)", index, image["id"])
                text = PROMPT.format(labels=str(subset.labels(image)))
                width, height = image.get("width"), image.get("height")
                if not width or not height:
                    width, height = image_size(path, origin)
                target = [{"bbox": a["bbox"], "category_id": a["category_id"]} for a in gt_by_image[image["id"]]]
                fields = {"subset": subset.name, "image_id": image["id"], "width": width, "height": height}
                request = LazyImageRequest(text, [path], origin)
                records.append(Record(f"{subset.name}/{image['id']}", request, target, fields))
        return records

    # scoring ------------------------------------------------------------------------------------------
    def score(self, record: Record, response: str) -> dict[str, Any]:
        subset = self.subsets[record.fields["subset"]]
        names = subset.category_by_name
        normalized = {normalize_text(n): i for n, i in names.items()}
        boxes = parse_bbox_json(response)
        detections, unknown, inverted = [], 0, 0
        for box in boxes or []:
            # Exact label match first (VLM-R1's reward matches exactly); then case/space-insensitive.
            cat = names.get(box.label, normalized.get(normalize_text(box.label)))
            if cat is None:
                unknown += 1
                continue
            x1, y1, x2, y2 = rescale_box(box.bbox, record.fields["width"], record.fields["height"], self.cfg)
            if x2 < x1 or y2 < y1:
                inverted += 1
                continue
            # Zero-area boxes are kept: the official scorer counts them as false positives.
            detections.append({"category_id": cat, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": 1.0})
        hits = 0
        for cat in {d["category_id"] for d in detections} | {t["category_id"] for t in record.target}:
            gts = [_xyxy(t["bbox"]) for t in record.target if t["category_id"] == cat]
            preds = [_xyxy(d["bbox"]) for d in detections if d["category_id"] == cat]
            hits += greedy_matches(gts, preds)
        denom = max(len(record.target), len(detections))
        return {
            "parsed": detections if boxes is not None else None,
            "unknown_labels": unknown,
            "inverted_boxes": inverted,
            "score": hits / denom if denom else 1.0,
        }

    def _score_subsets(self, rows: list[dict[str, Any]]) -> dict[str, SubsetScore]:
        by_subset: dict[str, list[dict]] = defaultdict(list)
        for row in rows:
            for det in row.get("parsed") or []:
                by_subset[row["subset"]].append({"image_id": row["image_id"], **det})
        out = {}
        for name, subset in self.subsets.items():
            img_ids = None
            if self.cfg.limit is not None:
                img_ids = [img["id"] for img in self._images(subset, self.cfg.limit)]
            out[name] = score_detections(
                subset.dataset, by_subset.get(name, []), self.cfg.iou_threshold, self.cfg.tie_order,
                self.cfg.fix_ann_id_zero, img_ids,
            )  # fmt: skip
        return out

    def _counts(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        return {
            "unparsed": float(sum(row.get("parsed") is None for row in rows)),
            "unknown_labels": float(sum(row.get("unknown_labels", 0) for row in rows)),
            "inverted_boxes": float(sum(row.get("inverted_boxes", 0) for row in rows)),
            "missing_images": float(sum(len(s.missing_images) for s in self.subsets.values())),
            "match_f1": float(np.mean([row["score"] for row in rows])) if rows else 0.0,
        }

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        (score,) = self._score_subsets(rows).values()
        nms, plain = score.nms.as_dict(), score.plain.as_dict()
        metrics = {"score": max(nms["ap"], 0.0)}
        metrics |= {f"nms_{k}": max(nms[k], 0.0) for k in ("ap", "ap50", "ap75")}
        metrics |= {k: max(plain[k], 0.0) for k in ("ap", "ap50", "ap75")}
        metrics |= {"boxes_before_nms": float(score.before), "boxes_after_nms": float(score.after)}
        return metrics | self._counts(rows)

    # files --------------------------------------------------------------------------------------------
    def write_tables(self, rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
        """Per subset under ``<out_dir>/<name>/``: the COCO results before and after NMS (feed either to the
        official eval.py), full-precision stats; and ``<name>_table.csv`` with NMS-AP and AP (x100)."""
        folder = Path(out_dir) / self.name
        folder.mkdir(parents=True, exist_ok=True)
        scores = self._score_subsets(rows)
        written = []
        table = []
        for name, score in scores.items():
            before = [{"image_id": r["image_id"], **d} for r in rows if r["subset"] == name for d in r.get("parsed") or []]
            for suffix, payload in (
                ("coco_results", before),
                ("results", score.kept),
                ("stats", {"nms": score.nms.as_dict(), "plain": score.plain.as_dict(),
                           "nms_per_category": score.nms.per_category, "plain_per_category": score.plain.per_category,
                           "before_nms": score.before, "after_nms": score.after}),
            ):  # fmt: skip
                path = folder / f"{name}_{suffix}.json"
                path.write_text(json.dumps(payload, indent=2, ensure_ascii=False))
                written.append(path)
            aspect = next((a for a, members in ASPECTS.items() if name in members), "object")
            table.append({
                "subset": name, "aspect": aspect, "nms_ap": round(100 * max(score.nms.stats[0], 0.0), 2),
                "ap": round(100 * max(score.plain.stats[0], 0.0), 2), "images": sum(r["subset"] == name for r in rows),
                "boxes_before_nms": score.before, "boxes_after_nms": score.after,
            })  # fmt: skip
        table += self._average_rows(scores)
        table_path = Path(out_dir) / f"{self.name}_table.csv"
        with table_path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
        return [*written, table_path]

    def _average_rows(self, scores: dict[str, SubsetScore]) -> list[dict[str, Any]]:
        return []


@register_benchmark("ovdeval_all", schema=OVDEvalAllConfig)
class OVDEvalAll(OVDEval):
    """Several OVDEval subsets (all nine by default); ``limit`` applies per subset.

    Headline ``score``: the mean over the five non-COCO aspects of the aspect's mean NMS-AP (proper noun =
    mean of celebrity/logo/landmark, attribute = mean of color/material, then position, relationship,
    negation), as VLM-R1 reports it and as the paper's OmDet row is computed (reference §1.7). The paper's
    other rows average the nine subsets: ``nms_ap_avg9``.
    """

    def subset_names(self) -> list[str]:
        assert isinstance(self.cfg, OVDEvalAllConfig)
        return [s for s in OVDEVAL_SUBSETS if s in self.cfg.subsets]

    @staticmethod
    def averages(per_subset: dict[str, float]) -> dict[str, float]:
        """Aspect means and the 5-aspect / 9-subset averages over the subsets present."""
        out = {}
        for aspect, members in ASPECTS.items():
            present = [per_subset[m] for m in members if m in per_subset]
            if present:
                out[f"aspect/{aspect}"] = float(np.mean(present))
        aspects = [v for k, v in out.items()]
        if aspects:
            out["avg5"] = float(np.mean(aspects))
        if all(s in per_subset for s in OVDEVAL_SUBSETS):
            out["avg9"] = float(np.mean([per_subset[s] for s in OVDEVAL_SUBSETS]))
        return out

    def aggregate(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        scores = self._score_subsets(rows)
        nms = {name: max(s.nms.stats[0], 0.0) for name, s in scores.items()}
        plain = {name: max(s.plain.stats[0], 0.0) for name, s in scores.items()}
        metrics: dict[str, float] = {}
        metrics |= {f"nms_ap/{k}": v for k, v in nms.items()}
        metrics |= {f"ap/{k}": v for k, v in plain.items()}
        nms_avg, plain_avg = self.averages(nms), self.averages(plain)
        metrics |= {f"nms_ap/{k}": v for k, v in nms_avg.items() if k.startswith("aspect/")}
        for key in ("avg5", "avg9"):
            if key in nms_avg:
                metrics[f"nms_ap_{key}"] = nms_avg[key]
                metrics[f"ap_{key}"] = plain_avg[key]
        if "avg5" in nms_avg:
            metrics["score"] = nms_avg["avg5"]
        else:  # only coco selected
            metrics["score"] = float(np.mean(list(nms.values())))
        metrics["boxes_before_nms"] = float(sum(s.before for s in scores.values()))
        metrics["boxes_after_nms"] = float(sum(s.after for s in scores.values()))
        return metrics | self._counts(rows)

    def _average_rows(self, scores: dict[str, SubsetScore]) -> list[dict[str, Any]]:
        nms = self.averages({n: max(s.nms.stats[0], 0.0) for n, s in scores.items()})
        plain = self.averages({n: max(s.plain.stats[0], 0.0) for n, s in scores.items()})
        rows = []
        labels = {"avg5": "mean of the 5 non-coco aspects", "avg9": "mean of the 9 subsets"}
        for key in [k for k in nms if k.startswith("aspect/")] + ["avg5", "avg9"]:
            if key in nms:
                rows.append({
                    "subset": key, "aspect": labels.get(key, key.split("/")[-1]), "nms_ap": round(100 * nms[key], 2),
                    "ap": round(100 * plain[key], 2), "images": "", "boxes_before_nms": "", "boxes_after_nms": "",
                })  # fmt: skip
        return rows


# -- score-only command -------------------------------------------------------------------------------


def _score_command(args: argparse.Namespace) -> int:
    gt_path, results_path = Path(args.gt), Path(args.results)
    name = gt_path.name.split(".")[0]  # as the official script names its output
    dataset = read_json(gt_path, "--gt")
    check_ground_truth(dataset, gt_path)
    results = read_json(results_path, "--results")
    check_results_file(results, results_path)
    score = score_detections(dataset, results, args.iou_threshold, args.tie_order, args.fix_ann_id_zero)
    print(f"subset {name}: {len(results)} detections before NMS, {score.after} after")
    if score.unknown_image_ids:
        print(
            f"warning: {len(results) - score.before} detection(s) on {len(score.unknown_image_ids)} image id(s) not in "
            f"{gt_path.name} were left out (the official script stops here): {score.unknown_image_ids[:30]}",
            file=sys.stderr,
        )
    if not results or not score.before:
        print("warning: no detections to score: every AP is 0", file=sys.stderr)
    out_dir = Path(args.output_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    kept_path = out_dir / f"{name}_results.json"
    kept_path.write_text(json.dumps(score.kept, indent=2, ensure_ascii=False))
    stats_path = out_dir / f"{name}_stats.json"
    stats_path.write_text(json.dumps({"nms": score.nms.stats, "plain": score.plain.stats,
                                      "before_nms": score.before, "after_nms": score.after}, indent=2))  # fmt: skip
    print(f"post-NMS detections written to {kept_path}")
    print(score.nms.summary, end="")
    print(f"NMS-AP {100 * max(score.nms.stats[0], 0.0):.2f} | plain AP {100 * max(score.plain.stats[0], 0.0):.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmprune_exp.benchmarks.ovdeval", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    score = sub.add_parser("score", help="NMS-AP of a COCO results file, computed as the official eval.py")
    score.add_argument("--gt", "--gt-path", required=True, help="annotations/<subset>.json")
    score.add_argument("--results", "--result-path", required=True, help="COCO detection results (JSON list)")
    score.add_argument("--output-path", default="output", help="folder for <subset>_results.json (default: output)")
    score.add_argument("--iou-threshold", type=float, default=0.5)
    score.add_argument("--tie-order", default="numpy", choices=["numpy", "stable", "first"])
    score.add_argument("--fix-ann-id-zero", action="store_true", help="renumber annotation ids from 1")
    score.add_argument("--image-path", help=argparse.SUPPRESS)  # accepted for drop-in use; unused (as officially)
    score.add_argument("--num-threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        return _score_command(args)
    except UserError as err:  # bad input: one line, no traceback; anything else is a bug and keeps its traceback
        return report_user_error(err)

