"""The evaluation runner with a scripted adapter: batching, jsonl as it goes, resume, unparseable answers."""

from __future__ import annotations

import json

import pytest

from mmprune_exp.benchmarks import build_benchmark
from mmprune_exp.config.schema import BenchmarkConfig
from mmprune_exp.evaluation import evaluate, read_rows


def key(request):
    return request.text, request.images[0].tobytes()


class ScriptedAdapter:
    """Answers from a dict keyed by (question, image bytes); counts how many requests it saw."""

    def __init__(self, answers, default="zzz"):
        self.answers = answers
        self.default = default
        self.seen = 0
        self.batches = []

    def generate(self, requests, max_new_tokens):
        self.seen += len(requests)
        self.batches.append(len(requests))
        return [self.answers.get(key(r), self.default) for r in requests]


@pytest.fixture
def vqa():
    return build_benchmark(BenchmarkConfig(name="shapes_vqa", limit=10, batch_size=4, max_new_tokens=4))


def test_scores_batches_and_writes_every_sample(tmp_path, vqa):
    records = vqa.records()
    answers = {key(r.request): r.target for r in records[:6]}  # 6 right, 4 unparseable/wrong
    adapter = ScriptedAdapter(answers)
    result = evaluate(adapter, vqa, tmp_path / "samples.jsonl")
    assert adapter.batches == [4, 4, 2]
    assert result.metrics["score"] == pytest.approx(0.6)
    lines = (tmp_path / "samples.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [r.id for r in records]
    assert all({"id", "response", "target", "parsed", "score", "kind"} <= set(json.loads(x)) for x in lines)


def test_resume_skips_finished_samples_and_ignores_a_torn_line(tmp_path, vqa):
    records = vqa.records()
    answers = {key(r.request): r.target for r in records}
    path = tmp_path / "samples.jsonl"
    evaluate(ScriptedAdapter(answers), vqa, path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:7]) + "\n" + lines[7][:15])  # killed while writing sample 8
    adapter = ScriptedAdapter(answers)
    result = evaluate(adapter, vqa, path)
    assert adapter.seen == 3 and result.resumed == 7
    assert result.metrics["score"] == 1.0
    assert list(read_rows(path)) == [r.id for r in records]


def test_unparseable_answers_are_scored_wrong_not_crashes(tmp_path):
    bench = build_benchmark(BenchmarkConfig(name="shapes_grounding", limit=3, batch_size=2, max_new_tokens=8))
    result = evaluate(ScriptedAdapter({}, default='```json\n[{"bbox_2d": [1, 2'), bench, tmp_path / "s.jsonl")
    assert result.metrics["unparsed"] == 3
    assert result.metrics["score"] == 0.0
