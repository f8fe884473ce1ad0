"""The power-mean losses in SkyRL (0.4.0): registered in SkyRL's `PolicyLossRegistry`.

SkyRL looks a policy loss up by `trainer.algorithm.policy_loss_type` in its registry, which its Ray
workers sync from a named Ray actor; its config names an importable module to run instead of its
own entry point (`trainer.override_entrypoint`). This module is that entry point:

    python -m skyrl.train.entrypoints.main_base trainer.override_entrypoint=hmpo_verl.skyrl \\
        trainer.algorithm.policy_loss_type=hmpo [hmpo.power=... hmpo.clip_level=...] <SkyRL's overrides>

`main()` takes the `hmpo.*` options out of the overrides (validated: an error names the option
before Ray starts; power_mean has no default p and needs `hmpo.power`, as in verl), registers the
loss named by `trainer.algorithm.policy_loss_type` (one of hmpo, power_mean, agm,
adaptive_power_mean) with those options, and runs SkyRL's own `main()`, which syncs the registry to
its workers. In Python, `register(name, LossOptions(...))` does the same.

The loss has SkyRL's policy-loss signature and conventions (`ppo_policy_loss`, `gspo_policy_loss`):
the per-token loss is `hmpo_verl.host_loss.loss_matrix` (the surrogate of the verl and TRL adapters),
clip bounds [1 - eps_clip_low, 1 + eps_clip_high] (checked on each call, the fields named), log s
clamped at 10 at sequence level (as SkyRL's gspo), SkyRL's `apply_off_policy_correction` (TIS /
sequence masks from `off_policy_correction`) applied to it (right or loud where SkyRL's is not: the
log-probs it reads are zeroed at masked positions, and NaN / inf at a valid one raises
`NonFiniteInputError`), and SkyRL's `reduce_loss` (a masked sum: SkyRL scales the advantages for its
`loss_reduction` beforehand). Metrics: SkyRL's `clip_ratio` (valid tokens whose clip is active), the
correction's metrics, and `pm/seq_ratio_mean` (log s clamped to +-20, as the verl and TRL adapters'
metric), `pm/log_ah_gap`, `pm/ess_frac`. No dual clip (SkyRL's regular has none). verl and TRL are
not imported.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch

try:
    from skyrl.backends.skyrl_train.utils.off_policy_correction_utils import (
        apply_off_policy_correction,
        off_policy_correction_enabled,
    )
    from skyrl.backends.skyrl_train.utils.ppo_utils import PolicyLossRegistry, reduce_loss
except ImportError as err:  # say which install brings it
    raise ImportError(f"hmpo_verl.skyrl needs SkyRL 0.4 ({err}): pip install 'hmpo-verl[skyrl]'") from err

from hmpo_verl.guards.finite import zeroed_where_masked
from hmpo_verl.hosts.host_loss import LOSS_MODES, LossOptions, loss_matrix
from hmpo_verl.maths.options import check_clip_bounds, power_needed
from hmpo_verl.maths.surrogate import TrustRegion

OPTION_PREFIX = "hmpo."
LOSS_KEY = "trainer.algorithm.policy_loss_type="
ENTRY_KEY = "trainer.override_entrypoint="
CLIP_FIELDS = ("trainer.algorithm.eps_clip_low", "trainer.algorithm.eps_clip_high")


def _masked_row_mean(x: torch.Tensor, rows: torch.Tensor) -> float:
    return (torch.where(rows, x, 0.0).sum() / rows.sum().clamp(min=1)).item()


def policy_loss(options: LossOptions):
    """SkyRL's policy-loss function for `options`: (log_probs, old_log_probs, advantages `(B, T)`, config
    (SkyRL's AlgorithmConfig), loss_mask, rollout_logprobs) -> (scalar loss, metrics)."""

    def power_mean_policy_loss(
        log_probs: torch.Tensor,
        old_log_probs: torch.Tensor,
        advantages: torch.Tensor,
        config,
        loss_mask: Optional[torch.Tensor] = None,
        rollout_logprobs: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        check_clip_bounds(config.eps_clip_low, config.eps_clip_high, options.clip_space, CLIP_FIELDS)
        region = TrustRegion.from_eps(options.clip_level, options.clip_space, config.eps_clip_low, config.eps_clip_high)
        mask = torch.ones_like(log_probs, dtype=torch.bool) if loss_mask is None else loss_mask
        loss, terms = loss_matrix(options, region, log_probs, old_log_probs, advantages, mask)
        n = terms.rows.n
        rows = n > 0
        metrics = {
            "clip_ratio": (terms.clipped.sum() / n.sum().clamp(min=1)).item(),
            "pm/seq_ratio_mean": _masked_row_mean(terms.seq_ratio_for_metrics, rows),
            "pm/log_ah_gap": _masked_row_mean(terms.log_ah_gap, rows),
            "pm/ess_frac": _masked_row_mean(terms.ess / n.clamp(min=1), rows),
        }
        if rollout_logprobs is not None and off_policy_correction_enabled(config.off_policy_correction):
            # SkyRL's correction turns NaN into a NaN gradient or a silently kept row: right or loud here
            old_log_probs, rollout_logprobs = zeroed_where_masked(
                {"old_log_probs": old_log_probs, "rollout_logprobs": rollout_logprobs}, mask.bool(), "loss_mask")
        loss, loss_mask, correction = apply_off_policy_correction(
            loss, old_log_probs, rollout_logprobs, loss_mask, config.off_policy_correction
        )
        metrics.update(correction)
        return reduce_loss(loss, loss_mask), metrics

    power_mean_policy_loss.__qualname__ = power_mean_policy_loss.__name__ = f"{options.loss_mode}_policy_loss"
    return power_mean_policy_loss


def register(name: str, options: LossOptions) -> None:
    """Register the loss of `options` as `name` in SkyRL's PolicyLossRegistry (its ValueError if taken)."""
    PolicyLossRegistry.register(name, policy_loss(options))


def split_overrides(argv: list[str]) -> tuple[Optional[LossOptions], list[str]]:
    """(the options of the loss named by trainer.algorithm.policy_loss_type, or None if it is not ours; SkyRL's
    overrides without ours and without trainer.override_entrypoint). Raises ValueError naming the option."""
    for a in argv:
        if a.lstrip("+").startswith(OPTION_PREFIX) and (a.startswith("+") or "=" not in a):
            name = a.lstrip("+").split("=", 1)[0]
            raise ValueError(f"{a!r} is invalid; allowed: {name}=<value> (SkyRL's overrides take no '+')")
    # a key given twice takes its last value, as SkyRL's own overrides do (OmegaConf.from_cli)
    ours = {a[len(OPTION_PREFIX):].split("=", 1)[0]: a.split("=", 1)[1] for a in argv if a.startswith(OPTION_PREFIX)}
    rest = [a for a in argv if not a.startswith((OPTION_PREFIX, ENTRY_KEY))]
    loss = next((a[len(LOSS_KEY):] for a in reversed(argv) if a.startswith(LOSS_KEY)), None)
    if loss not in LOSS_MODES:
        if ours:
            raise ValueError(f"hmpo.{next(iter(ours))} is invalid with {LOSS_KEY}{loss}; allowed: "
                             f"trainer.algorithm.policy_loss_type one of {', '.join(LOSS_MODES)}")
        return None, rest
    known = {name for name in LossOptions.__dataclass_fields__ if name not in ("loss_mode", "prefix")}
    for key in ours:
        if key not in known:
            raise ValueError(f"hmpo.{key} is not an option; allowed: {', '.join(f'hmpo.{k}' for k in sorted(known))}")
    options = LossOptions(loss_mode=loss, prefix="hmpo", **{k: _value(k, v) for k, v in ours.items()})
    if loss == "power_mean" and "power" not in ours:  # as the verl adapter: power_mean has no default p
        raise power_needed(f"{LOSS_KEY}power_mean", "hmpo.power=<p>", f"{LOSS_KEY}hmpo")
    return options, rest


def _value(key: str, text: str):
    """An override's value in the option's type (floats accept inf / -inf; agm_iters null or an int)."""
    if key in ("clip_level", "clip_space", "sign_rule", "adapt"):
        return text
    if key == "agm_iters":
        if text in ("null", "None"):
            return None
        try:
            return int(text)
        except ValueError:
            return text  # not an integer: LossOptions refuses it, naming hmpo.agm_iters and the allowed values
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"hmpo.{key}={text!r} is invalid; allowed: a number") from None


def main() -> None:
    """SkyRL's entry point with the loss named by trainer.algorithm.policy_loss_type registered first."""
    from skyrl.train.entrypoints import main_base

    try:
        options, rest = split_overrides(sys.argv[1:])
    except ValueError as err:
        sys.exit(f"hmpo_verl.skyrl: {err}")
    if options is not None:
        register(options.loss_mode, options)
        print(f"hmpo_verl.skyrl: {options.loss_mode} registered in SkyRL's PolicyLossRegistry: {options}", flush=True)
    sys.argv = [sys.argv[0], *rest]
    main_base.main()


if __name__ == "__main__":
    main()
