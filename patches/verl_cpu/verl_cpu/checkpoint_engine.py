"""A CPU checkpoint engine: actor rank 0 -> Ray's object store -> one queue per rollout worker.

verl's off-policy trainers (one-step-off-policy, fully-async) keep the rollout in a separate
pool and send it the trainer's weights through a checkpoint engine
(``verl.checkpoint_engine``). verl 0.9.1's ``naive`` engine is colocated-only (in the
separated ``actor`` role it has no rollout to hand the weights to) and ``nccl`` is CUDA-only
(cupy, CUDA buffers); a Ray gloo collective would reuse the default process group FSDP
already holds. This engine needs neither a device nor a collective group:

* ``prepare()``: each rollout worker creates its inbox once -- a ``ray.util.queue.Queue``
  actor (no CPU reserved) -- and returns its handle as metadata;
* ``build_topology()``: actor rank 0 gets every inbox, rollout worker ``i`` its own;
* ``send_weights()`` (actor): every actor rank walks the weight generator (FSDP's
  ``full_tensor()`` all-gathers are collective); rank 0 packs ``(name, tensor)`` pairs into
  buckets of about ``bucket_size`` bytes (:func:`pack_buckets`), puts each bucket into the
  object store once and its reference into every inbox, then an end marker with the number
  of tensors and the weight version;
* ``receive_weights()`` (rollout): yields each bucket's tensors until the end marker and
  checks that the count matches.

Which side an engine is on: verl builds the actor-side engines with
``is_master=(rank == 0)`` (``engine_workers.py``) and the rollout-side ones
(``CheckpointEngineWorker``) without it, so ``is_master=None`` means a rollout worker.

Use it with::

    actor_rollout_ref.rollout.checkpoint_engine.backend=object_store
    actor_rollout_ref.rollout.checkpoint_engine.custom_backend_module=verl_cpu.checkpoint_engine

``engine_kwargs.object_store`` takes ``max_buckets_in_flight`` (queue length per inbox, the
sender waits when one is full; default 4) and ``timeout_s`` (a receiver that gets nothing for
this long fails instead of hanging; default 600).
"""

from __future__ import annotations

from typing import Any, AsyncGenerator, AsyncIterator, Optional

import ray
import torch
from verl.checkpoint_engine import CheckpointEngine, CheckpointEngineRegistry
from verl.workers.rollout.utils import ensure_async_iterator

BACKEND = "object_store"
BUCKET, END = "bucket", "end"


async def pack_buckets(named_tensors, bucket_bytes: int) -> AsyncIterator[list[tuple[str, torch.Tensor]]]:
    """Group ``(name, tensor)`` pairs (a sync or async iterable), in order, into lists of at
    most ``bucket_bytes`` bytes each; a tensor larger than that travels alone.

    Tensors are moved to CPU and made contiguous (what the object store serialises).
    """
    bucket, size = [], 0
    async for name, tensor in ensure_async_iterator(named_tensors):
        tensor = tensor.detach().to("cpu").contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


@CheckpointEngineRegistry.register(BACKEND)
class ObjectStoreCheckpointEngine(CheckpointEngine):
    """Weights from actor rank 0 to every rollout worker through Ray's object store (see module doc).

    Args:
        bucket_size: bytes per bucket (verl passes ``update_weights_bucket_megabytes << 20``).
        is_master: ``True`` on actor rank 0, ``False`` on other actor ranks, ``None`` on rollout workers.
        max_buckets_in_flight: length of each inbox queue.
        timeout_s: how long a rollout worker waits for the next message before failing.
    """

    def __init__(
        self, bucket_size: int, is_master: Optional[bool] = None, max_buckets_in_flight: int = 4,
        timeout_s: float = 600.0,
    ) -> None:
        if bucket_size <= 0 or max_buckets_in_flight <= 0 or timeout_s <= 0:
            raise ValueError(
                f"checkpoint_engine {BACKEND}: bucket_size ({bucket_size}), max_buckets_in_flight "
                f"({max_buckets_in_flight}) and timeout_s ({timeout_s}) must be > 0"
            )
        self.bucket_size = bucket_size
        self.is_master = bool(is_master)
        self.is_rollout = is_master is None
        self.max_buckets_in_flight = max_buckets_in_flight
        self.timeout_s = timeout_s
        self.inbox = None  # rollout side: this worker's queue (kept across syncs)
        self.inboxes: list = []  # actor rank 0: every rollout worker's queue
        self.rank = None

    # ------------------------------------------------------------------ topology

    def prepare(self) -> dict[str, Any]:
        if self.is_rollout and self.inbox is None:
            from ray.util.queue import Queue

            self.inbox = Queue(maxsize=self.max_buckets_in_flight, actor_options={"num_cpus": 0})
        return {"inbox": self.inbox}

    @classmethod
    def build_topology(cls, actor_wg_world_size: int, rollout_world_size: int, metadata: list[dict]):
        inboxes = [m["inbox"] for m in metadata[actor_wg_world_size:]]
        if len(inboxes) != rollout_world_size or any(inbox is None for inbox in inboxes):
            raise RuntimeError(f"checkpoint_engine {BACKEND}: a rollout worker has no inbox: {metadata}")
        actor_kwargs = {
            "rank": list(range(actor_wg_world_size)),
            "inboxes": [inboxes] + [[] for _ in range(actor_wg_world_size - 1)],
        }
        rollout_kwargs = {
            "rank": list(range(actor_wg_world_size, actor_wg_world_size + rollout_world_size)),
            "inboxes": [[inbox] for inbox in inboxes],
        }
        return actor_kwargs, rollout_kwargs

    def init_process_group(self, rank: int, inboxes: list):
        self.rank = rank
        if not self.is_rollout:
            self.inboxes = inboxes

    def finalize(self):
        self.inboxes = []  # the rollout side keeps its inbox for the next sync

    # ------------------------------------------------------------------ transfer

    @torch.no_grad()
    async def send_weights(self, weights, global_steps: Optional[int] = None):
        """Actor side: every rank consumes ``weights``; rank 0 sends them (see module doc)."""
        if self.is_rollout:
            raise RuntimeError(f"checkpoint_engine {BACKEND}: a rollout worker cannot send weights")
        if not self.is_master:
            async for _ in ensure_async_iterator(weights):
                pass  # still consume: producing each full tensor is a collective
            return {}
        count = 0
        async for bucket in pack_buckets(weights, self.bucket_size):
            await self._put((BUCKET, [ray.put(bucket)]))
            count += len(bucket)
        await self._put((END, count, global_steps))
        return {}

    async def _put(self, message) -> None:
        """One message to every inbox (a bucket's reference travels wrapped in a list: not resolved on the way)."""
        for inbox in self.inboxes:
            await inbox.put_async(message)

    async def receive_weights(self, global_steps: Optional[int] = None) -> AsyncGenerator[tuple[str, torch.Tensor], None]:
        """Rollout side: the tensors of every bucket, in order, until the sender's end marker."""
        from ray.util.queue import Empty

        if not self.is_rollout or self.inbox is None:
            raise RuntimeError(f"checkpoint_engine {BACKEND}: receive_weights runs on a prepared rollout worker")
        received = 0
        while True:
            try:
                message = await self.inbox.get_async(timeout=self.timeout_s)
            except Empty:
                raise TimeoutError(
                    f"checkpoint_engine {BACKEND}: no weights from the trainer for {self.timeout_s} s "
                    f"(engine_kwargs.{BACKEND}.timeout_s)"
                ) from None
            if message[0] == END:
                _, sent, version = message
                if sent != received or (global_steps is not None and version != global_steps):
                    raise RuntimeError(
                        f"checkpoint_engine {BACKEND}: {sent} tensors of version {version} sent, {received} received "
                        f"for version {global_steps}"
                    )
                return
            for name, tensor in await message[1][0]:
                received += 1
                yield name, tensor
