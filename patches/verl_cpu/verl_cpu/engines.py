"""Register verl's FSDP training engines for the ``cpu`` device.

verl 0.9.1 registers ``FSDPEngineWithLMHead`` (language model) and the value-model
engine for backends ``fsdp``/``fsdp2`` on devices ``cuda`` and ``npu`` only, so
``EngineRegistry.get_engine_cls`` finds nothing for ``cpu``. The same classes work on
CPU with ``strategy=fsdp2`` (FSDP1's ``sync_module_states`` needs a GPU), so we add
``cpu`` entries pointing at verl's own classes -- no engine code is copied.
"""

from __future__ import annotations

from verl_cpu.import_hooks import after_import

FSDP_IMPL = "verl.workers.engine.fsdp.transformer_impl"
FSDP_BACKENDS = ("fsdp", "fsdp2")
ENGINE_CLASSES = {"language_model": "FSDPEngineWithLMHead", "value_model": "FSDPEngineWithValueHead"}


def _register_fsdp_for_cpu(module) -> None:
    from verl.workers.engine.base import EngineRegistry

    for model_type, class_name in ENGINE_CLASSES.items():
        engine_cls = getattr(module, class_name, None)
        if engine_cls is None:
            continue
        for backend in FSDP_BACKENDS:
            backends = EngineRegistry._engines.setdefault(model_type, {}).setdefault(backend, {})
            backends.setdefault("cpu", engine_cls)


def install() -> None:
    """Register the FSDP engines for ``cpu`` as soon as verl's FSDP engine module loads."""
    after_import(FSDP_IMPL, _register_fsdp_for_cpu)
