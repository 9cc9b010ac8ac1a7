"""token_pruner=yopo: every strategy off is the dense model; each strategy changes only what it claims and equals a
restatement of the reference's masking simulation on its layer; the head mask is deterministic and reusable; the
savings are real (FLOPs counted on the executed ops equal the analytic work the token report uses).

The restatement (:func:`simulate_layer`) computes one decoder layer densely, as the released YOPO code does: full
eager attention with the local window written into the mask, post-softmax head-mask multiplications, zeroed visual
rows of dropped heads, zeroed FFN activations. The mechanism computes the same thing by *skipping* work, with other
kernels and reduction orders, so the two agree to float rounding, not bitwise.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mmprune_exp import ASSETS_DIR
from mmprune_exp.calibration import CalibrationData, build_calibration
from mmprune_exp.config.schema import CalibrationConfig, ModelConfig
from mmprune_exp.data import scenes
from mmprune_exp.errors import ConfigError
from mmprune_exp.models import load_adapter
from mmprune_exp.models.attention_prior import rotate_half
from mmprune_exp.models.token_reduction import LayerPlan
from mmprune_exp.token_pruners import build_token_pruner
from mmprune_exp.token_pruners.yopo import HEAD_MASK_FILE, YopoConfig, calibrate, head_mask_from_ratios
from tests.token_pruners.common import assert_valid_logits_equal, generate, image_request, prompt_logits, video_request

TINY = str(ASSETS_DIR / "qwen2_5_vl_tiny")
#: fp32 on CPU: the mechanism's split, skipped computation and the dense restatement differ only by reduction order
#: (observed differences ~1e-6 on hidden states of norm ~10); 1e-4 is far below what a strategy changes (>0.1)
ATOL = 1e-4
OFF = {"heads": False, "layer_drop": False}  # every strategy off (window and ffn are off by default)


@pytest.fixture(scope="module")
def adapter():
    return load_adapter(ModelConfig(path=TINY, device="cpu"))


@pytest.fixture(scope="module")
def calibration() -> CalibrationData:
    return build_calibration(CalibrationConfig(nsamples=8))


@pytest.fixture(scope="module")
def prepared(adapter, calibration, tmp_path_factory):
    """A head mask and a neuron ranking calibrated once on the calibration set (run dir: their artifacts)."""
    run_dir = tmp_path_factory.mktemp("yopo_run")
    pruner = build_token_pruner(YopoConfig(ffn=True))
    pruner.prepare(adapter, calibration, run_dir)
    return pruner, run_dir


def image_side(adapter) -> int:
    """Merged visual tokens per side of a scene image for this model's processor (patch x merge pixels each)."""
    ip = adapter.processor.image_processor
    return scenes.IMAGE_SIZE // (ip.patch_size * ip.merge_size)


def requests():
    reqs = [image_request(0), image_request(1), image_request(2)]
    reqs[1].text += " Answer with one word, please."  # a longer prompt: the batch is left-padded
    return reqs


def yopo(prepared, **kw):
    """A YOPO pruner with the calibrated mask/ranking of ``prepared`` and the given switches."""
    pruner = build_token_pruner(YopoConfig(**kw))
    pruner.head_mask, pruner.neuron_importance = prepared[0].head_mask, prepared[0].neuron_importance
    return pruner


def observe(adapter, inputs, plans=None, points=()):
    """Run the prompt forward with a probe on every layer; per layer its observation, the logits, the records."""
    seen = {}

    def probe(obs):
        seen[obs.layer] = obs

    n = adapter.decoder_shape().layers
    plans = {i: dataclasses.replace((plans or {}).get(i, LayerPlan()), probe=probe) for i in range(n)}
    with torch.no_grad(), adapter.token_reduction(list(points), plans=plans) as tr:
        logits = adapter.model(**inputs).logits
    return seen, logits, tr.records


# -- the reference's masking simulation of one decoder layer ------------------------------------------------


def grid_coords(obs, b):
    """Per slot of sample ``b``: (item number, t, h, w) of a visual token, -1 rows for text/padding."""
    coords = torch.full((obs.origin.shape[1], 4), -1, dtype=torch.long)
    for n, item in enumerate(obs.items[b]):
        _, h, w = item.grid
        for slot, o in enumerate(obs.origin[b].tolist()):
            if item.start <= o < item.stop:
                rel = o - item.start
                coords[slot] = torch.tensor([n, rel // (h * w), (rel // w) % h, rel % w])
    return coords


@torch.no_grad()
def simulate_layer(adapter, obs, heads=None, zero_text=False, window=None, causal_window=False, neurons=None,
                   hide_visual=False):  # fmt: skip
    """One decoder layer as the released code computes it, from the observed input (dense, masking only)."""
    layer = adapter.decoder_layers()[obs.layer]
    attn = layer.self_attn
    x = obs.hidden
    b, s, _ = x.shape
    heads_n, hd = attn.config.num_attention_heads, attn.head_dim
    cos, sin = adapter.model.model.language_model.rotary_emb(x, obs.position_ids)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    h = layer.input_layernorm(x)
    q = attn.q_proj(h).view(b, s, -1, hd).transpose(1, 2)
    k = attn.k_proj(h).view(b, s, -1, hd).transpose(1, 2)
    v = attn.v_proj(h).view(b, s, -1, hd).transpose(1, 2)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k, v = (t.repeat_interleave(attn.num_key_value_groups, dim=1) for t in (k, v))
    valid, visual = obs.attention_mask.bool(), obs.visual & obs.attention_mask.bool()
    allowed = valid[:, None, :] & torch.tril(torch.ones(s, s, dtype=torch.bool))[None]
    allowed |= ~valid[:, :, None] & torch.eye(s, dtype=torch.bool)[None]  # padding rows: finite, never compared
    if window is not None:  # LLaVA's local_mask: the visual block of the mask replaced by the window
        r = (window - 1) // 2
        for bi in range(b):
            c = grid_coords(obs, bi)
            near = (c[:, None, 0] == c[None, :, 0]) & ((c[:, None, 1:] - c[None, :, 1:]).abs() <= r).all(-1)
            if causal_window:
                near &= torch.tril(torch.ones(s, s, dtype=torch.bool))
            block = visual[bi][:, None] & visual[bi][None, :]
            allowed[bi] = torch.where(block, near, allowed[bi])
    if hide_visual:  # the reference's layer cut: no query reaches a visual key (visual rows keep their own key)
        allowed &= ~visual[:, None, :] | torch.eye(s, dtype=torch.bool)[None]
    scores = (q @ k.transpose(-1, -2)) * attn.scaling
    p = torch.softmax(scores.masked_fill(~allowed[:, None], float("-inf")), dim=-1)
    if heads is not None and zero_text:  # post-softmax head mask on the visual keys, no renormalisation
        p = p * torch.where(visual[:, None, None, :], heads[None, :, None, None].float(), 1.0)
    o = p @ v  # [B, heads, S, hd]
    if heads is not None:  # a dropped head's output is zero for visual queries
        o = o * torch.where(visual[:, None, :, None], heads[None, :, None, None].float(), 1.0)
    x = x + attn.o_proj(o.transpose(1, 2).reshape(b, s, heads_n * hd))
    y = layer.post_attention_layernorm(x)
    gate, up = layer.mlp.gate_proj(y), layer.mlp.up_proj(y)
    if neurons is not None:  # the reference zeroes the skipped neurons' gate and up activations of visual rows
        skipped = torch.ones(gate.shape[-1], dtype=torch.bool)
        skipped[neurons] = False
        cut = visual[..., None] & skipped
        gate, up = gate.masked_fill(cut, 0.0), up.masked_fill(cut, 0.0)
    return x + layer.mlp.down_proj(layer.mlp.act_fn(gate) * up)


def rows_close(a, b, rows):
    return torch.allclose(a[rows], b[rows], atol=ATOL, rtol=0)


# -- every strategy off ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_every_strategy_off_reproduces_the_dense_model_exactly(attn):
    adapter = load_adapter(ModelConfig(path=TINY, device="cpu", attn_implementation=attn))
    reqs = requests()
    dense, valid, _ = prompt_logits(adapter, reqs)
    stock_text = adapter.generate(reqs, 6)
    every_head = build_token_pruner(YopoConfig(layer_drop=False))
    every_head.head_mask = torch.ones(4, 4, dtype=torch.bool)  # heads on, but the mask keeps them all
    # keep_ratio 1.0 is the stock model whatever is switched on (the convention of every token pruner)
    keep_all = build_token_pruner(YopoConfig(keep_ratio=1.0, window=True, ffn=True))
    assert not keep_all.needs_calibration
    for pruner in (build_token_pruner(YopoConfig(**OFF)), every_head, keep_all):
        if pruner is not keep_all:
            assert pruner.layer_plans(adapter) == {} and pruner.points(adapter) == []
        pruned, _, _ = prompt_logits(adapter, reqs, pruner)
        assert_valid_logits_equal(dense, pruned, valid)  # the stock layer calls: bitwise, not approximately
        with pruner.attach(adapter) as session:
            assert adapter.generate(reqs, 6) == stock_text
            rows = [r["tokens"] for r in session(["a", "b", "c"], reqs)]
        # ratios of sums of the same integer layer FLOPs: exactly 1
        assert all(r["flops_ratio"] == 1.0 and r["visual_flops_ratio"] == 1.0 and r["kept_ratio"] == 1.0 for r in rows)


# -- head mask: calibration, rules, artifact, reuse --------------------------------------------------------------


def test_head_ratios_are_the_share_of_attention_to_visual_keys_in_the_models_own_attention(calibration):
    eager = load_adapter(ModelConfig(path=TINY, device="cpu", attn_implementation="eager"))
    reqs = calibration.requests[:2]
    cal = calibrate(eager, reqs, calibration.max_length)
    for n, req in enumerate(reqs):
        batch = eager.encode([req])
        with torch.no_grad():
            attentions = eager.model(**batch, output_attentions=True).attentions
        visual = eager.modality_mask(batch["input_ids"])[0]
        for layer, a in enumerate(attentions):  # [1, heads, S, S]: gen_mask_llava's sums over rows and keys
            expected = a[0][:, :, visual].sum((1, 2)) / a[0][:, :, ~visual].sum((1, 2))
            assert torch.allclose(cal.ratios[n, layer].float(), expected, rtol=1e-5)  # fp32 sums, other order


def test_the_head_mask_is_deterministic_for_a_calibration_set_and_save_then_load_reuses_it(
    adapter, calibration, prepared, tmp_path
):
    first, run_dir = prepared
    again = build_token_pruner(YopoConfig())
    again.prepare(adapter, calibration, tmp_path / "again")
    saved = torch.load(run_dir / HEAD_MASK_FILE, weights_only=True)
    assert torch.equal(saved["ratios"], torch.load(tmp_path / "again" / HEAD_MASK_FILE, weights_only=True)["ratios"])
    assert torch.equal(again.head_mask, first.head_mask) and torch.equal(saved["mask"], first.head_mask)
    summary = json.loads((run_dir / HEAD_MASK_FILE).with_suffix(".json").read_text())
    assert summary["samples"] == 8 and summary["kept_per_layer"] == first.head_mask.sum(1).tolist()
    # the default rule: layers 0-1 keep every head, later layers exactly round(0.5 * 4) of them
    assert first.head_mask.sum(1).tolist() == [4, 4, 2, 2]  # keep_ratio 0.5 -> head_keep 0.5

    reused = build_token_pruner(YopoConfig(head_mask=str(run_dir / HEAD_MASK_FILE), layer_drop=False))
    assert not reused.needs_calibration
    reused.prepare(adapter, None, tmp_path / "reused")  # nothing to calibrate: no calibration set needed
    assert torch.equal(reused.head_mask, first.head_mask)
    assert (tmp_path / "reused" / HEAD_MASK_FILE).exists()  # the run that reused it records it too
    inputs = adapter.encode(requests())
    _, a, _ = observe(adapter, inputs, yopo(prepared, layer_drop=False).layer_plans(adapter))
    _, b, _ = observe(adapter, inputs, reused.layer_plans(adapter))
    assert torch.equal(a, b)  # the same plans, the same computation
    # the reference's own formats: a bare [layers, heads] tensor (Qwen2-VL's headmask .pth) and .npy (LLaVA's)
    torch.save(first.head_mask.clone(), tmp_path / "bare.pth")
    np.save(tmp_path / "llava.npy", first.head_mask.numpy())
    for path in (tmp_path / "bare.pth", tmp_path / "llava.npy", (run_dir / HEAD_MASK_FILE).with_suffix(".json")):
        other = build_token_pruner(YopoConfig(head_mask=str(path)))
        other.prepare(adapter, None, None)
        assert torch.equal(other.head_mask, first.head_mask)
    torch.save(torch.ones(3, 4, dtype=torch.bool), tmp_path / "wrong.pt")
    with pytest.raises(ConfigError, match="3, 4"):
        build_token_pruner(YopoConfig(head_mask=str(tmp_path / "wrong.pt"))).prepare(adapter, None, None)


def test_threshold_rule_is_gen_mask_llavas_majority_vote_and_the_budget_rule_keeps_exactly_its_share():
    ratios = torch.rand(10, 5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cfg = YopoConfig(head_threshold=0.4, head_vote=0.4)
    mask, _ = head_mask_from_ratios(ratios, cfg)
    # restated from gen_mask_llava.py: per sample, layers >= 2 vote r > thr, earlier layers always; keep votes > 40%
    total = np.zeros((5, 6))
    for i in range(10):
        for layer in range(5):
            total[layer] += (ratios[i, layer] > 0.4).int().numpy() if layer >= 2 else 1
    assert np.array_equal(mask.numpy(), total > 0.4 * 10)

    budget, votes = head_mask_from_ratios(ratios, YopoConfig(head_keep=0.5))
    assert budget[:2].all() and budget[2:].sum(1).tolist() == [3, 3, 3]
    for layer in range(2, 5):  # the kept heads have at least as many votes as any dropped head
        assert votes[layer][budget[layer]].min() >= votes[layer][~budget[layer]].max()
    # a tie in votes is broken by the larger mean ratio, then by the lower index
    tie = torch.tensor([[[0.9, 0.1, 0.5, 0.2]], [[0.1, 0.8, 0.2, 0.5]]], dtype=torch.float64)
    assert head_mask_from_ratios(tie, YopoConfig(head_keep=0.25, head_first_layer=0))[0][0].tolist() == [
        True, False, False, False]  # fmt: skip
    tie = torch.tensor([[[0.2, 0.1, 0.5, 0.6]], [[0.1, 0.2, 0.6, 0.5]]], dtype=torch.float64)
    assert head_mask_from_ratios(tie, YopoConfig(head_keep=0.25, head_first_layer=0))[0][0].tolist() == [
        False, False, True, False]  # fmt: skip


def test_prepare_needs_a_calibration_set_only_for_what_it_calibrates(adapter):
    assert YopoConfig().heads and build_token_pruner(YopoConfig()).needs_calibration
    assert not build_token_pruner(YopoConfig(heads=False)).needs_calibration
    assert build_token_pruner(YopoConfig(heads=False, ffn=True)).needs_calibration
    assert not build_token_pruner(YopoConfig(heads=False, ffn=True, ffn_rank="index")).needs_calibration
    with pytest.raises(ConfigError, match="calibration"):
        build_token_pruner(YopoConfig()).prepare(adapter, None, None)
    with pytest.raises(ConfigError, match="head mask"):
        build_token_pruner(YopoConfig()).layer_plans(adapter)
    with pytest.raises(ValueError, match="head_keep"):  # the schema's field error (run.py reports it by key)
        YopoConfig(head_keep=1.5)


def test_keep_ratio_is_the_share_of_heads_and_neurons_unless_they_are_set(adapter):
    ratios = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert head_mask_from_ratios(ratios, YopoConfig(keep_ratio=0.25))[0][2:].sum(1).tolist() == [1, 1]
    assert head_mask_from_ratios(ratios, YopoConfig(keep_ratio=0.25, head_keep=0.75))[0][2:].sum(1).tolist() == [3, 3]
    plans = build_token_pruner(YopoConfig(keep_ratio=0.25, heads=False, ffn=True, ffn_rank="index")).layer_plans(adapter)
    assert plans[0].visual_neurons.numel() == 128  # int(512 * 0.25)
    plans = build_token_pruner(YopoConfig(keep_ratio=0.25, heads=False, ffn=True, ffn_rank="index",
                                          ffn_keep=0.5)).layer_plans(adapter)  # fmt: skip
    assert plans[0].visual_neurons.numel() == 256


# -- each strategy changes only what it claims, as the reference computes it ---------------------------------


@pytest.mark.parametrize("scope", ["visual_queries", "reference"])
def test_visual_head_dropping(adapter, prepared, scope):
    inputs = adapter.encode(requests())
    pruner = yopo(prepared, layer_drop=False, head_scope=scope)
    plans = pruner.layer_plans(adapter)
    assert sorted(plans) == [2, 3]  # layers 0-1 keep every head
    dense, _, _ = observe(adapter, inputs)
    pruned, _, records = observe(adapter, inputs, plans)
    valid = inputs["attention_mask"].bool()
    text = valid & ~dense[0].visual
    visual = valid & dense[0].visual
    for layer in (0, 1):  # stock layers on the same inputs
        assert torch.equal(pruned[layer].output, dense[layer].output)
    obs = pruned[2]
    if scope == "visual_queries":
        assert rows_close(obs.output, dense[2].output, text)  # text queries attend as before
    else:  # the reference also hides visual keys from text queries in dropped heads
        assert not rows_close(obs.output, dense[2].output, text)
    assert (obs.output[visual] - dense[2].output[visual]).abs().max() > 0.1
    for layer in (2, 3):
        expected = simulate_layer(adapter, pruned[layer], heads=pruner.head_mask[layer], zero_text=scope == "reference")
        assert rows_close(pruned[layer].output, expected, valid)
    work = records[0].layer_work
    assert [w.visual_head_share for w in work] == [1.0, 1.0, 0.5, 0.5]


@pytest.mark.parametrize("causal", [False, True])
def test_neighbour_only_visual_attention(adapter, causal):
    inputs = adapter.encode(requests())
    pruner = build_token_pruner(YopoConfig(**OFF, window=True, window_size=3, window_causal=causal))
    plans = pruner.layer_plans(adapter)
    dense, _, _ = observe(adapter, inputs)
    pruned, _, records = observe(adapter, inputs, plans)
    valid = inputs["attention_mask"].bool()
    text, visual = valid & ~dense[0].visual, valid & dense[0].visual
    assert rows_close(pruned[0].output, dense[0].output, text)  # text tokens at the first layer: untouched
    assert (pruned[0].output[visual] - dense[0].output[visual]).abs().max() > 0.1
    for layer in range(4):
        expected = simulate_layer(adapter, pruned[layer], window=3, causal_window=causal)
        assert rows_close(pruned[layer].output, expected, valid)
    # analytic keys per visual query: every text key + the in-grid 3x3 neighbours; along an axis of n tokens a
    # 3-window holds 3n - 2 in-grid neighbours in all (2 at each border), (3n - 2) / n on average
    record = records[0]
    (item,) = record.items
    t, h, w = item.grid
    assert t == 1 and h == w == image_side(adapter)
    text_keys = record.tokens_before - record.visual_before
    per_axis = (3 * h - 2) / h
    assert record.layer_work[0].visual_keys == pytest.approx(text_keys + per_axis * per_axis)


def test_a_causal_window_covering_the_whole_grid_is_the_dense_model(adapter):
    reqs = [image_request(0), video_request(0)]
    inputs = adapter.encode(reqs)
    valid = inputs["attention_mask"].bool()
    dense, _, _ = prompt_logits(adapter, reqs)
    pruner = build_token_pruner(YopoConfig(**OFF, window=True, window_size=99, window_causal=True))
    pruned, _, _ = prompt_logits(adapter, reqs, pruner)
    # the planned path (split queries, gathered neighbours) computes the stock attention: equal up to rounding
    assert torch.allclose(pruned[valid], dense[valid], atol=ATOL, rtol=0)


def test_sparse_visual_ffn(adapter, prepared):
    inputs = adapter.encode(requests())
    m = adapter.decoder_shape().intermediate
    index = build_token_pruner(YopoConfig(**OFF, ffn=True, ffn_rank="index", ffn_keep=0.5))
    plans = index.layer_plans(adapter)
    assert all(torch.equal(p.visual_neurons, torch.arange(m // 2)) for p in plans.values())  # the reference's
    dense, _, _ = observe(adapter, inputs)
    pruned, _, records = observe(adapter, inputs, plans)
    valid = inputs["attention_mask"].bool()
    text, visual = valid & ~dense[0].visual, valid & dense[0].visual
    assert rows_close(pruned[0].output, dense[0].output, text)  # text tokens use every neuron
    assert (pruned[0].output[visual] - dense[0].output[visual]).abs().max() > 0.1
    for layer in range(4):
        expected = simulate_layer(adapter, pruned[layer], neurons=plans[layer].visual_neurons)
        assert rows_close(pruned[layer].output, expected, valid)
    assert [w.visual_neuron_share for w in records[0].layer_work] == [0.5] * 4


def test_activation_ranking_keeps_the_neurons_with_the_largest_mean_contribution_on_visual_tokens(
    adapter, calibration, prepared
):
    pruner = yopo(prepared, heads=False, layer_drop=False, ffn=True, ffn_keep=0.25)
    plans = pruner.layer_plans(adapter)
    # restated with plain module hooks on the stock model: mean |input of down_proj| over the visual tokens
    sums, count = torch.zeros(4, adapter.decoder_shape().intermediate, dtype=torch.float64), 0
    current = {}
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(i, a[0][0]))
             for i, layer in enumerate(adapter.decoder_layers())]  # fmt: skip
    try:
        for req in calibration.requests:
            batch = adapter.encode([req])
            visual = adapter.modality_mask(batch["input_ids"])[0]
            with torch.no_grad():
                adapter.model(**batch)
            for i in range(4):
                sums[i] += current[i][visual].abs().double().sum(0)
            count += int(visual.sum())
    finally:
        for h in hooks:
            h.remove()
    norms = torch.stack([layer.mlp.down_proj.weight.double().norm(dim=0) for layer in adapter.decoder_layers()])
    score = sums / count * norms
    for i in range(4):
        kept = set(plans[i].visual_neurons.tolist())
        assert len(kept) == 128
        # every kept neuron scores at least as high as every skipped one (a tie straddling the cut may go
        # either way, hence the comparison of scores rather than of index sets)
        inside = score[i][sorted(kept)]
        outside = score[i][sorted(set(range(512)) - kept)]
        assert inside.min() >= outside.max() - 1e-9 * outside.max()


def test_visual_token_drop_changes_nothing_before_the_last_layers(adapter):
    inputs = adapter.encode(requests())
    pruner = build_token_pruner(YopoConfig(heads=False, layer_drop=True, drop_layers=2))
    dense, dense_logits, _ = observe(adapter, inputs)
    pruned, logits, records = observe(adapter, inputs, pruner.layer_plans(adapter), pruner.points(adapter))
    for layer in (0, 1):
        assert torch.equal(pruned[layer].output, dense[layer].output)  # the stock layers before the drop
    for layer in (2, 3):
        assert not pruned[layer].visual.any()  # the visual tokens left the sequence
    valid = inputs["attention_mask"].bool()
    for r, v in zip(records, valid):
        n, visual = int(v.sum()), r.visual_before
        assert r.tokens_per_layer == [n, n, n - visual, n - visual]
        assert r.visual_kept == 0 and r.kv_cache_tokens == 2 * n + 2 * (n - visual)
    # the reference blocks every query from the visual keys in those layers instead: the text ends the same
    hidden = dense[1].output
    for layer in (2, 3):
        obs = dataclasses.replace(dense[layer], hidden=hidden, layer_input=hidden)
        hidden = simulate_layer(adapter, obs, hide_visual=True)
    with torch.no_grad():
        expected = adapter.model.lm_head(adapter.model.model.language_model.norm(hidden))
    text = valid & ~dense[0].visual
    kept_logits = torch.cat([logits[b, -int(text[b].sum()) :] for b in range(len(records))])
    assert torch.allclose(kept_logits, expected[text], atol=ATOL, rtol=0)
    assert not torch.allclose(dense_logits[text], expected[text], atol=ATOL, rtol=0)  # the drop does change the text


# -- savings are real --------------------------------------------------------------------------------------------


def counted_flops(adapter, inputs, pruner):
    """FLOPs of the executed matmuls inside the language model (SDPA's math backend, whose matmuls are counted),
    and the token report's row."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), pruner.attach(adapter) as session, counter, sdpa_kernel(SDPBackend.MATH):
        adapter.model(**inputs)
        row = session.sample_row(session.mechanism.records[0], 1)
        record = session.mechanism.records[0]
    counts = counter.get_flop_counts()
    (name,) = [k for k in counts if k.endswith("model.language_model")]
    return sum(counts[name].values()), row, record


def test_savings_are_real_the_executed_flops_are_the_analytic_ones(adapter, prepared):
    inputs = adapter.encode([image_request(0)])  # one sample: no padding slots in the executed shapes
    shape = adapter.decoder_shape()
    dense, _, dense_record = counted_flops(adapter, inputs, build_token_pruner(YopoConfig(**OFF)))
    assert dense == shape.layer_flops(dense_record.tokens_before) * shape.layers  # the convention is what runs
    for kw in ({"heads": True}, {"ffn": True}, {"layer_drop": True}, {"heads": True, "ffn": True, "layer_drop": True}):
        pruner = yopo(prepared, **(OFF | kw))
        executed, row, record = counted_flops(adapter, inputs, pruner)
        analytic = sum(shape.work_flops(w) for w in record.layer_work)
        assert executed == analytic, kw  # every skipped head, neuron and token is a matmul row not executed
        assert executed < dense and row["flops_ratio"] == pytest.approx(executed / dense, rel=1e-12)
        assert 0 < row["visual_flops_ratio"] < 1
    # the window: the analytic count takes the in-grid neighbours; the executed one also the padded slots of the
    # gathered [queries, w*w] block at the grid's border (n x n grid, w=3: 9 n^2 gathered, (3n - 2)^2 inside)
    pruner = build_token_pruner(YopoConfig(**OFF, window=True, window_size=3))
    executed, row, record = counted_flops(adapter, inputs, pruner)
    analytic = sum(shape.work_flops(w) for w in record.layer_work)
    n = image_side(adapter)
    assert executed - analytic == 4 * shape.hidden * (9 * n * n - (3 * n - 2) ** 2) * shape.layers
    assert executed < dense


# -- generation ----------------------------------------------------------------------------------------------------


def test_a_pruned_generation_runs_and_decoding_with_the_cache_equals_recomputing(adapter, prepared):
    reqs = requests()[:2]
    pruner = yopo(prepared, window=True, ffn=True, head_scope="reference", layer_drop=True)
    steps = 4
    inputs = adapter.encode(reqs)
    with pruner.attach(adapter) as session:
        out = adapter.model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                     pad_token_id=adapter.tokenizer.pad_token_id)  # fmt: skip
        rows = session(["a", "b"], reqs)
    assert all(0 < r["tokens"]["flops_ratio"] < 1 for r in rows)
    eos = adapter.model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos)
    ids, mask, types = inputs["input_ids"], inputs["attention_mask"], inputs["mm_token_type_ids"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    # Without the cache every step prefills the whole sequence: the decoded tokens are text queries whose
    # attention to visual keys in dropped heads is zeroed at prefill, as the decode path does step by step.
    with torch.no_grad(), pruner.attach(adapter):
        for _ in range(steps):
            logits = adapter.model(input_ids=ids, attention_mask=mask, mm_token_type_ids=types, use_cache=False,
                                   **extra).logits  # fmt: skip
            last = logits[:, -1].clone()
            last[:, eos] = float("-inf")  # what min_new_tokens does in generate
            nxt = last.argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
            types = torch.cat([types, torch.zeros_like(nxt)], 1)
    prompt = inputs["input_ids"].shape[1]
    assert torch.equal(ids[:, prompt:], out[:, prompt:])
    texts, _ = generate(adapter, [video_request(0)], pruner)  # a video goes through the same plans
    assert len(texts) == 1


# -- configuration and run.py ----------------------------------------------------------------------------------


@pytest.mark.parametrize("override,key", [("token_pruner.head_keep=1.5", "head_keep"),
                                          ("token_pruner.head_scope=all", "head_scope"),
                                          ("token_pruner.ffn_rank=random", "ffn_rank"),
                                          ("token_pruner.drop_layers=0", "drop_layers")])  # fmt: skip
def test_bad_values_fail_naming_the_key(compose_cfg, override, key):
    from mmprune_exp.config import validate

    cfg = compose_cfg(["token_pruner=yopo", override])
    with pytest.raises(ConfigError, match=f"token_pruner.{key}"):
        validate(cfg)


def test_run_py_with_a_saved_head_mask_and_every_strategy(prepared, tmp_path):
    """A reused head mask needs no calibration: ``run.py token_pruner=yopo`` runs all four strategies and reports
    their FLOPs (the calibrating path needs run.py to call ``prepare``)."""
    from tests.test_run_e2e import run_py

    _, run_dir = prepared
    out = tmp_path / "r"
    run_py(out, "pruner=none", "token_pruner=yopo", f"token_pruner.head_mask={run_dir / HEAD_MASK_FILE}",
           "token_pruner.window=true", "token_pruner.ffn=true", "token_pruner.ffn_rank=index", "benchmark.limit=8",
           "logger=none")  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    tokens = results["tokens"]
    assert results["choices"]["token_pruner"] == "yopo"
    assert 0 < tokens["flops_ratio"] < 1 and 0 < tokens["visual_flops_ratio"] < tokens["flops_ratio"]
