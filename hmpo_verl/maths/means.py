"""Power means of positive numbers, computed in log space (pure torch, no verl import).

For valid entries x_1..x_T (a mask selects them) and a real power p,

    M_p(x) = ((1/T) * sum_t x_t^p)^(1/p),     M_0 = geometric mean,
    M_{+inf} = max x,   M_{-inf} = min x.

Everything here takes log x (for policy optimization: the token log-ratios
delta_t = log pi_theta - log pi_old) and returns log M_p, so that no x^p or 1/x is
ever formed: with delta = +-50 and |p| = 50 the direct formula overflows float32,
while the log-space one stays exact. The gradient has a closed form,

    d log M_p / d log x_t = w_t = softmax_t(p * log x_t)     (uniform 1/T at p = 0),

which the autograd functions below use directly (exact, and one saved tensor).

Conventions shared by every function here:
  * `mask` (bool or 0/1, same shape as `log_x`) selects valid entries; masked entries
    may hold anything (NaN, inf) and have no effect on the value and zero gradient.
  * A row with no valid entry has mean 1 (log mean 0), weights 0, zero gradient.
  * `p` is a Python number or a tensor broadcastable to the reduced shape (one p per
    row); p = 0 is the exact geometric mean (so is |p| < GEOMETRIC_BELOW = 1e-20),
    p = +-inf the max / min.
  * Arithmetic runs in float32 at least (bf16/fp16 inputs are up-cast) and results
    are returned in the input dtype.

References: Hardy, Littlewood & Polya, *Inequalities* (power means); GMPO
(arXiv 2507.20673) for p = 0; PMPO (arXiv 2601.22521) and HolderPO (arXiv 2605.12058)
for general p; Kish (1965) for the effective sample size.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch

Power = Union[float, int, torch.Tensor]

# |p| below this is the geometric mean: by Hoeffding's lemma |log M_p - log M_0| <=
# |p| * range(log x)^2 / 8, far below rounding here, while p * log x would underflow.
GEOMETRIC_BELOW = 1e-20

__all__ = [
    "log_power_mean",
    "power_mean",
    "power_mean_weights",
    "effective_sample_size",
    "log_agm",
    "log_mean_and_weights",
    "log_agm_and_weights",
    "log_arithmetic_harmonic_gap",
    # the same on zero-padded rows, for callers that pad once (hmpo_verl.surrogate)
    "Rows",
    "zero_padded",
    "mean_weights_and_shares",
    "agm_weights_and_shares",
    "arithmetic_harmonic_gap",
]


# --------------------------------------------------------------------------------------
# Kernels: last dimension, no autograd, zero-padded input, return (log mean (...,), weights (..., T)).
# They avoid boolean masked_fill / where on (..., T) tensors (each a slow pass on CPU): invalid
# entries hold 0 and are masked by products with a 0/1 float mask, exact for finite values.
# --------------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _valid(log_x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is None:
        return torch.ones_like(log_x, dtype=torch.bool)
    return mask.to(torch.bool).expand_as(log_x)


class Rows:
    """The valid entries of `(..., T)` rows: `valid` (bool), `weight` (the same as 0/1 in the
    compute dtype, for masking by products), `n` `(...)` their count (compute dtype)."""

    def __init__(self, valid: torch.Tensor, dtype: torch.dtype):
        self.valid = valid
        self.weight = valid.to(dtype)
        self.n = self.weight.sum(-1)

    def extreme(self, d: torch.Tensor, largest: bool) -> torch.Tensor:
        """`(...)` max (largest) or min of `d` over each row's valid entries (0 for a row with none)."""
        masked = torch.where(self.valid, d, -math.inf if largest else math.inf)
        ext = masked.amax(-1) if largest else masked.amin(-1)
        return torch.where(self.n > 0, ext, 0.0)


def zero_padded(log_x: torch.Tensor, mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, Rows]:
    """`(d, rows)`: log_x detached in the compute dtype with 0 at invalid entries (which may hold
    anything, NaN included), and its `Rows`. The input of every kernel below."""
    d = log_x.detach().to(_compute_dtype(log_x.dtype))
    valid = _valid(d, mask)
    return torch.where(valid, d, 0.0), Rows(valid, d.dtype)


def _geometric(d: torch.Tensor, rows: Rows):
    """p = 0: log M_0 = mean_t d_t, w_t = 1/T, log T w_t = 0."""
    n_safe = rows.n.clamp(min=1)
    return d.sum(-1) / n_safe, rows.weight / n_safe.unsqueeze(-1), torch.zeros_like(d)


def _extreme(d: torch.Tensor, rows: Rows, largest: bool):
    """p = +inf (largest) / -inf: log M = max / min; weight split evenly over ties (log T w = -inf elsewhere)."""
    ext = rows.extreme(d, largest)
    hit = (rows.valid & (d == ext.unsqueeze(-1))).to(d.dtype)
    w = hit / hit.sum(-1, keepdim=True).clamp(min=1)
    return ext, w, torch.log(w * rows.n.unsqueeze(-1))


def _finite_power(d: torch.Tensor, rows: Rows, p: Union[float, torch.Tensor]):
    """Finite p != 0 (a number, or a tensor of shape (...,)).

    log M_p = L / p with L = log mean_t exp(x_t), x_t = p * d_t. With e the row's extreme of d
    in p's direction (max for p > 0, min for p < 0), c = p * e = max_t x_t, and the shift
    s = c - clamp(c, 0, 1), so that max_t (x_t - s) lies in [0, 1]:

        x_t - s = p * (d_t - e) + clamp(c, 0, 1),      L = s + log1p(mean_t expm1(x_t - s)).

    expm1 keeps full relative precision for small arguments, so L / p is accurate to a few
    ulps of the log-ratios even as p -> 0 (where logsumexp(x) - log T cancels catastrophically);
    nothing overflows for any |p * d|; and p multiplies the difference d_t - e (exact for nearby
    log-ratios), never d_t alone, so a large |p| costs no precision (rounding p * d_t first costs
    eps * |p * d_t| in every exponent: 0.03 at |p| = 1e4, |d| = 50 in float32). The weights are
    w_t = (expm1(x_t - s) + 1) / sum_u (expm1(x_u - s) + 1) = softmax_t(x): accurate to rounding
    relative to the row's largest weight only (expm1(x_t - s) + 1 cancels for x_t - s << 0). Each
    token's log share log(T w_t) = (x_t - s) - log1p(mean_u expm1(x_u - s)) is accurate relative to
    its own size, however far below the row's largest it lies (issue 27, F1).
    """
    tensor = isinstance(p, torch.Tensor) and p.dim() > 0
    p_col = p.unsqueeze(-1) if tensor else p
    if tensor:
        e = torch.where(p > 0, rows.extreme(d, True), rows.extreme(d, False))
    else:
        e = rows.extreme(d, largest=p > 0)
    c = p * e
    k = c.clamp(0.0, 1.0)
    # x_t - s, 0 at invalid entries: d - e is masked before p multiplies it, as p * (0 - e) may be +-inf there
    # (|p * e| beyond the dtype, and inf * 0 is NaN); products by 1 leave the valid entries exact
    y = (d - e.unsqueeze(-1)).mul_(rows.weight).mul_(p_col).add_(k.unsqueeze(-1)).mul_(rows.weight)
    f = torch.expm1(y)
    n_safe = rows.n.clamp(min=1)
    mean_f = f.sum(-1) / n_safe
    log1p_mean = torch.log1p(mean_f)
    # where p * e overflows, |log M_p - e| <= log(T) / |p| is far below e's ulp: log M_p is e
    log_m = torch.where(torch.isfinite(c), (c - k + log1p_mean) / p, e)
    total = n_safe * (1.0 + mean_f)  # sum_t exp(x_t - s) over valid t, >= 1 when n > 0
    w = f.add_(rows.weight).div_(total.unsqueeze(-1))
    return log_m, w, y.sub_(log1p_mean.unsqueeze(-1))


def mean_weights_and_shares(d: torch.Tensor, p: Power, rows: Rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`log_mean_and_weights` of zero-padded `d` (see `zero_padded`), and each token's log share.

    Returns `(log_m, w, log_share)`: log M_p `(...)`, the weights w_t = d log M_p / d log x_t `(..., T)`
    (accurate relative to each row's largest weight), and log(T w_t) `(..., T)`, accurate relative to
    w_t itself (-inf where w_t = 0; any finite value at invalid entries). The share of token t in the
    mean, M_p * T * w_t = M_p^(1 - p) * x_t^p, is exp(log M_p + log_share_t) to a few ulps of its
    exponent, even where w_t underflows or is tiny next to the row's largest weight.
    """
    if not isinstance(p, torch.Tensor):
        p = float(p)
        if math.isnan(p):
            raise ValueError("power p is NaN; allowed: any real number or +-inf")
        if abs(p) < GEOMETRIC_BELOW:
            return _geometric(d, rows)
        if math.isinf(p) or abs(p) > torch.finfo(d.dtype).max:  # beyond the dtype: the limit, to rounding
            return _extreme(d, rows, largest=p > 0)
        return _finite_power(d, rows, p)

    pt = p.detach().to(device=d.device, dtype=d.dtype).expand(rows.n.shape)  # beyond the dtype's range: +-inf
    if torch.isnan(pt).any():
        raise ValueError("power p contains NaN; allowed: any real number or +-inf")
    geometric = pt.abs() < GEOMETRIC_BELOW
    finite = torch.isfinite(pt) & ~geometric
    log_m, w, log_share = _finite_power(d, rows, torch.where(finite, pt, 1.0))
    for select, alternative in (
        (geometric, lambda: _geometric(d, rows)),
        (pt == math.inf, lambda: _extreme(d, rows, largest=True)),
        (pt == -math.inf, lambda: _extreme(d, rows, largest=False)),
    ):
        if select.any():
            alt_m, alt_w, alt_share = alternative()
            log_m = torch.where(select, alt_m, log_m)
            w = torch.where(select.unsqueeze(-1), alt_w, w)
            log_share = torch.where(select.unsqueeze(-1), alt_share, log_share)
    return log_m, w, log_share


def log_mean_and_weights(
    log_x: torch.Tensor, p: Power, mask: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """log M_p over the last dimension and its gradient weights, without autograd.

    Args:
        log_x: `(..., T)` log of the values.
        p: power, a number or a tensor broadcastable to `(...)`.
        mask: `(..., T)` valid entries, or None for all.

    Returns:
        `(log_m, w)`: `(...)` log power mean and `(..., T)` weights w = d log M_p / d log x
        (each valid row sums to 1; zero at masked entries), both in float32 (float64 for
        float64 input).
    """
    with torch.no_grad():
        d, rows = zero_padded(log_x, mask)
        return mean_weights_and_shares(d, p, rows)[:2]


def arithmetic_harmonic_gap(d: torch.Tensor, rows: Rows) -> torch.Tensor:
    """`log_arithmetic_harmonic_gap` of zero-padded `d` (see `zero_padded`), in `d`'s dtype.

    Computed in float64 whatever `d`'s dtype: for a tight row the gap is about var(d) (1e-8 at a spread of
    1e-4), below float32's rounding of the two log-sum-exp terms it is the difference of (~1e-6), which biased
    the float32 metric by several times its size and could make it negative."""
    weight, n = rows.weight.double(), rows.n.double()
    d64 = d.double()
    top, bottom = rows.extreme(d64, True), rows.extreme(d64, False)
    x = (d64 - top.unsqueeze(-1)).mul_(weight).exp_().mul_(weight)  # exp(d - max d), 0 at invalid
    log_nA = top + torch.log(x.sum(-1))
    torch.sub(bottom.unsqueeze(-1), d64, out=x).mul_(weight).exp_().mul_(weight)  # exp(min d - d)
    log_nH = torch.log(x.sum(-1)) - bottom  # log sum exp(-d) = log(n / H)
    gap = log_nA + log_nH - 2 * torch.log(n.clamp(min=1))
    return torch.where(n > 0, gap, 0.0).to(d.dtype)


def log_arithmetic_harmonic_gap(log_x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """log M_1 - log M_-1 over the last dimension (>= 0; 0 iff the valid values are equal).

    The spread of the mean inequality, used as a diagnostic metric: two logsumexp (each shifted
    by the row's extreme) in float64 (`arithmetic_harmonic_gap`), accurate to about 1e-15 absolute,
    so also for tight rows, where the gap is about the variance of the values. Rows with no valid
    entry give 0.
    """
    with torch.no_grad():
        return arithmetic_harmonic_gap(*zero_padded(log_x, mask))


def log_agm_and_weights(
    log_x: torch.Tensor, mask: Optional[torch.Tensor] = None, iters: Optional[int] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Arithmetic-harmonic mean iteration in log space, and its gradient weights.

    From (a_0, h_0) = (A, H) = (M_1, M_-1): a_{k+1} = (a_k + h_k) / 2,
    h_{k+1} = 2 a_k h_k / (a_k + h_k). The product a_k h_k = A H is invariant, so both
    converge (quadratically) to sqrt(A H) -- which is the geometric mean only for two
    values or log-symmetric sets, not in general (DESIGN.md section 2).

    Args:
        log_x: `(..., T)` log values; mask: `(..., T)` or None.
        iters: None for the exact limit log sqrt(A H) = (log A + log H) / 2; an integer
            k >= 0 for log a_k, the arithmetic term after k steps (k = 0 gives log A).

    Returns:
        `(log_m, w)` as in `log_mean_and_weights`. By homogeneity (a_k(cA, cH) = c a_k)
        d log a_k = alpha_k d log A + (1 - alpha_k) d log H, so
        w = alpha_k w_A + (1 - alpha_k) w_H with alpha tracked through the recursion
        (alpha = 1/2 in the limit).
    """
    with torch.no_grad():
        return agm_weights_and_shares(*zero_padded(log_x, mask), iters)[:2]


def agm_weights_and_shares(d: torch.Tensor, rows: Rows, iters: Optional[int] = None):
    """`log_agm_and_weights` of zero-padded `d` (see `zero_padded`), and each token's log share
    log(T w_t) (see `mean_weights_and_shares`): with w = alpha w_A + (1 - alpha) w_H,
    log(T w_t) = logaddexp(log alpha + log(T w_A,t), log(1 - alpha) + log(T w_H,t))."""
    if iters is not None and (isinstance(iters, bool) or not isinstance(iters, int) or iters < 0):
        raise ValueError(f"agm iters={iters!r}; allowed: None (exact limit) or an integer >= 0")
    # the weights follow from the shares (w_t = exp(log(T w_t)) / T): keep only the shares of A and H
    log_a, share_a = mean_weights_and_shares(d, 1.0, rows)[::2]
    log_h, share_h = mean_weights_and_shares(d, -1.0, rows)[::2]
    if iters is None:
        log_m, log_alpha, log_beta = 0.5 * (log_a + log_h), -math.log(2.0), -math.log(2.0)
    else:
        # Track (log a_k, log h_k) and their derivatives with respect to log A.
        la, lh = log_a, log_h
        da, dh = torch.ones_like(la), torch.zeros_like(lh)
        for _ in range(iters):
            sigma = torch.sigmoid(la - lh)  # a / (a + h)
            la_next = torch.logaddexp(la, lh) - math.log(2.0)
            da_next = sigma * da + (1.0 - sigma) * dh
            lh, dh = la + lh - la_next, da + dh - da_next
            la, da = la_next, da_next
        alpha = da.unsqueeze(-1)
        log_m, log_alpha, log_beta = la, torch.log(alpha), torch.log1p(-alpha)
    log_share = torch.logaddexp(share_a.add_(log_alpha), share_h.add_(log_beta), out=share_a)
    del share_h
    log_n = torch.log(rows.n.clamp(min=1)).unsqueeze(-1)
    w = torch.sub(log_share, log_n).exp_().mul_(rows.weight)  # 0 at invalid entries
    return log_m, w, log_share


# --------------------------------------------------------------------------------------
# Autograd: value from a kernel, gradient grad * w (exact; masked entries get 0).
# --------------------------------------------------------------------------------------


class _LogMeanFunction(torch.autograd.Function):
    """Forward: (log_m, w) = kernel(log_x, mask); backward: d/d log_x = grad * w."""

    @staticmethod
    def forward(ctx, log_x, mask, kernel):
        log_m, w = kernel(log_x, mask)
        ctx.save_for_backward(w)
        ctx.in_dtype = log_x.dtype
        return log_m.to(log_x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return (grad.to(w.dtype).unsqueeze(-1) * w).to(ctx.in_dtype), None, None


def _reduce(log_x: torch.Tensor, mask: Optional[torch.Tensor], dim: int, kernel: Callable) -> torch.Tensor:
    x = log_x.movedim(dim, -1)
    if mask is not None:
        mask = mask.to(torch.bool).expand_as(log_x).movedim(dim, -1)
    return _LogMeanFunction.apply(x, mask, kernel)


def log_power_mean(log_x: torch.Tensor, p: Power, mask: Optional[torch.Tensor] = None, dim: int = -1) -> torch.Tensor:
    """log M_p of exp(log_x) over `dim`, differentiable (gradient = `power_mean_weights`).

    Args:
        log_x: `(..., T, ...)` log values, e.g. token log-ratios `(batch_size, response_length)`.
        p: power; a number or a tensor broadcastable to the reduced shape; 0 = geometric,
            1 = arithmetic, -1 = harmonic, +-inf = max / min.
        mask: valid entries (same shape as `log_x`) or None.
        dim: dimension to reduce.

    Returns:
        log_x's shape without `dim`, in log_x's dtype.
    """
    return _reduce(log_x, mask, dim, lambda x, m: log_mean_and_weights(x, p, m))


def power_mean(x: torch.Tensor, p: Power, mask: Optional[torch.Tensor] = None, dim: int = -1) -> torch.Tensor:
    """M_p of positive `x` over `dim` (computed as exp(log_power_mean(log x))); ValueError where a valid entry
    (``mask``: same shape, None: every entry) is not positive or is NaN (log x would give a silent NaN, and a 0 NaN
    gradients); an entry of +inf is allowed."""
    valid = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.to(torch.bool).expand_as(x)
    if bad := int((valid & ~(x > 0)).sum()):
        raise ValueError(f"power_mean: x has {bad} valid entr{'y that is' if bad == 1 else 'ies that are'} not "
                         "positive (or NaN); allowed: x > 0 (for log-values, use log_power_mean)")
    return torch.exp(log_power_mean(torch.log(x), p, mask, dim))


def power_mean_weights(
    log_x: torch.Tensor, p: Power, mask: Optional[torch.Tensor] = None, dim: int = -1
) -> torch.Tensor:
    """d log M_p / d log_x: softmax over valid entries of p * log_x (1/T at p = 0).

    Returns a tensor of log_x's shape (dtype float32, or float64 for float64 input),
    zero at masked entries; each row with a valid entry sums to 1.
    """
    x = log_x.movedim(dim, -1)
    if mask is not None:
        mask = mask.to(torch.bool).expand_as(log_x).movedim(dim, -1)
    return log_mean_and_weights(x, p, mask)[1].movedim(-1, dim)


def effective_sample_size(
    weights: torch.Tensor, mask: Optional[torch.Tensor] = None, dim: int = -1
) -> torch.Tensor:
    """Kish effective sample size 1 / sum_t w_t^2 of normalised weights over `dim`.

    Equals T for uniform weights (p = 0) and 1 for a one-hot row; 0 for a row with no
    valid entry. Masked entries are ignored.
    """
    w = weights if mask is None else torch.where(mask.to(torch.bool), weights, 0.0)
    sq = torch.linalg.vector_norm(w, dim=dim).square()
    return torch.where(sq > 0, 1.0 / sq.clamp(min=torch.finfo(sq.dtype).tiny), 0.0)


def log_agm(
    log_x: torch.Tensor, mask: Optional[torch.Tensor] = None, dim: int = -1, iters: Optional[int] = None
) -> torch.Tensor:
    """Log of the arithmetic-harmonic mean iteration started from (M_1, M_-1), differentiable.

    `iters=None` gives the exact limit log sqrt(A H); an integer k gives log a_k, the
    arithmetic term after k steps (k = 0: log A). See `log_agm_and_weights` (which checks `iters`).
    """
    return _reduce(log_x, mask, dim, lambda x, m: log_agm_and_weights(x, m, iters))
