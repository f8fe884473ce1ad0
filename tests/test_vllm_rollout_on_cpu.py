"""verl's own vLLM rollout on CPU: verl's sync trainer, ``rollout.name=vllm``, ``loss_mode=hmpo``, a few steps.

The path a GPU run takes, with vLLM's CPU build: verl's ``vLLMHttpServer`` generates, verl's weight
sync reloads the actor's weights into vLLM after every step (verl_cpu's P2 keeps vLLM's linear
weights for it), and the actor recomputes the rollout's log-probs. The rollout runs in fp32 here, so
``training/rollout_probs_diff_max`` stays at float noise only when vLLM decoded with the synced
weights (bf16, the demo's default, is the mismatch the README measures).

It needs vLLM's CPU build in the interpreter that runs the trainer: ``HMPO_VLLM_PYTHON`` (set by
``setup_and_run.sh`` when ``VLLM_VENV`` is, as in ``.ci/run``), else this interpreter if it has vLLM
(``setup_and_run.sh --vllm``). Without either it is skipped, saying so.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import time

import pytest
from cpu_assets import REPO_ROOT

from hmpo_verl.lab.cpu_demo import read_metrics, trainer_command, trainer_env
from hmpo_verl.lab.tasks import get_task

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
