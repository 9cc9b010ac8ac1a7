"""Token diversity by modality: the similarity measure behind TAMP's DAS and AMIA and Qwen-TAMP's layer sparsity.

For one sample's tokens ``Y`` (``N x d``: a Linear's outputs, or a decoder layer's inputs) and its visual-token
mask, TAMP measures mean cosine similarities on the row-normalised tokens ``Ŷ``
(reference: ``cos_pairwise_density`` in G-JWLee/TAMP, see shared/reference/weight_pruners.md §5.5):

- ``vv``: among visual tokens, the mean of the upper-triangle (``i < j``) similarities **that are > 0**;
- ``ll``: the same among text tokens;
- ``vl``: between visual and text tokens, the mean of **all** similarities.

The ``> 0`` filter is the reference's (it drops the zero lower triangle together with negative similarities),
so it is kept. A mean over nothing (no visual tokens, no text tokens, or no positive similarity) is NaN; the
callers decide what that means. Computed in fp32 whatever the model's dtype (the reference used fp16).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ModalitySimilarity:
    vv: float  # visual-visual, positive upper-triangle mean
    ll: float  # text-text, positive upper-triangle mean
    vl: float  # visual-text, plain mean

    @property
    def diversity(self) -> float:
        """``(1 - vv) + (1 - ll) + (1 - vl)``: DAS's importance score of a matrix (3x the paper's mean distance)."""
        return 3.0 - (self.vv + self.ll + self.vl)

    @property
    def density(self) -> float:
        """``(vv + ll + vl) / 3``: AMIA's mean similarity (its MMD stopping threshold uses ``sqrt(1 - density)``)."""
        return (self.vv + self.ll + self.vl) / 3.0


def _positive_upper_mean(x: torch.Tensor) -> float:
    sims = x @ x.T
    upper = torch.triu(sims, diagonal=1)
    positive = upper[upper > 0]
    return float(positive.mean()) if positive.numel() else float("nan")


def normalized_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm, in fp32 (``[1, N, d]`` or ``[N, d]`` in, ``[N, d]`` out)."""
    return F.normalize(tokens.reshape(-1, tokens.shape[-1]).float(), dim=-1)


def modality_similarity(tokens: torch.Tensor, visual: torch.Tensor) -> ModalitySimilarity:
    """Mean cosine similarities within and between modalities of one sample's tokens (module docstring)."""
    y = normalized_tokens(tokens)
    visual = visual.reshape(-1).to(device=y.device, dtype=torch.bool)
    if visual.numel() != y.shape[0]:
        raise ValueError(f"visual mask has {visual.numel()} entries for {y.shape[0]} tokens")
    yv, yl = y[visual], y[~visual]
    vl = float((yv @ yl.T).mean()) if len(yv) and len(yl) else float("nan")
    return ModalitySimilarity(_positive_upper_mean(yv), _positive_upper_mean(yl), vl)


class RunningSimilarity:
    """The reference's running mean over samples, each sample weighted equally: ``x <- x·n/(n+1) + new/(n+1)``.

    Each of the three means runs on its own count and skips a sample where it is NaN (a text-only sample has
    no visual mean): the reference would let one such sample turn the whole score into NaN. Where every sample
    has every mean, this is the reference's arithmetic exactly.
    """

    _KEYS = ("vv", "ll", "vl")

    def __init__(self) -> None:
        self.sums = dict.fromkeys(self._KEYS, 0.0)
        self.counts = dict.fromkeys(self._KEYS, 0)

    def add(self, sim: ModalitySimilarity) -> None:
        for key in self._KEYS:
            new = getattr(sim, key)
            if math.isnan(new):
                continue
            n = self.counts[key]
            self.sums[key] = self.sums[key] * n / (n + 1) + new / (n + 1)
            self.counts[key] = n + 1

    @property
    def value(self) -> ModalitySimilarity:
        """The means so far; a mean no sample had is NaN."""
        return ModalitySimilarity(*(self.sums[k] if self.counts[k] else float("nan") for k in self._KEYS))
