"""Registration of hmpo_verl with verl (idempotent).

`register()`
  * registers the policy losses and advantage estimators by name in verl's registries
    (which live in `verl.trainer.ppo.core_algos`),
  * has optimizer state loads report their step to the p schedule (`hmpo_verl.steps`), and
  * extends verl's `validate_config` (which `main_ppo`'s driver runs before Ray starts; the
    one-step-off entry point runs it inside Ray, fully-async never: `hmpo_verl.offpolicy` runs the
    same `driver_checks` in `run_ppo`, every entry point's driver, before `ray.init`) to
    check that an installed TRL is one verl can start beside (`check_trl_beside_verl`), our
    options, the checkpoint directory, the checkpoint a resume will use
    (`hmpo_verl.checkpoints`) and the settings it was saved with (`hmpo_verl.run_settings`): verl builds the actor config there, but never the algorithm
    dataclass, and its plain `PolicyLossConfig` cannot tell that `loss_mode=power_mean`
    lacks a power. With the check, a bad value stops the run with a message naming the
    field instead of failing later inside a Ray worker.

verl imports `hmpo_verl.verl_plugin` (the `verl.plugins` entry point) while `import verl`
runs, in every process. Importing core_algos there would cost every such process about
700 modules (verl's config dataclasses, and through them scipy and accelerate) that most
of them never use, so the plugin calls `register_on_import()`: it extends
`validate_config` at once (`verl.utils.config` is already loaded by `import verl`) and
registers the losses the moment `verl.trainer.ppo.core_algos` is first imported -- the
module every caller of `get_policy_loss_fn` / `get_adv_estimator_fn` imports first. A
failure to register is logged at ERROR with its traceback (verl itself logs a failing
plugin only at DEBUG, and the symptom would otherwise be a late "Unsupported loss mode"),
then re-raised into verl's plugin loader, or, when it happens inside the import of
core_algos, the import completes without our losses. The same hook wraps, as their modules
are imported, the checkpoint save of verl's trainers (`PPOTrainer`, `RayPPOTrainer`:
`hmpo_verl.checkpoints.guard_saves`) and the driver's rollout-vs-actor diagnostics, the one
place the driver reads the rollout's log-probs (`hmpo_verl.finite.guard_rollout_log_probs`),
and installs `hmpo_verl.offpolicy`'s wrappers for verl's off-policy trainers (per-sample lag,
bypass mode, option checks in `run_ppo`); `run_after_import` is that mechanism.
"""

from __future__ import annotations

import functools
import importlib.abc
import logging
import sys
import traceback
from typing import Optional

CORE_ALGOS = "verl.trainer.ppo.core_algos"
# verl's trainers, whose checkpoint saves are guarded (hmpo_verl.checkpoints), and the module whose
# calculate_debug_metrics is where the driver sees the rollout's log-probs (hmpo_verl.finite)
TRAINERS = {"verl.trainer.ppo.v1.trainer_base": "PPOTrainer", "verl.trainer.ppo.ray_trainer": "RayPPOTrainer",
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


def check_options(config) -> None:
    """Validate our options in a composed verl trainer config (DictConfig); raise ValueError."""
    from omegaconf import OmegaConf
    from verl.utils.config import omega_conf_to_dataclass

    from hmpo_verl.config import ADV_ESTIMATORS, LOSS_OPTION_CLASSES, algo_options, loss_options

    policy_loss = OmegaConf.select(config, "actor_rollout_ref.actor.policy_loss", default=None)
    loss_mode = policy_loss.get("loss_mode", None) if policy_loss is not None else None
    if loss_mode in LOSS_OPTION_CLASSES:
        options = loss_options(omega_conf_to_dataclass(policy_loss), loss_mode)
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
    checkpoint directory, the checkpoint a resume will use (`hmpo_verl.checkpoints.guard_resume`) and the
    settings it was saved with (`hmpo_verl.run_settings`). Run by verl's `validate_config` and by
    `run_ppo`, the driver function of every entry point (`main_ppo`, one-step-off, fully-async)."""
    from hmpo_verl.checkpoints import check_checkpoint_directory, guard_resume, resume_step_dir
    from hmpo_verl.run_settings import check_resume_settings, stamp_run_settings

    check_options(config)
    check_trl_beside_verl()
    check_checkpoint_directory(config)
    guard_resume(config)
    check_resume_settings(config, resume_step_dir(config))
    stamp_run_settings(config)  # what each checkpoint records, before the trainer edits its config


def _extend_validate_config() -> None:
    import verl.utils.config as verl_config

    validate = verl_config.validate_config
    if getattr(validate, "_hmpo_checked", False):
        return

    @functools.wraps(validate)
    def validate_config(config, *args, **kwargs):
        result = validate(config, *args, **kwargs)
        driver_checks(config)
        return result

    validate_config._hmpo_checked = True
    verl_config.validate_config = validate_config


_DEFERRED: list[bool] = []  # set when core_algos finished loading while hmpo_verl.losses was mid-import


def _register_after_core_algos() -> None:
    """The core_algos hook: register, unless this import of core_algos is the one `hmpo_verl.losses`
    itself started (a user's first import being the losses module): its table does not exist
    yet, so it registers at its own end (`register_deferred`)."""
    losses = sys.modules.get("hmpo_verl.losses")
    if losses is not None and not hasattr(losses, "POLICY_LOSSES"):
        _DEFERRED.append(True)
        return
    register()


def register_deferred() -> None:
    """Called at the end of `hmpo_verl.losses`: register if the core_algos hook had to wait for it."""
    if _DEFERRED:
        _DEFERRED.clear()
        _loudly(register)


def register() -> None:
    """Register losses and estimators with verl now; safe to call any number of times."""
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, POLICY_LOSS_REGISTRY

    from hmpo_verl.estimators import ADV_ESTIMATORS
    from hmpo_verl.losses import POLICY_LOSSES
    from hmpo_verl.steps import watch_optimizer_loads, watch_optimizer_zero_grads

    for name, fn in POLICY_LOSSES.items():
        _register_into(POLICY_LOSS_REGISTRY, name, fn, "policy loss")
    for name, fn in ADV_ESTIMATORS.items():
        _register_into(ADV_ESTIMATOR_REGISTRY, name, fn, "advantage estimator")
    watch_optimizer_loads()  # the p schedule's step after a resume (hmpo_verl.steps)
    watch_optimizer_zero_grads()  # ... and after verl skipped the policy's step
    _extend_validate_config()


REGISTER_FAILED = (
    "hmpo_verl failed to register with verl; its losses (hmpo, power_mean, agm, adaptive_power_mean) "
    "and advantage estimators (power_mean, agm) will be unavailable"
)
GUARD_FAILED = "hmpo_verl could not wrap {} (guarded checkpoint saves, the rollout log-prob check); verl runs without it"


def _loudly(action, failure: str = REGISTER_FAILED) -> None:
    """Run `action()`; on failure log `failure` and the traceback at ERROR, then re-raise."""
    try:
        action()
    except Exception:  # noqa: BLE001 - report whatever broke, then re-raise
        logging.getLogger("hmpo_verl").error("%s:\n%s", failure, traceback.format_exc())
        raise


class _RunAfterImport(importlib.abc.MetaPathFinder):
    """Meta-path finder that runs actions right after given modules execute.

    It finds a watched module's spec through the other finders and wraps its loader; once
    the module has executed (and is in `sys.modules`), the actions for it run before the
    importer gets the module back -- so `get_policy_loss_fn("hmpo")` works in any code that
    can call it, and a verl function is wrapped before anyone imports it by name. Each
    action runs once. A failing action is logged at ERROR and the module is still returned:
    the process goes on without that piece, as verl does for a failing plugin.
    """

    def __init__(self):
        self.actions: dict[str, list] = {}

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.actions:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _LoaderThenRun(spec.loader, fullname, self)
                return spec
        return None


class _LoaderThenRun(importlib.abc.Loader):
    """Delegates to verl's loader; runs the actions (each given the module) after `exec_module`.

    (`python -m` runs a module through `get_code`, as `__main__`: its actions then wait for
    a regular import of the module.)
    """

    def __init__(self, loader, fullname: str, finder: _RunAfterImport):
        self._loader, self._fullname, self._finder = loader, fullname, finder

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        for action, failure in self._finder.actions.pop(self._fullname, []):
            try:
                _loudly(lambda: action(module), failure)
            except Exception:  # noqa: BLE001 - logged at ERROR; verl goes on without it, as for any failed plugin
                pass

    def __getattr__(self, name):  # get_source, get_filename, ... for tracebacks and inspect
        return getattr(self._loader, name)


_AFTER_IMPORT = _RunAfterImport()


def run_after_import(module_name: str, action, failure: str = REGISTER_FAILED) -> None:
    """Call `action(module)` once `module_name` is imported (now, if it already is); a failure is
    logged at ERROR with `failure` and its traceback."""
    if module_name in sys.modules:
        _loudly(lambda: action(sys.modules[module_name]), failure)
        return
    _AFTER_IMPORT.actions.setdefault(module_name, []).append((action, failure))
    if _AFTER_IMPORT not in sys.meta_path:
        sys.meta_path.insert(0, _AFTER_IMPORT)


def register_on_import() -> None:
    """Register now if verl's core_algos is loaded, else as soon as it is imported (see module doc);
    guard checkpoint saves of verl's trainers (`hmpo_verl.checkpoints.guard_saves`) and the driver's check of
    the rollout's log-probs as they are imported; install the off-policy trainer hooks (`hmpo_verl.offpolicy`)."""
    from hmpo_verl.offpolicy import install

    if CORE_ALGOS in sys.modules:
        _loudly(_register_after_core_algos)
    else:
        _loudly(_extend_validate_config)
        run_after_import(CORE_ALGOS, lambda _module: _register_after_core_algos())
    run_after_import(DEBUG_METRICS, _guard_rollout_log_probs, GUARD_FAILED.format(DEBUG_METRICS))
    for name, trainer in TRAINERS.items():
        run_after_import(name, lambda module, trainer=trainer: _guard_trainer(module, trainer), GUARD_FAILED.format(name))
    install(run_after_import)


def _guard_rollout_log_probs(module) -> None:
    from hmpo_verl.finite import guard_rollout_log_probs

    guard_rollout_log_probs(module)


def ray_wrapped_class(cls):
    """The class a `@ray.remote` decorator wrapped (its ActorClass's `modified_class` subclasses it); else `cls`.
    Patched there, the driver's subclass and the copy Ray ships to the actor's process both inherit the patch."""
    metadata = getattr(cls, "__ray_metadata__", None)
    return cls if metadata is None else metadata.modified_class.__bases__[0]


def _guard_trainer(module, trainer: str) -> None:
    """Guard a trainer module: its class's saves, and its own name for calculate_debug_metrics, if it has one."""
    from hmpo_verl.checkpoints import guard_saves

    guard_saves(ray_wrapped_class(getattr(module, trainer)))
    if hasattr(module, "calculate_debug_metrics"):
        _guard_rollout_log_probs(module)
