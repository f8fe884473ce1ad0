"""Extreme inputs: |delta| up to 50, p in [-50, 50] and +-inf, T from 1 to 32768, fp32 and bf16."""

import math

import pytest
import torch
from verl.trainer.ppo.core_algos import get_policy_loss_fn

from _helpers import actor_config
from hmpo_verl.maths.staleness import RAW_ROOT

POWERS = [-50.0, -5.0, -1.0, -1e-6, 0.0, 1e-6, 1.0, 5.0, 50.0, math.inf, -math.inf]


def _extreme_batch(B, T, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 60
    delta = (torch.rand(B, T, generator=g) * 2 - 1) * 50
    delta[:, 0] = 50.0
    if T > 1:
        delta[:, 1] = -50.0
    lp = (old + delta).to(dtype)
    adv = torch.where(torch.arange(B) % 2 == 0, 3.0, -3.0).unsqueeze(-1).expand(B, T).to(dtype)
    mask = torch.ones(B, T, dtype=torch.bool)
    return old.to(dtype), lp, adv, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 7, 32768])
@pytest.mark.parametrize("level,space", [("token", "ratio"), ("token", "log"), ("sequence", "ratio")])
def test_finite_loss_and_gradient(dtype, T, level, space):
    old, lp, adv, mask = _extreme_batch(B=4, T=T, dtype=dtype, seed=T)
    for power in POWERS:
        config = actor_config("power_mean", power=power, clip_level=level, clip_space=space)
        x = lp.clone().requires_grad_()
        loss, metrics = get_policy_loss_fn("power_mean")(old, x, adv, mask, "token-mean", config, None)
        loss.backward()
        assert torch.isfinite(loss), (power, loss)
        assert torch.isfinite(x.grad).all(), power
        assert metrics.pop("actor/pm/power") == pytest.approx(power, rel=1e-6)
        assert metrics.pop("actor/pm/power_std", 0.0) == 0.0  # one p for every row (none for p = +-inf)
        # the staged sums the trainer divides (p^2 may overflow for |p| > 1e154: power_std is then left out)
        shown = {k: v for k, v in metrics.items() if not k.startswith(RAW_ROOT)}
        assert all(math.isfinite(v) for v in shown.values()), (power, shown)
    x = lp.clone().requires_grad_()
    loss, _ = get_policy_loss_fn("agm")(old, x, adv, mask, "seq-mean-token-sum", actor_config("agm"), None)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_power_means_of_extreme_log_ratios_are_exact_in_float32():
    """No overflow for |p * delta| up to 2500: the log-space mean matches float64."""
    from hmpo_verl.means import log_power_mean

    g = torch.Generator().manual_seed(0)
    d = (torch.rand(3, 32768, generator=g) * 2 - 1) * 50
    for p in (-50.0, -1.0, 1.0, 50.0):
        ref = log_power_mean(d.double(), p)
        torch.testing.assert_close(log_power_mean(d, p).double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("p", [-1e4, -3e3, 1e3, 1e4])
def test_weights_at_large_powers_are_exact_in_float32(p):
    """Issue 22: p * delta rounded before the row's extreme was subtracted cost eps * |p * delta| in every
    exponent (weights off by 5.5e-3 at |p| 1e3-1e4 on tight clusters at |delta| 40-60, reachable by the ESS
    rule's bounds); p now multiplies the difference delta_t - extreme, and float32 matches float64."""
    from hmpo_verl.means import power_mean_weights

    g = torch.Generator().manual_seed(0)
    centres = (40 + 20 * torch.rand(64, 1, generator=g)) * torch.where(torch.rand(64, 1, generator=g) < 0.5, -1, 1)
    d = (centres + 1e-3 * torch.randn(64, 9, generator=g)).float()
    mask = torch.rand(64, 9, generator=g) < 0.8
    mask[:, 0] = True
    torch.testing.assert_close(power_mean_weights(d, p, mask).double(), power_mean_weights(d.double(), p, mask),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("power", [1e200, -1e200, 1.5e154])
def test_a_power_past_the_square_of_float64s_range_runs_without_power_std(power):
    """p^2 leaves float64's range past |p| ~ 1.34e154: the step's power_std (a Python float **) raised
    OverflowError on every loss call of such a legal p; now it is left out, as for p = +-inf."""
    old, lp, adv, mask = _extreme_batch(B=4, T=7, dtype=torch.float32, seed=7)
    x = lp.clone().requires_grad_()
    loss, metrics = get_policy_loss_fn("power_mean")(old, x, adv, mask, "token-mean", actor_config("power_mean", power=power),
                                                     None)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert metrics["actor/pm/power"] == pytest.approx(power) and "actor/pm/power_std" not in metrics


@pytest.mark.parametrize("eps_high", [709.0, 800.0, math.inf])
def test_a_log_clip_bound_past_float64s_range_is_no_bound(eps_high):
    """clip_space='log': exp(eps_high) past ~709.78 raised an unnamed OverflowError while inf was accepted."""
    from hmpo_verl.hosts.verl.losses import trust_region

    config = actor_config("hmpo", eps_high=eps_high, clip_space="log")
    region = trust_region(config, config.policy_loss)
    assert region.ratio_high == (math.exp(eps_high) if eps_high < 709.78 else math.inf)
