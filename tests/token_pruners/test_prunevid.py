"""PruneVid: stage 1 and stage 2 against restatements of the reference code (``Visual-AI/PruneVid``
``modeling_pllava.py`` ``merge_frames_dynamic``, ``elastic_cache.py`` ``VTPWindowCache.process_attention``;
reference/token_pruners.md §1.3–1.5), the config's presets, and the method through the real mechanism on the random
tiny model (its videos: 4 temporal slices of 4 x 4 merged tokens; images: 8 x 8)."""

from __future__ import annotations

import pytest
import torch

from mmprune_exp.config import ConfigError, validate
from mmprune_exp.token_pruners import build_token_pruner
from mmprune_exp.token_pruners.prunevid import (
    PRESETS,
    PruneVidConfig,
    merge_video,
    select_in_groups,
    stage2_layer,
    temporal_segments,
)
from tests.token_pruners.common import (
    assert_valid_logits_equal,
    generate,
    image_request,
    prompt_logits,
    relative_kept,
    video_request,
)
from tests.token_pruners.test_clustering import (
    reference_cluster_vectors,
    reference_dpc_knn,
    reference_refine,
    reference_segment_lengths,
    reference_similarity,
)

# -- restatements of the reference ------------------------------------------------------------------------------


def reference_merge_frames_dynamic(features, num_frames, tokens, tau, segment_ratio, cluster_ratio, seed=0):
    """merge_frames_dynamic for B = 1: ``features`` [1, T·L, C] -> (merged [1, M, C], static_sizes,
    dynamic_sizes, window_sizes). k = 7 at every call, as the reference's call sites pass."""
    b, _, c = features.shape
    frames = features.view(b, num_frames, tokens, c)
    idx, _ = reference_dpc_knn(frames.mean(dim=2), int(num_frames * segment_ratio), 7, seed)
    windows = reference_segment_lengths(reference_refine(idx[0].tolist()))
    statics, dynamics, static_sizes, dynamic_sizes = [], [], [], []
    start = 0
    for w in windows:
        current = frames[:, start : start + w]
        mask = reference_similarity(current) > tau
        expand = mask.view(b, 1, tokens, 1).expand(-1, w, -1, c)
        static = torch.masked_select(current, expand).view(b, w, -1, c).mean(dim=1)
        if static.shape[1] > 14:
            n = int(static.shape[1] * cluster_ratio)
            static = reference_cluster_vectors(static, reference_dpc_knn(static, n, 7, seed)[0], n)
        statics.append(static)
        static_sizes.append(static.shape[1])
        dynamic = torch.masked_select(current, ~expand).view(b, w, -1, c)
        per_frame = []
        for i in range(w):
            d = dynamic[:, i]
            if d.shape[1] > 14:
                n = int(d.shape[1] * cluster_ratio)
                d = reference_cluster_vectors(d, reference_dpc_knn(d, n, 7, seed)[0], n)
            per_frame.append(d)
        dynamic = torch.cat(per_frame, dim=1)
        dynamics.append(dynamic)
        dynamic_sizes.append(dynamic.shape[1])
        start += w
    merged = torch.cat([f for pair in zip(statics, dynamics) for f in pair], dim=1)
    return merged, static_sizes, dynamic_sizes, windows


def reference_process_attention(attn, static_sizes, dynamic_sizes, window_sizes, alpha):
    """process_attention: ``attn`` [1, heads, queries, n_img] -> kept visual indices (sorted, as prompt_prefill
    sorts them)."""
    scores = attn[0].max(dim=0)[0].max(dim=0)[0]
    kept, start = [], 0
    for static_size, dynamic_size, window in zip(static_sizes, dynamic_sizes, window_sizes):
        end = start + static_size + dynamic_size
        part = scores[start:end]
        kept.append(torch.topk(part[:static_size], k=int(static_size * alpha)).indices + start)
        dyn = part[static_size:].view(window, -1)
        top = torch.topk(dyn, k=int(dyn.shape[-1] * alpha), dim=-1).indices + start + static_size
        kept += [top[i] + dyn.shape[-1] * i for i in range(window)]
        start = end
    return torch.sort(torch.cat(kept)).values


def two_scene_video(seed=0, frames=8, tokens=20, dim=12):
    """Frames 0-3 and 4-7 show two scenes; in the first, slots 0-15 barely change (static) and 16-19 are new in
    every frame; in the second, slots 0-4 are static and 5-19 change."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(frames, tokens, dim)
    for first, n_static in ((0, 16), (frames // 2, 5)):
        base = torch.randn(tokens, dim, generator=g) + 3 * torch.randn(1, dim, generator=g)
        for f in range(first, first + frames // 2):
            x[f] = base + 0.01 * torch.randn(tokens, dim, generator=g)
            x[f, n_static:] = torch.randn(tokens - n_static, dim, generator=g)
    return x


# -- stage 1 and stage 2 as functions ----------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("tau,cluster_ratio", [(0.8, 0.5), (0.6, 0.3), (1.5, 1.0)])
def test_merge_video_equals_the_reference(seed, tau, cluster_ratio):
    x = two_scene_video(seed)
    t, n, c = x.shape
    groups = merge_video(x, tau, 0.25, cluster_ratio, k=7, seed=0)
    ref, static_sizes, dynamic_sizes, windows = reference_merge_frames_dynamic(
        x.reshape(1, t * n, c), t, n, tau, 0.25, cluster_ratio
    )
    assert windows == temporal_segments(x.mean(1), 0.25, 7, 0)
    if tau < 1:
        assert windows == [4, 4]  # the two scenes are found
        assert static_sizes[0] > 0 and dynamic_sizes[1] > 0
    starts = [sum(windows[:i]) for i in range(len(windows))]
    ours_static = [sum(g.reps.numel() for g in groups if g.kind == "static" and g.frame == s) for s in starts]
    ours_dynamic = [sum(g.reps.numel() for g in groups if g.kind == "dynamic" and s <= g.frame < s + w)
                    for s, w in zip(starts, windows)]  # fmt: skip
    assert ours_static == static_sizes and ours_dynamic == dynamic_sizes
    flat = x.reshape(t * n, c)
    ours = torch.cat([g.vectors if g.vectors is not None else flat[g.reps] for g in groups])
    # Means of <= 16 vectors summed in another order (index_add / mean vs one-hot products): a few fp32 ulps.
    torch.testing.assert_close(ours, ref[0], rtol=1e-5, atol=1e-5)
    for g in groups:  # every token sits in its own frame, a static group in its segment's first frame
        assert bool(((g.reps // n) == g.frame).all()) and g.reps.unique().numel() == g.reps.numel()
        assert g.kind == "dynamic" or g.frame in starts


@pytest.mark.parametrize("seed", range(4))
def test_select_in_groups_equals_process_attention(seed):
    g = torch.Generator().manual_seed(seed)
    static_sizes, windows, per_frame = [8, 3, 0], [4, 2, 3], [5, 7, 4]
    dynamic_sizes = [w * d for w, d in zip(windows, per_frame)]
    n = sum(static_sizes) + sum(dynamic_sizes)
    attn = torch.rand(1, 4, 6, n, generator=g)
    for alpha in (0.4, 0.25, 0.7, 1.0):
        expected = reference_process_attention(attn, static_sizes, dynamic_sizes, windows, alpha)
        groups, start = [], 0
        for s, w, d in zip(static_sizes, windows, per_frame):
            groups.append(torch.arange(start, start + s))
            groups += [torch.arange(start + s + i * d, start + s + (i + 1) * d) for i in range(w)]
            start += s + w * d
        ours = select_in_groups(attn[0].amax(0).amax(0), groups, alpha)
        assert torch.equal(ours, expected)  # discrete top-k of the same values (random, no ties)


# -- config and presets --------------------------------------------------------------------------------------------


def test_presets_through_hydra(compose_cfg):
    from omegaconf import OmegaConf

    cfg = compose_cfg(["token_pruner=prunevid"])
    validate(cfg)
    paper = OmegaConf.to_object(cfg.token_pruner)
    assert (paper.keep_ratio, paper.tau, paper.temporal_segment_ratio, paper.cluster_ratio) == (0.4, 0.8, 0.25, 0.5)
    assert paper.stage1 and paper.stage2 and paper.stage3 and paper.k == 7
    assert cfg.token_pruner.keep_ratio == 0.4  # what results.json records
    for name, values in PRESETS.items():
        obj = OmegaConf.to_object(compose_cfg(["token_pruner=prunevid", f"token_pruner.preset={name}"]).token_pruner)
        assert {k: getattr(obj, k) for k in values} == values
        assert obj == PruneVidConfig.from_preset(name)
    mixed = compose_cfg(["token_pruner=prunevid", "token_pruner.preset=aggressive", "token_pruner.keep_ratio=0.3"])
    obj = OmegaConf.to_object(mixed.token_pruner)
    assert obj.keep_ratio == 0.3 and obj.tau == PRESETS["aggressive"]["tau"]  # an explicit value beats the preset
    with pytest.raises(ConfigError, match=r"token_pruner\.preset"):
        validate(compose_cfg(["token_pruner=prunevid", "token_pruner.preset=fast"]))


def test_presets_go_the_way_their_names_say():
    keeps = {name: p["keep_ratio"] for name, p in PRESETS.items()}
    assert keeps["aggressive"] < keeps["paper"] < keeps["conservative"] < keeps["baseline"] == 1.0
    assert PRESETS["aggressive"]["cluster_ratio"] < PRESETS["paper"]["cluster_ratio"]
    assert PRESETS["conservative"]["tau"] > PRESETS["paper"]["tau"] > PRESETS["aggressive"]["tau"]
    assert not any(PRESETS["baseline"][f"stage{i}"] for i in (1, 2, 3))


def test_stage2_layer_scales_with_depth():
    cfg = PruneVidConfig()
    assert [stage2_layer(cfg, n) for n in (32, 28, 36, 4, 2)] == [10, 9, 11, 1, 0]
    assert stage2_layer(PruneVidConfig(layer=2), 4) == 2
    with pytest.raises(ConfigError, match="layer"):
        stage2_layer(PruneVidConfig(layer=3), 4)


# -- through the mechanism on the random tiny model ---------------------------------------------------------------


def capture(pruner):
    """Record, for each point, what its selection saw (the context's tensors cloned)."""
    seen = {}
    original = pruner.points

    def points(adapter):
        out = original(adapter)
        for p in out:
            select = p.select

            def wrapped(ctx, select=select, name=p.name):
                seen[name] = {
                    "hidden": ctx.hidden.clone(),
                    "layer_input": None if ctx.layer_input is None else ctx.layer_input.clone(),
                    "valid": ctx.attention_mask.bool().clone(), "visual": ctx.visual.clone(),
                    "origin": ctx.origin.clone(), "items": ctx.items, "state": ctx.state,
                }  # fmt: skip
                return select(ctx)

            p.select = wrapped
        return out

    pruner.points = points
    return seen


@torch.no_grad()
def manual_question_scores(adapter, layer_index, seen, aggregation):
    """Layer M's attention computed here from its input, without RoPE and without the causal mask (padding keys
    masked), rows after each sample's last visual token; max (or mean) over heads and rows. [B, S]."""
    layer = adapter.decoder_layers()[layer_index]
    attn = layer.self_attn
    x = layer.input_layernorm(seen["layer_input"])
    b, s, _ = x.shape
    d = attn.head_dim
    q = attn.q_proj(x).float().view(b, s, -1, d).transpose(1, 2)
    k = attn.k_proj(x).float().view(b, s, -1, d).transpose(1, 2)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q @ k.transpose(-1, -2)) / d**0.5
    logits = logits.masked_fill(~seen["valid"][:, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # [B, heads, S, S]
    out = torch.zeros(b, s)
    for i in range(b):
        last = int(torch.nonzero(seen["visual"][i]).max())
        rows = probs[i, :, last + 1 :, :]
        out[i] = rows.amax(dim=0).amax(dim=0) if aggregation == "max" else rows.mean(dim=0).mean(dim=0)
    return out


def expected_stage2(scores, seen, groups_of, alpha):
    """Original indices kept by stage 2 per sample: the top int(n·alpha) of each group by ``scores``."""
    kept = []
    for b, items in enumerate(seen["items"]):
        slot_of = {int(o): j for j, o in enumerate(seen["origin"][b].tolist()) if o >= 0}
        out = []
        for item in items:
            for origin in groups_of(b, item):
                slots = torch.tensor([slot_of[int(o)] for o in origin])
                top = torch.topk(scores[b, slots], int(len(slots) * alpha))
                if top.values.numel() < slots.numel():  # the cut must not fall on a near-tie (else top-k may differ)
                    rest = scores[b, slots].sort(descending=True).values
                    kth = int(len(slots) * alpha)
                    assert kth == 0 or rest[kth - 1] - rest[kth] > 1e-6
                out += [int(seen["origin"][b, slots[j]]) for j in top.indices]
        kept.append(sorted(out))
    return kept


@pytest.mark.parametrize("aggregation", ["max", "mean"])
def test_stage2_alone_keeps_alpha_of_each_frame_by_question_attention(random_tiny, aggregation):
    cfg = PruneVidConfig(stage1=False, keep_ratio=0.4, aggregation=aggregation)
    pruner = build_token_pruner(cfg)
    seen = capture(pruner)
    _, _, records = prompt_logits(random_tiny, [video_request(0), image_request(1)], pruner)
    # video: int(h·w·0.4) in each of its t slices; image: one frame, int(n·0.4)
    (t, h, w), n_image = records[0].items[0].grid, records[1].visual_before
    assert [r.visual_kept for r in records] == [t * int(h * w * 0.4), int(n_image * 0.4)]
    m = stage2_layer(cfg, random_tiny.decoder_shape().layers)
    st = seen["prunevid_stage2"]
    scores = manual_question_scores(random_tiny, m, st, aggregation)

    def per_frame(b, item):
        t, h, w = item.grid
        return [range(item.start + f * h * w, item.start + (f + 1) * h * w) for f in range(t)]

    expected = expected_stage2(scores, st, per_frame, 0.4)
    assert [sorted(r.kept_by_point["prunevid_stage2"]) for r in records] == expected


def test_stages_1_and_2_on_a_video(random_tiny):
    cfg = PruneVidConfig.from_preset("paper")
    pruner = build_token_pruner(cfg)
    seen = capture(pruner)
    _, _, records = prompt_logits(random_tiny, [video_request(2), image_request(3)], pruner)
    video, image = records
    s1, s2 = seen["prunevid_stage1"], seen["prunevid_stage2"]
    (item,) = video.items
    t, h, w = item.grid
    # stage 1 on the captured embeddings: the kept representatives are the groups' tokens
    slots = torch.nonzero((s1["origin"][0] >= item.start) & (s1["origin"][0] < item.stop)).flatten()
    groups = merge_video(s1["hidden"][0, slots].view(t, h * w, -1), cfg.tau, cfg.temporal_segment_ratio,
                         cfg.cluster_ratio, cfg.k, cfg.seed)  # fmt: skip
    reps = sorted(item.start + int(r) for g in groups for r in g.reps)
    assert sorted(video.kept_by_point["prunevid_stage1"]) == reps
    assert image.kept_by_point["prunevid_stage1"] == list(range(image.items[0].start, image.items[0].stop))
    state = s1["state"]["prunevid"]
    assert [len(o) for _, _, o in state[(0, "video", 0)]] == [g.reps.numel() for g in groups]
    # stage 2: alpha of each stage-1 group, ranked by layer M's question attention
    m = stage2_layer(cfg, random_tiny.decoder_shape().layers)
    scores = manual_question_scores(random_tiny, m, s2, "max")

    def groups_of(b, it):
        if it.kind == "video":
            return [o.tolist() for _, _, o in state[(b, "video", it.index)]]
        return [range(it.start, it.stop)]

    assert [sorted(r.kept_by_point["prunevid_stage2"]) for r in records] == expected_stage2(scores, s2, groups_of, 0.4)
    assert video.visual_kept == sum(int(g.reps.numel() * 0.4) for g in groups)
    assert image.visual_kept == int(image.visual_before * 0.4)


def test_stage3_compresses_the_early_caches(random_tiny):
    n_layers = random_tiny.decoder_shape().layers
    requests = [video_request(0)]
    rows = {}
    for stage3 in (True, False):
        pruner = build_token_pruner(PruneVidConfig(stage1=False, stage3=stage3))
        _, records = generate(random_tiny, requests, pruner, max_new_tokens=3)
        rows[stage3] = records[0]
    m = stage2_layer(PruneVidConfig(), n_layers)
    (t, h, w) = rows[True].items[0].grid
    before, after = rows[True].tokens_before, rows[True].tokens_before - (t * h * w - t * int(h * w * 0.4))
    assert rows[True].tokens_per_layer == [before] * (m + 1) + [after] * (n_layers - m - 1)
    assert rows[True].kv_cache_tokens == n_layers * after
    assert rows[False].kv_cache_tokens == (m + 1) * before + (n_layers - m - 1) * after


@pytest.mark.parametrize(
    "overrides",
    [
        {"stage1": False},  # stages 2 and 3 keep every slot
        {"tau": 1.5, "cluster_ratio": 1.0},  # stage 1 too: nothing static, every token its own cluster
    ],
    ids=["stage2+3", "stage1+2+3"],
)
def test_keep_ratio_one_reproduces_the_unpruned_model(random_tiny, overrides):
    requests = [video_request(1), image_request(2, size=(84, 112))]
    dense, valid, _ = prompt_logits(random_tiny, requests)
    pruner = build_token_pruner(PruneVidConfig(keep_ratio=1.0, **overrides))
    pruner.always_reduce = True
    pruned, _, records = prompt_logits(random_tiny, requests, pruner)
    names = {"prunevid_stage2"} | ({"prunevid_stage1"} if "tau" in overrides else set())
    assert set(records[0].kept_by_point) == names  # the points ran
    assert [r.visual_kept for r in records] == [r.visual_before for r in records]
    assert_valid_logits_equal(dense, pruned, valid)
    dense_texts = random_tiny.generate(requests, 6)
    assert generate(random_tiny, requests, pruner)[0] == dense_texts


def test_keep_ratio_one_and_baseline_attach_nothing(random_tiny):
    for cfg in (PruneVidConfig(keep_ratio=1.0), PruneVidConfig.from_preset("baseline")):
        _, _, records = prompt_logits(random_tiny, [video_request(0)], build_token_pruner(cfg))
        assert records[0].kept_by_point == {} and records[0].visual_kept == records[0].visual_before > 0


def test_batch_of_different_sizes_equals_each_alone(random_tiny):
    requests = [video_request(3), image_request(4, size=(84, 112))]
    pruner = build_token_pruner(PruneVidConfig.from_preset("paper"))
    texts, records = generate(random_tiny, requests, pruner)
    for request, text, record in zip(requests, texts, records):
        alone_texts, alone_records = generate(random_tiny, [request], pruner)
        assert alone_texts == [text]
        for point in ("prunevid_stage1", "prunevid_stage2"):
            assert relative_kept(alone_records[0], point) == relative_kept(record, point)


def test_generation_with_the_aggressive_preset_runs(random_tiny):
    pruner = build_token_pruner(PruneVidConfig.from_preset("aggressive"))
    texts, records = generate(random_tiny, [video_request(4), image_request(5)], pruner, max_new_tokens=4)
    assert len(texts) == 2
    assert records[1].visual_kept == int(records[1].visual_before * PRESETS["aggressive"]["keep_ratio"])
    assert 0 < records[0].visual_kept < records[0].visual_before
