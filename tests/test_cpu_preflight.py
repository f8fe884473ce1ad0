"""Bad input to the real trainer on CPU stops early, before Ray, with a message that says what to change."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from cpu_assets import REPO_ROOT, tiny_assets
from verl_cpu.preflight import check_config
from verl_cpu.version import UnsupportedVerlVersion, check_verl_version

RECIPE_DIR = REPO_ROOT / "recipes" / "cpu_tiny"


def compose(*overrides: str):
    """The CPU recipe with the test assets, as verl's Hydra main would build it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    assets = tiny_assets()
    base = [
        f"actor_rollout_ref.model.path={assets.model}",
        f"data.train_files={assets.train_parquet}",
        f"data.val_files={assets.test_parquet}",
    ]
    with initialize_config_dir(config_dir=str(RECIPE_DIR), version_base=None):
        return hydra_compose(config_name="hmpo", overrides=[*base, *overrides])


def test_the_recipe_passes():
    assert check_config(compose()) == []


def test_missing_model_path():
    problems = check_config(compose("actor_rollout_ref.model.path=/nonexistent/model"))
    assert len(problems) == 1
    assert "actor_rollout_ref.model.path=/nonexistent/model" in problems[0] and "config.json" in problems[0]


def test_parquet_without_the_expected_columns(tmp_path):
    bad = tmp_path / "bad.parquet"
    pd.DataFrame({"question": ["1+1"], "answer": ["2"]}).to_parquet(bad)
    problems = check_config(compose(f"data.train_files={bad}"))
    assert any("data.train_files" in p and "missing column(s) ['prompt', 'data_source', 'reward_model']" in p for p in problems)
    no_gt = tmp_path / "no_ground_truth.parquet"
    pd.DataFrame({"prompt": [[{"role": "user", "content": "1+1"}]], "data_source": ["x"], "reward_model": [{"style": "rule"}]}).to_parquet(no_gt)
    problems = check_config(compose(f"data.val_files={no_gt}"))
    assert any("data.val_files" in p and "reward_model.ground_truth" in p for p in problems)
    assert any("file not found" in p for p in check_config(compose("data.val_files=/nonexistent.parquet")))


def test_reward_function_missing_or_raising(tmp_path):
    problems = check_config(compose("reward.custom_reward_function.path=/nonexistent/reward.py"))
    assert problems == ["reward.custom_reward_function.path=/nonexistent/reward.py: file not found"]

    raising = tmp_path / "raising_reward.py"
    raising.write_text("def exact_match(data_source, solution_str, ground_truth, extra_info=None):\n    raise ValueError('boom')\n")
    problems = check_config(compose(f"reward.custom_reward_function.path={raising}"))
    assert len(problems) == 1 and "raised ValueError: boom" in problems[0]

    problems = check_config(compose(f"reward.custom_reward_function.path={raising}", "reward.custom_reward_function.name=nope"))
    assert len(problems) == 1 and "cannot load 'nope'" in problems[0]


def test_cuda_only_settings_are_named_with_their_fix():
    problems = check_config(
        compose(
            "actor_rollout_ref.actor.strategy=fsdp",
            "actor_rollout_ref.rollout.name=sglang",
            "trainer.device=cuda",
            "actor_rollout_ref.model.override_config.attn_implementation=flash_attention_2",
            "~ray_kwargs.ray_init.num_gpus",
        )
    )
    text = "\n".join(problems)
    assert "actor_rollout_ref.actor.strategy=fsdp: set actor_rollout_ref.actor.strategy=fsdp2" in text
    assert sum("strategy=fsdp:" in p for p in problems) == 1, "the ref follows the actor: one message"
    assert "actor_rollout_ref.rollout.name=sglang needs a GPU: set actor_rollout_ref.rollout.name=hf" in text
    assert "set trainer.device=cpu" in text
    assert "set actor_rollout_ref.model.override_config.attn_implementation=sdpa" in text  # in the config: no +
    assert "set +ray_kwargs.ray_init.num_gpus=1" in text  # removed from it: + (tests/test_cpu_sampler_right_or_loud.py)


def test_other_verl_versions_are_refused_with_a_clear_message():
    check_verl_version("0.9.1")
    with pytest.raises(UnsupportedVerlVersion, match=r"written for verl==0\.9\.1, but verl==0\.8\.0 is installed"):
        check_verl_version("0.8.0")


def _run_trainer(*overrides: str, timeout: int = 120) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "VERL_PLATFORM": "cpu", "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "verl.trainer.main_ppo", "--config-path", str(RECIPE_DIR), "--config-name", "hmpo", *overrides]
    start = time.time()
    result = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    return result, time.time() - start


def test_the_real_trainer_stops_before_ray_with_a_short_message(tmp_path):
    assets = tiny_assets()
    result, seconds = _run_trainer(
        f"data.train_files={assets.train_parquet}",
        f"data.val_files={assets.test_parquet}",
        "actor_rollout_ref.model.path=/nonexistent/model",
        "actor_rollout_ref.actor.strategy=fsdp",
        "actor_rollout_ref.rollout.name=sglang",
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "verl_cpu: this config cannot run on the CPU backend" in result.stderr
    assert "actor_rollout_ref.model.path=/nonexistent/model" in result.stderr
    assert "actor_rollout_ref.rollout.name=hf" in result.stderr
    assert "Traceback" not in output and "ray init" not in output.lower()
    assert len(result.stderr.splitlines()) < 40
    print(f"rejected in {seconds:.1f} s")


def test_the_plugin_stays_off_without_verl_platform_cpu():
    env = {k: v for k, v in os.environ.items() if k != "VERL_PLATFORM"}
    code = "import sys, verl; print('verl_cpu.platform' in sys.modules, 'verl_cpu.plugin' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout
    assert out.split() == ["False", "True"]  # the entry point is imported, but installs nothing


def test_an_unknown_loss_mode_stops_before_ray_with_verls_message():
    problems = check_config(compose("actor_rollout_ref.actor.policy_loss.loss_mode=hmpoo"))
    assert len(problems) == 1
    assert problems[0].startswith("actor_rollout_ref.actor.policy_loss.loss_mode=hmpoo: Unsupported loss mode: hmpoo.")
    assert "'hmpo'" in problems[0] and "'vanilla'" in problems[0]  # the allowed values, ours and verl's
    assert check_config(compose("actor_rollout_ref.actor.policy_loss.loss_mode=agm")) == []


def test_the_polling_replay_buffer_needs_a_positive_interval_and_no_dapo_filter():
    assert any("poll_interval must be a positive number of seconds, got 'soon'" in p
               for p in check_config(compose("trainer.v1.sampler.sampler_kwargs.poll_interval=soon")))
    assert any("poll_interval" in p for p in check_config(compose("trainer.v1.sampler.sampler_kwargs.poll_interval=0")))
    problems = check_config(compose("algorithm.filter_groups.enable=true"))
    assert any("algorithm.filter_groups.enable=true" in p and "custom_sampler" in p for p in problems)


# ----------------------------------------------------------------------------- the demo shows why verl failed

# Trimmed from a real train.log (--loss-mode hmpoo before the preflight checked it): Ray's colour
# codes and worker prefixes, the driver's traceback, two RayTaskError wrappers, the cause last.
RAY_WORKER_FAILURE = """\
\x1b[36m(WorkerDict pid=24834)\x1b[0m WARNING:2026-11-27 14:04:00,298:target_num_threads 8 should not exceed total physical CPU cores 2.
/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/verl/workers/engine/__init__.py:69: UserWarning: megatron engine is not available: ModuleNotFoundError("No module named 'megatron'")
Error executing job with overrides: ['actor_rollout_ref.actor.policy_loss.loss_mode=hmpoo']
\x1b[36m(TaskRunnerV1 pid=24425)\x1b[0m Training Progress:   0%|          | 0/2 [00:03<?, ?it/s]
Traceback (most recent call last):
  File "/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/ray/_private/worker.py", line 1053, in get_objects
    raise value.as_instanceof_cause()
ray.exceptions.RayTaskError(ValueError): \x1b[36mray::TaskRunnerV1.run()\x1b[39m (pid=24425, ip=192.0.2.2, actor_id=56adb6)
           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  File "/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/verl/single_controller/ray/base.py", line 56, in __call__
    output = ray.get(output)
ray.exceptions.RayTaskError(ValueError): \x1b[36mray::WorkerDict.actor_rollout_update_actor()\x1b[39m (pid=24834, ip=192.0.2.2)
  File "/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/verl/trainer/ppo/core_algos.py", line 82, in get_policy_loss_fn
    raise ValueError(
ValueError: Unsupported loss mode: hmpoo. Supported modes are: ['vanilla', 'gspo', 'hmpo']

Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.
"""

# A config class raising while Hydra instantiates it, in the driver (verbatim but for the overrides).
HYDRA_INSTANTIATE_FAILURE = """\
/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/verl/workers/engine/__init__.py:69: UserWarning: megatron engine is not available: ModuleNotFoundError("No module named 'megatron'")
  warnings.warn(f"megatron engine is not available: {e!r}", stacklevel=1)
Error executing job with overrides: ['+actor_rollout_ref.actor.policy_loss.power=abc']
Error in call to target 'hmpo_verl.config.PowerMeanLossConfig':
ValueError("actor_rollout_ref.actor.policy_loss.power='abc' is invalid; allowed: a real number, or inf / -inf")
full_key: actor_rollout_ref.actor.policy_loss

Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.
"""


def test_failure_cause_finds_the_exception_raised_in_a_ray_worker():
    from hmpo_verl.lab.cpu_demo import failure_cause

    assert failure_cause(RAY_WORKER_FAILURE) == [
        "ValueError: Unsupported loss mode: hmpoo. Supported modes are: ['vanilla', 'gspo', 'hmpo']"
    ]


def test_failure_cause_shows_hydras_message_and_the_preflight_report():
    from hmpo_verl.lab.cpu_demo import failure_cause
    from verl_cpu.preflight import format_problems

    assert failure_cause(HYDRA_INSTANTIATE_FAILURE) == [
        "Error in call to target 'hmpo_verl.config.PowerMeanLossConfig':",
        "ValueError(\"actor_rollout_ref.actor.policy_loss.power='abc' is invalid; allowed: a real number, or inf / -inf\")",
        "full_key: actor_rollout_ref.actor.policy_loss",
    ]
    report = format_problems(["trainer.device=cuda: set trainer.device=cpu", "data.train_files is not set"])
    assert failure_cause("INFO: starting\n" + report) == [
        "verl_cpu: this config cannot run on the CPU backend (VERL_PLATFORM=cpu):",
        "  - trainer.device=cuda: set trainer.device=cpu",
        "  - data.train_files is not set",
    ]
    assert failure_cause("all fine\nKilled\n") == []


def test_the_demo_prints_the_cause_on_the_console(tmp_path, monkeypatch, capsys):
    """The demo's failure path end to end, with a stand-in trainer that fails like verl does."""
    from hmpo_verl.lab import cpu_demo

    tiny_assets()
    script = f"import sys; sys.stdout.write({RAY_WORKER_FAILURE!r}); sys.exit(1)"
    monkeypatch.setattr(cpu_demo, "trainer_command", lambda *args: [sys.executable, "-c", script])
    code = cpu_demo.main(["--task", "addition", "--steps", "1", "--run-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1
    assert "verl's trainer exited with status 1:\n  ValueError: Unsupported loss mode: hmpoo." in err
    assert f"full log: {tmp_path / 'train.log'}" in err
    assert "Traceback" not in err and "RayTaskError" not in err
