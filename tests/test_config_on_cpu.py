"""Bad configuration is rejected when the config is built (verl's driver does that before Ray)."""

import math
import os

import pytest
import verl
from hydra import compose, initialize_config_dir
from verl.utils.config import omega_conf_to_dataclass

from hmpo_verl import AdaptivePowerMeanLossConfig, PowerMeanAlgoConfig, PowerMeanLossConfig

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


def _composed(overrides):
    with initialize_config_dir(config_dir=VERL_CONFIG_DIR, version_base=None):
        return compose(
            config_name="ppo_trainer",
            overrides=["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
                       "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=2"] + overrides,
        )


def _driver_validation(overrides):
    """What verl's driver runs before Ray starts (main_ppo uses this same function)."""
    import verl.trainer.main_ppo

    verl.trainer.main_ppo.validate_config(_composed(overrides), use_reference_policy=False, use_critic=False)


def test_power_mean_with_plain_config_stops_the_driver_saying_what_to_set():
    with pytest.raises(ValueError) as err:
        _driver_validation(["actor_rollout_ref.actor.policy_loss.loss_mode=power_mean"])
    assert "_target_=hmpo_verl.PowerMeanLossConfig" in str(err.value)
    assert "policy_loss.power" in str(err.value)
    for mode in ("hmpo", "agm", "adaptive_power_mean"):  # these run on defaults
        _driver_validation([f"actor_rollout_ref.actor.policy_loss.loss_mode={mode}"])


def test_power_mean_on_our_config_without_a_power_stops_the_driver_as_every_host():
    """No host has a default p for power_mean: PowerMeanLossConfig's class default (-1) is not trained silently."""
    target = "actor_rollout_ref.actor.policy_loss._target_=hmpo_verl.PowerMeanLossConfig"
    with pytest.raises(Exception) as err:  # Hydra's InstantiationException around our ValueError
        _driver_validation([target, "actor_rollout_ref.actor.policy_loss.loss_mode=power_mean"])
    assert ("loss_mode='power_mean' needs a power p: set +actor_rollout_ref.actor.policy_loss.power=<p> (or use "
            "loss_mode=hmpo for p=-1)") in str(err.value)
    # the way on works, and hmpo / agm still need no power
    _driver_validation([target, "actor_rollout_ref.actor.policy_loss.loss_mode=power_mean",
                        "+actor_rollout_ref.actor.policy_loss.power=-0.5"])
    for mode in ("hmpo", "agm"):
        _driver_validation([target, f"actor_rollout_ref.actor.policy_loss.loss_mode={mode}"])
    assert PowerMeanLossConfig(loss_mode="hmpo").power == -1.0 and AdaptivePowerMeanLossConfig().power == -1.0


@pytest.mark.parametrize(
    "overrides,field_name",
    [
        (["algorithm._target_=hmpo_verl.PowerMeanAlgoConfig", "algorithm.adv_estimator=power_mean",
          "+algorithm.risk_beta=.nan"], "algorithm.risk_beta"),
        (["algorithm._target_=hmpo_verl.PowerMeanAlgoConfig", "algorithm.adv_estimator=agm",
          "+algorithm.norm_adv_by_std=3"], "algorithm.norm_adv_by_std"),
        (["actor_rollout_ref.actor.policy_loss._target_=hmpo_verl.AdaptivePowerMeanLossConfig",
          "actor_rollout_ref.actor.policy_loss.loss_mode=adaptive_power_mean",
          "+actor_rollout_ref.actor.policy_loss.p_min=0.5"], "policy_loss.p_min"),
        # the actor's clip bounds for our losses (a NaN one silently turned its clip off)
        (["actor_rollout_ref.actor.policy_loss.loss_mode=hmpo", "actor_rollout_ref.actor.clip_ratio_low=nan"],
         "actor_rollout_ref.actor.clip_ratio_low=nan"),
        (["actor_rollout_ref.actor.policy_loss.loss_mode=hmpo", "actor_rollout_ref.actor.clip_ratio_low=.nan"],
         "actor_rollout_ref.actor.clip_ratio_low='.nan' is invalid; allowed: a number"),
        (["actor_rollout_ref.actor.policy_loss.loss_mode=agm", "actor_rollout_ref.actor.clip_ratio_c=0.5"],
         "actor_rollout_ref.actor.clip_ratio_c=0.5"),
        (["actor_rollout_ref.actor.policy_loss.loss_mode=hmpo", "actor_rollout_ref.actor.clip_ratio_high=-0.1"],
         "actor_rollout_ref.actor.clip_ratio_high=-0.1"),
    ],
)
def test_driver_validation_rejects_bad_values_before_ray(overrides, field_name):
    with pytest.raises(Exception) as err:
        _driver_validation(overrides)
    assert field_name in str(err.value)


def test_driver_validation_accepts_our_algorithm_config():
    _driver_validation(["algorithm._target_=hmpo_verl.PowerMeanAlgoConfig", "algorithm.adv_estimator=power_mean",
                        "+algorithm.risk_beta=-2.0", "+algorithm.norm_adv_by_std=true", "actor_rollout_ref.rollout.n=4"])
    _driver_validation(["algorithm.adv_estimator=agm", "actor_rollout_ref.rollout.n=2"])  # plain AlgoConfig: defaults


@pytest.mark.parametrize("estimator", ["power_mean", "agm"])
def test_our_estimators_with_one_response_per_prompt_are_refused_before_ray(estimator):
    """verl's default rollout.n is 1: every group one response, every advantage 0, a run that trains nothing."""
    with pytest.raises(ValueError, match=rf"^algorithm.adv_estimator='{estimator}' with actor_rollout_ref.rollout.n=1: "
                                         r".*advantage is 0 .*allowed: actor_rollout_ref.rollout.n >= 2$"):
        _driver_validation([f"algorithm.adv_estimator={estimator}"])
    _driver_validation(["algorithm.adv_estimator=grpo"])  # verl's own: a group of one gets its reward
    _driver_validation([f"algorithm.adv_estimator={estimator}", "trainer.val_only=true"])  # trains nothing


@pytest.mark.parametrize(
    "fields,field_name",
    [
        (dict(adapt="auto"), "adapt"),
        (dict(p_min=0.1), "p_min"),
        (dict(p_max=-1.0), "p_max"),
        (dict(p_max=math.inf), "p_max"),
        (dict(p_min=-1.5e4), "p_min"),  # beyond the range where the solver's guarantee is tested (issue 22)
        (dict(p_max=1e5), "p_max"),
        (dict(sign_rule="up"), "sign_rule"),
        (dict(ess_target_min=0.0), "ess_target_min"),
        (dict(ess_target_min=1.5), "ess_target_min"),
        (dict(schedule="exp"), "schedule"),
        (dict(schedule_steps=0), "schedule_steps"),
        (dict(p_start=math.nan), "p_start"),
        (dict(clip_level="sequence"), "clip_level"),
    ],
)
def test_adaptive_config_validation(fields, field_name):
    with pytest.raises(ValueError) as err:
        AdaptivePowerMeanLossConfig(**fields)
    assert f"policy_loss.{field_name}=" in str(err.value) and "allowed" in str(err.value)
    AdaptivePowerMeanLossConfig(adapt="schedule", clip_level="sequence")  # schedules work at sequence level


def test_a_misspelt_loss_mode_with_our_config_class_stops_the_driver():
    """loss_mode=hmpoo passed the driver and failed in the actor workers (verl's get_policy_loss_fn), after Ray."""
    with pytest.raises(Exception, match=r"policy_loss.loss_mode='hmpoo' is invalid; allowed: the policy losses verl "
                                        r"has registered: .*\bhmpo\b.*\bvanilla\b"):
        _driver_validation(["actor_rollout_ref.actor.policy_loss._target_=hmpo_verl.PowerMeanLossConfig",
                            "actor_rollout_ref.actor.policy_loss.loss_mode=hmpoo"])
    _driver_validation(["actor_rollout_ref.actor.policy_loss._target_=hmpo_verl.PowerMeanLossConfig",
                        "actor_rollout_ref.actor.policy_loss.loss_mode=gspo"])  # verl's own, on our class


def test_an_agm_step_count_past_its_cap_and_a_schedule_whose_p_is_nan_are_refused_by_name():
    """agm_iters=10**9 ran ~10 hours per loss call for the limit agm_iters=null gives; p_start=1e308,
    p_end=-1e308 made the scheduled p NaN, refused at the first loss call naming neither field."""
    with pytest.raises(ValueError, match=r"policy_loss.agm_iters=1001 is invalid; allowed: null \(exact limit "
                                         r"sqrt\(A\*H\)\) or an integer in \[0, 1000\]"):
        PowerMeanLossConfig(loss_mode="agm", agm_iters=1001)
    PowerMeanLossConfig(loss_mode="agm", agm_iters=1000)
    with pytest.raises(ValueError, match=r"policy_loss.p_start=1e\+308, .*policy_loss.p_end=-1e\+308 are invalid: "
                                         r"p_end - p_start is beyond float64's range"):
        AdaptivePowerMeanLossConfig(loss_mode="adaptive_power_mean", adapt="schedule", p_start=1e308, p_end=-1e308)
    AdaptivePowerMeanLossConfig(loss_mode="adaptive_power_mean", adapt="schedule", p_start=1e307, p_end=-1e307)


@pytest.mark.parametrize("loss_mode, power", [("hmpo", None), ("power_mean", 0.5), ("agm", None), ("vanilla", None)])
@pytest.mark.parametrize("adapt", ["schedule", "reward"])
def test_an_adapt_rule_with_a_loss_mode_that_reads_none_is_refused(loss_mode, power, adapt):
    """adapt='schedule' with the default p_start / p_end, loss_mode left at hmpo: the run trained HMPO (p = -1),
    silently; also through the driver (Hydra) and the OpenRLHF / SkyRL options."""
    from hmpo_verl.hosts.host_loss import LossOptions

    fields = dict(loss_mode=loss_mode, adapt=adapt, **({"power": power} if power is not None else {}))
    with pytest.raises(ValueError, match=rf"^actor_rollout_ref.actor.policy_loss.adapt='{adapt}': not read with "
                                         rf"loss_mode='{loss_mode}', so the run would ignore it; .*read by "
                                         r"loss_mode='adaptive_power_mean'\)$"):
        AdaptivePowerMeanLossConfig(**fields)
    with pytest.raises(Exception, match=rf"policy_loss.adapt='{adapt}': not read"):  # Hydra wraps it
        _driver_validation(["actor_rollout_ref.actor.policy_loss._target_=hmpo_verl.AdaptivePowerMeanLossConfig",
                            f"actor_rollout_ref.actor.policy_loss.loss_mode={loss_mode}",
                            f"+actor_rollout_ref.actor.policy_loss.adapt={adapt}",
                            *([f"+actor_rollout_ref.actor.policy_loss.power={power}"] if power is not None else [])])
    if loss_mode != "vanilla":
        with pytest.raises(ValueError, match=rf"adapt='{adapt}': not read with loss_mode='{loss_mode}'"):
            LossOptions(**fields)
    AdaptivePowerMeanLossConfig(loss_mode=loss_mode, **({"power": power} if power is not None else {}))  # ess: default
    AdaptivePowerMeanLossConfig(loss_mode="adaptive_power_mean", adapt=adapt)


_TARGET = ("actor_rollout_ref.actor.policy_loss._target_=hmpo_verl.PowerMeanLossConfig",
           "actor_rollout_ref.actor.policy_loss.loss_mode=hmpo")


@pytest.mark.parametrize("level, space", [("sequence", "ratio"), ("token", "log"), ("sequence", "log")])
def test_a_dual_clip_where_no_dual_clip_applies_is_refused_before_ray(level, space):
    """clip_ratio_c=10 with clip_space='log' (or sequence level) trained without any dual clip, silently."""
    from verl.workers.config import ActorConfig

    from hmpo_verl.hosts.verl.losses import VERL_DUAL_CLIP

    assert ActorConfig.__dataclass_fields__["clip_ratio_c"].default == VERL_DUAL_CLIP
    ours = [*_TARGET, f"+actor_rollout_ref.actor.policy_loss.clip_level={level}",
            f"+actor_rollout_ref.actor.policy_loss.clip_space={space}"]
    with pytest.raises(ValueError, match=rf"^actor_rollout_ref.actor.clip_ratio_c=10.0: not read with clip_level="
                                         rf"'{level}', clip_space='{space}' .*allowed: verl's default 3.0, or "
                                         r"clip_level='token' with clip_space='ratio'$"):
        _driver_validation([*ours, "actor_rollout_ref.actor.clip_ratio_c=10"])
    _driver_validation([*ours, "actor_rollout_ref.actor.clip_ratio_c=3.0"])  # verl's default: not the user's
    _driver_validation([*_TARGET, "actor_rollout_ref.actor.clip_ratio_c=10"])  # token level, ratio space: read
    _driver_validation(["actor_rollout_ref.actor.policy_loss.loss_mode=vanilla",
                        "actor_rollout_ref.actor.clip_ratio_c=10"])  # verl's own loss: verl's business


def test_our_config_class_left_on_verls_default_loss_mode_says_it_trains_verls_loss(caplog):
    """_target_ set to our class and nothing else: verl's yaml keeps loss_mode='vanilla', and the run trains
    vanilla -- said once (a baseline under our class may be meant: not refused)."""
    import logging

    with caplog.at_level(logging.WARNING, logger="hmpo_verl"):
        _driver_validation(["actor_rollout_ref.actor.policy_loss._target_=hmpo_verl.AdaptivePowerMeanLossConfig"])
    [line] = [r.getMessage() for r in caplog.records if "none of ours" in r.getMessage()]
    assert line.startswith("actor_rollout_ref.actor.policy_loss._target_=hmpo_verl.AdaptivePowerMeanLossConfig with "
                           "loss_mode='vanilla': the run trains verl's 'vanilla' loss, none of ours")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hmpo_verl"):
        _driver_validation(["actor_rollout_ref.actor.policy_loss._target_=hmpo_verl.AdaptivePowerMeanLossConfig",
                            "actor_rollout_ref.actor.policy_loss.loss_mode=adaptive_power_mean"])
    assert "none of ours" not in caplog.text


@pytest.mark.parametrize("fields,field_name", [(dict(risk_beta=math.inf), "risk_beta"),
                                              (dict(risk_beta="high"), "risk_beta"),
                                              (dict(norm_adv_by_std="yes"), "norm_adv_by_std")])
def test_algo_config_validation(fields, field_name):
    with pytest.raises(ValueError) as err:
        PowerMeanAlgoConfig(**fields)
    assert f"algorithm.{field_name}=" in str(err.value) and "allowed" in str(err.value)


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
