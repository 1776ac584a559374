"""The statistics behind a table's marks: a row's paired difference to its block's baseline
over seeds, its confidence interval and p-values (scipy.stats), Holm's adjustment for the
table's number of comparisons, and the smallest difference the seeds could detect.

Paired means: seed ``s`` of a row is compared with seed ``s`` of the baseline, which saw the same
data subset and the same seeded streams, so the spread between seeds that both rows share drops
out of the difference.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

ALPHA = 0.05
POWER = 0.8
TESTS = ("t", "permutation")
# From this many pairs on, the exact sign-flip permutation test is reported beside the t-test
# (its smallest p is 2 / 2**n: with fewer pairs it can hardly ever be significant).
PERMUTATION_MIN_PAIRS = 8
# Up to this many pairs every sign flip is enumerated (2**20 ~ 1M); beyond, 2**16 random flips.
EXACT_MAX_PAIRS = 20


@dataclass(frozen=True)
class PairedDifference:
    """``row - baseline`` over the ``n`` seeds both have: the mean difference, the standard
    deviation of the differences, the 95% t-interval of the mean and two-sided p-values (paired
    t; sign-flip permutation when there are enough pairs). Without two pairs only ``n`` and
    ``diff`` (one pair) are known."""

    n: int
    diff: float | None = None
    sd: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    p_t: float | None = None
    p_permutation: float | None = None

    def p(self, test: str) -> float | None:
        """The p-value of ``test`` (``t`` or ``permutation``)."""
        return self.p_t if test == "t" else self.p_permutation

    @property
    def half_width(self) -> float | None:
        if self.ci_low is None or self.ci_high is None:
            return None
        return (self.ci_high - self.ci_low) / 2


def paired_difference(
    values: Mapping[int, float], baseline: Mapping[int, float], level: float = 1 - ALPHA
) -> PairedDifference:
    """The paired comparison of ``values`` with ``baseline`` (each ``seed -> value``) over
    their common seeds."""
    seeds = sorted(set(values) & set(baseline))
    n = len(seeds)
    if n == 0:
        return PairedDifference(0)
    x = np.array([values[s] for s in seeds], dtype=np.float64)
    b = np.array([baseline[s] for s in seeds], dtype=np.float64)
    d = x - b
    diff = float(d.mean())
    if n == 1:
        return PairedDifference(1, diff)
    sd = float(d.std(ddof=1))
    p_perm = sign_flip_p(d) if n >= PERMUTATION_MIN_PAIRS else None
    if sd == 0.0:  # every seed moved by the same amount: the t statistic is 0 / 0 or infinite
        return PairedDifference(n, diff, 0.0, diff, diff, 1.0 if diff == 0 else 0.0, p_perm)
    res = stats.ttest_rel(x, b)
    ci = res.confidence_interval(level)
    return PairedDifference(n, diff, sd, float(ci.low), float(ci.high), float(res.pvalue), p_perm)


def sign_flip_p(d: np.ndarray) -> float:
    """Two-sided p of the mean of ``d`` under random signs (the paired permutation test):
    exact over all ``2**n`` flips up to :data:`EXACT_MAX_PAIRS` pairs, else 2**16 seeded draws."""
    exact = len(d) <= EXACT_MAX_PAIRS
    res = stats.permutation_test(
        (np.asarray(d, dtype=np.float64),),
        np.mean,
        permutation_type="samples",
        n_resamples=np.inf if exact else 2**16,
        alternative="two-sided",
        rng=np.random.default_rng(0),
    )
    return float(res.pvalue)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment (Holm 1979): the i-th smallest of m p-values is multiplied by
    ``m - i`` (i from 0), made non-decreasing in that order and capped at 1. A hypothesis is
    rejected at level alpha exactly when its adjusted p is below alpha."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def pooled_sd(diffs: Sequence[PairedDifference]) -> float | None:
    """The standard deviation of paired differences pooled over comparisons (each weighted by
    its degrees of freedom): the seed-to-seed noise of a difference in one column."""
    dof = sum(d.n - 1 for d in diffs if d.sd is not None)
    if dof == 0:
        return None
    return math.sqrt(sum((d.n - 1) * d.sd**2 for d in diffs if d.sd is not None) / dof)


def detectable_difference(
    sd: float, n: int, alpha: float = ALPHA, power: float = POWER
) -> float | None:
    """The smallest true mean difference a two-sided paired t-test over ``n`` pairs at level
    ``alpha`` detects with probability ``power``, when the differences spread with ``sd``: the
    noncentral t distribution's power solved for the effect. None below two pairs."""
    if n < 2 or not sd > 0:
        return None if n < 2 else 0.0
    df = n - 1
    crit = stats.t.ppf(1 - alpha / 2, df)

    def shortfall(effect: float) -> float:
        nc = effect * math.sqrt(n) / sd
        # P(T > crit) + P(T < -crit); the lower tail as the upper tail of -nc (scipy's cdf is
        # NaN far in that tail)
        reach = stats.nct.sf(crit, df, nc) + np.nan_to_num(stats.nct.sf(crit, df, -nc))
        return float(reach) - power

    hi = sd
    while shortfall(hi) < 0:
        hi *= 2
    return float(optimize.brentq(shortfall, 0.0, hi, xtol=sd * 1e-9))
