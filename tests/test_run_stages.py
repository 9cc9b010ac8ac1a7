"""run.py's stages in-process, with a scripted model whose answers are known, so the figures a run writes
(results.json, samples.jsonl, the benchmark's own tables) can be checked exactly, not just for range."""

from __future__ import annotations

import json

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from mmprune_exp import run as run_module
from mmprune_exp.benchmarks.ovdeval.nms_ap import score_detections
from tests.benchmarks.test_ovdeval import FIXTURES as OVD_FIXTURES
from tests.benchmarks.test_ovdeval import gt_answers
from tests.conftest import ROOT

MATHV_FIXTURES = ROOT / "tests" / "fixtures" / "mathv"


class ScriptedModel:
    """Stands in for a loaded adapter: answers from ``respond(request)``; has no weights to prune."""

    layer_streamer = None

    def __init__(self, respond):
        self.respond = respond
        self.device = torch.device("cpu")
        self.calls = 0

    def generate(self, requests, max_new_tokens):
        self.calls += len(requests)
        return [self.respond(r) for r in requests]

    def target_linears(self, scope, modules):
        return {}


@pytest.fixture
def run_in_process(compose_cfg, tmp_path, monkeypatch):
    """``run.run(cfg)`` as Hydra would call it, with ``load_adapter`` answering with a scripted model."""

    def _run(overrides, model):
        monkeypatch.setattr("mmprune_exp.models.load_adapter", lambda cfg: model)
        cfg = compose_cfg([f"paths.cache_dir={tmp_path / 'cache'}", "logger=none", "pruner=none", *overrides])
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(tmp_path / "run")
        HydraConfig.instance().set_config(cfg)
        with open_dict(cfg):
            del cfg["hydra"]  # as @hydra.main hands it to the task
        score = run_module.run(cfg)
        return score, tmp_path / "run"

    return _run


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_mathv_run_writes_the_official_figures(run_in_process):
    from mmprune_exp.benchmarks import build_benchmark
    from mmprune_exp.benchmarks.mathv import MathVConfig

    bench = build_benchmark(MathVConfig(path=str(MATHV_FIXTURES)))
    responses = {x["id"]: x["response"] for x in _jsonl(MATHV_FIXTURES / "outputs" / "fixture_model.jsonl")}
    by_text = {r.request.text: responses[r.id] for r in bench.records()}
    model = ScriptedModel(lambda request: by_text[request.text])
    score, run_dir = run_in_process(["benchmark=mathv", f"benchmark.path={MATHV_FIXTURES}", "benchmark.batch_size=3"], model)

    results = json.loads((run_dir / "results.json").read_text())
    assert score == results["score"] == 0.5  # 4 of the fixture model's 8 answers are right (official scorer)
    assert results["dense_score"] == 0.5 and results["recovery"] == 1.0 and results["sparsity"] == 0.0
    assert results["metrics"]["acc/subject/algebra"] == 1.0 and results["metrics"]["unparsed"] == 1.0
    assert results["n_samples"] == 8 and results["resumed_samples"] == 0
    assert model.calls == 16  # dense and pruned, each once: the records were read once and reused
    expected = (MATHV_FIXTURES / "expected" / "fixture_model_result.json").read_bytes()
    assert (run_dir / "mathv_result.json").read_bytes() == expected  # byte-equal to the official script's output
    rows = _jsonl(run_dir / "samples.jsonl")
    assert [r["id"] for r in rows] == [r.id for r in bench.records()]
    assert sum(r["score"] for r in rows) == 4


def test_ovdeval_run_with_perfect_answers_scores_one(run_in_process):
    from mmprune_exp.benchmarks import build_benchmark
    from mmprune_exp.benchmarks.ovdeval import OVDEvalConfig

    overrides = ["benchmark=ovdeval", f"benchmark.path={OVD_FIXTURES}", "benchmark.subset=material",
                 "benchmark.min_pixels=3136", "benchmark.max_pixels=12544", "dense_baseline=false",
                 "benchmark.fix_ann_id_zero=true"]  # fmt: skip  (the official eval never matches annotation id 0)
    bench = build_benchmark(OVDEvalConfig(path=str(OVD_FIXTURES), subset="material", min_pixels=3136, max_pixels=12544))
    score, run_dir = run_in_process(overrides, ScriptedModel(gt_answers(bench)))
    results = json.loads((run_dir / "results.json").read_text())
    assert score == results["metrics"]["nms_ap"] == pytest.approx(1.0)
    assert results["dense_score"] is None and results["recovery"] is None
    assert results["metrics"]["boxes_after_nms"] == sum(len(r["target"]) for r in _jsonl(run_dir / "samples.jsonl"))
    # the raw detections the run wrote re-score to the same AP with the official-equivalent scorer
    raw = json.loads((run_dir / "ovdeval" / "material_coco_results.json").read_text())
    gt = json.loads((OVD_FIXTURES / "annotations" / "material.json").read_text())
    assert score_detections(gt, raw).nms.stats[0] == pytest.approx(0.75)  # official ids: annotation 0 unmatched


def test_wrong_answers_score_zero_and_recovery_follows(run_in_process):
    """The same pipeline with answers that are all wrong: the figures move, so the checks above can fail."""
    model = ScriptedModel(lambda request: "\\boxed{12345}")
    score, run_dir = run_in_process(["benchmark=mathv", f"benchmark.path={MATHV_FIXTURES}"], model)
    results = json.loads((run_dir / "results.json").read_text())
    assert score == 0.0 and results["dense_score"] == 0.0 and results["recovery"] is None
