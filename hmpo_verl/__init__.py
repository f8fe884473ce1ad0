"""hmpo-verl: the power-mean family of policy optimization (HMPO, geometric, arithmetic,
any real p, AGM) for verl, and for TRL (`hmpo_verl.trl`).

Importing the package imports neither verl nor torch: the maths (`hmpo_verl.means`,
`surrogate`, `aggregators`, `adaptive`, `advantages`, `options`) is pure torch and works
without verl. verl registers the losses by itself in every process, through the
`verl.plugins` entry point `hmpo_verl.verl_plugin`; importing the package in a process
that has imported verl registers too (so do installs whose entry point still names the
package). The verl config classes used as Hydra `_target_`s (`hmpo_verl.PowerMeanLossConfig`,
...) and the means are attributes of the package, imported on first access (PEP 562), so
naming them imports verl only when they are used.
"""

import importlib as _importlib
import sys as _sys

_LAZY = {
    "PowerMeanLossConfig": "hmpo_verl.config",
    "AdaptivePowerMeanLossConfig": "hmpo_verl.config",
    "PowerMeanAlgoConfig": "hmpo_verl.config",
    "register": "hmpo_verl.registry",
    "effective_sample_size": "hmpo_verl.means",
    "log_agm": "hmpo_verl.means",
    "log_power_mean": "hmpo_verl.means",
    "power_mean": "hmpo_verl.means",
    "power_mean_weights": "hmpo_verl.means",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'hmpo_verl' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


# verl is imported (or importing) in this process: register, as verl's plugin does
# (a None entry is Python's mark of an import that is blocked: no verl here)
if _sys.modules.get("verl") is not None:
    _importlib.import_module("hmpo_verl.verl_plugin")
