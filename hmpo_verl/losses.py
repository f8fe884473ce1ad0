"""verl policy losses `hmpo`, `power_mean`, `agm`, `adaptive_power_mean`: a thin adapter
over the pure maths.

Each function has verl's policy-loss signature and return value (see
`verl.trainer.ppo.core_algos.compute_policy_loss_vanilla`) and is registered under its
name when `hmpo_verl` is imported. The work is split as:

    means.py      log power means / AGM and their gradient weights  (pure torch)
    surrogate.py  clipping and the per-token surrogate               (pure torch)
    adaptive.py   adaptive p: ESS matching, schedules                (pure torch)
    this module   read verl's ActorConfig, aggregate with verl's agg_loss, metrics

Metrics: verl's `actor/pg_clipfrac` (tokens whose trust-region clip is active),
`actor/ppo_kl`, `actor/pg_clipfrac_lower` (tokens capped by the dual clip, A < 0), and
under `actor/pm/`: `seq_ratio_mean` (mean sequence ratio s_i), `log_ah_gap` (mean of
log A - log H of the unclipped token ratios, the spread of the mean inequality),
`ess_frac` (mean Kish ESS / T of the aggregation weights), and for the power losses
`power`, `power_min`, `power_max` (p over the trajectories of the micro-batch);
`adaptive_power_mean` with adapt="ess" adds `ess_target` (mean target ESS / T), with
adapt="reward" `clip_high` (the feedback-adaptive upper clip epsilon) and `reward_mean`. In
verl's off-policy trainers, where each sample's lag is known (`hmpo_verl.staleness`), the loss
also reports `log_ah_gap`, `ess_frac` and the clip fraction per lag (as sums the trainer turns
into `actor/pm/lag<k>/...` means).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from verl.trainer.ppo.core_algos import agg_loss

from hmpo_verl.adaptive import scheduled_power
from hmpo_verl.aggregators import AGMAggregator, ESSMatchingAggregator, PowerAggregator
from hmpo_verl.config import AdaptivePowerMeanLossConfig, PowerMeanLossConfig, loss_options
from hmpo_verl.finite import NonFiniteInputError, first_non_finite
from hmpo_verl.registry import register_deferred
from hmpo_verl.reward_adaptive import REWARD_FEEDBACK, feedback_adaptive_clip, reward_adaptive_power
from hmpo_verl.staleness import current_sample_lag, per_lag_sums
from hmpo_verl.steps import STEP_COUNTER
from hmpo_verl.surrogate import TrustRegion, surrogate_loss_matrix, surrogate_terms


def _eps(config: Any) -> tuple[float, float]:
    """(eps_low, eps_high) from the actor config, falling back to clip_ratio as verl does."""
    clip_ratio = config.get("clip_ratio", 0.2)
    low = config.get("clip_ratio_low", None)
    high = config.get("clip_ratio_high", None)
    return float(clip_ratio if low is None else low), float(clip_ratio if high is None else high)


def _trust_region(config: Any, options: PowerMeanLossConfig, eps_high: Optional[float] = None) -> TrustRegion:
    """The options' trust region with the actor's clip epsilons (`eps_high` replaces clip_ratio_high if given)."""
    eps_low, config_high = _eps(config)
    eps_high = config_high if eps_high is None else eps_high
    space = options.clip_space
    if eps_high < 0 or eps_low < 0 or (space == "ratio" and eps_low > 1):
        raise ValueError(
            f"actor clip_ratio_low={eps_low}, clip_ratio_high={eps_high} are invalid for clip_space={space!r}; "
            "allowed: clip_ratio_high >= 0 and 0 <= clip_ratio_low" + (" <= 1" if space == "ratio" else "")
        )
    dual = None
    if options.clip_level == "token" and space == "ratio":
        dual = float(config.get("clip_ratio_c", 3.0))
        if not dual > 1.0:
            raise ValueError(f"actor clip_ratio_c={dual} is invalid; allowed: a number > 1 (dual-clip PPO)")
    return TrustRegion.from_eps(options.clip_level, space, eps_low, eps_high, dual)


def _masked_row_mean(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return torch.where(rows, x, 0.0).sum() / rows.sum().clamp(min=1)


def _check_finite(terms, inputs: dict) -> None:
    """Raise `NonFiniteInputError` if a valid position holds a non-finite value (masked ones are ignored)."""
    if torch.isfinite(terms.log_ratio_sum + terms.value.sum()):  # grad_coef is value where it is not 0
        return
    if found := first_non_finite(inputs, terms.rows.valid):
        raise NonFiniteInputError(f"{found[0]} has {found[1]} non-finite value(s) at valid (response_mask) positions")
    raise NonFiniteInputError("the policy loss overflowed: log-ratios or advantages are too large to aggregate")


def power_mean_policy_loss(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str,
    config: Any,
    rollout_is_weights: Optional[torch.Tensor],
    aggregate,
    region: TrustRegion,
    extra_metrics: Optional[dict[str, float]] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Shared body of the registered losses: surrogate, `agg_loss`, metrics.

    Args:
        old_log_prob, log_prob, advantages, response_mask: `(batch_size, response_length)`.
        loss_agg_mode: verl's aggregation mode, passed to `agg_loss` with
            `config.global_batch_info` (so the result does not depend on micro-batching
            or data-parallel size).
        config: verl `ActorConfig`.
        rollout_is_weights: `(batch_size, response_length)` or None.
        aggregate: one of the aggregators above (maps log-ratios to log s and weights).
        region: trust region.
        extra_metrics: further metrics of the caller (e.g. the adaptive clip), merged in.
    """
    with torch.no_grad():
        # the maths in float32 at least; the loss matrix in the policy's dtype, as verl's losses
        terms = surrogate_terms(log_prob, old_log_prob, advantages, response_mask, aggregate, region, rollout_is_weights)
        _check_finite(
            terms,
            {"log_prob": log_prob, "old_log_prob": old_log_prob, "advantages": advantages,
             "rollout_is_weights": rollout_is_weights},
        )
        n = terms.rows.n
        rows = n > 0
        n_tokens = n.sum().clamp(min=1)
        per_row = {"log_ah_gap": terms.log_ah_gap, "ess_frac": terms.ess / n.clamp(min=1)}
        stats = {  # token fractions in float32, as verl's losses report them
            "actor/pg_clipfrac": (terms.clipped.sum() / n_tokens).float(),
            "actor/ppo_kl": -terms.log_ratio_sum / n_tokens,
            "actor/pg_clipfrac_lower": (terms.dual_clipped.sum() / n_tokens).float(),
            "actor/pm/seq_ratio_mean": _masked_row_mean(torch.exp(terms.log_seq_ratio), rows),
            "actor/pm/log_ah_gap": _masked_row_mean(per_row["log_ah_gap"], rows),
            "actor/pm/ess_frac": _masked_row_mean(per_row["ess_frac"], rows),
        }
        if aggregate.power is not None:
            power = aggregate.power.to(n.dtype)[rows] if rows.any() else torch.zeros(1, dtype=n.dtype)
            stats["actor/pm/power"] = power.mean()
            stats["actor/pm/power_min"] = power.min()
            stats["actor/pm/power_max"] = power.max()
        if getattr(aggregate, "target", None) is not None:
            stats["actor/pm/ess_target"] = _masked_row_mean(aggregate.target.to(n.dtype), rows)
        lag = current_sample_lag()  # set by verl's off-policy trainers (hmpo_verl.offpolicy)
        if lag is not None:
            stats.update(per_lag_sums(lag, rows, per_row, terms.clipped, n))  # clipped: (B,) per row

    loss_mat = surrogate_loss_matrix(log_prob, terms)
    pg_loss = agg_loss(
        loss_mat=loss_mat, loss_mask=response_mask, loss_agg_mode=loss_agg_mode, **config.global_batch_info
    )
    values = torch.stack([v.to(torch.float64) for v in stats.values()]).tolist()
    return pg_loss, {**dict(zip(stats.keys(), values)), **(extra_metrics or {})}


def _fixed_region(options: PowerMeanLossConfig, config: Any):
    """The trust region of the actor's clip settings, no extra metrics."""
    return _trust_region(config, options), None


def _registered(loss_mode: str, make_aggregator, make_region=_fixed_region):
    """A verl policy loss for `loss_mode`, whose aggregator and trust region come from its options."""

    def loss_fn(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config: Any = None,
        rollout_is_weights: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        options = loss_options(config.get("policy_loss", None), loss_mode)
        region, extra = make_region(options, config)
        return power_mean_policy_loss(
            old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config, rollout_is_weights,
            make_aggregator(options, advantages, response_mask), region, extra,
        )

    loss_fn.__name__ = loss_fn.__qualname__ = f"compute_policy_loss_{loss_mode}"
    return loss_fn


def _adaptive_aggregator(options: AdaptivePowerMeanLossConfig, advantages, response_mask):
    if options.adapt == "ess":
        return ESSMatchingAggregator(options, advantages, response_mask)
    if options.adapt == "reward":
        return PowerAggregator(reward_adaptive_power(REWARD_FEEDBACK.get().mean, options.reward_gamma))
    STEP_COUNTER.arm()
    p = scheduled_power(STEP_COUNTER.step, options.p_start, options.p_end, options.schedule_steps, options.schedule)
    return PowerAggregator(p)


compute_policy_loss_hmpo = _registered("hmpo", lambda options, *_: PowerAggregator(options.power))
compute_policy_loss_hmpo.__doc__ = """HMPO: clipped harmonic mean (p = -1) of the token ratios as the sequence ratio.

    The harmonic mean is dominated by the smallest ratios, so a response whose tokens
    lost probability gets the larger weight. Options (clip_level, clip_space) from
    `PowerMeanLossConfig` if set as the policy_loss `_target_`, else the defaults (token
    clip in ratio space). Args/Returns: as verl's `compute_policy_loss_vanilla`.
    """

compute_policy_loss_power_mean = _registered("power_mean", lambda options, *_: PowerAggregator(options.power))
compute_policy_loss_power_mean.__doc__ = """Power-mean policy optimization with any real p
    (PMPO arXiv 2601.22521, HolderPO arXiv 2605.12058).

    Equals verl's built-ins (README, "Equivalences", states each condition exactly):
    p = 0 with sequence clip is `gspo` (every aggregation, IS weights, per-token A);
    p = 1 with token clip in ratio space is `vanilla` (every aggregation, IS weights,
    per-token A; except tokens with A > 0 and delta < -20, which vanilla clamps);
    p = 0 with token clip in log space is `geo_mean` (GMPO) under seq-mean-token-mean over
    the whole batch in one call, one advantage and IS weight per response.
    Needs `PowerMeanLossConfig` (field `power`).
    """

compute_policy_loss_agm = _registered("agm", lambda options, *_: AGMAggregator(options.agm_iters))
compute_policy_loss_agm.__doc__ = """AGM: the sequence ratio is the arithmetic-harmonic mean of the token ratios.

    From (A, H) = (M_1, M_-1), a_{k+1} = (a_k + h_k)/2, h_{k+1} = 2 a_k h_k / (a_k + h_k);
    the limit is exactly sqrt(A * H) (not the geometric mean in general). `agm_iters`
    picks k steps instead of the limit.
    """


def _adaptive_region(options: AdaptivePowerMeanLossConfig, config: Any):
    """adapt="reward" with feedback_clip: APMPO's feedback-adaptive upper bound (and its metrics)."""
    if options.adapt != "reward":
        return _fixed_region(options, config)
    stats = REWARD_FEEDBACK.get()
    metrics = {"actor/pm/reward_mean": stats.mean}
    if not options.feedback_clip:
        return _trust_region(config, options), metrics
    eps_high = feedback_adaptive_clip(stats, options.feedback_clip_min, options.feedback_clip_max, options.feedback_delta)
    return _trust_region(config, options, eps_high), {**metrics, "actor/pm/clip_high": eps_high}


compute_policy_loss_adaptive_power_mean = _registered("adaptive_power_mean", _adaptive_aggregator, _adaptive_region)
compute_policy_loss_adaptive_power_mean.__doc__ = """Power mean with p adapted per trajectory
    (clip-aware ESS matching, PMPO extended to p < 0), scheduled over optimizer steps
    (HolderPO) or set by the batch's mean reward with a feedback-adaptive upper clip (APMPO;
    needs `hmpo_verl.reward_adaptive.REWARD_FEEDBACK` set by the host). Options:
    `AdaptivePowerMeanLossConfig`; documented defaults otherwise.

    The chosen p is a constant for the gradient: the loss and its gradient are those of
    `power_mean` at each trajectory's p, with no term through the solver (p is a setting
    chosen from the current ratios, not part of the objective; see `hmpo_verl.adaptive`).
    """

POLICY_LOSSES = {
    "hmpo": compute_policy_loss_hmpo,
    "power_mean": compute_policy_loss_power_mean,
    "agm": compute_policy_loss_agm,
    "adaptive_power_mean": compute_policy_loss_adaptive_power_mean,
}

register_deferred()  # where importing this module is what loaded verl's core_algos (hmpo_verl.registry)
