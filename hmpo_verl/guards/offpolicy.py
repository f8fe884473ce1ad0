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
  (:mod:`hmpo_verl.staleness`) to the batch as ``LAG_KEY`` -- the actor updates between the
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
  never calls ``validate_config``, and the one-step-off one calls it inside Ray.
  It also warns (:func:`stale_as_fresh`) when a V1 async mode would train stale samples as
  if they were on-policy.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Optional, Sequence

import torch

from hmpo_verl.maths.staleness import LAG_KEY, RAW_PREFIX, lag_distribution, per_lag_means, sample_lag_scope, sample_lags

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
#     update is synced as that step, so label v = the weights after v updates; the trainer at step
#     k trains weights with k - 1 updates (verl's own V1 ``trajectory_staleness_worst``).
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
    """Per sample, the actor updates between the weights that generated it and those trained now.

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


def _lag_metrics(metrics: dict, lags: torch.Tensor) -> None:
    """Replace the loss's per-lag sums in ``metrics`` by per-lag means; add the lag distribution."""
    means = per_lag_means(metrics)
    for key in [k for k in metrics if k.startswith(RAW_PREFIX)]:
        del metrics[key]
    metrics.update(means)
    metrics.update(lag_distribution(lags))


@_once
def with_sample_lags(update_actor: Callable) -> Callable:
    """Wrap ``RayPPOTrainer._update_actor(self, batch)`` (see module doc)."""

    @functools.wraps(update_actor)
    def _update_actor(self, batch):
        versions = batch_versions(batch.non_tensor_batch)
        lags = None if versions is None else trainer_lags(self, versions)
        if lags is None:
            return update_actor(self, batch)
        batch.batch[LAG_KEY] = lags.to(torch.float32)
        try:
            output = update_actor(self, batch)
        finally:
            batch.batch.pop(LAG_KEY)
        _lag_metrics(output.meta_info["metrics"], lags)
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


@_once
def with_sample_lags_v1(update_actor: Callable) -> Callable:
    """Wrap V1's ``PPOTrainer._update_actor(self, batch: KVBatchMeta, metrics)``: the lags go to the
    workers as a TransferQueue field ``LAG_KEY`` beside the batch's other fields."""

    @functools.wraps(update_actor)
    def _update_actor(self, batch, metrics):
        import transfer_queue as tq
        from tensordict import TensorDict

        lags, _ = v1_tag_lags(self, batch.tags)
        if lags is None:
            return update_actor(self, batch, metrics)
        field = TensorDict({LAG_KEY: lags.to(torch.float32)}, batch_size=len(batch.keys))
        stored = tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=field)
        batch.fields = stored.fields
        return update_actor(self, batch, metrics)

    return _update_actor


@_once
def with_lag_metrics_v1(step: Callable) -> Callable:
    """Wrap V1's ``PPOTrainer.step(self, metrics, timing_raw)``: per-lag means once the step's updates are in.

    verl averages each per-lag sum over an update's micro-batches and over the step's updates
    (weighted by their sample counts, equal in verl's fixed-size updates), so the ratios are exact.
    """

    @functools.wraps(step)
    def wrapped(self, metrics, timing_raw):
        batch = step(self, metrics, timing_raw)
        lags, real = v1_tag_lags(self, batch.tags)
        if lags is not None and real.any():
            _lag_metrics(metrics, lags[real])
        return batch

    return wrapped


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


# ----------------------------------------------------------------------------- V1 stale-as-fresh

V1_ASYNC_MODES = ("colocate_async", "separate_async")
STALE_AS_FRESH = (
    "trainer.v1.trainer_mode={mode} without algorithm.rollout_correction.bypass_mode=true and without "
    "algorithm.rollout_correction.rollout_is: verl's V1 trainer recomputes old_log_probs on the trainer's current "
    "weights (decoupled mode) and applies no rollout importance sampling, so samples generated by older weights are "
    "trained as if they were on-policy (the token ratios start at 1 whatever the sample's lag; measured here: one "
    "10-step colocate_async run's reward fell 0.21 -> 0.04). Set algorithm.rollout_correction.bypass_mode=true "
    "(old_log_probs = the rollout's log-probs: the ratios are pi_theta / pi_rollout, as verl's async configs do) "
    "or algorithm.rollout_correction.rollout_is=token|sequence (verl multiplies pi_old / pi_rollout weights into the "
    "loss; ours apply them as verl's losses do)."
)


def stale_as_fresh(config) -> Optional[str]:
    """The warning for a V1 async mode that trains stale samples as fresh (None when the config does not).

    Why a warning and not a refusal (verl 0.9.1, ``verl.trainer.ppo.v1.trainer_base``): with
    ``bypass_mode=false`` ``_compute_old_log_prob`` recomputes ``old_log_probs`` on the current
    weights, and ``_compute_advantage`` computes ``rollout_is_weights`` only when
    ``rollout_is`` is set; without it every loss, verl's and ours alike, sees ratios
    pi_theta / pi_current. Our losses are no less right than verl's there, so the run is allowed;
    the user is told what happens and which two settings change it.
    """
    from omegaconf import OmegaConf

    if not OmegaConf.select(config, "trainer.use_v1", default=True):
        return None
    mode = OmegaConf.select(config, "trainer.v1.trainer_mode", default="sync")
    if mode not in V1_ASYNC_MODES:
        return None
    correction = OmegaConf.select(config, "algorithm.rollout_correction", default=None) or {}
    if correction.get("bypass_mode", False) or correction.get("rollout_is", None):
        return None
    return STALE_AS_FRESH.format(mode=mode)


# ----------------------------------------------------------------------------- install


@_once
def _checking_options_first(run_ppo: Callable) -> Callable:
    @functools.wraps(run_ppo)
    def wrapped(config, *args, **kwargs):
        from hmpo_verl.hosts.verl.checks import driver_checks

        driver_checks(config)
        warning = stale_as_fresh(config)
        if warning:
            logger.warning(warning)
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
                                                       _patch(m.PPOTrainer, "step", with_lag_metrics_v1)),
        "verl.trainer.ppo.v1.trainer_separate_async": _logging_without_flush,
        "verl.workers.utils.losses": lambda m: _patch(m, "ppo_loss", exposing_sample_lag),
        "verl.trainer.ppo.rollout_corr_helper": lambda m: _patch(m, "apply_bypass_mode", keeping_our_loss),
        "verl.trainer.main_ppo": lambda m: _patch(m, "run_ppo", _checking_options_first),
    }
    for module, action in hooks.items():
        run_after_import(module, action, HOOK_FAILED.format(module))
