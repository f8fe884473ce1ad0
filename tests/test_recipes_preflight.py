"""recipes/lib/preflight.py against the software really installed here, and its CUDA messages.

The plugin check runs against the real `verl.plugins` entry points of this environment (hmpo-verl
and verl_cpu are installed editable): a preflight that cannot find an installed plugin stops every
default `run.sh` before Ray starts. The CUDA check is fed stand-in torch modules, one per case a
GPU user meets (a CPU-only build; a CUDA build with no driver or an old one; too few GPUs).
"""

from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import pytest

PREFLIGHT = Path(__file__).resolve().parents[1] / "recipes" / "lib" / "preflight.py"


def _load():
    spec = importlib.util.spec_from_file_location("preflight", PREFLIGHT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


preflight = _load()


def test_the_installed_plugin_entry_point_is_found():
    values = [ep.value for ep in metadata.entry_points(group="verl.plugins") if ep.name == "hmpo_verl"]
    assert values == ["hmpo_verl.verl_plugin"]  # a module path, not the package name
    assert preflight.check_plugins() == []
    assert preflight.check_plugins(("hmpo_verl", "verl_cpu")) == []


def test_a_missing_plugin_is_named_with_its_install_command(monkeypatch):
    monkeypatch.setattr(preflight.metadata, "entry_points", lambda group: [])
    (problem,) = preflight.check_plugins()
    assert "hmpo-verl" in problem and "pip install -e ." in problem
    assert "patches/verl_cpu" in preflight.check_plugins(("verl_cpu",))[0]


def test_an_entry_point_whose_module_is_gone_is_reported(monkeypatch):
    stale = metadata.EntryPoint(name="hmpo_verl", value="hmpo_verl.no_such_module", group="verl.plugins")
    monkeypatch.setattr(preflight.metadata, "entry_points", lambda group: [stale])
    (problem,) = preflight.check_plugins()
    assert "'hmpo_verl.no_such_module', which cannot be found" in problem


def test_cpu_mode_passes_here_and_checks_the_non_gpu_pins():
    result = subprocess.run([sys.executable, str(PREFLIGHT), "--cpu"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "preflight: ok (cpu)"
    cpu_pins = preflight.requirements("fsdp", cpu=True)
    assert cpu_pins == {"verl": metadata.version("verl"), "TransferQueue": metadata.version("TransferQueue")}
    gpu_only = set(preflight.requirements("fsdp")) - set(cpu_pins)
    assert gpu_only == {"torch", "torchvision", "torchaudio", "vllm", "transformers", "flash-attn", "cupy-cuda13x"}


def test_cpu_mode_on_a_bare_python_names_the_plugins_and_pins():
    result = subprocess.run([sys.executable, "-S", str(PREFLIGHT), "--cpu"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 3
    for piece in ("- verl==", "- TransferQueue==", "hmpo-verl", "patches/verl_cpu"):
        assert piece in result.stderr, (piece, result.stderr)
    assert "vllm" not in result.stderr and "CUDA" not in result.stderr


def _fake_torch(cuda: str | None, available: bool, count: int = 0, gib: float = 79.1) -> types.ModuleType:
    torch = types.ModuleType("torch")
    torch.__version__ = "2.11.0" + (f"+cu{cuda.replace('.', '')}" if cuda else "+cpu")
    torch.version = types.SimpleNamespace(cuda=cuda)
    props = types.SimpleNamespace(name="NVIDIA Fake", total_memory=int(gib * 2**30))
    torch.cuda = types.SimpleNamespace(is_available=lambda: available, device_count=lambda: count,
                                       get_device_properties=lambda i: props)
    return torch


@pytest.mark.parametrize("cuda,available,count,expected", [
    (None, False, 0, "is a CPU-only build"),
    ("13.0", False, 0, "no NVIDIA driver, or a driver older than CUDA 13.0 needs (R580 or newer"),
    ("12.8", False, 0, "(R525 or newer"),
    ("13.0", True, 4, "torch sees 4 CUDA device(s); NGPUS_PER_NODE=8"),
])
def test_cuda_messages_tell_a_cpu_build_from_a_driver_problem(monkeypatch, cuda, available, count, expected):
    monkeypatch.setitem(sys.modules, "torch", _fake_torch(cuda, available, count))
    (problem,) = preflight.check_cuda(8)
    assert expected in problem
    if cuda is not None:
        assert "CPU-only" not in problem


def test_cuda_ok(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", _fake_torch("13.0", True, 8))  # an 80 GB H100: 79.1 GiB to torch
    assert preflight.check_cuda(8) == []


def test_a_gpu_below_the_80_gb_class_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", _fake_torch("13.0", True, 2, gib=39.4))  # an A100 40 GB
    problems = preflight.check_cuda(2)
    assert len(problems) == 2 and "GPU 1 (NVIDIA Fake) has 39.4 GiB" in problems[1] and "at least 75" in problems[1]
    assert "MIN_GPU_GIB=39 bash recipes/<task>/run.sh" in problems[1]
    assert preflight.check_cuda(2, min_gib=39.0) == []  # the advice, followed (run.sh passes it: test_recipes_preflight_run)


def test_the_cpu_backends_resource_check_leaves_a_joined_cluster_to_its_nodes(monkeypatch):
    """run.sh joining a cluster (RAY_ADDRESS=<host>:<port>) clears ray_init's num_cpus / num_gpus, which Ray refuses
    from a connecting driver; verl_cpu's driver-side check must not demand them back."""
    from omegaconf import OmegaConf
    from verl_cpu.preflight import check_ray_resources

    config = OmegaConf.create({"trainer": {"nnodes": 2, "n_gpus_per_node": 1},
                               "ray_kwargs": {"ray_init": {"num_cpus": None, "num_gpus": None}}})
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert len(check_ray_resources(config)) == 2  # its own ray.init: both are needed
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.2:6379")
    assert check_ray_resources(config) == []
