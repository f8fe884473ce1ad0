"""End to end on CPU: PowerMeanGRPOTrainer trains the tiny model on the tiny addition task (no hub)."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("trl")

import torch  # noqa: E402
from cpu_assets import tiny_assets  # noqa: E402

from hmpo_verl.lab.trl_demo import build_trainer, exact_match_reward  # noqa: E402

STEPS = 4
LOSS_METRICS = ("entropy", "clip_ratio/region_mean", "clip_ratio/low_mean", "clip_ratio/high_mean",
                "pm/seq_ratio_mean", "pm/log_ah_gap", "pm/ess_frac", "pm/dual_clip_mean", "pm/power",
                "pm/power_min", "pm/power_max")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.manual_seed(0)
    calls = []

    def addition_reward_counted(completions, ground_truth, **kwargs):
        calls.append(len(completions))
        return exact_match_reward(completions, ground_truth, **kwargs)

    trainer = build_trainer(tiny_assets(), tmp_path_factory.mktemp("trl_e2e"), max_steps=STEPS,
                            reward_funcs=addition_reward_counted, power=-1.0)
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    return trainer, calls, before, after


def test_the_reward_function_is_called_on_every_completion(run):
    trainer, calls, _, _ = run
    # steps_per_generation=2: one generation batch of 2 x 8 completions (4 prompts x 4) every 2 steps
    assert calls == [16] * (STEPS // 2)


def test_the_weights_change_and_stay_finite(run):
    _, _, before, after = run
    changed = [name for name, p in after.items() if not torch.equal(p.detach(), before[name])]
    assert len(changed) > len(after) // 2, changed
    assert all(torch.isfinite(p).all() for p in after.values())


def test_trl_and_our_metrics_are_logged(run):
    trainer = run[0]
    rows = [row for row in trainer.state.log_history if "loss" in row]
    assert len(rows) == STEPS
    for row in rows:  # the loss's metrics at every step (TRL's generation metrics only when it generates)
        for key in LOSS_METRICS:
            assert key in row and math.isfinite(row[key]), key
        assert row["pm/power"] == row["pm/power_min"] == row["pm/power_max"] == -1.0
    # the second step of each generation batch is off-policy: its ratios differ from 1
    assert any(row["pm/seq_ratio_mean"] != 1.0 for row in rows)
    assert any(row["pm/ess_frac"] < 1.0 for row in rows)
    assert sum("reward" in row for row in rows) == STEPS // 2


def test_reward_adaptive_p_and_clip_follow_the_generation_batchs_rewards(tmp_path):
    """adapt='reward' (APMPO): on each logged step p = exp(-0.8 * mean reward) and epsilon_high =
    0.2 + 0.2 * tanh(mean / (std + 1e-6)), with the mean and std TRL logs for the same generation batch."""
    torch.manual_seed(0)
    trainer = build_trainer(tiny_assets(), tmp_path, max_steps=2, reward_funcs=exact_match_reward, adapt="reward")
    trainer.train()
    rows = [row for row in trainer.state.log_history if "loss" in row and "reward" in row]
    assert rows
    for row in rows:
        assert row["pm/power"] == pytest.approx(math.exp(-0.8 * row["reward"]), rel=1e-6)
        fss = row["reward"] / (row["reward_std"] + 1e-6)
        assert row["pm/clip_high"] == pytest.approx(0.2 + 0.2 * max(0.0, math.tanh(fss)), rel=1e-6)
        assert row["pm/reward_mean"] == pytest.approx(row["reward"], rel=1e-6)
