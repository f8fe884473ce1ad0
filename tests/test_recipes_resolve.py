"""The GPU requirements files, offline: wheels only, installed the way verl 0.9.1 installs them; and
recipes/lib/resolve_gpu.py's argument building, report parsing and classification (its resolve needs the
package index, so it is a script, not a test: its last results are in recipes/README.md).
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import re
import sys
import zipfile
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
sys.path.insert(0, str(RECIPES / "lib"))
import preflight  # noqa: E402
import resolve_gpu  # noqa: E402

FILES = [name for name, _ in resolve_gpu.STEPS]


def _lines(name: str) -> list[str]:
    return [line.split("#", 1)[0].strip() for line in (RECIPES / name).read_text().splitlines()
            if line.split("#", 1)[0].strip()]


# ---------------------------------------------------------------------------------------------
# the files


@pytest.mark.parametrize("name", FILES)
def test_every_file_installs_wheels_only_and_pins_what_it_builds_against(name):
    """`--only-binary=:all:`: pip fails instead of compiling (flash-attn's sdpa build took hours and nvcc)."""
    lines = _lines(name)
    assert "--only-binary=:all:" in lines
    assert "--no-build-isolation" not in (RECIPES / name).read_text()  # nothing is built against torch
    for line in lines:
        if line.startswith("-"):
            continue
        if "@" in line:
            assert re.search(r"@ https://\S+\.whl$", line), f"a direct reference must be a wheel: {line}"


def test_flash_attn_is_a_wheel_not_pypis_sdist():
    (line,) = [x for x in _lines("requirements-gpu.txt") if x.startswith("flash-attn")]
    assert line.endswith("flash_attn-2.8.3-cp312-cp312-linux_x86_64.whl")
    # the version verl's fsdp / megatron extras pin
    extra = [r for r in metadata.requires("verl") if r.startswith("flash-attn") and "flash-attn-cu130torch211" in r]
    assert extra and "==2.8.3" in extra[0]
    assert preflight.requirements("fsdp")["flash-attn"] == "2.8.3"


def test_megatron_is_installed_the_way_verl_installs_it():
    megatron = _lines("requirements-gpu-megatron.txt")
    nodeps = _lines("requirements-gpu-megatron-nodeps.txt")
    pins = preflight.requirements("megatron")
    # Megatron-Bridge without its dependencies (they pin another transformers and flashinfer): its own file
    assert not any(x.startswith("megatron-bridge") for x in megatron)
    assert [x for x in nodeps if not x.startswith("-")] == [
        "megatron-bridge @ https://github.com/verl-project/verl-wheelhouse/releases/download/megatron-bridge-r0.5.0/"
        "megatron_bridge-0.5.2-py3-none-any.whl"]
    assert dict(resolve_gpu.STEPS)["requirements-gpu-megatron-nodeps.txt"] is True  # resolved with --no-deps
    assert pins["megatron-bridge"] == "0.5.2" == _verl_pin("megatron", "megatron-bridge")
    assert pins["megatron-core"] == "0.18.0"  # the core verl pairs with Bridge 0.5.2 (core_v0.18.0)
    assert pins["nvidia-modelopt"] == _verl_pin("megatron", "nvidia-modelopt")
    # transformer-engine and apex: wheels with the PyTorch extension / NVIDIA's apex, not PyPI's projects
    for name in ("transformer-engine", "apex"):
        (line,) = [x for x in megatron if x.startswith(name + " ")]
        assert "verl-wheelhouse" in line and line.endswith("-cp312-cp312-linux_x86_64.whl")
    # the Python every wheelhouse build is for
    for name in FILES:
        assert resolve_gpu.declared_pythons((RECIPES / name).read_text()) == ["3.12"]


def _verl_pin(extra: str, name: str) -> str:
    from packaging.requirements import Requirement

    for text in metadata.requires("verl"):
        req = Requirement(text)
        if req.name == name and req.marker is not None and req.marker.evaluate({"extra": extra}):
            return next(iter(req.specifier)).version
    raise AssertionError(f"verl[{extra}] has no {name}")


def test_preflight_catches_transformer_engine_without_its_pytorch_extension(monkeypatch):
    monkeypatch.setattr(preflight, "_installed_version", lambda dist: "2.16.1")
    monkeypatch.setattr(preflight, "_importable", lambda module: module != "transformer_engine_torch")
    (problem,) = preflight.check_packages({"transformer-engine": "2.16.1"})
    assert "without module 'transformer_engine_torch'" in problem


# ---------------------------------------------------------------------------------------------
# the script's pure parts


def test_pip_args_resolve_for_the_target_without_installing(tmp_path):
    args = resolve_gpu.pip_args(tmp_path / "r.txt", "3.12", tmp_path / "rep.json", tmp_path / "t",
                                tmp_path / "links", no_deps=True)
    for flag in ("--dry-run", "--ignore-installed", "--only-binary=:all:", "--no-deps"):
        assert flag in args
    pairs = list(zip(args, args[1:]))
    assert ("--python-version", "3.12") in pairs and ("--abi", "cp312") in pairs and ("--implementation", "cp") in pairs
    platforms = [b for a, b in pairs if a == "--platform"]
    # pip 23 does not widen a manylinux_2_28 tag to older ones: torch's cuDNN wheel is manylinux_2_27
    assert {"manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux2014_x86_64", "linux_x86_64"} <= set(platforms)
    assert ("--report", str(tmp_path / "rep.json")) in pairs and args[-2:] == ["-r", str(tmp_path / "r.txt")]


def test_report_parsing_counts_wheels_source_builds_and_stand_ins(tmp_path):
    stand_ins = tmp_path / "stand_ins"
    report = {"install": [
        {"metadata": {"name": "torch", "version": "2.11.0"},
         "download_info": {"url": "https://files.example/torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl#sha256=1"}},
        {"metadata": {"name": "flash-attn", "version": "2.8.3"},
         "download_info": {"url": "https://files.example/flash_attn-2.8.3.tar.gz"}},
        {"metadata": {"name": "apex", "version": "0.1"},
         "download_info": {"url": (stand_ins / "apex-0.1-py3-none-any.whl").as_uri()}},
    ]}
    assert resolve_gpu.parse_report(json.loads(json.dumps(report)), stand_ins) == (
        ["torch==2.11.0"], ["flash-attn==2.8.3"], ["apex==0.1"])


def test_missing_requirement_is_read_from_pips_error():
    stderr = ("ERROR: Could not find a version that satisfies the requirement nvidia-cudnn-cu13==9.19.0.56; "
              'platform_system == "Linux" (from torch) (from versions: 0.0.0a0)\n'
              'ERROR: No matching distribution found for nvidia-cudnn-cu13==9.19.0.56; platform_system == "Linux"\n')
    assert resolve_gpu.missing_requirement(stderr) == "nvidia-cudnn-cu13==9.19.0.56"
    assert resolve_gpu.missing_requirement("ERROR: ResolutionImpossible: ...") is None


@pytest.mark.parametrize("files,versions,expected", [
    (None, None, "lacking"),  # no such project on the index
    ([("megatron_bridge-0.5.1-py3-none-any.whl", "")], ["0.5.1"], "lacking"),  # not that version
    ([("flash_attn-2.8.3.tar.gz", "")], ["2.8.3"], "no-wheel"),  # only an sdist: a defect of the file
    ([("megatron_core-0.18.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl", "")], ["0.18.0"], "no-wheel"),
    ([("x-1.0-cp312-cp312-manylinux_2_27_x86_64.whl", "")], ["1.0"], "lacking"),  # a wheel fits: pip's view lacks it
    ([("x-1.0-cp312-cp312-manylinux_2_27_x86_64.whl", ">=3.13")], ["1.0"], "no-wheel"),  # its Requires-Python
    ([("llguidance-1.7.0-cp39-abi3-manylinux_2_31_x86_64.whl", ">=3.10")], ["1.7.0"], "lacking"),  # abi3 from cp39 on
    ([("x-1.0-py3-none-win_amd64.whl", "")], ["1.0"], "no-wheel"),
])
def test_classify_tells_a_missing_wheel_from_a_missing_package(files, versions, expected):
    name = re.split(r"[-_]\d", files[0][0])[0].replace("_", "-") if files else "some-package"
    assert resolve_gpu.classify(f"{name}=={versions[0] if versions else '1.0'}", "3.12", files, versions) == expected


def test_a_wheel_url_for_another_python_is_a_defect_before_any_network():
    url = "flash_attn-2.8.3-cp312-cp312-linux_x86_64.whl"
    assert resolve_gpu.wheel_fits(url, "3.12") and not resolve_gpu.wheel_fits(url, "3.11")
    assert resolve_gpu.wheel_fits("megatron_bridge-0.5.2-py3-none-any.whl", "3.10")


def test_stand_in_wheel_satisfies_the_requirement(tmp_path):
    path = resolve_gpu.stand_in_wheel(tmp_path, "nvidia-cudnn-cu13==9.19.0.56")
    assert path.name == "nvidia_cudnn_cu13-9.19.0.56-py3-none-any.whl"
    with zipfile.ZipFile(path) as whl:
        meta = whl.read("nvidia_cudnn_cu13-9.19.0.56.dist-info/METADATA").decode()
    assert "Name: nvidia-cudnn-cu13\nVersion: 9.19.0.56" in meta and "Requires-Dist" not in meta
    assert resolve_gpu.stand_in_wheel(tmp_path, "apex").name == "apex-0-py3-none-any.whl"


def test_unreachable_wheel_urls_and_indexes_are_taken_out_and_named():
    text = (RECIPES / "requirements-gpu-megatron.txt").read_text()
    urls = resolve_gpu.wheel_urls(text)
    assert set(urls) == {"apex", "transformer-engine"}
    assert resolve_gpu.wheel_requirement("transformer-engine", urls["transformer-engine"]) == "transformer-engine==2.16.1"
    out = resolve_gpu.without(text, [urls["apex"]])
    assert f"# (unreachable here) apex @ {urls['apex']}" in out and "\ntransformer-engine @" in out
    assert resolve_gpu.extra_indexes((RECIPES / "requirements-gpu.txt").read_text()) == [
        "https://download.pytorch.org/whl/cu130"]
