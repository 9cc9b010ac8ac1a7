"""The sequential layer engine on a random tiny Qwen2.5-VL: capture, replay, propagation, determinism."""

from __future__ import annotations

import pytest
import torch

from mmprune_exp.calibration import CalibrationData, shapes_calibration
from mmprune_exp.config.schema import CalibrationConfig, PrunerConfig, SparsityConfig
from mmprune_exp.pruners import build_pruner
from mmprune_exp.pruners.engine import SequentialEngine, collect_layer_inputs
from mmprune_exp.pruners.stats import RowScaler


@pytest.fixture(scope="module")
def requests():
    return shapes_calibration(CalibrationConfig(nsamples=6))


def test_capture_keeps_layer_inputs_and_visual_masks(random_tiny, requests):
    inputs = collect_layer_inputs(random_tiny, requests, max_length=512)
    assert len(inputs) == len(requests)
    for x, req in zip(inputs, requests):
        ids = random_tiny.encode([req])["input_ids"][0]
        assert x.hidden.shape == (1, len(ids), random_tiny.model.config.text_config.hidden_size)
        assert int(x.visual.sum()) == 64  # one 112x112 image = 8x8 merged visual tokens (7 px patches, 2x2 merged)
        cos, _sin = x.kwargs["position_embeddings"]
        assert cos.shape[-2] == len(ids)


def test_replaying_layers_reproduces_the_models_own_forward(random_tiny, requests):
    layers = random_tiny.decoder_layers()
    seen = []
    handle = layers[-1].register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        for req in requests[:3]:
            random_tiny.model(**random_tiny.encode([req]), use_cache=False)
    handle.remove()
    engine = SequentialEngine(random_tiny, {})
    final = engine.run(collect_layer_inputs(random_tiny, requests[:3], 512), RowScaler, lambda *a: False)
    for x, ref in zip(final, seen):
        assert torch.allclose(x.hidden, ref, atol=1e-5)


def test_statistics_see_the_outputs_of_earlier_pruned_layers(random_tiny, random_tiny_dir, requests):
    """Stats of layer i must equal those of a model whose layers < i are pruned and layer i is still dense."""
    from mmprune_exp.config.schema import ModelConfig
    from mmprune_exp.models import load_adapter

    targets = random_tiny.target_linears(["language"], ["up_proj"])
    recorded = {}

    def prune_half(index, linears, stats):
        for name, lin in linears.items():
            recorded[name] = stats[name].scaler.clone()
            lin.weight[lin.weight.abs() < lin.weight.abs().median()] = 0
        return True

    inputs = collect_layer_inputs(random_tiny, requests, 512)
    SequentialEngine(random_tiny, targets).run(inputs, lambda lin: RowScaler(lin.in_features), prune_half)
    pruned = dict(random_tiny.model.named_parameters())
    check = load_adapter(ModelConfig(path=str(random_tiny_dir), device="cpu"))
    for i in range(len(check.decoder_layers())):
        name = f"model.language_model.layers.{i}.mlp.up_proj"
        with torch.no_grad():  # layers before i pruned as the engine left them, layer i dense
            for j in range(i):
                w = f"model.language_model.layers.{j}.mlp.up_proj.weight"
                check.model.get_parameter(w).copy_(pruned[w])
        stat = RowScaler(check.model.get_submodule(name).in_features)
        handle = check.model.get_submodule(name).register_forward_hook(lambda m, a, o, stat=stat: stat.add(a[0]))
        with torch.no_grad():
            for req in requests:
                check.model(**check.encode([req]), use_cache=False)
        handle.remove()
        assert torch.allclose(stat.scaler, recorded[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_same_seed_same_masks(random_tiny_dir, requests, method):
    from mmprune_exp.config.schema import ModelConfig
    from mmprune_exp.models import load_adapter
    from mmprune_exp.pruners.sparsegpt import SparseGPTConfig

    cfg = SparseGPTConfig(name=method) if method == "sparsegpt" else PrunerConfig(name=method)
    masks = []
    for _ in range(2):
        adapter = load_adapter(ModelConfig(path=str(random_tiny_dir), device="cpu"))
        build_pruner(cfg, SparsityConfig()).prune(adapter, CalibrationData("shapes", requests, 512))
        masks.append({n: lin.weight == 0 for n, lin in adapter.target_linears(["language"], cfg.modules).items()})
    assert all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])


def test_max_length_never_cuts_visual_tokens(random_tiny, requests):
    with pytest.raises(ValueError, match="calibration.max_length=8"):
        collect_layer_inputs(random_tiny, requests[:1], max_length=8)
    full = collect_layer_inputs(random_tiny, requests[:1], max_length=512)[0]
    cut = collect_layer_inputs(random_tiny, requests[:1], max_length=full.hidden.shape[1] - 3)[0]
    assert cut.hidden.shape[1] == full.hidden.shape[1] - 3
    assert torch.allclose(cut.hidden, full.hidden[:, :-3])


def test_calibrated_pruners_refuse_the_vision_tower(random_tiny, requests):
    pruner = build_pruner(PrunerConfig(name="wanda", scope=["vision"]), SparsityConfig())
    with pytest.raises(ValueError, match="language-decoder"):
        pruner.prune(random_tiny, CalibrationData("shapes", requests, 512))


def test_linears_reading_the_same_input_share_one_statistic(random_tiny, requests):
    targets = random_tiny.target_linears(["language"], PrunerConfig().modules)
    seen = {}

    def record(index, linears, stats):
        seen[index] = stats
        return False

    inputs = collect_layer_inputs(random_tiny, requests[:2], 512)
    SequentialEngine(random_tiny, targets).run(inputs, lambda lin: RowScaler(lin.in_features), record)
    stats = seen[0]
    p = "model.language_model.layers.0."
    assert stats[p + "self_attn.q_proj"] is stats[p + "self_attn.k_proj"] is stats[p + "self_attn.v_proj"]
    assert stats[p + "mlp.gate_proj"] is stats[p + "mlp.up_proj"]
    assert stats[p + "self_attn.o_proj"] is not stats[p + "self_attn.q_proj"]
    assert len({id(s) for s in stats.values()}) == 4 and stats[p + "mlp.down_proj"].n == 2


class OutputRecorder:
    """An output statistic that keeps what the engine hands it."""

    uses_output = True

    def __init__(self, linear):
        self.linear = linear
        self.calls = []

    def add(self, x, y, sample):
        self.calls.append((x.detach().clone(), y.detach().clone(), sample))


def test_output_statistics_see_each_linears_output_the_visual_mask_and_prepared_values(random_tiny, requests):
    targets = random_tiny.target_linears(["language"], PrunerConfig().modules)
    inputs = collect_layer_inputs(random_tiny, requests[:3], 512)
    seen, prepared = {}, []

    def prepare(index, layer, x):
        prepared.append((index, x.hidden.clone()))
        return {"tag": (index, float(x.hidden.sum()))}

    def record(index, linears, stats):
        seen[index] = stats
        return False

    SequentialEngine(random_tiny, targets).run(inputs, OutputRecorder, record, prepare_sample=prepare)
    n_layers = len(random_tiny.decoder_layers())
    assert [i for i, _ in prepared] == [i for i in range(n_layers) for _ in range(3)]  # once per sample and layer
    assert torch.equal(prepared[0][1], inputs[0].hidden)  # computed from the layer's own input
    p = "model.language_model.layers.0."
    stats = seen[0]
    assert len({id(s) for s in stats.values()}) == 7  # one per Linear, even where inputs are shared
    for stat in stats.values():
        assert len(stat.calls) == 3  # every sample reached every hooked Linear (the early stop waits for outputs)
        for k, (x, y, sample) in enumerate(stat.calls):
            assert sample.index == k and torch.equal(sample.visual, inputs[k].visual)
            assert sample.values["tag"][0] == 0
            # the Linear's own output for that input (recomputed: a BLAS may round a copy at another alignment
            # differently, hence a float tolerance rather than equality)
            assert torch.allclose(y, stat.linear(x), rtol=1e-5, atol=1e-6)
    assert torch.equal(stats[p + "self_attn.q_proj"].calls[0][0], stats[p + "self_attn.k_proj"].calls[0][0])


def test_a_pruner_may_give_each_matrix_its_own_sparsity(random_tiny, requests):
    from dataclasses import replace

    from mmprune_exp.pruners import sparsity_report

    pruner = build_pruner(PrunerConfig(name="wanda"), SparsityConfig())
    per_matrix = {"q_proj": 0.25, "k_proj": 0.0, "v_proj": 0.0, "o_proj": 0.25, "gate_proj": 0.5, "up_proj": 0.5,
                  "down_proj": 0.75}  # fmt: skip
    pruner.matrix_sparsity = lambda name, index: replace(pruner.sparsity, value=per_matrix[name.rsplit(".", 1)[-1]])
    pruner.prune(random_tiny, CalibrationData("shapes", requests[:2], 512))
    report = sparsity_report(pruner.targets(random_tiny), random_tiny)
    for name, value in report.per_matrix.items():
        assert value == pytest.approx(per_matrix[name.rsplit(".", 1)[-1]], abs=0.01), name
