"""Crash and resume on verl's real trainer (CPU), by killing it: cases 1 and 4 of ``hmpo_verl.lab.crash``.

Three launches of the same command (``adaptive_power_mean``, ``adapt: schedule`` p 2 -> -2 over 8
optimizer steps, 2 PPO mini-batches per step, a checkpoint every 2 steps, ``resume_mode=auto``,
``rollout.full_determinism=true``, 5 steps; the rollout reports NaN log-probs at step 5):

* **uninterrupted**, through the demo: steps 1-4, checkpoints 2 and 4, then the poisoned step 5;
* **killed**: SIGKILL of the driver as soon as checkpoint 2 is complete;
* **resumed**: the same command again, which resumes from checkpoint 2: steps 3-4, checkpoint 4,
  then the poisoned step 5.

About 3-4 minutes on 2 cores (Ray and worker start-up, three times). The other cases (a killed
worker, a kill during a save, a full disk) run in ``python -m hmpo_verl.lab.crash`` (README,
"Crash and resume").
"""

from __future__ import annotations

import pytest
from cpu_assets import tiny_assets

from hmpo_verl.adaptive import scheduled_power
from hmpo_verl.checkpoints import checkpoint_problems, read_tracker
from hmpo_verl.lab.cpu_demo import failure_cause
from hmpo_verl.lab.crash import (
    NAN_AT_VERSION_ENV,
    Scenario,
    compare,
    kill_after_checkpoint,
    metric_differences,
    run_demo,
    same_checkpoint,
)

STEPS, POISONED = 5, 5
# verl's diagnostics of the rollout's own log-probs: the hf server computes them in batches whose
# composition depends on timing, so they match to float rounding only (nothing trains on them here)
ROLLOUT_DIAGNOSTICS = ("training/rollout_probs_diff_", "training/rollout_actor_probs_pearson_corr", "rollout_corr/")
POISON = {NAN_AT_VERSION_ENV: str(POISONED - 1)}  # the weights of step 4 generate step 5


def _trained(diffs: dict) -> dict:
    return {k: v for k, v in diffs.items() if not k.startswith(ROLLOUT_DIAGNOSTICS)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tiny_assets()
    root = tmp_path_factory.mktemp("crash")
    uninterrupted = Scenario(root / "uninterrupted", steps=STEPS)
    demo, demo_output = run_demo(uninterrupted, POISON, timeout=900)
    crashed = Scenario(root / "crashed", steps=STEPS)
    case = kill_after_checkpoint(crashed, step=2, extra_env=POISON, leftover_wait=0.0)
    return {"uninterrupted": uninterrupted, "demo": demo, "demo_output": demo_output, "crashed": crashed, **case}


def test_the_relaunch_resumes_at_the_step_after_the_checkpoint(runs):
    assert sorted(runs["killed"].metrics()) == [1]  # killed after checkpoint 2, before step 2 was logged
    assert sorted(runs["resumed"].metrics()) == [3, 4], runs["resumed"].log()[-3000:]


def test_the_resumed_run_repeats_the_uninterrupted_one(runs):
    reference, resumed = runs["demo"], runs["resumed"]
    comparison = compare(reference, resumed, [3, 4])
    assert comparison.samples_equal == {3: True, 4: True}  # the same prompts, responses and rewards
    for step, diffs in comparison.metric_diffs.items():
        assert _trained(diffs) == {}, step  # losses, grad norms, rewards, advantages, powers: bit for bit
        for key, (a, b) in diffs.items():
            assert abs(a - b) <= 1e-6, (step, key, a, b)
    # and the killed launch's one logged step repeated the uninterrupted run's too
    assert _trained(metric_differences(reference.metrics()[1], runs["killed"].metrics()[1])) == {}


def test_the_schedule_continues_at_the_first_step_after_the_resume(runs):
    """Step 3 runs optimizer steps 4 and 5 (2 mini-batches per step): p 0 and -0.5, logged as their mean."""
    expected = {3: (scheduled_power(4, 2, -2, 8) + scheduled_power(5, 2, -2, 8)) / 2,
                4: (scheduled_power(6, 2, -2, 8) + scheduled_power(7, 2, -2, 8)) / 2}
    assert expected == {3: -0.25, 4: -1.25}
    for launch in (runs["demo"], runs["resumed"]):
        assert {s: launch.metrics()[s]["actor/pm/power"] for s in (3, 4)} == expected


def test_a_poisoned_batch_stops_the_run_with_our_error_shown_by_the_demo(runs):
    assert runs["demo"].process.returncode != 0 and runs["resumed_exit"] != 0
    cause = runs["demo_output"].split("verl's trainer exited with status")[-1]
    assert "NonFiniteInputError: rollout_log_probs has" in cause, runs["demo_output"][-3000:]
    assert "the rollout engine's log-probs are broken" in cause
    assert any("NonFiniteInputError" in line for line in failure_cause(runs["resumed"].log()))
    assert POISONED not in runs["demo"].metrics()  # never logged, never trained on


def test_the_checkpoint_before_the_poisoned_step_is_intact(runs):
    for scenario in (runs["uninterrupted"], runs["crashed"]):
        assert read_tracker(scenario.checkpoints) == POISONED - 1
        assert checkpoint_problems(scenario.step_dir(POISONED - 1)) == []
        assert not scenario.step_dir(POISONED).exists()
    # the resumed run's checkpoint 4 holds exactly the uninterrupted run's weights and optimizer state
    assert same_checkpoint(runs["uninterrupted"].step_dir(4), runs["crashed"].step_dir(4))
