"""The table of verl internals we wrap or read (hmpo_verl/guards/verl_symbols.py): complete, true for this
verl, and what a verl that moved a symbol gets -- one message naming it and the supported versions."""

from __future__ import annotations

import ast
import logging
import re
import sys
import types
from pathlib import Path

import pytest

from hmpo_verl.guards import hooks, verl_symbols
from hmpo_verl.guards.verl_symbols import SUPPORTED_VERL, VERL_SYMBOLS, UnsupportedVerlError, check_loaded, resolve

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = REPO_ROOT / "hmpo_verl"
LISTED = {(row.module, row.symbol) for row in VERL_SYMBOLS}


def test_the_supported_range_is_the_one_pyproject_installs():
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert re.search(r'^verl = \["verl([^"]+)"\]', pyproject, re.M).group(1) == SUPPORTED_VERL


def test_every_name_the_plugin_imports_from_verl_is_listed():
    """`from verl.<module> import <name>` anywhere in the plugin (not the lab) names a row of the table."""
    unlisted = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "lab" in path.relative_to(PACKAGE).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "verl":
                unlisted += [f"{path.relative_to(REPO_ROOT)}: {node.module}.{a.name}" for a in node.names
                             if (node.module, a.name) not in LISTED]
    assert not unlisted, f"add a row to hmpo_verl/guards/verl_symbols.py for: {unlisted}"


def test_every_row_exists_in_this_verl():
    import importlib

    absent = []
    for row in VERL_SYMBOLS:
        try:
            resolve(importlib.import_module(row.module), row.symbol)
        except AttributeError:
            absent.append(row.name)
    assert not absent


def test_every_verl_attribute_replaced_by_the_plugin_is_listed():
    """Scan verl's loaded modules and their classes for functions whose code is ours: each must be a listed
    symbol (or the same object bound under a second name, as `from verl.utils.config import validate_config`)."""
    import importlib

    for module in dict.fromkeys(row.module for row in VERL_SYMBOLS):
        importlib.import_module(module)
    listed_objects = {id(resolve(sys.modules[row.module], row.symbol)) for row in VERL_SYMBOLS}
    ours = str(PACKAGE)

    def is_ours(value):
        return isinstance(value, types.FunctionType) and value.__code__.co_filename.startswith(ours)

    found, unlisted = set(), []
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "verl" or name.startswith("verl.")):
            continue
        for attr, value in list(vars(module).items()):
            candidates = [(attr, value)]
            if isinstance(value, type) and value.__module__ == name:
                candidates += [(f"{attr}.{k}", v) for k, v in vars(value).items()]
            for symbol, obj in candidates:
                if is_ours(obj):
                    found.add((name, symbol))
                    if (name, symbol) not in LISTED and id(obj) not in listed_objects:
                        unlisted.append(f"{name}.{symbol}")
    assert not unlisted, f"wrapped but not in hmpo_verl/guards/verl_symbols.py: {unlisted}"
    # the scan sees the wraps the plugin installed at import (it can fail)
    assert {("verl.utils.config", "validate_config"), ("verl.trainer.ppo.ray_trainer", "RayPPOTrainer._update_actor"),
            ("verl.trainer.ppo.ray_trainer", "RayPPOTrainer._save_checkpoint")} <= found


def test_a_vanished_symbol_is_named_with_the_supported_range(monkeypatch):
    import verl.trainer.ppo.rollout_corr_helper as helper

    check_loaded()  # this verl has everything
    monkeypatch.delattr(helper, "apply_bypass_mode")
    with pytest.raises(UnsupportedVerlError) as info:
        check_loaded()
    message = str(info.value)
    assert "verl.trainer.ppo.rollout_corr_helper.apply_bypass_mode (wraps it:" in message
    assert f"hmpo_verl supports verl {SUPPORTED_VERL}" in message and "needed by one_step_off, fully_async" in message


def test_a_guard_installed_on_a_verl_without_its_symbol_logs_one_message(monkeypatch, caplog):
    """The install-time check: the action never runs (no AttributeError inside it); the error is the table's
    message, logged once at ERROR however many hooks watch the module."""
    name = "verl.trainer.ppo.rollout_corr_helper"
    monkeypatch.setitem(sys.modules, name, types.ModuleType(name))  # a verl whose module lacks the symbol
    monkeypatch.setattr(hooks, "_UNSUPPORTED", set())
    ran = []
    with caplog.at_level(logging.ERROR, logger="hmpo_verl"):
        with pytest.raises(UnsupportedVerlError, match=re.escape(f"{name}.apply_bypass_mode")):
            hooks.run_after_import(name, ran.append, "hmpo_verl could not wrap it")
        hooks.run_after_import(name, ran.append, "hmpo_verl could not wrap it")  # a second hook: silent
    assert ran == []
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "Traceback" not in errors[0] and SUPPORTED_VERL in errors[0], errors


def test_a_verl_module_without_a_row_cannot_be_hooked():
    with pytest.raises(ValueError, match="no row in hmpo_verl.guards.verl_symbols"):
        hooks.run_after_import("verl.trainer.ppo.reward", lambda module: None, "unused")
    assert not any(row.module == "verl.trainer.ppo.reward" for row in verl_symbols.VERL_SYMBOLS)
