"""Our losses against an independent float64 reference built with autograd.

Two references:
  * the direct sequence objective: per-token loss -A_i * clip(s_i(theta)) with s_i from the
    textbook power-mean formula and constant advantages per response (log s_i clamped at 10
    at sequence level, as gspo; not at token level, as geo_mean);
  * the generalised GSPO-token construction for token-level advantages and IS weights:
    s_it = sg[s_i T w_it] exp(delta'_it - sg[delta'_it]), w from autograd of the textbook
    formula (each token holds its share of s_i).
Both are aggregated by verl's agg_loss (every mode).
"""

import math

import pytest
import torch
from verl.trainer.ppo.core_algos import agg_loss, get_policy_loss_fn

from _helpers import AGG_MODES, actor_config, direct_log_power_mean, poison_masked, random_batch

EPS_LOW, EPS_HIGH, DUAL = 0.2, 0.28, 3.0


def _bounds(space, eps_low, eps_high):
    if space == "ratio":
        return math.log(1 - eps_low), math.log(1 + eps_high)
    return -eps_low, eps_high


def _direct_log_mean(x, mean):
    if mean[0] == "power":
        return direct_log_power_mean(x, mean[1])
    a, h = torch.exp(direct_log_power_mean(x, 1.0)), torch.exp(direct_log_power_mean(x, -1.0))
    if mean[1] is None:
        return 0.5 * (torch.log(a) + torch.log(h))
    for _ in range(mean[1]):
        a, h = (a + h) / 2, 2 * a * h / (a + h)
    return torch.log(a)


def _clip_tokens(delta, adv, space, lo, hi):
    dual = math.log(DUAL) if space == "ratio" else math.inf
    return torch.where(adv > 0, torch.clamp(delta, max=hi), torch.where(adv < 0, torch.clamp(delta, lo, dual), delta))


def reference_loss(old, lp, adv, mask, agg, mean, level, space, is_w=None, token_construction=False,
                   eps_low=EPS_LOW, eps_high=EPS_HIGH):
    lo, hi = _bounds(space, eps_low, eps_high)
    rows = []
    for i in range(old.shape[0]):
        v = mask[i]
        row = torch.zeros(old.shape[1], dtype=old.dtype)
        if v.any():
            delta = lp[i][v] - old[i][v]
            a = adv[i][v]
            if level == "token":
                delta = _clip_tokens(delta, a, space, lo, hi)
            if token_construction:
                # s_it = sg[s_i T_i w_t] exp(delta_t - sg[delta_t]), w from autograd of the textbook mean
                leaf = delta.detach().requires_grad_()
                log_s = _direct_log_mean(leaf, mean)
                (w,) = torch.autograd.grad(log_s, leaf)
                share = (v.sum() * w).detach()
                s_tok = torch.exp(log_s.detach()) * share * torch.exp(delta - delta.detach())
                if level == "sequence":  # s_i clamped at 10 and PPO-clipped; clipped tokens: no gradient
                    s = torch.exp(torch.clamp(log_s.detach(), max=10.0))
                    clipped = torch.where(a > 0, torch.clamp(s, max=math.exp(hi)), torch.where(a < 0, torch.clamp(s, min=math.exp(lo)), s))
                    active = (clipped == s) & (log_s.detach() <= 10.0)
                    tok_loss = torch.where(active, -a * s_tok, -a * clipped * share)
                else:
                    tok_loss = -a * s_tok
            else:
                log_tok = _direct_log_mean(delta, mean).expand(int(v.sum()))
                # the sequence level clamps log s at 10 (as gspo); the token level does not (as geo_mean)
                s = torch.exp(torch.clamp(log_tok, max=10.0) if level == "sequence" else log_tok)
                if level == "sequence":
                    clipped = torch.where(a > 0, torch.clamp(s, max=math.exp(hi)), torch.where(a < 0, torch.clamp(s, min=math.exp(lo)), s))
                    tok_loss = torch.maximum(-a * s, -a * clipped)
                else:
                    tok_loss = -a * s
            if is_w is not None:
                tok_loss = tok_loss * is_w[i][v]
            row = row.masked_scatter(v, tok_loss)
        rows.append(row)
    return agg_loss(torch.stack(rows), mask, agg)


def _loss_mode_and_fields(mean):
    if mean[0] == "power":
        return "power_mean", {"power": mean[1]}
    return "agm", {"agm_iters": mean[1]}


MEANS = [("power", -2.0), ("power", -1.0), ("power", -0.5), ("power", 0.5), ("power", 2.0), ("power", 1.0),
         ("power", math.inf), ("agm", None), ("agm", 2)]


@pytest.mark.parametrize("mean", MEANS)
@pytest.mark.parametrize("level,space", [("token", "ratio"), ("token", "log"), ("sequence", "ratio"), ("sequence", "log")])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_direct_sequence_objective(mean, level, space, agg):
    scale = 0.02 if level == "sequence" else 0.5  # both clipped and unclipped cases present
    old, lp, adv, mask = random_batch(B=9, T=10, scale=scale, seed=21)
    eps_low, eps_high = (EPS_LOW, EPS_HIGH) if level == "token" else (EPS_LOW / 50, EPS_HIGH / 50)
    mode, fields = _loss_mode_and_fields(mean)
    config = actor_config(mode, eps_low=eps_low, eps_high=eps_high, clip_level=level, clip_space=space, **fields)
    x = lp.clone().requires_grad_()
    loss, metrics = get_policy_loss_fn(mode)(old, x, adv, mask, agg, config, None)
    loss.backward()

    y = lp.clone().requires_grad_()
    ref = reference_loss(old, y, adv, mask, agg, mean, level, space, eps_low=eps_low, eps_high=eps_high)
    ref.backward()
    assert 0 < metrics["actor/pg_clipfrac"] < 1
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mean", [("power", -1.0), ("power", 0.7), ("agm", None)])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum-norm"])
def test_token_level_advantages_with_is_weights(mean, level, agg):
    old, lp, adv, mask = random_batch(B=7, T=12, scale=0.3, seed=22, token_adv=True)
    is_w = torch.rand(old.shape, dtype=old.dtype, generator=torch.Generator().manual_seed(5)) + 0.5
    mode, fields = _loss_mode_and_fields(mean)
    config = actor_config(mode, eps_low=EPS_LOW, eps_high=EPS_HIGH, clip_level=level, **fields)
    x = lp.clone().requires_grad_()
    loss, _ = get_policy_loss_fn(mode)(old, x, adv, mask, agg, config, is_w)
    loss.backward()
    y = lp.clone().requires_grad_()
    ref = reference_loss(old, y, adv, mask, agg, mean, level, "ratio", is_w=is_w, token_construction=True)
    ref.backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", ["hmpo", "agm", "power_mean"])
def test_masked_positions_may_hold_anything(mode):
    old, lp, adv, mask = random_batch(B=6, T=9, scale=0.3, seed=23, token_adv=True)
    is_w = torch.rand(old.shape, dtype=old.dtype) + 0.5
    config = actor_config(mode, power=-1.0 if mode != "power_mean" else 0.3)
    results = []
    for junk in (None, math.nan, math.inf, -math.inf, 1e30):
        tensors = [old, lp, adv, is_w] if junk is None else [poison_masked(t, mask, junk) for t in (old, lp, adv, is_w)]
        x = tensors[1].clone().requires_grad_()
        loss, metrics = get_policy_loss_fn(mode)(tensors[0], x, tensors[2], mask, "seq-mean-token-mean", config, tensors[3])
        loss.backward()
        assert torch.all(x.grad[~mask] == 0)
        results.append((loss.detach(), x.grad, metrics))
    for loss, grad, metrics in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=0, atol=0)
        torch.testing.assert_close(grad, results[0][1], rtol=0, atol=0)
        assert metrics == results[0][2]


@pytest.mark.parametrize("field", ["log_prob", "old_log_prob", "advantages", "rollout_is_weights"])
@pytest.mark.parametrize("junk", [math.nan, math.inf])
def test_non_finite_valid_values_raise(field, junk):
    old, lp, adv, mask = random_batch(seed=24)
    tensors = {"old_log_prob": old, "log_prob": lp, "advantages": adv, "rollout_is_weights": torch.ones_like(old)}
    tensors[field] = tensors[field].clone()
    tensors[field][0, 0] = junk
    with pytest.raises(ValueError, match=field):
        get_policy_loss_fn("hmpo")(
            tensors["old_log_prob"], tensors["log_prob"], tensors["advantages"], mask, "token-mean",
            actor_config("hmpo"), tensors["rollout_is_weights"],
        )


def test_metrics():
    old, lp, adv, mask = random_batch(B=8, T=10, scale=0.3, seed=25)
    for power, ess_check in ((0.0, lambda e: e == pytest.approx(1.0)), (-4.0, lambda e: 0 < e < 1)):
        _, m = get_policy_loss_fn("power_mean")(old, lp, adv, mask, "token-mean", actor_config("power_mean", power=power), None)
        assert ess_check(m["actor/pm/ess_frac"])
        assert m["actor/pm/power"] == power
        assert m["actor/pm/log_ah_gap"] > 0
        assert 0 < m["actor/pg_clipfrac"] < 1
        delta = (lp - old)[mask]
        assert m["actor/ppo_kl"] == pytest.approx(-delta.mean().item())
    _, m = get_policy_loss_fn("agm")(old, lp, adv, mask, "token-mean", actor_config("agm"), None)
    assert set(m) >= {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower", "actor/pm/seq_ratio_mean",
                      "actor/pm/log_ah_gap", "actor/pm/ess_frac"}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pm_metrics_match_direct_formulas(dtype):
    old, lp, adv, mask = random_batch(B=8, T=64, scale=0.05, seed=26, dtype=dtype)
    power = -1.0
    config = actor_config("power_mean", power=power, clip_level="sequence")
    _, m = get_policy_loss_fn("power_mean")(old, lp, adv, mask, "token-mean", config, None)
    gaps, ratios, ess = [], [], []
    for i in range(old.shape[0]):
        if not mask[i].any():
            continue
        r = torch.exp((lp[i] - old[i])[mask[i]].double())
        gaps.append(torch.log(r.mean() * (1 / r).mean()))
        ratios.append(1 / (1 / r).mean())
        w = r**power / (r**power).sum()
        ess.append(1 / (w**2).sum() / r.numel())
    tol = dict(rel=1e-9) if dtype == torch.float64 else dict(rel=1e-3, abs=2e-6)
    assert m["actor/pm/log_ah_gap"] == pytest.approx(torch.stack(gaps).mean().item(), **tol)
    assert m["actor/pm/seq_ratio_mean"] == pytest.approx(torch.stack(ratios).mean().item(), **tol)
    assert m["actor/pm/ess_frac"] == pytest.approx(torch.stack(ess).mean().item(), **tol)


@pytest.mark.parametrize("spread", [1e-4, 1e-3, 1e-2])
def test_log_ah_gap_of_tight_float32_rows_matches_float64_and_is_not_negative(spread):
    """For a tight row the gap is about the variance of the log-ratios (1e-8 at a spread of 1e-4), below the
    float32 rounding of the two log-sum-exp terms it is the difference of: the metric is computed in float64."""
    g = torch.Generator().manual_seed(31)
    B, T = 16, 2048
    old = -torch.rand(B, T, generator=g) * 3
    lp = old + torch.randn(B, T, generator=g) * spread
    mask = torch.ones(B, T, dtype=torch.bool)
    _, m = get_policy_loss_fn("hmpo")(old, lp, torch.randn(B, T, generator=g), mask, "token-mean",
                                      actor_config("hmpo"), None)
    r = torch.exp((lp - old).double())  # the float32 log-ratios the loss sees, exactly
    direct = torch.log(r.mean(-1) * (1 / r).mean(-1)).mean().item()
    assert m["actor/pm/log_ah_gap"] >= 0
    assert m["actor/pm/log_ah_gap"] == pytest.approx(direct, rel=1e-3)
