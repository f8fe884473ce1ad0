"""The real verl paths reach our losses: plugin loading, verl's Hydra config, ppo_loss."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import verl
from hydra import compose, initialize_config_dir
from tensordict import TensorDict
from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, get_policy_loss_fn
from verl.utils import tensordict_utils as tu
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.utils.losses import ppo_loss

import hmpo_verl
from hmpo_verl.losses import POLICY_LOSSES

VERL_CONFIG_DIR = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")


def _fresh_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
        env={**os.environ, **env},
    )


def test_import_verl_alone_registers_our_losses():
    result = _fresh_python(
        """
        import sys
        import verl
        from verl.trainer.ppo.core_algos import get_policy_loss_fn
        for name in ("hmpo", "power_mean", "agm"):
            fn = get_policy_loss_fn(name)
            assert fn.__module__ == "hmpo_verl.hosts.verl.losses", fn
        print("OK")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("OK")


def test_registration_is_idempotent():
    hmpo_verl.register()
    hmpo_verl.register()
    for name, fn in POLICY_LOSSES.items():
        assert POLICY_LOSS_REGISTRY[name] is fn


def test_registration_refuses_to_overwrite_someone_elses_loss():
    from hmpo_verl.registry import _register_into

    with pytest.raises(RuntimeError, match="already registered"):
        _register_into({"hmpo": get_policy_loss_fn("vanilla")}, "hmpo", POLICY_LOSSES["hmpo"], "policy loss")


def test_a_broken_plugin_is_reported_loudly():
    """verl logs plugin import errors at DEBUG only; ours must reach stderr."""
    result = _fresh_python(
        """
        import sys, importlib.abc
        class Breaker(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "hmpo_verl.hosts.verl.losses":
                    raise ImportError("simulated breakage in hmpo_verl.losses")
        sys.meta_path.insert(0, Breaker())
        import verl
        from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY
        print("hmpo" in POLICY_LOSS_REGISTRY)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
    assert "hmpo_verl failed to register" in result.stderr
    assert "simulated breakage" in result.stderr


def _actor_from_hydra(overrides):
    with initialize_config_dir(config_dir=VERL_CONFIG_DIR, version_base=None):
        cfg = compose(
            config_name="ppo_trainer",
            overrides=["algorithm.adv_estimator=grpo", "actor_rollout_ref.rollout.n=4",
                       "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2"] + overrides,
        )
    return omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)


def _ppo_loss_inputs(B=4, prompt_len=3, resp_len=5, seed=0):
    """A TensorDict shaped as verl's FSDP engine hands it to ppo_loss, plus the packed log-probs."""
    g = torch.Generator().manual_seed(seed)
    resp_lens = torch.tensor([5, 3, 4, 1])
    prompt_lens = torch.tensor([3, 2, 3, 1])
    attention_mask = torch.zeros(B, prompt_len + resp_len, dtype=torch.long)
    response_mask = torch.zeros(B, resp_len)
    for i in range(B):
        attention_mask[i, prompt_len - prompt_lens[i]: prompt_len] = 1
        attention_mask[i, prompt_len: prompt_len + resp_lens[i]] = 1
        response_mask[i, : resp_lens[i]] = 1
    old = -torch.rand(B, resp_len, generator=g)
    lp = old + 0.1 * torch.randn(B, resp_len, generator=g)
    adv = torch.randn(B, 1, generator=g).expand(B, resp_len) * response_mask
    data = TensorDict(
        {
            "prompts": torch.ones(B, prompt_len, dtype=torch.long),
            "responses": torch.ones(B, resp_len, dtype=torch.long),
            "attention_mask": attention_mask,
            "response_mask": response_mask,
            "old_log_probs": old,
            "advantages": adv,
        },
        batch_size=[B],
    )
    tu.assign_non_tensor_data(data, "dp_size", 1)
    tu.assign_non_tensor_data(data, "batch_num_tokens", int(response_mask.sum()))
    tu.assign_non_tensor_data(data, "global_batch_size", B)
    # packed (total_nnz,) model output: response token t of sequence i sits one position
    # before it in the packed sequence (log-probs are shifted left by one)
    seq_lens = prompt_lens + resp_lens
    offsets = torch.cumsum(seq_lens, 0) - seq_lens
    positions = torch.cat([offsets[i] + prompt_lens[i] - 1 + torch.arange(resp_lens[i]) for i in range(B)])
    return data, lp, response_mask.bool(), positions, int(seq_lens.sum())


@pytest.mark.parametrize("overrides,loss_mode", [
    (["actor_rollout_ref.actor.policy_loss.loss_mode=hmpo"], "hmpo"),
    (["actor_rollout_ref.actor.policy_loss.loss_mode=agm"], "agm"),
    (["actor_rollout_ref.actor.policy_loss._target_=hmpo_verl.PowerMeanLossConfig",
      "actor_rollout_ref.actor.policy_loss.loss_mode=power_mean",
      "+actor_rollout_ref.actor.policy_loss.power=2.0"], "power_mean"),
])
def test_ppo_loss_with_hydra_built_actor_config_reaches_our_loss(overrides, loss_mode):
    config = _actor_from_hydra(overrides)
    data, lp, mask, positions, total = _ppo_loss_inputs()
    lp_leaf = lp.clone().requires_grad_()
    packed = torch.zeros(total).index_put((positions,), lp_leaf[mask])
    loss, metrics = ppo_loss(config, {"log_probs": packed}, data)
    loss.backward()
    # our row means travel as staged sums (verl would average per-call means per micro-batch): the trainer
    # turns them into actor/pm/* over the step (tests/test_metrics_exact_on_cpu.py)
    assert "actor/pm/raw/all/seq_ratio_mean" in metrics and "actor/pg_clipfrac" in metrics
    assert "actor/pm/seq_ratio_mean" not in metrics

    # the same numbers from a direct call of the registered function
    direct = lp.clone().requires_grad_()
    expected, _ = get_policy_loss_fn(loss_mode)(
        data["old_log_probs"], direct, data["advantages"], mask, config.loss_agg_mode, config, None
    )
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach())
    torch.testing.assert_close(lp_leaf.grad, direct.grad)
    assert config.global_batch_info["batch_num_tokens"] == int(mask.sum())
