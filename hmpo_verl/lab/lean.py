"""The lean RL loop of the study: a directly driven HF model trained with verl's own losses.

verl's full trainer costs about a minute of start-up (Ray, workers, weight sync) plus
seconds of overhead per step on this CPU, so a powered sweep (13 methods x 4 regimes x
>= 5 seeds) cannot run on it in the study's budget. This loop keeps everything that
decides *what update is computed* and drops the machinery around it:

* sampling: batched, KV-cached decoding of left-padded prompts with a seeded
  ``torch.Generator`` (temperature 1, as the ``hf`` rollout server of ``patches/verl_cpu``),
  in fp32 or -- for the ``bf16`` mismatch -- with a bf16 copy of the weights whose
  log-probs (log-softmax of its bf16 logits, in fp32) are the *reported* rollout log-probs,
  as vLLM reports them while the FSDP trainer computes in fp32;
* advantages: verl's estimators, dispatched as ``verl.trainer.ppo.ray_trainer.compute_advantage``
  does (``grpo`` -> ``compute_grpo_outcome_advantage``, anything else -> ``get_adv_estimator_fn``,
  which holds our ``power_mean``/``agm`` once ``hmpo_verl`` is imported);
* rollout correction: verl's ``compute_rollout_correction_and_rejection_mask`` (decoupled
  mode: IS weights pi_old / pi_rollout, truncated at the threshold);
* the loss: exactly verl's registered policy loss (``get_policy_loss_fn(loss_mode)``) on a
  real ``ActorConfig``, with ``global_batch_info`` filled as ``verl.workers.utils.losses.ppo_loss``
  fills it (one data-parallel rank, one micro-batch per mini-batch), so verl's ``agg_loss``
  normalises by the mini-batch's tokens / sequences;
* the update: AdamW (verl's defaults: betas 0.9/0.999, weight decay from the recipe),
  gradient-norm clipping, and -- as verl's actor -- no step when the norm is not finite;
  ``ppo_epochs`` x ``mini_batches`` updates per rollout, mini-batches in order (verl's
  ``shuffle: false``).

Everything is paired by seed: seed k fixes the initial model (the task's warm start), the
data order and the sampling stream of every step (a generator seeded by (k, step)), for
every method and regime. The evaluation after each step is exact (:func:`expected_reward`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

# ----------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    """One training method: verl's loss and advantage estimator with their settings.

    actor: ``ActorConfig`` fields (clip ranges, aggregation, SAPO temperatures ...).
    policy_loss: fields of the policy-loss config; ``policy_loss_class`` picks verl's
    ``PolicyLossConfig`` ("verl") or ours ("power_mean", "adaptive").
    adv_estimator / algo: verl's ``algorithm.adv_estimator`` and our estimator's fields.
    rollout_is: verl's rollout correction, ``rollout_is=token`` with this threshold (decoupled mode).
    trainer_overrides: the same method as Hydra overrides for verl's real trainer.
    """

    name: str
    loss_mode: str
    note: str
    actor: tuple[tuple[str, Any], ...] = ()
    policy_loss: tuple[tuple[str, Any], ...] = ()
    policy_loss_class: str = "verl"
    adv_estimator: str = "grpo"
    algo: tuple[tuple[str, Any], ...] = ()
    rollout_is_threshold: float | None = None
    trainer_overrides: tuple[str, ...] = ()

    def settings(self) -> str:
        """The method's settings in one line, for the report."""
        parts = [f"loss_mode={self.loss_mode}"]
        parts += [f"{k}={v}" for k, v in self.actor]
        parts += [f"policy_loss.{k}={v}" for k, v in self.policy_loss]
        parts.append(f"adv_estimator={self.adv_estimator}")
        parts += [f"algorithm.{k}={v}" for k, v in self.algo]
        if self.rollout_is_threshold is not None:
            parts.append(f"rollout_correction.rollout_is=token, rollout_is_threshold={self.rollout_is_threshold}")
        return ", ".join(parts)


_PL = "actor_rollout_ref.actor.policy_loss"
_A = "actor_rollout_ref.actor"

METHODS = (
    Method("vanilla", "vanilla", "GRPO baseline: verl's vanilla PPO-clip loss, token ratio clip 0.2, dual clip 3"),
    Method("gspo", "gspo", "GSPO (arXiv 2507.18071): geometric-mean sequence ratio, sequence clip 3e-4/4e-4",
           actor=(("clip_ratio_low", 3e-4), ("clip_ratio_high", 4e-4)),
           trainer_overrides=(f"{_A}.clip_ratio_low=3e-4", f"{_A}.clip_ratio_high=4e-4")),
    Method("geo_mean", "geo_mean", "GMPO (arXiv 2507.20673): geometric mean of token ratios, token log-clip +-0.4",
           actor=(("clip_ratio_low", 0.4), ("clip_ratio_high", 0.4))),
    Method("sapo", "sapo", "SAPO (arXiv 2511.20347): soft sigmoid gate, tau_pos 1.0, tau_neg 1.05 (paper / verl defaults)",
           actor=(("tau_pos", 1.0), ("tau_neg", 1.05))),
    Method("dppo_tv", "dppo_tv", "DPPO-Binary-TV (arXiv 2602.04879): TV threshold 0.15, TIS cap 10000 (verl's example)",
           actor=(("clip_ratio", 0.15), ("clip_ratio_low", 0.15), ("clip_ratio_high", 0.15), ("clip_ratio_c", 10000.0))),
    Method("cispo", "cispo", "CISPO (arXiv 2506.13585): clipped, stop-gradient IS weight, upper cap 1.2 (verl's example: low 10, high 0.2)",
           actor=(("clip_ratio_low", 10.0), ("clip_ratio_high", 0.2))),
    Method("vanilla_rc", "vanilla", "vanilla + verl's rollout correction: rollout_is=token, threshold 2 (decoupled: old log-probs recomputed by the trainer)",
           rollout_is_threshold=2.0),
    Method("hmpo", "hmpo", "ours: harmonic mean of token ratios (p = -1), token clip 0.2",
           policy_loss_class="power_mean"),
    Method("pm_p0", "power_mean", "ours: power mean p = 0 (geometric) with PPO's token ratio clip 0.2",
           policy_loss=(("power", 0.0),), policy_loss_class="power_mean",
           trainer_overrides=(f"{_PL}._target_=hmpo_verl.PowerMeanLossConfig", f"+{_PL}.power=0.0")),
    Method("pm_p0.5", "power_mean", "ours: power mean p = 0.5, token clip 0.2",
           policy_loss=(("power", 0.5),), policy_loss_class="power_mean",
           trainer_overrides=(f"{_PL}._target_=hmpo_verl.PowerMeanLossConfig", f"+{_PL}.power=0.5")),
    Method("pm_p-2", "power_mean", "ours: power mean p = -2, token clip 0.2",
           policy_loss=(("power", -2.0),), policy_loss_class="power_mean",
           trainer_overrides=(f"{_PL}._target_=hmpo_verl.PowerMeanLossConfig", f"+{_PL}.power=-2.0")),
    Method("agm", "agm", "ours: arithmetic-harmonic mean (exact limit sqrt(A*H)), token clip 0.2",
           policy_loss_class="power_mean"),
    Method("adaptive", "adaptive_power_mean", "ours: p per trajectory by clip-aware ESS matching (defaults: p in [-2, 1], ESS target 0.99)",
           policy_loss_class="adaptive"),
    Method("apmpo", "adaptive_power_mean", "APMPO (arXiv 2605.04066): one p = exp(-0.8 x batch mean reward), token clip "
           "[1 - 0.2, 1 + eps] with eps from 0.2 to 0.4 by the rewards' stability (adapt: reward)",
           policy_loss=(("adapt", "reward"),), policy_loss_class="adaptive"),
    Method("pm_adv", "vanilla", "ours: vanilla loss, power-mean (free-energy) advantage, beta = 2 (RS-GRPO arXiv 2509.24261)",
           adv_estimator="power_mean", algo=(("risk_beta", 2.0),),
           trainer_overrides=("algorithm.adv_estimator=power_mean", "algorithm._target_=hmpo_verl.PowerMeanAlgoConfig",
                              "+algorithm.risk_beta=2.0")),
    Method("agm_adv", "vanilla", "ours: vanilla loss, AGM advantage, beta = 1",
           adv_estimator="agm", algo=(("risk_beta", 1.0),),
           trainer_overrides=("algorithm.adv_estimator=agm", "algorithm._target_=hmpo_verl.PowerMeanAlgoConfig",
                              "+algorithm.risk_beta=1.0")),
)
METHODS_BY_NAME = {m.name: m for m in METHODS}
BASELINE = "vanilla"


# ----------------------------------------------------------------------------- regimes


@dataclass(frozen=True)
class Noise:
    """Simulated training-inference mismatch added to the *reported* rollout log-probs.

    ``contaminated``: Tukey's contaminated normal -- each token's noise is N(0, sd^2) with
    probability 1 - rate and N(0, spike_sd^2) with probability ``rate``: most tokens tiny,
    a few large (the shape of vLLM-vs-trainer log-prob gaps, where a rare token whose
    logits nearly tie moves a lot). ``gaussian``: N(0, sd^2), what the trainer's ``hf``
    rollout server can add (``VERL_CPU_LOGPROB_NOISE_STD``).
    """

    kind: str
    sd: float
    spike_sd: float = 0.0
    rate: float = 0.0

    def sample(self, shape, generator: torch.Generator) -> torch.Tensor:
        base = self.sd * torch.randn(shape, generator=generator)
        if self.kind == "gaussian":
            return base
        if self.kind != "contaminated":
            raise ValueError(f"Noise.kind={self.kind!r} is invalid; allowed: 'gaussian', 'contaminated'")
        spike = self.spike_sd * torch.randn(shape, generator=generator)
        hit = torch.rand(shape, generator=generator) < self.rate
        return torch.where(hit, spike, base)

    def describe(self) -> str:
        if self.kind == "gaussian":
            return f"Gaussian N(0, {self.sd}^2)"
        return f"contaminated normal: N(0, {self.sd}^2) w.p. {1 - self.rate:g}, N(0, {self.spike_sd}^2) w.p. {self.rate:g}"


@dataclass(frozen=True)
class Regime:
    """How far the data are from the policy being trained.

    mini_batches x epochs updates per rollout; ``sample_dtype`` of the sampling weights;
    ``noise`` on the reported log-probs; ``bypass``: the reported log-probs are the
    behaviour policy (verl's ``rollout_correction.bypass_mode=true``), else the trainer
    recomputes them (verl's default, decoupled mode) and the mismatch reaches the loss only
    through rollout correction. ``lag``: the sampler's parameters are ``lag`` updates older
    than the trainer's (the staleness of verl's one-step-off / fully-async trainers; the
    first ``lag`` steps sample with the initial parameters, as an async run starts).
    ``model``: ``dense`` (the task's Qwen2) or ``moe`` (:mod:`hmpo_verl.lab.moe`);
    ``routing_replay``: the trainer's forwards reuse the sampler's experts (verl's R3).
    ``rollouts_per_step``: fresh rollouts per step, one update each (the control of
    ``epochs``: as many optimizer steps, all on-policy).
    """

    name: str
    note: str
    mini_batches: int = 1
    epochs: int = 1
    sample_dtype: str = "fp32"
    noise: Noise | None = None
    bypass: bool = False
    lag: int = 0
    model: str = "dense"
    routing_replay: bool = False
    rollouts_per_step: int = 1

    @property
    def updates_per_step(self) -> int:
        return self.mini_batches * self.epochs * self.rollouts_per_step

    def trainer_overrides(self, settings: "LoopSettings") -> list[str]:
        """The same schedule on verl's real trainer: ``mini_batches`` PPO mini-batches of the step's
        prompts, one micro-batch each, ``epochs`` epochs, and bypass mode when the regime has it."""
        a = "actor_rollout_ref.actor"
        prompts = settings.prompts_per_step // self.mini_batches
        return [f"{a}.ppo_mini_batch_size={prompts}", f"{a}.ppo_epochs={self.epochs}",
                f"{a}.ppo_micro_batch_size_per_gpu={prompts * settings.n}",
                f"algorithm.rollout_correction.bypass_mode={str(self.bypass).lower()}"]

    def trainer_env(self) -> dict[str, str]:
        """The same sampling precision and reported-log-prob noise for the trainer's ``hf`` rollout
        server (``patches/verl_cpu``, ``verl_cpu.rollout.server``)."""
        env = {"VERL_CPU_ROLLOUT_DTYPE": {"fp32": "float32", "bf16": "bfloat16"}[self.sample_dtype]}
        if self.noise is not None:
            env["VERL_CPU_LOGPROB_NOISE_STD"] = str(self.noise.sd)
            if self.noise.kind == "contaminated":
                env["VERL_CPU_LOGPROB_NOISE_SPIKE_STD"] = str(self.noise.spike_sd)
                env["VERL_CPU_LOGPROB_NOISE_SPIKE_RATE"] = str(self.noise.rate)
        return env


HEAVY_NOISE = Noise("contaminated", sd=0.02, spike_sd=0.5, rate=0.02)
# lag in trainer steps (parameter versions, as verl's fully-async staleness), each step ASYNC_MINI_BATCHES
# updates (ppo_mini_batch_size = a quarter of the step's prompts): rollouts k steps old are 4k..4k+3 updates old
ASYNC_LAGS = (0, 1, 2, 4)
ASYNC_MINI_BATCHES = 4
PPO_EPOCHS = 4

REGIMES = (
    Regime("on_policy", "1 update per rollout, old log-probs recomputed by the trainer: every update starts at ratio 1"),
    Regime("stale", "2 mini-batches = 2 updates per rollout (the second off-policy); with 4 per rollout at this lr "
           "nearly every run of every method collapsed in the study's first version, which can show no difference",
           mini_batches=2),
    Regime("mismatch", "sampled in bf16, reported bf16 log-probs + heavy-tailed noise are the behaviour policy "
           "(bypass mode), 1 update per rollout", sample_dtype="bf16", noise=HEAVY_NOISE, bypass=True),
    Regime("stressed", "stale (2 updates per rollout) + the mismatch regime's bf16 sampling and heavy-tailed noise, bypass",
           mini_batches=2, sample_dtype="bf16", noise=HEAVY_NOISE, bypass=True),
    Regime("bf16", "sampled in bf16, its log-probs are the behaviour policy (bypass), no added noise, 1 update per rollout "
           "(measures whether the real bf16 mismatch alone matters)", sample_dtype="bf16", bypass=True),
    *(Regime(f"async_{k}", (f"sampled by the parameters {k} trainer step{'s' * (k > 1)} old" if k else
                             "synchronous: sampled by the current parameters") +
             f" (fp32), {ASYNC_MINI_BATCHES} PPO mini-batches = {ASYNC_MINI_BATCHES} updates per step; the sampler's "
             "log-probs are the behaviour policy (bypass, as verl's fully-async trainer)",
             lag=k, mini_batches=ASYNC_MINI_BATCHES, bypass=True)
      for k in ASYNC_LAGS),
    Regime("moe_bf16", "the MoE model sampled in bf16 and trained in fp32: precision and routing flips; the sampler's "
           "log-probs are the behaviour policy (bypass), 1 update per rollout", sample_dtype="bf16", bypass=True,
           model="moe"),
    Regime("moe_replay", "moe_bf16 with routing replay: the trainer's forwards reuse the sampler's experts (verl's R3), "
           "the gate weights its own", sample_dtype="bf16", bypass=True, model="moe", routing_replay=True),
    *(Regime(f"moe{e}_top1", f"a MoE of {e} experts with top-1 routing (study v4's gap regime), sampled in bf16 and "
             "trained in fp32: routing flips without staleness; the sampler's log-probs are the behaviour policy "
             "(bypass), no routing replay, 1 update per rollout", sample_dtype="bf16", bypass=True, model=f"moe{e}")
      for e in (16, 32)),
    Regime(f"epochs_{PPO_EPOCHS}", f"{PPO_EPOCHS} PPO epochs over each rollout (one mini-batch; old log-probs recomputed "
           "once, before the first)", epochs=PPO_EPOCHS),
    Regime(f"fresh_{PPO_EPOCHS}", f"control of epochs_{PPO_EPOCHS}: {PPO_EPOCHS} fresh rollouts per step, one on-policy "
           "update each (as many optimizer steps, no reuse)", rollouts_per_step=PPO_EPOCHS),
)
REGIMES_BY_NAME = {r.name: r for r in REGIMES}


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class LoopSettings:
    """Shared hyper-parameters (those of ``recipes/cpu_tiny``: lr 1e-3, clip 0.2, seq-mean-token-mean)."""

    prompts_per_step: int = 8
    n: int = 8  # responses per prompt (GRPO group)
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    loss_agg_mode: str = "seq-mean-token-mean"
    clip_ratio: float = 0.2
    norm_adv_by_std_in_grpo: bool = True
    max_response_length: int = 64
    eval_prompts: int = 64  # test prompts of the exact evaluation (all of them when fewer)


# ----------------------------------------------------------------------------- task


@dataclass
class Task:
    """What the loop needs of a task: the warm-started model(s), prompts with answers, a reward.

    ``train`` holds only prompts that are not in ``test``: the test prompts are held out from
    RL training (the warm start, a supervised fit on random problems, has seen every prompt,
    as pretraining would). ``train_eval``: the first distinct training prompts, as many as the
    test set, for the training-prompt evaluation. ``model_paths``: ``dense`` and, when loaded,
    ``moe``.
    """

    name: str
    model_paths: dict[str, str]
    train: list[tuple[list[int], str]]  # (prompt token ids, ground truth)
    test: list[tuple[list[int], str]]
    reward: Callable[[str, str], float]
    tokenizer: Any
    max_response_length: int
    data_source: str = ""
    assets: Any = None  # the task's TaskPaths (model, train_parquet, test_parquet)
    train_eval: list[tuple[list[int], str]] = field(default_factory=list)

    @property
    def model_path(self) -> str:
        return self.model_paths["dense"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def heldout_split(train: list, test: list) -> tuple[list, list]:
    """(training rows whose prompt is not a test prompt, the first distinct ones of them, as many as ``test``)."""
    held = {tuple(p) for p, _ in test}
    kept = [row for row in train if tuple(row[0]) not in held]
    distinct = list({tuple(p): (p, t) for p, t in kept}.values())
    return kept, distinct[: len(test)]


def asset_dirs(name: str, assets_root=None) -> dict:
    """The folders :func:`load_task` builds task ``name``'s assets in (nothing is built here): ``dense``, the
    task's own (``assets_root/name``, default the task's folder), and ``moe``, its MoE model (fibonacci only;
    ``assets_root/<name>_moe``, default ``moe.ASSETS_DIR``)."""
    from pathlib import Path

    from hmpo_verl.lab import moe as moe_lab
    from hmpo_verl.lab.tasks import get_task

    if assets_root is None:
        return {"dense": get_task(name).default_assets, "moe": moe_lab.default_assets()}
    return {"dense": Path(assets_root) / name, "moe": Path(assets_root) / f"{name}_moe"}


def recipe_max_response_length(name: str) -> int:
    """Task ``name``'s response-length cap in its verl recipe (``data.max_response_length``)."""
    import yaml

    from hmpo_verl.lab.tasks import get_task

    task = get_task(name)
    return int(yaml.safe_load((task.recipe_dir / f"{task.recipe_name}.yaml").read_text())["data"]["max_response_length"])


def load_task(name: str, assets_root=None, max_response_length: int | None = None, log=print,
              moe: bool = False, assets_dir=None) -> Task:
    """Build (if missing) and load a task of :mod:`hmpo_verl.lab.tasks` (assets under ``assets_root/name``,
    or in ``assets_dir`` itself when given; default: the task's own folder, shared with ``cpu_demo``).
    The response-length cap defaults to the task's verl recipe (``data.max_response_length``), so the
    lean loop and the trainer sample alike.
    ``moe``: also build/load the task's MoE model (:mod:`hmpo_verl.lab.moe`; fibonacci only)."""
    import importlib

    import pandas as pd
    from transformers import AutoTokenizer

    from hmpo_verl.lab.tasks import REWARD_MODULE, get_task

    task = get_task(name)
    dirs = asset_dirs(name, assets_root)
    paths = task.prepare_assets(dirs["dense"] if assets_dir is None else assets_dir, log=log)
    compute_score = getattr(importlib.import_module(REWARD_MODULE), task.reward_name)
    tokenizer = AutoTokenizer.from_pretrained(str(paths.model))

    def rows(path):
        frame = pd.read_parquet(path)
        out = []
        for prompt, reward_model in zip(frame["prompt"], frame["reward_model"]):
            messages = [dict(m) for m in prompt]
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            out.append((tokenizer(text, add_special_tokens=False)["input_ids"], str(reward_model["ground_truth"])))
        return out, str(frame["data_source"].iloc[0])

    train, source = rows(paths.train_parquet)
    test, _ = rows(paths.test_parquet)
    train, train_eval = heldout_split(train, test)
    models = {"dense": str(paths.model)}
    if moe:
        from hmpo_verl.lab import moe as moe_lab

        if name != "fibonacci":
            raise ValueError(f"the MoE model is built for the fibonacci task only, not {name!r}")
        models["moe"] = str(moe_lab.prepare(dirs["moe"], log=log).model)
    return Task(name=name, model_paths=models, train=train, test=test,
                reward=lambda text, truth: float(compute_score(source, text, truth)), tokenizer=tokenizer,
                max_response_length=max_response_length or recipe_max_response_length(name),
                data_source=source, assets=paths, train_eval=train_eval)


def load_model(path: str, attn_implementation: str = "sdpa"):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn_implementation)
    model.eval()
    return model


# ----------------------------------------------------------------------------- sampling and log-probs


@dataclass
class Rollout:
    """One step's responses, right-padded: prompt (B, P) left-padded, response (B, T)."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    rollout_log_probs: torch.Tensor  # as reported by the sampler (before any simulated noise)


@torch.no_grad()
def sample(model, prompts: list[list[int]], max_tokens: int, eos_id: int, pad_id: int,
           generator: torch.Generator) -> Rollout:
    """Batched KV-cached decoding at temperature 1; log-probs from the sampling model's logits (in fp32)."""
    from transformers import DynamicCache

    width = max(len(p) for p in prompts)
    prompt_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    attention_mask = prompt_mask.clone()
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    step_ids, step_pos = prompt_ids, position_ids
    finished = torch.zeros(len(prompts), dtype=torch.bool)
    tokens, log_probs, masks = [], [], []
    for _ in range(max_tokens):
        logits = model(input_ids=step_ids, attention_mask=attention_mask, position_ids=step_pos,
                       past_key_values=cache, use_cache=True).logits[:, -1]
        logp = torch.log_softmax(logits.float(), dim=-1)
        token = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
        masks.append(~finished)
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        tokens.append(token)
        log_probs.append(logp.gather(-1, token[:, None]).squeeze(-1))
        finished = finished | (token == eos_id)
        if bool(finished.all()):
            break
        step_ids = token[:, None]
        step_pos = step_pos[:, -1:] + 1
        attention_mask = torch.cat([attention_mask, torch.ones(len(prompts), 1, dtype=attention_mask.dtype)], 1)
    mask = torch.stack(masks, 1)
    return Rollout(prompt_ids, prompt_mask, torch.stack(tokens, 1), mask,
                   torch.where(mask, torch.stack(log_probs, 1), 0.0))


def token_log_probs(model, rollout: Rollout, rows: slice | torch.Tensor | None = None) -> torch.Tensor:
    """(B, T) log-probs of the response tokens under ``model`` (fp32 trainer forward, as verl's actor)."""
    sel = slice(None) if rows is None else rows
    prompt_ids, prompt_mask = rollout.prompt_ids[sel], rollout.prompt_mask[sel]
    response_ids, response_mask = rollout.response_ids[sel], rollout.response_mask[sel]
    input_ids = torch.cat([prompt_ids, response_ids], 1)
    attention_mask = torch.cat([prompt_mask, response_mask.long()], 1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    width = prompt_ids.shape[1]
    logits = logits[:, width - 1: -1].float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, response_ids[..., None]).squeeze(-1)
    return torch.where(response_mask, logp, 0.0)


def bf16_copy(model, target=None):
    """A bf16 copy of ``model``'s weights (into ``target`` if given): the rollout engine's precision."""
    import copy

    if target is None:
        target = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
        for p_target, p_source in zip(target.parameters(), model.parameters(), strict=True):
            p_target.copy_(p_source.to(torch.bfloat16))
    target.eval()
    return target


# ----------------------------------------------------------------------------- verl pieces


def actor_config(method: Method, settings: LoopSettings):
    """verl's ``ActorConfig`` for ``method`` (the shared clip/aggregation, then the method's own fields)."""
    from verl.workers.config import ActorConfig, PolicyLossConfig

    import hmpo_verl  # noqa: F401  (registers our losses)
    from hmpo_verl import AdaptivePowerMeanLossConfig, PowerMeanLossConfig

    classes = {"verl": PolicyLossConfig, "power_mean": PowerMeanLossConfig, "adaptive": AdaptivePowerMeanLossConfig}
    policy_loss = classes[method.policy_loss_class](loss_mode=method.loss_mode, **dict(method.policy_loss))
    fields = {"clip_ratio": settings.clip_ratio, "clip_ratio_low": settings.clip_ratio,
              "clip_ratio_high": settings.clip_ratio, "loss_agg_mode": settings.loss_agg_mode, **dict(method.actor)}
    return ActorConfig(strategy="fsdp", rollout_n=settings.n, ppo_mini_batch_size=settings.prompts_per_step,
                       ppo_micro_batch_size_per_gpu=settings.prompts_per_step * settings.n, policy_loss=policy_loss,
                       **fields)


def algo_config(method: Method, settings: LoopSettings):
    if method.adv_estimator == "grpo":
        return None
    from hmpo_verl import PowerMeanAlgoConfig

    return PowerMeanAlgoConfig(adv_estimator=method.adv_estimator, **dict(method.algo))


def advantages(method: Method, settings: LoopSettings, scores: torch.Tensor, response_mask: torch.Tensor,
               uids: np.ndarray, algo=None) -> torch.Tensor:
    """(B, T) advantages from verl's estimators, dispatched as verl's ``compute_advantage``.

    scores: (B,) outcome rewards, placed on each response's last valid token.
    """
    from verl.trainer.ppo import core_algos

    mask = response_mask.float()
    last = response_mask.long().sum(-1).clamp(min=1) - 1
    token_level_rewards = torch.zeros_like(mask).scatter(1, last[:, None], scores.float()[:, None])
    if method.adv_estimator == "grpo":
        adv, _ = core_algos.compute_grpo_outcome_advantage(
            token_level_rewards=token_level_rewards, response_mask=mask, index=uids,
            norm_adv_by_std_in_grpo=settings.norm_adv_by_std_in_grpo)
    else:
        fn = core_algos.get_adv_estimator_fn(method.adv_estimator)
        adv, _ = fn(token_level_rewards=token_level_rewards, response_mask=mask, config=algo, index=uids)
    return adv


def rollout_is_weights(method: Method, old_log_prob, rollout_log_prob, response_mask):
    """verl's token-level truncated IS weights pi_old / pi_rollout (None when the method has no correction)."""
    if method.rollout_is_threshold is None:
        return None
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_rejection_mask

    proto, _, _ = compute_rollout_correction_and_rejection_mask(
        old_log_prob=old_log_prob, rollout_log_prob=rollout_log_prob, response_mask=response_mask,
        rollout_is="token", rollout_is_threshold=method.rollout_is_threshold)
    return proto.batch["rollout_is_weights"]


def policy_loss(config, old_log_prob, log_prob, adv, response_mask, weights=None):
    """verl's registered policy loss with ``global_batch_info`` as ``ppo_loss`` fills it (1 rank, 1 micro-batch)."""
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    config.global_batch_info["dp_size"] = 1
    config.global_batch_info["batch_num_tokens"] = int(response_mask.sum())
    config.global_batch_info["global_batch_size"] = int(response_mask.shape[0])
    config.global_batch_info["loss_scale_factor"] = config.loss_scale_factor
    loss_mode = config.policy_loss.get("loss_mode", "vanilla")
    return get_policy_loss_fn(loss_mode)(old_log_prob=old_log_prob, log_prob=log_prob, advantages=adv,
                                         response_mask=response_mask, loss_agg_mode=config.loss_agg_mode,
                                         config=config, rollout_is_weights=weights)


# ----------------------------------------------------------------------------- log-ratio statistics


def log_ratio_stats(delta: torch.Tensor, mask: torch.Tensor) -> dict:
    """sd and 99.9th percentile of |delta| over valid tokens, and the mean per-sequence log A - log H."""
    from hmpo_verl.means import log_arithmetic_harmonic_gap

    valid = delta[mask.bool()].double()
    if valid.numel() == 0:
        return {"delta_sd": math.nan, "delta_abs_p999": math.nan, "log_ah_gap": math.nan}
    rows = mask.bool().any(-1)
    gap = log_arithmetic_harmonic_gap(delta.double(), mask.bool())[rows]
    return {"delta_sd": float(valid.std()) if valid.numel() > 1 else 0.0,
            "delta_abs_p999": float(torch.quantile(valid.abs(), 0.999)), "log_ah_gap": float(gap.mean())}


# ----------------------------------------------------------------------------- the loop


@dataclass
class RunResult:
    steps: list[dict] = field(default_factory=list)
    first_eval: float = math.nan


def _generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(keys)).generate_state(1)[0]))


@torch.no_grad()
def expected_reward(model, task: Task, rows: list[tuple[list[int], str]]) -> float:
    """Exact expected exact-match reward of temperature-1 sampling on ``rows`` (prompt ids, answer).

    For prompt x with answer y* (its tokens, then EOS): pi(y* | x) = exp(sum_t log pi(y*_t | x, y*_<t)),
    one teacher-forced forward pass, no sampling noise. Exact match also accepts the answer
    with surrounding whitespace; those responses' probability is negligible for the CPU tasks
    (``tests/test_study.py`` checks the value against a Monte Carlo estimate of the reward).
    """
    eos, pad = task.tokenizer.eos_token_id, task.tokenizer.pad_token_id
    answers = [task.tokenizer(truth, add_special_tokens=False)["input_ids"] + [eos] for _, truth in rows]
    width, length = max(len(p) for p, _ in rows), max(len(a) for a in answers)
    rollout = Rollout(
        prompt_ids=torch.tensor([[pad] * (width - len(p)) + p for p, _ in rows]),
        prompt_mask=torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in rows]),
        response_ids=torch.tensor([a + [pad] * (length - len(a)) for a in answers]),
        response_mask=torch.tensor([[True] * len(a) + [False] * (length - len(a)) for a in answers]),
        rollout_log_probs=torch.zeros(len(rows), length))
    return float(token_log_probs(model, rollout).sum(-1).exp().mean())


def evaluate(model, task: Task, settings: LoopSettings) -> dict:
    """``eval_heldout``: exact expected reward on the first ``eval_prompts`` held-out (test) prompts;
    ``eval_train``: the same on as many training prompts (``task.train_eval``)."""
    return {"eval_heldout": expected_reward(model, task, task.test[: settings.eval_prompts]),
            "eval_train": expected_reward(model, task, task.train_eval[: settings.eval_prompts])}


def _valid(rollout: Rollout, i: int) -> list[int]:
    return rollout.response_ids[i][rollout.response_mask[i]].tolist()


class Sampler:
    """The rollout engine's copy of the policy: ``lag`` updates old, in ``dtype``, recording MoE routes.

    ``sync(model)`` is called before every rollout with the trainer's current model: it keeps
    the last ``lag + 1`` parameter versions and loads the oldest (the initial ones until the
    trainer has made ``lag`` updates) into the sampling copy, cast to its dtype.
    """

    def __init__(self, model, regime: Regime):
        import copy

        self.lag, self.record = regime.lag, regime.model.startswith("moe")
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[regime.sample_dtype]
        self.model = model if (dtype == torch.float32 and self.lag == 0) else copy.deepcopy(model).to(dtype).eval()
        self.history: list[list[torch.Tensor]] = []

    def sync(self, model) -> None:
        if self.model is model:
            return
        self.history.append([p.detach().clone() for p in model.parameters()])
        del self.history[: -(self.lag + 1)]
        with torch.no_grad():
            for target, source in zip(self.model.parameters(), self.history[0], strict=True):
                target.copy_(source.to(target.dtype))

    def sample(self, prompts, max_tokens, eos, pad, generator) -> tuple[Rollout, list | None]:
        """A rollout and, for a MoE model, the experts each layer chose per position."""
        if not self.record:
            return sample(self.model, prompts, max_tokens, eos, pad, generator), None
        from hmpo_verl.lab.moe import RouteRecorder

        with RouteRecorder(self.model, len(prompts)) as recorder:
            rollout = sample(self.model, prompts, max_tokens, eos, pad, generator)
        return rollout, recorder.routes()


def _routing(model, routes, rows=None):
    """Context of the trainer's forwards: replay ``routes`` (restricted to ``rows``), or nothing."""
    from contextlib import nullcontext

    if routes is None:
        return nullcontext()
    from hmpo_verl.lab.moe import RouteReplay

    return RouteReplay(model, [r if rows is None else r[rows] for r in routes])


def _routing_flips(model, rollout: Rollout, sampler_routes) -> float:
    """Share of (layer, position) routes where the trainer's own choice differs from the sampler's, over the
    input positions whose output predicts a response token (the last prompt token, then the response's)."""
    from hmpo_verl.lab.moe import RouteRecorder, flip_fraction

    with torch.no_grad(), RouteRecorder(model, rollout.response_ids.shape[0]) as recorder:
        token_log_probs(model, rollout)
    B, P = rollout.prompt_mask.shape
    positions = torch.cat([torch.zeros(B, P - 1, dtype=torch.bool), rollout.response_mask,
                           torch.zeros(B, 1, dtype=torch.bool)], 1)
    return flip_fraction(sampler_routes, recorder.routes(), positions)


def _update_records(updates: list[dict]) -> dict:
    """The step's update metrics: the mean over its updates (``update/...`` and verl's ``actor/...``)."""
    record = {}
    for key in (k for k in updates[0] if k != "finite"):
        values = [u[key] for u in updates if key in u]
        record[key if key.startswith("actor/") else f"update/{key}"] = float(np.mean(values))
    record["non_finite"] = not all(u["finite"] for u in updates)
    return record


def train(task: Task, method: Method, regime: Regime, seed: int, steps: int, settings: LoopSettings,
          progress: Callable[[int], None] | None = None, observe: Callable[..., None] | None = None) -> RunResult:
    """One run of ``steps`` training steps; returns per-step metrics (``eval_heldout``, ``eval_train``: the
    exact expected rewards after the step) and the evaluation before the first step (``first_eval``).

    ``observe``, if given, is called before every update with the trainer's state as keywords: ``step``,
    ``update`` (its index within the step), ``model`` (the trainer's current model; the observer must not
    change it), ``rollout``, ``rows`` (the mini-batch), ``recomputed`` (B, T) (the trainer's log-probs at the
    step's start), ``reported`` (B, T) (the behaviour policy's as the loss would see them), ``scores`` (B,),
    ``uids`` (B,) (:mod:`hmpo_verl.lab.lag_fidelity` measures each method's update there)."""
    from hmpo_verl.reward_adaptive import REWARD_FEEDBACK, RewardStats

    torch.manual_seed(seed)
    model = load_model(task.model_paths[regime.model])
    sampler = Sampler(model, regime)
    config = actor_config(method, settings)
    algo = algo_config(method, settings)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    order = list(range(len(task.train)))
    random.Random(seed).shuffle(order)
    eos, pad = task.tokenizer.eos_token_id, task.tokenizer.pad_token_id
    result = RunResult(first_eval=evaluate(model, task, settings))
    P, n = settings.prompts_per_step, settings.n
    for step in range(1, steps + 1):
        updates, rollout_records = [], []
        for r in range(regime.rollouts_per_step):
            batch = (step - 1) * regime.rollouts_per_step + r  # fresh prompts for every rollout
            picked = [order[(batch * P + i) % len(order)] for i in range(P)]
            prompts = [task.train[j][0] for j in picked for _ in range(n)]
            truths = [task.train[j][1] for j in picked for _ in range(n)]
            uids = np.array([str(j) for j in picked for _ in range(n)], dtype=object)
            sampler.sync(model)
            rollout, routes = sampler.sample(prompts, task.max_response_length, eos, pad,
                                             _generator(seed, step) if r == 0 else _generator(seed, step, r))
            mask = rollout.response_mask
            reported = rollout.rollout_log_probs
            if regime.noise is not None:
                reported = torch.where(mask, reported + regime.noise.sample(mask.shape, _generator(seed, step, 99)), 0.0)
            scores = torch.tensor([task.reward(task.decode(_valid(rollout, i)), truths[i]) for i in range(len(prompts))])
            replay = routes if regime.routing_replay else None
            with torch.no_grad(), _routing(model, replay):
                recomputed = token_log_probs(model, rollout)
            # bypass mode: the reported log-probs are the behaviour policy; rollout correction needs
            # the decoupled mode (it weights pi_old / pi_rollout), so that method recomputes them
            decoupled = not regime.bypass or method.rollout_is_threshold is not None
            old = recomputed if decoupled else reported
            weights = rollout_is_weights(method, recomputed, reported, mask)
            adv = advantages(method, settings, scores, mask, uids, algo)
            REWARD_FEEDBACK.set(RewardStats.of(scores))  # adapt: reward reads the batch's rewards
            # the mismatch as measured (trainer fp32 vs reported), whichever log-probs the loss uses
            rollout_records.append({"reward": float(scores.mean()), "response_length": float(mask.sum(-1).float().mean()),
                                    **{f"mismatch/{k}": v for k, v in log_ratio_stats(recomputed - reported, mask).items()},
                                    **({"routing/flip_frac": _routing_flips(model, rollout, routes)} if routes else {})})
            chunks = torch.arange(len(prompts)).chunk(regime.mini_batches)
            model.train()
            for _ in range(regime.epochs):
                for rows in chunks:
                    if observe is not None:
                        observe(step=step, update=len(updates), model=model, rollout=rollout, rows=rows,
                                recomputed=recomputed, reported=reported, scores=scores, uids=uids)
                    with _routing(model, replay, rows):
                        log_prob = token_log_probs(model, rollout, rows)
                    m = mask[rows]
                    loss, metrics = policy_loss(config, old[rows], log_prob, adv[rows], m,
                                                None if weights is None else weights[rows])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
                    finite = bool(torch.isfinite(grad_norm)) and bool(torch.isfinite(loss))
                    if finite:
                        optimizer.step()
                    delta = (log_prob.detach() - old[rows])
                    updates.append({"loss": float(loss.detach()), "grad_norm": float(grad_norm), "finite": finite,
                                    **{k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
                                    **log_ratio_stats(delta, m)})
            model.eval()
        REWARD_FEEDBACK.clear()
        record = {"step": step, **{k: float(np.mean([r[k] for r in rollout_records])) for k in rollout_records[0]},
                  **_update_records(updates), **evaluate(model, task, settings)}
        result.steps.append(record)
        if progress:
            progress(step)
    return result
