"""Shared builders for the loss tests: verl actor configs, random batches, references."""

from __future__ import annotations

import math

import torch
from verl.workers.config import ActorConfig, PolicyLossConfig

from hmpo_verl import AdaptivePowerMeanLossConfig, PowerMeanLossConfig

# verl's plain config names the naive weight sync (colocated workers); a launch of a trainer whose rollout is a pool of
# its own (separate_async) needs one between pools, or check_weight_sync refuses it, as verl asserts after Ray starts.
# The other modes do not read it.
SEPARATE_POOL_SYNC = "actor_rollout_ref.rollout.checkpoint_engine.backend=nccl"

AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def actor_config(loss_mode: str = "hmpo", eps_low: float = 0.2, eps_high: float = 0.2, plain: bool = False, **fields):
    """A real verl ActorConfig with our (or verl's plain) policy-loss config."""
    if plain:
        policy_loss = PolicyLossConfig(loss_mode=loss_mode)
    else:
        cls = AdaptivePowerMeanLossConfig if loss_mode == "adaptive_power_mean" else PowerMeanLossConfig
        policy_loss = cls(loss_mode=loss_mode, **fields)
    return ActorConfig(
        strategy="fsdp",
        rollout_n=1,
        ppo_micro_batch_size_per_gpu=1,
        clip_ratio_low=eps_low,
        clip_ratio_high=eps_high,
        policy_loss=policy_loss,
    )


def random_batch(B=6, T=11, scale=0.1, seed=0, dtype=torch.float64, token_adv=False, empty_row=True):
    """(old_log_prob, log_prob, advantages, mask) with ragged masks and garbage at masked spots."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=dtype) * 3
    log_prob = old + scale * torch.randn(B, T, generator=g, dtype=dtype)
    if token_adv:
        adv = torch.randn(B, T, generator=g, dtype=dtype)
    else:
        adv = torch.randn(B, 1, generator=g, dtype=dtype).expand(B, T).clone()
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    if empty_row:
        mask[-1] = False
    return old, log_prob, adv, mask


def poison_masked(x: torch.Tensor, mask: torch.Tensor, value=math.nan) -> torch.Tensor:
    """A copy of x holding `value` at masked positions."""
    return torch.where(mask.bool(), x, torch.full_like(x, value))


def direct_log_power_mean(log_x: torch.Tensor, p: float) -> torch.Tensor:
    """Textbook formula on a 1-D float64 tensor of valid entries (differentiable)."""
    x = torch.exp(log_x)
    if p == 0:
        return torch.log(x).mean()
    if math.isinf(p):
        return torch.log(x.max() if p > 0 else x.min())
    return torch.log(torch.mean(x**p)) / p
