"""verl_cpu's ``object_store`` checkpoint engine: the weights arrive whole, in order, on every rollout worker.

The engine is driven as verl's ``CheckpointEngineManager.update_weights`` drives it --
``prepare`` on every worker, the class's ``build_topology``, ``init_process_group`` with
each worker's share, then ``send_weights`` and ``receive_weights`` concurrently -- with the
three workers' engines in this process and the queues as real Ray actors (a local Ray).
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from verl_cpu.checkpoint_engine import BACKEND, ObjectStoreCheckpointEngine, pack_buckets


def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3,), (64, 64), (5, 7), (1000,), (2, 2), (300, 4)]
    return [(f"w{i}", torch.randn(*shape, generator=g)) for i, shape in enumerate(shapes)]


def _collect(agen):
    async def run():
        return [bucket async for bucket in agen]

    return asyncio.run(run())


def test_pack_buckets_keeps_order_and_bounds_each_bucket():
    weights = _weights()
    limit = 2048  # bytes: the 64x64 (16 KiB) and 1000-float tensors travel alone
    buckets = _collect(pack_buckets(iter(weights), limit))
    flat = [pair for bucket in buckets for pair in bucket]
    assert [n for n, _ in flat] == [n for n, _ in weights]
    for (_, a), (_, b) in zip(flat, weights, strict=True):
        assert torch.equal(a, b)
    for bucket in buckets:
        nbytes = sum(t.numel() * t.element_size() for _, t in bucket)
        assert nbytes <= limit or len(bucket) == 1
    assert len(buckets) > 2


def test_invalid_settings_name_the_engine():
    with pytest.raises(ValueError, match=BACKEND):
        ObjectStoreCheckpointEngine(bucket_size=0)


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _sync(engines_actor, engines_rollout, weights, global_steps):
    cls = ObjectStoreCheckpointEngine
    metadata = [e.prepare() for e in engines_actor + engines_rollout]
    actor_kwargs, rollout_kwargs = cls.build_topology(len(engines_actor), len(engines_rollout), metadata)
    for i, engine in enumerate(engines_actor):
        engine.init_process_group(**{k: v[i] for k, v in actor_kwargs.items()})
    for i, engine in enumerate(engines_rollout):
        engine.init_process_group(**{k: v[i] for k, v in rollout_kwargs.items()})

    async def run():
        async def receive(engine):
            return [pair async for pair in engine.receive_weights(global_steps=global_steps)]

        sends = [e.send_weights(iter(weights), global_steps=global_steps) for e in engines_actor]
        results = await asyncio.gather(*sends, *[receive(e) for e in engines_rollout])
        return results[len(engines_actor):]

    received = asyncio.run(run())
    for engine in engines_actor + engines_rollout:
        engine.finalize()
    return received


def test_every_rollout_worker_receives_the_weights_of_actor_rank_0(local_ray):
    actor = [ObjectStoreCheckpointEngine(bucket_size=4096, is_master=True),
             ObjectStoreCheckpointEngine(bucket_size=4096, is_master=False)]
    rollout = [ObjectStoreCheckpointEngine(bucket_size=4096, max_buckets_in_flight=1) for _ in range(2)]
    for version in (1, 2):  # a second sync reuses the same inboxes
        weights = _weights(seed=version)
        for got in _sync(actor, rollout, weights, version):
            assert [n for n, _ in got] == [n for n, _ in weights]
            for (_, a), (_, b) in zip(got, weights, strict=True):
                assert torch.equal(a, b)
    inboxes = [e.inbox for e in rollout]
    assert all(e.inbox is box for e, box in zip(rollout, inboxes, strict=True))


def test_a_receiver_with_nothing_to_receive_times_out(local_ray):
    engine = ObjectStoreCheckpointEngine(bucket_size=1024, timeout_s=0.5)
    engine.prepare()

    async def run():
        return [pair async for pair in engine.receive_weights()]

    with pytest.raises(TimeoutError, match="timeout_s"):
        asyncio.run(run())
