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
3. ``kill_during_save``: SIGKILL the driver while checkpoint 4 is being written (pinned there: its
   first shard is a named pipe the save blocks on).
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
import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from hmpo_verl.checkpoints import read_tracker
from hmpo_verl.lab.cpu_demo import read_metrics, trainer_command, trainer_env
from hmpo_verl.lab.tasks import REPO_ROOT, get_task

NAN_AT_VERSION_ENV = "VERL_CPU_LOGPROB_NAN_AT_VERSION"  # verl_cpu.rollout.server's fault injection
TASK = "addition"
LOSS_MODE = "adaptive_power_mean"
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
# What a resume must restore beyond the weights, optimizer and p schedule (the CI test's scenario):
# verl's warm-up + cosine LR (``LambdaLR`` in the FSDP engine, saved in the actor's extra state), the
# shuffled data sampler crossing an epoch (torchdata's ``RandomSampler``: 48 prompts = 3 steps of 16,
# its permutation and generator in ``data.pt``), and attention dropout in the actor's training forward
# (torch's CPU generator, restored from the checkpoint's ``rng``). The actor engine's ``full_determinism``
# seeds that generator when the engine starts (``engine.seed``, 42); without it two fresh launches of one
# seed drew different dropout masks from step 1 on (measured: step 1's grad norm 3.406 vs 3.770).
EPOCH_PROMPTS = 48
WARMUP_STEPS = 2
SCHEDULES = (
    "actor_rollout_ref.actor.optim.lr_scheduler_type=cosine",
    f"actor_rollout_ref.actor.optim.lr_warmup_steps={WARMUP_STEPS}",
    "+actor_rollout_ref.model.override_config.attention_dropout=0.1",
    "actor_rollout_ref.actor.fsdp_config.full_determinism=true",
    "data.shuffle=true",
    "data.seed=1",
    f"data.train_max_samples={EPOCH_PROMPTS}",
)
# metrics that measure time or memory, not what was trained
UNCOMPARED = ("timing_s/", "timing_per_token_ms/", "perf/", "actor/perf/")


# ----------------------------------------------------------------------------- launching and killing


@dataclass
class Launch:
    """One ``main_ppo`` process, its session (the Ray processes it starts) and its log folder."""

    process: subprocess.Popen
    log_dir: Path

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


@contextlib.contextmanager
def cleanup(run: Launch):
    """Whatever happens inside, kill what is left of ``run``'s session on the way out."""
    try:
        yield run
    finally:
        kill_session(run.pid)


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
    """The command every launch of a case runs (:data:`SCENARIO` for ``steps`` steps), and where its
    checkpoints go: ``<root>/checkpoints``, the same folder for every launch of the case."""

    root: Path
    steps: int = STEPS
    overrides: tuple[str, ...] = ()

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def overrides_all(self) -> list[str]:
        return [*SCENARIO, *self.overrides]

    def command(self) -> list[str]:
        task = get_task(TASK)
        assets = task.prepare_assets(log=None)
        return trainer_command(task, assets, self.root, self.steps, LOSS_MODE, self.overrides_all())

    def demo_command(self) -> list[str]:
        """The same run through the demo (``cpu_demo --run-dir <root>``), which prints a failure's cause."""
        return [sys.executable, "-m", "hmpo_verl.lab.cpu_demo", "--task", TASK, "--steps", str(self.steps),
                "--loss-mode", LOSS_MODE, "--run-dir", str(self.root), "--",
                *self.overrides_all(), f"trainer.rollout_data_dir={self.root / 'rollouts'}"]  # fmt: skip

    def launch(self, name: str, extra_env: Optional[dict[str, str]] = None) -> Launch:
        return launch(self.command(), self.root / name, extra_env)

    def tracker(self) -> Optional[int]:
        return read_tracker(self.checkpoints)

    def step_dir(self, step: int) -> Path:
        return self.checkpoints / f"global_step_{step}"


def wait_for_session_end(session: int, timeout: float) -> float:
    """Wait until no process of ``session`` is left (kill them after ``timeout`` s); return that time."""
    deadline = time.time() + timeout
    while session_processes(session) and time.time() < deadline:
        time.sleep(0.1)
    ended = time.time()
    kill_session(session)
    return ended


def checkpoint_tensors(step_dir: Path) -> dict[str, "object"]:
    """The model and optimizer state of a checkpoint's rank-0 FSDP shards, flattened to {name: tensor}."""
    import torch

    flat = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}/{key}", item)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(f"{prefix}/{i}", item)
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value.to_local() if hasattr(value, "to_local") else value
        else:
            flat[prefix] = value

    for kind in ("model", "optim"):
        walk(kind, torch.load(step_dir / "actor" / f"{kind}_world_size_1_rank_0.pt", weights_only=False))
    return flat


def same_checkpoint(a: Path, b: Path) -> bool:
    """Bit-identical model and optimizer state (values, not file bytes)."""
    import torch

    x, y = checkpoint_tensors(a), checkpoint_tensors(b)
    if x.keys() != y.keys():
        return False
    return all(torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k] for k in x)


# ----------------------------------------------------------------------------- the cases


def run_demo(scenario: Scenario, extra_env: dict[str, str], timeout: float) -> tuple[Launch, str]:
    """Run the scenario through the demo (in its own session); return it (logs in ``scenario.root``) and its output."""
    scenario.root.mkdir(parents=True, exist_ok=True)
    with open(scenario.root / "demo.log", "w") as out:
        process = subprocess.Popen(scenario.demo_command(), env={**os.environ, **extra_env}, cwd=REPO_ROOT,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    demo = Launch(process, scenario.root)
    demo.wait(timeout)
    return demo, (scenario.root / "demo.log").read_text(errors="replace")


def kill_after_checkpoint(scenario: Scenario, step: int = SAVE_FREQ, timeout: float = 900,
                          extra_env: Optional[dict[str, str]] = None, leftover_wait: float = 30.0,
                          relaunch: bool = True) -> dict:
    """Case 1: SIGKILL the driver as soon as the tracker names checkpoint ``step``; relaunch (unless not
    ``relaunch``), which resumes.

    Returns the launches and ``leftovers_s``: how long the killed driver's Ray processes outlived it
    (watched for ``leftover_wait`` s, then they are killed), with their titles (``survivors``).
    """
    killed = scenario.launch("killed", extra_env)
    with cleanup(killed):
        wait_until(lambda: scenario.tracker() == step, killed, timeout)
        sent = sigkill(killed.pid)
        killed.process.wait()
        survivors = sorted(set(session_processes(killed.pid).values()))
        leftovers_s = wait_for_session_end(killed.pid, leftover_wait) - sent
    state = {"killed": killed, "tracker_after_kill": step, "leftovers_s": leftovers_s, "survivors": survivors}
    if not relaunch:
        return state
    resumed = scenario.launch("resumed", extra_env)
    return {**state, "resumed": resumed, "resumed_exit": resumed.wait(timeout)}


WORKER_UPDATING = "WorkerDict.actor_rollout_update_actor"  # Ray's process titles while the actor updates
WORKER_SAVING = "WorkerDict.actor_rollout_save_checkpoint"  # and while it saves


def kill_worker(scenario: Scenario, after: int = SAVE_FREQ, timeout: float = 900, relaunch: bool = True) -> dict:
    """Case 2: SIGKILL the actor worker during the first update after checkpoint ``after``; relaunch (unless not
    ``relaunch``: the next case's launch resumes instead).

    ``detect_s``: from the kill to the driver's exit; ``cause``: the demo's reading of the log.
    """
    from hmpo_verl.lab.cpu_demo import failure_cause

    broken = scenario.launch("worker_killed")
    with cleanup(broken):
        wait_until(lambda: scenario.tracker() == after, broken, timeout)
        worker = wait_until(lambda: next((pid for pid, title in session_processes(broken.pid).items()
                                          if WORKER_UPDATING in title), None), broken, timeout)
        sent = sigkill(worker)
        code = broken.process.wait(timeout)
        detect_s = time.time() - sent
    found = {"broken": broken, "worker_pid": worker, "driver_exit": code, "detect_s": detect_s,
             "cause": failure_cause(broken.log()), "tracker_after_kill": scenario.tracker()}
    if not relaunch:
        return found
    resumed = scenario.launch("resumed")
    return {**found, "resumed": resumed, "resumed_exit": resumed.wait(timeout)}


def kill_during_save(scenario: Scenario, step: int = 2 * SAVE_FREQ, timeout: float = 900,
                     relaunch: bool = True) -> dict:
    """Case 3: SIGKILL the driver while checkpoint ``step`` is being written; relaunch (unless not ``relaunch``).

    The tiny model's save takes milliseconds, too short to hit by polling, so the fault is pinned:
    checkpoint ``step``'s first shard is a named pipe, on which the worker's ``torch.save`` blocks
    mid-save until the driver is killed. The pipe is then replaced by what a killed ``torch.save``
    leaves, a truncated file (half of a real shard), and the same command is relaunched.
    """
    from hmpo_verl.checkpoints import checkpoint_problems

    actor = scenario.step_dir(step) / "actor"
    actor.mkdir(parents=True, exist_ok=True)
    shard = actor / "model_world_size_1_rank_0.pt"
    os.mkfifo(shard)
    killed = scenario.launch("killed_saving")
    previous_step_dumped = killed.log_dir / "rollouts" / f"{step - 1}.jsonl"  # then the next save is ``step``'s
    with cleanup(killed):
        wait_until(lambda: previous_step_dumped.exists()
                   and WORKER_SAVING in " ".join(session_processes(killed.pid).values()), killed, timeout)
        time.sleep(1.0)  # the worker is inside torch.save, blocked on the pipe
        sigkill(killed.pid)
        killed.process.wait()
    shard.unlink()
    half = scenario.step_dir(step - SAVE_FREQ) / "actor" / shard.name
    shard.write_bytes(half.read_bytes()[: half.stat().st_size // 2])
    state = {"killed": killed, "tracker_after_kill": scenario.tracker(),
             "partial": checkpoint_problems(scenario.step_dir(step))}
    if not relaunch:
        return state
    resumed = scenario.launch("resumed")
    return {**state, "resumed": resumed, "resumed_exit": resumed.wait(timeout)}


def poisoned_batch(scenario: Scenario, version: int = SAVE_FREQ, timeout: float = 900) -> dict:
    """Case 4: the rollout reports NaN log-probs for the step after checkpoint ``version`` (via the demo);
    then a relaunch without the fault resumes from that checkpoint."""
    poisoned, output = run_demo(scenario, {NAN_AT_VERSION_ENV: str(version)}, timeout)
    state = {"demo_exit": poisoned.process.returncode, "demo_output": output,
             "tracker_after_failure": scenario.tracker()}
    resumed = scenario.launch("resumed")
    return {"poisoned": poisoned, **state, "resumed": resumed, "resumed_exit": resumed.wait(timeout)}


@contextlib.contextmanager
def full_disk(scenario: Scenario, step: int):
    """Inside, checkpoint ``step``'s model file is a link to /dev/full (every write: ENOSPC); on the way out
    the disk is "freed" (the link removed)."""
    actor = scenario.step_dir(step) / "actor"
    actor.mkdir(parents=True, exist_ok=True)
    full = actor / "model_world_size_1_rank_0.pt"
    full.symlink_to("/dev/full")
    try:
        yield full
    finally:
        full.unlink()


def disk_full(scenario: Scenario, step: int = 2 * SAVE_FREQ, timeout: float = 900) -> dict:
    """Case 5: the disk is full when checkpoint ``step`` is written (:func:`full_disk`); then it is
    freed and a relaunch resumes."""
    from hmpo_verl.lab.cpu_demo import failure_cause

    with full_disk(scenario, step):
        failed = scenario.launch("disk_full")
        code = failed.wait(timeout)
        state = {"exit": code, "cause": failure_cause(failed.log()), "tracker_after_failure": scenario.tracker()}
    resumed = scenario.launch("resumed")
    return {"failed": failed, **state, "resumed": resumed, "resumed_exit": resumed.wait(timeout)}


def unwritable_directory(root: Path, timeout: float = 300) -> dict:
    """Case 5b: ``default_local_dir`` under a regular file: refused before Ray starts."""
    from hmpo_verl.lab.cpu_demo import failure_cause

    root.mkdir(parents=True, exist_ok=True)
    blocker = root / "a_file"
    blocker.write_text("not a directory\n")
    scenario = Scenario(root, overrides=(f"trainer.default_local_dir={blocker / 'checkpoints'}",))
    started = time.time()
    failed = scenario.launch("unwritable")
    code = failed.wait(timeout)
    return {"failed": failed, "exit": code, "seconds": time.time() - started, "cause": failure_cause(failed.log()),
            "ray_started": "Started a local Ray instance" in failed.log()}


# ----------------------------------------------------------------------------- the script


def _resume_row(name: str, reference: Launch, resumed: Launch, first: int, last: int) -> dict:
    comparison = compare(reference, resumed, list(range(first, last + 1)))
    logged = sorted(resumed.metrics())
    return {
        "case": name,
        "resumed_steps": logged,
        "first_step_after_resume": logged[0] if logged else None,
        "power_reference_vs_resumed": comparison.powers,
        "samples_identical": all(comparison.samples_equal.values()),
        "metrics_bit_identical": not any(comparison.metric_diffs.values()),
        "differing_metrics": sorted({k for d in comparison.metric_diffs.values() for k in d}),
        "max_relative_difference": comparison.max_relative_difference(),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO_ROOT / "runs" / "crash"))
    parser.add_argument("--cases", default="1,2,3,4,5", help="comma-separated case numbers")
    args = parser.parse_args(argv)
    out, cases = Path(args.out).resolve(), {int(c) for c in args.cases.split(",")}
    started = time.time()
    say = functools.partial(print, flush=True)
    say(f"uninterrupted reference run ({STEPS} steps) ...")
    reference_scenario = Scenario(out / "reference")
    reference = reference_scenario.launch("run")
    rows, details = [], {"reference_exit": reference.wait(900), "load_average_start": os.getloadavg()}
    ref_ckpt = {s: reference_scenario.step_dir(s) for s in (SAVE_FREQ, 2 * SAVE_FREQ)}
    if 1 in cases:
        say("case 1: SIGKILL the driver right after checkpoint 2 ...")
        r = kill_after_checkpoint(Scenario(out / "case1"))
        rows.append(_resume_row("1 kill after checkpoint", reference, r["resumed"], SAVE_FREQ + 1, STEPS))
        details["case1"] = {k: r[k] for k in ("resumed_exit", "leftovers_s", "survivors")}
    if 2 in cases:
        say("case 2: SIGKILL the actor worker during step 3's update ...")
        r = kill_worker(Scenario(out / "case2"))
        rows.append(_resume_row("2 kill the actor worker", reference, r["resumed"], SAVE_FREQ + 1, STEPS))
        details["case2"] = {k: r[k] for k in ("driver_exit", "detect_s", "cause", "resumed_exit")}
    if 3 in cases:
        say("case 3: SIGKILL the driver while checkpoint 4 is written ...")
        scenario = Scenario(out / "case3")
        r = kill_during_save(scenario)
        details["case3"] = {k: r[k] for k in ("tracker_after_kill", "partial", "resumed_exit")}
        details["case3"]["resumed_checkpoint_4_equals_reference"] = same_checkpoint(
            scenario.step_dir(2 * SAVE_FREQ), ref_ckpt[2 * SAVE_FREQ])
        rows.append(_resume_row("3 kill during a save", reference, r["resumed"], SAVE_FREQ + 1, STEPS))
    if 4 in cases:
        say("case 4: NaN rollout log-probs at step 3 (through the demo) ...")
        scenario = Scenario(out / "case4")
        r = poisoned_batch(scenario)
        details["case4"] = {k: r[k] for k in ("demo_exit", "tracker_after_failure", "resumed_exit")}
        details["case4"]["demo_cause"] = r["demo_output"].split("exited with status")[-1].strip().splitlines()[:4]
        details["case4"]["checkpoint_2_equals_reference"] = same_checkpoint(
            scenario.step_dir(SAVE_FREQ), ref_ckpt[SAVE_FREQ])
        rows.append(_resume_row("4 poisoned batch", reference, r["resumed"], SAVE_FREQ + 1, STEPS))
    if 5 in cases:
        say("case 5: the disk is full when checkpoint 4 is written ...")
        scenario = Scenario(out / "case5")
        r = disk_full(scenario)
        details["case5"] = {k: r[k] for k in ("exit", "cause", "tracker_after_failure", "resumed_exit")}
        rows.append(_resume_row("5 disk full", reference, r["resumed"], SAVE_FREQ + 1, STEPS))
        u = unwritable_directory(out / "case5b")
        details["case5b"] = {k: u[k] for k in ("exit", "seconds", "cause", "ray_started")}
    details["total_s"] = time.time() - started
    details["load_average_end"] = os.getloadavg()
    (out / "summary.json").write_text(json.dumps({"rows": rows, "details": details}, indent=2, default=str))
    for row in rows:
        say(json.dumps(row, default=str))
    say(json.dumps(details, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
