"""adapt: reward (APMPO's reward-adaptive p and feedback-adaptive clip) against direct formulas and our fixed-p loss."""

import math

import pytest
import torch
from verl.trainer.ppo.core_algos import get_policy_loss_fn
from verl.workers.config import ActorConfig

import hmpo_verl  # noqa: F401  (registers the losses)
from hmpo_verl import AdaptivePowerMeanLossConfig, PowerMeanLossConfig
from hmpo_verl.reward_adaptive import (
    REWARD_FEEDBACK,
    RewardStats,
    feedback_adaptive_clip,
    reward_adaptive_power,
)


@pytest.fixture(autouse=True)
def _clear_feedback():
    REWARD_FEEDBACK.clear()
    yield
    REWARD_FEEDBACK.clear()


def test_rule_by_hand():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    stats = RewardStats.of(rewards)
    assert (stats.mean, stats.std) == (pytest.approx(0.75), pytest.approx(0.5))  # sample sd: sqrt(0.25 * 4 / 3)
    assert reward_adaptive_power(0.0, 0.8) == 1.0 and reward_adaptive_power(1.0, 0.8) == pytest.approx(math.exp(-0.8))
    assert feedback_adaptive_clip(stats, 0.2, 0.4, 1e-6) == pytest.approx(0.2 + 0.2 * math.tanh(0.75 / (0.5 + 1e-6)))
    assert feedback_adaptive_clip(RewardStats(-0.5, 0.5), 0.2, 0.4, 1e-6) == 0.2  # negative score: floored
    assert feedback_adaptive_clip(RewardStats(1.0, 0.0), 0.2, 0.4, 1e-6) == pytest.approx(0.4)  # all solved
    with pytest.raises(ValueError, match="finite"):
        RewardStats.of(torch.tensor([1.0, math.nan]))


def _batch(seed=0, B=6, T=11):
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(T)[None] < torch.randint(2, T + 1, (B,), generator=g)[:, None]
    old = torch.where(mask, -torch.rand(B, T, generator=g), 0.0)
    log_prob = torch.where(mask, old + 0.4 * torch.randn(B, T, generator=g), 0.0)
    adv = torch.randn(B, 1, generator=g).expand(B, T).clone()
    return old, log_prob, adv, mask


def _actor(policy_loss, **clip):
    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2,
                       policy_loss=policy_loss, **clip)


@pytest.mark.parametrize("feedback_clip", [True, False])
def test_loss_is_the_power_mean_loss_at_that_p_and_upper_clip(feedback_clip):
    """The adaptive loss (value and gradient) equals `power_mean` at p = exp(-gamma mu_R) with clip_ratio_high set to
    the feedback-adaptive bound (or the actor's own without feedback_clip); it logs both."""
    old, log_prob, adv, mask = _batch()
    stats = RewardStats.of(torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0]))
    REWARD_FEEDBACK.set(stats)
    p = math.exp(-0.5 * stats.mean)
    high = 0.1 + 0.5 * math.tanh(stats.mean / (stats.std + 1e-3)) if feedback_clip else 0.2
    options = dict(reward_gamma=0.5, feedback_clip=feedback_clip, feedback_clip_min=0.1, feedback_clip_max=0.6,
                   feedback_delta=1e-3)
    a, b = log_prob.clone().requires_grad_(), log_prob.clone().requires_grad_()
    ours, metrics = get_policy_loss_fn("adaptive_power_mean")(
        old, a, adv, mask, "seq-mean-token-mean", _actor(AdaptivePowerMeanLossConfig(adapt="reward", **options)), None)
    ref, _ = get_policy_loss_fn("power_mean")(
        old, b, adv, mask, "seq-mean-token-mean",
        _actor(PowerMeanLossConfig(loss_mode="power_mean", power=p), clip_ratio_low=0.2, clip_ratio_high=high), None)
    ours.backward()
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-9)
    assert metrics["actor/pm/power"] == pytest.approx(p, rel=1e-6) and metrics["actor/pm/reward_mean"] == stats.mean
    assert ("actor/pm/clip_high" in metrics) == feedback_clip
    if feedback_clip:
        assert metrics["actor/pm/clip_high"] == pytest.approx(high)


def test_without_the_batch_rewards_the_loss_says_what_is_missing():
    old, log_prob, adv, mask = _batch()
    with pytest.raises(RuntimeError, match="REWARD_FEEDBACK.set"):
        get_policy_loss_fn("adaptive_power_mean")(old, log_prob, adv, mask, "token-mean",
                                                  _actor(AdaptivePowerMeanLossConfig(adapt="reward")), None)


@pytest.mark.parametrize("field,value,allowed", [
    ("reward_gamma", -1.0, "a finite number >= 0"), ("feedback_clip", "yes", "true, false"),
    ("feedback_clip_max", 0.1, "a finite number >= feedback_clip_min (0.2)"), ("feedback_delta", 0.0, "> 0"),
    ("clip_space", "log", "clip_level='token', clip_space='ratio'")])
def test_bad_options_name_the_field(field, value, allowed):
    with pytest.raises(ValueError) as err:
        AdaptivePowerMeanLossConfig(adapt="reward", **{field: value})
    assert f"{field}={value!r}" in str(err.value) and allowed in str(err.value)
    assert str(err.value).startswith("actor_rollout_ref.actor.policy_loss.")


def test_verl_trainer_rejects_adapt_reward_before_ray():
    """verl's ppo_loss passes a policy loss no rewards: validate_config's check stops the run with a clear error."""
    from omegaconf import OmegaConf

    from hmpo_verl.registry import check_options

    config = OmegaConf.create({"actor_rollout_ref": {"actor": {"policy_loss": {
        "_target_": "hmpo_verl.AdaptivePowerMeanLossConfig", "loss_mode": "adaptive_power_mean", "adapt": "reward"}}}})
    with pytest.raises(ValueError, match="adapt='reward' is not supported on verl's trainer yet"):
        check_options(config)
    config.actor_rollout_ref.actor.policy_loss.adapt = "ess"
    check_options(config)


def _apmpo_formula(delta, adv, p, eps_low, eps_high):
    """The paper's per-sequence loss, float64: -M_p(|min(r_t A, clip(r_t) A)|) sgn(A) (no dual clip)."""
    r = torch.exp(delta)
    terms = torch.minimum(r * adv, torch.clamp(r, 1 - eps_low, 1 + eps_high) * adv).abs()
    return -math.copysign(1.0, adv) * torch.mean(terms**p) ** (1 / p)


@pytest.mark.parametrize("clip_ratio_c, matches", [(3.0, False), (1e6, True)])
def test_loss_is_the_papers_objective_except_verls_dual_clip(clip_ratio_c, matches):
    """Issue 27, F4 (README, Adaptive p): for A < 0 verl's dual clip also caps each token ratio at clip_ratio_c,
    which the paper's formula lacks: delta = [1.5, 0.1, -0.2], A = -1 gives 1.5545 with clip_ratio_c = 3
    against the formula's 1.9396; with clip_ratio_c above every ratio the two are the same."""
    delta = torch.tensor([[1.5, 0.1, -0.2]], dtype=torch.float64)
    old, adv, mask = torch.zeros_like(delta), torch.full_like(delta, -1.0), torch.ones(1, 3, dtype=torch.bool)
    stats = RewardStats(0.5, 0.5)
    REWARD_FEEDBACK.set(stats)
    config = _actor(AdaptivePowerMeanLossConfig(adapt="reward"), clip_ratio_c=clip_ratio_c)
    loss, metrics = get_policy_loss_fn("adaptive_power_mean")(old, delta, adv, mask, "seq-mean-token-mean", config, None)
    formula = _apmpo_formula(delta[0], -1.0, metrics["actor/pm/power"], 0.2, metrics["actor/pm/clip_high"])
    assert (loss.item() == pytest.approx(formula.item(), rel=1e-12)) == matches
    if not matches:
        capped = torch.tensor([math.log(3.0), 0.1, -0.2], dtype=torch.float64)
        assert loss.item() == pytest.approx(_apmpo_formula(capped, -1.0, metrics["actor/pm/power"], 0.2, 1.0).item())
        assert (round(loss.item(), 4), round(formula.item(), 4)) == (1.5545, 1.9396)


@pytest.mark.parametrize("mean, std", [(math.nan, 1.0), (math.inf, math.nan), (0.5, math.nan), (0.5, -1.0)])
def test_reward_statistics_that_are_not_finite_are_refused(mean, std):
    """TRL's adapter builds the statistics from TRL's logged `reward` / `reward_std` (NaN or inf when a reward
    function returns inf): p became the largest float and the upper clip its floor, silently."""
    with pytest.raises(ValueError, match=r"reward statistics must be finite \(std >= 0\), got mean="):
        RewardStats(mean, std)
