"""verl V1 with an agent loop returning several outputs per session: our estimators group sessions, not outputs.

verl 0.9.1's V1 trainer calls `compute_advantage_for_multi_trajectories` (the name
`verl.trainer.ppo.v1.trainer_base` imported) with one row per agent-loop output, keyed
`{uid}_{session_id}_{index}`, every output carrying its session's final reward. verl's GRPO groups
only each session's final output; our `power_mean` / `agm` must do the same, or a session with
three outputs counts three times in its prompt's group. The call is made here as the trainer
makes it, on the function the trainer module holds once hmpo_verl is loaded.
"""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from verl import DataProto
from verl.trainer.ppo.v1 import utils as v1_utils

from hmpo_verl.hosts.verl.estimators import PENDING_METRICS, session_finals

trainer_base = importlib.import_module("verl.trainer.ppo.v1.trainer_base")

T = 5
# prompt -> per session (rollout.n = 4): (its final reward, how many outputs the agent loop returned)
SESSIONS = {
    "p0": [(1.0, 1), (0.0, 3), (0.0, 1), (1.0, 2)],
    "p1": [(0.5, 2), (0.0, 1), (1.0, 1), (1.0, 4)],
    "p2": [(0.0, 1), (1.0, 3), (0.0, 2), (0.25, 1)],
}


def _batch(sessions=SESSIONS, seed=0):
    """(data, keys, final reward of each row's session): rows in the order verl's replay buffer may hand
    them (interleaved), token rewards on each response's last token, 0 elsewhere (verl's rm_scores)."""
    rows = [(uid, s, i, reward) for uid, group in sessions.items() for s, (reward, outputs) in enumerate(group)
            for i in range(outputs)]
    g = torch.Generator().manual_seed(seed)
    rows = [rows[k] for k in torch.randperm(len(rows), generator=g).tolist()]
    lengths = torch.randint(1, T + 1, (len(rows),), generator=g)
    mask = (torch.arange(T) < lengths.unsqueeze(1)).float()
    rewards = torch.zeros(len(rows), T)
    rewards[torch.arange(len(rows)), lengths - 1] = torch.tensor([r for *_, r in rows])
    data = DataProto.from_dict(tensors={"token_level_rewards": rewards, "response_mask": mask},
                               non_tensors={"uid": np.array([uid for uid, *_ in rows], dtype=object)})
    keys = [f"{uid}_{s}_{i}" for uid, s, i, _ in rows]
    return data, keys, [(uid, s, r) for uid, s, _, r in rows]


def _call(compute, data, keys, estimator, **algo):
    config = OmegaConf.create({"adv_estimator": estimator, **algo})
    return compute(data, batch_keys=keys, adv_estimator=estimator, gamma=1.0, lam=1.0, num_repeat=4,
                   norm_adv_by_std_in_grpo=algo.get("norm_adv_by_std", True), config=config)


def _free_energy_advantage(rewards: np.ndarray, beta: float) -> np.ndarray:
    """Textbook float64 (1/beta)(exp(beta R_i) / mean_j exp(beta R_j) - 1); R_i - mean R at beta = 0."""
    if beta == 0:
        return rewards - rewards.mean()
    u = np.exp(beta * rewards)
    return (u / u.mean() - 1.0) / beta


def _reference(rows, estimator: str, beta: float) -> dict[tuple[str, int], float]:
    """(uid, session) -> advantage over the prompt's sessions (one reward each), float64, direct formula."""
    per_prompt = {uid: np.array([reward for reward, _ in group], dtype=np.float64) for uid, group in SESSIONS.items()}
    out = {}
    for uid, rewards in per_prompt.items():
        adv = _free_energy_advantage(rewards, beta)
        if estimator == "agm":
            adv = (adv + _free_energy_advantage(rewards, -beta)) / 2
        out.update({(uid, s): a for s, a in enumerate(adv)})
    return out


def test_the_v1_trainer_holds_the_session_grouping():
    assert getattr(trainer_base.compute_advantage_for_multi_trajectories, "_hmpo_sessions", False)


def test_at_beta_zero_our_estimator_groups_sessions_exactly_as_verls_grpo():
    """Independent reference: verl's own GRPO path (final outputs only) with std normalisation."""
    data, keys, _ = _batch()
    grpo_data, _, _ = _batch()
    ours = _call(trainer_base.compute_advantage_for_multi_trajectories, data, keys, "power_mean",
                 risk_beta=0.0, norm_adv_by_std=True)
    grpo = _call(trainer_base.compute_advantage_for_multi_trajectories, grpo_data, keys, "grpo")
    torch.testing.assert_close(ours.batch["advantages"], grpo.batch["advantages"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.batch["returns"], ours.batch["advantages"])


@pytest.mark.parametrize("estimator", ["power_mean", "agm"])
@pytest.mark.parametrize("beta", [-2.0, 0.0, 1.5])
def test_each_output_gets_its_sessions_advantage_over_the_prompts_sessions(estimator, beta):
    data, keys, rows = _batch(seed=1)
    mask = data.batch["response_mask"].clone()
    out = _call(trainer_base.compute_advantage_for_multi_trajectories, data, keys, estimator, risk_beta=beta,
                norm_adv_by_std=False)
    reference = _reference(rows, estimator, beta)
    expected = torch.tensor([reference[(uid, s)] for uid, s, _ in rows]).unsqueeze(-1) * mask
    torch.testing.assert_close(out.batch["advantages"].double(), expected, rtol=1e-6, atol=1e-6)
    assert out.batch["advantages"].dtype == torch.float32 and torch.all(out.batch["advantages"][mask == 0] == 0)
    assert 0 <= PENDING_METRICS["critic/pm/adv_conservation"] < 1e-6  # over sessions: sums to 0 per prompt

    # the data tell the two groupings apart: verl's unwrapped call counts every output in the group
    counted_per_output, _, _ = _batch(seed=1)
    naive = _call(v1_utils.compute_advantage_for_multi_trajectories, counted_per_output, keys, estimator,
                  risk_beta=beta, norm_adv_by_std=False)
    assert (naive.batch["advantages"] - out.batch["advantages"]).abs().max() > 0.05


@pytest.mark.parametrize("estimator", ["power_mean", "agm", "grpo"])
def test_one_output_per_session_is_verls_call_unchanged(estimator):
    single = {uid: [(reward, 1) for reward, _ in group] for uid, group in SESSIONS.items()}
    wrapped, keys, _ = _batch(single, seed=2)
    plain, _, _ = _batch(single, seed=2)
    ours = _call(trainer_base.compute_advantage_for_multi_trajectories, wrapped, keys, estimator, risk_beta=0.7)
    verls = _call(v1_utils.compute_advantage_for_multi_trajectories, plain, keys, estimator, risk_beta=0.7)
    assert torch.equal(ours.batch["advantages"], verls.batch["advantages"])


def test_a_key_not_of_the_agent_loops_form_is_an_error_naming_it():
    data, keys, _ = _batch()
    keys[3] = "p0-session-1"
    with pytest.raises(ValueError, match=r"'p0-session-1' \(row 3\) is not '\{uid\}_\{session_id\}_\{index\}'"):
        _call(trainer_base.compute_advantage_for_multi_trajectories, data, keys, "power_mean")


def test_session_finals_takes_the_highest_index_of_each_session_and_keeps_underscored_uids():
    keys = ["a_b_0_1", "a_b_0_0", "c_1_0", "a_b_1_0", "a_b_0_2"]
    finals, session_of_row = session_finals(keys)
    assert finals == [4, 2, 3]  # sessions a_b_0 (its index 2), c_1, a_b_1, in order of first appearance
    assert session_of_row == [0, 0, 1, 2, 0]


def test_a_non_finite_reward_is_named_by_its_batch_row_and_key():
    """The error names the row of the batch verl handed over and its key, not its place among the final outputs."""
    data, keys, _ = _batch()
    finals, _ = session_finals(keys)
    row = finals[5]
    data.batch["token_level_rewards"][row] = float("nan")
    with pytest.raises(ValueError, match=rf"^reward of response {row} \(key '{keys[row]}'\) \(group uid='p\d'\) is "
                                         r"nan; 1 response\(s\) have non-finite rewards$"):
        _call(trainer_base.compute_advantage_for_multi_trajectories, data, keys, "power_mean")


@pytest.mark.parametrize("estimator", ["power_mean", "agm"])
def test_a_launch_with_our_estimator_stops_before_ray_where_the_session_grouping_is_not_installed(estimator, monkeypatch):
    """The import hook only logs a failure to wrap verl's function; the driver's checks refuse the launch (a recipe
    as a user launches it), and pass verl's own estimator or a launch without V1."""
    from test_recipes_config import RECIPES, compose_recipe

    from hmpo_verl.hosts.verl.checks import OFFPOLICY_TRAINERS, check_session_grouping, driver_checks

    for name in OFFPOLICY_TRAINERS:  # loaded by earlier tests: the driver would take the launch for an off-policy one
        monkeypatch.delitem(sys.modules, name, raising=False)
    unwrapped = trainer_base.compute_advantage_for_multi_trajectories.__wrapped__
    monkeypatch.setattr(trainer_base, "compute_advantage_for_multi_trajectories", unwrapped)
    config = compose_recipe(RECIPES, "gsm8k", (f"algorithm.adv_estimator={estimator}", "trainer.use_v1=true"))
    with pytest.raises(RuntimeError, match=rf"adv_estimator='{estimator}'.*counts every output.*trainer.use_v1=false"):
        driver_checks(config)
    check_session_grouping(OmegaConf.create({"algorithm": {"adv_estimator": "grpo"}, "trainer": {"use_v1": True}}))
    check_session_grouping(OmegaConf.create({"algorithm": {"adv_estimator": estimator}, "trainer": {"use_v1": False}}))


def test_the_driver_check_passes_where_the_session_grouping_is_installed():
    from hmpo_verl.hosts.verl.checks import check_session_grouping

    check_session_grouping(OmegaConf.create({"algorithm": {"adv_estimator": "agm"}, "trainer": {"use_v1": True}}))
