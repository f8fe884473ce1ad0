"""The power-mean losses in OpenRLHF: `PowerMeanPolicyLoss`, a drop-in for `openrlhf.models.PolicyLoss`.

OpenRLHF (0.11.2) builds its policy loss in each actor process (`openrlhf/trainer/ray/ppo_actor.py`:
`PolicyLoss(clip_eps_low=..., policy_loss_type=..., ...)`); it has no loss registry. This class
takes the same constructor arguments plus the power-mean options (`LossOptions`) and its `forward`
has OpenRLHF's signature and return values. To train with it, run OpenRLHF through
`python -m hmpo_verl.openrlhf.train_ppo_ray <OpenRLHF's arguments> --actor.policy_loss_type hmpo`,
which installs it in every Ray worker (see `train_ppo_ray`). Importing this package imports
neither OpenRLHF, verl nor TRL.

The per-token loss is `hmpo_verl.host_loss.loss_matrix` (the surrogate the verl and TRL adapters
use); OpenRLHF's conventions kept here:
  * aggregation: OpenRLHF's `aggregate_loss` -- `token_level_loss=True` (`--actor.loss_agg_mode
    token-mean`): masked sum / `batch_num_tokens` * dp_size; False (`seq-mean-token-mean`): the mean over
    non-empty sequences (or / `global_batch_size` * dp_size) of each sequence's token sum / (count + 1e-8);
  * clip bounds [1 - clip_eps_low, 1 + clip_eps_high]; `dual_clip` caps the ratio of A < 0 tokens
    (token level; refused at clip_level="sequence");
  * returns `(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)`: clip_ratio the fraction of valid
    tokens whose trust-region clip is active (OpenRLHF's `surr2 < surr1`), ppo_kl the mean of
    log pi_old - log pi over valid tokens; vllm_kl, is_filter_ratio as OpenRLHF's (None without IS correction);
  * OpenRLHF's vLLM importance-sampling correction (`is_correction_level` token / seq, mode mask / clip,
    gating ratio / binary_kl / tv: TIS, ICEPOP, seq-mask-tis, FlashREINFORCE's trust region) as in its
    `ppo`: the gate's coefficient multiplies each token's loss term, value and gradient (`is_correction`).
Where it differs from OpenRLHF's own `ppo` / `gspo` (README, "OpenRLHF"): no clamp of the token
log-ratio at +-20 (ppo), per-token advantages enter GSPO-token style (gspo), `gspo` forces
seq-mean-token-mean while this loss follows `token_level_loss`, with IS correction on OpenRLHF's
`gspo` takes the sequence ratio against the rollout policy with no gate, while this loss gates as `ppo` does,
and NaN / inf log-probs raise at valid positions and do not matter at masked ones (`is_correction`).
"""

from __future__ import annotations

import math
import os
import sys
from typing import Optional

import torch
from torch import nn

from hmpo_verl.guards.finite import zeroed_where_masked
from hmpo_verl.hosts.host_loss import LOSS_MODES, LossOptions, loss_matrix
from hmpo_verl.maths.options import check_choice, check_clip_bounds, power_needed
from hmpo_verl.maths.surrogate import TrustRegion

PREFIX = "hmpo_verl.openrlhf.PowerMeanPolicyLoss"
# the options of the loss the launcher installs, as LossOptions.to_json(), in every Ray worker's environment
OPTIONS_ENV = "HMPO_OPENRLHF_LOSS"
IS_CORRECTION_LEVELS = ("off", "token", "seq")
IS_CORRECTION_MODES = ("mask", "clip")
IS_CORRECTION_GATINGS = ("ratio", "binary_kl", "tv")
# the modules that bind OpenRLHF's PolicyLoss by name (`from .loss import PolicyLoss`, `from openrlhf.models import ...`)
IMPORTERS = ("openrlhf.models", "openrlhf.trainer.ray.ppo_actor")


def _masked_mean(x, mask, dim=None):
    """OpenRLHF's `masked_mean` (no guard against an empty mask); `x` is zero at masked positions here."""
    return (x * mask).sum(dim=dim) / mask.sum(dim=dim)


def is_correction(old_log_probs, rollout_log_probs, mask, level, mode, gating, threshold):
    """OpenRLHF 0.11.2's train/rollout importance-sampling gate (`PolicyLoss.forward`, restated for the reason
    given at `aggregate_loss`; pinned to it by tests/test_openrlhf_parity.py), right or loud where OpenRLHF's
    is not: NaN / inf at a valid position raises `NonFiniteInputError` (OpenRLHF's gate makes a NaN a dropped
    token or row, silently), and masked positions are zeroed first (OpenRLHF's `masked_mean` multiplies them by
    the mask, so a NaN or inf there drops the row); on finite inputs the two agree.

    Args: `(B, T)` log-probs of the old (train) and the rollout policy, the mask `(B, T)` (bool or 0/1);
    OpenRLHF's options.
    Returns `(coef (B, T), vllm_kl, is_filter_ratio)`: coef multiplies each token's loss; vllm_kl is the mean of
    log pi_rollout - log pi_old over valid tokens, is_filter_ratio the fraction of gated-out units.
    """
    old_log_probs, rollout_log_probs = zeroed_where_masked(
        {"old_log_probs": old_log_probs, "rollout_log_probs": rollout_log_probs}, mask.bool(), "action_mask")
    low, high = threshold
    seq_level = level == "seq"
    is_log_ratio = (old_log_probs - rollout_log_probs).detach()  # log(pi_train / pi_rollout)
    token_is = is_log_ratio.exp()
    if gating == "ratio":
        stat = _masked_mean(is_log_ratio, mask, dim=-1).unsqueeze(-1) if seq_level else is_log_ratio
        stat = stat.exp()
    else:
        p = rollout_log_probs.detach().exp().clamp(1e-6, 1 - 1e-6)
        q = old_log_probs.detach().exp().clamp(1e-6, 1 - 1e-6)
        if gating == "binary_kl":
            stat = p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()
        else:  # tv
            stat = (p - q).abs()
        if seq_level:
            stat = _masked_mean(stat, mask, dim=-1).unsqueeze(-1)
    if mode == "clip":
        coef = stat.clamp(min=low, max=high)
        filtered = (stat < low) | (stat > high)
    else:  # mask: drop out-of-band units, survivors keep their per-token IS weight
        keep = (stat >= low) & (stat <= high)
        coef = torch.where(keep, token_is, 0.0)
        filtered = ~keep
    is_filter_ratio = filtered.float().mean() if seq_level else _masked_mean(filtered.float(), mask)
    vllm_kl = _masked_mean(rollout_log_probs - old_log_probs, mask)
    return coef.expand_as(old_log_probs), vllm_kl, is_filter_ratio


def aggregate_loss(loss, loss_mask, token_level_loss=True, dp_size=1, batch_num_tokens=None, global_batch_size=None):
    """OpenRLHF 0.11.2's `openrlhf.models.loss.aggregate_loss` (a per-token loss `(B, T)` to a scalar), restated
    because its package imports DeepSpeed and flash-attn at import time; pinned to it by
    tests/test_openrlhf_parity.py. `loss_mask` None: every token is valid."""
    if loss_mask is None:
        loss_mask = torch.ones_like(loss, dtype=torch.bool)
    if token_level_loss:
        if batch_num_tokens is None:
            return (loss * loss_mask).sum() / loss_mask.sum()
        return (loss * loss_mask).sum() / batch_num_tokens * dp_size
    token_counts = loss_mask.sum(dim=-1)
    seq_loss = (loss * loss_mask).sum(dim=-1) / (token_counts + 1e-8)
    seq_mask = (token_counts > 0).float()
    if global_batch_size is None:
        return (seq_loss * seq_mask).sum() / seq_mask.sum()
    return (seq_loss * seq_mask).sum() / global_batch_size * dp_size


class PowerMeanPolicyLoss(nn.Module):
    """OpenRLHF's `PolicyLoss` with the clipped power-mean (or AGM) sequence-ratio surrogate.

    Args: OpenRLHF's (`clip_eps_low`, `clip_eps_high`, `dual_clip`, `token_level_loss`,
    `policy_loss_type` -- here one of LOSS_MODES -- and the `is_correction_*` options); `options`: the power-mean options (default: those of `policy_loss_type`
    with defaults, e.g. hmpo = p -1, token clip in ratio space; power_mean has no default p and needs them).
    """

    def __init__(
        self,
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.2,
        dual_clip: Optional[float] = None,
        token_level_loss: bool = True,
        policy_loss_type: str = "hmpo",
        is_correction_level: str = "off",
        is_correction_mode: str = "mask",
        is_correction_gating: str = "ratio",
        is_correction_threshold: tuple = (0.5, 5.0),
        options: Optional[LossOptions] = None,
    ) -> None:
        super().__init__()
        if options is None and policy_loss_type == "power_mean":
            raise power_needed(f"{PREFIX}.policy_loss_type='power_mean'", "options=LossOptions('power_mean', power=<p>)",
                               "policy_loss_type='hmpo'")
        options = options or LossOptions(loss_mode=policy_loss_type, prefix=PREFIX)
        if options.loss_mode != policy_loss_type:
            raise ValueError(f"{PREFIX}.policy_loss_type={policy_loss_type!r} conflicts with options.loss_mode="
                             f"{options.loss_mode!r}; allowed: the same loss mode ({', '.join(LOSS_MODES)})")
        check_choice(PREFIX, "is_correction_level", is_correction_level, IS_CORRECTION_LEVELS)
        check_choice(PREFIX, "is_correction_mode", is_correction_mode, IS_CORRECTION_MODES)
        check_choice(PREFIX, "is_correction_gating", is_correction_gating, IS_CORRECTION_GATINGS)
        if is_correction_mode == "clip" and (is_correction_level == "seq" or is_correction_gating != "ratio"):
            raise ValueError(f"{PREFIX}.is_correction_mode='clip' is invalid with is_correction_level="
                             f"{is_correction_level!r}, is_correction_gating={is_correction_gating!r}; allowed: "
                             "level 'token' and gating 'ratio' (as OpenRLHF)")
        if is_correction_gating != "ratio" and is_correction_level != "off" and is_correction_threshold[0] > 0:
            raise ValueError(f"{PREFIX}.is_correction_threshold={list(is_correction_threshold)!r} is invalid with "
                             f"is_correction_gating={is_correction_gating!r}; allowed: an upper bound only (low 0)")
        if dual_clip is not None and options.clip_level != "token":
            raise ValueError(f"{PREFIX}.dual_clip={dual_clip!r} is invalid with clip_level={options.clip_level!r}; "
                             "allowed: None (the dual clip caps token ratios: clip_level='token')")
        check_clip_bounds(clip_eps_low, clip_eps_high, options.clip_space,
                          (f"{PREFIX}.clip_eps_low", f"{PREFIX}.clip_eps_high"), dual_clip, f"{PREFIX}.dual_clip")
        self.options = options
        self.token_level_loss = token_level_loss
        self.policy_loss_type = policy_loss_type
        self.is_correction_options = (is_correction_level, is_correction_mode, is_correction_gating,
                                      tuple(is_correction_threshold))
        # OpenRLHF's sequence ratio (gspo) is not clamped, unlike verl's gspo (log s <= 10)
        self.region = TrustRegion.from_eps(options.clip_level, options.clip_space, clip_eps_low, clip_eps_high,
                                           dual_clip, max_log_seq_ratio=math.inf)

    def forward(
        self,
        log_probs: torch.Tensor,
        old_log_probs: torch.Tensor,
        advantages: torch.Tensor,
        action_mask: Optional[torch.Tensor] = None,
        rollout_log_probs: Optional[torch.Tensor] = None,
        dp_size: int = 1,
        batch_num_tokens: Optional[float] = None,
        global_batch_size: Optional[float] = None,
    ):
        """OpenRLHF's `PolicyLoss.forward`: `(B, T)` log-probs, advantages `(B, T)` (or `(B, 1)`), mask.

        Returns `(loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio)`: scalar tensors, the last two None
        unless `is_correction_level` is on (then `rollout_log_probs` `(B, T)` is needed)."""
        mask = torch.ones_like(log_probs, dtype=torch.bool) if action_mask is None else action_mask
        coef = vllm_kl = is_filter_ratio = None
        if self.is_correction_options[0] != "off":
            if rollout_log_probs is None:
                raise ValueError(f"{PREFIX}: is_correction_level={self.is_correction_options[0]!r} needs "
                                 "rollout_log_probs (the rollout engine's log-probs)")
            coef, vllm_kl, is_filter_ratio = is_correction(old_log_probs, rollout_log_probs, mask,
                                                           *self.is_correction_options)
        loss_mat, terms = loss_matrix(self.options, self.region, log_probs, old_log_probs, advantages, mask, coef)
        loss = aggregate_loss(loss_mat, mask, self.token_level_loss, dp_size, batch_num_tokens,
                              global_batch_size)
        n_tokens = terms.rows.n.sum()
        clip_ratio = (terms.clipped.sum() / n_tokens).float()  # float32, as OpenRLHF's
        ppo_kl = (-terms.log_ratio_sum / n_tokens).to(log_probs.dtype)
        return loss, clip_ratio, ppo_kl, vllm_kl, is_filter_ratio


def policy_loss_class(options: LossOptions):
    """The class the launcher puts in place of OpenRLHF's `PolicyLoss`: built with OpenRLHF's arguments (whose
    `policy_loss_type` is what OpenRLHF's parser accepted), it is `PowerMeanPolicyLoss` with `options`."""

    class InstalledPolicyLoss(PowerMeanPolicyLoss):
        def __init__(self, *args, policy_loss_type: str = "ppo", **kwargs):
            super().__init__(*args, policy_loss_type=options.loss_mode, options=options, **kwargs)

    InstalledPolicyLoss.__qualname__ = InstalledPolicyLoss.__name__ = "PolicyLoss"
    return InstalledPolicyLoss


def install() -> None:
    """Put `PowerMeanPolicyLoss` (options from the environment variable HMPO_OPENRLHF_LOSS) in place of OpenRLHF's
    `PolicyLoss` in this process: at once if `openrlhf.models.loss` is imported, else as soon as it is (before
    `openrlhf.models` takes the name). The launcher makes this Ray's `worker_process_setup_hook`, so it runs in
    every worker process before OpenRLHF's actors import their loss."""
    text = os.environ.get(OPTIONS_ENV)
    if not text:
        raise RuntimeError(f"hmpo_verl.openrlhf.install: the environment variable {OPTIONS_ENV} is not set; start "
                           "training with python -m hmpo_verl.openrlhf.train_ppo_ray, which sets it")
    from hmpo_verl.openrlhf._patch import patch_when_imported

    installed = policy_loss_class(LossOptions.from_json(text))
    patch_when_imported("openrlhf.models.loss", "PolicyLoss", installed)
    for importer in IMPORTERS:  # already imported here: their name is OpenRLHF's class
        if importer in sys.modules:
            setattr(sys.modules[importer], "PolicyLoss", installed)
