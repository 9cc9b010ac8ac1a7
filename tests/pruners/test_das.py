"""DAS allocation (TAMP's budget loop, and the paper's 1/score reading) on cases worked out by hand.

The hand cases restate shared/reference/weight_pruners.md §5.5 step by step in the comments, with numbers small
enough to follow: ``keep_total = int(T(1-s))``, floors ``ceil(n(1-s_max))``, rounds of ``ceil(score/Σscore·rest)``,
saturation, and the overshoot step that adds. Shares are chosen so that no float rounding sits near an integer.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest

from mmprune_exp.pruners.das import _fill_remainder, das_sparsities, paper_sparsities


def kept(sparsities: dict[str, float], sizes: dict[str, int]) -> dict[str, int]:
    """Kept parameters per matrix, back from the sparsities (exact: n < 2**27, sparsity error ~1e-16)."""
    return {name: round((1 - sparsities[name]) * n) for name, n in sizes.items()}


def decoder_shapes(layers, hidden, intermediate, heads, kv_heads, head_dim=128):
    """Qwen2.5-VL decoder matrices in the model's parameter order (q, k, v, o, gate, up, down per layer)."""
    q, kv, mlp = hidden * heads * head_dim, hidden * kv_heads * head_dim, hidden * intermediate
    sizes = {}
    for i in range(layers):
        for name, n in zip(("q", "k", "v", "o", "gate", "up", "down"), (q, kv, kv, q, mlp, mlp, mlp)):
            sizes[f"{i}.{name}"] = n
    return sizes


# -- the reference loop on hand cases ------------------------------------------------------------------------


def test_equal_scores_give_every_matrix_the_same_number_of_parameters_not_the_same_sparsity():
    sizes = {"a": 100, "b": 100, "c": 200, "d": 400}
    # T = 800, keep_total = 400. Floors ceil(n/4) = 25, 25, 50, 100 (sum 200). Round 1: rest 200, each share
    # 1/4 -> +50 each (absolute parameters, not in proportion to n) -> 75, 75, 100, 150 = 400: done, no overshoot.
    out = das_sparsities(dict.fromkeys(sizes, 1.0), sizes, 0.5, 0.75)
    assert out == {"a": 0.25, "b": 0.25, "c": 0.5, "d": 0.625}
    assert list(out) == list(sizes)  # the order of `sizes`


def test_higher_score_keeps_more():
    sizes = {"a": 400, "b": 400}
    # Floors 100, 100; rest 200 split 1:3 -> +50, +150 -> keep 150, 250.
    assert das_sparsities({"a": 1.0, "b": 3.0}, sizes, 0.5, 0.75) == {"a": 0.625, "b": 0.375}


def test_a_small_matrix_saturates_and_its_excess_goes_round_again():
    sizes = {"k": 40, "q": 200, "m": 560}
    # T = 800, keep_total = 400; floors ceil(n/4) = 10, 50, 140 (sum 200).
    # Round 1: rest 200, share 1/3 each -> ceil(66.67) = 67: k 77 >= 40 -> score 0, clipped to 40 (dense);
    #          q 117, m 207; sum 364.
    # Round 2: rest 36 over q and m only (1/2 each) -> +18: q 135, m 225; sum 400, done.
    out = das_sparsities(dict.fromkeys(sizes, 1.0), sizes, 0.5, 0.75)
    assert kept(out, sizes) == {"k": 40, "q": 135, "m": 225}
    assert out["k"] == 0.0
    assert out["q"] == pytest.approx(1 - 135 / 200, abs=1e-15)
    assert out["m"] == pytest.approx(1 - 225 / 560, abs=1e-15)


def test_the_overshoot_step_adds_the_overshoot_instead_of_removing_it():
    sizes = {"a": 100, "b": 100, "c": 200}
    # T = 400, keep_total = 200; floors 25, 25, 50 (sum 100). Round 1: rest 100, share 1/3 -> ceil(33.3) = 34
    # each -> 59, 59, 84 = 202: overshoot 2. The reference's "removal" goes through the matrices by kept
    # count, largest first (c, a, b), each taking min(2, keep - int(n/4)) = min(2, 84 - 50) = 2 *more*:
    # c = 86. Sum 204 = keep_total + 2 x overshoot, and the loop ends (sum > keep_total).
    out = das_sparsities(dict.fromkeys(sizes, 1.0), sizes, 0.5, 0.75)
    assert kept(out, sizes) == {"a": 59, "b": 59, "c": 86}
    assert sum(kept(out, sizes).values()) == 200 + 2 * 2


def test_the_overshoot_can_land_on_a_saturated_matrix_and_is_then_lost_in_the_clip():
    sizes = {"A": 100, "B": 100, "C": 100}
    # keep_total = 150; floors 25 each. Round 1: rest 75; A's share 100/101·75 = 74.26 -> 75, B's and C's
    # 0.5/101·75 = 0.37 -> 1. A = 100 = n: saturated (score 0). B = C = 26. Sum 152: overshoot 2.
    # Largest kept count first: A, capacity 100 - int(25) = 75 -> A = 102 > n (no clamp after this step).
    # Sparsities: A clip(1 - 102/100) = 0, B = C = 1 - 26/100 = 0.74; achieved kept 152 = keep_total + 2.
    out = das_sparsities({"A": 100.0, "B": 0.5, "C": 0.5}, sizes, 0.5, 0.75)
    assert out["A"] == 0.0
    assert out["B"] == out["C"] == pytest.approx(0.74, abs=1e-15)


def test_ties_in_the_overshoot_step_go_to_the_first_matrix_in_order():
    sizes = {"x": 200, "a": 100, "b": 100, "y": 200}
    # keep_total 300, floors 50, 25, 25, 50 (150). Round 1: rest 150, 1/4 each -> 37.5 -> 38: 88, 63, 63, 88
    # = 302, overshoot 2. x and y tie at 88: the stable order takes x first, x = 90.
    out = das_sparsities(dict.fromkeys(sizes, 1.0), sizes, 0.5, 0.75)
    assert kept(out, sizes) == {"x": 90, "a": 63, "b": 63, "y": 88}


def test_the_overshoot_step_caps_each_matrix_at_keep_minus_the_truncated_floor():
    sizes = {"B": 1001, "S1": 200, "S2": 200, "S3": 200, "S4": 200}
    # T = 1801, keep_total = int(1801·0.445) = 801; floors ceil(250.25) = 251 and 50 x 4 (sum 451).
    # Round 1: rest 350; B's share ~1e-7 -> 1 (252); S's 350/4 = 87.5 -> 88 (138 each); sum 804: overshoot 3.
    # B first (252): it takes min(3, 252 - int(250.25)) = 2 (254; with ceil(250.25) it would take only 1),
    # then S1 (ties keep order) takes the last 1 (139). Sum 807 = 801 + 2·3.
    out = das_sparsities({"B": 1e-9, "S1": 1.0, "S2": 1.0, "S3": 1.0, "S4": 1.0}, sizes, 0.555, 0.75)
    assert kept(out, sizes) == {"B": 254, "S1": 139, "S2": 138, "S3": 138, "S4": 138}


def test_no_round_when_the_floors_already_cover_the_budget():
    sizes = {"a": 3, "b": 5}
    # s = s_max = 0.5: floors ceil(1.5) = 2, ceil(2.5) = 3, sum 5 > keep_total int(8·0.5) = 4: the loop never
    # runs, the floors stand (sparsities 1/3 and 2/5, both under the cap).
    out = das_sparsities({"a": 1.0, "b": 1.0}, sizes, 0.5, 0.5)
    assert kept(out, sizes) == {"a": 2, "b": 3}


def test_zero_target_keeps_everything():
    sizes = {"a": 7, "b": 13}
    assert das_sparsities({"a": 1.0, "b": 2.0}, sizes, 0.0, 0.1) == {"a": 0.0, "b": 0.0}


def test_the_sum_of_add_zero_fallback():
    # Step 2c is unreachable with positive scores (some unsaturated matrix always gets ceil(>0) >= 1); restated on
    # its own: the remainder goes to positive-score matrices in order, each up to its size.
    keep, sizes = [10, 5, 3], [10, 8, 9]
    _fill_remainder(keep, sizes, [0.0, 1.0, 2.0], 7)  # b takes 3 (to 8), c takes the other 4
    assert keep == [10, 8, 7]
    with pytest.raises(RuntimeError, match="stuck"):  # the reference would loop forever
        _fill_remainder([10, 8, 7], sizes, [0.0, 1.0, 2.0], 5)


def test_extreme_score_ratios_still_finish():
    sizes = {"a": 1000, "b": 1000}
    # keep_total 1000, floors 250 each. Round 1: rest 500; a's share 1/(1 + 1e-300) = 1.0 -> +500 = 750, b's
    # ceil(1e-300·500) = 1 -> 251; 1001: overshoot 1, added to a (largest kept count): a 751.
    out = das_sparsities({"a": 1.0, "b": 1e-300}, sizes, 0.5, 0.75)
    assert kept(out, sizes) == {"a": 751, "b": 251}


@pytest.mark.parametrize("seed", range(40))
def test_random_cases_respect_the_cap_and_the_budget(seed):
    rng = random.Random(seed)
    sizes = {f"m{i}": rng.randint(1, 100_000) for i in range(rng.randint(1, 30))}
    scores = {name: rng.lognormvariate(0.0, rng.choice([0.05, 0.3, 1.5])) for name in sizes}
    s = rng.choice([0.1, 0.3, 0.5, 0.7, 0.9])
    s_max = min(1.0, s + rng.choice([0.0, 0.05, 0.1, 0.3]))
    out = das_sparsities(scores, sizes, s, s_max)
    assert list(out) == list(sizes)
    # The cap: every matrix keeps at least its floor ceil(n(1-s_max)), so no sparsity exceeds s_max.
    assert all(0.0 <= v <= s_max + 1e-12 for v in out.values())
    # The budget: the final round overshoots by fewer than #groups parameters (each ceil adds < 1) and the
    # overshoot step adds that much again, so 0 <= achieved - keep_total <= 2(#groups - 1); when the floors
    # alone exceed the budget (s_max == s) the excess is below #groups. In sparsity: the parameter-weighted mean
    # is s within (2·#groups + 1)/T (the +1 is int() in keep_total).
    total, groups = sum(sizes.values()), len(sizes)
    achieved = sum(kept(out, sizes).values())
    keep_total = int(total * (1 - s))
    assert 0 <= achieved - keep_total <= max(2 * (groups - 1), groups)
    weighted = sum(out[k] * n for k, n in sizes.items()) / total
    assert abs(weighted - s) <= (2 * groups + 1) / total
    # Same size, higher score -> no sparser (shares are monotone in the score).
    twins = das_sparsities({"lo": 1.0, "hi": 2.0, **scores}, {"lo": 5000, "hi": 5000, **sizes}, s, s_max)
    assert twins["hi"] <= twins["lo"]


# -- the profile on Qwen2.5-VL shapes ------------------------------------------------------------------------


def test_qwen2_5_vl_7b_profile_with_equal_scores():
    sizes = decoder_shapes(28, 3584, 18944, 28, 4)
    # Per layer: q, o 3584² = 12,845,056; k, v 512·3584 = 1,835,008; gate, up, down 18944·3584 = 67,895,296.
    # T = 28 · 233,046,016 = 6,525,288,448; keep_total = 3,262,644,224 (s = 0.5).
    # Floors (×0.4, ceil): q 5,138,023, k 734,004, MLP 27,158,119; sum 2,610,115,508.
    # Round 1: rest 652,528,716 / 196 = 3,329,228.1 -> +3,329,229 each; k/v reach 4,063,233 >= 1,835,008:
    #   saturated (dense). q 8,467,252, MLP 30,487,348; sum 3,137,863,792.
    # Round 2: rest 124,780,432 / 140 = 891,288.8 -> +891,289: q 9,358,541 (sparsity 0.27143),
    #   MLP 31,378,637 (0.53784); overshoot 140·891,289 - 124,780,432 = 28, added to layer 0's gate (largest, first).
    out = das_sparsities(dict.fromkeys(sizes, 1.0), sizes, 0.5, 0.6)
    counts = kept(out, sizes)
    for i in range(28):
        assert out[f"{i}.k"] == out[f"{i}.v"] == 0.0
        assert counts[f"{i}.q"] == counts[f"{i}.o"] == 9_358_541
        assert counts[f"{i}.up"] == counts[f"{i}.down"] == 31_378_637
        assert counts[f"{i}.gate"] == 31_378_637 + (28 if i == 0 else 0)
        assert out[f"{i}.q"] == pytest.approx(0.27, abs=0.02)
        assert out[f"{i}.gate"] == pytest.approx(0.54, abs=0.02)
    # The reference's own float32 loop on these shapes (run on a scratch copy, see das.py) gave q/o 0.27143 and
    # MLP 0.53783-0.53784: agreement to ~1e-5, its float32 kept counts being rounded to even numbers.
    assert out["5.q"] == pytest.approx(0.27143, abs=1e-4)
    assert out["5.down"] == pytest.approx(0.53784, abs=1e-4)
    assert sum(counts.values()) - 3_262_644_224 == 56


def test_qwen2_5_vl_3b_profile_with_equal_scores():
    sizes = decoder_shapes(36, 2048, 11008, 16, 2)
    # q, o 2048² = 4,194,304; k, v 256·2048 = 524,288; MLP 11008·2048 = 22,544,384. T = 2,774,532,096,
    # keep_total 1,387,266,048; floors 1,677,722 / 209,716 / 9,017,754. Round 1: +1,101,005 each, k/v saturate.
    # Round 2: rest 56,622,996 / 180 = 314,572.2 -> +314,573: q 3,093,300 (0.2625), MLP 10,433,332 (0.53721).
    out = das_sparsities(dict.fromkeys(sizes, 1.0), sizes, 0.5, 0.6)
    counts = kept(out, sizes)
    for i in range(36):
        assert out[f"{i}.k"] == out[f"{i}.v"] == 0.0
        assert counts[f"{i}.q"] == counts[f"{i}.o"] == 3_093_300
        assert counts[f"{i}.down"] == 10_433_332
        assert out[f"{i}.o"] == pytest.approx(0.26, abs=0.02)
        assert out[f"{i}.up"] == pytest.approx(0.54, abs=0.02)
    assert max(out.values()) <= 0.6


def test_diversity_moves_the_7b_profile_only_a_little():
    # §5.5: with a 5 % spread in the scores the size-driven shape stays: k/v dense, q/o well below the MLP.
    sizes = decoder_shapes(28, 3584, 18944, 28, 4)
    rng = random.Random(3)
    out = das_sparsities({k: 1.0 + rng.uniform(-0.05, 0.05) for k in sizes}, sizes, 0.5, 0.6)
    attn_qo = [v for k, v in out.items() if k.endswith((".q", ".o"))]
    mlp = [v for k, v in out.items() if k.endswith((".gate", ".up", ".down"))]
    assert all(v == 0.0 for k, v in out.items() if k.endswith((".k", ".v")))
    assert max(attn_qo) < min(mlp)
    assert max(out.values()) <= 0.6 + 1e-12


# -- the paper's reading -------------------------------------------------------------------------------------


def test_paper_sparsity_is_inverse_to_the_score_with_mean_s():
    sizes = {"a": 100, "b": 100, "c": 100}
    # s_g = c/score: c(1 + 1/2 + 1/4) = 3·0.5 -> c = 6/7: 6/7, 3/7, 3/14 (mean 21/42 = 0.5).
    out = paper_sparsities({"a": 1.0, "b": 2.0, "c": 4.0}, sizes, 0.5)
    assert out == pytest.approx({"a": 6 / 7, "b": 3 / 7, "c": 3 / 14}, abs=1e-15)
    # Capped at 0.7: a pinned, then c(1/2 + 1/4)·100 = 150 - 70 -> c = 16/15: b 8/15, c 4/15.
    capped = paper_sparsities({"a": 1.0, "b": 2.0, "c": 4.0}, sizes, 0.5, 0.7)
    assert capped == pytest.approx({"a": 0.7, "b": 8 / 15, "c": 4 / 15}, abs=1e-15)


def test_paper_mean_is_parameter_weighted():
    sizes = {"small": 100, "big": 300}
    # Weighted: 100·c/1 + 300·c/3 = 0.5·400 -> c = 1, so small would be 1.0, above the cap 0.9: pinned there,
    # then 300·c/3 = 200 - 90 -> c = 1.1, big 1.1/3 = 0.3667; weighted mean (90 + 110)/400 = 0.5.
    # (An unweighted mean over the two would give a different c and miss 0.5 overall.)
    out = paper_sparsities({"small": 1.0, "big": 3.0}, sizes, 0.5, 0.9)
    assert out == pytest.approx({"small": 0.9, "big": 1.1 / 3}, abs=1e-15)
    # Equal scores: every matrix exactly s, whatever its size (unlike the reference loop).
    assert paper_sparsities({"small": 2.0, "big": 2.0}, sizes, 0.5) == pytest.approx({"small": 0.5, "big": 0.5})


@pytest.mark.parametrize("seed", range(20))
def test_paper_random_cases(seed):
    rng = random.Random(seed)
    sizes = {f"m{i}": rng.randint(1, 100_000) for i in range(rng.randint(1, 30))}
    scores = {name: rng.lognormvariate(0.0, 1.0) for name in sizes}
    s = rng.choice([0.0, 0.2, 0.5, 0.7])
    cap = rng.choice([None, s, s + 0.05, s + 0.2])
    out = paper_sparsities(scores, sizes, s, cap)
    limit = 1.0 if cap is None else cap
    assert list(out) == list(sizes)
    assert all(0.0 <= v <= limit + 1e-12 for v in out.values())
    total = sum(sizes.values())
    assert math.isclose(sum(out[k] * n for k, n in sizes.items()), s * total, rel_tol=1e-12, abs_tol=1e-9)
    ranked = sorted(sizes, key=lambda k: scores[k])  # higher score -> lower (or equal, at the cap) sparsity
    assert all(out[a] >= out[b] - 1e-12 for a, b in itertools.pairwise(ranked))
    uncapped = [k for k in sizes if out[k] < limit - 1e-9]
    for a, b in itertools.pairwise(uncapped):  # the uncapped ones are exactly ∝ 1/score
        assert out[a] * scores[a] == pytest.approx(out[b] * scores[b], rel=1e-12)


# -- guards ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [das_sparsities, paper_sparsities])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -1.0])
def test_unusable_scores_name_the_matrix(fn, bad):
    sizes = {"model.layers.3.self_attn.k_proj.weight": 10, "x": 10}
    with pytest.raises(ValueError, match=r"model\.layers\.3\.self_attn\.k_proj\.weight.*finite and positive"):
        fn({"model.layers.3.self_attn.k_proj.weight": bad, "x": 1.0}, sizes, 0.5, 0.6)


@pytest.mark.parametrize("fn", [das_sparsities, paper_sparsities])
@pytest.mark.parametrize(
    "scores,sizes,s,s_max,match",
    [
        ({}, {}, 0.5, 0.6, "empty"),
        ({"a": 1.0}, {"a": 10, "b": 10}, 0.5, 0.6, r"no score for \['b'\]"),
        ({"a": 1.0, "c": 1.0}, {"a": 10}, 0.5, 0.6, r"no size for \['c'\]"),
        ({"a": 1.0}, {"a": 10}, 1.0, 1.0, r"sparsity must be in \[0, 1\)"),
        ({"a": 1.0}, {"a": 10}, -0.1, 0.6, r"sparsity must be in \[0, 1\)"),
        ({"a": 1.0}, {"a": 10}, 0.5, 0.4, "max_sparsity must be in"),
        ({"a": 1.0}, {"a": 10}, 0.5, 1.2, "max_sparsity must be in"),
        ({"a": 1.0}, {"a": 0}, 0.5, 0.6, "'a': size must be a positive integer"),
        ({"a": 1.0}, {"a": 2.5}, 0.5, 0.6, "'a': size must be a positive integer"),
        ({"a": 1.0}, {"a": True}, 0.5, 0.6, "'a': size must be a positive integer"),
        ({"a": "high"}, {"a": 10}, 0.5, 0.6, "'a': score is not a number"),
    ],
)
def test_bad_input_is_refused(fn, scores, sizes, s, s_max, match):
    with pytest.raises(ValueError, match=match):
        fn(scores, sizes, s, s_max)


def test_das_needs_a_cap():
    with pytest.raises(ValueError, match="max_sparsity is required"):
        das_sparsities({"a": 1.0}, {"a": 10}, 0.5, None)
