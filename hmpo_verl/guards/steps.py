"""The optimizer step a scheduled loss is at, identical on every data-parallel rank.

A policy loss in verl sees neither the trainer's step nor the optimizer. Counting its own
calls would be wrong: the number of micro-batches per optimizer step may differ between
data-parallel ranks (dynamic batch size) and between steps. Instead, a process-wide
optimizer post-step hook (`torch.optim.optimizer.register_optimizer_step_post_hook`)
records the step count of the optimizer that steps after the loss has run: the largest
`state["step"]` of its parameters (torch's Adam/AdamW keep it there: FSDP), or of its
`param_groups` (Transformer Engine's and Apex's FusedAdam keep it there: the optimizer
Megatron-core's distributed optimizer wraps, which saves and restores it with the
param_groups); its own count of such steps otherwise.
Optimizers that step without the loss having run (a critic in the same process) are
ignored. The first optimizer to step *or* to zero its gradients after the loss ran is the
policy's, and from then on only its steps count: verl skips the policy's `optimizer.step()` on
a non-finite grad norm by calling its `zero_grad()` instead (`watch_optimizer_zero_grads`), so
a critic stepping next in the same process (a `WorkerDict` with GAE) is not taken for it.
(Why not the loss's autograd graph: FSDP2 accumulates into transient unsharded parameters, not
the sharded ones its optimizer holds.) Every rank takes the same optimizer steps, so every rank
reads the same step.

After a resume the loss runs before the first optimizer step of the new process, so the
hook has seen nothing yet. `watch_optimizer_loads()` (called when the plugin registers)
therefore also records the step of every optimizer whose state is loaded
(`Optimizer.load_state_dict`: verl's FSDP checkpoint manager calls it, and Megatron's
distributed optimizer calls it on the optimizer it wraps): until the policy's optimizer
steps, the loss reads that step -- the first update after a resume continues the schedule
instead of restarting it. A loaded optimizer that then steps without the loss (a critic)
drops out; should two loaded optimizers at different steps remain when the loss runs, the
step is ambiguous and the loss raises rather than guess.
"""

from __future__ import annotations

import functools
import weakref
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
        self._step = 0
        self._restored = weakref.WeakKeyDictionary()  # optimizer -> its step when its state was loaded
        self._armed = False
        self._handle = None
        self._policy = None  # weakref to the policy's optimizer, once it stepped or zeroed after the loss

    @property
    def step(self) -> int:
        """The step of the policy's optimizer: seen after its last step, or as loaded from a checkpoint."""
        if not self._restored:
            return self._step
        steps = sorted(set(self._restored.values()))
        if len(steps) > 1:
            raise RuntimeError(
                f"hmpo_verl: {len(self._restored)} optimizers in this process were loaded from a checkpoint at "
                f"different steps {steps} and none has stepped since: the scheduled power cannot tell which one "
                f"is the policy's"
            )
        return steps[0]

    def arm(self) -> None:
        """Called by the loss: the next optimizer step in this process is the policy's."""
        self._watch_steps()
        self._armed = True

    def restored(self, optimizer: torch.optim.Optimizer) -> None:
        """Record an optimizer whose state was just loaded (a resume)."""
        self._watch_steps()  # from now on: a step without the loss rules an optimizer out
        self._restored[optimizer] = _optimizer_state_step(optimizer) or 0

    def _watch_steps(self) -> None:
        if self._handle is None:
            self._handle = register_optimizer_step_post_hook(self._after_step)
            _COUNTERS.add(self)

    def _is_policy(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether `optimizer`, stepping or zeroing now, is the policy's (the first to do so after the loss ran)."""
        policy = None if self._policy is None else self._policy()
        if policy is not None:
            return optimizer is policy
        if self._armed:
            self._policy = weakref.ref(optimizer)
        return self._armed

    def zeroed(self, optimizer: torch.optim.Optimizer) -> None:
        """`optimizer.zero_grad()` ran: after the loss, that is verl skipping the policy's step."""
        if self._armed and self._is_policy(optimizer):
            self._armed = False

    def _after_step(self, optimizer, args, kwargs) -> None:
        if not self._is_policy(optimizer):
            self._restored.pop(optimizer, None)  # stepped without the loss: not the policy's
            return
        self._armed = False
        state_step = _optimizer_state_step(optimizer)
        self._step = state_step if state_step is not None else self.step + 1
        self._restored.clear()


_COUNTERS: "weakref.WeakSet[OptimizerStepCounter]" = weakref.WeakSet()  # told of every zero_grad
STEP_COUNTER = OptimizerStepCounter()


def watch_optimizer_zero_grads() -> None:
    """Make `Optimizer.zero_grad` report every call to the step counters (idempotent)."""
    zero_grad = torch.optim.Optimizer.zero_grad
    if getattr(zero_grad, "_hmpo_watched", False):
        return

    @functools.wraps(zero_grad)
    def watched_zero_grad(self, *args, **kwargs):
        zero_grad(self, *args, **kwargs)
        for counter in list(_COUNTERS):
            counter.zeroed(self)

    watched_zero_grad._hmpo_watched = True
    torch.optim.Optimizer.zero_grad = watched_zero_grad


def watch_optimizer_loads() -> None:
    """Make `Optimizer.load_state_dict` report every load to `STEP_COUNTER` (idempotent)."""
    load = torch.optim.Optimizer.load_state_dict
    if getattr(load, "_hmpo_watched", False):
        return

    @functools.wraps(load)
    def load_state_dict(self, state_dict):
        load(self, state_dict)
        STEP_COUNTER.restored(self)

    load_state_dict._hmpo_watched = True
    torch.optim.Optimizer.load_state_dict = load_state_dict
