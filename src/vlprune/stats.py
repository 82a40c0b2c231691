"""Statistics for comparing models on the same test examples (pure numpy, no torch; every resampling is seeded).

    bootstrap_ci(scores)            -> Interval(mean, low, high): percentile bootstrap over examples
    paired_bootstrap(a, b)          -> Paired(diff, low, high, p): mean(a - b), its interval, a two-sided p-value
    mcnemar(a_correct, b_correct)   -> McNemar(b, c, p, exact): the test on the discordant pairs

Scores are per-example numbers (VQA accuracy is 0/1 per question, or fractional with several annotators), in the
order of the test file; paired functions need both models' scores on the same examples in the same order.
Means and intervals are in the scores' own unit (multiply 0/1 scores by 100 for percent).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import numpy as np

# McNemar: the exact binomial test below this many discordant pairs, chi-square with continuity from it on
EXACT_BELOW = 25


class Interval(NamedTuple):
    mean: float
    low: float
    high: float


class Paired(NamedTuple):
    diff: float
    low: float
    high: float
    p: float


class McNemar(NamedTuple):
    b: int  # a right, b wrong
    c: int  # a wrong, b right
    p: float
    exact: bool


def _scores(x: Sequence[float], name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-d sequence of per-example scores, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} holds non-finite scores (NaN or inf)")
    return a


def _check(n_boot: int, alpha: float) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be an integer >= 1, got {n_boot!r}")
    if not (isinstance(alpha, (int, float)) and 0 < alpha < 1):
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")


def _resample_means(x: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """Means of ``n_boot`` resamples (with replacement) of ``x``, in chunks to bound memory."""
    rng = np.random.default_rng(seed)
    n = x.size
    out = np.empty(n_boot)
    chunk = max(1, 2_000_000 // n)
    for s in range(0, n_boot, chunk):
        m = min(chunk, n_boot - s)
        out[s:s + m] = x[rng.integers(0, n, size=(m, n))].mean(axis=1)
    return out


def bootstrap_ci(correct: Sequence[float], n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> Interval:
    """The mean of per-example scores and its (1 - alpha) percentile-bootstrap interval."""
    x = _scores(correct, "correct")
    _check(n_boot, alpha)
    means = _resample_means(x, n_boot, seed)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return Interval(float(x.mean()), float(lo), float(hi))


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_boot: int = 2000, alpha: float = 0.05,
                     seed: int = 0) -> Paired:
    """mean(a - b) over the same examples, its percentile-bootstrap interval (examples resampled in pairs), and a
    two-sided p-value for "no difference": the share of resampled differences, centred on zero, at least as far
    from zero as the observed one, counted as (1 + hits) / (1 + n_boot) so that it is never 0."""
    x, y = _scores(a, "a"), _scores(b, "b")
    if x.size != y.size:
        raise ValueError(f"paired scores need the same examples: a has {x.size}, b has {y.size}")
    _check(n_boot, alpha)
    d = x - y
    obs = float(d.mean())
    means = _resample_means(d, n_boot, seed)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    hits = int(np.sum(np.abs(means - obs) >= abs(obs) - 1e-12))
    return Paired(obs, float(lo), float(hi), (1 + hits) / (1 + n_boot))


def binom_two_sided(k: int, n: int) -> float:
    """Exact two-sided p of k successes in n fair coin flips: 2 * P(X <= min(k, n - k)), at most 1."""
    if n < 0 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 1.0
    m = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(m + 1)) / 2**n
    return min(1.0, 2.0 * tail)


def _binary(x: Sequence[float], name: str) -> np.ndarray:
    a = _scores(x, name)
    bad = a[(a != 0) & (a != 1)]
    if bad.size:
        raise ValueError(f"McNemar needs 0/1 correctness; {name} holds {bad.size} other value(s), e.g. {bad[0]!r}")
    return a.astype(bool)


def mcnemar(a_correct: Sequence[float], b_correct: Sequence[float]) -> McNemar:
    """McNemar's test of two classifiers on the same examples. b = a right and b wrong, c = the reverse. Fewer
    than ``EXACT_BELOW`` discordant pairs: the exact binomial p (b ~ Binomial(b + c, 1/2)); otherwise the
    chi-square statistic with continuity correction, (|b - c| - 1)^2 / (b + c), one degree of freedom."""
    x, y = _binary(a_correct, "a_correct"), _binary(b_correct, "b_correct")
    if x.size != y.size:
        raise ValueError(f"paired scores need the same examples: a has {x.size}, b has {y.size}")
    b, c = int(np.sum(x & ~y)), int(np.sum(~x & y))
    n = b + c
    if n < EXACT_BELOW:
        return McNemar(b, c, binom_two_sided(b, n), True)
    chi2 = (abs(b - c) - 1) ** 2 / n
    return McNemar(b, c, math.erfc(math.sqrt(chi2 / 2)), False)  # chi-square(1 df) survival = erfc(sqrt(x / 2))


def chance_recall(k: int, n_items: int, relevant: int = 1) -> float:
    """Expected Recall@K of a random ranking: the probability that at least one of ``relevant`` items among
    ``n_items`` lands in the top ``k`` (hypergeometric), ``k / n_items`` for one relevant item."""
    if n_items < 1 or not 1 <= relevant <= n_items or k < 1:
        raise ValueError(f"need n_items >= 1, 1 <= relevant <= n_items and k >= 1; got k={k}, "
                         f"n_items={n_items}, relevant={relevant}")
    if k >= n_items:
        return 1.0
    return 1.0 - math.comb(n_items - relevant, k) / math.comb(n_items, k)


def interp_at(xs: Sequence[float], ys: Sequence[float], x: float) -> Optional[float]:
    """y at ``x`` by linear interpolation along the curve (xs, ys) (points in any order; ties in x averaged);
    None when ``x`` lies outside [min(xs), max(xs)] (no extrapolation) or the curve is empty."""
    pts = sorted((float(a), float(b)) for a, b in zip(xs, ys))
    if not pts or not pts[0][0] <= x <= pts[-1][0]:
        return None
    ux = sorted({a for a, _ in pts})
    uy = [float(np.mean([b for a, b in pts if a == u])) for u in ux]
    return float(np.interp(x, ux, uy))


__all__ = ["Interval", "Paired", "McNemar", "bootstrap_ci", "paired_bootstrap", "mcnemar", "binom_two_sided",
           "chance_recall", "interp_at", "EXACT_BELOW"]
