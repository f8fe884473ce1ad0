"""verl's synchronous replay buffer, polling for finished rollouts every ``poll_interval`` seconds.

verl 0.9.1's v1 trainer collects a step's rollouts with ``ReplayBuffer.sample``: it checks
TransferQueue, and while the batch is incomplete it sleeps a fixed 2.0 s
(``ReplayBuffer(poll_interval=2.0)``, not reachable from the config). A rollout that takes
1.1 s therefore costs 2 s of ``timing_s/gen``, one of 2.1 s costs 4 s, and so does every
validation batch. On a GPU node with minute-long rollouts that is noise; for the CPU
recipe's one-second rollouts it was most of the step.

This subclass is selected through verl's own extension point::

    trainer.v1.sampler.custom_sampler.path=pkg://verl_cpu.replay_buffer
    trainer.v1.sampler.custom_sampler.name=PollingReplayBuffer
    trainer.v1.sampler.sampler_kwargs.poll_interval=0.05

verl passes a custom sampler neither DAPO's group filter nor the refill settings, so
``verl_cpu.preflight`` refuses it together with ``algorithm.filter_groups.enable=true``.
"""

from __future__ import annotations

from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

DEFAULT_POLL_INTERVAL = 0.05
SAMPLER_NAME = "PollingReplayBuffer"
SAMPLER_PATH = "pkg://verl_cpu.replay_buffer"


def poll_interval_of(sampler_kwargs) -> float:
    """``sampler_kwargs.poll_interval`` in seconds (default 0.05); must be a positive number."""
    value = (sampler_kwargs or {}).get("poll_interval", DEFAULT_POLL_INTERVAL)
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = float("nan")
    if not seconds > 0:
        raise ValueError(
            f"trainer.v1.sampler.sampler_kwargs.poll_interval must be a positive number of seconds, got {value!r}"
        )
    return seconds


class PollingReplayBuffer(ReplayBuffer):
    """verl's sync ``ReplayBuffer`` with a configurable poll interval (``sampler_kwargs.poll_interval``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.poll_interval = poll_interval_of(self.sampler_kwargs)
