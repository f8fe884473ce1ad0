"""verl's off-policy trainers on CPU, measured: the three trainers side by side, and the lags that
fully-async's staleness settings produce.

    python -m hmpo_verl.lab.async_report [--out outputs/async_report] [--steps 40] [--sweep-steps 10]

1. ``compare``: ``python -m hmpo_verl.lab.cpu_demo --trainer T --steps N`` for T = sync,
   one_step_off, fully_async (hmpo, fibonacci, the recipes as they stand): seconds per step,
   reward over steps, the lag distribution, ``actor/pm/log_ah_gap`` overall and per lag.
2. ``sweep``: fully_async for a few steps at each of :data:`SWEEP` (staleness_threshold s,
   trigger_parameter_sync_step T, partial_rollout) against the bound verl's staleness count
   sets: the rollouter generates at most (1 + s) x a sync's prompts per weight version
   (counting those queued or in flight at the sync), so at most a share min(s, 1) of a
   version's samples come from older versions, and -- as long as each sample is generated
   within one version -- none more than ceil(s) versions old. A partial rollout resumed after
   a sync is counted afresh in the next version but keeps its oldest version, so with partial
   rollout the lag (counted from the oldest token) can exceed ceil(s).

A run whose ``summary.json`` exists is read, not run again (delete its folder to re-run).
Writes ``report.md`` (the tables in the README) and ``report.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from hmpo_verl.lab.cpu_demo import GAP, LAG, REWARD, STEP_TIME, trained_steps
from hmpo_verl.lab.tasks import REPO_ROOT
from hmpo_verl.staleness import BUCKETS

TRAINERS = ("sync", "one_step_off", "fully_async")
PARTIAL = "fully_async/partial/partial_ratio"


@dataclass(frozen=True)
class Setting:
    """One fully-async configuration of the sweep."""

    staleness: float
    trigger: int
    partial: bool

    @property
    def name(self) -> str:
        return f"s{self.staleness:g}_T{self.trigger}_{'partial' if self.partial else 'nopartial'}"

    def overrides(self) -> list[str]:
        # require_batches x trigger = 2 mini-batches of 4 prompts per sync, as the recipe
        return [f"async_training.staleness_threshold={self.staleness}",
                f"async_training.trigger_parameter_sync_step={self.trigger}",
                f"async_training.require_batches={2 // self.trigger}",
                f"async_training.partial_rollout={str(self.partial).lower()}"]

    def bound(self) -> tuple[float, int]:
        """(largest share of a version's samples from older versions, largest lag of a sample generated
        within one version), from verl's staleness count."""
        return min(self.staleness, 1.0), math.ceil(self.staleness)


SWEEP = (Setting(0.0, 1, True), Setting(0.5, 1, True), Setting(2.0, 1, True), Setting(2.0, 1, False),
         Setting(0.5, 2, True))


def run_demo(run_dir: Path, trainer: str, steps: int, overrides: list[str]) -> dict:
    """The demo's run in ``run_dir`` (run now unless its summary exists): (summary, per-step records)."""
    if not (run_dir / "summary.json").exists():
        cmd = [sys.executable, "-m", "hmpo_verl.lab.cpu_demo", "--trainer", trainer, "--steps", str(steps),
               "--run-dir", str(run_dir), "--", *overrides]
        print("running:", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, cwd=REPO_ROOT, check=True)
    records = trained_steps(run_dir / "metrics.jsonl")
    return {"summary": json.loads((run_dir / "summary.json").read_text()), "steps": records}


def _values(records: list[dict], key: str) -> list[float]:
    return [float(r["data"][key]) for r in records if key in r["data"]]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def trainer_row(name: str, run: dict) -> dict:
    """One trainer's figures: speed, reward, lag, log A - log H overall and per lag."""
    steps, summary = run["steps"], run["summary"]
    reward = _values(steps, REWARD)
    row = {
        "trainer": name,
        "steps": len(steps),
        "startup_s": summary.get("until_first_step_s"),
        "wall_s_per_step": (summary["total_s"] - summary["until_first_step_s"]) / max(1, len(steps) - 1),
        "median_step_s": statistics.median(_values(steps, STEP_TIME)[1:]),
        "reward_first5": _mean(reward[:5]),
        "reward_last5": _mean(reward[-5:]),
        "lag_mean": _mean(_values(steps, LAG)),
        "log_ah_gap": _mean(_values(steps, GAP)),
    }
    for bucket in BUCKETS:
        row[f"share_{bucket}"] = _mean(_values(steps, f"training/lag/share_{bucket}"))
        row[f"gap_lag{bucket}"] = _mean(_values(steps, f"actor/pm/lag{bucket}/log_ah_gap"))
        row[f"clipfrac_lag{bucket}"] = _mean(_values(steps, f"actor/pm/lag{bucket}/pg_clipfrac"))
    return row


def setting_row(setting: Setting, run: dict) -> dict:
    """One sweep setting: the lags measured against the bound, step by step."""
    steps = run["steps"]
    stale = [1.0 - s for s in _values(steps, "training/lag/share_0")]
    max_share, max_lag = setting.bound()
    lags = _values(steps, "training/lag/max")
    return {
        "setting": setting.name,
        "bound_stale_share": max_share,
        "bound_max_lag": max_lag,
        "stale_share_mean": _mean(stale),
        "stale_share_max": max(stale),
        "max_lag": max(lags),
        "partial_ratio_mean": _mean(_values(steps, PARTIAL)),
        "within": max(stale) <= max_share + 1e-9 and max(lags) <= max_lag,
        **{f"share_{b}": _mean(_values(steps, f"training/lag/share_{b}")) for b in BUCKETS},
        **{f"gap_lag{b}": _mean(_values(steps, f"actor/pm/lag{b}/log_ah_gap")) for b in BUCKETS},
        **{f"clipfrac_lag{b}": _mean(_values(steps, f"actor/pm/lag{b}/pg_clipfrac")) for b in BUCKETS},
    }


def _f(value, digits=3) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown(trainers: list[dict], settings: list[dict]) -> str:
    shares = "/".join(BUCKETS)
    lines = [
        f"| trainer | steps | start-up to step 1 (s) | wall s/step | median `timing_s/step` | reward first 5 → last 5 "
        f"| lag mean | share at lag {shares} | `log_ah_gap` | at lag 0 / 1 | clip fraction at lag 0 / 1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in trainers:
        lines.append(
            f"| {r['trainer']} | {r['steps']} | {_f(r['startup_s'], 0)} | {_f(r['wall_s_per_step'], 2)} "
            f"| {_f(r['median_step_s'], 2)} | {_f(r['reward_first5'])} → {_f(r['reward_last5'])} | {_f(r['lag_mean'], 2)} "
            f"| {'/'.join(_f(r[f'share_{b}'], 2) for b in BUCKETS)} | {_f(r['log_ah_gap'], 4)} "
            f"| {_f(r['gap_lag0'], 4)} / {_f(r['gap_lag1'], 4)} | {_f(r['clipfrac_lag0'])} / {_f(r['clipfrac_lag1'])} |")
    lines += [
        "",
        f"| fully_async setting | bound: stale share ≤, lag ≤ | stale share mean (max) | largest lag | share at lag {shares} "
        "| partial-rollout share | `log_ah_gap` at lag 0 / 1 / 2 | within the bound |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in settings:
        lines.append(
            f"| {r['setting']} | {_f(r['bound_stale_share'], 2)}, {r['bound_max_lag']} "
            f"| {_f(r['stale_share_mean'], 2)} ({_f(r['stale_share_max'], 2)}) | {_f(r['max_lag'], 0)} "
            f"| {'/'.join(_f(r[f'share_{b}'], 2) for b in BUCKETS)} | {_f(r['partial_ratio_mean'], 2)} "
            f"| {_f(r['gap_lag0'], 4)} / {_f(r['gap_lag1'], 4)} / {_f(r['gap_lag2'], 4)} | {'yes' if r['within'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO_ROOT / "outputs" / "async_report"))
    parser.add_argument("--steps", type=int, default=40, help="steps of each trainer's run (compare)")
    parser.add_argument("--sweep-steps", type=int, default=10, help="steps of each fully_async setting (sweep)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    trainers = [trainer_row(t, run_demo(out / t, t, args.steps, [])) for t in TRAINERS]
    settings = [setting_row(s, run_demo(out / "sweep" / s.name, "fully_async", args.sweep_steps,
                                        [*s.overrides(), "trainer.val_before_train=false", "trainer.test_freq=100"]))
                for s in SWEEP]
    report = markdown(trainers, settings)
    (out / "report.md").write_text(report)
    (out / "report.json").write_text(json.dumps({"trainers": trainers, "settings": settings}, indent=2))
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
