"""Activation statistics collected from a Linear's inputs during calibration (always fp32).

``n`` counts calibration *samples* (batch rows), not tokens, as in the references: Wanda's
``WrappedGPT.add_batch`` and SparseGPT's ``add_batch`` both rescale by samples. Every sample goes through
the layer alone (batch size 1, no padding), so padding never enters a statistic.
"""

from __future__ import annotations

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
    """SparseGPT's layer Hessian ``H = (2 / N_samples) * sum_samples X X^T`` (``in x in``), as a running mean."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        batch = x.shape[0] if x.dim() > 2 else 1
        flat = x.reshape(-1, x.shape[-1]).to(self.H.device, torch.float32)
        self.H *= self.n / (self.n + batch)
        self.n += batch
        flat = flat * (2 / self.n) ** 0.5
        self.H += flat.T @ flat
