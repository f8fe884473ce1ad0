"""Run by tests/test_openrlhf_launcher.py in a fresh process: start Ray as `hmpo_verl.openrlhf.train_ppo_ray`
does (its `runtime_env`), and in a Ray actor import OpenRLHF's policy loss as OpenRLHF's actors do
(`from openrlhf.models import PolicyLoss`, in openrlhf/trainer/ray/ppo_actor.py) and build it with the
arguments ppo_actor.py passes. Prints one JSON line.

CUDA-only packages OpenRLHF imports at module level and that cannot be installed on a CPU machine
(flash-attn; DeepSpeed where absent) are empty placeholders in that actor (`stand_in`); everything
else -- openrlhf.models, transformers, peft -- is the real package.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
import types

import ray

from hmpo_verl.host_loss import LossOptions
from hmpo_verl.openrlhf.train_ppo_ray import runtime_env

GPU_ONLY = ("deepspeed", "flash_attn", "flash_attn.bert_padding", "flash_attn.utils", "flash_attn.utils.distributed")


class _Placeholder(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def missing(*args, **kwargs):
            raise RuntimeError(f"{self.__name__}.{name} is a placeholder (not installed on this CPU machine)")

        return missing


def stand_in(names=GPU_ONLY) -> list[str]:
    """Placeholder modules for those of `names` that are not installed; returns them."""
    placed = []
    for name in names:
        top = name.split(".")[0]
        if name in sys.modules or (top not in placed and importlib.util.find_spec(top) is not None):
            continue
        module = _Placeholder(name)
        module.__path__ = []
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        sys.modules[name] = module
        placed.append(name)
    return placed


def example_inputs():
    """(log_probs (a leaf), old_log_probs, advantages, action_mask), `(3, 5)` float64."""
    import torch

    g = torch.Generator().manual_seed(0)
    old = -torch.rand(3, 5, generator=g, dtype=torch.float64)
    logp = (old + 0.1 * torch.randn(3, 5, generator=g, dtype=torch.float64)).requires_grad_(True)
    adv = torch.randn(3, 1, generator=g, dtype=torch.float64).expand(3, 5)
    return logp, old, adv, torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] * 4 + [0]], dtype=torch.bool)


@ray.remote(num_cpus=0)
class PolicyActor:
    """Does what OpenRLHF's PolicyModelActor does for its loss: import it, build it as ppo_actor.py does."""

    def build_and_run(self) -> dict:
        import os

        from hmpo_verl.openrlhf._patch import _PatchingFinder

        hooked = any(isinstance(f, _PatchingFinder) for f in sys.meta_path)
        placed = stand_in()
        import torch
        from openrlhf.models import PolicyLoss  # noqa: E402  (as openrlhf/trainer/ray/ppo_actor.py)

        loss_fn = PolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=None, token_level_loss=False,
                             policy_loss_type="ppo", is_correction_level="off", is_correction_mode="mask",
                             is_correction_gating="ratio", is_correction_threshold=[0.5, 5.0])
        logp, old, adv, mask = example_inputs()
        loss = loss_fn(logp, old, adv, action_mask=mask)[0]
        loss.backward()
        import openrlhf.models.loss as openrlhf_loss

        return {"pid": os.getpid(), "hook_ran": hooked, "placeholders": placed, "class": type(loss_fn).__mro__[1].__module__
                + "." + type(loss_fn).__mro__[1].__name__, "options": loss_fn.options.to_json(),
                "loss": loss.item(), "grad_sum": logp.grad.sum().item(),
                "openrlhf_loss_file": openrlhf_loss.__file__, "clip_eps_high": loss_fn.region.ratio_high}


def main() -> None:
    options = LossOptions(loss_mode=sys.argv[1], power=float(sys.argv[2]), clip_level=sys.argv[3], prefix="--pm")
    ray.init(num_cpus=1, include_dashboard=False, runtime_env=runtime_env(options))
    try:
        result = ray.get(PolicyActor.remote().build_and_run.remote())
    finally:
        ray.shutdown()
    print(json.dumps({**result, "driver_pid": __import__("os").getpid()}))


if __name__ == "__main__":
    main()
