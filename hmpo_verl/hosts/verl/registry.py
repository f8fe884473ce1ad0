"""Registration of hmpo_verl with verl (idempotent).

`register()`
  * registers the policy losses and advantage estimators by name in verl's registries
    (which live in `verl.trainer.ppo.core_algos`),
  * has optimizer state loads report their step to the p schedule (`hmpo_verl.guards.steps`), and
  * extends verl's `validate_config` (which `main_ppo`'s driver runs before Ray starts; the
    one-step-off entry point runs it inside Ray, fully-async never: `hmpo_verl.guards.offpolicy` runs
    the same `driver_checks` in `run_ppo`, every entry point's driver, before `ray.init`) with our
    checks (`hmpo_verl.hosts.verl.checks`: our options, a TRL verl can start beside), the
    checkpoint directory and the checkpoint a resume will use (`hmpo_verl.guards.checkpoints`),
    the settings it was saved with (`hmpo_verl.guards.run_settings`), and the verl symbols we
    wrap (`hmpo_verl.guards.verl_symbols`, in the modules the launched trainer imports): verl builds the actor
    config there, but never the algorithm dataclass, and its plain `PolicyLossConfig` cannot
    tell that `loss_mode=power_mean` lacks a power. With the check, a bad value stops the run
    with a message naming the field instead of failing later inside a Ray worker.

verl imports `hmpo_verl.verl_plugin` (the `verl.plugins` entry point) while `import verl`
runs, in every process. Importing core_algos there would cost every such process about
700 modules (verl's config dataclasses, and through them scipy and accelerate) that most
of them never use, so the plugin calls `register_on_import()`: it extends
`validate_config` at once (`verl.utils.config` is already loaded by `import verl`) and
registers the losses the moment `verl.trainer.ppo.core_algos` is first imported -- the
module every caller of `get_policy_loss_fn` / `get_adv_estimator_fn` imports first (our
losses module imports core_algos only when a loss runs, so registering can always import
it). A failure to register is logged at ERROR with its traceback (verl itself logs a failing
plugin only at DEBUG, and the symptom would otherwise be a late "Unsupported loss mode"),
then re-raised into verl's plugin loader, or, when it happens inside the import of
core_algos, the import completes without our losses. The same hook (`hmpo_verl.guards.hooks`)
installs the runtime guards as their verl modules are imported: the checkpoint save of
verl's trainers (`hmpo_verl.guards.checkpoints.guard_saves`), the driver's rollout-vs-actor
diagnostics, the one place the driver reads the rollout's log-probs
(`hmpo_verl.guards.finite.guard_rollout_log_probs`), and `hmpo_verl.guards.offpolicy`'s
wrappers for verl's off-policy trainers (per-sample lag, bypass mode, option checks in
`run_ppo`). Every verl symbol touched is a row of `hmpo_verl.guards.verl_symbols.VERL_SYMBOLS`.
"""

from __future__ import annotations

import functools
import importlib
import sys

from hmpo_verl.guards.hooks import loudly, run_after_import
from hmpo_verl.guards.verl_symbols import check_module
from hmpo_verl.hosts.verl.checks import SESSIONS_FAILED, TRAINER_BASE as V1_TRAINER
from hmpo_verl.hosts.verl.checks import check_options, check_trl_beside_verl, driver_checks, trl_conflict  # noqa: F401 (check_options, check_trl_beside_verl, trl_conflict: public hmpo_verl.registry names)

CORE_ALGOS = "verl.trainer.ppo.core_algos"
# verl's trainers, whose checkpoint saves are guarded (hmpo_verl.guards.checkpoints), and the module whose
# calculate_debug_metrics is where the driver sees the rollout's log-probs (hmpo_verl.guards.finite)
TRAINERS = {V1_TRAINER: "PPOTrainer", "verl.trainer.ppo.ray_trainer": "RayPPOTrainer",
            # overrides _save_checkpoint (its own folder numbering, the rollouter's data.pt); a @ray.remote class
            "verl.experimental.fully_async_policy.fully_async_trainer": "FullyAsyncTrainer"}
DEBUG_METRICS = "verl.utils.debug.metrics"


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


def _extend_validate_config() -> None:
    import verl.utils.config as verl_config

    check_module(verl_config.__name__, verl_config)
    validate = verl_config.validate_config
    if getattr(validate, "_hmpo_checked", False):
        return

    @functools.wraps(validate)
    def validate_config(config, *args, **kwargs):
        result = validate(config, *args, **kwargs)
        driver_checks(config)  # first of all, every verl symbol the launched trainer's guards wrap or read
        return result

    validate_config._hmpo_checked = True
    verl_config.validate_config = validate_config


def register() -> None:
    """Register losses and estimators with verl now; safe to call any number of times."""
    core_algos = importlib.import_module(CORE_ALGOS)
    check_module(CORE_ALGOS, core_algos)

    from hmpo_verl.hosts.verl.estimators import ADV_ESTIMATORS
    from hmpo_verl.hosts.verl.losses import POLICY_LOSSES
    from hmpo_verl.guards.steps import watch_optimizer_loads, watch_optimizer_zero_grads

    for name, fn in POLICY_LOSSES.items():
        _register_into(core_algos.POLICY_LOSS_REGISTRY, name, fn, "policy loss")
    for name, fn in ADV_ESTIMATORS.items():
        _register_into(core_algos.ADV_ESTIMATOR_REGISTRY, name, fn, "advantage estimator")
    watch_optimizer_loads()  # the p schedule's step after a resume (hmpo_verl.guards.steps)
    watch_optimizer_zero_grads()  # ... and after verl skipped the policy's step
    _extend_validate_config()


REGISTER_FAILED = (
    "hmpo_verl failed to register with verl; its losses (hmpo, power_mean, agm, adaptive_power_mean) "
    "and advantage estimators (power_mean, agm) will be unavailable"
)
GUARD_FAILED = "hmpo_verl could not wrap {} (guarded checkpoint saves, the rollout log-prob check); verl runs without it"


def register_on_import() -> None:
    """Register now if verl's core_algos is loaded, else as soon as it is imported (see module doc);
    guard checkpoint saves of verl's trainers (`hmpo_verl.guards.checkpoints.guard_saves`) and the driver's check
    of the rollout's log-probs as they are imported; install the off-policy trainer hooks
    (`hmpo_verl.guards.offpolicy`, `hmpo_verl.guards.prefetch`, `hmpo_verl.guards.shuffle`)."""
    from hmpo_verl.guards import prefetch, shuffle
    from hmpo_verl.guards.offpolicy import install

    if CORE_ALGOS in sys.modules:
        loudly(register, REGISTER_FAILED)
    else:
        loudly(_extend_validate_config, REGISTER_FAILED)
        run_after_import(CORE_ALGOS, lambda _module: register(), REGISTER_FAILED)
    run_after_import(DEBUG_METRICS, _guard_rollout_log_probs, GUARD_FAILED.format(DEBUG_METRICS))
    run_after_import(V1_TRAINER, _group_by_session_in_v1, SESSIONS_FAILED)
    for name, trainer in TRAINERS.items():
        run_after_import(name, lambda module, trainer=trainer: _guard_trainer(module, trainer), GUARD_FAILED.format(name))
    install(run_after_import)
    prefetch.install(run_after_import)
    shuffle.install(run_after_import)


def _group_by_session_in_v1(module) -> None:
    from hmpo_verl.hosts.verl.estimators import group_by_session_in_v1

    group_by_session_in_v1(module)


def _guard_rollout_log_probs(module) -> None:
    from hmpo_verl.guards.finite import guard_rollout_log_probs

    guard_rollout_log_probs(module)


def ray_wrapped_class(cls):
    """The class a `@ray.remote` decorator wrapped (its ActorClass's `modified_class` subclasses it); else `cls`.
    Patched there, the driver's subclass and the copy Ray ships to the actor's process both inherit the patch."""
    metadata = getattr(cls, "__ray_metadata__", None)
    return cls if metadata is None else metadata.modified_class.__bases__[0]


def _guard_trainer(module, trainer: str) -> None:
    """Guard a trainer module: its class's saves, and its own name for calculate_debug_metrics, if it has one."""
    from hmpo_verl.guards.checkpoints import guard_saves

    guard_saves(ray_wrapped_class(getattr(module, trainer)))
    if hasattr(module, "calculate_debug_metrics"):
        _guard_rollout_log_probs(module)
