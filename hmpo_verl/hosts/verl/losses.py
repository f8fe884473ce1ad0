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
under `actor/pm/`: `seq_ratio_mean` (mean sequence ratio s_i, log s_i clamped to +-20; at token
level of the token-clipped ratios), `log_ah_gap` (mean of log A - log H of the unclipped token
ratios, the spread of the mean inequality), `ess_frac` (mean Kish ESS / T of the aggregation
weights), for the power losses `power` and `power_std` (mean and std of each row's p);
`adaptive_power_mean` with adapt="ess" adds `ess_target` (mean target ESS / T), with
adapt="reward" `clip_high` (the feedback-adaptive upper clip epsilon) and `reward_mean`. These
means are over the call's valid rows; the loss also stages their sums (and, in verl's off-policy
trainers, per-lag sums) under `hmpo_verl.staleness.RAW_ROOT`, from which the trainer logs exact
means over the step (`hmpo_verl.staleness.staged_totals`; verl's `ppo_loss` drops the per-call means).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from hmpo_verl.maths.adaptive import scheduled_power
from hmpo_verl.maths.aggregators import AGMAggregator, ESSMatchingAggregator, PowerAggregator
from hmpo_verl.hosts.verl.config import AdaptivePowerMeanLossConfig, PowerMeanLossConfig, loss_options
from hmpo_verl.guards.finite import check_surrogate_finite
from hmpo_verl.maths.reward_adaptive import REWARD_FEEDBACK, feedback_adaptive_clip, reward_adaptive_power
from hmpo_verl.maths.staleness import SHARE, STEP_PREFIX, current_sample_lag, per_lag_sums, row_sums, staged_means
from hmpo_verl.guards.steps import STEP_COUNTER
from hmpo_verl.maths.options import check_clip_bounds, check_real
from hmpo_verl.maths.surrogate import TrustRegion, surrogate_loss_matrix, surrogate_terms


def agg_loss(*args, **kwargs):
    """verl's `core_algos.agg_loss`, imported at the call: importing this module must not load core_algos,
    whose import is what registers this module's losses (`hmpo_verl.hosts.verl.registry`)."""
    from verl.trainer.ppo.core_algos import agg_loss as verl_agg_loss

    return verl_agg_loss(*args, **kwargs)


ACTOR = "actor_rollout_ref.actor"
VERL_DUAL_CLIP = 3.0  # verl's ActorConfig.clip_ratio_c default (tests/test_config_on_cpu.py keeps them equal)


def _actor_number(config: Any, name: str, default: float) -> float:
    """The actor config's clip field `name` (`default` where absent or null); a non-number raises, named."""
    value = config.get(name, None)
    value = default if value is None else value
    check_real(ACTOR, name, value, allow_inf=True, what="a number")
    return float(value)


def _eps(config: Any) -> tuple[float, float]:
    """(eps_low, eps_high) from the actor config, falling back to clip_ratio as verl does."""
    clip_ratio = _actor_number(config, "clip_ratio", 0.2)
    return _actor_number(config, "clip_ratio_low", clip_ratio), _actor_number(config, "clip_ratio_high", clip_ratio)


def trust_region(config: Any, options: PowerMeanLossConfig, eps_high: Optional[float] = None) -> TrustRegion:
    """The options' trust region with the actor's clip epsilons (`eps_high` replaces clip_ratio_high if given);
    invalid bounds (NaN included) raise, named by their field (the driver checks them first: `check_options`)."""
    eps_low, config_high = _eps(config)
    eps_high = config_high if eps_high is None else eps_high
    dual = _actor_number(config, "clip_ratio_c", VERL_DUAL_CLIP)
    if options.clip_level != "token" or options.clip_space != "ratio":
        if dual != VERL_DUAL_CLIP:  # set by the user, yet no dual clip applies: the run would ignore it
            raise ValueError(
                f"{ACTOR}.clip_ratio_c={dual!r}: not read with clip_level={options.clip_level!r}, clip_space="
                f"{options.clip_space!r} (the dual clip caps token ratios in ratio space), so the run would ignore "
                f"it; allowed: verl's default {VERL_DUAL_CLIP}, or clip_level='token' with clip_space='ratio'")
        dual = None
    check_clip_bounds(eps_low, eps_high, options.clip_space, (f"{ACTOR}.clip_ratio_low", f"{ACTOR}.clip_ratio_high"),
                      dual, f"{ACTOR}.clip_ratio_c")
    return TrustRegion.from_eps(options.clip_level, options.clip_space, eps_low, eps_high, dual)


def _update_tokens(config: Any, n: torch.Tensor) -> float:
    """Valid tokens of the update this call belongs to (verl's ``batch_num_tokens``, over its micro-batches and
    ranks); without one, this call's own (it is the whole update). At least 1."""
    total = config.global_batch_info.get("batch_num_tokens")
    return max(float(n.sum() if total is None else total), 1.0)


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
        check_surrogate_finite(
            terms,
            {"log_prob": log_prob, "old_log_prob": old_log_prob, "advantages": advantages,
             "rollout_is_weights": rollout_is_weights},
            "response_mask",
        )
        n = terms.rows.n
        rows = n > 0
        n_tokens = n.sum().clamp(min=1)
        per_row = {"log_ah_gap": terms.log_ah_gap, "ess_frac": terms.ess / n.clamp(min=1)}
        step_rows = {"seq_ratio_mean": terms.seq_ratio_for_metrics, **per_row}
        if aggregate.power is not None:
            power = aggregate.power.double()
            step_rows.update(power=power, power_sq=power.square())
        if getattr(aggregate, "target", None) is not None:
            step_rows["ess_target"] = aggregate.target
        stats = {  # token fractions in float32, as verl's losses report them
            "actor/pg_clipfrac": (terms.clipped.sum() / n_tokens).float(),
            "actor/ppo_kl": -terms.log_ratio_sum / n_tokens,
            "actor/pg_clipfrac_lower": (terms.dual_clipped.sum() / n_tokens).float(),
            **row_sums(STEP_PREFIX, rows, step_rows),
            SHARE: n.sum().double() / _update_tokens(config, n),
        }
        lag = current_sample_lag()  # set by verl's off-policy trainers (hmpo_verl.offpolicy)
        if lag is not None:
            stats.update(per_lag_sums(lag, rows, per_row, terms.clipped, n))  # clipped: (B,) per row

    loss_mat = surrogate_loss_matrix(log_prob, terms)
    pg_loss = agg_loss(
        loss_mat=loss_mat, loss_mask=response_mask, loss_agg_mode=loss_agg_mode, **config.global_batch_info
    )
    metrics = dict(zip(stats.keys(), torch.stack([v.to(torch.float64) for v in stats.values()]).tolist()))
    # this call's own row means, for a caller that reads them; verl's ppo_loss drops them (they would be averaged
    # per micro-batch): the trainer logs them from the sums over the step (hmpo_verl.offpolicy)
    metrics.update(staged_means({k: v for k, v in metrics.items() if k.startswith(STEP_PREFIX)}))
    return pg_loss, {**metrics, **(extra_metrics or {})}


def _fixed_region(options: PowerMeanLossConfig, config: Any):
    """The trust region of the actor's clip settings, no extra metrics."""
    return trust_region(config, options), None


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
    per-token A with zeros; except where vanilla's clamp of delta to [-20, 20] binds);
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
        return trust_region(config, options), metrics
    eps_high = feedback_adaptive_clip(stats, options.feedback_clip_min, options.feedback_clip_max, options.feedback_delta)
    return trust_region(config, options, eps_high), {**metrics, "actor/pm/clip_high": eps_high}


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
