"""Registration of hmpo_verl with verl (idempotent).

`register()`
  * registers the policy losses and advantage estimators by name in verl's registries
    (which live in `verl.trainer.ppo.core_algos`), and
  * extends verl's `validate_config` (which verl's driver runs before Ray starts) to
    check our options too: verl builds the actor config there, but never the algorithm
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
core_algos, the import completes without our losses. The same after-import mechanism
(`run_after_import`) installs `hmpo_verl.offpolicy`'s wrappers for verl's off-policy
trainers (per-sample lag, bypass mode, option checks in `run_ppo`).
"""

from __future__ import annotations

import functools
import importlib.abc
import logging
import sys
import traceback

CORE_ALGOS = "verl.trainer.ppo.core_algos"


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
        check_bypass_mode(OmegaConf.select(config, "algorithm.rollout_correction", default=None), loss_mode)
    algorithm = OmegaConf.select(config, "algorithm", default=None)
    if algorithm is not None and str(algorithm.get("_target_", "")).startswith("hmpo_verl"):
        omega_conf_to_dataclass(algorithm)  # runs PowerMeanAlgoConfig.__post_init__
    elif algorithm is not None and algorithm.get("adv_estimator", None) in ADV_ESTIMATORS:
        algo_options(algorithm, algorithm.adv_estimator)


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
    """Register losses and estimators with verl now; safe to call any number of times."""
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, POLICY_LOSS_REGISTRY

    from hmpo_verl.estimators import ADV_ESTIMATORS
    from hmpo_verl.losses import POLICY_LOSSES

    for name, fn in POLICY_LOSSES.items():
        _register_into(POLICY_LOSS_REGISTRY, name, fn, "policy loss")
    for name, fn in ADV_ESTIMATORS.items():
        _register_into(ADV_ESTIMATOR_REGISTRY, name, fn, "advantage estimator")
    _extend_validate_config()


REGISTER_FAILED = (
    "hmpo_verl failed to register with verl; its losses (hmpo, power_mean, agm, adaptive_power_mean) "
    "and advantage estimators (power_mean, agm) will be unavailable"
)


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
    install the off-policy trainer hooks (`hmpo_verl.offpolicy`) the same way."""
    from hmpo_verl.offpolicy import install

    if CORE_ALGOS in sys.modules:
        _loudly(register)
    else:
        _loudly(_extend_validate_config)
        run_after_import(CORE_ALGOS, lambda _module: register())
    install(run_after_import)
