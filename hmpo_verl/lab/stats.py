"""Statistics of the study: per-run outcomes, paired intervals, Holm's correction, seed sizing.

Pure functions on plain lists (numpy/scipy only), tested against direct references in
``tests/test_study_stats.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

COLLAPSE_DROP = 0.1  # a run "collapses" when its final evaluation is this far below its first
SMOOTH = 5  # moving-average window of a reward curve, and the steps the final reward averages


def moving_average(values: Sequence[float], window: int = SMOOTH) -> list[float]:
    """Trailing moving average (shorter window at the start)."""
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1): i + 1]
        out.append(float(sum(chunk) / len(chunk)))
    return out


def max_drawdown(values: Sequence[float]) -> float:
    """Largest fall of the curve below its running maximum (>= 0)."""
    peak, worst = -math.inf, 0.0
    for v in values:
        peak = max(peak, v)
        worst = max(worst, peak - v)
    return worst


def run_outcomes(eval_reward: Sequence[float], first_eval: float, non_finite: bool,
                 threshold_gain: float = 0.1, window: int = SMOOTH) -> dict:
    """One run's outcomes from its evaluation curve.

    eval_reward: the exact expected reward on the fixed evaluation prompts after each step
    (1..N); first_eval: the same before the first step.
    final_reward: mean of the last ``window`` values of the curve (where training got to;
    one step's value alone carries that step's update noise).
    auc: mean of the curve (area under it / steps).
    collapsed: a non-finite loss or gradient norm in some update, or a final reward
    ``COLLAPSE_DROP`` or more below the first.
    drawdown: largest fall of the curve's ``window``-step moving average below its running maximum.
    steps_to_threshold: first step, from the ``window``-th on, whose moving average reaches
    first_reward + ``threshold_gain`` (None if never).
    """
    if len(eval_reward) == 0:
        raise ValueError("eval_reward is empty: a run has at least one step")
    smooth = moving_average(eval_reward, window)
    final = float(np.mean(eval_reward[-window:]))
    target = first_eval + threshold_gain
    start = min(window, len(smooth)) - 1
    reached = next((i + 1 for i, v in enumerate(smooth) if i >= start and v >= target), None)
    return {
        "first_reward": float(first_eval),
        "final_reward": final,
        "auc": float(np.mean(eval_reward)),
        "collapsed": bool(non_finite or final <= first_eval - COLLAPSE_DROP),
        "drawdown": max_drawdown(smooth),
        "steps_to_threshold": reached,
        "non_finite": bool(non_finite),
    }


def t_quantile(level: float, dof: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.5 + level / 2, dof))


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the t interval (nan half-width for fewer than 2 values)."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return (float(x.mean()) if len(x) else math.nan), math.nan
    return float(x.mean()), t_quantile(level, len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict:
    """Paired comparison of a and b (same seeds, same order): mean of a_k - b_k, its t interval
    and the two-sided p-value of the paired t test (p = 1 when every difference is 0)."""
    from scipy import stats

    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    n = len(d)
    if n != len(b):
        raise ValueError(f"paired_difference needs equal lengths, got {len(a)} and {len(b)}")
    mean = float(d.mean()) if n else math.nan
    if n < 2:
        return {"n": n, "diff": mean, "lo": math.nan, "hi": math.nan, "sd": math.nan, "p": math.nan}
    sd = float(d.std(ddof=1))
    half = t_quantile(level, n - 1) * sd / math.sqrt(n)
    if sd == 0:
        p = 1.0 if mean == 0 else 0.0
    else:
        p = float(2 * stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))
    return {"n": n, "diff": mean, "lo": mean - half, "hi": mean + half, "sd": sd, "p": p}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control); nan stays nan.

    Sorted ascending, p_(i) is multiplied by (m - i) (i from 0), made non-decreasing by a
    running maximum, and capped at 1; m counts the non-nan p-values.
    """
    idx = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    m = len(idx)
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda j: pvalues[j])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def seeds_needed(sd_diff: float, half_width: float = 0.05, level: float = 0.95, minimum: int = 5,
                 maximum: int = 200) -> int:
    """Smallest n >= minimum whose t interval t(n-1) * sd / sqrt(n) is at most half_width."""
    if not math.isfinite(sd_diff):
        raise ValueError(f"sd_diff={sd_diff!r} must be finite")
    for n in range(max(2, minimum), maximum + 1):
        if t_quantile(level, n - 1) * sd_diff / math.sqrt(n) <= half_width:
            return n
    return maximum


def tost(differences: Sequence[float], margin: float) -> dict:
    """Two one-sided t tests of equivalence of paired differences within (-margin, +margin).

    H0: |mean| >= margin. p = max(p_lower, p_upper), with p_lower the one-sided p of
    H0: mean <= -margin and p_upper of H0: mean >= +margin (Schuirmann 1987). Equivalent at
    level alpha iff the (1 - 2 alpha) t interval lies inside the margin. n < 2: p = nan.
    """
    from scipy import stats

    if not margin > 0:
        raise ValueError(f"margin={margin!r} must be > 0")
    d = np.asarray(differences, dtype=float)
    n = len(d)
    if n < 2:
        return {"p": math.nan, "p_lower": math.nan, "p_upper": math.nan}
    mean, se = float(d.mean()), float(d.std(ddof=1)) / math.sqrt(n)
    if se == 0:
        inside = -margin < mean < margin
        return {"p": 0.0 if inside else 1.0, "p_lower": 0.0 if mean > -margin else 1.0,
                "p_upper": 0.0 if mean < margin else 1.0}
    p_lower = float(stats.t.sf((mean + margin) / se, n - 1))
    p_upper = float(stats.t.cdf((mean - margin) / se, n - 1))
    return {"p": max(p_lower, p_upper), "p_lower": p_lower, "p_upper": p_upper}


def mde_paired(sd_diff: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Minimum detectable effect of a two-sided paired t test: the smallest true mean difference
    that it rejects with probability ``power`` at level ``alpha``, for differences of sd ``sd_diff``
    over ``n`` pairs (exact, by the noncentral t distribution; nan for n < 2 or sd not finite)."""
    from scipy import optimize, stats

    if n < 2 or not math.isfinite(sd_diff):
        return math.nan
    if sd_diff == 0:
        return 0.0
    dof = n - 1
    crit = stats.t.ppf(1 - alpha / 2, dof)

    def power_at(effect):  # effect >= 0 in units of the sd: noncentrality effect * sqrt(n)
        nc = effect * math.sqrt(n)
        upper, lower = stats.nct.sf(crit, dof, nc), stats.nct.cdf(-crit, dof, nc)
        # scipy's nct returns nan far in a tail, where the mass is 0 (lower) or 0 / 1 (upper)
        return (upper if math.isfinite(upper) else float(nc > crit)) + (lower if math.isfinite(lower) else 0.0)

    hi = 1.0
    while power_at(hi) < power:
        hi *= 2
    return sd_diff * float(optimize.brentq(lambda e: power_at(e) - power, 0.0, hi, xtol=1e-12))


def ols_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of y on x."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    xc = x - x.mean()
    return float((xc * (y - y.mean())).sum() / (xc * xc).sum())


def spearman_permutation(x: Sequence[float], y: Sequence[float]) -> dict:
    """Spearman's rho of (x, y) and its exact two-sided permutation p-value: the share of the n!
    orderings of y whose |rho| is at least the observed one (n <= 9; ties get average ranks)."""
    import itertools

    from scipy import stats

    n = len(x)
    if n != len(y) or not 3 <= n <= 9:
        raise ValueError(f"spearman_permutation needs 3 to 9 pairs of equal length, got {len(x)} and {len(y)}")
    rx, ry = stats.rankdata(x), stats.rankdata(y)

    def rho(order):
        return float(np.corrcoef(rx, np.asarray(order))[0, 1])

    observed = rho(ry)
    count = total = 0
    for order in itertools.permutations(ry):
        total += 1
        count += abs(rho(order)) >= abs(observed) - 1e-12
    return {"rho": observed, "p": count / total, "n": n}
