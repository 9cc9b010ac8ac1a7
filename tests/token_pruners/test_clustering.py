"""PruneVid's clustering arithmetic against restatements of the reference code (``Visual-AI/PruneVid``
``models/pllava/modeling_pllava.py``: ``cluster_dpc_knn``, ``compute_cluster_vectors``, ``refine_clusters``,
``segment_lengths`` and the similarity lines of ``merge_frames_dynamic``; reference/token_pruners.md §1.2–1.3).

The restatements keep the reference's batched shapes and step order (one-hot matrix products, an explicit scan
with -1 markers, the W×W einsum) so that they are independent of the implementations under test.
"""

from __future__ import annotations

import random

import pytest
import torch

from mmprune_exp.token_pruners.clustering import (
    cluster_means,
    dpc_knn,
    refine_clusters,
    segment_lengths,
    static_mask,
)

# -- restatements of the reference ------------------------------------------------------------------------


def reference_dpc_knn(x, cluster_num, k, seed):
    """cluster_dpc_knn on [B, N, C] (no token mask). The noise is torch.rand from the global RNG, seeded here."""
    b, _, c = x.shape
    dist = torch.cdist(x.float(), x.float()) / (c**0.5)
    dist_nearest, _ = torch.topk(dist, k=k, dim=-1, largest=False)
    density = (-(dist_nearest**2).mean(dim=-1)).exp()
    torch.manual_seed(seed)
    density = density + torch.rand(density.shape, dtype=density.dtype) * 1e-6
    mask = (density[:, None, :] > density[:, :, None]).type(x.dtype)
    dist_max = dist.flatten(1).max(dim=-1)[0][:, None, None]
    delta, _ = (dist * mask + dist_max * (1 - mask)).min(dim=-1)
    score = delta * density
    _, index_down = torch.topk(score, k=cluster_num, dim=-1)
    centre_rows = torch.stack([dist[i, index_down[i]] for i in range(b)])  # [B, cluster_num, N]
    idx_cluster = centre_rows.argmin(dim=1)
    for i in range(b):
        idx_cluster[i, index_down[i]] = torch.arange(cluster_num)
    return idx_cluster, index_down


def reference_cluster_vectors(x, idx, cluster_num):
    """compute_cluster_vectors: one-hot [B, N, K] transposed times x, divided by the counts, empty -> 0."""
    onehot = torch.nn.functional.one_hot(idx, num_classes=cluster_num).to(x.dtype)
    sums = torch.bmm(onehot.permute(0, 2, 1), x)
    counts = onehot.sum(dim=1)
    out = sums / counts.clamp(min=1).unsqueeze(-1)
    return out.masked_fill((counts == 0).unsqueeze(-1), 0)


def reference_refine(labels):
    """refine_clusters for one video, step by step as the reference does it."""
    n = len(labels)
    refined = list(labels)
    for label in sorted(set(labels)):
        indices = [i for i, v in enumerate(labels) if v == label]
        segments, start, prev = [], indices[0], indices[0]
        for i in indices[1:]:
            if i == prev + 1:
                prev = i
            else:
                segments.append((start, prev))
                start = prev = i
        segments.append((start, prev))
        longest = max(e - s + 1 for s, e in segments)
        for s, e in segments:
            if longest == 1 or e - s + 1 != longest:
                refined[s : e + 1] = [-1] * (e - s + 1)
    i = 0
    while i < n:
        if refined[i] != -1:
            i += 1
            continue
        start = i
        while i < n and refined[i] == -1:
            i += 1
        end = i - 1
        left_label, left_len, right_label, right_len = None, 0, None, 0
        if start > 0:
            left_label = refined[start - 1]
            j = start - 1
            while j >= 0 and refined[j] == left_label:
                j -= 1
            left_len = start - j - 1
        if end < n - 1:
            right_label = refined[end + 1]
            j = end + 1
            while j < n and refined[j] == right_label:
                j += 1
            right_len = j - end - 1
        if left_len > right_len:
            new = left_label
        elif right_len > left_len:
            new = right_label
        else:
            new = left_label if left_label is not None else right_label
        refined[start : end + 1] = [0 if new is None else new] * (end - start + 1)
    return refined


def reference_segment_lengths(labels):
    """segment_lengths: boundaries at the change points plus 0 and N."""
    t = torch.tensor([labels])
    change = torch.where(t[0, 1:] != t[0, :-1])[0] + 1
    bounds = torch.cat([torch.tensor([0]), change, torch.tensor([len(labels)])])
    return (bounds[1:] - bounds[:-1]).tolist()


def reference_similarity(frames):
    """merge_frames_dynamic's per-slot similarity for a window [B, W, L, C]."""
    w = frames.shape[1]
    unit = torch.nn.functional.normalize(frames, p=2, dim=-1)
    sim = torch.einsum("bwlc,btlc->bwtl", unit, unit)
    return (sim.sum(dim=-2) - 1).sum(dim=-2) / (w * (w - 1))


# -- DPC-KNN ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n,c,clusters", [(20, 8, 5), (16, 4, 8), (9, 3, 2)])
def test_dpc_knn_equals_the_reference(seed, n, c, clusters):
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(n, c, generator=g)
    assign, centres = dpc_knn(x, clusters, k=7, seed=seed)
    ref_assign, ref_centres = reference_dpc_knn(x[None], clusters, 7, seed)
    # Discrete outcomes of the same float operations (cdist, topk, exp, mean) on the same inputs and noise:
    # every intermediate is bitwise equal, so the indices must be too.
    assert torch.equal(centres, ref_centres[0])
    assert torch.equal(assign, ref_assign[0])


def test_dpc_knn_with_duplicate_points_is_decided_by_the_seeded_noise():
    # Two copies of each of four points: equal densities everywhere, only the 1e-6 noise orders them.
    x = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [5.0, 5.0]]).repeat_interleave(2, dim=0)
    for seed in range(4):
        assign, centres = dpc_knn(x, 4, k=3, seed=seed)
        ref_assign, ref_centres = reference_dpc_knn(x[None], 4, 3, seed)
        assert torch.equal(centres, ref_centres[0]) and torch.equal(assign, ref_assign[0])
        assert torch.equal(dpc_knn(x, 4, k=3, seed=seed)[0], assign)  # deterministic for a seed
        # every copy pair lands in one cluster, one centre per pair
        assert torch.equal(assign[0::2], assign[1::2])
        assert sorted((centres // 2).tolist()) == [0, 1, 2, 3]


def test_dpc_knn_hand_case_two_blobs():
    # Blob A around (0, 0), blob B around (10, 10): two clusters, one centre in each, members by blob.
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [10.0, 10.0], [10.1, 10.0], [10.0, 10.2], [9.9, 10.0]])
    assign, centres = dpc_knn(x, 2, k=3)
    blob_of_centre = [0 if int(c) < 3 else 1 for c in centres]
    assert sorted(blob_of_centre) == [0, 1]
    expected = [blob_of_centre.index(0)] * 3 + [blob_of_centre.index(1)] * 4
    assert assign.tolist() == expected
    # the centre of a blob is its densest point: the middle one of A is (0, 0), of B (10, 10)
    assert set(centres.tolist()) == {0, 3}


def test_dpc_knn_caps_k_and_checks_the_cluster_count():
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    assign, centres = dpc_knn(x, 2, k=7)  # k > N: all four points are each one's neighbours
    ref_assign, ref_centres = reference_dpc_knn(x[None], 2, 4, 0)
    assert torch.equal(assign, ref_assign[0]) and torch.equal(centres, ref_centres[0])
    assert torch.equal(dpc_knn(x, 4)[0], torch.argsort(dpc_knn(x, 4)[1]))  # N clusters: each point its own
    with pytest.raises(ValueError):
        dpc_knn(x, 0)
    with pytest.raises(ValueError):
        dpc_knn(x, 5)


def test_cluster_means_equal_the_reference_one_hot_product():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(30, 6, generator=g)
    assign = torch.randint(0, 7, (30,), generator=g)
    assign[assign == 4] = 5  # cluster 4 empty
    ours = cluster_means(x, assign, 7)
    ref = reference_cluster_vectors(x[None], assign[None], 7)[0]
    # Sums of <= 30 terms in a different order (index_add vs a matrix product): a few fp32 ulps of the sum.
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(ours[4], torch.zeros(6))
    single = cluster_means(x[:3], torch.tensor([0, 1, 2]), 3)
    assert torch.equal(single, x[:3])  # one member: 0 + x, divided by 1, is exactly x


# -- temporal refinement -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "labels,expected",
    [
        # runs 0:[0,1] 1:[2] 0:[3] 2:[4,5] 1:[6,7] -> the single 1 and single 0 are undecided; left (0, length 2)
        # ties right (2, length 2): the left wins.
        ([0, 0, 1, 0, 2, 2, 1, 1], [0, 0, 0, 0, 2, 2, 1, 1]),
        # every cluster has only runs of one frame: all undecided, no neighbour -> 0
        ([0, 1, 2, 3], [0, 0, 0, 0]),
        # the lone 0 joins the longer right run (2, length 3); the tail [0, 1] then sees the grown run of 2s
        ([1, 1, 0, 2, 2, 2, 0, 1], [1, 1, 2, 2, 2, 2, 2, 2]),
        # two runs of the same longest length are both kept
        ([3, 3, 1, 3, 3], [3, 3, 3, 3, 3]),
        ([2, 2, 2, 2], [2, 2, 2, 2]),
        ([5], [0]),
    ],
)
def test_refine_clusters_hand_cases(labels, expected):
    assert reference_refine(labels) == expected  # the restatement agrees with the hand derivation
    assert refine_clusters(torch.tensor(labels)) == expected


def test_refine_clusters_equals_the_reference_on_random_labels():
    rng = random.Random(0)
    for _ in range(500):
        labels = [rng.randrange(4) for _ in range(rng.randint(1, 12))]
        assert refine_clusters(labels) == reference_refine(labels), labels


def test_segment_lengths_equal_the_reference():
    rng = random.Random(1)
    for _ in range(100):
        labels = refine_clusters([rng.randrange(3) for _ in range(rng.randint(1, 10))])
        assert segment_lengths(labels) == reference_segment_lengths(labels)
    assert segment_lengths([0, 0, 0, 0, 2, 2, 1, 1]) == [4, 2, 2]


# -- static / dynamic split --------------------------------------------------------------------------------------


def test_static_mask_hand_case():
    # slot 0: the same vector in all frames (cos 1 -> static); slot 1: orthogonal vectors (cos 0 -> dynamic);
    # slot 2: a scaled copy (cosine ignores the norm -> static); slot 3: sign flips (cos -1/3 mean -> dynamic).
    e0, e1, e2 = torch.eye(3)
    frames = torch.stack(
        [
            torch.stack([e0, e0, 2 * e1, e2]),
            torch.stack([e0, e1, 3 * e1, -e2]),
            torch.stack([e0, e2, 0.5 * e1, e2]),
        ]
    )  # [W=3, L=4, C=3]
    sim = reference_similarity(frames[None])[0]
    torch.testing.assert_close(sim, torch.tensor([1.0, 0.0, 1.0, -1 / 3]))
    assert static_mask(frames, 0.8).tolist() == [True, False, True, False]
    assert static_mask(frames, -0.5).tolist() == [True, True, True, True]


def test_static_mask_equals_the_reference_away_from_tau():
    g = torch.Generator().manual_seed(5)
    for w in (2, 3, 4, 6):
        base = torch.randn(1, 40, 16, generator=g)
        frames = base + torch.rand(40, 1, generator=g) * torch.randn(w, 40, 16, generator=g)  # some slots move
        sim = reference_similarity(frames[None])[0]
        for tau in (0.2, 0.5, 0.8):
            # Σ cos as a squared norm of a sum vs the W x W matrix: different rounding (~1e-6); slots within
            # 1e-4 of tau could flip and are not compared.
            clear = (sim - tau).abs() > 1e-4
            assert torch.equal(static_mask(frames, tau)[clear], (sim > tau)[clear])
            assert clear.sum() > 30


def test_static_mask_one_frame_is_all_dynamic():
    assert not static_mask(torch.randn(1, 5, 4), -1.0).any()
