"""Bad MATH-V / OVDEval data fails at load time with one DataError naming the file, the record and the key.

The score CLIs print such an error as one ``error:`` line on stderr and exit with USER_ERROR_EXIT (2),
never a traceback and never a score computed from nothing.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from mmprune_exp.benchmarks import build_benchmark
from mmprune_exp.benchmarks.base import Benchmark, BenchmarkDataError, Record
from mmprune_exp.benchmarks.image_files import LazyImageRequest, image_size
from mmprune_exp.benchmarks.mathv import MathVConfig, load_problems, read_response_lines
from mmprune_exp.benchmarks.ovdeval import OVDEvalConfig, check_ground_truth, check_results_file
from mmprune_exp.config.schema import BenchmarkConfig
from mmprune_exp.errors import USER_ERROR_EXIT, DataError

ROOT = Path(__file__).resolve().parents[2]
MATHV = ROOT / "tests" / "fixtures" / "mathv"
OVD = ROOT / "tests" / "fixtures" / "ovdeval"
MATHV_ROWS = [json.loads(line) for line in (MATHV / "data" / "test.jsonl").read_text().splitlines()]
GT = json.loads((OVD / "annotations" / "material.json").read_text())


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def mathv_dir(tmp_path: Path, rows: list) -> Path:
    """A MATH-V checkout with ``rows`` as data/test.jsonl and the fixture images."""
    (tmp_path / "data").mkdir(exist_ok=True)
    write_jsonl(tmp_path / "data" / "test.jsonl", rows)
    (tmp_path / "images").mkdir(exist_ok=True)
    for image in (MATHV / "images").iterdir():
        (tmp_path / "images" / image.name).write_bytes(image.read_bytes())
    return tmp_path


def ovd_dir(tmp_path: Path, dataset, images: bool = True) -> Path:
    (tmp_path / "annotations").mkdir(exist_ok=True)
    text = dataset if isinstance(dataset, str) else json.dumps(dataset)
    (tmp_path / "annotations" / "material.json").write_text(text)
    (tmp_path / "images" / "material").mkdir(parents=True, exist_ok=True)
    if images:
        for image in (OVD / "images" / "material").iterdir():
            (tmp_path / "images" / "material" / image.name).write_bytes(image.read_bytes())
    return tmp_path


def ovd(tmp_path: Path, dataset, **kw) -> Benchmark:
    return build_benchmark(OVDEvalConfig(subset="material", path=str(ovd_dir(tmp_path, dataset, **kw))))


# -- shared: Benchmark.records() ------------------------------------------------------------------


class Listed(Benchmark):
    name = "listed"

    def __init__(self, ids):
        super().__init__(BenchmarkConfig(name="shapes_vqa"))
        self.ids = ids

    def load_records(self, limit):
        return [Record(i, LazyImageRequest("q", []), None) for i in self.ids]

    def score(self, record, response):
        return {"score": 0.0, "parsed": None}

    def aggregate(self, rows):
        return {"score": 0.0}


def test_records_must_exist_and_have_unique_ids():
    assert [r.id for r in Listed(["a", "b"]).records()] == ["a", "b"]
    with pytest.raises(BenchmarkDataError, match="benchmark 'listed': no records to evaluate"):
        Listed([]).records()
    with pytest.raises(DataError, match=r"benchmark 'listed', record 2 \(id='a'\), key 'id': duplicate id, record 0"):
        Listed(["a", "b", "a"]).records()


# -- MATH-V data ----------------------------------------------------------------------------------


def test_mathv_empty_data_file_is_an_error(tmp_path):
    path = mathv_dir(tmp_path, [])
    with pytest.raises(BenchmarkDataError, match=r"data/test\.jsonl: no MATH-V records \(the file is empty\)"):
        build_benchmark(MathVConfig(path=str(path)))
    (path / "data" / "test.jsonl").write_text("\n  \n")
    with pytest.raises(BenchmarkDataError, match="no MATH-V records"):
        load_problems(path / "data" / "test.jsonl")


def test_mathv_duplicate_ids_name_both_records(tmp_path):
    rows = copy.deepcopy(MATHV_ROWS)
    rows[4]["id"] = "2"
    with pytest.raises(BenchmarkDataError) as err:
        build_benchmark(MathVConfig(path=str(mathv_dir(tmp_path, rows))))
    assert str(err.value) == (
        f"{tmp_path / 'data' / 'test.jsonl'}, record 4 (line 5) (id='2'), key 'id': duplicate id, record 1 (line 2) "
        "has the same one (ids must be unique: a later record would replace the earlier)"
    )


@pytest.mark.parametrize(
    "change,key,message",
    [
        ({"answer": None}, "answer", "missing"),
        ({"answer": ["C"]}, "answer", "expected a string, got list"),
        ({"level": "hard"}, "level", "expected an integer"),
        ({"subject": 3}, "subject", "expected a string, got int"),
        ({"options": "ABCDE"}, "options", "expected a list of strings"),
        ({"options": ["A", None]}, "options", "option 1 is NoneType"),
        ({"question": {"text": "?"}}, "question", "expected a string, got dict"),
        ({"image": 7}, "image", "expected a path string"),
    ],
)
def test_mathv_bad_fields_name_file_line_record_and_key(tmp_path, change, key, message):
    rows = copy.deepcopy(MATHV_ROWS)
    rows[2] |= change
    path = write_jsonl(tmp_path / "test.jsonl", rows)
    with pytest.raises(BenchmarkDataError) as err:
        load_problems(path)
    assert str(err.value).startswith(f"{path}:3, record 2 (id='3'), key {key!r}: ")
    assert message in str(err.value)


def test_mathv_record_that_is_not_an_object_or_not_json(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps(MATHV_ROWS[0]) + "\n" + json.dumps(["1", "q"]) + "\n")
    with pytest.raises(BenchmarkDataError, match=re.escape(f"{path}:2, record 1: expected a JSON object")):
        load_problems(path)
    path.write_text(json.dumps(MATHV_ROWS[0]) + "\n{oops\n")
    with pytest.raises(BenchmarkDataError, match=re.escape(f"{path}:2, record 1: not valid JSON")):
        load_problems(path)
    rows = copy.deepcopy(MATHV_ROWS)
    del rows[0]["id"]
    with pytest.raises(
        BenchmarkDataError, match=re.escape(f"{write_jsonl(path, rows)}:1, record 0, key 'id': missing")
    ):
        load_problems(path)


def test_mathv_all_images_missing_is_an_error_naming_the_image(tmp_path):
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "test.jsonl", MATHV_ROWS)
    with pytest.raises(BenchmarkDataError) as err:
        build_benchmark(MathVConfig(path=str(tmp_path)))
    message = str(err.value)
    assert "none of the 8 MATH-V problems has its image file" in message
    assert (
        f"{tmp_path / 'data' / 'test.jsonl'}:1, record 0 (id='1'), key 'image': 'images/1.jpg' is not a file" in message
    )


def test_mathv_partly_missing_images_warn_with_the_record(tmp_path, caplog):
    path = mathv_dir(tmp_path, MATHV_ROWS)
    (path / "images" / "4.jpg").unlink()
    bench = build_benchmark(MathVConfig(path=str(path)))
    assert bench.missing_images == ["4"]
    assert "test.jsonl:4, record 3 (id='4'), key 'image': 'images/4.jpg' is not a file" in caplog.text


def test_an_undecodable_image_names_the_file_and_the_record(tmp_path):
    path = mathv_dir(tmp_path, MATHV_ROWS)
    (path / "images" / "2.jpg").write_text("not a jpeg")
    record = build_benchmark(MathVConfig(path=str(path))).records()[1]
    with pytest.raises(DataError) as err:
        _ = record.request.images
    assert str(err.value).startswith(
        f"{path / 'data' / 'test.jsonl'}:2, record 1 (id='2'): image {path / 'images' / '2.jpg'} cannot be read"
    )
    with pytest.raises(DataError, match=re.escape(f"image {tmp_path / 'nope.png'} cannot be read")):
        image_size(tmp_path / "nope.png")


# -- MATH-V responses -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line,message",
    [
        (["1", "C"], "record 1: expected a JSON object"),
        ({"response": "C"}, "record 1, key 'id': missing"),
        ({"id": ["1"], "response": "C"}, "record 1, key 'id': expected a string, got list"),
        ({"id": "1"}, "record 1 (id='1'), key 'response': missing (use null for no answer)"),
        ({"id": "1", "response": 3}, "record 1 (id='1'), key 'response': expected a string or null, got int"),
    ],
)
def test_mathv_bad_response_lines(tmp_path, line, message):
    path = write_jsonl(tmp_path / "out.jsonl", [{"id": "2", "response": "B"}, line])
    with pytest.raises(DataError) as err:
        read_response_lines(path)
    assert str(err.value).startswith(f"{path}:2, {message}")


def test_mathv_empty_or_missing_responses(tmp_path):
    (tmp_path / "out.jsonl").write_text("\n")
    with pytest.raises(DataError, match=re.escape(f"--responses {tmp_path / 'out.jsonl'}: no lines to score")):
        read_response_lines(tmp_path / "out.jsonl")
    with pytest.raises(DataError, match=re.escape(f"--responses {tmp_path / 'nope.jsonl'}: no such file")):
        read_response_lines(tmp_path / "nope.jsonl")


# -- OVDEval ground truth -------------------------------------------------------------------------


def broken(edit) -> dict:
    dataset = copy.deepcopy(GT)
    edit(dataset)
    return dataset


def test_ovdeval_empty_or_sectionless_ground_truth(tmp_path):
    ann = tmp_path / "annotations" / "material.json"
    for key in ("images", "annotations", "categories"):
        with pytest.raises(BenchmarkDataError, match=re.escape(f"{ann}, key {key!r}: empty list (zero {key})")):
            ovd(tmp_path, GT | {key: []})
        with pytest.raises(BenchmarkDataError, match=re.escape(f"{ann}, key {key!r}: missing")):
            ovd(tmp_path, {k: v for k, v in GT.items() if k != key})
    with pytest.raises(BenchmarkDataError, match=re.escape(f"{ann}: expected a JSON object")):
        ovd(tmp_path, [])
    with pytest.raises(BenchmarkDataError, match=re.escape(f"{ann}: not valid JSON")):
        ovd(tmp_path, "")


@pytest.mark.parametrize(
    "edit,where,message",
    [
        (lambda d: d["annotations"][2].pop("bbox"), "(annotations), record 2 (id=2), key 'bbox'", "missing"),
        (
            lambda d: d["annotations"][3].pop("category_id"),
            "(annotations), record 3 (id=3), key 'category_id'",
            "missing",
        ),
        (lambda d: d["images"][1].pop("file_name"), "(images), record 1 (id=1), key 'file_name'", "missing"),
        (
            lambda d: d["annotations"][1].update(bbox=[1, 2, 3]),
            "(annotations), record 1 (id=1), key 'bbox'",
            "expected [x, y, w, h] (four numbers), got list [1, 2, 3]",
        ),
        (
            lambda d: d["annotations"][1].update(bbox=[1, 2, -3, 4]),
            "(annotations), record 1 (id=1), key 'bbox'",
            "negative width or height",
        ),
        (
            lambda d: d["annotations"][0].update(image_id=42),
            "(annotations), record 0 (id=0), key 'image_id'",
            "image id 42 is not in 'images'",
        ),
        (
            lambda d: d["annotations"][0].update(category_id="0"),
            "(annotations), record 0 (id=0), key 'category_id'",
            "expected an integer, got str '0'",
        ),
        (lambda d: d["annotations"][4].pop("area"), "(annotations), record 4 (id=4), key 'area'", "missing"),
        (lambda d: d["annotations"][4].pop("iscrowd"), "(annotations), record 4 (id=4), key 'iscrowd'", "missing"),
        (lambda d: d["annotations"].__setitem__(1, "x"), "(annotations), record 1", "expected a JSON object"),
        (
            lambda d: d["images"][2].update(width="120"),
            "(images), record 2 (id=2), key 'width'",
            "expected a positive number of pixels, got str '120'",
        ),
        (
            lambda d: d["images"][0].update(text="wooden chair"),
            "(images), record 0 (id=0), key 'text'",
            "expected a list of label strings",
        ),
        (lambda d: d["categories"][1].pop("name"), "(categories), record 1 (id=1), key 'name'", "missing"),
        # duplicates: the later record names the earlier one
        (
            lambda d: d["images"][3].update(id=1),
            "(images), record 3 (id=1), key 'id'",
            "duplicate id, record 1 has the same one",
        ),
        (
            lambda d: d["images"][3].update(file_name="fx0.jpg"),
            "(images), record 3 (id=3), key 'file_name'",
            "duplicate file name 'fx0.jpg', record 0 has the same one",
        ),
        (
            lambda d: d["annotations"][4].update(id=0),
            "(annotations), record 4 (id=0), key 'id'",
            "duplicate id, record 0 has the same one",
        ),
        (
            lambda d: d["categories"][2].update(id=0),
            "(categories), record 2 (id=0), key 'id'",
            "duplicate id, record 0 has the same one",
        ),
        (
            lambda d: d["categories"][2].update(name="wooden chair"),
            "(categories), record 2 (id=2), key 'name'",
            "duplicate name 'wooden chair', record 0 has the same one",
        ),
    ],
)
def test_ovdeval_malformed_ground_truth(tmp_path, edit, where, message):
    ann = tmp_path / "annotations" / "material.json"
    with pytest.raises(BenchmarkDataError) as err:
        ovd(tmp_path, broken(edit))
    assert str(err.value).startswith(f"{ann} {where}: {message}")
    check_ground_truth(GT, "gt.json")  # the fixture itself passes


def test_ovdeval_image_without_labels_to_prompt_with(tmp_path):
    dataset = broken(lambda d: [d["images"][1].pop(key) for key in ("text", "neg_text")])
    with pytest.raises(BenchmarkDataError, match=re.escape("(images), record 1 (id=1), key 'text': no labels")):
        ovd(tmp_path, dataset)


def test_ovdeval_no_image_files_is_an_error_naming_the_first(tmp_path):
    with pytest.raises(BenchmarkDataError) as err:
        ovd(tmp_path, GT, images=False)
    ann = tmp_path / "annotations" / "material.json"
    assert str(err.value).startswith(
        f"{ann} (images), record 0 (id=0), key 'file_name': {tmp_path / 'images' / 'material' / 'fx0.jpg'} does not "
        "exist, nor does the file of any of the 4 images"
    )


def test_ovdeval_missing_image_warning_names_the_file_and_record(tmp_path, caplog):
    path = ovd_dir(tmp_path, GT)
    (path / "images" / "material" / "fx1.jpg").unlink()
    build_benchmark(OVDEvalConfig(subset="material", path=str(path)))
    assert "(images), record 1 (id=1), key 'file_name': " in caplog.text
    assert str(path / "images" / "material" / "fx1.jpg") + " does not exist" in caplog.text


def test_ovdeval_undecodable_image_without_size_names_record(tmp_path):
    dataset = broken(lambda d: [img.pop("width") for img in d["images"]])
    path = ovd_dir(tmp_path, dataset)
    Image.new("RGB", (4, 4)).save(path / "images" / "material" / "fx0.jpg")
    (path / "images" / "material" / "fx2.jpg").write_text("broken")
    bench = build_benchmark(OVDEvalConfig(subset="material", path=str(path)))
    with pytest.raises(DataError, match=re.escape("material.json (images), record 2 (id=2): image ")):
        bench.records()


@pytest.mark.parametrize(
    "results,message",
    [
        ({"image_id": 0}, ": the results file must hold a JSON list of detections, got dict"),
        (
            [{"image_id": 0, "category_id": 0, "bbox": [1, 2, 3, 4], "score": 1}, [0, 0, [1, 2, 3, 4], 1]],
            ", detection 1: expected a JSON object, got list",
        ),
        (
            [{"image_id": "0", "category_id": 0, "bbox": [1, 2, 3, 4], "score": 1}],
            ", detection 0, key 'image_id': expected an integer, got str '0'",
        ),
        ([{"image_id": 0, "category_id": 0, "bbox": [1, 2, 3, 4]}], ", detection 0, key 'score': missing"),
        (
            [{"image_id": 0, "category_id": 0, "bbox": [1, 2, 3, 4], "score": "high"}],
            ", detection 0, key 'score': expected a number",
        ),
    ],
)
def test_ovdeval_bad_results(results, message):
    with pytest.raises(DataError) as err:
        check_results_file(results, "r.json")
    assert str(err.value).startswith("r.json" + message)


# -- the score CLIs: one error line, exit code 2 ----------------------------------------------------


def run_cli(module: str, *args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", f"mmprune_exp.benchmarks.{module}", "score", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


def assert_one_error_line(proc: subprocess.CompletedProcess, *parts: str) -> str:
    assert proc.returncode == USER_ERROR_EXIT, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for part in parts:
        assert part in lines[0]
    return lines[0]


def test_mathv_cli_user_errors(tmp_path):
    data = MATHV / "data" / "test.jsonl"
    line = assert_one_error_line(run_cli("mathv", "--data", data, "--responses", tmp_path / "nope.jsonl"),
                                 str(tmp_path / "nope.jsonl"), "no such file")  # fmt: skip
    assert line == f"error: --responses {tmp_path / 'nope.jsonl'}: no such file"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "1", "response": "C"}, ["2", "B"]])
    line = assert_one_error_line(run_cli("mathv", "--data", data, "--responses", bad), f"{bad}:2, record 1")
    assert line == f'error: {bad}:2, record 1: expected a JSON object {{"id": ..., "response": ...}}, got list'
    no_id = write_jsonl(tmp_path / "no_id.jsonl", [{"response": "C"}])
    assert_one_error_line(run_cli("mathv", "--data", data, "--responses", no_id), f"{no_id}:1, record 0, key 'id'")
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    assert_one_error_line(run_cli("mathv", "--data", data, "--responses", empty), "no lines to score")
    assert_one_error_line(run_cli("mathv", "--data", tmp_path / "x", "--responses", bad), "--data=", "does not exist")
    bad_data = write_jsonl(tmp_path / "test.jsonl", MATHV_ROWS[:2] + [MATHV_ROWS[0]])
    assert_one_error_line(run_cli("mathv", "--data", bad_data, "--responses", bad), f"{bad_data}, record 2 (line 3)",
                          "(id='1'), key 'id': duplicate id, record 0 (line 1)")  # fmt: skip
    empty_data = write_jsonl(tmp_path / "empty_data.jsonl", [])
    assert_one_error_line(
        run_cli("mathv", "--data", empty_data, "--responses", bad), f"{empty_data}: no MATH-V records"
    )


def test_ovdeval_cli_user_errors(tmp_path):
    gt, results = OVD / "annotations" / "material.json", OVD / "predictions" / "p1_perfect.json"
    assert_one_error_line(run_cli("ovdeval", "--gt", tmp_path / "nope.json", "--results", results,
                                  "--output-path", tmp_path), f"--gt {tmp_path / 'nope.json'}: no such file")  # fmt: skip
    assert_one_error_line(run_cli("ovdeval", "--gt", gt, "--results", tmp_path / "nope.json",
                                  "--output-path", tmp_path), f"--results {tmp_path / 'nope.json'}: no such file")  # fmt: skip
    no_images = tmp_path / "material.json"
    no_images.write_text(json.dumps({k: v for k, v in GT.items() if k != "images"}))
    line = assert_one_error_line(run_cli("ovdeval", "--gt", no_images, "--results", results, "--output-path", tmp_path))
    assert line == f"error: {no_images}, key 'images': missing: not an OVDEval/COCO annotation file"
    no_bbox = tmp_path / "material2.json"
    no_bbox.write_text(json.dumps(broken(lambda d: d["annotations"][1].pop("bbox"))))
    assert_one_error_line(run_cli("ovdeval", "--gt", no_bbox, "--results", results, "--output-path", tmp_path),
                          f"{no_bbox} (annotations), record 1 (id=1), key 'bbox': missing")  # fmt: skip
    listed = tmp_path / "listed.json"
    listed.write_text(json.dumps([[0, 0, [1, 2, 3, 4], 1.0]]))
    assert_one_error_line(run_cli("ovdeval", "--gt", gt, "--results", listed, "--output-path", tmp_path),
                          f"{listed}, detection 0: expected a JSON object, got list")  # fmt: skip
    assert not list(tmp_path.glob("*_results.json"))  # nothing was scored
