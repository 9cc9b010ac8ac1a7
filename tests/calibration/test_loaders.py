"""Calibration loaders on small files made here: selection, conversation rendering, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mmprune_exp.calibration import CalibrationError, build_calibration
from mmprune_exp.calibration.llava_json import LlavaJsonCalibrationConfig
from mmprune_exp.config.schema import CalibrationConfig


def conv(q, a, more=()):
    turns = [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]
    for q2, a2 in more:
        turns += [{"from": "human", "value": q2}, {"from": "gpt", "value": a2}]
    return turns


@pytest.fixture
def llava_dir(tmp_path):
    for task in ("sharegpt4v", "coco"):
        (tmp_path / task).mkdir()
    records = []
    for i in range(6):
        task = "sharegpt4v" if i % 2 == 0 else "coco"
        Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(tmp_path / task / f"{i}.png")
        records.append({"id": f"r{i}", "image": f"{task}/{i}.png", "conversations": conv(f"q{i}", f"a{i}", [(f"q{i}b", f"a{i}b")])})
    (tmp_path / "data.json").write_text(json.dumps(records))
    return tmp_path


def cfg(path, **kw):
    return LlavaJsonCalibrationConfig(name="llava_json", path=str(path), nsamples=kw.pop("nsamples", 3), **kw)


def test_llava_json_selects_like_tamp_and_keeps_whole_conversations(llava_dir):
    data = build_calibration(cfg(llava_dir / "data.json", task="sharegpt4v", seed=42))
    assert data.name == "llava_json" and len(data.requests) == 3
    pool = [0, 2, 4]  # records of task sharegpt4v
    expected = np.random.RandomState(42).choice(pool, size=3, replace=False).tolist()
    assert [r.text for r in data.requests] == [f"q{i}" for i in expected]
    first = data.requests[0]
    assert first.answer == f"a{expected[0]}" and first.turns == [(f"q{expected[0]}b", f"a{expected[0]}b")]
    assert len(first.images) == 1 and first.images[0].size == (32, 32)
    prompt_only = build_calibration(cfg(llava_dir / "data.json", task="sharegpt4v", seed=42, mode="prompt"))
    assert all(r.answer is None and not r.turns for r in prompt_only.requests)


def test_llava_json_missing_image_names_file_and_record(llava_dir):
    (llava_dir / "coco" / "1.png").unlink()
    with pytest.raises(CalibrationError, match=r"record 1 \(id='r1'\), key 'image': image .*coco/1.png does not exist"):
        build_calibration(cfg(llava_dir / "data.json", nsamples=6))


@pytest.mark.parametrize(
    "record,message",
    [
        ({"id": "x", "conversations": "hi"}, "key 'conversations': must be a list"),
        ({"id": "x", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]}, "turn 0 is from 'gpt'"),
        ({"id": "x", "conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]}, "turn 0 needs 'from'"),
    ],
)
def test_llava_json_malformed_records(tmp_path, record, message):
    (tmp_path / "d.json").write_text(json.dumps([record]))
    with pytest.raises(CalibrationError, match=f"d.json, record 0 .*{message}"):
        build_calibration(cfg(tmp_path / "d.json", nsamples=1))


def test_llava_json_too_few_records_and_missing_file(llava_dir):
    with pytest.raises(CalibrationError, match="nsamples=5 but .* only 3 records with task='coco'"):
        build_calibration(cfg(llava_dir / "data.json", task="coco", nsamples=5))
    with pytest.raises(CalibrationError, match="does not exist"):
        build_calibration(cfg(llava_dir / "nope.json"))


def test_text_lines_are_raw_samples(tmp_path):
    (tmp_path / "t.txt").write_text("first line\n\nsecond line\nthird line\n")
    data = build_calibration(CalibrationConfig(name="text", path=str(tmp_path / "t.txt"), nsamples=3, seed=0))
    assert sorted(r.text for r in data.requests) == ["first line", "second line", "third line"]
    assert all(r.raw and not r.images for r in data.requests)
    with pytest.raises(CalibrationError, match="only 3 non-empty lines"):
        build_calibration(CalibrationConfig(name="text", path=str(tmp_path / "t.txt"), nsamples=4))


def test_text_and_llava_requests_reach_layer_zero(random_tiny, llava_dir, tmp_path):
    from mmprune_exp.pruners.engine import collect_layer_inputs

    (tmp_path / "t.txt").write_text("a plain sentence about shapes\n")
    text = build_calibration(CalibrationConfig(name="text", path=str(tmp_path / "t.txt"), nsamples=1))
    llava = build_calibration(cfg(llava_dir / "data.json", nsamples=2))
    inputs = collect_layer_inputs(random_tiny, text.requests + llava.requests, max_length=512)
    assert int(inputs[0].visual.sum()) == 0
    assert all(int(x.visual.sum()) > 0 for x in inputs[1:])
