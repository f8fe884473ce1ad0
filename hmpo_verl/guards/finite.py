"""Non-finite inputs stop a step: the named error, and the check of the rollout's log-probs.

A rollout engine that reports NaN or inf log-probs (bf16 overflow, a broken kernel) has
produced a poisoned batch. Where verl trains on those log-probs -- as the behaviour policy
(`algorithm.rollout_correction.bypass_mode=true`) or through importance weights -- our losses
raise `NonFiniteInputError` before any update. Without either, verl 0.9.1 only feeds them to
its `training/rollout_probs_diff_*` diagnostics (`verl.utils.debug.metrics.calculate_debug_metrics`,
run in the driver after the old log-probs are recomputed) and trains on: the metrics turn NaN
and the run goes on with samples from a broken engine. `guard_rollout_log_probs(module)` wraps
that function (in verl's trainer modules, as they are imported) to raise the same error first.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch


class NonFiniteInputError(ValueError):
    """NaN or inf where the response mask is valid, in an input a training step would use."""


def count_non_finite(values: torch.Tensor, valid: torch.Tensor) -> int:
    """Positions where `valid` is true and `values` is NaN or +-inf. Shapes: equal, `(B, T)`."""
    return int((~torch.isfinite(values) & valid.bool()).sum())


def first_non_finite(inputs: dict, valid: torch.Tensor) -> Optional[tuple[str, int]]:
    """The first of `inputs` (name -> `(B, T)` tensor or None) holding NaN or +-inf where `valid` is true,
    with its count of such positions; None if every input is finite there."""
    for name, tensor in inputs.items():
        if tensor is not None and (bad := count_non_finite(tensor.detach(), valid)):
            return name, bad
    return None


def check_inputs_finite(inputs: dict, valid: torch.Tensor, mask_name: str, reader: str = "") -> None:
    """`NonFiniteInputError` naming the first of `inputs` (name -> `(B, T)` tensor or None) that is NaN or inf
    at a valid position (`mask_name`: the host's name of the mask; `reader`: what reads it, for the message)."""
    if found := first_non_finite(inputs, valid):
        raise NonFiniteInputError(f"{found[0]} has {found[1]} non-finite value(s) at valid ({mask_name}) positions"
                                  + (f", which {reader} reads" if reader else ""))


def zeroed_where_masked(inputs: dict, valid: torch.Tensor, mask_name: str) -> list:
    """`inputs` (name -> `(B, T)` tensor) with 0 at masked positions, for a host's code that masks by products
    (NaN or inf there would poison a row); `NonFiniteInputError` naming the first input that is NaN or inf at a
    valid position (`mask_name`: the host's name of the mask). `valid`: `(B, T)` bool."""
    check_inputs_finite(inputs, valid, mask_name)
    return [torch.where(valid, tensor, 0.0) for tensor in inputs.values()]


def check_surrogate_finite(terms, inputs: dict, mask_name: str) -> None:
    """Raise `NonFiniteInputError` if a loss call's surrogate is not finite: naming the input (of `inputs`,
    name -> `(B, T)` tensor or None) that holds NaN or inf at a valid position, else an overflow.

    `terms`: the call's `hmpo_verl.surrogate.SurrogateTerms`; `mask_name`: the host's name of the mask
    (verl: response_mask; TRL: completion_mask). Shared by the verl losses and the TRL trainer, so both
    hosts refuse the same inputs with the same message.
    """
    # grad_coef is value where it is not 0; summed in float32 at least: an fp16 row of 2000 finite tokens of -50
    # each sums past fp16's range, and no token overflowed
    if torch.isfinite(terms.log_ratio_sum + terms.value.sum(dtype=torch.promote_types(terms.value.dtype, torch.float32))):
        return
    check_inputs_finite(inputs, terms.rows.valid, mask_name)
    raise NonFiniteInputError(
        f"the policy loss overflowed in {terms.value.dtype}: a token's share of its sequence ratio, "
        "clip(s_i) * T * w_t, or its product with the advantage is beyond the dtype's range (log-ratios or "
        "advantages too large); pass float64 log-probs, or bound the ratios (a dual clip: verl's clip_ratio_c, "
        "TRL's delta; or clip_level='sequence')"
    )


def check_kl_finite(per_token_kl: torch.Tensor, valid: torch.Tensor, inputs: dict, term: str) -> None:
    """Raise `NonFiniteInputError` if a KL penalty `(B, T)` is NaN or inf at a valid (completion_mask) position:
    naming the input of `inputs` (name -> `(B, T)` tensor or None) that is, else the overflow (the k3 estimator's
    exp of a log-ratio past the dtype's range; the surrogate's own check does not see the KL term). `term`: the
    setting that adds it, for the message (TRL: ``beta=<value>``)."""
    with torch.no_grad():
        if not count_non_finite(per_token_kl, valid):
            return
        check_inputs_finite(inputs, valid, "completion_mask", f"the KL penalty ({term})")
        raise NonFiniteInputError(
            f"the KL penalty ({term}) overflowed in {per_token_kl.dtype}: exp of a log-ratio between the policy and "
            "the reference (or, with use_bias_correction_kl, the old policy) beyond the dtype's range; pass float64 "
            "log-probs, or train closer to the reference (beta=0 drops the term)")


def check_rollout_log_probs(data) -> None:
    """Raise `NonFiniteInputError` if `data.batch["rollout_log_probs"]` is non-finite at a valid position.

    `data`: the DataProto verl hands `calculate_debug_metrics` (`rollout_log_probs` `(B, T)`, and optionally
    `response_mask` or `attention_mask` `(B, >= T)`). The valid positions are the ones verl's function uses:
    `response_mask`, else `attention_mask` (their last T columns), else every position (issue 27, F8).
    """
    batch = data.batch
    if "rollout_log_probs" not in batch.keys():
        return
    log_probs = batch["rollout_log_probs"]
    mask = _debug_metrics_mask(batch, log_probs)
    bad = count_non_finite(log_probs, mask)
    if bad:
        rows = int((~torch.isfinite(log_probs) & mask.bool()).any(-1).sum())
        raise NonFiniteInputError(
            f"rollout_log_probs has {bad} non-finite value(s) at valid (response_mask) positions, in {rows} of "
            f"{log_probs.shape[0]} responses: the rollout engine's log-probs are broken; this batch is not trained on"
        )


def _debug_metrics_mask(batch, log_probs: torch.Tensor) -> torch.Tensor:
    """`(B, T)` the mask `verl.utils.debug.metrics.calculate_debug_metrics` (0.9.1) applies to `log_probs`."""
    for key in ("response_mask", "attention_mask"):
        if key in batch.keys():
            return batch[key][:, -log_probs.shape[-1] :]
    return torch.ones_like(log_probs, dtype=torch.bool)  # verl: "no mask info found, use all log probs"


def guard_rollout_log_probs(module) -> None:
    """Make `module.calculate_debug_metrics` check the rollout's log-probs first (idempotent)."""
    metrics = module.calculate_debug_metrics
    if getattr(metrics, "_hmpo_guarded", False):
        return

    @functools.wraps(metrics)
    def calculate_debug_metrics(data):
        check_rollout_log_probs(data)
        return metrics(data)

    calculate_debug_metrics._hmpo_guarded = True
    module.calculate_debug_metrics = calculate_debug_metrics
