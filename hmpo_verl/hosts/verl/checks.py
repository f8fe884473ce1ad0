"""Our checks of a composed verl trainer config, run in verl's driver before Ray starts.

`check_verl_symbols` imports what the launched trainer will import and checks every verl symbol we
wrap or read (`hmpo_verl.guards.verl_symbols`); `check_options` validates our loss and estimator options
(through the config classes of `hmpo_verl.hosts.verl.config`) and refuses rollout corrections verl would
silently drop, for any loss (`check_bypass_mode`); `check_trl_beside_verl` refuses a TRL that verl's
workers cannot start beside. `driver_checks` runs them all; `hmpo_verl.hosts.verl.registry` runs it in
verl's `validate_config`, and `hmpo_verl.guards.offpolicy` in `run_ppo`, where fully-async skips
`validate_config` (and `python -m verl.trainer.main_ppo` runs its own, unwrapped, `run_ppo`).
"""

from __future__ import annotations

import importlib
import logging
import math
import sys
import weakref
from typing import Optional

logger = logging.getLogger("hmpo_verl")


def check_options(config) -> None:
    """Validate our options in a composed verl trainer config (DictConfig); raise ValueError."""
    from omegaconf import OmegaConf
    from verl.utils.config import omega_conf_to_dataclass

    from hmpo_verl.hosts.verl.config import ADV_ESTIMATORS, LOSS_OPTION_CLASSES, algo_options, loss_options
    from hmpo_verl.hosts.verl.losses import trust_region

    policy_loss = OmegaConf.select(config, "actor_rollout_ref.actor.policy_loss", default=None)
    loss_mode = policy_loss.get("loss_mode", None) if policy_loss is not None else None
    if policy_loss is not None and str(policy_loss.get("_target_", "")).startswith("hmpo_verl"):
        omega_conf_to_dataclass(policy_loss)  # our class: bad or unread options (any loss_mode) raise here
        check_loss_mode_registered(loss_mode)
        if loss_mode not in LOSS_OPTION_CLASSES:  # e.g. verl's yaml default 'vanilla' left under our _target_
            _log_once(config, f"actor_rollout_ref.actor.policy_loss._target_={policy_loss.get('_target_')} with "
                              f"loss_mode={loss_mode!r}: the run trains verl's {loss_mode!r} loss, none of ours "
                              f"(verl's config sets loss_mode; ours are {', '.join(LOSS_OPTION_CLASSES)})")
    if loss_mode in LOSS_OPTION_CLASSES:
        options = loss_options(omega_conf_to_dataclass(policy_loss), loss_mode)
        trust_region(OmegaConf.select(config, "actor_rollout_ref.actor"), options)  # the actor's clip bounds
        if getattr(options, "adapt", None) == "schedule":
            check_schedule_span(config, options)
            check_schedule_resumes(config)
        if getattr(options, "adapt", None) == "reward":
            raise ValueError(
                "actor_rollout_ref.actor.policy_loss.adapt='reward' is not supported on verl's trainer yet: verl "
                "0.9.1's ppo_loss passes a policy loss no rewards, and the batch's reward statistics it needs are not "
                "sent to the actor workers; allowed here: ess, schedule (adapt='reward' runs in PowerMeanGRPOTrainer "
                "and in hmpo_verl.lab's lean loop)")
    check_bypass_mode(OmegaConf.select(config, "algorithm.rollout_correction", default=None), policy_loss)
    algorithm = OmegaConf.select(config, "algorithm", default=None)
    if algorithm is not None and str(algorithm.get("_target_", "")).startswith("hmpo_verl"):
        omega_conf_to_dataclass(algorithm)  # runs PowerMeanAlgoConfig.__post_init__
    elif algorithm is not None and algorithm.get("adv_estimator", None) in ADV_ESTIMATORS:
        algo_options(algorithm, algorithm.adv_estimator)
    check_group_size(config)


def check_group_size(config) -> None:
    """Our estimators with ``rollout.n`` < 2: each prompt's group holds one response, whose advantage is 0 (a
    group's advantages sum to 0), so nothing trains -- refused (verl's ``grpo`` gives a group of one its reward)."""
    from hmpo_verl.hosts.verl.config import ADV_ESTIMATORS

    estimator, n = _setting(config, "algorithm.adv_estimator"), _setting(config, "actor_rollout_ref.rollout.n", 1)
    if estimator in ADV_ESTIMATORS and n < 2 and not _setting(config, "trainer.val_only", False):
        raise ValueError(
            f"algorithm.adv_estimator={estimator!r} with actor_rollout_ref.rollout.n={n}: each prompt's group holds "
            "one response, whose advantage is 0 (a group's advantages sum to 0), so the policy would not train; "
            "allowed: actor_rollout_ref.rollout.n >= 2")


def check_loss_mode_registered(loss_mode: str) -> None:
    """With our config class, a ``loss_mode`` verl has no policy loss for (a misspelt ``hmpoo``) is refused in the
    driver; verl's ``get_policy_loss_fn`` raised it only in the actor workers, once Ray had started. (verl's own
    config class is not checked here: a loss registered by a module only the workers import would be refused.)"""
    from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY

    from hmpo_verl.hosts.verl.config import LOSS_PREFIX

    if loss_mode not in POLICY_LOSS_REGISTRY:
        raise ValueError(f"{LOSS_PREFIX}.loss_mode={loss_mode!r} is invalid; allowed: the "
                         f"policy losses verl has registered: {', '.join(sorted(POLICY_LOSS_REGISTRY))}")


SCHEDULE_STEPS = "actor_rollout_ref.actor.policy_loss.schedule_steps"


MINI_BATCH = "actor_rollout_ref.actor.ppo_mini_batch_size"


def _setting(config, key: str, default=None):
    """``key`` of the composed config; ``default`` where it is absent or null."""
    from omegaconf import OmegaConf

    value = OmegaConf.select(config, key, default=default)
    return default if value is None else value


def v1_mode(config) -> Optional[str]:
    """verl's V1 ``trainer.v1.trainer_mode`` (sync, colocate_async, separate_async); None without V1
    (``trainer.use_v1=false``)."""
    return _setting(config, "trainer.v1.trainer_mode", "sync") if _setting(config, "trainer.use_v1", True) else None


def v1_parameter_sync_step(config) -> int:
    """The updates per training step of verl 0.9.1's V1 trainer: ``trainer.v1.<trainer_mode>.parameter_sync_step``,
    1 where the mode's section has none (``PPOTrainer.__init__``) or without V1 (``trainer.use_v1=false``)."""
    mode = v1_mode(config)
    return 1 if mode is None else _setting(config, f"trainer.v1.{mode}.parameter_sync_step", 1)


def check_v1_batch(config) -> None:
    """Refuse before Ray what verl's V1 trainers assert after it starts: ``data.train_batch_size`` a multiple of
    ``parameter_sync_step`` (``PPOTrainer.step`` splits each step's prompts into that many updates) and, in
    ``separate_async``, equal to ``parameter_sync_step`` x ``ppo_mini_batch_size`` (``PPOTrainerSeparateAsync``)."""
    sync_step, mode = v1_parameter_sync_step(config), v1_mode(config)
    batch, mini = _setting(config, "data.train_batch_size"), _setting(config, MINI_BATCH)
    if batch is None or mode is None:
        return
    key = f"trainer.v1.{mode}.parameter_sync_step"
    if batch % sync_step:
        raise ValueError(
            f"data.train_batch_size={batch} is not a multiple of {key}={sync_step}: verl's V1 trainer splits each "
            f"step's prompts into {sync_step} updates (its PPOTrainer.step asserts it once Ray has started). Set "
            f"data.train_batch_size to a multiple of {sync_step}, or {key} to a divisor of {batch}")
    if mode == "separate_async" and mini is not None and batch != sync_step * mini:
        fix = f" or {key}={batch // mini}" if batch % mini == 0 else ""
        raise ValueError(
            f"data.train_batch_size={batch} must equal {key}={sync_step} x actor_rollout_ref.actor."
            f"ppo_mini_batch_size={mini} in separate_async (one mini-batch per update: verl's "
            f"PPOTrainerSeparateAsync asserts it once Ray has started). Set data.train_batch_size={sync_step * mini}"
            f"{fix}")


ROLLOUT = "actor_rollout_ref.rollout"


def rollout_pools(config) -> list[tuple[int, int, str]]:
    """The GPU pools verl 0.9.1 starts rollout replicas on, each (GPUs, per node, the keys that set them); none
    where this check does not know the layout (a disaggregated rollout).

    ``LLMServerManager`` (``verl/workers/rollout/llm_server.py``) splits a pool into ``GPUs // W`` replicas of
    ``W = tensor x data x pipeline parallel size`` GPUs each. The pools: a separate rollout pool where the trainer
    has one -- one-step-off and fully-async's top-level ``rollout.nnodes x rollout.n_gpus_per_node`` (their
    entry points copy them into ``actor_rollout_ref.rollout``), V1 ``separate_async``'s
    ``actor_rollout_ref.rollout.nnodes x n_gpus_per_node``, which with ``actor_rollout_ref.hybrid_engine`` (verl's
    default, ``PPOTrainer._setup``) also starts hybrid replicas on the actor's workers -- else the actor's workers
    (hybrid: ``trainer.nnodes x trainer.n_gpus_per_node``), of which replica ``r`` takes workers ``[r W, (r + 1) W)``.
    """
    if _setting(config, f"{ROLLOUT}.disaggregation.enabled", False):
        return []
    nodes, per_node = _setting(config, "trainer.nnodes", 1), _setting(config, "trainer.n_gpus_per_node", 8)
    trainer = (nodes * per_node, per_node, f"trainer.nnodes={nodes} x trainer.n_gpus_per_node={per_node}")
    section = {None: None, "V1 separate_async": ROLLOUT}.get(separate_pool_trainer(config), "rollout")
    nodes = _setting(config, f"{section}.nnodes") if section else None
    if not nodes:  # no separate pool (fully-async's rollout.nnodes=0: hybrid replicas only)
        return [trainer]
    per_node = _setting(config, f"{section}.n_gpus_per_node", 8)
    pool = (nodes * per_node, per_node, f"{section}.nnodes={nodes} x {section}.n_gpus_per_node={per_node}")
    hybrid = section == ROLLOUT and _setting(config, "actor_rollout_ref.hybrid_engine", True)
    return [pool, trainer] if hybrid else [pool]


def check_rollout_replicas(config) -> None:
    """Refuse before Ray a rollout whose replica size ``W`` (tensor x data x pipeline parallel size) does not
    divide each of its pools (:func:`rollout_pools`): verl starts ``GPUs // W`` replicas and says nothing of the rest --
    ``GPUs % W`` GPUs idle, or none at all where ``W > GPUs`` (verl's default tensor_model_parallel_size is 2, so a
    one-GPU node gets no rollout) -- and asserts a replica spanning nodes unevenly only once Ray has started."""
    sizes = {key: _setting(config, f"{ROLLOUT}.{key}", 1)
             for key in ("tensor_model_parallel_size", "data_parallel_size", "pipeline_model_parallel_size")}
    pools = rollout_pools(config)
    for gpus, per_node, pool_keys in pools:
        _check_replicas_fit(sizes, gpus, per_node, pool_keys, sole=len(pools) == 1)


def _check_replicas_fit(sizes: dict, gpus: int, per_node: int, pool_keys: str, sole: bool) -> None:
    """One pool of ``gpus`` (``per_node`` a node, set by ``pool_keys``) for replicas of the parallel ``sizes``;
    ``sole``: the rollout's only pool (with none there, nothing generates)."""
    replica = math.prod(sizes.values())
    if gpus <= 0 or replica <= 0:
        return  # verl's own config checks name a non-positive size
    named = " x ".join(f"{ROLLOUT}.{key}={value}" for key, value in sizes.items())
    divisors = [d for d in range(1, gpus + 1) if gpus % d == 0]
    fix = (f"Set {ROLLOUT}.tensor_model_parallel_size (x data_parallel_size x pipeline_model_parallel_size) to a "
           f"divisor of {gpus}: {', '.join(map(str, divisors))}")
    if gpus % replica:
        what = (f"verl starts {gpus // replica} replica(s) and leaves {gpus % replica} GPU(s) without a rollout server"
                if gpus > replica else "verl starts no rollout replica" + (", so nothing generates" if sole else
                                                                              " there and leaves them idle"))
        raise ValueError(f"{named} = {replica} GPUs per rollout replica does not divide the rollout's {gpus} GPUs "
                         f"({pool_keys}): {what}. {fix}")
    if replica > per_node and replica % per_node:
        raise ValueError(f"{named} = {replica} GPUs per rollout replica spans nodes of {per_node} GPUs unevenly "
                         f"({pool_keys}): verl's RolloutReplica asserts it once Ray has started. Use a replica size "
                         f"that is a multiple of {per_node} or at most {per_node}")


def separate_pool_trainer(config) -> Optional[str]:
    """The name of the trainer whose rollout is a pool of its own -- V1 separate_async, one-step-off (a top-level
    ``rollout`` section without ``async_training``), fully-async (``async_training``) -- or None."""
    if _setting(config, "async_training") is not None:
        return "fully-async"
    if _setting(config, "rollout.nnodes") is not None:
        return "one-step-off"
    if v1_mode(config) == "separate_async":
        return "V1 separate_async"
    return None


def check_weight_sync(config) -> None:
    """Refuse before Ray the weight sync a separate rollout pool cannot use: verl's ``naive`` checkpoint engine
    (weights handed over inside a colocated worker) -- ``PPOTrainerSeparateAsync`` asserts it once Ray has started,
    one-step-off and fully-async have no check and their actor would call a rollout it does not hold at the first
    sync -- and one-step-off or fully-async with ``actor_rollout_ref.hybrid_engine`` (their trainers assert it off
    once Ray has started)."""
    trainer = separate_pool_trainer(config)
    if trainer is None:
        return
    key = f"{ROLLOUT}.checkpoint_engine.backend"
    if _setting(config, key) == "naive":
        raise ValueError(f"{key}='naive' with verl's {trainer} trainer: the naive engine hands weights over inside a "
                         "colocated worker, and this trainer's rollout is a pool of its own; allowed: a backend that "
                         "sends them between pools (nccl, nixl, mooncake, ...; recipes/split/ sets one)")
    if trainer != "V1 separate_async" and _setting(config, "actor_rollout_ref.hybrid_engine", True):
        raise ValueError(f"actor_rollout_ref.hybrid_engine=true with verl's {trainer} trainer, which runs its rollout "
                         "on a pool of its own (its trainer asserts it off once Ray has started); allowed: "
                         "actor_rollout_ref.hybrid_engine=false")


# (a per-GPU token budget, the switch under which verl reads it, the role whose engine splits a sequence over GPUs)
TOKEN_BUDGETS = (
    ("actor_rollout_ref.actor.ppo_max_token_len_per_gpu", "actor_rollout_ref.actor.use_dynamic_bsz", "actor"),
    ("actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu", f"{ROLLOUT}.log_prob_use_dynamic_bsz", "actor"),
    ("actor_rollout_ref.ref.log_prob_max_token_len_per_gpu", "actor_rollout_ref.ref.log_prob_use_dynamic_bsz", "ref"),
)


def sequence_split(config, role: str) -> Optional[tuple[int, str]]:
    """The GPUs one sequence is split over in ``role``'s engine (the ``sp_size`` verl multiplies a token budget by,
    ``verl/workers/engine/utils.py``) and the key that sets it; None where the engine does not split by a
    fixed size this check knows (Megatron's dynamic context parallelism, an engine not listed)."""
    section = f"actor_rollout_ref.{role}"
    strategy = _setting(config, f"{section}.strategy", "fsdp")
    if strategy == "megatron":
        if _setting(config, f"{section}.megatron.dynamic_context_parallel", False):
            return None  # DynamicCPScheduler packs by its own bound, not the budget
        key = f"{section}.megatron.context_parallel_size"
    elif strategy == "veomni":
        key = f"{section}.veomni.ulysses_parallel_size"
    elif strategy == "torchtitan":
        key = f"{section}.torchtitan.tensor_parallel_size"
    elif strategy in ("fsdp", "fsdp2", "fsdp_turbo"):
        key = f"{section}.ulysses_sequence_parallel_size"  # FSDPActorConfig copies it over fsdp_config's when > 1
        inner = f"{section}.fsdp_config.ulysses_sequence_parallel_size"
        if int(_setting(config, key, 1)) <= 1 and int(_setting(config, inner, 1)) > 1:
            key = inner
    else:
        return None
    return int(_setting(config, key, 1)), key


def check_sequence_budgets(config) -> None:
    """Refuse before Ray what lets a sequence of the run's full length (prompt_length + response_length, the
    rollout's bounds) fail or be cut once it occurs, possibly hours into the run:

    * a dynamic-batch token budget per GPU (``TOKEN_BUDGETS``) times the sequence split below that length: verl's
      ``rearrange_micro_batches`` asserts ``max_token_len >= max_seq_len`` on the batch's longest sequence
      (``verl/utils/seqlen_balancing.py``), so the step whose longest response first passes the budget dies;
    * ``rollout.max_model_len`` below it: vLLM caps each response at ``max_model_len`` - its prompt, silently
      (``vllm_async_server.py``), and ``response_length/clip_ratio``, measured against response_length, reads ~0.
    """
    prompt = _setting(config, f"{ROLLOUT}.prompt_length", _setting(config, "data.max_prompt_length"))
    response = _setting(config, f"{ROLLOUT}.response_length", _setting(config, "data.max_response_length"))
    if prompt is None or response is None:
        return
    longest = int(prompt) + int(response)
    lengths = f"{ROLLOUT}.prompt_length {prompt} + response_length {response}"
    lora = (_setting(config, "actor_rollout_ref.model.lora_rank", 0) or 0) > 0 or \
        bool(_setting(config, "actor_rollout_ref.model.lora_adapter_path"))
    uses_ref = not lora and (_setting(config, "actor_rollout_ref.actor.use_kl_loss", False) or
                             _setting(config, "algorithm.use_kl_in_reward", False))  # LoRA: the actor computes it
    own = _setting(config, f"{ROLLOUT}.response_length") not in (None, _setting(config, "data.max_response_length"))
    shorter = f"or lower {f'{ROLLOUT}.response_length' if own else 'data.max_response_length'}"
    for key, switch, role in TOKEN_BUDGETS:
        budget = _setting(config, key)
        split = sequence_split(config, role)
        if budget is None or split is None or not _setting(config, switch, False) or (role == "ref" and not uses_ref):
            continue
        size, split_key = split
        if int(budget) * size < longest:
            raise ValueError(
                f"{key}={budget} x {split_key}={size} is below the longest sequence the run can produce, {longest} "
                f"({lengths}): verl asserts max_token_len >= the batch's longest sequence on the step one first "
                f"reaches it, and the run stops there. Set {key} >= {-(-longest // size)}, {shorter}")
    max_model_len = _setting(config, f"{ROLLOUT}.max_model_len")
    reserved = 1 if _setting(config, f"{ROLLOUT}.name") == "sglang" else 0  # SGLang: max_model_len - prompt - 1
    if max_model_len is not None and int(max_model_len) < longest + reserved:
        raise ValueError(
            f"{ROLLOUT}.max_model_len={max_model_len} is below {longest + reserved} ({lengths}"
            f"{' + 1 for SGLang' if reserved else ''}): the rollout server would cut each response at max_model_len "
            "- its prompt, silently (response_length/clip_ratio would not show it). Set "
            f"{ROLLOUT}.max_model_len >= {longest + reserved}, or null (the model's max_position_embeddings, which "
            f"run.sh's preflight compares with the lengths), {shorter}")


def optimizer_steps_per_training_step(config) -> tuple[int, str]:
    """The policy optimizer steps one training step of verl makes, and how they were counted.

    verl 0.9.1's V1 trainer (``PPOTrainer.step``) makes ``parameter_sync_step`` updates per step
    (``trainer.v1.<mode>.parameter_sync_step``; 1 where the mode has none, as in v0 ``RayPPOTrainer`` and
    one-step-off), each of ``train_batch_size / parameter_sync_step`` prompts x ``rollout.n`` samples; the
    actor (``engine_workers.train_mini_batch``) runs them ``ppo_epochs`` times in mini-batches of
    ``ppo_mini_batch_size`` x ``rollout.n`` (so ``rollout.n`` cancels; a partial mini-batch is padded to a
    whole one by ``upsample_batch_to_divisible_size``), one optimizer step each.
    """
    sync_step = v1_parameter_sync_step(config)
    batch, mini = _setting(config, "data.train_batch_size"), _setting(config, MINI_BATCH)
    epochs = _setting(config, "actor_rollout_ref.actor.ppo_epochs", 1)
    per_step = sync_step * -(-(batch // sync_step) // mini) * epochs
    how = (f"parameter_sync_step {sync_step} x ceil(data.train_batch_size {batch} / {sync_step} / "
           f"actor_rollout_ref.actor.ppo_mini_batch_size {mini}) x ppo_epochs {epochs}")
    return per_step, how


BUILT_IN_AGENT_LOOPS = ("single_turn_agent", "tool_agent")  # verl 0.9.1's: one output per session each


def custom_agent_loop(config) -> Optional[str]:
    """The setting that selects an agent loop other than verl's built-in ones (which may return several outputs per
    session: V1's ``agent_loop_tq`` keeps each as a row), or None."""
    agent = "actor_rollout_ref.rollout.agent"
    path = _setting(config, f"{agent}.agent_loop_config_path")
    if path:
        return f"{agent}.agent_loop_config_path={path!r}"
    loop = _setting(config, f"{agent}.default_agent_loop", "single_turn_agent")
    return None if loop in BUILT_IN_AGENT_LOOPS else f"{agent}.default_agent_loop={loop!r}"


def check_schedule_span(config, options) -> None:
    """``adapt: schedule`` moves p from p_start to p_end over ``schedule_steps`` optimizer steps, then holds
    p_end; a schedule spans the run when ``schedule_steps`` equals the run's optimizer steps
    (:func:`optimizer_steps_per_training_step` x the training steps that update the actor: those from
    ``max(trainer.critic_warmup, 1)`` to ``trainer.total_training_steps``).

    Longer: p would never reach p_end; raise ValueError naming both numbers and the value to set.
    Shorter: p reaches p_end early and holds it (the documented meaning); warn once per launch.
    Without ``trainer.total_training_steps`` verl derives the length from the dataset inside Ray
    (total_epochs x batches per epoch, after its prompt filtering): say once that it is not checked.
    (The run also ends early when ``total_epochs`` runs out of data first; that is not counted here.)
    """
    from omegaconf import OmegaConf

    from hmpo_verl.maths.adaptive import scheduled_power

    schedule_steps = options.schedule_steps
    if OmegaConf.select(config, "async_training", default=None) is not None:  # fully-async's own section
        _log_once(config, f"{SCHEDULE_STEPS}={schedule_steps}: not checked against the run's length with verl's "
                          "fully-async trainer (its optimizer steps depend on async_training.require_batches and "
                          "trigger_parameter_sync_step)")
        return
    loop = custom_agent_loop(config)
    if loop:
        _log_once(config, f"{SCHEDULE_STEPS}={schedule_steps}: not checked against the run's length with {loop}: "
                          "an agent loop that returns several outputs per session adds rows, and so optimizer steps, "
                          "that cannot be counted before Ray starts (the count assumes one output per session)")
        return
    per_step, how = optimizer_steps_per_training_step(config)
    total = OmegaConf.select(config, "trainer.total_training_steps", default=None)
    if total is None:
        _log_once(config, f"{SCHEDULE_STEPS}={schedule_steps}: trainer.total_training_steps is not set, so verl "
                          "derives the run's length from the dataset inside Ray and whether the schedule spans the "
                          f"run is not checked before Ray starts; the run makes {per_step} optimizer steps per "
                          f"training step ({how}): set trainer.total_training_steps to have it checked")
        return
    warmup = OmegaConf.select(config, "trainer.critic_warmup", default=0) or 0
    run = max(0, total - max(warmup, 1) + 1) * per_step
    if schedule_steps == run:
        return
    skipped = f", less {warmup - 1} before trainer.critic_warmup {warmup}," if warmup > 1 else ""
    counted = f"the run makes {run} optimizer steps (trainer.total_training_steps {total}{skipped} x {per_step}: {how})"
    present = OmegaConf.select(config, SCHEDULE_STEPS, default=None) is not None
    fix = f"{'' if present else '+'}{SCHEDULE_STEPS}={run}"
    if schedule_steps > run:
        p_last = scheduled_power(run, options.p_start, options.p_end, schedule_steps, options.schedule)
        raise ValueError(
            f"{SCHEDULE_STEPS}={schedule_steps} with adapt=schedule is longer than the run: {counted}, so p would "
            f"end at {p_last:.4g} and never reach p_end={options.p_end}. Set {fix}")
    _log_once(config, f"{SCHEDULE_STEPS}={schedule_steps} with adapt=schedule is shorter than the run: {counted}; "
                      f"p reaches p_end={options.p_end} at optimizer step {schedule_steps} and holds it for the last "
                      f"{run - schedule_steps}. For a schedule over the whole run set {fix}")


CHECKPOINT = "actor_rollout_ref.actor.checkpoint"


def check_schedule_resumes(config) -> None:
    """``adapt: schedule`` reads its step from the optimizer's state (``hmpo_verl.guards.steps``): a checkpoint
    saved without it (``save_contents`` without ``optimizer``, where checkpoints are saved) or a resume that does not
    load it (``load_contents``, which verl's config interpolates from ``save_contents``, unless the run starts
    afresh) would restart p at p_start while the lr schedule (in ``extra``) goes on. Refused at the first launch,
    before any compute is spent on checkpoints that cannot resume it."""
    for key, used in (("save_contents", (_setting(config, "trainer.save_freq", -1) or -1) > 0),
                      ("load_contents", _setting(config, "trainer.resume_mode", "auto") != "disable")):
        contents = _setting(config, f"{CHECKPOINT}.{key}")
        if used and contents is not None and "optimizer" not in contents:
            raise ValueError(
                f"{CHECKPOINT}.{key}={list(contents)} with policy_loss.adapt=schedule: the schedule's step is the "
                "optimizer's (its saved state), so a resume would restart p at p_start while the lr schedule goes on. "
                f"Allowed: {CHECKPOINT}.save_contents and load_contents with optimizer (verl's default "
                "[model, optimizer, extra]), or adapt=ess / a fixed p")


# verl 0.9.x imports trl.experimental.ppo whenever TRL is importable (apply_monkey_patch, in every actor
# worker); TRL 1.13 removed that module. The `verl-trl` extra pins TRL below it.
TRL_BESIDE_VERL = "<1.13"


def trl_conflict(verl_version: str, trl_version: Optional[str]) -> Optional[str]:
    """The reason this verl cannot run beside this TRL (None if it can, or if TRL is absent)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    if trl_version is None or Version(verl_version) >= Version("0.10") or trl_version in SpecifierSet(TRL_BESIDE_VERL):
        return None
    return (
        f"verl {verl_version} cannot start its actor workers beside TRL {trl_version}: it imports "
        f"trl.experimental.ppo whenever TRL is installed, and TRL 1.13 removed it. Use TRL {TRL_BESIDE_VERL} "
        "beside verl (pip install 'hmpo-verl[verl-trl]' or 'trl>=1.12,<1.13'), or keep TRL in another environment"
    )


def check_trl_beside_verl() -> None:
    """Raise RuntimeError if the installed TRL breaks the installed verl (see `trl_conflict`)."""
    from importlib import metadata

    try:
        trl_version = metadata.version("trl")
    except metadata.PackageNotFoundError:
        return
    message = trl_conflict(metadata.version("verl"), trl_version)
    if message:
        raise RuntimeError(message)


# what verl's own loss_mode=bypass_mode reads from its policy_loss.rollout_correction
# (core_algos.compute_policy_loss_bypass_mode)
BYPASS_LOSS_READS = ("rollout_is", "rollout_is_threshold", "rollout_is_batch_normalize", "rollout_rs",
                     "rollout_rs_threshold", "loss_type")


def check_bypass_mode(rollout_correction, policy_loss) -> None:
    """Refuse rollout IS, rejection sampling or a loss_type that bypass mode would drop, for any loss_mode.

    With ``algorithm.rollout_correction.bypass_mode=true`` (``old_log_probs = rollout_log_probs``) no verl 0.9.1
    trainer computes rollout IS weights or rejection masks: V1 (every ``trainer.v1.trainer_mode``) copies the
    rollout's log-probs and skips ``compute_rollout_correction_and_add_to_batch``; v0 ``RayPPOTrainer`` and the
    one-step-off and fully-async trainers skip it too and call ``apply_bypass_mode``, whose
    ``loss_mode='bypass_mode'`` and ``rollout_correction`` land on the trainer's copy of the config, after the
    workers were built from theirs. Only a worker whose own ``loss_mode`` is ``bypass_mode`` applies them,
    inside that loss, from its own ``actor_rollout_ref.actor.policy_loss.rollout_correction`` (absent: verl's
    defaults). So: any other loss_mode would train without them; ``bypass_mode`` with them unless that copy holds
    the same settings.
    """
    if rollout_correction is None or not rollout_correction.get("bypass_mode", False):
        return
    unset = {"rollout_is": None, "rollout_rs": None, "loss_type": "ppo_clip"}  # what asks for no correction
    requested = [key for key, off in unset.items() if rollout_correction.get(key, off) != off]
    loss_mode = policy_loss.get("loss_mode", "vanilla") if policy_loss is not None else "vanilla"
    workers = (policy_loss.get("rollout_correction", None) if policy_loss is not None else None) or {}
    if not requested or (loss_mode == "bypass_mode" and all(
            workers.get(key, None) == rollout_correction.get(key, None) for key in BYPASS_LOSS_READS)):
        return
    same = "+actor_rollout_ref.actor.policy_loss.rollout_correction='${algorithm.rollout_correction}'"
    if loss_mode == "bypass_mode":
        what = ("verl's bypass_mode loss reads the workers' actor_rollout_ref.actor.policy_loss.rollout_correction "
                f"({'other settings' if workers else 'absent: verl defaults'}), not algorithm.rollout_correction "
                "(apply_bypass_mode copies it onto the trainer's config only), so it would train without them")
        ways = f"{same} (the workers' loss then reads these settings)"
    else:
        what = (f"in bypass mode no verl trainer (V1 in every trainer_mode, v0, one-step-off, fully-async) computes "
                f"rollout IS weights or rejection masks; only verl's own loss_mode=bypass_mode does, inside the loss "
                f"(its loss_type=ppo_clip clips pi_theta / pi_rollout instead of multiplying IS weights), so "
                f"{loss_mode} would train without them")
        ways = (f"actor_rollout_ref.actor.policy_loss.loss_mode=bypass_mode with {same} (verl's PPO-clip / "
                f"REINFORCE loss instead of {loss_mode})")
    from hmpo_verl.hosts.verl.config import LOSS_OPTION_CLASSES

    ways = "" if loss_mode in LOSS_OPTION_CLASSES else f", or {ways}"  # ours: the first two keep the loss
    asked = " and ".join(f"algorithm.rollout_correction.{key}={rollout_correction.get(key)}" for key in requested)
    drop = " ".join(f"algorithm.rollout_correction.{key}={unset[key] or 'null'}" for key in requested)
    raise ValueError(
        f"{asked} with algorithm.rollout_correction.bypass_mode=true and "
        f"actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode}: {what}. Set "
        "algorithm.rollout_correction.bypass_mode=false (decoupled: verl computes the IS weights and rejection mask "
        f"on the trainer and passes them to the loss), or drop them ({drop}){ways}."
    )


# verl's trainers, as the modules that hold our VERL_SYMBOLS rows (each imports the rest of what it needs):
V1_TRAINER = ("verl.trainer.ppo.v1",)  # the package imports every trainer_mode, ray_trainer, rollout_corr_helper, ...
V0_TRAINER = ("verl.trainer.ppo.ray_trainer", "verl.trainer.ppo.rollout_corr_helper", "verl.utils.debug.metrics",
              "verl.workers.utils.losses")  # v0 RayPPOTrainer and the off-policy trainers built on it
# imported by the entry modules of verl's off-policy trainers (one_step_off_policy.main_ppo, fully_async_main)
OFFPOLICY_TRAINERS = ("verl.experimental.one_step_off_policy.ray_trainer",
                      "verl.experimental.fully_async_policy.fully_async_trainer")


def offpolicy_launch() -> bool:
    """The driver runs an off-policy entry point (one-step-off, fully-async): it has imported their trainer, whose
    trainer is built on v0's whatever ``trainer.use_v1`` (inherited from verl's ppo_trainer config) says."""
    return any(name in sys.modules for name in OFFPOLICY_TRAINERS)


def check_verl_symbols(config) -> None:
    """Import the verl modules the launched trainer will use (its driver, task runner and workers import them
    anyway) and check every `VERL_SYMBOLS` row of every loaded verl module: a verl that moved one stops here,
    before Ray, with `UnsupportedVerlError` naming it and the supported versions. (The hooks that wrap them in
    the task runner and workers would only log the missing symbol and go on without the guard.)"""
    from omegaconf import OmegaConf

    from hmpo_verl.guards.verl_symbols import check_loaded

    v1 = not offpolicy_launch() and OmegaConf.select(config, "trainer.use_v1", default=True)
    for name in V1_TRAINER if v1 else V0_TRAINER:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            raise ImportError(f"{name}, which verl's trainer imports in its Ray task runner, cannot be imported "
                              f"here ({exc}): install what it names (verl's V1 trainer needs verl's verl-core "
                              "extras: TransferQueue, pyzmq, msgspec, cachetools, fastapi, uvicorn)") from exc
    check_loaded()


TRAINER_BASE = "verl.trainer.ppo.v1.trainer_base"
SESSIONS_FAILED = (f"hmpo_verl could not wrap {TRAINER_BASE}.compute_advantage_for_multi_trajectories: under verl V1, "
                   "adv_estimator=power_mean/agm counts every output of a multi-output agent-loop session in its group")


def check_session_grouping(config) -> None:
    """Our estimators under verl V1 need its trainer's ``compute_advantage_for_multi_trajectories`` wrapped
    (``hmpo_verl.hosts.verl.estimators.on_final_outputs``, installed as ``TRAINER_BASE`` is imported): unwrapped,
    a multi-output agent-loop session counts once per output in its prompt's group. The import hook only logs a
    failure to wrap it (``SESSIONS_FAILED``: verl without our estimators must still run); a launch that uses them
    stops here, before Ray. Run after ``check_verl_symbols``, which imports the module."""
    from hmpo_verl.hosts.verl.config import ADV_ESTIMATORS

    estimator = _setting(config, "algorithm.adv_estimator")
    if estimator not in ADV_ESTIMATORS or v1_mode(config) is None or offpolicy_launch():
        return
    compute = getattr(importlib.import_module(TRAINER_BASE), "compute_advantage_for_multi_trajectories", None)
    if not getattr(compute, "_hmpo_sessions", False):
        raise RuntimeError(
            f"algorithm.adv_estimator={estimator!r} under verl's V1 trainer (trainer.use_v1=true): {SESSIONS_FAILED}. "
            "The error logged when verl's trainer_base was imported says why. Reinstall hmpo_verl with the verl it "
            "supports, or run with trainer.use_v1=false, or with algorithm.adv_estimator=grpo")


V1_ASYNC_MODES = ("colocate_async", "separate_async")
STALE_AS_FRESH = (
    "trainer.v1.trainer_mode={mode} without algorithm.rollout_correction.bypass_mode=true and without "
    "algorithm.rollout_correction.rollout_is: verl's V1 trainer recomputes old_log_probs on the trainer's current "
    "weights (decoupled mode) and applies no rollout importance sampling, so samples generated by older weights are "
    "trained as if they were on-policy (the token ratios start at 1 whatever the sample's lag; measured here: one "
    "10-step colocate_async run's reward fell 0.21 -> 0.04). Set algorithm.rollout_correction.bypass_mode=true "
    "(old_log_probs = the rollout's log-probs: the ratios are pi_theta / pi_rollout, as verl's async configs do; "
    "with rollout_rs=null, as bypass mode computes no rejection mask) "
    "or algorithm.rollout_correction.rollout_is=token|sequence (verl multiplies pi_old / pi_rollout weights into the "
    "loss; ours apply them as verl's losses do)."
)


def stale_as_fresh(config) -> Optional[str]:
    """The warning for a V1 async mode that trains stale samples as fresh (None when the config does not).

    Why a warning and not a refusal (verl 0.9.1, ``verl.trainer.ppo.v1.trainer_base``): with
    ``bypass_mode=false`` ``_compute_old_log_prob`` recomputes ``old_log_probs`` on the current
    weights, and ``_compute_advantage`` computes ``rollout_is_weights`` only when
    ``rollout_is`` is set; without it every loss, verl's and ours alike, sees ratios
    pi_theta / pi_current. Our losses are no less right than verl's there, so the run is allowed;
    the user is told what happens and which two settings change it.
    """
    from omegaconf import OmegaConf

    if not OmegaConf.select(config, "trainer.use_v1", default=True):
        return None
    mode = OmegaConf.select(config, "trainer.v1.trainer_mode", default="sync")
    if mode not in V1_ASYNC_MODES:
        return None
    correction = OmegaConf.select(config, "algorithm.rollout_correction", default=None) or {}
    if correction.get("bypass_mode", False) or correction.get("rollout_is", None):
        return None
    return STALE_AS_FRESH.format(mode=mode)


_WARNED: dict[int, tuple[weakref.ref, set]] = {}  # id(config) -> (weak reference to it, the warnings logged)


def _log_once(config, warning: str) -> None:
    """Log ``warning`` once per launch: ``driver_checks`` runs from both verl's ``validate_config`` and
    ``run_ppo``, on the same config object (``python -m verl.trainer.main_ppo`` runs only the first:
    ``__main__`` holds its own ``run_ppo``, which our wrapper never reaches)."""
    ref, logged = _WARNED.get(id(config), (None, set()))
    if ref is None or ref() is not config:
        ref, logged = weakref.ref(config), set()
        _WARNED[id(config)] = (ref, logged)
    if warning not in logged:
        logged.add(warning)
        logger.warning(warning)


def warn_stale_as_fresh(config) -> None:
    """Log :func:`stale_as_fresh`'s warning, once per launch (:func:`_log_once`)."""
    warning = stale_as_fresh(config)
    if warning:
        _log_once(config, warning)


def driver_checks(config) -> None:
    """Everything the driver checks before Ray starts (idempotent): the verl symbols the trainer's guards wrap
    (`check_verl_symbols`) and, for our estimators under V1, its session grouping (`check_session_grouping`), our
    options and the rollout correction (`check_options`), the V1 batch split (`check_v1_batch`), the rollout replicas' fit to their GPUs (`check_rollout_replicas`), the token budgets and
    vLLM's context against the run's longest sequence (`check_sequence_budgets`), a separate rollout pool's weight
    sync (`check_weight_sync`), TRL beside verl, the
    checkpoint directory, the checkpoint a resume will use -- a resume_mode / resume_from_path verl reads alike everywhere, complete, saved by the same trainer mode and
    with the same settings (`hmpo_verl.guards.run_settings`), every refusal before the guard rewrites a
    tracker (`hmpo_verl.guards.checkpoints.guard_resume`) -- and, for fully-async, the prompts in flight at
    that checkpoint that the resume will not train (`hmpo_verl.guards.inflight`); last, the warning for a V1
    async mode that trains stale samples as fresh (`warn_stale_as_fresh`, once per launch). Run by verl's
    `validate_config` and by our wrapper of `run_ppo`, the driver function of every entry point (`main_ppo`,
    one-step-off, fully-async); under `python -m verl.trainer.main_ppo` only `validate_config` is ours
    (`__main__` holds its own `run_ppo`)."""
    from hmpo_verl.guards.checkpoints import check_checkpoint_directory, guard_resume, resume_step_dir
    from hmpo_verl.guards.inflight import warn_fully_async_resume
    from hmpo_verl.guards.run_settings import stamp_run_settings

    check_verl_symbols(config)  # first: the checks below use verl
    check_session_grouping(config)
    check_options(config)
    check_v1_batch(config)
    check_rollout_replicas(config)
    check_sequence_budgets(config)
    check_weight_sync(config)
    check_trl_beside_verl()
    check_checkpoint_directory(config)
    guard_resume(config)  # runs run_settings.check_resume_settings on the checkpoint it lets verl resume
    warn_fully_async_resume(config, resume_step_dir(config))  # what verl's fully-async resume does not train
    stamp_run_settings(config)  # what each checkpoint records, before the trainer edits its config
    warn_stale_as_fresh(config)  # once per launch: validate_config and run_ppo may both check it
