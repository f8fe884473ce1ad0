"""hmpo_verl in verl's off-policy trainers: each sample's lag reaches the loss, and bypass mode keeps our loss.

verl 0.9.1 ships two off-policy trainers besides its synchronous one:
``verl.experimental.one_step_off_policy`` (rollout one step ahead of training) and
``verl.experimental.fully_async_policy`` (a rollouter streaming samples to the trainer
through a message queue, with staleness bounds and partial rollout). Both are built on
verl's ``RayPPOTrainer`` (through ``SeparateRayPPOTrainer``) and call the same actor update
and the same ``ppo_loss`` in the workers as the synchronous trainer. Four small wrappers,
installed by :func:`install` in every process right after the verl module they touch is
imported, make our losses at home there:

* ``RayPPOTrainer._update_actor`` (trainer side): attaches each sample's lag
  (:mod:`hmpo_verl.staleness`) to the batch as ``LAG_KEY`` -- the trainer's version
  (``current_param_version`` in fully-async, else ``global_steps``) minus the oldest weight
  version that generated the sample (``min_global_steps``, else ``global_steps``, as the
  rollout server reported them) -- then turns the loss's per-lag sums into
  ``actor/pm/lag<k>/{log_ah_gap,ess_frac,pg_clipfrac}`` and adds the lag distribution
  ``training/lag/{mean,max,share_<k>}``. Batches without versions (the synchronous v1
  trainer, a rollout that reports none) are passed on untouched.
* ``ppo_loss`` (worker side): exposes the micro-batch's slice of ``LAG_KEY`` to the loss
  (:func:`hmpo_verl.staleness.current_sample_lag`); verl's loss signature is unchanged.
* ``apply_bypass_mode``: with ``algorithm.rollout_correction.bypass_mode=true`` (the
  default of verl's shipped async configs) verl's v0 and separated trainers call it, and it
  sets ``policy_loss.loss_mode="bypass_mode"`` (verl's own PPO-clip loss) on the trainer's
  copy of the config. That copy never reaches the workers, which were built before (checked
  end to end: our ``actor/pm/*`` metrics are logged), but a config that names one loss and
  runs another is a trap: for our losses the wrapper keeps ``loss_mode`` and warns once,
  naming both settings. Our loss then runs with bypass semantics: ``old_log_probs`` are the
  rollout's log-probs, so the token ratios are pi_theta / pi_rollout.
* ``run_ppo``: runs the driver checks (``registry.driver_checks``: our options -- which also
  refuse ``bypass_mode`` with ``rollout_is``/``rollout_rs`` --, the checkpoint directory, the
  resume guard and the saved run settings) before Ray starts: verl's fully-async entry point
  never calls ``validate_config``, and the one-step-off one calls it inside Ray.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Optional

import torch

from hmpo_verl.staleness import LAG_KEY, RAW_PREFIX, lag_distribution, per_lag_means, sample_lag_scope, sample_lags

logger = logging.getLogger("hmpo_verl")
HOOK_FAILED = "hmpo_verl could not wrap {} (per-sample lags, bypass-mode guard, option checks before Ray)"


def _once(wrap: Callable) -> Callable:
    """Make ``wrap(fn) -> wrapper`` idempotent: a function ``wrap`` already wrapped is returned as it is."""

    @functools.wraps(wrap)
    def guarded(fn: Callable) -> Callable:
        if getattr(fn, "_hmpo_wrapped_by", None) == wrap.__name__:
            return fn
        wrapper = wrap(fn)
        wrapper._hmpo_wrapped_by = wrap.__name__
        return wrapper

    return guarded


# ----------------------------------------------------------------------------- trainer side


def trainer_version(trainer) -> int:
    """The version label the trainer's current weights carry (fully-async counts syncs, the others steps)."""
    version = getattr(trainer, "current_param_version", None)
    return int(trainer.global_steps if version is None else version)


def batch_versions(non_tensor_batch: dict) -> Optional[list]:
    """Per sample, the oldest weight version that generated it, or None when the rollout reported none."""
    for key in ("min_global_steps", "global_steps"):
        versions = non_tensor_batch.get(key)
        if versions is not None and len(versions) and all(v is not None for v in versions):
            return list(versions)
    return None


@_once
def with_sample_lags(update_actor: Callable) -> Callable:
    """Wrap ``RayPPOTrainer._update_actor(self, batch)`` (see module doc)."""

    @functools.wraps(update_actor)
    def _update_actor(self, batch):
        versions = batch_versions(batch.non_tensor_batch)
        lags = None if versions is None else sample_lags(versions, trainer_version(self))
        if lags is None:
            return update_actor(self, batch)
        batch.batch[LAG_KEY] = lags.to(torch.float32)
        try:
            output = update_actor(self, batch)
        finally:
            batch.batch.pop(LAG_KEY)
        metrics = output.meta_info["metrics"]
        means = per_lag_means(metrics)
        for key in [k for k in metrics if k.startswith(RAW_PREFIX)]:
            del metrics[key]
        metrics.update(means)
        metrics.update(lag_distribution(lags))
        return output

    return _update_actor


# ----------------------------------------------------------------------------- worker side


@_once
def exposing_sample_lag(ppo_loss: Callable) -> Callable:
    """Wrap verl's ``ppo_loss(config, model_output, data, dp_group=None)``: the loss sees ``data[LAG_KEY]``."""

    @functools.wraps(ppo_loss)
    def wrapped(config, model_output, data, dp_group=None):
        lags = data[LAG_KEY] if LAG_KEY in data.keys() else None
        with sample_lag_scope(lags):
            return ppo_loss(config, model_output, data, dp_group=dp_group)

    return wrapped


# ----------------------------------------------------------------------------- bypass mode


BYPASS_WARNING = (
    "algorithm.rollout_correction.bypass_mode=true: verl's apply_bypass_mode sets "
    "actor_rollout_ref.actor.policy_loss.loss_mode='bypass_mode' (verl's own PPO-clip loss) on the trainer's "
    "config; hmpo_verl keeps loss_mode=%r, the loss the workers run. In bypass mode old_log_probs are the "
    "rollout's log-probs: %s's token ratios are pi_theta / pi_rollout (the behaviour policy)."
)


@_once
def keeping_our_loss(apply_bypass_mode: Callable) -> Callable:
    """Wrap verl's ``apply_bypass_mode``: ``old_log_probs = rollout_log_probs`` as verl does, our loss_mode kept."""
    warned = set()

    @functools.wraps(apply_bypass_mode)
    def wrapped(batch, rollout_corr_config=None, policy_loss_config=None):
        from omegaconf import open_dict

        from hmpo_verl.config import LOSS_OPTION_CLASSES

        ours = policy_loss_config.get("loss_mode", None) if policy_loss_config is not None else None
        apply_bypass_mode(batch, rollout_corr_config=rollout_corr_config, policy_loss_config=policy_loss_config)
        if ours in LOSS_OPTION_CLASSES:
            with open_dict(policy_loss_config):
                policy_loss_config["loss_mode"] = ours
            if ours not in warned:
                warned.add(ours)
                logger.warning(BYPASS_WARNING, ours, ours)

    return wrapped


# ----------------------------------------------------------------------------- install


@_once
def _checking_options_first(run_ppo: Callable) -> Callable:
    @functools.wraps(run_ppo)
    def wrapped(config, *args, **kwargs):
        from hmpo_verl.registry import driver_checks

        driver_checks(config)
        return run_ppo(config, *args, **kwargs)

    return wrapped


def _patch(module, name: str, wrap: Callable) -> None:
    setattr(module, name, wrap(getattr(module, name)))


def install(run_after_import: Callable) -> None:
    """Install the four wrappers through ``run_after_import(module_name, action, failure)``."""
    hooks = {
        "verl.trainer.ppo.ray_trainer": lambda m: _patch(m.RayPPOTrainer, "_update_actor", with_sample_lags),
        "verl.workers.utils.losses": lambda m: _patch(m, "ppo_loss", exposing_sample_lag),
        "verl.trainer.ppo.rollout_corr_helper": lambda m: _patch(m, "apply_bypass_mode", keeping_our_loss),
        "verl.trainer.main_ppo": lambda m: _patch(m, "run_ppo", _checking_options_first),
    }
    for module, action in hooks.items():
        run_after_import(module, action, HOOK_FAILED.format(module))
