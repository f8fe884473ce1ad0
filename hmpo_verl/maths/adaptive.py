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

The solver works on the exact ESS (no histogram or other approximation of the row):
regula falsi on p^2 over [0, bound^2], vectorised over the rows still unsolved, until
|ESS_p / T - target| <= ESS_TOL (1e-4) on every row; a far outlier in the row costs a few
more steps, never accuracy, and so does a large bound (the configs accept |bound| <= 1e4,
`options.ESS_BOUND_MAX`, the range the guarantee is tested in). The loss uses the exact
weights at the chosen p.

The chosen p is a constant for the gradient (a stop-gradient on p): the loss applies
d/d delta of log M_p at the chosen p, not the extra term (d log M_p / dp)(dp / d delta)
of differentiating through the solver. p is a per-trajectory setting of the estimator,
chosen from the current ratios like a step size, not part of the objective: that term
would move the ratios so as to change the ESS of the weights rather than to improve the
policy's surrogate; it is zero where p sits at the bound and undefined where the target
jumps with the clip fraction (a count of tokens).

**Schedule** (HolderPO, arXiv 2605.12058: p from 2 to -2 over training): one p for all
trajectories, a function of the optimizer step only.
"""

from __future__ import annotations

import math

import torch

ESS_TOL = 1e-4
SOLVER_MAX_ITERS = 64
# after this many regula falsi steps every other step bisects |p|: near-Gaussian rows are solved by then
# (1-2 steps, a far outlier ~10), and a row whose ESS flattens near 1/T (a target near 1/T with a far
# bound) still converges -- its bracket halves every 2 steps (hypothesis found such a row in float32)
SAFEGUARD_AFTER = 12

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


def _shifted(log_x: torch.Tensor, valid: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """y = sign * log_x - max_t(sign * log_x) per row, -inf at invalid entries. Shapes `(R, T)`, sign `(R,)`.

    The shift comes before any multiplication by |p|, so x_t - max x = |p| * y_t is one rounding
    of an exact difference (Sterbenz: log-ratios within a factor 2 of each other subtract exactly),
    however large |p| * log_x: rounding p * log_x first (as a plain softmax would) costs
    eps * |p * log_x| in every exponent, 0.03 at |p| = 1e4, |log_x| = 50 in float32.
    """
    y = torch.where(valid, log_x * sign.unsqueeze(-1), -math.inf)
    return y.sub_(y.amax(-1, keepdim=True))


def _log_ess_fraction(y: torch.Tensor, n: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Exact log(ESS_p / T) of each row at |p| = u >= 0, from y of `_shifted` (max 0 per row).

    With e_t = exp(u * y_t) (at most 1, so nothing overflows): ESS / T = (sum e)^2 / (n * sum e^2).
    u = 0 is evaluated as the smallest normal u > 0, where every valid e_t rounds to 1 (ESS / T = 1,
    the value at p = 0) and the invalid entries (-inf) stay 0: -inf * 0 would be NaN.
    Shapes: y `(R, T)`, n and u `(R,)`.
    """
    u = u.clamp(min=torch.finfo(y.dtype).tiny)
    e = (y * u.unsqueeze(-1)).exp_()
    s1 = e.sum(-1)
    s2 = e.square_().sum(-1)
    return 2.0 * torch.log(s1) - torch.log(s2) - torch.log(n)


def solve_power_for_ess(
    log_x: torch.Tensor,
    valid: torch.Tensor,
    target: torch.Tensor,
    bound: torch.Tensor,
    tol: float = ESS_TOL,
    max_iters: int = SOLVER_MAX_ITERS,
) -> torch.Tensor:
    """Per row, p between 0 and `bound` with ESS_p / T = target, solved on the exact ESS.

    phi(v) = log(ESS / T) - log(target) with v = p^2 is positive at v = 0 and decreases
    monotonically; for small p, log(ESS / T) ~ -p^2 Var(log_x), nearly linear in v. So
    p^2 is found by regula falsi (Anderson-Bjorck variant, always bracketed) on
    [0, bound^2], each step evaluating the exact ESS of the rows not yet solved. A row is
    solved when |ESS / T - target| <= tol; the loss then uses the exact weights at that p.

    Args:
        log_x: `(B, T)` log-ratios (the ones the mean aggregates); valid: `(B, T)` bool.
        target: `(B,)` target ESS / T in (0, 1].
        bound: `(B,)` end of each row's segment (sign gives the side; 0 forces p = 0).
        tol: accepted |ESS / T - target|.
        max_iters: cap on the regula falsi steps; a row still unsolved then takes the
            bracket end on the ESS >= target side.

    Returns:
        `(B,)` p (float32). Rows with no valid token or a target of 1 get 0; rows whose
        bound has ESS / T >= target - tol (e.g. equal log-ratios, T = 1) get `bound`.
    """
    with torch.no_grad():
        dtype = torch.float64 if log_x.dtype == torch.float64 else torch.float32
        valid = valid.to(torch.bool)
        n = valid.sum(-1)
        bound = bound.to(device=log_x.device, dtype=torch.float64)
        target = target.to(device=log_x.device, dtype=torch.float64).expand_as(bound)
        p = torch.zeros_like(bound)
        rows = ((n > 0) & (target < 1.0) & (bound != 0)).nonzero().squeeze(-1)
        if rows.numel() == 0:
            return p.to(torch.float32)
        sign = torch.sign(bound[rows])
        y = _shifted(log_x[rows].detach().to(dtype), valid[rows], sign.to(dtype))
        n_r, t = n[rows].to(dtype), target[rows]

        def phi(v):
            return _log_ess_fraction(y, n_r, v.sqrt().to(dtype)).double() - torch.log(t)

        def solved(phi_v):
            return (torch.expm1(phi_v) * t).abs() <= tol  # |ESS / T - target|

        # bracket [v_lo, v_hi] with phi(v_lo) > 0 > phi(v_hi); the bound first
        v_hi = bound[rows].square()
        phi_hi = phi(v_hi)
        done = solved(phi_hi) | (phi_hi >= 0)
        p[rows[done]] = bound[rows[done]]
        v_lo, phi_lo = torch.zeros_like(v_hi), -torch.log(t)
        kept = torch.zeros_like(v_hi)  # +1: the last step kept v_hi, -1: kept v_lo
        for step in range(max_iters):
            if done.all():
                break
            todo = ~done
            rows, sign, y, n_r, t = rows[todo], sign[todo], y[todo], n_r[todo], t[todo]
            v_lo, phi_lo, v_hi, phi_hi, kept = v_lo[todo], phi_lo[todo], v_hi[todo], phi_hi[todo], kept[todo]
            # safeguards: every other step from SAFEGUARD_AFTER on, and wherever rounding puts the secant
            # step outside the open bracket (a flat phi makes the Anderson-Bjorck scale ~1e-16), the step
            # halves the |p| bracket instead, so a row that regula falsi stalls on still converges
            secant = v_hi - phi_hi * (v_hi - v_lo) / (phi_hi - phi_lo)
            bisect = ~((secant > v_lo) & (secant < v_hi)) | (step >= SAFEGUARD_AFTER and step % 2 == 1)
            v = torch.where(bisect, ((v_lo.sqrt() + v_hi.sqrt()) / 2).square(), secant)
            phi_v = phi(v)
            done = solved(phi_v)
            p[rows] = sign * v.sqrt()
            above = phi_v > 0
            # Anderson-Bjorck: an end kept twice in a row has its phi scaled down
            scale_hi = torch.where(phi_v < phi_lo, 1.0 - phi_v / phi_lo, 0.5)
            scale_lo = torch.where(phi_v > phi_hi, 1.0 - phi_v / phi_hi, 0.5)
            phi_hi = torch.where(above & (kept > 0), phi_hi * scale_hi, phi_hi)
            phi_lo = torch.where(~above & (kept < 0), phi_lo * scale_lo, phi_lo)
            v_lo, phi_lo = torch.where(above, v, v_lo), torch.where(above, phi_v, phi_lo)
            v_hi, phi_hi = torch.where(above, v_hi, v), torch.where(above, phi_hi, phi_v)
            kept = torch.where(bisect, 0.0, torch.where(above, 1.0, -1.0))
        else:
            p[rows[~done]] = (sign * v_lo.sqrt())[~done]
        return p.to(torch.float32)


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
