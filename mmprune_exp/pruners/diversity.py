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


def _positive_upper_mean(sims: torch.Tensor) -> float:
    """Mean of the entries above the diagonal of a square similarity block that are > 0 (NaN if none).

    Summed as the positive part of the strict upper triangle: one ``triu`` copy, then in place, instead of
    gathering the positive entries into a new tensor (the same entries; the sum may differ in the last bit)."""
    upper = torch.triu(sims, diagonal=1)
    count = int((upper > 0).sum())
    return float(upper.clamp_(min=0).sum()) / count if count else float("nan")


def normalized_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm, in fp32 (``[1, N, d]`` or ``[N, d]`` in, ``[N, d]`` out)."""
    return F.normalize(tokens.reshape(-1, tokens.shape[-1]).float(), dim=-1)


def _split(visual: torch.Tensor, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the visual and of the text tokens (ascending)."""
    visual = visual.reshape(-1).to(device=device, dtype=torch.bool)
    if visual.numel() != n:
        raise ValueError(f"visual mask has {visual.numel()} entries for {n} tokens")
    return visual.nonzero().squeeze(1), (~visual).nonzero().squeeze(1)


def _take(x: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    """``x.index_select(dim, idx)`` for ascending ``idx``; a view when ``idx`` is one contiguous run (an image's
    tokens usually are), which saves copying ``len(idx) x d`` values."""
    if len(idx) and int(idx[-1] - idx[0]) == len(idx) - 1:
        return x.narrow(dim, int(idx[0]), len(idx))
    return x.index_select(dim, idx)


def modality_similarity(tokens: torch.Tensor, visual: torch.Tensor, normalized: bool = False) -> ModalitySimilarity:
    """Mean cosine similarities within and between modalities of one sample's tokens (module docstring).

    ``normalized=True``: ``tokens`` already has unit rows (e.g. from :func:`normalized_tokens`), used as given.
    Only the visual-visual and text-text blocks of ``ŶŶᵀ`` are multiplied out (their positive entries are
    needed one by one); the visual-text mean is a plain mean, ``(Σ_v ŷ)·(Σ_l ŷ) / (n_v·n_l)``, from two sums
    of rows: half the work of the full ``N x N`` product for an even split.
    """
    y = tokens.reshape(-1, tokens.shape[-1]) if normalized else normalized_tokens(tokens)
    iv, il = _split(visual, y.shape[0], y.device)
    yv, yl = _take(y, 0, iv), _take(y, 0, il)
    vl = float(yv.sum(dim=0) @ yl.sum(dim=0)) / (len(yv) * len(yl)) if len(yv) and len(yl) else float("nan")
    return ModalitySimilarity(_positive_upper_mean(yv @ yv.T), _positive_upper_mean(yl @ yl.T), vl)


def gram_modality_similarity(gram: torch.Tensor, visual: torch.Tensor) -> ModalitySimilarity:
    """:func:`modality_similarity` from the Gram matrix ``ŶŶᵀ`` of the unit-row tokens (``N x N``), for a caller
    that has it anyway (AMIA): its visual-visual and text-text blocks, and the mean of its visual-text block."""
    iv, il = _split(visual, gram.shape[0], gram.device)

    def block(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return _take(_take(gram, 0, rows), 1, cols)

    vl = float(block(iv, il).mean()) if len(iv) and len(il) else float("nan")
    return ModalitySimilarity(_positive_upper_mean(block(iv, iv)), _positive_upper_mean(block(il, il)), vl)


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
