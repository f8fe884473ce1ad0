"""Run an action right after a module is imported: how hmpo_verl installs its guards in every process.

verl imports our plugin (`hmpo_verl.verl_plugin`) while `import verl` runs, before most of
verl is loaded; importing verl's trainers there would cost every process hundreds of modules
it never uses. `run_after_import(module, action, failure)` instead runs `action(module)` the
moment `module` has executed, before its importer gets it back: a verl function is wrapped
before anyone imports it by name. A failing action is logged at ERROR (`loudly`: verl itself
logs a failing plugin only at DEBUG) and the process goes on without that piece. A verl
module's symbols are checked against `hmpo_verl.guards.verl_symbols` first, so a verl that
moved one gives one message naming it and the supported versions. That is not what stops such
a verl: the driver checks the same rows before Ray starts, having imported the modules the
launched trainer will use (`hmpo_verl.hosts.verl.checks.check_verl_symbols`), and raises.
"""

from __future__ import annotations

import importlib.abc
import logging
import sys
import traceback

from hmpo_verl.guards.verl_symbols import UnsupportedVerlError, check_module, rows_of

logger = logging.getLogger("hmpo_verl")


def loudly(action, failure: str) -> None:
    """Run `action()`; on failure log `failure` at ERROR with the traceback (the message alone for an
    unsupported verl, which says everything), then re-raise."""
    try:
        action()
    except UnsupportedVerlError as exc:
        logger.error("%s: %s", failure, exc)
        raise
    except Exception:  # noqa: BLE001 - report whatever broke, then re-raise
        logger.error("%s:\n%s", failure, traceback.format_exc())
        raise


_UNSUPPORTED: set[str] = set()  # verl modules whose check failed: reported once, by the first hook on them


def _checked_first(module_name: str, action):
    def checked(module):
        if module_name in _UNSUPPORTED:
            return
        try:
            check_module(module_name, module)
        except UnsupportedVerlError:
            _UNSUPPORTED.add(module_name)
            raise
        action(module)

    return checked


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
    a regular import of the module: under `python -m verl.trainer.main_ppo` our `run_ppo` wrapper
    never runs, and the driver's checks run from `validate_config`.)
    """

    def __init__(self, loader, fullname: str, finder: _RunAfterImport):
        self._loader, self._fullname, self._finder = loader, fullname, finder

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        for action, failure in self._finder.actions.pop(self._fullname, []):
            try:
                loudly(lambda: action(module), failure)
            except Exception:  # noqa: BLE001 - logged at ERROR; verl goes on without it, as for any failed plugin
                pass

    def __getattr__(self, name):  # get_source, get_filename, ... for tracebacks and inspect
        return getattr(self._loader, name)


_AFTER_IMPORT = _RunAfterImport()


def run_after_import(module_name: str, action, failure: str) -> None:
    """Call `action(module)` once `module_name` is imported (now, if it already is); a failure is
    logged at ERROR with `failure` and its traceback.

    For a verl module, its rows of `VERL_SYMBOLS` are checked first (`check_module`); a verl module
    without a row is refused here, so that nothing of verl is wrapped without being listed.
    """
    if module_name.split(".")[0] == "verl":
        if not rows_of(module_name):
            raise ValueError(f"{module_name} has no row in hmpo_verl.guards.verl_symbols.VERL_SYMBOLS: list each "
                             "symbol of it that hmpo_verl wraps or reads there first")
        action = _checked_first(module_name, action)
    if module_name in sys.modules:
        loudly(lambda: action(sys.modules[module_name]), failure)
        return
    _AFTER_IMPORT.actions.setdefault(module_name, []).append((action, failure))
    if _AFTER_IMPORT not in sys.meta_path:
        sys.meta_path.insert(0, _AFTER_IMPORT)


