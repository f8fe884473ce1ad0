"""Run a callback right after a given module is first imported.

Some registrations must touch heavy verl modules (the FSDP engine pulls in peft,
transformers and FSDP). Importing them eagerly from the plugin would cost every
verl process -- including light ones such as reward or TransferQueue workers --
several seconds, so :func:`after_import` defers the work until the module is
imported by verl itself.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Callable

_callbacks: dict[str, list[Callable]] = {}


class _AfterImportFinder(importlib.abc.MetaPathFinder):
    """Meta-path finder that wraps the loader of watched modules."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _callbacks:
            return None
        # find the real spec with this finder removed, then wrap its loader
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _WrappedLoader(spec.loader, fullname)
        return spec


class _WrappedLoader(importlib.abc.Loader):
    def __init__(self, loader, fullname):
        self._loader = loader
        self._fullname = fullname

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        for callback in _callbacks.pop(self._fullname, []):
            callback(module)

    def __getattr__(self, name):  # get_code (python -m runs the module as __main__: no callback), get_source, ...
        return getattr(self._loader, name)


_finder = _AfterImportFinder()


def after_import(module_name: str, callback: Callable) -> None:
    """Call ``callback(module)`` once ``module_name`` is imported (now, if it already is)."""
    if module_name in sys.modules:
        callback(sys.modules[module_name])
        return
    _callbacks.setdefault(module_name, []).append(callback)
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
