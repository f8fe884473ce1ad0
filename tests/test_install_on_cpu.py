"""What each host installs (pyproject.toml's extras) and the clear errors where hosts do not fit (issue 22).

Offline checks only; the installs themselves, each in a fresh venv, are `python -m hmpo_verl.lab.install_check`
(minutes each; its last results are in the README)."""

from __future__ import annotations

import importlib.util
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from test_import_plugin import _python

from hmpo_verl.registry import check_trl_beside_verl, trl_conflict

PROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
EXTRAS = {name: [Requirement(r) for r in reqs] for name, reqs in PROJECT["optional-dependencies"].items()}


def _spec(extra: str, package: str):
    (req,) = [r for r in EXTRAS[extra] if r.name == package]
    return req.specifier


def test_the_maths_needs_only_torch_and_each_host_is_an_extra():
    assert [Requirement(r).name for r in PROJECT["dependencies"]] == ["torch"]
    assert {r.name for r in EXTRAS["verl"]} == {"verl"} and {r.name for r in EXTRAS["trl"]} == {"trl"}
    assert {r.name for r in EXTRAS["verl-trl"]} == {"verl", "trl"}
    assert "hmpo-verl[demo,verl-trl]" in PROJECT["optional-dependencies"]["test"]  # CI has both hosts


def test_a_trl_user_keeps_a_newer_trl_and_verl_gets_one_it_can_start_beside():
    assert "1.16.0" in _spec("trl", "trl") and "1.12.0" in _spec("trl", "trl")  # no downgrade of TRL 1.16
    both = _spec("verl-trl", "trl")
    assert "1.12.0" in both and "1.13.0" not in both and "1.16.0" not in both
    assert _spec("verl-trl", "verl") == _spec("verl", "verl")
    assert "0.9.1" in _spec("verl", "verl")


def test_this_environment_satisfies_the_verl_trl_extra():
    for req in EXTRAS["verl-trl"]:
        assert metadata.version(req.name) in req.specifier, req
    check_trl_beside_verl()  # no error here


def test_a_trl_verl_cannot_start_beside_is_an_error_naming_both_versions(monkeypatch):
    message = trl_conflict("0.9.1", "1.16.0")
    assert "verl 0.9.1" in message and "TRL 1.16.0" in message and "hmpo-verl[verl-trl]" in message
    assert trl_conflict("0.9.1", "1.12.0") is None and trl_conflict("0.9.1", None) is None
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "1.16.0" if name == "trl" else real(name))
    with pytest.raises(RuntimeError, match="TRL 1.16.0"):
        check_trl_beside_verl()


def test_verls_driver_stops_before_ray_on_such_a_trl(monkeypatch):
    from test_config_on_cpu import _driver_validation

    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "1.14.2" if name == "trl" else real(name))
    with pytest.raises(RuntimeError, match=r"verl 0\.9\.1 cannot start its actor workers beside TRL 1\.14\.2"):
        _driver_validation(["actor_rollout_ref.actor.policy_loss.loss_mode=hmpo"])


def test_the_trl_adapter_says_which_install_brings_trl(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        "class _NoTrl(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'trl' or name.startswith('trl.'):\n"
        "            raise ImportError('trl is blocked in this test')\n"
        "sys.meta_path.insert(0, _NoTrl())\n"
    )
    result = _python("import hmpo_verl.trl", pythonpath=[str(tmp_path)])
    assert result.returncode != 0
    assert "hmpo_verl.trl needs TRL >= 1.12" in result.stderr and "pip install 'hmpo-verl[trl]'" in result.stderr


@pytest.mark.skipif(importlib.util.find_spec("skyrl") is None, reason="skyrl is not installed (recipes/cpu_tiny/setup_and_run.sh installs it)")
def test_the_skyrl_install_check_takes_skyrls_trainer_extra_less_its_cuda_builds():
    """install_check's skyrl host installs SkyRL's requirements and its `skyrl-train` extra's (read from SkyRL's metadata here,
    as in the fresh venv) less flash-attn, and finds a Python >= 3.12 that runs or says it needs one."""
    import subprocess
    import sys

    from hmpo_verl.lab import install_check

    out = subprocess.run([sys.executable, "-c", install_check.SKYRL_REQUIREMENTS], capture_output=True, text=True,
                         check=True).stdout.split()
    names = {Requirement(r).name for r in out}
    assert {"cloudpathlib", "transformers", "ray", "hydra-core", "skyrl-gym"} <= names  # its own, its extra's
    assert not names & set(install_check.CUDA_BUILDS)
    assert all(Requirement(r).marker is None for r in out)
    found = install_check.python312()
    if found is not None:
        version = subprocess.run([found, "-c", "import sys; print(sys.version_info >= (3, 12))"], capture_output=True,
                                 text=True).stdout.strip()
        assert version == "True", found
