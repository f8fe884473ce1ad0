"""Power means, weights, ESS and AGM against an independent float64 reference."""

import math

import pytest
import torch

from hmpo_verl.means import (
    effective_sample_size,
    log_agm,
    log_agm_and_weights,
    log_power_mean,
    power_mean,
    power_mean_weights,
)
from _helpers import direct_log_power_mean

POWERS = [-50.0, -7.5, -2.0, -1.0, -0.5, -1e-3, 0.0, 1e-3, 0.5, 1.0, 2.0, 7.5, 50.0, math.inf, -math.inf]


def _rows(seed=0, B=5, T=9, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    d = scale * torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.35
    mask[:, 0] = True
    return d, mask


@pytest.mark.parametrize("p", POWERS)
def test_value_and_gradient_match_direct_formula(p):
    d, mask = _rows()
    x = d.clone().requires_grad_()
    got = log_power_mean(x, p, mask)
    (got * torch.arange(1.0, 6.0, dtype=torch.float64)).sum().backward()
    for i in range(d.shape[0]):
        xi = d[i][mask[i]].clone().requires_grad_()
        ref = direct_log_power_mean(xi, p)
        (ref * (i + 1)).backward()
        torch.testing.assert_close(got[i].detach(), ref.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x.grad[i][mask[i]], xi.grad, rtol=1e-10, atol=1e-12)
        assert torch.all(x.grad[i][~mask[i]] == 0)


@pytest.mark.parametrize("p", [-3.0, -1.0, 0.0, 0.7, 4.0])
def test_weights_are_the_softmax_and_the_gradient(p):
    d, mask = _rows(seed=1)
    w = power_mean_weights(d, p, mask)
    ref = torch.softmax(torch.where(mask, p * d, -math.inf), dim=-1)
    torch.testing.assert_close(w, ref, rtol=1e-12, atol=1e-14)
    x = d.clone().requires_grad_()
    log_power_mean(x, p, mask).sum().backward()
    torch.testing.assert_close(x.grad, w, rtol=1e-12, atol=1e-14)


def test_gradcheck_float64():
    d, mask = _rows(seed=2, B=3, T=6)
    for p in (-1.0, 0.0, 2.5):
        assert torch.autograd.gradcheck(lambda x: log_power_mean(x, p, mask), (d.clone().requires_grad_(),))
    for iters in (None, 0, 1, 3):
        assert torch.autograd.gradcheck(lambda x: log_agm(x, mask, iters=iters), (d.clone().requires_grad_(),))


def test_power_mean_in_value_space_and_other_dims():
    x = torch.tensor([[1.0, 2.0, 4.0, 8.0], [3.0, 3.0, 3.0, 3.0]], dtype=torch.float64)
    torch.testing.assert_close(power_mean(x, 1.0), torch.tensor([3.75, 3.0], dtype=torch.float64))
    torch.testing.assert_close(power_mean(x, -1.0), torch.tensor([4 / (1 + 0.5 + 0.25 + 0.125), 3.0], dtype=torch.float64))
    torch.testing.assert_close(power_mean(x, 0.0), torch.tensor([8 ** 0.5, 3.0], dtype=torch.float64))
    torch.testing.assert_close(power_mean(x.T, 2.0, dim=0), power_mean(x, 2.0, dim=1))


def test_per_row_power_tensor_matches_scalar_calls():
    d, mask = _rows(seed=3, B=6)
    p = torch.tensor([-2.0, 0.0, math.inf, -math.inf, 1e-7, 3.0], dtype=torch.float64)
    got = log_power_mean(d, p, mask)
    w = power_mean_weights(d, p, mask)
    for i in range(6):
        torch.testing.assert_close(got[i], log_power_mean(d[i], float(p[i]), mask[i]), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(w[i], power_mean_weights(d[i], float(p[i]), mask[i]), rtol=1e-12, atol=1e-14)


def test_extreme_powers_split_weight_over_ties():
    d = torch.tensor([[0.5, 0.5, -1.0, 0.2]], dtype=torch.float64)
    torch.testing.assert_close(power_mean_weights(d, math.inf), torch.tensor([[0.5, 0.5, 0.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(log_power_mean(d, -math.inf), torch.tensor([-1.0], dtype=torch.float64))


def test_small_power_is_accurate_in_float32():
    """Near p = 0, logsumexp - log T cancels; the expm1 form keeps float32 accuracy."""
    g = torch.Generator().manual_seed(4)
    d = torch.randn(4, 4096, generator=g)
    for p in (1e-2, 1e-4, 1e-6, 1e-8):
        ref = log_power_mean(d.double(), p)
        # second-order expansion: log M_p = mean + p var / 2 + O(p^2)
        expansion = d.double().mean(-1) + p * d.double().var(-1, unbiased=False) / 2
        torch.testing.assert_close(ref, expansion, rtol=0, atol=10 * p * p + 1e-12)
        torch.testing.assert_close(log_power_mean(d, p).double(), ref, rtol=0, atol=2e-7)


def test_effective_sample_size():
    d, mask = _rows(seed=5)
    n = mask.sum(-1).double()
    torch.testing.assert_close(effective_sample_size(power_mean_weights(d, 0.0, mask)), n)
    w = power_mean_weights(d, -3.0, mask)
    torch.testing.assert_close(effective_sample_size(w, mask), 1.0 / (w**2).sum(-1))
    assert torch.all(effective_sample_size(w) <= n + 1e-9) and torch.all(effective_sample_size(w) >= 1 - 1e-9)
    assert effective_sample_size(torch.zeros(1, 3)).item() == 0.0


def _agm_reference(x: list[float], iters):
    a = sum(x) / len(x)
    h = len(x) / sum(1 / v for v in x)
    if iters is None:
        for _ in range(60):
            a, h = (a + h) / 2, 2 * a * h / (a + h)
        return a
    for _ in range(iters):
        a, h = (a + h) / 2, 2 * a * h / (a + h)
    return a


@pytest.mark.parametrize("iters", [None, 0, 1, 2, 5])
def test_agm_matches_plain_iteration(iters):
    d, mask = _rows(seed=6, scale=0.8)
    got = log_agm(d, mask, iters=iters)
    for i in range(d.shape[0]):
        x = torch.exp(d[i][mask[i]]).tolist()
        assert math.isclose(math.exp(got[i].item()), _agm_reference(x, iters), rel_tol=1e-12)


def test_agm_limit_is_sqrt_ah_not_geometric():
    x = torch.log(torch.tensor([1.0, 1.0, 4.0], dtype=torch.float64))
    agm = math.exp(log_agm(x).item())
    geometric = math.exp(log_power_mean(x, 0.0).item())
    arithmetic, harmonic = 2.0, 3.0 / (1 + 1 + 0.25)
    assert math.isclose(agm, math.sqrt(arithmetic * harmonic), rel_tol=1e-12)
    assert math.isclose(agm, 1.632993161855452, rel_tol=1e-12)
    assert math.isclose(geometric, 4 ** (1 / 3), rel_tol=1e-12)
    assert agm - geometric > 0.04
    # ... but equals it for two values
    two = torch.log(torch.tensor([0.3, 5.0], dtype=torch.float64))
    assert math.isclose(log_agm(two).item(), log_power_mean(two, 0.0).item(), rel_tol=1e-12)


def test_agm_iterate_gradient_matches_autograd_of_the_recursion():
    d, mask = _rows(seed=7, B=3, T=7)
    for iters in (0, 1, 3):
        _, w = log_agm_and_weights(d, mask, iters)
        for i in range(3):
            xi = d[i][mask[i]].clone().requires_grad_()
            la, lh = direct_log_power_mean(xi, 1.0), direct_log_power_mean(xi, -1.0)
            a, h = torch.exp(la), torch.exp(lh)
            for _ in range(iters):
                a, h = (a + h) / 2, 2 * a * h / (a + h)
            torch.log(a).backward()
            torch.testing.assert_close(w[i][mask[i]], xi.grad, rtol=1e-10, atol=1e-13)


def test_bad_arguments_raise():
    d = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="NaN"):
        log_power_mean(d, math.nan)
    with pytest.raises(ValueError, match="NaN"):
        log_power_mean(d, torch.tensor([0.0, math.nan]))
    with pytest.raises(ValueError, match="iters"):
        log_agm(d, iters=-1)
