"""verl's replay buffers, polling for finished rollouts every ``poll_interval`` seconds.

verl 0.9.1's v1 trainer collects a step's rollouts with ``ReplayBuffer.sample``: it checks
TransferQueue, and while the batch is incomplete it sleeps a fixed 2.0 s
(``ReplayBuffer(poll_interval=2.0)``, not reachable from the config). A rollout that takes
1.1 s therefore costs 2 s of ``timing_s/gen``, one of 2.1 s costs 4 s, and so does every
validation batch. On a GPU node with minute-long rollouts that is noise; for the CPU
recipe's one-second rollouts it was most of the step.

``PollingReplayBuffer`` is selected through verl's own extension point::

    trainer.v1.sampler.custom_sampler.path=pkg://verl_cpu.replay_buffer
    trainer.v1.sampler.custom_sampler.name=PollingReplayBuffer
    trainer.v1.sampler.sampler_kwargs.poll_interval=0.05

verl then builds it instead of its own buffer whatever ``trainer.v1.trainer_mode``
(``PPOTrainer._build_replay_buffer``), passing ``trainer_mode``, ``trainer_config``,
``max_off_policy_threshold``, ``max_off_policy_strategy``, ``sampler_kwargs`` and ``refill_fn``.
Like verl's own choice (``ReplayBuffer if trainer_mode == "sync" else ReplayBufferAsync``), it
follows the mode: ``PollingReplayBuffer(trainer_mode="sync", ...)`` is verl's ``ReplayBuffer``,
any other mode gives a :class:`PollingReplayBufferAsync`, verl's ``ReplayBufferAsync`` (the
staleness bound ``max_off_policy_threshold`` with ``drop``/``wait``, failed groups evicted and
replaced, ``training/off_policy/evicted_samples*`` metrics, ``wait_for_sampleable``); both with
the poll interval and batch order of this module.

verl passes a custom sampler neither DAPO's group filter nor ``sync_refill_failed_groups``, so
``verl_cpu.preflight`` refuses it together with ``algorithm.filter_groups.enable=true`` or, in
``sync`` mode, ``trainer.v1.sampler.sync_refill_failed_groups=true`` (the async buffers always
replace failed groups, as verl's do).

It also fixes the order of a step's training batch. verl's buffer hands the trainer the
trajectories in the order they reached TransferQueue -- the order their rollouts *finished* --
so two runs of the same seed split the same samples into different PPO mini-batches (and a
resumed run cannot repeat the uninterrupted one). Here the batch is in the order the prompts
were submitted (the dataloader's), and a prompt's samples are ordered by their response
tokens: which of a group's n concurrent requests got which sample depends on their arrival
order at the rollout server, the group's set of responses does not (with the ``hf`` server's
``rollout.full_determinism``), so sorting makes the batch -- and the float sums over it -- the
same in every run.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import transfer_queue as tq
from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer, ReplayBufferAsync

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


def submission_order(
    keys: list[str], prompt_uids: list[str], responses: Optional[Sequence[Sequence[int]]] = None
) -> list[int]:
    """Indices that sort trajectory keys ``{uid}_{session_id}_{index}`` by prompt, then by response.

    ``prompt_uids``: the prompts' uids in the order they were submitted; a key whose uid is
    not among them goes last. ``responses``: each key's response token ids (None: order a
    prompt's samples by ``session_id``, ``index`` only; they break ties otherwise).
    """
    rank = {uid: i for i, uid in enumerate(prompt_uids)}

    def sort_key(i: int) -> tuple:
        uid, session_id, index = keys[i].rsplit("_", 2)
        response = tuple(responses[i]) if responses is not None else ()
        return rank.get(uid, len(rank)), response, int(session_id), int(index)

    return sorted(range(len(keys)), key=sort_key)


def response_tokens(partition_id: str, keys: list[str]) -> list[list[int]]:
    """The response token ids of ``keys``, read from TransferQueue."""
    data = tq.kv_batch_get(keys=keys, partition_id=partition_id, select_fields=["responses"])
    return [row.tolist() for row in data["responses"].unbind()]


class PollingReplayBuffer(ReplayBuffer):
    """verl's replay buffer for ``trainer_mode``, with a configurable poll interval
    (``sampler_kwargs.poll_interval``) and its batch in submission order (see the module doc).

    Constructed with ``trainer_mode="sync"`` it is verl's sync ``ReplayBuffer``; with any other
    mode the instance is a :class:`PollingReplayBufferAsync` (verl's ``ReplayBufferAsync``), the
    class verl itself would build for that mode.
    """

    def __new__(cls, *args, **kwargs):
        mode = kwargs.get("trainer_mode", args[0] if args else "sync")
        if cls is PollingReplayBuffer and mode != "sync":
            cls = PollingReplayBufferAsync
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.poll_interval = poll_interval_of(self.sampler_kwargs)

    def _materialize_batch(self, partition_id, selected_prompt_uids, partition_snapshot):
        batch = super()._materialize_batch(partition_id, selected_prompt_uids, partition_snapshot)
        if partition_id != "train" or not batch.keys:
            return batch
        # prompt_global_steps holds the prompts in TransferQueue's order: the order they were put (submitted)
        responses = response_tokens(partition_id, batch.keys)
        order = submission_order(batch.keys, list(self.prompt_global_steps[partition_id]), responses)
        return dataclasses.replace(batch, keys=[batch.keys[i] for i in order], tags=[batch.tags[i] for i in order])


class PollingReplayBufferAsync(PollingReplayBuffer, ReplayBufferAsync):
    """verl's ``ReplayBufferAsync`` (its sampling, staleness and failure eviction, refill and metrics
    unchanged) with :class:`PollingReplayBuffer`'s poll interval and batch order. Built by
    ``PollingReplayBuffer`` for ``colocate_async`` and ``separate_async``; name ``PollingReplayBuffer``
    in the config, which picks it by mode."""
