"""Our losses against verl's own built-in losses where they coincide (loss, gradient, metrics),
each under exactly the conditions the README states, and each stated exception tested as the
documented difference.

  power_mean p=0, sequence clip              == gspo      every agg mode, +- IS weights, per-token A,
                                                          log s clamped at 10 in both
  power_mean p=0, token clip in log space    == geo_mean  seq-mean-token-mean over the whole batch in one
                                                          call, no empty row, one A per response, IS
                                                          weights constant per response (or none)
  power_mean p=1, token clip in ratio space  == vanilla   every agg mode, +- IS weights, per-token A
                                                          (zeros included); except where vanilla's
                                                          clamp of delta to [-20, 20] binds
"""

import dataclasses
import math

import pytest
import torch
from verl.trainer.ppo.core_algos import agg_loss, get_policy_loss_fn

from _helpers import AGG_MODES, actor_config, random_batch


def _run(loss_mode, config, old, log_prob, adv, mask, agg, is_weights=None):
    lp = log_prob.clone().requires_grad_()
    loss, metrics = get_policy_loss_fn(loss_mode)(
        old_log_prob=old, log_prob=lp, advantages=adv, response_mask=mask, loss_agg_mode=agg, config=config,
        rollout_is_weights=is_weights,
    )
    loss.backward()
    return loss.detach(), lp.grad, metrics


def _assert_same(ours, theirs, metric_keys):
    torch.testing.assert_close(ours[0], theirs[0].to(ours[0].dtype), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-10, atol=1e-12)
    for key in metric_keys:
        assert ours[2][key] == pytest.approx(theirs[2][key], rel=1e-9, abs=1e-12), key


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("with_is", [False, True])
@pytest.mark.parametrize("token_adv", [False, True])
def test_geometric_sequence_clip_is_gspo(agg, with_is, token_adv):
    old, lp, adv, mask = random_batch(B=8, T=13, scale=0.02, seed=11, token_adv=token_adv)
    is_w = torch.rand(old.shape, dtype=old.dtype, generator=torch.Generator().manual_seed(3)) + 0.5 if with_is else None
    eps = dict(eps_low=3e-4, eps_high=4e-4)  # GSPO's published range: some sequences clip, some not
    ours = _run("power_mean", actor_config("power_mean", power=0.0, clip_level="sequence", **eps), old, lp, adv, mask, agg, is_w)
    theirs = _run("gspo", actor_config("gspo", plain=True, **eps), old, lp, adv, mask, agg, is_w)
    assert 0 < ours[2]["actor/pg_clipfrac"] < 1
    _assert_same(ours, theirs, ["actor/pg_clipfrac", "actor/ppo_kl"])


def test_geometric_token_log_clip_is_geo_mean():
    old, lp, adv, mask = random_batch(B=10, T=9, scale=0.4, seed=12, empty_row=False)
    eps = dict(eps_low=0.4, eps_high=0.4)  # GMPO's log-space range
    ours = _run("power_mean", actor_config("power_mean", power=0.0, clip_space="log", **eps), old, lp, adv, mask,
                "seq-mean-token-mean")
    theirs = _run("geo_mean", actor_config("geo_mean", plain=True, **eps), old, lp, adv, mask, "seq-mean-token-mean")
    assert ours[2]["actor/pg_clipfrac"] > 0
    _assert_same(ours, theirs, ["actor/ppo_kl"])


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("with_is", [False, True])
@pytest.mark.parametrize("token_adv", [False, True])
def test_arithmetic_token_clip_is_vanilla(agg, with_is, token_adv):
    """Value and gradient per token: the token's share of s_i at p = 1 is its own clipped ratio."""
    old, lp, adv, mask = random_batch(B=10, T=9, scale=0.6, seed=13, token_adv=token_adv)
    if token_adv:
        adv[:, ::4] = 0.0  # zero advantages too
    is_w = torch.rand(old.shape, dtype=old.dtype, generator=torch.Generator().manual_seed(4)) + 0.5 if with_is else None
    ours = _run("power_mean", actor_config("power_mean", power=1.0), old, lp, adv, mask, agg, is_w)
    theirs = _run("vanilla", actor_config("vanilla", plain=True), old, lp, adv, mask, agg, is_w)
    assert ours[2]["actor/pg_clipfrac"] > 0 and ours[2]["actor/pg_clipfrac_lower"] > 0  # both clips in reach
    _assert_same(ours, theirs, ["actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"])


def test_vanilla_exception_clamps_delta_at_minus_20_for_positive_advantages():
    """Documented difference: vanilla clamps delta to [-20, 20], so a token with A > 0 and delta < -20
    gets the value -A e^-20 and no gradient; ours keeps e^delta (and its gradient). Nothing else moves."""
    old = torch.zeros(2, 3, dtype=torch.float64)
    lp = torch.tensor([[-25.0, 0.1, -0.1], [-25.0, 0.1, -0.1]], dtype=torch.float64)
    adv = torch.tensor([[1.0], [-1.0]], dtype=torch.float64).expand(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    agg = "token-sum"
    ours = _run("power_mean", actor_config("power_mean", power=1.0), old, lp, adv, mask, agg)
    theirs = _run("vanilla", actor_config("vanilla", plain=True), old, lp, adv, mask, agg)
    assert theirs[1][0, 0] == 0 and ours[1][0, 0].item() == pytest.approx(-math.exp(-25.0), rel=1e-12)
    difference = torch.tensor(math.exp(-20.0) - math.exp(-25.0), dtype=torch.float64)  # -A e^-25 vs -A e^-20
    torch.testing.assert_close(ours[0] - theirs[0], difference, rtol=0, atol=1e-15)
    torch.testing.assert_close(ours[1][:, 1:], theirs[1][:, 1:], rtol=1e-12, atol=0)
    torch.testing.assert_close(ours[1][1], theirs[1][1], rtol=1e-12, atol=0)  # A < 0: clipped at 1 - eps in both
    assert ours[2]["actor/ppo_kl"] == pytest.approx(theirs[2]["actor/ppo_kl"] + 5.0 / 3)  # vanilla's kl uses -20


def test_geometric_token_log_clip_keeps_the_gradient_of_a_far_risen_sequence_as_geo_mean():
    """Issue 10: old log-probs 0, log-probs 12 on 3 tokens, A = -1, clip 0.4/0.4: loss e^12 and
    gradient e^12 / 3 = 54251.6 per token, as geo_mean (no clamp of log s at the token level)."""
    old = torch.zeros(1, 3, dtype=torch.float64)
    lp = torch.full((1, 3), 12.0, dtype=torch.float64)
    adv = -torch.ones(1, 3, dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    eps = dict(eps_low=0.4, eps_high=0.4)
    ours = _run("power_mean", actor_config("power_mean", power=0.0, clip_space="log", **eps), old, lp, adv, mask,
                "seq-mean-token-mean")
    theirs = _run("geo_mean", actor_config("geo_mean", plain=True, **eps), old, lp, adv, mask, "seq-mean-token-mean")
    assert ours[0].item() == pytest.approx(math.exp(12.0), rel=1e-12)
    torch.testing.assert_close(ours[1], torch.full((1, 3), math.exp(12.0) / 3, dtype=torch.float64), rtol=1e-12, atol=0)
    # geo_mean divides the token sum by T + 1e-8: agreement to ~1e-8 relative here
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-7, atol=0)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-7, atol=0)


@pytest.mark.parametrize("agg", AGG_MODES)
def test_geometric_sequence_clip_clamps_log_s_at_10_as_gspo(agg):
    """At sequence level log s is clamped at 10 in both (value e^10, no gradient), for either sign of A."""
    old = torch.zeros(3, 4, dtype=torch.float64)
    lp = torch.tensor([[12.0] * 4, [12.0] * 4, [0.01, -0.02, 0.03, 0.0]], dtype=torch.float64)
    adv = torch.tensor([[-1.0], [1.0], [0.5]], dtype=torch.float64).expand(3, 4)
    mask = torch.ones(3, 4, dtype=torch.bool)
    ours = _run("power_mean", actor_config("power_mean", power=0.0, clip_level="sequence"), old, lp, adv, mask, agg)
    theirs = _run("gspo", actor_config("gspo", plain=True), old, lp, adv, mask, agg)
    _assert_same(ours, theirs, ["actor/pg_clipfrac", "actor/ppo_kl"])
    assert torch.all(ours[1][:2] == 0) and torch.all(ours[1][2] != 0)


def _geo_batch(seed=12, **kw):
    return random_batch(B=10, T=9, scale=0.4, seed=seed, empty_row=False, **kw)


GEO_EPS = dict(eps_low=0.4, eps_high=0.4)  # GMPO's log-space range


def _ours_and_geo_mean(old, lp, adv, mask, agg="seq-mean-token-mean", is_w=None, config=None):
    config = config or actor_config("power_mean", power=0.0, clip_space="log", **GEO_EPS)
    ours = _run("power_mean", config, old, lp, adv, mask, agg, is_w)
    theirs = _run("geo_mean", actor_config("geo_mean", plain=True, **GEO_EPS), old, lp, adv, mask, agg, is_w)
    return ours, theirs


def test_geo_mean_with_is_weights_constant_per_response():
    old, lp, adv, mask = _geo_batch()
    is_w = (torch.rand(10, 1, dtype=old.dtype, generator=torch.Generator().manual_seed(6)) + 0.5).expand_as(old)
    ours, theirs = _ours_and_geo_mean(old, lp, adv, mask, is_w=is_w.clone())
    # geo_mean takes the geometric mean of (w + 1e-10): 1e-10 relative at most
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-9, atol=0)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-9, atol=1e-15)


def test_geo_mean_exception_token_varying_is_weights():
    """Documented difference: we weight each token's loss by its IS weight (mean over the response
    at p = 0); geo_mean multiplies the response by their geometric mean. delta = [0.1, -0.2],
    weights [0.5, 1.5], A = 1: ours -0.951229, geo_mean -0.823789."""
    old = torch.zeros(1, 2, dtype=torch.float64)
    lp = torch.tensor([[0.1, -0.2]], dtype=torch.float64)
    adv = torch.ones(1, 2, dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    is_w = torch.tensor([[0.5, 1.5]], dtype=torch.float64)
    ours, theirs = _ours_and_geo_mean(old, lp, adv, mask, is_w=is_w)
    s = math.exp(-0.05)
    assert ours[0].item() == pytest.approx(-s * 1.0, rel=1e-12)  # mean weight 1
    assert theirs[0].item() == pytest.approx(-s * math.sqrt(0.75), rel=1e-9)  # geometric mean sqrt(0.75)
    assert ours[0].item() == pytest.approx(-0.951229, abs=1e-6) and theirs[0].item() == pytest.approx(-0.823789, abs=1e-6)


def test_geo_mean_exception_per_token_advantages():
    """Documented difference: geo_mean uses the response's mean advantage; we give each token its
    own A_t (both clip each token by its own sign). At p = 0 the values agree (the mean of -A_t s_i
    over the response is -mean(A) s_i); the gradients do not: ours is -A_t s_i / T_i per token."""
    old, lp, adv, mask = _geo_batch(token_adv=True)
    ours, theirs = _ours_and_geo_mean(old, lp, adv, mask)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-9, atol=0)
    assert not torch.allclose(ours[1], theirs[1])
    delta = torch.where(adv > 0, (lp - old).clamp(max=0.4), torch.where(adv < 0, (lp - old).clamp(min=-0.4), lp - old))
    n = mask.sum(-1, keepdim=True)
    s = torch.exp(torch.where(mask, delta, 0.0).sum(-1, keepdim=True) / n)
    unclipped = mask & (delta == lp - old)
    expected = torch.where(unclipped, -adv * s / n / mask.shape[0], 0.0)
    torch.testing.assert_close(ours[1], expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("agg", [a for a in AGG_MODES if a != "seq-mean-token-mean"])
def test_geo_mean_exception_other_aggregations(agg):
    """Documented difference: geo_mean ignores loss_agg_mode (always the mean over responses of
    -A_i s_i); ours aggregates the per-token losses with verl's agg_loss."""
    old, lp, adv, mask = _geo_batch()
    ours, theirs = _ours_and_geo_mean(old, lp, adv, mask, agg=agg)
    _, geo_default = _ours_and_geo_mean(old, lp, adv, mask, agg="seq-mean-token-mean")
    torch.testing.assert_close(theirs[0], geo_default[0], rtol=1e-12, atol=0)  # geo_mean: the same in every mode
    delta = torch.where(adv > 0, (lp - old).clamp(max=0.4), (lp - old).clamp(min=-0.4))
    s = torch.exp(torch.where(mask, delta, 0.0).sum(-1) / mask.sum(-1))
    expected = agg_loss(torch.where(mask, -adv * s.unsqueeze(-1), 0.0), mask, agg)
    torch.testing.assert_close(ours[0], expected, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(ours[0], theirs[0])


def test_geo_mean_exception_empty_rows_and_micro_batches():
    """Documented difference: geo_mean is torch.mean over the rows of its call, empty rows included,
    and ignores global_batch_info; ours divides by the global number of non-empty responses, so the
    micro-batches of a step add up to the whole batch's loss."""
    old, lp, adv, mask = random_batch(B=10, T=9, scale=0.4, seed=12, empty_row=True)
    ours, theirs = _ours_and_geo_mean(old, lp, adv, mask)
    torch.testing.assert_close(ours[0] * 9, theirs[0] * 10, rtol=1e-9, atol=0)  # 9 non-empty of 10 rows
    config = actor_config("power_mean", power=0.0, clip_space="log", **GEO_EPS)
    config.global_batch_info.update(dp_size=1, global_batch_size=9)
    halves = [_ours_and_geo_mean(old[i:i + 5], lp[i:i + 5], adv[i:i + 5], mask[i:i + 5], config=config)
              for i in (0, 5)]
    torch.testing.assert_close(halves[0][0][0] + halves[1][0][0], ours[0], rtol=1e-12, atol=0)
    geo_sum = halves[0][1][0] + halves[1][1][0]
    assert not torch.allclose(geo_sum, theirs[0])  # twice the mean of two halves


def test_hmpo_runs_on_plain_policy_loss_config():
    """The one-line path: verl's own PolicyLossConfig with loss_mode=hmpo."""
    old, lp, adv, mask = random_batch(seed=14)
    plain = _run("hmpo", actor_config("hmpo", plain=True), old, lp, adv, mask, "token-mean")
    ours = _run("power_mean", actor_config("power_mean", power=-1.0), old, lp, adv, mask, "token-mean")
    _assert_same(plain, ours, list(ours[2]))
    assert plain[2]["actor/pm/power"] == -1.0


def test_geo_mean_exception_clip_metrics():
    """Documented difference (issue 22): our actor/pg_clipfrac counts the tokens whose one-sided clip is
    active (A > 0 and delta > eps_high, or A < 0 and delta < -eps_low) and pg_clipfrac_lower those capped
    by the dual clip (none in log space); geo_mean counts every token outside [-eps_low, eps_high], split
    by the sign of A (pg_clipfrac: A > 0, pg_clipfrac_lower: A < 0), whether or not its clip is active."""
    old, lp, adv, mask = _geo_batch(seed=31)
    lp = old + 3.0 * (lp - old)  # wide log-ratios: tokens on both sides of both bounds
    adv[:7] = adv[:7].abs()  # mostly A > 0: geo_mean's pg_clipfrac also counts their delta < -eps_low
    ours, theirs = _ours_and_geo_mean(old, lp, adv, mask)
    delta, n = (lp - old)[mask], mask.sum().item()
    a = adv[mask]
    outside = (delta > 0.4) | (delta < -0.4)
    active = ((a > 0) & (delta > 0.4)) | ((a < 0) & (delta < -0.4))
    assert ours[2]["actor/pg_clipfrac"] == pytest.approx(active.sum().item() / n, rel=1e-6)
    assert ours[2]["actor/pg_clipfrac_lower"] == 0.0
    assert theirs[2]["actor/pg_clipfrac"] == pytest.approx((outside & (a > 0)).sum().item() / n, rel=1e-6)
    assert theirs[2]["actor/pg_clipfrac_lower"] == pytest.approx((outside & (a < 0)).sum().item() / n, rel=1e-6)
    assert abs(ours[2]["actor/pg_clipfrac"] - theirs[2]["actor/pg_clipfrac"]) > 0.1  # a real difference
    assert ours[2]["actor/ppo_kl"] == pytest.approx(theirs[2]["actor/ppo_kl"], rel=1e-9)


# Issue 27, F5: the rest of vanilla's clamp of delta to [-20, 20], each stated difference on both sides.


def test_vanilla_exception_ppo_kl_averages_the_clamped_delta():
    """actor/ppo_kl: vanilla averages -clamp(delta, -20, 20), ours (as gspo and geo_mean) -delta, so they differ
    wherever a valid |delta| > 20; loss and gradient agree here (delta 25 with A < 0 is dual-clipped in both)."""
    old = torch.zeros(1, 2, dtype=torch.float64)
    lp = torch.tensor([[25.0, 0.1]], dtype=torch.float64)
    adv = torch.tensor([[-1.0, 1.0]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    ours = _run("power_mean", actor_config("power_mean", power=1.0), old, lp, adv, mask, "token-mean")
    theirs = _run("vanilla", actor_config("vanilla", plain=True), old, lp, adv, mask, "token-mean")
    assert ours[2]["actor/ppo_kl"] == pytest.approx(-12.55, rel=1e-12)
    assert theirs[2]["actor/ppo_kl"] == pytest.approx(-10.05, rel=1e-12)
    _assert_same(ours, theirs, ["actor/pg_clipfrac", "actor/pg_clipfrac_lower"])


def test_vanilla_exception_negative_advantages_below_minus_20_without_a_lower_bound():
    """clip_ratio_low = 1 (lower ratio bound 0): an A < 0 token with delta < -20 is not clipped, so vanilla's
    clamp shows: value -A e^-20 and no gradient there, ours -A e^delta and its gradient (as for A > 0)."""
    old = torch.zeros(1, 2, dtype=torch.float64)
    lp = torch.tensor([[-25.0, -0.1]], dtype=torch.float64)
    adv = torch.full((1, 2), -1.0, dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    config = dict(eps_low=1.0, eps_high=0.2)
    ours = _run("power_mean", actor_config("power_mean", power=1.0, **config), old, lp, adv, mask, "token-sum")
    theirs = _run("vanilla", actor_config("vanilla", plain=True, **config), old, lp, adv, mask, "token-sum")
    assert theirs[1][0, 0] == 0 and ours[1][0, 0].item() == pytest.approx(math.exp(-25.0), rel=1e-12)
    torch.testing.assert_close(ours[0] - theirs[0], torch.tensor(math.exp(-25.0) - math.exp(-20.0), dtype=torch.float64),
                               rtol=0, atol=1e-15)
    torch.testing.assert_close(ours[1][0, 1], theirs[1][0, 1], rtol=1e-12, atol=0)


def test_vanilla_exception_negative_advantages_above_20_with_a_dual_clip_beyond_e20():
    """clip_ratio_c > e^20: an A < 0 token with delta > 20 holds -A e^20 (no gradient) in vanilla, which clamps
    delta first; ours -A min(e^delta, clip_ratio_c): here delta = 21 keeps its gradient, delta = 25 is capped."""
    old = torch.zeros(1, 3, dtype=torch.float64)
    lp = torch.tensor([[21.0, 25.0, 0.1]], dtype=torch.float64)
    adv = torch.full((1, 3), -1.0, dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    c = 1e10
    configs = [dataclasses.replace(actor_config(mode, **kw), clip_ratio_c=c)
               for mode, kw in (("power_mean", dict(power=1.0)), ("vanilla", dict(plain=True)))]
    ours = _run("power_mean", configs[0], old, lp, adv, mask, "token-sum")
    theirs = _run("vanilla", configs[1], old, lp, adv, mask, "token-sum")
    e20, e21 = math.exp(20.0), math.exp(21.0)
    assert ours[0].item() == pytest.approx(e21 + c + math.exp(0.1), rel=1e-13)
    assert theirs[0].item() == pytest.approx(2 * e20 + math.exp(0.1), rel=1e-13)
    torch.testing.assert_close(ours[1], torch.tensor([[e21, 0.0, math.exp(0.1)]], dtype=torch.float64), rtol=1e-13, atol=0)
    torch.testing.assert_close(theirs[1], torch.tensor([[0.0, 0.0, math.exp(0.1)]], dtype=torch.float64), rtol=1e-13, atol=0)
