"""Reward-adaptive p and feedback-adaptive clip of APMPO (arXiv 2605.04066), pure Python/torch.

APMPO ("Adapt to Thrive! Adaptive Power-Mean Policy Optimization", Huang et al., ACL 2026)
drives one p for the whole batch by the batch's mean reward, and widens the upper clip
bound when the batch's rewards are high and consistent:

    p     = exp(-gamma * mu_R)                                   (gamma = 0.8)
    FSS   = mu_R / (sigma_R + delta)                             (feedback stability score)
    eps_hi = eps_min + (eps_max - eps_min) * tanh(FSS)           ((eps_min, eps_max) = (0.2, 0.4))

with mu_R and sigma_R the mean and standard deviation of the rewards of the step's batch
(0/1 rewards in the paper: p falls from 1, the arithmetic mean, towards exp(-gamma) as the
policy succeeds, i.e. towards the geometric side), and the token ratio clipped to
[1 - eps_low, 1 + eps_hi] with eps_low fixed. The per-sequence objective is
M_p(|min(r_t A, clip(r_t) A)|) * sgn(A): since A is one number per sequence this is
A * M_p(PPO-clipped token ratios), i.e. our `power_mean` loss at token clip level in ratio
space with this p and this upper bound.

Source: the paper's own text could not be read here (only its abstract and introduction
are stored); the rule above is the one a paper note states (p = exp(-gamma mu_R),
FSS, the tanh map, gamma = 0.8, (eps_min, eps_max) = (0.2, 0.4), eps_low = 0.2). It does not
give delta's value or whether sigma_R is the population or sample deviation: we use delta
= 1e-6 (the epsilon of GRPO's advantage, which the note writes with the same delta) and the
sample deviation (torch.std, as GRPO's group std). For rewards outside [0, 1] the FSS can be
negative; the upper bound is then floored at eps_min (our choice; the paper's rewards are 0/1).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RewardStats:
    """Mean and sample standard deviation of the rewards of one training batch."""

    mean: float
    std: float

    def __post_init__(self):
        # p and the upper clip are computed from these: a NaN gave p = the largest float and the clip its floor,
        # silently (TRL's `reward` metric turns NaN / inf when a reward function returns inf)
        if not (math.isfinite(self.mean) and math.isfinite(self.std) and self.std >= 0):
            raise ValueError(f"the batch's reward statistics must be finite (std >= 0), got mean={self.mean!r}, "
                             f"std={self.std!r}: a reward function returned NaN or inf; adapt='reward' cannot set p "
                             "or the clip from them")

    @classmethod
    def of(cls, rewards: torch.Tensor) -> "RewardStats":
        """From the batch's sequence rewards `(N,)` (one per response)."""
        r = rewards.detach().double().reshape(-1)
        if r.numel() == 0 or not bool(torch.isfinite(r).all()):
            raise ValueError(f"batch rewards must be a non-empty tensor of finite values, got {r.tolist()[:8]}")
        return cls(float(r.mean()), float(r.std()) if r.numel() > 1 else 0.0)


def reward_adaptive_power(mean_reward: float, gamma: float) -> float:
    """APMPO's p = exp(-gamma * mu_R): 1 (arithmetic) at mu_R = 0, exp(-gamma) at mu_R = 1.

    Rewards outside [0, 1] are legal in verl: a mean of -1000 gives exp(800), beyond float64. p is then
    the largest float, where M_p is the maximum ratio to float precision (|log M_p - max| <= log(T) / p),
    as it is, to the same precision, at the true p; a p that underflows to 0 is the geometric mean likewise.
    """
    exponent = -gamma * mean_reward
    return math.exp(exponent) if exponent < math.log(sys.float_info.max) else sys.float_info.max


def feedback_stability_score(stats: RewardStats, delta: float) -> float:
    """FSS = mu_R / (sigma_R + delta): high when the batch's rewards are high and consistent."""
    return stats.mean / (stats.std + delta)


def feedback_adaptive_clip(stats: RewardStats, clip_min: float, clip_max: float, delta: float) -> float:
    """APMPO's upper clip epsilon eps_min + (eps_max - eps_min) * tanh(FSS), floored at eps_min (FSS < 0)."""
    return clip_min + (clip_max - clip_min) * max(0.0, math.tanh(feedback_stability_score(stats, delta)))


class RewardFeedback:
    """The current training batch's reward statistics, for a loss that cannot see the rewards.

    verl's `ppo_loss` passes a policy loss the log-probs, advantages and mask only, so a host
    that runs `adapt: reward` sets the step's statistics here before its updates
    (`set(RewardStats.of(scores))`; the lean loop of `hmpo_verl.lab` does); the loss reads
    them with `get()`, which raises until they are set. One value per process: every update
    of the step reads the same numbers.
    """

    def __init__(self):
        self._stats: RewardStats | None = None

    def set(self, stats: RewardStats) -> None:
        self._stats = stats

    def clear(self) -> None:
        self._stats = None

    def get(self) -> RewardStats:
        if self._stats is None:
            raise RuntimeError(
                "adapt='reward' needs the training batch's reward statistics, which verl 0.9.1's ppo_loss does not "
                "pass to a policy loss: the host sets them each step with "
                "hmpo_verl.reward_adaptive.REWARD_FEEDBACK.set(RewardStats.of(rewards)) (the lean loop of "
                "hmpo_verl.lab and PowerMeanGRPOTrainer do; verl's trainer does not yet)")
        return self._stats


REWARD_FEEDBACK = RewardFeedback()
