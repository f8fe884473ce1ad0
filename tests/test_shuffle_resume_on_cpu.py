"""A resumed run trains the uninterrupted run's batches across epoch boundaries (``hmpo_verl.guards.shuffle``).

verl shuffles with torchdata's stateful ``RandomSampler`` (``create_rl_sampler``); ``data.pt`` holds
the epoch's start generator state, so a resume inside any epoch is right, but verl's
``RayPPOTrainer._load_checkpoint`` skips ``data.pt`` at an epoch boundary and the re-seeded generator
shuffled the next epoch as the first one. Here 6 prompts, 2 a batch (3 steps an epoch), 9 steps (3
epochs), a checkpoint every step: the synchronous trainer (verl's ``_save_checkpoint`` and
``_load_checkpoint``, and ``fit``'s epoch loop, checked against its source) and one-step-off (verl's
own ``fit``: the harness of ``test_one_step_off_resume_on_cpu.py``) are resumed from every checkpoint,
the boundaries 3 and 6 included, and compared with the uninterrupted run.
"""

from __future__ import annotations

import inspect
import logging
import shutil
import types

import pytest
import torch
from omegaconf import OmegaConf
from test_one_step_off_resume_on_cpu import BATCH, PROMPTS, _loader, _train, _Workers, config

from hmpo_verl.guards import shuffle

STEPS = 9  # three epochs
STEPS_PER_EPOCH = PROMPTS // BATCH


def _sync_trainer_class():
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    return RayPPOTrainer


def test_the_sync_loop_below_is_verls():
    """What :func:`_train_sync` copies from ``RayPPOTrainer.fit``: its resume, epoch loop, save and stop."""
    source = inspect.getsource(_sync_trainer_class().fit)
    for line in ("self._load_checkpoint()", "current_epoch = self.global_steps // len(self.train_dataloader)",
                 "for epoch in range(current_epoch, self.config.trainer.total_epochs):",
                 "for batch_dict in self.train_dataloader:", "self._save_checkpoint()", "self.global_steps += 1",
                 "is_last_step = self.global_steps >= self.total_training_steps"):
        assert line in source, line


def _train_sync(checkpoints, resume: bool, steps: int = STEPS) -> list[list[int]]:
    """verl's synchronous ``fit`` reduced to its data path: the prompts each step trains."""
    cls = _sync_trainer_class()
    trainer = cls.__new__(cls)
    trainer.config, trainer.train_dataloader = config(checkpoints, resume), _loader()
    trainer.actor_rollout_wg, trainer.use_critic, trainer.total_training_steps = _Workers(), False, steps
    trainer.global_steps = 0
    trainer._load_checkpoint()
    current_epoch = trainer.global_steps // len(trainer.train_dataloader)
    trainer.global_steps += 1
    trained = []
    for _epoch in range(current_epoch, trainer.config.trainer.total_epochs):
        for batch_dict in trainer.train_dataloader:
            trained.append(batch_dict.tolist())
            trainer._save_checkpoint()  # save_freq 1
            if trainer.global_steps >= trainer.total_training_steps:
                return trained
            trainer.global_steps += 1
    return trained


TRAINERS = {"sync": _train_sync, "one_step_off": _train}


def _resume_from(root, step: int, name: str) -> list[list[int]]:
    """The state a kill right after checkpoint ``step`` leaves, resumed by trainer ``name``."""
    folder = root / f"{name}_from{step}"
    shutil.copytree(root / name / f"global_step_{step}", folder / f"global_step_{step}")
    (folder / "latest_checkpointed_iteration.txt").write_text(str(step))
    return TRAINERS[name](folder, resume=True, steps=STEPS)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("shuffle")
    uninterrupted = {name: train(root / name, resume=False, steps=STEPS) for name, train in TRAINERS.items()}
    resumed = {(name, step): _resume_from(root, step, name) for name in TRAINERS for step in range(1, STEPS)}
    return root, uninterrupted, resumed


@pytest.mark.parametrize("name", TRAINERS)
def test_the_uninterrupted_run_shuffles_each_epoch_anew(runs, name):
    epochs = [runs[1][name][i:i + STEPS_PER_EPOCH] for i in range(0, STEPS, STEPS_PER_EPOCH)]
    assert all(sorted(sum(epoch, [])) == list(range(PROMPTS)) for epoch in epochs)
    assert len({str(epoch) for epoch in epochs}) == len(epochs)  # three different orders: a repeat would show


@pytest.mark.parametrize("step", range(1, STEPS))
@pytest.mark.parametrize("name", TRAINERS)
def test_a_resumed_run_trains_the_uninterrupted_runs_batches(runs, name, step):
    """Inside epochs 1-3 and exactly at the boundaries (steps 3 and 6)."""
    _, uninterrupted, resumed = runs
    assert resumed[name, step] == uninterrupted[name][step:], (
        f"{name} resumed from global_step_{step}: trained {resumed[name, step]}, "
        f"the uninterrupted run {uninterrupted[name][step:]}")


def test_a_checkpoint_without_the_samplers_state_is_loud_at_a_boundary(runs, caplog):
    root = runs[0]
    folder = root / "old"
    shutil.copytree(root / "sync" / "global_step_3", folder / "global_step_3")
    (folder / "latest_checkpointed_iteration.txt").write_text("3")
    torch.save({"_sampler_iter_state": None}, folder / "global_step_3" / "data.pt")
    with caplog.at_level(logging.WARNING, logger=shuffle.__name__):
        _train_sync(folder, resume=True, steps=4)
    assert "data.pt holds no state of the shuffling sampler" in caplog.text
    assert str(folder / "global_step_3" / "data.pt") in caplog.text and "resume_from_path" in caplog.text


def test_a_sampler_that_saves_no_generator_state_is_named(tmp_path):
    sampler = torch.utils.data.RandomSampler(range(PROMPTS), generator=torch.Generator().manual_seed(1))
    assert "RandomSampler" in shuffle.advance_to_next_epoch(sampler, tmp_path / "data.pt")
    assert shuffle.advance_to_next_epoch(torch.utils.data.SequentialSampler(range(PROMPTS)), tmp_path) is None


def test_the_samplers_state_is_found_in_a_worker_snapshot():
    state = {"yielded": 6, "generator": torch.Generator().get_state()}
    assert shuffle.sampler_iterator_state({"_snapshot": {"_main_snapshot": {"_sampler_iter_state": {
        "sampler_iter_state": state}}}}) is state
    assert shuffle.sampler_iterator_state({"_sampler_iter_state": {"samples_yielded": 6}}) is None


def test_verls_v1_trainer_restores_the_order_at_a_boundary_itself():
    """v1 ``PPOTrainer`` loads data.pt at a boundary too and iterates again after the exhausted iterator."""
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    def fetched(trainer, count):  # verl's fetch on the two attributes it reads (PPOTrainer is abstract)
        return [PPOTrainer._fetch_one_gen_batch(trainer)["raw_prompt"].tolist() for _ in range(count)]

    trainer = types.SimpleNamespace(train_dataloader=_loader([{"raw_prompt": i} for i in range(PROMPTS)]),
                                    train_dataloader_it=None)
    first_epoch = fetched(trainer, STEPS_PER_EPOCH)
    resumed = types.SimpleNamespace(train_dataloader=_loader([{"raw_prompt": i} for i in range(PROMPTS)]),
                                    train_dataloader_it=None)
    resumed.train_dataloader.load_state_dict(trainer.train_dataloader.state_dict())  # PPOTrainer._load_checkpoint
    assert fetched(resumed, STEPS_PER_EPOCH) == fetched(trainer, STEPS_PER_EPOCH) != first_epoch


def test_verls_fully_async_rollouter_restores_the_order_at_a_boundary_itself():
    """The fully-async rollouter loads data.pt at a boundary too; its continuous iterator starts a new pass."""
    from itertools import islice

    from verl.experimental.fully_async_policy import fully_async_rollouter

    from hmpo_verl.hosts.verl.registry import ray_wrapped_class

    rollouter_class = ray_wrapped_class(fully_async_rollouter.FullyAsyncRollouter)  # a @ray.remote class

    def rollouter():
        return types.SimpleNamespace(train_dataloader=_loader(), config=OmegaConf.create({"trainer": {"total_epochs": 3}}))

    def drawn(iterator, count):
        return [batch.tolist() for _epoch, batch in islice(iterator, count)]

    uninterrupted, resumed = rollouter(), rollouter()
    batches = rollouter_class._create_continuous_iterator(uninterrupted)
    first_epoch = drawn(batches, STEPS_PER_EPOCH)
    resumed.train_dataloader.load_state_dict(uninterrupted.train_dataloader.state_dict())  # its _load_checkpoint
    second_epoch = drawn(rollouter_class._create_continuous_iterator(resumed), STEPS_PER_EPOCH)
    assert second_epoch == drawn(batches, STEPS_PER_EPOCH) != first_epoch
