"""Checkpoints: which are complete, the guard before a resume, the checkpoint directory, failed saves,
and the check of the rollout's log-probs (hmpo_verl.checkpoints, hmpo_verl.finite). The directories are
laid out as verl 0.9.1's FSDP / Megatron checkpoint managers and trainer write them."""

from __future__ import annotations

import math
import os
import shutil
import zipfile

import pytest
import torch
import verl
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from verl.utils.checkpoint.checkpoint_manager import find_latest_ckpt_path

from hmpo_verl.checkpoints import (
    TRACKER,
    CheckpointDirectoryError,
    CheckpointResumeError,
    CheckpointSaveError,
    check_checkpoint_directory,
    checkpoint_problems,
    guard_resume,
    guard_saves,
    TRANSFER_QUEUE_FILES,
    read_tracker,
    torch_file_problem,
)
from hmpo_verl.finite import NonFiniteInputError, check_rollout_log_probs, guard_rollout_log_probs

VERL_CONFIG_DIR = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")


def write_checkpoint(root, step, world=2, critic=False, tracker=True):
    """global_step_<step> as verl's FSDP saver and trainer leave it; returns its path."""
    step_dir = root / f"global_step_{step}"
    for role in ("actor", "critic") if critic else ("actor",):
        (step_dir / role / "huggingface").mkdir(parents=True, exist_ok=True)
        for rank in range(world):
            for kind in ("model", "optim", "extra_state"):
                torch.save({"w": torch.full((4,), float(step))}, step_dir / role / f"{kind}_world_size_{world}_rank_{rank}.pt")
    torch.save({"dataloader": step}, step_dir / "data.pt")
    if tracker:
        (root / TRACKER).write_text(str(step))
    return step_dir


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def config(root, mode="auto", save_freq=2, **trainer):
    """A launch on 1 node x 2 GPUs: the world size of `write_checkpoint`'s shards."""
    return OmegaConf.create({"trainer": {"resume_mode": mode, "default_local_dir": str(root), "save_freq": save_freq,
                                         "resume_from_path": None, "nnodes": 1, "n_gpus_per_node": 2, **trainer},
                             "actor_rollout_ref": {"actor": {"checkpoint": {"load_contents": ["model", "optimizer", "extra"]}}}})


# ----------------------------------------------------------------------------- completeness


def test_a_checkpoint_is_complete_when_every_shard_and_data_pt_are_written(tmp_path):
    step_dir = write_checkpoint(tmp_path, 2, critic=True)
    assert checkpoint_problems(step_dir) == []
    truncate(step_dir / "actor" / "optim_world_size_2_rank_1.pt")  # killed while torch.save wrote it
    (step_dir / "critic" / "model_world_size_2_rank_0.pt").unlink()  # not written yet
    (step_dir / "data.pt").unlink()
    problems = checkpoint_problems(step_dir)
    assert any("optim_world_size_2_rank_1.pt is not a complete zip archive" in p for p in problems)
    assert any("critic/model_world_size_2_rank_0.pt is missing" in p for p in problems)
    assert any("data.pt" in p and "missing" in p for p in problems)
    assert checkpoint_problems(tmp_path / "global_step_9") == [f"{tmp_path / 'global_step_9'} is missing"]


def test_a_torch_file_cut_anywhere_is_incomplete_even_with_an_end_marker(tmp_path):
    """Truncations at many offsets, bare and with the end-of-directory record re-appended (`PK\\x05\\x06`:
    all `zipfile.is_zipfile` looks for)."""
    whole = tmp_path / "whole.pt"
    torch.save({"w": torch.arange(3000.0), "step": 7}, whole)
    data = whole.read_bytes()
    assert torch_file_problem(whole) is None
    marker = data[data.rindex(b"PK\x05\x06"):]
    cut = tmp_path / "cut.pt"
    passed_is_zipfile = 0
    for keep in sorted({*range(0, len(data), 97), len(data) // 2, len(data) - len(marker), len(data) - 1}):
        for tail in (b"", marker):
            cut.write_bytes(data[:keep] + tail)
            if len(cut.read_bytes()) == len(data) and tail:
                continue  # that is the whole file again
            passed_is_zipfile += zipfile.is_zipfile(cut)
            assert torch_file_problem(cut) is not None, (keep, len(tail))
    assert passed_is_zipfile > 0  # the heuristic the check replaces accepted some of these
    cut.write_bytes(data[: len(data) // 2] + marker)  # the issue's reproduction: is_zipfile yes, torch.load no
    assert zipfile.is_zipfile(cut) and torch_file_problem(cut)
    with pytest.raises(Exception):
        torch.load(cut, weights_only=True)


def test_a_v1_async_checkpoint_is_complete_once_transfer_queue_is_in_place(tmp_path):
    from transfer_queue.interface import _CONTROLLER_FILE, _METADATA_FILE

    assert TRANSFER_QUEUE_FILES == (_CONTROLLER_FILE, _METADATA_FILE)  # the names verl's queue writes
    step_dir = write_checkpoint(tmp_path, 2)
    assert checkpoint_problems(step_dir) == []  # the sync trainer writes no queue
    assert any("transfer_queue" in p and "missing" in p for p in checkpoint_problems(step_dir, transfer_queue=True))
    partial = step_dir / "transfer_queue.tmp"  # killed inside tq.save_checkpoint: before the rename
    partial.mkdir()
    (partial / _CONTROLLER_FILE).write_bytes(b"x")
    assert checkpoint_problems(step_dir, transfer_queue=True)
    partial.rename(step_dir / "transfer_queue")  # a queue folder without its metadata.json
    assert any("lacks metadata.json" in p for p in checkpoint_problems(step_dir, transfer_queue=True))
    (step_dir / "transfer_queue" / _METADATA_FILE).write_text("{}")
    assert checkpoint_problems(step_dir, transfer_queue=True) == []


@pytest.mark.parametrize("trainer_mode", ["colocate_async", "separate_async"])
def test_the_guard_requires_the_queue_of_a_v1_async_run(tmp_path, trainer_mode):
    """The issue's reproduction: tracker missing, shards and data.pt complete, transfer_queue/ partial."""
    write_checkpoint(tmp_path, 2)
    step_dir = write_checkpoint(tmp_path, 4, tracker=False)
    (tmp_path / TRACKER).unlink()
    for step in (2, 4):
        queue = tmp_path / f"global_step_{step}" / "transfer_queue"
        queue.mkdir()
        for name in TRANSFER_QUEUE_FILES[: 2 if step == 2 else 1]:
            (queue / name).write_text("{}")
    cfg = config(tmp_path, use_v1=True, v1={"trainer_mode": trainer_mode})
    message = guard_resume(cfg)
    assert read_tracker(tmp_path) == 2 and "global_step_2" in message
    assert checkpoint_problems(step_dir) == []  # what the guard saw before: the sync trainer's files only


def test_only_what_a_resume_loads_is_required(tmp_path):
    step_dir = write_checkpoint(tmp_path, 2)
    (step_dir / "actor" / "optim_world_size_2_rank_0.pt").unlink()
    assert checkpoint_problems(step_dir, contents=("model", "extra")) == []
    assert checkpoint_problems(step_dir, contents=("model", "optimizer", "extra"))


def test_a_megatron_checkpoint_is_complete_once_its_manifest_is_written(tmp_path):
    step_dir = tmp_path / "global_step_4"
    for sub in ("model/dist_ckpt", "optimizer/dist_ckpt", "extra/dist_ckpt"):
        (step_dir / "actor" / sub).mkdir(parents=True)
    torch.save({}, step_dir / "data.pt")
    assert any("ckpt_contents.json" in p for p in checkpoint_problems(step_dir))
    (step_dir / "actor" / "ckpt_contents.json").write_text("{}")
    assert checkpoint_problems(step_dir) == []


# ----------------------------------------------------------------------------- before a resume


def test_verl_itself_cannot_resume_from_an_empty_tracker_or_tell_a_deleted_checkpoint(tmp_path):
    """What the guard is for: verl's own lookup (verl.utils.checkpoint.checkpoint_manager)."""
    write_checkpoint(tmp_path, 2)
    (tmp_path / TRACKER).write_text("")  # open("w") truncated it, then the write failed (disk full) or was killed
    with pytest.raises(ValueError, match="invalid literal for int"):
        find_latest_ckpt_path(str(tmp_path))
    (tmp_path / TRACKER).write_text("2")
    for path in (tmp_path / "global_step_2" / "actor").iterdir():  # max_actor_ckpt_to_keep=1 deleted it
        path.unlink() if path.is_file() else None
    assert find_latest_ckpt_path(str(tmp_path)) == str(tmp_path / "global_step_2")  # verl would load it


@pytest.mark.parametrize("damage", ["empty tracker", "missing tracker", "tracker names a partial"])
def test_the_guard_falls_back_to_the_newest_complete_checkpoint(tmp_path, damage, caplog):
    write_checkpoint(tmp_path, 2)
    write_checkpoint(tmp_path, 4)
    if damage == "empty tracker":  # open("w") truncated it, then the disk was full or the process killed
        (tmp_path / TRACKER).write_text("")
    elif damage == "missing tracker":  # e.g. actor.checkpoint.async_save: verl writes none
        (tmp_path / TRACKER).unlink()
    else:
        write_checkpoint(tmp_path, 6)
        truncate(tmp_path / "global_step_6" / "actor" / "model_world_size_2_rank_0.pt")
    message = guard_resume(config(tmp_path))
    assert read_tracker(tmp_path) == 4
    assert "global_step_4" in message and "resuming from the newest complete checkpoint" in message
    assert message in caplog.text
    assert find_latest_ckpt_path(str(tmp_path)) == str(tmp_path / "global_step_4")  # what verl then loads
    assert guard_resume(config(tmp_path)) is None  # and the next launch finds nothing to fix


def test_keep_one_killed_between_deleting_the_old_and_tracking_the_new_stops_naming_both(tmp_path):
    """max_actor_ckpt_to_keep=1: the worker wrote checkpoint 6's shards and deleted 4's actor/, then the
    driver died before 6's data.pt and tracker: verl would load 4 (and fail on its missing files)."""
    tracked = write_checkpoint(tmp_path, 4)
    newest = write_checkpoint(tmp_path, 6, tracker=False)
    (newest / "data.pt").unlink()
    shutil.rmtree(tracked / "actor")  # verl's remove_previous_save_local_path
    with pytest.raises(CheckpointResumeError) as err:
        guard_resume(config(tmp_path))
    assert f"{tracked / 'actor'} is missing" in str(err.value)
    assert f"{newest / 'data.pt'} (the dataloader state, written after the model) is missing" in str(err.value)


def test_the_guard_stops_when_no_checkpoint_is_complete(tmp_path):
    step_dir = write_checkpoint(tmp_path, 2)
    truncate(step_dir / "data.pt")
    with pytest.raises(CheckpointResumeError) as err:
        guard_resume(config(tmp_path))
    assert str(step_dir) in str(err.value) and "data.pt" in str(err.value)
    assert read_tracker(tmp_path) == 2  # untouched


def test_the_guard_leaves_fresh_runs_and_a_first_interrupted_save_alone(tmp_path):
    assert guard_resume(config(tmp_path / "nothing_yet")) is None
    assert guard_resume(config(tmp_path, mode="disable")) is None
    write_checkpoint(tmp_path, 2, tracker=False)
    truncate(tmp_path / "global_step_2" / "data.pt")
    assert guard_resume(config(tmp_path)) is None  # nothing complete to lose: verl starts afresh
    assert not (tmp_path / TRACKER).exists()


def test_resume_path_must_name_a_complete_checkpoint(tmp_path):
    step_dir = write_checkpoint(tmp_path, 2)
    assert guard_resume(config(tmp_path, mode="resume_path", resume_from_path=str(step_dir))) is None
    (step_dir / "actor" / "model_world_size_2_rank_1.pt").unlink()
    with pytest.raises(CheckpointResumeError, match="model_world_size_2_rank_1.pt is missing"):
        guard_resume(config(tmp_path, mode="resume_path", resume_from_path=str(step_dir)))


def test_verls_driver_runs_the_guard_before_ray(tmp_path):
    """The plugin's validate_config (what main_ppo calls before ray.init) rewrites an empty tracker."""
    import verl.trainer.main_ppo

    write_checkpoint(tmp_path, 2)
    (tmp_path / TRACKER).write_text("")
    with initialize_config_dir(config_dir=VERL_CONFIG_DIR, version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=[
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
            "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
            f"trainer.default_local_dir={tmp_path}", "trainer.resume_mode=auto", "trainer.save_freq=2",
            "trainer.n_gpus_per_node=2"])  # the shards' world size
    verl.trainer.main_ppo.validate_config(cfg, use_reference_policy=False, use_critic=False)
    assert read_tracker(tmp_path) == 2


# ----------------------------------------------------------------------------- the directory and failed saves


def test_an_unwritable_checkpoint_directory_is_refused_without_creating_anything(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(CheckpointDirectoryError, match=f"default_local_dir={blocker}/ckpt cannot be written: "
                                                       f"{blocker} is not a directory"):
        check_checkpoint_directory(config(blocker / "ckpt"))
    check_checkpoint_directory(config(tmp_path / "new" / "ckpt"))
    assert not (tmp_path / "new").exists()
    check_checkpoint_directory(config(blocker / "ckpt", save_freq=-1))  # nothing is saved: nothing to check


class _Trainer:
    """verl's trainer as guard_saves sees it: config, global_steps, _save_checkpoint."""

    def __init__(self, root, step, error):
        self.config = config(root)
        self.global_steps, self.error = step, error

    def _save_checkpoint(self):
        raise self.error


def test_a_failed_save_names_the_directory_and_the_intact_checkpoint(tmp_path):
    write_checkpoint(tmp_path, 2)
    guard_saves(_Trainer)
    guard_saves(_Trainer)  # idempotent
    disk_full = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")  # torch.save on ENOSPC
    with pytest.raises(CheckpointSaveError) as err:
        _Trainer(tmp_path, 4, disk_full)._save_checkpoint()
    message = str(err.value)
    assert f"saving checkpoint {tmp_path / 'global_step_4'} failed (RuntimeError: [enforce fail" in message
    assert "GiB" in message and f"{tmp_path / 'global_step_2'}, is intact" in message
    assert err.value.__cause__ is disk_full


# ----------------------------------------------------------------------------- the rollout's log-probs


def _data(rollout_log_probs, mask):
    from verl import DataProto

    B, T = rollout_log_probs.shape
    return DataProto.from_dict({"rollout_log_probs": rollout_log_probs, "old_log_probs": rollout_log_probs.clone(),
                                "response_mask": mask, "responses": torch.ones(B, T, dtype=torch.long)})


def test_non_finite_rollout_log_probs_stop_the_step_where_verl_only_logs_nan():
    import types

    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    clean = -torch.rand(2, 3)
    padded = clean.clone()
    padded[1, 2] = float("nan")  # a masked position: ignored
    check_rollout_log_probs(_data(padded, mask))
    poisoned = clean.clone()
    poisoned[0, 0] = float("nan")
    poisoned[1, 0] = float("inf")
    with pytest.raises(NonFiniteInputError, match="rollout_log_probs has 2 non-finite value.* in 2 of 2 responses"):
        check_rollout_log_probs(_data(poisoned, mask))
    # verl's diagnostics alone return NaN and the step goes on; guarded, they raise first
    import verl.utils.debug.metrics as debug_metrics

    assert debug_metrics.calculate_debug_metrics._hmpo_guarded  # the plugin guarded it on import
    module = types.SimpleNamespace(calculate_debug_metrics=debug_metrics.calculate_debug_metrics.__wrapped__)
    assert math.isnan(module.calculate_debug_metrics(_data(poisoned, mask))["training/rollout_probs_diff_max"])
    guard_rollout_log_probs(module)
    with pytest.raises(NonFiniteInputError):
        module.calculate_debug_metrics(_data(poisoned, mask))
