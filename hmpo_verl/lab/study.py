"""Comparative study: GRPO vs GSPO vs GMPO vs HMPO vs power means vs AGM vs adaptive p vs
power-mean/AGM advantages, on verl's real trainer (CPU, the tiny addition task).

    python -m hmpo_verl.lab.study            # every method x 3 seeds x 2 regimes, 2 runs at a time (70 min here)
    python -m hmpo_verl.lab.study --quick    # 2 methods x 1 seed x 2 regimes x 4 steps (a few minutes)

Each run is `python -m verl.trainer.main_ppo` with the CPU recipe `recipes/cpu_tiny/hmpo.yaml`
plus the method's and regime's Hydra overrides (printed in `docs/study.md`); verl's own
file logger keeps its metrics (`<out>/runs/<regime>/<method>/seed<k>/metrics.jsonl`).
Finished runs are skipped when the command is run again (delete a run's folder to redo it).

Regimes:
  * on_policy — one PPO epoch, one mini-batch per step: every update starts at ratio 1.
  * stressed — stale, off-policy updates (4 mini-batches x 2 PPO epochs = 8 updates per
    rollout) *and* a training-inference mismatch: the rollout server reports log-probs
    with Gaussian noise of sd 0.05 (`VERL_CPU_LOGPROB_NOISE_STD`, the sd of the log-ratio
    measured between vLLM and a bf16 trainer, DESIGN.md section 3) and verl's
    `algorithm.rollout_correction.bypass_mode=true` makes those log-probs the behaviour
    policy, so even the first update sees ratios != 1.

Outputs: in `<out>` (default `outputs/study`) `steps.csv` (per-step metrics of every run),
`summary.csv` (per run) and `table.md`; the report `docs/study.md` (figures, table, exact
command, versions, and a reading generated from the numbers: which differences from the
GRPO baseline are inside the noise) with its PNGs in `docs/study_figures/` (`reward.png`,
`clipfrac.png`, `ess.png`, `grad_norm.png`: one panel per regime, mean over seeds with a
min-max band).

Definitions:
  * reward: verl's `critic/score/mean` (mean reward of the step's sampled responses).
  * final reward: mean reward of the last `--final-window` steps; AUC: mean reward over
    all steps (area under the curve / steps).
  * steps to threshold: first step (>= 3) whose 3-step moving average reaches
    `--threshold` (absent if never).
  * collapse: a non-finite loss or gradient norm in any step, or a 3-step moving average
    of the reward that, after having risen at least 0.05 above the run's first value,
    ends below that first value.
  * 95 % confidence intervals: mean over seeds +- t(0.975, n-1) * sd / sqrt(n); a
    difference from GRPO is "inside the noise" when Welch's 95 % interval for it
    contains 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from hmpo_verl.lab.cpu_demo import REPO_ROOT, check_cpu_backend_installed, read_metrics, trainer_command, trainer_env
from hmpo_verl.lab.tasks import get_task

REWARD = "critic/score/mean"
CLIPFRAC = "actor/pg_clipfrac"
ESS = "actor/pm/ess_frac"
GRAD_NORM = "actor/grad_norm"
LOSS = "actor/pg_loss"
KEPT_METRICS = (REWARD, CLIPFRAC, ESS, GRAD_NORM, LOSS, "actor/ppo_kl", "actor/pm/power", "actor/pm/log_ah_gap",
                "actor/pm/seq_ratio_mean", "critic/pm/adv_conservation", "timing_s/step")
BASELINE = "grpo"
TASK = get_task("addition")
_POLICY_LOSS = "actor_rollout_ref.actor.policy_loss"


@dataclass(frozen=True)
class Method:
    name: str
    loss_mode: str
    overrides: tuple[str, ...] = ()
    note: str = ""


METHODS = (
    Method("grpo", "vanilla", note="verl's vanilla PPO/GRPO loss (the baseline)"),
    Method("gspo", "gspo", ("actor_rollout_ref.actor.clip_ratio_low=3e-4", "actor_rollout_ref.actor.clip_ratio_high=4e-4"),
           "verl's gspo, GSPO's sequence clip 3e-4/4e-4"),
    Method("gmpo", "geo_mean", ("actor_rollout_ref.actor.clip_ratio_low=0.4", "actor_rollout_ref.actor.clip_ratio_high=0.4"),
           "verl's geo_mean, GMPO's log clip +-0.4"),
    Method("hmpo", "hmpo", note="harmonic mean, token clip"),
    Method("pm_p0.5", "power_mean", (f"+{_POLICY_LOSS}.power=0.5",), "power mean p=0.5, token clip"),
    Method("pm_p-2", "power_mean", (f"+{_POLICY_LOSS}.power=-2.0",), "power mean p=-2, token clip"),
    Method("agm", "agm", note="arithmetic-harmonic mean (exact limit), token clip"),
    Method("adaptive", "adaptive_power_mean", (f"{_POLICY_LOSS}._target_=hmpo_verl.AdaptivePowerMeanLossConfig",),
           "clip-aware ESS rule, defaults"),
    Method("pm_adv", "vanilla", ("algorithm.adv_estimator=power_mean", "algorithm._target_=hmpo_verl.PowerMeanAlgoConfig",
                                 "+algorithm.risk_beta=2.0"), "vanilla loss, power-mean advantage beta=2 (RS-GRPO)"),
    Method("agm_adv", "vanilla", ("algorithm.adv_estimator=agm", "algorithm._target_=hmpo_verl.PowerMeanAlgoConfig",
                                  "+algorithm.risk_beta=1.0"), "vanilla loss, AGM advantage beta=1"),
)
METHODS_BY_NAME = {m.name: m for m in METHODS}


@dataclass(frozen=True)
class Regime:
    name: str
    overrides: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    note: str = ""


# Both regimes: 8 prompts x 8 samples per step (the recipe's 16 would double the rollout time,
# which dominates a step on this CPU), so that the default study fits its budget.
COMMON_OVERRIDES = ("data.train_batch_size=8", "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=64")

REGIMES = (
    Regime("on_policy", ("actor_rollout_ref.actor.ppo_mini_batch_size=8", "actor_rollout_ref.actor.ppo_epochs=1",
                         "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=64"),
           note="1 PPO epoch x 1 mini-batch per rollout"),
    Regime("stressed", ("actor_rollout_ref.actor.ppo_mini_batch_size=2", "actor_rollout_ref.actor.ppo_epochs=2",
                        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16",
                        "algorithm.rollout_correction.bypass_mode=true"),
           (("VERL_CPU_LOGPROB_NOISE_STD", "0.05"),),
           note="4 mini-batches x 2 PPO epochs per rollout; behaviour log-probs with N(0, 0.05^2) noise"),
)
REGIMES_BY_NAME = {r.name: r for r in REGIMES}


@dataclass(frozen=True)
class Run:
    regime: Regime
    method: Method
    seed: int

    def dir(self, out: Path) -> Path:
        return out / "runs" / self.regime.name / self.method.name / f"seed{self.seed}"


# ----------------------------------------------------------------------------- running


def run_overrides(run: Run) -> list[str]:
    return [*COMMON_OVERRIDES, *run.regime.overrides, *run.method.overrides, f"data.seed={run.seed}",
            f"actor_rollout_ref.rollout.seed={run.seed}", "trainer.val_before_train=false", "trainer.test_freq=-1",
            f"trainer.experiment_name={run.regime.name}-{run.method.name}-seed{run.seed}"]


def is_finished(run: Run, out: Path, steps: int) -> bool:
    result = run.dir(out) / "result.json"
    if not result.exists():
        return False
    data = json.loads(result.read_text())
    return data.get("exit_code") == 0 and data.get("steps") == steps


def execute(run: Run, assets, out: Path, steps: int) -> dict:
    """One verl run, quiet; writes result.json (exit code, steps, wall time)."""
    run_dir = run.dir(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.jsonl", "result.json", "rollout_trace.jsonl"):
        (run_dir / stale).unlink(missing_ok=True)
    cmd = trainer_command(TASK, assets, run_dir, steps, run.method.loss_mode, run_overrides(run))
    env = {**trainer_env(run_dir), **dict(run.regime.env)}
    start = time.time()
    with open(run_dir / "train.log", "w") as log:
        code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT).returncode
    result = {"exit_code": code, "steps": len(read_metrics(run_dir / "metrics.jsonl")), "wall_s": time.time() - start,
              "command": " ".join(cmd[1:])}
    (run_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result


def run_all(runs: list[Run], assets, out: Path, steps: int, parallel: int) -> list[tuple[Run, dict]]:
    """Run what is not finished yet, `parallel` at a time, with a progress bar over runs."""
    from tqdm import tqdm

    todo = [r for r in runs if not is_finished(r, out, steps)]
    done = len(runs) - len(todo)
    failures = []
    with tqdm(total=len(runs), initial=done, desc="study runs", unit="run", dynamic_ncols=True) as bar, \
            ThreadPoolExecutor(max_workers=parallel) as pool:
        for run, result in zip(todo, pool.map(lambda r: execute(r, assets, out, steps), todo)):
            bar.set_postfix_str(f"{run.regime.name}/{run.method.name}/seed{run.seed} {result['wall_s']:.0f}s")
            bar.update(1)
            if result["exit_code"] != 0:
                failures.append((run, result))
    return failures


# ----------------------------------------------------------------------------- analysis


def load_steps(runs: list[Run], out: Path):
    """Long table: one row per (run, step) with the kept metrics."""
    import pandas as pd

    rows = []
    for run in runs:
        for record in read_metrics(run.dir(out) / "metrics.jsonl"):
            data = record["data"]
            if REWARD not in data:
                continue
            logged = [data[k] for k in (GRAD_NORM, LOSS, REWARD) if k in data]
            rows.append({"regime": run.regime.name, "method": run.method.name, "seed": run.seed,
                         "step": int(record["step"]), "non_finite": not all(math.isfinite(v) for v in logged),
                         **{k: data.get(k, math.nan) for k in KEPT_METRICS}})
    return pd.DataFrame(rows)


def _moving_average(values: list[float], window: int = 3) -> list[float]:
    return [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1]) for i in range(len(values))]


def run_summary(reward: list[float], non_finite: bool, threshold: float, final_window: int) -> dict:
    """Final reward, AUC, steps to threshold and collapse of one run's reward curve.

    `non_finite`: some step logged a non-finite loss, gradient norm or reward.
    """
    smooth = _moving_average(reward)
    # a full window is needed: a single early step above the threshold is sampling noise
    reached = next((i + 1 for i, v in enumerate(smooth) if i >= 2 and v >= threshold), None)
    rose = any(v >= reward[0] + 0.05 for v in smooth)
    return {
        "final_reward": sum(reward[-final_window:]) / len(reward[-final_window:]),
        "auc": sum(reward) / len(reward),
        "start_reward": reward[0],
        "steps_to_threshold": reached,
        "collapsed": bool(non_finite or (rose and smooth[-1] < reward[0])),
    }


def summarize_runs(steps, threshold: float, final_window: int):
    import pandas as pd

    rows = []
    for (regime, method, seed), df in steps.sort_values("step").groupby(["regime", "method", "seed"]):
        rows.append({"regime": regime, "method": method, "seed": seed,
                     **run_summary(df[REWARD].tolist(), bool(df["non_finite"].any()), threshold, final_window)})
    return pd.DataFrame(rows)


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95 % t interval (nan half-width for one value)."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)


def welch_diff_ci(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """mean(a) - mean(b) and Welch's 95 % interval (lo, hi); nan bounds with < 2 values a side."""
    from scipy import stats

    ma, mb = sum(a) / len(a), sum(b) / len(b)
    if len(a) < 2 or len(b) < 2:
        return ma - mb, math.nan, math.nan
    va = sum((v - ma) ** 2 for v in a) / (len(a) - 1) / len(a)
    vb = sum((v - mb) ** 2 for v in b) / (len(b) - 1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return ma - mb, ma - mb, ma - mb
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = stats.t.ppf(0.975, dof) * se
    return ma - mb, ma - mb - half, ma - mb + half


def _fmt(mean: float, half: float) -> str:
    return f"{mean:.3f}" if math.isnan(half) else f"{mean:.3f} ± {half:.3f}"


def results_table(summary) -> str:
    """Markdown table per regime and method."""
    lines = ["| regime | method | runs | final reward | AUC | steps to threshold (median) | collapsed |",
             "|---|---|---|---|---|---|---|"]
    for (regime, method), df in summary.groupby(["regime", "method"], sort=False):
        reached = [v for v in df["steps_to_threshold"].tolist() if v is not None and not math.isnan(v)]
        median = sorted(reached)[len(reached) // 2] if reached else None
        lines.append(
            f"| {regime} | {method} | {len(df)} | {_fmt(*mean_ci(df['final_reward'].tolist()))} | "
            f"{_fmt(*mean_ci(df['auc'].tolist()))} | "
            f"{'never' if median is None else f'{int(median)} ({len(reached)}/{len(df)} reached)'} | "
            f"{int(df['collapsed'].sum())}/{len(df)} |"
        )
    return "\n".join(lines)


def reading(summary) -> list[str]:
    """Sentences generated from the numbers: each method's difference from GRPO, with Welch's 95 % CI."""
    out = []
    for regime, df in summary.groupby("regime", sort=False):
        base = df[df["method"] == BASELINE]
        if base.empty:
            continue
        inside, outside = [], []
        for method, mdf in df.groupby("method", sort=False):
            if method == BASELINE:
                continue
            for metric in ("final_reward", "auc"):
                diff, lo, hi = welch_diff_ci(mdf[metric].tolist(), base[metric].tolist())
                text = f"{method} {metric.replace('_', ' ')} {diff:+.3f}"
                if math.isnan(lo):
                    inside.append(text + " (one seed: no interval)")
                elif lo <= 0 <= hi:
                    inside.append(f"{text} [{lo:+.3f}, {hi:+.3f}]")
                else:
                    outside.append(f"{text} [{lo:+.3f}, {hi:+.3f}]")
        comparisons = len(inside) + len(outside)
        out.append(f"**{regime}** — differences from {BASELINE} whose 95 % interval excludes 0: "
                   + ("; ".join(outside) if outside else "none") + ".")
        out.append("Inside the noise (interval contains 0): " + ("; ".join(inside) if inside else "none") + ".")
        out.append(f"{comparisons} comparisons in this regime: at 95 % about {0.05 * comparisons:.1f} of them would "
                   "exclude 0 by chance alone, so a lone excluded interval is weak evidence.")
        collapsed = df[df["collapsed"]]
        if not collapsed.empty:
            out.append("Collapsed runs: " + ", ".join(f"{r.method}/seed{r.seed}" for r in collapsed.itertuples()) + ".")
    return out


def plot_curves(steps, out: Path) -> list[Path]:
    """One PNG per metric: a panel per regime, mean over seeds per method with a min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    regimes = list(dict.fromkeys(steps["regime"]))
    for metric, label, name in ((REWARD, "mean reward", "reward"), (CLIPFRAC, "clip fraction", "clipfrac"),
                                (ESS, "ESS / T (power-mean losses)", "ess"), (GRAD_NORM, "gradient norm", "grad_norm")):
        fig, axes = plt.subplots(1, len(regimes), figsize=(6 * len(regimes), 4.2), squeeze=False)
        for ax, regime in zip(axes[0], regimes):
            for method, df in steps[steps["regime"] == regime].groupby("method", sort=False):
                by_step = df.groupby("step")[metric]
                mean = by_step.mean()
                if mean.isna().all():
                    continue
                line = ax.plot(mean.index, mean.values, label=method, linewidth=1.5 if method != BASELINE else 2.5)[0]
                ax.fill_between(mean.index, by_step.min().values, by_step.max().values, alpha=0.12,
                                color=line.get_color())
            ax.set_title(regime)
            ax.set_xlabel("training step")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[0][-1].legend(fontsize=7, loc="best", ncol=2)
        fig.suptitle(f"{label}: mean over seeds, band = min..max over seeds")
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def versions() -> dict:
    from importlib.metadata import version

    import torch

    return {"hmpo-verl": version("hmpo-verl"), "verl": version("verl"), "torch": torch.__version__,
            "python": sys.version.split()[0]}


def write_docs(path: Path, argv: list[str], config: dict, summary, pngs: list[Path], wall_s: float) -> None:
    rel = lambda p: os.path.relpath(p, path.parent)  # noqa: E731
    lines = [
        "# Comparative study on verl's real trainer (CPU, tiny addition task)",
        "",
        "Generated by `hmpo_verl.lab.study`; every number below comes from the runs it launched. Do not edit by hand:",
        "rerun the command instead.",
        "",
        "```bash",
        "python -m hmpo_verl.lab.study " + " ".join(argv),
        "```",
        "",
        f"Versions: {', '.join(f'{k} {v}' for k, v in versions().items())}. Machine: {os.cpu_count()} CPU cores. "
        f"Compute: {len(summary)} runs, {config['run_minutes']:.0f} min of run wall time in all (runs in parallel "
        f"overlap); this invocation took {wall_s / 60:.0f} min (runs finished before it are reused).",
        "",
        f"Settings: {config['steps']} training steps per run, seeds {config['seeds']}, reward threshold "
        f"{config['threshold']}, final reward = mean of the last {config['final_window']} steps. Task, model and the "
        "base recipe: `recipes/cpu_tiny/hmpo.yaml` (lr 1e-3, clip 0.2, seq-mean-token-mean) with "
        f"`{' '.join(COMMON_OVERRIDES)}` (8 prompts x 8 samples per step).",
        "",
        "## Methods and regimes",
        "",
        "| method | loss_mode | extra overrides | what |",
        "|---|---|---|---|",
        *[f"| {m.name} | {m.loss_mode} | {' '.join(m.overrides) or '—'} | {m.note} |" for m in config["methods"]],
        "",
        "| regime | overrides | environment | what |",
        "|---|---|---|---|",
        *[f"| {r.name} | {' '.join(r.overrides)} | {' '.join(f'{k}={v}' for k, v in r.env) or '—'} | {r.note} |"
          for r in config["regimes"]],
        "",
        "## Results",
        "",
        *[f"![{p.stem}]({rel(p)})" for p in pngs],
        "",
        results_table(summary),
        "",
        "## Reading (generated from the table)",
        "",
        "In the on_policy regime each update starts at ratio 1, where every mean of the token ratios and every clip",
        "coincide: the policy losses compute the same gradient there, and their spread measures run-to-run noise",
        "(sampling is not bit-reproducible). Only the advantage variants (pm_adv, agm_adv) change the update.",
        "",
        *reading(summary),
        "",
        "Definitions (collapse, intervals, AUC) are in the docstring of `hmpo_verl/study.py`. With few seeds and a",
        "tiny model the intervals are wide; a difference inside them is not evidence for either method.",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 methods x 1 seed x 2 regimes x 4 steps")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS_BY_NAME), default=None)
    parser.add_argument("--regimes", nargs="+", choices=list(REGIMES_BY_NAME), default=None)
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; --quick: 1)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 16; --quick: 4)")
    parser.add_argument("--threshold", type=float, default=0.45, help="reward threshold for 'steps to threshold'")
    parser.add_argument("--final-window", type=int, default=3, help="steps averaged for the final reward")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (default 2: their start-up phases overlap on 2 cores)")
    parser.add_argument("--out", default=str(REPO_ROOT / "outputs" / "study"))
    parser.add_argument("--assets", default=str(TASK.default_assets))
    parser.add_argument("--docs", default=None, help="markdown report (default: docs/study.md; --quick: <out>/study.md)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    quick = args.quick
    methods = [METHODS_BY_NAME[m] for m in (args.methods or (["grpo", "hmpo"] if quick else list(METHODS_BY_NAME)))]
    regimes = [REGIMES_BY_NAME[r] for r in (args.regimes or list(REGIMES_BY_NAME))]
    seeds = list(range(1, 1 + (args.seeds or (1 if quick else 3))))
    steps = args.steps or (4 if quick else 16)
    out = Path(args.out).resolve()
    docs = Path(args.docs) if args.docs else (out / "study.md" if quick else REPO_ROOT / "docs" / "study.md")

    assets = TASK.prepare_assets(args.assets, log=lambda *a: print(*a, flush=True))
    check_cpu_backend_installed()
    runs = [Run(r, m, s) for r in regimes for m in methods for s in seeds]
    print(f"{len(runs)} runs ({len(methods)} methods x {len(seeds)} seeds x {len(regimes)} regimes, {steps} steps "
          f"each) in {out}", flush=True)
    start = time.time()
    failures = run_all(runs, assets, out, steps, args.parallel)
    for run, result in failures:
        print(f"FAILED {run.regime.name}/{run.method.name}/seed{run.seed} (exit {result['exit_code']}): "
              f"see {run.dir(out) / 'train.log'}", file=sys.stderr)

    finished = [r for r in runs if is_finished(r, out, steps)]
    if not finished:
        print("no finished runs to analyse", file=sys.stderr)
        return 1
    step_table = load_steps(finished, out)
    summary = summarize_runs(step_table, args.threshold, args.final_window)
    out.mkdir(parents=True, exist_ok=True)
    step_table.to_csv(out / "steps.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    table = results_table(summary)
    (out / "table.md").write_text(table + "\n")
    figures = docs.parent / f"{docs.stem}_figures"  # beside the report, so it can be committed with it
    figures.mkdir(parents=True, exist_ok=True)
    pngs = plot_curves(step_table, figures)
    run_minutes = sum(json.loads((r.dir(out) / "result.json").read_text())["wall_s"] for r in finished) / 60
    config = {"steps": steps, "seeds": seeds, "threshold": args.threshold, "final_window": args.final_window,
              "methods": methods, "regimes": regimes, "run_minutes": run_minutes}
    write_docs(docs, argv, config, summary, pngs, time.time() - start)
    print(table)
    print("\n".join(reading(summary)))
    print(f"\nwrote {out / 'steps.csv'}, {out / 'summary.csv'}, {', '.join(p.name for p in pngs)} and {docs}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
