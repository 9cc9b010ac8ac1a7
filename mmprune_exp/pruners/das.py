"""DAS (TAMP's Diversity-Aware Sparsity): per-matrix sparsities from per-matrix importance scores.

Pure functions, no torch: a pruner computes one score per target matrix (``ModalitySimilarity.diversity`` of
that Linear's outputs on the dense model, ``mmprune_exp/pruners/diversity.py``) and its parameter count, and
asks for a sparsity per matrix. Two readings of TAMP are offered so they can be compared.

``das_sparsities``: what the reference code does
------------------------------------------------
Reference: ``compute_the_sparsity_per_group`` inside ``LayerSparsity.return_sparsity`` in
``llava/pruners/layer_single_base_pruner.py`` of G-JWLee/TAMP (see shared/reference/weight_pruners.md §5.5).
There every group is one weight matrix (``--sparsity_ratio_granularity layer``) and its score is the matrix's
score itself (``--score_method density_sum``: summed, not divided by the parameter count). With ``n_g`` the
parameter count of matrix ``g``, ``T = Σ n_g``, target sparsity ``s`` and cap ``s_max`` (``s + 0.1`` in
``tamp.sh``), the loop budgets *kept parameters*:

1. ``keep_total = int(T·(1 − s))``; every matrix starts at its floor ``keep_g = ceil(n_g·(1 − s_max))``, which is
   what keeps every matrix at or below ``s_max`` (kept counts only ever grow afterwards).
2. While ``Σ keep < keep_total``, one round:

   a. ``rest = keep_total − Σ keep``; ``add_g = ceil(score_g / Σ score · rest)``. The share is a number of
      *parameters* proportional to the score alone, not to ``score·n_g``: a 2M-parameter k_proj is offered as
      many parameters as a 68M-parameter MLP matrix. This is why, with similar scores, small matrices saturate
      (k/v stay dense) and the profile is set by the matrix sizes far more than by the scores.
   b. ``keep += add``; every matrix with ``keep ≥ n`` gets score 0 (it takes no further share);
      then ``keep = min(keep, n)``. The clipped excess is handed out again by the next round.
   c. If ``Σ add == 0``, the remainder is handed out in matrix order to the matrices with a positive score,
      each up to ``n − keep``. (Unreachable with positive scores: while ``Σ keep < keep_total`` some matrix
      is unsaturated and the one with the largest share gets ``ceil(≥ rest/#groups) ≥ 1``. Kept for fidelity.)
   d. If ``Σ keep > keep_total`` (the ceilings overshoot by fewer parameters than there are matrices), the
      reference means to remove the overshoot ("remove the parameters from full groups") but *adds* it: going
      through the matrices by kept count, largest first (stable, so ties keep matrix order), each gets
      ``min(left, keep − int(n·(1 − s_max)))`` more (note ``int``, not ``ceil``) until the overshoot amount
      is used up. There is no clamp afterwards, so a matrix can end with ``keep > n``. The overshoot then
      doubles and the loop ends (``Σ keep > keep_total``).

3. ``sparsity_g = clip(1 − keep_g / n_g, 0, 1)`` (the clip hides any ``keep > n`` from 2d).

So the achieved kept count is ``keep_total`` plus at most ``2·(#matrices − 1)`` parameters, and no matrix is
above ``s_max``. With equal scores on Qwen2.5-VL-7B's decoder shapes at ``s = 0.5``, ``s_max = 0.6`` the result
is k/v 0, q/o 0.271, MLP 0.538 after two rounds (tests/pruners/test_das.py restates this by hand).

Arithmetic. Here kept counts are Python ints throughout (exact); floats enter only in
``keep_total = int(T·(1 − s))`` and ``ceil(n·(1 − s_max))`` (float64, as in the reference apart from the next
point), the share ``score_g / Σ score · rest`` (float64, same order of operations) and the final division.
The reference computes those in float32 torch tensors and, because ``torch.ceil`` returns floats, its kept
counts *become float32 after the first round*: above 2**24 parameters they are rounded to even numbers and its
``Σ keep`` over a 7B model (~3e9) to multiples of 256, so its rounds and its overshoot differ from the exact
ones by a few hundred parameters in all. On the 7B shapes above the per-matrix sparsities of the two agree to
about 1e-5 (the overshoot lands on one or two matrices); compare with that tolerance, not bit for bit.
Guards the reference lacks: non-finite or non-positive scores are refused (the reference would turn a NaN
score into NaN sparsities for every matrix), and 2c/2d raise instead of looping forever if ever stuck.

``paper_sparsities``: what the paper's text says
-----------------------------------------------
"Sparsity inversely proportional to importance, normalised to the mean": ``s_g = c / score_g``. We normalise
the *parameter-weighted* mean, ``Σ n_g·s_g = s·T``, so the model's overall sparsity is ``s`` (an unweighted
mean over matrices of very different sizes would miss it). Sparsities are capped at ``max_sparsity`` (1 when
None): matrices whose ``c / score_g`` exceeds the cap are pinned to it and ``c`` is solved again over the
others (water-filling), so the weighted mean stays ``s`` whenever ``max_sparsity ≥ s``, which is required.
Equal scores give every matrix exactly ``s``; unlike the reference loop, matrix sizes do not shape the profile.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from numbers import Integral, Real

__all__ = ["das_sparsities", "paper_sparsities"]


def _validated(
    scores: Mapping[str, float], sizes: Mapping[str, int], sparsity: float, max_sparsity: float | None
) -> tuple[list[str], list[float], list[int]]:
    """Names (in the order of ``sizes``), float scores and int sizes; ValueError on anything unusable."""
    if not sizes:
        raise ValueError("no matrices: sizes is empty")
    missing = [name for name in sizes if name not in scores]
    extra = [name for name in scores if name not in sizes]
    if missing or extra:
        raise ValueError(f"scores and sizes name different matrices: no score for {missing}, no size for {extra}")
    if not isinstance(sparsity, Real) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if max_sparsity is not None and (not isinstance(max_sparsity, Real) or not sparsity <= max_sparsity <= 1.0):
        raise ValueError(f"max_sparsity must be in [sparsity, 1] = [{sparsity}, 1], got {max_sparsity!r}")
    names = list(sizes)
    values, counts = [], []
    for name in names:
        n = sizes[name]
        if isinstance(n, bool) or not isinstance(n, Integral) or n <= 0:
            raise ValueError(f"matrix {name!r}: size must be a positive integer, got {n!r}")
        try:
            score = float(scores[name])
        except (TypeError, ValueError):
            raise ValueError(f"matrix {name!r}: score is not a number: {scores[name]!r}") from None
        if not math.isfinite(score) or score <= 0.0:
            raise ValueError(
                f"matrix {name!r}: score must be finite and positive, got {score} "
                "(a NaN usually means a modality had no tokens, or no positive similarity, in any sample)"
            )
        values.append(score)
        counts.append(int(n))
    return names, values, counts


def _fill_remainder(keep: list[int], sizes: list[int], weights: list[float], need: int) -> None:
    """Step 2c: hand ``need`` parameters to the positive-weight matrices in order, each up to its size."""
    for i, weight in enumerate(weights):
        if need == 0:
            return
        if weight > 0:
            take = min(need, sizes[i] - keep[i])
            keep[i] += take
            need -= take
    if need:  # the reference would loop forever here
        raise RuntimeError(f"DAS budget loop stuck: {need} parameters left and no matrix can take them")


def _add_overshoot(keep: list[int], sizes: list[int], max_sparsity: float, overshoot: int) -> None:
    """Step 2d: the reference's "removal" of an overshoot, which adds it (module docstring)."""
    order = sorted(range(len(keep)), key=lambda i: -keep[i])  # stable: ties keep matrix order
    while overshoot > 0:
        before = overshoot
        for i in order:
            take = min(overshoot, keep[i] - int(sizes[i] * (1 - max_sparsity)))
            keep[i] += take
            overshoot -= take
            if overshoot == 0:
                return
        if overshoot == before:  # every matrix at its truncated floor; the reference would loop forever
            raise RuntimeError("DAS budget loop stuck in the overshoot step")


def das_sparsities(
    scores: Mapping[str, float], sizes: Mapping[str, int], sparsity: float, max_sparsity: float
) -> dict[str, float]:
    """Per-matrix sparsities by the reference's DAS budget loop (module docstring, steps 1-3).

    ``scores``: importance per matrix (finite, > 0; higher keeps more). ``sizes``: parameter count per matrix;
    its order is the matrix order the loop's tie-breaks use (give the model's parameter order, as the
    reference does). ``sparsity`` in [0, 1); ``max_sparsity`` in [sparsity, 1]. Returns ``{name: sparsity}``
    in the order of ``sizes``; every value is in [0, max_sparsity].
    """
    if max_sparsity is None:
        raise ValueError("max_sparsity is required for das_sparsities (TAMP uses sparsity + 0.1)")
    names, weights, n = _validated(scores, sizes, sparsity, max_sparsity)
    keep_total = int(sum(n) * (1 - sparsity))
    keep = [math.ceil(size * (1 - max_sparsity)) for size in n]
    while sum(keep) < keep_total:
        weight_sum = sum(weights)
        rest = keep_total - sum(keep)
        add = [math.ceil(w / weight_sum * rest) for w in weights]
        keep = [k + a for k, a in zip(keep, add)]
        weights = [0.0 if k >= size else w for k, size, w in zip(keep, n, weights)]
        keep = [min(k, size) for k, size in zip(keep, n)]
        if sum(add) == 0 and sum(keep) < keep_total:
            _fill_remainder(keep, n, weights, keep_total - sum(keep))
        if sum(keep) > keep_total:
            _add_overshoot(keep, n, max_sparsity, sum(keep) - keep_total)
    return {name: min(max(1.0 - k / size, 0.0), 1.0) for name, k, size in zip(names, keep, n)}


def paper_sparsities(
    scores: Mapping[str, float], sizes: Mapping[str, int], sparsity: float, max_sparsity: float | None = None
) -> dict[str, float]:
    """Per-matrix sparsities ``∝ 1/score`` with parameter-weighted mean ``sparsity`` (module docstring).

    Capped at ``max_sparsity`` (1 when None) with the excess re-spread over the uncapped matrices. Returns
    ``{name: sparsity}`` in the order of ``sizes``.
    """
    names, weights, n = _validated(scores, sizes, sparsity, max_sparsity)
    cap = 1.0 if max_sparsity is None else float(max_sparsity)
    target = sparsity * sum(n)  # parameters to prune
    capped: set[int] = set()
    while True:
        free = [i for i in range(len(n)) if i not in capped]
        budget = target - cap * sum(n[i] for i in capped)
        inverse = sum(n[i] / weights[i] for i in free)
        c = budget / inverse if free else 0.0
        newly = {i for i in free if c / weights[i] > cap}
        if not newly:
            break
        capped |= newly  # pinning raises c for the rest, so matrices only ever join the capped set
    out = {}
    for i, name in enumerate(names):
        out[name] = cap if i in capped else min(max(c / weights[i], 0.0), cap)
    return out
