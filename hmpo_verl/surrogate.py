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
(= s_i^(1-p) * r_it^p for M_p; the shares average to s_i over the response), and its
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

which has the same value and the same gradient for every aggregation mode, while keeping
a single (B, T) tensor for backward.

Trust regions (both needed, DESIGN.md section 2):
  * level "sequence" (GSPO, arXiv 2507.18071): s_i is clipped to [r_low, r_high],
    one-sidedly by sign(A) as in PPO; a clipped token gets no gradient.
  * level "token" (GMPO arXiv 2507.20673 / PMPO arXiv 2601.22521): each token's
    log-ratio is clipped before aggregation, one-sidedly by sign(A) (A > 0: at most
    log_high; A < 0: at least log_low, and at most log_dual -- dual-clip PPO,
    arXiv 1912.09729). With p = 1 and ratio-space bounds this is PPO/GRPO's per-token
    clipping averaged over each sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from hmpo_verl.means import effective_sample_size

# The aggregator maps (log-ratios (B, T), valid (B, T) bool, token clip active (B, T) bool or
# None at sequence level) to (log s (B,), w (B, T)).
Aggregator = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], "tuple[torch.Tensor, torch.Tensor]"]

# verl's gspo clamps the log sequence ratio at 10 "for numerical stability"; we do the
# same at sequence level (a clamped sequence keeps its value e^10 and gets no gradient).
# At token level there is no clamp, as in verl's geo_mean (GMPO).
MAX_LOG_SEQ_RATIO = 10.0


@dataclass(frozen=True)
class TrustRegion:
    """Clip bounds of one loss call.

    Attributes:
        level: "token" or "sequence".
        ratio_low, ratio_high: bounds on a ratio, 0 <= ratio_low <= 1 <= ratio_high.
        ratio_dual: dual-clip cap on a token's ratio when A < 0 (token level); inf for none.
    """

    level: str
    ratio_low: float
    ratio_high: float
    ratio_dual: float = math.inf

    @classmethod
    def from_eps(
        cls, level: str, space: str, eps_low: float, eps_high: float, dual_clip: Optional[float] = None
    ) -> "TrustRegion":
        """Bounds from PPO-style epsilons.

        space "ratio": [1 - eps_low, 1 + eps_high] (PPO, GRPO, GSPO);
        space "log": [exp(-eps_low), exp(eps_high)], i.e. log-ratio in [-eps_low, eps_high]
        (GMPO, verl's geo_mean). `dual_clip` (verl's clip_ratio_c) applies at token level.
        """
        if space == "ratio":
            low, high = 1.0 - eps_low, 1.0 + eps_high
        elif space == "log":
            low, high = math.exp(-eps_low), math.exp(eps_high)
        else:
            raise ValueError(f"clip_space={space!r}; allowed: 'ratio', 'log'")
        dual = math.inf if dual_clip is None else float(dual_clip)
        return cls(level=level, ratio_low=low, ratio_high=high, ratio_dual=dual)

    @property
    def log_low(self) -> float:
        return math.log(self.ratio_low) if self.ratio_low > 0 else -math.inf

    @property
    def log_high(self) -> float:
        return math.log(self.ratio_high)

    @property
    def log_dual(self) -> float:
        return math.log(self.ratio_dual)


@dataclass
class SurrogateTerms:
    """Everything one loss call needs, all without autograd.

    Shapes: (B, T) unless noted. `value` and `grad_coef` are 0 at masked positions.

    Attributes:
        value: -A_it * clip(s_i) * T_i * w_it (times rollout IS weights if given).
        grad_coef: d value_it / d log pi_it under the token construction above (value_it
            on tokens whose clip is inactive, 0 elsewhere).
        log_seq_ratio: (B,) log s_i (before the sequence-level clamp; 0 for empty rows).
        ess: (B,) Kish effective sample size of the weights w_it = d log s_i / d delta_it.
        clipped: tokens whose trust-region clip is active (no gradient from them).
        dual_clipped: tokens capped by the dual clip (A < 0, token level).
        valid: response mask as bool; n_valid: (B,) valid tokens per row.
    """

    value: torch.Tensor
    grad_coef: torch.Tensor
    log_seq_ratio: torch.Tensor
    ess: torch.Tensor
    clipped: torch.Tensor
    dual_clipped: torch.Tensor
    valid: torch.Tensor
    n_valid: torch.Tensor


def clip_token_log_ratios(
    log_ratio: torch.Tensor, advantages: torch.Tensor, region: TrustRegion
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One-sided token clip by sign(A).

    Returns `(clipped_log_ratio, trust_active, dual_active)`, all (B, T):
    A > 0: min(delta, log_high); A < 0: clamp(delta, log_low, log_dual); A = 0: delta.
    """
    pos, neg = advantages > 0, advantages < 0
    lo, hi, dual = region.log_low, region.log_high, region.log_dual
    above = pos & (log_ratio > hi)
    below = neg & (log_ratio < lo)
    clipped = log_ratio.masked_fill(above, hi).masked_fill_(below, lo)
    if math.isfinite(dual):
        dual_active = neg & (log_ratio > dual)
        clipped.masked_fill_(dual_active, dual)
    else:
        dual_active = torch.zeros_like(above)
    return clipped, above | below, dual_active


def surrogate_terms(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    aggregate: Aggregator,
    region: TrustRegion,
    rollout_is_weights: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> SurrogateTerms:
    """Value and gradient coefficient of the clipped sequence-ratio surrogate.

    Args:
        log_ratio: `(B, T)` delta = log pi_theta - log pi_old (float32/64, no grad).
        advantages: `(B, T)` A_it.
        response_mask: `(B, T)` valid tokens (bool or 0/1).
        aggregate: maps (log-ratios, valid, token clip active or None) to (log s (B,), weights (B, T)).
        region: clip level and bounds.
        rollout_is_weights: optional `(B, T)` rollout-correction weights, multiplied into
            the per-token loss as verl's built-in losses do.
        out_dtype: dtype of `value` and `grad_coef` (default: log_ratio's); the maths runs
            in log_ratio's dtype either way.
    """
    with torch.no_grad():
        dtype = log_ratio.dtype
        valid = response_mask.to(torch.bool)
        adv = advantages.detach()  # mixed-dtype ops promote it; no up-cast copy
        n = valid.sum(-1)
        if region.level == "token":
            clipped_delta, trust, dual = clip_token_log_ratios(log_ratio, adv, region)
            log_s, w = aggregate(clipped_delta, valid, trust & valid)
            del clipped_delta
        elif region.level == "sequence":
            log_s, w = aggregate(log_ratio, valid, None)
        else:
            raise ValueError(f"clip_level={region.level!r}; allowed: 'token', 'sequence'")

        ess = effective_sample_size(w)
        share = w.mul_(n.unsqueeze(-1))  # T_i * w_t: 1 at p = 0, r'_t / s_i at p = 1
        if region.level == "sequence":
            # as verl's gspo: log s_i clamped at 10; a clamped sequence gets no gradient
            over = (log_s > MAX_LOG_SEQ_RATIO).unsqueeze(-1)
            seq = torch.exp(log_s.clamp(max=MAX_LOG_SEQ_RATIO)).unsqueeze(-1)  # (B, 1)
            above, below = (adv > 0) & (seq > region.ratio_high), (adv < 0) & (seq < region.ratio_low)
            trust, dual = above | below, torch.zeros_like(above)
            seq = seq.expand_as(adv).masked_fill(above, region.ratio_high).masked_fill_(below, region.ratio_low)
        else:
            # as verl's geo_mean: no clamp, a sequence whose ratio rose far keeps its gradient
            # (an overflow of s_i is reported by the caller's finiteness check)
            over = None
            seq = torch.exp(log_s).unsqueeze(-1)
        # value_t = -A_t * clip(s_i) * T_i * w_t (* IS weight): its gradient on unclipped tokens
        value = (adv * seq).mul_(share).neg_()
        del share, w
        if rollout_is_weights is not None:
            value.mul_(rollout_is_weights.detach().to(dtype))
        invalid = ~valid
        trust &= valid
        dual &= valid
        value.masked_fill_(invalid, 0.0)
        inactive = invalid | trust | dual
        grad_coef = value.masked_fill(inactive if over is None else inactive | over, 0.0)
        if out_dtype is not None:
            value, grad_coef = value.to(out_dtype), grad_coef.to(out_dtype)
        return SurrogateTerms(
            value=value,
            grad_coef=grad_coef,
            log_seq_ratio=log_s,
            ess=ess,
            clipped=trust,
            dual_clipped=dual,
            valid=valid,
            n_valid=n,
        )


def surrogate_loss_matrix(log_prob: torch.Tensor, terms: SurrogateTerms) -> torch.Tensor:
    """Per-token loss `(B, T)` with value `terms.value` and d/d log_prob = `terms.grad_coef`.

    Masked positions of `log_prob` may hold anything: they contribute 0 and get 0 gradient.
    """
    tangent = torch.where(terms.valid, log_prob - log_prob.detach(), 0.0)
    return terms.value + terms.grad_coef * tangent
