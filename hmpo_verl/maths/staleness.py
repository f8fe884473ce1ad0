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
their ratios exact); the trainer turns them into per-lag means with :func:`per_lag_means`
and adds :func:`lag_distribution`.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Mapping, Optional, Sequence

import torch

LAG_KEY = "hmpo_sample_lag"
MAX_LAG = 3  # the last bucket holds lags >= MAX_LAG
BUCKETS = tuple(str(k) for k in range(MAX_LAG)) + (f"{MAX_LAG}plus",)
RAW_PREFIX = "actor/pm/lag_raw/"  # per-lag sums from the loss, turned into means by per_lag_means
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
    out = {}
    for k, name in enumerate(BUCKETS):
        sel = rows & (buckets == k)
        prefix = f"{RAW_PREFIX}{name}/"
        out[prefix + "seqs"] = sel.sum().double()
        for quantity, values in per_row.items():
            out[prefix + quantity] = torch.where(sel, values.double(), 0.0).sum()
        out[prefix + "clipped_tokens"] = torch.where(sel, clipped_tokens.double(), 0.0).sum()
        out[prefix + "tokens"] = torch.where(sel, tokens.double(), 0.0).sum()
    return out


def _total(value) -> float:
    return float(sum(value)) if isinstance(value, (list, tuple)) else float(value)


def per_lag_means(metrics: Mapping[str, object]) -> dict[str, float]:
    """From :func:`per_lag_sums` (each value a number or a list over updates): per-lag means.

    Returns ``actor/pm/lag<bucket>/<name>`` (mean over the bucket's sequences) and
    ``actor/pm/lag<bucket>/pg_clipfrac`` (its clipped over valid tokens), for the buckets
    that held a sequence. verl averages each sum over an update's micro-batches and ranks,
    and a ratio of two averages over the same micro-batches is the ratio of the totals, so
    the means are exact whatever the micro-batching; the updates of one step are pooled by
    adding their values.
    """
    out = {}
    for name in BUCKETS:
        raw = f"{RAW_PREFIX}{name}/"
        seqs = _total(metrics.get(raw + "seqs", 0.0))
        if seqs <= 0:
            continue
        for quantity in PER_ROW:
            if raw + quantity in metrics:
                out[f"actor/pm/lag{name}/{quantity}"] = _total(metrics[raw + quantity]) / seqs
        tokens = _total(metrics.get(raw + "tokens", 0.0))
        if tokens > 0:
            out[f"actor/pm/lag{name}/pg_clipfrac"] = _total(metrics[raw + "clipped_tokens"]) / tokens
    return out
