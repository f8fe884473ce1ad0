"""The CPU demo: HMPO training a tiny model with verl's real trainer, on a laptop.

    python -m hmpo_verl.lab.cpu_demo [--task fibonacci|addition] [--trainer sync|colocate_async|separate_async|one_step_off|fully_async]
                                     [--rollout hf|vllm]

1. builds the task if it is missing (:mod:`hmpo_verl.lab.tasks`; fibonacci ~30-90 s, addition ~15 s);
2. runs verl's trainer with ``VERL_PLATFORM=cpu`` (the CPU backend in ``patches/verl_cpu``):
   ``--trainer sync`` (default) ``python -m verl.trainer.main_ppo --config-path recipes/<task
   recipe> --config-name hmpo``; ``colocate_async`` the same with verl's V1
   ``trainer.v1.trainer_mode=colocate_async``; ``separate_async`` ``main_ppo`` with the recipe of that name
   (V1, a separate rollout pool); ``one_step_off`` and ``fully_async`` verl's off-policy trainers
   (``verl.experimental.one_step_off_policy.main_ppo``,
   ``verl.experimental.fully_async_policy.fully_async_main``) with the recipe of that name
   (fibonacci only), printing one line per training step read from verl's own file logger;
   ``--rollout vllm`` swaps verl_cpu's HF rollout server for verl's own vLLM server on vLLM's CPU
   build (:data:`ROLLOUTS`; install: ``bash recipes/cpu_tiny/setup_and_run.sh --vllm``), on the
   task's vLLM variant (head size 32: :func:`hmpo_verl.lab.tasks.vllm_spec`);
3. scores the exact expected test reward at verl's validation steps and step 0 from the actor
   weights verl saved there (:mod:`hmpo_verl.lab.exact_reward`; ``sync`` and ``colocate_async``),
   logged as ``val-core/<data_source>/reward/exact_mean`` beside verl's metrics;
4. prints a summary of the reward curve (the same for the same command and seeds on the same CPU model where
   the run's config has ``rollout.full_determinism``, as the tasks' hmpo.yaml; the header says so, or that a
   rerun may differ) and writes a PNG of reward, clip fraction and effective sample
   size against step, all from the logged metrics; when verl fails, the cause
   (:func:`failure_cause`) instead of a pointer to the log.

Needs ``pip install -e . -e patches/verl_cpu`` (``bash recipes/cpu_tiny/setup_and_run.sh``
installs what is missing and runs this). Extra arguments after ``--`` are passed
to verl as Hydra overrides, e.g. ``python -m hmpo_verl.lab.cpu_demo --steps 5 -- actor_rollout_ref.actor.optim.lr=5e-4``;
overrides of what the demo sets itself are refused, naming the demo's option (:data:`DEMO_SETS`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib.metadata import entry_points
from itertools import takewhile
from pathlib import Path
from typing import Optional

from hmpo_verl.lab import exact_reward, positive_int
from hmpo_verl.lab.tasks import REPO_ROOT, TASKS, Task, get_task

DEFAULT_TASK = "fibonacci"

REWARD = "critic/score/mean"
VAL_PREFIX, VAL_INFIX = "val-core/", "/acc/mean@"  # verl names it val-core/<data_source>/acc/mean@<n>
CLIPFRAC = "actor/pg_clipfrac"
ESS = "actor/pm/ess_frac"
GAP = "actor/pm/log_ah_gap"
LAG = "training/lag/mean"  # off-policy trainers: mean lag of the step's samples (hmpo_verl.staleness)
STEP_TIME = "timing_s/step"


@dataclass(frozen=True)
class Trainer:
    """One of verl's trainers: its entry module and the recipe name it runs in the task's recipe folder."""

    module: str
    recipe_name: Optional[str]  # None: the task's own recipe (hmpo.yaml)
    summary: str
    overrides: tuple[str, ...] = ()  # Hydra overrides this trainer adds to the recipe
    exact_eval: bool = False  # main_ppo's checkpoints: the exact test reward at validation steps (exact_reward)

    def recipe(self, task: Task) -> tuple[Path, str]:
        """(config dir, config name) of this trainer for ``task``; SystemExit when the task has no such recipe."""
        name = self.recipe_name or task.recipe_name
        if not (task.recipe_dir / f"{name}.yaml").is_file():
            sys.exit(f"hmpo_verl.lab.cpu_demo: task {task.name!r} has no {name} recipe "
                     f"({task.recipe_dir / (name + '.yaml')} is missing); the off-policy trainers have one for fibonacci")
        return task.recipe_dir, name


TRAINERS = {
    "sync": Trainer("verl.trainer.main_ppo", None, "verl's synchronous trainer (V1, colocated rollout)",
                    exact_eval=True),
    "colocate_async": Trainer("verl.trainer.main_ppo", None,
                              "verl's V1 trainer, colocate_async mode: partial rollout across weight syncs",
                              ("trainer.v1.trainer_mode=colocate_async",  # bypass: as verl's async configs
                               "algorithm.rollout_correction.bypass_mode=true"), exact_eval=True),
    "separate_async": Trainer("verl.trainer.main_ppo", "separate_async",
                              "verl's V1 trainer, separate_async mode: a separate rollout pool, partial rollout"),
    "one_step_off": Trainer("verl.experimental.one_step_off_policy.main_ppo", "one_step_off",
                            "verl's one-step-off-policy trainer: rollout of step k+1 during the update of step k"),
    "fully_async": Trainer("verl.experimental.fully_async_policy.fully_async_main", "fully_async",
                           "verl's fully-async trainer: streaming rollouter, staleness bound, partial rollout"),
}
DEFAULT_TRAINER = "sync"

# Hydra overrides per rollout backend: verl's vLLM server on CPU (patches/README.md, "vLLM's CPU rollout")
ROLLOUTS = {
    "hf": (),
    "vllm": (
        "actor_rollout_ref.rollout.name=vllm",
        "+actor_rollout_ref.rollout.enable_sleep_mode=false",  # vLLM has no sleep mode on CPU (not in verl's YAML)
        "actor_rollout_ref.rollout.enforce_eager=true",  # no torch.compile of the model at start
        "actor_rollout_ref.rollout.checkpoint_engine.update_weights_bucket_megabytes=64",  # shared memory, > any tensor
        # verl's full_determinism sets VLLM_BATCH_INVARIANT=1, whose kernels are Triton's (none on CPU): vLLM's
        # engine dies at its first forward; the hf server's per-request streams are what reproduce a run here
        "actor_rollout_ref.rollout.full_determinism=false",
    ),
}
DEFAULT_ROLLOUT = "hf"
ROLLOUT_DETERMINISM = "actor_rollout_ref.rollout.full_determinism"
VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB of KV cache (unset, vLLM takes gpu_memory_utilization x RAM)


# ----------------------------------------------------------------------------- launch


def check_cpu_backend_installed() -> None:
    """Exit with an install hint when the verl_cpu plugin is not installed."""
    names = {ep.name for ep in entry_points(group="verl.plugins")}
    if "verl_cpu" not in names:
        sys.exit(
            "hmpo_verl.lab.cpu_demo: the CPU backend for verl is not installed.\n"
            f"  pip install -e {REPO_ROOT / 'patches' / 'verl_cpu'}"
        )


def composed(config_dir: Path, config_name: str, overrides: list[str]):
    """The recipe with ``overrides``, composed by Hydra as verl's entry point composes it."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return compose(config_name=config_name, overrides=list(overrides))


def composed_or_exit(config_dir: Path, config_name: str, overrides: list[str]):
    """:func:`composed`, or exit with Hydra's message (as verl's entry point would stop, before Ray starts)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return composed(config_dir, config_name, overrides)
    except (HydraException, OmegaConfBaseException) as err:
        sys.exit(f"hmpo_verl.lab.cpu_demo: verl's config does not compose with these overrides: {err}")


def prompts_per_sync(config_dir: Path, config_name: str, overrides: list[str]) -> int:
    """Prompts the fully-async trainer consumes per weight sync (one logged step):
    ``ppo_mini_batch_size * require_batches * trigger_parameter_sync_step`` of the composed recipe."""
    from hmpo_verl.inflight import prompts_per_sync as of_config

    return of_config(composed_or_exit(config_dir, config_name, overrides))


def is_reproducible(config) -> bool:
    """The same command and seeds give the same run: the tasks' hmpo.yaml set rollout.full_determinism (README,
    "Every newcomer gets the same curve"); the off-policy recipes and ``--rollout vllm`` set it false."""
    from omegaconf import OmegaConf

    return bool(OmegaConf.select(config, ROLLOUT_DETERMINISM))


def resume_step(config, checkpoint_dir: Path) -> Optional[int]:
    """The step verl's trainer will resume from, read before it starts (as its ``_load_checkpoint``):
    ``trainer.resume_mode=auto`` the latest checkpoint in ``checkpoint_dir``, ``resume_path``
    ``trainer.resume_from_path``; None for a run from scratch."""
    from hmpo_verl.checkpoints import read_tracker

    mode = config.trainer.resume_mode
    if mode == "resume_path":
        found = re.search(r"global_step_(\d+)", str(config.trainer.resume_from_path))
        return int(found.group(1)) if found else None
    step = read_tracker(checkpoint_dir) if mode == "auto" else None
    return step if step is not None and (checkpoint_dir / f"global_step_{step}").is_dir() else None


# verl settings the demo sets from its own options (trainer_command, TRAINERS, ROLLOUTS) and then reports as set
# (the step lines, the plot's title, the exact reward of the task's model and test prompts): how to change each
ASSETS_WAY = "--task {task} (or --assets <a folder built by: python -m hmpo_verl.lab.cpu_demo --prepare-only --assets <folder>>)"
DEMO_SETS = {
    "actor_rollout_ref.actor.policy_loss.loss_mode": "--loss-mode {value}",
    "trainer.total_training_steps": "--steps {value}",
    "rollout.total_rollout_steps": "--steps <training steps> (fully_async: the demo sets it to steps x prompts per sync)",
    "actor_rollout_ref.model.path": ASSETS_WAY,
    "data.train_files": ASSETS_WAY,
    "data.val_files": ASSETS_WAY,
    "trainer.default_local_dir": "--run-dir <folder> (the checkpoints go to <folder>/checkpoints)",
    "trainer.v1.trainer_mode": f"--trainer <one of {', '.join(TRAINERS)}>",
    "actor_rollout_ref.rollout.name": f"--rollout <one of {', '.join(ROLLOUTS)}>",
}


def check_overrides(overrides: list[str], task: str) -> None:
    """Exit naming the demo option to use when a Hydra override sets what the demo sets itself (:data:`DEMO_SETS`)."""
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key in DEMO_SETS:
            way = DEMO_SETS[key].format(value=value, task=task)
            sys.exit(f"hmpo_verl.lab.cpu_demo: the override {override!r} is refused: the demo sets {key} itself and "
                     f"reports what it set; use {way} instead")


def trainer_command(task: Task, assets, run_dir: Path, steps: int, loss_mode: str, overrides: list[str],
                    trainer: str = DEFAULT_TRAINER, rollout: str = DEFAULT_ROLLOUT) -> list[str]:
    """verl's ``trainer`` (:data:`TRAINERS`) with the task's recipe for it and :func:`trainer_overrides`."""
    spec = TRAINERS[trainer]
    config_dir, config_name = spec.recipe(task)
    return [sys.executable, "-m", spec.module, "--config-path", str(config_dir), "--config-name", config_name,
            *trainer_overrides(task, assets, run_dir, steps, loss_mode, overrides, trainer, rollout)]


def trainer_overrides(task: Task, assets, run_dir: Path, steps: int, loss_mode: str, overrides: list[str],
                      trainer: str = DEFAULT_TRAINER, rollout: str = DEFAULT_ROLLOUT) -> list[str]:
    """The Hydra overrides of :func:`trainer_command`: this run's paths, loss and length, the trainer's and the
    rollout's settings, then the user's ``overrides``.

    ``steps`` are training steps; for ``fully_async`` (which counts prompts to generate) they
    become ``rollout.total_rollout_steps = steps * prompts_per_sync``.
    """
    if trainer == "fully_async":
        length = f"rollout.total_rollout_steps={steps * prompts_per_sync(*TRAINERS[trainer].recipe(task), overrides)}"
    else:
        length = f"trainer.total_training_steps={steps}"
    return [
        f"data.train_files={assets.train_parquet}",
        f"data.val_files={assets.test_parquet}",
        f"actor_rollout_ref.model.path={assets.model}",
        f"actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode}",
        length,
        f"trainer.default_local_dir={run_dir / 'checkpoints'}",
        *TRAINERS[trainer].overrides,
        *ROLLOUTS[rollout],
        *overrides,
    ]


def demo_overrides(trainer: str, overrides: list[str]) -> list[str]:
    """The user's Hydra overrides, after those the demo adds for the exact test reward (``trainer`` with
    ``exact_eval``: HF weights saved at the validation steps); the user's come last, so they win."""
    return [*(exact_reward.trainer_overrides() if TRAINERS[trainer].exact_eval else ()), *overrides]


# what a run writes in its run folder (trainer_env, run_trainer, main), deleted before the next run there; not checkpoints
RUN_OUTPUTS = ("metrics.jsonl", "rollout_trace.jsonl", "train.log", "reward_curve.png", "summary.json")


def trainer_env(run_dir: Path, rollout: str = DEFAULT_ROLLOUT) -> dict[str, str]:
    """Environment of the trainer: the CPU platform, verl's file logger, this checkout (the plugin and its
    CPU backend) first on the path of every process verl starts; for vLLM, :data:`VLLM_ENV` unless set."""
    env = {**(VLLM_ENV if rollout == "vllm" else {}), **os.environ}
    env["VERL_PLATFORM"] = "cpu"
    env["VERL_FILE_LOGGER_PATH"] = str(run_dir / "metrics.jsonl")
    env["VERL_CPU_ROLLOUT_TRACE"] = str(run_dir / "rollout_trace.jsonl")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT), str(REPO_ROOT / "patches" / "verl_cpu"), *filter(None, [env.get("PYTHONPATH")])]
    )
    env.setdefault("RAY_DEDUP_LOGS", "0")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def read_metrics(path: Path) -> list[dict]:
    """verl's file-logger records ``{"step": int, "data": {metric: value}}``, one per line."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line still being written
            break
    return rows


FULLY_ASYNC_VERSION = "fully_async/count/current_param_version"  # the weight version the step trained at


def training_step(record: dict) -> int:
    """The step a record belongs to. verl's fully-async trainer logs a sync cycle's training metrics at the
    next cycle's step (one late; the last two cycles share a step): those records carry the version they
    trained at, and are filed under version + 1. Every other record keeps its logged step."""
    version = record["data"].get(FULLY_ASYNC_VERSION)
    return record["step"] if version is None else int(version) + 1


def merge_steps(records: list[dict]) -> list[dict]:
    """One record per step (:func:`training_step`), in step order: the fully-async trainer logs a step in
    several records (the rollouter's timings, the trainer's metrics, validation)."""
    merged: dict[int, dict] = {}
    for record in records:
        step = training_step(record)
        merged.setdefault(step, {"step": step, "data": {}})["data"].update(record["data"])
    return [merged[step] for step in sorted(merged)]


def trained_steps(path: Path) -> list[dict]:
    """The records of the steps that trained (they carry the reward), merged per step (:func:`merge_steps`), from
    verl's file-logger output ``path``."""
    return [r for r in merge_steps(read_metrics(path)) if REWARD in r["data"]]


def is_shown(record: dict) -> bool:
    """A training step (it has the reward), or the validation before training (step 0)."""
    return REWARD in record["data"] or (record["step"] == 0 and val_key(record["data"]) is not None)


def val_key(data: dict) -> str | None:
    """verl's test-set accuracy key, e.g. ``val-core/tiny_add/acc/mean@4``."""
    return next((k for k in data if k.startswith(VAL_PREFIX) and VAL_INFIX in k), None)


def format_step(record: dict, total_steps: int) -> str:
    data = record["data"]
    parts = [f"step {record['step']:>3}/{total_steps}"]
    for label, key, fmt in (
        ("reward", REWARD, ".3f"),
        ("test", val_key(data), ".3f"),
        ("clipfrac", CLIPFRAC, ".3f"),
        ("ess", ESS, ".3f"),
        ("lag", LAG, ".2f"),
        ("s/step", STEP_TIME, ".1f"),
    ):
        if key in data:
            parts.append(f"{label} {data[key]:{fmt}}")
    return "  ".join(parts)


def run_trainer(cmd: list[str], env: dict[str, str], run_dir: Path, total_steps: int, log=print) -> tuple[int, dict]:
    """Run verl, print a line per logged step, return (exit code, timings)."""
    log_path = run_dir / "train.log"
    metrics_path = Path(env["VERL_FILE_LOGGER_PATH"])
    start = time.time()
    first_step_at = None
    shown: set[int] = set()
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        while True:
            code = process.poll()
            for record in merge_steps(read_metrics(metrics_path)):
                if record["step"] in shown or not is_shown(record):
                    continue  # a step shows once, with what was logged for it so far
                shown.add(record["step"])
                if REWARD in record["data"] and first_step_at is None:
                    first_step_at = time.time()
                log(format_step(record, total_steps))
            if code is not None:
                break
            time.sleep(1.0)
    timings = {"total_s": time.time() - start}
    if first_step_at is not None:
        timings["until_first_step_s"] = first_step_at - start
    return code, timings


# ----------------------------------------------------------------------------- failure cause

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
RAY_PREFIX = re.compile(r"^\((?:[\w.-]+ )?pid=\d+(?:, ip=[\w.:]+)?\) ?")  # "(WorkerDict pid=12) " on worker lines
# an exception line as Python prints it last in a traceback: "ValueError: ...", "omegaconf.errors.X: ...", "KeyError"
EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt)\b(?:\([\w.]+\))?(?::|$)")
RAY_WRAPPER = re.compile(r"^ray\.exceptions\.Ray\w*Error\b")  # RayTaskError(ValueError): ray::X.run() (pid=...)
PREFLIGHT_HEADER = "verl_cpu: this config cannot run"
HYDRA_ERROR = "Error executing job with overrides"
MESSAGE_END = ("Set the environment variable HYDRA_FULL_ERROR", "Traceback (most recent call last)", "During handling",
               "The above exception")


def failure_cause(log: str, max_lines: int = 12) -> list[str]:
    """The lines of a failed verl run that say why it failed, from its combined stdout/stderr.

    In order: the CPU backend's preflight report; else the message of the last exception
    raised after Hydra's "Error executing job" line (or anywhere, without one) -- in the
    driver or in a Ray worker, whose traceback Ray re-raises wrapped in ``RayTaskError``
    (the wrappers are skipped: the cause follows them) -- with the lines continuing it; else
    Hydra's own message (e.g. "Error in call to target ...", a config class's ValueError).
    Empty when the log holds none of these.
    """
    lines = [ANSI_ESCAPE.sub("", line).rstrip() for line in log.splitlines()]
    from_worker = [bool(RAY_PREFIX.match(line)) for line in lines]
    lines = [RAY_PREFIX.sub("", line) for line in lines]
    for i, line in enumerate(lines):
        if line.startswith(PREFLIGHT_HEADER):
            return [line, *takewhile(lambda x: x.startswith("  - "), lines[i + 1 :])][:max_lines]
    hydra = max((i for i, line in enumerate(lines) if line.startswith(HYDRA_ERROR)), default=-1)
    exceptions = [
        i for i, line in enumerate(lines) if i > hydra and EXCEPTION_LINE.match(line) and not RAY_WRAPPER.match(line)
    ]
    if exceptions:
        first = exceptions[-1]
    elif hydra >= 0:
        first = hydra + 1
    else:
        return []
    message = []
    for line, worker in zip(lines[first:], from_worker[first:]):
        if not line.strip() or line.startswith(MESSAGE_END) or len(message) >= max_lines:
            break
        if not worker or not message:  # skip worker log lines interleaved with the driver's message
            message.append(line)
    return message


# ----------------------------------------------------------------------------- summary and plot


def _val_key(records: list[dict]) -> str | None:
    return next((k for r in records if (k := val_key(r["data"]))), None)


def _exact_key(records: list[dict]) -> str | None:
    """The exact test reward's key (:func:`hmpo_verl.lab.exact_reward.exact_key`), when it was logged."""
    return next((k for r in records for k in r["data"]
                 if k.startswith(VAL_PREFIX) and k.endswith(exact_reward.EXACT_INFIX)), None)


def series(records: list[dict], key: str | None) -> tuple[list[int], list[float]]:
    points = [(r["step"], r["data"][key]) for r in records if key in r["data"]]
    return [p[0] for p in points], [float(p[1]) for p in points]


def summarize(records: list[dict], window: int = 5) -> dict:
    """Start/end of the training reward (mean of the first/last ``window`` steps) and more."""
    steps, reward = series(records, REWARD)
    _, step_time = series(records, STEP_TIME)
    _, val = series(records, _val_key(records))
    if not reward:
        return {}
    w = max(1, min(window, len(reward) // 2 or 1))
    summary = {
        "steps": len(reward),
        "reward_first": reward[0],
        "reward_last": reward[-1],
        f"reward_start_mean{w}": sum(reward[:w]) / w,
        f"reward_end_mean{w}": sum(reward[-w:]) / w,
        "reward_max": max(reward),
        "seconds_per_step_mean": sum(step_time) / len(step_time) if step_time else None,
    }
    if val:
        summary["val_reward_first"] = val[0]
        summary["val_reward_last"] = val[-1]
    exact_steps, exact = series(records, _exact_key(records))
    if exact:
        summary["exact_reward_by_step"] = dict(zip(exact_steps, exact))
    return {**summary, **lag_summary(records)}


def _mean(values: list[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def lag_summary(records: list[dict]) -> dict:
    """Off-policy trainers: the lag distribution and log A - log H, overall and per lag, averaged over steps."""
    from hmpo_verl.staleness import BUCKETS

    _, lags = series(records, LAG)
    if not lags:
        return {}
    out = {"lag_mean": _mean(lags), "lag_max": max(series(records, "training/lag/max")[1])}
    for bucket in BUCKETS:
        out[f"lag_share_{bucket}"] = _mean(series(records, f"training/lag/share_{bucket}")[1])
    gap = _mean(series(records, GAP)[1])  # None: the loss logs no actor/pm/* (verl's own losses)
    if gap is not None:
        out["log_ah_gap_mean"] = gap
    for bucket in BUCKETS:
        gap = _mean(series(records, f"actor/pm/lag{bucket}/log_ah_gap")[1])
        if gap is not None:
            out[f"log_ah_gap_lag{bucket}_mean"] = gap
    return out


def plot(records: list[dict], path: Path, title: str) -> None:
    """Reward, clip fraction, ESS fraction and log A - log H (per lag, off-policy) against step (verl's metrics)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [  # short y-labels (the metric names are in the legends): long ones ran into the next panel
        (REWARD, "reward", "test"),
        (CLIPFRAC, "clip fraction", None),
        (ESS, "ESS / tokens", None),
        (GAP, "log A - log H", "per lag"),
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 10), sharex=True, layout="constrained")
    for ax, (key, label, extra) in zip(axes, panels, strict=True):
        x, y = series(records, key)
        ax.plot(x, y, marker=".", label=key)
        for extra_key in _extra_series(records, extra):
            vx, vy = series(records, extra_key)
            exact = extra_key == _exact_key(records)  # the noiseless one: solid and thicker
            ax.plot(vx, vy, marker="s", linestyle="-" if exact else "--", linewidth=2 if exact else 1, label=extra_key)
        if not x:
            ax.text(0.5, 0.5, f"{key} not logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[-1].set_xlabel("training step")
    fig.suptitle(title)
    fig.align_ylabels(axes)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _extra_series(records: list[dict], extra: Optional[str]) -> list[str]:
    """For "test" the test-set keys that were logged (verl's sampled accuracy, the exact expected reward), for
    "per lag" the per-lag log_ah_gap keys."""
    if extra == "per lag":
        from hmpo_verl.staleness import BUCKETS

        keys = [f"actor/pm/lag{b}/log_ah_gap" for b in BUCKETS]
        return [k for k in keys if series(records, k)[0]]
    keys = [_val_key(records), _exact_key(records)] if extra == "test" else []
    return [k for k in keys if k and series(records, k)[0]]


def print_summary(summary: dict, timings: dict, png: Path, log=print, reproducible: bool = False) -> None:
    """``reproducible``: the run's config has ``rollout.full_determinism`` (:func:`is_reproducible`), so the
    same command and seeds give the same metrics; else the header says a rerun may differ."""
    if not summary:
        log("no training steps were logged")
        return
    start_key = next(k for k in summary if k.startswith("reward_start_mean"))
    end_key = next(k for k in summary if k.startswith("reward_end_mean"))
    window = start_key.removeprefix("reward_start_mean")
    log("")
    if reproducible:
        log("=== reward curve summary (verl's logged metrics; the same for the same command and seeds on the same "
            "CPU model) ===")
    else:
        log(f"=== reward curve summary (verl's logged metrics; {ROLLOUT_DETERMINISM}=false: the rollout depends on "
            "timing and batching, so a rerun of the same command may differ) ===")
    log(f"steps                      {summary['steps']}")
    log(f"reward, first step         {summary['reward_first']:.3f}")
    log(f"reward, last step          {summary['reward_last']:.3f}")
    log(f"reward, mean of first {window:<5}{summary[start_key]:.3f}  ->  mean of last {window}: {summary[end_key]:.3f}")
    if "val_reward_first" in summary:
        log(f"test-set reward (sampled)  {summary['val_reward_first']:.3f}  ->  {summary['val_reward_last']:.3f}")
    if "exact_reward_by_step" in summary:
        # step -> reward; the steps are strings once summary.json is read back: order them as numbers
        exact = dict(sorted((int(step), value) for step, value in summary["exact_reward_by_step"].items()))
        (first, start), (last, end) = min(exact.items()), max(exact.items())
        log(f"test-set reward (exact)    {start:.3f}  ->  {end:.3f}   (step {first} -> {last}: {end - start:+.3f})")
        log("  by validation step       " + ", ".join(f"{step}: {value:.3f}" for step, value in exact.items()))
    if "lag_mean" in summary:
        from hmpo_verl.staleness import BUCKETS

        shares = ", ".join(f"{b}: {summary[f'lag_share_{b}']:.2f}" for b in BUCKETS)
        log(f"sample lag (mean, max)     {summary['lag_mean']:.2f}, {summary['lag_max']:.0f}   share by lag {shares}")
        gaps = ", ".join(f"lag {b}: {summary[f'log_ah_gap_lag{b}_mean']:.4f}" for b in BUCKETS
                         if f"log_ah_gap_lag{b}_mean" in summary)
        if "log_ah_gap_mean" in summary:
            log(f"log A - log H (mean)       {summary['log_ah_gap_mean']:.4f}   {gaps}")
        else:
            log(f"log A - log H (mean)       not logged ({GAP}: logged by the power-mean losses, not by this one)")
    log("=== time and files (these differ from run to run) ===")
    if summary.get("seconds_per_step_mean"):
        log(f"seconds per step (mean)    {summary['seconds_per_step_mean']:.1f}")
    if "until_first_step_s" in timings:
        log(f"start-up until step 1      {timings['until_first_step_s']:.0f} s")
    log(f"total trainer wall time    {timings['total_s']:.0f} s")
    log(f"plot                       {png}")


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    tasks = "\n".join(f"  {t.name:<10} {t.summary}" for t in TASKS.values())
    trainers = "\n".join(f"  {name:<13} {t.summary}" for name, t in TRAINERS.items())
    parser = argparse.ArgumentParser(
        description="HMPO with verl's real trainer on CPU, on one of the lab's tasks.",
        epilog=f"tasks (--task):\n{tasks}\n\ntrainers (--trainer):\n{trainers}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--task", default=DEFAULT_TASK, choices=list(TASKS),
                        help=f"which task to train on (default {DEFAULT_TASK}; see the list below)")
    parser.add_argument("--trainer", default=DEFAULT_TRAINER, choices=list(TRAINERS),
                        help=f"which verl trainer (default {DEFAULT_TRAINER}; see the list below)")
    parser.add_argument("--rollout", default=DEFAULT_ROLLOUT, choices=list(ROLLOUTS),
                        help=f"rollout server (default {DEFAULT_ROLLOUT}: verl_cpu's HF server; vllm: verl's vLLM server "
                             "on vLLM's CPU build, installed by setup_and_run.sh --vllm)")
    parser.add_argument("--assets", default=None, help="task asset dir (default: the task's folder under outputs/)")
    parser.add_argument("--run-dir", default=str(REPO_ROOT / "outputs" / "cpu_demo"), help="logs, metrics, plot")
    parser.add_argument("--steps", type=positive_int, default=None, help="training steps (default: the task's, 40)")
    parser.add_argument("--loss-mode", default="hmpo", help="policy loss (default hmpo)")
    parser.add_argument("--prepare-only", action="store_true", help="only build the task's assets")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for verl, after --")
    return parser.parse_args(argv)


def say(*args, **kwargs) -> None:
    """print, flushed: progress must show even when stdout is a pipe or a file."""
    print(*args, **kwargs, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    check_overrides(args.overrides, args.task)
    task = get_task(args.task)
    steps = args.steps if args.steps is not None else task.demo_steps
    t0 = time.time()
    assets = task.prepare_assets(args.assets, log=say, rollout=args.rollout)
    say(f"assets ready in {assets.root} ({time.time() - t0:.0f} s)")
    if args.prepare_only:
        return 0
    check_cpu_backend_installed()
    TRAINERS[args.trainer].recipe(task)  # the task has a recipe for this trainer

    run_dir = Path(args.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in RUN_OUTPUTS:  # an earlier run's, which a failed run would leave beside its own log
        (run_dir / stale).unlink(missing_ok=True)
    overrides = demo_overrides(args.trainer, args.overrides)
    run = (task, assets, run_dir, steps, args.loss_mode, overrides, args.trainer, args.rollout)
    cmd = trainer_command(*run)
    config = composed_or_exit(*TRAINERS[args.trainer].recipe(task), trainer_overrides(*run))  # what verl will run
    resumed_from = resume_step(config, run_dir / "checkpoints")
    say("running verl's trainer on CPU (full log: %s):\n  VERL_PLATFORM=cpu %s" % (run_dir / "train.log", " ".join(cmd[1:])))
    started = time.time()
    code, timings = run_trainer(cmd, trainer_env(run_dir, args.rollout), run_dir, steps, log=say)
    if code != 0:
        log_path = run_dir / "train.log"
        cause = failure_cause(log_path.read_text(errors="replace"))
        if not cause:  # nothing recognisable: show the end of the log
            cause = log_path.read_text(errors="replace").splitlines()[-40:]
        say(f"\nverl's trainer exited with status {code}:", file=sys.stderr)
        say("\n".join(f"  {line}" for line in cause), file=sys.stderr)
        say(f"full log: {log_path}", file=sys.stderr)
        return code

    records = merge_steps(read_metrics(run_dir / "metrics.jsonl"))
    if TRAINERS[args.trainer].exact_eval:
        records = log_exact_rewards(task, assets, run_dir, records, started, log=say, resumed_from=resumed_from)
    summary = summarize(records)
    png = run_dir / "reward_curve.png"
    plot(records, png, f"{args.loss_mode} on CPU, {task.name} task, {args.trainer} trainer, {args.rollout} rollout "
                       f"(verl {_verl_version()})")
    (run_dir / "summary.json").write_text(json.dumps({**summary, **timings}, indent=2))
    print_summary(summary, timings, png, log=say, reproducible=is_reproducible(config))
    return 0


def log_exact_rewards(task: Task, assets, run_dir: Path, records: list[dict], started: float, log=print,
                      resumed_from: Optional[int] = None) -> list[dict]:
    """Score the run's validation steps exactly (:func:`hmpo_verl.lab.exact_reward.exact_rewards`; ``resumed_from``:
    :func:`resume_step`), add the values to ``metrics.jsonl`` under ``val-core/<data_source>/reward/exact_mean``
    and return the records read back; a step that cannot be scored is named with the reason."""
    steps = [r["step"] for r in records if val_key(r["data"]) is not None]
    if not steps:
        log("no validation steps: the exact test reward is computed at verl's validation steps "
            "(trainer.val_before_train, trainer.test_freq)")
        return records
    log(f"scoring the exact expected test reward at validation steps {steps} (one teacher-forced pass each)")
    key, values, notes = exact_reward.exact_rewards(task.name, assets.root, run_dir / "checkpoints", steps, started,
                                                    resumed_from)
    for note in notes:
        log(f"  exact test reward not computed at {note}")
    exact_reward.append_records(run_dir / "metrics.jsonl", key, values)
    return merge_steps(read_metrics(run_dir / "metrics.jsonl"))


def _verl_version() -> str:
    from importlib.metadata import version

    return version("verl")


if __name__ == "__main__":
    sys.exit(main())
