"""Typed configuration of the power-mean losses, as verl dataclass configs.

verl builds `actor_rollout_ref.actor.policy_loss` with Hydra's `instantiate` from its
`_target_`, and rejects keys its `PolicyLossConfig` does not declare. Our options
therefore live on a subclass; point the `_target_` at it:

    actor_rollout_ref.actor.policy_loss._target_=hmpo_verl.PowerMeanLossConfig
    actor_rollout_ref.actor.policy_loss.loss_mode=power_mean
    +actor_rollout_ref.actor.policy_loss.power=-0.5

Validation happens in `__post_init__`, i.e. when verl's driver builds the actor config
in `validate_config`, before Ray starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from verl.workers.config import PolicyLossConfig

CLIP_LEVELS = ("token", "sequence")
CLIP_SPACES = ("ratio", "log")
HMPO_POWER = -1.0

# loss_mode -> the power it fixes (None: read `power` from the config; "agm": no power).
POWER_MEAN_LOSS_MODES = {"hmpo": HMPO_POWER, "power_mean": None, "agm": None}

_TARGET = "hmpo_verl.PowerMeanLossConfig"


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_power_mean_options(
    loss_mode: str, power: Any, clip_level: Any, clip_space: Any, agm_iters: Any
) -> None:
    """Raise ValueError naming the field, its value and the allowed values."""
    prefix = "actor_rollout_ref.actor.policy_loss"
    if not _is_real(power) or math.isnan(power):
        raise ValueError(f"{prefix}.power={power!r} is invalid; allowed: a real number, or inf / -inf (max / min)")
    if loss_mode == "hmpo" and power != HMPO_POWER:
        raise ValueError(
            f"{prefix}.power={power!r} conflicts with loss_mode='hmpo', which is the harmonic mean (power=-1); "
            f"use loss_mode='power_mean' for another power"
        )
    if clip_level not in CLIP_LEVELS:
        raise ValueError(f"{prefix}.clip_level={clip_level!r} is invalid; allowed: {', '.join(CLIP_LEVELS)}")
    if clip_space not in CLIP_SPACES:
        raise ValueError(f"{prefix}.clip_space={clip_space!r} is invalid; allowed: {', '.join(CLIP_SPACES)}")
    if agm_iters is not None and (isinstance(agm_iters, bool) or not isinstance(agm_iters, int) or agm_iters < 0):
        raise ValueError(
            f"{prefix}.agm_iters={agm_iters!r} is invalid; allowed: null (exact limit sqrt(A*H)) or an integer >= 0"
        )


@dataclass
class PowerMeanLossConfig(PolicyLossConfig):
    """Options of the `hmpo`, `power_mean` and `agm` policy losses.

    Args:
        loss_mode (str): "power_mean" (power from `power`), "hmpo" (power -1) or "agm".
        power (float): p of the power mean of token ratios; 1 arithmetic (GRPO-like),
            0 geometric (GSPO / GMPO), -1 harmonic (HMPO), +-inf max / min. Default -1.
            PMPO arXiv 2601.22521, HolderPO arXiv 2605.12058.
        clip_level (str): "token" (default): each token's ratio is clipped one-sidedly by
            sign(A) before aggregation (GMPO / PMPO; with power=1 exactly GRPO's per-token
            trust region, so clip_ratio keeps its meaning); "sequence": the aggregated
            ratio is clipped (GSPO arXiv 2507.18071, typically with clip_ratio 3e-4 / 4e-4).
        clip_space (str): "ratio" (default): bounds [1 - clip_ratio_low, 1 + clip_ratio_high],
            plus verl's dual clip clip_ratio_c at token level; "log": log-ratio bounds
            [-clip_ratio_low, +clip_ratio_high] (GMPO uses 0.4), as verl's geo_mean.
        agm_iters (int | None): for loss_mode "agm": None (default) for the exact limit
            sqrt(A * H), or k >= 0 arithmetic-harmonic steps from (A, H).
    """

    loss_mode: str = "power_mean"
    power: float = HMPO_POWER
    clip_level: str = "token"
    clip_space: str = "ratio"
    agm_iters: Optional[int] = None

    def __post_init__(self):
        validate_power_mean_options(self.loss_mode, self.power, self.clip_level, self.clip_space, self.agm_iters)


def resolve_power_mean_options(policy_loss: Any, loss_mode: str) -> dict:
    """The options a loss call uses, from `config.policy_loss` (dataclass or DictConfig).

    A plain verl `PolicyLossConfig` carries none of our fields: `hmpo` and `agm` then run
    on the documented defaults, while `power_mean` has no power to use and raises.
    """
    get = policy_loss.get if policy_loss is not None else (lambda key, default=None: default)
    power = get("power", None)
    if power is None:
        if loss_mode == "power_mean":
            raise ValueError(
                "loss_mode='power_mean' needs a power p, which verl's PolicyLossConfig has no field for: set "
                f"actor_rollout_ref.actor.policy_loss._target_={_TARGET} and "
                "+actor_rollout_ref.actor.policy_loss.power=<p> (or use loss_mode=hmpo for p=-1)"
            )
        power = HMPO_POWER
    fixed = POWER_MEAN_LOSS_MODES[loss_mode]
    options = dict(
        power=fixed if fixed is not None else power,
        clip_level=get("clip_level", "token"),
        clip_space=get("clip_space", "ratio"),
        agm_iters=get("agm_iters", None),
    )
    validate_power_mean_options(loss_mode, power, **{k: options[k] for k in ("clip_level", "clip_space", "agm_iters")})
    return options
