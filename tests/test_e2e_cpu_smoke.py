"""End to end on CPU: ``python -m verl.trainer.main_ppo`` with ``loss_mode=hmpo``, 2 steps, on the main job's task.

The real path: driver -> Ray -> actor worker -> FSDP2 engine -> ppo_loss -> hmpo loss ->
optimizer -> weight sync -> HF rollout server -> next rollout. Evidence is read from
verl's own file logger and from the rollout server's trace (``VERL_CPU_ROLLOUT_TRACE``).
About 1.5 minutes on a 2-core machine (79 s idle: 58 s of Ray and worker start-up). The addition
task runs the same path three times in ``test_crash_resume_on_cpu.py`` (through the demo), and
verl's trainer on GSM8K/MATH rows in ``test_recipes_cpu_size.py``, so only the main job's task
(fibonacci) runs here: CI's time goes to start-ups.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from cpu_assets import REPO_ROOT, task_assets

from hmpo_verl.lab.cpu_demo import DEFAULT_TASK
from hmpo_verl.lab.tasks import get_task

STEPS = 2
PM_METRICS = ("actor/pm/seq_ratio_mean", "actor/pm/log_ah_gap", "actor/pm/ess_frac", "actor/pm/power")


# response tokens (with <|im_end|>) a warm-started model writes: 41 for 40 Fibonacci digits
RESPONSE_LENGTH = {"fibonacci": (38, 44)}


@pytest.fixture(scope="module", params=[DEFAULT_TASK])
def run(request, tmp_path_factory):
    task = get_task(request.param)
    assets = task_assets(task.name)
    out = tmp_path_factory.mktemp(f"e2e_{task.name}")
    env = {
        **os.environ,
        "VERL_PLATFORM": "cpu",
        "VERL_FILE_LOGGER_PATH": str(out / "metrics.jsonl"),
        "VERL_CPU_ROLLOUT_TRACE": str(out / "trace.jsonl"),
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        sys.executable, "-m", "verl.trainer.main_ppo",
        "--config-path", str(task.recipe_dir), "--config-name", task.recipe_name,
        f"actor_rollout_ref.model.path={assets.model}",
        f"data.train_files={assets.train_parquet}",
        f"data.val_files={assets.test_parquet}",
        "actor_rollout_ref.actor.policy_loss.loss_mode=hmpo",
        f"trainer.total_training_steps={STEPS}",
        "trainer.val_before_train=false",
        "trainer.test_freq=-1",
        f"trainer.default_local_dir={out / 'checkpoints'}",
    ]  # fmt: skip
    start = time.time()
    result = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    seconds = time.time() - start
    (out / "train.log").write_text(result.stdout + result.stderr)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] if (out / "metrics.jsonl").exists() else []
    trace = [json.loads(line) for line in (out / "trace.jsonl").read_text().splitlines()] if (out / "trace.jsonl").exists() else []
    print(f"e2e smoke run ({task.name}): {seconds:.0f} s")
    return result, {m["step"]: m["data"] for m in metrics}, trace, task.name


def test_the_trainer_exits_cleanly(run):
    result, metrics, _, _ = run
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    assert sorted(metrics) == list(range(1, STEPS + 1))


def test_our_power_mean_metrics_are_in_verls_logged_metrics(run):
    _, metrics, _, _ = run
    for step, data in metrics.items():
        missing = [k for k in PM_METRICS if k not in data]
        assert not missing, f"step {step}: {missing} not logged"
        assert data["actor/pm/power"] == -1.0
        assert "actor/pg_clipfrac" in data and "actor/ppo_kl" in data


def test_the_actor_weights_changed(run):
    """The server receives the actor's full weights after every step (and once at start)."""
    _, metrics, trace, _ = run
    loads = {e["global_steps"]: e["checksum"] for e in trace if e["event"] == "update_weights"}
    assert sorted(loads) == list(range(0, STEPS + 1)), loads
    assert loads[STEPS] != loads[0], f"the weights never changed: {loads}"
    assert loads[1] != loads[0], f"the first update did not change the weights: {loads}"
    assert metrics[1]["actor/grad_norm"] > 0


def test_the_rollout_server_generated_with_the_updated_weights(run):
    _, metrics, trace, _ = run
    # generation for step 2 ran after the weights of step 1 were loaded, and was tagged with them
    versions = [e["global_steps"] for e in trace if e["event"] == "generate"]
    assert versions and set(versions) == set(range(STEPS)), versions
    first_gen_v1 = next(i for i, e in enumerate(trace) if e["event"] == "generate" and e["global_steps"] == 1)
    load_v1 = next(i for i, e in enumerate(trace) if e["event"] == "update_weights" and e["global_steps"] == 1)
    assert load_v1 < first_gen_v1
    # and verl's actor recomputes the rollout's log-probs on those weights: stale weights would not match
    for step, data in metrics.items():
        assert data["training/rollout_probs_diff_valid"] == 1
        assert data["training/rollout_probs_diff_max"] < 1e-4, (step, data["training/rollout_probs_diff_max"])


def test_concurrent_rollout_requests_were_batched(run):
    _, _, trace, _ = run
    sizes = [e["batch_size"] for e in trace if e["event"] == "generate"]
    assert max(sizes) > 1 and len(sizes) < sum(sizes)


def test_the_responses_have_the_tasks_length(run):
    _, metrics, _, name = run
    low, high = RESPONSE_LENGTH[name]
    for step, data in metrics.items():
        assert low <= data["response_length/mean"] <= high, (step, data["response_length/mean"])
