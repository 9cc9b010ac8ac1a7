"""VisionZip against a restatement of the official Qwen2.5-VL file's selection (``HVision-NKU/GlimpsePrune``
``qwen_visionzip/qwen2_5vl_visionzip.py``, the ``select_pixel`` block; reference/token_pruners.md §4.2), and through
the real mechanism on the random tiny model."""

from __future__ import annotations

import pytest
import torch

from mmprune_exp.token_pruners import build_token_pruner
from mmprune_exp.token_pruners.base import keep_count
from mmprune_exp.token_pruners.visionzip import VisionZipConfig, budget, zip_item
from tests.token_pruners.common import (
    assert_valid_logits_equal,
    generate,
    image_request,
    prompt_logits,
    relative_kept,
    video_request,
)


def reference_visionzip(attn_logits, attn_key, embeds, dominant_num, contextual_num):
    """The reference's steps for one image (batch 1): ``attn_logits`` [N], ``attn_key`` [1, N, d], ``embeds``
    [1, N, D] (the image's span of inputs_embeds). Returns the keep mask [N] and the embeddings with the contextual
    tokens written at their targets' positions."""
    _, topk_indices = torch.topk(attn_logits, dominant_num)
    mask = torch.zeros_like(attn_logits, dtype=torch.bool)
    mask[topk_indices] = True
    contextual_mask = ~mask
    metric_filtered = attn_key[:, contextual_mask]
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    m = metric_normalized.shape[1]
    step = max(1, m // contextual_num)
    target_indices = torch.arange(0, m, step)[:contextual_num]
    target_tokens = metric_normalized[:, target_indices, :]
    not_target = ~torch.isin(torch.arange(m), target_indices)
    tokens_to_merge = metric_normalized[:, not_target, :]
    similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(1, tokens_to_merge.shape[1], contextual_num, dtype=attn_logits.dtype)
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    select_mask = torch.zeros_like(attn_logits, dtype=torch.bool)
    select_mask[topk_indices] = True
    false_pos = (~select_mask).nonzero(as_tuple=True)[0]
    select_mask[false_pos[target_indices]] = True
    hidden_filtered = embeds[:, contextual_mask]
    hidden_to_merge = hidden_filtered[:, not_target, :]
    aggregated = torch.bmm(assign_one_hot.transpose(1, 2), hidden_to_merge) / counts
    contextual_tokens = hidden_filtered[:, target_indices, :] + aggregated
    out = embeds.clone()
    out[:, false_pos[target_indices]] = contextual_tokens
    return select_mask, out[0]


def random_item(n, d=8, hidden=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g), torch.randn(n, d, generator=g), torch.randn(n, hidden, generator=g)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("n,dominant,contextual", [(64, 27, 5), (64, 54, 10), (30, 3, 7), (20, 0, 1), (12, 11, 1)])
def test_zip_item_equals_the_reference(seed, n, dominant, contextual):
    score, keys, hidden = random_item(n, seed=seed)
    z = zip_item(score, keys, hidden, dominant, contextual)
    ref_mask, ref_out = reference_visionzip(score, keys[None], hidden[None], dominant, contextual)
    # Selections are discrete outcomes of topk / argmax over continuous random values (no ties): exact.
    assert torch.equal(z.keep, torch.nonzero(ref_mask).flatten())
    assert z.keep.numel() == dominant + contextual
    assert torch.equal(z.dominant, torch.sort(torch.topk(score, dominant).indices).values)
    out = hidden.clone()
    out[z.merged] = z.vectors
    # Same sums in another order (index_add vs a one-hot product; the one-hot product also adds the zero terms):
    # a few fp32 ulps of values of order 1.
    torch.testing.assert_close(out[z.keep], ref_out[ref_mask], rtol=1e-6, atol=1e-6)
    untouched = torch.tensor([i for i in z.targets.tolist() if i not in z.merged.tolist()], dtype=torch.long)
    assert torch.equal(out[untouched], hidden[untouched])  # a target nothing joined keeps its vector exactly


def test_contextual_token_is_target_plus_mean_of_the_others():
    # 4 tokens, 1 dominant (the highest score), 1 contextual target: the first remaining token (index 0); tokens 2
    # and 3 join it. Its vector is hidden[0] + mean(hidden[2], hidden[3]), not the mean of all three.
    score = torch.tensor([0.1, 0.9, 0.2, 0.3])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.9, 0.0]])
    hidden = torch.tensor([[1.0, 1.0], [5.0, 5.0], [2.0, 0.0], [4.0, 2.0]])
    z = zip_item(score, keys, hidden, 1, 1)
    assert z.keep.tolist() == [0, 1] and z.dominant.tolist() == [1] and z.merged.tolist() == [0]
    assert z.vectors.tolist() == [[4.0, 2.0]]


def test_budget_follows_the_paper_split():
    assert budget(576, 64 / 576, 10 / 64) == (54, 10)  # the paper's 64-token setting on 576 CLIP tokens
    assert budget(576, 128 / 576, 10 / 64) == (108, 20)
    assert budget(64, 0.5, 10 / 64) == (27, 5)
    assert budget(64, 0.5, 0.1) == (29, 3)
    assert budget(20, 0.05, 10 / 64) == (0, 1)  # one token kept: the reference's at-least-one contextual
    assert budget(64, 0.5, 0.0) == (32, 0)
    for n in (1, 7, 64, 300):
        for r in (0.1, 0.25, 0.5, 1.0):
            d, c = budget(n, r, 10 / 64)
            assert d + c == keep_count(n, r) and c >= 1


def test_config_checks_the_share():
    with pytest.raises(ValueError, match="contextual_share"):
        VisionZipConfig(contextual_share=1.0)


# -- through the mechanism on the random tiny model ---------------------------------------------------------------


def capture_vision(pruner):
    """Wrap the pruner's point so the test sees what it saw (vision statistics, embeddings, items)."""
    seen = []
    original = pruner.points

    def points(adapter):
        out = original(adapter)
        for p in out:
            select = p.select

            def wrapped(ctx, select=select):
                seen.append({"vision": ctx.vision, "hidden": ctx.hidden.clone(), "items": ctx.items,
                             "slots": [[ctx.slots_of(b, it) for it in ctx.items[b]] for b in range(ctx.batch_size)]})  # fmt: skip
                return select(ctx)

            p.select = wrapped
        return out

    pruner.points = points
    return seen


def test_kept_sets_follow_keep_ratio_and_the_reference(random_tiny):
    pruner = build_token_pruner(VisionZipConfig(keep_ratio=0.5))
    seen = capture_vision(pruner)
    requests = [video_request(0), image_request(1)]
    _, _, records = prompt_logits(random_tiny, requests, pruner)
    (ctx,) = seen
    for b, record in enumerate(records):
        (item,) = record.items
        n = item.length
        assert record.visual_before == n and record.visual_kept == keep_count(n, 0.5)
        stats = ctx["vision"][(item.kind, item.index)]
        d, c = budget(n, 0.5, 10 / 64)
        slots = ctx["slots"][b][0]
        ref_mask, _ = reference_visionzip(stats["score"], stats["keys"][None], ctx["hidden"][b, slots][None], d, c)
        assert relative_kept(record, "visionzip") == [torch.nonzero(ref_mask).flatten().tolist()]


def test_keep_ratio_one_reproduces_the_unpruned_logits(random_tiny):
    requests = [video_request(0), image_request(1, size=(84, 112))]
    dense, valid, _ = prompt_logits(random_tiny, requests)
    pruner = build_token_pruner(VisionZipConfig(keep_ratio=1.0))
    pruner.always_reduce = True
    seen = capture_vision(pruner)
    pruned, _, records = prompt_logits(random_tiny, requests, pruner)
    assert seen and seen[0]["vision"]  # the point ran, with the vision statistics
    assert [r.visual_kept for r in records] == [r.visual_before for r in records]
    assert all(r.visual_before > 0 for r in records)
    assert_valid_logits_equal(dense, pruned, valid)
    assert generate(random_tiny, requests, pruner)[0] == random_tiny.generate(requests, 6)


def test_batch_of_different_sizes_equals_each_alone(random_tiny):
    requests = [image_request(2, size=(84, 112)), image_request(3)]
    pruner = build_token_pruner(VisionZipConfig(keep_ratio=0.3))
    texts, records = generate(random_tiny, requests, pruner)
    before = [r.visual_before for r in records]
    assert before[0] < before[1]  # an 84x112 and a 112x112 image: really different token counts
    assert [r.visual_kept for r in records] == [keep_count(n, 0.3) for n in before]
    for request, text, record in zip(requests, texts, records):
        alone_texts, alone_records = generate(random_tiny, [request], pruner)
        assert alone_texts == [text]
        assert relative_kept(alone_records[0], "visionzip") == relative_kept(record, "visionzip")


def test_generation_with_pruned_tokens_runs(random_tiny):
    pruner = build_token_pruner(VisionZipConfig(keep_ratio=0.25))
    texts, records = generate(random_tiny, [video_request(1), image_request(4)], pruner, max_new_tokens=4)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    assert [r.visual_kept for r in records] == [keep_count(r.visual_before, 0.25) for r in records]
    layers = random_tiny.decoder_shape().layers
    assert all(r.tokens_per_layer == [r.tokens_before - (r.visual_before - r.visual_kept)] * layers for r in records)
