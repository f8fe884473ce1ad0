"""The power-mean losses for hosts whose policy loss is a function of per-token tensors (OpenRLHF, SkyRL).

Pure torch: imports neither verl, TRL, OpenRLHF nor SkyRL. A host adapter
(`hmpo_verl.openrlhf`, `hmpo_verl.skyrl`) keeps its host's calling convention and
aggregation, and gets the per-token loss from `loss_matrix` here -- the surrogate of
`hmpo_verl.surrogate` with the aggregators of `hmpo_verl.aggregators`, the same code as the
verl losses and the TRL trainer -- and the options from `LossOptions`, validated with
`hmpo_verl.options` (same names, values and errors as the verl and TRL configs).

Loss modes (as verl's): `hmpo` (p = -1), `power_mean` (any real p, +-inf), `agm`, and
`adaptive_power_mean` with adapt="ess" (p per trajectory, PMPO). adapt="schedule" and
adapt="reward" are refused: they need the optimizer step and the batch's rewards, which
these hosts do not hand a policy loss.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from hmpo_verl.maths.aggregators import AGMAggregator, ESSMatchingAggregator, PowerAggregator
from hmpo_verl.guards.finite import check_surrogate_finite
from hmpo_verl.maths.options import (
    DEFAULTS,
    HMPO_POWER,
    check_adaptive_options,
    check_choice,
    check_mean_options,
    check_unread_options,
    loss_mode_rule,
)
from hmpo_verl.maths.surrogate import SurrogateTerms, TrustRegion, surrogate_loss_matrix, surrogate_terms

LOSS_MODES = ("hmpo", "power_mean", "agm", "adaptive_power_mean")
HOST_ADAPT = ("ess",)


@dataclass(frozen=True)
class LossOptions:
    """The power-mean options of one loss (fields and meanings as `hmpo_verl.PowerMeanLossConfig` /
    `AdaptivePowerMeanLossConfig`); validated on construction, errors prefixed with `prefix`.

    Attributes:
        loss_mode: one of LOSS_MODES.
        power: p (hmpo: -1 only).
        clip_level: "token" (each token's ratio clipped by sign(A) before the mean; GMPO/PMPO, p = 1 is
            PPO's clip) or "sequence" (the mean clipped; GSPO).
        clip_space: "ratio" ([1 - eps_low, 1 + eps_high]) or "log" ([-eps_low, eps_high] on log-ratios).
        agm_iters: agm: None for the exact limit sqrt(A * H), k >= 0 for k steps.
        adapt, p_min, p_max, sign_rule, ess_target_min: adaptive_power_mean (adapt="ess" only).
        prefix: where the user set these options, for error messages.
    """

    loss_mode: str = "hmpo"
    power: float = DEFAULTS["power"]
    clip_level: str = DEFAULTS["clip_level"]
    clip_space: str = DEFAULTS["clip_space"]
    agm_iters: Optional[int] = DEFAULTS["agm_iters"]
    adapt: str = DEFAULTS["adapt"]
    p_min: float = DEFAULTS["p_min"]
    p_max: float = DEFAULTS["p_max"]
    sign_rule: str = DEFAULTS["sign_rule"]
    ess_target_min: float = DEFAULTS["ess_target_min"]
    prefix: str = "policy_loss"

    def __post_init__(self):
        prefix = self.prefix
        check_choice(prefix, "loss_mode", self.loss_mode, LOSS_MODES)
        check_mean_options(prefix, self.power, self.clip_level, self.clip_space, self.agm_iters)
        if self.loss_mode == "hmpo" and self.power != HMPO_POWER:
            raise ValueError(f"{prefix}.power={self.power!r} conflicts with loss_mode='hmpo', the harmonic mean "
                             "(p=-1); allowed: -1, or loss_mode='power_mean' for another p")
        if self.loss_mode == "adaptive_power_mean":
            if self.adapt not in HOST_ADAPT:
                raise ValueError(f"{prefix}.adapt={self.adapt!r} is invalid here; allowed: ess (adapt='schedule' needs "
                                 "the optimizer step and adapt='reward' the batch's rewards, which this host does not "
                                 "pass its policy loss)")
            check_adaptive_options(prefix, self.adapt, self.p_min, self.p_max, self.sign_rule, self.ess_target_min,
                                   "linear", 0.0, 0.0, 1, self.clip_level)
        adaptive = self.loss_mode == "adaptive_power_mean"
        check_unread_options(prefix, self, loss_mode_rule(self.loss_mode, self.adapt),
                             f"loss_mode={self.loss_mode!r}" + (f", adapt={self.adapt!r}" if adaptive else ""))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "LossOptions":
        return cls(**json.loads(text))


def make_aggregator(options: LossOptions, advantages: torch.Tensor, mask: torch.Tensor):
    """The sequence-ratio aggregator of `options` (`hmpo_verl.aggregators`); `advantages`, `mask` `(B, T)`."""
    if options.loss_mode == "agm":
        return AGMAggregator(options.agm_iters)
    if options.loss_mode == "adaptive_power_mean":
        return ESSMatchingAggregator(options, advantages, mask)
    return PowerAggregator(options.power)


def loss_matrix(
    options: LossOptions,
    region: TrustRegion,
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    is_weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, SurrogateTerms]:
    """Per-token loss `(B, T)` -A_t clip(s_i) T_i w_t (times `is_weights`), with the exact gradient of
    `hmpo_verl.surrogate`, and its `SurrogateTerms` (clip counts, log-ratio sum, ...).

    Args: `(B, T)` tensors; `advantages` may be `(B, 1)` or `(B,)` (one per sequence); `mask` bool or 0/1.
    Masked positions may hold anything. Raises `NonFiniteInputError` for NaN / inf at a valid position, or an
    overflow (`hmpo_verl.guards.finite.check_surrogate_finite`, as the verl and TRL hosts).
    """
    if advantages.dim() == 1:  # (B,): one per sequence, never spread along the tokens (B == T would broadcast so)
        advantages = advantages.unsqueeze(-1)
    advantages = advantages.expand_as(log_probs)
    with torch.no_grad():
        aggregate = make_aggregator(options, advantages, mask)
        terms = surrogate_terms(log_probs, old_log_probs, advantages, mask, aggregate, region, is_weights)
        check_surrogate_finite(terms, {"log_probs": log_probs, "old_log_probs": old_log_probs,
                                       "advantages": advantages, "is_weights": is_weights}, "mask")
    return surrogate_loss_matrix(log_probs, terms), terms
