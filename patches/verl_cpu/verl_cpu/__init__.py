"""CPU backend for verl 0.9.1: run ``python -m verl.trainer.main_ppo`` without a GPU.

Nothing here is part of the HMPO algorithm; it is an adaptation of the host framework
that lets the *real* trainer (driver -> Ray -> actor worker -> FSDP2 engine -> loss ->
optimizer -> weight sync -> rollout) run on a laptop or a CI machine.

It is switched on explicitly: install this package (``pip install -e patches/verl_cpu``)
**and** set ``VERL_PLATFORM=cpu``. verl then imports :mod:`verl_cpu.plugin` (entry point
group ``verl.plugins``) in every process, which

* registers a ``cpu`` platform (gloo, no-op device-memory calls)      -> :mod:`verl_cpu.platform`
* makes verl's process groups plain ``gloo``                          -> :mod:`verl_cpu.distributed`
* registers verl's FSDP/FSDP2 engines for the ``cpu`` device          -> :mod:`verl_cpu.engines`
* registers an HF-transformers rollout server as ``rollout.name=hf``  -> :mod:`verl_cpu.rollout`
* lets verl's own vLLM server run on vLLM's CPU build (``rollout.name=vllm``) -> :mod:`verl_cpu.vllm_rollout`
* checks the config in the driver before Ray starts                   -> :mod:`verl_cpu.preflight`

Without ``VERL_PLATFORM=cpu`` the plugin returns immediately, so GPU users never load it.
"""

SUPPORTED_VERL_VERSION = "0.9.1"
ROLLOUT_NAME = "hf"
ENV_SWITCH = "VERL_PLATFORM"

__all__ = ["SUPPORTED_VERL_VERSION", "ROLLOUT_NAME", "ENV_SWITCH"]
