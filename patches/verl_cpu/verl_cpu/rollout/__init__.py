"""HF-transformers rollout backend, registered in verl as ``actor_rollout_ref.rollout.name=hf``."""

from __future__ import annotations

from verl_cpu import ROLLOUT_NAME


def _load_replica():
    from verl_cpu.rollout.replica import HFReplica

    return HFReplica


def register() -> None:
    """Add the ``hf`` backend to verl's two rollout registries (replica and server adapter)."""
    from verl.workers.rollout import base as rollout_base
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    RolloutReplicaRegistry.register(ROLLOUT_NAME, _load_replica)
    rollout_base._ROLLOUT_REGISTRY[(ROLLOUT_NAME, "async")] = "verl_cpu.rollout.replica.HFServerAdapter"
