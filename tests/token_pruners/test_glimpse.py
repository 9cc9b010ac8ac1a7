"""GlimpsePrune (token_pruner=glimpse): the keep rule, the glimpse token's side path against the reference's
appended token, exactness with every token kept, save -> load, training, the Visual-CoT loader, the configs."""

from __future__ import annotations

import json

import pytest
import torch

from mmprune_exp.data import scenes
from mmprune_exp.errors import ConfigError
from mmprune_exp.models.base import Request
from mmprune_exp.token_pruners import build_token_pruner
from mmprune_exp.token_pruners.glimpse import (
    Glimpse,
    GlimpseConfig,
    GlimpseModule,
    GlimpseModuleConfig,
    glimpse_logits,
    keep_rule,
)
from mmprune_exp.train_glimpse import (
    TrainGlimpseConfig,
    box_mask,
    capture,
    evaluate,
    scene_samples,
    train,
    viscot_samples,
)
from tests.token_pruners.common import assert_valid_logits_equal, prompt_logits


def grounding_requests(n: int = 3) -> list[Request]:
    reqs = [Request(it.prompt, images=[it.image]) for it in scenes.grounding_items("eval", n)]
    reqs[1] = Request(reqs[1].text + " Answer with the boxes, please.", images=reqs[1].images)  # left padding
    return reqs


def fresh_module(adapter, seed: int = 1, bias: float = 0.0) -> GlimpseModule:
    torch.manual_seed(seed)
    module = GlimpseModule(GlimpseModuleConfig.for_model(adapter))
    with torch.no_grad():
        module.out.bias.fill_(bias)  # moves σ(logit) around the threshold: some tokens kept, some dropped
    return module.eval()


@pytest.fixture
def saved(random_tiny, tmp_path):
    module = fresh_module(random_tiny)
    return random_tiny, module, module.save(tmp_path / "glimpse")


def pruner(path, **kw) -> Glimpse:
    return build_token_pruner(GlimpseConfig(module=str(path), **kw))


# -- the keep rule ----------------------------------------------------------------------------------------------


def test_keep_rule_threshold_cap_and_minimum():
    logits = torch.logit(torch.tensor([0.9, 0.2, 0.6, 0.51, 0.49, 0.95, 0.1, 0.7]))
    assert keep_rule(logits, 0.5, None, 1).tolist() == [True, False, True, True, False, True, False, True]
    # 5 of 8 pass; a cap of 0.5 keeps the top floor(0.5·8) = 4 by probability
    capped = keep_rule(logits, 0.5, 0.5, 1)
    assert int(capped.sum()) == 4 and set(torch.nonzero(capped).flatten().tolist()) == {0, 2, 5, 7}
    # a cap above the passing share changes nothing
    assert torch.equal(keep_rule(logits, 0.5, 0.75, 1), keep_rule(logits, 0.5, None, 1))
    # nothing passes 0.99: the minimum keeps the top ones
    assert torch.nonzero(keep_rule(logits, 0.99, None, 1)).flatten().tolist() == [5]
    assert set(torch.nonzero(keep_rule(logits, 0.99, None, 3)).flatten().tolist()) == {0, 5, 7}
    assert int(keep_rule(logits, 0.99, None, 100).sum()) == 8  # at most every token
    assert bool(keep_rule(logits, 0.0, None, 1).all())


def pooled_probabilities(adapter, path, reqs) -> torch.Tensor:
    """σ(VIP logit) of every image token of ``reqs`` (an untrained module: where its threshold should sit to
    split the tokens is read off, not assumed)."""
    p = pruner(path, threshold=0.0)
    prompt_logits(adapter, reqs, p)
    return torch.sigmoid(torch.cat([z for per in p.selector.last_logits for z in per.values()]))


# quantile: the threshold is that quantile of the pooled probabilities (1.0: above every one, nothing passes)
@pytest.mark.parametrize("quantile,cap,min_keep", [(0.5, 1.0, 1), (0.5, 0.2, 1), (1.0, 1.0, 5), (0.3, 0.1, 10)])
def test_kept_set_follows_the_rule_in_the_model(saved, quantile, cap, min_keep):
    adapter, _, path = saved
    probs = pooled_probabilities(adapter, path, grounding_requests())
    threshold = float(probs.quantile(quantile)) if quantile < 1 else min(0.9999, float(probs.max()) + 1e-6)
    p = pruner(path, threshold=threshold, keep_ratio=cap, min_keep=min_keep)
    _, _, records = prompt_logits(adapter, grounding_requests(), p)
    for b, record in enumerate(records):
        (item,) = record.items
        z = p.selector.last_logits[b][("image", item.index)]
        prob = torch.sigmoid(z)
        kept = torch.tensor(record.kept_by_point["glimpse"]) - item.start  # raster indices of the kept tokens
        expected = torch.nonzero(keep_rule(z, threshold, cap if cap < 1 else None, min_keep)).flatten()
        assert sorted(kept.tolist()) == expected.tolist()
        n = item.length
        assert record.visual_kept == kept.numel() >= min(min_keep, n)
        if cap < 1:
            assert kept.numel() <= max(int(cap * n), min(min_keep, n))
        if kept.numel() > min_keep and (cap >= 1 or int((prob > threshold).sum()) <= cap * n):
            assert bool((prob[kept] > threshold).all())  # above the minimum and under the cap: the threshold rules
        # layers 0..K computed on every token, the rest on the kept ones
        k = p.selector.module.cfg.layer
        assert record.tokens_per_layer[: k + 1] == [record.tokens_before] * (k + 1)
        assert record.tokens_per_layer[k + 1 :] == [record.tokens_before - n + kept.numel()] * (3 - k)


def test_a_dynamic_count_per_image(saved):
    adapter, _, path = saved
    threshold = float(pooled_probabilities(adapter, path, grounding_requests(4)).median())
    _, _, records = prompt_logits(adapter, grounding_requests(4), pruner(path, threshold=threshold))
    kept = [r.visual_kept for r in records]
    assert len(set(kept)) > 1, kept  # the threshold, not a budget, decides how many stay


# -- exactness --------------------------------------------------------------------------------------------------


def test_threshold_zero_keeps_everything_and_the_logits_bitwise(saved):
    adapter, _, path = saved
    reqs = grounding_requests()
    dense, valid, _ = prompt_logits(adapter, reqs)
    pruned, _, records = prompt_logits(adapter, reqs, pruner(path, threshold=0.0))
    assert all(r.visual_kept == r.visual_before for r in records)
    # the glimpse probes only observe; the point keeps every slot: the stock computation op for op
    assert_valid_logits_equal(dense, pruned, valid)
    with pruner(path, threshold=0.0).attach(adapter):
        kept_all = adapter.generate(reqs, 6)
    assert kept_all == adapter.generate(reqs, 6)


@torch.no_grad()
def test_side_path_equals_the_appended_glimpse_token(saved):
    """The reference appends the glimpse token after the prompt (position last+1) and adds e_ℓ before layers
    1..K; its layer-K query logits must equal what the side path computes without touching the sequence."""
    adapter, module, path = saved
    reqs = grounding_requests()
    p = pruner(path, threshold=0.5)
    with p.attach(adapter):
        adapter.model(**adapter.encode(reqs))
    side = p.selector.last_attention  # [B, heads, S]

    text = adapter.model.model.language_model
    seen: dict = {}
    grab = text.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    try:
        inputs = adapter.encode(reqs)
        adapter.model(**inputs, use_cache=False)
    finally:
        grab.remove()
    embeds, mask, pos = seen["inputs_embeds"], seen["attention_mask"], seen["position_ids"]
    b = embeds.shape[0]
    k = module.cfg.layer
    appended = torch.cat([embeds, module.embedding(0).expand(b, 1, -1)], dim=1)
    pos = torch.cat([pos, pos[..., -1:] + 1], dim=-1)
    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    captured = {}

    def inject(layer_index):
        def hook(mod, args, kwargs):
            h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            h = h.clone()
            h[:, -1] += module.embedding(layer_index)
            if layer_index == k:
                captured["x"] = h
            if "hidden_states" in kwargs:
                kwargs["hidden_states"] = h
                return args, kwargs
            return (h, *args[1:]), kwargs

        return hook

    handles = [text.layers[i].register_forward_pre_hook(inject(i), with_kwargs=True) for i in range(1, k + 1)]
    try:
        text(inputs_embeds=appended, attention_mask=mask, position_ids=pos, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    x = captured["x"]
    mrope = pos[1:] if pos.shape[0] == 4 else pos
    cos_sin = text.rotary_emb(x[:, :-1], mrope[..., :-1])
    g_cos_sin = text.rotary_emb(x[:, :-1], mrope[..., -1:])
    reference = glimpse_logits(text.layers[k], x[:, -1], x[:, :-1], cos_sin, g_cos_sin)
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(side[valid[:, None, :].expand_as(side)], reference[valid[:, None, :].expand_as(side)],
                               rtol=1e-4, atol=1e-4)  # fmt: skip


# -- save / load ------------------------------------------------------------------------------------------------


def test_save_load_gives_identical_selections(saved, tmp_path):
    adapter, module, path = saved
    reqs = grounding_requests()
    again = GlimpseModule.load(path)
    for (k1, v1), (k2, v2) in zip(module.state_dict().items(), again.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    assert again.cfg == module.cfg
    runs = []
    for spec in (path, path):  # two independent loads of the saved folder
        p = pruner(spec, threshold=0.5)
        _, _, records = prompt_logits(adapter, reqs, p)
        runs.append(([r.kept_by_point["glimpse"] for r in records], p.selector.last_logits))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1]):
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_module_is_found_by_name_beside_the_model(random_tiny, tmp_path):
    from mmprune_exp.token_pruners.glimpse import resolve_module_dir

    model_dir = tmp_path / "model"
    fresh_module(random_tiny).save(model_dir / "glimpse")
    fresh_module(random_tiny, seed=2).save(model_dir / "other")
    assert resolve_module_dir(None, str(model_dir)) == model_dir / "glimpse"
    assert resolve_module_dir("other", str(model_dir)) == model_dir / "other"
    assert resolve_module_dir(str(model_dir / "other"), None) == model_dir / "other"
    with pytest.raises(ConfigError, match="make glimpse-model"):
        resolve_module_dir(None, str(tmp_path / "nowhere"))


# -- training ---------------------------------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """The glimpse path's small ops run several times faster on one thread (as train_glimpse runs them)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_short_training_lowers_the_loss(random_tiny, one_thread):
    cfg = TrainGlimpseConfig(epochs=3, batch_size=4, lr=3e-3, progress=False, seed=0)
    module_cfg = GlimpseModuleConfig.for_model(random_tiny)
    data = capture(random_tiny, module_cfg, scene_samples("train", 16), batch_size=8)
    assert all(float(d["target"].sum()) > 0 for d in data)
    torch.manual_seed(cfg.seed)
    before = evaluate(random_tiny, GlimpseModule(module_cfg), data, cfg)["loss"]  # train()'s initial module
    module, history = train(random_tiny, cfg, data, data)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["loss"] < before - 0.02, (before, history)
    assert all(not p.requires_grad for p in random_tiny.model.parameters())  # only the new parameters trained
    # deterministic for a seed
    again, history2 = train(random_tiny, cfg, data, data)
    assert history2 == history
    for a, b in zip(module.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_box_mask_rasterises_onto_the_merged_grid():
    m = box_mask([(0.0, 0.0, 0.26, 0.24)], (1, 4, 4)).view(4, 4)
    # columns int(0·4)=0 .. min(int(0.26·4), 3)=1, rows 0 .. int(0.24·4)=0, inclusive
    assert m.nonzero().tolist() == [[0, 0], [0, 1]]
    assert box_mask([(0.5, 0.5, 1.0, 1.0)], (1, 4, 4)).view(4, 4)[2:, 2:].all()
    assert box_mask([(0.9, 0.9, 1.0, 1.0)], (2, 2, 2)).tolist() == [False, False, False, True] * 2


def test_scene_targets_cover_the_objects():
    (sample,) = scene_samples("train", 1)
    item = scenes.grounding_items("train", 1)[0]
    w, h = item.image.size
    assert sample.boxes == [(x1 / w, y1 / h, x2 / w, y2 / h) for x1, y1, x2, y2 in item.boxes]


def test_viscot_loader(tmp_path):
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.new("RGB", (200, 100), "white").save(tmp_path / "img" / "a.jpg")
    Image.new("RGB", (50, 50), "black").save(tmp_path / "img" / "b.jpg")
    records = [
        {"question": "Where is the cat?", "answer": "left", "image": "a.jpg", "bboxs": [[0, 0, 100, 50]],
         "width": 200, "height": 100, "dataset": "gqa"},
        {"question": "What is it?", "answer": "dark", "image": "b.jpg", "bboxs": [[25, 25, 50, 50], [0, 0, 5, 5]]},
    ]
    path = tmp_path / "viscot.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    samples = viscot_samples(path, tmp_path / "img", seed=42)
    by_q = {s.request.text: s for s in samples}
    assert by_q["Where is the cat?"].boxes == [(0.0, 0.0, 0.5, 0.5)]
    assert by_q["What is it?"].boxes == [(0.5, 0.5, 1.0, 1.0), (0.0, 0.0, 0.1, 0.1)]  # normalised by the image size
    assert by_q["What is it?"].request.images[0].size == (50, 50)
    assert [s.request.text for s in viscot_samples(path, tmp_path / "img", n=1, seed=42)] == [samples[0].request.text]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "image": "a.jpg"}) + "\n")
    with pytest.raises(ConfigError, match="bboxs"):
        viscot_samples(bad, tmp_path / "img")


# -- configs ----------------------------------------------------------------------------------------------------


def test_token_pruner_config_composes(compose_cfg):
    from omegaconf import OmegaConf

    from mmprune_exp.config import validate

    cfg = compose_cfg(["token_pruner=glimpse", "token_pruner.threshold=0.3", "token_pruner.keep_ratio=0.25"])
    validate(cfg)
    tp = OmegaConf.to_object(cfg.token_pruner)
    assert isinstance(tp, GlimpseConfig)
    assert (tp.threshold, tp.keep_ratio, tp.min_keep, tp.module) == (0.3, 0.25, 1, None)
    with pytest.raises(ConfigError, match="threshold"):
        validate(compose_cfg(["token_pruner=glimpse", "token_pruner.threshold=1.5"]))


def test_train_config_composes():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from mmprune_exp.config import register_configs
    from tests.conftest import CONF

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
            raw = compose("train_glimpse", overrides=["samples=10", "data=viscot"])
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainGlimpseConfig), raw))
    finally:
        GlobalHydra.instance().clear()
    assert isinstance(cfg, TrainGlimpseConfig)
    assert cfg.samples == 10 and cfg.data == "viscot" and cfg.model.name == "qwen2_5_vl_tiny"
    assert cfg.logger.name == "wandb" and cfg.logger.mode == "offline"


def test_videos_keep_every_token(saved):
    from tests.token_pruners.common import video_request

    adapter, _, path = saved
    p = pruner(path, threshold=0.9)
    reqs = [video_request(0), video_request(1)]
    dense, valid, _ = prompt_logits(adapter, reqs)
    pruned, _, records = prompt_logits(adapter, reqs, p)
    assert all(r.visual_kept == r.visual_before > 0 for r in records)  # the reference prunes images only
    assert_valid_logits_equal(dense, pruned, valid)


def test_run_py_prunes_with_a_module_by_path_and_composes_with_weight_pruning(tmp_path):
    from pathlib import Path

    from mmprune_exp import ASSETS_DIR
    from mmprune_exp.config.schema import ModelConfig
    from mmprune_exp.models import load_adapter
    from tests.test_run_e2e import run_py

    # an untrained module for the shipped model: at threshold 0 every token passes, so the cap sets the count
    module_dir = fresh_module(load_adapter(ModelConfig(path=str(ASSETS_DIR / "qwen2_5_vl_tiny"), device="cpu"))).save(
        tmp_path / "glimpse")
    run_dir = tmp_path / "r"
    run_py(run_dir, "pruner=magnitude", "sparsity=s30", "token_pruner=glimpse", f"token_pruner.module={module_dir}",
           "token_pruner.threshold=0", "token_pruner.keep_ratio=0.25", "benchmark.limit=8", "logger=none")  # fmt: skip
    results = json.loads((run_dir / "results.json").read_text())
    assert results["choices"]["token_pruner"] == "glimpse"
    assert results["sparsity"] == pytest.approx(0.3, abs=0.01)
    rows = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    for row in rows:
        t = row["tokens"]
        assert t["visual_kept"] == int(0.25 * t["visual_before"]) and t["flops_ratio"] < 1.0
    assert all("tokens" not in r for r in (json.loads(x) for x in
                                           (Path(results["dense_cache"]) / "samples.jsonl").read_text().splitlines()))
    # a module path that holds no module fails at validation, before the model loads
    proc = run_py(tmp_path / "bad", "token_pruner=glimpse", f"token_pruner.module={tmp_path / 'nothing'}",
                  "logger=none", check=False)  # fmt: skip
    assert proc.returncode == 2 and "token_pruner.module" in proc.stderr + proc.stdout
    # so does a name with no module beside the model's weights, before the model loads (no dense baseline)
    proc = run_py(tmp_path / "bad_name", "token_pruner=glimpse", "token_pruner.module=nothing_here", "logger=none",
                  check=False)  # fmt: skip
    out = proc.stderr + proc.stdout
    assert proc.returncode == 2 and "nothing_here" in out and "make glimpse-model" in out
    assert "dense baseline" not in out and not (tmp_path / "bad_name" / "results.json").exists()


def test_train_run_writes_the_module_beside_the_model_and_logs_to_wandb(random_tiny_dir, tmp_path, one_thread):
    import shutil

    from mmprune_exp.config.schema import LoggerConfig, ModelConfig
    from mmprune_exp.token_pruners.glimpse import resolve_module_dir
    from mmprune_exp.tracking import read_offline_run
    from mmprune_exp.train_glimpse import run

    model_dir = tmp_path / "model"
    shutil.copytree(random_tiny_dir, model_dir)
    cfg = TrainGlimpseConfig(model=ModelConfig(path=str(model_dir), device="cpu"), samples=8, eval_samples=4, epochs=2,
                             batch_size=4, progress=False,
                             logger=LoggerConfig(name="wandb", mode="offline", job_type="train_glimpse"))  # fmt: skip
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    out = run(cfg, run_dir)
    assert out == model_dir / "glimpse" and resolve_module_dir(None, str(model_dir)) == out
    history = json.loads((out / "train_history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and 0 < history[-1]["kept_ratio_mean"] <= 1
    (offline,) = list((run_dir / "wandb").glob("offline-run-*"))
    logged = {k for step in read_offline_run(offline).history for k in step}
    assert {"train/loss", "train/dice", "train/bce", "eval/loss", "eval/kept_ratio_mean", "eval/kept_ratio_p90",
            "eval/target_recall"} <= logged  # fmt: skip


def test_token_report_counts_the_glimpse_path(saved):
    adapter, module, path = saved
    reqs = grounding_requests()
    with pruner(path, threshold=0.0).attach(adapter) as session:
        adapter.generate(reqs, 2)
        records = session.mechanism.records
        rows = [session.sample_row(r, len(reqs)) for r in records]
    shape = adapter.decoder_shape()
    for r, row in zip(records, rows):
        dense = shape.layer_flops(r.tokens_before) * shape.layers
        extra = (module.cfg.layer + 1) * 4 * r.tokens_before * shape.hidden * shape.kv_dim
        # every token kept: the stock work plus re-projecting keys and values in layers 0..K
        assert row["flops_ratio"] == pytest.approx(1.0 + extra / dense)
        assert row["glimpse_flops_ratio"] == pytest.approx(extra / dense) and 0 < extra / dense < 0.2
