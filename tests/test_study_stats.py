"""The study's statistics against direct references (scipy's tests, brute-force Holm, textbook formulas)."""

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from hmpo_verl.lab import stats


def test_paired_difference_matches_scipy_and_the_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.5, 0.1, 7), rng.normal(0.45, 0.1, 7)
    d = stats.paired_difference(a.tolist(), b.tolist())
    ref = sps.ttest_rel(a, b)
    ci = ref.confidence_interval(0.95)
    assert d["diff"] == pytest.approx(float(np.mean(a - b)), abs=1e-12)
    assert d["p"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert (d["lo"], d["hi"]) == (pytest.approx(ci.low, rel=1e-9), pytest.approx(ci.high, rel=1e-9))
    # textbook: mean +- t(0.975, n-1) sd / sqrt(n), t(0.975, 6) = 2.446912
    half = 2.4469118511 * np.std(a - b, ddof=1) / math.sqrt(7)
    assert d["hi"] - d["diff"] == pytest.approx(half, rel=1e-8)


def test_paired_difference_edge_cases():
    assert stats.paired_difference([0.3, 0.4], [0.3, 0.4])["p"] == 1.0  # identical runs: no evidence
    one = stats.paired_difference([0.3], [0.2])
    assert one["diff"] == pytest.approx(0.1) and math.isnan(one["lo"]) and math.isnan(one["p"])
    with pytest.raises(ValueError, match="equal lengths"):
        stats.paired_difference([0.1, 0.2], [0.1])


def _holm_brute_force(p):
    """Holm by its definition: adj_i = max over j ranked at or before i of min(1, (m - rank_j) p_j)."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    rank = {i: r for r, i in enumerate(order)}
    return [max(min(1.0, (m - rank[j]) * p[j]) for j in range(m) if rank[j] <= rank[i]) for i in range(m)]


def test_holm_against_hand_values_and_brute_force():
    # hand: sorted 0.01, 0.02, 0.03, 0.5 -> 0.04, 0.06, 0.06 (monotone), 0.5
    assert stats.holm([0.03, 0.01, 0.5, 0.02]) == pytest.approx([0.06, 0.04, 0.5, 0.06])
    assert stats.holm([0.3, 0.9]) == pytest.approx([0.6, 0.9])
    assert math.isnan(stats.holm([0.01, math.nan])[1]) and stats.holm([0.01, math.nan])[0] == pytest.approx(0.01)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=12))
def test_holm_property(p):
    adj = stats.holm(p)
    assert adj == pytest.approx(_holm_brute_force(p))
    assert all(a >= q - 1e-15 for a, q in zip(adj, p))  # never below the raw p-value
    assert all(a <= 1 for a in adj)
    for i, j in itertools.permutations(range(len(p)), 2):  # order preserved
        if p[i] <= p[j]:
            assert adj[i] <= adj[j] + 1e-15


def test_seeds_needed():
    # t(0.975, n-1) * sd / sqrt(n) <= 0.05; sd 0.05: n = 7 (t(6) = 2.447 -> 0.0462), n = 6 gives 0.0525
    assert stats.seeds_needed(0.05) == 7
    assert stats.seeds_needed(0.001) == 5  # the floor
    sd = 0.08
    n = stats.seeds_needed(sd)
    assert sps.t.ppf(0.975, n - 1) * sd / math.sqrt(n) <= 0.05 < sps.t.ppf(0.975, n - 2) * sd / math.sqrt(n - 1)
    with pytest.raises(ValueError, match="sd_diff"):
        stats.seeds_needed(math.nan)


def test_mean_ci():
    mean, half = stats.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert math.isnan(stats.mean_ci([1.0])[1])


def test_run_outcomes_definitions():
    rising = [0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5]
    o = stats.run_outcomes(rising, first_eval=0.19, non_finite=False)
    assert o["auc"] == pytest.approx(np.mean(rising)) and o["first_reward"] == 0.19
    assert o["final_reward"] == pytest.approx(np.mean(rising[-5:]))  # the last 5 steps
    # 5-step moving averages: 0.2, 0.225, 0.25, 0.275, 0.3, 0.35, ... first >= 0.19 + 0.1 at step 5
    assert o["steps_to_threshold"] == 5
    assert not o["collapsed"] and o["drawdown"] == 0.0
    assert stats.run_outcomes(rising, 0.2, non_finite=True)["collapsed"]
    assert stats.run_outcomes([0.3] * 5, 0.4, False)["collapsed"]  # final reward 0.1 below the first
    assert not stats.run_outcomes([0.31] * 5, 0.4, False)["collapsed"]
    assert stats.run_outcomes([0.2] * 6, 0.2, False)["steps_to_threshold"] is None
    # an early lucky step does not count: the moving average needs a full window
    assert stats.run_outcomes([0.9, 0.1, 0.1, 0.1, 0.1, 0.1], 0.2, False)["steps_to_threshold"] is None
    # fewer steps than the window: everything is averaged
    short = stats.run_outcomes([0.4, 0.6], 0.3, False)
    assert short["final_reward"] == pytest.approx(0.5) and short["steps_to_threshold"] == 2
    with pytest.raises(ValueError, match="eval_reward"):
        stats.run_outcomes([], 0.3, False)


def test_max_drawdown():
    assert stats.max_drawdown([0.1, 0.5, 0.2, 0.4, 0.1, 0.3]) == pytest.approx(0.4)
    assert stats.max_drawdown([0.1, 0.2, 0.3]) == 0.0


def test_tost_is_two_one_sided_t_tests():
    """TOST p = the larger of scipy's one-sided one-sample t tests against -margin and +margin."""
    rng = np.random.default_rng(3)
    d = rng.normal(0.01, 0.02, 9)
    ref_lower = sps.ttest_1samp(d, -0.03, alternative="greater").pvalue
    ref_upper = sps.ttest_1samp(d, 0.03, alternative="less").pvalue
    t = stats.tost(d.tolist(), 0.03)
    assert t["p_lower"] == pytest.approx(ref_lower, rel=1e-9) and t["p_upper"] == pytest.approx(ref_upper, rel=1e-9)
    assert t["p"] == pytest.approx(max(ref_lower, ref_upper), rel=1e-9)
    # equivalent at 0.05 exactly when the 90 % interval lies inside the margin
    half = sps.t.ppf(0.95, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    assert (t["p"] < 0.05) == (-0.03 < d.mean() - half and d.mean() + half < 0.03)
    assert stats.tost([0.1, 0.1], 0.03)["p"] == 1.0 and stats.tost([0.01, 0.01], 0.03)["p"] == 0.0
    with pytest.raises(ValueError, match="margin"):
        stats.tost([0.1, 0.2], 0.0)


@pytest.mark.parametrize("n", [2, 5, 12])
def test_mde_has_the_stated_power_by_simulation(n):
    """At the minimum detectable effect the two-sided paired t test rejects 80 % of the time (Monte Carlo,
    200k samples: +-0.3 % at 3 s.e.); it scales with the sd."""
    mde = stats.mde_paired(0.05, n)
    rng = np.random.default_rng(n)
    d = rng.normal(mde, 0.05, (200_000, n))
    t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
    assert (np.abs(t) > sps.t.ppf(0.975, n - 1)).mean() == pytest.approx(0.8, abs=0.003)
    assert stats.mde_paired(0.1, n) == pytest.approx(2 * mde, rel=1e-9)
    assert math.isnan(stats.mde_paired(0.05, 1)) and stats.mde_paired(0.0, 5) == 0.0


def test_ols_slope_and_spearman_permutation_against_numpy_and_scipy():
    x, y = [-2, -1, 0, 0.5, 1], [0.30, 0.32, 0.31, 0.36, 0.40]
    assert stats.ols_slope(x, y) == pytest.approx(np.polyfit(x, y, 1)[0], rel=1e-12)
    a, b = [0.001, 0.02, 0.004, 0.1, 0.05, 0.0005], [0.3, -0.1, 0.2, -0.4, 0.25, 0.1]
    ours = stats.spearman_permutation(a, b)
    assert ours["rho"] == pytest.approx(sps.spearmanr(a, b).statistic, rel=1e-12)
    observed = abs(sps.spearmanr(a, b).statistic)  # brute force over every pairing, with scipy's rho
    hits = [abs(sps.spearmanr(a, list(order)).statistic) >= observed - 1e-12 for order in itertools.permutations(b)]
    assert ours["p"] == pytest.approx(sum(hits) / len(hits), rel=1e-12)
    with pytest.raises(ValueError, match="3 to 9"):
        stats.spearman_permutation([1, 2], [2, 1])
