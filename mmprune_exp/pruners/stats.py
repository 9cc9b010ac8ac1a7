"""Activation statistics collected from a Linear's inputs during calibration (always fp32).

``n`` counts calibration *samples* (batch rows), not tokens, as in the references: Wanda's
``WrappedGPT.add_batch`` and SparseGPT's ``add_batch`` both rescale by samples. Every sample goes through
the layer alone (batch size 1, no padding), so padding never enters a statistic.
"""

from __future__ import annotations

import itertools

import torch


class RowScaler:
    """Wanda's input-channel statistic: ``scaler[j] = sum over all tokens of x_j^2 / N_samples``.

    Kept as a running mean in the reference's order (scale down, add the new batch divided by the new count).
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.scaler = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        """``x``: the Linear's input for one forward call, shape ``[batch, ..., in_features]``."""
        batch = x.shape[0] if x.dim() > 2 else 1
        flat = x.reshape(-1, x.shape[-1]).to(self.scaler.device, torch.float32)
        self.scaler *= self.n / (self.n + batch)
        self.n += batch
        self.scaler += flat.pow(2).sum(dim=0) / self.n


class Hessian:
    """SparseGPT's layer Hessian ``H = (2 / N_samples) * sum_samples X X^T`` (``in x in``, fp32).

    For speed on wide inputs (down_proj's 11008 channels dominate SparseGPT's cost) the raw sum
    ``S = sum X^T X`` is accumulated instead of the reference's running mean, several samples per matmul
    (inputs are buffered up to ``flush_tokens`` rows) and only for the blocks on and above the diagonal
    (``H`` is symmetric; the lower half is mirrored when ``H`` is read). The result equals the reference's
    running form up to float rounding (about 1e-7 relative).

    ``H`` is exactly symmetric by construction: besides the mirrored off-diagonal blocks, the lower triangle
    of each diagonal block is overwritten with its upper one. A diagonal block comes out of ``addmm_``, and
    a BLAS may sum ``x_i x_j`` and ``x_j x_i`` in different orders (different kernels or tiles for the two
    halves), so its raw result is symmetric only up to rounding on some CPUs.
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu", flush_tokens: int = 4096, block: int = 2048):
        self.S = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0
        self.flush_tokens = flush_tokens
        bounds = list(range(0, in_features, block)) + [in_features]
        if len(bounds) > 2 and bounds[-1] - bounds[-2] < block // 2:  # no sliver of a last block
            bounds.pop(-2)
        self._blocks = list(itertools.pairwise(bounds))
        self._pending: list[torch.Tensor] = []
        self._pending_rows = 0
        self._H: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        batch = x.shape[0] if x.dim() > 2 else 1
        self.n += batch
        flat = x.reshape(-1, x.shape[-1]).to(self.S.device, torch.float32)
        self._pending.append(flat)
        self._pending_rows += flat.shape[0]
        if self._pending_rows >= self.flush_tokens:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        X = torch.cat(self._pending) if len(self._pending) > 1 else self._pending[0]
        XT = X.T
        for i, (a0, a1) in enumerate(self._blocks):
            for b0, b1 in self._blocks[i:]:
                self.S[a0:a1, b0:b1].addmm_(XT[a0:a1], X[:, b0:b1])
        self._pending, self._pending_rows = [], 0

    @property
    def H(self) -> torch.Tensor | None:
        if self._H is None and self.S is not None:
            self._flush()
            for i, (a0, a1) in enumerate(self._blocks):  # mirror the upper blocks into the lower ones
                for b0, b1 in self._blocks[i + 1 :]:
                    self.S[b0:b1, a0:a1] = self.S[a0:a1, b0:b1].T
                diag = self.S[a0:a1, a0:a1]  # and the upper triangle of the diagonal block into its lower one
                upper = torch.ones(a1 - a0, a1 - a0, dtype=torch.bool, device=diag.device).triu_()
                diag.copy_(torch.where(upper, diag, diag.T))  # a selection, no arithmetic: exact
            self._H = self.S.mul_(2 / max(self.n, 1))
            self.S = None
        return self._H

    @H.setter
    def H(self, value: torch.Tensor | None) -> None:
        """``stat.H = None`` frees the matrix once a pruner has what it needs from it."""
        self._H = value
        self.S = None
