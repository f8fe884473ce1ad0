"""Resumes of verl's off-policy trainers on CPU: what they train again, skip or lose.

    python -m hmpo_verl.lab.offpolicy_resume one_step_off [--out runs/offpolicy_resume] [--steps 4]
    python -m hmpo_verl.lab.offpolicy_resume fully_async [--out runs/offpolicy_resume] [--steps 4]

``one_step_off``: a killed-and-resumed run against an uninterrupted one. Three launches of
``python -m verl.experimental.one_step_off_policy.main_ppo`` on the fibonacci task
(``recipes/cpu_fibonacci/one_step_off.yaml``, shuffled data) with the crash suite's scenario
(:data:`hmpo_verl.lab.crash.SCENARIO`: the adaptive loss's p schedule, a checkpoint every 2 steps,
``resume_mode=auto``, ``full_determinism=true``): an uninterrupted run, one SIGKILLed as soon as
checkpoint 2 is complete (batch 3 is being generated then), and the same command again, which
resumes. Printed per step, from verl's rollout dump and file logger: the prompts trained (as a
multiset, and whether they are the uninterrupted run's), the lag distribution
(``training/lag/*``) and the mean reward.

What a resume cannot repeat by design: the uninterrupted run trains batch 3 on samples the weights
before update 2 generated (lag 1); the resumed run has only the weights after it, so it generates
batch 3 again with them (lag 0) and its samples, rewards and later weights differ. verl's ``uid``
is a fresh ``uuid4`` per prompt and run: the prompts identify the data.

``fully_async``: one run with a checkpoint every 2 weight syncs; for each checkpoint, the prompts
its rollouter had drawn, those its trainer had trained, and the difference, the prompts in flight
that a resume from it never trains (:func:`hmpo_verl.inflight.inflight_at`, the count the driver's
warning gives). Measured results: README, "Crash and resume".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from hmpo_verl.inflight import inflight_at
from hmpo_verl.lab.cpu_demo import TRAINERS, prompts_per_sync, trainer_command
from hmpo_verl.lab.crash import LOSS_MODE, SAVE_FREQ, Launch, Scenario, kill_after_checkpoint, rollout_dump
from hmpo_verl.lab.tasks import REPO_ROOT, get_task

TASK = "fibonacci"
LAG_KEYS = ("training/lag/mean", "training/lag/max")


@dataclass
class OffPolicyScenario(Scenario):
    """The crash suite's scenario on one of verl's off-policy trainers, with the fibonacci task's recipe for it."""

    trainer: str = "one_step_off"

    def command(self) -> list[str]:
        task = get_task(TASK)
        return trainer_command(task, task.prepare_assets(log=None), self.root, self.steps, LOSS_MODE,
                               self.overrides_all(), trainer=self.trainer)


def prompts_per_step(launch: Launch) -> dict[int, Counter]:
    """step -> the multiset of prompts trained (one per sample) in verl's rollout dump."""
    return {step: Counter(prompt for prompt, _, _ in rows) for step, rows in rollout_dump(launch.log_dir).items()}


def step_rows(reference: Launch, killed: Launch, resumed: Launch) -> list[dict]:
    """Per step of the uninterrupted run: which launch trained it after the kill, its prompts, lags and rewards."""
    ref_prompts, ref_metrics = prompts_per_step(reference), reference.metrics()
    other_prompts = {**prompts_per_step(killed), **prompts_per_step(resumed)}
    other_metrics = {**killed.metrics(), **resumed.metrics()}
    rows = []
    for step in sorted(ref_metrics):
        ref, other = ref_metrics[step], other_metrics.get(step, {})
        rows.append({
            "step": step, "trained_by": "resumed" if step in resumed.metrics() else "killed",
            "same_prompts": step in ref_prompts and ref_prompts[step] == other_prompts.get(step),
            "lag_uninterrupted": [ref.get(k) for k in LAG_KEYS], "lag_after_kill": [other.get(k) for k in LAG_KEYS],
            "reward_uninterrupted": ref.get("critic/score/mean"), "reward_after_kill": other.get("critic/score/mean"),
        })  # fmt: skip
    return rows


def trained_once(reference: Launch, killed: Launch, resumed: Launch, first_resumed: int) -> bool:
    """The killed run's steps before the resume and the resumed run's trained exactly the uninterrupted run's
    prompts (as one multiset)."""
    killed_prompts = {s: c for s, c in prompts_per_step(killed).items() if s < first_resumed}
    together = sum([*killed_prompts.values(), *prompts_per_step(resumed).values()], Counter())
    return together == sum(prompts_per_step(reference).values(), Counter())


def one_step_off(out: Path, steps: int) -> dict:
    """The one-step-off comparison (see module doc); its summary, also written to ``out/summary.json``."""
    started = time.time()
    print(f"uninterrupted one-step-off run ({steps} steps) ...", flush=True)
    reference = OffPolicyScenario(out / "reference", steps=steps).launch("run")
    reference_exit = reference.wait(1800)
    print(f"killed after checkpoint {SAVE_FREQ}, then resumed ...", flush=True)
    case = kill_after_checkpoint(OffPolicyScenario(out / "case", steps=steps), step=SAVE_FREQ, timeout=1800)
    rows = step_rows(reference, case["killed"], case["resumed"])
    summary = {
        "rows": rows, "reference_exit": reference_exit, "resumed_exit": case["resumed_exit"],
        "resumed_steps": sorted(case["resumed"].metrics()),
        "every_batch_trained_once": trained_once(reference, case["killed"], case["resumed"], SAVE_FREQ + 1),
        "seconds": round(time.time() - started), "load_average_end": os.getloadavg(),
    }  # fmt: skip
    summary["ok"] = summary["every_batch_trained_once"] and all(r["same_prompts"] for r in rows)
    return summary


def fully_async(out: Path, steps: int) -> dict:
    """The fully-async count (see module doc): the prompts in flight at each checkpoint."""
    started = time.time()
    scenario = OffPolicyScenario(out, steps=steps, trainer="fully_async")
    print(f"fully-async run ({steps} syncs, a checkpoint every {SAVE_FREQ}) ...", flush=True)
    run = scenario.launch("run")
    exit_code = run.wait(1800)
    per_sync = prompts_per_sync(*TRAINERS["fully_async"].recipe(get_task(TASK)), scenario.overrides_all())
    rows = []
    for step_dir in sorted(scenario.checkpoints.glob("global_step_*"), key=lambda p: int(p.name.rsplit("_", 1)[1])):
        drawn, trained, in_flight = inflight_at(step_dir, per_sync)
        rows.append({"checkpoint": step_dir.name, "drawn": drawn, "trained": trained, "in_flight": in_flight})
    return {"rows": rows, "exit": exit_code, "prompts_per_sync": per_sync, "seconds": round(time.time() - started),
            "load_average_end": os.getloadavg(), "ok": exit_code == 0 and bool(rows)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trainer", choices=["one_step_off", "fully_async"])
    parser.add_argument("--out", default=str(REPO_ROOT / "runs" / "offpolicy_resume"))
    parser.add_argument("--steps", type=int, default=2 * SAVE_FREQ)
    args = parser.parse_args(argv)
    out = Path(args.out).resolve() / args.trainer
    summary = {"one_step_off": one_step_off, "fully_async": fully_async}[args.trainer](out, args.steps)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    for row in summary["rows"]:
        print(json.dumps(row), flush=True)
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}, default=str), flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
