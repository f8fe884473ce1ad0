"""One-step-off checkpoints record the batches trained, not the batch prefetched: a resume trains each once.

verl 0.9.1's ``OneStepOffRayTrainer`` (``verl/experimental/one_step_off_policy/ray_trainer.py``)
generates batch k+1 while it trains batch k: ``_fit_generate`` of step k awaits batch k, then
starts the task ``_async_gen_next_batch`` for batch k+1, whose first statement draws it
(``next(continuous_iterator)``), and only later in the same step ``fit_step`` calls
``_fit_save_checkpoint()``. verl's ``RayPPOTrainer._save_checkpoint`` writes
``self.train_dataloader.state_dict()`` to ``data.pt``: k+1 batches drawn at ``global_step_k``. A
resume from it restores that state and draws batch k+2 first, so batch k+1 is never trained.
(verl's main branch has the same order.)

Three wrappers on ``OneStepOffRayTrainer`` make ``data.pt`` hold the state as of the batch trained:

* ``_create_continuous_iterator``: right after each batch is drawn, a copy of the dataloader's
  state (``StatefulDataLoader.state_dict()``) joins a queue on the trainer (:data:`DRAWN`);
* ``_fit_generate``: once it returns the step's batch, the oldest queued state is the state as of
  that batch (the next batch's draw, if it happened, queued behind it): it becomes :data:`TRAINED`;
* ``_save_checkpoint``: verl's save runs with ``train_dataloader.state_dict`` answering
  :data:`TRAINED` -- exactly what the synchronous trainer saves at that step, so verl's own
  ``_load_checkpoint`` (its epoch-boundary rule included) restores it unchanged.

And one verl bug on the way (needed to compare resumed runs by their rollout dump): with
``trainer.rollout_data_dir`` set, every one-step-off run dies at step 1 with ``AttributeError:
'OneStepOffRayTrainer' object has no attribute '_dump_executor'`` -- its ``__init__`` never calls
``RayPPOTrainer._init_dump_executor``. ``_fit_dump_data`` (:func:`dumping_with_an_executor`) creates
the executor, dumps and drains it, so the step's dump is on disk before its checkpoint.

The prefetched batch's rollout is lost at a resume, not its data: the resumed run generates batch
k+1 again, with the resumed weights (its lag is 0: :mod:`hmpo_verl.guards.offpolicy`).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
from typing import Callable

from hmpo_verl.guards.offpolicy import _once

DRAWN = "_hmpo_drawn_states"  # deque: the dataloader's state after each batch drawn and not yet trained
TRAINED = "_hmpo_trained_state"  # the dataloader's state as of the batch the current step trains


@_once
def recording_drawn_states(create_iterator: Callable) -> Callable:
    """Wrap ``_create_continuous_iterator(self)``: queue the dataloader's state after each draw."""

    @functools.wraps(create_iterator)
    def _create_continuous_iterator(self):
        drawn = collections.deque()
        setattr(self, DRAWN, drawn)
        for item in create_iterator(self):
            drawn.append(copy.deepcopy(self.train_dataloader.state_dict()))
            yield item

    return _create_continuous_iterator


@_once
def marking_trained_state(fit_generate: Callable) -> Callable:
    """Wrap ``async _fit_generate(self, batch_data_future, continuous_iterator)``: the state of the batch it returns."""

    @functools.wraps(fit_generate)
    async def _fit_generate(self, batch_data_future, continuous_iterator):
        result = await fit_generate(self, batch_data_future, continuous_iterator)
        drawn = getattr(self, DRAWN, None)
        if drawn:
            setattr(self, TRAINED, drawn.popleft())
        return result

    return _fit_generate


@contextlib.contextmanager
def _answering(dataloader, state: dict):
    """Within the block, ``dataloader.state_dict()`` returns ``state``."""
    dataloader.state_dict = lambda: state
    try:
        yield
    finally:
        del dataloader.state_dict


@_once
def saving_trained_state(save_checkpoint: Callable) -> Callable:
    """Wrap ``_save_checkpoint(self)``: ``data.pt`` gets the state as of the trained batch (see module doc)."""

    @functools.wraps(save_checkpoint)
    def _save_checkpoint(self, *args, **kwargs):
        trained = getattr(self, TRAINED, None)
        if trained is None:
            return save_checkpoint(self, *args, **kwargs)
        with _answering(self.train_dataloader, trained):
            return save_checkpoint(self, *args, **kwargs)

    return _save_checkpoint


@_once
def dumping_with_an_executor(fit_dump_data: Callable) -> Callable:
    """Wrap ``_fit_dump_data(self, batch)``: verl's rollout dump with the executor one-step-off never creates."""

    @functools.wraps(fit_dump_data)
    def _fit_dump_data(self, batch):
        self._init_dump_executor()
        try:
            return fit_dump_data(self, batch)
        finally:
            self._shutdown_dump_executor()  # the dump is written before the step's checkpoint

    return _fit_dump_data


def wrap_one_step_off(module) -> None:
    """The wrappers on ``module.OneStepOffRayTrainer`` (verl's one_step_off_policy.ray_trainer)."""
    cls = module.OneStepOffRayTrainer
    cls._fit_dump_data = dumping_with_an_executor(cls._fit_dump_data)
    cls._create_continuous_iterator = recording_drawn_states(cls._create_continuous_iterator)
    cls._fit_generate = marking_trained_state(cls._fit_generate)
    cls._save_checkpoint = saving_trained_state(cls._save_checkpoint)


ONE_STEP_OFF_TRAINER = "verl.experimental.one_step_off_policy.ray_trainer"


def install(run_after_import: Callable) -> None:
    """Wrap verl's one-step-off trainer once its module is imported (``hmpo_verl.guards.hooks.run_after_import``)."""
    run_after_import(ONE_STEP_OFF_TRAINER, wrap_one_step_off,
                     f"hmpo_verl could not wrap {ONE_STEP_OFF_TRAINER} (a resume would skip the prefetched batch)")
