"""PruneVid's clustering arithmetic, on plain tensors (no model): DPC-KNN, temporal segment refinement, the
static/dynamic split and cluster means.

Facts from the reference (``Visual-AI/PruneVid`` ``models/pllava/modeling_pllava.py``; reference/token_pruners.md
§1.2–1.3); the reference works on a batch ``[B, N, C]`` of one video, these functions on one set ``[N, C]``:

- DPC-KNN: distances ``cdist / sqrt(C)``; density ``exp(-mean of the squared distances to the k nearest``
  ``neighbours)`` (the point itself included) plus ``U(0,1)·1e-6`` tie-breaking noise; distance indicator = distance
  to the nearest denser point (the global maximum distance for the densest); centres = top ``cluster_num`` of
  density × indicator; every point joins its nearest centre, a centre always its own cluster. Cluster ids follow
  the centres' score order.
- ``refine_clusters``: each temporal cluster keeps only its longest contiguous run(s) of frames; every other run
  (and a cluster whose runs all have length 1) takes the label of the longer neighbouring run, left on a tie, 0
  with no neighbour.
"""

from __future__ import annotations

import torch


def tie_noise(n: int, seed: int) -> torch.Tensor:
    """The ``U(0,1)`` draw DPC-KNN adds (×1e-6) to the densities. The reference draws from the global RNG, so its
    clusters change from run to run on ties; here a generator seeded per call makes them a function of the input
    (and the same for a sample whether it is batched or not)."""
    return torch.rand(n, generator=torch.Generator().manual_seed(seed))


def dpc_knn(x: torch.Tensor, cluster_num: int, k: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster the rows of ``x`` ``[N, C]``: ``(assign [N] in 0..cluster_num-1, centres [cluster_num])``.

    ``k`` is capped at ``N`` (the reference's ``topk`` would fail on fewer points than neighbours; PruneVid calls it
    with k=7 on 16 frames, the tiny model's videos have 4 temporal slices).
    """
    n, c = x.shape
    if not 1 <= cluster_num <= n:
        raise ValueError(f"cluster_num must be in 1..{n}, got {cluster_num}")
    xf = x.float()
    dist = torch.cdist(xf[None], xf[None])[0] / c**0.5
    nearest = torch.topk(dist, k=min(k, n), dim=-1, largest=False).values
    density = torch.exp(-(nearest**2).mean(-1)) + tie_noise(n, seed).to(dist.device) * 1e-6
    # denser[i, j]: j is strictly denser than i
    denser = density[None, :] > density[:, None]
    indicator = torch.where(denser, dist, dist.max()).min(-1).values
    centres = torch.topk(indicator * density, k=cluster_num).indices
    assign = dist[centres].argmin(0)
    assign[centres] = torch.arange(cluster_num, device=x.device)
    return assign, centres


def cluster_means(x: torch.Tensor, assign: torch.Tensor, cluster_num: int) -> torch.Tensor:
    """Plain mean of each cluster's rows, ``[cluster_num, C]`` in fp32 (an empty cluster gives zeros, as in the
    reference; DPC-KNN never makes one: every centre is in its own cluster)."""
    xf = x.float()
    sums = torch.zeros(cluster_num, x.shape[1], dtype=xf.dtype, device=x.device).index_add_(0, assign, xf)
    counts = torch.bincount(assign, minlength=cluster_num).to(xf.dtype)
    return sums / counts.clamp(min=1)[:, None]


def _runs(labels: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of equal labels: ``(label, start, stop)`` with ``stop`` exclusive."""
    runs = []
    start = 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[start]:
            runs.append((labels[start], start, i))
            start = i
    return runs


def refine_clusters(labels: torch.Tensor | list[int]) -> list[int]:
    """Make temporal clusters contiguous (the reference's ``refine_clusters`` on one video)."""
    out = [int(v) for v in labels]
    runs = _runs(out)
    longest: dict[int, int] = {}
    for label, start, stop in runs:
        longest[label] = max(longest.get(label, 0), stop - start)
    undecided = -1  # labels are >= 0 (DPC-KNN cluster ids), so -1 marks a run to relabel
    for label, start, stop in runs:
        if longest[label] == 1 or stop - start < longest[label]:
            out[start:stop] = [undecided] * (stop - start)
    # Left to right: a relabelled run counts as part of its new neighbour when the next undecided run looks left.
    for label, start, stop in _runs(out):
        if label != undecided:
            continue
        left = right = 0
        if start > 0:
            j = start - 1
            while j >= 0 and out[j] == out[start - 1]:
                j -= 1
            left = start - 1 - j
        if stop < len(out):
            j = stop
            while j < len(out) and out[j] == out[stop]:
                j += 1
            right = j - stop
        if left == 0 and right == 0:  # the whole video was undecided
            new = 0
        elif right > left:
            new = out[stop]
        else:  # the longer run on the left, or a tie (the left wins)
            new = out[start - 1]
        out[start:stop] = [new] * (stop - start)
    return out


def segment_lengths(labels: list[int]) -> list[int]:
    """Lengths of the runs of equal labels, in order (the temporal segments' frame counts)."""
    return [stop - start for _, start, stop in _runs(list(labels))]


def static_mask(frames: torch.Tensor, tau: float) -> torch.Tensor:
    """``[L]`` bool: spatial slots whose token stays the same over the segment's frames ``[W, L, C]``.

    The reference's criterion: the mean pairwise cosine similarity of the slot's tokens across the W frames, self
    pairs excluded, ``(Σ_{w,t} cos(f_w, f_t) − W) / (W(W−1)) > tau``. ``Σ_{w,t} cos(f_w, f_t)`` is computed as
    ``‖Σ_w f_w/‖f_w‖‖²`` (the same sum, O(W) instead of O(W²) products). One frame has no pair: the reference's
    0/0 makes every slot dynamic there, and so does this.
    """
    w = frames.shape[0]
    if w < 2:
        return torch.zeros(frames.shape[1], dtype=torch.bool, device=frames.device)
    unit = torch.nn.functional.normalize(frames.float(), dim=-1)
    pair_sum = unit.sum(0).pow(2).sum(-1)
    return (pair_sum - w) / (w * (w - 1)) > tau
