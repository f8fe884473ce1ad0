"""Crash and resume on verl's real trainer (CPU): fault injection by killing it.

    python -m hmpo_verl.lab.crash [--cases 1,2,3,4,5] [--out runs/crash]

Every case runs ``python -m verl.trainer.main_ppo`` (the demo's command, :mod:`hmpo_verl.lab.cpu_demo`)
on the addition task with the scenario of :data:`SCENARIO` -- ``adaptive_power_mean`` with
``adapt: schedule`` (p 2 -> -2 over 8 optimizer steps), 2 PPO mini-batches per step, a
checkpoint every 2 steps, ``resume_mode=auto``, ``rollout.full_determinism=true`` -- breaks it,
relaunches the *same command*, and compares with an uninterrupted run of the same seed:

1. ``kill_after_checkpoint``: SIGKILL the driver as soon as checkpoint 2 is complete.
2. ``kill_worker``: SIGKILL the actor worker (``ray::WorkerDict``) while it runs step 3's update;
   the driver must fail within a bounded time, naming the dead worker.
3. ``kill_during_save``: SIGKILL the driver while checkpoint 4 is being written.
4. ``poisoned_batch``: the rollout reports NaN log-probs at step 5 (``VERL_CPU_LOGPROB_NAN_AT_VERSION``).
5. ``disk_full``: the disk is full when checkpoint 4 is written (its model file is a link to
   ``/dev/full``); and an unwritable ``default_local_dir``.

Each launch runs in its own session (``start_new_session``): killing a case's leftovers is a
kill of that session's processes, never of another Ray cluster on the machine. The comparison
reads verl's own file logger (``metrics.jsonl``) and its rollout dump (``trainer.rollout_data_dir``:
prompt, response and score of every sample per step).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from hmpo_verl.checkpoints import TRACKER, read_tracker
from hmpo_verl.lab.cpu_demo import read_metrics, trainer_command, trainer_env
from hmpo_verl.lab.tasks import REPO_ROOT, get_task

TASK = "addition"
STEPS = 4
SAVE_FREQ = 2
POLICY_LOSS = "actor_rollout_ref.actor.policy_loss"
SCENARIO = (
    f"{POLICY_LOSS}._target_=hmpo_verl.AdaptivePowerMeanLossConfig",
    f"+{POLICY_LOSS}.adapt=schedule",
    f"+{POLICY_LOSS}.p_start=2",
    f"+{POLICY_LOSS}.p_end=-2",
    f"+{POLICY_LOSS}.schedule_steps=8",
    "actor_rollout_ref.rollout.full_determinism=true",
    f"trainer.save_freq={SAVE_FREQ}",
    "trainer.resume_mode=auto",
    "trainer.val_before_train=false",
    "trainer.test_freq=-1",
)
# metrics that measure time or memory, not what was trained
UNCOMPARED = ("timing_s/", "timing_per_token_ms/", "perf/", "actor/perf/")


# ----------------------------------------------------------------------------- launching and killing


@dataclass
class Launch:
    """One ``main_ppo`` process, its session (the Ray processes it starts) and its log folder."""

    process: subprocess.Popen
    log_dir: Path
    started: float = field(default_factory=time.time)

    @property
    def pid(self) -> int:
        return self.process.pid

    def metrics(self) -> dict[int, dict]:
        return {r["step"]: r["data"] for r in read_metrics(self.log_dir / "metrics.jsonl")}

    def log(self) -> str:
        return (self.log_dir / "train.log").read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            kill_session(self.pid)


def launch(cmd: list[str], log_dir: Path, extra_env: Optional[dict[str, str]] = None) -> Launch:
    """Start ``cmd`` in a new session, logs (train.log, metrics.jsonl, rollouts/) in ``log_dir``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**trainer_env(log_dir), **(extra_env or {})}
    with open(log_dir / "train.log", "w") as log_file:
        process = subprocess.Popen(
            [*cmd, f"trainer.rollout_data_dir={log_dir / 'rollouts'}"], env=env, cwd=REPO_ROOT,
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    return Launch(process, log_dir)


def session_processes(session: int) -> dict[int, str]:
    """{pid: process title} of the live processes of session ``session`` (Linux /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
            if int(fields[3]) == session and fields[0] != "Z":
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return found


def kill_session(session: int) -> None:
    """SIGKILL every process of ``session`` (one launch's driver and the Ray cluster it started)."""
    for pid in session_processes(session):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_until(condition: Callable[[], object], run: Launch, timeout: float, poll: float = 0.01):
    """Poll ``condition`` until it returns something true (returned); raise if ``run`` ends or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        if run.process.poll() is not None:
            raise RuntimeError(f"the trainer exited ({run.process.returncode}) before the fault could be injected; "
                               f"log: {run.log_dir / 'train.log'}")
        time.sleep(poll)
    raise TimeoutError(f"no fault point within {timeout:.0f} s; log: {run.log_dir / 'train.log'}")


def sigkill(pid: int) -> float:
    """Send SIGKILL to ``pid``; return the time it was sent."""
    os.kill(pid, signal.SIGKILL)
    return time.time()


# ----------------------------------------------------------------------------- comparing runs


def rollout_dump(log_dir: Path) -> dict[int, list[tuple]]:
    """verl's rollout dump: step -> sorted (prompt, response, score) of every sample of that step."""
    steps = {}
    for path in sorted((log_dir / "rollouts").glob("*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        steps[int(path.stem)] = sorted((r["input"], r["output"], r["score"]) for r in rows)
    return steps


def metric_differences(reference: dict, other: dict) -> dict[str, tuple]:
    """{metric: (reference, other)} for every compared metric of one step whose values differ."""
    keys = {k for k in {*reference, *other} if not k.startswith(UNCOMPARED)}
    return {k: (reference.get(k), other.get(k)) for k in sorted(keys) if reference.get(k) != other.get(k)}


@dataclass
class Comparison:
    """A resumed run against the uninterrupted one, step by step."""

    steps: list[int]
    metric_diffs: dict[int, dict[str, tuple]]  # step -> differing metrics
    samples_equal: dict[int, bool]  # step -> same (prompt, response, score) multiset
    powers: dict[int, tuple]  # step -> (reference, resumed) actor/pm/power

    @property
    def identical(self) -> bool:
        return not any(self.metric_diffs.values()) and all(self.samples_equal.values())

    def max_relative_difference(self) -> float:
        worst = 0.0
        for diffs in self.metric_diffs.values():
            for a, b in diffs.values():
                if isinstance(a, (int, float)) and isinstance(b, (int, float)):
                    worst = max(worst, abs(a - b) / max(abs(a), abs(b), 1e-12))
                else:
                    worst = float("inf")
        return worst


def compare(reference: Launch, resumed: Launch, steps: list[int]) -> Comparison:
    ref_metrics, res_metrics = reference.metrics(), resumed.metrics()
    ref_samples, res_samples = rollout_dump(reference.log_dir), rollout_dump(resumed.log_dir)
    return Comparison(
        steps=steps,
        metric_diffs={s: metric_differences(ref_metrics.get(s, {}), res_metrics.get(s, {})) for s in steps},
        samples_equal={s: s in ref_samples and ref_samples.get(s) == res_samples.get(s) for s in steps},
        powers={s: (ref_metrics.get(s, {}).get("actor/pm/power"), res_metrics.get(s, {}).get("actor/pm/power"))
                for s in steps},
    )


# ----------------------------------------------------------------------------- the scenario


@dataclass
class Scenario:
    """The command every launch of a case runs, and where its checkpoints go."""

    root: Path
    steps: int = STEPS
    overrides: tuple[str, ...] = ()

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def command(self) -> list[str]:
        task = get_task(TASK)
        assets = task.prepare_assets(log=None)
        # trainer_command puts the checkpoints in <run_dir>/checkpoints: the same folder for every launch
        return trainer_command(task, assets, self.root, self.steps, "adaptive_power_mean", [*SCENARIO, *self.overrides])

    def launch(self, name: str, extra_env: Optional[dict[str, str]] = None) -> Launch:
        return launch(self.command(), self.root / name, extra_env)

    def tracker(self) -> Optional[int]:
        return read_tracker(self.checkpoints)


def kill_after_checkpoint(scenario: Scenario, step: int = SAVE_FREQ, timeout: float = 900) -> dict:
    """Case 1: SIGKILL the driver as soon as the tracker names checkpoint ``step``; relaunch; resume.

    Returns the two launches and timings: ``killed_at_step`` (the tracker when the kill landed),
    ``leftovers_s`` (how long the killed launch's Ray processes outlived its driver, at most 30 s,
    then they are killed).
    """
    killed = scenario.launch("killed")
    wait_until(lambda: scenario.tracker() == step, killed, timeout)
    sent = sigkill(killed.pid)
    killed.process.wait()
    leftovers_s = wait_for_session_end(killed.pid, 30.0) - sent
    killed_at = scenario.tracker()
    resumed = scenario.launch("resumed")
    code = resumed.wait(timeout)
    return {"killed": killed, "resumed": resumed, "resumed_exit": code, "killed_at_step": killed_at,
            "leftovers_s": leftovers_s}


def wait_for_session_end(session: int, timeout: float) -> float:
    """Wait until no process of ``session`` is left (kill them after ``timeout`` s); return that time."""
    deadline = time.time() + timeout
    while session_processes(session) and time.time() < deadline:
        time.sleep(0.1)
    ended = time.time()
    kill_session(session)
    return ended


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO_ROOT / "runs" / "crash"))
    args = parser.parse_args(argv)
    print(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
