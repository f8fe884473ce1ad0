"""A resume at an epoch boundary shuffles the next epoch as the uninterrupted run did.

verl 0.9.1 shuffles the prompts with torchdata's stateful ``RandomSampler`` on a seeded generator
(``verl/trainer/ppo/utils.py`` ``create_rl_sampler``: ``data.shuffle``, ``data.seed``). Each epoch's
sampler iterator records the generator's state as of the epoch's start and the samples it yielded,
and ``StatefulDataLoader.state_dict()`` carries that into ``data.pt``: a resume inside an epoch
restores the epoch's order (checked in ``tests/test_shuffle_resume_on_cpu.py``). But
``RayPPOTrainer._load_checkpoint`` (the synchronous v0 trainer, and one-step-off, which inherits it)
skips ``data.pt`` when the step is a multiple of the epoch's length ("the saved state marks the
dataloader as exhausted"): the fresh process's generator, seeded with ``data.seed``, then draws the
first epoch's order again -- every epoch after a boundary resume repeats the run's earlier orders.

:func:`restoring_epoch_order` wraps ``RayPPOTrainer._load_checkpoint``: when verl skipped ``data.pt``
at a boundary, the sampler's generator is put where the uninterrupted run's was at that point -- the
saved epoch's start state, advanced through that epoch by torchdata's own iterator
(``_StatefulRandomSamplerIterator.load_state_dict``). A ``data.pt`` without the sampler's state, or
a sampler with a generator we cannot restore, is a warning naming what is lost.

verl's v1 trainer (``PPOTrainer._load_checkpoint``) and the fully-async rollouter always load
``data.pt`` and iterate again on the exhausted iterator's ``StopIteration``, which advances the
generator the same way: they need no wrapper.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Callable, Optional

import torch

from hmpo_verl.guards.checkpoints import resume_step_dir
from hmpo_verl.guards.offpolicy import _once

logger = logging.getLogger(__name__)

RAY_TRAINER = "verl.trainer.ppo.ray_trainer"
GENERATOR = "generator"  # torchdata's _StatefulRandomSamplerIterator state: {"yielded": int, "generator": ByteTensor}


def sampler_iterator_state(data_state) -> Optional[dict]:
    """The shuffling sampler's iterator state inside a ``StatefulDataLoader.state_dict()`` (any nesting), or None."""
    if isinstance(data_state, dict):
        if GENERATOR in data_state and "yielded" in data_state:
            return data_state
        for value in data_state.values():
            found = sampler_iterator_state(value)
            if found is not None:
                return found
    return None


def at_epoch_boundary(step: int, steps_per_epoch: int) -> bool:
    """verl's own rule (``RayPPOTrainer._load_checkpoint``) for skipping ``data.pt``."""
    return steps_per_epoch > 0 and step % steps_per_epoch == 0


def lost_order_message(data_path: Path, why: str) -> str:
    return (f"hmpo_verl: resuming at an epoch boundary from {data_path}, {why}: the next epoch is shuffled as the "
            "run's first epoch was, not as the uninterrupted run would have (prompts repeat their earlier order). "
            "To go on in the uninterrupted order, resume from a checkpoint inside an epoch (trainer.resume_mode="
            "resume_path trainer.resume_from_path=<global_step_N>), or accept the repeated order")


def advance_to_next_epoch(sampler, data_path: Path) -> Optional[str]:
    """Set ``sampler.generator`` to its state after the epoch saved in ``data_path``; the reason it cannot, or None."""
    from torchdata.stateful_dataloader.sampler import RandomSampler

    if not isinstance(sampler, RandomSampler):
        if getattr(sampler, "generator", None) is None:
            return None  # a sequential (or unseeded) sampler: no order to restore
        return f"its sampler ({type(sampler).__name__}) keeps no generator state in data.pt"
    saved = sampler_iterator_state(torch.load(data_path, weights_only=False))
    if saved is None:
        return "data.pt holds no state of the shuffling sampler"
    iter(sampler).load_state_dict(saved)  # torchdata: set the epoch's start state, draw its order, skip the yielded
    return None


@_once
def restoring_epoch_order(load_checkpoint: Callable) -> Callable:
    """Wrap ``RayPPOTrainer._load_checkpoint(self)``: at an epoch boundary, the next epoch's shuffle (see module doc)."""

    @functools.wraps(load_checkpoint)
    def _load_checkpoint(self, *args, **kwargs):
        result = load_checkpoint(self, *args, **kwargs)
        step_dir = resume_step_dir(self.config)
        if step_dir is None or not at_epoch_boundary(self.global_steps, len(self.train_dataloader)):
            return result
        data_path = step_dir / "data.pt"
        if data_path.exists():
            problem = advance_to_next_epoch(self.train_dataloader.sampler, data_path)
            if problem:
                logger.warning(lost_order_message(data_path, problem))
        return result

    return _load_checkpoint


def install(run_after_import: Callable) -> None:
    """Wrap verl's v0 trainer once its module is imported (``hmpo_verl.guards.hooks.run_after_import``)."""
    run_after_import(RAY_TRAINER,
                     lambda m: setattr(m.RayPPOTrainer, "_load_checkpoint",
                                       restoring_epoch_order(m.RayPPOTrainer._load_checkpoint)),
                     f"hmpo_verl could not wrap {RAY_TRAINER} (a resume at an epoch boundary repeats the first epoch's "
                     "shuffle order)")
