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
from pathlib import Path

import numpy as np
from PIL import Image

from mmprune_exp.calibration.base import CalibrationError, register_calibration
from mmprune_exp.config.schema import LlavaJsonCalibrationConfig
from mmprune_exp.models.base import Request

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _images_of(record: dict) -> list[str]:
    image = record.get("image")
    if image is None:
        return []
    return [image] if isinstance(image, str) else list(image)


def task_of(record: dict) -> str | None:
    images = _images_of(record)
    return Path(images[0]).parts[0] if images else None


def _record_to_request(record: dict, index: int, path: Path, image_root: Path, mode: str) -> Request:
    where = f"{path}, record {index} (id={record.get('id')!r})"
    turns = record.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2:
        raise CalibrationError(f"{where}: 'conversations' must be a list of at least one human and one gpt turn")
    texts = []
    for k, turn in enumerate(turns):
        if not isinstance(turn, dict) or _ROLES.get(turn.get("from")) is None or not isinstance(turn.get("value"), str):
            raise CalibrationError(f"{where}: turn {k} needs 'from' (human/gpt) and a string 'value', got {turn!r:.120}")
        expected = "user" if k % 2 == 0 else "assistant"
        if _ROLES[turn["from"]] != expected:
            raise CalibrationError(f"{where}: turn {k} is from {turn['from']!r}, expected a {expected} turn")
        texts.append(turn["value"].replace("<image>", "").strip())
    if "video" in record:
        raise CalibrationError(f"{where}: video records are not supported by calibration=llava_json")
    images = []
    for name in _images_of(record):
        file = image_root / name
        if not file.is_file():
            raise CalibrationError(f"{where}: image {file} does not exist (calibration.image_folder={image_root})")
        try:
            with Image.open(file) as img:
                images.append(img.convert("RGB"))
        except OSError as err:
            raise CalibrationError(f"{where}: image {file} cannot be read ({err})") from err
    if mode == "prompt":
        return Request(texts[0], images=images)
    pairs = list(zip(texts[0::2], texts[1::2]))
    return Request(texts[0], images=images, answer=texts[1], turns=pairs[1:])


@register_calibration("llava_json")
def llava_json_calibration(cfg: LlavaJsonCalibrationConfig) -> list[Request]:
    if not cfg.path:
        raise CalibrationError("calibration.path is not set: point it at a LLaVA-format conversation JSON")
    path = Path(cfg.path).expanduser()
    if not path.is_file():
        raise CalibrationError(f"calibration.path={str(path)!r} does not exist")
    try:
        records = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CalibrationError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(records, list):
        raise CalibrationError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    image_root = Path(cfg.image_folder).expanduser() if cfg.image_folder else path.parent
    pool = [i for i, r in enumerate(records) if cfg.task is None or (isinstance(r, dict) and task_of(r) == cfg.task)]
    if len(pool) < cfg.nsamples:
        which = f" with task={cfg.task!r}" if cfg.task else ""
        raise CalibrationError(f"calibration.nsamples={cfg.nsamples} but {path} has only {len(pool)} records{which}")
    chosen = np.random.RandomState(cfg.seed).choice(pool, size=cfg.nsamples, replace=False)
    requests = []
    for index in chosen.tolist():
        if not isinstance(records[index], dict):
            raise CalibrationError(f"{path}, record {index}: expected an object, got {type(records[index]).__name__}")
        requests.append(_record_to_request(records[index], index, path, image_root, cfg.mode))
    return requests
