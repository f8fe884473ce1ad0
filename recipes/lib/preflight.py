"""Preflight of a GPU node: is the software the recipes need installed, before Ray starts?

    python3 recipes/lib/preflight.py --engine fsdp --gpus 8        # what run.sh runs (PREFLIGHT=1)
    python3 recipes/lib/preflight.py --engine megatron --gpus 8

Checks, reporting every problem at once (exit 3) or printing one `preflight: ok` line (exit 0):
- each `name==version` pin of recipes/requirements-gpu.txt (and -megatron.txt for --engine
  megatron) is installed at that version, and each unpinned name there is importable;
- torch sees CUDA and at least --gpus devices;
- hmpo-verl is installed with its `verl.plugins` entry point (verl imports the plugin in every
  worker through it; without it our loss modes are "Unsupported" in the workers).
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
REQUIREMENTS = {"fsdp": ["requirements-gpu.txt"], "megatron": ["requirements-gpu.txt", "requirements-gpu-megatron.txt"]}

# distribution name (as pinned) -> module it provides, where the two differ
MODULES = {
    "flash-attn": "flash_attn",
    "TransferQueue": "transfer_queue",
    "megatron-core": "megatron.core",
    "megatron-bridge": "megatron.bridge",
    "transformer-engine": "transformer_engine",
}
_LINE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*(==\s*(?P<version>[^\s;#]+))?")


def requirements(engine: str) -> dict[str, str | None]:
    """{distribution: pinned version or None} from the engine's requirements files (last wins)."""
    pins: dict[str, str | None] = {}
    for name in REQUIREMENTS[engine]:
        for raw in (RECIPES / name).read_text().splitlines():
            line = raw.split("#", 1)[0].strip()
            if not line or line.startswith("-"):
                continue  # comments, pip options, -r includes (listed in REQUIREMENTS)
            match = _LINE.match(line)
            if match is None:
                raise SystemExit(f"{name}: cannot read requirement {raw!r}")
            pins[match["name"]] = match["version"]
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
    return problems


def check_cuda(gpus: int) -> list[str]:
    try:
        import torch
    except ImportError:
        return []  # reported with the pins
    if not torch.cuda.is_available():
        return [f"torch {torch.__version__} sees no CUDA device (a CPU-only build, or no driver)"]
    count = torch.cuda.device_count()
    if count < gpus:
        return [f"torch sees {count} CUDA device(s); NGPUS_PER_NODE={gpus}"]
    return []


def check_plugin() -> list[str]:
    names = {ep.value.split(":")[0] for ep in metadata.entry_points(group="verl.plugins")}
    if "hmpo_verl" not in names:
        return ["hmpo-verl is not installed with its verl.plugins entry point: `pip install --no-build-isolation -e .` "
                "from the repository root, on every node"]
    return []


def problems(engine: str, gpus: int) -> list[str]:
    return check_packages(requirements(engine)) + check_cuda(gpus) + check_plugin()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=sorted(REQUIREMENTS), default="fsdp")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs per node the run asks for (NGPUS_PER_NODE)")
    args = parser.parse_args(argv)
    found = problems(args.engine, args.gpus)
    if not found:
        print(f"preflight: ok ({args.engine}, {args.gpus} GPUs)")
        return 0
    files = " and ".join(f"recipes/{name}" for name in REQUIREMENTS[args.engine])
    print(f"preflight: {len(found)} problem(s) on this node ({args.engine} engine, {args.gpus} GPUs):", file=sys.stderr)
    for problem in found:
        print(f"  - {problem}", file=sys.stderr)
    print(f"Install what {files} pin (the commands are at the top of the file).", file=sys.stderr)
    return 3


if __name__ == "__main__":
    sys.exit(main())
