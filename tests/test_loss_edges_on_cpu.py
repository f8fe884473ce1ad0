"""Issue 27, F2 / F3 / F7 on verl's side: finite metrics where the loss is finite, APMPO's p for any mean
reward, and an overflow refused by name (the TRL side of F2 and F7: tests/test_trl_vs_trl.py)."""

import math
import sys

import pytest
import torch
from verl.trainer.ppo.core_algos import get_policy_loss_fn

from _helpers import actor_config
from hmpo_verl.aggregators import PowerAggregator
from hmpo_verl.finite import NonFiniteInputError
from hmpo_verl.means import log_mean_and_weights
from hmpo_verl.reward_adaptive import reward_adaptive_power
from hmpo_verl.surrogate import TrustRegion, surrogate_terms


def _call(config, lp, old, adv, mask):
    leaf = lp.clone().requires_grad_()
    loss, metrics = get_policy_loss_fn("power_mean")(old_log_prob=old, log_prob=leaf, advantages=adv,
                                                     response_mask=mask, loss_agg_mode="token-mean", config=config,
                                                     rollout_is_weights=None)
    loss.backward()
    return loss, leaf.grad, metrics


def test_seq_ratio_metric_is_finite_where_the_loss_is():
    """F2: float32, sequence clip, mean log-ratio 95 with A > 0: the loss is finite (s clipped), and so is
    pm/seq_ratio_mean: exp of log s clamped at 20, as verl's rollout-correction metrics (it was inf)."""
    lp = torch.tensor([[95.0, 95.0, 95.0], [0.01, -0.02, 0.0]])
    old, mask = torch.zeros_like(lp), torch.ones(2, 3, dtype=torch.bool)
    adv = torch.tensor([[1.0], [1.0]]).expand(2, 3)
    loss, grad, metrics = _call(actor_config("power_mean", power=-1.0, clip_level="sequence"), lp, old, adv, mask)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    second = torch.exp(torch.tensor([0.01, -0.02, 0.0], dtype=torch.float64)).reciprocal().mean().reciprocal()
    expected = (math.exp(20.0) + second.item()) / 2
    assert metrics["actor/pm/seq_ratio_mean"] == pytest.approx(expected, rel=1e-6)


def test_reward_adaptive_power_of_a_large_negative_mean_reward_is_the_maximum():
    """F3: p = exp(-0.8 * -1000) = e^800 is beyond float64 (OverflowError before). p is the largest float,
    where M_p is the maximum ratio to rounding, as at the true p: the loss is the p = +inf loss to rounding."""
    p = reward_adaptive_power(-1000.0, 0.8)
    assert p == sys.float_info.max
    assert reward_adaptive_power(1000.0, 0.8) == 0.0  # underflow: the geometric mean, to rounding
    lp = torch.tensor([[0.3, -0.1, 0.05, 0.2], [-0.4, 0.1, 0.1, 0.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0], [-1.0]], dtype=torch.float64).expand(2, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    region = TrustRegion.from_eps("token", "ratio", 0.2, 0.28, 3.0)
    for dtype in (torch.float64, torch.float32):
        x = lp.to(dtype)
        big, limit = (surrogate_terms(x, torch.zeros_like(x), adv, mask, PowerAggregator(q), region) for q in (p, math.inf))
        tol = dict(rtol=4 * torch.finfo(dtype).eps, atol=0)
        torch.testing.assert_close(big.value, limit.value, **tol)
        torch.testing.assert_close(big.grad_coef, limit.grad_coef, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [1e39, -1e39, 1e307, -1e307])
def test_powers_beyond_the_dtype_are_the_extreme_means(dtype, p):
    """Any real p is accepted: where p (or p times a log-ratio) overflows the compute dtype, log M_p is the
    max / min to rounding (it was NaN in float32 from |p| ~ 1e38 and in float64 from |p * delta| > 1.8e308)."""
    d = torch.tensor([[50.0, 49.0, 10.0], [-3.0, 2.0, 0.5]], dtype=dtype)
    for power in (p, torch.tensor([p, p], dtype=torch.float64)):
        log_m, w = log_mean_and_weights(d, power)
        ref_m, ref_w = log_mean_and_weights(d, math.copysign(math.inf, p))
        assert torch.equal(log_m, ref_m) and torch.equal(w, ref_w)


def test_an_overflowing_float32_loss_is_refused_by_name():
    """F7 (verl side): float32, log-ratio 95, A < 0, token clip in log space (no dual clip): s = e^95 is
    beyond float32; the loss raises NonFiniteInputError naming the overflow and how to go on."""
    lp = torch.tensor([[95.0, 95.0]])
    old, adv, mask = torch.zeros_like(lp), -torch.ones_like(lp), torch.ones(1, 2, dtype=torch.bool)
    config = actor_config("power_mean", power=0.0, clip_space="log", eps_low=0.4, eps_high=0.4)
    with pytest.raises(NonFiniteInputError, match="overflowed in torch.float32.*float64 log-probs"):
        _call(config, lp, old, adv, mask)
    loss, grad, _ = _call(config, lp.double(), old.double(), adv.double(), mask)  # float64: exact, e^95
    assert loss.item() == pytest.approx(math.exp(95.0), rel=1e-13)


def test_a_zero_advantage_token_whose_share_overflows_contributes_nothing():
    """A = 0 tokens contribute 0 whatever their log-ratio: a zero-advantage row (every GRPO group with one
    reward) and, with per-token advantages, an A = 0 token beside others. In float32 their share e^95 or
    e^100 is beyond the dtype, and inf * 0 was NaN: a spurious overflow error. Reference: verl's vanilla at
    p = 1 (term for term the same loss); at p = -1 the A = 0 row still adds nothing."""
    vanilla = get_policy_loss_fn("vanilla")
    cases = [(torch.tensor([[100.0, 100.0], [0.1, -0.1]]), torch.tensor([[0.0, 0.0], [1.0, 1.0]])),
             (torch.tensor([[95.0, 0.1, -0.1]]), torch.tensor([[0.0, 1.0, 1.0]]))]
    for lp, adv in cases:
        old, mask = torch.zeros_like(lp), torch.ones_like(lp, dtype=torch.bool)
        config = actor_config("power_mean", power=1.0)
        loss, grad, _ = _call(config, lp, old, adv, mask)
        leaf = lp.clone().requires_grad_()
        ref, _ = vanilla(old, leaf, adv, mask, "token-mean", config, None)
        ref.backward()
        torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=0)  # float32: a few ulps apart
        torch.testing.assert_close(grad, leaf.grad, rtol=1e-5, atol=0)
    lp, adv = cases[0]
    loss, grad, _ = _call(actor_config("hmpo"), lp, torch.zeros_like(lp), adv, torch.ones_like(lp, dtype=torch.bool))
    second = _call(actor_config("hmpo"), lp[1:], torch.zeros_like(lp[1:]), adv[1:], torch.ones_like(lp[1:], dtype=torch.bool))
    assert loss.item() == pytest.approx(second[0].item() / 2, rel=1e-6)  # token-mean over 4 tokens, 2 of them 0
    assert torch.equal(grad[0], torch.zeros(2)) and torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype, p", [(torch.float32, 1e38), (torch.float32, -1e38), (torch.float64, 1e307)])
def test_a_masked_entry_does_not_matter_where_p_times_the_row_extreme_overflows(dtype, p):
    """|p * e| beyond the dtype (e the row's extreme log-ratio): a zero-padded entry's (0 - e) * p is +-inf, and
    masking it by a product gave inf * 0 = NaN for the whole row. Reference: the same valid entries unpadded;
    masked entries holding NaN, inf or a duplicate change nothing."""
    d = torch.tensor([[40.0, 20.0], [-30.0, -50.0]], dtype=dtype)
    ref_m, ref_w = log_mean_and_weights(d, p)
    assert torch.isfinite(ref_m).all()
    for filler in (math.nan, math.inf, 0.0, 2.0):
        padded = torch.cat([d, torch.full((2, 1), filler, dtype=dtype)], 1)
        mask = torch.tensor([[True, True, False], [True, True, False]])
        log_m, w = log_mean_and_weights(padded, p, mask)
        assert torch.equal(log_m, ref_m) and torch.equal(w[:, :2], ref_w) and torch.equal(w[:, 2], torch.zeros(2, dtype=dtype))


def test_an_fp16_row_whose_finite_token_values_sum_past_fp16s_range_is_not_called_an_overflow():
    """2000 tokens of value -50 each (ratio 1, A = 50) are finite in fp16; only their sum (-1e5) is not: the
    overflow check sums in float32, and the gradient is float32's (verl's agg_loss then sums in fp16 as it does
    for its own losses)."""
    B, T = 1, 2000
    grads = {}
    for dtype in (torch.float16, torch.float32):
        old = torch.full((B, T), -1.0, dtype=dtype)
        lp = old.clone().requires_grad_(True)
        loss, _ = get_policy_loss_fn("hmpo")(old, lp, torch.full((B, T), 50.0, dtype=dtype),
                                             torch.ones(B, T, dtype=torch.bool), "token-mean", actor_config("hmpo"), None)
        loss.backward()
        grads[dtype] = lp.grad.float()
    assert torch.isfinite(grads[torch.float16]).all()
    torch.testing.assert_close(grads[torch.float16], grads[torch.float32], rtol=1e-3, atol=0)


@pytest.mark.parametrize("B, T", [(3, 3), (2, 5)])
def test_a_one_per_sequence_advantage_is_never_spread_along_the_tokens(B, T):
    """The hosts' loss_matrix takes `(B,)` advantages as `(B, 1)`: with B == T, expand_as alone gave every row the
    whole advantage vector along its tokens."""
    from hmpo_verl.host_loss import LossOptions, loss_matrix

    g = torch.Generator().manual_seed(5)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64)
    lp = old + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv, mask = torch.arange(1.0, B + 1, dtype=torch.float64) * torch.tensor([1.0, -2.0, 3.0][:B]), torch.ones(B, T)
    options, region = LossOptions("power_mean", power=-1.0), TrustRegion("token", 0.8, 1.2)
    by_row, _ = loss_matrix(options, region, lp, old, adv.unsqueeze(-1), mask)
    flat, _ = loss_matrix(options, region, lp, old, adv, mask)
    torch.testing.assert_close(flat, by_row, rtol=0, atol=0)
