"""verl's V1 async modes with our losses: the stale-as-fresh warning and each trainer's per-sample lag.

Driver-side and unit-level (no Ray): the warning is read from the ``run_ppo`` wrapper that runs
before Ray starts; each trainer's lag from the version labels that trainer's own code hands
the rollout (traced below from verl 0.9.1's ``fit`` loops).
"""

from __future__ import annotations

import logging

import pytest
from hydra import compose, initialize_config_dir
from test_verl_integration_on_cpu import VERL_CONFIG_DIR

from hmpo_verl.offpolicy import _checking_options_first, stale_as_fresh


def _verl_config(*overrides: str):
    with initialize_config_dir(config_dir=VERL_CONFIG_DIR, version_base=None):
        return compose(config_name="ppo_trainer",
                       overrides=["actor_rollout_ref.actor.policy_loss.loss_mode=hmpo", *overrides])


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
