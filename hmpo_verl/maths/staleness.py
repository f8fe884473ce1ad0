"""Per-sample staleness ("lag") in off-policy RL, and metrics split by lag (pure torch, no verl import).

In verl's off-policy trainers (one-step-off-policy, fully-async) the rollout generates with
weights the trainer synced earlier, each sync labelled with a version (verl's
``global_steps`` in one-step-off-policy, ``current_param_version`` in fully-async), and
every response carries the version(s) that generated it -- ``min_global_steps`` and
``max_global_steps``, which differ when a partial rollout was resumed on newer weights. The
**lag** of a sample is ``v - w_min``: the trainer's version at its update minus the oldest
version that generated any of its tokens (so a partial rollout counts as old as its oldest
token). Lags 0, 1, 2 get their own bucket; 3 and more share the last (``3plus``). Each trainer
labels its weights its own way (after or before an update, steps or syncs): ``hmpo_verl.offpolicy.
lags_from_labels`` turns the labels into counts of actor updates before :func:`sample_lags`.

How the lag reaches the loss and back (``hmpo_verl.offpolicy`` does the verl side): the
trainer attaches the lags to the batch as ``LAG_KEY`` ``(batch_size,)``; the worker's
``ppo_loss`` exposes each micro-batch's slice through :func:`sample_lag_scope`, where the
loss reads it with :func:`current_sample_lag`; the loss adds :func:`per_lag_sums` to its
metrics (sums, so that verl's averaging over micro-batches and data-parallel ranks keeps
their ratios exact); the trainer turns them into per-lag means with :func:`staged_means`
and adds :func:`lag_distribution`.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Iterator, Mapping, Optional, Sequence

import torch

LAG_KEY = "hmpo_sample_lag"
MAX_LAG = 3  # the last bucket holds lags >= MAX_LAG
BUCKETS = tuple(str(k) for k in range(MAX_LAG)) + (f"{MAX_LAG}plus",)
RAW_ROOT = "actor/pm/raw/"  # sums staged by the loss, turned into means by the trainer (staged_totals, staged_means)
RAW_PREFIX = RAW_ROOT + "lag"  # per lag bucket: RAW_PREFIX + "<bucket>/<quantity>"
STEP_PREFIX = RAW_ROOT + "all/"  # every valid row: STEP_PREFIX + "<quantity>"
SHARE = RAW_ROOT + "share"  # the call's valid tokens over its update's (sums to 1 over an update's calls)
PER_ROW = ("log_ah_gap", "ess_frac")  # per-sequence quantities averaged per lag

_CURRENT: contextvars.ContextVar[Optional[torch.Tensor]] = contextvars.ContextVar(LAG_KEY, default=None)


def sample_lags(versions: Sequence[Optional[int]], trainer_version: int) -> Optional[torch.Tensor]:
    """``trainer_version - versions`` as a ``(batch_size,)`` int64 tensor; None if any version is unknown.

    Raises:
        ValueError: a sample from a version newer than the trainer's (a negative lag).
    """
    if len(versions) == 0 or any(v is None for v in versions):
        return None
    lags = int(trainer_version) - torch.tensor([int(v) for v in versions], dtype=torch.int64)
    if (lags < 0).any():
        raise ValueError(f"samples from versions {sorted(set(map(int, versions)))} are newer than the trainer's "
                         f"version {trainer_version}")
    return lags


def lag_buckets(lags: torch.Tensor) -> torch.Tensor:
    """Bucket index of each lag: the lag itself, capped at ``MAX_LAG``."""
    return lags.to(torch.int64).clamp(max=MAX_LAG)


def lag_distribution(lags: torch.Tensor, prefix: str = "training/lag/") -> dict[str, float]:
    """Mean, max and share of the samples in each lag bucket (the shares sum to 1)."""
    buckets = lag_buckets(lags)
    stats = {f"{prefix}mean": lags.double().mean().item(), f"{prefix}max": lags.max().item()}
    for k, name in enumerate(BUCKETS):
        stats[f"{prefix}share_{name}"] = (buckets == k).double().mean().item()
    return stats


@contextlib.contextmanager
def sample_lag_scope(lags: Optional[torch.Tensor]) -> Iterator[None]:
    """Within the block, :func:`current_sample_lag` returns ``lags`` (the micro-batch's, ``(batch_size,)``)."""
    token = _CURRENT.set(lags)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current_sample_lag() -> Optional[torch.Tensor]:
    """The lag of each row of the batch the loss is computing, or None outside an off-policy trainer."""
    return _CURRENT.get()


def row_sums(prefix: str, sel: torch.Tensor, per_row: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``prefix + "seqs"``: the rows in ``sel`` ``(B,)`` bool; ``prefix + name``: their sum of each ``(B,)`` value."""
    out = {prefix + "seqs": sel.sum().double()}
    for name, values in per_row.items():
        out[prefix + name] = torch.where(sel, values.double(), 0.0).sum()
    return out


def per_lag_sums(
    lags: torch.Tensor,
    rows: torch.Tensor,
    per_row: Mapping[str, torch.Tensor],
    clipped_tokens: torch.Tensor,
    tokens: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Sums per lag bucket of per-sequence quantities, and token counts for the clip fraction.

    Args:
        lags: ``(B,)`` lag of each row.
        rows: ``(B,)`` bool, rows with at least one valid token (the others are left out).
        per_row: name -> ``(B,)`` value per row (e.g. ``log_ah_gap``, ``ess_frac``).
        clipped_tokens, tokens: ``(B,)`` clipped and valid tokens per row.

    Returns:
        ``RAW_PREFIX + "<bucket>/seqs"``, ``.../<name>``, ``.../clipped_tokens``,
        ``.../tokens`` for every bucket (zeros where a bucket is empty: every micro-batch
        reports the same keys).
    """
    if lags.shape != rows.shape:
        raise ValueError(f"{LAG_KEY} has shape {tuple(lags.shape)}; the batch has {tuple(rows.shape)} rows")
    buckets = lag_buckets(lags.to(rows.device))
    per_row = {**per_row, "clipped_tokens": clipped_tokens, "tokens": tokens}
    out = {}
    for k, name in enumerate(BUCKETS):
        out.update(row_sums(f"{RAW_PREFIX}{name}/", rows & (buckets == k), per_row))
    return out


def _per_update(value) -> list[float]:
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)]


def staged_totals(metrics: dict) -> dict[str, float]:
    """Pop the loss's staged sums from verl's actor metrics and return their totals over the updates.

    Each staged value is a number or a list with one value per actor update (mini-batch, per
    PPO epoch): verl's mean over that update's micro-batches and ranks. Divided by the same
    mean of ``SHARE`` it is the update's sum; an update with no valid token adds nothing.
    Without ``SHARE`` each value is taken as its update's sum.
    """
    shares = _per_update(metrics.pop(SHARE, 1.0))
    totals = {}
    for key in [k for k in metrics if k.startswith(RAW_ROOT)]:
        values = _per_update(metrics.pop(key))
        if len(values) != len(shares):
            raise ValueError(f"{key} has {len(values)} values and {SHARE} {len(shares)}: one per actor update expected")
        totals[key] = sum(v / s for v, s in zip(values, shares) if s > 0)
    return totals


def _bucket_means(raw: str, out: str, totals: Mapping[str, float], quantities: Sequence[str]) -> dict[str, float]:
    """``out + q``: the mean of each staged ``raw + q`` over the bucket's rows; ``out + "pg_clipfrac"``."""
    seqs = totals.get(raw + "seqs", 0.0)
    if seqs <= 0:
        return {}
    means = {out + q: totals[raw + q] / seqs for q in quantities if raw + q in totals}
    if totals.get(raw + "tokens", 0.0) > 0:
        means[out + "pg_clipfrac"] = totals[raw + "clipped_tokens"] / totals[raw + "tokens"]
    return means


STEP_MEANS = ("seq_ratio_mean", "log_ah_gap", "ess_frac", "power", "ess_target")  # actor/pm/<name>, over valid rows
VARIANCE_FLOOR = 1e-12  # relative: the rounding of the staged sums; a variance below it is reported as 0
STEP_MEAN_KEYS = tuple(f"actor/pm/{q}" for q in STEP_MEANS + ("power_std",))


def staged_means(totals: Mapping[str, float]) -> dict[str, float]:
    """From :func:`staged_totals`: ``actor/pm/<name>`` (mean over every valid row the updates trained on),
    ``actor/pm/power_std`` (their p's population std) and ``actor/pm/lag<bucket>/<name>``, ``.../pg_clipfrac``
    for the lag buckets that held a row (clipped over valid tokens)."""
    out = _bucket_means(STEP_PREFIX, "actor/pm/", totals, STEP_MEANS + ("power_sq",))
    if "actor/pm/power_sq" in out:
        mean_sq = out.pop("actor/pm/power_sq")
        power = out["actor/pm/power"]
        variance = mean_sq - power * power  # (float *, not **: inf past |p| ~ 1e154 where ** raises OverflowError)
        if math.isfinite(variance):  # (a p of +-inf, or of |p| past ~1e154, has none)
            out["actor/pm/power_std"] = math.sqrt(variance) if variance > VARIANCE_FLOOR * mean_sq else 0.0
    for name in BUCKETS:
        out.update(_bucket_means(f"{RAW_PREFIX}{name}/", f"actor/pm/lag{name}/", totals, PER_ROW))
    return out
