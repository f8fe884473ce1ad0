"""verl-side glue for the HF rollout server: a ``RolloutReplica`` and a ``ServerAdapter``.

verl 0.9.1 splits a rollout backend in two, and so do we:

* :class:`HFReplica` (``RolloutReplica``) lives in the trainer process and launches one
  :class:`~verl_cpu.rollout.server.HFRolloutServer` Ray actor per replica, on the node of
  the replica's first worker, named ``hf_server_<replica>_<node>``. Two of verl's rollout
  modes: ``HYBRID`` (the sync trainer: the workers are the colocated actor workers) and
  ``STANDALONE`` (one-step-off-policy, fully-async: a separate rollout pool whose workers are
  verl's ``CheckpointEngineWorker``, each holding an :class:`HFServerAdapter`).
* :class:`HFServerAdapter` (``BaseRollout``) lives inside each hybrid actor worker or
  standalone rollout worker. Its :meth:`~HFServerAdapter.update_weights` receives full
  weights -- from ``engine.get_per_tensor_param()`` (verl's naive, colocated sync) or from a
  checkpoint engine's ``receive_weights()`` (standalone; see
  :mod:`verl_cpu.checkpoint_engine`) -- and ships them to the server in buckets through
  the Ray object store. Every rank iterates the weight generator -- FSDP's
  ``full_tensor()`` all-gathers are collective -- but only the rank that owns the server
  sends.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Generator, Optional

import ray
import torch
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import RolloutMode, RolloutReplica
from verl.workers.rollout.utils import ensure_async_iterator

from verl_cpu.rollout.server import HFRolloutServer

logger = logging.getLogger(__name__)
SERVER_NAME_PREFIX = "hf_"
SUPPORTED_MODES = (RolloutMode.HYBRID, RolloutMode.STANDALONE)


def server_actor_name(replica_rank: int, node_rank: int = 0, name_suffix: str = "") -> str:
    return f"{SERVER_NAME_PREFIX}server_{replica_rank}_{node_rank}{name_suffix}"


def _rollout_world_size(config) -> int:
    return config.tensor_model_parallel_size * config.data_parallel_size * config.pipeline_model_parallel_size


class HFReplica(RolloutReplica):
    """One HF-transformers rollout server per replica (tensor/pipeline parallel size 1)."""

    async def launch_servers(self):
        if self.world_size != 1:
            raise NotImplementedError(
                "verl_cpu's hf rollout runs one process per replica: set "
                "actor_rollout_ref.rollout.tensor_model_parallel_size=1 (and data/pipeline parallel size 1); "
                f"got a replica world size of {self.world_size}."
            )
        if self.rollout_mode not in SUPPORTED_MODES:
            raise NotImplementedError(
                f"verl_cpu's hf rollout runs in verl's rollout modes {[m.value for m in SUPPORTED_MODES]}, "
                f"not {self.rollout_mode.value}."
            )
        worker = self.workers[0]
        node_id = await worker.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id())
        name = server_actor_name(self.replica_rank, 0, self.name_suffix)
        server = start_server(self.config, self.model_config, self.replica_rank, name, node_id, self.max_concurrency)
        await server.stats.remote()  # wait until the model is loaded
        self.servers = [server]
        self._server_handle = server
        self._server_address = f"ray://{name}"


def start_server(config, model_config, replica_rank: int, name: str, node_id: str, max_concurrency: int):
    """Start the :class:`HFRolloutServer` Ray actor of one replica on ``node_id``.

    ``num_cpus=0``: it shares the CPUs with the replica's worker (in hybrid mode the
    colocated actor worker; the two take turns).
    """
    return (
        ray.remote(HFRolloutServer)
        .options(
            scheduling_strategy=ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
            name=name,
            max_concurrency=max_concurrency,
            num_cpus=0,
        )
        .remote(config=config, model_config=model_config, replica_rank=replica_rank)
    )


class HFServerAdapter(BaseRollout):
    """Rollout handle inside an actor worker: forwards weight updates to its HF server."""

    def __init__(self, config, model_config, device_mesh=None, replica_rank: int = -1, **kwargs):
        super().__init__(config, model_config, device_mesh)
        rank = int(os.environ.get("RANK", 0))
        world = _rollout_world_size(self.config)
        self.replica_rank = rank // world if replica_rank == -1 else replica_rank
        self.rollout_rank = rank % world
        self.is_leader_rank = self.rollout_rank == 0
        self.server_handle: Optional[ray.actor.ActorHandle] = None
        self.bucket_bytes = max(1, self.config.checkpoint_engine.update_weights_bucket_megabytes) << 20

    def _server(self) -> Optional[ray.actor.ActorHandle]:
        """The server of this replica, looked up lazily (it starts after the workers)."""
        if not self.is_leader_rank:
            return None
        if self.server_handle is None:
            self.server_handle = ray.get_actor(server_actor_name(self.replica_rank))
        return self.server_handle

    async def resume(self, tags: list[str]):
        server = self._server()
        if server is not None:
            await server.wake_up.remote(tags=tags)

    async def release(self):
        server = self._server()
        if server is not None:
            await server.sleep.remote()

    @torch.no_grad()
    async def update_weights(
        self,
        weights: Generator[tuple[str, torch.Tensor], None, None],
        wire_format: str = "named_tensors",
        global_steps: Optional[int] = None,
        **kwargs: Any,
    ):
        """Ship ``(name, full tensor)`` pairs to the server in buckets of ~``bucket_bytes``."""
        if wire_format != "named_tensors":
            raise NotImplementedError(
                f"verl_cpu's hf rollout takes full tensors (checkpoint_engine.backend=naive or "
                f"object_store), not {wire_format!r}"
            )
        server = self._server()
        bucket: list[tuple[str, torch.Tensor]] = []
        size = 0
        async for name, tensor in ensure_async_iterator(weights):
            if server is None:
                continue  # still consume: producing each full tensor is a collective
            tensor = tensor.detach().to("cpu", copy=True).contiguous()
            bucket.append((name, tensor))
            size += tensor.numel() * tensor.element_size()
            if size >= self.bucket_bytes:
                await server.update_weights_from_tensors.remote(bucket, last=False)
                bucket, size = [], 0
        if server is not None:
            await server.update_weights_from_tensors.remote(bucket, last=True, global_steps=global_steps)
