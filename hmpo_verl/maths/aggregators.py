"""Sequence-ratio aggregators: token log-ratios -> (log s_i, weights, log shares), for `surrogate_terms`
(pure torch, no verl import; shared by the verl losses and the TRL trainer).

Each aggregator is called as `aggregate(delta, rows, clipped)` with the (possibly clipped)
token log-ratios delta `(B, T)`, 0 at invalid positions, their `hmpo_verl.means.Rows` (valid
positions and counts) and, at token clip level, the number of tokens per row whose clip is
active `(B,)` (None at sequence level). It returns log s `(B,)`, the weights
w_t = d log s_i / d delta_t `(B, T)` and each token's log share log(T_i w_t) `(B, T)` (accurate
relative to itself; see `hmpo_verl.means.mean_weights_and_shares`), and records the p each row used in `power` `(B,)` (None
for the AGM), for the metrics.
"""

from __future__ import annotations

from typing import Optional

import torch

from hmpo_verl.maths.adaptive import ess_search_bound, ess_target_fraction, solve_power_for_ess
from hmpo_verl.maths.means import agm_weights_and_shares, mean_weights_and_shares


class PowerAggregator:
    """s_i = M_p over each trajectory's tokens; `power` (B,) is the p each row used."""

    def __init__(self, power: float):
        self.p = power
        self.power: Optional[torch.Tensor] = None

    def __call__(self, delta, rows, clipped):
        self.power = torch.full(delta.shape[:1], float(self.p), dtype=torch.float64, device=delta.device)
        return mean_weights_and_shares(delta, self.p, rows)


class ESSMatchingAggregator(PowerAggregator):
    """Per trajectory, p such that ESS_p / T matches target(clip fraction) (adaptive.py).

    `options`: anything with `ess_target_min`, `sign_rule`, `p_min`, `p_max` (verl's
    `AdaptivePowerMeanLossConfig`, TRL's `PowerMeanGRPOConfig`); `advantages` and
    `response_mask` `(B, T)` give each row's advantage sign. p is chosen without autograd
    and enters the weights as a constant (stop-gradient on p; see adaptive.py for why).
    """

    def __init__(self, options, advantages: torch.Tensor, response_mask: torch.Tensor):
        super().__init__(0.0)
        self.options = options
        valid = response_mask.to(torch.bool)
        self.row_sign = torch.sign(torch.where(valid, advantages.detach(), 0.0).sum(-1))
        self.target: Optional[torch.Tensor] = None

    def __call__(self, delta, rows, clipped):
        self.target = ess_target_fraction(clipped / rows.n.clamp(min=1), self.options.ess_target_min)
        bound = ess_search_bound(self.row_sign, self.options.sign_rule, self.options.p_min, self.options.p_max)
        self.power = solve_power_for_ess(delta, rows.valid, self.target, bound)
        return mean_weights_and_shares(delta, self.power, rows)


class AGMAggregator:
    """s_i = arithmetic-harmonic mean (exact limit or k steps)."""

    power = None

    def __init__(self, iters: Optional[int]):
        self.iters = iters

    def __call__(self, delta, rows, clipped):
        return agm_weights_and_shares(delta, rows, self.iters)
