"""The CPU demo: HMPO training a tiny model with verl's real trainer, on a laptop.

    python -m hmpo_verl.lab.cpu_demo [--task fibonacci|addition]

1. builds the task if it is missing (:mod:`hmpo_verl.lab.tasks`; fibonacci ~30-90 s, addition ~15 s);
2. runs ``python -m verl.trainer.main_ppo --config-path recipes/<task recipe> --config-name hmpo``
   with ``VERL_PLATFORM=cpu`` (the CPU backend in ``patches/verl_cpu``), printing one
   line per training step read from verl's own file logger;
3. prints a summary of the reward curve and writes a PNG of reward, clip fraction and
   effective sample size against step, all from verl's logged metrics.

Needs ``pip install -e . -e patches/verl_cpu``. Extra arguments after ``--`` are passed
to verl as Hydra overrides, e.g. ``python -m hmpo_verl.lab.cpu_demo --steps 5 -- actor_rollout_ref.actor.optim.lr=5e-4``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path

from hmpo_verl.lab.tasks import REPO_ROOT, TASKS, Task, get_task

DEFAULT_TASK = "fibonacci"

REWARD = "critic/score/mean"
VAL_PREFIX, VAL_INFIX = "val-core/", "/acc/mean@"  # verl names it val-core/<data_source>/acc/mean@<n>
CLIPFRAC = "actor/pg_clipfrac"
ESS = "actor/pm/ess_frac"
STEP_TIME = "timing_s/step"


# ----------------------------------------------------------------------------- launch


def check_cpu_backend_installed() -> None:
    """Exit with an install hint when the verl_cpu plugin is not installed."""
    names = {ep.name for ep in entry_points(group="verl.plugins")}
    if "verl_cpu" not in names:
        sys.exit(
            "hmpo_verl.lab.cpu_demo: the CPU backend for verl is not installed.\n"
            f"  pip install -e {REPO_ROOT / 'patches' / 'verl_cpu'}"
        )


def trainer_command(task: Task, assets, run_dir: Path, steps: int, loss_mode: str, overrides: list[str]) -> list[str]:
    """``python -m verl.trainer.main_ppo`` with the task's recipe and this run's paths."""
    return [
        sys.executable,
        "-m",
        "verl.trainer.main_ppo",
        "--config-path",
        str(task.recipe_dir),
        "--config-name",
        task.recipe_name,
        f"data.train_files={assets.train_parquet}",
        f"data.val_files={assets.test_parquet}",
        f"actor_rollout_ref.model.path={assets.model}",
        f"actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode}",
        f"trainer.total_training_steps={steps}",
        f"trainer.default_local_dir={run_dir / 'checkpoints'}",
        *overrides,
    ]


def trainer_env(run_dir: Path) -> dict[str, str]:
    """Environment of the trainer: the CPU platform, verl's file logger, this repo first on the path."""
    env = dict(os.environ)
    env["VERL_PLATFORM"] = "cpu"
    env["VERL_FILE_LOGGER_PATH"] = str(run_dir / "metrics.jsonl")
    env["VERL_CPU_ROLLOUT_TRACE"] = str(run_dir / "rollout_trace.jsonl")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
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
    shown = 0
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        while True:
            code = process.poll()
            records = read_metrics(metrics_path)
            for record in records[shown:]:
                if record["step"] >= 1 and first_step_at is None:
                    first_step_at = time.time()
                log(format_step(record, total_steps))
            shown = len(records)
            if code is not None:
                break
            time.sleep(1.0)
    timings = {"total_s": time.time() - start}
    if first_step_at is not None:
        timings["until_first_step_s"] = first_step_at - start
    return code, timings


# ----------------------------------------------------------------------------- summary and plot


def _val_key(records: list[dict]) -> str | None:
    return next((k for r in records if (k := val_key(r["data"]))), None)


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
    return summary


def plot(records: list[dict], path: Path, title: str) -> None:
    """Reward, clip fraction and ESS fraction against step (from verl's metrics)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        (REWARD, "mean reward (train)", _val_key(records)),
        (CLIPFRAC, "clip fraction (actor/pg_clipfrac)", None),
        (ESS, "ESS / tokens (actor/pm/ess_frac)", None),
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 8), sharex=True)
    for ax, (key, label, extra) in zip(axes, panels, strict=True):
        x, y = series(records, key)
        ax.plot(x, y, marker=".", label=key)
        if extra:
            vx, vy = series(records, extra)
            if vx:
                ax.plot(vx, vy, marker="s", linestyle="--", label=f"{extra} (test set)")
        if not x:
            ax.text(0.5, 0.5, f"{key} not logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    axes[-1].set_xlabel("training step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_summary(summary: dict, timings: dict, png: Path, log=print) -> None:
    if not summary:
        log("no training steps were logged")
        return
    start_key = next(k for k in summary if k.startswith("reward_start_mean"))
    end_key = next(k for k in summary if k.startswith("reward_end_mean"))
    window = start_key.removeprefix("reward_start_mean")
    log("")
    log("=== reward curve summary (verl's logged critic/score/mean) ===")
    log(f"steps                      {summary['steps']}")
    log(f"reward, first step         {summary['reward_first']:.3f}")
    log(f"reward, last step          {summary['reward_last']:.3f}")
    log(f"reward, mean of first {window:<5}{summary[start_key]:.3f}  ->  mean of last {window}: {summary[end_key]:.3f}")
    if "val_reward_first" in summary:
        log(f"test-set reward (sampled)  {summary['val_reward_first']:.3f}  ->  {summary['val_reward_last']:.3f}")
    if summary.get("seconds_per_step_mean"):
        log(f"seconds per step (mean)    {summary['seconds_per_step_mean']:.1f}")
    if "until_first_step_s" in timings:
        log(f"start-up until step 1      {timings['until_first_step_s']:.0f} s")
    log(f"total trainer wall time    {timings['total_s']:.0f} s")
    log(f"plot                       {png}")


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    tasks = "\n".join(f"  {t.name:<10} {t.summary}" for t in TASKS.values())
    parser = argparse.ArgumentParser(
        description="HMPO with verl's real trainer on CPU, on one of the lab's tasks.",
        epilog=f"tasks (--task):\n{tasks}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--task", default=DEFAULT_TASK, choices=list(TASKS),
                        help=f"which task to train on (default {DEFAULT_TASK}; see the list below)")
    parser.add_argument("--assets", default=None, help="task asset dir (default: the task's folder under outputs/)")
    parser.add_argument("--run-dir", default=str(REPO_ROOT / "outputs" / "cpu_demo"), help="logs, metrics, plot")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the task's, 40)")
    parser.add_argument("--loss-mode", default="hmpo", help="policy loss (default hmpo)")
    parser.add_argument("--prepare-only", action="store_true", help="only build the task's assets")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for verl, after --")
    return parser.parse_args(argv)


def say(*args, **kwargs) -> None:
    """print, flushed: progress must show even when stdout is a pipe or a file."""
    print(*args, **kwargs, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    task = get_task(args.task)
    steps = args.steps if args.steps is not None else task.demo_steps
    t0 = time.time()
    assets = task.prepare_assets(args.assets, log=say)
    say(f"assets ready in {assets.root} ({time.time() - t0:.0f} s)")
    if args.prepare_only:
        return 0
    check_cpu_backend_installed()

    run_dir = Path(args.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.jsonl", "rollout_trace.jsonl"):
        (run_dir / stale).unlink(missing_ok=True)
    cmd = trainer_command(task, assets, run_dir, steps, args.loss_mode, args.overrides)
    say("running verl's trainer on CPU (full log: %s):\n  VERL_PLATFORM=cpu %s" % (run_dir / "train.log", " ".join(cmd[1:])))
    code, timings = run_trainer(cmd, trainer_env(run_dir), run_dir, steps, log=say)
    if code != 0:
        tail = (run_dir / "train.log").read_text().splitlines()[-40:]
        say("\n".join(tail), file=sys.stderr)
        say(f"\nverl's trainer exited with status {code}; full log: {run_dir / 'train.log'}", file=sys.stderr)
        return code

    records = read_metrics(run_dir / "metrics.jsonl")
    summary = summarize(records)
    png = run_dir / "reward_curve.png"
    plot(records, png, f"{args.loss_mode} on CPU, {task.name} task (verl {_verl_version()})")
    (run_dir / "summary.json").write_text(json.dumps({**summary, **timings}, indent=2))
    print_summary(summary, timings, png, log=say)
    return 0


def _verl_version() -> str:
    from importlib.metadata import version

    return version("verl")


if __name__ == "__main__":
    sys.exit(main())
