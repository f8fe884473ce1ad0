"""verl's off-policy trainers on CPU with our loss: one-step-off-policy and fully-async, end to end.

Each trainer runs as a user runs it -- ``python -m hmpo_verl.lab.cpu_demo --trainer <name>``
(verl's own entry point, ``VERL_PLATFORM=cpu``, the recipe in ``recipes/cpu_fibonacci/``) --
for a few steps, and the evidence is read from verl's file logger and the rollout server's
trace: our loss ran although the recipes keep verl's ``bypass_mode=true``, weights reached the
separate rollout pool through verl_cpu's ``object_store`` checkpoint engine, and each
sample's lag is what the trainer's settings promise. Measured here (2 cores, load average 3-4):
90 s (one-step-off) and 131 s (fully-async), most of it Ray and worker start-up; 3-5 minutes
each at load 10-16.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest
from cpu_assets import REPO_ROOT, task_assets
from hydra import compose, initialize_config_dir
from test_cpu_tasks import _flat

from hmpo_verl.lab.cpu_demo import trained_steps
from hmpo_verl.staleness import BUCKETS
from verl_cpu.preflight import FULLY_ASYNC, ONE_STEP_OFF, V1_SEPARATE, check_config

RECIPES = REPO_ROOT / "recipes" / "cpu_fibonacci"
TRAINERS = {ONE_STEP_OFF: 2, FULLY_ASYNC: 3}  # trainer -> steps of the e2e run
LOSS = {ONE_STEP_OFF: "adaptive_power_mean", FULLY_ASYNC: "hmpo"}  # each of our two headline losses in one run
# no validation; fully-async logs its last step only when the step count is not a multiple of test_freq (verl)
NO_VALIDATION = {ONE_STEP_OFF: "trainer.test_freq=-1", FULLY_ASYNC: "trainer.test_freq=100"}


def _compose(name: str, *overrides: str):
    assets = task_assets("fibonacci")
    base = [f"actor_rollout_ref.model.path={assets.model}", f"data.train_files={assets.train_parquet}",
            f"data.val_files={assets.test_parquet}"]
    with initialize_config_dir(config_dir=str(RECIPES), version_base=None):
        return compose(config_name=name, overrides=[*base, *overrides])


# ----------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("trainer", [*TRAINERS, V1_SEPARATE])
def test_the_offpolicy_recipe_differs_from_the_sync_recipe_only_in_async_lines(trainer):
    """recipes/cpu_fibonacci/<trainer>.yaml is hmpo.yaml plus the lines marked [async], nothing else
    (but what only verl's V1 trainer reads: hmpo.yaml's trainer.v1.* sampler, and its agent-loop manager
    verl_cpu.agent_loop.NumberedAgentLoopManagerTQ, a TransferQueue manager; the off-policy trainers use
    verl's plain AgentLoopManager, which numbers a batch's prompts itself)."""
    with initialize_config_dir(config_dir=str(RECIPES), version_base=None):
        sync = _flat(compose(config_name="hmpo"))
        off = _flat(compose(config_name=trainer))
    differing = {k for k in sync.keys() | off.keys() if sync.get(k) != off.get(k) and not k.startswith("trainer.v1.")
                 and k != "actor_rollout_ref.rollout.agent.agent_loop_manager_class"}
    text = (RECIPES / f"{trainer}.yaml").read_text()
    marked = {line.split(":")[0].strip() for line in text.splitlines() if "# [async]" in line and ":" in line}
    leaves = {k.rsplit(".", 1)[-1] for k in differing}
    assert leaves <= marked, f"changed without an [async] mark: {sorted(leaves - marked)}"
    assert off["algorithm.rollout_correction.bypass_mode"] is True  # verl's default for these trainers, kept


@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_the_offpolicy_recipes_pass_the_preflight_for_their_trainer_only(trainer):
    config = _compose(trainer)
    assert check_config(config, trainer) == []
    problems = "\n".join(check_config(config))  # as a main_ppo (v1 sync) config it is wrong, and says why
    assert "checkpoint_engine.backend=object_store: use naive" in problems


def test_offpolicy_settings_that_cannot_work_on_cpu_are_named_with_their_fix():
    problems = check_config(_compose(FULLY_ASYNC, "actor_rollout_ref.rollout.checkpoint_engine.backend=nccl",
                                     "actor_rollout_ref.hybrid_engine=true", "data.train_batch_size=8",
                                     "ray_kwargs.ray_init.num_gpus=1"), FULLY_ASYNC)
    text = "\n".join(problems)
    assert ("checkpoint_engine.backend=nccl needs CUDA (cupy, NCCL): set actor_rollout_ref.rollout.checkpoint_engine"
            ".backend=object_store and actor_rollout_ref.rollout.checkpoint_engine.custom_backend_module="
            "verl_cpu.checkpoint_engine") in text
    assert "hybrid_engine=true: the fully_async trainer needs hybrid_engine=false" in text
    assert "data.train_batch_size=8, data.gen_batch_size=1: verl's fully-async rollouter needs 0 and 1" in text
    assert "set ray_kwargs.ray_init.num_gpus=2" in text  # the key is in the config: no + (Hydra would refuse it)
    assert len(problems) == 4


def test_the_fully_async_trainer_stops_before_ray_with_a_short_message():
    env = {**os.environ, "VERL_PLATFORM": "cpu",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    assets = task_assets("fibonacci")
    cmd = [sys.executable, "-m", "verl.experimental.fully_async_policy.fully_async_main",
           "--config-path", str(RECIPES), "--config-name", FULLY_ASYNC,
           f"actor_rollout_ref.model.path={assets.model}", f"data.train_files={assets.train_parquet}",
           f"data.val_files={assets.test_parquet}", "actor_rollout_ref.rollout.checkpoint_engine.backend=nccl"]
    result = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "checkpoint_engine.backend=nccl needs CUDA" in result.stderr
    assert "Traceback" not in output and "ray init" not in output.lower()


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module", params=list(TRAINERS))
def run(request, tmp_path_factory):
    trainer, steps = request.param, TRAINERS[request.param]
    task_assets("fibonacci")
    out = tmp_path_factory.mktemp(trainer)
    cmd = [sys.executable, "-m", "hmpo_verl.lab.cpu_demo", "--trainer", trainer, "--steps", str(steps),
           "--loss-mode", LOSS[trainer], "--run-dir", str(out), "--", "trainer.val_before_train=false",
           NO_VALIDATION[trainer]]
    start = time.time()
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    print(f"{trainer} e2e run: {time.time() - start:.0f} s")
    metrics = {r["step"]: r["data"] for r in trained_steps(out / "metrics.jsonl")}
    trace = [json.loads(line) for line in (out / "rollout_trace.jsonl").read_text().splitlines()] \
        if (out / "rollout_trace.jsonl").exists() else []
    return trainer, steps, result, metrics, trace, out


def test_the_trainer_runs_its_steps_and_exits_cleanly(run):
    trainer, steps, result, metrics, _, out = run
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:] + (out / "train.log").read_text()[-5000:]
    assert sorted(metrics) == list(range(1, steps + 1))
    assert "sample lag (mean, max)" in result.stdout  # the demo's summary


def test_our_loss_ran_although_bypass_mode_is_on(run):
    """verl's apply_bypass_mode would name verl's own loss; the workers' loss is ours (its metrics), and we say so."""
    trainer, _, _, metrics, _, out = run
    for step, data in metrics.items():
        assert "actor/pm/log_ah_gap" in data and "actor/pg_clipfrac" in data
        if LOSS[trainer] == "hmpo":
            assert data["actor/pm/power"] == -1.0, step
        else:  # adaptive_power_mean (adapt: ess): p per trajectory in its default range, an ESS target
            assert -2.0 <= data["actor/pm/power"] <= 1.0 and 0 <= data["actor/pm/power_std"] <= 1.5, step
            assert 0 < data["actor/pm/ess_target"] <= 1, step
    assert f"hmpo_verl keeps loss_mode='{LOSS[trainer]}'" in (out / "train.log").read_text()


def test_the_weights_reach_the_rollout_pool_through_the_object_store_engine(run):
    """Each sync reaches the separate hf server (versions in order), and the trained weights differ from the first."""
    trainer, steps, _, metrics, trace, _ = run
    loads = [(e["global_steps"], e["checksum"]) for e in trace if e["event"] == "update_weights"]
    versions = [v for v, _ in loads]
    assert versions == sorted(versions) and versions[0] == 0 and versions[-1] == steps, versions
    assert loads[-1][1] != loads[0][1], "the weights never changed"
    assert sum(e["event"] == "abort" for e in trace) >= steps  # verl aborts before every non-naive sync
    assert all(data["actor/grad_norm"] > 0 for data in metrics.values())


def test_the_lags_are_what_the_trainers_settings_promise(run):
    trainer, _, _, metrics, _, _ = run
    for step, data in metrics.items():
        shares = [data[f"training/lag/share_{b}"] for b in BUCKETS]
        assert math.isclose(sum(shares), 1.0), (step, shares)
        lagged = [b for b in BUCKETS if f"actor/pm/lag{b}/log_ah_gap" in data]
        assert lagged == [b for b, share in zip(BUCKETS, shares, strict=True) if share > 0], (step, lagged)
        if trainer == ONE_STEP_OFF:
            # the rollout of step k ran on the weights of step k - 1 (verl labels them k - 1), but step 1's on
            # the initial weights, which verl syncs twice (labels 0 and 1): step 1 is on-policy, the rest lag 1;
            # one lag per step: the per-lag metric is the overall one
            lag = 0 if step == 1 else 1
            assert data[f"training/lag/share_{lag}"] == 1.0 and data["training/lag/max"] == lag
            assert data[f"actor/pm/lag{lag}/log_ah_gap"] == pytest.approx(data["actor/pm/log_ah_gap"], rel=1e-5)
        else:
            # staleness_threshold s = 0.5: the rollouter generates at most (1 + s) x a sync's prompts per weight
            # version, so at most a share s of a step's samples is one version old, and none older
            s = 0.5
            assert data["training/lag/max"] <= math.ceil(s)
            assert 1.0 - data["training/lag/share_0"] <= s + 1e-9, (step, shares)
    if trainer == FULLY_ASYNC:
        assert metrics[1]["training/lag/share_0"] == 1.0  # the first step trains on the first weights' samples


# ----------------------------------------------------------------------------- the report


def _steps(shares_by_step, max_lags, partial=0.0):
    return [{"step": i + 1, "data": {**{f"training/lag/share_{b}": v for b, v in zip(BUCKETS, shares, strict=True)},
                                     "training/lag/max": m, "fully_async/partial/partial_ratio": partial}}
            for i, (shares, m) in enumerate(zip(shares_by_step, max_lags, strict=True))]


def test_the_sweep_checks_each_step_against_the_staleness_bound():
    from hmpo_verl.lab.async_report import SWEEP, Setting, setting_row

    assert Setting(0.5, 1, True).bound() == (0.5, 1) and Setting(2.0, 1, False).bound() == (1.0, 2)
    assert Setting(0.0, 1, True).bound() == (0.0, 0) and len({s.name for s in SWEEP}) == len(SWEEP)
    assert Setting(0.5, 2, True).overrides()[1:3] == ["async_training.trigger_parameter_sync_step=2",
                                                       "async_training.require_batches=1"]  # 8 prompts per sync
    kept = setting_row(Setting(0.5, 1, True), {"steps": _steps([[1, 0, 0, 0], [0.5, 0.5, 0, 0]], [0, 1])})
    assert kept["within"] and kept["stale_share_max"] == 0.5 and kept["share_1"] == 0.25
    too_stale = setting_row(Setting(0.5, 1, True), {"steps": _steps([[0.25, 0.75, 0, 0]], [1])})
    too_old = setting_row(Setting(0.5, 1, True), {"steps": _steps([[0.5, 0.25, 0.25, 0]], [2])})
    assert not too_stale["within"] and not too_old["within"]


def test_verls_v1_async_modes_pass_the_preflight_separate_async_with_its_own_recipe():
    from test_cpu_preflight import compose as compose_sync

    assert check_config(compose_sync("trainer.v1.trainer_mode=colocate_async")) == []
    assert check_config(_compose(V1_SEPARATE)) == []  # main_ppo's preflight
    problems = check_config(compose_sync("trainer.v1.trainer_mode=separate_async"))  # the sync recipe as it is
    text = "\n".join(problems)
    assert "checkpoint_engine.backend=naive cannot sync a separate rollout pool on CPU: set" in text
    assert "hybrid_engine=true: the V1 separate_async trainer needs hybrid_engine=false" in text
    assert "actor_rollout_ref.rollout.nnodes=0: the separate rollout pool needs at least 1" in text
    assert "data.train_batch_size=16: V1 separate_async needs trainer.v1.separate_async.parameter_sync_step" in text
    too_few = check_config(_compose(V1_SEPARATE, "ray_kwargs.ray_init.num_gpus=1"))
    assert len(too_few) == 1 and "actor_rollout_ref.rollout.nnodes*n_gpus_per_node (the rollout pool)" in too_few[0]
    assert "set ray_kwargs.ray_init.num_gpus=2" in too_few[0]
    refused = check_config(compose_sync("trainer.use_v1=false"))
    assert len(refused) == 1 and "sync, colocate_async, separate_async" in refused[0] and "fully_async_main" in refused[0]


def test_the_demo_runs_colocate_async_as_the_sync_recipe_with_verls_mode(tmp_path):
    from hmpo_verl.lab.cpu_demo import trainer_command
    from hmpo_verl.lab.tasks import get_task

    task = get_task("fibonacci")
    cmd = trainer_command(task, task_assets("fibonacci"), tmp_path, 3, "hmpo", ["x=1"], "colocate_async")
    assert cmd[2] == "verl.trainer.main_ppo" and cmd[cmd.index("--config-name") + 1] == "hmpo"
    assert cmd[-3:] == ["trainer.v1.trainer_mode=colocate_async", "algorithm.rollout_correction.bypass_mode=true",
                        "x=1"]
