"""verl's TransferQueue agent-loop manager, numbering a step's prompts as verl's other manager does.

verl 0.9.1's ``AgentLoopManager`` gives every prompt of a batch a ``priority`` (its position,
``np.arange``); under ``rollout.full_determinism`` the agent loop sends it to the rollout server
as the request id ``det-<priority>``. The v1 trainer's ``AgentLoopManagerTQ`` does not, so every
request is ``det-0`` and the server cannot tell two groups of the same prompt apart (the addition
task's 400 training rows hold each of its 100 prompts 4 times: two groups of one prompt in a step
are common). This subclass numbers them; the ``hf`` server keys a request's sampling stream on it.
Selected through verl's own extension point::

    +actor_rollout_ref.rollout.agent.agent_loop_manager_class=verl_cpu.agent_loop.NumberedAgentLoopManagerTQ
"""

from __future__ import annotations

import torch
from verl.trainer.ppo.v1.agent_loop_tq import AgentLoopManagerTQ

MANAGER = "verl_cpu.agent_loop.NumberedAgentLoopManagerTQ"


class NumberedAgentLoopManagerTQ(AgentLoopManagerTQ):
    """``AgentLoopManagerTQ`` that adds ``priority`` = position in the submitted batch, unless present."""

    def generate_sequences(self, prompts):
        if "priority" not in prompts.keys():
            prompts["priority"] = torch.arange(len(prompts))
        return super().generate_sequences(prompts)
