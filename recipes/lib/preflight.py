"""Preflight of a GPU node: is the software the recipes need installed, before Ray starts?

    python3 recipes/lib/preflight.py --engine fsdp --gpus 8        # what run.sh runs (PREFLIGHT=1)
    python3 recipes/lib/preflight.py --engine megatron --gpus 8
    python3 recipes/lib/preflight.py --cpu                         # what run.sh runs for SIZE=cpu

Checks, reporting every problem at once (exit 3) or printing one `preflight: ok` line (exit 0):
- each `name==version` pin of recipes/requirements-gpu.txt (and -megatron.txt for --engine
  megatron) is installed at that version, and each unpinned name there is importable;
- torch sees CUDA and at least --gpus devices (a CPU-only torch build and a CUDA build that sees
  no device -- no driver, or one too old for the build's CUDA -- are told apart);
- hmpo-verl is installed with its `verl.plugins` entry point (verl imports the plugin in every
  worker through it; without it our loss modes are "Unsupported" in the workers).
--cpu (the CPU size, recipes/size/cpu.yaml) checks the pins that are not GPU builds (lines of
requirements-gpu.txt without a `# gpu-only` comment), hmpo-verl's entry point, and the CPU
backend's (patches/verl_cpu); no CUDA.
Nothing here imports verl, vLLM or Megatron (a missing or broken one is exactly what it reports);
only torch is imported, for CUDA. Standard library otherwise, so it runs on a bare Python.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import importlib.util
import re
import sys
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1]
REQUIREMENTS = {"fsdp": ["requirements-gpu.txt"],
                "megatron": ["requirements-gpu.txt", "requirements-gpu-megatron.txt", "requirements-gpu-megatron-nodeps.txt"]}

# distribution name (as pinned) -> module it provides, where the two differ
MODULES = {
    "flash-attn": "flash_attn",
    "TransferQueue": "transfer_queue",
    "megatron-core": "megatron.core",
    "megatron-bridge": "megatron.bridge",
    "transformer-engine": "transformer_engine",
    "nvidia-modelopt": "modelopt",
    "cupy-cuda13x": "cupy",
    "nvidia-mathdx": "nvmath",
}
# distribution -> a further module it must provide: PyPI's transformer-engine meta-package installs the core
# without the PyTorch extension, which the wheel the recipes pin carries
EXTRA_MODULES = {"transformer-engine": "transformer_engine_torch"}
# CUDA major version of a torch build -> the NVIDIA driver branch it needs (CUDA's release notes,
# "minimum required driver version" for the toolkit's major version on Linux).
MIN_DRIVER = {"12": "R525", "13": "R580"}
GPU_ONLY = "# gpu-only"
# entry point name -> the distribution a user installs, for the message
PLUGINS = {"hmpo_verl": "hmpo-verl (`pip install -e .` from the repository root)",
           "verl_cpu": "the CPU backend (`pip install -e patches/verl_cpu`)"}
_LINE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*(==\s*(?P<version>[^\s;#]+))?"
                   r"(\s*@\s*(?P<url>\S+))?")
_WHEEL_VERSION = re.compile(r"/[^/-]+-(?P<version>[^-/]+)-[^/]+\.whl$")


def requirements(engine: str, cpu: bool = False) -> dict[str, str | None]:
    """{distribution: pinned version or None} from the engine's requirements files (last wins).

    With ``cpu``, only the lines without a ``# gpu-only`` comment (the pins a CPU install shares).
    """
    pins: dict[str, str | None] = {}
    for name in REQUIREMENTS[engine]:
        for raw in (RECIPES / name).read_text().splitlines():
            if cpu and GPU_ONLY in raw:
                continue
            line = raw.split("#", 1)[0].strip()
            if not line or line.startswith("-"):
                continue  # comments, pip options, -r includes (listed in REQUIREMENTS)
            match = _LINE.match(line)
            if match is None:
                raise SystemExit(f"{name}: cannot read requirement {raw!r}")
            version = match["version"]
            if match["url"]:  # a wheel URL: its file name carries the version
                wheel = _WHEEL_VERSION.search(match["url"])
                version = wheel["version"] if wheel else None
            pins[match["name"]] = version
    return pins


def _installed_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing or broken
        return False


def check_packages(pins: dict[str, str | None]) -> list[str]:
    problems = []
    for dist, pinned in pins.items():
        version = _installed_version(dist)
        module = MODULES.get(dist, dist.replace("-", "_"))
        if version is None and not _importable(module):
            problems.append(f"{dist}{'==' + pinned if pinned else ''} is not installed (no module {module!r})")
        elif pinned is not None and version is not None and version.split("+")[0] != pinned:
            problems.append(f"{dist}=={version} is installed; the recipes pin {dist}=={pinned}")
        elif dist in EXTRA_MODULES and not _importable(EXTRA_MODULES[dist]):
            problems.append(f"{dist} is installed without module {EXTRA_MODULES[dist]!r} (its PyTorch extension): "
                            "install the wheel the recipes pin")
    return problems


def check_cuda(gpus: int) -> list[str]:
    try:
        import torch
    except ImportError:
        return []  # reported with the pins
    cuda = torch.version.cuda
    if cuda is None:
        return [f"torch {torch.__version__} is a CPU-only build: install the CUDA build the recipes pin "
                "(requirements-gpu.txt: torch 2.11.0 for CUDA 13, NVIDIA driver R580 or newer)"]
    if not torch.cuda.is_available():
        driver = MIN_DRIVER.get(cuda.split(".")[0], f"one for CUDA {cuda}")
        return [f"torch {torch.__version__} (built for CUDA {cuda}) sees no CUDA device: no NVIDIA driver, or a driver "
                f"older than CUDA {cuda} needs ({driver} or newer; `nvidia-smi` prints the driver's version and the "
                "highest CUDA it supports)"]
    count = torch.cuda.device_count()
    if count < gpus:
        return [f"torch sees {count} CUDA device(s); NGPUS_PER_NODE={gpus}"]
    return []


def check_plugins(names: tuple[str, ...] = ("hmpo_verl",)) -> list[str]:
    """Each package in ``names`` has a ``verl.plugins`` entry point whose module can be found.

    An entry point's value is ``module`` or ``module:attr`` (hmpo-verl's: ``hmpo_verl.verl_plugin``);
    it belongs to the package named by the value's first dotted component.
    """
    found = {}
    for ep in metadata.entry_points(group="verl.plugins"):
        module = ep.value.split(":")[0].strip()
        found.setdefault(module.split(".")[0], module)
    problems = []
    for name in names:
        module = found.get(name)
        if module is None:
            problems.append(f"{PLUGINS.get(name, name)} is not installed with its verl.plugins entry point, on every node")
        elif not _importable(module):
            problems.append(f"the verl.plugins entry point of {name} names module {module!r}, which cannot be found: "
                            f"reinstall {PLUGINS.get(name, name)}")
    return problems


def problems(engine: str, gpus: int, cpu: bool = False) -> list[str]:
    if cpu:
        return check_packages(requirements(engine, cpu=True)) + check_plugins(("hmpo_verl", "verl_cpu"))
    return check_packages(requirements(engine)) + check_cuda(gpus) + check_plugins()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=sorted(REQUIREMENTS), default="fsdp")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs per node the run asks for (NGPUS_PER_NODE)")
    parser.add_argument("--cpu", action="store_true",
                        help="the CPU size: non-GPU pins and the entry points of hmpo-verl and verl_cpu, no CUDA")
    args = parser.parse_args(argv)
    found = problems(args.engine, args.gpus, cpu=args.cpu)
    where = "cpu" if args.cpu else f"{args.engine}, {args.gpus} GPUs"
    if not found:
        print(f"preflight: ok ({where})")
        return 0
    files = " and ".join(f"recipes/{name}" for name in REQUIREMENTS[args.engine])
    print(f"preflight: {len(found)} problem(s) on this node ({where}):", file=sys.stderr)
    for problem in found:
        print(f"  - {problem}", file=sys.stderr)
    print(f"Install what {files} pin (the commands are at the top of the file).", file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main())
