"""A relaunch with other settings does not resume the old run (hmpo_verl.run_settings), on every entry point's
driver, before Ray starts. Checkpoints are laid out as verl 0.9.1's FSDP saver writes them; the configs are
verl's own, composed with Hydra."""

from __future__ import annotations

import json
import logging
import os
import re

import pytest
import ray
import verl
from hydra import compose, initialize_config_dir

from hmpo_verl.lab.tasks import REPO_ROOT
from hmpo_verl.checkpoints import TRACKER, guard_saves, read_tracker
from hmpo_verl.run_settings import (
    ACCEPT_KEY,
    ADDED,
    SETTINGS_FILE,
    SETTINGS_VERSION,
    VERSION_KEY,
    WORLD_KEY,
    ResumeSettingsError,
    under,
    check_resume_settings,
    run_settings,
    settings_differences,
    write_run_settings,
)
from test_checkpoints_on_cpu import write_checkpoint

VERL_CONFIG = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
RECIPES = str(REPO_ROOT / "recipes" / "cpu_fibonacci")  # verl's off-policy yaml needs cwd = verl's checkout; ours do not
ENTRY_POINTS = {  # config folder, config name, module whose hydra main is the entry point
    "main_ppo": (VERL_CONFIG, "ppo_trainer", "verl.trainer.main_ppo"),
    "one_step_off": (RECIPES, "one_step_off", "verl.experimental.one_step_off_policy.main_ppo"),
    "fully_async": (RECIPES, "fully_async", "verl.experimental.fully_async_policy.fully_async_main"),
}
BASE = ("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
        "trainer.nnodes=1", "trainer.n_gpus_per_node=2", "trainer.resume_mode=auto", "trainer.save_freq=2")


def verl_config(root, *overrides, entry="main_ppo"):
    folder, name, _ = ENTRY_POINTS[entry]
    with initialize_config_dir(config_dir=folder, version_base=None):
        return compose(config_name=name, overrides=[*BASE, f"trainer.default_local_dir={root}", *overrides])


def saved_run(root, *overrides, entry="main_ppo"):
    """A checkpoint at step 2 (world size 2) whose recorded settings are those of `overrides`."""
    step_dir = write_checkpoint(root, 2, world=2)
    write_run_settings(step_dir, verl_config(root, *overrides, entry=entry))
    return step_dir


def test_the_settings_that_define_a_run_are_recorded_and_logging_is_not(tmp_path):
    settings = run_settings(verl_config(tmp_path))
    for key in ("actor_rollout_ref.actor.policy_loss.loss_mode", "actor_rollout_ref.actor.optim.lr",
                "actor_rollout_ref.actor.optim.lr_scheduler_type", "actor_rollout_ref.actor.optim.lr_warmup_steps",
                "actor_rollout_ref.actor.clip_ratio_high", "actor_rollout_ref.actor.ppo_mini_batch_size",
                "data.train_batch_size", "data.max_response_length", "actor_rollout_ref.model.path",
                "trainer.nnodes", "trainer.n_gpus_per_node", "data.seed", "actor_rollout_ref.rollout.seed",
                "algorithm.adv_estimator", "trainer.total_training_steps"):
        assert key in settings, key
    assert not [k for k in settings if k.startswith(("trainer.save_freq", "trainer.logger", "trainer.experiment_name",
                                                      "trainer.test_freq"))]
    assert "actor_rollout_ref.actor.optim.total_training_steps" not in settings  # the trainer writes it itself
    same = verl_config(tmp_path, "trainer.save_freq=5", "trainer.logger=[console]", "trainer.experiment_name=x")
    assert run_settings(same) == settings
    json.dumps(settings)  # what write_run_settings stores


def test_a_guarded_save_records_the_settings_before_verl_writes_the_checkpoint(tmp_path):
    seen = []

    class Trainer:
        config = verl_config(tmp_path)
        global_steps = 4

        def _save_checkpoint(self):
            seen.append((tmp_path / "global_step_4" / SETTINGS_FILE).is_file())

    guard_saves(Trainer)
    Trainer()._save_checkpoint()
    assert seen == [True]
    saved = json.loads((tmp_path / "global_step_4" / SETTINGS_FILE).read_text())
    assert saved == {**run_settings(Trainer.config), VERSION_KEY: SETTINGS_VERSION}


def test_a_relaunch_with_other_settings_stops_naming_each_key_both_values_and_the_ways_on(tmp_path):
    import verl.trainer.main_ppo

    saved_run(tmp_path)
    loss = "actor_rollout_ref.actor.policy_loss"
    changed = verl_config(tmp_path, "actor_rollout_ref.actor.optim.lr=3e-6", "actor_rollout_ref.actor.clip_ratio_high=0.28",
                          f"{loss}._target_=hmpo_verl.PowerMeanLossConfig", f"{loss}.loss_mode=power_mean", f"+{loss}.power=-1")
    with pytest.raises(ResumeSettingsError) as err:
        verl.trainer.main_ppo.validate_config(changed, use_reference_policy=False, use_critic=False)
    message = str(err.value)
    assert f"resuming {tmp_path / 'global_step_2'} would continue a run saved with other settings" in message
    assert "actor_rollout_ref.actor.optim.lr: saved 1e-06, now 3e-06" in message
    assert "actor_rollout_ref.actor.clip_ratio_high: saved 0.2, now 0.28" in message
    assert f"{loss}.power: saved '<unset>', now -1" in message
    assert f"{loss}.loss_mode: saved 'vanilla', now 'power_mean'" in message
    for way in ("CKPT_DIR", "EXPERIMENT_NAME", "trainer.resume_mode=disable", f"+{ACCEPT_KEY}=[KEY,...]"):
        assert way in message
    # each way on works
    verl.trainer.main_ppo.validate_config(verl_config(tmp_path, "actor_rollout_ref.actor.optim.lr=3e-6",
                                                      "trainer.resume_mode=disable"),
                                          use_reference_policy=False, use_critic=False)
    verl.trainer.main_ppo.validate_config(verl_config(tmp_path / "apart", "actor_rollout_ref.actor.optim.lr=3e-6"),
                                          use_reference_policy=False, use_critic=False)
    verl.trainer.main_ppo.validate_config(verl_config(tmp_path), use_reference_policy=False, use_critic=False)


MEANING_CHANGES = [  # each changes what the resumed run trains on or how it continues (an audit found them resumed)
    ("reward.custom_reward_function.path=/tmp/other_reward.py", "reward.custom_reward_function.path"),
    ("reward.reward_manager.name=dapo", "reward.reward_manager.name"),
    ("data.train_max_samples=1000", "data.train_max_samples"),  # moves the epoch boundary and data.pt's indices
    ("data.filter_overlong_prompts=true", "data.filter_overlong_prompts"),
    ("data.prompt_key=question", "data.prompt_key"),
    ("+data.apply_chat_template_kwargs.enable_thinking=true", "data.apply_chat_template_kwargs.enable_thinking"),
    ("trainer.use_v1=false", "trainer.use_v1"),
    ("trainer.v1.sampler.max_off_policy_threshold=1", "trainer.v1.sampler.max_off_policy_threshold"),
    ("trainer.balance_batch=false", "trainer.balance_batch"),
    ("actor_rollout_ref.actor.checkpoint.load_contents=[model]", "actor_rollout_ref.actor.checkpoint.load_contents"),
    ("actor_rollout_ref.actor.loss_scale_factor=512", "actor_rollout_ref.actor.loss_scale_factor"),
    # version 4: what the rollout generates, and the GPUs that serve it
    ("actor_rollout_ref.rollout.response_length=1024", "actor_rollout_ref.rollout.response_length"),
    ("actor_rollout_ref.rollout.multi_turn.enable=true", "actor_rollout_ref.rollout.multi_turn.enable"),
    ("actor_rollout_ref.rollout.multi_turn.max_assistant_turns=5", "actor_rollout_ref.rollout.multi_turn.max_assistant_turns"),
    ("actor_rollout_ref.rollout.agent.default_agent_loop=tool_agent", "actor_rollout_ref.rollout.agent.default_agent_loop"),
    ("actor_rollout_ref.rollout.ignore_eos=true", "actor_rollout_ref.rollout.ignore_eos"),
    ("actor_rollout_ref.hybrid_engine=false", "actor_rollout_ref.hybrid_engine"),
]


@pytest.mark.parametrize("override, key", MEANING_CHANGES, ids=[k for _, k in MEANING_CHANGES])
def test_a_change_of_reward_data_trainer_or_what_a_resume_loads_is_refused_by_name(tmp_path, override, key):
    import verl.trainer.main_ppo

    saved_run(tmp_path)
    with pytest.raises(ResumeSettingsError, match=rf"\n  {re.escape(key)}: saved "):
        verl.trainer.main_ppo.validate_config(verl_config(tmp_path, override), use_reference_policy=False,
                                              use_critic=False)


def test_a_fully_async_sync_step_change_is_refused_by_name(tmp_path):
    """fully-async rebuilds its step count from trigger_parameter_sync_step on resume."""
    step_dir = write_checkpoint(tmp_path, 2, world=2)
    write_run_settings(step_dir, verl_config(tmp_path, entry="fully_async"))
    changed = verl_config(tmp_path, "async_training.trigger_parameter_sync_step=3", entry="fully_async")
    with pytest.raises(ResumeSettingsError, match=r"\n  async_training.trigger_parameter_sync_step: saved "):
        check_resume_settings(changed, step_dir)



def test_fully_async_resumes_whatever_the_v1_sections_it_does_not_read_say(tmp_path):
    """fully-async's trainer is built on the v0 one: trainer.v1.* (trainer.use_v1=true is inherited) is unread."""
    step_dir = write_checkpoint(tmp_path, 2, world=2)
    write_run_settings(step_dir, verl_config(tmp_path, entry="fully_async"))
    check_resume_settings(verl_config(tmp_path, "+trainer.v1.sync.parameter_sync_step=2", entry="fully_async"),
                          step_dir)

def test_a_record_from_before_version_2_compares_the_keys_it_has_and_says_which_it_lacks(tmp_path, caplog):
    """A checkpoint saved by the plugin before it recorded the reward, data shaping and trainer keys: those
    cannot be compared (a warning names them); the keys it has still are (a changed lr still stops)."""
    step_dir = saved_run(tmp_path)
    record = json.loads((step_dir / SETTINGS_FILE).read_text())
    old = {k: v for k, v in record.items() if k != VERSION_KEY and not under(k, (*ADDED, "trainer.v1"))}
    (step_dir / SETTINGS_FILE).write_text(json.dumps(old))
    with caplog.at_level(logging.WARNING, logger="hmpo_verl"):
        check_resume_settings(verl_config(tmp_path, "data.train_max_samples=1000"), step_dir)
    assert "did not record" in caplog.text and "data.train_max_samples" in caplog.text
    with pytest.raises(ResumeSettingsError, match="actor_rollout_ref.actor.optim.lr: saved 1e-06, now 3e-06"):
        check_resume_settings(verl_config(tmp_path, "actor_rollout_ref.actor.optim.lr=3e-6"), step_dir)


V1_MODE_CHANGES = [  # (the launch's mode, an override, the key it changes): what verl's V1 trainer reads of it
    ("colocate_async", "+trainer.v1.colocate_async.parameter_sync_step=2", "trainer.v1.colocate_async.parameter_sync_step"),
    ("colocate_async", "trainer.v1.colocate_async.num_warmup_batches=2", "trainer.v1.colocate_async.num_warmup_batches"),
    ("separate_async", "trainer.v1.separate_async.num_warmup_batches=2", "trainer.v1.separate_async.num_warmup_batches"),
    ("separate_async", "trainer.v1.separate_async.hybrid_rollout.enable_switch=true",
     "trainer.v1.separate_async.hybrid_rollout.enable_switch"),
    ("sync", "trainer.v1.sampler.custom_sampler.name=MySampler", "trainer.v1.sampler.custom_sampler.name"),
]


@pytest.mark.parametrize("mode, override, key", V1_MODE_CHANGES, ids=[k for _, _, k in V1_MODE_CHANGES])
def test_the_v1_trainers_mode_section_and_sampler_are_compared(tmp_path, mode, override, key):
    """verl's trainer_base.py reads trainer.v1.<its mode> (parameter_sync_step: updates per step and the lr
    horizon; num_warmup_batches: the prefetch depth, so the staleness) and trainer.v1.sampler (the replay buffer)."""
    step_dir = saved_run(tmp_path, f"trainer.v1.trainer_mode={mode}")
    with pytest.raises(ResumeSettingsError, match=rf"\n  {re.escape(key)}: saved "):
        check_resume_settings(verl_config(tmp_path, f"trainer.v1.trainer_mode={mode}", override), step_dir)


def test_the_cpu_replay_buffers_polling_period_is_not_a_run_setting(tmp_path):
    """poll_interval decides when a finished rollout is noticed, not what the run does: a relaunch with another
    one resumes (it was refused, naming it), also from a checkpoint whose record (of an earlier plugin) holds it;
    the sampler's other keys are still compared."""
    poll = "trainer.v1.sampler.sampler_kwargs.poll_interval"
    sampler = ("trainer.v1.trainer_mode=colocate_async", "trainer.v1.sampler.custom_sampler.path=pkg://verl_cpu.replay_buffer",
               "trainer.v1.sampler.custom_sampler.name=PollingReplayBuffer")
    step_dir = saved_run(tmp_path, *sampler, f"+{poll}=0.05")
    assert poll not in json.loads((step_dir / SETTINGS_FILE).read_text())
    check_resume_settings(verl_config(tmp_path, *sampler, f"+{poll}=0.01"), step_dir)
    check_resume_settings(verl_config(tmp_path, *sampler), step_dir)
    record = json.loads((step_dir / SETTINGS_FILE).read_text())
    (step_dir / SETTINGS_FILE).write_text(json.dumps({**record, poll: 0.05}))  # as the plugin recorded it before
    check_resume_settings(verl_config(tmp_path, *sampler, f"+{poll}=0.01"), step_dir)
    with pytest.raises(ResumeSettingsError, match=r"trainer.v1.sampler.custom_sampler.name: saved 'PollingReplayBuffer'"):
        check_resume_settings(verl_config(tmp_path, *sampler[:2], "trainer.v1.sampler.custom_sampler.name=Other",
                                          f"+{poll}=0.01"), step_dir)


def test_another_v1_modes_section_is_not_compared(tmp_path):
    """The trainer reads its own mode's section alone: a changed separate_async key in colocate_async is no
    difference (it stopped the resume)."""
    colocate = "trainer.v1.trainer_mode=colocate_async"
    step_dir = saved_run(tmp_path, colocate)
    check_resume_settings(verl_config(tmp_path, colocate, "trainer.v1.separate_async.parameter_sync_step=8"), step_dir)
    check_resume_settings(verl_config(tmp_path, colocate, "trainer.v1.separate_async.num_warmup_batches=3"), step_dir)


def test_a_version_2_record_compares_the_keys_it_has_and_says_which_it_lacks(tmp_path, caplog):
    """A checkpoint of version 2 recorded separate_async.parameter_sync_step and the sampler's staleness bound
    of trainer.v1: a change of those still stops; the rest of the sections cannot be compared (a warning)."""
    separate = "trainer.v1.trainer_mode=separate_async"
    step_dir = saved_run(tmp_path, separate)
    kept = ("trainer.v1.trainer_mode", "trainer.v1.separate_async.parameter_sync_step",
            "trainer.v1.sampler.max_off_policy_threshold", "trainer.v1.sampler.max_off_policy_strategy")
    record = json.loads((step_dir / SETTINGS_FILE).read_text())
    old = {k: v for k, v in record.items() if not k.startswith("trainer.v1.") or k in kept}
    (step_dir / SETTINGS_FILE).write_text(json.dumps({**old, VERSION_KEY: 2}))
    with caplog.at_level(logging.WARNING, logger="hmpo_verl"):
        check_resume_settings(verl_config(tmp_path, separate, "trainer.v1.separate_async.num_warmup_batches=2"),
                              step_dir)
    assert "did not record" in caplog.text and "trainer.v1.separate_async" in caplog.text
    with pytest.raises(ResumeSettingsError, match="trainer.v1.separate_async.parameter_sync_step: saved 4, now 2"):
        check_resume_settings(verl_config(tmp_path, separate, "trainer.v1.separate_async.parameter_sync_step=2"),
                              step_dir)


def test_a_meant_change_is_accepted_by_name_and_only_that_one(tmp_path, caplog):
    import verl.trainer.main_ppo

    saved_run(tmp_path, "trainer.total_training_steps=10")
    longer = ("trainer.total_training_steps=20", f"+{ACCEPT_KEY}=[trainer.total_training_steps]")
    with caplog.at_level(logging.WARNING, logger="hmpo_verl"):
        verl.trainer.main_ppo.validate_config(verl_config(tmp_path, *longer), use_reference_policy=False,
                                              use_critic=False)
    assert "changes accepted by hmpo.resume_accept" in caplog.text
    with pytest.raises(ResumeSettingsError, match="data.seed: saved None, now 7") as err:
        verl.trainer.main_ppo.validate_config(verl_config(tmp_path, *longer, "data.seed=7"),
                                              use_reference_policy=False, use_critic=False)
    assert "  trainer.total_training_steps:" not in str(err.value)


def test_a_world_size_change_is_refused_by_name_even_when_accepted(tmp_path):
    """verl's FSDP checkpoint manager loads model_world_size_<new W>_rank_<r>.pt: it does not reshard."""
    import verl.trainer.main_ppo

    saved_run(tmp_path)
    two_nodes = verl_config(tmp_path, "trainer.nnodes=2", f"+{ACCEPT_KEY}=[trainer]")
    with pytest.raises(ResumeSettingsError, match=r"FSDP shards of world size 2, and this launch's is 4 "
                                                  r"\(trainer.nnodes \* trainer.n_gpus_per_node\)"):
        verl.trainer.main_ppo.validate_config(two_nodes, use_reference_policy=False, use_critic=False)


def _entry_main(entry):
    import importlib

    return importlib.import_module(ENTRY_POINTS[entry][2]).main.__wrapped__  # the function hydra.main wraps


@pytest.mark.parametrize("entry", ["one_step_off", "fully_async"])
def test_the_off_policy_entry_points_check_before_ray_starts(tmp_path, entry, monkeypatch):
    """Each entry point's own main (what `python -m ...` runs after Hydra composes the config): a changed
    setting stops before ray.init, also where an empty tracker makes the guard fall back to the newest complete
    checkpoint: that one is checked first, and the tracker is left as it was (no write before a refusal)."""

    def ray_init(*args, **kwargs):
        raise AssertionError("Ray was started before the checks stopped the run")

    monkeypatch.setattr(ray, "init", ray_init)
    saved_run(tmp_path, entry=entry)
    changed = ("actor_rollout_ref.actor.optim.lr=3e-6",)  # composed per launch: main() edits its config
    with pytest.raises(ResumeSettingsError, match=r"actor_rollout_ref.actor.optim.lr: saved [0-9.e-]+, now 3e-06\n"):
        _entry_main(entry)(verl_config(tmp_path, *changed, entry=entry))
    (tmp_path / TRACKER).write_text("")  # verl would fail on int("")
    with pytest.raises(ResumeSettingsError):
        _entry_main(entry)(verl_config(tmp_path, *changed, entry=entry))
    assert (tmp_path / TRACKER).read_text() == ""



def test_one_step_offs_entry_point_runs_verls_own_validate_config_before_ray_starts(tmp_path, monkeypatch):
    """verl's one-step-off task runner calls validate_config once Ray is up; the driver calls it first (a fresh run:
    no checkpoint is involved)."""

    def ray_init(*args, **kwargs):
        raise AssertionError("Ray was started before verl's validate_config stopped the run")

    monkeypatch.setattr(ray, "init", ray_init)
    bad = ("actor_rollout_ref.rollout.val_kwargs.do_sample=true", "actor_rollout_ref.rollout.temperature=0")
    with pytest.raises(AssertionError, match="validation gen temperature should be greater than 0"):
        _entry_main("one_step_off")(verl_config(tmp_path, *bad, entry="one_step_off"))


def test_fully_asyncs_own_save_is_guarded_and_numbered_by_its_param_version(tmp_path):
    """FullyAsyncTrainer (a @ray.remote class) overrides the guarded save; its folders count weight syncs."""
    from verl.experimental.fully_async_policy import fully_async_trainer

    from hmpo_verl.checkpoints import CheckpointSaveError
    from hmpo_verl.registry import ray_wrapped_class

    original = ray_wrapped_class(fully_async_trainer.FullyAsyncTrainer)
    assert original.__name__ == "FullyAsyncTrainer" and original._save_checkpoint._hmpo_guarded

    class Trainer:
        config = verl_config(tmp_path, entry="fully_async")
        global_steps, current_param_version = 40, 6

        def _save_checkpoint(self):
            raise OSError(28, "No space left on device")

    guard_saves(Trainer)
    with pytest.raises(CheckpointSaveError, match=f"saving checkpoint {tmp_path / 'global_step_6'} failed "
                                                  r"\(OSError: \[Errno 28\] No space left on device\)"):
        Trainer()._save_checkpoint()
    assert (tmp_path / "global_step_6" / SETTINGS_FILE).is_file()


def test_a_checkpoint_records_the_launchs_settings_not_the_trainers_edited_copy(tmp_path):
    """verl's apply_bypass_mode edits the trainer's policy_loss (loss_mode, a rollout_correction copy) during
    step 1: the checkpoint records the driver's stamp, so the same command resumes."""
    import verl.trainer.main_ppo
    from omegaconf import open_dict

    from hmpo_verl.registry import driver_checks

    launch = verl_config(tmp_path, "trainer.n_gpus_per_node=2")
    driver_checks(launch)

    class Trainer:
        config, global_steps = launch, 2

        def _save_checkpoint(self):
            write_checkpoint(tmp_path, 2, world=2)

    with open_dict(launch):  # what apply_bypass_mode does to the trainer's copy
        launch.actor_rollout_ref.actor.policy_loss["rollout_correction"] = {"bypass_mode": True}
        launch.actor_rollout_ref.actor.policy_loss["loss_mode"] = "bypass_mode"
    guard_saves(Trainer)
    Trainer()._save_checkpoint()
    verl.trainer.main_ppo.validate_config(verl_config(tmp_path, "trainer.n_gpus_per_node=2"),
                                          use_reference_policy=False, use_critic=False)


def test_a_null_setting_and_an_absent_one_are_the_same_setting():
    """verl reads an absent key and a null one alike: a subtree of nulls saved, a null subtree now (the
    fully-async entry point composes custom_reward_function so) is no difference; a value is."""
    from hmpo_verl.run_settings import settings_differences

    saved = {"custom_reward_function.path": None, "custom_reward_function.name": None, VERSION_KEY: SETTINGS_VERSION}
    assert settings_differences(saved, {"custom_reward_function": None}) == []
    assert settings_differences(saved, {"custom_reward_function.path": "/r.py"}) == [
        ("custom_reward_function.path", None, "/r.py")]


def test_the_v0_trainers_prompts_per_step_are_compared(tmp_path):
    """data.gen_batch_size is the v0 / one-step-off dataloader's batch (verl's create_rl_dataloader): the prompts
    each step trains there."""
    saved_run(tmp_path, "trainer.use_v1=false", "+data.gen_batch_size=8")
    with pytest.raises(ResumeSettingsError, match=r"data.gen_batch_size: saved 8, now 32\n"):
        check_resume_settings(verl_config(tmp_path, "trainer.use_v1=false", "+data.gen_batch_size=32"),
                              tmp_path / "global_step_2")


def test_the_same_world_size_split_otherwise_over_nodes_resumes_and_another_is_named_once(tmp_path):
    """1 x 2 and 2 x 1 GPUs shard alike (the saved shards' world size is 2): not a difference; 2 x 2 is one line,
    the product, and accepting either factor's key accepts it."""
    step_dir = saved_run(tmp_path, "trainer.nnodes=1", "trainer.n_gpus_per_node=2")
    check_resume_settings(verl_config(tmp_path, "trainer.nnodes=2", "trainer.n_gpus_per_node=1"), step_dir)
    four = ("trainer.nnodes=2", "trainer.n_gpus_per_node=2")
    assert settings_differences(json.loads((step_dir / SETTINGS_FILE).read_text()),
                                run_settings(verl_config(tmp_path, *four))) == [(WORLD_KEY, 2, 4)]
    assert settings_differences(json.loads((step_dir / SETTINGS_FILE).read_text()),
                                run_settings(verl_config(tmp_path, *four)), accepted=("trainer.nnodes",)) == []
