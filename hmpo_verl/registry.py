"""Registration of hmpo_verl with verl (idempotent).

`register()` is called when `hmpo_verl` is imported, which verl does itself in every
process that imports verl, through the `verl.plugins` entry point (`hmpo_verl`). It
  * registers the policy losses and advantage estimators by name, and
  * extends verl's `validate_config` (which verl's driver runs before Ray starts) to
    check our options too: verl builds the actor config there, but never the algorithm
    dataclass, and its plain `PolicyLossConfig` cannot tell that `loss_mode=power_mean`
    lacks a power. With the check, a bad value stops the run with a message naming the
    field instead of failing later inside a Ray worker.
"""

from __future__ import annotations

import functools


def _register_into(registry: dict, name: str, fn, kind: str) -> None:
    existing = registry.get(name)
    if existing is not None and existing is not fn:
        same = (existing.__module__, existing.__qualname__) == (fn.__module__, fn.__qualname__)
        if not same:  # a module reload re-creates our functions; anything else is a clash
            raise RuntimeError(
                f"{kind} {name!r} is already registered by {existing.__module__}.{existing.__qualname__}; "
                f"hmpo_verl will not overwrite it"
            )
    registry[name] = fn


def check_options(config) -> None:
    """Validate our options in a composed verl trainer config (DictConfig); raise ValueError."""
    from omegaconf import OmegaConf
    from verl.utils.config import omega_conf_to_dataclass

    from hmpo_verl.config import ADV_ESTIMATORS, LOSS_OPTION_CLASSES, algo_options, loss_options

    policy_loss = OmegaConf.select(config, "actor_rollout_ref.actor.policy_loss", default=None)
    loss_mode = policy_loss.get("loss_mode", None) if policy_loss is not None else None
    if loss_mode in LOSS_OPTION_CLASSES:
        loss_options(omega_conf_to_dataclass(policy_loss), loss_mode)
    algorithm = OmegaConf.select(config, "algorithm", default=None)
    if algorithm is not None and str(algorithm.get("_target_", "")).startswith("hmpo_verl"):
        omega_conf_to_dataclass(algorithm)  # runs PowerMeanAlgoConfig.__post_init__
    elif algorithm is not None and algorithm.get("adv_estimator", None) in ADV_ESTIMATORS:
        algo_options(algorithm, algorithm.adv_estimator)


def _extend_validate_config() -> None:
    import verl.utils.config as verl_config

    validate = verl_config.validate_config
    if getattr(validate, "_hmpo_checked", False):
        return

    @functools.wraps(validate)
    def validate_config(config, *args, **kwargs):
        result = validate(config, *args, **kwargs)
        check_options(config)
        return result

    validate_config._hmpo_checked = True
    verl_config.validate_config = validate_config


def register() -> None:
    """Register losses and estimators with verl; safe to call any number of times."""
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, POLICY_LOSS_REGISTRY

    from hmpo_verl.estimators import ADV_ESTIMATORS
    from hmpo_verl.losses import POLICY_LOSSES

    for name, fn in POLICY_LOSSES.items():
        _register_into(POLICY_LOSS_REGISTRY, name, fn, "policy loss")
    for name, fn in ADV_ESTIMATORS.items():
        _register_into(ADV_ESTIMATOR_REGISTRY, name, fn, "advantage estimator")
    _extend_validate_config()
