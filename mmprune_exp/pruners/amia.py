"""TAMP's AMIA token selection (Adaptive Multimodal Input Activation) as one pure function.

For one Linear and one calibration sample, AMIA chooses which tokens feed Wanda's ``sum x^2`` statistic.
Reference: G-JWLee/TAMP, ``llava/pruners/wanda_pruner.py::AdaptiveMultimodalInputActivation.add_batch``
(semantics in shared/reference/weight_pruners.md §5.6). With the Linear's outputs ``Y`` (``N x d_out``), the
sample's visual-token mask and the layer's attention prior ``a`` (last query row, mean over heads):

1. ``Ŷ`` = ``Y`` with unit rows; ``ρ`` = AMIA's density ``(μ_vv + μ_ll + μ_vl) / 3``, the means of
   :func:`mmprune_exp.pruners.diversity.modality_similarity` (positive-only upper-triangle means within a
   modality, plain mean between them), read off the blocks of the Gram matrix ``ŶŶᵀ`` that steps 2 and 4 need
   anyway (``diversity.gram_modality_similarity``), in the compute dtype.
2. ``D = 1 - ŶŶᵀ``; each token's ``k`` nearest other tokens by ``D`` form its neighbourhood ``N(p)``.
3. One message pass: ``g_p = a_p + Σ_{q ∈ N(p)} exp(-gamma·D_pq)·a_q`` (neighbours summed nearest first).
4. Kernel ``K_pq = exp(-||ŷ_p - ŷ_q||² / (2σ²))``. For unit rows ``||ŷ_p - ŷ_q||² = 2 - 2ŷ_p·ŷ_q = 2·D_pq``, so
   ``K = exp(-D / σ²)``, which is ``exp(-D)`` at the reference's ``σ = 1``, and is computed so. An all-zero
   output row (``F.normalize`` leaves it at zero) is not a unit row: its row and column use the reference's
   ``||ŷ_p||² + ||ŷ_q||² - 2ŷ_p·ŷ_q`` (squared distance 1 to a unit row, not ``2·D = 2``). The diagonal is
   exactly 1.
5. Greedy, from ``S = ∅``: ``t = argmax g`` (first index on ties); every ``q ∈ N(t)`` is damped,
   ``g_q -= exp(-decay·D_tq)·max(g_t, 0)`` (with ``g_t`` read before ``t`` is masked); ``t`` joins ``S`` and
   leaves the competition; then ``MMD² = mean(K) + mean(K[S,S]) - 2·mean(K[:,S])`` (the biased V-statistic:
   diagonals included) and the loop stops at the first step where ``MMD² < threshold_scale·sqrt(1 - ρ)``.

The selection order depends on ``g`` only, never on the MMD, so the greedy order is produced in chunks by a
small loop over ``N``-sized arrays (argmax, three subtractions), and the MMD² of every prefix of a chunk is
computed at once from ``K`` rows gathered for the chunk (``ΣK[S,S]`` grows by ``2·ΣK[t,S_old] + K[t,t]`` per
token, ``ΣK[:,S]`` by the column sum of ``t``; both accumulated in float64). Chunks double in size, so the
MMD work is ``O(|S_final|·N)`` at most about twice over, and the whole call is dominated by the one ``N x N``
Gram matrix.

Deviations from the reference, all deliberate:

- **fp32** (float64 when ``outputs`` is float64) instead of the reference's fp16 ``Y``, ``D``, ``K`` and ``g``;
  the MMD² sums are float64 (from column sums of ``K`` in the compute dtype).
- **Self is excluded explicitly from the neighbours** (the diagonal of ``D`` is set to ``+inf`` before the
  k smallest are taken). The reference takes ``topk(k+1, smallest)[:, 1:]``, assuming a token's nearest
  token is itself. With an exact duplicate (``D = 0`` to another token), or a near-duplicate that fp16
  rounding puts below the rounded self-distance ``1 - ||ŷ||²``, that assumption fails: the reference may drop
  a genuine neighbour and keep the token itself, so its message pass adds ``a_p`` a second time in place of
  that neighbour's prior, and its damping spares that neighbour and damps the selected token instead (which
  is masked right after). Here a token's neighbours are
  always ``k`` other tokens. Ties in distance go to the **lower index** (the reference's ``topk`` leaves the
  order of ties unspecified); rows without ties use ``topk`` directly, rows with ties a stable sort.
- **A selected token is masked with ``-inf``** instead of the reference's ``g[S] = min(g) - 1``. Both only
  keep selected tokens out of the argmax (damping a selected token has no other effect), and they agree
  whenever ``min(g) - 1 < min(g)`` in floating point, i.e. ``|g| < 2^23`` in fp32; ``g`` is built from attention
  probabilities and stays far below that.
- **Guards** (the reference can loop forever or fail; each one that fires is named in ``fallback``):

  * ``N == 0``: nothing selected. ``N <= k`` (fewer other tokens than neighbours; the reference's ``topk``
    raises): all tokens are selected (plain Wanda for that sample).
  * Non-finite outputs (a NaN/inf row would make ``D`` NaN): all tokens are selected.
  * A non-finite prior entry becomes 0. The reference applies ``nan_to_num(nan=0)`` to its softmax, which
    maps ``±inf`` to ``±max``; softmax probabilities are never infinite, and ``±max`` would overflow the
    message pass to ``inf``/NaN, so ``±inf`` is mapped to 0 too.
  * Density terms that are NaN (the reference's ``ρ`` would be NaN, ``MMD² < NaN`` is never true and the
    loop never ends): a within-modality mean over pairs of which none is positive (every similarity ``<= 0``,
    e.g. orthogonal or anti-correlated tokens) is taken as 0, the limit of a positive-only mean; a term with
    no pair at all (no visual or no text tokens, or a single token of a modality) is dropped, and ``ρ`` is the
    mean of the terms that remain (a text-only sample gets ``ρ = μ_ll``). With no term left, all tokens are
    selected.
  * ``1 - ρ`` is clamped at 0 (``ρ`` can exceed 1 by rounding when all tokens are identical), so the
    threshold is never NaN.
  * If ``MMD²`` never drops below the threshold, the loop ends once every token is selected (``S`` = all,
    plain Wanda); the reference would loop forever (``fallback`` says ``never_stopped``). When ``MMD²`` of the
    full set (0 in exact arithmetic) is below the threshold, that is an ordinary stop.

The Wanda-style statistic over the selected *input* tokens is :func:`selected_sum_of_squares`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mmprune_exp.pruners.diversity import gram_modality_similarity

_FIRST_CHUNK = 32  # greedy steps before the first MMD² check; each further chunk doubles


@dataclass(frozen=True)
class AMIASelection:
    """What :func:`select_tokens` chose for one Linear and one sample."""

    indices: torch.Tensor  # int64 [|S|], selection order, on the outputs' device
    mmd2: torch.Tensor  # float64 [steps] on CPU: MMD² after each pick; empty when the greedy loop did not run
    threshold: float  # threshold_scale·sqrt(max(1 - density, 0)); NaN when the loop did not run
    density: float  # ρ as used (after the guards); NaN when undefined
    fallback: str | None  # "; "-joined reasons for every guard that fired, None when none did
    n_tokens: int
    n_visual_selected: int
    n_text_selected: int
    initial_scores: torch.Tensor | None = None  # g after the message pass [N], compute dtype, CPU
    neighbours: torch.Tensor | None = None  # [N, k] int64 on CPU, nearest first
    score_trace: tuple[torch.Tensor, ...] | None = None  # with trace=True: g after each step (selected: -inf)

    def mask(self) -> torch.Tensor:
        """Boolean ``[N]`` mask of the selected tokens."""
        m = torch.zeros(self.n_tokens, dtype=torch.bool, device=self.indices.device)
        m[self.indices] = True
        return m


def _density(gram: torch.Tensor, visual: torch.Tensor) -> tuple[float, list[str]]:
    """ρ from the Gram matrix ``ŶŶᵀ`` with the NaN guards of the module docstring, and a note for each guard
    that fired."""
    sim = gram_modality_similarity(gram, visual)
    n_visual = int(visual.sum())
    counts = {"visual": n_visual, "text": visual.numel() - n_visual}
    terms, notes = [], []
    for modality, value in (("visual", sim.vv), ("text", sim.ll)):
        if not math.isnan(value):
            terms.append(value)
        elif counts[modality] >= 2:
            terms.append(0.0)
            notes.append(f"no positive {modality}-{modality} similarity: that mean taken as 0")
        else:
            notes.append(f"{counts[modality]} {modality} token(s): no {modality}-{modality} term")
    if math.isnan(sim.vl):
        notes.append("no visual-text term")
    else:
        terms.append(sim.vl)
    return (sum(terms) / len(terms) if terms else float("nan")), notes


def _nearest(D: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices and distances of the ``k`` smallest entries of each row (diagonal already ``+inf``), nearest
    first, ties to the lower index. ``topk`` does not order ties, so rows with any tie among their ``k + 1``
    smallest values (one more, to see a tie at the boundary) are redone exactly: see :func:`_nearest_exact`."""
    n = D.shape[0]
    if k == 0:
        return torch.empty(n, 0, dtype=torch.long, device=D.device), D[:, :0]
    width = min(k + 1, n)
    vals, idx = D.topk(width, dim=1, largest=False, sorted=True)
    tied = (vals[:, 1:] == vals[:, :-1]).any(dim=1)
    idx = idx[:, :k].clone()
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        idx[rows] = _nearest_exact(D.index_select(0, rows), k)
    return idx, D.gather(1, idx)


def _nearest_exact(D: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` smallest entries of each row in (value, index) order: what a stable sort's first ``k`` are.

    For fp32 rows, without sorting whole rows: each entry gets the int64 key ``(v << 32) + column``, where
    ``v`` is the float's bit pattern mapped to an int32 that orders like the float (negative floats have
    their magnitude bits flipped; ``-0.0`` is first made ``+0.0``, which compares equal to it). Keys are
    unique and order exactly as (value, column), so ``topk`` on them is the stable sort's prefix. Repeated
    tokens (a repeated word or image patch at the first layer gives identical outputs) can tie most rows,
    and this is ~10x cheaper than sorting them. Other dtypes use the stable sort.
    """
    if D.dtype != torch.float32:
        return torch.sort(D, dim=1, stable=True).indices[:, :k]
    bits = (D + 0.0).view(torch.int32)  # + 0.0: -0.0 -> +0.0
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    keys = bits.mul_(1 << 32).add_(torch.arange(D.shape[1], device=D.device))
    return keys.topk(k, dim=1, largest=False, sorted=True).indices


def select_tokens(
    outputs: torch.Tensor,
    visual: torch.Tensor,
    prior: torch.Tensor,
    k: int = 3,
    sigma: float = 1.0,
    decay: float = 0.2,
    gamma: float = 1.0,
    threshold_scale: float = 0.1,
    trace: bool = False,
) -> AMIASelection:
    """AMIA's token selection for one Linear and one sample (module docstring).

    ``outputs``: the Linear's outputs ``[N, d_out]`` (or ``[1, N, d_out]``); ``visual``: boolean ``[N]``;
    ``prior``: the attention prior ``[N]``. ``trace=True`` also returns ``g`` after every step (``O(N)`` memory
    per step, for tests and inspection).
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    device = outputs.device
    dtype = torch.float64 if outputs.dtype == torch.float64 else torch.float32
    Y = outputs.reshape(-1, outputs.shape[-1]).to(dtype)
    n = Y.shape[0]
    visual = visual.reshape(-1).to(device=device, dtype=torch.bool)
    prior = prior.reshape(-1).to(device=device, dtype=dtype)
    if visual.numel() != n or prior.numel() != n:
        raise ValueError(f"{n} tokens but {visual.numel()} visual-mask and {prior.numel()} prior entries")

    def everything(reason: str, density: float = float("nan"), notes: tuple[str, ...] = ()) -> AMIASelection:
        idx = torch.arange(n, device=device)
        nv = int(visual.sum())
        return AMIASelection(
            indices=idx,
            mmd2=torch.empty(0, dtype=torch.float64),
            threshold=float("nan"),
            density=density,
            fallback="; ".join((*notes, reason)),
            n_tokens=n,
            n_visual_selected=nv,
            n_text_selected=n - nv,
        )

    if n == 0:
        return everything("no tokens")
    if n <= k:
        return everything(f"{n} token(s) for k={k} neighbours: all selected")
    # The Gram matrix first: its diagonal (||ŷ_p||²) is NaN exactly where a row of Y holds a NaN or an inf,
    # a cheaper test than scanning Y.
    Yn = F.normalize(Y, dim=-1)
    G = torch.mm(Yn, Yn.T)
    sq = G.diagonal().clone()
    if not bool(torch.isfinite(sq).all()):
        return everything("non-finite outputs: all selected")

    notes: list[str] = []
    finite = torch.isfinite(prior)
    if not bool(finite.all()):
        notes.append(f"{int((~finite).sum())} non-finite prior entries set to 0")
        prior = torch.where(finite, prior, torch.zeros((), dtype=dtype, device=device))

    density, density_notes = _density(G, visual)
    notes += density_notes
    if math.isnan(density):
        return everything("density undefined: all selected", notes=tuple(notes))
    threshold = threshold_scale * math.sqrt(max(1.0 - density, 0.0))

    # K = exp(-||ŷ_p - ŷ_q||² / (2σ²)) = exp(-D/σ²) = exp((G - 1)/σ²) for unit rows, diagonal exactly 1. A row
    # F.normalize left (near) zero (norm below its eps) is not a unit row: its row and column of K use the
    # squared distance ||ŷ_p||² + ||ŷ_q||² - 2·G_pq itself, as the reference's RBF does (1 to a unit row,
    # where 2·D would say 2).
    K = torch.sub(G, 1.0)
    if sigma != 1.0:
        K.mul_(1.0 / sigma**2)
    odd = (sq < 0.5).nonzero().squeeze(1)
    if odd.numel():
        exact = (sq[odd, None] + sq[None, :] - 2.0 * G[odd]) * (-0.5 / sigma**2)
        K[odd] = exact
        K[:, odd] = exact.T
    K.fill_diagonal_(0.0)
    K.exp_()
    colsum = K.sum(dim=0).to(torch.float64)
    mean_k = float(colsum.sum()) / (n * n)
    D = G.neg_().add_(1.0)
    D.fill_diagonal_(float("inf"))
    nbr, nbr_dist = _nearest(D, k)
    del D, G

    # One-hop message pass, nearest neighbour first (a fixed summation order).
    spread = torch.zeros_like(prior)
    for j in range(k):
        spread = spread + torch.exp(-(nbr_dist[:, j] * gamma)) * prior[nbr[:, j]]
    g0 = prior + spread
    damp = torch.exp(-(nbr_dist * decay))

    # The greedy order runs on CPU arrays of N entries (a few scalar-sized operations per step).
    g = g0.cpu().numpy().copy()
    nbr_np, damp_np = nbr.cpu().numpy(), damp.cpu().numpy()
    order = np.empty(n, dtype=np.int64)
    snapshots: list[torch.Tensor] = []

    def advance(start: int, stop: int) -> None:
        for step in range(start, stop):
            t = int(g.argmax())
            gt = g[t]
            if gt > 0:  # max(g_t, 0): nothing to subtract otherwise
                g[nbr_np[t]] -= damp_np[t] * gt
            g[t] = -np.inf
            order[step] = t
            if trace:
                snapshots.append(torch.from_numpy(g.copy()))

    mmd2_parts: list[torch.Tensor] = []
    stop_at = None
    sum_ss = torch.zeros((), dtype=torch.float64, device=device)  # ΣK[S,S]
    sum_xs = torch.zeros((), dtype=torch.float64, device=device)  # ΣK[:,S]
    done, chunk = 0, _FIRST_CHUNK
    while done < n and stop_at is None:
        end = min(n, done + chunk)
        advance(done, end)
        new = torch.from_numpy(order[done:end]).to(device)
        upto = torch.from_numpy(order[:end]).to(device)
        block = K[new][:, upto].to(torch.float64)  # rows: the new picks; columns: every pick so far
        steps = torch.arange(done, end, device=device)
        earlier = torch.tril(block, diagonal=done - 1).sum(dim=1)  # ΣK[t, S_old] for each new t
        self_k = block[torch.arange(end - done, device=device), steps]
        ss = sum_ss + torch.cumsum(2.0 * earlier + self_k, dim=0)
        xs = sum_xs + torch.cumsum(colsum[new], dim=0)
        m = (steps + 1).to(torch.float64)
        mmd2 = mean_k + ss / (m * m) - 2.0 * xs / (n * m)
        below = (mmd2 < threshold).nonzero()
        if below.numel():
            stop_at = done + int(below[0, 0]) + 1
            mmd2 = mmd2[: stop_at - done]
        mmd2_parts.append(mmd2.cpu())
        sum_ss, sum_xs = ss[-1], xs[-1]
        done, chunk = end, 2 * chunk
    if stop_at is None:
        stop_at = n
        notes.append("never_stopped: MMD² never fell below the threshold, all tokens selected")

    indices = torch.from_numpy(order[:stop_at].copy()).to(device)
    nv = int(visual[indices].sum())
    return AMIASelection(
        indices=indices,
        mmd2=torch.cat(mmd2_parts),
        threshold=threshold,
        density=density,
        fallback="; ".join(notes) or None,
        n_tokens=n,
        n_visual_selected=nv,
        n_text_selected=stop_at - nv,
        initial_scores=g0.cpu(),
        neighbours=nbr.cpu(),
        score_trace=tuple(snapshots[:stop_at]) if trace else None,
    )


def selected_sum_of_squares(inputs: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``Σ x²`` per input channel over the selected tokens (fp32), and how many tokens that is.

    ``inputs``: the Linear's inputs ``[N, d_in]`` (or ``[1, N, d_in]``); ``indices``: the selection (any order;
    a repeated index counts once). Tokens are summed in their sequence order, so selecting every token gives
    exactly Wanda's per-sample ``x.pow(2).sum(0)``.

    AMIA's statistic over samples is ``scaler = Σ_samples Σ_selected x² / Σ_samples |S|``: the reference's
    running form ``scaler·n/(n+|S|) + Σ_S x²/(n+|S|)`` counts **tokens**, where Wanda counts samples. Summing
    the first return value and the count over samples and dividing once is the same up to rounding. Only the
    ranking within a row matters to the mask, and a global factor does not change it.
    """
    x = inputs.reshape(-1, inputs.shape[-1])
    mask = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    mask[indices.to(x.device)] = True
    chosen = x[mask].to(torch.float32)
    return chosen.pow(2).sum(dim=0), int(mask.sum())
