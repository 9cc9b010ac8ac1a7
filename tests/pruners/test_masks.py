"""Mask shapes: exact counts, stable tie order, N:M groups."""

from __future__ import annotations

import torch

from mmprune_exp.config.schema import SparsityConfig
from mmprune_exp.pruners.masks import matrix_mask, nm_mask, row_mask, structured_mask


def test_matrix_mask_prunes_the_global_smallest():
    scores = torch.tensor([[5.0, 1.0, 7.0], [2.0, 9.0, 3.0]])
    mask = matrix_mask(scores, 0.5)
    assert mask.sum() == 3
    assert mask.tolist() == [[False, True, False], [True, False, True]]


def test_matrix_mask_count_is_floor_of_numel_times_s():
    scores = torch.rand(7, 13, generator=torch.Generator().manual_seed(0))
    for s in (0.0, 0.1, 0.33, 0.5, 0.9):
        assert int(matrix_mask(scores, s).sum()) == int(7 * 13 * s)


def test_ties_break_by_position():
    scores = torch.ones(2, 4)
    assert matrix_mask(scores, 0.25).tolist() == [[True, True, False, False], [False, False, False, False]]
    assert row_mask(scores, 0.5).tolist() == [[True, True, False, False]] * 2


def test_row_mask_exact_per_row():
    scores = torch.rand(5, 16, generator=torch.Generator().manual_seed(1))
    mask = row_mask(scores, 0.5)
    assert mask.sum(dim=1).tolist() == [8] * 5


def test_nm_mask_groups():
    scores = torch.rand(4, 16, generator=torch.Generator().manual_seed(2))
    mask = nm_mask(scores, 2, 4)
    assert (mask.reshape(4, 4, 4).sum(-1) == 2).all()
    cfg = SparsityConfig(name="2of4", value=0.5, structure="nm", n=2, m=4)
    assert torch.equal(structured_mask(scores, cfg, per_row=False), mask)


def test_masks_equal_a_stable_sort_under_heavy_ties():
    g = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 5, (50, 64), generator=g).float()  # bf16-like: many equal values
    for k in (1, 20, 63):
        order = torch.sort(scores, dim=1, stable=True).indices[:, :k]
        expected = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order, True)
        assert torch.equal(row_mask(scores, k / 64 + 1e-9), expected)
    flat = torch.sort(scores.flatten(), stable=True).indices[:1000]
    expected = torch.zeros(scores.numel(), dtype=torch.bool).scatter_(0, flat, True).reshape(scores.shape)
    assert torch.equal(matrix_mask(scores, 1000 / scores.numel() + 1e-9), expected)


def test_row_split_across_threads_gives_the_same_masks():
    """Large CPU matrices are split by rows across threads; the masks must equal the one-piece result."""
    from mmprune_exp.pruners import masks

    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 50, (1500, 1024), generator=g).float()  # heavy ties cross chunk borders too
    assert scores.numel() >= masks._PARALLEL_MIN_NUMEL
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)  # uneven chunks
        split_rows, split_nm = masks.row_mask(scores, 0.5), masks.nm_mask(scores, 2, 4)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(split_rows, masks._lowest(scores, 512, dim=1))
    assert torch.equal(split_nm, masks._lowest(scores.reshape(1500, 256, 4), 2, dim=-1).reshape(1500, 1024))
