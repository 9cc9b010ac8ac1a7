"""A run directory remembers the config that produced it; a resume with another config is refused."""

from __future__ import annotations

import json

import pytest

from mmprune_exp.errors import ConfigError
from mmprune_exp.rundir import FINGERPRINT_FILE, claim, fingerprint


def test_fingerprint_holds_what_decides_results_and_not_labels_or_logging(compose_cfg):
    fp = fingerprint(compose_cfg(["pruner=wanda", "sparsity=s70"]))
    assert fp["pruner.name"] == "wanda" and fp["sparsity.value"] == 0.7 and fp["seed"] == 0
    assert any(k.startswith("checkpoint.") for k in fp)  # the weights' files, not just the path
    assert not any(k.startswith(("logger.", "paths.", "hydra.")) for k in fp)
    assert "benchmark.limit" not in fp and "sparsity.name" not in fp


def test_first_claim_writes_the_fingerprint_and_a_rerun_resumes(compose_cfg, tmp_path):
    cfg = compose_cfg(["pruner=wanda"])
    assert claim(tmp_path, cfg) is False
    assert json.loads((tmp_path / FINGERPRINT_FILE).read_text())["pruner.name"] == "wanda"
    (tmp_path / "samples.jsonl").write_text('{"id": "a"}\n')
    assert claim(tmp_path, compose_cfg(["pruner=wanda"])) is True
    # a larger limit extends the same run: the rows already written are the same rows
    assert claim(tmp_path, compose_cfg(["pruner=wanda", "benchmark.limit=400"])) is True


def test_a_different_config_is_refused_naming_every_differing_key(compose_cfg, tmp_path):
    claim(tmp_path, compose_cfg(["pruner=wanda", "sparsity=s50"]))
    (tmp_path / "samples.jsonl").write_text('{"id": "a"}\n')
    with pytest.raises(ConfigError) as err:
        claim(tmp_path, compose_cfg(["pruner=magnitude", "sparsity=s90"]))
    message = str(err.value)
    assert "pruner.name: 'wanda' there, 'magnitude' now" in message
    assert "sparsity.value: 0.5 there, 0.9 now" in message
    assert str(tmp_path) in message
    assert json.loads((tmp_path / FINGERPRINT_FILE).read_text())["pruner.name"] == "wanda"  # left as it was


def test_results_without_a_fingerprint_are_not_resumed(compose_cfg, tmp_path):
    (tmp_path / "samples.jsonl").write_text('{"id": "a"}\n')
    with pytest.raises(ConfigError, match="no fingerprint.json"):
        claim(tmp_path, compose_cfg())


def test_rebuilt_weights_change_the_fingerprint(compose_cfg, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"x" * 10)
    run_dir = tmp_path / "run"
    claim(run_dir, compose_cfg([f"model.path={model}"]))
    (run_dir / "samples.jsonl").write_text('{"id": "a"}\n')
    (model / "model.safetensors").write_bytes(b"y" * 11)
    with pytest.raises(ConfigError, match=r"checkpoint\.model\.safetensors"):
        claim(run_dir, compose_cfg([f"model.path={model}"]))


def test_a_run_that_failed_before_writing_results_can_be_rerun_with_a_fix(compose_cfg, tmp_path):
    claim(tmp_path, compose_cfg(["benchmark=mathv", "benchmark.path=/typo"]))  # then failed on the data
    assert claim(tmp_path, compose_cfg(["benchmark=mathv", "benchmark.path=/fixed"])) is False
    assert json.loads((tmp_path / FINGERPRINT_FILE).read_text())["benchmark.path"] == "/fixed"
