"""SparseGPT (Frantar & Alistarh 2023, IST-DASLab/sparsegpt): mask + OBS weight update from the layer Hessian.

Reproduces the reference ``fasterprune`` (see reference/weight_pruners.md §3):
- dead input columns (zero Hessian diagonal) get ``H[d, d] = 1`` and their weights are zeroed;
- damping ``percdamp * mean(diag H)`` on the diagonal, then ``Hinv`` = upper Cholesky factor of ``H^-1``;
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

from mmprune_exp.config.schema import SparsityConfig
from mmprune_exp.pruners.base import register_pruner
from mmprune_exp.pruners.sequential import SequentialPruner
from mmprune_exp.pruners.stats import Hessian

log = logging.getLogger(__name__)


@dataclass
class SparseGPTResult:
    weight: torch.Tensor  # fp32, pruned and updated
    loss: float  # sum over rows of the OBS loss proxy (reference ``Losses.sum()``, halved per row)
    damping: float  # damping finally added to the diagonal


def inverse_hessian_factor(H: torch.Tensor, percdamp: float, max_retries: int = 4, name: str = "") -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp I)^-1``; retries with 10x damping if ``H`` is not positive definite."""
    damp = percdamp * torch.mean(torch.diag(H)).item()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for attempt in range(max_retries + 1):
        try:
            L = torch.linalg.cholesky(H + damp * eye)
            inv = torch.cholesky_inverse(L)
            U = torch.linalg.cholesky(inv, upper=True)
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


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    prunen: int = 0,
    prunem: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    max_damp_retries: int = 4,
    name: str = "",
) -> SparseGPTResult:
    """Prune ``weight`` (``[rows, cols]``) given its input Hessian ``H`` (``[cols, cols]``, fp32)."""
    W = weight.detach().clone().float()
    H = H.clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv, damp = inverse_hessian_factor(H, percdamp, max_damp_retries, name)
    del H

    losses = torch.zeros(rows, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d1 = torch.diag(Hinv1)

        if prunen == 0:
            tmp = W1.pow(2) / d1.reshape(1, -1).pow(2)
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)

        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i : i + prunem].pow(2) / d1[i : i + prunem].reshape(1, -1).pow(2)
                lowest = torch.sort(tmp, dim=1, stable=True).indices[:, :prunen]
                mask1.scatter_(1, i + lowest, True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            Losses1[:, i] = (w - q).pow(2) / d.pow(2)
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1

        W[:, i1:i2] = Q1
        losses += torch.sum(Losses1, 1) / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return SparseGPTResult(W, float(losses.sum()), damp)


@register_pruner("sparsegpt")
class SparseGPTPruner(SequentialPruner):
    def make_stat(self, linear: nn.Linear) -> Hessian:
        return Hessian(linear.in_features, linear.weight.device)

    def prune_linear(self, name: str, linear: nn.Linear, stat: Hessian, sparsity: SparsityConfig) -> None:
        nm = sparsity.structure == "nm"
        result = sparsegpt_prune(
            linear.weight,
            stat.H,
            sparsity.value,
            prunen=sparsity.n if nm else 0,
            prunem=sparsity.m if nm else 0,
            blocksize=self.cfg.blocksize,
            percdamp=self.cfg.percdamp,
            max_damp_retries=self.cfg.max_damp_retries,
            name=name,
        )
        linear.weight.copy_(result.weight.to(linear.weight.dtype))
        log.debug("sparsegpt %s: loss %.4g, damping %.3g", name, result.loss, result.damping)
