"""Replace a name in a module as soon as the module is imported (an import hook; no import of it here)."""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys


class _PatchingLoader(importlib.abc.Loader):
    """Runs the module's own loader, then sets `name` = `value` in it."""

    def __init__(self, loader, name: str, value):
        self.loader, self.name, self.value = loader, name, value

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        setattr(module, self.name, self.value)


class _PatchingFinder(importlib.abc.MetaPathFinder):
    """Finds `module_name` with the other finders and wraps its loader in `_PatchingLoader`."""

    def __init__(self, module_name: str, name: str, value):
        self.module_name, self.name, self.value = module_name, name, value

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.module_name:
            return None
        for finder in sys.meta_path:
            if finder is self or isinstance(finder, _PatchingFinder):
                continue
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                spec.loader = _PatchingLoader(spec.loader, self.name, self.value)
                return spec
        return None


def patch_when_imported(module_name: str, name: str, value) -> None:
    """Set `module_name.name = value` now if the module is imported, and whenever it is imported from now on
    (before any importer reads the name); a second call for the same module replaces the first."""
    module = sys.modules.get(module_name)
    if module is not None:
        setattr(module, name, value)
    sys.meta_path[:] = [f for f in sys.meta_path if not (isinstance(f, _PatchingFinder) and f.module_name == module_name)]
    sys.meta_path.insert(0, _PatchingFinder(module_name, name, value))
