"""verl's own vLLM rollout on CPU: verl's sync trainer and V1 ``separate_async``, ``rollout.name=vllm``,
``loss_mode=hmpo``, a few steps each.

The path a GPU run takes, with vLLM's CPU build: verl's ``vLLMHttpServer`` generates, verl's weight
sync reloads the actor's weights into vLLM after every step (verl_cpu's P2 keeps vLLM's linear
weights for it), and the actor recomputes the rollout's log-probs. The rollout runs in fp32 here, so
``training/rollout_probs_diff_max`` stays at float noise only when vLLM decoded with the synced
weights (bf16, the demo's default, is the mismatch the README measures).

It needs vLLM's CPU build in the interpreter that runs the trainer: ``HMPO_VLLM_PYTHON`` (set by
``setup_and_run.sh`` when ``VLLM_VENV`` is, as in ``.ci/run``), else this interpreter if it has vLLM
(``setup_and_run.sh --vllm``). Without either it is skipped, saying so.

V1 ``separate_async`` (verl's recommended async path) runs as ``cpu_demo --trainer separate_async --rollout
vllm``: a separate vLLM pool fed by verl_cpu's ``object_store`` weight sync, with ``bypass_mode`` (the rollout's
log-probs are the old ones, so verl logs no ``rollout_probs_diff``). Its equivalent here: one update per step
(``parameter_sync_step=1``), so at step 1 (lag 0) our loss's ratios compare vLLM's fp32 log-probs with the
trainer's on the same weights (float noise), and every later sample is exactly one version old.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import time

import pytest
from cpu_assets import REPO_ROOT

from hmpo_verl.lab.cpu_demo import read_metrics, trained_steps, trainer_command, trainer_env
from hmpo_verl.lab.install_check import NO_CUDA_WHEELS, VLLM_ROLLOUT
from hmpo_verl.lab.tasks import get_task
from hmpo_verl.maths.staleness import BUCKETS

STEPS = 3
PM_METRICS = ("actor/pm/seq_ratio_mean", "actor/pm/log_ah_gap", "actor/pm/ess_frac", "actor/pm/power")


def vllm_python() -> str | None:
    """The interpreter with vLLM's CPU build: ``HMPO_VLLM_PYTHON``, else this one if it has vLLM."""
    import sys

    return os.environ.get("HMPO_VLLM_PYTHON") or (sys.executable if importlib.util.find_spec("vllm") else None)


pytestmark = pytest.mark.skipif(
    vllm_python() is None,
    reason="vLLM's CPU build is not installed: bash recipes/cpu_tiny/setup_and_run.sh --vllm (into this interpreter), "
           "or VLLM_VENV=<dir> bash recipes/cpu_tiny/setup_and_run.sh --tests (a venv of its own, as .ci/run does)",
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    task = get_task("addition")
    assets = task.prepare_assets(log=None, rollout="vllm")
    out = tmp_path_factory.mktemp("vllm_sync")
    overrides = ["trainer.val_before_train=false", "trainer.test_freq=-1", "actor_rollout_ref.rollout.dtype=float32"]
    cmd = [vllm_python(), *trainer_command(task, assets, out, STEPS, "hmpo", overrides, "sync", "vllm")[1:]]
    env = trainer_env(out, "vllm")
    start = time.time()
    result = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    (out / "train.log").write_text(result.stdout + result.stderr)
    print(f"vLLM sync trainer, {STEPS} steps: {time.time() - start:.0f} s ({out / 'train.log'})")
    return result, {r["step"]: r["data"] for r in read_metrics(out / "metrics.jsonl")}, out


def test_the_trainer_ran_every_step_with_vllm(run):
    result, metrics, out = run
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    assert sorted(metrics) == list(range(1, STEPS + 1))
    assert "vLLMHttpServer" in result.stdout + result.stderr
    assert not (out / "rollout_trace.jsonl").exists(), "verl_cpu's hf server ran instead of vLLM"


def test_vllm_generated_with_the_synced_weights(run):
    """fp32 rollout: vLLM's log-probs equal the actor's recomputed ones to float noise, after every weight sync."""
    _, metrics, _ = run
    for step, data in metrics.items():
        assert data["training/rollout_probs_diff_valid"] == 1
        assert data["training/rollout_probs_diff_max"] < 1e-4, (step, data["training/rollout_probs_diff_max"])
        assert data["actor/grad_norm"] > 0, step


def test_our_power_mean_metrics_are_logged(run):
    _, metrics, _ = run
    for step, data in metrics.items():
        missing = [k for k in PM_METRICS if k not in data]
        assert not missing, f"step {step}: {missing} not logged"
        assert data["actor/pm/power"] == -1.0
        assert json.dumps(data["actor/pm/log_ah_gap"]) != "NaN"


def test_the_vllm_interpreter_passes_install_checks_vllm_probes():
    """install_check's checks of a fresh vLLM venv, on this one: verl's vLLM rollout imports on vLLM's CPU
    platform, and no CUDA wheel is installed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "patches" / "verl_cpu")])}
    result = subprocess.run([vllm_python(), "-c", VLLM_ROLLOUT + NO_CUDA_WHEELS], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "vLLM's platform: CpuPlatform" in result.stdout and "CUDA wheels: none" in result.stdout


# ----------------------------------------------------------------------------- V1 separate_async with vLLM

ASYNC_STEPS = 3
ONE_UPDATE_PER_STEP = ("actor_rollout_ref.actor.ppo_mini_batch_size=8", "trainer.v1.separate_async.parameter_sync_step=1")


@pytest.fixture(scope="module")
def separate_async(tmp_path_factory):
    """``python -m hmpo_verl.lab.cpu_demo --trainer separate_async --rollout vllm``, fp32 rollout, one update a step
    (``parameter_sync_step=1``: every sample of step k >= 2 is of version k - 1)."""
    get_task("fibonacci").prepare_assets(log=None, rollout="vllm")
    out = tmp_path_factory.mktemp("vllm_separate_async")
    cmd = [vllm_python(), "-m", "hmpo_verl.lab.cpu_demo", "--trainer", "separate_async", "--rollout", "vllm",
           "--steps", str(ASYNC_STEPS), "--run-dir", str(out), "--", "trainer.val_before_train=false",
           "trainer.test_freq=-1", "actor_rollout_ref.rollout.dtype=float32", *ONE_UPDATE_PER_STEP]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "patches" / "verl_cpu")])}
    start = time.time()
    result = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    print(f"vLLM separate_async, {ASYNC_STEPS} steps: {time.time() - start:.0f} s ({out / 'train.log'})")
    metrics = {r["step"]: r["data"] for r in trained_steps(out / "metrics.jsonl")}
    return result, metrics, out


def test_separate_async_trained_every_step_with_vllm(separate_async):
    result, metrics, out = separate_async
    log = (out / "train.log").read_text()
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:] + log[-5000:]
    assert sorted(metrics) == list(range(1, ASYNC_STEPS + 1))
    assert "vLLMHttpServer" in log
    assert not (out / "rollout_trace.jsonl").exists(), "verl_cpu's hf server ran instead of vLLM"
    for step, data in metrics.items():
        assert data["actor/grad_norm"] > 0, step
        missing = [k for k in PM_METRICS if k not in data]
        assert not missing and data["actor/pm/power"] == -1.0, (step, missing)


def test_separate_async_logs_each_samples_lag(separate_async):
    _, metrics, _ = separate_async
    for step, data in metrics.items():
        shares = [data[f"training/lag/share_{b}"] for b in BUCKETS]
        assert sum(shares) == pytest.approx(1.0)
        lagged = [b for b in BUCKETS if f"actor/pm/lag{b}/log_ah_gap" in data]  # the lags reached the loss
        assert lagged == [b for b, share in zip(BUCKETS, shares, strict=True) if share > 0], (step, lagged)
        assert data["training/lag/mean"] == pytest.approx(data["training/off_policy/trajectory_staleness_worst/mean"])
    assert metrics[1]["training/lag/max"] == 0  # step 1 trains samples of the initial weights


def test_vllm_decodes_as_the_trainer_and_reports_each_synced_version(separate_async):
    """The trainer's equivalent of ``rollout_probs_diff`` under ``bypass_mode``: at step 1 (lag 0, one update) the
    loss's ratios are vLLM's fp32 log-probs against the trainer's on the same weights: float noise (bf16: ~1e-3).
    Later steps train samples at most one version old (verl's own staleness); which share is lag 0 depends on
    timing (under load, 1 in 4 of step 3's samples came after version 2's weights reached vLLM). A sample vLLM
    reports as the trainer's current version was decoded by those weights (``vLLMRollout.update_weights`` sets
    the version last): its ratios are float noise too, while lag-1 samples' are not."""
    _, metrics, _ = separate_async
    first = metrics[1]
    assert abs(first["actor/ppo_kl"]) < 1e-6 and first["actor/pg_clipfrac"] == 0, first["actor/ppo_kl"]
    assert abs(first["actor/pm/lag0/log_ah_gap"]) < 1e-6, first["actor/pm/lag0/log_ah_gap"]
    later = [metrics[step] for step in range(2, ASYNC_STEPS + 1)]
    for step, data in enumerate(later, start=2):
        assert data["training/off_policy/trajectory_staleness_worst/max"] <= 1, step
        if data["training/lag/share_0"] > 0:
            assert abs(data["actor/pm/lag0/log_ah_gap"]) < 1e-6, (step, data["actor/pm/lag0/log_ah_gap"])
    lag1 = [data["actor/pm/lag1/log_ah_gap"] for data in later if data["training/lag/share_1"] > 0]
    assert lag1 and min(lag1) > 1e-4, lag1  # the staleness is there, and visible in the ratios
