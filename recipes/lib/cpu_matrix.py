"""Every mean file x every correction file x both tasks through `SIZE=cpu bash recipes/<task>/run.sh` (not in CI).

    python3 recipes/lib/cpu_matrix.py --out /tmp/cpu_matrix [--task gsm8k] [--mean harmonic ...] [--budget-min 60]
        [--async one_step_off]       # ASYNC for every run (recipes/async/; default none)

Builds the local sample and tiny model (recipes/lib/cpu_sample.py), runs each task's prepare step once, then
run.sh once per combination, one at a time (2 steps each: validation, 2 updates, a checkpoint), and checks
what tests/test_recipes_cpu_size.py checks for its two combinations: exit 0, steps 1-2 logged, and the
`actor/pm/*` metrics wherever the mean file's loss is ours (`grpo` and the `adv_*` files use verl's
`vanilla` loss), and with --async the lag metrics within the async file's bound (`training/lag/max` <= 1 at
step 2). Prints one line per run and a summary (passes, seconds); writes <out>/results.json.
The order covers every mean file and every correction file early (mean i with correction i mod 3, the
tasks alternating), then the remaining combinations; --budget-min stops starting new runs after that
many minutes, and the summary says how many of the combinations ran.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1]
VERL_LOSSES = {"grpo", "adv_power_mean", "adv_agm"}  # mean files whose loss is verl's vanilla (no actor/pm/*)


def stems(group: str) -> list[str]:
    return sorted(p.stem for p in (RECIPES / group).glob("*.yaml"))


def ordered(tasks: list[str], means: list[str], corrections: list[str]) -> list[tuple[str, str, str]]:
    """Every (task, mean, correction), each mean and correction (and both tasks) among the first runs."""
    first = [(tasks[i % len(tasks)], mean, corrections[i % len(corrections)]) for i, mean in enumerate(means)]
    rest = [(t, m, c) for m in means for c in corrections for t in tasks if (t, m, c) not in first]
    return first + rest


def run_one(task: str, mean: str, correction: str, sample: Path, out: Path, async_mode: str = "none") -> dict:
    run_dir = out / "-".join([task, mean, correction] + ([] if async_mode == "none" else [async_mode]))
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHON": sys.executable, "SIZE": "cpu", "MEAN": mean, "CORRECTION": correction,
           "ASYNC": async_mode,
           "DATA_DIR": str(out / "data"), "MODEL_PATH": str(sample / "hmpo_cpu_model"),
           "CKPT_DIR": str(run_dir / "ckpt"), "LOGGER": "console,file",
           "VERL_FILE_LOGGER_PATH": str(run_dir / "metrics.jsonl")}
    start = time.time()
    # SIZE=cpu's 2 steps make 8 optimizer steps: the file's 2000-step schedule is refused by the driver (naming 8)
    span = ["actor_rollout_ref.actor.policy_loss.schedule_steps=8"] if mean == "adaptive_schedule" else []
    result = subprocess.run(["bash", str(RECIPES / task / "run.sh"), *span], env=env, cwd=run_dir,
                            capture_output=True, text=True, timeout=1800)
    seconds = time.time() - start
    (run_dir / "train.log").write_text(result.stdout + result.stderr)
    steps: dict[int, dict] = {}
    if (run_dir / "metrics.jsonl").exists():
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            steps.setdefault(record["step"], {}).update(record["data"])
    problems = []
    if result.returncode != 0:
        problems.append(f"exit {result.returncode}")
    if not {1, 2} <= set(steps):
        problems.append(f"steps logged: {sorted(steps)}")
    elif mean not in VERL_LOSSES and "actor/pm/power" not in steps[2]:
        problems.append("no actor/pm/* metrics")
    if async_mode != "none" and {1, 2} <= set(steps) and not steps[2].get("training/lag/max", 99) <= 1:
        problems.append(f"training/lag/max at step 2: {steps[2].get('training/lag/max')} (bound 1)")
    return {"task": task, "mean": mean, "correction": correction, "async": async_mode, "ok": not problems,
            "problems": problems, "seconds": round(seconds, 1),
            "lag_max": [steps.get(s, {}).get("training/lag/max") for s in (1, 2)]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--task", nargs="*", default=["gsm8k", "math"])
    parser.add_argument("--mean", nargs="*", default=stems("mean"))
    parser.add_argument("--correction", nargs="*", default=stems("correction"))
    parser.add_argument("--async", dest="async_mode", default="none", choices=stems("async"))
    parser.add_argument("--budget-min", type=float, default=None, help="start no run after this many minutes")
    args = parser.parse_args(argv)
    start = time.time()
    sample = args.out / "sample"
    subprocess.run([sys.executable, str(RECIPES / "lib" / "cpu_sample.py"), "--out", str(sample)], check=True)
    for task in args.task:
        subprocess.run(["bash", str(RECIPES / task / "prepare_data.sh")], check=True,
                       env={**os.environ, "PYTHON": sys.executable, "DATA_DIR": str(args.out / "data"),
                            "RAW_DATA_DIR": str(sample / "raw")})
    combos = ordered(args.task, args.mean, args.correction)
    results = []
    for task, mean, correction in combos:
        if args.budget_min is not None and time.time() - start > 60 * args.budget_min:
            break
        results.append(run_one(task, mean, correction, sample, args.out, args.async_mode))
        r = results[-1]
        print(f"{task:5} {mean:17} {correction:10} {args.async_mode:14} "
              f"{'ok' if r['ok'] else 'FAIL ' + '; '.join(r['problems'])}  {r['seconds']:.0f} s", flush=True)
    passed = sum(r["ok"] for r in results)
    total = time.time() - start
    load = os.getloadavg()[0]
    print(f"{passed} of {len(results)} passed ({len(combos)} combinations; {len(combos) - len(results)} not run) "
          f"in {total:.0f} s ({total / 60:.1f} min), load average at the end {load:.1f}")
    (args.out / "results.json").write_text(json.dumps({"results": results, "combinations": len(combos),
                                                       "seconds": round(total)}, indent=1))
    return 0 if passed == len(results) == len(combos) else 1


if __name__ == "__main__":
    sys.exit(main())
