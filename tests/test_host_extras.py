"""The `openrlhf` and `skyrl` extras bring their host and nothing of verl, TRL or the other host.

Read from pyproject.toml and from the hosts' own requirements (the installed distributions' metadata, with
the extras the adapter's extra names). `pip install ".[openrlhf]"` itself cannot run on a CPU machine
(OpenRLHF pins flash-attn, which builds against CUDA), nor `".[skyrl]"` on Python 3.11 (SkyRL needs 3.12).
"""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
EXTRAS = PYPROJECT["project"]["optional-dependencies"]
OTHERS = {"openrlhf": {"verl", "trl", "skyrl", "skyrl-train", "hmpo-verl"},
          "skyrl": {"verl", "trl", "openrlhf", "hmpo-verl"}}


def _requires(dist: str, extras: set[str]) -> set[str]:
    """Names a distribution requires on Linux / this Python, with `extras` on."""
    names = set()
    for text in metadata.requires(dist) or []:
        req = Requirement(text)
        env = {"sys_platform": "linux", "platform_machine": "x86_64", "python_version": "3.12"}
        if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in extras | {""}):
            names.add(req.name.lower().replace("_", "-"))
    return names


@pytest.mark.parametrize("host", ["openrlhf", "skyrl"])
def test_the_extra_names_only_its_host_and_the_host_requires_no_other(host):
    (requirement,) = [Requirement(r) for r in EXTRAS[host]]
    assert requirement.name == host
    try:
        names = _requires(host, set(requirement.extras))
    except metadata.PackageNotFoundError:
        pytest.skip(f"{host} is not installed (recipes/cpu_tiny/setup_and_run.sh installs it)")
    assert names and not names & OTHERS[host], names & OTHERS[host]
    assert metadata.version(host) in requirement.specifier  # the host the parity tests ran against fits the extra
