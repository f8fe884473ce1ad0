"""Gradient fidelity: how far each loss's update is from the clean policy gradient, measured directly.

    python -m hmpo_verl.lab.bench --fidelity                 # docs/fidelity.md + docs/fidelity_data/
    python -m hmpo_verl.lab.bench --fidelity --quick         # a few resamples (a smoke run)

No training run: on the task's warm-start model and real responses sampled from it, every
method of the study (:data:`hmpo_verl.lab.lean.METHODS`, verl's registered losses and ours,
with their settings) computes its parameter update -- the gradient of its verl loss through
the model -- in each regime of the study, and we measure

* **fidelity**: the cosine between that update and two references, and the ratio of their
  norms, over ``--resamples`` resamples (a random subset of prompt groups from a pool of
  sampled responses, and fresh mismatch noise each time), with 95 % t intervals:

  - ``ratio1``: the same method's update on the same responses at the same parameters with
    the old log-probs set to the current ones (ratio 1, no importance weights): the policy
    gradient *as if the responses had been sampled at the current parameters*. Under
    staleness this reference ignores that they were not, so a loss that ignores the ratio
    scores best against it;
  - ``iw``: the importance-weighted policy gradient at the current parameters, with the true
    sampling policy's log-probs (the pool was sampled in fp32 from the warm start):
    sum_t A r_t grad log pi(y_t), r_t = pi_theta / pi_sample, under seq-mean-token-mean (the
    PPO surrogate's gradient without its clip). Without staleness the two references coincide
    (the reported log-probs' mismatch is not the sampling policy's);
* **outlier sensitivity**: on clean data, one random valid token's log-ratio is set to
  x in {-5, -3, -1, +1, +3, +5}; the update moves by ||g(x) - g(0)|| / ||g(0)||.

Regimes: ``bf16`` -- reported log-probs of a bf16 copy of the weights (teacher-forced on the
sampled tokens) are the behaviour policy; ``mismatch`` -- the same plus heavy-tailed noise;
``stale`` -- the parameters after all but the last of the stale schedule's vanilla updates on
the pool (1 of 2 mini-batches, a fresh AdamW's first step: every weight moves by about lr),
old log-probs from the warm start; ``stressed`` -- both. The stale parameters were fitted on
half of the pool: resamples of that half (``/trained``, the responses just trained on) and of
the other (``/untrained``) are reported apart.
``vanilla_rc`` runs in decoupled mode as in the study (old = the trainer's log-probs, verl's
truncated IS weights carry the mismatch). Every gradient is exact (autograd through the
model); the update of a method is what verl's ``ppo_loss`` would back-propagate.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hmpo_verl.lab import lean, stats
from hmpo_verl.lab.cpu_demo import REPO_ROOT
from hmpo_verl.reward_adaptive import REWARD_FEEDBACK, RewardStats

FIDELITY_REGIMES = ("bf16", "mismatch", "stale", "stressed")
REFERENCES = {"ratio1": "the method's own loss at ratio 1, current parameters (as if sampled there: no importance weights)",
              "iw": "the importance-weighted policy gradient at the current parameters (true sampling log-probs, no clip)"}
OUTLIERS = (-5.0, -3.0, -1.0, 1.0, 3.0, 5.0)


@dataclass
class Pool:
    rollout: lean.Rollout
    scores: torch.Tensor  # (N,)
    uids: np.ndarray  # (N,)
    groups: list[np.ndarray]  # row indices of each prompt group
    bf16_log_probs: torch.Tensor  # (N, T) teacher-forced through the bf16 copy


def build_pool(task: lean.Task, model, prompts: int, settings: lean.LoopSettings, seed: int) -> Pool:
    """Sample ``prompts`` x n responses from the warm-start model (fp32) and score them."""
    picked = list(range(min(prompts, len(task.train))))
    rng = np.random.default_rng(seed)
    picked = [int(i) for i in rng.choice(len(task.train), size=len(picked), replace=False)]
    n = settings.n
    ids = [task.train[j][0] for j in picked for _ in range(n)]
    truths = [task.train[j][1] for j in picked for _ in range(n)]
    rollout = lean.sample(model, ids, task.max_response_length, task.tokenizer.eos_token_id,
                          task.tokenizer.pad_token_id, lean._generator(seed, 1))
    scores = torch.tensor([task.reward(task.decode(lean._valid(rollout, i)), truths[i]) for i in range(len(ids))])
    with torch.no_grad():
        bf16 = lean.token_log_probs(lean.bf16_copy(model), rollout)
    groups = [np.arange(g * n, (g + 1) * n) for g in range(len(picked))]
    return Pool(rollout, scores, np.array([str(j) for j in picked for _ in range(n)], dtype=object), groups, bf16)


def drift(model, pool: Pool, settings: lean.LoopSettings, regime: lean.Regime):
    """A copy of ``model`` after all but the last of ``regime``'s vanilla updates of a rollout on the pool
    (mini-batches in order): the parameters at which its last update is computed."""
    import copy

    moved = copy.deepcopy(model)
    config = lean.actor_config(lean.METHODS_BY_NAME["vanilla"], settings)
    with torch.no_grad():
        old = lean.token_log_probs(model, pool.rollout)
    adv = lean.advantages(lean.METHODS_BY_NAME["vanilla"], settings, pool.scores, pool.rollout.response_mask, pool.uids)
    optimizer = torch.optim.AdamW(moved.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    chunks = torch.arange(len(pool.scores)).chunk(regime.mini_batches)
    moved.train()
    for k in range(regime.mini_batches * regime.epochs - 1):
        rows = chunks[k % len(chunks)]
        log_prob = lean.token_log_probs(moved, pool.rollout, rows)
        loss, _ = lean.policy_loss(config, old[rows], log_prob, adv[rows], pool.rollout.response_mask[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(moved.parameters(), settings.grad_clip)
        optimizer.step()
    moved.eval()
    return moved


def loss_cotangent(method: lean.Method, config, settings, log_prob: torch.Tensor, old: torch.Tensor,
                   adv: torch.Tensor, mask: torch.Tensor, weights) -> torch.Tensor:
    """dL/d log_prob (B, T) of the method's verl loss at these log-probs (the update is J^T of it)."""
    leaf = log_prob.detach().clone().requires_grad_(True)
    loss, _ = lean.policy_loss(config, old, leaf, adv, mask, weights)
    (grad,) = torch.autograd.grad(loss, leaf, allow_unused=True)
    return torch.zeros_like(leaf) if grad is None else grad


def token_kernel(model, rollout: lean.Rollout) -> torch.Tensor:
    """K = J J^T over all (response, position) pairs of the pool: (N*T, N*T), returned in float64
    (J: :func:`token_jacobian`). The update of a loss with cotangent v = dL/d log_prob is g = J^T v, so
    <g_a, g_b> = v_a^T K v_b: every cosine of every resample then costs a small matrix product."""
    jac = token_jacobian(model, rollout)
    return (jac @ jac.T).double()  # float32 products (MKL), accumulated well enough for cosines to ~1e-6


def token_jacobian(model, rollout: lean.Rollout) -> torch.Tensor:
    """J: (N*T, n_params) float32, J[(i, t)] = d log pi(y_{i,t}) / d theta (all parameters, flattened), exact,
    one response at a time (a forward, then its per-token gradients as a vmapped VJP); rows of padded
    positions are 0."""
    from torch.func import functional_call, vjp, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}
    n_params = sum(v.numel() for v in params.values())
    mask = rollout.response_mask
    N, T = mask.shape
    jac = torch.zeros(N * T, n_params)
    for i in range(N):
        length = int(mask[i].sum())
        if length == 0:
            continue
        row = torch.tensor([i])

        def log_probs(p, row=row, length=length):
            return lean.token_log_probs(lambda **kw: functional_call(model, p, (), kw), rollout, row)[0, :length]

        _, pullback = vjp(log_probs, params)
        (grads,) = vmap(pullback)(torch.eye(length))
        jac[i * T: i * T + length] = torch.cat([g.reshape(length, -1) for g in grads.values()], 1)
    return jac


def gram(cotangents: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """(K, K) inner products <J^T v_a, J^T v_b> for cotangents (K, R) over the kernel's (R, R) block."""
    v = cotangents.double()
    return v @ kernel @ v.T


def iw_cotangent(now: torch.Tensor, sampling: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """dL/d log_prob (B, T) of the unclipped importance-weighted policy-gradient loss under seq-mean-token-mean:
    L = -(1/B) sum_i (1/T_i) sum_t A_it r_it, r = exp(now - sampling) (the PPO surrogate without its clip)."""
    valid = mask.to(now.dtype)
    ratio = torch.exp(torch.where(mask, now - sampling, 0.0))
    return -adv * ratio * valid / valid.sum(-1, keepdim=True).clamp(min=1) / mask.shape[0]


def fidelity_rows(name: str, regime: lean.Regime, resample: int, rows: torch.Tensor, methods, configs, settings, advs,
                  current: torch.Tensor, clean_old: torch.Tensor, kernel: torch.Tensor, pool: Pool,
                  generator: torch.Generator) -> tuple[list[dict], dict]:
    """One resample of one regime: each method's cosine and norm ratio against both references, and the
    regime's measured log-ratios on these rows."""
    T = pool.rollout.response_mask.shape[1]
    tokens = (rows[:, None] * T + torch.arange(T)[None, :]).reshape(-1)
    kernel = kernel[tokens][:, tokens]
    mask = pool.rollout.response_mask[rows]
    now, base_old = current[rows], clean_old[rows]
    reported = base_old if regime.sample_dtype == "fp32" else pool.bf16_log_probs[rows]
    if regime.noise is not None:
        reported = torch.where(mask, reported + regime.noise.sample(mask.shape, generator), 0.0)
    behaviour = reported if regime.bypass else base_old
    stats_row = {"regime": name, "resample": resample,
                 **{f"mismatch/{k}": v for k, v in lean.log_ratio_stats(base_old - reported, mask).items()},
                 **{f"update/{k}": v for k, v in lean.log_ratio_stats(now - behaviour, mask).items()}}
    out = []
    for m in methods:
        adv = advs[m.name]
        decoupled = not regime.bypass or m.rollout_is_threshold is not None
        old = base_old if decoupled else reported
        weights = lean.rollout_is_weights(m, base_old, reported, mask)
        update = loss_cotangent(m, configs[m.name], settings, now, old, adv, mask, weights).reshape(-1)
        ratio1 = loss_cotangent(m, configs[m.name], settings, now, now, adv, mask, None).reshape(-1)
        iw = iw_cotangent(now, base_old, adv, mask).reshape(-1)  # the pool was sampled from the warm start (fp32)
        g = gram(torch.stack([update, ratio1, iw]), kernel)
        for reference, k in (("ratio1", 1), ("iw", 2)):
            ok = g[0, 0] > 0 and g[k, k] > 0
            out.append({"regime": name, "method": m.name, "reference": reference, "resample": resample,
                        "cosine": float(g[0, k] / (g[0, 0] * g[k, k]).sqrt()) if ok else math.nan,
                        "norm_ratio": float((g[0, 0] / g[k, k]).sqrt()) if ok else math.nan})
    return out, stats_row


def measure(task: lean.Task, methods: list[lean.Method], regimes: list[str], resamples: int, groups_per_batch: int,
            outlier_resamples: int, settings: lean.LoopSettings, seed: int, pool_prompts: int, log=print):
    """Fidelity rows (regime, method, resample, cosine, norm_ratio) and sensitivity rows (method, x, resample, move)."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    model = lean.load_model(task.model_path, "eager")  # eager attention: its backward batches under vmap (sdpa's does not)
    t0 = time.time()
    pool = build_pool(task, model, pool_prompts, settings, seed)
    N, T = pool.rollout.response_mask.shape
    log(f"pool: {N} responses, mean reward {pool.scores.float().mean():.3f}, "
        f"mean length {pool.rollout.response_mask.sum(-1).float().mean():.1f} ({time.time() - t0:.0f} s)")
    needs_stale = any(lean.REGIMES_BY_NAME[r].mini_batches > 1 for r in regimes)
    # stale and stressed share their update schedule (the study's stale one)
    states = {"old": model, **({"stale": drift(model, pool, settings, lean.REGIMES_BY_NAME["stale"])}
                               if needs_stale else {})}
    current, kernels = {}, {}
    for name, m in states.items():
        t0 = time.time()
        with torch.no_grad():
            current[name] = lean.token_log_probs(m, pool.rollout)
        kernels[name] = token_kernel(m, pool.rollout)
        log(f"token-gradient kernel at the {name} parameters: {kernels[name].shape[0]} tokens ({time.time() - t0:.0f} s)")
    clean_old = current["old"]
    configs = {m.name: lean.actor_config(m, settings) for m in methods}
    algos = {m.name: lean.algo_config(m, settings) for m in methods}
    rng = np.random.default_rng(seed + 1)
    fidelity, sensitivity, regime_stats = [], [], []
    # the stale parameters were fitted on the first of the two mini-batches (the first half of the groups)
    trained = [g for g, rows in enumerate(pool.groups) if rows[0] < len(pool.scores) // 2]
    subsets = {"": list(range(len(pool.groups))), "/trained": trained,
               "/untrained": [g for g in range(len(pool.groups)) if g not in trained]}

    def pick(groups: list[int]) -> torch.Tensor:
        chosen = sorted(rng.choice(groups, size=min(groups_per_batch, len(groups)), replace=False))
        return torch.as_tensor(np.concatenate([pool.groups[g] for g in chosen]))

    def advantages_of(rows):
        """Each method's advantages on ``rows``; the rows' rewards are the batch rewards `adapt: reward` reads."""
        REWARD_FEEDBACK.set(RewardStats.of(pool.scores[rows]))
        mask, uids = pool.rollout.response_mask[rows], pool.uids[rows.numpy()]
        return {m.name: lean.advantages(m, settings, pool.scores[rows], mask, uids, algos[m.name]) for m in methods}

    for r in tqdm(range(resamples + outlier_resamples), desc="fidelity", unit="resample", dynamic_ncols=True):
        if r < resamples:
            generator = lean._generator(seed, 2, r)
            for name in regimes:
                regime = lean.REGIMES_BY_NAME[name]
                state = "stale" if regime.mini_batches > 1 else "old"
                for suffix in (("/trained", "/untrained") if state == "stale" else ("",)):
                    rows = pick(subsets[suffix])
                    fid, st = fidelity_rows(f"{name}{suffix}", regime, r, rows, methods, configs, settings,
                                            advantages_of(rows), current[state], clean_old, kernels[state], pool,
                                            generator)
                    fidelity += fid
                    regime_stats.append(st)
        else:
            rows = pick(subsets[""])
            mask, advs = pool.rollout.response_mask[rows], advantages_of(rows)
            tokens = (rows[:, None] * T + torch.arange(T)[None, :]).reshape(-1)

            def cot(m, now, old, weights=None):
                return loss_cotangent(m, configs[m.name], settings, now, old, advs[m.name], mask, weights).reshape(-1)

            now = clean_old[rows]
            kernel = kernels["old"][tokens][:, tokens]
            valid = mask.nonzero()
            b, t = valid[int(rng.integers(len(valid)))].tolist()
            for m in methods:
                base = cot(m, now, now)
                moves = []
                for x in OUTLIERS:
                    old = now.clone()
                    old[b, t] = now[b, t] - x  # this token's log-ratio is x
                    moves.append(cot(m, now, old) - base)
                g = gram(torch.stack([base, *moves]), kernel)
                for k, x in enumerate(OUTLIERS, 1):
                    sensitivity.append({"method": m.name, "x": x, "resample": r,
                                        "relative_move": float((g[k, k] / g[0, 0]).sqrt()) if g[0, 0] > 0 else math.nan,
                                        "advantage_sign": float(np.sign(advs[m.name][b, t]))})
    return fidelity, sensitivity, regime_stats, pool


# ----------------------------------------------------------------------------- report


def summarize(rows: list[dict], keys: tuple[str, ...], value: str) -> list[dict]:
    import pandas as pd

    frame = pd.DataFrame(rows)
    out = []
    for key, df in frame.groupby(list(keys), sort=False):
        vals = [v for v in df[value].tolist() if math.isfinite(v)]
        mean, half = stats.mean_ci(vals)
        out.append({**dict(zip(keys, key if isinstance(key, tuple) else (key,))), "n": len(vals), "mean": mean,
                    "lo": mean - half, "hi": mean + half})
    return out


def plots(fid_summary, sens_summary, methods, regimes, figures: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hmpo_verl.lab.study.report import save_figure

    figures.mkdir(parents=True, exist_ok=True)
    paths = []
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.75 * len(methods) * len(regimes) / 2), 8.4), sharex=True)
    width = 0.8 / len(regimes)
    for ax, reference in zip(axes, REFERENCES):
        for j, regime in enumerate(regimes):
            xs, ys, lo, hi = [], [], [], []
            for i, m in enumerate(methods):
                row = next((s for s in fid_summary if (s["reference"], s["regime"], s["method"]) == (reference, regime, m)),
                           None)
                if row is None:
                    continue
                xs.append(i + (j - (len(regimes) - 1) / 2) * width)
                ys.append(row["mean"])
                lo.append(row["mean"] - row["lo"])
                hi.append(row["hi"] - row["mean"])
            ax.bar(xs, ys, width=width, label=regime, yerr=[lo, hi], capsize=2)
        ax.set_ylabel(f"cosine(update, {reference} reference)")
        ax.set_ylim(min(0.0, min((s["lo"] for s in fid_summary), default=0)), 1.02)
        ax.grid(alpha=0.3, axis="y")
        ax.set_title(f"{reference}: {REFERENCES[reference]}", fontsize=9)
    axes[0].legend(fontsize=8)
    axes[-1].set_xticks(range(len(methods)), methods, rotation=45, ha="right")
    fig.suptitle("gradient fidelity per regime (mean over resamples, 95 % t interval)")
    paths.append(save_figure(fig, figures / "fidelity.png"))

    fig, ax = plt.subplots(figsize=(8, 4.8))
    cmap = plt.get_cmap("tab20")
    for i, m in enumerate(methods):
        rows = sorted((s for s in sens_summary if s["method"] == m), key=lambda s: s["x"])
        if not rows:
            continue
        x = [s["x"] for s in rows]
        ax.plot(x, [s["mean"] for s in rows], marker="o", label=m, color=cmap(i))
        ax.fill_between(x, [s["lo"] for s in rows], [s["hi"] for s in rows], color=cmap(i), alpha=0.1)
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel("log-ratio x of the single outlier token")
    ax.set_ylabel("||g(x) − g(0)|| / ||g(0)||")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("sensitivity of the update to one outlier token (95 % t interval)")
    paths.append(save_figure(fig, figures / "sensitivity.png"))
    return paths


def write_report(path: Path, argv, ctx) -> None:
    from hmpo_verl.lab.study.report import versions_text

    rel = lambda p: os.path.relpath(p, path.parent)  # noqa: E731
    methods, regimes = ctx["methods"], ctx["regimes"]
    fid = {(s["reference"], s["regime"], s["method"]): s for s in ctx["fid_summary"]}
    nr = {(s["reference"], s["regime"], s["method"]): s for s in ctx["norm_summary"]}

    def table(reference):
        cells = lambda r, m: (  # noqa: E731
            f"{fid[(reference, r, m)]['mean']:.4f} [{fid[(reference, r, m)]['lo']:.4f}, {fid[(reference, r, m)]['hi']:.4f}]; "
            f"×{nr[(reference, r, m)]['mean']:.3f}" if (reference, r, m) in fid else "—")
        return [f"### Against `{reference}`: {REFERENCES[reference]}", "",
                "| method | " + " | ".join(regimes) + " |", "|---|" + "---|" * len(regimes),
                *["| " + m + " | " + " | ".join(cells(r, m) for r in regimes) + " |" for m in methods], ""]

    sens = {(s["method"], s["x"]): s for s in ctx["sens_summary"]}
    lines = [
        "# Gradient fidelity of the study's methods",
        "",
        "Generated by `hmpo_verl.lab.fidelity`; do not edit by hand.",
        "",
        "```bash",
        "python -m hmpo_verl.lab.bench --fidelity " + " ".join(argv),
        "```",
        "",
        f"Versions: {versions_text()}. {os.cpu_count()} CPU cores, other work "
        f"running. Took {ctx['wall_s'] / 60:.1f} min.",
        "",
        f"Task `{ctx['task']}`, warm-start model; pool of {ctx['pool_size']} responses sampled from it "
        f"(mean reward {ctx['pool_reward']:.3f}, mean length {ctx['pool_length']:.1f} tokens); each resample takes "
        f"{ctx['groups']} prompt groups of {ctx['n']} responses at random, with fresh noise. {ctx['resamples']} "
        f"resamples for fidelity, {ctx['outlier_resamples']} for the outlier sensitivity. Method settings as in "
        "docs/study.md (loss_agg_mode seq-mean-token-mean, clip 0.2 unless the method sets its own).",
        "",
        "What is measured: the parameter update of each method (exact gradient of its verl loss through the model) "
        "against two references on the same responses and parameters. `ratio1` is the method's own update with the "
        "old log-probs set to the current ones: the policy gradient *as if the responses had been sampled at the "
        "current parameters*, with no importance weights; under staleness a loss that ignores the ratio scores best "
        "against it. `iw` is the importance-weighted policy gradient at the current parameters, sum_t A r_t grad log "
        "pi(y_t) with r_t = pi_theta / pi_sample and the true sampling log-probs (the pool was sampled in fp32 from "
        "the warm start), under seq-mean-token-mean: the gradient an unbiased per-token correction would follow (the "
        "PPO surrogate's without its clip). With fresh parameters (`bf16`, `mismatch`) the two references coincide: "
        "the reported log-probs' error is not the sampling policy's. A clipped loss departs from `iw` on purpose; "
        "the cosine says how far each loss's update turns from each reference, the norm ratio (×) how it scales.",
        "",
        "The stale parameters are those after the first of two mini-batch updates on half of the pool: "
        "`/trained` resamples that half (the responses just trained on), `/untrained` the other half.",
        "",
        "## Regimes: measured log-ratios",
        "",
        "| regime | mismatch sd | mismatch 99.9th pct abs | mismatch log_ah_gap | δ seen by the loss: sd | 99.9th pct abs | log_ah_gap |",
        "|---|---|---|---|---|---|---|",
        *[f"| {s['regime']} | {s['mismatch/delta_sd']:.4g} | {s['mismatch/delta_abs_p999']:.4g} | "
          f"{s['mismatch/log_ah_gap']:.4g} | {s['update/delta_sd']:.4g} | {s['update/delta_abs_p999']:.4g} | "
          f"{s['update/log_ah_gap']:.4g} |" for s in ctx["regime_summary"]],
        "",
        "## Fidelity: cosine to each reference (mean [95 % CI]) and norm ratio (×)",
        "",
        *[f"![{p.stem}]({rel(p)})" for p in ctx["pngs"]],
        "",
        *table("ratio1"),
        *table("iw"),
        "## Sensitivity to one outlier token: ||g(x) − g(0)|| / ||g(0)|| (mean [95 % CI])",
        "",
        "| method | " + " | ".join(f"x = {x:+g}" for x in OUTLIERS) + " |",
        "|---|" + "---|" * len(OUTLIERS),
        *["| " + m + " | " + " | ".join(
            (f"{sens[(m, x)]['mean']:.4f} [{sens[(m, x)]['lo']:.4f}, {sens[(m, x)]['hi']:.4f}]" if (m, x) in sens else "—")
            for x in OUTLIERS) + " |" for m in methods],
        "",
        "## Reading (generated)",
        "",
        *ctx["reading"],
        "",
        "Data: `docs/fidelity_data/fidelity.csv` (one row per regime, method, reference, resample), `sensitivity.csv`, "
        "`regimes.csv`, `summary.csv`.",
        "",
    ]
    path.write_text("\n".join(lines))


def generated_reading(fid_summary, sens_summary, methods, regimes) -> list[str]:
    out = []
    for reference in REFERENCES:
        for regime in regimes:
            rows = sorted((s for s in fid_summary if (s["reference"], s["regime"]) == (reference, regime)),
                          key=lambda s: -s["mean"])
            if not rows:
                continue
            best = rows[0]
            tied = [s["method"] for s in rows if s["hi"] >= best["lo"]]
            worst = rows[-1]
            out.append(f"**{regime}** vs `{reference}`: highest cosine {best['method']} {best['mean']:.4f} "
                       f"[{best['lo']:.4f}, {best['hi']:.4f}]; intervals overlapping it: {', '.join(tied)}; lowest "
                       f"{worst['method']} {worst['mean']:.4f} [{worst['lo']:.4f}, {worst['hi']:.4f}].")
    for x in (5.0, -5.0):
        rows = sorted((s for s in sens_summary if s["x"] == x), key=lambda s: s["mean"])
        if rows:
            out.append(f"Outlier x = {x:+g}: least moved {rows[0]['method']} {rows[0]['mean']:.4f}, most moved "
                       f"{rows[-1]['method']} {rows[-1]['mean']:.4f} [{rows[-1]['lo']:.4f}, {rows[-1]['hi']:.4f}].")
    return out


def main(argv=None) -> int:
    import pandas as pd

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="python -m hmpo_verl.lab.bench --fidelity")
    parser.add_argument("--task", default="fibonacci")
    parser.add_argument("--quick", action="store_true", help="4 resamples, 2 outlier resamples, 4 methods, report under --out")
    parser.add_argument("--resamples", type=int, default=200)
    parser.add_argument("--outlier-resamples", type=int, default=100)
    parser.add_argument("--groups", type=int, default=4, help="prompt groups per resample")
    parser.add_argument("--pool-prompts", type=int, default=12, help="prompts (x n responses) in the pool")
    parser.add_argument("--methods", nargs="+", choices=list(lean.METHODS_BY_NAME), default=None)
    parser.add_argument("--regimes", nargs="+", choices=list(FIDELITY_REGIMES), default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--assets", default=None, help="asset root (default: the task's own folder)")
    parser.add_argument("--out", default=str(REPO_ROOT / "outputs" / "fidelity"))
    parser.add_argument("--docs", default=None, help="report (default docs/fidelity.md; --quick: <out>/fidelity.md)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    if args.quick:
        args.resamples, args.outlier_resamples, args.pool_prompts = 4, 2, 8
        args.methods = args.methods or ["vanilla", "hmpo", "gspo", "vanilla_rc"]
    docs = Path(args.docs) if args.docs else (Path(args.out) / "fidelity.md" if args.quick else REPO_ROOT / "docs" / "fidelity.md")
    data_dir, figures = docs.parent / f"{docs.stem}_data", docs.parent / f"{docs.stem}_figures"
    task = lean.load_task(args.task, args.assets, log=lambda *a: print(*a, flush=True))
    settings = lean.LoopSettings(max_response_length=task.max_response_length)
    methods = [lean.METHODS_BY_NAME[m] for m in (args.methods or list(lean.METHODS_BY_NAME))]
    regimes = list(args.regimes or FIDELITY_REGIMES)
    fidelity, sensitivity, regime_stats, pool = measure(task, methods, regimes, args.resamples, args.groups,
                                                        args.outlier_resamples, settings, args.seed, args.pool_prompts)
    fid_summary = summarize(fidelity, ("reference", "regime", "method"), "cosine")
    norm_summary = summarize(fidelity, ("reference", "regime", "method"), "norm_ratio")
    sens_summary = summarize(sensitivity, ("method", "x"), "relative_move")
    regime_summary = pd.DataFrame(regime_stats).groupby("regime", sort=False).mean(numeric_only=True).reset_index()
    regime_summary = regime_summary.drop(columns=["resample"]).to_dict("records")
    data_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(fidelity).to_csv(data_dir / "fidelity.csv", index=False)
    pd.DataFrame(sensitivity).to_csv(data_dir / "sensitivity.csv", index=False)
    pd.DataFrame(regime_stats).to_csv(data_dir / "regimes.csv", index=False)
    pd.DataFrame([{**s, "metric": "cosine"} for s in fid_summary] + [{**s, "metric": "norm_ratio"} for s in norm_summary]
                 + [{**s, "metric": "relative_move"} for s in sens_summary]).to_csv(data_dir / "summary.csv", index=False)
    names = [m.name for m in methods]
    regimes = list(dict.fromkeys(row["regime"] for row in fidelity))  # with the stale ones' /trained, /untrained
    pngs = plots(fid_summary, sens_summary, names, regimes, figures)
    reading = generated_reading(fid_summary, sens_summary, names, regimes)
    ctx = {"methods": names, "regimes": regimes, "fid_summary": fid_summary, "norm_summary": norm_summary,
           "sens_summary": sens_summary, "regime_summary": regime_summary, "pngs": pngs, "reading": reading,
           "task": args.task, "pool_size": len(pool.scores), "pool_reward": float(pool.scores.float().mean()),
           "pool_length": float(pool.rollout.response_mask.sum(-1).float().mean()), "groups": args.groups,
           "n": settings.n, "resamples": args.resamples, "outlier_resamples": args.outlier_resamples,
           "wall_s": time.time() - start}
    write_report(docs, argv, ctx)
    print("\n".join(reading))
    print(f"wrote {docs}, {data_dir}, {figures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
