"""benchmark=shapes_video: held-out clips, questions that need several frames, scored like shapes_vqa per kind."""

from __future__ import annotations

import pytest

from mmprune_exp.benchmarks import build_benchmark
from mmprune_exp.benchmarks.shapes import ShapesVideo
from mmprune_exp.config.schema import BenchmarkConfig
from mmprune_exp.data import scenes


@pytest.fixture
def bench():
    return ShapesVideo(BenchmarkConfig(name="shapes_video", limit=9))


def test_config_group_composes(compose_cfg):
    cfg = compose_cfg(["benchmark=shapes_video"])
    assert cfg.benchmark.name == "shapes_video" and cfg.benchmark.split == "eval"
    assert isinstance(build_benchmark(BenchmarkConfig(**cfg.benchmark)), ShapesVideo)


def test_records_are_held_out_8_frame_clips(bench):
    records = bench.records()
    assert len(records) == 9 and len({r.id for r in records}) == 9
    kinds = list(scenes.VIDEO_KINDS)
    assert [r.fields["kind"] for r in records] == (kinds * 9)[:9]
    items = scenes.video_items("eval", 9)
    for record, item in zip(records, items):
        assert record.id == item.id and record.id.startswith("video-eval-")
        assert record.target == item.answer and record.request.text == item.question
        (frames,) = record.request.videos
        assert len(frames) == 8 and [f.tobytes() for f in frames] == [f.tobytes() for f in item.frames]
        assert not record.request.images


@pytest.mark.parametrize(("target", "response", "score"), [
    ("red circle", "red circle", 1.0),
    ("red circle", "Red circle.", 1.0),
    ("red circle", "red  circle and more", 1.0),
    ("red circle", "red square", 0.0),
    ("red circle", "circle red", 0.0),
    ("left", "Left.", 1.0),
    ("left", "right", 0.0),
    ("2", "2", 1.0),
    ("2", "3", 0.0),
])  # fmt: skip
def test_scoring(bench, target, response, score):
    record = bench.records()[0]
    record = type(record)(record.id, record.request, target, record.fields)
    assert bench.score(record, response)["score"] == score


def test_unparseable_mover_answer_is_counted(bench):
    record = bench.records()[0]
    record = type(record)(record.id, record.request, "red circle", record.fields)
    row = bench.score(record, "red")
    assert row == {"parsed": None, "score": 0.0}


def test_aggregate_reports_accuracy_per_kind(bench):
    rows = [{"kind": k, "score": s, "parsed": "x"} for k, s in
            [("mover", 1.0), ("mover", 0.0), ("direction", 1.0), ("still", 1.0), ("still", 1.0)]]
    metrics = bench.aggregate(rows)
    assert metrics["score"] == metrics["accuracy"] == 0.8
    assert metrics["accuracy_mover"] == 0.5 and metrics["accuracy_direction"] == 1.0
    assert metrics["accuracy_still"] == 1.0 and metrics["unparsed"] == 0.0
