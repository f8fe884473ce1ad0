"""hmpo_verl in verl's off-policy trainers: each sample's lag reaches the loss, and bypass mode keeps our loss.

verl 0.9.1 ships two off-policy trainers besides its synchronous one:
``verl.experimental.one_step_off_policy`` (rollout one step ahead of training) and
``verl.experimental.fully_async_policy`` (a rollouter streaming samples to the trainer
through a message queue, with staleness bounds and partial rollout). Both are built on
verl's ``RayPPOTrainer`` (through ``SeparateRayPPOTrainer``) and call the same actor update
and the same ``ppo_loss`` in the workers as the synchronous trainer. Small wrappers,
installed by :func:`install` in every process right after the verl module they touch is
imported, make our losses at home there:

* ``RayPPOTrainer._update_actor`` (trainer side): attaches each sample's lag
  (:mod:`hmpo_verl.staleness`) to the batch as ``LAG_KEY`` -- the weight versions (syncs to the
  rollout; one per actor update except in V1 at ``parameter_sync_step`` > 1 and in fully-async) between the
  weights that generated the sample (the oldest label, ``min_global_steps``, else
  ``global_steps``, as the rollout server reported it) and the weights trained now, each
  trainer's labels read as that trainer writes them (:func:`lags_from_labels`; fully-async
  counts syncs) -- then turns the loss's per-lag sums into
  ``actor/pm/lag<k>/{log_ah_gap,ess_frac,pg_clipfrac}`` and adds the lag distribution
  ``training/lag/{mean,max,share_<k>}``. Batches without versions (a rollout that reports
  none) are passed on untouched. ``RayPPOTrainer._load_checkpoint`` records the step
  training starts from (one-step-off's first label).
* V1's ``PPOTrainer._update_actor`` and ``PPOTrainer.step`` (every ``trainer.v1.trainer_mode``):
  the same lags from the batch's TransferQueue tags, stored as a field ``LAG_KEY`` the workers
  read with the batch; the per-lag means and the distribution once the step's updates are in.
  (And V1 separate_async's module logger drops the ``flush=True`` verl 0.9.1 passes it, which
  otherwise kills every ``hybrid_engine=false`` run: :class:`_DroppingFlush`.)
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
* ``run_ppo``: runs the driver checks (``hmpo_verl.hosts.verl.checks.driver_checks``: our options --
  which also refuse ``bypass_mode`` with ``rollout_is``/``rollout_rs`` --, the checkpoint directory,
  the resume guard and the saved run settings) before Ray starts: verl's fully-async entry point
  never calls ``validate_config``, and the one-step-off one calls it inside Ray, so for one-step-off the
  wrapper also runs verl's ``validate_config`` in the driver (:func:`validate_as_verls_main`).
  ``driver_checks`` also warns (``hmpo_verl.hosts.verl.checks.warn_stale_as_fresh``, once per launch)
  when a V1 async mode would train stale samples as if they were on-policy (``validate_config`` runs it
  too, so ``python -m verl.trainer.main_ppo``, whose ``__main__`` calls its own unwrapped ``run_ppo``,
  gets it); :func:`stale_as_fresh` is public here as well.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Optional, Sequence

import torch

from hmpo_verl.hosts.verl.checks import stale_as_fresh  # noqa: F401 (public here: README, tests)
from hmpo_verl.maths.staleness import (LAG_KEY, RAW_ROOT, STEP_MEAN_KEYS, lag_distribution, sample_lag_scope,
                                       sample_lags, staged_means, staged_totals)

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


# How verl 0.9.1's trainers label the weights they sync to the rollout, which reports the label
# of the weights that generated each sample (``min_global_steps``: its oldest token's):
#   * AFTER_UPDATE -- the synchronous trainer (V0 ``RayPPOTrainer``) and every V1 mode: the initial
#     (or resumed) weights are synced as ``global_steps`` before the first step, then each step's
#     update is synced as that step, so label v = the weights after v steps; the trainer at step
#     k trains weights of k - 1 steps (verl's own V1 ``trajectory_staleness_worst``), plus, in V1 at
#     ``parameter_sync_step`` > 1, the step's own local updates so far (not counted: a lag is in versions).
#   * ONE_STEP_OFF -- ``OneStepOffRayTrainer`` syncs the initial (or resumed) weights as the
#     step they start from, then at step k *before* that step's update syncs label k: label v
#     holds v - 1 updates, except the first label, which holds v (step 1 and the first step
#     after a resume are on-policy).
#   * FULLY_ASYNC -- the trainer counts syncs (``current_param_version``) and the rollouter labels
#     samples with the version it holds: the lag is counted in syncs.
AFTER_UPDATE, ONE_STEP_OFF, FULLY_ASYNC = "after_update", "one_step_off", "fully_async"
FIRST_LABEL = "_hmpo_first_label"  # set on a trainer by its _load_checkpoint: the step it starts from


def label_scheme(trainer) -> str:
    """Which of the labelling schemes above the trainer object follows."""
    if getattr(trainer, "current_param_version", None) is not None:
        return FULLY_ASYNC
    if any(cls.__name__ == "OneStepOffRayTrainer" for cls in type(trainer).__mro__):
        return ONE_STEP_OFF
    return AFTER_UPDATE


def lags_from_labels(labels: Sequence[int], scheme: str, global_steps: int, param_version: Optional[int] = None,
                     first_label: int = 0) -> Optional[torch.Tensor]:
    """Per sample, the weight versions between the weights that generated it and those trained now.

    A version is a sync of the trainer's weights to the rollout: one actor update in V0, one-step-off and V1
    at ``parameter_sync_step`` 1; V1 at ``parameter_sync_step`` k syncs after k local updates (its
    ``local_trigger_step`` 0 .. k - 1 all train on lag-0 samples of the synced version), fully-async after
    ``trigger_parameter_sync_step``. Counted as verl counts staleness, in versions.

    Args:
        labels: ``(batch_size,)`` the weight label each sample reports (its oldest).
        scheme: ``AFTER_UPDATE``, ``ONE_STEP_OFF`` or ``FULLY_ASYNC`` (see above).
        global_steps: the trainer's step (verl's ``global_steps``, from 1).
        param_version: the fully-async trainer's ``current_param_version``.
        first_label: the step the trainer started (or resumed) from.

    Returns:
        ``(batch_size,)`` int64 lags; None if a label is unknown.
    """
    if any(v is None for v in labels):
        return None
    if scheme == FULLY_ASYNC:
        return sample_lags(labels, param_version)
    if scheme == ONE_STEP_OFF:
        labels = [int(v) - 1 if int(v) > first_label else int(v) for v in labels]
    return sample_lags(labels, int(global_steps) - 1)


def trainer_lags(trainer, labels: Sequence[int]) -> Optional[torch.Tensor]:
    """:func:`lags_from_labels` with the trainer object's scheme and counters."""
    return lags_from_labels(labels, label_scheme(trainer), trainer.global_steps,
                            getattr(trainer, "current_param_version", None), getattr(trainer, FIRST_LABEL, 0))


@_once
def recording_first_label(load_checkpoint: Callable) -> Callable:
    """Wrap ``RayPPOTrainer._load_checkpoint``: after it, ``global_steps`` is the step training starts from."""

    @functools.wraps(load_checkpoint)
    def _load_checkpoint(self, *args, **kwargs):
        result = load_checkpoint(self, *args, **kwargs)
        setattr(self, FIRST_LABEL, int(self.global_steps))
        return result

    return _load_checkpoint


def batch_versions(non_tensor_batch: dict) -> Optional[list]:
    """Per sample, the oldest weight version that generated it, or None when the rollout reported none."""
    for key in ("min_global_steps", "global_steps"):
        versions = non_tensor_batch.get(key)
        if versions is not None and len(versions) and all(v is not None for v in versions):
            return list(versions)
    return None


@_once
def with_sample_lags(update_actor: Callable) -> Callable:
    """Wrap ``RayPPOTrainer._update_actor(self, batch)`` (see module doc). Every call, lags or not: the loss's
    staged sums (one value per mini-batch update) become the call's means (``hmpo_verl.staleness.staged_means``)."""

    @functools.wraps(update_actor)
    def _update_actor(self, batch):
        versions = batch_versions(batch.non_tensor_batch)
        lags = None if versions is None else trainer_lags(self, versions)
        if lags is None:
            output = update_actor(self, batch)
        else:
            batch.batch[LAG_KEY] = lags.to(torch.float32)
            try:
                output = update_actor(self, batch)
            finally:
                batch.batch.pop(LAG_KEY)
            output.meta_info["metrics"].update(lag_distribution(lags))
        metrics = output.meta_info["metrics"]
        metrics.update(staged_means(staged_totals(metrics)))
        return output

    return _update_actor


# ----------------------------------------------------------------------------- V1 trainer side


def v1_tag_lags(trainer, tags: Sequence[dict]) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """Lags of a V1 batch from its TransferQueue tags, and which rows are samples (not padding).

    Returns ``((batch_size,) int64 lags or None, (batch_size,) bool)``; padding rows (``is_padding``,
    no valid tokens) get lag 0 and are left out of the distribution.
    """
    real = torch.tensor([not tag.get("is_padding", False) for tag in tags], dtype=torch.bool)
    current = int(trainer.global_steps) - 1
    labels = [tag.get("min_global_steps") if keep else current for tag, keep in zip(tags, real.tolist())]
    return lags_from_labels(labels, AFTER_UPDATE, trainer.global_steps), real


STAGED = "_hmpo_staged_totals"  # on a V1 trainer: the loss's staged sums over the step's updates so far


@_once
def totalling_staged(reduce_metrics: Callable) -> Callable:
    """Wrap V1 ``trainer_base.reduce_metrics``: the loss's staged sums (one value per mini-batch update) become
    their totals (``hmpo_verl.staleness.staged_totals``) instead of a mean over the updates."""

    @functools.wraps(reduce_metrics)
    def wrapped(metrics):
        totals = staged_totals(metrics)
        return {**reduce_metrics(metrics), **totals}

    return wrapped


@_once
def with_sample_lags_v1(update_actor: Callable) -> Callable:
    """Wrap V1's ``PPOTrainer._update_actor(self, batch: KVBatchMeta, metrics)``: the lags go to the
    workers as a TransferQueue field ``LAG_KEY`` beside the batch's other fields; the update's staged
    totals leave ``metrics`` (verl would average them over the step's iterations) for the trainer's ``STAGED``."""

    @functools.wraps(update_actor)
    def _update_actor(self, batch, metrics):
        import transfer_queue as tq
        from tensordict import TensorDict

        lags, _ = v1_tag_lags(self, batch.tags)
        if lags is not None:
            field = TensorDict({LAG_KEY: lags.to(torch.float32)}, batch_size=len(batch.keys))
            stored = tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=field)
            batch.fields = stored.fields
        result = update_actor(self, batch, metrics)
        staged = self.__dict__.setdefault(STAGED, {})
        for key in [k for k in metrics if k.startswith(RAW_ROOT)]:
            staged[key] = staged.get(key, 0.0) + float(metrics.pop(key))
        return result

    return _update_actor


@_once
def with_lag_metrics_v1(step: Callable) -> Callable:
    """Wrap V1's ``PPOTrainer.step(self, metrics, timing_raw)``: the step's means (``actor/pm/*``, per lag too)
    from the staged totals of all its updates (every ``parameter_sync_step`` iteration, each mini-batch),
    and the lag distribution."""

    @functools.wraps(step)
    def wrapped(self, metrics, timing_raw):
        setattr(self, STAGED, {})
        batch = step(self, metrics, timing_raw)
        metrics.update(staged_means(self.__dict__.pop(STAGED)))
        lags, real = v1_tag_lags(self, batch.tags)
        if lags is not None and real.any():
            metrics.update(lag_distribution(lags[real]))
        return batch

    return wrapped


# ----------------------------------------------------------------------------- worker side


@_once
def exposing_sample_lag(ppo_loss: Callable) -> Callable:
    """Wrap verl's ``ppo_loss(config, model_output, data, dp_group=None)``: the loss sees ``data[LAG_KEY]``;
    the loss's per-call row means are dropped (verl would average them per micro-batch): the trainer logs
    them from the staged sums."""

    @functools.wraps(ppo_loss)
    def wrapped(config, model_output, data, dp_group=None):
        lags = data[LAG_KEY] if LAG_KEY in data.keys() else None
        with sample_lag_scope(lags):
            loss, metrics = ppo_loss(config, model_output, data, dp_group=dp_group)
        for key in STEP_MEAN_KEYS:
            metrics.pop(key, None)
        return loss, metrics

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

        from hmpo_verl.hosts.verl.config import LOSS_OPTION_CLASSES

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


ONE_STEP_OFF_MAIN = "verl.experimental.one_step_off_policy.main_ppo"  # its OneStepTaskRunner validates inside Ray


def validate_as_verls_main(config) -> None:
    """verl's own ``validate_config`` (with the reference policy and critic its entry points derive from the
    config), which ``main_ppo``'s main runs in the driver and one-step-off's task runner only once Ray is up."""
    import verl.utils.config as verl_config
    from verl.trainer.ppo.utils import need_critic, need_reference_policy

    verl_config.validate_config(config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))


@_once
def _checking_options_first(run_ppo: Callable) -> Callable:
    @functools.wraps(run_ppo)
    def wrapped(config, *args, **kwargs):
        from hmpo_verl.hosts.verl.checks import driver_checks

        driver_checks(config)  # with the stale-as-fresh warning (warn_stale_as_fresh)
        runner = kwargs.get("task_runner_class", args[0] if args else None)
        if getattr(runner, "__module__", None) == ONE_STEP_OFF_MAIN:
            validate_as_verls_main(config)  # what one-step-off's task runner would assert after Ray started
        return run_ppo(config, *args, **kwargs)

    return wrapped


class _DroppingFlush(logging.LoggerAdapter):
    """verl 0.9.1's V1 separate_async trainer calls ``logger.info(..., flush=True)`` (a print keyword) when
    ``hybrid_engine=false``; ``logging`` raises ``TypeError`` on it and the run dies in ``_setup``. This adapter
    drops the keyword and logs the message."""

    def process(self, msg, kwargs):
        kwargs.pop("flush", None)
        return msg, kwargs


def _logging_without_flush(module) -> None:
    if not isinstance(module.logger, _DroppingFlush):
        module.logger = _DroppingFlush(module.logger, {})


def _patch(module, name: str, wrap: Callable) -> None:
    setattr(module, name, wrap(getattr(module, name)))


def install(run_after_import: Callable) -> None:
    """Install the wrappers through ``run_after_import(module_name, action, failure)``."""
    hooks = {
        "verl.trainer.ppo.ray_trainer": lambda m: (_patch(m.RayPPOTrainer, "_update_actor", with_sample_lags),
                                                   _patch(m.RayPPOTrainer, "_load_checkpoint", recording_first_label)),
        "verl.trainer.ppo.v1.trainer_base": lambda m: (_patch(m.PPOTrainer, "_update_actor", with_sample_lags_v1),
                                                       _patch(m.PPOTrainer, "step", with_lag_metrics_v1),
                                                       _patch(m, "reduce_metrics", totalling_staged)),
        "verl.trainer.ppo.v1.trainer_separate_async": _logging_without_flush,
        "verl.workers.utils.losses": lambda m: _patch(m, "ppo_loss", exposing_sample_lag),
        "verl.trainer.ppo.rollout_corr_helper": lambda m: _patch(m, "apply_bypass_mode", keeping_our_loss),
        "verl.trainer.main_ppo": lambda m: _patch(m, "run_ppo", _checking_options_first),
    }
    for module, action in hooks.items():
        run_after_import(module, action, HOOK_FAILED.format(module))
