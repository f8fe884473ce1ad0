"""Our checks of a composed verl trainer config, run in verl's driver before Ray starts.

`check_options` validates our loss and estimator options (through the config classes of
`hmpo_verl.hosts.verl.config`) and refuses settings verl would silently drop for our losses
(`check_bypass_mode`); `check_trl_beside_verl` refuses a TRL that verl's workers cannot start
beside. `hmpo_verl.hosts.verl.registry` runs them in verl's `validate_config`, and
`hmpo_verl.guards.offpolicy` in `run_ppo`, where fully-async skips `validate_config`.
"""

from __future__ import annotations

from typing import Optional


def check_options(config) -> None:
    """Validate our options in a composed verl trainer config (DictConfig); raise ValueError."""
    from omegaconf import OmegaConf
    from verl.utils.config import omega_conf_to_dataclass

    from hmpo_verl.hosts.verl.config import ADV_ESTIMATORS, LOSS_OPTION_CLASSES, algo_options, loss_options
    from hmpo_verl.hosts.verl.losses import trust_region

    policy_loss = OmegaConf.select(config, "actor_rollout_ref.actor.policy_loss", default=None)
    loss_mode = policy_loss.get("loss_mode", None) if policy_loss is not None else None
    if policy_loss is not None and str(policy_loss.get("_target_", "")).startswith("hmpo_verl"):
        omega_conf_to_dataclass(policy_loss)  # our class: bad or unread options (any loss_mode) raise here
    if loss_mode in LOSS_OPTION_CLASSES:
        options = loss_options(omega_conf_to_dataclass(policy_loss), loss_mode)
        trust_region(OmegaConf.select(config, "actor_rollout_ref.actor"), options)  # the actor's clip bounds
        if getattr(options, "adapt", None) == "reward":
            raise ValueError(
                "actor_rollout_ref.actor.policy_loss.adapt='reward' is not supported on verl's trainer yet: verl "
                "0.9.1's ppo_loss passes a policy loss no rewards, and the batch's reward statistics it needs are not "
                "sent to the actor workers; allowed here: ess, schedule (adapt='reward' runs in PowerMeanGRPOTrainer "
                "and in hmpo_verl.lab's lean loop)")
        check_bypass_mode(OmegaConf.select(config, "algorithm.rollout_correction", default=None), loss_mode)
    algorithm = OmegaConf.select(config, "algorithm", default=None)
    if algorithm is not None and str(algorithm.get("_target_", "")).startswith("hmpo_verl"):
        omega_conf_to_dataclass(algorithm)  # runs PowerMeanAlgoConfig.__post_init__
    elif algorithm is not None and algorithm.get("adv_estimator", None) in ADV_ESTIMATORS:
        algo_options(algorithm, algorithm.adv_estimator)


# verl 0.9.x imports trl.experimental.ppo whenever TRL is importable (apply_monkey_patch, in every actor
# worker); TRL 1.13 removed that module. The `verl-trl` extra pins TRL below it.
TRL_BESIDE_VERL = "<1.13"


def trl_conflict(verl_version: str, trl_version: Optional[str]) -> Optional[str]:
    """The reason this verl cannot run beside this TRL (None if it can, or if TRL is absent)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    if trl_version is None or Version(verl_version) >= Version("0.10") or trl_version in SpecifierSet(TRL_BESIDE_VERL):
        return None
    return (
        f"verl {verl_version} cannot start its actor workers beside TRL {trl_version}: it imports "
        f"trl.experimental.ppo whenever TRL is installed, and TRL 1.13 removed it. Use TRL {TRL_BESIDE_VERL} "
        "beside verl (pip install 'hmpo-verl[verl-trl]' or 'trl>=1.12,<1.13'), or keep TRL in another environment"
    )


def check_trl_beside_verl() -> None:
    """Raise RuntimeError if the installed TRL breaks the installed verl (see `trl_conflict`)."""
    from importlib import metadata

    try:
        trl_version = metadata.version("trl")
    except metadata.PackageNotFoundError:
        return
    message = trl_conflict(metadata.version("verl"), trl_version)
    if message:
        raise RuntimeError(message)


def check_bypass_mode(rollout_correction, loss_mode: str) -> None:
    """Refuse rollout IS / rejection sampling in bypass mode: with our loss they would be dropped.

    In bypass mode (``old_log_probs = rollout_log_probs``) verl computes rollout IS weights
    and rejection masks only inside its own ``loss_mode=bypass_mode`` loss; the trainer
    passes none to any other loss (see ``hmpo_verl.offpolicy``).
    """
    if rollout_correction is None or not rollout_correction.get("bypass_mode", False):
        return
    dropped = [f"{key}={rollout_correction.get(key)}" for key in ("rollout_is", "rollout_rs")
               if rollout_correction.get(key, None)]
    if dropped:
        raise ValueError(
            f"algorithm.rollout_correction.{' and '.join(dropped)} with algorithm.rollout_correction.bypass_mode=true "
            f"and actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode}: in bypass mode verl applies rollout IS "
            f"and rejection sampling only inside its own loss_mode=bypass_mode, so {loss_mode} would train without "
            "them. Set algorithm.rollout_correction.bypass_mode=false (verl then computes them and passes the "
            "weights to the loss) or drop rollout_is/rollout_rs."
        )


def driver_checks(config) -> None:
    """Everything the driver checks before Ray starts (idempotent): our options, TRL beside verl, the
    checkpoint directory, the checkpoint a resume will use -- a resume_mode / resume_from_path verl reads alike
    everywhere, complete, saved by the same trainer mode and with the same settings (`hmpo_verl.guards.run_settings`),
    every refusal before the guard rewrites a tracker (`hmpo_verl.guards.checkpoints.guard_resume`) -- and, for
    fully-async, the prompts in flight at that checkpoint that the resume will not train
    (`hmpo_verl.guards.inflight`). Run by verl's `validate_config` and by `run_ppo`, the driver function of
    every entry point (`main_ppo`, one-step-off, fully-async)."""
    from hmpo_verl.guards.checkpoints import check_checkpoint_directory, guard_resume, resume_step_dir
    from hmpo_verl.guards.inflight import warn_fully_async_resume
    from hmpo_verl.guards.run_settings import stamp_run_settings

    check_options(config)
    check_trl_beside_verl()
    check_checkpoint_directory(config)
    guard_resume(config)  # runs run_settings.check_resume_settings on the checkpoint it lets verl resume
    warn_fully_async_resume(config, resume_step_dir(config))  # what verl's fully-async resume does not train
    stamp_run_settings(config)  # what each checkpoint records, before the trainer edits its config
