"""Validation of the power-mean options, shared by every host (pure Python, no verl import).

The verl configs (`hmpo_verl.config`) and the TRL config (`hmpo_verl.trl`) hold the same
options under the same field names; both validate them here, so a bad value raises the
same error in either host:

    ValueError: <prefix>.<field>=<value> is invalid; allowed: <allowed values>

`prefix` names where the user set the field (verl: "actor_rollout_ref.actor.policy_loss"
or "algorithm"; TRL: "PowerMeanGRPOConfig").
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Any, Optional

HMPO_POWER = -1.0
CLIP_LEVELS = ("token", "sequence")
CLIP_SPACES = ("ratio", "log")
ADAPT_RULES = ("ess", "schedule", "reward")
SIGN_RULES = ("advantage", "negative", "positive")
SCHEDULES = ("linear", "cosine")
# The default of every option, in one place: each host's config (verl's `PowerMeanLossConfig` /
# `AdaptivePowerMeanLossConfig`, TRL's `PowerMeanGRPOConfig`, `host_loss.LossOptions` for OpenRLHF and
# SkyRL) takes its defaults from here (tests/test_option_defaults.py checks every field against it).
# TRL's `adapt` is the one by-design exception: None there means "a fixed power" (TRL has no loss_mode).
DEFAULTS = MappingProxyType({
    "power": HMPO_POWER, "clip_level": "token", "clip_space": "ratio", "agm_iters": None,
    # adaptive p: adapt="ess" (PMPO's clip-aware ESS rule) ...
    "adapt": "ess", "p_min": -2.0, "p_max": 1.0, "sign_rule": "advantage", "ess_target_min": 0.99,
    # ... adapt="schedule" (HolderPO: 2 -> -2) ...
    "schedule": "linear", "p_start": 2.0, "p_end": -2.0, "schedule_steps": 1000,
    # ... adapt="reward" (APMPO)
    "reward_gamma": 0.8, "feedback_clip": True, "feedback_clip_min": 0.2, "feedback_clip_max": 0.4,
    "feedback_delta": 1e-6,
})
# most AGM steps: while A/H is large a step divides it by about 4, then the steps converge quadratically (from
# A/H = 1e300, 503 steps reach the limit in float64; the exact limit is agm_iters=null), and each step costs a
# pass over the batch (10,000 took 0.4 s a loss call)
AGM_ITERS_MAX = 1000
# largest |p_min|, p_max of the ESS rule: the solver's guarantee is tested up to here (tests/test_adaptive_exact_on_cpu.py);
# beyond, p^2 leaves float64's range at |p| ~ 1e154, and M_p is already the min / max to within |p|^-1 log T
ESS_BOUND_MAX = 1e4


# The options each rule reads: "power" (a fixed p: hmpo, power_mean; TRL's mean='power'), "agm", the adapt
# rules, and None (a host's own loss, e.g. verl's vanilla, which reads none). `adapt` selects the rule and is
# not listed: only an adaptive rule reads it (a fixed-p or AGM loss with adapt='schedule' would train at its own
# p). Any other option set away from its default would do nothing: `check_unread_options` refuses it.
_CLIP = ("clip_level", "clip_space")
READS = MappingProxyType({
    "power": (*_CLIP, "power"),
    "agm": (*_CLIP, "agm_iters"),
    "ess": (*_CLIP, "p_min", "p_max", "sign_rule", "ess_target_min"),
    "schedule": (*_CLIP, "schedule", "p_start", "p_end", "schedule_steps"),
    "reward": (*_CLIP, "reward_gamma", "feedback_clip", "feedback_clip_min", "feedback_clip_max", "feedback_delta"),
    None: (),
})
# verl's loss_mode names (shared by the OpenRLHF and SkyRL adapters) -> the rule of READS
LOSS_MODE_RULES = MappingProxyType({"hmpo": "power", "power_mean": "power", "agm": "agm"})


def power_needed(chosen: str, set_power: str, hmpo: str) -> ValueError:
    """The error of a power_mean chosen (`chosen`) without a power: every host has no default p for it.
    `set_power` / `hmpo`: how the user sets p, and chooses hmpo (p = -1) instead, in the host's words."""
    return ValueError(f"{chosen} needs a power p: set {set_power} (or use {hmpo} for p=-1)")


def loss_mode_rule(loss_mode: str, adapt: Optional[str]) -> Optional[str]:
    """The READS rule of a verl-style `loss_mode` (`adapt` for adaptive_power_mean; None: not one of ours)."""
    return adapt if loss_mode == "adaptive_power_mean" else LOSS_MODE_RULES.get(loss_mode)


def check_unread_options(prefix: str, options: Any, rule: Optional[str], chosen: str) -> None:
    """Refuse options of `options` (an object with any of DEFAULTS' fields; absent ones are the default) that
    are set away from their default but not read by `rule`: the run would silently ignore them.

    `chosen`: the setting that picked the rule, for the message (e.g. "loss_mode='agm'").
    """
    unread = [(name, getattr(options, name)) for name in DEFAULTS
              if name not in READS[rule] and hasattr(options, name) and getattr(options, name) != DEFAULTS[name]
              and (name != "adapt" or rule not in ADAPT_RULES and getattr(options, name) is not None)]
    if unread:
        named = ", ".join(f"{prefix}.{name}={value!r}" for name, value in unread)
        defaults = ", ".join(f"{name}={DEFAULTS[name]!r}" for name, _ in unread)
        raise ValueError(f"{named}: not read with {chosen}, so the run would ignore it; allowed: the default "
                         f"({defaults}), or a loss mode / adapt rule that reads it" +
                         (" (adapt is read by loss_mode='adaptive_power_mean')" if "adapt" in dict(unread) else ""))


def _is_real(value: Any) -> bool:
    """An int or float (not a bool, not a string) within float64's range (an int past it is no float)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        float(value)
    except OverflowError:
        return False
    return True


def check_choice(prefix: str, name: str, value: Any, allowed: tuple) -> None:
    """Raise unless `value` is one of `allowed`."""
    if value not in allowed:
        raise ValueError(f"{prefix}.{name}={value!r} is invalid; allowed: {', '.join(map(str, allowed))}")


def check_real(prefix: str, name: str, value: Any, allow_inf: bool = False, low=None, high=None, what="") -> None:
    """Raise unless `value` is a real number (not NaN; finite unless `allow_inf`) in [low, high]."""
    ok = _is_real(value) and not math.isnan(value) and (allow_inf or math.isfinite(value))
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        allowed = what or ("a real number" + (", or inf / -inf" if allow_inf else ""))
        raise ValueError(f"{prefix}.{name}={value!r} is invalid; allowed: {allowed}")


def check_int(prefix: str, name: str, value: Any, low: int, optional: bool = False, what: str = "",
              high: Optional[int] = None) -> None:
    """Raise unless `value` is an int in [low, high] (or None when `optional`)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low or high is not None and value > high:
        raise ValueError(f"{prefix}.{name}={value!r} is invalid; allowed: {what or f'an integer >= {low}'}")


def check_mean_options(prefix: str, power: Any, clip_level: Any, clip_space: Any, agm_iters: Any) -> None:
    """Options of every power-mean / AGM loss: power (any real, +-inf), clip level and space, AGM steps."""
    check_real(prefix, "power", power, allow_inf=True)
    check_choice(prefix, "clip_level", clip_level, CLIP_LEVELS)
    check_choice(prefix, "clip_space", clip_space, CLIP_SPACES)
    check_int(prefix, "agm_iters", agm_iters, 0, optional=True, high=AGM_ITERS_MAX,
              what=f"null (exact limit sqrt(A*H)) or an integer in [0, {AGM_ITERS_MAX}]")


def check_adaptive_options(
    prefix: str,
    adapt: Any,
    p_min: Any,
    p_max: Any,
    sign_rule: Any,
    ess_target_min: Any,
    schedule: Any,
    p_start: Any,
    p_end: Any,
    schedule_steps: Any,
    clip_level: Any,
    schedule_allowed: bool = False,
) -> None:
    """Options of adaptive p (ESS matching per trajectory, or a schedule over optimizer steps).
    `schedule_allowed`: the host runs adapt='schedule' (verl, TRL; not OpenRLHF, SkyRL), which the
    message of adapt='ess' at sequence level then suggests."""
    check_choice(prefix, "adapt", adapt, ADAPT_RULES)
    check_real(prefix, "p_min", p_min, low=-ESS_BOUND_MAX, high=0.0, what=f"a number in [{-ESS_BOUND_MAX:g}, 0]")
    check_real(prefix, "p_max", p_max, low=0.0, high=ESS_BOUND_MAX, what=f"a number in [0, {ESS_BOUND_MAX:g}]")
    check_choice(prefix, "sign_rule", sign_rule, SIGN_RULES)
    check_real(prefix, "ess_target_min", ess_target_min, what="a number in (0, 1]")
    if not 0.0 < ess_target_min <= 1.0:
        raise ValueError(f"{prefix}.ess_target_min={ess_target_min!r} is invalid; allowed: (0, 1]")
    check_choice(prefix, "schedule", schedule, SCHEDULES)
    check_real(prefix, "p_start", p_start)
    check_real(prefix, "p_end", p_end)
    if not math.isfinite(float(p_end) - float(p_start)):  # the schedule's p_start + (p_end - p_start) * t: NaN
        raise ValueError(f"{prefix}.p_start={p_start!r}, {prefix}.p_end={p_end!r} are invalid: p_end - p_start is "
                         "beyond float64's range, so the scheduled p is NaN; allowed: a finite difference")
    check_int(prefix, "schedule_steps", schedule_steps, 1)
    if adapt == "ess" and clip_level != "token":
        raise ValueError(
            f"{prefix}.clip_level={clip_level!r} is invalid with adapt='ess', which adapts p to each "
            "trajectory's token clip fraction; allowed: token" + (" (or use adapt='schedule')" if schedule_allowed else "")
        )


def check_reward_adapt_options(
    prefix: str, reward_gamma: Any, feedback_clip: Any, feedback_clip_min: Any, feedback_clip_max: Any,
    feedback_delta: Any, clip_level: Any, clip_space: Any,
) -> None:
    """Options of adapt='reward' (APMPO arXiv 2605.04066: p = exp(-gamma mu_R), feedback-adaptive upper clip)."""
    check_real(prefix, "reward_gamma", reward_gamma, low=0.0, what="a finite number >= 0")
    if not isinstance(feedback_clip, bool):
        raise ValueError(f"{prefix}.feedback_clip={feedback_clip!r} is invalid; allowed: true, false")
    check_real(prefix, "feedback_clip_min", feedback_clip_min, low=0.0, what="a finite number >= 0")
    check_real(prefix, "feedback_clip_max", feedback_clip_max, low=feedback_clip_min,
               what=f"a finite number >= feedback_clip_min ({feedback_clip_min!r})")
    check_real(prefix, "feedback_delta", feedback_delta, what="a finite number > 0")
    if not feedback_delta > 0:
        raise ValueError(f"{prefix}.feedback_delta={feedback_delta!r} is invalid; allowed: a finite number > 0")
    if (clip_level, clip_space) != ("token", "ratio"):
        raise ValueError(
            f"{prefix}.clip_level={clip_level!r}, clip_space={clip_space!r} are invalid with adapt='reward', whose "
            "clip is PPO's token ratio clip [1 - eps_low, 1 + eps_high]; allowed: clip_level='token', clip_space='ratio'")


def check_advantage_options(prefix: str, risk_beta: Any, norm_adv_by_std: Any) -> None:
    """Options of the power-mean / AGM group advantages."""
    check_real(prefix, "risk_beta", risk_beta, what="a finite real number")
    if not isinstance(norm_adv_by_std, bool):
        raise ValueError(f"{prefix}.norm_adv_by_std={norm_adv_by_std!r} is invalid; allowed: true, false")


def check_clip_bounds(
    eps_low: float, eps_high: float, clip_space: str, names: tuple[str, str], dual: Optional[float] = None,
    dual_name: str = "",
) -> None:
    """PPO-style clip epsilons (and an optional dual-clip cap) valid for `clip_space`.

    `names` / `dual_name`: the host's field names, for the message.
    """
    if not (_is_real(eps_low) and _is_real(eps_high) and eps_high >= 0 and eps_low >= 0
            and (clip_space != "ratio" or eps_low <= 1)):  # (a string or a bool is no epsilon)
        raise ValueError(
            f"{names[0]}={eps_low!r}, {names[1]}={eps_high!r} are invalid for clip_space={clip_space!r}; allowed: "
            f"numbers, {names[1]} >= 0 and 0 <= {names[0]}" + (" <= 1" if clip_space == "ratio" else "")
        )
    if dual is not None and not (_is_real(dual) and dual > 1.0):
        raise ValueError(f"{dual_name}={dual!r} is invalid; allowed: a number > 1 (dual-clip PPO)")
