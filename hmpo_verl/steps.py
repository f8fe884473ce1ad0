"""The optimizer step a scheduled loss is at, identical on every data-parallel rank.

A policy loss in verl sees neither the trainer's step nor the optimizer. Counting its own
calls would be wrong: the number of micro-batches per optimizer step may differ between
data-parallel ranks (dynamic batch size) and between steps. Instead, a process-wide
optimizer post-step hook (`torch.optim.optimizer.register_optimizer_step_post_hook`)
records the step count of the optimizer that steps after the loss has run: the largest
`state["step"]` of its parameters (torch's Adam/AdamW keep it there: FSDP), or of its
`param_groups` (Transformer Engine's and Apex's FusedAdam keep it there: the optimizer
Megatron-core's distributed optimizer wraps, which saves and restores it with the
param_groups), so a resumed run continues its schedule; its own count of such steps
otherwise.
Optimizers that step without the loss having run (a critic in the same process) are
ignored. Every rank takes the same optimizer steps, so every rank reads the same step.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook


def _optimizer_state_step(optimizer: torch.optim.Optimizer) -> Optional[int]:
    steps = [state["step"] for state in optimizer.state.values() if "step" in state]
    # FusedAdam (TE / Apex) does not count steps of an empty group: only groups with params
    steps += [group["step"] for group in optimizer.param_groups if "step" in group and group["params"]]
    return int(max(float(s) for s in steps)) if steps else None


class OptimizerStepCounter:
    """`step`: optimizer steps completed so far by the optimizer that follows the loss."""

    def __init__(self):
        self.step = 0
        self._armed = False
        self._handle = None

    def arm(self) -> None:
        """Called by the loss: the next optimizer step in this process is the policy's."""
        if self._handle is None:
            self._handle = register_optimizer_step_post_hook(self._after_step)
        self._armed = True

    def _after_step(self, optimizer, args, kwargs) -> None:
        if not self._armed:
            return
        self._armed = False
        state_step = _optimizer_state_step(optimizer)
        self.step = state_step if state_step is not None else self.step + 1


STEP_COUNTER = OptimizerStepCounter()
