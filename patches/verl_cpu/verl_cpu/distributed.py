"""Plain ``gloo`` process groups on CPU.

verl 0.9.1 builds its default backend string as ``f"cpu:gloo,{device}:{ccl}"``
(``verl.utils.distributed``). On the ``cpu`` platform that reads
``"cpu:gloo,cpu:gloo"`` and torch rejects it (``Duplicate device type cpu``). The two
functions that build it are wrapped so that, when no backend is given, they pass
``"gloo"``. Callers that import the functions by name (``verl.workers.engine_workers``)
pick the wrapped ones up because the plugin runs before those modules are imported.
"""

from __future__ import annotations

import functools

import verl.utils.distributed as verl_distributed

CPU_BACKEND = "gloo"


def _patch_initialize_global_process_group_ray() -> None:
    original = verl_distributed.initialize_global_process_group_ray
    if getattr(original, "_verl_cpu_patched", False):
        return

    @functools.wraps(original)
    def initialize_global_process_group_ray(timeout_second=None, backend=None):
        return original(timeout_second=timeout_second, backend=backend or CPU_BACKEND)

    initialize_global_process_group_ray._verl_cpu_patched = True
    verl_distributed.initialize_global_process_group_ray = initialize_global_process_group_ray


def _patch_initialize_global_process_group() -> None:
    """The torchrun path (SFT trainer, tests): same fix, the original hard-codes its backend."""
    original = verl_distributed.initialize_global_process_group
    if getattr(original, "_verl_cpu_patched", False):
        return

    @functools.wraps(original)
    def initialize_global_process_group(timeout_second=36000):
        import os
        from datetime import timedelta

        import torch.distributed

        torch.distributed.init_process_group(
            backend=CPU_BACKEND,
            timeout=timedelta(seconds=timeout_second),
            init_method=os.environ.get("DIST_INIT_METHOD", None),
        )
        return int(os.environ["LOCAL_RANK"]), int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])

    initialize_global_process_group._verl_cpu_patched = True
    verl_distributed.initialize_global_process_group = initialize_global_process_group


def install() -> None:
    """Make verl's process-group helpers use plain gloo."""
    _patch_initialize_global_process_group_ray()
    _patch_initialize_global_process_group()
