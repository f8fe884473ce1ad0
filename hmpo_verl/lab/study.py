"""The comparative study: GRPO vs verl's modern losses vs the power-mean family, powered.

    python -m hmpo_verl.lab.study --pilot     # the first 5 seeds of every method and regime: sizes the seeds
    python -m hmpo_verl.lab.study             # every method x regime x seeds (seeds from the pilot, >= 5)
    python -m hmpo_verl.lab.study --quick     # 3 methods x 2 regimes x 1 seed x few steps (a smoke run)
    python -m hmpo_verl.lab.study --confirm   # + the subset on verl's real trainer, side by side

Runs use the lean loop of :mod:`hmpo_verl.lab.lean` (a directly driven HF model trained with
verl's own registered policy losses, ``agg_loss``, advantage estimators and rollout
correction); ``--confirm`` re-runs vanilla, hmpo and gspo in the ``confirm`` regime on
``python -m verl.trainer.main_ppo`` and reports both paths side by side.

Resumable: each run is one JSON file under ``<out>/runs/<regime>/<method>/seed<k>.json``
(written when the run ends); a run whose file exists with the same settings is skipped.
Every seed k gives every method the same initial model, data order and sampling stream
(paired design); the evaluation is exact (``lean.expected_reward``), so it adds no noise; comparisons with the GRPO baseline (``vanilla``) are
paired t intervals over seeds, corrected with Holm's method across all of them.

Outputs: ``docs/study.md`` (generated), ``docs/study_figures/*.png``, ``docs/study_data/``
(``summary.csv``: regime,method,seed,first_reward,final_reward,auc,collapsed, one row per
run; ``run_details.csv``: drawdown, steps to threshold; ``steps.csv.gz``: per-step metrics;
``comparisons.csv``; ``pilot.json``; ``confirm.csv``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

from hmpo_verl.lab import lean, stats
from hmpo_verl.lab.cpu_demo import REPO_ROOT

DEFAULT_TASK = "fibonacci"
DEFAULT_REGIMES = ("on_policy", "stale", "mismatch", "stressed")
QUICK_METHODS = ("vanilla", "hmpo", "gspo")
# the pilot is the plan's first seeds, every method: its runs are reused by the study, and sizing on a
# few methods missed the noisiest ones; 3 seeds (2 degrees of freedom) are too rough to size on
PILOT_SEEDS = 5
# cap of a regime's seeds: measured here, a run takes ~4.8 s of wall time two at a time, so the pilot's
# sizes capped at 32 (1460 runs) take ~120 min, inside the 150-minute budget with a margin for a loaded
# machine; the uncapped sizes of the pilot (stressed: 57 seeds, 2034 runs) would take ~165 min
MAX_SEEDS = 32
# on_policy is the control: every update starts at ratio 1, where all the policy losses have vanilla's
# gradient, so by default it runs the baseline, one policy loss of ours (to show the coincidence) and the
# advantage variants (the only methods that change the update there)
CONTROL_METHODS = ("vanilla", "hmpo", "pm_adv", "agm_adv")
CONFIRM_METHODS = ("vanilla", "hmpo", "gspo")
CONFIRM_REGIME = "stressed"  # both sources of off-policyness; the trainer runs it as the lean loop
FINAL_WINDOW = stats.SMOOTH  # steps averaged for a final reward (evaluation curve; training curve in the confirmation)


@dataclass(frozen=True)
class Run:
    regime: str
    method: str
    seed: int

    def path(self, out: Path) -> Path:
        return out / "runs" / self.regime / self.method / f"seed{self.seed}.json"


def plan_runs(methods: list[str], n_seeds: dict[str, int], control_only: bool = True) -> list[Run]:
    """Seeds 1..n_seeds[regime] of every method in every regime, seed-major (a sweep cut short leaves
    whole seeds); with ``control_only`` the ``on_policy`` control runs only ``CONTROL_METHODS``."""
    return [Run(regime, method, seed) for seed in range(1, max(n_seeds.values()) + 1)
            for regime, n in n_seeds.items() if seed <= n for method in methods
            if not control_only or regime != "on_policy" or method in CONTROL_METHODS]


# ----------------------------------------------------------------------------- running (lean loop)

_TASK_CACHE: dict = {}


def _worker_run(run: Run, task_name: str, assets: str, steps: int, settings: dict, out: str, queue) -> dict:
    """One lean run in a worker process (1 thread); result written to its JSON file."""
    import torch

    torch.set_num_threads(1)
    key = (task_name, assets, settings["max_response_length"])
    if key not in _TASK_CACHE:
        _TASK_CACHE[key] = lean.load_task(task_name, assets, settings["max_response_length"], log=None)
    task = _TASK_CACHE[key]
    start = time.time()
    result = lean.train(task, lean.METHODS_BY_NAME[run.method], lean.REGIMES_BY_NAME[run.regime], run.seed, steps,
                        lean.LoopSettings(**settings), progress=(lambda s: queue.put(1)) if queue else None)
    record = {"run": asdict(run), "task": task_name, "steps": steps, "settings": settings, "wall_s": time.time() - start,
              "first_eval": result.first_eval, "metrics": result.steps}
    path = run.path(Path(out))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)
    return record


def is_done(run: Run, out: Path, task: str, steps: int, settings: dict) -> bool:
    path = run.path(out)
    if not path.exists():
        return False
    data = json.loads(path.read_text())
    return data.get("task") == task and data.get("steps") == steps and data.get("settings") == settings


def run_all(runs: list[Run], task: str, assets: str, steps: int, settings: dict, out: Path, parallel: int) -> None:
    """Run what is not done, ``parallel`` processes at a time, with a progress bar over training steps."""
    import multiprocessing as mp

    from tqdm import tqdm

    todo = [r for r in runs if not is_done(r, out, task, steps, settings)]
    total = len(runs) * steps
    with tqdm(total=total, initial=(len(runs) - len(todo)) * steps, desc="study", unit="step",
              dynamic_ncols=True) as bar:
        if not todo:
            return
        ctx = mp.get_context("spawn")
        with ctx.Manager() as manager, ProcessPoolExecutor(max_workers=parallel, mp_context=ctx) as pool:
            queue = manager.Queue()
            futures = {pool.submit(_worker_run, r, task, assets, steps, settings, str(out), queue): r for r in todo}
            pending = set(futures)
            while pending:
                while not queue.empty():
                    queue.get()
                    bar.update(1)
                finished = {f for f in pending if f.done()}
                for f in finished:
                    run = futures[f]
                    f.result()  # re-raise a worker's error
                    bar.set_postfix_str(f"{run.regime}/{run.method}/seed{run.seed}")
                pending -= finished
                time.sleep(0.5)
            while not queue.empty():
                queue.get()
                bar.update(1)


def load_runs(runs: list[Run], out: Path):
    """(summary rows, step rows) of the finished runs."""
    summary, steps = [], []
    for run in runs:
        path = run.path(out)
        if not path.exists():
            continue
        data = json.loads(path.read_text())
        metrics = data["metrics"]
        outcome = stats.run_outcomes([m["eval_reward"] for m in metrics], data["first_eval"],
                                     any(m["non_finite"] for m in metrics))
        summary.append({"regime": run.regime, "method": run.method, "seed": run.seed, **outcome,
                        **training_curve_outcomes([m["reward"] for m in metrics], metrics), "wall_s": data["wall_s"]})
        for m in metrics:
            steps.append({"regime": run.regime, "method": run.method, "seed": run.seed, **m})
    return summary, steps


# loss metrics the confirmation compares, as verl's trainer and the lean loop both log them (per step)
CONFIRM_LOSS_METRICS = {"clipfrac": "actor/pg_clipfrac", "ppo_kl": "actor/ppo_kl", "log_ah_gap": "actor/pm/log_ah_gap"}


def training_curve_outcomes(rewards: list[float], metrics: list[dict]) -> dict:
    """What both verl's trainer and the lean loop log, for the confirmation: final training reward (mean
    of the last ``FINAL_WINDOW`` steps), training-reward AUC, and the step mean of each loss metric of
    ``CONFIRM_LOSS_METRICS`` (NaN where a loss does not log it, e.g. log_ah_gap for verl's losses)."""
    out = {"final_train_reward": sum(rewards[-FINAL_WINDOW:]) / len(rewards[-FINAL_WINDOW:]),
           "train_auc": sum(rewards) / len(rewards)}
    for name, key in CONFIRM_LOSS_METRICS.items():
        values = [m[key] for m in metrics if key in m]
        out[name] = sum(values) / len(values) if values else math.nan
    return out


# ----------------------------------------------------------------------------- analysis


def comparisons(summary, methods: list[str], regimes: list[str]) -> list[dict]:
    """Paired differences from the baseline (final reward: primary, Holm-corrected; AUC: secondary)."""
    import pandas as pd

    frame = pd.DataFrame(summary)
    rows = []
    for regime in regimes:
        base = frame[(frame.regime == regime) & (frame.method == lean.BASELINE)].set_index("seed")
        for method in methods:
            if method == lean.BASELINE:
                continue
            other = frame[(frame.regime == regime) & (frame.method == method)].set_index("seed")
            seeds = sorted(set(base.index) & set(other.index))
            if not seeds:
                continue
            row = {"regime": regime, "method": method, "n": len(seeds)}
            for metric in ("final_reward", "auc"):
                d = stats.paired_difference(other.loc[seeds, metric].tolist(), base.loc[seeds, metric].tolist())
                row.update({f"{metric}_diff": d["diff"], f"{metric}_lo": d["lo"], f"{metric}_hi": d["hi"],
                            f"{metric}_sd": d["sd"], f"{metric}_p": d["p"]})
            row["collapsed"] = int(other.loc[seeds, "collapsed"].sum())
            row["baseline_collapsed"] = int(base.loc[seeds, "collapsed"].sum())
            rows.append(row)
    for metric in ("final_reward", "auc"):
        for row, p in zip(rows, stats.holm([r[f"{metric}_p"] for r in rows])):
            row[f"{metric}_p_holm"] = p
    return rows


def pilot_sizing(comps: list[dict], half_width: float = 0.05) -> dict:
    """Seeds needed so that the 95 % interval of every paired final-reward difference is <= +-half_width:
    overall (the largest sd) and per regime (the largest sd of the regime's comparisons)."""
    sds = [c["final_reward_sd"] for c in comps if math.isfinite(c.get("final_reward_sd", math.nan))]
    if not sds:
        return {"seeds": 5, "max_sd": None, "note": "no paired differences: 5 seeds (the floor)"}
    worst = max(sds)
    by_regime: dict[str, float] = {}
    for c in comps:
        if math.isfinite(c.get("final_reward_sd", math.nan)):
            by_regime[c["regime"]] = max(by_regime.get(c["regime"], 0.0), c["final_reward_sd"])
    return {"seeds": stats.seeds_needed(worst, half_width), "max_sd": worst, "half_width": half_width,
            "seeds_by_regime": {r: stats.seeds_needed(sd, half_width) for r, sd in by_regime.items()},
            "sds": {f"{c['regime']}/{c['method']}": c["final_reward_sd"] for c in comps}}


def _fmt(mean, half=math.nan, digits=3) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def results_table(summary, comps: list[dict], methods: list[str], regimes: list[str]) -> str:
    import pandas as pd

    frame = pd.DataFrame(summary)
    by_key = {(c["regime"], c["method"]): c for c in comps}
    lines = ["| regime | method | seeds | first | final reward | Δ final vs vanilla [95 % CI] | p (Holm) | AUC | "
             "Δ AUC [95 % CI] | collapsed | drawdown (median) | steps to +0.1 (median, reached) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for regime in regimes:
        for method in methods:
            df = frame[(frame.regime == regime) & (frame.method == method)]
            if df.empty:
                continue
            c = by_key.get((regime, method))
            diff = (f"{c['final_reward_diff']:+.3f} [{c['final_reward_lo']:+.3f}, {c['final_reward_hi']:+.3f}]"
                    if c and math.isfinite(c["final_reward_lo"]) else "—")
            ph = f"{c['final_reward_p_holm']:.3g}" if c and math.isfinite(c["final_reward_p_holm"]) else "—"
            dauc = (f"{c['auc_diff']:+.3f} [{c['auc_lo']:+.3f}, {c['auc_hi']:+.3f}]"
                    if c and math.isfinite(c["auc_lo"]) else "—")
            reached = [v for v in df["steps_to_threshold"].tolist() if v is not None and not pd.isna(v)]
            med = f"{int(sorted(reached)[len(reached) // 2])} ({len(reached)}/{len(df)})" if reached else f"never (0/{len(df)})"
            lines.append(f"| {regime} | {method} | {len(df)} | {df['first_reward'].mean():.3f} | "
                         f"{_fmt(*stats.mean_ci(df['final_reward'].tolist()))} | {diff} | {ph} | "
                         f"{_fmt(*stats.mean_ci(df['auc'].tolist()))} | {dauc} | {int(df['collapsed'].sum())}/{len(df)} | "
                         f"{df['drawdown'].median():.3f} | {med} |")
    return "\n".join(lines)


def regime_table(steps_rows, regimes: list[str]) -> str:
    """Measured log-ratio statistics per regime: the mismatch (trainer fp32 vs reported) and what the loss saw."""
    import pandas as pd

    frame = pd.DataFrame(steps_rows)
    lines = ["| regime | mismatch sd | mismatch 99.9th pct of abs | mismatch log_ah_gap | update δ sd | "
             "update δ 99.9th pct of abs | update log_ah_gap | response length |", "|---|---|---|---|---|---|---|---|"]
    for regime in regimes:
        df = frame[frame.regime == regime]
        if df.empty:
            continue
        lines.append(f"| {regime} | {df['mismatch/delta_sd'].mean():.4g} | {df['mismatch/delta_abs_p999'].mean():.4g} | "
                     f"{df['mismatch/log_ah_gap'].mean():.4g} | {df['update/delta_sd'].mean():.4g} | "
                     f"{df['update/delta_abs_p999'].mean():.4g} | {df['update/log_ah_gap'].mean():.4g} | "
                     f"{df['response_length'].mean():.1f} |")
    return "\n".join(lines)


def reading(comps: list[dict], regimes: list[str], summary) -> list[str]:
    """Sentences generated from the comparisons: what survives Holm, and what does not."""
    out = [f"{len(comps)} paired comparisons of final reward with the baseline (`{lean.BASELINE}`), "
           "Holm-corrected together (family-wise 5 %)."]
    for regime in regimes:
        rc = [c for c in comps if c["regime"] == regime]
        if not rc:
            continue
        sig = [c for c in rc if c["final_reward_p_holm"] < 0.05]
        widths = [(c["final_reward_hi"] - c["final_reward_lo"]) / 2 for c in rc if math.isfinite(c["final_reward_lo"])]
        text = f"**{regime}**: "
        if sig:
            text += "separated from vanilla after Holm: " + "; ".join(
                f"{c['method']} {c['final_reward_diff']:+.3f} [{c['final_reward_lo']:+.3f}, {c['final_reward_hi']:+.3f}]"
                for c in sig) + ". "
        else:
            text += "nothing separates any method from vanilla after Holm. "
        raw = [c for c in rc if c not in sig and math.isfinite(c["final_reward_lo"]) and
               (c["final_reward_lo"] > 0 or c["final_reward_hi"] < 0)]
        if raw:
            text += "Excluding 0 before correction only (weak evidence): " + "; ".join(
                f"{c['method']} {c['final_reward_diff']:+.3f}" for c in raw) + ". "
        if widths:
            text += f"Interval half-widths {min(widths):.3f}–{max(widths):.3f}."
        out.append(text)
    auc = [c for c in comps if c["auc_p_holm"] < 0.05]
    out.append("AUC (secondary; Holm over the AUC comparisons): " + (
        "separated from vanilla: " + "; ".join(f"{c['regime']}/{c['method']} {c['auc_diff']:+.3f} "
                                              f"[{c['auc_lo']:+.3f}, {c['auc_hi']:+.3f}]" for c in auc)
        if auc else "nothing separates any method from vanilla") + ".")
    collapsed = [s for s in summary if s["collapsed"]]
    out.append(f"Collapsed runs: {len(collapsed)} of {len(summary)} (per method in the table's `collapsed` column; "
               "which runs: `collapsed` in `docs/study_data/summary.csv`).")
    return out


def plot(steps_rows, comps, methods, regimes, figures: Path) -> list[Path]:
    """reward.png: exact expected reward per regime and step (mean over seeds, band = 95 % t interval);
    differences.png: paired final-reward differences from vanilla with their intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    import pandas as pd

    figures.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(steps_rows)
    paths = []
    fig, axes = plt.subplots(1, len(regimes), figsize=(5.5 * len(regimes), 4.5), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for ax, regime in zip(axes[0], regimes):
        for i, method in enumerate(methods):
            df = frame[(frame.regime == regime) & (frame.method == method)]
            if df.empty:
                continue
            curves = np.array([g.sort_values("step")["eval_reward"].tolist() for _, g in df.groupby("seed")])
            x = np.arange(1, curves.shape[1] + 1)
            mean = curves.mean(0)
            ax.plot(x, mean, label=method, color=cmap(i), linewidth=2.5 if method == lean.BASELINE else 1.3)
            if len(curves) > 1:
                half = stats.t_quantile(0.95, len(curves) - 1) * curves.std(0, ddof=1) / np.sqrt(len(curves))
                ax.fill_between(x, mean - half, mean + half, color=cmap(i), alpha=0.10)
        ax.set_title(regime)
        ax.set_xlabel("training step")
        ax.set_ylabel("exact expected reward (test prompts)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.suptitle("expected reward after each step: mean over seeds, band = 95 % t interval over seeds")
    paths.append(save_figure(fig, figures / "reward.png"))

    if comps:
        fig, axes = plt.subplots(1, len(regimes), figsize=(4.5 * len(regimes), 0.35 * len(methods) + 1.5),
                                 squeeze=False, sharey=True)
        names = [m for m in methods if m != lean.BASELINE]
        for ax, regime in zip(axes[0], regimes):
            for y, method in enumerate(names):
                c = next((c for c in comps if c["regime"] == regime and c["method"] == method), None)
                if c is None or not math.isfinite(c["final_reward_lo"]):
                    continue
                color = "tab:red" if c["final_reward_p_holm"] < 0.05 else "tab:blue"
                ax.errorbar(c["final_reward_diff"], y, xerr=[[c["final_reward_diff"] - c["final_reward_lo"]],
                                                             [c["final_reward_hi"] - c["final_reward_diff"]]],
                            fmt="o", color=color, capsize=3)
            ax.axvline(0, color="k", linewidth=0.8)
            ax.set_yticks(range(len(names)), names)
            ax.set_title(regime)
            ax.set_xlabel("final reward − vanilla (paired, 95 % CI)")
            ax.grid(alpha=0.3)
        fig.suptitle("paired differences from vanilla; red = significant after Holm")
        paths.append(save_figure(fig, figures / "differences.png"))
    return paths


# ----------------------------------------------------------------------------- confirmation on verl's trainer


def trainer_run(run: Run, task_name: str, assets_root: str | None, steps: int, settings: lean.LoopSettings, out: Path) -> dict:
    """The run on ``python -m verl.trainer.main_ppo`` (CPU backend), with the lean loop's settings."""
    import subprocess

    from hmpo_verl.lab.cpu_demo import read_metrics, trainer_command, trainer_env

    run_dir = out / "trainer" / run.regime / run.method / f"seed{run.seed}"
    result_path = run_dir / "result.json"
    if result_path.exists():
        data = json.loads(result_path.read_text())
        if data.get("exit_code") == 0 and data.get("steps") == steps:
            return data
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("metrics.jsonl", "result.json", "rollout_trace.jsonl"):
        (run_dir / stale).unlink(missing_ok=True)
    from hmpo_verl.lab.tasks import get_task

    task = lean.load_task(task_name, assets_root, settings.max_response_length, log=None)
    method, regime = lean.METHODS_BY_NAME[run.method], lean.REGIMES_BY_NAME[run.regime]
    overrides = [
        f"data.train_batch_size={settings.prompts_per_step}", f"actor_rollout_ref.rollout.n={settings.n}",
        f"data.max_response_length={settings.max_response_length}", f"actor_rollout_ref.actor.optim.lr={settings.lr}",
        f"actor_rollout_ref.actor.loss_agg_mode={settings.loss_agg_mode}",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=64",
        *regime.trainer_overrides(settings), *method.trainer_overrides,
        f"data.seed={run.seed}", f"actor_rollout_ref.rollout.seed={run.seed}", "trainer.val_before_train=false",
        "trainer.test_freq=-1", f"trainer.experiment_name={run.regime}-{run.method}-seed{run.seed}",
    ]
    cmd = trainer_command(get_task(task_name), task.assets, run_dir, steps, method.loss_mode, overrides)
    env = {**trainer_env(run_dir), **regime.trainer_env()}
    start = time.time()
    with open(run_dir / "train.log", "w") as log:
        code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT).returncode
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "critic/score/mean" in r["data"]]
    data = {"exit_code": code, "steps": len(records), "wall_s": time.time() - start, "command": " ".join(cmd[1:]),
            "reward": [r["data"]["critic/score/mean"] for r in records],
            "loss_metrics_seen": sorted({k for r in records for k in r["data"] if k.startswith(("actor/pm/", "rollout_corr/"))})}
    result_path.write_text(json.dumps(data, indent=2))
    return data


def confirmation(task: str, assets: str, steps: int, settings: lean.LoopSettings, seeds: list[int], out: Path,
                 log=lambda *a: print(*a, flush=True), on_row=None) -> list[dict]:
    """Trainer vs lean loop for CONFIRM_METHODS in CONFIRM_REGIME: training-curve outcomes side by side."""
    rows = []
    for seed, method in ((s, m) for s in seeds for m in CONFIRM_METHODS):  # seed-major: a cut-short run covers every method
        run = Run(CONFIRM_REGIME, method, seed)
        log(f"verl trainer: {CONFIRM_REGIME}/{method}/seed{seed}")
        data = trainer_run(run, task, assets, steps, settings, out)
        if data["exit_code"] != 0 or len(data["reward"]) < steps:
            log(f"  failed (exit {data['exit_code']}): see {out / 'trainer' / CONFIRM_REGIME / method / f'seed{seed}'}")
            continue
        from hmpo_verl.lab.cpu_demo import read_metrics

        metrics = [r["data"] for r in read_metrics(out / "trainer" / CONFIRM_REGIME / method / f"seed{seed}" /
                                                   "metrics.jsonl") if "critic/score/mean" in r["data"]]
        rows.append({"path": "trainer", "method": method, "seed": seed,
                     **training_curve_outcomes(data["reward"], metrics), "wall_s": data["wall_s"],
                     "loss_metrics_seen": " ".join(data["loss_metrics_seen"])})
        if on_row:
            on_row(rows)
    return rows


def confirmation_table(lean_summary, trainer_rows: list[dict]) -> tuple[str, list[str]]:
    """Side-by-side table (mean ± 95 % t interval per path) and, per method, Welch's interval of trainer − lean."""
    from scipy import stats as st

    lines = ["| method | path | runs | final training reward (last 5 steps) | training-reward AUC | "
             + " | ".join(f"`{key}` (step mean)" for key in CONFIRM_LOSS_METRICS.values()) + " |",
             "|---|---|---|---|---|" + "---|" * len(CONFIRM_LOSS_METRICS)]
    notes = []
    for method in CONFIRM_METHODS:
        lean_vals = [s for s in lean_summary if s["regime"] == CONFIRM_REGIME and s["method"] == method]
        tr_vals = [r for r in trainer_rows if r["method"] == method]
        for name, vals in (("lean loop", lean_vals), ("verl trainer", tr_vals)):
            if vals:
                lines.append(f"| {method} | {name} | {len(vals)} | "
                             f"{_fmt(*stats.mean_ci([v['final_train_reward'] for v in vals]))} | "
                             f"{_fmt(*stats.mean_ci([v['train_auc'] for v in vals]))} | "
                             + " | ".join(_fmt(*stats.mean_ci([v[k] for v in vals]), digits=4)
                                          for k in CONFIRM_LOSS_METRICS) + " |")
        if tr_vals:
            seen = sorted({k for v in tr_vals for k in v["loss_metrics_seen"].split()})
            notes.append(f"{method}: the trainer's runs logged {', '.join(seen) if seen else 'no actor/pm/* and no rollout_corr/* metrics'}"
                         " (our losses log actor/pm/*; verl's bypass_mode loss would log rollout_corr/*)")
        for metric in ("final_train_reward", "train_auc", *CONFIRM_LOSS_METRICS):
            a, b = [v[metric] for v in tr_vals], [v[metric] for v in lean_vals]
            if len(a) >= 2 and len(b) >= 2 and all(math.isfinite(x) for x in a + b):
                res = st.ttest_ind(a, b, equal_var=False)
                ci = res.confidence_interval(0.95)
                verdict = "agree (interval contains 0)" if ci.low <= 0 <= ci.high else "DISAGREE (interval excludes 0)"
                notes.append(f"{method} {metric}: trainer − lean {sum(a) / len(a) - sum(b) / len(b):+.4f} "
                             f"[{ci.low:+.4f}, {ci.high:+.4f}] (Welch) — {verdict}")
    return "\n".join(lines), notes


# ----------------------------------------------------------------------------- report


def save_figure(fig, path: Path) -> Path:
    """Lay out, write (PNG, 100 dpi) and close a report figure; returns its path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def versions() -> dict:
    from importlib.metadata import version

    import torch
    import transformers

    return {"hmpo-verl": version("hmpo-verl"), "verl": version("verl"), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": sys.version.split()[0]}


def write_docs(path: Path, argv: list[str], ctx: dict) -> None:
    rel = lambda p: os.path.relpath(p, path.parent)  # noqa: E731
    s: lean.LoopSettings = ctx["settings"]
    partial = ctx["missing"] > 0
    lines = [
        "# Comparative study (lean loop on verl's own losses)",
        "",
        "Generated by `hmpo_verl.lab.study`; every number below comes from the runs it made. Do not edit by hand.",
        "",
        "```bash",
        "python -m hmpo_verl.lab.study " + " ".join(argv),
        "```",
        "",
    ]
    if partial:
        lines += [f"**PARTIAL**: {ctx['done']} of the {ctx['planned']} runs of this command's plan are finished "
                  f"({ctx['missing']} missing). The tables use the finished runs only; run the command without "
                  "`--report-only` to resume.", ""]
    if ctx.get("invocations"):
        lines += ["The runs were made by:", "", *[f"* {c}" for c in ctx["invocations"]], ""]
    lines += [
        f"Versions: {', '.join(f'{k} {v}' for k, v in versions().items())}. Machine: {os.cpu_count()} CPU cores "
        f"shared with other work; each run on one thread. Run time: {ctx['run_minutes']:.0f} min of run wall time "
        f"in all (runs in parallel overlap); this invocation {ctx['wall_s'] / 60:.0f} min.",
        "",
        f"Task `{ctx['task']}`: max response length {s.max_response_length} tokens; {s.prompts_per_step} prompts x "
        f"{s.n} samples per step, {ctx['steps']} steps per run, lr {s.lr}, AdamW (weight decay {s.weight_decay}), "
        f"grad-norm clip {s.grad_clip}, `loss_agg_mode={s.loss_agg_mode}`, clip {s.clip_ratio} unless the method sets "
        f"its own, GRPO advantages with `norm_adv_by_std_in_grpo={s.norm_adv_by_std_in_grpo}`. Seeds 1..n per regime: " + ", ".join(f"{r} {n}" for r, n in ctx["seeds"].items()) + ".",
        f"Evaluation: after every step, the *exact* expected reward of temperature-1 sampling on the {ctx['eval_prompts']} "
        "test prompts — the probability the policy gives the exact answer (its tokens, then EOS), from one "
        "teacher-forced forward pass (`lean.expected_reward`), so the outcomes carry no evaluation sampling noise; "
        "only the training itself varies between seeds.",
        "",
        f"Definitions: *first* = expected reward before training; *final reward* = mean expected reward over the last "
        f"{FINAL_WINDOW} steps; *AUC* = mean expected reward over all steps; *collapsed* = a non-finite loss or "
        f"gradient norm, or a final reward ≥ {stats.COLLAPSE_DROP} below the first; *drawdown* = largest fall of the "
        f"{stats.SMOOTH}-step moving average of the expected reward below its running maximum; *steps to +0.1* = first "
        f"step, from the {stats.SMOOTH}th on, whose moving average reaches the first + 0.1.",
        "Statistics: paired by seed (seed k: same initial model, data order and sampling stream for every method); "
        "95 % paired t intervals of method − vanilla; p-values of the paired t test, Holm-corrected over all "
        "final-reward comparisons together (and separately over the AUC ones).",
        "",
        "## How it runs",
        "",
        "Each run is the lean loop of `hmpo_verl/lab/lean.py`: a directly driven HF Qwen2 model, KV-cached sampling,",
        "and per update exactly verl's registered policy loss (`get_policy_loss_fn(loss_mode)`) on a real",
        "`ActorConfig` with `global_batch_info` filled as verl's `ppo_loss` fills it, verl's `agg_loss`, verl's",
        "advantage estimators (`compute_grpo_outcome_advantage`; ours through `get_adv_estimator_fn`) and verl's",
        "`compute_rollout_correction_and_rejection_mask` for the rollout correction. The confirmation section below",
        "compares it with verl's real trainer.",
        "",
        "## Methods (settings printed from the code)",
        "",
        "| method | settings | what |",
        "|---|---|---|",
        *[f"| {m.name} | {m.settings()} | {m.note} |" for m in ctx["methods"]],
        "",
        "## Regimes and their measured log-ratios",
        "",
        "| regime | updates per rollout | sampling | reported log-prob noise | behaviour policy | what |",
        "|---|---|---|---|---|---|",
        *[f"| {r.name} | {r.mini_batches * r.epochs} | {r.sample_dtype} | "
          f"{r.noise.describe() if r.noise else '—'} | {'reported (bypass)' if r.bypass else 'recomputed by the trainer'} | "
          f"{r.note} |" for r in ctx["regimes"]],
        "",
        "Measured (mean over all steps and runs): *mismatch* = trainer fp32 log-prob − reported log-prob of the "
        "sampled tokens; *update δ* = log π_θ − log π_old as the loss saw it, over all updates.",
        "",
        regime_table(ctx["steps_rows"], [r.name for r in ctx["regimes"]]),
        "",
        ctx.get("bf16_note", ""),
        "",
        "## Results",
        "",
        *[f"![{p.stem}]({rel(p)})" for p in ctx["pngs"]],
        "",
        results_table(ctx["summary"], ctx["comps"], [m.name for m in ctx["methods"]], [r.name for r in ctx["regimes"]]),
        "",
        "## Reading (generated from the numbers)",
        "",
        "In `on_policy` every update starts at ratio 1, where all the policy losses here have the same gradient",
        "(their clips are inactive and every mean of equal ratios is 1), so that control runs the baseline, `hmpo`",
        "(its difference from vanilla measures how far rounding-level differences carry through a run) and the",
        "advantage variants, the only methods that change the update there.",
        "",
        *reading(ctx["comps"], [r.name for r in ctx["regimes"]], ctx["summary"]),
        "",
        "## Statistical power",
        "",
        ctx["power_text"],
        "",
        "## Confirmation on verl's real trainer",
        "",
        ctx["confirm_text"],
        "",
        "## Data",
        "",
        "`docs/study_data/summary.csv` (one row per run), `run_details.csv`, `comparisons.csv`, `steps.csv.gz`",
        "(per-step metrics of every run), `pilot.json`, `confirm.csv` when the confirmation ran.",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default=DEFAULT_TASK, help=f"task name (default {DEFAULT_TASK})")
    parser.add_argument("--quick", action="store_true", help="vanilla/hmpo/gspo x on_policy/stressed x 1 seed x 4 steps")
    parser.add_argument("--pilot", action="store_true", help=f"every method x {PILOT_SEEDS} seeds: size the seeds of each regime")
    parser.add_argument("--confirm", action="store_true", help="also run the confirmation on verl's real trainer")
    parser.add_argument("--report-only", action="store_true",
                        help="no new runs: write the report from the finished ones (marked PARTIAL if some are missing)")
    parser.add_argument("--methods", nargs="+", choices=list(lean.METHODS_BY_NAME), default=None)
    parser.add_argument("--regimes", nargs="+", choices=list(lean.REGIMES_BY_NAME), default=None)
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds of every regime (default: the pilot's size per regime, at least 5, at most --max-seeds)")
    parser.add_argument("--max-seeds", type=int, default=MAX_SEEDS,
                        help=f"cap of a regime's default seed count (default {MAX_SEEDS}: the 150-minute budget, see MAX_SEEDS)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 40; --quick 4)")
    parser.add_argument("--confirm-seeds", type=int, default=3)
    parser.add_argument("--confirm-steps", type=int, default=20,
                        help="steps of the trainer runs, compared with the same first steps of the lean runs (<= --steps)")
    parser.add_argument("--max-response-length", type=int, default=None, help="default: the task's")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (1 thread each)")
    parser.add_argument("--out", default=None, help="run files (default outputs/study; --quick: outputs/study_quick)")
    parser.add_argument("--assets", default=None, help="asset root (default: the task's own folder)")
    parser.add_argument("--docs", default=None, help="report (default docs/study.md; --quick: <out>/study.md)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    import pandas as pd

    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    start = time.time()
    out = Path(args.out or REPO_ROOT / "outputs" / ("study_quick" if args.quick else "study")).resolve()
    docs = Path(args.docs) if args.docs else (out / "study.md" if args.quick else REPO_ROOT / "docs" / "study.md")
    data_dir = docs.parent / f"{docs.stem}_data"
    figures = docs.parent / f"{docs.stem}_figures"
    task = lean.load_task(args.task, args.assets, args.max_response_length, log=lambda *a: print(*a, flush=True))
    settings = lean.LoopSettings(max_response_length=task.max_response_length,
                                 **({"eval_prompts": 16} if args.quick else {}))
    steps = args.steps or (4 if args.quick else 40)
    default_methods = QUICK_METHODS if args.quick else tuple(lean.METHODS_BY_NAME)
    methods = [lean.METHODS_BY_NAME[m] for m in (args.methods or default_methods)]
    regimes = [lean.REGIMES_BY_NAME[r] for r in (args.regimes or (("on_policy", "stressed") if args.quick else DEFAULT_REGIMES))]
    pilot_path = data_dir / "pilot.json"
    if args.seeds or args.quick or args.pilot or not pilot_path.exists():
        n = args.seeds or (1 if args.quick else PILOT_SEEDS if args.pilot else 5)
        n_seeds = {r.name: n for r in regimes}
    else:  # the pilot's size per regime (a regime it did not run: the largest), capped by --max-seeds
        pilot = json.loads(pilot_path.read_text())
        n_seeds = {r.name: min(pilot.get("seeds_by_regime", {}).get(r.name, pilot["seeds"]), args.max_seeds)
                   for r in regimes}
    seeds = list(range(1, max(n_seeds.values()) + 1))
    runs = plan_runs([m.name for m in methods], n_seeds, control_only=not args.methods)
    settings_dict = asdict(settings)
    print(f"{len(runs)} runs ({len(methods)} methods x {len(regimes)} regimes, seeds {n_seeds}, {steps} steps) "
          f"on task {args.task} in {out}", flush=True)
    if not args.report_only:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "invocations.jsonl", "a") as f:  # the report lists the commands that made its runs
            f.write(json.dumps({"argv": argv, "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        run_all(runs, args.task, args.assets, steps, settings_dict, out, args.parallel)

    done = [r for r in runs if is_done(r, out, args.task, steps, settings_dict)]
    summary, steps_rows = load_runs(done, out)
    if not summary:
        print("no finished runs", file=sys.stderr)
        return 1
    comps = comparisons(summary, [m.name for m in methods], [r.name for r in regimes])
    power = pilot_sizing(comps)
    if args.pilot:
        data_dir.mkdir(parents=True, exist_ok=True)
        pilot_path.write_text(json.dumps({**power, "steps": steps, "task": args.task, "pilot_seeds": seeds}, indent=2))
    power_text = _power_text(power, pilot_path, comps, n_seeds, args.max_seeds)
    trainer_rows: list[dict] = []
    if args.confirm:
        confirm_seeds = list(range(1, args.confirm_seeds + 1))
        confirm_runs = [Run(CONFIRM_REGIME, m, s) for m in CONFIRM_METHODS for s in confirm_seeds]
        run_all(confirm_runs, args.task, args.assets, steps, settings_dict, out, args.parallel)
        # the lean side: the first confirm_steps steps of the study's own runs (the same as shorter runs:
        # every stream is keyed by (seed, step))
        confirm_steps = min(args.confirm_steps, steps)
        lean_confirm = []
        for r in confirm_runs:
            if r.path(out).exists():
                metrics = json.loads(r.path(out).read_text())["metrics"][:confirm_steps]
                lean_confirm.append({"regime": r.regime, "method": r.method, "seed": r.seed,
                                     **training_curve_outcomes([m["reward"] for m in metrics], metrics)})
        data_dir.mkdir(parents=True, exist_ok=True)

        def write_confirm(rows):  # after every trainer run, so an interrupted confirmation keeps what it has
            table, notes = confirmation_table(lean_confirm, rows)
            pd.DataFrame(rows).to_csv(data_dir / "confirm.csv", index=False)
            (data_dir / "confirm.md").write_text("\n".join([
                "```bash", "python -m hmpo_verl.lab.study " + " ".join(argv), "```", "",
                f"Regime `{CONFIRM_REGIME}` ({lean.REGIMES_BY_NAME[CONFIRM_REGIME].note}), seeds {confirm_seeds}, "
                f"{confirm_steps} steps, task `{args.task}`; the trainer runs `python -m verl.trainer.main_ppo` with "
                "the task's CPU recipe and the lean loop's settings as Hydra overrides. The sampling streams of the two "
                "paths differ, so the comparison is unpaired (Welch's interval of trainer − lean). Trainer runs "
                f"finished: {len(rows)} of {len(CONFIRM_METHODS) * len(confirm_seeds)}.", "", table, "",
                *[f"* {n}" for n in notes], ""]))

        trainer_rows = confirmation(args.task, args.assets, confirm_steps, settings, confirm_seeds, out,
                                    on_row=write_confirm)
    confirm_md = data_dir / "confirm.md"
    confirm_text = (confirm_md.read_text() if confirm_md.exists() else
                    "Not run yet (`--confirm` runs it; its result is kept in `docs/study_data/confirm.md`).")
    write_outputs(data_dir, summary, steps_rows, comps)
    pngs = plot(steps_rows, comps, [m.name for m in methods], [r.name for r in regimes], figures)
    ctx = {"settings": settings, "task": args.task, "steps": steps, "seeds": n_seeds, "methods": methods,
           "regimes": regimes, "summary": summary, "steps_rows": steps_rows, "comps": comps, "pngs": pngs,
           "parallel": args.parallel, "planned": len(runs), "done": len(done), "missing": len(runs) - len(done),
           "run_minutes": sum(s["wall_s"] for s in summary) / 60, "wall_s": time.time() - start,
           "power_text": power_text, "confirm_text": confirm_text, "bf16_note": _bf16_note(steps_rows),
           "invocations": _invocations(out), "eval_prompts": min(settings.eval_prompts, len(task.test))}
    write_docs(docs, argv, ctx)
    print(results_table(summary, comps, [m.name for m in methods], [r.name for r in regimes]))
    print("\n".join(reading(comps, [r.name for r in regimes], summary)))
    print(f"\nwrote {docs}, {data_dir}, {figures}")
    return 0


def _power_text(power: dict, pilot_path: Path, comps: list[dict], n_seeds: dict[str, int], max_seeds: int) -> str:
    """The sizing (pilot, cap) and what the finished runs achieved, in sentences."""
    lines = []
    if pilot_path.exists():
        pilot = json.loads(pilot_path.read_text())
        sizes = pilot.get("seeds_by_regime", {})
        lines.append(f"Pilot (`--pilot`: seeds {pilot['pilot_seeds']} of every method, {pilot['steps']} steps): seeds "
                     f"each regime needs for a 95 % interval of at most ±{pilot.get('half_width', 0.05)} on every paired "
                     "final-reward difference (from its largest paired sd; floor 5): "
                     + ", ".join(f"{r} {n}" for r, n in sizes.items()) + f". Planned, capped at {max_seeds} seeds "
                     "(the 150-minute budget, `--max-seeds`): " + ", ".join(f"{r} {n}" for r, n in n_seeds.items()) + ".")
    else:
        lines.append("No pilot file: the default of 5 seeds was used.")
    widths = [((c["final_reward_hi"] - c["final_reward_lo"]) / 2, c) for c in comps if math.isfinite(c["final_reward_lo"])]
    if widths:
        within = sum(w <= 0.05 for w, _ in widths)
        worst, c = max(widths, key=lambda wc: wc[0])
        lines.append(f"Achieved: {within} of {len(widths)} final-reward intervals are within ±0.05; the widest is "
                     f"±{worst:.3f} ({c['regime']}/{c['method']}, {c['n']} seeds).")
    if power.get("max_sd") is not None:
        per_regime = {}
        for key, sd in power.get("sds", {}).items():
            regime = key.split("/")[0]
            per_regime[regime] = max(per_regime.get(regime, 0.0), sd)
        lines.append("In this report's own data (largest paired sd → seeds for ±0.05): " + "; ".join(
            f"{r} {sd:.3f} → {stats.seeds_needed(sd)}" for r, sd in per_regime.items()) + ".")
    lines.append(f"Comparisons corrected together: {len(comps)} (final reward); the same number for AUC.")
    return " ".join(lines)


def _invocations(out: Path) -> list[str]:
    path = out / "invocations.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [f"`python -m hmpo_verl.lab.study {' '.join(r['argv'])}` (started {r['started']})" for r in rows]


def _bf16_note(steps_rows) -> str:
    """What the real cause (bf16 sampling) alone measured, from the study's ``bf16`` runs or the fidelity benchmark."""
    import pandas as pd

    frame = pd.DataFrame(steps_rows)
    fidelity = REPO_ROOT / "docs" / "fidelity_data" / "regimes.csv"
    if "bf16" in set(frame.regime):
        bf, source = frame[frame.regime == "bf16"], "this study's `bf16` runs"
    elif fidelity.exists():
        bf = pd.read_csv(fidelity)
        bf, source = bf[bf.regime == "bf16"], "`python -m hmpo_verl.lab.bench --fidelity` (docs/fidelity.md)"
    else:
        return "The bf16 mismatch alone was not measured by this invocation."
    if bf.empty:
        return "The bf16 mismatch alone was not measured by this invocation."
    return (f"**Is the real cause big enough?** bf16 sampling alone, measured by {source}: mismatch sd "
            f"{bf['mismatch/delta_sd'].mean():.4g}, 99.9th percentile of |δ| {bf['mismatch/delta_abs_p999'].mean():.4g}, "
            f"log_ah_gap {bf['mismatch/log_ah_gap'].mean():.3g} — the means of a response's ratios barely separate "
            "(compare the stale regime's gap), so the `mismatch` regime adds the heavy-tailed noise of the table: a "
            "contaminated normal, because the real gaps are mostly tiny with a few large ones (rare tokens whose logits "
            "nearly tie), which is what separates the arithmetic from the harmonic mean.")


def write_outputs(data_dir: Path, summary, steps_rows, comps) -> None:
    import pandas as pd

    data_dir.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(summary)
    frame[["regime", "method", "seed", "first_reward", "final_reward", "auc", "collapsed"]].to_csv(
        data_dir / "summary.csv", index=False)
    frame[["regime", "method", "seed", "drawdown", "steps_to_threshold", "non_finite", "final_train_reward", "train_auc",
           "wall_s"]].to_csv(
        data_dir / "run_details.csv", index=False)
    # 6 significant digits: the metrics are float32 sums and means; full repr doubled the file past 5 MiB
    pd.DataFrame(steps_rows).to_csv(data_dir / "steps.csv.gz", index=False, float_format="%.6g")
    pd.DataFrame(comps).to_csv(data_dir / "comparisons.csv", index=False)


if __name__ == "__main__":
    sys.exit(main())
