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


def _stub(tmp_path, *, torch: bool, installed: bool, exit_code: int = 0, cpu_wheel_configured: bool = True):
    """A fake python: `import torch` and the install check succeed as told; pytest/demo exit with
    exit_code; pip finds the CPU wheel on its configured indexes only if `cpu_wheel_configured`."""
    log = tmp_path / "calls.log"
    stub = tmp_path / "python"
    stub.write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        echo "$*" >> {log}
        case "$*" in
            "-c import torch; print(torch.__version__)") {"echo 2.13.0+cpu" if torch else "exit 1"} ;;
            "- "*) cat > /dev/null; exit {0 if installed else 1} ;;
            "-c import openrlhf"*) exit {0 if installed else 1} ;;
            "-m pip install --quiet torch==2.13.0+cpu") exit {0 if cpu_wheel_configured else 1} ;;
            "-m pytest"*|"-m hmpo_verl.lab.cpu_demo"*) exit {exit_code} ;;
        esac
        """))
    stub.chmod(0o755)
    return stub, log


def _run(stub, *args):
    env = {**os.environ, "PYTHON": str(stub)}
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60)


def test_an_installed_checkout_installs_nothing_and_passes_pytests_status_on(tmp_path):
    stub, log = _stub(tmp_path, torch=True, installed=True, exit_code=3)
    result = _run(stub, "--tests", "-k", "means")
    calls = log.read_text().splitlines()
    assert result.returncode == 3, result.stderr  # pytest's failure is the script's
    assert not [c for c in calls if c.startswith("-m pip")], calls
    assert calls[-1] == "-m pytest -q -n 2 --dist loadfile tests -k means"


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
    assert "exec bash recipes/cpu_tiny/setup_and_run.sh --tests" in text


@pytest.mark.parametrize("torch", [True, False])
def test_the_demo_status_is_passed_on_too(tmp_path, torch):
    stub, _ = _stub(tmp_path, torch=torch, installed=True, exit_code=2)
    assert _run(stub).returncode == 2
