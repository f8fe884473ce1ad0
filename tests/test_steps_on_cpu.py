"""The p schedule's step is the policy optimizer's (hmpo_verl.steps), not that of the last optimizer that
stepped: an actor and a GAE critic in one process (verl's WorkerDict), the actor's step skipped as verl's
FSDP engine skips it on a non-finite grad norm (`optimizer.zero_grad()` instead of `step()`)."""

from __future__ import annotations

import pytest
import torch

from hmpo_verl.steps import OptimizerStepCounter, watch_optimizer_zero_grads


@pytest.fixture
def counter():
    watch_optimizer_zero_grads()  # what registering the plugin does
    made = OptimizerStepCounter()
    yield made
    if made._handle is not None:
        made._handle.remove()


class ActorCritic:
    """A tiny policy (log-probs of 5 tokens) and a value head, each with its own AdamW."""

    def __init__(self, seed=0):
        torch.manual_seed(seed)
        self.actor, self.critic = torch.nn.Linear(4, 5), torch.nn.Linear(4, 1)
        self.actor_optim = torch.optim.AdamW(self.actor.parameters(), lr=1e-2)
        self.critic_optim = torch.optim.AdamW(self.critic.parameters(), lr=1e-2)
        self.x = torch.randn(3, 4)

    def actor_update(self, counter, skip=False):
        """What verl's actor does: the loss (which arms the counter), backward, step or skip."""
        self.actor_optim.zero_grad()
        log_prob = self.actor(self.x).log_softmax(-1)[:, :2]  # (B, T)
        counter.arm()
        log_prob.mean().backward()
        if skip:  # verl: `if not torch.isfinite(grad_norm): optimizer.zero_grad() else: optimizer.step()`
            self.actor_optim.zero_grad()
        else:
            self.actor_optim.step()

    def critic_update(self, steps=1):
        for _ in range(steps):
            self.critic_optim.zero_grad()
            self.critic(self.x).pow(2).mean().backward()
            self.critic_optim.step()


def actor_steps(model) -> int:
    states = [s["step"] for s in model.actor_optim.state.values()]
    return int(max(states)) if states else 0


def test_a_skipped_actor_step_does_not_hand_the_schedule_to_the_critic(counter):
    model = ActorCritic()
    model.actor_update(counter, skip=True)
    model.critic_update()  # the critic steps next in the same process
    assert counter.step == 0 == actor_steps(model)
    for _ in range(3):
        model.actor_update(counter)
        model.critic_update(steps=2)  # the critic runs ahead
        assert counter.step == actor_steps(model)
    model.actor_update(counter, skip=True)
    model.critic_update()
    assert counter.step == actor_steps(model) == 3


def test_after_a_resume_the_loaded_policy_optimizer_gives_the_step_not_the_critics(counter):
    trained = ActorCritic()
    for _ in range(4):
        trained.actor_update(counter)
        trained.critic_update(steps=2)
    saved = trained.actor_optim.state_dict(), trained.critic_optim.state_dict()

    resumed = ActorCritic()  # a new process: both optimizers loaded, at steps 4 and 8
    fresh = OptimizerStepCounter()
    try:
        resumed.actor_optim.load_state_dict(saved[0])
        fresh.restored(resumed.actor_optim)
        resumed.critic_optim.load_state_dict(saved[1])
        fresh.restored(resumed.critic_optim)
        resumed.critic_update()  # verl updates the critic first
        resumed.actor_update(fresh, skip=True)
        assert fresh.step == 4
        resumed.critic_update()
        assert fresh.step == 4
        resumed.actor_update(fresh)
        assert fresh.step == 5
    finally:
        if fresh._handle is not None:
            fresh._handle.remove()

