"""recipes/size/qwen3_30b_a3b_megatron.yaml: a Megatron MoE size, built with verl's Megatron configs.

Megatron itself is not installed here (nor needed to build verl's configs): what is checked is
what verl checks before any Megatron code runs -- Hydra composition with `model_engine=megatron`
(McoreActorConfig / McoreEngineConfig / McoreOptimizerConfig), no unknown key, validate_config
with the recipe's 8 GPUs, the dataclasses the workers build -- plus verl's routing-replay
constraints, every mean file's loss running on the Megatron actor config, and that the adaptive
schedule's optimizer step survives a resume with the optimizer Megatron-core steps (Transformer
Engine's / Apex's FusedAdam, which keeps its step count in param_groups).
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from omegaconf import OmegaConf
from verl.utils.config import omega_conf_to_dataclass

from hmpo_verl.steps import OptimizerStepCounter
from test_recipes_config import (MEAN_FILES, RECIPES, RecipeError, _mean_actor, _run_loss, check_recipe, compose_recipe,
                                 stub_model)  # noqa: F401 - stub_model is a fixture

SIZE = "size=qwen3_30b_a3b_megatron"


def test_megatron_size_builds_verls_megatron_configs(stub_model):
    cfg, built = check_recipe(RECIPES, "math", (SIZE,), model_path=stub_model)
    assert cfg.model_engine == "megatron"
    actor = built["actor"]
    assert type(actor).__name__ == "McoreActorConfig" and actor.strategy == "megatron"
    mc = actor.megatron
    assert (mc.tensor_model_parallel_size, mc.pipeline_model_parallel_size, mc.expert_model_parallel_size,
            mc.expert_tensor_parallel_size) == (2, 1, 8, 1)  # verl's gspo_trainer MoE example
    assert mc.param_offload and mc.optimizer_offload and mc.use_mbridge
    assert mc.override_transformer_config["moe_router_dtype"] == "fp32"
    assert mc.router_replay.mode == "R2"
    assert built["rollout"].tensor_model_parallel_size == 4
    assert built["rollout"].enable_rollout_routing_replay is False  # R3 only; the trainer refuses it with R2
    gpus = cfg.trainer.nnodes * cfg.trainer.n_gpus_per_node
    assert gpus % (mc.tensor_model_parallel_size * mc.pipeline_model_parallel_size) == 0
    assert gpus % (mc.expert_model_parallel_size * mc.expert_tensor_parallel_size) == 0
    assert gpus % built["rollout"].tensor_model_parallel_size == 0
    # a worker's reference model (a KL term) inherits the actor's parallelism through verl's defaults
    _, with_kl = check_recipe(RECIPES, "math", (SIZE, "actor_rollout_ref.actor.use_kl_loss=true"),
                              model_path=stub_model)
    ref = with_kl["ref"].megatron
    assert (ref.tensor_model_parallel_size, ref.expert_model_parallel_size) == (2, 8)


def test_routing_replay_runs_with_dynamic_batch_size_which_verl_0_9_1_supports():
    """R2 records each sequence's experts in the old-log-prob pass and replays them per sequence in the
    update; verl 0.9.1 restores the recorded routes to sample order under dynamic batch size, so the size
    file keeps token-budget micro-batches (the checks on verl's source fail if a verl upgrade drops that)."""
    import importlib.util
    from pathlib import Path

    verl = Path(importlib.util.find_spec("verl").origin).parent  # read, not imported: Megatron is not here
    engine = (verl / "workers" / "engine" / "megatron" / "transformer_impl.py").read_text()
    assert "if use_dynamic_bsz and indices is not None:\n                layers_topk_idx = restore_dynamic_batch(" \
           "layers_topk_idx, indices)" in engine  # the R2 record pass, back in sample order
    assert 'routed_experts = batch.get("routed_experts", None)' in engine  # the update's per-sequence routes
    for task in ("gsm8k", "math"):
        cfg = compose_recipe(RECIPES, task, (SIZE,))
        OmegaConf.resolve(cfg)
        arr = cfg.actor_rollout_ref
        assert arr.actor.megatron.router_replay.mode == "R2"
        assert arr.actor.use_dynamic_bsz and arr.rollout.log_prob_use_dynamic_bsz and arr.ref.log_prob_use_dynamic_bsz
        longest = cfg.data.max_prompt_length + cfg.data.max_response_length
        assert arr.actor.ppo_max_token_len_per_gpu >= longest  # a budget holds at least one whole sequence
        assert arr.actor.megatron.override_transformer_config.moe_permute_fusion is False
    # trainer.balance_batch is dead config on V1 (main_ppo's trainer): it balances whatever the key says
    step = (verl / "trainer" / "ppo" / "v1" / "trainer_base.py").read_text()
    assert "batch = self._balance_batch(batch, metrics=metrics)" in step
    assert "if self.config.trainer.balance_batch" not in step
    gpu_recipe_files = [RECIPES / "gsm8k.yaml", RECIPES / "math.yaml", *(RECIPES / "size").glob("*.yaml")]
    assert not [f for f in gpu_recipe_files if re.search(r"^\s*balance_batch:", f.read_text(), re.M)]


def test_verls_own_example_key_grad_offload_does_not_exist_in_verl_0_9_1():
    """Why the size file omits `megatron.grad_offload`, which verl's example script sets."""
    with pytest.raises(RecipeError, match="grad_offload"):
        check_recipe(RECIPES, "math", (SIZE, "actor_rollout_ref.actor.megatron.grad_offload=true"))


def test_r2_with_bypass_mode_is_rejected_by_verl():
    with pytest.raises(RecipeError, match="R2.*bypass_mode"):
        check_recipe(RECIPES, "math", (SIZE, "algorithm.rollout_correction.bypass_mode=true"))


@pytest.mark.parametrize("correction", ["token_tis", "token_mask"])
def test_r2_composes_with_the_correction_layers(correction):
    check_recipe(RECIPES, "math", (SIZE, f"correction={correction}"))


def test_the_documented_r3_and_disabled_overrides_build(stub_model):
    r3 = ("actor_rollout_ref.actor.megatron.router_replay.mode=R3",
          "actor_rollout_ref.rollout.enable_rollout_routing_replay=true")
    _, built = check_recipe(RECIPES, "math", (SIZE, *r3), model_path=stub_model)
    assert built["actor"].megatron.router_replay.mode == "R3" and built["rollout"].enable_rollout_routing_replay
    _, built = check_recipe(RECIPES, "math", (SIZE, "actor_rollout_ref.actor.megatron.router_replay.mode=disabled"),
                            model_path=stub_model)
    assert built["actor"].megatron.router_replay.mode == "disabled"
    with pytest.raises(RecipeError, match="router_replay mode"):
        check_recipe(RECIPES, "math", (SIZE, "actor_rollout_ref.actor.megatron.router_replay.mode=R4"),
                     model_path=stub_model)


@pytest.mark.parametrize("mean", MEAN_FILES)
def test_every_mean_files_loss_runs_on_the_megatron_actor_config(mean):
    """verl's Megatron engine calls the same ppo_loss -> registered loss with an McoreActorConfig."""
    cfg = compose_recipe(RECIPES, "math", (SIZE, f"mean={mean}"))
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert type(actor).__name__ == "McoreActorConfig"
    loss, grad, metrics = _run_loss(actor)
    ref_loss, ref_grad, _ = _run_loss(_mean_actor(mean))  # the same loss on the FSDP actor config
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)
    assert "actor/pg_clipfrac" in metrics


def test_transformer_config_overrides_are_megatron_fields():
    """override_transformer_config goes to Megatron-core's TransformerConfig as keyword arguments."""
    transformer = pytest.importorskip("megatron.core.transformer.transformer_config")
    fields = {f.name for f in dataclasses.fields(transformer.TransformerConfig)}
    cfg = compose_recipe(RECIPES, "math", (SIZE,))
    keys = set(OmegaConf.to_container(cfg.actor_rollout_ref.actor.megatron.override_transformer_config))
    assert keys <= fields, keys - fields


# ---------------------------------------------------------------------------------------------
# the adaptive schedule's step after a resume, with the optimizer Megatron-core steps


class GroupStepAdam(torch.optim.Optimizer):
    """Keeps its step count in param_groups[i]["step"] and none in the per-parameter state, as
    Transformer Engine's and Apex's FusedAdam do: megatron-core's DistributedOptimizer reads it
    from there ("Extract 'step', for TE FusedAdam support", optimizer/distrib_optimizer.py) and its
    checkpoints save and restore it with the param_groups. The update itself is plain SGD."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if group["params"]:
                group["step"] = group.get("step", 0) + 1
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])
                    self.state[p]["exp_avg"] = p.grad.clone()


def _train(optimizer, counter, steps: int) -> None:
    param = optimizer.param_groups[0]["params"][0]
    for _ in range(steps):
        counter.arm()  # what a scheduled loss does when it runs
        param.sum().backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("optimizer_cls", [GroupStepAdam, torch.optim.AdamW], ids=["fused_adam_style", "torch_adamw"])
def test_schedule_step_survives_a_resume(optimizer_cls):
    counters = []
    try:
        param = torch.nn.Parameter(torch.ones(3))
        empty_group = {"params": []}  # FusedAdam does not count steps of an empty group
        optimizer = optimizer_cls([{"params": [param]}, empty_group])
        counters.append(OptimizerStepCounter())
        _train(optimizer, counters[0], 3)
        assert counters[0].step == 3
        saved = optimizer.state_dict()

        # a new process: a fresh counter and optimizer, the optimizer state loaded from the checkpoint
        resumed_param = torch.nn.Parameter(param.detach().clone())
        resumed = optimizer_cls([{"params": [resumed_param]}, {"params": []}])
        resumed.load_state_dict(saved)
        counters.append(OptimizerStepCounter())
        _train(resumed, counters[1], 1)
        assert counters[1].step == 4  # the schedule continues, not restarts at 1
        if optimizer_cls is GroupStepAdam:
            assert all("step" not in s for s in resumed.state.values())  # only param_groups hold it
    finally:
        for counter in counters:
            counter._handle.remove()


def test_the_first_update_after_a_megatron_resume_continues_the_schedule():
    """What megatron-core's DistributedOptimizer does to the optimizer it wraps when verl resumes
    (megatron/core/optimizer/distrib_optimizer.py): at construction ``load_state_dict(state_dict())``
    on it; when loading a checkpoint, ``_init_optimizer_states_with_dummy_values`` steps it once with
    zero gradients, then ``load_state_dict`` with the checkpoint's param_groups (their "step"). The
    policy loss that runs next, before any real step, must use the checkpoint's step."""
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    from _helpers import actor_config, random_batch
    from hmpo_verl.adaptive import scheduled_power
    from hmpo_verl.steps import STEP_COUNTER

    param = torch.nn.Parameter(torch.ones(3))
    trained = GroupStepAdam([{"params": [param]}, {"params": []}])
    for _ in range(3):
        param.grad = torch.ones(3)
        trained.step()
    saved = trained.state_dict()

    saved_counter = {k: v for k, v in vars(STEP_COUNTER).items() if k not in ("_handle", "_restored")}
    STEP_COUNTER._armed = False
    inner = GroupStepAdam([{"params": [torch.nn.Parameter(torch.ones(3))]}, {"params": []}])
    try:
        inner.load_state_dict(inner.state_dict())  # DistributedOptimizer.__init__
        for group in inner.param_groups:  # _init_optimizer_states_with_dummy_values
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        inner.step()
        inner.zero_grad()
        groups = [{**g, "params": own["params"]} for g, own in zip(saved["param_groups"], inner.state_dict()["param_groups"])]
        inner.load_state_dict({"state": inner.state_dict()["state"], "param_groups": groups})  # load_state_dict
        old, log_prob, adv, mask = random_batch(seed=2)
        config = actor_config("adaptive_power_mean", adapt="schedule", p_start=2.0, p_end=-2.0, schedule_steps=4)
        _, metrics = get_policy_loss_fn("adaptive_power_mean")(old, log_prob, adv, mask, "token-mean", config, None)
        assert metrics["actor/pm/power"] == scheduled_power(3, 2.0, -2.0, 4) == -1.0
    finally:
        STEP_COUNTER._restored.pop(inner, None)
        vars(STEP_COUNTER).update(saved_counter)
