"""The power-mean losses in TRL: `PowerMeanGRPOConfig` and `PowerMeanGRPOTrainer` (thin adapter).

TRL's `loss_type` is a closed set; the supported way to add a loss is a `GRPOTrainer`
subclass overriding `_compute_loss`, as TRL's own `trl/experimental/gmpo/gmpo_trainer.py`
does. Only the loss changes: generation, rewards, advantages, reference model, vLLM and
logging are TRL's. Needs TRL >= 1.12 (`pip install "hmpo-verl[trl]"`; tested on 1.12.0 and 1.16.0,
whose `_compute_loss` is identical; beside verl 0.9.1, TRL < 1.13: the `verl-trl` extra); verl is
not imported.

    from hmpo_verl.hosts.trl import PowerMeanGRPOConfig, PowerMeanGRPOTrainer

    args = PowerMeanGRPOConfig(output_dir="out", power=-1.0)      # HMPO
    trainer = PowerMeanGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data)
    trainer.train()

The loss per token is the surrogate of `hmpo_verl.surrogate` (the same code as the verl
losses): -A_i * clip(s_i) with s_i the power mean (or AGM) of the token ratios, and an
exact gradient for every normalisation. TRL's contract (`_compute_loss` of TRL 1.12-1.16):
  * mask = completion_mask (x tool_mask when present); with `top_entropy_quantile < 1`
    the low-entropy tokens also leave the mean (as TRL's GMPO trainer does), while the
    normaliser still counts them (as TRL's loss types do). At power=1 / token clip that is
    exactly TRL's loss (tested); at clip_level="sequence" TRL keeps them in its sequence
    ratio and only drops their loss terms, so the two differ there (not pinned by a test);
  * old log-probs = `old_per_token_logps`, or the detached current ones when TRL skipped
    them (num_iterations == 1, on-policy);
  * with vLLM and `vllm_importance_sampling_correction`, TRL's `importance_sampling_ratio`
    ((B, T) or (B, 1)) multiplies each token's loss value and its own gradient term, as
    verl's `rollout_is_weights` in the verl losses. A (B, 1) ratio (TRL's sequence_* modes)
    gives exactly TRL's loss; a (B, T) one differs by design from TRL's sequence level,
    which scales the whole sequence's gradient by the row's mean ratio (tested);
  * `off_policy_mask_threshold`: TRL's own sequence mask multiplies the loss (given the advantages as
    TRL does: with (B, T) advantages each token is judged by its own A_t);
  * as in TRL (unlike verl's gspo), log s is not clamped at sequence level; TRL's `delta` caps the
    ratio before PPO's min: A > 0 tokens at min(1 + epsilon_high, delta), A < 0 tokens at
    max(1 + epsilon_high, delta) (tested, delta on both sides of 1 + epsilon_high);
  * `beta != 0`: TRL's per-token k3 KL to `ref_per_token_logps` is added per token,
    times the token ratio pi/pi_old with `use_bias_correction_kl` (TRL's default; the
    unbiased reverse-KL gradient). TRL's sequence level multiplies by the sequence ratio
    there instead: a by-design difference at clip_level="sequence" (tested);
  * the normalisation is TRL's, per `loss_type` (one of TRL's clipped-ratio types):
      grpo (default here)  per-sequence token mean, mean over sequences: each sequence's
                           gradient is A_i grad clip(s_i) / B, the sequence-level
                           objective of GSPO/GMPO/PMPO (and verl's seq-mean-token-mean,
                           our verl recipes' mode);
      bnpo                 token mean over the local batch;
      dr_grpo              sum / (B * max_completion_length);
      dapo                 sum / active tokens of the global accumulated batch (TRL's
                           default; weights each sequence by its length);
      luspo                per-sequence token sum, mean over sequences;
    all divided for gradient accumulation exactly as TRL does.
  * metrics in `self._metrics[mode]`: TRL's `entropy`, `kl` (beta != 0),
    `clip_ratio/low_mean`, `clip_ratio/high_mean`, `clip_ratio/region_mean`,
    `clip_ratio/low_min`, `clip_ratio/high_max`, `aux_loss` (MoE); and ours, as the verl
    losses' `actor/pm/...`: `pm/seq_ratio_mean`, `pm/log_ah_gap`, `pm/ess_frac`,
    `pm/dual_clip_mean` (tokens capped by `delta`), `pm/power`, `pm/power_min`,
    `pm/power_max` (power means), `pm/ess_target` (adapt="ess"), `pm/reward_mean` and
    `pm/clip_high` (adapt="reward": the batch's mean reward and the feedback-adaptive epsilon_high).

Not supported (a clear error at config construction): `loss_type` cispo / sapo / vespo
(other surrogates), `importance_sampling_level="sequence"` (the sequence ratio is the
power mean; `clip_level` chooses where to clip), the entropy bonus (`entropy_coef`,
`use_adaptive_entropy`), `delta` with `clip_level="sequence"`, and `use_liger_kernel` (TRL's
`compute_loss` then runs its Liger GRPO loss instead of `_compute_loss`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

try:
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer.utils import nanmax, nanmin
except ImportError as err:  # say which install brings it
    raise ImportError(
        f"hmpo_verl.trl needs TRL >= 1.12 ({err}): pip install 'hmpo-verl[trl]', or 'hmpo-verl[verl-trl]' beside verl"
    ) from err

from hmpo_verl.maths.adaptive import scheduled_power
from hmpo_verl.maths.aggregators import AGMAggregator, ESSMatchingAggregator, PowerAggregator
from hmpo_verl.guards.finite import check_kl_finite, check_surrogate_finite
from hmpo_verl.maths.options import (
    DEFAULTS,
    check_adaptive_options,
    check_choice,
    check_clip_bounds,
    check_mean_options,
    check_reward_adapt_options,
    check_unread_options,
)
from hmpo_verl.maths.reward_adaptive import RewardStats, feedback_adaptive_clip, reward_adaptive_power
from hmpo_verl.maths.surrogate import TrustRegion, surrogate_loss_matrix, surrogate_terms

PREFIX = "PowerMeanGRPOConfig"
MEANS = ("power", "agm")
ADAPT = (None, "ess", "schedule", "reward")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


def _option(name: str, help_text: str):
    """A config field defaulting to the shared table `hmpo_verl.maths.options.DEFAULTS`."""
    return field(default=DEFAULTS[name], metadata={"help": help_text})


@dataclass
class PowerMeanGRPOConfig(GRPOConfig):
    """A `trl.GRPOConfig` with the power-mean options (same names, values and errors as the verl configs).

    Clip bounds are TRL's: `epsilon` (low) and `epsilon_high`, in ratio space
    [1 - epsilon, 1 + epsilon_high] or, with clip_space="log", log-ratio space
    [-epsilon, epsilon_high] (GMPO uses 0.4); TRL's `delta` (INTELLECT-2's upper bound on
    the ratio, which acts on A < 0) is the token-level dual clip.
    """

    power: float = _option("power", "p of the power mean of the token ratios: 1 arithmetic, 0 geometric "
                           "(GSPO/GMPO), -1 harmonic (HMPO, default), +-inf max/min; any real number.")
    mean: str = field(
        default="power",
        metadata={"help": "'power' (the power mean M_p) or 'agm' (arithmetic-harmonic mean: limit sqrt(A*H))."},
    )
    agm_iters: Optional[int] = _option("agm_iters", "mean='agm': None = exact limit, k >= 0 = k arithmetic-harmonic "
                                                    "steps.")
    clip_level: str = _option("clip_level", "'token': each token's ratio clipped one-sidedly by sign(A) before the "
                                            "mean (GMPO/PMPO; p=1 is GRPO's clip); 'sequence': the mean clipped (GSPO).")
    clip_space: str = _option("clip_space", "'ratio': [1-epsilon, 1+epsilon_high]; 'log': [-epsilon, epsilon_high].")
    adapt: Optional[str] = field(
        default=None,  # not DEFAULTS["adapt"]: None means a fixed power here (TRL's config has no loss_mode)
        metadata={"help": "None: fixed power; 'ess': p per trajectory by clip-aware ESS matching (PMPO); "
                          "'schedule': p from p_start to p_end over schedule_steps optimizer steps (HolderPO)."},
    )
    p_min: float = _option("p_min", "adapt='ess': lowest p, in [-1e4, 0].")
    p_max: float = _option("p_max", "adapt='ess': highest p, in [0, 1e4].")
    sign_rule: str = _option("sign_rule", "adapt='ess': side of 0 searched: 'advantage', 'negative', 'positive'.")
    ess_target_min: float = _option("ess_target_min", "adapt='ess': target ESS/T of a trajectory with no clipped "
                                                      "token, in (0, 1].")
    schedule: str = _option("schedule", "adapt='schedule': 'linear' or 'cosine'.")
    p_start: float = _option("p_start", "adapt='schedule': p at optimizer step 0.")
    p_end: float = _option("p_end", "adapt='schedule': p from schedule_steps on.")
    schedule_steps: int = _option("schedule_steps", "adapt='schedule': optimizer steps (>= 1).")
    reward_gamma: float = _option("reward_gamma", "adapt='reward' (APMPO arXiv 2605.04066): p = exp(-reward_gamma "
                                                  "* mean reward).")
    feedback_clip: bool = _option("feedback_clip", "adapt='reward': epsilon_high = feedback_clip_min + "
                                                   "(feedback_clip_max - feedback_clip_min) * tanh(mean reward / "
                                                   "(reward std + feedback_delta)).")
    feedback_clip_min: float = _option("feedback_clip_min", "adapt='reward': lowest adaptive epsilon_high.")
    feedback_clip_max: float = _option("feedback_clip_max", "adapt='reward': highest adaptive epsilon_high.")
    feedback_delta: float = _option("feedback_delta", "adapt='reward': delta of the stability score (> 0).")
    loss_type: str = field(
        default="grpo",
        metadata={"help": "TRL's normalisation: 'grpo' (default: per-sequence mean, the sequence-level objective), "
                          "'bnpo', 'dr_grpo', 'dapo', 'luspo'."},
    )

    def __post_init__(self):
        check_pm_options(self)
        super().__post_init__()


def check_pm_options(args) -> None:
    """Validate the power-mean options of a `PowerMeanGRPOConfig` (or any object with its fields)."""
    check_mean_options(PREFIX, args.power, args.clip_level, args.clip_space, args.agm_iters)
    check_choice(PREFIX, "mean", args.mean, MEANS)
    check_choice(PREFIX, "adapt", args.adapt, ADAPT)
    if args.adapt is not None:
        if args.mean != "power":
            raise ValueError(f"{PREFIX}.mean={args.mean!r} is invalid with adapt={args.adapt!r}; allowed: power")
        check_adaptive_options(
            PREFIX, args.adapt, args.p_min, args.p_max, args.sign_rule, args.ess_target_min, args.schedule,
            args.p_start, args.p_end, args.schedule_steps, args.clip_level, schedule_allowed=True,
        )
    if args.adapt == "reward":
        check_reward_adapt_options(PREFIX, args.reward_gamma, args.feedback_clip, args.feedback_clip_min,
                                   args.feedback_clip_max, args.feedback_delta, args.clip_level, args.clip_space)
    chosen = f"adapt={args.adapt!r}" if args.adapt is not None else f"mean={args.mean!r}"
    check_unread_options(PREFIX, args, args.adapt or args.mean, chosen)
    check_choice(PREFIX, "loss_type", args.loss_type, LOSS_TYPES)
    check_choice(PREFIX, "importance_sampling_level", args.importance_sampling_level, ("token",))
    check_clip_bounds(args.epsilon, _epsilon_high(args), args.clip_space,
                      (f"{PREFIX}.epsilon", f"{PREFIX}.epsilon_high"), args.delta, f"{PREFIX}.delta")
    if args.delta is not None and args.clip_level != "token":
        raise ValueError(f"{PREFIX}.delta={args.delta!r} is invalid with clip_level='sequence'; allowed: None "
                         "(delta is the token-level dual clip)")
    if getattr(args, "use_liger_kernel", False):  # TRL's compute_loss then runs compute_liger_loss, not _compute_loss
        raise ValueError(f"{PREFIX}.use_liger_kernel=True is invalid; allowed: False (TRL's GRPOTrainer then "
                         "computes its own Liger GRPO loss instead of the power-mean one)")
    if args.entropy_coef != 0.0 or args.use_adaptive_entropy:
        raise ValueError(f"{PREFIX}.entropy_coef={args.entropy_coef!r}, use_adaptive_entropy="
                         f"{args.use_adaptive_entropy!r} are invalid; allowed: 0.0, False (PowerMeanGRPOTrainer "
                         "has no entropy bonus)")


def _epsilon_high(args) -> float:
    """TRL's upper epsilon: epsilon_high, defaulting to epsilon."""
    return args.epsilon if args.epsilon_high is None else args.epsilon_high


def reward_epsilon_high(args, reward_stats: Optional[RewardStats]) -> Optional[float]:
    """adapt='reward' with feedback_clip: APMPO's adaptive epsilon_high for the batch's rewards, else None."""
    if args.adapt != "reward" or not args.feedback_clip:
        return None
    return feedback_adaptive_clip(reward_stats, args.feedback_clip_min, args.feedback_clip_max, args.feedback_delta)


def trust_region(args, reward_stats: Optional[RewardStats] = None) -> TrustRegion:
    """Clip bounds from TRL's epsilon / epsilon_high / delta and our clip level and space, with TRL's
    conventions: delta caps the ratio before PPO's min (so A > 0 tokens at min(1 + epsilon_high, delta),
    A < 0 tokens at max(1 + epsilon_high, delta)), and log s is not clamped at sequence level (verl's
    gspo clamps it at 10). Under adapt='reward' epsilon_high is the feedback-adaptive one."""
    high = reward_epsilon_high(args, reward_stats)
    return TrustRegion.from_eps(args.clip_level, args.clip_space, args.epsilon,
                                _epsilon_high(args) if high is None else high, args.delta,
                                trl_delta=True, max_log_seq_ratio=math.inf)


def make_aggregator(args, step: int, advantages: torch.Tensor, mask: torch.Tensor,
                    reward_stats: Optional[RewardStats] = None):
    """The sequence-ratio aggregator of `args` at optimizer step `step` (`hmpo_verl.aggregators`);
    adapt='reward' needs the generation batch's `reward_stats`."""
    if args.mean == "agm":
        return AGMAggregator(args.agm_iters)
    if args.adapt == "ess":
        return ESSMatchingAggregator(args, advantages, mask)
    if args.adapt == "reward":
        return PowerAggregator(reward_adaptive_power(reward_stats.mean, args.reward_gamma))
    if args.adapt == "schedule":
        return PowerAggregator(scheduled_power(step, args.p_start, args.p_end, args.schedule_steps, args.schedule))
    return PowerAggregator(args.power)


def normalise(per_token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str, trainer, inputs, mode: str):
    """TRL's aggregation (1.12-1.16) of a per-token loss `(B, T)` for `loss_type`, incl. gradient accumulation."""
    accumulation = trainer.current_gradient_accumulation_steps if mode == "train" else 1.0
    masked = per_token_loss * mask
    if loss_type == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0) / accumulation
    if loss_type == "dr_grpo":
        return masked.sum() / (per_token_loss.size(0) * trainer.max_completion_length) / accumulation
    if loss_type == "dapo":
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / trainer.accelerator.num_processes
        if mode == "train":
            normalizer = normalizer * trainer.current_gradient_accumulation_steps / trainer.args.steps_per_generation
        return masked.sum() / normalizer
    if loss_type == "luspo":
        return masked.sum(-1).mean() / accumulation
    raise ValueError(f"{PREFIX}.loss_type={loss_type!r} is invalid; allowed: {', '.join(LOSS_TYPES)}")


class PowerMeanGRPOTrainer(GRPOTrainer):
    """`trl.GRPOTrainer` whose loss is the clipped power-mean (or AGM) sequence-ratio surrogate.

    Args: those of `trl.GRPOTrainer`; `args` must be a `PowerMeanGRPOConfig` (default: one
    with `output_dir="<model>-PowerMean"`).
    """

    _tag_names = ["trl", "grpo", "hmpo"]
    _pm_reward_stats: Optional[dict] = None  # mode ("train" / "eval") -> its generation batch's, adapt='reward'

    def __init__(self, model, reward_funcs, args: Optional[PowerMeanGRPOConfig] = None, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = PowerMeanGRPOConfig(f"{str(name).split('/')[-1]}-PowerMean")
        if not isinstance(args, PowerMeanGRPOConfig):
            raise TypeError(f"PowerMeanGRPOTrainer needs args=PowerMeanGRPOConfig(...), got {type(args).__name__}")
        super().__init__(model, reward_funcs, args=args, **kwargs)

    def _generate_and_score_completions(self, inputs):
        """TRL's, then (adapt='reward') the generation batch's reward mean and std, as TRL logs them: over
        every process's rewards (`reward`, `reward_std` of its metrics), for the loss steps on this batch."""
        output = super()._generate_and_score_completions(inputs)
        if self.args.adapt == "reward":
            # per mode: TRL buffers a training generation for steps_per_generation x num_iterations steps, and an
            # evaluation between them must not hand its batch's statistics to the training steps left
            mode = "train" if self.model.training else "eval"
            metrics = self._metrics[mode]
            self._pm_reward_stats = {**(self._pm_reward_stats or {}),
                                     mode: RewardStats(metrics["reward"][-1], metrics["reward_std"][-1])}
        return output

    def _reward_stats(self, mode: str) -> Optional[RewardStats]:
        """The reward statistics of the generation batch ``mode``'s loss steps train on (adapt='reward')."""
        return (self._pm_reward_stats or {}).get(mode)

    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            completion_ids.size(1),
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            pixel_values=inputs.get("pixel_values"),
            image_grid_thw=inputs.get("image_grid_thw"),
            num_images=inputs.get("num_images"),
            pixel_attention_mask=inputs.get("pixel_attention_mask"),
            spatial_shapes=inputs.get("spatial_shapes"),
            num_tiles=inputs.get("num_tiles"),
            image_sizes=inputs.get("image_sizes"),
            token_type_ids=inputs.get("token_type_ids"),
            mm_token_type_ids=inputs.get("mm_token_type_ids"),
            image_position_ids=inputs.get("image_position_ids"),
        )
        mode = "train" if self.model.training else "eval"
        loss, per_token_kl, terms, aggregate = self._power_mean_loss(
            per_token_logps, entropies, mask, inputs, mode
        )
        if self.aux_loss_enabled:
            normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            loss = loss + self.router_aux_loss_coef * aux_loss / normalizer
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        self._log_power_mean_metrics(mode, mask, entropies, per_token_kl, terms, aggregate)
        return loss

    def _power_mean_loss(self, per_token_logps, entropies, mask, inputs, mode):
        """Returns the loss (scalar, normalised as TRL's `loss_type`), the KL `(B, T)` or None, the surrogate
        terms and the aggregator."""
        args = self.args
        B, T = per_token_logps.shape
        advantages = inputs["advantages"]
        advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages  # (B, 1) or (B, T), as TRL
        adv_bt = advantages.expand(B, T)
        old = inputs.get("old_per_token_logps")
        old = per_token_logps.detach() if old is None else old
        valid = mask.to(torch.bool)
        if self.top_entropy_quantile < 1.0:  # low-entropy tokens leave the mean (GMPO's trainer)
            valid = valid & self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile).to(torch.bool)
        is_weights = None
        if self.use_vllm and self.vllm_importance_sampling_correction:
            is_weights = inputs["importance_sampling_ratio"].expand(B, T)
        with torch.no_grad():
            aggregate = make_aggregator(args, self.state.global_step, adv_bt, valid, self._reward_stats(mode))
            terms = surrogate_terms(per_token_logps, old, adv_bt, valid, aggregate,
                                    trust_region(args, self._reward_stats(mode)), is_weights)
            check_surrogate_finite(terms, {"per_token_logps": per_token_logps, "old_per_token_logps": old,
                                           "advantages": adv_bt, "importance_sampling_ratio": is_weights},
                                   "completion_mask")
        per_token_loss = surrogate_loss_matrix(per_token_logps, terms)
        if self.off_policy_mask_threshold is not None:
            sampling = inputs.get("sampling_per_token_logps", old)
            per_token_loss = per_token_loss * self.get_off_policy_mask(
                advantages=advantages, per_token_logps=per_token_logps, sampling_per_token_logps=sampling,
                mask=mask, off_policy_threshold=self.off_policy_mask_threshold,
            )
        per_token_kl = None
        if self.beta != 0.0:  # TRL's k3 estimator; masked positions (any value) give 0 and no gradient
            in_mask = mask.to(torch.bool)
            ref_minus_logp = torch.where(in_mask, inputs["ref_per_token_logps"] - per_token_logps, 0.0)
            per_token_kl = torch.exp(ref_minus_logp) - ref_minus_logp - 1
            if args.use_bias_correction_kl:
                per_token_kl = per_token_kl * torch.exp(torch.where(in_mask, per_token_logps - old, 0.0))
            read = {"ref_per_token_logps": inputs["ref_per_token_logps"], "per_token_logps": per_token_logps,
                    "old_per_token_logps": old if args.use_bias_correction_kl else None}
            check_kl_finite(per_token_kl, in_mask, read, f"beta={self.beta}")
            per_token_loss = per_token_loss + self.beta * per_token_kl
        loss = normalise(per_token_loss, mask, args.loss_type, self, inputs, mode)
        return loss, per_token_kl, terms, aggregate

    def _log_power_mean_metrics(self, mode, mask, entropies, per_token_kl, terms, aggregate):
        """TRL's loss metrics, and ours under pm/ (means over the processes' tokens or sequences)."""
        metrics = self._metrics[mode]
        reduce = self.accelerator.reduce
        maskf = mask.to(entropies.dtype)

        def token_mean(x):
            totals = reduce(torch.stack([torch.where(mask.bool(), x, 0.0).sum(), maskf.sum()]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        n = terms.rows.n
        rows = n > 0

        def row_mean(x):
            x = x.detach().double()
            totals = reduce(torch.stack([torch.where(rows, x, 0.0).sum(), rows.sum().double()]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        if per_token_kl is not None:
            metrics["kl"].append(token_mean(per_token_kl.detach()))
        metrics["entropy"].append(token_mean(entropies.detach()))

        def token_fraction(count):  # a per-row count of tokens over the processes' mask tokens
            totals = reduce(torch.stack([count.sum().to(maskf.dtype), maskf.sum()]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        low, high = terms.clipped_low.to(maskf.dtype), terms.clipped_high.to(maskf.dtype)  # (B,) counts
        if self.args.clip_level == "sequence":  # one flag per sequence over every row (empty ones too), as TRL
            low_frac, high_frac = (low > 0).to(maskf.dtype), (high > 0).to(maskf.dtype)

            def batch_mean(x):
                totals = reduce(torch.stack([x.sum(), torch.tensor(float(x.shape[0]), dtype=x.dtype)]), reduction="sum")
                return (totals[0] / totals[1].clamp(min=1.0)).item()

            metrics["clip_ratio/low_mean"].append(batch_mean(low_frac))
            metrics["clip_ratio/high_mean"].append(batch_mean(high_frac))
            metrics["clip_ratio/region_mean"].append(batch_mean(low_frac + high_frac))
        else:
            low_frac, high_frac = low / maskf.sum(-1), high / maskf.sum(-1)
            metrics["clip_ratio/low_mean"].append(token_fraction(low))
            metrics["clip_ratio/high_mean"].append(token_fraction(high))
            metrics["clip_ratio/region_mean"].append(token_fraction(low + high))
        metrics["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(low_frac)).item())
        metrics["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(high_frac)).item())

        with torch.no_grad():
            metrics["pm/seq_ratio_mean"].append(row_mean(terms.seq_ratio_for_metrics))
            metrics["pm/log_ah_gap"].append(row_mean(terms.log_ah_gap))
            metrics["pm/ess_frac"].append(row_mean(terms.ess / n.clamp(min=1)))
            metrics["pm/dual_clip_mean"].append(token_fraction(terms.dual_clipped))
            if aggregate.power is not None:
                power = torch.where(rows, aggregate.power.double(), math.nan)
                metrics["pm/power"].append(row_mean(aggregate.power))
                metrics["pm/power_min"].append(nanmin(self.accelerator.gather(power)).item())
                metrics["pm/power_max"].append(nanmax(self.accelerator.gather(power)).item())
            if getattr(aggregate, "target", None) is not None:
                metrics["pm/ess_target"].append(row_mean(aggregate.target))
            if self.args.adapt == "reward":
                metrics["pm/reward_mean"].append(self._reward_stats(mode).mean)
                high = reward_epsilon_high(self.args, self._reward_stats(mode))
                if high is not None:
                    metrics["pm/clip_high"].append(high)
