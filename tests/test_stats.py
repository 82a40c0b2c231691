"""vlprune.stats against hand-computed cases and naive references (no scipy)."""

import math

import numpy as np
import pytest

from vlprune.stats import (EXACT_BELOW, binom_two_sided, bootstrap_ci, chance_recall, mcnemar, paired_bootstrap)


def test_bootstrap_constant_and_bounds():
    iv = bootstrap_ci([1.0] * 20)
    assert iv == (1.0, 1.0, 1.0)
    x = [1, 0] * 50
    iv = bootstrap_ci(x, n_boot=4000, seed=1)
    assert iv.mean == 0.5 and iv.low < 0.5 < iv.high
    # the normal approximation of a proportion's 95% interval: 0.5 +- 1.96 * sqrt(0.25 / 100) = +- 0.098
    assert iv.low == pytest.approx(0.402, abs=0.02) and iv.high == pytest.approx(0.598, abs=0.02)


def test_bootstrap_is_seeded_and_matches_a_naive_loop():
    x = np.random.default_rng(3).integers(0, 2, 37).astype(float)
    assert bootstrap_ci(x, n_boot=500, seed=7) == bootstrap_ci(x, n_boot=500, seed=7)
    # naive: the same generator draws one resample at a time
    rng = np.random.default_rng(7)
    means = sorted(x[rng.integers(0, x.size, size=x.size)].mean() for _ in range(500))
    iv = bootstrap_ci(x, n_boot=500, seed=7)
    assert iv.low == pytest.approx(np.quantile(means, 0.025)) and iv.high == pytest.approx(np.quantile(means, 0.975))


def test_bootstrap_fractional_scores_and_bad_input():
    iv = bootstrap_ci([0.3, 0.6, 1.0, 0.0])
    assert iv.mean == pytest.approx(0.475)
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci([1, 0], alpha=1.5)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci([1, 0], n_boot=0)
    with pytest.raises(ValueError, match="non-finite"):
        bootstrap_ci([1, float("nan")])


def test_paired_bootstrap():
    a = [1.0] * 40
    b = [0.0] * 40
    r = paired_bootstrap(a, b, n_boot=999)
    assert r.diff == 1.0 and r.low == r.high == 1.0 and r.p == pytest.approx(1 / 1000)
    same = [1, 0, 1, 1, 0] * 10
    r = paired_bootstrap(same, same)
    assert r.diff == 0.0 and r.p == 1.0
    # one disagreement in 50 examples is no evidence of a difference
    b2 = list(same)
    b2[0] = 0
    r = paired_bootstrap(same, b2, n_boot=2000)
    assert r.diff == pytest.approx(0.02) and r.p > 0.3 and r.low <= 0.0 <= r.high
    with pytest.raises(ValueError, match="same examples"):
        paired_bootstrap([1, 0], [1])


def test_binomial_exact_by_hand():
    # n = 5, k = 0: 2 * (1/32) = 0.0625; k = 1: 2 * (1 + 5)/32 = 0.375; k = 2 of 4: 2 * (1 + 4 + 6)/16 > 1 -> 1
    assert binom_two_sided(0, 5) == pytest.approx(0.0625)
    assert binom_two_sided(1, 5) == pytest.approx(0.375)
    assert binom_two_sided(4, 5) == pytest.approx(0.375)
    assert binom_two_sided(2, 4) == 1.0
    assert binom_two_sided(0, 0) == 1.0
    # n = 10, k = 1: 2 * (1 + 10) / 1024
    assert binom_two_sided(1, 10) == pytest.approx(22 / 1024)
    with pytest.raises(ValueError):
        binom_two_sided(6, 5)


def test_mcnemar_exact_and_chi_square():
    # b = 5 (a right, b wrong), c = 0: exact p = 2 / 32
    a = [1] * 5 + [1] * 10 + [0] * 3
    b = [0] * 5 + [1] * 10 + [0] * 3
    r = mcnemar(a, b)
    assert (r.b, r.c, r.exact) == (5, 0, True) and r.p == pytest.approx(0.0625)
    # b = 30, c = 10: chi2 = (20 - 1)^2 / 40 = 9.025; p = erfc(sqrt(9.025 / 2))
    a = [1] * 30 + [0] * 10
    b = [0] * 30 + [1] * 10
    r = mcnemar(a, b)
    assert (r.b, r.c, r.exact) == (30, 10, False)
    assert r.p == pytest.approx(math.erfc(math.sqrt(9.025 / 2)))
    assert r.p == pytest.approx(0.002663, abs=2e-5)  # chi-square(1) tail at 9.025
    assert EXACT_BELOW == 25
    with pytest.raises(ValueError, match="0/1"):
        mcnemar([0.5, 1], [1, 1])


def test_chance_recall():
    assert chance_recall(1, 10) == pytest.approx(0.1)
    assert chance_recall(5, 10) == pytest.approx(0.5)
    assert chance_recall(20, 10) == 1.0
    # 2 relevant captions of 10, top 1: 2/10; top 2: 1 - C(8,2)/C(10,2) = 1 - 28/45
    assert chance_recall(1, 10, relevant=2) == pytest.approx(0.2)
    assert chance_recall(2, 10, relevant=2) == pytest.approx(1 - 28 / 45)
    with pytest.raises(ValueError):
        chance_recall(1, 0)


def test_interp_at_on_a_hand_made_curve():
    from vlprune.stats import interp_at

    # accuracy 40 at 0.1 GFLOPs, 50 at 0.2, 70 at 0.4 (given out of order): at 0.3 halfway between 50 and 70
    xs, ys = [0.4, 0.1, 0.2], [70.0, 40.0, 50.0]
    assert interp_at(xs, ys, 0.3) == pytest.approx(60.0)
    assert interp_at(xs, ys, 0.15) == pytest.approx(45.0)
    assert interp_at(xs, ys, 0.2) == pytest.approx(50.0) and interp_at(xs, ys, 0.4) == pytest.approx(70.0)
    assert interp_at(xs, ys, 0.05) is None and interp_at(xs, ys, 0.5) is None  # no extrapolation
    assert interp_at([0.2, 0.2, 0.4], [40.0, 60.0, 80.0], 0.3) == pytest.approx(65.0)  # ties in x averaged
    assert interp_at([], [], 0.3) is None
