"""Measure the lab's tasks on verl's real trainer: does the long task learn, and do the means differ?

    python -m hmpo_verl.lab.task_report       # 9 runs, one at a time (~30-40 min on 2 cores)

Two questions, each answered from verl's own file logger (``metrics.jsonl`` of every run):

1. **Headroom and learning** (the Fibonacci task): verl's ``vanilla`` loss, on-policy
   (``on_policy`` below: 8 prompts x 8 samples, one PPO epoch, one mini-batch), ``--criterion-steps`` (60) steps, seeds 1-3. Passes when, in every seed,
   the mean reward (``critic/score/mean``) of steps 1-5 is in [0.15, 0.45] and the mean of
   the last 5 steps is at least 0.2 higher.
2. **Mean sensitivity** (every task): ``hmpo`` for ``--steps`` (16) steps, seed 1, in three
   settings -- ``recipe`` (the task's demo recipe as is: 2 PPO mini-batches per rollout,
   so the second is off-policy), ``on_policy`` and ``stressed`` (:data:`TRAINER_SETTINGS`:
   8 stale updates per rollout and behaviour log-probs with N(0, 0.05^2) noise -- the
   trainer-based study's regimes when these figures were measured; the lean-loop study
   in :mod:`hmpo_verl.lab.study` has its own). Reports per task and setting the mean over steps of
   ``response_length/mean``, ``actor/pm/log_ah_gap`` (log A - log H of a response's token
   ratios: 0 when all means coincide), ``actor/pm/ess_frac`` (Kish ESS / T of the harmonic
   mean's token weights: 1 when they are uniform) and ``actor/pg_clipfrac``.

Runs go to ``<out>/<task>/<loss>_<setting>/seed<k>/`` (finished runs are reused: delete a
folder to redo it). Writes ``docs/tasks.md`` (tables, exact commands, versions), the per-step
metrics it used in ``docs/tasks_data/steps.csv`` and the reward curves of question 1 in
``docs/tasks_figures/fibonacci_vanilla_reward.png``.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hmpo_verl.lab.cpu_demo import check_cpu_backend_installed, read_metrics, trainer_command, trainer_env
from hmpo_verl.lab.study.report import versions_text
from hmpo_verl.lab.tasks import REPO_ROOT, TASKS, get_task

REWARD = "critic/score/mean"
KEPT = (REWARD, "response_length/mean", "actor/pm/log_ah_gap", "actor/pm/ess_frac", "actor/pg_clipfrac",
        "actor/ppo_kl", "actor/pm/seq_ratio_mean", "timing_s/step", "timing_s/gen")
MEAN_METRICS = ("response_length/mean", "actor/pm/log_ah_gap", "actor/pm/ess_frac", "actor/pg_clipfrac")
# verl trainer settings besides the recipe's own: Hydra overrides and environment.
# Both: 8 prompts x 8 samples per step (the recipe's batch would double the rollout time).
COMMON_OVERRIDES = ("data.train_batch_size=8", "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=64")
TRAINER_SETTINGS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    # 1 PPO epoch x 1 mini-batch per rollout: every update on-policy
    "on_policy": (("actor_rollout_ref.actor.ppo_mini_batch_size=8", "actor_rollout_ref.actor.ppo_epochs=1",
                   "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=64"), {}),
    # 4 mini-batches x 2 PPO epochs per rollout; behaviour log-probs with N(0, 0.05^2) noise (bypass)
    "stressed": (("actor_rollout_ref.actor.ppo_mini_batch_size=2", "actor_rollout_ref.actor.ppo_epochs=2",
                  "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16",
                  "algorithm.rollout_correction.bypass_mode=true"), {"VERL_CPU_LOGPROB_NOISE_STD": "0.05"}),
}
SETTINGS = ("recipe", *TRAINER_SETTINGS)
CRITERION_TASK = "fibonacci"
START_RANGE, MIN_RISE, WINDOW = (0.15, 0.45), 0.2, 5


@dataclass(frozen=True)
class ReportRun:
    task: str
    setting: str  # "recipe" or a key of TRAINER_SETTINGS
    loss_mode: str
    seed: int
    steps: int

    def dir(self, out: Path) -> Path:
        return out / self.task / f"{self.loss_mode}_{self.setting}" / f"seed{self.seed}"

    def overrides(self) -> list[str]:
        regime = [] if self.setting == "recipe" else [*COMMON_OVERRIDES, *TRAINER_SETTINGS[self.setting][0]]
        return [*regime, f"data.seed={self.seed}", f"actor_rollout_ref.rollout.seed={self.seed}",
                "trainer.val_before_train=false", "trainer.test_freq=-1"]

    def env(self) -> dict[str, str]:
        return {} if self.setting == "recipe" else dict(TRAINER_SETTINGS[self.setting][1])

    def command(self, out: Path) -> str:
        """The equivalent ``cpu_demo`` command line (what the README quotes)."""
        env = " ".join(f"{k}={v}" for k, v in self.env().items())
        args = ["python", "-m", "hmpo_verl.lab.cpu_demo", "--task", self.task, "--loss-mode", self.loss_mode,
                "--steps", str(self.steps), "--run-dir", os.path.relpath(self.dir(out), REPO_ROOT), "--",
                *self.overrides()]
        return (env + " " if env else "") + shlex.join(args)


def planned_runs(seeds: int, criterion_steps: int, steps: int) -> list[ReportRun]:
    runs = [ReportRun(CRITERION_TASK, "on_policy", "vanilla", s, criterion_steps) for s in range(1, seeds + 1)]
    runs += [ReportRun(task, setting, "hmpo", 1, steps) for task in TASKS for setting in SETTINGS]
    return runs


def logged_steps(run: ReportRun, out: Path) -> list[dict]:
    return [r for r in read_metrics(run.dir(out) / "metrics.jsonl") if REWARD in r["data"]]


def execute(run: ReportRun, out: Path) -> int:
    """One verl run, quiet (verl's output in ``train.log``); returns its exit code."""
    task = get_task(run.task)
    assets = task.prepare_assets(log=None)
    run_dir = run.dir(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    cmd = trainer_command(task, assets, run_dir, run.steps, run.loss_mode, run.overrides())
    with open(run_dir / "train.log", "w") as log:
        return subprocess.run(cmd, env={**trainer_env(run_dir), **run.env()}, stdout=log, stderr=subprocess.STDOUT,
                              cwd=REPO_ROOT).returncode


# ----------------------------------------------------------------------------- analysis


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def criterion(reward: list[float]) -> dict:
    """Start (mean of the first WINDOW steps), end (mean of the last WINDOW), rise, pass."""
    start, end = _mean(reward[:WINDOW]), _mean(reward[-WINDOW:])
    return {"start": start, "end": end, "rise": end - start,
            "passes": START_RANGE[0] <= start <= START_RANGE[1] and end - start >= MIN_RISE}


def step_rows(runs: list[ReportRun], out: Path) -> list[dict]:
    return [{"task": r.task, "setting": r.setting, "loss_mode": r.loss_mode, "seed": r.seed, "step": rec["step"],
             **{k: rec["data"].get(k, math.nan) for k in KEPT}} for r in runs for rec in logged_steps(r, out)]


def plot_criterion(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for seed in sorted({r["seed"] for r in rows}):
        mine = sorted((r for r in rows if r["seed"] == seed), key=lambda r: r["step"])
        ax.plot([r["step"] for r in mine], [r[REWARD] for r in mine], marker=".", label=f"seed {seed}")
    ax.axhspan(*START_RANGE, color="grey", alpha=0.12, label="start range 0.15-0.45")
    ax.set_xlabel("training step")
    ax.set_ylabel("mean reward (critic/score/mean)")
    ax.set_title("fibonacci task, verl's vanilla loss, on-policy (8 prompts x 8 samples)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(path: Path, argv: list[str], runs: list[ReportRun], rows: list[dict], out: Path, png: Path) -> None:
    crit_runs = [r for r in runs if r.loss_mode == "vanilla"]
    lines = [
        "# The lab's tasks on verl's real trainer: headroom, learning, and whether the means differ",
        "",
        "Generated by `hmpo_verl.lab.task_report` from verl's own `metrics.jsonl` of the runs listed below; do not",
        "edit by hand, rerun instead:",
        "",
        "```bash",
        shlex.join(["python", "-m", "hmpo_verl.lab.task_report", *argv]),
        "```",
        "",
        f"Versions: {versions_text()}. Machine: {os.cpu_count()} CPU cores "
        "(shared with other work while measured: timings are indicative only). Per-step data: "
        f"[`tasks_data/steps.csv`](tasks_data/steps.csv).",
        "",
        "## 1. The Fibonacci task learns from its warm start (verl's `vanilla` loss, on-policy)",
        "",
        f"Start = mean reward of steps 1-{WINDOW}, end = mean of the last {WINDOW} steps. Passes when the start is in "
        f"[{START_RANGE[0]}, {START_RANGE[1]}] and the rise is >= {MIN_RISE}.",
        "",
        "| seed | steps | start | end | rise | passes |",
        "|---|---|---|---|---|---|",
    ]
    for run in crit_runs:
        reward = [r[REWARD] for r in sorted((x for x in rows if x["seed"] == run.seed and x["loss_mode"] == "vanilla"),
                                            key=lambda r: r["step"])]
        if not reward:
            lines.append(f"| {run.seed} | 0 | — | — | — | not run |")
            continue
        c = criterion(reward)
        lines.append(f"| {run.seed} | {len(reward)} | {c['start']:.3f} | {c['end']:.3f} | {c['rise']:+.3f} | "
                     f"{'yes' if c['passes'] else 'NO'} |")
    lines += ["", f"![reward curves]({os.path.relpath(png, path.parent)})", "", "Commands (one per seed):", "",
              "```bash", *[r.command(out) for r in crit_runs], "```", "",
              "## 2. Do the means of the token ratios differ? (`hmpo`, seed 1)", "",
              "Means over the logged steps. `log_ah_gap` = log A - log H of a response's token ratios (0 when every "
              "power mean coincides); `ess_frac` = Kish ESS / T of the harmonic mean's token weights (1 when uniform).",
              "",
              "| task | setting | steps | response_length/mean | actor/pm/log_ah_gap (max) | actor/pm/ess_frac (min) | "
              "actor/pg_clipfrac | s/step (median) |",
              "|---|---|---|---|---|---|---|---|"]
    for run in (r for r in runs if r.loss_mode == "hmpo"):
        mine = [x for x in rows if x["task"] == run.task and x["setting"] == run.setting and x["loss_mode"] == "hmpo"]
        if not mine:
            lines.append(f"| {run.task} | {run.setting} | 0 | not run | | | | |")
            continue
        col = {k: [x[k] for x in mine] for k in KEPT}
        times = sorted(col["timing_s/step"])
        lines.append(
            f"| {run.task} | {run.setting} | {len(mine)} | {_mean(col['response_length/mean']):.1f} | "
            f"{_mean(col['actor/pm/log_ah_gap']):.4f} ({max(col['actor/pm/log_ah_gap']):.4f}) | "
            f"{_mean(col['actor/pm/ess_frac']):.4f} ({min(col['actor/pm/ess_frac']):.4f}) | "
            f"{_mean(col['actor/pg_clipfrac']):.4f} | {times[len(times) // 2]:.1f} |")
    lines += ["", "Settings: `recipe` = the task's demo recipe as is (`recipes/cpu_tiny`: 16 prompts, "
              "`recipes/cpu_fibonacci`: 8 prompts; 8 samples each, 2 PPO mini-batches per rollout); `on_policy` and "
              "`stressed` = `hmpo_verl.lab.task_report.TRAINER_SETTINGS` with the common overrides "
              f"`{' '.join(COMMON_OVERRIDES)}`.", "", "Commands:", "", "```bash",
              *[r.command(out) for r in runs if r.loss_mode == "hmpo"], "```", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--seeds", type=int, default=3, help="seeds of the learning criterion (default 3)")
    parser.add_argument("--criterion-steps", type=int, default=60, help="steps of each criterion run (default 60)")
    parser.add_argument("--steps", type=int, default=16, help="steps of each mean-sensitivity run (default 16)")
    parser.add_argument("--out", default=str(REPO_ROOT / "outputs" / "task_report"))
    parser.add_argument("--docs", default=str(REPO_ROOT / "docs" / "tasks.md"))
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from tqdm import tqdm

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    out, docs = Path(args.out).resolve(), Path(args.docs).resolve()
    check_cpu_backend_installed()
    runs = planned_runs(args.seeds, args.criterion_steps, args.steps)
    failed = []
    with tqdm(runs, desc="task report runs", unit="run", dynamic_ncols=True) as bar:
        for run in bar:
            bar.set_postfix_str(f"{run.task}/{run.loss_mode}_{run.setting}/seed{run.seed}")
            if len(logged_steps(run, out)) == run.steps:
                continue
            start = time.time()
            if execute(run, out) != 0:
                failed.append(run)
                print(f"FAILED: {run.command(out)}; see {run.dir(out) / 'train.log'}", file=sys.stderr)
            bar.write(f"{run.task}/{run.loss_mode}_{run.setting}/seed{run.seed}: {time.time() - start:.0f} s")
    rows = step_rows(runs, out)
    data = docs.parent / "tasks_data" / "steps.csv"
    data.parent.mkdir(parents=True, exist_ok=True)
    import pandas as pd

    pd.DataFrame(rows).to_csv(data, index=False)
    png = docs.parent / "tasks_figures" / "fibonacci_vanilla_reward.png"
    plot_criterion([r for r in rows if r["loss_mode"] == "vanilla"], png)
    write_report(docs, argv, runs, rows, out, png)
    print(docs.read_text())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
