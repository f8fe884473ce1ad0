"""The recipes' default EXPERIMENT_NAME (and so CKPT_DIR) tells apart runs a user would not want merged:
recipes/lib/launch.sh, hmpo_default_name. Dry runs only (no Python, no Ray)."""

from __future__ import annotations

import re

import pytest
from test_recipes_scripts import RECIPES, dry_run

GSM8K = RECIPES / "gsm8k" / "run.sh"
BASE = "gsm8k-qwen2_5_math_1_5b-harmonic"


def name_and_dir(*overrides: str, **env: str) -> tuple[str, str]:
    argv = dry_run(GSM8K, *overrides, **env)
    value = {a.split("=", 1)[0]: a.split("=", 1)[1].strip("'") for a in argv if a.startswith("trainer.")}
    return value["trainer.experiment_name"], value["trainer.default_local_dir"]


def test_run_defining_overrides_get_their_own_name_and_checkpoint_directory():
    plain, plain_dir = name_and_dir()
    assert plain == BASE and plain_dir.endswith(f"/checkpoints/hmpo_verl/{BASE}")
    lr2, lr2_dir = name_and_dir("actor_rollout_ref.actor.optim.lr=2e-6")
    lr3, _ = name_and_dir("actor_rollout_ref.actor.optim.lr=3e-6")
    assert re.fullmatch(rf"{BASE}-o[0-9a-f]{{8}}", lr2) and lr2_dir.endswith(f"/{lr2}")
    assert len({plain, lr2, lr3}) == 3
    # the same settings, written otherwise, keep the name
    both = ("actor_rollout_ref.actor.optim.lr=2e-6", "data.seed=3")
    assert name_and_dir(*both)[0] == name_and_dir(*reversed(both))[0]
    assert name_and_dir("+actor_rollout_ref.actor.optim.lr=2e-6")[0] == lr2


@pytest.mark.parametrize("override", ["trainer.logger=[console,wandb]", "trainer.save_freq=5",
                                      "trainer.total_training_steps=400", "+hmpo.resume_accept=[trainer.total_epochs]"])
def test_logging_saving_and_length_keep_the_name(override):
    """A longer run keeps its name: the resume check then asks for the change to be accepted by name."""
    assert name_and_dir(override)[0] == BASE


@pytest.mark.parametrize("override", ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
                                      "actor_rollout_ref.rollout.gpu_memory_utilization=0.6",
                                      "actor_rollout_ref.actor.fsdp_config.param_offload=true",
                                      "trainer.v1.sampler.sampler_kwargs.poll_interval=0.01"])
def test_memory_and_parallelism_tuning_keep_the_name(override):
    """(And the CPU replay buffer's polling period: timing only.) The usual relaunch after an out-of-memory error resumes its run: a setting the checkpoints do not record
    (hmpo_verl.guards.run_settings) does not name it (it named a fresh folder, so the run restarted at step 0)."""
    assert name_and_dir(override)[0] == BASE


def test_a_change_accepted_by_name_keeps_the_name_so_the_relaunch_continues_that_run():
    """The resume check's own advice, '+hmpo.resume_accept=[KEY]', reaches the checkpoints it means: the accepted
    key leaves the name (it named a fresh folder); a change not accepted still names another run."""
    lr = "actor_rollout_ref.actor.optim.lr=5e-7"
    assert name_and_dir(lr, "+hmpo.resume_accept=[actor_rollout_ref.actor.optim.lr]")[0] == BASE
    assert name_and_dir(lr, "+hmpo.resume_accept=[actor_rollout_ref.actor.optim]")[0] == BASE  # a prefix
    assert name_and_dir(lr, "data.seed=3", "+hmpo.resume_accept=['actor_rollout_ref.actor.optim.lr']")[0] == \
        name_and_dir("data.seed=3")[0]
    assert name_and_dir(lr, "+hmpo.resume_accept=[data.seed]")[0] == name_and_dir(lr)[0] != BASE


def test_the_names_recorded_settings_are_the_resume_checks():
    """launch.sh's HMPO_NAMED_PREFIXES is hmpo_verl.guards.run_settings.RUN_SETTINGS less the run's length."""
    import subprocess

    from hmpo_verl.guards.run_settings import RUN_SETTINGS

    listed = subprocess.run(["bash", "-c", f'source "{RECIPES / "lib" / "launch.sh"}"; '
                             'printf "%s\\n" "${HMPO_NAMED_PREFIXES[@]}"'], capture_output=True, text=True, check=True)
    length = ("trainer.total_epochs", "trainer.total_training_steps")
    assert listed.stdout.split() == [key for key in RUN_SETTINGS if key not in length]


def test_a_name_or_directory_given_wins():
    assert name_and_dir("actor_rollout_ref.actor.optim.lr=2e-6", EXPERIMENT_NAME="mine") == \
        ("mine", name_and_dir(EXPERIMENT_NAME="mine")[1])
    assert name_and_dir("data.seed=3", CKPT_DIR="/ckpt/x")[1] == "/ckpt/x"
