"""Driver-side checks of a verl config for the CPU backend, run before Ray starts.

A config that cannot work on a CPU otherwise fails minutes later inside a Ray worker
with hundreds of lines of stack trace. :func:`check_config` returns a list of problems,
each saying what to change; :func:`run_preflight` prints them and exits.

The plugin runs these checks before ``ray.init`` for every trainer with
``VERL_PLATFORM=cpu``: from verl's own ``validate_config`` for ``verl.trainer.main_ppo``
(which calls it in the driver), and from ``run_ppo`` for verl's off-policy trainers
(one-step-off-policy calls ``validate_config`` only inside its Ray task runner, fully-async
never), which are told apart by their task runner class (:data:`TASK_RUNNERS`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import DictConfig, OmegaConf

from verl_cpu import ROLLOUT_NAME

VLLM = "vllm"  # verl's own vLLM server on vLLM's CPU build (verl_cpu.vllm_rollout)
CPU_ROLLOUTS = (ROLLOUT_NAME, VLLM)
GPU_ROLLOUTS = ("sglang", "trtllm")
# vLLM 0.27.1's CPU attention (vllm/v1/attention/backends/cpu_attn.py, CPUAttentionBackend.get_supported_head_sizes)
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
KV_CACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"  # GiB of KV cache vLLM's CPU worker allocates (an integer)
MAIN_PPO, ONE_STEP_OFF, FULLY_ASYNC = "main_ppo", "one_step_off", "fully_async"
TASK_RUNNERS = {"OneStepTaskRunner": ONE_STEP_OFF, "FullyAsyncTaskRunner": FULLY_ASYNC}  # run_ppo's runner -> trainer
SEPARATED = (ONE_STEP_OFF, FULLY_ASYNC)  # trainers with a separate (standalone) rollout pool
V1_MODES = ("sync", "colocate_async", "separate_async")  # verl's V1 trainer modes that run here
V1_SEPARATE = "separate_async"  # the V1 mode with a separate rollout pool (object_store sync), the others naive
CPU_ENGINE = "object_store"
CPU_ENGINE_MODULE = "verl_cpu.checkpoint_engine"
# logical Ray CPUs verl's actors reserve besides the workers: task runner(s), trainer, rollouter, message queue
RUNNER_CPUS = {MAIN_PPO: 0, ONE_STEP_OFF: 10, FULLY_ASYNC: 1 + 10 + 10 + 2}
CPU_ATTENTION = ("sdpa", "eager")
REQUIRED_COLUMNS_HELP = (
    "verl's RL schema: a chat-message list column (data.prompt_key, default 'prompt'), a data-source column "
    "(data.reward_fn_key, default 'data_source') and a 'reward_model' struct with a 'ground_truth' field"
)


class PreflightError(SystemExit):
    """Raised (as a SystemExit, so no stack trace is printed) when the config cannot run on CPU."""


def _get(config: DictConfig, key: str, default: Any = None) -> Any:
    try:
        value = OmegaConf.select(config, key, default=default, throw_on_missing=False)
    except Exception:  # unresolvable interpolation: leave it to verl
        return default
    return default if value is None else value


_ABSENT = object()


def override(config: DictConfig, key: str, value: Any) -> str:
    """The command-line override that sets ``key`` to ``value`` in this composed config: ``key=value`` where
    the key is in it, ``+key=value`` where it is not (Hydra refuses a new key without ``+``, and an existing
    one with it). In a YAML, either is set plainly."""
    try:
        present = OmegaConf.select(config, key, default=_ABSENT, throw_on_missing=False) is not _ABSENT
    except Exception:  # unresolvable interpolation on the way: the key is there
        present = True
    return f"{'' if present else '+'}{key}={value}"


# ----------------------------------------------------------------------------- device settings


def check_device_settings(config: DictConfig) -> list[str]:
    """Settings that only work with a CUDA/NPU device."""
    problems = []
    if _get(config, "trainer.device") != "cpu":
        device = _get(config, "trainer.device")
        problems.append(f"trainer.device={device}: set {override(config, 'trainer.device', 'cpu')}")
    actor_strategy = _get(config, "actor_rollout_ref.actor.strategy")
    for key in ("actor_rollout_ref.actor.strategy", "actor_rollout_ref.ref.strategy"):
        strategy = _get(config, key)
        if key.endswith("ref.strategy") and strategy == actor_strategy:
            continue  # verl's default interpolates the actor's: one message is enough
        if strategy is not None and strategy != "fsdp2":
            problems.append(
                f"{key}={strategy}: set {override(config, key, 'fsdp2')} on CPU (FSDP1's sync_module_states needs a GPU; "
                "megatron/veomni/torchtitan are not set up for CPU)"
            )
    if _get(config, "critic.enable") and _get(config, "critic.strategy") not in (None, "fsdp2"):
        problems.append(f"critic.strategy={_get(config, 'critic.strategy')}: "
                        f"set {override(config, 'critic.strategy', 'fsdp2')} on CPU")
    rollout = _get(config, "actor_rollout_ref.rollout.name")
    if rollout not in CPU_ROLLOUTS:
        why = "needs a GPU" if rollout in GPU_ROLLOUTS else "is not a CPU rollout backend"
        problems.append(
            f"actor_rollout_ref.rollout.name={rollout} {why}: "
            f"set {override(config, 'actor_rollout_ref.rollout.name', ROLLOUT_NAME)} "
            f"(the HF-transformers rollout server of verl_cpu) or {VLLM} (verl's vLLM server on vLLM's CPU build)"
        )
    for key in ("tensor_model_parallel_size", "data_parallel_size", "pipeline_model_parallel_size"):
        value = _get(config, f"actor_rollout_ref.rollout.{key}", 1)
        if value != 1:
            problems.append(f"actor_rollout_ref.rollout.{key}={value}: the {rollout} rollout on CPU needs 1; "
                            f"set {override(config, f'actor_rollout_ref.rollout.{key}', 1)}")
    attn = _get(config, "actor_rollout_ref.model.override_config.attn_implementation", "flash_attention_2")
    if attn not in CPU_ATTENTION:
        problems.append(
            f"attention '{attn}' needs a GPU: set "
            f"{override(config, 'actor_rollout_ref.model.override_config.attn_implementation', 'sdpa')}"
        )
    if _get(config, "reward.reward_model.enable", False):
        problems.append("reward.reward_model.enable=true needs a model-serving rollout: use a rule/custom reward on CPU")
    return problems


def check_vllm_settings(config: DictConfig) -> list[str]:
    """``rollout.name=vllm``: vLLM's CPU build installed (P1), and the settings it needs on CPU (P3).

    Each of these otherwise fails minutes later in the rollout server: vLLM refuses sleep mode on
    CPU, its CPU attention refuses other head sizes, without ``VLLM_CPU_KVCACHE_SPACE`` it sizes
    its KV cache from ``gpu_memory_utilization`` x the machine's memory (verl's 0.5: 11 GiB of 24),
    and verl's shared-memory weight sync asserts on a tensor larger than its bucket.
    """
    if _get(config, "actor_rollout_ref.rollout.name") != VLLM:
        return []
    from verl_cpu.vllm_rollout import installed_problem

    rollout = "actor_rollout_ref.rollout"
    problems = [p for p in (installed_problem(),) if p]
    if _get(config, f"{rollout}.enable_sleep_mode", True):
        problems.append(f"{rollout}.enable_sleep_mode=true: vLLM has no sleep mode on CPU; set "
                        f"{override(config, f'{rollout}.enable_sleep_mode', 'false')} (verl's RolloutConfig field, "
                        "not in its rollout.yaml: a YAML sets enable_sleep_mode: false under actor_rollout_ref.rollout)")
    if _get(config, f"{rollout}.full_determinism", False):
        problems.append(
            f"{rollout}.full_determinism=true: verl then sets VLLM_BATCH_INVARIANT=1, whose kernels are Triton's and do "
            "not run on CPU (vLLM's engine dies at its first forward); "
            f"set {override(config, f'{rollout}.full_determinism', 'false')} "
            "(a reproducible CPU run: rollout.name=hf)")
    problems += check_vllm_kv_cache(config)
    model = _model_config(config)
    if model:
        head_size = model.get("head_dim") or model["hidden_size"] // model["num_attention_heads"]
        if head_size not in VLLM_CPU_HEAD_SIZES:
            problems.append(
                f"actor_rollout_ref.model.path={_get(config, 'actor_rollout_ref.model.path')}: head size {head_size} "
                f"(hidden_size {model['hidden_size']} / num_attention_heads {model['num_attention_heads']}); vLLM's CPU "
                f"attention takes {', '.join(map(str, VLLM_CPU_HEAD_SIZES))}: use such a model (the lab's tasks: "
                "python -m hmpo_verl.lab.cpu_demo --rollout vllm builds one) or "
                f"set {override(config, f'{rollout}.name', ROLLOUT_NAME)}"
            )
    bucket_mb = _get(config, f"{rollout}.checkpoint_engine.update_weights_bucket_megabytes", 2048)
    largest = _largest_tensor_bytes(config)
    if largest is not None and bucket_mb * 2**20 < largest:
        problems.append(
            f"{rollout}.checkpoint_engine.update_weights_bucket_megabytes={bucket_mb}: the model's largest tensor takes "
            f"{largest / 2**20:.1f} MB in fp32 and verl's shared-memory weight sync to vLLM needs it in one bucket; set "
            f"{override(config, f'{rollout}.checkpoint_engine.update_weights_bucket_megabytes', -(-largest // 2**20))}"
            " or more"
        )
    return problems


def check_vllm_kv_cache(config: DictConfig) -> list[str]:
    """``VLLM_CPU_KVCACHE_SPACE`` (GiB, an integer) is set, in the driver's environment or Ray's runtime env,
    to at least 1 and at most half of the memory available now (the machine may be shared)."""
    import psutil

    key = f"ray_kwargs.ray_init.runtime_env.env_vars.{KV_CACHE_ENV}"
    runtime_env = _get(config, key)
    value = runtime_env if runtime_env is not None else os.environ.get(KV_CACHE_ENV)
    limit = psutil.virtual_memory().available // 2**31  # half of the available memory, in GiB
    fix = f"set {override(config, key, 1)} (GiB; cpu_demo --rollout vllm sets it)"
    if runtime_env is None:  # the driver's environment counts only where Ray's runtime env does not set it
        fix += f", or export {KV_CACHE_ENV}=1 before the launch"
    if value is None or str(value).strip() == "":
        return [f"{KV_CACHE_ENV} is not set: vLLM's CPU worker would size its KV cache from "
                f"actor_rollout_ref.rollout.gpu_memory_utilization x the machine's memory; {fix}"]
    try:
        gib = int(str(value))
    except ValueError:
        return [f"{KV_CACHE_ENV}={value}: vLLM reads an integer number of GiB; {fix}"]
    if not 1 <= gib <= max(1, limit):
        return [f"{KV_CACHE_ENV}={value}: allowed 1 to {max(1, limit)} GiB (half of the memory available now); {fix}"]
    return []


def _model_config(config: DictConfig) -> Optional[dict]:
    """The model's ``config.json`` (None when missing or remote: :func:`check_model` reports it)."""
    import json

    path = _get(config, "actor_rollout_ref.model.path")
    if path is None or _is_remote(str(path)):
        return None
    file = Path(os.path.expanduser(str(path))) / "config.json"
    return json.loads(file.read_text()) if file.is_file() else None


def _largest_tensor_bytes(config: DictConfig) -> Optional[int]:
    """Bytes of the model's largest tensor in fp32 (verl's actor sends fp32), read from its safetensors headers."""
    import json
    import math
    import struct

    path = _get(config, "actor_rollout_ref.model.path")
    if path is None or _is_remote(str(path)):
        return None
    largest = None
    for file in Path(os.path.expanduser(str(path))).glob("*.safetensors"):
        with open(file, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        sizes = [math.prod(v["shape"]) * 4 for k, v in header.items() if k != "__metadata__"]
        largest = max([largest or 0, *sizes])
    return largest


def _v1_separate(config: DictConfig, trainer: str) -> bool:
    return trainer == MAIN_PPO and _get(config, "trainer.v1.trainer_mode", "sync") == V1_SEPARATE


def _pool_keys(config: DictConfig, trainer: str) -> tuple[str, str]:
    """Where the separate rollout pool's size is set: V1 reads actor_rollout_ref.rollout, the experimental
    trainers their top-level rollout section."""
    prefix = "actor_rollout_ref.rollout" if _v1_separate(config, trainer) else "rollout"
    return f"{prefix}.nnodes", f"{prefix}.n_gpus_per_node"


def check_separate_pool(config: DictConfig, trainer: str) -> list[str]:
    """A trainer with a separate rollout pool: verl_cpu's ``object_store`` sync, hybrid_engine=false, a pool size."""
    problems = []
    engine = "actor_rollout_ref.rollout.checkpoint_engine"
    backend = _get(config, f"{engine}.backend", "naive")
    if backend != CPU_ENGINE:
        why = "needs CUDA (cupy, NCCL)" if backend in ("nccl", "nixl", "hccl") else "cannot sync a separate rollout pool on CPU"
        problems.append(
            f"{engine}.backend={backend} {why}: set {engine}.backend={CPU_ENGINE} and "
            f"{engine}.custom_backend_module={CPU_ENGINE_MODULE} (verl_cpu's object-store engine)"
        )
    elif _get(config, f"{engine}.custom_backend_module") != CPU_ENGINE_MODULE:
        problems.append(f"{engine}.backend={CPU_ENGINE} is registered by {engine}.custom_backend_module={CPU_ENGINE_MODULE}")
    name = "V1 separate_async" if _v1_separate(config, trainer) else trainer
    if _get(config, "actor_rollout_ref.hybrid_engine", True):
        problems.append(f"actor_rollout_ref.hybrid_engine=true: the {name} trainer needs hybrid_engine=false here "
                        "(its rollout is a separate pool; no colocated replicas on CPU)")
    for key in _pool_keys(config, trainer):
        if not isinstance(_get(config, key), int) or _get(config, key) < 1:
            problems.append(f"{key}={_get(config, key)}: the separate rollout pool needs at least 1 (logical GPU slots)")
    return problems


def check_trainer_settings(config: DictConfig, trainer: str = MAIN_PPO) -> list[str]:
    """The trainer and its weight sync: verl's V1 trainer (``sync`` or ``colocate_async``) with the
    colocated ``naive`` sync, or a trainer with a separate rollout pool (V1 ``separate_async``, the
    off-policy trainers) with verl_cpu's ``object_store`` checkpoint engine."""
    problems = []
    engine = "actor_rollout_ref.rollout.checkpoint_engine"
    backend = _get(config, f"{engine}.backend", "naive")
    if trainer == MAIN_PPO:
        mode = _get(config, "trainer.v1.trainer_mode", "sync")
        if mode not in V1_MODES or not _get(config, "trainer.use_v1", True):
            problems.append(
                f"trainer.use_v1={_get(config, 'trainer.use_v1', True)}, trainer.v1.trainer_mode={mode}: with "
                f"verl.trainer.main_ppo the CPU backend runs verl's V1 trainer in mode {', '.join(V1_MODES)}; "
                "or the experimental off-policy trainers: verl.experimental.one_step_off_policy.main_ppo "
                "or verl.experimental.fully_async_policy.fully_async_main, see recipes/cpu_fibonacci/"
            )
        elif mode == V1_SEPARATE:
            problems += check_separate_pool(config, trainer)
            sync_step = _get(config, "trainer.v1.separate_async.parameter_sync_step", 1)
            batch, mini = _get(config, "data.train_batch_size"), _get(config, "actor_rollout_ref.actor.ppo_mini_batch_size")
            if batch != sync_step * mini:
                problems.append(
                    f"data.train_batch_size={batch}: V1 separate_async needs trainer.v1.separate_async."
                    f"parameter_sync_step * actor_rollout_ref.actor.ppo_mini_batch_size = {sync_step} * {mini}")
        elif backend != "naive":
            problems.append(f"{engine}.backend={backend}: use naive (colocated weight sync)")
        return problems
    problems += check_separate_pool(config, trainer)
    if trainer == FULLY_ASYNC:
        if _get(config, "data.train_batch_size") != 0 or _get(config, "data.gen_batch_size") != 1:
            problems.append(
                f"data.train_batch_size={_get(config, 'data.train_batch_size')}, data.gen_batch_size="
                f"{_get(config, 'data.gen_batch_size')}: verl's fully-async rollouter needs 0 and 1 (one prompt at a "
                "time; the trainer takes ppo_mini_batch_size * async_training.require_batches prompts per step)"
            )
        if not _get(config, "actor_rollout_ref.rollout.calculate_log_probs", False):
            problems.append("actor_rollout_ref.rollout.calculate_log_probs=false: the fully-async trainer needs true")
    return problems


def _rollout_gpus(config: DictConfig, trainer: str) -> int:
    if trainer not in SEPARATED and not _v1_separate(config, trainer):
        return 0
    nodes, gpus = _pool_keys(config, trainer)
    return _get(config, nodes, 1) * _get(config, gpus, 1)


def check_ray_resources(config: DictConfig, trainer: str = MAIN_PPO) -> list[str]:
    """Ray must be told about logical GPU slots and enough logical CPUs.

    Not when the driver joins a running cluster (RAY_ADDRESS, e.g. recipes/lib/cluster.sh's): its nodes
    declared their CPUs and GPU slots with `ray start`, and Ray refuses num_cpus / num_gpus from the driver.
    """
    if os.environ.get("RAY_ADDRESS"):
        return []
    problems = []
    trainer_gpus = _get(config, "trainer.nnodes", 1) * _get(config, "trainer.n_gpus_per_node", 1)
    needed_gpus = trainer_gpus + _rollout_gpus(config, trainer)
    num_gpus = _get(config, "ray_kwargs.ray_init.num_gpus")
    if num_gpus is None or num_gpus < needed_gpus:
        nodes, gpus = _pool_keys(config, trainer)
        pool = f" + {nodes}*{gpus.rsplit('.', 1)[1]} (the rollout pool)" if _rollout_gpus(config, trainer) else ""
        problems.append(
            f"ray_kwargs.ray_init.num_gpus={num_gpus}: verl's resource pools ask Ray for "
            f"trainer.nnodes*trainer.n_gpus_per_node{pool}={needed_gpus} GPUs; on CPU give Ray that many logical "
            f"ones: set {override(config, 'ray_kwargs.ray_init.num_gpus', needed_gpus)}"
        )
    storage_units = _get(config, "transfer_queue.backend.SimpleStorage.num_data_storage_units", 8)
    agent_workers = _get(config, "actor_rollout_ref.rollout.agent.num_workers", 8)
    reward_workers = _get(config, "reward.num_workers", 8)
    needed_cpus = storage_units + agent_workers + reward_workers + needed_gpus + RUNNER_CPUS[trainer] + 4
    num_cpus = _get(config, "ray_kwargs.ray_init.num_cpus")
    if num_cpus is None or num_cpus < needed_cpus:
        problems.append(
            f"ray_kwargs.ray_init.num_cpus={num_cpus}: verl's task runners, TransferQueue storage units, agent-loop "
            f"and reward workers each reserve Ray CPUs and the run hangs silently without them; set "
            f"{override(config, 'ray_kwargs.ray_init.num_cpus', max(needed_cpus, 16))} "
            "(logical CPUs, more than the machine has is fine)"
        )
    return problems


def check_policy_loss(config: DictConfig) -> list[str]:
    """The actor's loss_mode is registered (verl's own check runs only at the first update, minutes later)."""
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    loss_mode = _get(config, "actor_rollout_ref.actor.policy_loss.loss_mode", "vanilla")
    try:
        get_policy_loss_fn(loss_mode)
    except ValueError as exc:
        return [f"actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode}: {exc}"]
    return []


def check_sampler(config: DictConfig) -> list[str]:
    """verl_cpu's polling replay buffer: its one name (which follows ``trainer.v1.trainer_mode``), a valid poll
    interval, and none of the settings verl hands only its own buffers: the DAPO group filter, and in ``sync``
    mode the refill of failed groups (``PPOTrainer._build_replay_buffer`` passes both only without a custom
    sampler; the async buffers always replace failed groups)."""
    from verl_cpu.replay_buffer import SAMPLER_NAME, SAMPLER_PATH, poll_interval_of

    sampler = "trainer.v1.sampler"
    if _get(config, f"{sampler}.custom_sampler.path") != SAMPLER_PATH:
        return []
    problems = []
    name = _get(config, f"{sampler}.custom_sampler.name")
    if name != SAMPLER_NAME:
        problems.append(
            f"{sampler}.custom_sampler.name={name}: {SAMPLER_PATH} is used as {SAMPLER_NAME}, which builds verl's sync "
            f"or async replay buffer for trainer.v1.trainer_mode; set {sampler}.custom_sampler.name={SAMPLER_NAME}")
    try:
        poll_interval_of(_get(config, f"{sampler}.sampler_kwargs", {}))
    except ValueError as exc:
        problems.append(str(exc))
    verls_own = (f"set {sampler}.custom_sampler.path=null to use verl's own replay buffer (it polls every 2 s: "
                 "slower rollouts on CPU, same training)")
    if _get(config, "algorithm.filter_groups.enable", False):
        problems.append(
            "algorithm.filter_groups.enable=true: verl does not pass the group filter to a custom sampler "
            f"({SAMPLER_PATH}); {verls_own}, or set algorithm.filter_groups.enable=false")
    sync_mode = _get(config, "trainer.v1.trainer_mode", "sync") == "sync"
    if _get(config, f"{sampler}.sync_refill_failed_groups", False) and sync_mode:
        problems.append(
            f"{sampler}.sync_refill_failed_groups=true: verl does not pass it to a custom sampler ({SAMPLER_PATH}), "
            f"so failed groups would not be replaced; {verls_own}, or set {sampler}.sync_refill_failed_groups=false "
            "(failed groups then stay in the batch, padded, as by verl's default)")
    return problems


# ----------------------------------------------------------------------------- inputs


def _is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def check_model(config: DictConfig) -> list[str]:
    path = _get(config, "actor_rollout_ref.model.path")
    if path is None or _is_remote(str(path)):
        return []
    local = Path(os.path.expanduser(str(path)))
    if not (local / "config.json").is_file():
        return [
            f"actor_rollout_ref.model.path={path}: no Hugging Face model there (no config.json). "
            "There is no model hub on this machine: point it at a local model directory "
            "(for the tiny task: python -m hmpo_verl.lab.cpu_demo --prepare-only)"
        ]
    return []


def _parquet_files(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def check_parquet(path: str, prompt_key: str, reward_fn_key: str, role: str) -> list[str]:
    """The file exists and has the columns verl's RL dataset and naive reward manager read."""
    import pyarrow.parquet as pq

    local = Path(os.path.expanduser(path))
    if _is_remote(path):
        return []
    if not local.is_file():
        return [f"{role}={path}: file not found"]
    try:
        schema = pq.read_schema(local)
    except Exception as exc:  # not a parquet file
        return [f"{role}={path}: cannot read it as parquet ({type(exc).__name__}: {exc})"]
    missing = [c for c in (prompt_key, reward_fn_key, "reward_model") if c not in schema.names]
    if not missing and "ground_truth" not in _struct_fields(schema.field("reward_model").type):
        missing.append("reward_model.ground_truth")
    if missing:
        return [f"{role}={path}: missing column(s) {missing}; found {schema.names}. Expected {REQUIRED_COLUMNS_HELP}"]
    return []


def _struct_fields(arrow_type) -> list[str]:
    try:
        return [arrow_type.field(i).name for i in range(arrow_type.num_fields)]
    except AttributeError:
        return []


def check_data(config: DictConfig) -> list[str]:
    prompt_key = _get(config, "data.prompt_key", "prompt")
    reward_fn_key = _get(config, "data.reward_fn_key", "data_source")
    problems = []
    for role in ("data.train_files", "data.val_files"):
        files = _parquet_files(_get(config, role))
        if not files:
            problems.append(f"{role} is not set")
        for path in files:
            problems.extend(check_parquet(path, prompt_key, reward_fn_key, role))
    return problems


def load_reward_function(path: str, name: str) -> Callable:
    """Load the custom reward function the way verl does (file path or ``pkg://module``)."""
    from verl.utils.import_utils import load_extern_object

    return load_extern_object(module_path=path, object_name=name)


def check_reward_function(config: DictConfig) -> list[str]:
    """The function exists, loads, and scores the first training rows without raising."""
    path = _get(config, "reward.custom_reward_function.path")
    name = _get(config, "reward.custom_reward_function.name", "compute_score")
    if path is None:
        return []
    role = f"reward.custom_reward_function.path={path}"
    if not str(path).startswith("pkg://") and not Path(str(path).removeprefix("file://")).is_file():
        return [f"{role}: file not found"]
    try:
        fn = load_reward_function(str(path), str(name))
    except Exception as exc:
        cause = exc.__cause__ or exc
        return [f"{role}: cannot load '{name}' ({type(cause).__name__}: {cause})"]
    if not callable(fn):
        return [f"{role}: '{name}' is not callable"]
    sample = _first_rows(config)
    kwargs = dict(_get(config, "reward.custom_reward_function.reward_kwargs", {}) or {})
    for row in sample:
        for response in (row["ground_truth"], ""):
            try:
                score = fn(
                    data_source=row["data_source"],
                    solution_str=response,
                    ground_truth=row["ground_truth"],
                    extra_info=row["extra_info"],
                    **kwargs,
                )
            except Exception as exc:
                return [
                    f"{role}: '{name}' raised {type(exc).__name__}: {exc} when scoring the response "
                    f"{response!r} against ground_truth={row['ground_truth']!r} (first training rows). "
                    "Fix the function: every raise inside a reward worker stops the run"
                ]
            value = score.get("score") if isinstance(score, dict) else score
            if not isinstance(value, (int, float)):
                return [f"{role}: '{name}' returned {score!r}; return a number or a dict with a 'score' number"]
    return []


def _first_rows(config: DictConfig, n: int = 2) -> list[dict]:
    import pyarrow.parquet as pq

    files = _parquet_files(_get(config, "data.train_files"))
    reward_fn_key = _get(config, "data.reward_fn_key", "data_source")
    try:
        table = pq.read_table(files[0]).slice(0, n).to_pylist()
    except Exception:  # reported by check_data
        return []
    return [
        {
            "data_source": row.get(reward_fn_key),
            "ground_truth": (row.get("reward_model") or {}).get("ground_truth"),
            "extra_info": row.get("extra_info") or {},
        }
        for row in table
    ]


# ----------------------------------------------------------------------------- entry points

CHECKS = (
    check_device_settings,
    check_vllm_settings,
    check_trainer_settings,
    check_ray_resources,
    check_policy_loss,
    check_sampler,
    check_model,
    check_data,
    check_reward_function,
)


TRAINER_CHECKS = (check_trainer_settings, check_ray_resources)  # these also depend on the trainer


def check_config(config: DictConfig, trainer: str = MAIN_PPO) -> list[str]:
    """All problems found in ``config`` for ``trainer`` (:data:`TASK_RUNNERS`; empty when it can run on CPU)."""
    return [p for check in CHECKS for p in (check(config, trainer) if check in TRAINER_CHECKS else check(config))]


def format_problems(problems: list[str]) -> str:
    lines = ["", "verl_cpu: this config cannot run on the CPU backend (VERL_PLATFORM=cpu):"]
    lines += [f"  - {p}" for p in problems]
    lines += ["See recipes/cpu_tiny/hmpo.yaml (or recipes/cpu_fibonacci/*.yaml) for a config that runs on CPU.", ""]
    return "\n".join(lines)


def run_preflight(config: DictConfig, stream=None, trainer: str = MAIN_PPO) -> None:
    """Print every problem and exit with status 2, or return silently when there are none."""
    problems = check_config(config, trainer)
    if problems:
        print(format_problems(problems), file=stream or sys.stderr, flush=True)
        raise PreflightError(2)


def _in_ray_worker() -> bool:
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def wrap_validate_config(original: Callable) -> Callable:
    """verl's ``validate_config``, preceded by :func:`run_preflight` in the driver (``main_ppo``).

    Inside a Ray actor (one-step-off-policy's task runner calls it there) the driver's
    ``run_ppo`` check has already run, for that trainer.
    """
    import functools

    @functools.wraps(original)
    def validate_config(config: DictConfig, *args, **kwargs) -> Optional[Any]:
        if not _in_ray_worker():
            run_preflight(config)
        return original(config, *args, **kwargs)

    validate_config._verl_cpu_patched = True
    return validate_config


def wrap_run_ppo(original: Callable) -> Callable:
    """verl's ``run_ppo(config, task_runner_class)``, preceded by :func:`run_preflight` for the off-policy
    trainers (``main_ppo`` has already run it from ``validate_config``)."""
    import functools

    @functools.wraps(original)
    def run_ppo(config: DictConfig, task_runner_class, *args, **kwargs):
        metadata = getattr(task_runner_class, "__ray_metadata__", None)  # a Ray actor class keeps its name there
        trainer = TASK_RUNNERS.get(getattr(metadata, "class_name", ""))
        if trainer is not None:
            run_preflight(config, trainer=trainer)
        return original(config, task_runner_class, *args, **kwargs)

    run_ppo._verl_cpu_patched = True
    return run_ppo
