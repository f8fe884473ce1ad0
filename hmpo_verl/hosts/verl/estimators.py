"""verl advantage estimators `power_mean` and `agm`: a thin adapter over advantages.py.

Registered with verl's `register_adv_est` when `hmpo_verl` is imported, and called by
verl's `compute_advantage` as `fn(token_level_rewards, response_mask, config=<algorithm
section, a DictConfig>, index=<uid array>)`. Options come from `PowerMeanAlgoConfig`
fields when `algorithm._target_` points at it, else from its documented defaults.

Metrics: an estimator has no access to the step's metric dictionary, so it leaves its
figures in `PENDING_METRICS`, and `_bridge_metrics_into_verl` merges them into the dictionary
that verl's `compute_data_metrics` returns for the same step (in the trainer process):
    critic/pm/adv_conservation   largest |sum_i A_i| over the step's groups (0 up to rounding)
    critic/pm/risk_beta          the beta used
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, Optional

import numpy as np
import torch

from hmpo_verl.maths.advantages import agm_advantage, group_ids, group_std, group_sums, power_mean_advantage
from hmpo_verl.guards.verl_symbols import check_module
from hmpo_verl.hosts.verl.config import algo_options

GRPO_EPSILON = 1e-6  # verl's GRPO adds it to the group std

# name -> value, filled by the estimators and drained into verl's per-step metrics
PENDING_METRICS: dict[str, float] = {}


def _merge_pending_metrics(compute_data_metrics: Callable) -> Callable:
    @functools.wraps(compute_data_metrics)
    def merged(*args, **kwargs):
        metrics = compute_data_metrics(*args, **kwargs)
        metrics.update(PENDING_METRICS)
        PENDING_METRICS.clear()
        return metrics

    merged._hmpo_metrics = True
    return merged


def _bridge_metrics_into_verl() -> None:
    """Have verl's per-step `compute_data_metrics` (trainer process) carry PENDING_METRICS."""
    for module_name in ("verl.trainer.ppo.v1.trainer_base", "verl.trainer.ppo.ray_trainer"):
        module = sys.modules.get(module_name)
        if module is None:
            continue
        check_module(module_name, module)  # a verl that moved compute_data_metrics: named, not skipped
        if not getattr(module.compute_data_metrics, "_hmpo_metrics", False):
            module.compute_data_metrics = _merge_pending_metrics(module.compute_data_metrics)


def response_scores(token_level_rewards: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(B,) float64 outcome reward of each response: token rewards summed over the response."""
    return torch.where(response_mask.to(torch.bool), token_level_rewards.to(torch.float64), 0.0).sum(-1)


def _check_finite(scores: torch.Tensor, index: np.ndarray) -> None:
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        raise ValueError(
            f"reward of response {i} (group uid={index[i]!r}) is {scores[i].item()}; "
            f"{len(bad)} response(s) have non-finite rewards"
        )


def _group_advantage(
    advantage_fn: Callable, name: str, token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
    config: Any, index: Optional[np.ndarray],
) -> tuple[torch.Tensor, torch.Tensor]:
    options = algo_options(config, name)
    _bridge_metrics_into_verl()
    if index is None:
        raise ValueError(f"adv_estimator={name!r} groups responses by prompt and needs verl's 'uid' index")
    scores = response_scores(token_level_rewards, response_mask)
    _check_finite(scores, np.asarray(index, dtype=object))
    ids, uids = group_ids(index)
    ids = ids.to(scores.device)
    n_groups = len(uids)
    with torch.no_grad():
        adv = advantage_fn(scores, ids, float(options.risk_beta), n_groups)
        if options.norm_adv_by_std:
            adv = adv / (group_std(scores, ids, n_groups)[ids] + GRPO_EPSILON)
        residual = group_sums(adv, ids, n_groups).abs().max() if n_groups else torch.zeros(())
    # the largest over the step: V1 with parameter_sync_step > 1 computes advantages once per iteration and drains
    # PENDING_METRICS once per step (compute_data_metrics), which clears it for the next step
    worst = max(residual.item(), PENDING_METRICS.get("critic/pm/adv_conservation", 0.0))
    PENDING_METRICS.update({"critic/pm/adv_conservation": worst, "critic/pm/risk_beta": float(options.risk_beta)})
    out = adv.to(token_level_rewards.dtype).unsqueeze(-1) * response_mask.to(token_level_rewards.dtype)
    return out, out


def compute_power_mean_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    config: Any = None,
    index: Optional[np.ndarray] = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Free-energy (power-mean) group advantage A_i = expm1(beta (R_i - F_beta)) / beta.

    F_beta = (1/beta) log mean_j exp(beta R_j) over the responses of the same prompt
    (same `uid`); beta = `risk_beta` (0: R_i - mean R). RS-GRPO arXiv 2509.24261.

    Args:
        token_level_rewards: `(bs, response_length)`, summed over the response.
        response_mask: `(bs, response_length)`.
        config: verl's algorithm section (PowerMeanAlgoConfig fields, or defaults).
        index: `(bs,)` uid of each response's prompt.

    Returns:
        `(advantages, returns)`, both `(bs, response_length)`: the advantage broadcast over
        the response mask, as verl's outcome estimators.
    """
    return _group_advantage(power_mean_advantage, "power_mean", token_level_rewards, response_mask, config, index)


def compute_agm_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    config: Any = None,
    index: Optional[np.ndarray] = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """AGM group advantage: (A_i(beta) + A_i(-beta)) / 2, the advantage of
    G_beta = (F_beta + F_-beta) / 2 = log of the AGM limit sqrt(M_beta M_-beta) of e^R.

    Arguments and returns as `compute_power_mean_outcome_advantage`.
    """
    return _group_advantage(agm_advantage, "agm", token_level_rewards, response_mask, config, index)


ADV_ESTIMATORS = {
    "power_mean": compute_power_mean_outcome_advantage,
    "agm": compute_agm_outcome_advantage,
}
