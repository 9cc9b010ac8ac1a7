"""TAMP's DAS pruner (pruner=tamp_das) on a random tiny Qwen2.5-VL, against restatements of the reference."""

from __future__ import annotations

import pytest
import torch

from mmprune_exp.calibration import CalibrationData, shapes_calibration
from mmprune_exp.config.schema import CalibrationConfig, PrunerConfig, SparsityConfig
from mmprune_exp.errors import ConfigError
from mmprune_exp.pruners import build_pruner, sparsity_report
from mmprune_exp.pruners.das import das_sparsities
from mmprune_exp.pruners.tamp import TampConfig

MODULES = PrunerConfig().modules


@pytest.fixture(scope="module")
def calibration():
    return CalibrationData("shapes", shapes_calibration(CalibrationConfig(nsamples=4)), 512)


def restated_similarity(y: torch.Tensor, visual: torch.Tensor) -> tuple[float, float, float]:
    """TAMP's cos_pairwise_density written out: pairs i < j with a positive cosine, per modality; all V-L pairs."""
    y = y.reshape(-1, y.shape[-1]).double()
    y = y / y.norm(dim=1, keepdim=True)
    sims = y @ y.T
    v = visual.nonzero().flatten().tolist()
    t = (~visual).nonzero().flatten().tolist()

    def positive_pairs(idx):
        vals = [float(sims[i, j]) for a, i in enumerate(idx) for j in idx[a + 1 :] if sims[i, j] > 0]
        return sum(vals) / len(vals)

    vl = [float(sims[i, j]) for i in v for j in t]
    return positive_pairs(v), positive_pairs(t), sum(vl) / len(vl)


def forward_each(adapter, requests, visual: dict, handles: list) -> None:
    """The full model on each request (dense, no cache), ``visual["mask"]`` set for the hooks; then unhook."""
    with torch.no_grad():
        for request in requests:
            batch = adapter.encode([request])
            visual["mask"] = adapter.modality_mask(batch["input_ids"])[0]
            adapter.model(**batch, use_cache=False)
    for h in handles:
        h.remove()


def mean_diversity(per_sample: list[tuple[float, float, float]]) -> float:
    """3 − (vv + ll + vl), each the mean over samples."""
    return 3 - sum(sum(s[k] for s in per_sample) / len(per_sample) for k in range(3))


def restated_scores(adapter, requests) -> tuple[dict[str, float], dict[str, int]]:
    """Diversity of every target Linear's outputs on the dense model, from full-model forwards with hooks."""
    targets = adapter.target_linears(["language"], MODULES)
    per_sample: dict[str, list[tuple[float, float, float]]] = {n: [] for n in targets}
    visual = {}
    handles = [
        lin.register_forward_hook(lambda m, a, out, n=n: per_sample[n].append(restated_similarity(out, visual["mask"])))
        for n, lin in targets.items()
    ]
    forward_each(adapter, requests, visual, handles)
    scores = {n: mean_diversity(v) for n, v in per_sample.items()}
    return scores, {n: lin.weight.numel() for n, lin in targets.items()}


def test_das_sparsities_come_from_the_diversity_of_each_linears_dense_outputs(random_tiny, calibration):
    scores, sizes = restated_scores(random_tiny, calibration.requests)
    pruner = build_pruner(TampConfig(name="tamp_das", amia=False), SparsityConfig(value=0.6))
    pruner.prune(random_tiny, calibration)
    assert list(pruner.scores) == list(sizes)  # the model's parameter order, which the budget loop depends on
    for name, score in scores.items():
        # fp32 in the pruner vs float64 here, over a few hundred token pairs: agreement to ~1e-6 relative
        assert pruner.scores[name] == pytest.approx(score, rel=1e-5, abs=1e-6), name
    expected = das_sparsities(scores, sizes, 0.6, 0.7)
    for name, value in expected.items():
        # equal kept counts unless a score difference moves a ceil(): a few parameters of a ~4k-entry matrix
        assert pruner.matrix_values[name] == pytest.approx(value, abs=1e-3), name
    report = sparsity_report(pruner.targets(random_tiny), random_tiny)
    total = sum(sizes.values())
    assert sum(report.per_matrix[n] * sizes[n] for n in sizes) / total == pytest.approx(0.6, abs=0.01)
    assert max(report.per_matrix.values()) <= 0.7 + 1e-9  # the cap, s + 0.1
    for name, value in report.per_matrix.items():  # Wanda inside each matrix, at that matrix's sparsity
        in_features = random_tiny.model.get_submodule(name).in_features
        assert value == pytest.approx(int(in_features * pruner.matrix_values[name]) / in_features), name


def test_small_matrices_stay_denser_than_the_mlp(random_tiny, calibration):
    pruner = build_pruner(TampConfig(name="tamp_das", amia=False), SparsityConfig(value=0.6))
    pruner.prune(random_tiny, calibration)
    by_kind = {}
    for name, value in pruner.matrix_values.items():
        by_kind.setdefault(name.rsplit(".", 1)[-1], []).append(value)
    mean = {k: sum(v) / len(v) for k, v in by_kind.items()}
    assert max(mean["k_proj"], mean["v_proj"]) < min(mean["gate_proj"], mean["up_proj"], mean["down_proj"])


def test_paper_allocation_keeps_the_weighted_mean_and_spares_diverse_matrices(random_tiny, calibration):
    pruner = build_pruner(TampConfig(name="tamp_das", amia=False, allocation="paper"), SparsityConfig(value=0.5))
    pruner.prune(random_tiny, calibration)
    sizes = {n: lin.weight.numel() for n, lin in pruner.targets(random_tiny).items()}
    weighted = sum(pruner.matrix_values[n] * sizes[n] for n in sizes) / sum(sizes.values())
    assert weighted == pytest.approx(0.5, abs=1e-9)
    ranked = sorted(pruner.scores, key=pruner.scores.get)
    assert pruner.matrix_values[ranked[0]] >= pruner.matrix_values[ranked[-1]]  # more diverse -> pruned less


def test_nm_ignores_das_and_equals_wanda(random_tiny_dir, calibration):
    from mmprune_exp.config.schema import ModelConfig
    from mmprune_exp.models import load_adapter

    nm = SparsityConfig(value=0.5, structure="nm", n=2, m=4)
    masks = []
    for cfg in (TampConfig(name="tamp_das", amia=False), PrunerConfig(name="wanda")):
        adapter = load_adapter(ModelConfig(path=str(random_tiny_dir), device="cpu"))
        build_pruner(cfg, nm).prune(adapter, calibration)
        masks.append({n: lin.weight == 0 for n, lin in adapter.target_linears(["language"], MODULES).items()})
    assert all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])  # same code path, same inputs


def test_text_only_calibration_is_a_clear_error(random_tiny):
    from mmprune_exp.models.base import Request

    text_only = CalibrationData("text", [Request("a line of plain text", raw=True)] * 2, 512)
    with pytest.raises(ConfigError, match="DAS needs calibration samples with both visual and text tokens"):
        build_pruner(TampConfig(name="tamp_das", amia=False), SparsityConfig()).prune(random_tiny, text_only)


def test_a_cap_below_the_target_is_refused():
    with pytest.raises(ConfigError, match="pruner.max_sparsity=0.4"):
        build_pruner(TampConfig(name="tamp_das", amia=False, max_sparsity=0.4), SparsityConfig(value=0.5))


def test_tamp_with_both_halves_off_is_wanda_bit_for_bit(random_tiny_dir, calibration):
    from mmprune_exp.config.schema import ModelConfig
    from mmprune_exp.models import load_adapter

    masks = []
    for cfg in (TampConfig(name="tamp", das=False, amia=False), PrunerConfig(name="wanda")):
        adapter = load_adapter(ModelConfig(path=str(random_tiny_dir), device="cpu"))
        build_pruner(cfg, SparsityConfig(value=0.6)).prune(adapter, calibration)
        masks.append({n: lin.weight.clone() for n, lin in adapter.target_linears(["language"], MODULES).items()})
    assert all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])  # the same code path: Wanda's


def test_amia_statistic_is_sum_of_squares_over_the_selected_input_tokens(random_tiny, calibration, monkeypatch):
    """Layer 0, restated: each Linear's (input, output) from a plain forward of the dense layer, the prior from
    the adapter, AMIA's selection, Σx² over the selected input tokens divided by the selected count."""
    from mmprune_exp.pruners.amia import select_tokens
    from mmprune_exp.pruners.engine import collect_layer_inputs, forward_layer
    from mmprune_exp.pruners.tamp import TampPruner

    inputs = collect_layer_inputs(random_tiny, calibration.requests, 512)  # before pruning changes the model
    layer = random_tiny.decoder_layers()[0]
    targets = {n: lin for n, lin in random_tiny.target_linears(["language"], MODULES).items() if ".layers.0." in n}
    sums = {n: torch.zeros(lin.in_features) for n, lin in targets.items()}
    counts = dict.fromkeys(targets, 0)
    for x in inputs:
        prior = random_tiny.last_query_attention(layer, x)
        seen = {}
        handles = [lin.register_forward_hook(lambda m, a, o, n=n, seen=seen: seen.__setitem__(n, (a[0][0], o[0])))
                   for n, lin in targets.items()]  # fmt: skip
        with torch.no_grad():
            forward_layer(layer, x, torch.device("cpu"))
        for h in handles:
            h.remove()
        for name, (inp, out) in seen.items():
            picked = select_tokens(out, x.visual, prior).indices
            sums[name] += (inp[picked].double() ** 2).sum(0).float()
            counts[name] += len(picked)

    recorded = {}
    original = TampPruner.prune_linear

    def spy(self, name, linear, stat, sparsity):
        recorded[name] = (stat.scaler.clone(), stat.count)
        return original(self, name, linear, stat, sparsity)

    monkeypatch.setattr(TampPruner, "prune_linear", spy)
    pruner = build_pruner(TampConfig(name="tamp_amia", das=False), SparsityConfig(value=0.5))
    pruner.prune(random_tiny, calibration)
    for name in targets:
        scaler, count = recorded[name]
        assert count == counts[name] and 0 < count < sum(x.hidden.shape[1] for x in inputs), name  # a subset
        # float64 restatement vs the fp32 running sums: a few ulps relative
        assert torch.allclose(scaler, sums[name] / counts[name], rtol=1e-5, atol=1e-7), name
    report = pruner.report()
    tokens = report["amia_tokens_per_layer"]["0"]
    assert 0 < tokens["visual"] + tokens["text"] < tokens["total"]  # fewer tokens than the samples hold


def test_qwen_tamp_prunes_qkv_per_layer_by_input_diversity(random_tiny, calibration, monkeypatch):
    from mmprune_exp.pruners.amia import select_tokens
    from mmprune_exp.pruners.engine import collect_layer_inputs
    from mmprune_exp.pruners.qwen_tamp import QwenTampConfig, QwenTampPruner

    # Restated on the dense model: each decoder layer's input hidden states, from the model's own forward.
    layers = random_tiny.decoder_layers()
    per_layer: dict[int, list] = {i: [] for i in range(len(layers))}
    visual = {}
    handles = [layer.register_forward_pre_hook(
        lambda m, args, kwargs, i=i: per_layer[i].append(restated_similarity(
            kwargs.get("hidden_states", args[0] if args else None), visual["mask"])), with_kwargs=True)
        for i, layer in enumerate(layers)]  # fmt: skip
    forward_each(random_tiny, calibration.requests, visual, handles)
    expected_scores = {i: mean_diversity(v) for i, v in per_layer.items()}

    layer0 = collect_layer_inputs(random_tiny, calibration.requests, 512)  # dense layer-0 inputs
    q0 = "model.language_model.layers.0.self_attn.q_proj"
    sums, count = torch.zeros(random_tiny.model.get_submodule(q0).in_features), 0
    with torch.no_grad():
        for x in layer0:
            picked = select_tokens(x.hidden, x.visual, random_tiny.last_query_attention(layers[0], x)).indices
            normed = layers[0].input_layernorm(x.hidden)[0]  # what q/k/v receive
            sums += (normed[picked].double() ** 2).sum(0).float()
            count += len(picked)
    recorded = {}
    original = QwenTampPruner.prune_linear
    monkeypatch.setattr(QwenTampPruner, "prune_linear", lambda self, name, lin, stat, sp: (
        recorded.__setitem__(name, (stat.scaler.clone(), stat.count, sp.value)), original(self, name, lin, stat, sp)))

    pruner = build_pruner(QwenTampConfig(name="qwen_tamp"), SparsityConfig(value=0.5))
    pruner.prune(random_tiny, calibration)
    for i, score in expected_scores.items():
        assert pruner.layer_scores[i] == pytest.approx(score, rel=1e-5, abs=1e-6), i  # fp32 vs float64
    values = pruner.layer_values
    assert sum(values.values()) / len(values) == pytest.approx(0.5, abs=1e-9)  # equal layer sizes: plain mean
    ranked = sorted(values, key=lambda i: pruner.layer_scores[i])
    assert values[ranked[0]] >= values[ranked[-1]]  # less diverse input -> pruned more
    assert {n.rsplit(".", 1)[-1] for n in recorded} == {"q_proj", "k_proj", "v_proj"}  # nothing else pruned
    for name, (_, _, value) in recorded.items():
        assert value == values[int(name.split(".layers.")[1].split(".")[0])]  # one sparsity per layer
    scaler, n, _ = recorded[q0]
    assert n == count and torch.allclose(scaler, sums / count, rtol=1e-5, atol=1e-7)  # selected inputs only
    report = sparsity_report(pruner.targets(random_tiny), random_tiny)
    assert all(".self_attn." in name for name in report.per_matrix)
