"""Wanda, SparseGPT and OWL against their references' formulas, restated independently on small tensors.

The restatements follow reference/weight_pruners.md (§2 Wanda, §3 SparseGPT, §4 OWL); they are written
as plainly as possible (explicit loops, explicit inverses) rather than like the implementations.
"""

from __future__ import annotations

import pytest
import torch

from mmprune_exp.config.schema import SparsityConfig
from mmprune_exp.pruners.owl import outlier_ratio, owl_layer_sparsities
from mmprune_exp.pruners.sparsegpt import sparsegpt_prune
from mmprune_exp.pruners.stats import Hessian, RowScaler
from mmprune_exp.pruners.wanda import wanda_mask, wanda_scores

UNSTRUCTURED_50 = SparsityConfig(name="s50", value=0.5)
NM_24 = SparsityConfig(name="2of4", value=0.5, structure="nm", n=2, m=4)
EPS32 = torch.finfo(torch.float32).eps
EPS64 = torch.finfo(torch.float64).eps


def batches(seed=0, cols=24, lengths=(5, 9, 3, 7)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, n, cols, generator=g) for n in lengths]


# -- statistics -----------------------------------------------------------------------------------


def test_row_scaler_is_sum_of_squares_over_samples():
    xs = batches()
    stat = RowScaler(24)
    for x in xs:
        stat.add(x)
    expected = sum((x[0] ** 2).sum(0) for x in xs) / len(xs)  # N counts samples, not tokens
    assert stat.n == 4
    # Sums of positive terms (no cancellation) in a different order: each side rounds at most once per
    # operation, about 25 operations per entry here (11 squares summed, 4 rescale/divide/add steps) -> 64 eps.
    assert torch.allclose(stat.scaler, expected, rtol=64 * EPS32, atol=0)


def hessian_formula_and_bound(xs):
    """``2/N sum X^T X`` in float64, and a bound on the float32 rounding error of any summation order.

    Each entry is a dot product over all tokens; summed in float32 in any order, its error is at most
    ``k * eps * sum |x_i x_j|`` (k = number of roundings along the chain, at most tokens + a few rescalings),
    so the bound scales with ``|X|^T |X|``, not with the entry itself (off-diagonal entries cancel).
    """
    tokens = sum(x.shape[1] for x in xs)
    exact = 2 / len(xs) * sum(x[0].double().T @ x[0].double() for x in xs)
    magnitude = 2 / len(xs) * sum(x[0].double().abs().T @ x[0].double().abs() for x in xs)
    return exact, (tokens + 8) * EPS32 * magnitude


def test_hessian_is_two_over_n_sum_xxt():
    xs = batches(cols=16)
    stat = Hessian(16)
    for x in xs:
        stat.add(x)
    expected, bound = hessian_formula_and_bound(xs)
    assert ((stat.H.double() - expected).abs() <= bound).all()


def test_blocked_buffered_hessian_equals_the_formula():
    xs = batches(seed=7, cols=37, lengths=(5, 9, 3, 7, 11))
    stat = Hessian(37, flush_tokens=10, block=8)  # several blocks, a flush every few samples
    for x in xs:
        stat.add(x)
    expected, bound = hessian_formula_and_bound(xs)
    assert ((stat.H.double() - expected).abs() <= bound).all()
    assert torch.equal(stat.H, stat.H.T)  # exact by construction (see the next test)


@pytest.mark.parametrize(
    "cols,block,flush_tokens",
    [(37, 8, 10), (37, 64, 10), (37, 5, 1), (40, 16, 4096), (33, 32, 7)],  # one block, slivers merged, ...
)
def test_hessian_is_exactly_symmetric_whatever_the_blas_does(monkeypatch, cols, block, flush_tokens):
    """Some BLAS kernels round the two halves of X^T X differently (another tile order on another CPU).
    Simulate such a BLAS: every square ``addmm_`` result (a diagonal block) gets its strictly lower
    triangle nudged. ``H`` must still be exactly symmetric, and still equal the formula."""
    real_addmm_ = torch.Tensor.addmm_

    def skewed_addmm_(self, mat1, mat2, *args, **kwargs):
        out = real_addmm_(self, mat1, mat2, *args, **kwargs)
        if out.shape[0] == out.shape[1]:
            out.add_(out.tril(-1) * (4 * EPS32))  # a few ulps, as a different summation order would give
        return out

    monkeypatch.setattr(torch.Tensor, "addmm_", skewed_addmm_)
    xs = batches(seed=11, cols=cols, lengths=(5, 9, 3, 7, 11, 6))
    stat = Hessian(cols, flush_tokens=flush_tokens, block=block)
    for x in xs:
        stat.add(x)
    H = stat.H
    monkeypatch.undo()
    assert torch.equal(H, H.T)
    expected, bound = hessian_formula_and_bound(xs)
    assert ((H.double() - expected).abs() <= bound + 8 * EPS32 * expected.abs()).all()


# -- Wanda ----------------------------------------------------------------------------------------


def test_wanda_prunes_exactly_int_cs_per_row_by_metric():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(6, 20, generator=g)
    scaler = torch.rand(20, generator=g)
    mask = wanda_mask(W, scaler, SparsityConfig(name="s30", value=0.3))
    assert mask.sum(1).tolist() == [int(20 * 0.3)] * 6
    metric = W.abs() * scaler.sqrt()
    for r in range(6):  # pruned entries of a row are its lowest metrics
        assert metric[r][mask[r]].max() <= metric[r][~mask[r]].min()


def test_wanda_ties_prune_earlier_columns_first():
    W = torch.ones(2, 8)
    mask = wanda_mask(W, torch.ones(8), UNSTRUCTURED_50)
    assert mask.tolist() == [[True] * 4 + [False] * 4] * 2


def test_wanda_scaler_scale_does_not_change_the_mask():
    g = torch.Generator().manual_seed(2)
    W, scaler = torch.randn(4, 16, generator=g), torch.rand(16, generator=g)
    # A power of 4: the scaled scaler, its square root and every score are exactly scaled by 2 (float
    # rounding commutes with powers of two), so the masks must be identical, not just nearly so. Another
    # factor would round the scores differently and could reorder two nearly tied ones.
    assert torch.equal(wanda_mask(W, scaler, UNSTRUCTURED_50), wanda_mask(W, scaler * 16, UNSTRUCTURED_50))


def test_wanda_nm_pattern():
    g = torch.Generator().manual_seed(3)
    W, scaler = torch.randn(5, 16, generator=g), torch.rand(16, generator=g)
    mask = wanda_mask(W, scaler, NM_24)
    assert (mask.reshape(5, 4, 4).sum(-1) == 2).all()
    scores = wanda_scores(W, scaler).reshape(5, 4, 4)
    kept_min = scores.masked_fill(mask.reshape(5, 4, 4), float("inf")).min(-1).values
    pruned_max = scores.masked_fill(~mask.reshape(5, 4, 4), float("-inf")).max(-1).values
    assert (pruned_max <= kept_min).all()


# -- SparseGPT ------------------------------------------------------------------------------------


def sparsegpt_restated(W, H, s, blocksize, percdamp=0.01, n=0, m=0, follow=None, tie_tol=0.0):
    """Plain restatement: process columns left to right; for column i the OBS step uses the inverse of the
    Hessian restricted to the columns not yet processed (i..C-1). The mask of each block is chosen when the
    block starts (unstructured: one threshold over the block, `<=` the value at index int(numel*s)).

    ``follow``: the implementation's mask (``got == 0``). The implementation works in float32 and this
    restatement in float64, so saliencies differ by rounding, and two entries whose saliencies tie to within
    that rounding may be ordered either way. Where the masks disagree, the disagreement must be such a
    near-tie (within ``tie_tol``, relative) and must not change the count; the restatement then continues
    with the implementation's choice, so that one legitimate flip does not derail every later column.
    """
    W = W.clone().double()
    H = H.clone().double()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H = H + percdamp * torch.diag(H).mean() * torch.eye(cols, dtype=H.dtype)
    inv_diag = torch.tensor([torch.linalg.inv(H[i:, i:])[0, 0] for i in range(cols)], dtype=H.dtype)
    mask = torch.zeros_like(W, dtype=torch.bool)
    for i in range(cols):
        if n == 0 and i % blocksize == 0:
            j = min(i + blocksize, cols)
            sal = W[:, i:j] ** 2 / inv_diag[i:j]  # OBS saliency w^2 / [H_sub^-1]_00
            thresh = torch.sort(sal.flatten())[0][int(sal.numel() * s)]
            mask[:, i:j] = sal <= thresh
            if follow is not None:
                differ = mask[:, i:j] != follow[:, i:j]
                assert ((sal[differ] - thresh).abs() <= tie_tol * thresh).all(), f"block at column {i}"
                assert int(follow[:, i:j].sum()) == int(mask[:, i:j].sum()), f"block at column {i}"
                mask[:, i:j] = follow[:, i:j]
        if n and i % m == 0:
            sal = W[:, i : i + m] ** 2 / inv_diag[i : i + m]
            order = torch.sort(sal, dim=1, stable=True)
            mask[:, i : i + m].scatter_(1, order.indices[:, :n], True)
            if follow is not None:
                assert (follow[:, i : i + m].sum(1) == n).all(), f"group at column {i}"
                for r in torch.nonzero((mask[:, i : i + m] != follow[:, i : i + m]).any(1)).flatten().tolist():
                    last_in, first_out = order.values[r, n - 1], order.values[r, n]
                    assert first_out - last_in <= tie_tol * first_out, f"row {r}, group at column {i}"
                mask[:, i : i + m] = follow[:, i : i + m]
        inv = torch.linalg.inv(H[i:, i:])
        w = W[:, i].clone()
        q = torch.where(mask[:, i], torch.zeros_like(w), w)
        W[:, i:] -= ((w - q) / inv[0, 0]).unsqueeze(1) * inv[0].unsqueeze(0)
        W[:, i] = q
    return W.float()


def layer_problem(seed=0, rows=12, cols=32, tokens=200):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, cols, generator=g) * torch.linspace(0.2, 3.0, cols)  # uneven channel scales
    W = torch.randn(rows, cols, generator=g)
    stat = Hessian(cols)
    for chunk in X.split(50):
        stat.add(chunk.unsqueeze(0))
    return W, X, stat.H


def float32_tolerance(H, percdamp=0.01):
    """Relative accuracy to expect of the float32 implementation against the float64 restatement.

    The OBS quantities come from (the Cholesky factor of) the inverse of the damped H, whose float32
    forward error is about cond(H) * eps32; the weight updates and the saliency w^2 / d^2 carry a few such
    errors each. 8 * cond * eps32 (about 1.5e-4 for these problems, whose cond is about 170) covers that;
    a wrong formula is off by orders of magnitude more.
    """
    Hd = H.double()
    Hd = Hd + percdamp * torch.diag(Hd).mean() * torch.eye(Hd.shape[0], dtype=Hd.dtype)
    return 8 * float(torch.linalg.cond(Hd)) * EPS32


@pytest.mark.parametrize("s,blocksize", [(0.5, 8), (0.3, 32), (0.7, 16)])
def test_sparsegpt_matches_restatement(s, blocksize):
    W, _, H = layer_problem()
    got = sparsegpt_prune(W, H, s, blocksize=blocksize).weight
    tol = float32_tolerance(H)
    # Masks: equal except near-ties within tol of the block threshold, same count (checked inside).
    want = sparsegpt_restated(W, H, s, blocksize, follow=got == 0, tie_tol=tol)
    assert torch.equal(got == 0, want == 0)  # pruned entries are exact zeros on both sides
    assert torch.allclose(got, want, rtol=tol, atol=tol * float(W.abs().max()))


def test_sparsegpt_nm_matches_restatement_and_pattern():
    W, _, H = layer_problem(seed=1)
    got = sparsegpt_prune(W, H, 0.5, prunen=2, prunem=4, blocksize=16).weight
    tol = float32_tolerance(H)
    want = sparsegpt_restated(W, H, 0.5, 16, n=2, m=4, follow=got == 0, tie_tol=tol)
    assert torch.allclose(got, want, rtol=tol, atol=tol * float(W.abs().max()))
    assert ((got == 0).reshape(12, 8, 4).sum(-1) == 2).all()


def test_restatement_rejects_a_mask_that_is_not_a_near_tie():
    """The tolerant comparison above can still fail: swap one pruned and one kept entry far from the
    threshold and the restatement refuses the implementation's mask."""
    W, _, H = layer_problem()
    follow = sparsegpt_prune(W, H, 0.5, blocksize=8).weight == 0
    # column 0 shares one d for all rows: saliency follows |w|; swap the smallest pruned and largest kept
    size = W[:, 0].abs()
    smallest = int(size.masked_fill(~follow[:, 0], float("inf")).argmin())
    largest = int(size.masked_fill(follow[:, 0], -1).argmax())
    follow[smallest, 0], follow[largest, 0] = False, True
    with pytest.raises(AssertionError, match="block at column 0"):
        sparsegpt_restated(W, H, 0.5, 8, follow=follow, tie_tol=float32_tolerance(H))


def test_sparsegpt_block_counts_follow_the_le_threshold_quirk():
    W, _, H = layer_problem(seed=2)
    for s in (0.0, 0.5):
        got = sparsegpt_prune(W, H, s, blocksize=8).weight
        for b in range(0, 32, 8):
            zeros = int((got[:, b : b + 8] == 0).sum())
            assert zeros >= int(12 * 8 * s) + 1  # at s = 0 the reference still prunes one weight per block


def test_sparsegpt_reconstructs_better_than_wanda_mask():
    W, X, H = layer_problem(seed=3, cols=96, tokens=600)
    pruned = sparsegpt_prune(W, H, 0.5).weight  # reference block size 128 (one block here)
    scaler = (X**2).sum(0)  # Wanda statistic on the same data (scale-free for the mask)
    wanda = W.clone()
    wanda[wanda_mask(W, scaler, UNSTRUCTURED_50)] = 0
    err_sgpt = ((X @ W.T - X @ pruned.T) ** 2).sum()
    err_wanda = ((X @ W.T - X @ wanda.T) ** 2).sum()
    assert err_sgpt < err_wanda


def test_sparsegpt_dead_columns_are_zeroed_and_finite():
    W, _, H = layer_problem(seed=4)
    H[:, 5] = 0
    H[5, :] = 0  # input channel 5 never fires
    got = sparsegpt_prune(W, H, 0.5, blocksize=8).weight
    assert torch.isfinite(got).all()
    assert (got[:, 5] == 0).all()


def test_sparsegpt_retries_a_failed_cholesky_with_more_damping(caplog):
    W = torch.randn(4, 8)
    H = torch.eye(8)
    H[0, 1] = H[1, 0] = 1.5  # indefinite 2x2 minor (eigenvalue -0.5): damping 0.01 and 0.1 fail, 1.0 works
    result = sparsegpt_prune(W, H, 0.5, blocksize=8, percdamp=0.01, max_damp_retries=4)
    assert torch.isfinite(result.weight).all() and result.damping == pytest.approx(1.0)
    assert sum("Cholesky failed" in r.message for r in caplog.records) == 2
    with pytest.raises(RuntimeError, match="not positive definite"):
        sparsegpt_prune(W, -torch.eye(8), 0.5, blocksize=8, max_damp_retries=2)  # no damping can fix it


# -- OWL ------------------------------------------------------------------------------------------


def test_owl_sparsities_average_s_span_two_lambda_and_spare_outlier_layers():
    ratios = [1.0, 4.0, 2.5, 0.5, 3.0]
    out = owl_layer_sparsities(ratios, 0.6, 0.08)
    assert sum(out) / len(out) == pytest.approx(0.6)
    assert max(out) - min(out) == pytest.approx(0.16)
    order = sorted(range(5), key=lambda i: ratios[i])
    assert [out[i] for i in order] == sorted(out, reverse=True)  # more outliers -> lower sparsity


def test_owl_equal_ratios_give_uniform_sparsity():
    assert owl_layer_sparsities([2.0, 2.0, 2.0], 0.5, 0.08) == pytest.approx([0.5, 0.5, 0.5])


def test_outlier_ratio_counts_entries_above_m_times_mean():
    metric = torch.tensor([1.0] * 98 + [100.0, 200.0])
    # mean = (98 + 300) / 100 = 3.98; M = 5 -> threshold 19.9 -> 2 of 100 entries
    assert outlier_ratio(metric, 5.0) == pytest.approx(2.0)


def test_inverse_factor_equals_the_reference_route():
    from mmprune_exp.pruners.sparsegpt import upper_cholesky_of_inverse

    _, _, H = layer_problem(seed=5, cols=1200, tokens=1500)  # > one recursion block
    H = H.double() + 0.01 * torch.diag(H.double()).mean() * torch.eye(1200, dtype=torch.float64)
    reference = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    U = upper_cholesky_of_inverse(H)
    # Two backward-stable routes to the same factor: each is within about cond(H) * eps64 of the exact one,
    # normwise (cond is about 500 here, so ~1e-13; measured ~1e-15). Elementwise relative checks would be
    # wrong for the tiny entries, whose absolute error is set by the norm, not by their own size.
    cond = float(torch.linalg.cond(H))
    assert torch.linalg.matrix_norm(U - reference) <= 10 * cond * EPS64 * torch.linalg.matrix_norm(reference)
    assert torch.equal(U, U.triu()) and (torch.diag(U) > 0).all()  # upper with a positive diagonal
