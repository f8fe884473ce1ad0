"""Adaptive choice of the power p (pure torch, no verl import).

Two rules.

**Clip-aware ESS matching, per trajectory** (PMPO, arXiv 2601.22521, extended to p < 0).
The aggregation weights of M_p are w_t = softmax_t(p * delta_t); their Kish effective
sample size ESS_p = 1 / sum_t w_t^2 equals T at p = 0 and decreases monotonically as |p|
grows on either side of 0 (d log ESS / dp = 2 (E_w[delta] - E_{w^2}[delta]), whose sign is
-sign(p)). For a trajectory whose clip fraction (share of valid tokens whose trust region
is active) is c, the target is

    target(c) = ess_target_min + (1 - ess_target_min) * c          (ESS / T, in (0, 1])

so a trajectory with no clipped token may concentrate its gradient on a fraction
ess_target_min of effective tokens, and one whose tokens are all clipped gets uniform
weights (p = 0, the geometric mean, which GMPO calls conservative). p then solves
ESS_p / T = target(c) on one side of 0, up to the bound p_min < 0 or p_max > 0; if even
the bound keeps ESS above the target, p is the bound. For log-ratios with spread sigma,
ESS_p / T ~ exp(-p^2 sigma^2), so the rule keeps p * sigma roughly constant: |p| grows
when the ratios are tight and shrinks when they spread (stale data, mismatch).

The side is a separate choice (`sign_rule`): with sign(p) = -sign(A) the weights fall on
the tokens that moved against the update (for A > 0, p < 0 weights the tokens whose
probability fell), so each step first restores them: the ratio-contracting direction.

The solver is vectorised over trajectories and bracketed: each row's log-ratios are
compressed into a histogram of SOLVER_BINS bins (each bin represented by its count and
the mean log-ratio of its tokens), and |p| is bisected on [0, |bound|] for SOLVER_ITERS
iterations on those histograms, where ESS is monotone in |p|. The loss then uses the
exact weights at the chosen p; the histogram only places p (its effect on the achieved
ESS is small and reported by `actor/pm/ess_frac` against the target).

**Schedule** (HolderPO, arXiv 2605.12058: p from 2 to -2 over training): one p for all
trajectories, a function of the optimizer step only.
"""

from __future__ import annotations

import math

import torch

SOLVER_BINS = 128
SOLVER_ITERS = 24

__all__ = ["ess_target_fraction", "solve_power_for_ess", "ess_search_bound", "scheduled_power"]


def ess_target_fraction(clip_fraction: torch.Tensor, ess_target_min: float) -> torch.Tensor:
    """target(c) = ess_target_min + (1 - ess_target_min) * c, in (0, 1]."""
    return ess_target_min + (1.0 - ess_target_min) * clip_fraction.clamp(0.0, 1.0)


def ess_search_bound(row_advantage_sign: torch.Tensor, sign_rule: str, p_min: float, p_max: float) -> torch.Tensor:
    """(B,) end of each row's search segment [0, bound] (bound <= 0 or >= 0).

    sign_rule "advantage": sign(p) = -sign(A) (p_min for A > 0, p_max for A < 0, 0 for
    A = 0); "negative": p_min; "positive": p_max.
    """
    s = row_advantage_sign
    if sign_rule == "advantage":
        return torch.where(s > 0, p_min, torch.where(s < 0, p_max, 0.0)).to(torch.float32)
    if sign_rule == "negative":
        return torch.full_like(s, p_min, dtype=torch.float32)
    if sign_rule == "positive":
        return torch.full_like(s, p_max, dtype=torch.float32)
    raise ValueError(f"sign_rule={sign_rule!r}; allowed: advantage, negative, positive")


def _row_histograms(log_x: torch.Tensor, valid: torch.Tensor, bins: int):
    """Per-row (counts, mean log_x) over `bins` equal-width bins between the row's min and max."""
    B = log_x.shape[0]
    lo = torch.where(valid, log_x, math.inf).amin(-1, keepdim=True)
    hi = torch.where(valid, log_x, -math.inf).amax(-1, keepdim=True)
    empty = ~torch.isfinite(lo)
    lo, hi = torch.where(empty, 0.0, lo), torch.where(empty, 0.0, hi)
    width = ((hi - lo) / bins).clamp(min=torch.finfo(log_x.dtype).tiny)
    idx = ((log_x - lo) / width).nan_to_num_(0.0).floor_().clamp_(0, bins - 1).to(torch.int32)
    idx.masked_fill_(~valid, bins)  # a discard bin per row
    idx += torch.arange(B, device=log_x.device, dtype=torch.int32).unsqueeze(-1) * (bins + 1)
    flat = idx.reshape(-1)
    counts = torch.bincount(flat, minlength=B * (bins + 1)).view(B, bins + 1)[:, :bins].to(log_x.dtype)
    sums = torch.bincount(flat, weights=torch.where(valid, log_x, 0.0).reshape(-1), minlength=B * (bins + 1))
    sums = sums.view(B, bins + 1)[:, :bins].to(log_x.dtype)
    return counts, sums / counts.clamp(min=1)


def _histogram_ess_fraction(counts: torch.Tensor, centres: torch.Tensor, n: torch.Tensor, p: torch.Tensor):
    """ESS_p / T of each row represented by its histogram; p of shape (B,)."""
    z = torch.where(counts > 0, p.unsqueeze(-1) * centres, -math.inf)
    z = z - z.amax(-1, keepdim=True).clamp(min=-1e30)
    e = torch.exp(z)
    s1 = (counts * e).sum(-1)
    s2 = (counts * e * e).sum(-1)
    return (s1 * s1) / (s2 * n).clamp(min=torch.finfo(counts.dtype).tiny)


def solve_power_for_ess(
    log_x: torch.Tensor, valid: torch.Tensor, target: torch.Tensor, bound: torch.Tensor, iters: int = SOLVER_ITERS
) -> torch.Tensor:
    """Per row, p between 0 and `bound` with ESS_p / T = target (bisection on |p|).

    Args:
        log_x: `(B, T)` log-ratios (the ones the mean aggregates); valid: `(B, T)` bool.
        target: `(B,)` target ESS / T in (0, 1].
        bound: `(B,)` end of each row's segment (sign gives the side; 0 forces p = 0).
        iters: bisection steps (|p| is located to |bound| / 2^iters).

    Returns:
        `(B,)` p (float32). Rows with no valid token or a target of 1 get 0; rows where
        even `bound` keeps ESS / T >= target (e.g. equal log-ratios, T = 1) get `bound`.
    """
    with torch.no_grad():
        d = log_x.detach().to(torch.float32)
        valid = valid.to(torch.bool)
        n = valid.sum(-1).to(torch.float32)
        counts, centres = _row_histograms(d, valid, SOLVER_BINS)
        # the (B, bins) search runs in float64: ESS / T is flat (1 - O(p^2)) near p = 0
        counts, centres, n = counts.double(), centres.double(), n.double()
        bound = bound.to(torch.float64)
        target = target.to(torch.float64)
        # fraction of the way from 0 to the bound; ESS decreases as it grows
        lo = torch.zeros_like(bound)
        hi = torch.ones_like(bound)
        reachable = _histogram_ess_fraction(counts, centres, n, bound) < target
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            above = _histogram_ess_fraction(counts, centres, n, mid * bound) >= target
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        fraction = torch.where(reachable, 0.5 * (lo + hi), 1.0)
        # target ESS = T is met only by p = 0 (uniform weights)
        return torch.where((n > 0) & (target < 1.0), fraction * bound, 0.0).to(torch.float32)


def scheduled_power(step: int, p_start: float, p_end: float, steps: int, schedule: str = "linear") -> float:
    """p at optimizer step `step`: p_start -> p_end over `steps` steps, then p_end.

    "linear": p_start + (p_end - p_start) * t; "cosine": p_start + (p_end - p_start) *
    (1 - cos(pi t)) / 2, with t = min(step / steps, 1).
    """
    t = min(max(step, 0) / steps, 1.0)
    if schedule == "linear":
        frac = t
    elif schedule == "cosine":
        frac = 0.5 * (1.0 - math.cos(math.pi * t))
    else:
        raise ValueError(f"schedule={schedule!r}; allowed: linear, cosine")
    return p_start + (p_end - p_start) * frac
