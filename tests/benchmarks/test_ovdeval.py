"""OVDEval: NMS-AP against the official eval.py's recorded outputs, the two hazards and their flags, crash
cases, answer parsing and rescaling, the score-only command, and benchmark runs through the runner.

``tests/fixtures/ovdeval/expected/<scenario>.json`` holds what om-ai-lab/OVDEval ``eval.py`` (2ba0aa9,
pycocotools 2.0.11, numpy 2.4.6) did with ``predictions/<scenario>.json``: exit code, post-NMS results,
and full-precision COCOeval stats of its post-NMS output and of the raw results
(``tests/fixtures/record_official.py``).

Where several different detections on one object share the top score, the official output depends on the
order numpy's default (unstable) argsort gives equal keys, which differs between numpy's sort kernels
(AVX-512, AVX2, scalar) and so between machines, even for all-equal scores. Such recordings are machine
facts: the tests check that ``tie_order="stable"`` (the same everywhere) reproduces them, and that
``tie_order="numpy"`` does what the official call does on the machine running the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from mmprune_exp.benchmarks import build_benchmark
from mmprune_exp.benchmarks.base import BenchmarkDataError
from mmprune_exp.benchmarks.ovdeval import PROMPT, OVDEvalAllConfig, OVDEvalConfig, main
from mmprune_exp.benchmarks.ovdeval.nms_ap import coco_eval, iou_xywh, score_detections, suppress_on_gt
from mmprune_exp.evaluation import evaluate
from tests.conftest import ROOT

FIXTURES = ROOT / "tests" / "fixtures" / "ovdeval"
GT = json.loads((FIXTURES / "annotations" / "material.json").read_text())
SCENARIOS = sorted(p.stem for p in (FIXTURES / "predictions").glob("*.json"))


def predictions(name: str) -> list[dict]:
    return json.loads((FIXTURES / "predictions" / f"{name}.json").read_text())


def official(name: str) -> dict:
    return json.loads((FIXTURES / "expected" / f"{name}.json").read_text())


# -- the official computation, reproduced -----------------------------------------------------------


def tied_at_the_top(gt: dict, results: list[dict]) -> bool:
    """Whether some object has two different detections sharing the best score among those over it (then
    which one survives is up to the argsort's tie order). Exact duplicates do not count: either one kept
    gives the same output."""
    for image in gt["images"]:
        dets = [d for d in results if d["image_id"] == image["id"]]
        for ann in (a for a in gt["annotations"] if a["image_id"] == image["id"]):
            over = [d for d in dets if iou_xywh(np.array(ann["bbox"]), np.array([d["bbox"]]))[0] > 0.5]
            best = [d for d in over if d["score"] == max(o["score"] for o in over)]
            if any(d != best[0] for d in best):
                return True
    return False


def official_nms_here(gt: dict, results: list[dict]) -> list[dict]:
    """eval.py's suppression restated loop by loop, with its own ``np.argsort(...)[::-1]`` on the scores as
    it builds them: what the official script outputs on this machine."""
    out = []
    for image_id in dict.fromkeys(d["image_id"] for d in results):
        dets = [d for d in results if d["image_id"] == image_id]
        keep, remove = [], []
        for ann in (a for a in gt["annotations"] if a["image_id"] == image_id):
            over = [i for i, d in enumerate(dets) if iou_xywh(np.array(ann["bbox"]), np.array([d["bbox"]]))[0] > 0.5]
            if over:
                order = np.argsort(np.array([dets[i]["score"] for i in over]))[::-1]
                keep.append(over[order[0]])
                remove += [over[j] for j in order[1:]]
        out += [d for i, d in enumerate(dets) if i not in remove or i in keep]
    return out


@pytest.mark.parametrize("name", [s for s in SCENARIOS if official(s)["returncode"] == 0])
def test_nms_ap_equals_the_official_script(name):
    expected = official(name)
    if tied_at_the_top(GT, predictions(name)):  # recorded on one machine: reproduced by the stable order
        score = score_detections(GT, predictions(name), tie_order="stable")
    else:  # no tie decides anything: the faithful default must give exactly the recording
        score = score_detections(GT, predictions(name))
    assert score.kept == expected["after_nms"]  # same detections, same order
    assert score.nms.stats == pytest.approx(expected["stats_nms"], abs=1e-12)
    assert score.plain.stats == pytest.approx(expected["stats_plain"], abs=1e-12)


@pytest.mark.parametrize("name", [s for s in SCENARIOS if official(s)["returncode"] == 0])
def test_numpy_tie_order_is_the_official_call_on_this_machine(name):
    here = official_nms_here(GT, predictions(name))
    score = score_detections(GT, predictions(name), tie_order="numpy")
    assert score.kept == here
    assert score.nms.stats == pytest.approx(coco_eval(GT, here).stats, abs=1e-12)


def test_fixtures_cover_both_kinds():
    tied = {name for name in SCENARIOS if tied_at_the_top(GT, predictions(name))}
    assert tied == {"p3a_score1_pos_first", "p3b_score1_neg_first", "p7_mixed_ties"}  # p4's duplicates: identical


def test_hand_cases_values():
    """The numbers of the hand cases (see make_fixtures.py for what each one holds)."""
    ap = {name: score_detections(GT, predictions(name)).nms.stats[0] for name in SCENARIOS}
    plain = {name: score_detections(GT, predictions(name)).plain.stats[0] for name in SCENARIOS}
    assert ap["p1_perfect"] == pytest.approx(0.75)  # < 1 only because annotation id 0 cannot match
    assert ap["p2_inflated"] == pytest.approx(0.5)  # every label on every box: the wrong one wins on image 0
    # all scores 1.0: which label survives is the tie order's choice; the recording's is the stable order's
    stable = {name: score_detections(GT, predictions(name), tie_order="stable").nms.stats[0] for name in SCENARIOS}
    assert stable["p3a_score1_pos_first"] == 0.0 and stable["p3b_score1_neg_first"] == pytest.approx(0.75)
    assert plain["p3a_score1_pos_first"] == plain["p3b_score1_neg_first"] == pytest.approx(0.625)
    assert ap["p4_edges"] == pytest.approx(0.13861386, abs=1e-7)
    assert ap["p5_empty"] == 0.0


def test_iou_has_no_clipping_and_no_plus_one():
    gt = np.array([20, 30, 60, 80])
    boxes = np.array([[-10, 20, 100, 100], [0, 20, 90, 100], [100, 40, 0, 60], [20, 30, 60, 80], [0, 0, 0, 0]])
    iou = iou_xywh(gt, boxes)
    assert iou[0] == pytest.approx(0.48)  # out of bounds: a miss at 0.5 ...
    assert iou[1] == pytest.approx(4800 / 9000)  # ... that clipping would have turned into a hit
    assert iou[2] == 0.0 and iou[3] == 1.0
    assert iou_xywh(np.array([5, 5, 0, 0]), np.array([[5, 5, 0, 0]]))[0] == 0.0  # union 0 -> 0


def test_suppression_keeps_the_best_per_object_and_never_touches_boxes_off_objects():
    gts = [[0, 0, 10, 10]]
    preds = [[0, 0, 10, 10], [0, 0, 10, 9], [50, 50, 10, 10], [50, 50, 10, 10]]
    assert suppress_on_gt(gts, preds, [0.5, 0.9, 0.3, 0.3]) == [1, 2, 3]
    assert suppress_on_gt([], preds, [0.5, 0.9, 0.3, 0.3]) == [0, 1, 2, 3]  # an image without objects
    # kept for one object wins over removed for another: B (IoU 0.54 with both objects) loses the first to A
    # but is the only candidate on the second
    two = [[0, 0, 10, 10], [6, 0, 10, 10]]
    assert suppress_on_gt(two, [[0, 0, 10, 10], [3, 0, 10, 10]], [0.9, 0.8]) == [0, 1]
    assert suppress_on_gt(two[:1], [[0, 0, 10, 10], [3, 0, 10, 10]], [0.9, 0.8]) == [0]


def test_tie_order_flag_all_scores_equal():
    """All-equal scores (every VLM box is 1.0): on the recording machine numpy's default argsort returned
    the identity, reversed by the official [::-1], so the last-listed box was kept. numpy does not promise
    that (its scalar introsort reorders equal keys from 17 elements on, and the SIMD kernels differ), so
    ``numpy`` is only checked against numpy here; ``stable`` keeps the last everywhere, ``first`` the first."""
    gts, preds, scores = [[0, 0, 10, 10]], [[0, 0, 10, 10]] * 3, [1.0, 1.0, 1.0]
    assert suppress_on_gt(gts, preds, scores, tie_order="numpy") == [int(np.argsort(np.array(scores))[::-1][0])]
    assert suppress_on_gt(gts, preds, scores, tie_order="stable") == [2]
    assert suppress_on_gt(gts, preds, scores, tie_order="first") == [0]
    for name, first in [("p3a_score1_pos_first", 0.75), ("p3b_score1_neg_first", 0.0)]:
        assert score_detections(GT, predictions(name), tie_order="first").nms.stats[0] == pytest.approx(first)


def test_tie_order_hazard_with_mixed_ties():
    """Mixed ties: numpy's default sort is not stable (the order depends on its sort kernel and the CPU);
    ``numpy`` reproduces the official call on this machine, ``stable`` is the same everywhere."""
    scores = np.array([1, 0.5, 1, 1, 0.5, 1, 1, 0.5])
    assert np.argsort(scores, kind="stable")[::-1].tolist() == [6, 5, 3, 2, 0, 7, 4, 1]
    preds = [[0, 0, 10, 10]] * 8
    kept = suppress_on_gt([[0, 0, 10, 10]], preds, scores.tolist(), tie_order="numpy")
    assert kept == [int(np.argsort(scores)[::-1][0])] and kept[0] in (0, 2, 3, 5, 6)  # one of the 1.0s
    assert suppress_on_gt([[0, 0, 10, 10]], preds, scores.tolist(), tie_order="stable") == [6]
    assert suppress_on_gt([[0, 0, 10, 10]], preds, scores.tolist(), tie_order="first") == [0]


def test_annotation_id_zero_flag():
    """pycocotools stores the matched ground truth's id and reads 0 as "unmatched": the object with
    annotation id 0 (OVDEval's files start there) is a miss even for a perfect box, and that box an FP."""
    perfect = predictions("p1_perfect")
    faithful = score_detections(GT, perfect)
    fixed = score_detections(GT, perfect, fix_ann_id_zero=True)
    assert faithful.nms.stats[0] == pytest.approx(0.75) and faithful.nms.per_category[0] == 0.0
    assert fixed.nms.stats[0] == pytest.approx(1.0)
    shifted = json.loads(json.dumps(GT))
    for ann in shifted["annotations"]:
        ann["id"] += 1
    assert score_detections(shifted, perfect).nms.stats == fixed.nms.stats  # same as ids starting at 1
    assert GT["annotations"][0]["id"] == 0  # the flag did not touch the caller's data


def test_official_crash_cases_give_clear_results():
    assert official("p5_empty")["returncode"] == 1 and official("p6_unknown_image")["returncode"] == 1
    empty = score_detections(GT, [])
    assert empty.nms.stats[:3] == [0.0, 0.0, 0.0] and empty.before == empty.after == 0
    unknown = score_detections(GT, predictions("p6_unknown_image"))
    assert unknown.unknown_image_ids == [99] and unknown.before == 1
    assert unknown.nms.stats == coco_eval(GT, predictions("p6_unknown_image")[:1]).stats


# -- score-only command -----------------------------------------------------------------------------


@pytest.mark.parametrize("flags", [["--gt", "--results"], ["--gt-path", "--result-path"]])
def test_score_command_prints_stats_and_writes_post_nms_results(tmp_path, capsys, flags):
    args = ["score", flags[0], str(FIXTURES / "annotations" / "material.json"), flags[1],
            str(FIXTURES / "predictions" / "p4_edges.json"), "--output-path", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert sum(line.startswith((" Average Precision", " Average Recall")) for line in out.splitlines()) == 12
    assert "7 detections before NMS, 5 after" in out
    assert json.loads((tmp_path / "material_results.json").read_text()) == official("p4_edges")["after_nms"]
    stats = json.loads((tmp_path / "material_stats.json").read_text())
    assert stats["nms"] == pytest.approx(official("p4_edges")["stats_nms"], abs=1e-12)


@pytest.mark.parametrize("name,message", [("p5_empty", "no detections"), ("p6_unknown_image", "not in material.json")])
def test_score_command_on_the_official_crash_cases(tmp_path, capsys, name, message):
    args = ["score", "--gt", str(FIXTURES / "annotations" / "material.json"), "--results",
            str(FIXTURES / "predictions" / f"{name}.json"), "--output-path", str(tmp_path)]  # fmt: skip
    assert main(args) == 0
    assert message in capsys.readouterr().err


def test_score_command_rejects_a_malformed_results_file(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image_id": 0, "bbox": [1, 2, 3]}]))
    assert main(["score", "--gt", str(FIXTURES / "annotations" / "material.json"), "--results", str(bad),
                 "--output-path", str(tmp_path)]) == 2  # fmt: skip
    assert "detection 0" in capsys.readouterr().err


def test_score_command_runs_as_a_module(tmp_path):
    cmd = [sys.executable, "-m", "mmprune_exp.benchmarks.ovdeval", "score", "--gt",
           str(FIXTURES / "annotations" / "material.json"), "--results", str(FIXTURES / "predictions" / "p1_perfect.json"),
           "--output-path", str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "NMS-AP 75.00 | plain AP 75.00" in proc.stdout and "RuntimeWarning" not in proc.stderr


# -- benchmark: records, parsing, rescaling ---------------------------------------------------------


def material(**kw) -> OVDEvalConfig:
    return OVDEvalConfig(**({"path": str(FIXTURES), "subset": "material", "min_pixels": 3136, "max_pixels": 12544}
                            | kw))  # fmt: skip


def frame(width: int, height: int) -> tuple[int, int]:
    h, w = smart_resize(height, width, 28, 3136, 12544)
    return w, h


def to_frame(bbox: list[float], width: int, height: int) -> list[int]:
    """A ground-truth xywh box as Qwen2.5-VL would answer it: xyxy in the resized frame."""
    fw, fh = frame(width, height)
    x, y, w, h = bbox
    return [round(x * fw / width), round(y * fh / height), round((x + w) * fw / width), round((y + h) * fh / height)]


def answer(boxes: list[tuple[list, str]], fenced: bool = True) -> str:
    body = json.dumps([{"bbox_2d": b, "label": label} for b, label in boxes])
    return f"```json\n{body}\n```" if fenced else body


def test_records_prompt_with_the_images_labels():
    bench = build_benchmark(material())
    records = bench.records()
    assert [r.id for r in records] == ["material/0", "material/1", "material/2", "material/3"]
    assert records[0].request.text == PROMPT.format(labels="['wooden chair', 'glass table', 'metal chair', 'wooden table']")
    assert "<answer></answer>" in records[0].request.text and 'respond with "None"' in records[0].request.text
    assert records[0].request.images[0].size == (200, 150)
    celebrity = build_benchmark(material(subset="celebrity")).records()
    assert "['person A', 'person B', 'person C']" in celebrity[1].request.text  # all categories (eval_glip.py)


def test_answers_are_parsed_rescaled_and_mapped_to_categories():
    bench = build_benchmark(material())
    record = bench.records()[0]  # 200x150 -> processor frame 112x84
    assert frame(200, 150) == (112, 84)
    row = bench.score(record, "<think>two things</think><answer>" + answer([([11, 17, 45, 62], "Wooden  Chair"),
                      ([56, 22, 101, 56], "glass table"), ([1, 1, 5, 5], "sofa"), ([50, 50, 40, 60], "metal chair")],
                      fenced=False) + "</answer>")  # fmt: skip
    (chair, table) = row["parsed"]
    assert chair["category_id"] == 0 and table["category_id"] == 2  # case/space-insensitive label match
    assert chair["bbox"] == pytest.approx([11 * 200 / 112, 17 * 150 / 84, 34 * 200 / 112, 45 * 150 / 84])
    assert chair["score"] == 1.0
    assert row["unknown_labels"] == 1 and row["inverted_boxes"] == 1
    assert row["score"] == 1.0  # both objects found with the right label


@pytest.mark.parametrize(
    "response,parsed",
    [
        ("None", []),
        ("<answer>None</answer>", []),
        ("I cannot see anything useful here.", None),
        ("", None),
        ('```json\n[{"bbox_2d": [11, 17, 45, 62], "label": "wooden chair"}, {"bbox_2d": [56, 2', 1),  # truncated
    ],
)
def test_unparseable_or_empty_answers_are_scored_misses(response, parsed):
    bench = build_benchmark(material())
    row = bench.score(bench.records()[0], response)
    assert (row["parsed"] if parsed is None or parsed == [] else len(row["parsed"])) == parsed
    assert row["score"] == (0.5 if parsed == 1 else 0.0)


def test_rescale_can_be_switched_off():
    bench = build_benchmark(material(rescale=False))
    row = bench.score(bench.records()[0], answer([([20, 30, 80, 110], "wooden chair")]))
    assert row["parsed"][0]["bbox"] == [20, 30, 60, 80]


def test_missing_data_fails_naming_benchmark_path(tmp_path):
    with pytest.raises(BenchmarkDataError, match=r"benchmark\.path.*annotations/color\.json"):
        build_benchmark(material(subset="color"))
    with pytest.raises(BenchmarkDataError, match="benchmark.path is not set"):
        build_benchmark(material(path=None))


def test_missing_images_are_reported_skipped_and_count_as_missed(tmp_path, caplog):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "material.json").write_text(json.dumps(GT))
    (tmp_path / "images" / "material").mkdir(parents=True)
    for name in ("fx0.jpg", "fx2.jpg", "fx3.jpg"):
        (tmp_path / "images" / "material" / name).write_bytes((FIXTURES / "images" / "material" / name).read_bytes())
    bench = build_benchmark(material(path=str(tmp_path), fix_ann_id_zero=True))
    assert [r.id for r in bench.records()] == ["material/0", "material/2", "material/3"]
    assert "1 image file(s) missing" in caplog.text
    rows = [{"id": r.id, **r.fields, **bench.score(r, answer([(to_frame(t["bbox"], r.fields["width"], r.fields["height"]),
            GT["categories"][t["category_id"]]["name"]) for t in r.target]))} for r in bench.records()]  # fmt: skip
    metrics = bench.aggregate(rows)
    assert metrics["missing_images"] == 1.0
    assert metrics["nms_ap50"] == pytest.approx(0.75)  # metal chair (both objects on the missing image) is 0


# -- through the evaluation runner ------------------------------------------------------------------


class ScriptedAdapter:
    def __init__(self, respond):
        self.respond = respond

    def generate(self, requests, max_new_tokens):
        return [self.respond(r) for r in requests]


def gt_answers(bench, labels_for=None):
    """A scripted model that answers every object of every image with its true box (in the resized frame)."""
    by_text = {}
    for record in bench.records():
        subset = bench.subsets[record.fields["subset"]]
        names = {c["id"]: c["name"] for c in subset.dataset["categories"]}
        boxes = []
        for t in record.target:
            box = to_frame(t["bbox"], record.fields["width"], record.fields["height"])
            for label in (labels_for or (lambda r, t, names=names: [names[t["category_id"]]]))(record, t):
                boxes.append((box, label))
        by_text[record.request.text, str(record.request.sources[0])] = answer(boxes) if boxes else "None"
    return lambda request: by_text[request.text, str(request.sources[0])]  # celebrity prompts are all alike


def test_benchmark_run_perfect_answers(tmp_path):
    bench = build_benchmark(material(batch_size=3))
    result = evaluate(ScriptedAdapter(gt_answers(bench)), bench, tmp_path / "samples.jsonl")
    m = result.metrics
    assert m["nms_ap50"] == pytest.approx(0.75) and m["score"] == m["nms_ap"]  # annotation id 0 again
    assert m["boxes_before_nms"] == m["boxes_after_nms"] == 5.0 and m["unparsed"] == 0.0
    fixed = build_benchmark(material(fix_ann_id_zero=True))
    assert fixed.aggregate(result.rows)["nms_ap50"] == pytest.approx(1.0)
    written = bench.write_tables(result.rows, tmp_path)
    assert {p.name for p in written} == {"material_coco_results.json", "material_results.json", "material_stats.json",
                                         "ovdeval_table.csv"}  # fmt: skip
    # the raw results file re-scores to the same numbers (e.g. with the official eval.py)
    raw = json.loads((tmp_path / "ovdeval" / "material_coco_results.json").read_text())
    assert score_detections(GT, raw).nms.stats[0] == pytest.approx(m["nms_ap"])


def test_benchmark_run_inflated_labels_and_tie_order(tmp_path):
    """Every object answered with all of its image's labels, the true one first: with every score 1.0 the
    official tie order keeps the last-listed (a wrong label); tie_order=first keeps the true one."""
    bench = build_benchmark(material(fix_ann_id_zero=True))

    def all_labels(record, target):
        names = {c["id"]: c["name"] for c in bench.subsets["material"].dataset["categories"]}
        true = names[target["category_id"]]
        image = bench.subsets["material"].dataset["images"][record.fields["image_id"]]
        return [true] + [x for x in image["text"] + image["neg_text"] if x != true]

    result = evaluate(ScriptedAdapter(gt_answers(bench, all_labels)), bench, tmp_path / "s.jsonl")
    assert result.metrics["ap50"] < 1.0
    stable = build_benchmark(material(fix_ann_id_zero=True, tie_order="stable"))
    assert stable.aggregate(result.rows)["nms_ap50"] == 0.0  # the recording machine's official order
    first = build_benchmark(material(fix_ann_id_zero=True, tie_order="first"))
    assert first.aggregate(result.rows)["nms_ap50"] == pytest.approx(1.0)
    # the default (numpy) follows this machine's argsort: where it keeps equal keys in place (up to the
    # 4 labels of an image), it must agree with stable
    if all(np.argsort(np.ones(k)).tolist() == list(range(k)) for k in range(2, 5)):
        assert result.metrics["nms_ap50"] == 0.0


def test_ovdeval_all_reports_subsets_and_aspect_averages(tmp_path, compose_cfg):
    from omegaconf import OmegaConf

    from mmprune_exp.config import validate

    cfg = compose_cfg(["benchmark=ovdeval_all", f"benchmark.path={FIXTURES}", "benchmark.subsets=[material,celebrity]",
                       "benchmark.fix_ann_id_zero=true", "benchmark.limit=3"])  # fmt: skip
    validate(cfg)
    assert cfg.benchmark.max_pixels == cfg.model.max_pixels  # the frame follows the model's processor
    bench = build_benchmark(OmegaConf.to_object(cfg.benchmark))
    assert isinstance(bench.cfg, OVDEvalAllConfig)
    assert [r.id for r in bench.records()] == ["material/0", "material/1", "material/2", "celebrity/0", "celebrity/1"]
    result = evaluate(ScriptedAdapter(gt_answers(bench)), bench, tmp_path / "samples.jsonl")
    m = result.metrics
    assert m["nms_ap/material"] > 0.9 and m["nms_ap/celebrity"] > 0.9
    assert m["nms_ap/aspect/attribute"] == m["nms_ap/material"]
    assert m["nms_ap/aspect/proper_noun"] == m["nms_ap/celebrity"]
    assert m["score"] == m["nms_ap_avg5"] == pytest.approx((m["nms_ap/material"] + m["nms_ap/celebrity"]) / 2)
    assert "nms_ap_avg9" not in m  # only with all nine subsets
    bench.write_tables(result.rows, tmp_path)
    table = (tmp_path / "ovdeval_all_table.csv").read_text().splitlines()
    assert table[0].startswith("subset,aspect,nms_ap,ap") and any(line.startswith("avg5,") for line in table)


def test_averages_follow_the_published_conventions():
    from mmprune_exp.benchmarks.ovdeval import OVDEvalAll

    # VLM-R1 blog, Qwen2.5-VL-3B base (reference §2.5): 5-aspect mean 25.46
    vlm_r1 = {"celebrity": 13.2, "logo": 26.5, "landmark": 21.3, "color": 2.9, "material": 11.6, "position": 47.9,
              "relationship": 13.1, "negation": 38.7}  # fmt: skip
    assert OVDEvalAll.averages(vlm_r1)["avg5"] == pytest.approx(25.456, abs=1e-3)
    # paper, GLIP row: the nine-subset mean 18.37
    glip = {"coco": 48.9, "logo": 10.2, "landmark": 20.3, "celebrity": 4.6, "color": 3.7, "material": 7.4,
            "position": 30.9, "relationship": 10.0, "negation": 29.3}  # fmt: skip
    assert OVDEvalAll.averages(glip)["avg9"] == pytest.approx(18.367, abs=1e-3)


def test_config_flags_are_checked(compose_cfg):
    from mmprune_exp.config import ConfigError, validate

    for override, key in [("benchmark.subset=fruit", "subset"), ("benchmark.tie_order=random", "tie_order"),
                          ("benchmark.iou_threshold=1.5", "iou_threshold")]:  # fmt: skip
        with pytest.raises(ConfigError, match=rf"benchmark\.{key}"):
            validate(compose_cfg(["benchmark=ovdeval", override]))
    with pytest.raises(ConfigError, match=r"benchmark\.subsets"):
        validate(compose_cfg(["benchmark=ovdeval_all", "benchmark.subsets=[material,fruit]"]))


TINY = ROOT / "mmprune_exp" / "assets" / "qwen2_5_vl_tiny"
# Development hook, as in tests/test_run_e2e.py: run against another checkpoint directory.
MODEL_OVERRIDE = [f"model.path={os.environ['MMPRUNE_TEST_MODEL']}"] if os.environ.get("MMPRUNE_TEST_MODEL") else []


@pytest.mark.skipif(not MODEL_OVERRIDE and not (TINY / "config.json").exists(), reason="the tiny model is not built yet")
def test_run_py_on_the_tiny_model(tmp_path):
    env = os.environ | {"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}
    args = [sys.executable, "run.py", f"hydra.run.dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}",
            "model.device=cpu", *MODEL_OVERRIDE, "pruner=none", "logger=none", "dense_baseline=false", "benchmark=ovdeval",
            f"benchmark.path={FIXTURES}", "benchmark.max_new_tokens=24", "benchmark.batch_size=4"]  # fmt: skip
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["n_samples"] == 4 and 0.0 <= results["score"] <= 1.0
    assert {"nms_ap", "ap", "boxes_before_nms"} <= set(results["metrics"])
    # The headline is the official NMS-AP of the detections the run wrote, one row per annotated image.
    raw = json.loads((tmp_path / "ovdeval" / "material_coco_results.json").read_text())
    assert score_detections(GT, raw).nms.stats[0] == pytest.approx(results["score"])
    rows = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert sorted(r["image_id"] for r in rows) == sorted(img["id"] for img in GT["images"])


@pytest.mark.parametrize("size", [(200, 150), (140, 112), (1000, 700)])
@pytest.mark.parametrize("pixels", [(3136, 12544), (200704, 1003520)])
def test_rescale_frame_is_the_image_processors(size, pixels):
    """The frame boxes are rescaled from is the one Qwen2-VL's image processor resizes to (grid x 14)."""
    from PIL import Image
    from transformers import Qwen2VLImageProcessor

    from mmprune_exp.benchmarks.ovdeval import rescale_box

    processor = Qwen2VLImageProcessor(size={"shortest_edge": pixels[0], "longest_edge": pixels[1]}, patch_size=14,
                                      merge_size=2)  # fmt: skip
    _, grid_h, grid_w = processor(images=[Image.new("RGB", size)], return_tensors="pt")["image_grid_thw"][0].tolist()
    cfg = material(min_pixels=pixels[0], max_pixels=pixels[1])
    assert rescale_box((0, 0, grid_w * 14, grid_h * 14), *size, cfg) == pytest.approx([0, 0, size[0], size[1]])
