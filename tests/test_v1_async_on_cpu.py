"""verl's V1 async modes with our losses: the stale-as-fresh warning and each trainer's per-sample lag.

Driver-side and unit-level (no Ray): the warning is read from the ``run_ppo`` wrapper that runs
before Ray starts; each trainer's lag from the version labels that trainer's own code hands
the rollout (traced below from verl 0.9.1's ``fit`` loops).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from _helpers import SEPARATE_POOL_SYNC
from test_verl_integration_on_cpu import VERL_CONFIG_DIR
from transfer_queue import KVBatchMeta
from verl import DataProto

from hmpo_verl.offpolicy import (
    AFTER_UPDATE,
    FIRST_LABEL,
    FULLY_ASYNC,
    ONE_STEP_OFF,
    _checking_options_first,
    label_scheme,
    lags_from_labels,
    recording_first_label,
    stale_as_fresh,
    trainer_lags,
    with_lag_metrics_v1,
    with_sample_lags,
    with_sample_lags_v1,
)
from hmpo_verl.staleness import BUCKETS, LAG_KEY, RAW_PREFIX


def _verl_config(*overrides: str):
    with initialize_config_dir(config_dir=VERL_CONFIG_DIR, version_base=None):
        return compose(config_name="ppo_trainer",
                       overrides=["actor_rollout_ref.actor.policy_loss.loss_mode=hmpo", SEPARATE_POOL_SYNC, *overrides])


# ----------------------------------------------------------------------------- stale as fresh


@pytest.mark.parametrize("mode", ["colocate_async", "separate_async"])
def test_a_v1_async_mode_without_bypass_or_rollout_is_warns_before_ray_naming_both_settings(mode, caplog):
    config = _verl_config(f"trainer.v1.trainer_mode={mode}")
    ran = []
    run_ppo = _checking_options_first(lambda config, *args: ran.append(config))
    with caplog.at_level(logging.WARNING, logger="hmpo_verl"):
        run_ppo(config, None)
    assert ran == [config]  # a warning, not a refusal: verl's own losses train the same way here
    assert f"trainer.v1.trainer_mode={mode}" in caplog.text and "trained as if they were on-policy" in caplog.text
    assert "algorithm.rollout_correction.bypass_mode=true" in caplog.text
    assert "algorithm.rollout_correction.rollout_is" in caplog.text


@pytest.mark.parametrize("overrides", [
    ["trainer.v1.trainer_mode=colocate_async", "algorithm.rollout_correction.bypass_mode=true"],
    ["trainer.v1.trainer_mode=separate_async", "algorithm.rollout_correction.rollout_is=token"],
    ["trainer.v1.trainer_mode=sync"],
    ["trainer.use_v1=false", "trainer.v1.trainer_mode=colocate_async"],  # V0 ignores the V1 mode
])
def test_no_warning_where_the_samples_are_fresh_or_corrected(overrides, caplog):
    assert stale_as_fresh(_verl_config(*overrides)) is None
    with caplog.at_level(logging.WARNING, logger="hmpo_verl"):
        _checking_options_first(lambda config, *args: None)(_verl_config(*overrides), None)
    assert "on-policy" not in caplog.text


# ----------------------------------------------------------------------------- each trainer's true lag
#
# Each schedule below replays, step by step, the order in which verl 0.9.1's trainer syncs its weights
# (``update_weights(label)``), generates and updates, and counts the actor's updates: a sample's true lag
# is the updates the trainer's weights hold minus those of the weights that generated it. The lag
# computation sees only what the rollout reports (the label) and the trainer's counters.


class _Actor:
    def __init__(self, start):
        self.updates, self.synced = start, {}  # label -> updates the synced weights held

    def sync(self, label):
        self.synced[label] = self.updates


def _v0_sync(start, steps):
    """RayPPOTrainer.fit: sync(start) after loading; each step k generates, updates, then syncs k."""
    actor, out = _Actor(start), []
    actor.sync(start)
    for k in range(start + 1, start + steps + 1):
        label = max(actor.synced)  # generated on the weights synced last
        out.append((k, label, actor.updates - actor.synced[label]))
        actor.updates += 1
        actor.sync(k)
    return out


def _one_step_off(start, steps):
    """OneStepOffRayTrainer.fit: sync(start), generate step start+1's batch; each step k awaits its
    batch, syncs k (before its update), starts generating step k+1's batch, then updates."""
    actor, out = _Actor(start), []
    actor.sync(start)
    pending = start
    for k in range(start + 1, start + steps + 1):
        label = pending
        actor.sync(k)
        pending = k
        out.append((k, label, actor.updates - actor.synced[label]))
        actor.updates += 1
    return out


def _v1_async(start, steps, oldest=2):
    """V1 PPOTrainer (colocate_async / separate_async): update_weights(start) in on_init_end, each step's
    update synced as that step in on_step_end; the replay buffer hands out samples generated on any of
    the last ``oldest + 1`` synced weights (partial rollout: labelled by their oldest)."""
    actor, out = _Actor(start), []
    actor.sync(start)
    for k in range(start + 1, start + steps + 1):
        for label in sorted(actor.synced)[-(oldest + 1):]:
            out.append((k, label, actor.updates - actor.synced[label]))
        actor.updates += 1
        actor.sync(k)
    return out


@pytest.mark.parametrize("start", [0, 5])  # a fresh start and a resume from global_step_5
@pytest.mark.parametrize("schedule,scheme", [(_v0_sync, AFTER_UPDATE), (_one_step_off, ONE_STEP_OFF),
                                             (_v1_async, AFTER_UPDATE)])
def test_each_trainers_lag_is_the_true_lag_of_each_sample(schedule, scheme, start):
    cases = schedule(start, 6)
    for step, label, true_lag in cases:
        assert lags_from_labels([label], scheme, step, first_label=start).tolist() == [true_lag], (step, label)
    if schedule is _v0_sync:
        assert {lag for *_, lag in cases} == {0}  # on-policy: lag 0 (verl's labels would read 1)
    if schedule is _one_step_off:
        assert [lag for *_, lag in cases] == [0, 1, 1, 1, 1, 1]  # the first step after (re)start is on-policy


def test_the_scheme_is_read_from_the_trainer_class_and_the_resume_step_from_its_checkpoint_load():
    from types import SimpleNamespace

    from verl.experimental.one_step_off_policy.ray_trainer import OneStepOffRayTrainer
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    assert label_scheme(object.__new__(RayPPOTrainer)) == AFTER_UPDATE
    assert label_scheme(SimpleNamespace(global_steps=9, current_param_version=3)) == FULLY_ASYNC
    one_step_off = object.__new__(OneStepOffRayTrainer)
    assert label_scheme(one_step_off) == ONE_STEP_OFF

    one_step_off.config = OmegaConf.create({"trainer": {"resume_mode": "disable"}})
    one_step_off.global_steps = 0
    one_step_off._load_checkpoint()  # verl's, wrapped: a fresh start
    assert getattr(one_step_off, FIRST_LABEL) == 0
    recording_first_label(lambda self: setattr(self, "global_steps", 5))(one_step_off)  # a resume from step 5
    assert getattr(one_step_off, FIRST_LABEL) == 5
    one_step_off.global_steps = 6  # step 6 trains label 5 on-policy, step 7 label 6 one update late
    assert trainer_lags(one_step_off, [5]).tolist() == [0]
    one_step_off.global_steps = 7
    assert trainer_lags(one_step_off, [6]).tolist() == [1]


# ----------------------------------------------------------------------------- fully-async: the true lag, step by step
#
# verl 0.9.1's FullyAsyncTrainer counts weight syncs (current_param_version) and syncs every
# trigger_parameter_sync_step (T) steps; its rollouter labels each sample with the version it held (partial
# rollout: the oldest, min_global_steps). Our lag counts weight versions, as on every trainer: the syncs
# between the weights that generated a sample and the last weights synced before this update (V1 separate_async's
# parameter_sync_step local updates are one version likewise; verl's own fully_async/* staleness counts
# versions too). With T > 1 the trainer's weights are j - 1 steps past that sync at the j-th step of a
# cycle: the replay below also counts steps, so a lag computed from verl's step counter instead of its
# version would fail here (and verl's load_checkpoint sets global_steps = N * T + 1 before fit adds 1).



def _fully_async_trainer_class():
    """verl's FullyAsyncTrainer class itself (the module exports it as a Ray actor class)."""
    from verl.experimental.fully_async_policy.fully_async_trainer import FullyAsyncTrainer

    return FullyAsyncTrainer.__ray_actor_class__


def _fully_async_replay(trainer_steps: int, trigger: int, resume_from: int, tmp_path) -> list[tuple]:
    """Drive verl's own FullyAsyncTrainer counters (load_checkpoint, fit's first increment,
    _fit_update_local_step, _fit_update_weights' sync condition) and a rollouter that generates on the
    weights it holds, some responses resumed across a sync (partial rollout).

    Returns per sample ``(trainer, label, true lag in syncs, steps since its weights)``; ``trainer`` is the
    verl object at the moment of the update (its counters as the wrapped ``_update_actor`` reads them).
    """
    import asyncio
    from types import SimpleNamespace


    trainer = object.__new__(_fully_async_trainer_class())  # FullyAsyncTrainer.__init__'s counters
    trainer.global_steps, trainer.local_trigger_step, trainer.current_param_version = 0, 1, 0
    trainer.trigger_parameter_sync_step, trainer.use_critic = trigger, False
    if resume_from:
        (tmp_path / f"global_step_{resume_from}" / "actor").mkdir(parents=True)
        (tmp_path / "latest_checkpointed_iteration.txt").write_text(str(resume_from))
    trainer.config = OmegaConf.create({"trainer": {
        "resume_mode": "auto" if resume_from else "disable", "default_hdfs_dir": None,
        "default_local_dir": str(tmp_path), "del_local_ckpt_after_load": False}})
    trainer.actor_rollout_wg = SimpleNamespace(load_checkpoint=lambda *args, **kwargs: None)
    asyncio.run(trainer.load_checkpoint())  # fully_async_main: load, then one sync before fit

    syncs = []  # (label, trainer steps done) per sync, in order: the rollouter holds the last
    steps_done = resume_from * trigger

    def sync():
        syncs.append((trainer.current_param_version, steps_done))

    sync()
    trainer.global_steps += 1  # FullyAsyncTrainer.fit
    out = []
    for _ in range(trainer_steps):
        # the queue: samples generated on each of the last two synced weights, and one response started on
        # the older of them and finished on the newer (its label is the oldest version)
        held = syncs[-2:]
        samples = [syncs.index(s) for s in held] + [syncs.index(held[0])]
        snapshot = SimpleNamespace(global_steps=trainer.global_steps, current_param_version=trainer.current_param_version)
        for index in samples:
            label, steps_then = syncs[index]
            out.append((snapshot, label, len(syncs) - 1 - index, steps_done - steps_then))
        steps_done += 1  # _fit_update_actor
        trainer._fit_update_local_step()  # verl's own: local step, or version + 1 and local step 1
        if trainer.local_trigger_step == 1:  # _fit_update_weights syncs only then
            sync()
        trainer.global_steps += 1  # _fit_postprocess_step
    return out


@pytest.mark.parametrize("trigger", [1, 2, 3])
@pytest.mark.parametrize("resume_from", [0, 4])
def test_the_fully_async_lag_is_the_true_lag_of_each_sample(trigger, resume_from, tmp_path):

    # the wrapper verl's FullyAsyncTrainer runs (installed on RayPPOTrainer, inherited) is the one checked below
    assert getattr(_fully_async_trainer_class()._update_actor, "_hmpo_wrapped_by", None) == "with_sample_lags"
    cases = _fully_async_replay(8, trigger, resume_from, tmp_path)
    for trainer, label, true_lag, _ in cases:
        assert label_scheme(trainer) == FULLY_ASYNC
        seen = {}

        def update_actor(self, batch):
            seen["lags"] = batch.batch[LAG_KEY].tolist()
            return DataProto.from_single_dict(data={}, meta_info={"metrics": {}})

        batch = DataProto.from_dict(tensors={"responses": torch.zeros(1, 2)},
                                    non_tensors={"min_global_steps": np.array([label], dtype=object)})
        metrics = with_sample_lags(update_actor)(trainer, batch).meta_info["metrics"]
        assert seen["lags"] == [true_lag], (trainer, label)
        assert metrics["training/lag/max"] == true_lag
    assert {lag for *_, lag, _ in cases} == {0, 1}  # the replay exercises fresh and one-version-old samples
    if trigger > 1:  # and steps that differ from versions: a count of steps would not pass
        assert any(steps != lag for *_, lag, steps in cases)


# ----------------------------------------------------------------------------- V1: lags reach the workers and the metrics


class _V1Trainer:
    """A V1 trainer's step (verl's ``step`` calls ``_update_actor`` once per local update) with stub workers."""

    def __init__(self, global_steps, tags):
        self.global_steps, self.tags, self.sent = global_steps, tags, []

    def _update_actor(self, batch, metrics):  # the workers read the batch's fields: the loss's per-lag sums
        assert LAG_KEY in batch.fields
        lags = _STORE[LAG_KEY].long()
        self.sent.append(lags)
        for k, name in enumerate(BUCKETS):
            sel = (lags.clamp(max=3) == k) & torch.tensor([not t.get("is_padding", False) for t in batch.tags])
            metrics[f"{RAW_PREFIX}{name}/seqs"] = float(sel.sum())
            metrics[f"{RAW_PREFIX}{name}/log_ah_gap"] = float(sel.sum()) * 0.1 * (k + 1)
            metrics[f"{RAW_PREFIX}{name}/ess_frac"] = float(sel.sum())
            metrics[f"{RAW_PREFIX}{name}/clipped_tokens"] = float(sel.sum())
            metrics[f"{RAW_PREFIX}{name}/tokens"] = 2 * float(sel.sum())
        return batch

    def step(self, metrics, timing_raw):
        batch = KVBatchMeta(keys=[f"k{i}" for i in range(len(self.tags))], tags=self.tags, partition_id="train",
                            fields=["responses"])
        return self._update_actor(batch, metrics)


_STORE = {}
_V1Trainer._update_actor = with_sample_lags_v1(_V1Trainer._update_actor)
_V1Trainer.step = with_lag_metrics_v1(_V1Trainer.step)


def test_v1_sends_each_samples_lag_to_the_workers_and_logs_per_lag_means(monkeypatch):
    import transfer_queue as tq

    def put(keys, partition_id, fields):
        _STORE.update(fields.to_dict())
        return KVBatchMeta(keys=keys, tags=[{} for _ in keys], partition_id=partition_id,
                           fields=["responses", *fields.keys()])

    monkeypatch.setattr(tq, "kv_batch_put", put)
    tags = [{"min_global_steps": 6}, {"min_global_steps": 5}, {"min_global_steps": 5}, {"min_global_steps": 2},
            {"is_padding": True}]
    trainer, metrics = _V1Trainer(global_steps=7, tags=tags), {}
    trainer.step(metrics, {})
    assert trainer.sent[0].tolist() == [0, 1, 1, 4, 0]  # step 7 trains the weights labelled 6
    assert not any(k.startswith(RAW_PREFIX) for k in metrics)
    assert metrics["actor/pm/lag1/log_ah_gap"] == pytest.approx(0.2)
    assert metrics["actor/pm/lag3plus/pg_clipfrac"] == pytest.approx(0.5)
    assert metrics["training/lag/mean"] == pytest.approx(1.5)  # the padding row is not a sample
    assert metrics["training/lag/share_1"] == pytest.approx(0.5) and metrics["training/lag/max"] == 4


# ----------------------------------------------------------------------------- V1 separate_async end to end


@pytest.fixture(scope="module")
def separate_async(tmp_path_factory):
    """``python -m hmpo_verl.lab.cpu_demo --trainer separate_async`` for 2 steps, as a user runs it."""
    import subprocess
    import sys
    import time

    from cpu_assets import REPO_ROOT, task_assets

    from hmpo_verl.lab.cpu_demo import trained_steps

    task_assets("fibonacci")
    out = tmp_path_factory.mktemp("separate_async")
    cmd = [sys.executable, "-m", "hmpo_verl.lab.cpu_demo", "--trainer", "separate_async", "--steps", "2",
           "--loss-mode", "adaptive_power_mean", "--run-dir", str(out), "--", "trainer.val_before_train=false",
           "trainer.test_freq=-1"]
    start = time.time()
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    print(f"separate_async e2e run: {time.time() - start:.0f} s")
    metrics = {r["step"]: r["data"] for r in trained_steps(out / "metrics.jsonl")}
    return result, metrics, out


def test_separate_async_trains_on_cpu_with_our_loss_and_per_sample_lags(separate_async):
    result, metrics, out = separate_async
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:] + (out / "train.log").read_text()[-5000:]
    assert sorted(metrics) == [1, 2]
    for step, data in metrics.items():
        assert "actor/pm/power" in data and data["actor/grad_norm"] > 0, step  # our loss ran in the workers
        shares = [data[f"training/lag/share_{b}"] for b in BUCKETS]
        assert sum(shares) == pytest.approx(1.0)
        lagged = [b for b in BUCKETS if f"actor/pm/lag{b}/log_ah_gap" in data]  # the lags reached the loss
        assert lagged == [b for b, share in zip(BUCKETS, shares, strict=True) if share > 0], (step, lagged)
        # the same samples as verl's own V1 staleness (oldest weights): our lag is that, per sample
        assert data["training/lag/mean"] == pytest.approx(data["training/off_policy/trajectory_staleness_worst/mean"])
        assert data["training/lag/max"] == data["training/off_policy/trajectory_staleness_worst/max"]
    assert metrics[1]["training/lag/max"] == 0  # step 1 trains samples of the initial weights


def test_v1_separate_async_logs_its_setup_message_instead_of_dying_on_verls_flush_keyword(caplog):
    import verl.trainer.ppo.v1.trainer_separate_async as separate

    with caplog.at_level(logging.INFO, logger=separate.logger.logger.name):
        separate.logger.info("[V1SepAsync] hybrid replicas disabled", flush=True)  # verl 0.9.1's call
    assert "hybrid replicas disabled" in caplog.text
