"""verl_cpu's replay buffer does what verl's own does in every V1 trainer mode, and the CPU preflight's advice works.

verl builds a custom sampler instead of its own buffer whatever ``trainer.v1.trainer_mode``
(``PPOTrainer._build_replay_buffer``). Here both are built by that very function, from the same
config but for ``custom_sampler``, over the same (fake) TransferQueue contents, and sampled alike:
the async modes must evict the same stale and failed groups, report the same metrics, refill as
many prompts and select the same groups as verl's ``ReplayBufferAsync``; the sync mode as verl's
``ReplayBuffer``. Then: the preflight refuses what verl would not hand a custom sampler, and every
override it suggests composes with the recipe and clears the problem it was given for.
"""

from __future__ import annotations

import re
import types

import pytest
import torch
import transfer_queue as tq
from omegaconf import OmegaConf
from test_cpu_preflight import compose
from verl.trainer.ppo.v1 import replay_buffer as verl_replay_buffer
from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer, ReplayBufferAsync
from verl.trainer.ppo.v1.trainer_base import PPOTrainer
from verl_cpu.preflight import check_device_settings, check_ray_resources, check_sampler, check_vllm_settings
from verl_cpu.replay_buffer import SAMPLER_NAME, SAMPLER_PATH, PollingReplayBuffer

ASYNC_MODES = ("colocate_async", "separate_async")


class FakeTransferQueue:
    """TransferQueue's key-value calls the replay buffers make, over a dict ``{partition: {key: tag}}``.

    ``finish_after``: ``{uid: n}`` marks a running prompt finished (with one trajectory) at the n-th ``kv_list``.
    """

    def __init__(self, partitions: dict, finish_after: dict | None = None):
        self.partitions = {pid: {k: dict(tag) for k, tag in items.items()} for pid, items in partitions.items()}
        self.finish_after = dict(finish_after or {})
        self.cleared: list[str] = []
        self.lists = 0

    def kv_list(self, partition_id=None):
        self.lists += 1
        for uid, n in self.finish_after.items():
            if self.lists == n:
                self.partitions["train"][uid]["status"] = "finished"
                self.partitions["train"][f"{uid}_0_0"] = {"status": "finished"}
        return {pid: {k: dict(tag) for k, tag in items.items()} for pid, items in self.partitions.items()}

    def kv_clear(self, partition_id, keys):
        self.cleared += [k for k in keys if "_" not in k]  # the prompt uids (trajectory keys are uid_session_index)
        for key in keys:
            self.partitions[partition_id].pop(key, None)

    def kv_batch_get(self, keys, partition_id, select_fields):
        return {"responses": torch.tensor([[sum(map(ord, key))] for key in keys])}

    def install(self, monkeypatch):
        for name in ("kv_list", "kv_clear", "kv_batch_get"):
            monkeypatch.setattr(tq, name, getattr(self, name))


def prompt(status: str, step: int) -> dict:
    return {"is_prompt": True, "status": status, "global_steps": step}


def group(uid: str, status: str, step: int, samples: int = 2) -> dict:
    """A prompt and its ``samples`` trajectories (none for a failed group: it produced no trajectory)."""
    items = {uid: prompt(status, step)}
    if status == "finished":
        items.update({f"{uid}_{i}_0": {"status": "finished"} for i in range(samples)})
    return items


# step 5, threshold 2: uidA (submitted at step 1) is stale, uidF failed, uidB and uidC are fresh
STALE_AND_FAILED = {"train": {**group("uidA", "finished", 1), **group("uidF", "failure", 4),
                              **group("uidB", "finished", 4), **group("uidC", "finished", 5)}}
# step 5, threshold 2, strategy wait: uidW (submitted at step 3) is still running and must be awaited
AWAITED = {"train": {"uidW": prompt("running", 3), **group("uidB", "finished", 4), **group("uidC", "finished", 5)}}


def config(mode: str, custom: bool, strategy: str = "drop"):
    """What ``_build_replay_buffer`` reads, as verl's config holds it (``trainer.v1.sampler`` et al.)."""
    sampler = {"path": SAMPLER_PATH, "name": SAMPLER_NAME} if custom else {"path": None, "name": None}
    return OmegaConf.create({
        "trainer": {"v1": {"trainer_mode": mode, "sync": {}, "colocate_async": {"num_warmup_batches": 1},
                           "separate_async": {"num_warmup_batches": 1, "parameter_sync_step": 1},
                           "sampler": {"max_off_policy_threshold": 2, "max_off_policy_strategy": strategy,
                                       "sync_refill_failed_groups": False, "custom_sampler": sampler,
                                       "sampler_kwargs": {"poll_interval": 0.001}}}},
        "algorithm": {"filter_groups": {"enable": False}},
        "data": {"train_batch_size": 2, "gen_batch_size": None},
    })


def build(mode: str, custom: bool, strategy: str = "drop"):
    """The buffer verl's ``PPOTrainer._build_replay_buffer`` builds, and the list its refill calls land in."""
    refills: list[int] = []
    trainer = types.SimpleNamespace(config=config(mode, custom, strategy), trainer_mode=mode,
                                    _add_prompts_to_generate=refills.append)
    trainer._resolve_filter_groups_metric = types.MethodType(PPOTrainer._resolve_filter_groups_metric, trainer)
    return PPOTrainer._build_replay_buffer(trainer), refills


def sample(buffer, store: dict, monkeypatch, batch_size: int = 2, **fake):
    """Sample ``batch_size`` groups at step 5 from ``store``: (the uids of the batch's trajectories, metrics,
    the uids cleared from TransferQueue without a trajectory in the batch: evicted, or selected without any)."""
    queue = FakeTransferQueue(store, **fake)
    queue.install(monkeypatch)
    batch, metrics = buffer.sample(global_steps=5, partition_id="train", batch_size=batch_size)
    selected = {key.split("_")[0] for key in batch.keys}
    return selected, metrics, set(queue.cleared) - selected


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch):
    monkeypatch.setattr(verl_replay_buffer.time, "sleep", lambda seconds: None)  # verl's own polls every 2 s


@pytest.mark.parametrize("mode", ASYNC_MODES)
def test_an_async_mode_evicts_stale_and_failed_groups_as_verls_async_buffer(mode, monkeypatch):
    ours, our_refills = build(mode, custom=True)
    verls, verl_refills = build(mode, custom=False)
    assert type(verls) is ReplayBufferAsync
    assert isinstance(ours, ReplayBufferAsync) and isinstance(ours, PollingReplayBuffer)
    assert ours.poll_interval == 0.001 and hasattr(ours, "wait_for_sampleable")  # separate_async's hybrid switch

    expected = sample(verls, STALE_AND_FAILED, monkeypatch)
    assert expected[2] == {"uidA", "uidF"} and expected[0] == {"uidB", "uidC"}  # what verl does
    assert expected[1]["training/off_policy/evicted_samples"] == 1
    assert sample(ours, STALE_AND_FAILED, monkeypatch) == expected  # selected, metrics, evicted
    assert our_refills == verl_refills == [2]


@pytest.mark.parametrize("mode", ASYNC_MODES)
def test_an_async_mode_waits_for_a_prompt_at_the_bound_as_verls_async_buffer(mode, monkeypatch):
    ours, _ = build(mode, custom=True, strategy="wait")
    verls, _ = build(mode, custom=False, strategy="wait")
    expected = sample(verls, AWAITED, monkeypatch, finish_after={"uidW": 3})
    assert expected[0] == {"uidW", "uidB"}  # the awaited prompt is trained, with the older fresh one
    assert sample(ours, AWAITED, monkeypatch, finish_after={"uidW": 3}) == expected


def test_the_sync_mode_is_verls_sync_buffer_as_before(monkeypatch):
    ours, our_refills = build("sync", custom=True)
    verls, verl_refills = build("sync", custom=False)
    assert type(verls) is ReplayBuffer and type(ours) is PollingReplayBuffer
    assert not isinstance(ours, ReplayBufferAsync)
    expected = sample(verls, STALE_AND_FAILED, monkeypatch, batch_size=4)
    # sync: no staleness; the failed group is selected (no trajectory: padded downstream), not evicted and replaced
    assert expected == ({"uidA", "uidB", "uidC"}, {}, {"uidF"})
    assert sample(ours, STALE_AND_FAILED, monkeypatch, batch_size=4) == expected
    assert our_refills == verl_refills == []


# ----------------------------------------------------------------------------- the preflight


def test_only_the_mode_following_name_of_verl_cpus_sampler_is_accepted():
    problems = check_sampler(compose("trainer.v1.sampler.custom_sampler.name=PollingReplayBufferAsync"))
    assert problems == [
        "trainer.v1.sampler.custom_sampler.name=PollingReplayBufferAsync: pkg://verl_cpu.replay_buffer is used as "
        "PollingReplayBuffer, which builds verl's sync or async replay buffer for trainer.v1.trainer_mode; set "
        "trainer.v1.sampler.custom_sampler.name=PollingReplayBuffer"]
    for mode in ("sync", "colocate_async"):
        assert check_sampler(compose(f"trainer.v1.trainer_mode={mode}")) == []


def test_sync_refill_failed_groups_is_refused_in_sync_mode_with_a_way_on_that_works():
    problems = check_sampler(compose("trainer.v1.sampler.sync_refill_failed_groups=true"))
    assert len(problems) == 1 and problems[0].startswith("trainer.v1.sampler.sync_refill_failed_groups=true: verl "
                                                         "does not pass it to a custom sampler")
    for way_on in advised_overrides(problems[0]):
        assert check_sampler(compose("trainer.v1.sampler.sync_refill_failed_groups=true", way_on)) == [], way_on
    # the async buffers replace failed groups anyway (verl's ReplayBufferAsync does, whatever the flag)
    assert check_sampler(compose("trainer.v1.sampler.sync_refill_failed_groups=true",
                                 "trainer.v1.trainer_mode=colocate_async")) == []


def test_the_dapo_filter_refusal_names_ways_on_that_work():
    problems = check_sampler(compose("algorithm.filter_groups.enable=true"))
    assert len(problems) == 1
    ways = advised_overrides(problems[0])
    assert ways == ["trainer.v1.sampler.custom_sampler.path=null", "algorithm.filter_groups.enable=false"]
    for way_on in ways:
        assert check_sampler(compose("algorithm.filter_groups.enable=true", way_on)) == [], way_on


def advised_overrides(problem: str) -> list[str]:
    """The Hydra overrides a problem advises ("set key=value")."""
    return re.findall(r"\bset (\+?[A-Za-z_][\w.]*=[^\s,;()]+)", problem)


# each: the overrides that cause one problem, and the check that reports it
BAD_SETTINGS = [
    (("actor_rollout_ref.rollout.name=vllm",), check_vllm_settings, "enable_sleep_mode"),
    (("actor_rollout_ref.rollout.name=vllm", "+actor_rollout_ref.rollout.enable_sleep_mode=true"),
     check_vllm_settings, "enable_sleep_mode"),
    (("actor_rollout_ref.rollout.name=vllm", "actor_rollout_ref.rollout.full_determinism=true"),
     check_vllm_settings, "full_determinism"),
    (("actor_rollout_ref.rollout.name=vllm",), check_vllm_settings, "VLLM_CPU_KVCACHE_SPACE"),
    (("actor_rollout_ref.rollout.name=vllm", "+ray_kwargs.ray_init.runtime_env.env_vars.VLLM_CPU_KVCACHE_SPACE=lots"),
     check_vllm_settings, "VLLM_CPU_KVCACHE_SPACE"),
    (("actor_rollout_ref.rollout.name=vllm",), check_vllm_settings, "head size"),
    (("actor_rollout_ref.rollout.name=vllm",
      "actor_rollout_ref.rollout.checkpoint_engine.update_weights_bucket_megabytes=0"),
     check_vllm_settings, "update_weights_bucket_megabytes"),
    (("actor_rollout_ref.rollout.name=sglang",), check_device_settings, "rollout.name"),
    (("actor_rollout_ref.rollout.tensor_model_parallel_size=2",), check_device_settings, "tensor_model_parallel_size"),
    (("trainer.device=cuda",), check_device_settings, "trainer.device"),
    (("actor_rollout_ref.actor.strategy=fsdp",), check_device_settings, "actor.strategy"),
    (("actor_rollout_ref.model.override_config.attn_implementation=flash_attention_2",),
     check_device_settings, "attention"),
    (("~ray_kwargs.ray_init.num_gpus",), check_ray_resources, "num_gpus"),
    (("ray_kwargs.ray_init.num_gpus=0",), check_ray_resources, "num_gpus"),
    (("ray_kwargs.ray_init.num_cpus=1",), check_ray_resources, "num_cpus"),
]


@pytest.mark.parametrize("bad, check, topic", BAD_SETTINGS, ids=[f"{t}-{i}" for i, (_, _, t) in enumerate(BAD_SETTINGS)])
def test_every_override_the_preflight_advises_composes_and_clears_its_problem(bad, check, topic, monkeypatch):
    """Followed on the command line (Hydra: ``+`` for a key verl's config lacks, none for one it has), each
    advised override composes with the recipe and the problem it was advised for is gone."""
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    problems = [p for p in check(compose(*bad)) if topic in p]
    assert len(problems) == 1, problems
    ways = advised_overrides(problems[0])
    assert ways, problems[0]
    for way_on in ways:
        after = check(compose(*bad, way_on))  # Hydra raises here if the override cannot be applied
        assert not [p for p in after if topic in p], (way_on, after)
