"""Every verl function hmpo_verl wraps behaves as verl's own on inputs verl accepts (issue 27, F8).

verl's own tests reach only `calculate_debug_metrics` of our wrappers (tests/test_verl_upstream.py runs
them with and without the plugin); here, for each wrapper, verl's function and the wrapped one are called
on the same inputs and must return the same result and leave the same state, and what a wrapper adds
happens only where it says (a poisoned rollout, our loss under bypass mode, a failed save).
"""

import copy
import json
import math

import pytest
import torch
from omegaconf import OmegaConf

import verl.trainer.main_ppo
import verl.trainer.ppo.ray_trainer as ray_trainer
import verl.trainer.ppo.rollout_corr_helper as rollout_corr_helper
import verl.utils.config as verl_config
import verl.utils.debug.metrics as debug_metrics
import verl.workers.utils.losses as worker_losses
from verl.protocol import DataProto

from hmpo_verl.finite import NonFiniteInputError
from hmpo_verl.offpolicy import _checking_options_first, exposing_sample_lag, keeping_our_loss, with_sample_lags
from test_config_on_cpu import _composed


def _unwrapped(fn):
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn


def _same(a, b):
    """Equal dicts of metrics, NaN equal to NaN."""
    assert a.keys() == b.keys()
    for key in a:
        assert a[key] == b[key] or (math.isnan(a[key]) and math.isnan(b[key])), key


def _debug_batch(masks: dict, response_length=10, prompt_length=3, poison=False):
    g = torch.Generator().manual_seed(0)
    rollout = -torch.rand(2, response_length, generator=g) * 2
    if poison:
        rollout[1, 4] = math.nan
    batch = {"rollout_log_probs": rollout, "old_log_probs": -torch.rand(2, response_length, generator=g) * 2,
             "responses": torch.zeros(2, response_length)}
    for key, kind in masks.items():
        width = response_length if key in ("response_mask", "loss_mask") else prompt_length + response_length
        batch[key] = (torch.rand(2, width, generator=g) < 0.7).long() if kind == "random" else torch.zeros(2, width).long()
    return DataProto.from_dict(batch)


MASK_CASES = [
    {},  # verl: "no mask info found, use all log probs" (verl's own test; F8's KeyError 'attention_mask')
    {"loss_mask": "random"},
    {"response_mask": "random"},
    {"attention_mask": "random"},  # prompt + response: verl takes the last response_length columns
    {"response_mask": "random", "attention_mask": "random"},
    {"response_mask": "zeros"},  # verl: all False, default metrics
]


@pytest.mark.parametrize("masks", MASK_CASES, ids=lambda m: "+".join(m) or "none")
def test_debug_metrics_wrapper_is_verls_function(masks):
    wrapped = debug_metrics.calculate_debug_metrics
    assert getattr(wrapped, "_hmpo_guarded", False)  # the plugin is loaded in this process
    _same(wrapped(_debug_batch(masks)), _unwrapped(wrapped)(_debug_batch(masks)))


@pytest.mark.parametrize("masks", MASK_CASES[:5], ids=lambda m: "+".join(m) or "none")
def test_debug_metrics_wrapper_refuses_a_poisoned_rollout_where_verl_reads_it(masks):
    """What the wrapper adds: NaN rollout log-probs at a position verl's metrics read stop the step."""
    data = _debug_batch(masks, poison=True)
    mask = data.batch.get("response_mask", data.batch.get("attention_mask", torch.ones(2, 10)))[:, -10:]
    if mask[1, 4]:
        with pytest.raises(NonFiniteInputError, match="rollout_log_probs has 1 non-finite"):
            debug_metrics.calculate_debug_metrics(data)
    else:  # a masked NaN: verl's function ignores it, and so does the wrapper
        _same(debug_metrics.calculate_debug_metrics(data), _unwrapped(debug_metrics.calculate_debug_metrics)(data))


def test_validate_config_wrapper_is_verls_function_on_verls_config():
    """verl's default PPO config (vanilla loss): the same result, and the config left as verl leaves it but
    for one added key, `hmpo.run_settings` (the launch's settings that each checkpoint records and a resume
    compares: `hmpo_verl.run_settings.stamp_run_settings`), which no verl code reads."""
    from hmpo_verl.run_settings import run_settings

    assert getattr(verl_config.validate_config, "_hmpo_checked", False)
    configs = [_composed([]) for _ in range(2)]
    results = [fn(config=c, use_reference_policy=False, use_critic=False)
               for fn, c in zip((verl_config.validate_config, _unwrapped(verl_config.validate_config)), configs)]
    assert results[0] == results[1]
    ours, verls = OmegaConf.to_container(configs[0]), OmegaConf.to_container(configs[1])
    stamp = ours.pop("hmpo")
    assert stamp == {"run_settings": json.dumps(run_settings(configs[1]), sort_keys=True, default=str)}
    assert "hmpo" not in verls and ours == verls


def test_run_ppo_wrapper_passes_verls_config_and_result_through():
    calls = []
    wrapped = _checking_options_first(lambda config, *a, **k: calls.append((config, a, k)) or "done")
    config = _composed([])
    assert wrapped(config, "task_runner", flag=1) == "done"
    assert calls == [(config, ("task_runner",), {"flag": 1})]
    assert getattr(verl.trainer.main_ppo.run_ppo, "_hmpo_wrapped_by", None) == "_checking_options_first"


def _bypass_inputs(loss_mode):
    g = torch.Generator().manual_seed(1)
    batch = DataProto.from_dict({"rollout_log_probs": -torch.rand(2, 4, generator=g),
                                 "old_log_probs": -torch.rand(2, 4, generator=g)})
    return batch, OmegaConf.create({"loss_mode": loss_mode, "clip_ratio": 0.2})


@pytest.mark.parametrize("loss_mode", ["vanilla", "gspo"])
def test_apply_bypass_mode_wrapper_is_verls_function_for_verls_losses(loss_mode):
    assert getattr(rollout_corr_helper.apply_bypass_mode, "_hmpo_wrapped_by", None) == "keeping_our_loss"
    corr = OmegaConf.create({"bypass_mode": True})
    ours, theirs = _bypass_inputs(loss_mode), _bypass_inputs(loss_mode)
    rollout_corr_helper.apply_bypass_mode(ours[0], rollout_corr_config=corr, policy_loss_config=ours[1])
    _unwrapped(rollout_corr_helper.apply_bypass_mode)(theirs[0], rollout_corr_config=corr, policy_loss_config=theirs[1])
    assert OmegaConf.to_container(ours[1]) == OmegaConf.to_container(theirs[1])
    assert ours[1]["loss_mode"] == "bypass_mode"
    for key in ("old_log_probs", "rollout_log_probs"):
        assert torch.equal(ours[0].batch[key], theirs[0].batch[key])


def test_apply_bypass_mode_wrapper_keeps_only_our_loss_mode():
    corr = OmegaConf.create({"bypass_mode": True})
    batch, config = _bypass_inputs("hmpo")
    keeping_our_loss(_unwrapped(rollout_corr_helper.apply_bypass_mode))(batch, rollout_corr_config=corr,
                                                                        policy_loss_config=config)
    assert config["loss_mode"] == "hmpo" and torch.equal(batch.batch["old_log_probs"], batch.batch["rollout_log_probs"])


def test_ppo_loss_wrapper_passes_everything_through_without_lags():
    assert getattr(worker_losses.ppo_loss, "_hmpo_wrapped_by", None) == "exposing_sample_lag"
    calls = []
    data = DataProto.from_dict({"x": torch.ones(2, 3)}).batch

    def ppo_loss(config, model_output, data, dp_group=None):
        calls.append((config, model_output, data, dp_group))
        return "loss", {"m": 1}

    assert exposing_sample_lag(ppo_loss)("cfg", "out", data, dp_group="g") == ("loss", {"m": 1})
    assert calls == [("cfg", "out", data, "g")]


def test_update_actor_wrapper_passes_a_batch_without_versions_through():
    """The synchronous trainer's batches carry no weight versions: verl's _update_actor sees the same batch,
    and its output comes back unchanged."""
    assert getattr(ray_trainer.RayPPOTrainer._update_actor, "_hmpo_wrapped_by", None) == "with_sample_lags"
    batch = DataProto.from_dict({"x": torch.ones(2, 3)})
    seen = []
    output = DataProto.from_dict({"y": torch.zeros(1)}, meta_info={"metrics": {"actor/pg_loss": 0.5}})

    def update_actor(self, b):
        seen.append((self, b, copy.deepcopy(list(b.batch.keys()))))
        return output

    trainer = object()
    assert with_sample_lags(update_actor)(trainer, batch) is output
    assert seen == [(trainer, batch, ["x"])] and output.meta_info["metrics"] == {"actor/pg_loss": 0.5}


def test_save_checkpoint_wrapper_returns_verls_result(tmp_path):
    """verl's result passes through; what the guard adds is the launch's settings beside the step's files."""
    from hmpo_verl.checkpoints import guard_saves
    from hmpo_verl.run_settings import SETTINGS_FILE

    class Trainer:
        config = OmegaConf.create({"trainer": {"default_local_dir": str(tmp_path)}})
        global_steps = 3

        def _save_checkpoint(self, *args, **kwargs):
            return ("saved", args, kwargs)

    guard_saves(Trainer)
    assert Trainer()._save_checkpoint(1, tag="x") == ("saved", (1,), {"tag": "x"})
    assert [p.name for p in tmp_path.iterdir()] == ["global_step_3"]
    assert [p.name for p in (tmp_path / "global_step_3").iterdir()] == [SETTINGS_FILE]
    assert getattr(ray_trainer.RayPPOTrainer._save_checkpoint, "_hmpo_guarded", False)
