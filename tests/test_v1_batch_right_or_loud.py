"""The V1 trainers' batch split is refused before Ray starts, not asserted after it.

verl 0.9.1's ``PPOTrainer.step`` splits each step's ``data.train_batch_size`` prompts into
``trainer.v1.<mode>.parameter_sync_step`` updates and asserts that they divide; ``PPOTrainerSeparateAsync``
asserts ``train_batch_size == parameter_sync_step x ppo_mini_batch_size``. Both only once Ray and the workers
are up; the driver (``check_v1_batch``, in ``driver_checks``) says it first, with settings that pass.
"""

from __future__ import annotations

import pytest
from test_recipes_config import RECIPES, compose_recipe

from hmpo_verl.hosts.verl.checks import check_v1_batch, driver_checks

SYNC_STEP = "trainer.v1.{mode}.parameter_sync_step"


def launch(*overrides: str):
    """The GSM8K recipe (128 prompts per step, mini-batches of 32) with ``overrides``."""
    return compose_recipe(RECIPES, "gsm8k", ("data.train_batch_size=128", "actor_rollout_ref.actor.ppo_mini_batch_size=32",
                                             *overrides))


@pytest.mark.parametrize("overrides", [
    (),  # sync: one update per step
    ("trainer.v1.trainer_mode=separate_async",),  # verl's own parameter_sync_step 4: 4 x 32 = 128
    ("trainer.v1.trainer_mode=colocate_async", "+trainer.v1.colocate_async.parameter_sync_step=2"),
    ("trainer.use_v1=false", "+trainer.v1.sync.parameter_sync_step=3"),  # not read without V1
])
def test_a_batch_verl_can_split_passes(overrides):
    check_v1_batch(launch(*overrides))


def test_a_batch_that_parameter_sync_step_does_not_divide_is_refused_with_settings_that_pass():
    key = SYNC_STEP.format(mode="colocate_async")
    config = launch("trainer.v1.trainer_mode=colocate_async", f"+{key}=3")
    with pytest.raises(ValueError, match=rf"data.train_batch_size=128 is not a multiple of {key}=3: .* Set "
                                         rf"data.train_batch_size to a multiple of 3, or {key} to a divisor of 128"):
        driver_checks(config)  # before any other driver check touches the disk
    check_v1_batch(launch("trainer.v1.trainer_mode=colocate_async", f"+{key}=3", "data.train_batch_size=129"))
    check_v1_batch(launch("trainer.v1.trainer_mode=colocate_async", f"+{key}=4"))


def test_separate_async_needs_one_mini_batch_per_update_and_names_both_ways_on():
    key = SYNC_STEP.format(mode="separate_async")
    overrides = ("trainer.v1.trainer_mode=separate_async", "actor_rollout_ref.actor.ppo_mini_batch_size=16")
    with pytest.raises(ValueError) as info:
        check_v1_batch(launch(*overrides))
    assert str(info.value).startswith(f"data.train_batch_size=128 must equal {key}=4 x actor_rollout_ref.actor."
                                      "ppo_mini_batch_size=16 in separate_async")
    assert str(info.value).endswith(f"Set data.train_batch_size=64 or {key}=8")
    check_v1_batch(launch(*overrides, "data.train_batch_size=64"))
    check_v1_batch(launch(*overrides, f"{key}=8"))


def test_separate_async_at_one_update_per_step_is_checked_too():
    """parameter_sync_step=1 in separate_async: verl asserts train_batch_size == 1 x ppo_mini_batch_size as for any
    value (PPOTrainerSeparateAsync.__init__); the check had returned early at 1."""
    key = SYNC_STEP.format(mode="separate_async")
    with pytest.raises(ValueError, match=rf"^data.train_batch_size=128 must equal {key}=1 x actor_rollout_ref.actor."
                                         rf"ppo_mini_batch_size=32 in separate_async.* Set data.train_batch_size=32 "
                                         rf"or {key}=4$"):
        check_v1_batch(launch("trainer.v1.trainer_mode=separate_async", f"{key}=1"))
    check_v1_batch(launch("trainer.v1.trainer_mode=separate_async", f"{key}=1", "data.train_batch_size=32"))
    # a stale trainer_mode without V1 is not read
    check_v1_batch(launch("trainer.use_v1=false", "trainer.v1.trainer_mode=separate_async", f"{key}=1"))
