"""Answer parsers and the COCO AP wrapper on hand-made cases."""

from __future__ import annotations

import pytest

from mmprune_exp.benchmarks.scoring import (
    box_iou,
    coco_ap,
    greedy_matches,
    parse_bbox_json,
    parse_choice,
    parse_number,
    parse_short_answer,
    parse_word,
)


@pytest.mark.parametrize(
    "text,expected",
    [("B", "B"), ("B.", "B"), ("(C)", "C"), ("D) yellow", "D"), ("The answer is A", "A"), ("blue", None), ("", None)],
)
def test_parse_choice(text, expected):
    assert parse_choice(text) == expected


@pytest.mark.parametrize(
    "text,expected", [("3", "3"), ("03", "3"), ("There are 2 shapes.", "2"), ("four", "4"), ("none", None), ("", None)]
)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


def test_parse_word_and_dispatch():
    assert parse_word("Yes.") == "yes"
    assert parse_word("  ") is None
    assert parse_short_answer("B. red", "B") == "B"
    assert parse_short_answer("3 circles", "3") == "3"
    assert parse_short_answer("Circle", "circle") == "circle"


FENCED = '```json\n[\n\t{"bbox_2d": [4, 32, 24, 52], "label": "red circle"},\n\t{"bbox_2d": [60, 4, 80, 24], "label": "red circle"}\n]\n```'


def test_parse_bbox_fenced_bare_and_tagged():
    boxes = parse_bbox_json(FENCED)
    assert [b.bbox for b in boxes] == [(4, 32, 24, 52), (60, 4, 80, 24)]
    assert boxes[0].label == "red circle"
    bare = parse_bbox_json('[{"bbox_2d": [1, 2, 3, 4], "label": "x"}]')
    assert [b.bbox for b in bare] == [(1, 2, 3, 4)]
    tagged = parse_bbox_json('<think>hm</think><answer>{"bbox_2d": [1, 2, 3, 4]}</answer>')
    assert [b.bbox for b in tagged] == [(1, 2, 3, 4)]


def test_parse_bbox_truncated_keeps_complete_objects():
    truncated = FENCED[: FENCED.index("[60") + 5]
    assert [b.bbox for b in parse_bbox_json(truncated)] == [(4, 32, 24, 52)]


@pytest.mark.parametrize("text", ["None", "none.", "```json\n[]\n```"])
def test_parse_bbox_none_is_empty(text):
    assert parse_bbox_json(text) == []


@pytest.mark.parametrize("text", ["", "I cannot see any", '[{"bbox_2d": [1, 2]}]x', "```json\n[{\"bbox_2d\": ["])
def test_parse_bbox_garbage_is_none_not_a_crash(text):
    assert not parse_bbox_json(text)


def test_parse_bbox_skips_malformed_items():
    boxes = parse_bbox_json('[{"bbox_2d": [1, 2, 3]}, {"bbox_2d": ["a", 2, 3, 4]}, {"bbox_2d": [5, 6, 7, 8]}, 3]')
    assert [b.bbox for b in boxes] == [(5, 6, 7, 8)]


def test_box_iou_and_matching():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    assert box_iou((0, 0, 0, 0), (0, 0, 0, 0)) == 0.0
    # one prediction cannot match two ground truths
    assert greedy_matches([(0, 0, 10, 10), (0, 0, 10, 10)], [(0, 0, 10, 10)]) == 1


def test_coco_ap_perfect_half_and_empty():
    gt = {1: [(0, 0, 10, 10)], 2: [(20, 20, 40, 40)]}
    perfect = coco_ap(gt, {1: [((0, 0, 10, 10), 1.0)], 2: [((20, 20, 40, 40), 1.0)]})
    assert perfect["ap"] == pytest.approx(1.0) and perfect["ap50"] == pytest.approx(1.0)
    half = coco_ap(gt, {1: [((0, 0, 10, 10), 1.0)], 2: [((60, 60, 70, 70), 1.0)]})
    assert 0.4 < half["ap50"] < 0.6
    # IoU 0.6: counts at .5, not at .75
    loose = coco_ap({1: [(0, 0, 10, 10)]}, {1: [((0, 0, 10, 6), 1.0)]})
    assert loose["ap50"] == pytest.approx(1.0) and loose["ap75"] == 0.0
    assert coco_ap(gt, {}) == {"ap": 0.0, "ap50": 0.0, "ap75": 0.0, "ar100": 0.0}
