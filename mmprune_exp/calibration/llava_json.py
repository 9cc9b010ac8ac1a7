"""LLaVA-format conversation JSON + an image folder (LLaVA-NeXT-Data, ShareGPT4V, LLaVA-Instruct).

A record looks like ``{"id": ..., "image": "coco/train2017/0001.jpg", "conversations": [{"from": "human",
"value": "<image>\\nWhat is ...?"}, {"from": "gpt", "value": "..."}, ...]}``; ``image`` may also be a list.

Sampling follows TAMP's loader (``llava/pruners/data_loader.py``): optionally keep only the records of one
task, where the task is the first path component of ``image`` (``sharegpt4v/...``), then draw ``nsamples``
indices without replacement with NumPy's legacy RNG seeded by ``seed``. ``mode=conversation`` feeds the
whole multi-turn conversation (TAMP's choice), ``mode=prompt`` only the first user turn.

Every selected record is checked (structure, roles, image files) before any model work starts; an error
names the file and the record index.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mmprune_exp.calibration.base import CalibrationError, register_calibration
from mmprune_exp.config.schema import CalibrationConfig, require
from mmprune_exp.errors import where
from mmprune_exp.models.base import Request


@dataclass
class LlavaJsonCalibrationConfig(CalibrationConfig):
    """LLaVA-format conversation JSON (``path``) with images under ``image_folder``."""

    image_folder: str | None = None  # default: the JSON file's folder
    task: str | None = None  # keep records whose image path starts with this folder (TAMP's task split)
    mode: str = "conversation"  # conversation (all turns, with answers) | prompt (first user turn only)

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.mode in ("conversation", "prompt"), "mode", f"got {self.mode!r}; use conversation or prompt")


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _images_of(record: dict, at: str = "record") -> list[str]:
    """The record's image paths (``image``: one path or a list of them); ``at`` locates it in errors."""
    image = record.get("image")
    if image is None:
        return []
    images = [image] if isinstance(image, str) else image
    if not isinstance(images, list) or not all(isinstance(name, str) and name.strip() for name in images):
        raise CalibrationError(
            f"{at}, key 'image': expected an image path (string) or a list of them, got "
            f"{type(image).__name__} {image!r:.80}"
        )
    return images


def task_of(record: dict, at: str = "record") -> str | None:
    images = _images_of(record, at)
    return Path(images[0]).parts[0] if images else None


def _record_to_request(record: dict, index: int, path: Path, image_root: Path, mode: str) -> Request:
    at = _where(path, index, record)
    turns = record.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2:
        raise CalibrationError(f"{at}, key 'conversations': must be a list of at least one human and one gpt turn, "
                               f"got {type(turns).__name__} {turns!r:.80}")  # fmt: skip
    texts = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or _ROLES.get(turn.get("from")) is None or not isinstance(turn.get("value"), str):
            raise CalibrationError(f"{at}, key 'conversations': turn {k} needs 'from' (human/gpt) and a string "
                                   f"'value', got {turn!r:.120}")  # fmt: skip
        expected = "user" if k % 2 == 0 else "assistant"
        if _ROLES[turn["from"]] != expected:
            raise CalibrationError(
                f"{at}, key 'conversations': turn {k} is from {turn['from']!r}, expected a {expected} turn"
            )
        texts.append(turn["value"].replace("<image>", "").strip())
    if "video" in record:
        raise CalibrationError(f"{at}, key 'video': video records are not supported by calibration=llava_json")
    images = []
    for name in _images_of(record, at):
        file = image_root / name
        if not file.is_file():
            raise CalibrationError(
                f"{at}, key 'image': image {file} does not exist (calibration.image_folder={image_root})"
            )
        try:
            with Image.open(file) as img:
                images.append(img.convert("RGB"))
        except OSError as err:
            raise CalibrationError(f"{at}, key 'image': image {file} cannot be read ({err})") from err
    if mode == "prompt":
        return Request(texts[0], images=images)
    pairs = list(zip(texts[0::2], texts[1::2]))
    return Request(texts[0], images=images, answer=texts[1], turns=pairs[1:])


def _where(path: Path, index: int, record) -> str:
    rid = record.get("id") if isinstance(record, dict) else None
    return where(path, index, rid if isinstance(rid, (str, int)) else None)


def _record(records: list, index: int, path: Path) -> dict:
    record = records[index]
    if not isinstance(record, dict):
        raise CalibrationError(f"{where(path, index)}: expected an object, got {type(record).__name__}")
    return record


@register_calibration("llava_json", schema=LlavaJsonCalibrationConfig)
def llava_json_calibration(cfg: LlavaJsonCalibrationConfig) -> list[Request]:
    if not cfg.path:
        raise CalibrationError("calibration.path is not set: point it at a LLaVA-format conversation JSON")
    path = Path(cfg.path).expanduser()
    if not path.is_file():
        raise CalibrationError(f"calibration.path={str(path)!r} does not exist")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise CalibrationError(f"{path} is not valid JSON: {err}") from err
    except UnicodeDecodeError as err:
        raise CalibrationError(f"{path} is not UTF-8 text: {err}") from err
    if not isinstance(records, list):
        raise CalibrationError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    if not records:
        raise CalibrationError(f"{path}: no records (an empty list): nothing to calibrate on")
    image_root = Path(cfg.image_folder).expanduser() if cfg.image_folder else path.parent
    if cfg.task is None:
        pool = list(range(len(records)))
    else:  # the task is read from every record's image, so each one is checked here
        pool = [i for i, r in enumerate(records) if task_of(_record(records, i, path), _where(path, i, r)) == cfg.task]
        if not pool:
            tasks = sorted({t for r in records if (t := task_of(r)) is not None})
            raise CalibrationError(
                f"{path}: no records with task={cfg.task!r} (the first folder of 'image'); the file's tasks: "
                f"{', '.join(map(repr, tasks[:20])) or 'none (no record has an image)'}"
            )
    if len(pool) < cfg.nsamples:
        which = f" with task={cfg.task!r}" if cfg.task else ""
        raise CalibrationError(f"calibration.nsamples={cfg.nsamples} but {path} has only {len(pool)} records{which}")
    chosen = np.random.RandomState(cfg.seed).choice(pool, size=cfg.nsamples, replace=False)
    requests = []
    for index in chosen.tolist():
        requests.append(_record_to_request(_record(records, index, path), index, path, image_root, cfg.mode))
    return requests
