"""A ``cpu`` platform for verl's platform registry (``VERL_PLATFORM=cpu``).

verl 0.9.1 resolves every device question -- device name, ``torch.<device>`` module,
collective backend, Ray resource name -- through ``verl.plugin.platform.get_platform()``.
Its registry has ``nvidia``, ``huawei`` and ``rocm`` only; with no accelerator it falls
back to ``nvidia`` and then fails on the first CUDA call. This module adds a ``cpu``
platform:

* device ``cpu``, collective backend ``gloo``;
* :data:`cpu_device_module`, a stand-in for ``torch.cuda`` whose memory functions
  (``empty_cache``, ``memory_reserved``, ``mem_get_info``, ...) are no-ops or report
  host memory, because verl calls them unconditionally;
* Ray resource ``GPU``: verl's resource pools always ask Ray for accelerators, so a
  CPU run starts Ray with *logical* GPUs (``+ray_kwargs.ray_init.num_gpus=N``); each
  worker takes one logical slot and nothing else happens with it.
"""

from __future__ import annotations

import os
import types
from contextlib import contextmanager
from typing import Any, Optional

import torch
from verl.plugin.platform import PlatformBase, PlatformRegistry

PLATFORM_NAME = "cpu"


def _host_memory() -> tuple[int, int]:
    """(free, total) bytes of host memory, from /proc/meminfo when available."""
    try:
        info = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                info[key] = int(value.split()[0]) * 1024
        return info.get("MemAvailable", 0), info.get("MemTotal", 0)
    except OSError:
        return 0, 0


def _zero(*args, **kwargs) -> int:
    return 0


def _noop(*args, **kwargs) -> None:
    return None


def _make_cpu_device_module() -> types.ModuleType:
    """``torch.cpu`` plus the ``torch.cuda``-style functions verl calls on its device module."""
    module = types.ModuleType("verl_cpu.device_module", "torch.cpu with no-op device-memory calls")
    for name in dir(torch.cpu):
        if not name.startswith("__"):
            setattr(module, name, getattr(torch.cpu, name))
    module.empty_cache = _noop
    module.ipc_collect = _noop
    module.reset_peak_memory_stats = _noop
    module.set_per_process_memory_fraction = _noop
    module.memory_allocated = _zero
    module.memory_reserved = _zero
    module.max_memory_allocated = _zero
    module.max_memory_reserved = _zero
    module.mem_get_info = lambda *args, **kwargs: _host_memory()
    module.get_device_name = lambda *args, **kwargs: "cpu"
    module.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    module.set_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    module.manual_seed = lambda seed: torch.manual_seed(seed)
    module.manual_seed_all = lambda seed: torch.manual_seed(seed)
    module.is_available = lambda: True
    module.device_count = lambda: 1
    module.current_device = lambda: 0
    module.set_device = _noop
    return module


cpu_device_module = _make_cpu_device_module()


@PlatformRegistry.register(platform=PLATFORM_NAME)
class PlatformCPU(PlatformBase):
    """verl platform for running everything on the host CPU."""

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> types.ModuleType:
        return cpu_device_module

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check=False) -> bool:
        # Never auto-detected: the CPU backend is chosen explicitly with VERL_PLATFORM=cpu.
        return False

    def current_device(self) -> str:
        # verl passes this value straight to ``tensor.to(...)`` / ``torch.device(...)``;
        # an int would mean ``cuda:<int>``, so the CPU platform answers ``"cpu"``.
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: Optional[int] = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0) -> tuple[Optional[int], Optional[int]]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        # Ray sets CUDA_VISIBLE_DEVICES for actors holding logical GPUs; harmless on CPU.
        return "CUDA_VISIBLE_DEVICES"

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return "GPU"  # logical GPUs: see the module docstring

    def ray_resource_options(self, num_gpus: float) -> dict[str, Any]:
        return {"num_gpus": num_gpus}

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def rollout_env_vars(self) -> dict[str, str]:
        return {"VERL_PLATFORM": os.environ.get("VERL_PLATFORM", PLATFORM_NAME)}

    def cudart(self) -> Any:
        return None
