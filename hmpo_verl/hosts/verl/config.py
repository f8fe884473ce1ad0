"""Typed configuration of the power-mean losses and advantages, as verl dataclass configs.

verl builds `actor_rollout_ref.actor.policy_loss` and `algorithm` with Hydra's
`instantiate` from their `_target_`, and rejects keys its own classes do not declare.
Our options therefore live on subclasses; point the `_target_` at them:

    actor_rollout_ref.actor.policy_loss._target_=hmpo_verl.PowerMeanLossConfig
    actor_rollout_ref.actor.policy_loss.loss_mode=power_mean
    +actor_rollout_ref.actor.policy_loss.power=-0.5

    algorithm._target_=hmpo_verl.PowerMeanAlgoConfig
    algorithm.adv_estimator=power_mean
    +algorithm.risk_beta=2.0

Validation happens in `__post_init__`: for the actor when verl's driver builds the actor
config in `validate_config`, for the algorithm section in the same place (verl itself never
builds that dataclass; `hmpo_verl.hosts.verl.checks` adds the check), both before Ray starts. The
loss and estimator functions resolve their options through the same classes, so a
DictConfig or verl's plain classes get the same defaults and the same errors.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

try:
    from verl.trainer.config import AlgoConfig
    from verl.workers.config import PolicyLossConfig
except ImportError as err:  # say which install brings it
    raise ImportError(
        f"hmpo_verl's verl configs need verl 0.9 ({err}): pip install 'hmpo-verl[verl]' (the maths in "
        "hmpo_verl.means, surrogate, adaptive, ... needs only torch)"
    ) from err

from hmpo_verl.maths.options import (
    DEFAULTS,
    HMPO_POWER,
    check_adaptive_options,
    check_advantage_options,
    check_mean_options,
    check_reward_adapt_options,
    check_unread_options,
    loss_mode_rule,
    power_needed,
)

LOSS_PREFIX = "actor_rollout_ref.actor.policy_loss"
ALGO_PREFIX = "algorithm"
ALGO_DEFAULTS = {"risk_beta": 1.0, "norm_adv_by_std": False}
ADV_ESTIMATORS = ("power_mean", "agm")


@dataclass
class PowerMeanLossConfig(PolicyLossConfig):
    """Options of the `hmpo`, `power_mean` and `agm` policy losses.

    Args:
        loss_mode (str): "power_mean" (power from `power`), "hmpo" (power -1) or "agm".
        power (float): p of the power mean of token ratios; 1 arithmetic (GRPO-like),
            0 geometric (GSPO / GMPO), -1 harmonic (HMPO), +-inf max / min. "power_mean"
            needs it (no default p); the other loss modes do not read it (hmpo: -1).
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
    power: Optional[float] = None  # unset: power_mean refuses to run (no default p), the others take DEFAULTS' -1
    clip_level: str = DEFAULTS["clip_level"]
    clip_space: str = DEFAULTS["clip_space"]
    agm_iters: Optional[int] = DEFAULTS["agm_iters"]

    def __post_init__(self):
        self._validate()
        adapt = getattr(self, "adapt", DEFAULTS["adapt"])  # this class has no adapt: the default applies
        chosen = f"loss_mode={self.loss_mode!r}" + (f", adapt={adapt!r}" if self.loss_mode == "adaptive_power_mean" else "")
        check_unread_options(LOSS_PREFIX, self, loss_mode_rule(self.loss_mode, adapt), chosen)

    def _validate(self):
        """Each option's value (the subclass adds its own), before `__post_init__` refuses unread ones."""
        unset = self.power is None
        check_mean_options(LOSS_PREFIX, DEFAULTS["power"] if unset else self.power, self.clip_level, self.clip_space,
                           self.agm_iters)
        if unset and self.loss_mode == "power_mean":
            raise power_needed("loss_mode='power_mean'", f"+{LOSS_PREFIX}.power=<p>", "loss_mode=hmpo")
        if unset:
            object.__setattr__(self, "power", DEFAULTS["power"])  # verl's configs are frozen once set
        if self.loss_mode == "hmpo" and self.power != HMPO_POWER:
            raise ValueError(
                f"{LOSS_PREFIX}.power={self.power!r} conflicts with loss_mode='hmpo', which is the harmonic mean "
                f"(power=-1); use loss_mode='power_mean' for another power"
            )


@dataclass
class AdaptivePowerMeanLossConfig(PowerMeanLossConfig):
    """Options of the `adaptive_power_mean` loss: p chosen per trajectory or scheduled.

    Args:
        adapt (str): "ess" (default): per trajectory, p solves ESS_p / T = target(clip
            fraction), PMPO's clip-aware ESS rule (arXiv 2601.22521) extended to
            p in [p_min, p_max]; "schedule": one p for all, moving from p_start to p_end
            over schedule_steps optimizer steps (HolderPO arXiv 2605.12058: 2 -> -2);
            "reward": one p for the batch, p = exp(-reward_gamma * mean reward), and with
            feedback_clip the upper clip bound widened by the rewards' stability (APMPO
            arXiv 2605.04066; `hmpo_verl.reward_adaptive`; the host must supply the batch's
            reward statistics, see there).
        p_min (float): lowest p of the "ess" rule (in [-1e4, 0]; the harmonic side). Default -2.
        p_max (float): highest p of the "ess" rule (in [0, 1e4]; PMPO uses 1). Default 1.
        sign_rule (str): side of 0 the "ess" rule searches: "advantage" (default):
            sign(p) = -sign(A_i), so the weights fall on the tokens that moved against
            the update's direction (ratio-contracting); "negative": [p_min, 0];
            "positive": [0, p_max] (PMPO).
        ess_target_min (float): target ESS / T of a trajectory with no clipped token, in
            (0, 1]; the target rises linearly to 1 (p = 0, geometric) as its clip
            fraction rises to 1. Default 0.99.
        schedule (str): "linear" (default) or "cosine", for adapt="schedule".
        p_start, p_end (float): scheduled p at optimizer step 0 and >= schedule_steps.
        schedule_steps (int): optimizer steps of the schedule (>= 1). Default 1000.
        reward_gamma (float): adapt="reward": gamma of p = exp(-gamma * mean reward) (>= 0). Default 0.8.
        feedback_clip (bool): adapt="reward": replace clip_ratio_high by APMPO's feedback-adaptive
            bound feedback_clip_min + (feedback_clip_max - feedback_clip_min) * tanh(mean / (std + feedback_delta)).
            Default True.
        feedback_clip_min, feedback_clip_max (float): its range. Default 0.2, 0.4.
        feedback_delta (float): its delta (> 0). Default 1e-6.
    """

    loss_mode: str = "adaptive_power_mean"
    adapt: str = DEFAULTS["adapt"]
    p_min: float = DEFAULTS["p_min"]
    p_max: float = DEFAULTS["p_max"]
    sign_rule: str = DEFAULTS["sign_rule"]
    ess_target_min: float = DEFAULTS["ess_target_min"]
    schedule: str = DEFAULTS["schedule"]
    p_start: float = DEFAULTS["p_start"]
    p_end: float = DEFAULTS["p_end"]
    schedule_steps: int = DEFAULTS["schedule_steps"]
    reward_gamma: float = DEFAULTS["reward_gamma"]
    feedback_clip: bool = DEFAULTS["feedback_clip"]
    feedback_clip_min: float = DEFAULTS["feedback_clip_min"]
    feedback_clip_max: float = DEFAULTS["feedback_clip_max"]
    feedback_delta: float = DEFAULTS["feedback_delta"]

    def _validate(self):
        super()._validate()
        check_adaptive_options(
            LOSS_PREFIX, self.adapt, self.p_min, self.p_max, self.sign_rule, self.ess_target_min, self.schedule,
            self.p_start, self.p_end, self.schedule_steps, self.clip_level, schedule_allowed=True,
        )
        if self.adapt == "reward":
            check_reward_adapt_options(
                LOSS_PREFIX, self.reward_gamma, self.feedback_clip, self.feedback_clip_min, self.feedback_clip_max,
                self.feedback_delta, self.clip_level, self.clip_space,
            )


@dataclass
class PowerMeanAlgoConfig(AlgoConfig):
    """Options of the `power_mean` and `agm` advantage estimators (set as `algorithm._target_`).

    Args:
        adv_estimator (str): "power_mean" (free-energy advantage) or "agm".
        risk_beta (float): beta of F_beta = (1/beta) log mean exp(beta R); < 0 risk-averse,
            > 0 risk-seeking (RS-GRPO arXiv 2509.24261 uses 2), 0 = R - mean(R). For
            "agm" the objective (F_beta + F_-beta) / 2 is even in beta. Default 1.
        norm_adv_by_std (bool): divide each group's advantages by its reward std + 1e-6,
            as GRPO's norm_adv_by_std_in_grpo. Default False (the beta -> 0 limit is then
            Dr.GRPO's / GRPO-without-std advantage).
    """

    adv_estimator: str = "power_mean"
    risk_beta: float = ALGO_DEFAULTS["risk_beta"]
    norm_adv_by_std: bool = ALGO_DEFAULTS["norm_adv_by_std"]

    def __post_init__(self):
        check_advantage_options(ALGO_PREFIX, self.risk_beta, self.norm_adv_by_std)
        unread = {name: value for name, value in (("risk_beta", self.risk_beta), ("norm_adv_by_std", self.norm_adv_by_std))
                  if value != ALGO_DEFAULTS[name]}
        if self.adv_estimator not in ADV_ESTIMATORS and unread:
            raise ValueError(
                ", ".join(f"{ALGO_PREFIX}.{name}={value!r}" for name, value in unread.items())
                + f": not read with adv_estimator={self.adv_estimator!r} (verl's own estimator), so the run would "
                f"ignore it; allowed: the default, or adv_estimator in {ADV_ESTIMATORS}")


# loss_mode -> options class; hmpo fixes the power.
LOSS_OPTION_CLASSES = {
    "hmpo": PowerMeanLossConfig,
    "power_mean": PowerMeanLossConfig,
    "agm": PowerMeanLossConfig,
    "adaptive_power_mean": AdaptivePowerMeanLossConfig,
}

_MISSING = object()


def _own_fields(cls, base) -> list[str]:
    inherited = {f.name for f in fields(base)}
    return [f.name for f in fields(cls) if f.name not in inherited]


def _present(section: Any, names: list[str]) -> dict:
    if section is None:
        return {}
    values = {name: section.get(name, _MISSING) for name in names}
    return {k: v for k, v in values.items() if v is not _MISSING}


def loss_options(policy_loss: Any, loss_mode: str) -> PowerMeanLossConfig:
    """Validated options of one loss mode from `config.policy_loss` (any verl form).

    A plain verl `PolicyLossConfig` carries none of our fields: `hmpo`, `agm` and
    `adaptive_power_mean` then run on the documented defaults, while `power_mean` has no
    power to use and raises, naming the `_target_` and field to set.
    """
    cls = LOSS_OPTION_CLASSES[loss_mode]
    if type(policy_loss) is cls and policy_loss.loss_mode == loss_mode:
        return policy_loss
    values = _present(policy_loss, _own_fields(cls, PolicyLossConfig))
    if loss_mode == "power_mean" and "power" not in values:
        raise power_needed("loss_mode='power_mean'", f"{LOSS_PREFIX}._target_=hmpo_verl.PowerMeanLossConfig and "
                           f"+{LOSS_PREFIX}.power=<p> (verl's PolicyLossConfig has no field for p)", "loss_mode=hmpo")
    return cls(loss_mode=loss_mode, **values)


def algo_options(algorithm: Any, adv_estimator: str) -> PowerMeanAlgoConfig:
    """Validated estimator options from verl's `algorithm` section (DictConfig or dataclass)."""
    if isinstance(algorithm, PowerMeanAlgoConfig):
        return algorithm
    return PowerMeanAlgoConfig(adv_estimator=adv_estimator, **_present(algorithm, _own_fields(PowerMeanAlgoConfig, AlgoConfig)))
