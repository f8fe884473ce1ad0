"""hmpo-verl: the power-mean family of policy optimization (HMPO, geometric, arithmetic,
any real p, AGM) for verl, and for TRL (`hmpo_verl.trl`).

The package is three kinds of code in three folders (docs/design.md):

    maths/    the formulas, importable with torch alone (no verl, TRL or Ray)
    hosts/    one thin adapter per host: verl/ (configs, losses, estimators, registration,
              the plugin entry point), trl.py
    guards/   the runtime guards around verl's internals (checkpoints, the optimizer step,
              non-finite log-probs, the off-policy trainers), each wrapped verl symbol listed
              once in guards/verl_symbols.py
    lab/      the CPU lab; it uses only the public names below

Public names, served by this module alone (one mechanism, two tables):

* `_MODULES`: the module paths users, configs and the entry point name
  (`hmpo_verl.means`, `hmpo_verl.trl`, `hmpo_verl.verl_plugin`, ...). `import
  hmpo_verl.means` gives the module `hmpo_verl.maths.means` itself (not a copy: its
  functions, its state and monkeypatches are shared), imported on first use.
* `_NAMES`: attributes of the package -- the verl config classes used as Hydra `_target_`s
  (`hmpo_verl.PowerMeanLossConfig`, ...) and the means -- imported on first access (PEP 562).

Importing the package imports neither verl nor torch. verl registers the losses by itself in
every process, through the `verl.plugins` entry point `hmpo_verl.verl_plugin`; importing the
package in a process that has imported verl registers too (so do installs whose entry point
still names the package).
"""

import importlib as _importlib
import importlib.abc as _abc
import importlib.util as _util
import sys as _sys

# public module path -> the module that holds it
_MODULES = {
    "hmpo_verl.means": "hmpo_verl.maths.means",
    "hmpo_verl.surrogate": "hmpo_verl.maths.surrogate",
    "hmpo_verl.adaptive": "hmpo_verl.maths.adaptive",
    "hmpo_verl.aggregators": "hmpo_verl.maths.aggregators",
    "hmpo_verl.advantages": "hmpo_verl.maths.advantages",
    "hmpo_verl.options": "hmpo_verl.maths.options",
    "hmpo_verl.reward_adaptive": "hmpo_verl.maths.reward_adaptive",
    "hmpo_verl.staleness": "hmpo_verl.maths.staleness",
    "hmpo_verl.config": "hmpo_verl.hosts.verl.config",
    "hmpo_verl.losses": "hmpo_verl.hosts.verl.losses",
    "hmpo_verl.estimators": "hmpo_verl.hosts.verl.estimators",
    "hmpo_verl.registry": "hmpo_verl.hosts.verl.registry",
    "hmpo_verl.verl_plugin": "hmpo_verl.hosts.verl.plugin",
    "hmpo_verl.trl": "hmpo_verl.hosts.trl",
    "hmpo_verl.host_loss": "hmpo_verl.hosts.host_loss",
    "hmpo_verl.openrlhf": "hmpo_verl.hosts.openrlhf",
    "hmpo_verl.skyrl": "hmpo_verl.hosts.skyrl",
    "hmpo_verl.checkpoints": "hmpo_verl.guards.checkpoints",
    "hmpo_verl.steps": "hmpo_verl.guards.steps",
    "hmpo_verl.finite": "hmpo_verl.guards.finite",
    "hmpo_verl.offpolicy": "hmpo_verl.guards.offpolicy",
    "hmpo_verl.run_settings": "hmpo_verl.guards.run_settings",
    "hmpo_verl.prefetch": "hmpo_verl.guards.prefetch",
    "hmpo_verl.shuffle": "hmpo_verl.guards.shuffle",
    "hmpo_verl.inflight": "hmpo_verl.guards.inflight",
}

# package attribute -> the module that defines it
_NAMES = {
    "PowerMeanLossConfig": "hmpo_verl.hosts.verl.config",
    "AdaptivePowerMeanLossConfig": "hmpo_verl.hosts.verl.config",
    "PowerMeanAlgoConfig": "hmpo_verl.hosts.verl.config",
    "register": "hmpo_verl.hosts.verl.registry",
    "effective_sample_size": "hmpo_verl.maths.means",
    "log_agm": "hmpo_verl.maths.means",
    "log_power_mean": "hmpo_verl.maths.means",
    "power_mean": "hmpo_verl.maths.means",
    "power_mean_weights": "hmpo_verl.maths.means",
}

__all__ = sorted(_NAMES)


def _real_name(fullname: str):
    """The module that holds public path `fullname` (a submodule of a public package too: `hmpo_verl.openrlhf.x`
    -> `hmpo_verl.hosts.openrlhf.x`), or None if `fullname` is no public path."""
    for public, real in _MODULES.items():
        if fullname == public or fullname.startswith(public + "."):
            return real + fullname[len(public):]
    return None


class _PublicModules(_abc.MetaPathFinder, _abc.Loader):
    """Finds a public module path of `_MODULES` and gives the importer the module that holds it.

    The loader replaces its placeholder in `sys.modules` by the real module, as the import
    system allows ("the sys.modules replacement case"), so both names name one module object.
    `python -m <public path>` runs the real module's code (`get_code`).
    """

    def find_spec(self, fullname, path, target=None):
        real = _real_name(fullname)
        if real is None or _util.find_spec(real) is None:
            return None
        return _util.spec_from_loader(fullname, self, is_package=self.is_package(fullname))

    def create_module(self, spec):
        return None  # a placeholder, replaced in exec_module

    def exec_module(self, module):
        _sys.modules[module.__name__] = _importlib.import_module(_real_name(module.__name__))

    def is_package(self, fullname):
        return _util.find_spec(_real_name(fullname)).submodule_search_locations is not None

    def get_code(self, fullname):
        real = _real_name(fullname)
        return _util.find_spec(real).loader.get_code(real)


# first: a finder of an older install (an editable one that still holds hmpo_verl/means.py) must not answer
if not any(isinstance(finder, _PublicModules) for finder in _sys.meta_path):
    _sys.meta_path.insert(0, _PublicModules())


def __getattr__(name):
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'hmpo_verl' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_NAMES))


# verl is imported (or importing) in this process: register, as verl's plugin does
# (a None entry is Python's mark of an import that is blocked: no verl here)
if _sys.modules.get("verl") is not None:
    _importlib.import_module("hmpo_verl.verl_plugin")
