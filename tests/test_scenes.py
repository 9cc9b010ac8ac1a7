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
    assert len(frames) == 6 and all(f.size == (IMAGE_SIZE, IMAGE_SIZE) for f in frames)


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
        # Each object stays inside its 28-pixel cell, i.e. inside one merged visual token.
        for o in item.objects:
            row, col = o.cell
            assert col * 28 <= o.box[0] and o.box[2] <= (col + 1) * 28
            assert row * 28 <= o.box[1] and o.box[3] <= (row + 1) * 28


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


def _colour_centroid(frame, rgb):
    arr = np.asarray(frame)
    ys, xs = np.nonzero(np.all(arr == np.array(rgb, dtype=np.uint8), axis=-1))
    return (xs.mean(), ys.mean(), len(xs)) if len(xs) else (None, None, 0)


def test_video_answers_match_the_frames():
    items = video_items("eval", 40)
    assert [it.kind for it in items[:4]] == ["direction", "order"] * 2
    for it in items:
        assert len(it.frames) == 8
        if it.kind == "direction":
            colour, _kind = re.match(r"Which direction does the (\w+) (\w+) move\?", it.question).groups()
            first, last = np.asarray(it.frames[0]).astype(int), np.asarray(it.frames[-1]).astype(int)
            moved = np.any(first != last, axis=-1)
            target = np.array(COLOUR_RGB[colour])
            ys0, xs0 = np.nonzero(moved & np.all(first == target, axis=-1))
            ys1, xs1 = np.nonzero(moved & np.all(last == target, axis=-1))
            dx, dy = xs1.mean() - xs0.mean(), ys1.mean() - ys0.mean()
            if abs(dx) > abs(dy):
                expected = "right" if dx > 0 else "left"
            else:
                expected = "down" if dy > 0 else "up"
            assert it.answer == expected
            assert max(abs(dx), abs(dy)) > 40
        else:
            a, b = re.fullmatch(r"Which shape appears first, the (\w+ \w+) or the (\w+ \w+)\?", it.question).groups()
            assert it.answer in (a, b) and a != b
            assert it.frames[0].tobytes() != it.frames[-1].tobytes()


def test_grounding_answer_format_matches_qwen_style():
    assert scenes.format_grounding_answer([(1, 2, 3, 4)], "red circle") == (
        '```json\n[\n\t{"bbox_2d": [1, 2, 3, 4], "label": "red circle"}\n]\n```'
    )
