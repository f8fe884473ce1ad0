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
Which optimizer is the policy's: the loss arms the counter with its `log_prob` (B, T), whose
autograd graph leads back to the policy's parameters; the first optimizer that steps afterwards
holding one of them (`policy_leaf`: the first parameter a breadth-first walk of the graph meets,
the LM head's) is the policy's, and from then on only its steps count. A critic in the same
process (a `WorkerDict` with GAE) is thus never taken for it, also when verl skips the policy's
`optimizer.step()` (a non-finite grad norm) and the critic steps next. Where the optimizer holds
copies of the model's parameters (Megatron's distributed optimizer steps fp32 main params) no
optimizer holds the leaf (a parameter with Megatron DDP's `main_grad`): then, as without a graph,
the first optimizer that steps after the loss ran counts, and optimizers that step without the
loss having run are ignored.
Every rank takes the same optimizer steps, so every rank reads the same step.

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

import collections
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


GRAPH_WALK_LIMIT = 10_000  # autograd nodes `policy_leaf` visits at most


def policy_leaf(output: torch.Tensor) -> Optional[torch.Tensor]:
    """The first leaf tensor (a parameter) a breadth-first walk of `output`'s autograd graph meets; None
    if `output` has no graph or none is met within `GRAPH_WALK_LIMIT` nodes."""
    queue, seen = collections.deque([output.grad_fn]), set()
    while queue and len(seen) < GRAPH_WALK_LIMIT:
        node = queue.popleft()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: the leaf it accumulates into
        if variable is not None:
            return variable
        queue.extend(next_node for next_node, _ in node.next_functions)
    return None


def _storage(tensor: torch.Tensor) -> int:
    """The address of a tensor's (a DTensor's local shard's) storage; 0 for an empty one."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.untyped_storage().data_ptr()


def _holds(optimizer: torch.optim.Optimizer, tensor: torch.Tensor) -> bool:
    """Whether `optimizer` steps `tensor`, or views of its storage (FSDP1 with `use_orig_params=True`
    steps views of the flat parameter the autograd graph accumulates into)."""
    params = [param for group in optimizer.param_groups for param in group["params"]]
    storage = _storage(tensor)
    return any(param is tensor for param in params) or (storage != 0 and any(_storage(p) == storage for p in params))


class OptimizerStepCounter:
    """`step`: optimizer steps completed so far by the policy's optimizer (see module doc)."""

    def __init__(self):
        self._step = 0
        self._restored = weakref.WeakKeyDictionary()  # optimizer -> its step when its state was loaded
        self._armed = False
        self._handle = None
        self._policy = None  # weakref to the policy's optimizer, once identified
        self._leaf = None  # weakref to a policy parameter, until the policy's optimizer is identified

    @property
    def step(self) -> int:
        """The step of the policy's optimizer: seen after its last step, or as loaded from a checkpoint."""
        policy = self._policy_optimizer()
        if policy is not None and policy in self._restored:
            return self._restored[policy]
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

    def arm(self, log_prob: Optional[torch.Tensor] = None) -> None:
        """Called by the loss (with its `log_prob`, if it has a graph): the policy's optimizer steps next."""
        self._watch_steps()
        self._armed = True
        if self._policy_optimizer() is not None or log_prob is None or log_prob.grad_fn is None:
            return
        leaf = policy_leaf(log_prob)
        if leaf is None or hasattr(leaf, "main_grad"):  # Megatron's DDP: its optimizer steps fp32 copies
            return
        self._leaf = weakref.ref(leaf)
        loaded = [optimizer for optimizer in self._restored.keys() if _holds(optimizer, leaf)]
        if loaded:
            self._policy, self._leaf = weakref.ref(loaded[0]), None

    def _policy_optimizer(self) -> Optional[torch.optim.Optimizer]:
        return None if self._policy is None else self._policy()

    def _is_policy(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether an optimizer stepping now is the policy's, identifying it by the loss's parameter if it can."""
        policy = self._policy_optimizer()
        if policy is not None:
            return optimizer is policy
        leaf = None if self._leaf is None else self._leaf()
        if leaf is None:
            return self._armed  # nothing to tell by: the first optimizer to step after the loss ran
        if not _holds(optimizer, leaf):
            return False
        self._policy, self._leaf = weakref.ref(optimizer), None
        return True

    def restored(self, optimizer: torch.optim.Optimizer) -> None:
        """Record an optimizer whose state was just loaded (a resume)."""
        self._watch_steps()  # from now on: a step without the loss rules an optimizer out
        self._restored[optimizer] = _optimizer_state_step(optimizer) or 0

    def _watch_steps(self) -> None:
        if self._handle is None:
            self._handle = register_optimizer_step_post_hook(self._after_step)

    def _after_step(self, optimizer, args, kwargs) -> None:
        if not self._is_policy(optimizer):
            self._restored.pop(optimizer, None)  # not the policy's
            return
        self._armed = False
        state_step = _optimizer_state_step(optimizer)
        self._step = state_step if state_step is not None else self.step + 1
        self._restored.clear()


STEP_COUNTER = OptimizerStepCounter()


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
