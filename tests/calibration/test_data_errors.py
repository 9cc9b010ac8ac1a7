"""Bad calibration data fails at load time with one CalibrationError naming the file, the record and the key."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from mmprune_exp.calibration import CalibrationError, build_calibration, register_calibration
from mmprune_exp.calibration.base import CALIBRATION_SETS
from mmprune_exp.calibration.llava_json import LlavaJsonCalibrationConfig
from mmprune_exp.config.schema import CalibrationConfig
from mmprune_exp.errors import DataError, UserError


def turns(q="q", a="a"):
    return [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]


def llava(path, records, **kw):
    path.write_text(records if isinstance(records, str) else json.dumps(records))
    cfg = LlavaJsonCalibrationConfig(name="llava_json", path=str(path), nsamples=kw.pop("nsamples", 1), **kw)
    return build_calibration(cfg)


def test_errors_are_user_data_errors():
    assert issubclass(CalibrationError, DataError) and issubclass(CalibrationError, UserError)


@pytest.mark.parametrize("image", [7, [7], ["ok.png", None], {"path": "a.png"}, ""])
def test_llava_json_image_of_the_wrong_type_names_record_and_key(tmp_path, image):
    with pytest.raises(CalibrationError) as err:
        llava(tmp_path / "d.json", [{"id": "x", "image": image, "conversations": turns()}])
    assert str(err.value).startswith(f"{tmp_path / 'd.json'}, record 0 (id='x'), key 'image': expected an image path")


def test_llava_json_image_of_the_wrong_type_is_found_when_filtering_by_task(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "coco").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "coco" / "b.png")
    records = [
        {"id": "a", "image": "coco/b.png", "conversations": turns()},
        {"id": "b", "image": 7, "conversations": turns()},
    ]
    with pytest.raises(CalibrationError, match=re.escape("d.json, record 1 (id='b'), key 'image': expected")):
        llava(tmp_path / "d.json", records, task="coco")
    with pytest.raises(CalibrationError, match=re.escape("d.json, record 1: expected an object, got list")):
        llava(tmp_path / "d.json", [records[0], ["x"]], task="coco")


def test_llava_json_with_zero_usable_records(tmp_path):
    with pytest.raises(CalibrationError, match=re.escape(f"{tmp_path / 'd.json'}: no records (an empty list)")):
        llava(tmp_path / "d.json", [])
    (tmp_path / "coco").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "coco" / "b.png")
    with pytest.raises(CalibrationError) as err:
        llava(tmp_path / "d.json", [{"image": "coco/b.png", "conversations": turns()}], task="sharegpt4v")
    assert str(err.value) == (
        f"{tmp_path / 'd.json'}: no records with task='sharegpt4v' (the first folder of 'image'); "
        "the file's tasks: 'coco'"
    )


def test_llava_json_unreadable_image_and_bad_encoding(tmp_path):
    (tmp_path / "bad.png").write_text("not a png")
    with pytest.raises(CalibrationError, match=r"record 0 \(id=3\), key 'image': image .*bad.png cannot be read"):
        llava(tmp_path / "d.json", [{"id": 3, "image": "bad.png", "conversations": turns()}])
    (tmp_path / "d.json").write_bytes(b'[{"id": "\xff"}]')
    with pytest.raises(CalibrationError, match="d.json is not UTF-8 text"):
        build_calibration(LlavaJsonCalibrationConfig(name="llava_json", path=str(tmp_path / "d.json"), nsamples=1))


def test_llava_json_video_record_names_the_key(tmp_path):
    with pytest.raises(CalibrationError, match=re.escape("record 0 (id='v'), key 'video': video records")):
        llava(tmp_path / "d.json", [{"id": "v", "video": "a.mp4", "conversations": turns()}])


def test_text_file_with_zero_lines_or_bad_bytes(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("\n   \n")
    with pytest.raises(CalibrationError) as err:
        build_calibration(CalibrationConfig(name="text", path=str(path), nsamples=1))
    assert str(err.value) == f"{path}: no non-empty lines (the file is empty): nothing to calibrate on"
    path.write_bytes(b"fine\nbad \xff byte\n")
    with pytest.raises(CalibrationError, match=re.escape(f"{path}, line 2: not UTF-8 text")):
        build_calibration(CalibrationConfig(name="text", path=str(path), nsamples=1))
    with pytest.raises(CalibrationError, match="is not a file"):
        build_calibration(CalibrationConfig(name="text", path=str(tmp_path), nsamples=1))


def test_a_set_that_yields_nothing_is_an_error():
    name = "empty_for_test"
    register_calibration(name)(lambda cfg: [])
    try:
        with pytest.raises(CalibrationError, match="calibration 'empty_for_test' yielded no samples"):
            build_calibration(CalibrationConfig(name=name, nsamples=1))
    finally:
        CALIBRATION_SETS.pop(name, None)
