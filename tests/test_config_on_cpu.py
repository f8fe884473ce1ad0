"""Bad configuration is rejected when the config is built (verl's driver does that before Ray)."""

import math
import os

import pytest
import verl
from hydra import compose, initialize_config_dir
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config import PolicyLossConfig

from hmpo_verl import PowerMeanLossConfig

VERL_CONFIG_DIR = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")


@pytest.mark.parametrize(
    "fields,field_name",
    [
        (dict(power=math.nan), "power"),
        (dict(power="harmonic"), "power"),
        (dict(power=True), "power"),
        (dict(clip_level="tokens"), "clip_level"),
        (dict(clip_space="exp"), "clip_space"),
        (dict(agm_iters=-1), "agm_iters"),
        (dict(agm_iters=1.5), "agm_iters"),
        (dict(loss_mode="hmpo", power=0.5), "power"),
    ],
)
def test_invalid_fields_name_field_value_and_allowed(fields, field_name):
    with pytest.raises(ValueError) as err:
        PowerMeanLossConfig(**fields)
    message = str(err.value)
    assert f"policy_loss.{field_name}=" in message
    assert "allowed" in message or "conflicts" in message


def test_valid_fields():
    assert PowerMeanLossConfig(power=math.inf).power == math.inf
    assert PowerMeanLossConfig(power=-2).power == -2
    assert PowerMeanLossConfig(loss_mode="agm", agm_iters=0).agm_iters == 0


def test_power_mean_with_plain_config_says_what_to_set():
    with pytest.raises(ValueError) as err:
        PolicyLossConfig(loss_mode="power_mean")
    assert "_target_=hmpo_verl.PowerMeanLossConfig" in str(err.value)
    assert "policy_loss.power" in str(err.value)
    PolicyLossConfig(loss_mode="hmpo")  # the one-line path needs nothing else
    PolicyLossConfig(loss_mode="agm")


def _actor(overrides):
    with initialize_config_dir(config_dir=VERL_CONFIG_DIR, version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2"] + overrides)
    return omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)


def test_hydra_cli_overrides_reach_our_config():
    actor = _actor([
        "actor_rollout_ref.actor.policy_loss._target_=hmpo_verl.PowerMeanLossConfig",
        "actor_rollout_ref.actor.policy_loss.loss_mode=power_mean",
        "+actor_rollout_ref.actor.policy_loss.power=-0.5",
        "+actor_rollout_ref.actor.policy_loss.clip_level=sequence",
    ])
    assert isinstance(actor.policy_loss, PowerMeanLossConfig)
    assert actor.policy_loss.power == -0.5 and actor.policy_loss.clip_level == "sequence"


def test_hydra_bad_value_fails_at_config_construction():
    with pytest.raises(Exception) as err:
        _actor([
            "actor_rollout_ref.actor.policy_loss._target_=hmpo_verl.PowerMeanLossConfig",
            "+actor_rollout_ref.actor.policy_loss.clip_space=logit",
        ])
    assert "clip_space='logit'" in str(err.value)
    with pytest.raises(Exception) as err:
        _actor(["actor_rollout_ref.actor.policy_loss.loss_mode=power_mean"])
    assert "PowerMeanLossConfig" in str(err.value)
