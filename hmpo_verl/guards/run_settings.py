"""The settings that define a run, saved with each checkpoint and compared before a resume.

verl's `resume_mode=auto` (its default) resumes the newest checkpoint under
`trainer.default_local_dir` whatever the new launch's settings are: a relaunch with another
learning rate, clip, length or seed continues the old run's weights and step under the new
config, logged under the same name. The driver therefore stamps `run_settings(config)` into the
config before Ray starts (`stamp_run_settings`: the trainer later edits its copy), `guard_saves`
(`hmpo_verl.guards.checkpoints`) writes that stamp into every `global_step_<k>/` (`SETTINGS_FILE`, before
verl writes the checkpoint itself, so it is there before the tracker names the step), and the driver checks
(`check_resume_settings`, before Ray starts) compare it with the new launch's: a difference
stops the run naming each key, both values and the ways on.

Recorded: the subtrees and keys of `RUN_SETTINGS` (loss and its p / schedule, the optimizer
with its lr and schedule, clips, batch and mini-batch sizes, lengths, model path, data,
seeds, the run's length, world size; since version 2 also the reward function and manager, the
dataset's shaping (sample cap, prompt filter and key, chat template), what a resume loads, the loss
scale, and the trainer and its async settings: `trainer.use_v1`, `trainer.v1.trainer_mode`, fully-async's
`async_training`; since version 3 the V1 modes' sections and its sampler, `trainer.v1.<mode>` and
`trainer.v1.sampler`, of which only the launch's mode is compared; since version 4 the rollout's length bounds,
sampling switches, multi-turn settings and agent loop, and `actor_rollout_ref.hybrid_engine`; since version 5
`data.gen_batch_size`, the prompts per step of the v0 and one-step-off trainers), flattened to dotted keys; a record saved
by an older version is compared on the keys it has, with a warning naming the rest. Not recorded: logging, saving,
validation, memory and parallelism tuning (micro-batch sizes, offload),
`optim.total_training_steps`, which the trainer itself writes into its config (from
`trainer.total_training_steps` / `total_epochs`, which are recorded), and the CPU replay buffer's
`sampler_kwargs.poll_interval` (timing only; a record that holds it, of an earlier version, is not compared on it).

A change that is meant (a longer `trainer.total_training_steps`, a new lr for the rest of the
run) is accepted by naming it: `'+hmpo.resume_accept=[trainer.total_training_steps]'` (a key or
a subtree prefix); the next checkpoint records the new value. A change of the FSDP world size
(`trainer.nnodes * trainer.n_gpus_per_node`) is refused even then: verl's FSDP checkpoint
manager loads `model_world_size_<W>_rank_<r>.pt` of the *new* world size and does not reshard.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Optional

SETTINGS_FILE = "hmpo_run_settings.json"
ACCEPT_KEY = "hmpo.resume_accept"
STAMP_KEY = "hmpo.run_settings"  # stamp_run_settings
ACTOR = "actor_rollout_ref.actor"
V1_MODES = ("sync", "colocate_async", "separate_async")  # trainer.v1.trainer_mode
RUN_SETTINGS = (
    "actor_rollout_ref.model.path",
    f"{ACTOR}.policy_loss",
    f"{ACTOR}.optim",
    *(f"{ACTOR}.{key}" for key in (
        "clip_ratio", "clip_ratio_low", "clip_ratio_high", "clip_ratio_c", "grad_clip", "loss_agg_mode",
        "entropy_coeff", "use_kl_loss", "kl_loss_coef", "kl_loss_type", "ppo_epochs", "ppo_mini_batch_size",
        "shuffle", "data_loader_seed")),
    *(f"actor_rollout_ref.rollout.{key}" for key in ("n", "temperature", "top_p", "top_k", "seed")),
    "algorithm",
    *(f"data.{key}" for key in (
        "train_files", "train_batch_size", "max_prompt_length", "max_response_length", "shuffle", "seed")),
    "critic.model.path",
    "critic.optim",
    "trainer.total_epochs",
    "trainer.total_training_steps",
    "trainer.nnodes",
    "trainer.n_gpus_per_node",
    *(ADDED := (  # recorded since SETTINGS_VERSION 2: a record without the version has none of them
        "actor_rollout_ref.model.custom_chat_template",
        f"{ACTOR}.checkpoint.load_contents",  # [model] alone skips the optimizer: its step and lr schedule restart
        f"{ACTOR}.loss_scale_factor",
        *(f"data.{key}" for key in (
            "train_max_samples", "filter_overlong_prompts", "prompt_key", "reward_fn_key", "truncation", "custom_cls",
            "apply_chat_template_kwargs")),
        *(f"reward.{key}" for key in (
            "custom_reward_function", "reward_manager.source", "reward_manager.name", "reward_manager.module",
            "reward_model.enable", "reward_model.model_path")),
        "custom_reward_function",  # verl's legacy top-level keys of the same
        "reward_model.enable",
        "reward_model.model.path",
        "trainer.balance_batch",
        "trainer.use_v1",
        "trainer.v1.trainer_mode",
        "async_training",  # fully-async: staleness, sync step, partial rollout, ...
    )),
    # recorded since SETTINGS_VERSION 3 (version 2 recorded separate_async.parameter_sync_step and the sampler's
    # max_off_policy_threshold / _strategy of them): the V1 trainer reads its mode's section -- parameter_sync_step
    # (updates per step, the lr horizon), num_warmup_batches (prefetch depth: staleness), hybrid_rollout -- and
    # the sampler (the replay buffer: staleness bound, custom sampler); only the launch's mode is compared
    *(ADDED_V3 := (*(f"trainer.v1.{mode}" for mode in V1_MODES), "trainer.v1.sampler")),
    # recorded since SETTINGS_VERSION 4: what the rollout generates -- its own length bounds (verl interpolates
    # them from data.* but a launch may set them apart), sampling switches, the multi-turn / tool settings and
    # the agent loop (whose outputs per session set the updates per step) -- and whether the actor's GPUs also
    # serve rollout replicas (separate_async's hybrid_engine)
    *(ADDED_V4 := (
        *(f"actor_rollout_ref.rollout.{key}" for key in (
            "prompt_length", "response_length", "do_sample", "ignore_eos", "over_sample_rate", "multi_turn",
            "agent.default_agent_loop", "agent.agent_loop_config_path")),
        "actor_rollout_ref.hybrid_engine",
    )),
    # recorded since SETTINGS_VERSION 5: the v0 trainer's (and one-step-off's) dataloader batch, which is the prompts
    # each step trains there (verl's create_rl_dataloader: gen_batch_size or train_batch_size)
    *(ADDED_V5 := ("data.gen_batch_size",)),
)
SETTINGS_VERSION = 5
ADDED_IN = {2: ADDED, 3: ADDED_V3, 4: ADDED_V4, 5: ADDED_V5}  # version -> the RUN_SETTINGS entries first recorded then
VERSION_KEY = "hmpo.settings_version"  # in the saved record only (absent: version 1)
# keys below RUN_SETTINGS that are not a run's settings, neither recorded nor compared: what the trainer itself writes,
# and the polling period of verl_cpu's replay buffer (timing only: when a finished rollout is noticed, not what it is)
NOT_COMPARED = re.compile(r".*\.optim\.total_training_steps|trainer\.v1\.sampler\.sampler_kwargs\.poll_interval")
WORLD_SHARD = re.compile(r"(?:model|optim|extra_state)_world_size_(\d+)_rank_\d+\.pt")

logger = logging.getLogger(__name__)


class ResumeSettingsError(RuntimeError):
    """A resume would continue a checkpoint saved with other settings."""


def _select(config, key: str) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    value = OmegaConf.select(config, key, default=None, throw_on_resolution_failure=False)
    if isinstance(value, (DictConfig, ListConfig)):
        try:
            return OmegaConf.to_container(value, resolve=True)
        except Exception:  # noqa: BLE001 - an interpolation the driver cannot resolve: record it as written
            return OmegaConf.to_container(value, resolve=False)
    return value


def _flatten(prefix: str, value: Any, into: dict) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}", item, into)
    elif not NOT_COMPARED.fullmatch(prefix):
        into[prefix] = value if isinstance(value, (str, int, float, bool, type(None), list)) else str(value)


def run_settings(config) -> dict[str, Any]:
    """{dotted key: value} of every `RUN_SETTINGS` entry in a composed verl config (see module doc)."""
    settings: dict[str, Any] = {}
    for key in RUN_SETTINGS:
        _flatten(key, _select(config, key), settings)
    return settings


def stamp_run_settings(config) -> None:
    """Store `run_settings(config)` in the config itself (`STAMP_KEY`, JSON), in the driver before Ray starts.

    The trainer edits its copy of the config as it runs (verl's `apply_bypass_mode` sets
    `policy_loss.loss_mode='bypass_mode'` and copies `rollout_correction` into it, the trainer
    writes `optim.total_training_steps`); the stamp is what the launch asked for, and is what
    each checkpoint records.
    """
    from omegaconf import open_dict

    with open_dict(config):
        config.hmpo = config.get("hmpo", None) or {}
        config.hmpo.run_settings = json.dumps(run_settings(config), sort_keys=True, default=str)


def write_run_settings(step_dir: Path, config) -> None:
    """Save the launch's settings (the driver's stamp, else `run_settings(config)`) as `<step_dir>/SETTINGS_FILE`."""
    stamp = _select(config, STAMP_KEY)
    settings = {**(json.loads(stamp) if stamp else run_settings(config)), VERSION_KEY: SETTINGS_VERSION}
    step_dir = Path(step_dir)
    step_dir.mkdir(parents=True, exist_ok=True)
    (step_dir / SETTINGS_FILE).write_text(json.dumps(settings, indent=1, sort_keys=True, default=str))


def under(key: str, prefixes) -> bool:
    """`key` is one of the dotted `prefixes` or below one."""
    return any(key == p or key.startswith(f"{p}.") for p in prefixes)


def accepted_keys(config) -> tuple:
    """The keys (or prefixes) the launch accepts a change of: `+hmpo.resume_accept=[...]`."""
    return tuple(_select(config, ACCEPT_KEY) or ())


def unrecorded(saved: dict) -> tuple[str, ...]:
    """The `RUN_SETTINGS` entries a saved record predates (its `VERSION_KEY`; none: version 1)."""
    return tuple(key for version, keys in ADDED_IN.items() if saved.get(VERSION_KEY, 1) < version for key in keys)


def unused(current: dict) -> tuple[str, ...]:
    """The recorded sections the launch's trainer does not read: `trainer.v1.<mode>` of the V1 modes it does not
    run (verl's trainer_base.py reads `trainer.v1.<trainer_mode>` alone), all of them without V1 -- with
    `trainer.use_v1=false`, or under fully-async (an `async_training` section), whose trainer is built on the v0
    one whatever `trainer.use_v1` (true, inherited from verl's ppo_trainer config) says."""
    fully_async = any(under(key, ("async_training",)) and value is not None for key, value in current.items())
    if current.get("trainer.use_v1") is False or fully_async:
        return ADDED_V3
    return tuple(f"trainer.v1.{mode}" for mode in V1_MODES if mode != current.get("trainer.v1.trainer_mode"))


NODE_KEYS = ("trainer.nnodes", "trainer.n_gpus_per_node")
WORLD_KEY = "trainer.nnodes * trainer.n_gpus_per_node"


def _by_world_size(settings: dict) -> dict:
    """``settings`` with ``NODE_KEYS`` compared as their product, ``WORLD_KEY``: the same world size split otherwise
    over nodes (1 x 8, 2 x 4) trains and shards alike."""
    if not all(key in settings for key in NODE_KEYS):
        return settings
    nodes, per_node = (settings[key] for key in NODE_KEYS)
    world = nodes * per_node if isinstance(nodes, int) and isinstance(per_node, int) else f"{nodes} x {per_node}"
    return {**{k: v for k, v in settings.items() if k not in NODE_KEYS}, WORLD_KEY: world}


def settings_differences(saved: dict, current: dict, accepted=()) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for every recorded key that differs and is not accepted.

    A key present on one side only (an option added with `+...`) is a difference, shown as `<unset>` on
    the other side, unless its value is null: verl reads an absent key and a null one alike (a subtree of
    nulls and a null subtree, `custom_reward_function: {path: null, ...}` and `custom_reward_function: null`,
    are the same setting). ``trainer.nnodes`` and ``trainer.n_gpus_per_node`` are compared as their product
    (``WORLD_KEY``; accepted by either name). Keys the saved record predates (`unrecorded`) and keys the launch's
    trainer does not read (`unused`: another V1 mode's section) are not compared.
    """
    missing, predates = "<unset>", unrecorded(saved)
    saved = _by_world_size({k: v for k, v in saved.items() if k != VERSION_KEY and not NOT_COMPARED.fullmatch(k)})
    current = _by_world_size(current)
    keys = sorted({*saved, *(k for k in current if under(k, (*RUN_SETTINGS, WORLD_KEY)) and not under(k, predates))})
    skipped = (*accepted, *unused(current), *((WORLD_KEY,) if any(under(k, accepted) for k in NODE_KEYS) else ()))

    def meaning(settings: dict, key: str) -> Any:
        value = settings.get(key, missing)
        return missing if value is None else value

    return [(k, saved.get(k, missing), current.get(k, missing)) for k in keys
            if meaning(saved, k) != meaning(current, k) and not under(k, skipped)]


def _shard_world_size(step_dir: Path) -> Optional[int]:
    sizes = {int(m.group(1)) for p in (step_dir / "actor").glob("*.pt") if (m := WORLD_SHARD.fullmatch(p.name))}
    return sizes.pop() if len(sizes) == 1 else None


def world_size(config) -> int:
    """The actor's data-parallel world size verl's FSDP saver names its shards by."""
    return int(_select(config, "trainer.nnodes") or 1) * int(_select(config, "trainer.n_gpus_per_node") or 1)


WAYS_ON = (
    "Ways on: start this run apart with a new CKPT_DIR or EXPERIMENT_NAME (trainer.default_local_dir / "
    "trainer.experiment_name); or train from scratch there with trainer.resume_mode=disable; or, for a change "
    f"you mean (e.g. a longer trainer.total_training_steps), accept it by name: '+{ACCEPT_KEY}=[KEY,...]' "
    "(a key or a prefix of keys; the next checkpoint records the new values)."
)


def resume_settings_problem(step_dir: Path, config) -> Optional[str]:
    """Why resuming `step_dir` under `config` would continue another run (None: it would not)."""
    step_dir = Path(step_dir)
    saved_world, world = _shard_world_size(step_dir), world_size(config)
    if saved_world is not None and saved_world != world:
        return (f"{step_dir} holds FSDP shards of world size {saved_world}, and this launch's is {world} "
                f"(trainer.nnodes * trainer.n_gpus_per_node): verl's FSDP checkpoint manager loads "
                f"model_world_size_{world}_rank_<r>.pt and does not reshard. Relaunch with the saved world size "
                f"to resume, or start apart (a new CKPT_DIR / EXPERIMENT_NAME, or trainer.resume_mode=disable).")
    path = step_dir / SETTINGS_FILE
    if not path.is_file():
        logger.warning("hmpo_verl: %s has no %s (saved before hmpo_verl recorded run settings): its settings "
                       "cannot be compared with this launch's", step_dir, SETTINGS_FILE)
        return None
    accepted, saved = accepted_keys(config), json.loads(path.read_text())
    if predates := unrecorded(saved):
        logger.warning("hmpo_verl: %s was saved by a version of hmpo_verl that did not record %s: those settings "
                       "cannot be compared with this launch's", path, ", ".join(predates))
    differences = settings_differences(saved, run_settings(config), accepted)
    if not differences:
        return None
    listed = "\n".join(f"  {key}: saved {old!r}, now {new!r}" for key, old, new in differences)
    return f"resuming {step_dir} would continue a run saved with other settings:\n{listed}\n{WAYS_ON}"


def check_resume_settings(config, step_dir: Optional[Path]) -> None:
    """Raise `ResumeSettingsError` if the checkpoint a resume will use was saved with other settings."""
    if step_dir is None or not Path(step_dir).is_dir():
        return
    problem = resume_settings_problem(step_dir, config)
    if problem:
        raise ResumeSettingsError(f"hmpo_verl: {problem}")
    accepted = _select(config, ACCEPT_KEY)
    if accepted:
        logger.warning("hmpo_verl: resuming %s with the changes accepted by %s=%s", step_dir, ACCEPT_KEY, accepted)
