"""Adaptive p: ESS-matching solver, schedules, the adaptive loss, and rank consistency."""

import math
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from verl.trainer.ppo.core_algos import agg_loss, get_policy_loss_fn

sys.path.insert(0, os.path.dirname(__file__))
from _helpers import actor_config, random_batch  # noqa: E402

from hmpo_verl import AdaptivePowerMeanLossConfig  # noqa: E402
from hmpo_verl.adaptive import ess_search_bound, ess_target_fraction, scheduled_power, solve_power_for_ess  # noqa: E402
from hmpo_verl.means import effective_sample_size, power_mean_weights  # noqa: E402
from hmpo_verl.steps import STEP_COUNTER, OptimizerStepCounter  # noqa: E402


def _rows(B=32, T=512, scale=0.1, seed=0, heavy=False):
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(B, T, generator=g) * scale
    if heavy:
        d += (torch.rand(B, T, generator=g) < 0.02) * torch.randn(B, T, generator=g) * 2
    valid = torch.rand(B, T, generator=g) > 0.25
    valid[:, 0] = True
    return d, valid


def _exact_ess_fraction(d, valid, p):
    w = power_mean_weights(d.double(), p.double(), valid)
    return effective_sample_size(w) / valid.sum(-1)


@pytest.mark.parametrize("scale,heavy", [(0.05, False), (0.3, False), (0.1, True)])
def test_solver_matches_the_exact_ess_target(scale, heavy):
    d, valid = _rows(scale=scale, heavy=heavy)
    g = torch.Generator().manual_seed(1)
    target = 0.9 + 0.1 * torch.rand(32, generator=g)
    bound = torch.where(torch.arange(32) % 2 == 0, -50.0, 50.0)  # wide: targets reachable
    p = solve_power_for_ess(d, valid, target, bound)
    assert torch.all(p * bound >= 0) and torch.all(p.abs() <= bound.abs())
    assert torch.all(p.abs() < 50.0)
    achieved = _exact_ess_fraction(d, valid, p)
    torch.testing.assert_close(achieved, target.double(), rtol=0, atol=5e-4)


def test_solver_edge_cases():
    d, valid = _rows(B=6, T=64, scale=0.2)
    bound = torch.tensor([-2.0, 1.0, 0.0, -2.0, 1.0, -2.0])
    target = torch.tensor([1.0, 1.0, 0.5, 1e-6, 0.99, 0.95])
    valid[5] = False  # empty row
    p = solve_power_for_ess(d, valid, target, bound)
    assert p[0] == 0 and p[1] == 0  # target ESS = T only at p = 0
    assert p[2] == 0  # bound 0 forces p = 0
    assert p[3] == -2.0  # unreachable target: the bound
    assert 0 < p[4] < 1.0
    assert p[5] == 0
    # equal log-ratios or a single token: ESS = T for every p, so the bound
    flat = solve_power_for_ess(torch.zeros(2, 8), torch.tensor([[True] * 8, [True] + [False] * 7]),
                               torch.tensor([0.9, 0.9]), torch.tensor([-2.0, 1.0]))
    assert flat.tolist() == [-2.0, 1.0]


def test_higher_target_means_smaller_power():
    d, valid = _rows(B=1, T=2048, scale=0.2)
    ps = [solve_power_for_ess(d, valid, torch.tensor([t]), torch.tensor([-20.0])).item() for t in (0.8, 0.9, 0.95, 0.99)]
    assert ps[0] < ps[1] < ps[2] < ps[3] < 0


def test_target_rule_and_bounds():
    c = torch.tensor([0.0, 0.5, 1.0, 2.0])
    torch.testing.assert_close(ess_target_fraction(c, 0.9), torch.tensor([0.9, 0.95, 1.0, 1.0]))
    s = torch.tensor([1.0, -1.0, 0.0])
    assert ess_search_bound(s, "advantage", -2.0, 1.0).tolist() == [-2.0, 1.0, 0.0]
    assert ess_search_bound(s, "negative", -2.0, 1.0).tolist() == [-2.0, -2.0, -2.0]
    assert ess_search_bound(s, "positive", -2.0, 1.0).tolist() == [1.0, 1.0, 1.0]


def test_schedules():
    assert scheduled_power(0, 2.0, -2.0, 100) == 2.0
    assert scheduled_power(50, 2.0, -2.0, 100) == pytest.approx(0.0)
    assert scheduled_power(100, 2.0, -2.0, 100) == -2.0
    assert scheduled_power(10_000, 2.0, -2.0, 100) == -2.0
    assert scheduled_power(25, 2.0, -2.0, 100, "cosine") == pytest.approx(2.0 - 4.0 * (1 - math.cos(math.pi / 4)) / 2)
    assert scheduled_power(50, 2.0, -2.0, 100, "cosine") == pytest.approx(0.0)


def _per_row_reference(old, lp, adv, mask, p_rows, eps=0.2, dual=3.0):
    """token-sum loss of the token-clipped power mean with a given p per row (float64 autograd)."""
    lo, hi = math.log(1 - eps), math.log(1 + eps)
    rows = []
    for i in range(old.shape[0]):
        v = mask[i]
        row = torch.zeros(old.shape[1], dtype=old.dtype)
        if v.any():
            a = adv[i][v]
            delta = lp[i][v] - old[i][v]
            delta = torch.where(a > 0, delta.clamp(max=hi), torch.where(a < 0, delta.clamp(lo, math.log(dual)), delta))
            p = float(p_rows[i])
            leaf = delta.detach().requires_grad_()
            log_s = torch.log(torch.mean(torch.exp(p * leaf))) / p if p != 0 else leaf.mean()
            (w,) = torch.autograd.grad(log_s, leaf)
            log_tok = log_s.detach() + v.sum() * w * (delta - delta.detach())
            row = row.masked_scatter(v, -a * torch.exp(log_tok))
        rows.append(row)
    return agg_loss(torch.stack(rows), mask, "token-sum")


def test_adaptive_ess_loss_is_the_power_mean_loss_at_the_chosen_powers():
    """Loss and gradient are the power-mean loss at each row's chosen p held constant (the
    documented stop-gradient on p: no term through the solver)."""
    old, lp, adv, mask = random_batch(B=8, T=40, scale=0.3, seed=31, token_adv=False)
    config = actor_config("adaptive_power_mean", ess_target_min=0.95)
    x = lp.clone().requires_grad_()
    loss, metrics = get_policy_loss_fn("adaptive_power_mean")(old, x, adv, mask, "token-sum", config, None)
    loss.backward()
    # recompute the powers the rule should have chosen
    delta = lp - old
    lo, hi = math.log(0.8), math.log(1.2)
    clipped = ((adv > 0) & (delta > hi)) | ((adv < 0) & ((delta < lo) | (delta > math.log(3.0))))
    n = mask.sum(-1).clamp(min=1)
    target = ess_target_fraction((clipped & mask).sum(-1).double() / n, 0.95)
    bound = ess_search_bound(torch.sign(torch.where(mask, adv, 0.0).sum(-1)), "advantage", -2.0, 1.0)
    clipped_delta = torch.where(adv > 0, delta.clamp(max=hi), torch.where(adv < 0, delta.clamp(lo, math.log(3.0)), delta))
    p_rows = solve_power_for_ess(clipped_delta, mask, target, bound)
    assert (p_rows[mask.any(-1)] != 0).any()
    y = lp.clone().requires_grad_()
    ref = _per_row_reference(old, y, adv, mask, p_rows)
    ref.backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-8, atol=1e-12)
    rows = mask.any(-1)
    assert metrics["actor/pm/power"] == pytest.approx(p_rows[rows].mean().item(), rel=1e-6)
    assert metrics["actor/pm/power_std"] == pytest.approx(p_rows[rows].std(unbiased=False).item(), rel=1e-6)
    assert metrics["actor/pm/ess_target"] == pytest.approx(target[rows].mean().item(), rel=1e-6)


def test_per_trajectory_power_does_not_depend_on_the_batch_split():
    old, lp, adv, mask = random_batch(B=8, T=40, scale=0.3, seed=32, token_adv=False)
    config = actor_config("adaptive_power_mean")
    fn = get_policy_loss_fn("adaptive_power_mean")
    whole = [fn(old[i:i + 1], lp[i:i + 1], adv[i:i + 1], mask[i:i + 1], "token-mean", config, None)[1]["actor/pm/power"]
             for i in range(7)]
    split = [fn(old[i:i + 2], lp[i:i + 2], adv[i:i + 2], mask[i:i + 2], "token-mean", config, None)[1]
             for i in (0, 2, 4)]
    for k, m in enumerate(split):
        assert m["actor/pm/power"] == pytest.approx((whole[2 * k] + whole[2 * k + 1]) / 2, rel=1e-6)


def test_defaults_with_verls_plain_config():
    old, lp, adv, mask = random_batch(seed=33)
    _, m = get_policy_loss_fn("adaptive_power_mean")(old, lp, adv, mask, "token-mean",
                                                    actor_config("adaptive_power_mean", plain=True), None)
    assert -2.0 <= m["actor/pm/power"] <= 1.0 and m["actor/pm/power_std"] >= 0


def test_step_counter_reads_the_optimizer_step_so_a_resumed_run_continues():
    counter = OptimizerStepCounter()
    param = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([param], lr=0.1)
    for _ in range(3):
        counter.arm()
        param.grad = torch.ones(3)
        opt.step()
    assert counter.step == 3
    resumed = torch.optim.AdamW([param], lr=0.1)
    resumed.load_state_dict(opt.state_dict())
    fresh = OptimizerStepCounter()
    fresh.arm()
    resumed.step()
    assert fresh.step == 4
    other = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)  # steps without the loss: ignored
    other.step()
    assert fresh.step == 4


def _adamw_after(steps: int, seed: int = 0) -> torch.optim.AdamW:
    param = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([param], lr=0.1)
    for _ in range(steps):
        param.grad = torch.ones(3)
        opt.step()
    return opt


RESUMED_PROCESS = """
import sys, torch, verl
from verl.trainer.ppo.core_algos import get_policy_loss_fn
sys.path.insert(0, {tests!r})
from _helpers import actor_config, random_batch
opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
opt.load_state_dict(torch.load({path!r}))  # what verl's FSDP checkpoint manager does on a resume
old, log_prob, adv, mask = random_batch(seed=1)
config = actor_config("adaptive_power_mean", adapt="schedule", p_start=2.0, p_end=-2.0, schedule_steps=4)
_, metrics = get_policy_loss_fn("adaptive_power_mean")(old, log_prob, adv, mask, "token-mean", config, None)
print(metrics["actor/pm/power"])
"""


def test_the_first_update_after_a_resume_continues_the_schedule(tmp_path):
    """A relaunched process loads the optimizer of a run that took 3 steps: its first loss, before any
    optimizer step of its own, must use step 3's p (-1), not step 0's (2)."""
    torch.save(_adamw_after(3).state_dict(), tmp_path / "optim.pt")
    code = RESUMED_PROCESS.format(tests=os.path.dirname(__file__), path=str(tmp_path / "optim.pt"))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout.split()[-1]) == scheduled_power(3, 2.0, -2.0, 4) == -1.0


def test_a_restored_optimizer_that_steps_without_the_loss_is_not_the_policys():
    """verl updates a critic (in the same process) before the actor: its optimizer steps unarmed."""
    counter = OptimizerStepCounter()
    try:
        policy, critic = _adamw_after(3), _adamw_after(5)
        counter.restored(policy)
        counter.restored(critic)
        with pytest.raises(RuntimeError, match=r"different steps \[3, 5\]"):
            counter.step
        critic.step()  # the critic's update: no loss of ours ran
        assert counter.step == 3
        counter.arm()
        policy.step()
        assert counter.step == 4
    finally:
        counter._handle.remove()


STEPS = 4
MICRO_BATCHES = {0: 1, 1: 3}  # different number of micro-batches per optimizer step on each rank


def _schedule_worker(rank, world, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import hmpo_verl.verl_plugin  # noqa: F401  (registers, as verl's plugin loading does)

    torch.manual_seed(0)
    model = torch.nn.Linear(6, 1, dtype=torch.float64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = actor_config("adaptive_power_mean", adapt="schedule", p_start=2.0, p_end=-2.0, schedule_steps=3)
    fn = get_policy_loss_fn("adaptive_power_mean")
    seen = []
    for step in range(STEPS):
        old, _, adv, mask = random_batch(B=6, T=5, seed=100 * step + rank)
        feats = torch.randn(6, 5, 6, generator=torch.Generator().manual_seed(step + 10 * rank), dtype=torch.float64)
        for idx in torch.arange(6).chunk(MICRO_BATCHES[rank]):
            log_prob = old[idx] + 0.1 * torch.tanh(model(feats[idx]).squeeze(-1))
            loss, metrics = fn(old[idx], log_prob, adv[idx], mask[idx], "token-mean", config, None)
            loss.backward()
            seen.append((step, metrics["actor/pm/power"]))
        for param in model.parameters():
            dist.all_reduce(param.grad)
            param.grad /= world
        opt.step()
        opt.zero_grad()
    gathered = [None] * world
    dist.all_gather_object(gathered, seen)
    if rank == 0:
        torch.save(gathered, out_path)
    dist.destroy_process_group()


def test_schedule_gives_every_rank_the_same_power_per_step(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "powers.pt"
    mp.spawn(_schedule_worker, args=(2, port, str(out)), nprocs=2, join=True)
    per_rank = torch.load(out)
    for rank, seen in enumerate(per_rank):
        assert len(seen) == STEPS * MICRO_BATCHES[rank]
        for step, power in seen:
            assert power == pytest.approx(scheduled_power(step, 2.0, -2.0, 3), abs=1e-6), (rank, step)
    by_step = [{round(p, 6) for r in per_rank for s, p in r if s == step} for step in range(STEPS)]
    assert all(len(powers) == 1 for powers in by_step)


def test_schedule_config_defaults_follow_holderpo():
    cfg = AdaptivePowerMeanLossConfig()
    assert (cfg.p_start, cfg.p_end) == (2.0, -2.0)
    assert STEP_COUNTER.step >= 0
