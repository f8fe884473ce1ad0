"""What a fully-async resume does not train: the prompts in flight at the checkpoint, counted and named.

verl 0.9.1's fully-async trainer saves at weight version k (``FullyAsyncTrainer._save_checkpoint``)
the actor and, through ``FullyAsyncRollouter.save_checkpoint``, the rollouter's dataloader state
(``data.pt``): every prompt the rollouter has drawn (its dataloader yields one prompt at a time,
``data.gen_batch_size=1``). By then the trainer has trained k syncs of ``ppo_mini_batch_size *
async_training.require_batches * async_training.trigger_parameter_sync_step`` prompts; the rest
were in flight -- in the pending queue, being generated (partial rollouts included) or finished
in the message queue -- and none of that is saved (verl's own comment there: "directly saving the
state of the dataloader will result in losing these samples when resuming training"). A resume
restores the dataloader past them and sets the rollouter's prompt count to the trained ones
(``FullyAsyncRollouter.load_checkpoint``): they are never trained, and the run feeds as many other
prompts at its end instead.

:func:`inflight_at` counts them from the checkpoint; :func:`warn_fully_async_resume` (run by the
driver checks before Ray starts) logs the count, what it means and the ways on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

logger = logging.getLogger("hmpo_verl")

IN_FLIGHT = (
    "hmpo_verl: this fully-async run resumes from {step_dir} (weight version {version}). Its trainer had trained "
    "{trained} prompts then ({version} syncs x {per_sync}) and its rollouter had drawn {drawn} of the current epoch: "
    "{lost}. verl does not save them (FullyAsyncRollouter.save_checkpoint: the pending, partial and message "
    "queues) and restores the dataloader past them: the resumed run never trains them, and feeds as many later "
    "prompts instead (the same number of steps). Expected for verl's fully-async trainer; to train every prompt, "
    "relaunch with trainer.resume_mode=disable (a new run) or use the one-step-off or synchronous trainer, which "
    "have no prompts in flight at a checkpoint."
)


def prompts_per_sync(config) -> int:
    """Prompts the fully-async trainer trains per weight version."""
    from omegaconf import OmegaConf

    sync = OmegaConf.select(config, "async_training")
    return int(config.actor_rollout_ref.actor.ppo_mini_batch_size * sync.require_batches
               * sync.trigger_parameter_sync_step)  # fmt: skip


def inflight_at(step_dir: Path, per_sync: int) -> tuple[Optional[int], int, Optional[int]]:
    """(drawn, trained, in flight) prompts at checkpoint ``step_dir`` (``global_step_<version>``).

    Drawn is the ``StatefulDataLoader`` state's ``_num_yielded`` (batches of one prompt), which
    counts within the current epoch; in flight is ``drawn - trained``, None when that is unknown
    (no count in ``data.pt``, or the rollouter already in a later epoch than the trained prompts).
    """
    import torch

    trained = int(step_dir.name.rsplit("_", 1)[-1]) * per_sync
    state = torch.load(step_dir / "data.pt", weights_only=False)
    drawn = state.get("_num_yielded") if isinstance(state, dict) else None
    if drawn is None:
        return None, trained, None
    return int(drawn), trained, int(drawn) - trained if drawn >= trained else None


def fully_async_resume_warning(config, step_dir: Optional[Path]) -> Optional[str]:
    """The warning for a fully-async run resuming from ``step_dir`` (None: not fully-async, or nothing lost)."""
    from omegaconf import OmegaConf

    if OmegaConf.select(config, "async_training") is None or step_dir is None or not (step_dir / "data.pt").exists():
        return None
    per_sync = prompts_per_sync(config)
    drawn, trained, in_flight = inflight_at(step_dir, per_sync)
    if in_flight == 0:
        return None
    lost = (f"the {in_flight} prompts between were in flight" if in_flight is not None else
            "the prompts in flight then cannot be counted from data.pt (it counts within an epoch only)")
    return IN_FLIGHT.format(step_dir=step_dir, version=trained // per_sync, trained=trained, per_sync=per_sync,
                            drawn="?" if drawn is None else drawn, lost=lost)


def warn_fully_async_resume(config, step_dir: Optional[Path]) -> Optional[str]:
    """Log :func:`fully_async_resume_warning` (if any) and return it."""
    warning = fully_async_resume_warning(config, step_dir)
    if warning:
        logger.warning(warning)
    return warning
