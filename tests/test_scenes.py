"""Synthetic shape scenes: determinism, split disjointness and answers consistent with the objects."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pytest

from mmprune_exp.data import scenes
from mmprune_exp.data.scenes import (
    COLOUR_RGB,
    COLOURS,
    IMAGE_SIZE,
    SHAPE_PLURALS,
    SHAPES,
    SPLIT_SEEDS,
    VIDEO_CELL,
    VIDEO_SIZE,
    grounding_items,
    reading_order,
    video_items,
    vqa_items,
)


def _digest(image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


def test_vqa_items_are_deterministic_and_offset_invariant():
    a = vqa_items("eval", 8)
    b = vqa_items("eval", 8)
    window = vqa_items("eval", 5, start=3)
    for x, y in zip(a, b):
        assert (x.id, x.question, x.answer, x.kind) == (y.id, y.question, y.answer, y.kind)
        assert x.image.tobytes() == y.image.tobytes()
    for x, y in zip(a[3:], window):
        assert (x.id, x.question, x.answer, x.kind) == (y.id, y.question, y.answer, y.kind)
        assert x.image.tobytes() == y.image.tobytes()
    assert a[7].id == "vqa-eval-000007"
    assert window[0].id == "vqa-eval-000003"


def test_grounding_and_video_items_are_deterministic():
    g1, g2 = grounding_items("calibration", 4, start=10), grounding_items("calibration", 6, start=8)[2:]
    for x, y in zip(g1, g2):
        assert (x.id, x.prompt, x.answer, x.boxes) == (y.id, y.prompt, y.answer, y.boxes)
        assert x.image.tobytes() == y.image.tobytes()
    assert g1[0].id == "grounding-calibration-000010"
    v1, v2 = video_items("train", 3), video_items("train", 2, start=1)
    for x, y in zip(v1[1:], v2):
        assert (x.id, x.question, x.answer) == (y.id, y.question, y.answer)
        assert [f.tobytes() for f in x.frames] == [f.tobytes() for f in y.frames]


@pytest.mark.parametrize("fn", [vqa_items, grounding_items, video_items])
def test_unknown_split_is_rejected(fn):
    with pytest.raises(ValueError, match=r"'test'.*calibration.*eval.*train"):
        fn("test", 1)


def test_split_seeds_are_distinct():
    assert set(SPLIT_SEEDS) == {"train", "calibration", "eval"}
    assert len(set(SPLIT_SEEDS.values())) == 3
    # Per-item seeds of different splits differ for the same task and index.
    for i in range(50):
        assert len({scenes.item_seed(s, "vqa", i) for s in SPLIT_SEEDS}) == 3


def test_splits_never_share_a_scene():
    seen: dict[str, str] = {}
    for split in SPLIT_SEEDS:
        digests = {_digest(it.image) for it in vqa_items(split, 300)}
        digests |= {_digest(it.image) for it in grounding_items(split, 100)}
        for other, other_digests in seen.items():
            assert not digests & set(other_digests), f"{split} and {other} share a scene"
        seen[split] = digests


def test_images_have_the_documented_format():
    item = vqa_items("train", 1)[0]
    assert item.image.size == (IMAGE_SIZE, IMAGE_SIZE) and item.image.mode == "RGB"
    frames = video_items("train", 1, num_frames=6)[0].frames
    assert len(frames) == 6 and all(f.size == (VIDEO_SIZE, VIDEO_SIZE) and f.mode == "RGB" for f in frames)


def _pixel(image, obj) -> tuple[int, int, int]:
    x1, y1, x2, y2 = obj.box
    # The centre lies inside every shape; for the triangle (apex up) go a bit lower, where it is wider.
    y = (y1 + y2) // 2 + ((y2 - y1) // 5 if obj.kind == "triangle" else 0)
    return image.getpixel(((x1 + x2) // 2, y))


def test_objects_are_drawn_where_their_boxes_say():
    for item in vqa_items("train", 40) + grounding_items("train", 20):
        for obj in item.objects:
            x1, y1, x2, y2 = obj.box
            assert 0 <= x1 < x2 <= IMAGE_SIZE and 0 <= y1 < y2 <= IMAGE_SIZE
            assert _pixel(item.image, obj) == COLOUR_RGB[obj.colour]
        cells = [o.cell for o in item.objects]
        assert len(cells) == len(set(cells)), "objects must occupy distinct grid cells"
        # Each object stays inside its 28-pixel cell and covers part of each of the cell's 2 x 2 merged
        # visual tokens (14 pixels each at the tiny model's patch 7): it crosses both mid-lines.
        for o in item.objects:
            row, col = o.cell
            assert col * 28 <= o.box[0] and o.box[2] <= (col + 1) * 28
            assert row * 28 <= o.box[1] and o.box[3] <= (row + 1) * 28
            assert o.box[0] < col * 28 + 14 < o.box[2] - 1 and o.box[1] < row * 28 + 14 < o.box[3] - 1


def _matching(objects, colour=None, kind=None):
    return [o for o in objects if (colour is None or o.colour == colour) and (kind is None or o.kind == kind)]


def test_vqa_answers_match_the_objects():
    items = vqa_items("eval", 400)
    assert [it.kind for it in items[:8]] == ["count", "colour", "shape", "position"] * 2
    counts = []
    for it in items:
        if it.kind == "count":
            m = re.fullmatch(r"How many (\w+) shapes are there\?", it.question)
            if m:
                expected = len(_matching(it.objects, colour=m.group(1)))
            else:
                plural = re.fullmatch(r"How many (\w+) are there\?", it.question).group(1)
                kind = {v: k for k, v in SHAPE_PLURALS.items()}[plural]
                expected = len(_matching(it.objects, kind=kind))
            assert it.answer == str(expected)
            counts.append(expected)
        elif it.kind == "colour":
            kind = re.match(r"What colour is the (\w+)\?", it.question).group(1)
            (obj,) = _matching(it.objects, kind=kind)
            options = dict(re.findall(r"^([A-D])\. (\w+)$", it.question, flags=re.MULTILINE))
            assert sorted(options.values()) == sorted(COLOURS)
            assert options[it.answer] == obj.colour
        elif it.kind == "shape":
            colour = re.fullmatch(r"What shape is the (\w+) object\?", it.question).group(1)
            (obj,) = _matching(it.objects, colour=colour)
            assert it.answer == obj.kind
        else:
            m = re.fullmatch(r"Is the (\w+) (\w+) (to the left of|to the right of|above|below) the (\w+) (\w+)\?",
                             it.question)
            (a,) = _matching(it.objects, colour=m.group(1), kind=m.group(2))
            (b,) = _matching(it.objects, colour=m.group(4), kind=m.group(5))
            (ra, ca), (rb, cb) = a.cell, b.cell
            truth = {"to the left of": ca < cb, "to the right of": ca > cb, "above": ra < rb, "below": ra > rb}[m.group(3)]
            assert it.answer == ("yes" if truth else "no")
            # The relation is never ambiguous: the two objects are in different columns/rows.
            assert (ca != cb) if "of" in m.group(3) else (ra != rb)
    # No dominant count answer (the prototype collapsed onto a 55 % majority class).
    values, freq = np.unique(counts, return_counts=True)
    assert set(values) == {0, 1, 2, 3, 4} and freq.max() / freq.sum() < 0.35
    answers = [it.answer for it in items if it.kind == "position"]
    assert 0.35 < answers.count("yes") / len(answers) < 0.65


def test_grounding_answers_match_the_objects():
    for it in grounding_items("eval", 100):
        colour, kind = it.label.split()
        assert colour in COLOURS and kind in SHAPES
        assert it.prompt == f"Locate every {it.label} in the image and output the bbox coordinates in JSON format."
        expected = [o.box for o in reading_order(_matching(it.objects, colour=colour, kind=kind))]
        assert it.boxes == expected and 1 <= len(expected) <= 3
        rows = "".join(f'\t{{"bbox_2d": [{x1}, {y1}, {x2}, {y2}], "label": "{it.label}"}}' + (",\n" if i < len(expected) - 1 else "\n")
                       for i, (x1, y1, x2, y2) in enumerate(expected))
        assert it.answer == "```json\n[\n" + rows + "]\n```"
        cells = [o.cell for o in reading_order(_matching(it.objects, colour=colour, kind=kind))]
        assert cells == sorted(cells)


def test_video_answers_match_the_frames():
    items = video_items("eval", 90)
    assert [it.kind for it in items[:6]] == ["mover", "direction", "still"] * 2
    for it in items:
        assert len(it.frames) == 8
        labels = [tr.label for tr in it.tracks]
        assert len(labels) == len(set(labels)), "objects of a clip are told apart by colour and shape"
        moved = {}
        for tr in it.tracks:
            # Every frame shows the object where its box says; the motion is read off the boxes.
            for frame, box in zip(it.frames, tr.boxes):
                assert _pixel(frame, scenes.ShapeObj(tr.kind, tr.colour, box)) == COLOUR_RGB[tr.colour]
            dx, dy = tr.boxes[-1][0] - tr.boxes[0][0], tr.boxes[-1][1] - tr.boxes[0][1]
            if dx == dy == 0:
                moved[tr.label] = None
                assert it.frames[0].crop(tr.boxes[0]).tobytes() == it.frames[-1].crop(tr.boxes[0]).tobytes()
            else:
                assert dx == 0 or dy == 0
                moved[tr.label] = ("right" if dx > 0 else "left") if dx else ("down" if dy > 0 else "up")
                assert max(abs(dx), abs(dy)) == 24  # about 3 pixels between consecutive frames
            assert moved[tr.label] == tr.direction
        # One frame never tells the answer: every clip has a moving object, so the first frame alone
        # does not show which, where to, or how many stay.
        assert any(moved.values())
        if it.kind == "mover":
            assert it.question == "Which shape moves?"
            assert [label for label, d in moved.items() if d] == [it.answer]
            assert len(moved) >= 2  # never the mover alone, which one frame would name
        elif it.kind == "direction":
            label = re.fullmatch(r"Which direction does the (\w+ \w+) move\? Answer left, right, up or down\.",
                                 it.question).group(1)
            assert moved[label] == it.answer and [lb for lb, d in moved.items() if d] == [label]
        else:
            assert it.question == "How many shapes stay still?"
            assert it.answer == str(sum(d is None for d in moved.values()))


def test_video_layout_keeps_objects_apart():
    counts = []
    for it in video_items("train", 900):
        cells = [tr.cells() for tr in it.tracks]
        for i, a in enumerate(cells):
            for b in cells[i + 1 :]:
                assert not a & b, "a moving path never shares a cell with another object"
        for tr, covered in zip(it.tracks, cells):
            assert all(0 <= v <= VIDEO_SIZE for box in tr.boxes for v in box)
            if not tr.moving:
                assert len(covered) == 1  # a static object is one merged token per temporal patch
            else:
                rows, cols = {r for r, _ in covered}, {c for _, c in covered}
                assert len(rows if tr.direction in ("left", "right") else cols) == 1  # keeps to its lane
        if it.kind == "still":
            counts.append(int(it.answer))
    # Every answer 0-3 about equally often, so the count cannot be guessed.
    values, freq = np.unique(counts, return_counts=True)
    assert set(values) == {0, 1, 2, 3} and freq.max() / freq.sum() < 0.35
    assert VIDEO_CELL * 4 == VIDEO_SIZE


def test_grounding_answer_format_matches_qwen_style():
    assert scenes.format_grounding_answer([(1, 2, 3, 4)], "red circle") == (
        '```json\n[\n\t{"bbox_2d": [1, 2, 3, 4], "label": "red circle"}\n]\n```'
    )


def test_cell_tokens_tile_the_image_grid():
    # 16 tokens: one per cell; 64 tokens: the 2 x 2 block under the cell, in raster order.
    assert scenes.cell_tokens((1, 2), 4) == [6]
    assert scenes.cell_tokens((1, 2), 8) == [20, 21, 28, 29]
    every = sorted(i for r in range(scenes.GRID) for c in range(scenes.GRID) for i in scenes.cell_tokens((r, c), 8))
    assert every == list(range(64))
    with pytest.raises(ValueError, match="6x6 token grid"):
        scenes.cell_tokens((0, 0), 6)
