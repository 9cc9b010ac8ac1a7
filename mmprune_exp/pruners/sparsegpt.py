"""SparseGPT (Frantar & Alistarh 2023, IST-DASLab/sparsegpt): mask + OBS weight update from the layer Hessian.

Reproduces the reference ``fasterprune`` (see reference/weight_pruners.md §3):
- dead input columns (zero Hessian diagonal) get ``H[d, d] = 1`` and their weights are zeroed;
- damping ``percdamp * mean(diag H)`` on the diagonal, then ``Hinv`` = upper Cholesky factor of ``H^-1``
  (computed by a cheaper, mathematically identical route, see :func:`upper_cholesky_of_inverse`);
- per block of ``blocksize`` columns, one threshold over the whole ``rows x block`` slice of
  ``w^2 / diag(Hinv)^2`` with ``<=`` ("adaptive mask selection"), so rows may differ in sparsity. Known quirk
  kept on purpose: the threshold is the value at index ``int(numel * s)``, so every block prunes at least one
  weight even at s = 0 and at least ``int(numel * s) + 1`` in general;
- N:M picks the ``n`` lowest of each ``m``-group when the block reaches the group's first column, using the
  weights already updated by earlier columns; ties resolve by position (the reference's ``topk`` does not
  guarantee an order);
- column-by-column OBS update inside the block, then a lazy update of the columns to its right.

Deviation: where the reference crashes on a non-positive-definite Hessian, this retries with ten times the
damping (up to ``max_damp_retries`` times) and logs a warning each time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from mmprune_exp.config.schema import PrunerConfig, SparsityConfig, require
from mmprune_exp.pruners.base import register_pruner
from mmprune_exp.pruners.sequential import SequentialPruner
from mmprune_exp.pruners.stats import Hessian

log = logging.getLogger(__name__)


@dataclass
class SparseGPTResult:
    weight: torch.Tensor  # fp32, pruned and updated
    loss: float  # sum over rows of the OBS loss proxy (reference ``Losses.sum()``, halved per row)
    damping: float  # damping finally added to the diagonal


def _lower_triangular_inverse(M: torch.Tensor, block: int = 512) -> torch.Tensor:
    """Inverse of a lower-triangular matrix by 2x2 block recursion (about n^3/3 flops, in matmuls)."""
    n = M.shape[0]
    if n <= block:
        return torch.linalg.solve_triangular(M, torch.eye(n, dtype=M.dtype, device=M.device), upper=False)
    h = n // 2
    A_inv = _lower_triangular_inverse(M[:h, :h], block)
    D_inv = _lower_triangular_inverse(M[h:, h:], block)
    out = torch.zeros_like(M)
    out[:h, :h] = A_inv
    out[h:, h:] = D_inv
    out[h:, :h] = -D_inv @ (M[h:, :h] @ A_inv)
    return out


def upper_cholesky_of_inverse(H: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor U of H^-1 (U^T U = H^-1), the factor SparseGPT's updates read row by row.

    The reference takes cholesky(H) -> cholesky_inverse -> cholesky(upper). The same U comes cheaper from
    one Cholesky of the index-reversed matrix: if J H J = M M^T (J reverses indices, M lower), then
    H = R R^T with R = J M J upper, so H^-1 = U^T U with U = R^-1 = J M^-1 J, upper with a positive
    diagonal, hence the (unique) upper Cholesky factor. About 2n^3/3 flops instead of 5n^3/3.
    """
    M = torch.linalg.cholesky(torch.flip(H, (0, 1)))
    return torch.flip(_lower_triangular_inverse(M), (0, 1))


def inverse_hessian_factor(H: torch.Tensor, percdamp: float, max_retries: int = 4, name: str = "") -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp I)^-1``; retries with 10x damping if ``H`` is not positive definite."""
    damp = percdamp * torch.mean(torch.diag(H)).item()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for attempt in range(max_retries + 1):
        try:
            U = upper_cholesky_of_inverse(H + damp * eye)
            if torch.isfinite(U).all():
                return U, damp
            raise torch.linalg.LinAlgError("non-finite inverse factor")
        except torch.linalg.LinAlgError as err:
            if attempt == max_retries:
                raise RuntimeError(
                    f"SparseGPT: Hessian of {name or 'a layer'} is not positive definite even with damping {damp:.3g}; "
                    "use more calibration samples or raise pruner.percdamp"
                ) from err
            log.warning("SparseGPT: Cholesky failed for %s with damping %.3g (%s); retrying with %.3g", name, damp, err, damp * 10)
            damp *= 10
    raise AssertionError("unreachable")


@dataclass
class PreparedHessian:
    """What the OBS updates need from a Hessian; shared by linears that see the same input."""

    Hinv: torch.Tensor  # upper Cholesky factor of (H + damp I)^-1, dead columns set to identity first
    dead: torch.Tensor  # bool [cols]: inputs that were always zero
    damping: float


def prepare_hessian(H: torch.Tensor, percdamp: float = 0.01, max_damp_retries: int = 4, name: str = "") -> PreparedHessian:
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    Hinv, damp = inverse_hessian_factor(H, percdamp, max_damp_retries, name)
    return PreparedHessian(Hinv, dead, damp)


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    H: torch.Tensor | PreparedHessian,
    sparsity: float,
    prunen: int = 0,
    prunem: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    max_damp_retries: int = 4,
    name: str = "",
) -> SparseGPTResult:
    """Prune ``weight`` (``[rows, cols]``) given its input Hessian ``H`` (``[cols, cols]``, fp32) or a
    :class:`PreparedHessian` computed from it once for several linears with the same input."""
    prepared = H if isinstance(H, PreparedHessian) else prepare_hessian(H, percdamp, max_damp_retries, name)
    Hinv, damp = prepared.Hinv, prepared.damping
    # Work on W^T ([cols, rows], contiguous): every per-column step of the reference then touches
    # contiguous rows, and the rank-1 update is a BLAS ger (addr_) instead of a k=1 matmul.
    WT = weight.detach().float().T.contiguous()
    WT[prepared.dead] = 0
    cols, rows = WT.shape

    losses = torch.zeros(rows, device=WT.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = WT[i1:i2].clone()  # [count, rows]
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)

        if prunen == 0:
            tmp = W1.pow(2) / d1.reshape(-1, 1).pow(2)
            # The reference's sort(...)[k]; kthvalue gives the same value without a full sort.
            thresh = torch.kthvalue(tmp.flatten(), int(tmp.numel() * sparsity) + 1).values
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)

        # Inside the block the reference updates all remaining block columns after every column. The same
        # updates are applied here in sub-blocks of `sub` columns: immediately within the sub-block, and to
        # the columns after it in one matmul when the sub-block ends (the reference's lazy batching, one
        # level down). Same arithmetic, far fewer passes over the block.
        sub = max(prunem, (16 // prunem) * prunem) if prunen else 16
        for j1 in range(0, count, sub):
            j2 = min(j1 + sub, count)
            for i in range(j1, j2):
                w = W1[i]
                d = Hinv1[i, i]
                if prunen != 0 and i % prunem == 0:
                    tmp = W1[i : i + prunem].pow(2) / d1[i : i + prunem].reshape(-1, 1).pow(2)
                    lowest = torch.sort(tmp, dim=0, stable=True).indices[:prunen]
                    mask1.scatter_(0, i + lowest, True)
                q = w.masked_fill(mask1[i], 0)
                Q1[i] = q
                Losses1[i] = (w - q).pow(2) / d.pow(2)
                err1 = (w - q) / d
                # rank-1 update as a GEMM: BLAS keeps it fast where small elementwise kernels stall on threads
                W1[i:j2].addmm_(Hinv1[i, i:j2, None], err1[None, :], alpha=-1)
                Err1[i] = err1
            if j2 < count:
                W1[j2:].addmm_(Hinv1[j1:j2, j2:].T, Err1[j1:j2], alpha=-1)

        WT[i1:i2] = Q1
        losses += torch.sum(Losses1, 0) / 2
        WT[i2:].addmm_(Hinv[i1:i2, i2:].T, Err1, alpha=-1)
    W = WT.T
    return SparseGPTResult(W, float(losses.sum()), damp)


@dataclass
class SparseGPTConfig(PrunerConfig):
    """SparseGPT knobs (reference defaults)."""

    blocksize: int = 128  # columns per lazy-update block (and per mask-selection block)
    percdamp: float = 0.01  # damping as a fraction of mean(diag H)
    max_damp_retries: int = 4  # on a failed Cholesky: retry with 10x damping this many times

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.blocksize > 0, "blocksize", f"must be positive, got {self.blocksize}")
        require(self.percdamp > 0, "percdamp", f"must be positive, got {self.percdamp}")
        require(self.max_damp_retries >= 0, "max_damp_retries", f"must be >= 0, got {self.max_damp_retries}")


@register_pruner("sparsegpt", schema=SparseGPTConfig)
class SparseGPTPruner(SequentialPruner):
    def prune(self, adapter, calibration) -> None:
        # The reference turns TF32 off: the OBS updates are sensitive to matmul precision on Ampere+.
        saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            super().prune(adapter, calibration)
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

    def make_stat(self, linear: nn.Linear) -> Hessian:
        return Hessian(linear.in_features, linear.weight.device)

    def prune_linear(self, name: str, linear: nn.Linear, stat: Hessian, sparsity: SparsityConfig) -> None:
        if getattr(stat, "prepared", None) is None:  # once per group of linears sharing this input
            stat.prepared = prepare_hessian(stat.H, self.cfg.percdamp, self.cfg.max_damp_retries, name)
            stat.H = None  # the factor replaces it; free the memory
        nm = sparsity.structure == "nm"
        result = sparsegpt_prune(
            linear.weight,
            stat.prepared,
            sparsity.value,
            prunen=sparsity.n if nm else 0,
            prunem=sparsity.m if nm else 0,
            blocksize=self.cfg.blocksize,
            name=name,
        )
        linear.weight.copy_(result.weight.to(linear.weight.dtype))
        log.debug("sparsegpt %s: loss %.4g, damping %.3g", name, result.loss, result.damping)
