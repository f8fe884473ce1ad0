"""Off-policy settings right or loud, before Ray starts, on every entry point and for every loss.

* bypass mode drops rollout IS / rejection sampling for any loss_mode but a bypass_mode loss whose own
  copy of the settings matches (verl 0.9.1: no trainer computes them there; apply_bypass_mode edits only
  the trainer's copy of the config): refused, and each way on the message names passes;
* the stale-as-fresh warning reaches ``python -m verl.trainer.main_ppo`` (its ``__main__`` calls its own
  ``run_ppo``), once per launch;
* a verl lacking a symbol of a module the trainer imports only inside Ray stops the driver.
"""

from __future__ import annotations

import logging
import os
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import hmpo_verl
import pytest
import ray
import verl
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from _helpers import SEPARATE_POOL_SYNC

from hmpo_verl.hosts.verl.checks import check_options

VERL_CONFIG_DIR = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
BATCH = ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
         "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2", SEPARATE_POOL_SYNC]
SAME_AS_ALGORITHM = "+actor_rollout_ref.actor.policy_loss.rollout_correction=${algorithm.rollout_correction}"


def _config(*overrides: str):
    with initialize_config_dir(config_dir=VERL_CONFIG_DIR, version_base=None):
        return compose(config_name="ppo_trainer", overrides=[*BATCH, *overrides])


# ----------------------------------------------------------------------------- bypass mode drops the correction


@pytest.mark.parametrize("loss_mode", ["vanilla", "gspo", "hmpo"])
@pytest.mark.parametrize("trainer", [["trainer.v1.trainer_mode=separate_async"], ["trainer.v1.trainer_mode=sync"],
                                     ["trainer.use_v1=false"]])
@pytest.mark.parametrize("correction", ["rollout_is=token", "rollout_rs=token_k1", "loss_type=reinforce"])
def test_bypass_mode_with_a_correction_is_refused_for_every_loss_but_bypass_mode(loss_mode, trainer, correction):
    """MEAN=grpo ASYNC=separate_async CORRECTION=token_tis (loss_mode=vanilla) trained with no IS weights."""
    config = _config(f"actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode}", *trainer,
                     "algorithm.rollout_correction.bypass_mode=true", f"algorithm.rollout_correction.{correction}")
    with pytest.raises(ValueError) as info:
        check_options(config)
    message = str(info.value)
    assert message.startswith(f"algorithm.rollout_correction.{correction} with algorithm.rollout_correction."
                              f"bypass_mode=true and actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode}: ")
    assert "algorithm.rollout_correction.bypass_mode=false" in message
    # verl's bypass_mode loss as a way on for verl's losses; ours keep the loss (the first two ways)
    assert (SAME_AS_ALGORITHM.replace("=${", "='${") + "'" in message) == (loss_mode != "hmpo")


@pytest.mark.parametrize("way_on", [
    ["algorithm.rollout_correction.bypass_mode=false"],
    ["algorithm.rollout_correction.rollout_is=null", "algorithm.rollout_correction.rollout_rs=null"],
    ["actor_rollout_ref.actor.policy_loss.loss_mode=bypass_mode", SAME_AS_ALGORITHM],
])
def test_each_way_on_the_message_names_passes(way_on):
    check_options(_config("actor_rollout_ref.actor.policy_loss.loss_mode=vanilla",
                          "trainer.v1.trainer_mode=separate_async", "algorithm.rollout_correction.bypass_mode=true",
                          "algorithm.rollout_correction.rollout_is=token",
                          "algorithm.rollout_correction.rollout_rs=token_k1", *way_on))


def test_bypass_mode_loss_without_the_workers_copy_is_refused_and_the_copy_reaches_the_worker_config():
    """verl's bypass_mode loss reads the workers' policy_loss.rollout_correction: absent, verl's defaults."""
    from verl.utils.config import omega_conf_to_dataclass

    asked = ["actor_rollout_ref.actor.policy_loss.loss_mode=bypass_mode",
             "algorithm.rollout_correction.bypass_mode=true", "algorithm.rollout_correction.rollout_rs=token_k1"]
    with pytest.raises(ValueError, match="reads the workers' actor_rollout_ref.actor.policy_loss.rollout_correction"):
        check_options(_config(*asked))
    check_options(_config(*asked, "algorithm.rollout_correction.rollout_rs=null"))  # nothing asked: verl's defaults
    config = _config(*asked, SAME_AS_ALGORITHM)
    check_options(config)
    OmegaConf.resolve(config)  # as verl's task runner does before it builds the workers
    workers = omega_conf_to_dataclass(config.actor_rollout_ref.actor).policy_loss.rollout_correction
    assert workers["rollout_rs"] == "token_k1" and workers["bypass_mode"] is True


# ----------------------------------------------------------------------------- stale-as-fresh under python -m


class _RayInit(BaseException):
    """Stops the launch where Ray would start (a BaseException: Hydra reports and exits on an Exception)."""


@pytest.fixture
def launch(monkeypatch, tmp_path):
    """Run a verl entry point as the shell would, up to ray.init; return the hmpo_verl warnings it logged."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("hmpo_verl")
    logger.addHandler(handler)
    def ray_init(*args, **kwargs):
        raise _RayInit

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", ray_init)
    monkeypatch.chdir(tmp_path)

    def run(entry, *overrides):
        monkeypatch.setattr(sys, "argv", ["main_ppo", *BATCH, "algorithm.adv_estimator=grpo",
                                          f"trainer.default_local_dir={tmp_path}/ck",
                                          f"hydra.run.dir={tmp_path}/hydra", "hydra/job_logging=none",
                                          "hydra/hydra_logging=none", *overrides])
        with pytest.raises(_RayInit):
            entry()
        return [r.getMessage() for r in records]

    yield run
    logger.removeHandler(handler)


@pytest.mark.parametrize("mode", ["colocate_async", "separate_async"])
def test_python_m_main_ppo_warns_once_that_stale_samples_train_as_fresh(launch, mode):
    warnings = launch(lambda: runpy.run_module("verl.trainer.main_ppo", run_name="__main__", alter_sys=True),
                      f"trainer.v1.trainer_mode={mode}")
    stale = [w for w in warnings if "trained as if they were on-policy" in w]
    assert len(stale) == 1 and f"trainer.v1.trainer_mode={mode}" in stale[0], warnings


def test_a_launch_through_both_validate_config_and_our_run_ppo_warns_once(launch):
    import verl.trainer.main_ppo as main_ppo

    assert getattr(main_ppo.run_ppo, "_hmpo_wrapped_by", None) == "_checking_options_first"
    warnings = launch(main_ppo.main, "trainer.v1.trainer_mode=colocate_async")
    assert len([w for w in warnings if "trained as if they were on-policy" in w]) == 1, warnings


# ----------------------------------------------------------------------------- a verl without a symbol


MISSING_SYMBOL = textwrap.dedent("""
    import os, sys
    import ray, verl  # the plugin: hooks pending
    from hydra import compose, initialize_config_dir
    from hmpo_verl.guards import verl_symbols as vs

    ray.init = lambda *a, **k: print("RAY STARTED") or sys.exit(0)
    ray.is_initialized = lambda: False
    ROWS = vs.VERL_SYMBOLS

    def missing(module, symbol):  # a verl in the supported range that moved one listed symbol
        vs.VERL_SYMBOLS = ROWS + (vs.VerlSymbol(module, symbol, "wraps", "simulated", "x", "x"),)

    def outcome(run):
        try:
            run()
            print("PASSED")
        except vs.UnsupportedVerlError as exc:
            print("REFUSED", exc)

    with initialize_config_dir(config_dir=os.path.join(os.path.dirname(verl.__file__), "trainer", "config"),
                               version_base=None):
        config = compose(config_name="ppo_trainer", overrides=[
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
            "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2",
            "trainer.default_local_dir=" + sys.argv[1], "trainer.resume_mode=disable"])
    # main_ppo's driver: V1's trainer_base is imported only in the Ray task runner
    from verl.utils.config import validate_config
    assert "verl.trainer.ppo.v1.trainer_base" not in sys.modules
    missing("verl.trainer.ppo.v1.trainer_base", "PPOTrainer._moved_in_next_release")
    outcome(lambda: validate_config(config, use_reference_policy=False, use_critic=False))
    # fully-async's driver: no validate_config, only run_ppo (its entry module imports the trainer)
    import verl.experimental.fully_async_policy.fully_async_trainer
    from verl.trainer.main_ppo import run_ppo
    missing("verl.experimental.fully_async_policy.fully_async_trainer", "FullyAsyncTrainer._moved_in_next_release")
    outcome(lambda: run_ppo(config, None))
""")


def test_a_verl_without_a_symbol_the_trainer_uses_stops_the_driver_before_ray(tmp_path):
    here = str(Path(hmpo_verl.__file__).parents[1])  # the hmpo_verl under test, whatever is installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([here, *filter(None, [os.environ.get("PYTHONPATH")])])}
    result = subprocess.run([sys.executable, "-c", MISSING_SYMBOL, str(tmp_path / "ck")], capture_output=True,
                            text=True, timeout=600, cwd=tmp_path, env=env)
    outcomes = [line for line in result.stdout.splitlines() if line.startswith(("PASSED", "REFUSED", "RAY"))]
    assert len(outcomes) == 2, result.stdout[-3000:] + result.stderr[-3000:]
    for outcome, symbol in zip(outcomes, ["verl.trainer.ppo.v1.trainer_base.PPOTrainer._moved_in_next_release",
                                          "verl.experimental.fully_async_policy.fully_async_trainer.FullyAsyncTrainer."
                                          "_moved_in_next_release"]):
        assert outcome.startswith("REFUSED") and symbol in outcome and "hmpo_verl supports verl" in outcome, outcome
