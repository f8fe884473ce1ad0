"""Property tests (hypothesis) of the log-space power mean and its weights."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hmpo_verl.means import log_agm, log_power_mean, power_mean, power_mean_weights

log_values = st.lists(st.floats(-20, 20, allow_nan=False), min_size=1, max_size=24)
powers = st.one_of(st.floats(-50, 50, allow_nan=False), st.sampled_from([math.inf, -math.inf, 0.0]))
garbage = st.sampled_from([math.nan, math.inf, -math.inf, 1e30, -1e30, 0.0])

PROPERTY_SETTINGS = settings(max_examples=150, deadline=None)


def _t(values):
    return torch.tensor(values, dtype=torch.float64)


@PROPERTY_SETTINGS
@given(log_values, powers, powers)
def test_monotone_in_p(values, p1, p2):
    lo, hi = sorted([p1, p2])
    x = _t(values)
    assert log_power_mean(x, lo).item() <= log_power_mean(x, hi).item() + 1e-9 * (1 + x.abs().max().item())


@PROPERTY_SETTINGS
@given(log_values, powers)
def test_between_min_and_max(values, p):
    x = _t(values)
    m = log_power_mean(x, p).item()
    tol = 1e-9 * (1 + x.abs().max().item())
    assert x.min().item() - tol <= m <= x.max().item() + tol


@PROPERTY_SETTINGS
@given(log_values, powers, st.floats(-10, 10, allow_nan=False))
def test_homogeneous(values, p, log_c):
    """M_p(c x) = c M_p(x), i.e. a shift in log space."""
    x = _t(values)
    torch.testing.assert_close(log_power_mean(x + log_c, p), log_power_mean(x, p) + log_c, rtol=0, atol=1e-9)


@PROPERTY_SETTINGS
@given(st.floats(-20, 20, allow_nan=False), st.integers(1, 40), powers)
def test_constant_values(value, n, p):
    x = torch.full((n,), value, dtype=torch.float64)
    torch.testing.assert_close(log_power_mean(x, p), torch.tensor(value, dtype=torch.float64), rtol=0, atol=1e-12)


@PROPERTY_SETTINGS
@given(log_values, st.floats(-1e-3, 1e-3, allow_nan=False))
def test_continuous_at_zero(values, p):
    """Hoeffding's lemma: 0 <= sign(p) (log M_p - log M_0) <= |p| range^2 / 8."""
    x = _t(values)
    gap = (log_power_mean(x, p) - log_power_mean(x, 0.0)).item()
    bound = abs(p) * (x.max() - x.min()).item() ** 2 / 8
    tol = 1e-12 * (1 + x.abs().max().item())
    assert -tol <= math.copysign(1.0, p) * gap <= bound + tol


@PROPERTY_SETTINGS
@given(log_values, st.lists(garbage, min_size=1, max_size=8), powers, st.randoms(use_true_random=False))
def test_masked_entries_are_irrelevant(values, junk, p, rnd):
    """Garbage at masked positions changes neither the value nor the valid gradient; its gradient is 0."""
    entries = [(v, True) for v in values] + [(j, False) for j in junk]
    rnd.shuffle(entries)
    x = _t([e[0] for e in entries]).requires_grad_()
    mask = torch.tensor([e[1] for e in entries])
    m = log_power_mean(x, p, mask)
    m.backward()
    clean = _t(values).requires_grad_()
    ref = log_power_mean(clean, p)
    ref.backward()
    torch.testing.assert_close(m.detach(), ref.detach(), rtol=0, atol=1e-12)
    assert torch.all(x.grad[~mask] == 0)
    torch.testing.assert_close(torch.sort(x.grad[mask]).values, torch.sort(clean.grad).values, rtol=1e-9, atol=1e-12)


@PROPERTY_SETTINGS
@given(st.lists(garbage, min_size=1, max_size=8), powers)
def test_all_masked_row_is_ratio_one_with_zero_gradient(junk, p):
    x = _t(junk).requires_grad_()
    mask = torch.zeros(len(junk), dtype=torch.bool)
    m = log_power_mean(x, p, mask)
    m.backward()
    assert m.item() == 0.0
    assert torch.all(x.grad == 0)
    assert torch.all(power_mean_weights(_t(junk), p, mask) == 0)
    agm = log_agm(_t(junk), mask)
    assert agm.item() == 0.0


@PROPERTY_SETTINGS
@given(log_values, powers)
def test_weights_are_a_distribution(values, p):
    w = power_mean_weights(_t(values), p)
    assert torch.all(w >= 0)
    torch.testing.assert_close(w.sum(), torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=1e-12)


@PROPERTY_SETTINGS
@given(log_values)
def test_agm_between_harmonic_and_arithmetic(values):
    x = _t(values)
    tol = 1e-9 * (1 + x.abs().max().item())
    h, a = log_power_mean(x, -1.0).item(), log_power_mean(x, 1.0).item()
    for iters in (None, 0, 1, 4):
        assert h - tol <= log_agm(x, iters=iters).item() <= a + tol


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan])
def test_power_mean_refuses_an_entry_that_is_not_positive_where_valid(bad):
    """x = 0 gave the right value with NaN gradients; a negative or NaN entry, a silent NaN. A masked entry may
    hold anything."""
    x = torch.tensor([[1.0, 2.0, bad]], dtype=torch.float64)
    with pytest.raises(ValueError, match="x has 1 valid entry that is not positive"):
        power_mean(x, -1.0)
    mask = torch.tensor([[True, True, False]])
    assert power_mean(x, -1.0, mask).item() == pytest.approx(4 / 3)
