"""The surrogate against an independent mpmath reference, per token, value and gradient (issue 27, F1).

Per-token advantages (PPO/GAE, token-level rewards, TRL's (B, T) advantages) may be 0 on some
tokens; such a token still enters its row's mean. Before issue 27 each token's term was formed as
s * T * w_t from weights kept only to absolute precision relative to the row's largest, so a
zero-advantage token with a large log-ratio wiped out the precision of every other term of its row
(float64, log-ratio 40: loss 0 and gradient 0). The reference here is computed from the definitions
in 110-digit arithmetic, without any of the code's algebra:

    S(delta')          the textbook mean of the (token-clipped) ratios, e.g. (mean_t exp(p delta'_t))^(1/p);
    value_t            -A_t c_t clip(S) T dS/d delta'_t / S      (the token's share T w_t of clip(S));
    gradient_t         d/d delta_t of -A_t c_t T clip_t(S(delta with delta_t varied))   (mpmath.diff),

where clip_t is token t's own trust region (its one-sided token clip, or the sequence clip by
sign(A_t) with log S clamped at 10). Tolerance: a few ulps of each token's own exponent.
"""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from verl.trainer.ppo.core_algos import get_policy_loss_fn

from _helpers import actor_config
from hmpo_verl.aggregators import AGMAggregator, PowerAggregator
from hmpo_verl.surrogate import TrustRegion, surrogate_terms

mpmath.mp.dps = 110  # a share can be e^-150 of its row's mean: the derivatives need ~65 digits below it
EPS64 = 2.0**-52


def _mean(deltas, mean):
    """The textbook mean of exp(deltas) (mpf list) for mean = ('power', p) or ('agm', None)."""
    n = len(deltas)
    if mean[0] == "agm":
        a = sum(mpmath.exp(d) for d in deltas) / n
        h = n / sum(mpmath.exp(-d) for d in deltas)
        return mpmath.sqrt(a * h)
    p = mean[1]
    if p == 0:
        return mpmath.exp(sum(deltas) / n)
    return (sum(mpmath.exp(p * d) for d in deltas) / n) ** (mpmath.mpf(1) / p)


def _token_clip(d, a, region):
    if a > 0:
        return min(d, mpmath.mpf(region.positive_cap))
    if a < 0:
        return max(min(d, mpmath.mpf(region.negative_cap)), mpmath.mpf(region.log_low))
    return d


def _sequence_clip(s, a, region):
    s = min(s, mpmath.exp(region.max_log_seq_ratio))
    if a > 0:
        return min(s, mpmath.mpf(region.ratio_high))
    if a < 0:
        return max(s, mpmath.mpf(region.ratio_low))
    return s


def reference_row(delta, adv, is_w, mean, region):
    """(values, gradients, objectives) of one row's valid tokens: mpf lists, and each token's objective as a
    function of its log-ratio (its gradient is that function's central difference; at a clip's kink, where
    the loss has two one-sided derivatives, `check_against_reference` takes either)."""
    n = len(delta)
    token = region.level == "token"

    def clipped_deltas(ds):
        return [_token_clip(d, a, region) for d, a in zip(ds, adv)] if token else list(ds)

    def varied(ds, t, x):
        return ds[:t] + [x] + ds[t + 1 :]

    cd = clipped_deltas(delta)
    s = _mean(cd, mean)
    values, grads, objectives = [], [], []
    for t in range(n):
        ds_dt = mpmath.diff(lambda x: _mean(varied(cd, t, x), mean), cd[t])  # dS/d delta'_t
        clip_s = s if token else _sequence_clip(s, adv[t], region)
        values.append(-adv[t] * is_w[t] * clip_s * n * ds_dt / s)

        def objective(x, t=t):
            s_x = _mean(clipped_deltas(varied(delta, t, x)), mean)
            return -adv[t] * is_w[t] * n * (s_x if token else _sequence_clip(s_x, adv[t], region))

        grads.append(mpmath.diff(objective, delta[t]))
        objectives.append(objective)
    return values, grads, objectives


def _one_sided(objective, x) -> tuple:
    """The left and right derivatives of `objective` at `x` (equal to the central one away from a kink)."""
    return mpmath.diff(objective, x, direction=-1), mpmath.diff(objective, x, direction=1)


def _aggregator(mean):
    return AGMAggregator(None) if mean[0] == "agm" else PowerAggregator(mean[1])


def check_against_reference(lp, old, adv, mask, mean, region, is_w=None, slack=8.0):
    terms = surrogate_terms(lp, old, adv, mask, _aggregator(mean), region, is_w)
    for i in range(lp.shape[0]):
        cols = [t for t in range(lp.shape[1]) if mask[i, t]]
        if not cols:
            assert torch.all(terms.value[i] == 0) and torch.all(terms.grad_coef[i] == 0)
            continue
        delta = [mpmath.mpf(float(lp[i, t])) - mpmath.mpf(float(old[i, t])) for t in cols]
        a = [mpmath.mpf(float(adv[i, t])) for t in cols]
        c = [mpmath.mpf(1) if is_w is None else mpmath.mpf(float(is_w[i, t])) for t in cols]
        values, grads, objectives = reference_row(delta, a, c, mean, region)
        # each token's share is exp(an exponent of size ~ |p| range + |log s|): a few ulps of that
        scale = float(max(abs(d) for d in delta)) * (1 + abs(mean[1] or 1)) + 1
        rtol = slack * EPS64 * scale
        for k, (t, v, g) in enumerate(zip(cols, values, grads)):
            for ours, ref, name in ((terms.value[i, t], v, "value"), (terms.grad_coef[i, t], g, "gradient")):
                refs = [ref]
                if name == "gradient" and abs(mpmath.mpf(float(ours)) - ref) > rtol * abs(ref) + 1e-300:
                    refs = _one_sided(objectives[k], delta[k])  # a log-ratio exactly at a clip bound: either side
                errors = [abs(mpmath.mpf(float(ours)) - r) - rtol * abs(r) for r in refs]
                assert min(errors) <= 1e-300, (name, i, t, float(ours), [float(r) for r in refs])
        assert torch.all(terms.value[i][~mask[i]] == 0)


REGIONS = [
    TrustRegion.from_eps("token", "ratio", 0.2, 0.28, 3.0),
    TrustRegion.from_eps("token", "log", 0.4, 0.4),
    TrustRegion.from_eps("sequence", "ratio", 3e-4, 4e-4),
    TrustRegion.from_eps("sequence", "ratio", 0.2, 0.2),
]
MEANS = [("power", 1.0), ("power", -1.0), ("power", 0.0), ("power", 0.5), ("power", -2.0), ("power", 3.0), ("agm", None)]


def _f64(rows):
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("dtype, big", [(torch.float32, 17.0), (torch.float64, 40.0)])
def test_zero_advantage_outlier_leaves_vanilla_gradient_intact(dtype, big):
    """Issue 27's reproducer: p = 1 with token clip is verl's vanilla, here where the row's largest
    ratio belongs to a token with A = 0 (before: float32 grad [0, -0.3531, -0.3531] against vanilla's
    [0, -0.3684, -0.3016]; float64 with 40: loss 0, grad 0)."""
    lp = torch.tensor([[big, 0.1, -0.1]], dtype=dtype)
    old, adv, mask = torch.zeros_like(lp), torch.tensor([[0.0, 1.0, 1.0]], dtype=dtype), torch.ones(1, 3, dtype=torch.bool)
    out = {}
    for mode, config in (("power_mean", actor_config("power_mean", power=1.0)), ("vanilla", actor_config("vanilla", plain=True))):
        leaf = lp.clone().requires_grad_()
        loss, _ = get_policy_loss_fn(mode)(old_log_prob=old, log_prob=leaf, advantages=adv, response_mask=mask,
                                           loss_agg_mode="token-mean", config=config, rollout_is_weights=None)
        loss.backward()
        out[mode] = (loss.detach(), leaf.grad)
    tol = dict(rtol=1e-6, atol=0) if dtype == torch.float32 else dict(rtol=1e-14, atol=0)
    torch.testing.assert_close(out["power_mean"][0], out["vanilla"][0], **tol)
    torch.testing.assert_close(out["power_mean"][1], out["vanilla"][1], **tol)
    expected = -torch.tensor([0.0, math.exp(0.1), math.exp(-0.1)], dtype=torch.float64) / 3
    torch.testing.assert_close(out["power_mean"][1][0].double(), expected, **tol)


@pytest.mark.parametrize("mean", MEANS, ids=str)
@pytest.mark.parametrize("region", REGIONS, ids=lambda r: f"{r.level}-{r.ratio_low:.4g}")
def test_zero_advantage_outliers_against_mpmath(mean, region):
    """Planted zero-advantage tokens far above and below the rest, per-token advantages, IS weights,
    a masked slot holding NaN: every token's value and gradient to a few ulps of its own exponent."""
    lp = _f64([[40.0, 0.1, -0.1, 0.05, 0.0], [-30.0, 0.2, -0.15, 0.3, 0.0], [0.1, 25.0, -0.2, -20.0, 0.3]])
    old = torch.zeros_like(lp)
    adv = _f64([[0.0, 1.0, -0.5, 2.0, 0.0], [0.0, -1.0, 1.5, 0.7, 0.3], [1.0, 0.0, -1.0, 0.0, 0.4]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    lp[0, 4] = math.nan
    is_w = _f64([[1.0, 0.5, 1.5, 0.9, 1.0], [1.2, 1.0, 0.8, 1.1, 0.7], [1.0, 1.3, 0.6, 1.0, 0.9]])
    check_against_reference(lp, old, adv, mask, mean, region, is_w)


deltas = st.floats(-3.0, 3.0, allow_nan=False, allow_subnormal=False)
outliers = st.floats(-45.0, 45.0, allow_nan=False, allow_subnormal=False)


@st.composite
def batches(draw):
    B, T = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    lp = [[draw(deltas) for _ in range(T)] for _ in range(B)]
    adv = [[draw(st.sampled_from([0.0, 0.0, 1.0, -1.0, 0.37, -2.5])) for _ in range(T)] for _ in range(B)]
    for i in range(B):  # plant zero-advantage outliers
        if draw(st.booleans()):
            t = draw(st.integers(0, T - 1))
            lp[i][t], adv[i][t] = draw(outliers), 0.0
    mask = [[draw(st.booleans()) or t == 0 for t in range(T)] for _ in range(B)]
    return _f64(lp), _f64(adv), torch.tensor(mask)


@settings(max_examples=60, deadline=None)
@given(batch=batches(), mean=st.sampled_from(MEANS), region=st.sampled_from(REGIONS))
def test_per_token_advantages_with_zeros_against_mpmath(batch, mean, region):
    lp, adv, mask = batch
    lp = torch.where(mask, lp, math.nan)  # masked slots may hold anything
    check_against_reference(lp, torch.zeros_like(lp), adv, mask, mean, region)


@settings(max_examples=40, deadline=None)
@given(batch=batches(), far=outliers)
def test_arithmetic_token_clip_terms_ignore_zero_advantage_tokens(batch, far):
    """At p = 1, token clip, each token's term is its own clipped ratio (vanilla): moving a zero-advantage
    token's log-ratio anywhere leaves every other token's value and gradient as they were."""
    lp, adv, mask = batch
    region = REGIONS[0]
    adv = adv.clone()
    adv[:, 0] = 0.0
    moved = lp.clone()
    moved[:, 0] = far
    a, b = (surrogate_terms(x, torch.zeros_like(x), adv, mask, PowerAggregator(1.0), region) for x in (lp, moved))
    torch.testing.assert_close(a.value[:, 1:], b.value[:, 1:], rtol=64 * EPS64 * 50, atol=0)
    torch.testing.assert_close(a.grad_coef[:, 1:], b.grad_coef[:, 1:], rtol=64 * EPS64 * 50, atol=0)
