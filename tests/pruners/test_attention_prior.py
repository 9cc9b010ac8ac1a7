"""AMIA's attention prior equals the last row of the tiny model's own eager attention probabilities."""

from __future__ import annotations

import copy

import pytest
import torch

from mmprune_exp.calibration import shapes_calibration
from mmprune_exp.config.schema import CalibrationConfig, ModelConfig
from mmprune_exp.models import load_adapter
from mmprune_exp.models.attention_prior import last_query_attention, mrope_cos_sin
from mmprune_exp.models.base import Request
from mmprune_exp.pruners.engine import LayerInputs, collect_layer_inputs, forward_layer
from mmprune_exp.tiny import TINY_MODEL_DIR

# Everything here is fp32 on CPU. The prior and eager attention do the same arithmetic, but eager multiplies the
# full Q·Kᵀ with repeated KV heads while the prior does one grouped row, so only the summation order of the
# head_dim=32 dot products differs: ~1e-7 relative on the logits, the same on probabilities <= 1 (measured max
# abs difference ~1e-7). 1e-6 leaves room for other BLAS kernels while catching a wrong rotation, head
# mapping, scaling or bias (each changes probabilities by >= 1e-3 on this model).
ATOL = 1e-6


@pytest.fixture(scope="module")
def eager():
    return load_adapter(ModelConfig(path=str(TINY_MODEL_DIR), device="cpu", attn_implementation="eager"))


@pytest.fixture(scope="module")
def requests():
    from mmprune_exp.data import scenes

    images = shapes_calibration(CalibrationConfig(nsamples=4))[2:]  # one VQA, one grounding conversation
    video = scenes.video_items("calibration", 1, num_frames=4)[0]
    return images + [
        Request(video.question, videos=[video.frames], answer=video.answer),
        Request("How many shapes are in a scene without an image?", answer="none"),  # text only, chat template
        Request("a red circle left of a blue square", raw=True),  # text only, no template
    ]


@pytest.fixture(scope="module")
def layer_inputs(eager, requests):
    return collect_layer_inputs(eager, requests, max_length=2048)


def _layer_walk(adapter, inputs):
    """(layer index, layer, sample index, inputs) for every layer and sample, as the engine replays them:
    each layer is fed the previous layer's outputs."""
    for index, layer in enumerate(adapter.decoder_layers()):
        for sample, x in enumerate(inputs):
            yield index, layer, sample, x
        inputs = [LayerInputs(forward_layer(layer, x, adapter.device), x.kwargs, x.visual) for x in inputs]


def _eager_last_row(layer, x, **override):
    """Row N of the layer's own eager attention probabilities, mean over heads."""
    seen = []
    handle = layer.self_attn.register_forward_hook(lambda mod, args, out: seen.append(out[1]))
    try:
        with torch.no_grad():
            forward_layer(layer, LayerInputs(x.hidden, {**x.kwargs, **override}, x.visual), x.hidden.device)
    finally:
        handle.remove()
    (weights,) = seen
    return weights[0, :, -1, :].mean(0)


def test_the_inputs_cover_images_video_and_text(layer_inputs):
    visual = [int(x.visual.sum()) for x in layer_inputs]
    assert visual[0] > 0 and visual[1] > 0 and visual[2] > 0 and visual[3:] == [0, 0]
    assert all(x.kwargs["attention_mask"] is not None for x in layer_inputs)  # eager gets a 4D causal mask


def test_prior_equals_the_layers_eager_attention_row(eager, layer_inputs):
    worst = 0.0
    for index, layer, _, x in _layer_walk(eager, layer_inputs):
        prior = last_query_attention(layer, x)
        ref = _eager_last_row(layer, x)
        assert prior.dtype == torch.float32 and prior.shape == (x.hidden.shape[1],)
        assert torch.allclose(prior, ref, rtol=0, atol=ATOL), (index, (prior - ref).abs().max())
        assert abs(float(prior.sum()) - 1) < 1e-5
        worst = max(worst, float((prior - ref).abs().max()))
    print(f"max |prior - eager| = {worst:.3g}")


def test_prior_equals_the_full_models_output_attentions(eager, requests, layer_inputs):
    """Against the model's own forward (output_attentions=True), every layer fed by the engine's replay."""
    layers = eager.decoder_layers()
    priors = [[] for _ in layer_inputs]
    for _, layer, sample, x in _layer_walk(eager, layer_inputs):
        priors[sample].append(last_query_attention(layer, x))
    for request, sample_priors in zip(requests, priors):
        with torch.no_grad():
            out = eager.model(**eager.encode([request]), use_cache=False, output_attentions=True)
        assert len(out.attentions) == len(layers) == len(sample_priors)
        for index, (weights, prior) in enumerate(zip(out.attentions, sample_priors)):
            ref = weights[0, :, -1, :].mean(0)
            assert torch.allclose(prior, ref, rtol=0, atol=ATOL), (index, (prior - ref).abs().max())


def test_a_pair_of_hidden_and_position_embeddings_is_enough(eager, layer_inputs):
    layer = eager.decoder_layers()[1]
    for x in layer_inputs:  # the causal mask's last row masks nothing
        pair = (x.hidden, x.kwargs["position_embeddings"])
        assert torch.equal(last_query_attention(layer, pair), last_query_attention(layer, x))


def test_per_axis_rotary_tables_of_transformers_4(eager, layer_inputs):
    """transformers 4.x hands layers one table per M-RoPE axis; interleaving them must give 5.x's tables."""
    rotary = eager.model.model.language_model.rotary_emb
    layer = eager.decoder_layers()[0]
    x = layer_inputs[0]
    n = x.hidden.shape[1]
    torch.manual_seed(0)
    position_ids = torch.randint(0, 64, (3, 1, n))  # distinct temporal/height/width positions
    cos, sin = rotary(x.hidden, position_ids)
    freqs = position_ids[..., None].float() * rotary.inv_freq.float()  # [3, 1, N, d/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # 4.x: per-axis [3, 1, N, d], interleaved in the attention
    cos4, sin4 = emb.cos() * rotary.attention_scaling, emb.sin() * rotary.attention_scaling
    section = eager.model.config.text_config.rope_parameters["mrope_section"]
    got_cos, got_sin = mrope_cos_sin(cos4, sin4, section)
    assert torch.allclose(got_cos, cos, atol=1e-6) and torch.allclose(got_sin, sin, atol=1e-6)
    assert not torch.allclose(cos4[0], cos, atol=1e-3)  # the axes really differ: interleaving is exercised
    prior4 = last_query_attention(layer, (x.hidden, (cos4, sin4)))
    prior = last_query_attention(layer, (x.hidden, (cos, sin)))
    assert torch.allclose(prior4, prior, rtol=0, atol=ATOL)
    assert torch.allclose(prior, _eager_last_row(layer, x, position_embeddings=(cos, sin)), rtol=0, atol=ATOL)


def test_a_padding_mask_removes_keys_as_eager_attention_does(eager, layer_inputs):
    layer = eager.decoder_layers()[2]
    x = layer_inputs[0]
    n = x.hidden.shape[1]
    keep = torch.ones(n, dtype=torch.bool)
    keep[:3] = False  # as if the first three tokens were left padding
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    allowed = (causal & keep)[None, None]
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    ref = _eager_last_row(layer, x, attention_mask=additive)
    assert torch.all(ref[:3] == 0)
    for mask in (additive, allowed, keep[None].long()):  # eager additive, bool 4D, 2D padding
        prior = last_query_attention(layer, x, attention_mask=mask)
        assert torch.allclose(prior, ref, rtol=0, atol=ATOL), mask.dtype
        assert torch.all(prior[:3] == 0)
    right_padded = torch.ones(1, n, dtype=torch.long)
    right_padded[0, -1] = 0  # the last token is padding: its row is not the prior
    with pytest.raises(ValueError, match="padding"):
        last_query_attention(layer, x, attention_mask=right_padded)


def test_bfloat16_layer_returns_fp32_close_to_fp32(eager, layer_inputs):
    layer = eager.decoder_layers()[1]
    half = copy.deepcopy(layer).to(torch.bfloat16)
    for x in layer_inputs:
        bf16 = last_query_attention(half, LayerInputs(x.hidden.bfloat16(), x.kwargs, x.visual))
        assert bf16.dtype == torch.float32
        # bf16 weights and projections (8-bit mantissa) move the logits by ~1e-2 relative; the probabilities
        # differ by at most 2.5e-4 here (measured). 2e-3 tolerates that with margin.
        assert torch.allclose(bf16, last_query_attention(layer, x), rtol=0, atol=2e-3)


def test_one_sample_at_a_time(eager, layer_inputs):
    x = layer_inputs[0]
    with pytest.raises(ValueError, match="one sample"):
        last_query_attention(eager.decoder_layers()[0], (x.hidden.expand(2, -1, -1), x.kwargs["position_embeddings"]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_layer_with_cpu_inputs(eager, layer_inputs):
    layer = copy.deepcopy(eager.decoder_layers()[0]).cuda()
    for x in layer_inputs:
        prior = last_query_attention(layer, x)  # inputs move to the layer's device
        assert prior.is_cuda and prior.dtype == torch.float32
        assert torch.allclose(prior.cpu(), last_query_attention(eager.decoder_layers()[0], x), rtol=0, atol=1e-5)
