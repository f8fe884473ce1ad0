"""A one-step-off resume trains every batch once (``hmpo_verl.guards.prefetch``).

verl 0.9.1's ``OneStepOffRayTrainer`` draws batch k+1 before it saves step k's checkpoint, so its
``data.pt`` recorded k+1 batches and a resume never trained batch k+1. Here verl's own ``fit``,
``fit_step``, ``_fit_generate``, ``_create_continuous_iterator``, ``_fit_save_checkpoint``,
``_save_checkpoint`` and ``_load_checkpoint`` run on a trainer without Ray: the workers, the
rollout and the loss are stand-ins that record which batch each step trains, and the dataloader
is a ``StatefulDataLoader`` over 6 numbered prompts, shuffled by verl's ``create_rl_sampler``, 2 a
batch (3 steps an epoch), as verl builds it (``tests/test_shuffle_resume_on_cpu.py`` reuses it over
several epochs). An uninterrupted 5-step run (a checkpoint every step) is compared with runs
resumed from its checkpoints 1 and 2 (each crosses the epoch boundary after the resume).

The same comparison on verl's real one-step-off trainer (Ray, the rollout pool, our loss) is
``python -m hmpo_verl.lab.one_step_off_resume`` (README, "Crash and resume").
"""

from __future__ import annotations

import asyncio
import inspect
import shutil
import types

import pytest
import torch
from omegaconf import OmegaConf
from torchdata.stateful_dataloader import StatefulDataLoader

from hmpo_verl.checkpoints import read_tracker
from hmpo_verl import prefetch

PROMPTS, BATCH, STEPS, SAVE_FREQ = 6, 2, 5, 1
# checkpoints inside the first epoch: the resumed runs cross the epoch boundary
RESUMED_FROM = (1, 2)


def _loader(prompts=tuple(range(PROMPTS))) -> StatefulDataLoader:
    """The prompts (0..5), shuffled by verl's ``create_rl_sampler`` (torchdata's RandomSampler, data.seed=1)."""
    from verl.trainer.ppo.utils import create_rl_sampler

    prompts = list(prompts)
    sampler = create_rl_sampler(OmegaConf.create({"shuffle": True, "seed": 1}), prompts)
    return StatefulDataLoader(prompts, batch_size=BATCH, sampler=sampler, drop_last=True)


def _trainer_class():
    from verl.experimental.one_step_off_policy.ray_trainer import OneStepOffRayTrainer

    return OneStepOffRayTrainer


class _Workers:
    """The actor worker group: saves and loads nothing (the data state is what is tested)."""

    def save_checkpoint(self, *args, **kwargs):
        pass

    def load_checkpoint(self, *args, **kwargs):
        pass


async def _generate(self, continuous_iterator):
    """Stand-in for ``_async_gen_next_batch``: draws first, as verl's does (checked below), then yields."""
    try:
        epoch, batch_dict = next(continuous_iterator)
    except StopIteration:
        return None
    await asyncio.sleep(0)
    return {}, {}, epoch, types.SimpleNamespace(meta_info={"timing": {}}, ids=batch_dict.tolist()), None


def config(checkpoints, resume: bool):
    """The trainer config verl's ``fit``, ``_save_checkpoint`` and ``_load_checkpoint`` read (a save every step)."""
    return OmegaConf.create({
        "trainer": {"total_epochs": 100, "resume_mode": "auto" if resume else "disable", "default_hdfs_dir": None,
                    "default_local_dir": str(checkpoints), "del_local_ckpt_after_load": False,
                    "save_freq": SAVE_FREQ, "esi_redundant_time": 0, "project_name": "p", "experiment_name": "e",
                    "logger": [], "val_before_train": False},
        "actor_rollout_ref": {"rollout": {"temperature": 1.0}, "actor": {"checkpoint": {"async_save": False}}},
        "global_profiler": {"steps": None},
    })  # fmt: skip


def _train(checkpoints, resume: bool, steps: int = STEPS) -> list[list[int]]:
    """Run verl's ``OneStepOffRayTrainer.fit`` for ``steps`` steps; return the prompts each step trained."""
    cls = _trainer_class()
    trainer = cls.__new__(cls)
    trained = []
    trainer.config = config(checkpoints, resume)
    trainer.train_dataloader = _loader()
    trainer.total_training_steps, trainer.epoch, trainer.use_critic = steps, 0, False
    trainer.actor_rollout_wg = _Workers()
    trainer._async_gen_next_batch = types.MethodType(_generate, trainer)
    for name in ("_fit_update_weights", "_fit_start_profile", "_fit_dump_data", "_fit_validate", "_fit_stop_profile",
                 "_fit_collect_metrics", "_fit_experimental"):
        setattr(trainer, name, lambda *args, **kwargs: None)
    for name in ("_fit_compute_reward", "_fit_compute_log_prob", "_fit_compute_ref_log_prob", "_fit_compute_critic",
                 "_fit_compute_advantage", "_fit_update_critic"):
        setattr(trainer, name, lambda batch: batch)
    trainer._fit_update_actor = lambda batch: trained.append(batch.ids) or batch
    asyncio.run(trainer.fit())
    return trained


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("one_step_off")
    uninterrupted = _train(root / "uninterrupted", resume=False)
    resumed = {}
    for step in RESUMED_FROM:  # the state a kill right after checkpoint `step` leaves
        folder = root / f"from{step}"
        shutil.copytree(root / "uninterrupted" / f"global_step_{step}", folder / f"global_step_{step}")
        (folder / "latest_checkpointed_iteration.txt").write_text(str(step))
        resumed[step] = _train(folder, resume=True)
    return uninterrupted, resumed


def test_verls_generation_task_draws_its_batch_before_it_first_yields():
    """What the stand-in above copies: the draw is the task's first statement, before any ``await``."""
    source = inspect.getsource(_trainer_class()._async_gen_next_batch)
    assert source.index("next(continuous_iterator)") < source.index("await ")


def test_the_uninterrupted_run_trains_each_prompt_once_an_epoch(runs):
    uninterrupted, _ = runs
    assert len(uninterrupted) == STEPS
    assert sorted(sum(uninterrupted[:3], [])) == list(range(PROMPTS))  # epoch 1: steps 1-3


@pytest.mark.parametrize("step", RESUMED_FROM)
def test_a_resumed_run_trains_the_batches_the_uninterrupted_one_trained_after_the_checkpoint(runs, step):
    uninterrupted, resumed = runs
    assert resumed[step] == uninterrupted[step:], (
        f"resumed from global_step_{step}: trained {resumed[step]}, the uninterrupted run {uninterrupted[step:]}")


def test_the_checkpoint_records_the_batches_trained_not_the_one_prefetched(runs, tmp_path):
    """data.pt of global_step_1 continues with batch 2 (it was saved while batch 2 was being generated)."""
    folder = tmp_path / "ckpt"
    _train(folder, resume=False)
    assert read_tracker(folder) == STEPS
    loader = _loader()
    loader.load_state_dict(torch.load(folder / f"global_step_{SAVE_FREQ}" / "data.pt", weights_only=False))
    assert next(iter(loader)).tolist() == runs[0][SAVE_FREQ]


def test_outside_a_save_the_dataloader_answers_its_own_state():
    loader = _loader()
    with prefetch._answering(loader, {"mine": 1}):
        assert loader.state_dict() == {"mine": 1}
    assert "mine" not in loader.state_dict()


def test_the_rollout_dump_is_written_although_verl_never_creates_its_executor(tmp_path):
    """verl's one-step-off ``__init__`` skips ``_init_dump_executor``: ``trainer.rollout_data_dir`` crashed step 1."""
    cls = _trainer_class()
    trainer = cls.__new__(cls)  # as verl's __init__ leaves it: no _dump_executor
    trainer.config = OmegaConf.create({"trainer": {"rollout_data_dir": str(tmp_path)}})
    trainer.timing_raw, trainer.reward_extra_infos_dict, trainer.global_steps = {}, {}, 3
    trainer._log_rollout_data = lambda batch, extra, timing, folder: trainer._dump_generations(
        ["prompt"], ["response"], [None], [1.0], extra, folder)  # verl's own dump from here on
    trainer._fit_dump_data(None)
    assert (tmp_path / "3.jsonl").read_text().count("prompt") == 1  # on disk when the step goes on to its save
