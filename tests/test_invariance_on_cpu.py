"""The total gradient does not depend on micro-batch split or data-parallel size.

verl's `ppo_loss` fills `config.global_batch_info` (dp_size, batch_num_tokens of the whole
mini-batch on all ranks, global_batch_size, loss_scale_factor) before calling the loss, and
FSDP averages gradients over data-parallel ranks. Our losses aggregate through `agg_loss`
with that info, so splitting the mini-batch any way gives the same gradient.
"""

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from verl.trainer.ppo.core_algos import get_policy_loss_fn

sys.path.insert(0, os.path.dirname(__file__))
from _helpers import AGG_MODES, actor_config, random_batch  # noqa: E402

LOSSES = [("hmpo", {}), ("power_mean", {"power": 0.5, "clip_level": "sequence"}), ("agm", {})]
D = 5


def _model_inputs(seed=0, B=8, T=12):
    """A tiny differentiable 'policy': log_prob = old + 0.3 tanh(features . theta)."""
    old, _, adv, mask = random_batch(B=B, T=T, seed=seed, token_adv=True)
    feats = torch.randn(B, T, D, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return old, adv, mask, feats


def _grad(theta0, rows, old, adv, mask, feats, loss_mode, fields, agg, info):
    """Sum of gradients of the micro-batches `rows` (list of index tensors) w.r.t. theta."""
    theta = theta0.clone().requires_grad_()
    plain = loss_mode not in ("hmpo", "power_mean", "agm")
    config = actor_config(loss_mode, eps_low=0.05, eps_high=0.05, plain=plain, **fields)
    config.global_batch_info.update(info)
    for idx in rows:
        log_prob = old[idx] + 0.3 * torch.tanh(feats[idx] @ theta)
        loss, _ = get_policy_loss_fn(loss_mode)(old[idx], log_prob, adv[idx], mask[idx], agg, config, None)
        loss.backward()
    return theta.grad


def _info(mask, dp_size=1):
    return dict(dp_size=dp_size, batch_num_tokens=int(mask.sum()), global_batch_size=mask.shape[0], loss_scale_factor=None)


@pytest.mark.parametrize("loss_mode,fields", LOSSES)
@pytest.mark.parametrize("agg", AGG_MODES)
def test_micro_batch_split_does_not_change_the_gradient(loss_mode, fields, agg):
    old, adv, mask, feats = _model_inputs()
    theta0 = torch.randn(D, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    whole = _grad(theta0, [torch.arange(8)], old, adv, mask, feats, loss_mode, fields, agg, _info(mask))
    for split in ([3, 5], [1, 2, 2, 3], [1] * 8):
        rows = list(torch.arange(8).split(split))
        parts = _grad(theta0, rows, old, adv, mask, feats, loss_mode, fields, agg, _info(mask))
        torch.testing.assert_close(parts, whole, rtol=1e-10, atol=1e-13)


def _dp_worker(rank, world, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import hmpo_verl.verl_plugin  # noqa: F401  (registers, as verl's plugin loading does in workers)

    old, adv, mask, feats = _model_inputs()
    theta0 = torch.randn(D, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    # uneven shards and a different number of micro-batches on each rank
    shard = torch.arange(0, 3) if rank == 0 else torch.arange(3, 8)
    micro = [shard] if rank == 0 else list(shard.split([2, 3]))
    tokens = torch.tensor(float(mask[shard].sum()))
    dist.all_reduce(tokens)
    info = dict(dp_size=world, batch_num_tokens=int(tokens), global_batch_size=8, loss_scale_factor=None)
    results = {}
    for loss_mode, fields in LOSSES:
        for agg in AGG_MODES:
            g = _grad(theta0, micro, old, adv, mask, feats, loss_mode, fields, agg, info)
            dist.all_reduce(g)  # FSDP/DDP average gradients over data-parallel ranks
            results[(loss_mode, agg)] = g / world
    if rank == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_one_process(tmp_path):
    out = tmp_path / "dp.pt"
    mp.spawn(_dp_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    results = torch.load(out)
    old, adv, mask, feats = _model_inputs()
    theta0 = torch.randn(D, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    for loss_mode, fields in LOSSES:
        for agg in AGG_MODES:
            single = _grad(theta0, [torch.arange(8)], old, adv, mask, feats, loss_mode, fields, agg, _info(mask))
            torch.testing.assert_close(results[(loss_mode, agg)], single, rtol=1e-10, atol=1e-13)


def test_the_check_detects_a_split_dependent_loss():
    """Sensitivity of the check above: verl's geo_mean averages per micro-batch (verl issue 7913)."""
    old, adv, mask, feats = _model_inputs()
    adv = adv[:, :1].expand_as(adv)  # geo_mean supports sequence-level advantages only
    theta0 = torch.randn(D, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    whole = _grad(theta0, [torch.arange(8)], old, adv, mask, feats, "geo_mean", {}, "seq-mean-token-mean", _info(mask))
    parts = _grad(theta0, list(torch.arange(8).split([3, 5])), old, adv, mask, feats, "geo_mean", {},
                  "seq-mean-token-mean", _info(mask))
    assert not torch.allclose(parts, whole, rtol=1e-3)
