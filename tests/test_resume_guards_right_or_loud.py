"""Every relaunch resumes right or stops before Ray starts, saying what is wrong and a way on that works when
followed (hmpo_verl.checkpoints.guard_resume, run by the driver checks). Each test breaks a resume the way a
user would, then follows the advice. Checkpoints are laid out as verl 0.9.1's FSDP saver writes them; the
configs are verl's own, composed with Hydra."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import verl
from hydra import compose, initialize_config_dir
from verl.utils.checkpoint.checkpoint_manager import find_latest_ckpt_path

from hmpo_verl.checkpoints import (
    TRACKER,
    TRANSFER_QUEUE_FILES,
    CheckpointResumeError,
    checkpoint_problems,
    guard_resume,
    read_tracker,
    resume_step_dir,
    saved_trainer_mode,
)
from hmpo_verl.registry import driver_checks
from hmpo_verl.run_settings import ACCEPT_KEY, SETTINGS_FILE, ResumeSettingsError, write_run_settings
from _helpers import SEPARATE_POOL_SYNC
from test_checkpoints_on_cpu import truncate, write_checkpoint

VERL_CONFIG = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
BASE = ("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
        "trainer.nnodes=1", "trainer.n_gpus_per_node=2", "trainer.resume_mode=auto", "trainer.save_freq=2",
        SEPARATE_POOL_SYNC)
ACCEPT_MODE = f"+{ACCEPT_KEY}=[trainer.use_v1,trainer.v1.trainer_mode]"  # what the mode message advises


def launch(root, *overrides):
    """verl's ppo_trainer config as `python -m verl.trainer.main_ppo ... <overrides>` composes it."""
    with initialize_config_dir(config_dir=VERL_CONFIG, version_base=None):
        return compose(config_name="ppo_trainer", overrides=[*BASE, f"trainer.default_local_dir={root}", *overrides])


def saved(root, step, *overrides, world=2):
    """global_step_<step> as a run launched with `overrides` leaves it: settings (guard_saves), shards, tracker."""
    step_dir = write_checkpoint(root, step, world=world)
    write_run_settings(step_dir, launch(root, *overrides))
    return step_dir


def write_queue(step_dir):
    """transfer_queue/ as verl's V1 async trainer leaves it (after data.pt, before the tracker)."""
    (step_dir / "transfer_queue").mkdir()
    for name in TRANSFER_QUEUE_FILES:
        (step_dir / "transfer_queue" / name).write_text("{}")


# ----------------------------------------------------------------------------- A: trainer.resume_mode


@pytest.mark.parametrize("value", ["true", "Auto", "null"])
def test_a_resume_mode_verl_reads_two_ways_stops_naming_the_allowed_values(tmp_path, value):
    """`trainer.resume_mode=true` (Hydra: a bool), `Auto` or `null`: verl's v0 trainer resumes from the tracker as
    auto would, so every guard on auto was skipped -- here a changed lr."""
    import verl.trainer.ppo.ray_trainer as ray_trainer

    saved(tmp_path, 4)
    relaunch = launch(tmp_path, "actor_rollout_ref.actor.optim.lr=3e-6", f"trainer.resume_mode={value}")

    class Loads:  # what verl's v0 _load_checkpoint calls (one-step-off, trainer.use_v1=false)
        def load_checkpoint(self, path, del_local_after_load=False):
            self.path = path

    trainer = object.__new__(ray_trainer.RayPPOTrainer)
    trainer.config, trainer.actor_rollout_wg, trainer.use_critic, trainer.global_steps = relaunch, Loads(), False, 0
    trainer.train_dataloader = type("Loader", (), {"__len__": lambda self: 100, "load_state_dict": lambda *a: None})()
    ray_trainer.RayPPOTrainer._load_checkpoint(trainer)
    assert trainer.global_steps == 4 and trainer.actor_rollout_wg.path == str(tmp_path / "global_step_4" / "actor")

    with pytest.raises(CheckpointResumeError, match="trainer.resume_mode=.* is none of auto, disable, resume_path") \
            as err:
        driver_checks(relaunch)
    assert ("Hydra reads an unquoted true/false as a boolean" in str(err.value)) == (value == "true")
    with pytest.raises(ResumeSettingsError, match="optim.lr: saved 1e-06, now 3e-06"):  # the advice: auto
        driver_checks(launch(tmp_path, "actor_rollout_ref.actor.optim.lr=3e-6", "trainer.resume_mode=auto"))
    driver_checks(launch(tmp_path, "trainer.resume_mode=auto"))


# ----------------------------------------------------------------------------- B: no complete checkpoint


def test_following_the_no_complete_checkpoint_advice_trains_from_scratch(tmp_path):
    step_dir = saved(tmp_path, 2)
    truncate(step_dir / "data.pt")  # the only checkpoint is partial
    with pytest.raises(CheckpointResumeError) as err:
        driver_checks(launch(tmp_path))
    advice = f"move {tmp_path / TRACKER}, and the global_step_* directories with it, out of {tmp_path}"
    assert advice in str(err.value) and f"{step_dir / 'data.pt'}" in str(err.value)
    moved = tmp_path.parent / f"{tmp_path.name}_moved"
    moved.mkdir()
    for path in (tmp_path / TRACKER, step_dir):  # the advice, followed
        shutil.move(str(path), str(moved))
    driver_checks(launch(tmp_path))
    assert find_latest_ckpt_path(str(tmp_path)) is None  # verl trains from scratch


def test_a_tracker_left_without_its_checkpoints_stops_and_moving_it_away_starts_afresh(tmp_path):
    """`rm -r global_step_*` leaves the tracker: verl alone would train from scratch under a tracker that says a
    run was there; the guard says so, and moving the tracker away (its advice) starts afresh."""
    shutil.rmtree(saved(tmp_path, 2))
    assert find_latest_ckpt_path(str(tmp_path)) is None
    with pytest.raises(CheckpointResumeError, match=f"{TRACKER} names global_step_2, which is not there") as err:
        guard_resume(launch(tmp_path))
    assert f"move {tmp_path / TRACKER}, and the global_step_* directories with it, out of" in str(err.value)
    (tmp_path / TRACKER).rename(tmp_path.parent / f"{tmp_path.name}_{TRACKER}")
    assert guard_resume(launch(tmp_path)) is None


# ----------------------------------------------------------------------------- C: trainer.v1.trainer_mode


def test_sync_checkpoints_relaunched_async_are_named_as_such_not_incomplete(tmp_path):
    """verl's async trainer would resume them (it loads transfer_queue/ only if there): the guard called them
    incomplete and advised moving them away."""
    for step in (2, 4):
        saved(tmp_path, step)  # V1 sync: no transfer_queue/
    now_async = ("trainer.v1.trainer_mode=separate_async",)
    with pytest.raises(ResumeSettingsError) as err:
        driver_checks(launch(tmp_path, *now_async))
    message = str(err.value)
    assert f"{tmp_path / 'global_step_4'} was saved with trainer" in message and "trainer_mode=sync" in message
    assert "this launch runs trainer.v1.trainer_mode=separate_async" in message and "incomplete" not in message
    assert ACCEPT_MODE.removeprefix("+") in message and read_tracker(tmp_path) == 4
    driver_checks(launch(tmp_path))  # relaunched as saved
    assert guard_resume(launch(tmp_path, *now_async, ACCEPT_MODE)) is None  # or the change accepted by name
    assert read_tracker(tmp_path) == 4


def test_an_async_checkpoint_relaunched_sync_is_named_before_its_queue_is_dropped(tmp_path):
    step_dir = saved(tmp_path, 4, "trainer.v1.trainer_mode=separate_async")
    write_queue(step_dir)
    with pytest.raises(ResumeSettingsError, match="does not load its transfer_queue/, so the prompts in flight"):
        driver_checks(launch(tmp_path))
    driver_checks(launch(tmp_path, "trainer.v1.trainer_mode=separate_async"))
    assert guard_resume(launch(tmp_path, ACCEPT_MODE)) is None


def test_the_trainer_mode_is_read_from_the_recorded_settings_first(tmp_path):
    step_dir = write_checkpoint(tmp_path, 2, tracker=False)
    assert saved_trainer_mode(step_dir) == (None, "")  # unknown: not recorded, no queue, not tracked
    assert saved_trainer_mode(step_dir, tracked=True)[0] is False  # verl writes the queue before the tracker
    def record(use_v1, trainer_mode):  # as run_settings records them once it compares them
        settings = {"trainer.use_v1": use_v1, "trainer.v1.trainer_mode": trainer_mode}
        (step_dir / SETTINGS_FILE).write_text(json.dumps(settings))

    record(True, "colocate_async")
    assert saved_trainer_mode(step_dir) == (True, "trainer.use_v1=true trainer.v1.trainer_mode=colocate_async")
    record(False, "separate_async")  # the v0 trainer writes no queue, whatever trainer_mode says
    assert saved_trainer_mode(step_dir) == (False, "trainer.use_v1=false")


# ----------------------------------------------------------------------------- D: another run's directory


def test_a_new_world_size_started_apart_in_the_same_directory_resumes_its_own_checkpoint(tmp_path):
    """The world-size refusal advises trainer.resume_mode=disable; the user takes it in the same CKPT_DIR, and the
    new run's step 2 lands in the old run's global_step_2/ beside its shards. The crash relaunch resumes it:
    verl loads only the launch's world size's shards."""
    for step in (2, 4):
        saved(tmp_path, step)  # the old run: world size 2
    with pytest.raises(ResumeSettingsError, match="world size 2, and this launch's is 4"):
        driver_checks(launch(tmp_path, "trainer.n_gpus_per_node=4"))
    assert read_tracker(tmp_path) == 4
    driver_checks(launch(tmp_path, "trainer.n_gpus_per_node=4", "trainer.resume_mode=disable"))
    new = saved(tmp_path, 2, "trainer.n_gpus_per_node=4", "trainer.resume_mode=disable", world=4)
    assert read_tracker(tmp_path) == 2
    driver_checks(launch(tmp_path, "trainer.n_gpus_per_node=4"))  # killed at step 3, relaunched (resume_mode=auto)
    assert read_tracker(tmp_path) == 2 and checkpoint_problems(new, world=4) == []
    (tmp_path / TRACKER).write_text("")  # killed while writing the next tracker: the fallback skips the old run's 4
    assert "global_step_2" in guard_resume(launch(tmp_path, "trainer.n_gpus_per_node=4"))
    assert read_tracker(tmp_path) == 2


def test_the_fallback_refuses_another_runs_checkpoint_before_rewriting_the_tracker(tmp_path):
    saved(tmp_path, 2)
    saved(tmp_path, 4)
    (tmp_path / TRACKER).write_text("")  # verl would fail on int("")
    with pytest.raises(ResumeSettingsError) as err:
        driver_checks(launch(tmp_path, "actor_rollout_ref.actor.optim.lr=3e-6"))
    assert (tmp_path / TRACKER).read_text() == ""  # untouched: the refusal came first
    assert f"is unreadable, so it would fall back to the newest complete checkpoint; resuming " \
           f"{tmp_path / 'global_step_4'} would continue" in str(err.value)
    assert "optim.lr: saved 1e-06, now 3e-06" in str(err.value)
    driver_checks(launch(tmp_path))  # the saved settings: the fallback goes on
    assert read_tracker(tmp_path) == 4


# ----------------------------------------------------------------------------- E: trainer.resume_from_path


def test_a_resume_from_path_verl_cannot_read_a_step_from_stops_naming_the_fix(tmp_path):
    step_dir = saved(tmp_path, 4)
    resume = ("trainer.resume_mode=resume_path",)
    with pytest.raises(CheckpointResumeError, match=f"Set trainer.resume_from_path={step_dir}$"):
        driver_checks(launch(tmp_path, *resume, f"trainer.resume_from_path={step_dir}/"))  # verl: int("4/")
    with pytest.raises(CheckpointResumeError, match="Set trainer.resume_from_path=<dir>/global_step_<k>$"):
        driver_checks(launch(tmp_path, *resume))  # resume_from_path=null
    fixed = launch(tmp_path, *resume, f"trainer.resume_from_path={step_dir}")
    driver_checks(fixed)
    assert int(fixed.trainer.resume_from_path.split("global_step_")[-1]) == 4  # what verl then reads


def test_an_unreadable_tracker_beside_a_resume_path_stops_before_verl_reads_it(tmp_path):
    """verl's v0 (and fully-async) _load_checkpoint reads default_local_dir's tracker before it looks at
    resume_mode, so an empty one fails with int('') inside Ray even when resume_from_path is complete."""
    good = saved(tmp_path / "other", 4)
    saved(tmp_path, 2)
    (tmp_path / TRACKER).write_text("")
    config = launch(tmp_path, "trainer.resume_mode=resume_path", f"trainer.resume_from_path={good}")
    with pytest.raises(ValueError):
        find_latest_ckpt_path(str(tmp_path))  # what verl would do inside Ray
    with pytest.raises(CheckpointResumeError, match=f"{tmp_path / TRACKER} is unreadable .* Write the step of a "
                                                    "complete checkpoint there into it, or move it out of"):
        guard_resume(config)
    (tmp_path / TRACKER).write_text("2")  # the advice, followed
    guard_resume(config)
    assert find_latest_ckpt_path(str(tmp_path)) == str(tmp_path / "global_step_2")


def test_a_relative_checkpoint_directory_is_said_where_checkpoints_are_saved(tmp_path, monkeypatch, caplog):
    """verl resolves a relative trainer.default_local_dir (its own default) against each launch's directory: a
    relaunch from another directory, or through `ray job submit`, finds no checkpoint and starts from step 0.
    The driver says so, naming the absolute path to set (run.sh refuses a relative CKPT_DIR outright)."""
    from omegaconf import OmegaConf

    from hmpo_verl.guards.checkpoints import check_checkpoint_directory

    monkeypatch.chdir(tmp_path)
    relative = {"default_local_dir": "ckpt/run1", "save_freq": 2}
    with caplog.at_level("WARNING", logger="hmpo_verl.guards.checkpoints"):
        check_checkpoint_directory(OmegaConf.create({"trainer": relative}))
    assert f"trainer.default_local_dir=ckpt/run1 is relative" in caplog.text
    assert f"Set trainer.default_local_dir={tmp_path}/ckpt/run1" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="hmpo_verl.guards.checkpoints"):
    # nothing saved (verl's default save_freq -1, with its relative default directory): nothing to refuse
        check_checkpoint_directory(OmegaConf.create({"trainer": {**relative, "save_freq": -1}}))
        check_checkpoint_directory(OmegaConf.create({"trainer": {**relative, "default_local_dir": str(tmp_path / "c")}}))
    assert caplog.text == ""


def test_a_relaunch_that_keeps_resume_path_stops_before_overwriting_the_runs_newer_checkpoints(tmp_path):
    """Run B started from run A's global_step_10 and saved 20 and 30; relaunched by the same command, verl would
    resume step 10 again and overwrite B's checkpoints save by save. Both ways on the message gives pass."""
    start = saved(tmp_path / "A", 10)
    run = tmp_path / "B"
    for step in (20, 30):
        saved(run, step)
    again = launch(run, "trainer.resume_mode=resume_path", f"trainer.resume_from_path={start}")
    with pytest.raises(CheckpointResumeError, match=rf"resumes step 10 \({start}\), and trainer.default_local_dir="
                                                    rf"{run}, .* holds a later checkpoint, global_step_30 .* relaunch "
                                                    "with trainer.resume_mode=auto; to train again from step 10 on "
                                                    r"purpose, add '\+hmpo.resume_accept=\[trainer.resume_from_path\]'"):
        driver_checks(again)
    accepted = launch(run, "trainer.resume_mode=resume_path", f"trainer.resume_from_path={start}",
                      f"+{ACCEPT_KEY}=[trainer.resume_from_path]")
    driver_checks(accepted)  # a rollback meant: the message's third way on
    assert resume_step_dir(accepted) == start
    continued = launch(run, "trainer.resume_mode=auto")
    driver_checks(continued)
    assert resume_step_dir(continued) == run / "global_step_30"
    shutil.move(run / TRACKER, tmp_path / "moved_tracker")  # the other way on: train again from step 10 on purpose
    driver_checks(again)
    (run / TRACKER).write_text("10")  # a tracker at or below the resumed step: nothing later is overwritten
    driver_checks(again)


def test_a_fallback_does_not_take_an_abandoned_branchs_higher_step_for_the_runs_newest(tmp_path):
    """Steps 10, 20, 30 saved; the run rolled back to 10 (accepted) and saved a new 20; the tracker write was cut.
    The highest step, 30, is the abandoned branch's: the guard names both and asks for the step, not picks 30."""
    for step in (10, 20, 30):
        saved(tmp_path, step)
    rolled_back = saved(tmp_path, 20)  # the new branch's save, after 30's
    os.utime(rolled_back / SETTINGS_FILE, (os.stat(tmp_path / "global_step_30" / SETTINGS_FILE).st_mtime + 60,) * 2)
    (tmp_path / TRACKER).write_text("")
    with pytest.raises(CheckpointResumeError, match=r"global_step_30, was saved before global_step_20 .* Write the "
                                                    rf"step to resume into {tmp_path / TRACKER}"):
        driver_checks(launch(tmp_path))
    assert (tmp_path / TRACKER).read_text() == ""  # nothing written before the refusal
    (tmp_path / TRACKER).write_text("20")  # the advice, followed
    driver_checks(launch(tmp_path))
    assert read_tracker(tmp_path) == 20
