"""``adapt: schedule`` spans the run, or the driver says so before Ray starts.

p goes from p_start to p_end over ``schedule_steps`` optimizer steps, then holds p_end. A run makes
``trainer.total_training_steps`` x (parameter_sync_step x ceil(train_batch_size / parameter_sync_step /
ppo_mini_batch_size) x ppo_epochs) optimizer steps (verl 0.9.1: ``PPOTrainer.step`` and the actor's
``train_mini_batch``; ``rollout.n`` multiplies both batch sizes and cancels). A longer schedule is refused
(p would never reach p_end), a shorter one warned about once (p reaches p_end early and holds it), and
without ``total_training_steps`` one line says the span is not checked.
"""

from __future__ import annotations

import logging
import re

import pytest
from test_recipes_config import RECIPES, compose_recipe

from hmpo_verl.hosts.verl.checks import check_options, driver_checks

SCHEDULE = "actor_rollout_ref.actor.policy_loss.schedule_steps"


def launch(*overrides: str):
    """The GSM8K recipe with the scheduled mean file: schedule 2000 = 500 steps x 128 / 32 prompts, one epoch."""
    sizes = ("trainer.total_training_steps=500", "data.train_batch_size=128",
             "actor_rollout_ref.actor.ppo_mini_batch_size=32", "actor_rollout_ref.actor.ppo_epochs=1")
    return compose_recipe(RECIPES, "gsm8k", ("mean=adaptive_schedule", *sizes, f"{SCHEDULE}=2000", *overrides))


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "hmpo_verl" and "schedule_steps" in r.getMessage()]


def test_a_schedule_over_the_whole_run_passes_silently(caplog):
    caplog.set_level(logging.INFO, logger="hmpo_verl")
    check_options(launch())
    check_options(launch("trainer.v1.trainer_mode=separate_async", "trainer.v1.separate_async.parameter_sync_step=4"))
    assert warnings(caplog) == []


@pytest.mark.parametrize("overrides, run", [
    (("trainer.total_training_steps=250",), 1000),
    (("actor_rollout_ref.actor.ppo_mini_batch_size=64",), 1000),  # 2 mini-batches per step, not 4
    (("actor_rollout_ref.actor.ppo_mini_batch_size=64", "actor_rollout_ref.rollout.n=16"), 1000),  # n cancels
    (("data.train_batch_size=64",), 1000),
    (("trainer.critic_warmup=3",), 1992),  # steps 1 and 2 do not update the actor: 498 x 4
    (("trainer.total_training_steps=250", "trainer.v1.trainer_mode=separate_async",
      "trainer.v1.separate_async.parameter_sync_step=2", "actor_rollout_ref.actor.ppo_mini_batch_size=64"), 500),
])
def test_a_schedule_longer_than_the_run_is_refused_with_the_value_to_set(overrides, run, caplog):
    with pytest.raises(ValueError) as info:
        check_options(launch(*overrides))
    message = str(info.value)
    assert message.startswith(f"{SCHEDULE}=2000 with adapt=schedule is longer than the run: the run makes {run} "
                              "optimizer steps"), message
    assert "never reach p_end=-2.0" in message and message.endswith(f"Set {SCHEDULE}={run}")
    check_options(launch(*overrides, f"{SCHEDULE}={run}"))  # the way on
    assert warnings(caplog) == []


@pytest.mark.parametrize("overrides, run", [
    (("trainer.total_training_steps=1000",), 4000),
    (("actor_rollout_ref.actor.ppo_epochs=2",), 4000),
    (("actor_rollout_ref.actor.ppo_mini_batch_size=16",), 4000),
])
def test_a_schedule_shorter_than_the_run_is_named_once_per_launch(overrides, run, caplog):
    config = launch(*overrides)
    for _ in range(2):  # validate_config and run_ppo both run the driver checks on the launch's config
        check_options(config)
    [line] = warnings(caplog)
    assert line.startswith(f"{SCHEDULE}=2000 with adapt=schedule is shorter than the run: the run makes {run} "
                           "optimizer steps (trainer.total_training_steps "), line
    assert line.endswith(f"p reaches p_end=-2.0 at optimizer step 2000 and holds it for the last {run - 2000}. For a "
                         f"schedule over the whole run set {SCHEDULE}={run}"), line
    caplog.clear()
    check_options(launch(*overrides, f"{SCHEDULE}={run}"))
    assert warnings(caplog) == []


def test_without_total_training_steps_one_line_says_the_span_is_not_checked(caplog):
    config = launch("trainer.total_training_steps=null")
    check_options(config)
    check_options(config)
    [line] = warnings(caplog)
    assert line.startswith(f"{SCHEDULE}=2000: trainer.total_training_steps is not set, so verl derives the run's "
                           "length from the dataset inside Ray")
    assert "4 optimizer steps per training step" in line


@pytest.mark.parametrize("override, named", [
    ("actor_rollout_ref.rollout.agent.default_agent_loop=my_agent", "default_agent_loop='my_agent'"),
    ("actor_rollout_ref.rollout.agent.agent_loop_config_path=agents.yaml", "agent_loop_config_path='agents.yaml'"),
])
def test_a_custom_agent_loop_says_the_span_is_not_checked_instead_of_counting_one_output_per_session(
        override, named, caplog):
    """An agent loop returning k outputs per session makes k times the rows, so k times the optimizer steps (verl's
    V1 mini-batches are ppo_mini_batch_size x rollout.n rows): a schedule counted as spanning the run would reach
    p_end after 1/k of it. verl's own loops (single_turn_agent, tool_agent) return one output and are counted."""
    check_options(launch(override, f"{SCHEDULE}=10"))  # counted, 10 would be named as shorter than the run
    [line] = warnings(caplog)
    assert line.startswith(f"{SCHEDULE}=10: not checked against the run's length with actor_rollout_ref.rollout."
                           f"agent.{named}: an agent loop that returns several outputs per session")
    caplog.clear()
    with pytest.raises(ValueError, match="longer than the run"):
        check_options(launch("actor_rollout_ref.rollout.agent.default_agent_loop=tool_agent", f"{SCHEDULE}=1000000"))


def test_the_default_schedule_steps_are_advised_with_a_plus():
    """A schedule on the class default (1000, not in the config) needs ``+`` on the command line."""
    config = launch(f"~{SCHEDULE}", "trainer.total_training_steps=100")
    with pytest.raises(ValueError, match=re.escape(f"{SCHEDULE}=1000 with adapt=schedule is longer than the run: the "
                                                   "run makes 400 optimizer steps")) as info:
        check_options(config)
    assert str(info.value).endswith(f"Set +{SCHEDULE}=400")
    check_options(launch(f"~{SCHEDULE}", "trainer.total_training_steps=100", f"+{SCHEDULE}=400"))


def test_driver_checks_refuse_it_before_ray(tmp_path):
    config = launch("trainer.total_training_steps=250", f"trainer.default_local_dir={tmp_path}")
    with pytest.raises(ValueError, match="is longer than the run"):
        driver_checks(config)


@pytest.mark.parametrize("overrides, key", [
    (("actor_rollout_ref.actor.checkpoint.save_contents=[model,extra]",), "save_contents"),  # load follows it
    (("actor_rollout_ref.actor.checkpoint.load_contents=[model,extra]",), "load_contents"),
])
def test_checkpoints_without_the_optimizer_which_holds_the_schedules_step_are_refused_at_the_first_launch(
        overrides, key):
    """The step p is read from is the optimizer's: without it a resume restarts p at p_start (lr goes on)."""
    with pytest.raises(ValueError, match=rf"actor_rollout_ref.actor.checkpoint.{key}=\['model', 'extra'\] with "
                                         r"policy_loss.adapt=schedule: .* restart p at p_start"):
        check_options(launch("trainer.save_freq=50", *overrides))
    check_options(launch("trainer.save_freq=-1", "trainer.resume_mode=disable", *overrides))  # neither saved nor read
