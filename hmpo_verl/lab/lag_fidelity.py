"""Why the harmonic side loses under lag: each method's update measured inside the study's async regimes.

    python -m hmpo_verl.lab.lag_fidelity               # measure; docs/study_v3_data/lag_fidelity.csv, the section
                                                       # of docs/study_v3.md and docs/study_v3_figures/lag_fidelity.png
    python -m hmpo_verl.lab.lag_fidelity --from-data   # the section and its figure from the committed data only
    python -m hmpo_verl.lab.lag_fidelity --quick       # a smoke run (under --out)

The study's third version (docs/study_v3.md) found ``hmpo`` worse than ``vanilla`` under async lag 1 and 2; this says why, by the
gradient-fidelity measurement of :mod:`hmpo_verl.lab.fidelity` taken at the states the study's runs pass
through. In each lag regime (``async_0``, ``async_1``, ``async_2``, ``async_4``: the sampler's parameters
``lag`` steps old, 4 mini-batch updates per step, the sampler's log-probs as the behaviour policy), vanilla
trains with the lean loop at its tuned learning rate (docs/study_v3_data/settings.csv) on ``--seeds``; before
every update of the ``--capture`` steps the trainer's state is frozen -- its parameters, the mini-batch (16
responses) sampled ``lag`` steps before, their sampling log-probs -- and every method's update on that
mini-batch (the exact gradient of its verl loss through the model, as in the training loop: bypass mode,
``vanilla_rc`` decoupled) is compared with

* ``iw``: the importance-weighted policy gradient at the current parameters with the true sampling log-probs,
  sum_t A r_t grad log pi(y_t) under seq-mean-token-mean (:func:`fidelity.iw_cotangent`, each method's own
  advantages): ``cosine`` and ``norm_ratio`` of the update to it;
* the **share carried by the most off-policy responses**: the mini-batch's quarter of responses with the largest
  mean absolute token log-ratio |log pi_theta - log pi_sample| is S; the update g = sum_i g_i splits over
  responses, and ``share_top`` = <sum_{i in S} g_i, g> / ||g||^2 (the responses' shares of ||g||^2 sum to 1),
  for each method and for ``iw`` itself (``share_top_iw``).

Every inner product is exact, <J^T v_a, J^T v_b> with J the mini-batch's per-token gradients
(:func:`fidelity.token_jacobian`). Intervals are 95 % t intervals over the (seed, captured step) units, each
the mean over the step's updates (the updates of one step share its batch and parameters; the captured steps of
one seed share a trajectory, so the intervals are somewhat narrower than independent runs would give).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from hmpo_verl.lab import fidelity, lean, stats
from hmpo_verl.lab.cpu_demo import REPO_ROOT
from hmpo_verl.lab.study import plan

LAGS = tuple(f"async_{k}" for k in lean.ASYNC_LAGS)
TOP_FRACTION = 0.25  # the share of a mini-batch's responses counted as its most off-policy
DATA_NAME, FIGURE_NAME = "lag_fidelity.csv", "lag_fidelity.png"
MINI_BATCH = lean.LoopSettings().prompts_per_step * lean.LoopSettings().n // lean.ASYNC_MINI_BATCHES  # responses/update
METHODS = plan.DISPLAY_ORDER  # the study's methods, in its order (the default, the figure's and the tables' order)


def sub_rollout(rollout: lean.Rollout, rows: torch.Tensor) -> lean.Rollout:
    """The rollout restricted to ``rows`` (every tensor indexed on its batch dimension)."""
    return lean.Rollout(*(t[rows] for t in (rollout.prompt_ids, rollout.prompt_mask, rollout.response_ids,
                                            rollout.response_mask, rollout.rollout_log_probs)))


def off_policy_top(delta: torch.Tensor, mask: torch.Tensor, fraction: float = TOP_FRACTION) -> torch.Tensor:
    """Boolean (B,): the ceil(fraction x B) responses with the largest mean |delta| over their valid tokens
    (delta, mask: (B, T)); responses without tokens rank last."""
    valid = mask.to(delta.dtype)
    score = (delta.abs() * valid).sum(-1) / valid.sum(-1).clamp(min=1)
    score = torch.where(valid.sum(-1) > 0, score, torch.tensor(-1.0, dtype=delta.dtype))
    top = torch.zeros(len(score), dtype=torch.bool)
    top[torch.topk(score, math.ceil(fraction * len(score))).indices] = True
    return top


def update_gram(cotangents: torch.Tensor, jac: torch.Tensor) -> torch.Tensor:
    """(K, K) float64 inner products <J^T v_a, J^T v_b> of the updates of cotangents (K, B, T), J the rows' token
    Jacobian (B*T, n_params) (:func:`fidelity.token_jacobian`). The updates are formed (K x n_params), which for
    K << B*T costs less than the kernel J J^T."""
    g = (cotangents.reshape(len(cotangents), -1).float() @ jac).double()
    return g @ g.T


def top_share(cotangent: torch.Tensor, top: torch.Tensor, jac: torch.Tensor) -> float:
    """<g_S, g> / ||g||^2 for g = J^T v and g_S its part from the responses ``top`` (B,) bool; ``cotangent`` v is
    (B, T) and ``jac`` the (B*T, n_params) J of the same rows. NaN when g = 0."""
    g = update_gram(torch.stack([cotangent, cotangent * top[:, None].to(cotangent.dtype)]), jac)
    return _share(g, 0, 1)


def _share(g: torch.Tensor, full: int, part: int) -> float:
    return float(g[full, part] / g[full, full]) if g[full, full] > 0 else math.nan


def measure_update(state: dict, methods: list[lean.Method], settings: lean.LoopSettings, eager) -> list[dict]:
    """Every method's update at one frozen trainer state (the keywords :func:`lean.train` passes ``observe``):
    one row per method with its cosine and norm ratio to ``iw`` and the shares carried by the most off-policy
    responses. ``eager``: a model of the same architecture with eager attention, loaded with the trainer's
    parameters here (the Jacobian's per-token gradients need it)."""
    eager.load_state_dict(state["model"].state_dict())
    eager.eval()
    rows, rollout = state["rows"], state["rollout"]
    part = sub_rollout(rollout, rows)
    mask = part.response_mask
    with torch.no_grad():
        now = lean.token_log_probs(eager, part)
    jac = fidelity.token_jacobian(eager, part)
    behaviour, recomputed = state["reported"][rows], state["recomputed"][rows]
    delta = torch.where(mask, now - behaviour, 0.0)
    top = off_policy_top(delta, mask)[:, None].to(now.dtype)
    gaps = lean.log_ratio_stats(delta, mask)
    vectors = []
    for m in methods:
        adv = lean.advantages(m, settings, state["scores"], rollout.response_mask, state["uids"],
                              lean.algo_config(m, settings))[rows]
        decoupled = m.rollout_is_threshold is not None  # bypass regimes: only rollout correction recomputes
        old = recomputed if decoupled else behaviour
        weights = lean.rollout_is_weights(m, recomputed, behaviour, mask)
        update = fidelity.loss_cotangent(m, lean.actor_config(m, settings), settings, now, old, adv, mask, weights)
        iw = fidelity.iw_cotangent(now, behaviour, adv, mask)
        vectors += [update, update * top, iw, iw * top]
    g = update_gram(torch.stack(vectors), jac)
    out = []
    for k, m in enumerate(methods):
        u, w = 4 * k, 4 * k + 2  # the update's and the reference's rows (each followed by its top part)
        ok = bool(g[u, u] > 0 and g[w, w] > 0)
        out.append({"method": m.name, "cosine": float(g[u, w] / (g[u, u] * g[w, w]).sqrt()) if ok else math.nan,
                    "norm_ratio": float((g[u, u] / g[w, w]).sqrt()) if ok else math.nan,
                    "share_top": _share(g, u, u + 1), "share_top_iw": _share(g, w, w + 1),
                    "log_ah_gap": gaps["log_ah_gap"], "delta_sd": gaps["delta_sd"]})
    return out


def measure(task: lean.Task, lags: list[str], seeds: list[int], capture: list[int], methods: list[lean.Method],
            lrs: dict[str, float], settings: lean.LoopSettings, out: Path) -> list[dict]:
    """One row per (lag, seed, step, update, method): vanilla trains ``max(capture)`` steps in each lag regime at
    ``lrs[lag]``; the updates of the ``capture`` steps are measured (:func:`measure_update`). Resumable: each
    trajectory's rows are kept in ``out`` (a file per lag, seed, capture steps and methods) and not measured again;
    the seeds run in the outer loop, so a stopped run has every lag at the same seeds."""
    import pandas as pd
    from tqdm import tqdm

    eager = lean.load_model(task.model_path, "eager")
    vanilla = lean.METHODS_BY_NAME["vanilla"]
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tqdm(total=len(lags) * len(seeds) * max(capture), desc="lag fidelity", unit="step", dynamic_ncols=True) as bar:
        for seed in seeds:
            for lag in lags:
                path = out / (f"{lag}_seed{seed}_steps{'-'.join(map(str, capture))}_"
                              f"{'-'.join(m.name for m in methods)}_lr{lrs[lag]:g}.csv")
                if path.exists():
                    rows += pd.read_csv(path).to_dict("records")
                    bar.update(max(capture))
                    continue
                run_rows = []

                def observe(step, update, lag=lag, seed=seed, run_rows=run_rows, **state):
                    if step in capture:
                        key = {"regime": lag, "lag": lean.REGIMES_BY_NAME[lag].lag, "seed": seed, "step": step,
                               "update": update % lean.REGIMES_BY_NAME[lag].mini_batches}
                        run_rows.extend({**key, **r} for r in measure_update(state, methods, settings, eager))

                start = time.time()
                lean.train(task, vanilla, lean.REGIMES_BY_NAME[lag], seed, max(capture),
                           replace(settings, lr=lrs[lag]), progress=lambda _: bar.update(1), observe=observe)
                for r in run_rows:
                    r["trajectory_wall_s"] = time.time() - start
                pd.DataFrame(run_rows).to_csv(path.with_suffix(".tmp"), index=False)
                path.with_suffix(".tmp").replace(path)
                rows += run_rows
    return rows


# ----------------------------------------------------------------------------- summary, figure, section


UNIT = ["seed", "step"]  # the unit of the intervals: one captured step of one trajectory


def per_unit(frame, value: str):
    """Each (regime, method, seed, step)'s mean of ``value`` over the step's captured updates (pandas frame)."""
    return frame.groupby(["regime", "method", *UNIT], sort=False)[value].mean().reset_index()


def summarize(frame, value: str) -> dict[tuple[str, str], tuple[float, float, float]]:
    """(regime, method) -> (mean, lo, hi): the 95 % t interval over the units' means of ``value``."""
    out = {}
    for (regime, method), g in per_unit(frame, value).groupby(["regime", "method"], sort=False):
        mean, half = stats.mean_ci([v for v in g[value] if math.isfinite(v)])
        out[(regime, method)] = (mean, mean - half, mean + half)
    return out


def paired(frame, value: str, a: str, b: str) -> dict[str, tuple[float, float, float]]:
    """regime -> the 95 % t interval over the units of method ``a`` minus ``b`` in ``value`` (paired on the same
    captured updates, then averaged per unit)."""
    wide = frame.pivot_table(index=["regime", "seed", "step", "update"], columns="method", values=value).reset_index()
    wide["d"] = wide[a] - wide[b]
    out = {}
    for regime, g in wide.groupby("regime", sort=False):
        mean, half = stats.mean_ci([d for d in g.groupby(UNIT)["d"].mean() if math.isfinite(d)])
        out[regime] = (mean, mean - half, mean + half)
    return out


def plot(frame, figures: Path) -> Path:
    """lag_fidelity.png: against the lag, (a) each method's cosine to ``iw``, (b) the share of its update carried
    by the most off-policy quarter of the mini-batch (``iw``'s own: the black dashed line), (c) its norm ratio to
    ``iw``. One line per method over the four lags of one mechanism; 95 % intervals over (seed, step) units."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hmpo_verl.lab.study.report import save_figure

    regimes = [r for r in LAGS if r in set(frame["regime"])]
    lags = [lean.REGIMES_BY_NAME[r].lag for r in regimes]
    methods = [m for m in METHODS if m in set(frame["method"])]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    cmap = plt.get_cmap("tab10")
    panels = (("cosine", "cosine(update, iw reference)"),
              ("share_top", f"share of ||g||² from the most off-policy {TOP_FRACTION:.0%}"),
              ("norm_ratio", "||update|| / ||iw reference||"))
    for ax, (value, label) in zip(axes, panels):
        s = summarize(frame, value)
        for i, m in enumerate(methods):
            rows = [s[(r, m)] for r in regimes]
            ax.errorbar([x + (i - len(methods) / 2) * 0.04 for x in lags], [r[0] for r in rows],
                        yerr=[[r[0] - r[1] for r in rows], [r[2] - r[0] for r in rows]], marker="o", capsize=2,
                        color=cmap(i), label=m, linewidth=2.2 if m in ("hmpo", "vanilla") else 1.2)
        if value == "share_top":
            ref = summarize(frame, "share_top_iw")
            ax.plot(lags, [ref[(r, "vanilla")][0] for r in regimes], "k--", label="iw reference")
        ax.set_xticks(lags, [f"{r}" for r in regimes])
        ax.set_xlabel("async lag (the study's regimes)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8)
    fig.suptitle("each method's update inside the study's async regimes (vanilla's trajectories; 95 % t over (seed, step))")
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    figures.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, figures / FIGURE_NAME, layout=False)


def _cell(t, digits=3, sign=False) -> str:
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    return f"{f.format(t[0])} [{f.format(t[1])}, {f.format(t[2])}]"


def section_lines(frame, meta: dict, figure: Path, docs: Path, data: Path) -> list[str]:
    """The section of v3's report (docs/study_v3.md; v4's report carries it too), generated from the data
    (``frame``: ``data``, lag_fidelity.csv) and ``meta`` (the command, versions, and what was captured, as stored in
    the csv's header comment); paths relative to ``docs``."""
    regimes = [r for r in LAGS if r in set(frame["regime"])]
    methods = [m for m in [*METHODS, *sorted(set(frame["method"]) - set(METHODS))]
               if m in set(frame["method"])]
    cos, share, norm = summarize(frame, "cosine"), summarize(frame, "share_top"), summarize(frame, "norm_ratio")
    share_iw = summarize(frame, "share_top_iw")
    gap = summarize(frame[frame["method"] == "vanilla"], "log_ah_gap")
    d_cos, d_share = paired(frame, "cosine", "hmpo", "vanilla"), paired(frame, "share_top", "hmpo", "vanilla")
    d_norm = paired(frame, "norm_ratio", "hmpo", "vanilla")
    units = frame.groupby(UNIT).ngroups
    per = frame.groupby(["regime", *UNIT])["update"].nunique().max()

    def table(s, digits=3):
        return ["| method | " + " | ".join(regimes) + " |", "|---|" + "---|" * len(regimes),
                *[f"| {m} | " + " | ".join(_cell(s[(r, m)], digits) for r in regimes) + " |" for m in methods]]

    lines = [
        f"Generated by `hmpo_verl.lab.lag_fidelity` from `{os.path.relpath(data, docs.parent)}`; do not edit by hand.",
        "",
        "```bash",
        meta["command"],
        "```",
        "",
        f"Versions: {meta['versions']}. {meta['machine']}",
        "",
        "What is measured: in each lag regime of the study, vanilla trains as in the study (the study's loop and "
        f"regime, its tuned lr: {meta['lrs']}) on seeds {meta['seeds']}; before each of the "
        f"{lean.ASYNC_MINI_BATCHES} mini-batch updates of steps {meta['capture']} the trainer's state is frozen and "
        f"every method's update on that mini-batch ({MINI_BATCH} responses "
        "sampled by the parameters `lag` steps old (in `async_0` the step's first update is on-policy, its later "
        "ones are not), their sampling log-probs the behaviour policy) is computed exactly "
        "(the gradient of its verl loss through the model) and compared with the importance-weighted policy gradient "
        "at the current parameters (`iw`: Σ_t A r_t ∇log π(y_t), r_t = π_θ / π_sample, seq-mean-token-mean, no clip; "
        "the gradient an unbiased correction follows). *Share*: the quarter of the mini-batch with the largest mean "
        "|log π_θ − log π_sample| per token is its most off-policy responses; their part g_S of the update g carries "
        "⟨g_S, g⟩ / ‖g‖² of it (the responses' shares sum to 1). Every state is vanilla's, so every method is measured "
        f"on the same data and parameters; 95 % t intervals over the {units} (seed, captured step) units of each lag, "
        f"each the mean over its {per} updates (the {frame['step'].nunique()} captured steps of a seed share a "
        "trajectory: the intervals "
        "are somewhat narrower than independent runs would give).",
        "",
        f"![lag fidelity]({os.path.relpath(figure, docs.parent)})",
        "",
        "Vanilla's own update `log_ah_gap` at the captured updates: " +
        ", ".join(f"{r} {_cell(gap[(r, 'vanilla')], 4)}" for r in regimes) + ".",
        "",
        "**Cosine of each method's update to `iw`:**",
        "",
        *table(cos),
        "",
        f"**Share of the update carried by the most off-policy {TOP_FRACTION:.0%} of responses** (the `iw` reference's "
        "own: " + ", ".join(f"{r} {_cell(share_iw[(r, 'vanilla')])}" for r in regimes) + "):",
        "",
        *table(share),
        "",
        "**Norm of each method's update relative to `iw`:**",
        "",
        *table(norm),
        "",
        "**hmpo − vanilla, paired on the same updates** (mean [95 % t over the units]):",
        "",
        "| regime | Δ cosine to iw | Δ share of the most off-policy quarter | Δ norm ratio |",
        "|---|---|---|---|",
        *[f"| {r} | {_cell(d_cos[r], 3, True)} | {_cell(d_share[r], 3, True)} | {_cell(d_norm[r], 3, True)} |"
          for r in regimes],
        "",
        *reading(regimes, share, share_iw, d_cos, d_share, d_norm),
    ]
    return lines


def reading(regimes, share, share_iw, d_cos, d_share, d_norm) -> list[str]:
    """The generated reading of hmpo - vanilla at each lag and the mechanism it supports, by rule: a difference
    is called higher or lower only where its interval excludes 0, and a statement about the lags is made only
    for the lags where it holds."""
    def sign(t):
        return "higher" if t[1] > 0 else "lower" if t[2] < 0 else "interval includes 0"

    out = ["**Reading (generated; a difference is called higher or lower only where its interval excludes 0).** "
           "hmpo − vanilla at each lag:", ""]
    for r in regimes:
        out.append(f"* `{r}`: cosine to `iw` {_cell(d_cos[r], 3, True)} ({sign(d_cos[r])}); share of the update from "
                   f"the most off-policy quarter {_cell(d_share[r], 3, True)} ({sign(d_share[r])}; means: hmpo "
                   f"{share[(r, 'hmpo')][0]:.3f}, vanilla {share[(r, 'vanilla')][0]:.3f}, `iw` "
                   f"{share_iw[(r, 'vanilla')][0]:.3f}); norm relative to `iw` {_cell(d_norm[r], 3, True)} "
                   f"({sign(d_norm[r])}).")
    names = lambda rs: ", ".join(f"`{r}`" for r in rs)  # noqa: E731
    # async_0 too: the later mini-batch updates of its steps are off-policy
    turned = [r for r in regimes if d_cos[r][2] < 0 and d_share[r][2] < 0]
    smaller = [r for r in regimes if d_norm[r][2] < 0]
    other = [r for r in regimes if r not in turned]
    if turned:
        text = (f"At {names(turned)}, hmpo's update points further from the importance-weighted gradient than "
                "vanilla's and takes less of itself from the most off-policy quarter of the responses (those the "
                "trainer has moved furthest from), while that quarter carries " +
                ", ".join(f"{share_iw[(r, 'vanilla')][0]:.2f}" for r in turned) + " of the importance-weighted "
                "gradient itself: hmpo discounts the responses an unbiased correction relies on most." +
                (f" At {names(other)} the measurement does not show both." if other else ""))
    else:
        text = ("At no lag does the measurement show hmpo's update both further from the importance-weighted "
                "gradient and drawing less from the most off-policy responses than vanilla's.")
    text += (f" At {names(smaller)} its update is also smaller relative to `iw` than vanilla's: at the same learning "
             "rate it moves less per step (a final reward taken while the curves still rise measures how fast a method "
             "learns)."
             if smaller else " Its size relative to `iw` is not distinguished from vanilla's at any lag.")
    out += ["", "**The mechanism, as measured (generated by the same rule).** " + text]
    return out


def read_data(path: Path):
    """lag_fidelity.csv and its header's metadata (``# key: value`` lines before the table)."""
    import pandas as pd

    if not path.exists():
        raise SystemExit(f"--from-data: {path} not found; measure it first: python -m hmpo_verl.lab.lag_fidelity")
    meta = {}
    with open(path) as f:
        for line in f:
            if not line.startswith("# "):
                break
            key, _, value = line[2:].rstrip("\n").partition(": ")
            meta[key] = value
    return pd.read_csv(path, comment="#"), meta


def write_data(path: Path, rows: list[dict], meta: dict) -> None:
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(f"# {k}: {v}\n" for k, v in meta.items())
        pd.DataFrame(rows).to_csv(f, index=False, float_format="%.6g")


def render(data: Path, docs: Path, figures: Path) -> list[str]:
    """The section's lines and its figure, from ``data`` alone (what ``--from-data`` does)."""
    frame, meta = read_data(data)
    return section_lines(frame, meta, plot(frame, figures), docs, data)


def update_docs(docs: Path, lines: list[str]) -> None:
    """Replace the section's block in ``docs`` (between START and END); loud when the block is absent."""
    from hmpo_verl.lab.study.report import LAG_END, LAG_START, update_readme

    if not update_readme(docs, lines, LAG_START, LAG_END):
        raise SystemExit(f"{docs} has no {LAG_START} ... {LAG_END} block; regenerate it with python -m hmpo_verl.lab.study "
                         "--from-data (its template has the block), then run this again")


def main(argv=None) -> int:
    from hmpo_verl.lab.study.report import LAG_END, LAG_START, versions_text

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m hmpo_verl.lab.lag_fidelity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--from-data", action="store_true", help="no measurement: the section and figure from --docs' data")
    parser.add_argument("--quick", action="store_true", help="smoke run: async_0 and async_2, 1 seed, steps 2-3, 4 methods, under --out")
    parser.add_argument("--seeds", type=int, default=6, help="vanilla trajectories per lag (seeds 1..n; default 6)")
    parser.add_argument("--capture", type=int, nargs="+", default=[10, 20, 30], help="the steps whose updates are measured")
    parser.add_argument("--methods", nargs="+", choices=list(lean.METHODS_BY_NAME), default=None,
                        help="default: the study's (plan.DISPLAY_ORDER)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(REPO_ROOT / "outputs" / "lag_fidelity"),
                        help="each trajectory's measured rows (the run resumes from them)")
    parser.add_argument("--docs", default=None, help="the study report whose block is rewritten (default v3's, docs/study_v3.md)")
    args = parser.parse_args(argv)
    if args.seeds < 1 or min(args.capture) < 1:
        parser.error(f"--seeds={args.seeds} --capture={args.capture} are invalid; allowed: integers >= 1")
    docs = Path(args.docs) if args.docs else (Path(args.out) / "study.md" if args.quick else plan.REPORT)
    data = docs.parent / f"{docs.stem}_data" / DATA_NAME
    figures = docs.parent / f"{docs.stem}_figures"
    if not args.from_data:
        torch.set_num_threads(args.threads)
        lags, seeds, capture = (["async_0", "async_2"], [1], [2, 3]) if args.quick else (
            list(LAGS), list(range(1, args.seeds + 1)), sorted(args.capture))
        names = args.methods or (["vanilla", "hmpo", "gspo", "vanilla_rc"] if args.quick else list(METHODS))
        task = lean.load_task("fibonacci", None, log=lambda *a: print(*a, flush=True))
        settings = lean.LoopSettings(max_response_length=task.max_response_length)
        lrs = study_lrs(lags)
        rows = measure(task, lags, seeds, capture, [lean.METHODS_BY_NAME[m] for m in names], lrs, settings,
                       Path(args.out))
        wall = sum({(r["regime"], r["seed"]): r["trajectory_wall_s"] for r in rows}.values())
        meta = {"command": " ".join(["python -m hmpo_verl.lab.lag_fidelity", *argv]),
                "versions": versions_text(),
                "machine": f"{os.cpu_count()} CPU cores shared with other work (load average "
                           f"{os.getloadavg()[0]:.1f} at the end); the trajectories took {wall / 60:.1f} min.",
                "seeds": " ".join(map(str, seeds)), "capture": " ".join(map(str, capture)),
                "lrs": " ".join(f"{k}={v:g}" for k, v in lrs.items())}
        write_data(data, rows, meta)
        if args.quick and not docs.exists():
            docs.parent.mkdir(parents=True, exist_ok=True)
            docs.write_text(f"{LAG_START}\n{LAG_END}\n")
    lines = render(data, docs, figures)
    update_docs(docs, lines)
    print("\n".join(lines))
    print(f"wrote {data}, {figures / FIGURE_NAME} and the section of {docs}")
    return 0


def study_lrs(lags: list[str]) -> dict[str, float]:
    """vanilla's tuned lr in each lag regime (v3's docs/study_v3_data/settings.csv: what its study runs used)."""
    import pandas as pd

    frame = pd.read_csv(plan.DATA / "settings.csv")
    out = {}
    for lag in lags:
        row = frame[(frame["regime"] == lag) & (frame["method"] == "vanilla")]
        if row.empty:
            raise SystemExit(f"{plan.DATA / 'settings.csv'} has no vanilla setting for {lag}; allowed lags: {LAGS}")
        out[lag] = float(row["lr"].iloc[0])
    return out


if __name__ == "__main__":
    sys.exit(main())
