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

verl V1 with an agent loop that returns several outputs per session: a prompt's group is its
sessions' final outputs, as verl's GRPO there (`on_final_outputs`, installed on V1's trainer).
"""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from hmpo_verl.maths.advantages import agm_advantage, group_ids, group_std, group_sums, power_mean_advantage
from hmpo_verl.guards.verl_symbols import check_module
from hmpo_verl.hosts.verl.config import algo_options

GRPO_EPSILON = 1e-6  # verl's GRPO adds it to the group std

# name -> the group advantage (hmpo_verl.maths.advantages) each estimator computes
GROUP_ADVANTAGES: dict[str, Callable] = {"power_mean": power_mean_advantage, "agm": agm_advantage}


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


def response_scores(token_level_rewards: torch.Tensor) -> torch.Tensor:
    """(B,) float64 outcome reward of each response: its token rewards summed over every position, as verl's
    outcome estimators sum them (``compute_grpo_outcome_advantage``). verl puts the score on the sequence's last
    token, which the response mask leaves out when a tool's output ends the response (multi-turn agent loops): a
    sum over the mask would read such a response as 0."""
    return token_level_rewards.to(torch.float64).sum(-1)


def _check_finite(scores: torch.Tensor, index: np.ndarray, rows: Optional[Sequence[str]] = None) -> None:
    """Raise naming the first response with a non-finite reward: as `rows[i]` where given, else its position."""
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        raise ValueError(
            f"reward of response {i if rows is None else rows[i]} (group uid={index[i]!r}) is {scores[i].item()}; "
            f"{len(bad)} response(s) have non-finite rewards"
        )


def _response_advantages(
    name: str, token_level_rewards: torch.Tensor, config: Any, index: Optional[np.ndarray],
    rows: Optional[Sequence[str]] = None,
) -> torch.Tensor:
    """(B,) float64 group advantage of each response under estimator `name` (a key of GROUP_ADVANTAGES);
    records the step's critic/pm/* figures in PENDING_METRICS. `rows`: how an error names each response."""
    options = algo_options(config, name)
    _bridge_metrics_into_verl()
    if index is None:
        raise ValueError(f"adv_estimator={name!r} groups responses by prompt and needs verl's 'uid' index")
    scores = response_scores(token_level_rewards)
    _check_finite(scores, np.asarray(index, dtype=object), rows)
    ids, uids = group_ids(index)
    ids = ids.to(scores.device)
    n_groups = len(uids)
    with torch.no_grad():
        adv = GROUP_ADVANTAGES[name](scores, ids, float(options.risk_beta), n_groups)
        if options.norm_adv_by_std:
            adv = adv / (group_std(scores, ids, n_groups)[ids] + GRPO_EPSILON)
        residual = group_sums(adv, ids, n_groups).abs().max() if n_groups else torch.zeros(())
    # the largest over the step: V1 with parameter_sync_step > 1 computes advantages once per iteration and drains
    # PENDING_METRICS once per step (compute_data_metrics), which clears it for the next step
    worst = max(residual.item(), PENDING_METRICS.get("critic/pm/adv_conservation", 0.0))
    PENDING_METRICS.update({"critic/pm/adv_conservation": worst, "critic/pm/risk_beta": float(options.risk_beta)})
    return adv


def _over_response(adv: torch.Tensor, token_level_rewards: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """(B, T): each response's advantage `adv` (B,) on its response tokens, 0 elsewhere, in the rewards' dtype."""
    dtype = token_level_rewards.dtype
    return adv.to(dtype).unsqueeze(-1) * response_mask.to(dtype)


def _group_advantage(
    name: str, token_level_rewards: torch.Tensor, response_mask: torch.Tensor, config: Any, index: Optional[np.ndarray],
) -> tuple[torch.Tensor, torch.Tensor]:
    out = _over_response(_response_advantages(name, token_level_rewards, config, index),
                         token_level_rewards, response_mask)
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
        token_level_rewards: `(bs, response_length)`, summed over every position (as verl's outcome estimators).
        response_mask: `(bs, response_length)`.
        config: verl's algorithm section (PowerMeanAlgoConfig fields, or defaults).
        index: `(bs,)` uid of each response's prompt.

    Returns:
        `(advantages, returns)`, both `(bs, response_length)`: the advantage broadcast over
        the response mask, as verl's outcome estimators.
    """
    return _group_advantage("power_mean", token_level_rewards, response_mask, config, index)


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
    return _group_advantage("agm", token_level_rewards, response_mask, config, index)


def session_finals(batch_keys: Sequence[str]) -> tuple[list[int], list[int]]:
    """The rows of each agent-loop session's final output, as verl V1 picks them for GRPO.

    verl V1's agent loop (`verl.trainer.ppo.v1.agent_loop_tq`) keys each output of a session
    `{uid}_{session_id}_{index}`; a session yields one output or several (a multi-turn agent
    loop returning a list), and every output carries the final output's reward.

    Returns:
        `finals`: the row of each session's output with the highest index, sessions in order of
        first appearance; `session_of_row`: for each of the `len(batch_keys)` rows, the position
        in `finals` of its session's final output.
    """
    last: dict[str, tuple[int, int]] = {}  # session -> (its highest index, that row)
    sessions = []
    for row, key in enumerate(batch_keys):
        fields = str(key).rsplit("_", 2)
        if len(fields) != 3 or not fields[2].isdigit():
            raise ValueError(f"verl V1 batch key {key!r} (row {row}) is not '{{uid}}_{{session_id}}_{{index}}', the "
                             "form verl 0.9.1's agent loop writes; hmpo_verl cannot tell its session's final output")
        session, index = f"{fields[0]}_{fields[1]}", int(fields[2])
        sessions.append(session)
        if session not in last or last[session][0] < index:
            last[session] = (index, row)
    position = {session: k for k, session in enumerate(last)}
    return [row for _, row in last.values()], [position[session] for session in sessions]


def on_final_outputs(compute_multi: Callable) -> Callable:
    """verl V1's `compute_advantage_for_multi_trajectories`, with our estimators grouping as its GRPO.

    verl 0.9.1 gives GRPO's group only each session's final output and hands the session's other
    outputs that advantage; every other estimator goes to `compute_advantage` over all rows, so
    with an agent loop that returns several outputs per session, a session would count once per
    output in its prompt's group (its mean and F_beta weighted by output counts). Wrapped, our
    estimators (GROUP_ADVANTAGES) take GRPO's path: the group of a prompt is its sessions' final
    outputs, and each output of a session gets its final output's advantage over its response
    tokens. One output per session (every row final): verl's call, unchanged.

    Args and returns as verl's: `data` (DataProto with token_level_rewards, response_mask `(B, T)`
    and non_tensor uid `(B,)`), `batch_keys` (B keys as `session_finals` reads them), the estimator
    and verl's keyword arguments (`config`: the algorithm section); `data` with advantages and
    returns `(B, T)`.
    """
    @functools.wraps(compute_multi)
    def grouped_by_session(data, batch_keys, adv_estimator, **kwargs):
        finals, session_of_row = session_finals(batch_keys) if adv_estimator in GROUP_ADVANTAGES else ([], [])
        if len(finals) in (0, len(batch_keys)):  # verl's estimator, or one output per session
            return compute_multi(data, batch_keys=batch_keys, adv_estimator=adv_estimator, **kwargs)
        final = data.select_idxs(finals)
        adv = _response_advantages(str(adv_estimator), final.batch["token_level_rewards"], kwargs.get("config"),
                                   final.non_tensor_batch["uid"], rows=[f"{row} (key {batch_keys[row]!r})" for row in finals])
        out = _over_response(adv[torch.as_tensor(session_of_row, device=adv.device)],
                             data.batch["token_level_rewards"], data.batch["response_mask"])
        data.batch["advantages"] = out
        data.batch["returns"] = out
        return data

    grouped_by_session._hmpo_sessions = True
    return grouped_by_session


def group_by_session_in_v1(trainer_base) -> None:
    """Have verl V1's trainer (`verl.trainer.ppo.v1.trainer_base`, the name it calls) group our
    estimators by session (`on_final_outputs`); idempotent. Its VERL_SYMBOLS rows are checked by the import hook
    that calls it (`hmpo_verl.guards.hooks.run_after_import`)."""
    if not getattr(trainer_base.compute_advantage_for_multi_trajectories, "_hmpo_sessions", False):
        trainer_base.compute_advantage_for_multi_trajectories = on_final_outputs(
            trainer_base.compute_advantage_for_multi_trajectories)


ADV_ESTIMATORS = {
    "power_mean": compute_power_mean_outcome_advantage,
    "agm": compute_agm_outcome_advantage,
}
