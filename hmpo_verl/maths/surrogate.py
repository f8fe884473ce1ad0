"""Clipped sequence-ratio surrogates as per-token loss matrices (pure torch, no verl import).

A power-mean policy objective uses one ratio per response, s_i = M(r_i1, ..., r_iT)
(a power mean or the AGM of the token ratios r_t = pi_theta / pi_old), and the PPO-style
loss  -A_i * clip(s_i).  verl aggregates per-token loss matrices with `agg_loss` (five
`loss_agg_mode`s, global-batch normalisation), so the sequence ratio is spread over the
tokens with the GSPO-token construction generalised to any mean:

    s_it = sg[s_i * T_i * w_it] * exp(delta_it - sg[delta_it]),
    w_it = d log s_i / d delta_it            (softmax_t(p * delta_it) for M_p),

and the per-token loss is -A_it * c_it * s_it (c: rollout IS weights, if given; s_i
clipped as below). Token t holds its share of the sequence ratio, s_i * T_i * w_it
(= s_i^(1-p) * r_it^p for M_p; the shares average to s_i over the response), formed in log space
from the aggregator's log(T_i w_it) so that it is exact relative to itself even when w_it is tiny
next to the row's largest weight (issue 27: with per-token advantages that weight may belong to a
token with A = 0, and a share rebuilt from w would lose every digit), and its
gradient is s_i * T_i * w_it * grad delta_it, so after a per-sequence token-mean the
gradient is exactly grad s_i. Hence:
  * p = 0 (T_i w = 1): every token holds s_i -- verl's `gspo` term for term;
  * p = 1, token clip: the share is the token's own clipped ratio -- verl's `vanilla`
    term for term, in value and gradient, for every aggregation mode, with IS weights and
    per-token advantages;
  * one advantage per response and IS weights constant over it: the response's tokens
    sum to -A_i * c_i * T_i * clip(s_i), the sequence objective, whatever the shares.
The reported value is therefore the one whose gradient is applied wherever such a value
exists (at p = 1 exactly; for other p with per-token advantages or IS weights the
per-token gradients are not the gradient of any single function, as in `gspo`).
Rather than building that through autograd, the value and the per-token gradient
coefficient are computed here without a graph, and the loss matrix is

    loss_it = value_it + grad_coef_it * (log pi_it - sg[log pi_it]),

which has the same value and the same gradient for every aggregation mode; it is built as a
custom autograd function (forward: value_it; backward: grad * grad_coef_it), so the forward
pass makes no (B, T) tensor and backward keeps only grad_coef.

Trust regions (both needed, DESIGN.md section 2):
  * level "sequence" (GSPO, arXiv 2507.18071): s_i is clipped to [r_low, r_high],
    one-sidedly by sign(A) as in PPO; a clipped token gets no gradient.
  * level "token" (GMPO arXiv 2507.20673 / PMPO arXiv 2601.22521): each token's
    log-ratio is clipped before aggregation, one-sidedly by sign(A) (A > 0: at most
    log_high; A < 0: at least log_low, and at most log_dual -- dual-clip PPO,
    arXiv 1912.09729; TRL's `delta` instead caps the ratio before PPO's min, see
    `TrustRegion.trl_delta`). With p = 1 and ratio-space bounds this is PPO/GRPO's
    per-token clipping averaged over each sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from hmpo_verl.maths.means import Rows, arithmetic_harmonic_gap, effective_sample_size

# The aggregator maps (zero-padded log-ratios (B, T), their `Rows`, token clips per row (B,) or None
# at sequence level) to (log s (B,), w (B, T), log(T w) (B, T)); see `hmpo_verl.aggregators`.
Aggregator = Callable[[torch.Tensor, Rows, Optional[torch.Tensor]], "tuple[torch.Tensor, torch.Tensor, torch.Tensor]"]

# verl's gspo clamps the log sequence ratio at 10 "for numerical stability"; the verl losses do
# the same at sequence level (a clamped sequence keeps its value e^10 and gets no gradient).
# At token level there is no clamp, as in verl's geo_mean (GMPO); TRL clamps at neither.
MAX_LOG_SEQ_RATIO = 10.0

# Ratio metrics exponentiate a log-ratio clamped to [-20, 20], as verl's rollout-correction metrics do
# (`verl.trainer.ppo.rollout_corr_helper.SAFETY_BOUND`): finite whatever the ratio, exact inside.
METRIC_LOG_RATIO_BOUND = 20.0


def _exp(x: float) -> float:
    """``math.exp``, inf past float64's range (a log bound of 800 is no bound, as inf is; math.exp raises)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


@dataclass(frozen=True)
class TrustRegion:
    """Clip bounds of one loss call.

    Attributes:
        level: "token" or "sequence".
        ratio_low, ratio_high: bounds on a ratio, 0 <= ratio_low <= 1 <= ratio_high.
        ratio_dual: dual-clip cap on a token's ratio (token level); inf for none.
        trl_delta: ratio_dual is TRL's `delta`, which caps the ratio before PPO's min, so the
            token caps are min(ratio_high, delta) for A > 0 and max(ratio_high, delta) for A < 0;
            otherwise it is verl's clip_ratio_c (dual-clip PPO): A < 0 tokens capped at it.
        max_log_seq_ratio: clamp of log s at sequence level (verl's gspo: 10; TRL: inf, none).
    """

    level: str
    ratio_low: float
    ratio_high: float
    ratio_dual: float = math.inf
    trl_delta: bool = False
    max_log_seq_ratio: float = MAX_LOG_SEQ_RATIO

    @classmethod
    def from_eps(
        cls, level: str, space: str, eps_low: float, eps_high: float, dual_clip: Optional[float] = None, **options
    ) -> "TrustRegion":
        """Bounds from PPO-style epsilons.

        space "ratio": [1 - eps_low, 1 + eps_high] (PPO, GRPO, GSPO);
        space "log": [exp(-eps_low), exp(eps_high)], i.e. log-ratio in [-eps_low, eps_high]
        (GMPO, verl's geo_mean). `dual_clip` (verl's clip_ratio_c) applies at token level.
        `options`: `trl_delta`, `max_log_seq_ratio`.
        """
        if space == "ratio":
            low, high = 1.0 - eps_low, 1.0 + eps_high
        elif space == "log":
            low, high = _exp(-eps_low), _exp(eps_high)
        else:
            raise ValueError(f"clip_space={space!r}; allowed: 'ratio', 'log'")
        dual = math.inf if dual_clip is None else float(dual_clip)
        return cls(level=level, ratio_low=low, ratio_high=high, ratio_dual=dual, **options)

    @property
    def log_low(self) -> float:
        return math.log(self.ratio_low) if self.ratio_low > 0 else -math.inf

    @property
    def log_high(self) -> float:
        return math.log(self.ratio_high)

    @property
    def log_dual(self) -> float:
        return math.log(self.ratio_dual)

    @property
    def positive_cap(self) -> float:
        """The cap on log r_t of an A > 0 token: log_high (TRL: min(log_high, log delta))."""
        return min(self.log_high, self.log_dual) if self.trl_delta else self.log_high

    @property
    def negative_cap(self) -> float:
        """The cap on log r_t of an A < 0 token, the dual clip: log_dual (TRL: max(log_high, log delta))."""
        return max(self.log_high, self.log_dual) if self.trl_delta else self.log_dual

    @property
    def positive_cap_is_trust(self) -> bool:
        """An A > 0 token at its cap counts as a trust-region clip (else a dual clip: TRL's delta <= 1 + eps_high)."""
        return not (self.trl_delta and self.log_dual <= self.log_high)


@dataclass
class SurrogateTerms:
    """Everything one loss call needs, all without autograd.

    Shapes: (B, T) unless noted. `value` and `grad_coef` are 0 at masked positions.

    Attributes:
        value: -A_it * clip(s_i) * T_i * w_it (times rollout IS weights if given), in log_prob's dtype; the
            share clip(s_i) T_i w_it is exp(log clip(s_i) + log(T_i w_it)), exact relative to itself.
        grad_coef: d value_it / d log pi_it under the token construction above (value_it
            on tokens whose clip is inactive, 0 elsewhere), in log_prob's dtype.
        rows: the valid positions (`hmpo_verl.means.Rows`: bool, 0/1, count per row).
        log_ratio_sum: () sum of the (unclipped) log-ratios delta over valid positions.
        log_ah_gap: (B,) log A - log H of each row's unclipped token ratios (0 for empty rows).
        log_seq_ratio: (B,) log s_i (before the sequence-level clamp; 0 for empty rows).
        ess: (B,) Kish effective sample size of the weights w_it = d log s_i / d delta_it.
        clipped_low, clipped_high: (B,) per row, valid tokens whose trust-region clip is active
            (no gradient from them), with A < 0 and with A > 0.
        dual_clipped: (B,) per row, valid tokens capped by the dual clip (token level).
    """

    value: torch.Tensor
    grad_coef: torch.Tensor
    rows: Rows
    log_ratio_sum: torch.Tensor
    log_ah_gap: torch.Tensor
    log_seq_ratio: torch.Tensor
    ess: torch.Tensor
    clipped_low: torch.Tensor
    clipped_high: torch.Tensor
    dual_clipped: torch.Tensor

    @property
    def clipped(self) -> torch.Tensor:
        """(B,) valid tokens per row whose trust-region clip is active."""
        return self.clipped_low + self.clipped_high

    @property
    def seq_ratio_for_metrics(self) -> torch.Tensor:
        """(B,) float64 s_i for the metrics: exp of log s_i clamped to +-METRIC_LOG_RATIO_BOUND (verl's
        convention for ratio metrics), so a metric stays finite where the loss is (issue 27, F2)."""
        bound = METRIC_LOG_RATIO_BOUND
        return torch.exp(self.log_seq_ratio.to(torch.float64).clamp(-bound, bound))


@dataclass
class _Signs:
    """sign(A) of zero-padded advantages: `side` `(B, 1)` when every row's valid tokens share one sign
    (one advantage per response: the usual case, where bounds and clip flags are per row), else `(B, T)`;
    `positive`, `negative` `(B,)` valid tokens per row with A > 0 and A < 0."""

    side: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor

    @classmethod
    def of(cls, adv: torch.Tensor, rows: Rows) -> "_Signs":
        sign = torch.sign(adv)
        total = sign.sum(-1, dtype=rows.n.dtype)
        nonzero = sign.abs_().sum(-1, dtype=rows.n.dtype)
        del sign
        positive, negative = (nonzero + total) / 2, (nonzero - total) / 2
        if bool(((positive == rows.n) | (negative == rows.n) | (nonzero == 0)).all()):
            side = torch.sign(total).unsqueeze(-1)
        else:
            side = torch.sign(adv).to(rows.n.dtype)
        return cls(side, positive, negative)


def _token_clip(delta: torch.Tensor, signs: _Signs, region: TrustRegion):
    """One-sided token clip by sign(A), in place on zero-padded `delta`.

    A > 0: min(delta, positive_cap); A < 0: clamp(delta, log_low, negative_cap); A = 0: delta (the bounds are selected per row, or per token
    when signs vary along a row; a zero-padded position's 0 is inside every bound).

    Returns `(keep, low, high, dual)`: `keep` `(B, T)` 1 where the token's clip is inactive (its
    gradient flows), else 0; per row `(B,)`, the tokens raised to the lower trust bound (A < 0),
    capped at the upper one (A > 0), and capped by the dual clip.
    """
    side = signs.side

    def bound(x: float) -> torch.Tensor:
        return torch.tensor(x, dtype=delta.dtype, device=delta.device)

    upper = torch.where(side > 0, bound(region.positive_cap), torch.where(side < 0, bound(region.negative_cap), math.inf))
    lower = torch.where(side < 0, bound(region.log_low), -math.inf)
    moved = torch.clamp(delta, lower, upper)
    torch.sub(delta, moved, out=moved).sign_()  # 1: capped from above, -1: raised, 0: inside
    delta.clamp_(lower, upper)
    net = moved.sum(-1)
    # A > 0 tokens are only ever capped: sum_t [A_t > 0] * moved_t counts them
    capped_pos = net * (side[:, 0] > 0) if side.shape[-1] == 1 else (moved * (side > 0)).sum(-1)
    total = moved.abs_().sum(-1)
    keep = moved.neg_().add_(1.0)
    capped, raised = (total + net) / 2, (total - net) / 2
    if region.positive_cap_is_trust:
        high, dual = capped_pos, capped - capped_pos
    else:
        high, dual = torch.zeros_like(capped), capped
    return keep, raised, high, dual


def _sequence_clip(log_s: torch.Tensor, signs: _Signs, region: TrustRegion):
    """Sequence level (GSPO): log clip(s_i) by sign(A) `(B, 1)` or `(B, T)`, the gradient mask `keep` (same
    shape), and per row `(B,)` the tokens whose clip is active with A < 0 and with A > 0.

    A > 0: min(s_i, r_high); A < 0: max(s_i, r_low), compared in ratio space as verl's gspo does. log s_i
    is clamped at `region.max_log_seq_ratio` (verl's gspo: 10); a clamped sequence gets no gradient.
    """
    log_clamped = log_s.clamp(max=region.max_log_seq_ratio).unsqueeze(-1)
    over = (log_s > region.max_log_seq_ratio).unsqueeze(-1)
    seq = torch.exp(log_clamped)
    clipped = torch.where(signs.side > 0, seq.clamp(max=region.ratio_high),
                          torch.where(signs.side < 0, seq.clamp(min=region.ratio_low), seq))
    inside = clipped == seq
    keep = (inside & ~over).to(seq.dtype)
    above, below = seq[:, 0] > region.ratio_high, seq[:, 0] < region.ratio_low
    return torch.where(inside, log_clamped, torch.log(clipped)), keep, below * signs.negative, above * signs.positive


def surrogate_terms(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    aggregate: Aggregator,
    region: TrustRegion,
    rollout_is_weights: Optional[torch.Tensor] = None,
) -> SurrogateTerms:
    """Value and gradient coefficient of the clipped sequence-ratio surrogate.

    Args:
        log_prob, old_log_prob: `(B, T)` log pi_theta and log pi_old; delta = their difference is
            computed in float32 at least (float64 for float64 log_prob).
        advantages: `(B, T)` A_it.
        response_mask: `(B, T)` valid tokens (bool or 0/1).
        aggregate: maps (zero-padded log-ratios, `Rows`, token clips per row or None) to
            (log s (B,), weights (B, T)).
        region: clip level and bounds.
        rollout_is_weights: optional `(B, T)` rollout-correction weights, multiplied into
            the per-token loss as verl's built-in losses do.

    Masked positions of every input may hold anything (NaN, inf): each input is zero-padded
    once, and every later (B, T) step masks by products (exact for finite values). On CPU the
    cost of a (B, T) step is dominated by fresh allocations (page faults), so the steps work in
    place and the unclipped log-ratios are reduced to their metrics before the clip reuses them.
    """
    with torch.no_grad():
        dtype = torch.float64 if log_prob.dtype == torch.float64 else torch.float32
        valid = response_mask.to(torch.bool)
        rows = Rows(valid, dtype)
        delta = log_prob.detach().to(dtype, copy=True).sub_(old_log_prob.detach())
        torch.where(valid, delta, torch.zeros((), dtype=dtype), out=delta)
        log_ratio_sum, log_ah_gap = delta.sum(), arithmetic_harmonic_gap(delta, rows)
        adv = torch.where(valid, advantages.detach(), 0.0)  # in its own dtype: products promote it
        signs = _Signs.of(adv, rows)
        if region.level == "token":
            keep, low, high, dual = _token_clip(delta, signs, region)
            log_s, w, log_share = aggregate(delta, rows, low + high)
            # as verl's geo_mean: no clamp of s_i (an overflow is reported by the caller)
            log_seq = log_s.unsqueeze(-1)
        elif region.level == "sequence":
            log_s, w, log_share = aggregate(delta, rows, None)
            log_seq, keep, low, high = _sequence_clip(log_s, signs, region)
            dual = torch.zeros_like(low)
        else:
            raise ValueError(f"clip_level={region.level!r}; allowed: 'token', 'sequence'")
        del delta
        ess = effective_sample_size(w)
        del w
        # value_t = -A_t * clip(s_i) * T_i * w_t (* IS weight), its gradient on unclipped tokens. The share
        # clip(s_i) T_i w_t is formed in log space, exp(log clip(s_i) + log(T_i w_t)), so each token keeps
        # its own precision however small its weight next to the row's largest (whose advantage may be 0).
        value = log_share.add_(log_seq).exp_().mul_(adv).neg_()  # the aggregators' log shares are fresh tensors
        if not torch.isfinite(value.sum()):  # rare, so checked first: a boolean fill costs ~10 products on CPU
            # an A = 0 token (every masked one among them) contributes 0, also where its share overflowed (inf * 0)
            value.masked_fill_(adv == 0, 0.0)
        del log_share, adv, log_seq
        if rollout_is_weights is not None:
            value.mul_(torch.where(valid, rollout_is_weights.detach(), 0.0))
        grad_coef = keep.mul_(value) if keep.shape == value.shape else value * keep
        del keep
        return SurrogateTerms(
            value=value.to(log_prob.dtype), grad_coef=grad_coef.to(log_prob.dtype), rows=rows,
            log_ratio_sum=log_ratio_sum, log_ah_gap=log_ah_gap, log_seq_ratio=log_s, ess=ess,
            clipped_low=low, clipped_high=high, dual_clipped=dual,
        )


class _LossMatrix(torch.autograd.Function):
    """Forward: the values (a view: no copy); backward: grad * grad_coef. log_prob is only the input
    the gradient flows to, so whatever its masked positions hold never reaches the loss."""

    @staticmethod
    def forward(ctx, log_prob, value, grad_coef):
        ctx.save_for_backward(grad_coef)
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        (grad_coef,) = ctx.saved_tensors
        return grad * grad_coef, None, None


def surrogate_loss_matrix(log_prob: torch.Tensor, terms: SurrogateTerms) -> torch.Tensor:
    """Per-token loss `(B, T)` with value `terms.value` and d/d log_prob = `terms.grad_coef`.

    Masked positions of `log_prob` may hold anything: they contribute 0 and get 0 gradient.
    """
    return _LossMatrix.apply(log_prob, terms.value, terms.grad_coef)
