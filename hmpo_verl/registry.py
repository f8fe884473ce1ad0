"""Registration of hmpo_verl's losses with verl (idempotent).

`register()` is called when `hmpo_verl` is imported, which verl does itself in every
process that imports verl, through the `verl.plugins` entry point (`hmpo_verl`).
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


def _check_plain_policy_loss_config() -> None:
    """Make verl's plain `PolicyLossConfig` reject our loss modes it cannot configure.

    `loss_mode=power_mean` needs a power, which only `PowerMeanLossConfig` has. verl builds
    the actor config in its driver's `validate_config` (before Ray starts), so checking at
    construction reports the missing `_target_` there instead of in a Ray worker.
    """
    from verl.workers.config import PolicyLossConfig

    from hmpo_verl.config import POWER_MEAN_LOSS_MODES, resolve_power_mean_options

    init = PolicyLossConfig.__init__
    if getattr(init, "_hmpo_checked", False):
        return

    @functools.wraps(init)
    def checked_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if type(self) is PolicyLossConfig and self.loss_mode in POWER_MEAN_LOSS_MODES:
            resolve_power_mean_options(self, self.loss_mode)

    checked_init._hmpo_checked = True
    PolicyLossConfig.__init__ = checked_init


def register() -> None:
    """Register the policy losses with verl; safe to call any number of times."""
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY

    from hmpo_verl.losses import POLICY_LOSSES

    for name, fn in POLICY_LOSSES.items():
        _register_into(POLICY_LOSS_REGISTRY, name, fn, "policy loss")
    _check_plain_policy_loss_config()
