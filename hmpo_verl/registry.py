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
core_algos, the import completes without our losses.
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
        options = loss_options(omega_conf_to_dataclass(policy_loss), loss_mode)
        if getattr(options, "adapt", None) == "reward":
            raise ValueError(
                "actor_rollout_ref.actor.policy_loss.adapt='reward' is not supported on verl's trainer yet: verl "
                "0.9.1's ppo_loss passes a policy loss no rewards, and the batch's reward statistics it needs are not "
                "sent to the actor workers; allowed here: ess, schedule (adapt='reward' runs in PowerMeanGRPOTrainer "
                "and in hmpo_verl.lab's lean loop)")
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
    """Register losses and estimators with verl now; safe to call any number of times."""
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, POLICY_LOSS_REGISTRY

    from hmpo_verl.estimators import ADV_ESTIMATORS
    from hmpo_verl.losses import POLICY_LOSSES

    for name, fn in POLICY_LOSSES.items():
        _register_into(POLICY_LOSS_REGISTRY, name, fn, "policy loss")
    for name, fn in ADV_ESTIMATORS.items():
        _register_into(ADV_ESTIMATOR_REGISTRY, name, fn, "advantage estimator")
    _extend_validate_config()


def _loudly(action) -> None:
    """Run `action()`; on failure log the traceback at ERROR, then re-raise."""
    try:
        action()
    except Exception:  # noqa: BLE001 - report whatever broke, then re-raise
        logging.getLogger("hmpo_verl").error(
            "hmpo_verl failed to register with verl; its losses (hmpo, power_mean, agm, adaptive_power_mean) "
            "and advantage estimators (power_mean, agm) will be unavailable:\n%s",
            traceback.format_exc(),
        )
        raise


class _RegisterAfterCoreAlgos(importlib.abc.MetaPathFinder):
    """Meta-path finder that runs `register()` right after `verl.trainer.ppo.core_algos` executes.

    It finds the module's spec through the other finders and wraps its loader; once the
    module has executed (and is in `sys.modules`), `register()` runs before the importer
    gets the module back, so `get_policy_loss_fn("hmpo")` works in any code that can call
    it. It acts once. If registering fails, the error is logged and core_algos is still
    returned: the process goes on without our losses, as verl does for a failing plugin.
    """

    def find_spec(self, fullname, path, target=None):
        if fullname != CORE_ALGOS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _LoaderThenRegister(spec.loader, self)
                return spec
        return None


class _LoaderThenRegister(importlib.abc.Loader):
    """Delegates to verl's loader; registers after `exec_module`."""

    def __init__(self, loader, finder: _RegisterAfterCoreAlgos):
        self._loader, self._finder = loader, finder

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        if self._finder in sys.meta_path:
            sys.meta_path.remove(self._finder)
        try:
            _loudly(register)
        except Exception:  # noqa: BLE001 - logged at ERROR; verl goes on without our losses, as for any failed plugin
            pass

    def __getattr__(self, name):  # get_source, get_filename, ... for tracebacks and inspect
        return getattr(self._loader, name)


def register_on_import() -> None:
    """Register now if verl's core_algos is loaded, else as soon as it is imported (see module doc)."""
    if CORE_ALGOS in sys.modules:
        _loudly(register)
        return
    _loudly(_extend_validate_config)
    if not any(isinstance(finder, _RegisterAfterCoreAlgos) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterCoreAlgos())
