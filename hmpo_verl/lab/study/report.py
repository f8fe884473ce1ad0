"""The study's report: tables, figures, the generated guide, and docs/study.md.

Everything here is a function of the analysis' rows: re-running the study command on finished
runs regenerates the report, the figures, the data files and (with ``--readme``) the README's
generated guide block, with no hand editing.
"""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path

from hmpo_verl.lab import lean, stats
from hmpo_verl.lab.study import analysis
from hmpo_verl.lab.study.plan import MARGIN, P_METHODS, preregistration_text

GUIDE_START, GUIDE_END = "<!-- study-guide:start -->", "<!-- study-guide:end -->"
FIGURE_METHODS = (*P_METHODS, "adaptive", "apmpo")  # lines of the mechanism figure


def _f(x, digits=3, sign=False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _ci(row, digits=3) -> str:
    return f"{_f(row['diff'], digits, True)} [{_f(row['lo'], digits, True)}, {_f(row['hi'], digits, True)}]"


def _p(x) -> str:
    return "—" if not math.isfinite(x) else f"{x:.2g}"


def versions() -> dict:
    from importlib.metadata import version

    import torch
    import transformers

    return {"hmpo-verl": version("hmpo-verl"), "verl": version("verl"), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": sys.version.split()[0]}


def save_figure(fig, path: Path) -> Path:
    """Lay out, write (PNG, 100 dpi) and close a report figure; returns its path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- tables


def methods_table(methods: list[str]) -> list[str]:
    return ["| method | settings | what |", "|---|---|---|",
            *[f"| {m} | {lean.METHODS_BY_NAME[m].settings()} | {lean.METHODS_BY_NAME[m].note} |" for m in methods]]


def regimes_table(regimes: list[str], measured: list[dict]) -> list[str]:
    by = {m["regime"]: m for m in measured}
    lines = ["| regime | updates per step | what | update `log_ah_gap` (all runs; vanilla; methods' range) | update δ sd | "
             "update δ 99.9th pct of abs | behaviour mismatch sd / 99.9th pct | routing flips |",
             "|---|---|---|---|---|---|---|---|"]
    for name in regimes:
        r, m = lean.REGIMES_BY_NAME[name], by.get(name)
        if m is None:
            lines.append(f"| {name} | {r.updates_per_step} | {r.note} | — | — | — | — | — |")
            continue
        lines.append(f"| {name} | {r.updates_per_step} | {r.note} | {_f(m['update/log_ah_gap'], 4)}; "
                     f"{_f(m['vanilla_gap'], 4)}; {_f(m['gap_min'], 4)}–{_f(m['gap_max'], 4)} | "
                     f"{_f(m['update/delta_sd'], 4)} | {_f(m['update/delta_abs_p999'], 3)} | "
                     f"{_f(m['mismatch/delta_sd'], 4)} / {_f(m['mismatch/delta_abs_p999'], 3)} | "
                     f"{_f(m['routing/flip_frac'], 4)} |")
    return lines


def settings_table(chosen: dict, regimes: list[str], methods: list[str]) -> list[str]:
    lines = ["| regime | method | chosen lr | tuning score (final train-prompt reward) per lr [collapsed runs] | "
             "largest stable lr |", "|---|---|---|---|---|"]
    for regime in regimes:
        for method in methods:
            c = chosen.get((regime, method))
            if c is None:
                continue
            grid = ", ".join(f"{lr:g}: {_f(c['scores'][lr])} [{c['collapsed'][lr]}/{c['seeds'][lr]}]"
                             for lr in sorted(c["scores"]))
            stable = "none" if c["largest_stable_lr"] is None else f"{c['largest_stable_lr']:g}"
            if c["largest_stable_lr"] is not None and c["largest_stable_lr"] == max(c["scores"]):
                stable += " (the grid's largest)"
            lines.append(f"| {regime} | {method} | {c['lr']:g} | {grid} | {stable} |")
    return lines


def primary_table(prim: list[dict], questions) -> list[str]:
    text = {q.id: q for q in questions}
    lines = ["| question | n | estimate [95 % CI] | p (Holm) | TOST p (Holm) | MDE (80 % power) | verdict |",
             "|---|---|---|---|---|---|---|"]
    for r in prim:
        q = text[r["id"]]
        if r["kind"] == "trend":
            est = f"rho = {_f(r['rho'], 2, True)} over {r['n']} regimes"
            lines.append(f"| {r['id']} | {r['n']} | {est} | {_p(r['p_holm'])} | — | — | {r['verdict']} |")
        else:
            what = f"{q.a} − {q.b}"
            lines.append(f"| {r['id']} ({what}) | {r['n']} | {_ci(r)} | {_p(r['p_holm'])} | {_p(r['p_tost_holm'])} | "
                         f"{_f(r['mde'])} | {r['verdict']} |")
    return lines


def results_table(rows: list[dict], comps: list[dict], regimes: list[str], methods: list[str]) -> list[str]:
    """Per regime and method: mean ± 95 % t half-width over seeds, and the paired difference from vanilla."""
    by = {(c["regime"], c["method"]): c for c in comps}
    lines = ["| regime | method | seeds | held-out final (mean ± 95 % CI half-width) | Δ held-out vs vanilla [95 % CI] "
             "| MDE | train-prompt final (± 95 % CI) | held-out AUC (± 95 % CI) | collapsed |",
             "|---|---|---|---|---|---|---|---|---|"]
    for regime in regimes:
        for method in methods:
            rs = [r for r in rows if r["regime"] == regime and r["method"] == method]
            if not rs:
                continue

            def pm(key):
                mean, half = stats.mean_ci([r[key] for r in rs])
                return f"{_f(mean)} ± {_f(half)}"

            c = by.get((regime, method))
            lines.append(f"| {regime} | {method} | {len(rs)} | {pm('final_heldout')} | {_ci(c) if c else '—'} | "
                         f"{_f(c['mde']) if c else '—'} | {pm('final_train')} | {pm('auc_heldout')} | "
                         f"{sum(r['collapsed'] for r in rs)}/{len(rs)} |")
    return lines


def confirmation_lines(conf: list[dict], need: list[dict], regime: str, trainer: str, flag: str,
                       tried: list[dict], planned: int, steps: int, diffs: list[dict] = ()) -> list[str]:
    """The confirmation of ``regime`` on verl's ``trainer`` (hmpo_verl.lab.cpu_demo.TRAINERS): the Welch /
    equivalence table when both sides have two runs per method, then the methods' differences from vanilla
    on each side (``diffs``: analysis.confirmation_differences); else what a confirmation would need
    (``need``: the lean side's spread) and the cost of the trainer runs made; ``flag`` runs it. ``tried``: a row
    per trainer run tried (``finished``, ``wall_s``); ``planned``: the runs ``flag`` would make when none was."""
    from hmpo_verl.lab.cpu_demo import TRAINERS

    head = [f"### `{regime}` on verl's {trainer} trainer (`python -m {TRAINERS[trainer].module}`)", ""]
    cost = ""
    finished = [r for r in tried if r["finished"]]
    if finished:
        wall = [r["wall_s"] for r in finished]
        cost = (f" A trainer run of {steps} steps took {min(wall) / 60:.1f}–{max(wall) / 60:.1f} min here "
                "(start-up included).")
    if not conf:
        status = (f"Not run (`{flag}` runs it: {planned} runs of {steps} steps)." if not tried else
                  f"{len(finished)} of {len(tried)} trainer runs finished: too few per method for a comparison.")
        lines = [*head, status + cost]
        if need:
            lines += ["", f"What the reward comparison would need (equivalence margin ±{analysis.CONFIRM_REWARD_MARGIN} "
                      "on the final training reward, if the trainer's runs varied as much as the lean loop's): " +
                      "; ".join(f"`{n['method']}` sd {_f(n['sd'])} over {n['lean_runs']} lean runs → "
                                f"{n['runs_needed']} runs per side" for n in need) + "."]
        return lines
    lines = [*head, f"Regime `{regime}` on verl's {trainer} trainer (CPU backend) vs the first {steps} steps of the "
             f"lean loop's evaluation runs; trainer runs finished: {len(finished)} of {len(tried)}.{cost} Unpaired (the "
             "sampling streams differ): Welch's interval of trainer − lean, and the equivalence test within the margin "
             f"(rewards ±{analysis.CONFIRM_REWARD_MARGIN}; loss metrics ±{analysis.CONFIRM_RELATIVE_MARGIN:.0%} of the "
             "lean mean). *inconclusive* means neither equivalence nor a difference was shown: not rejecting is not "
             "agreement.", "",
             "| method | metric | runs (trainer, lean) | trainer − lean [95 % CI] | margin | TOST p | runs per side "
             "for the margin | verdict |", "|---|---|---|---|---|---|---|---|"]
    for c in conf:
        lines.append(f"| {c['method']} | {c['metric']} | {c['trainer_runs']}, {c['lean_runs']} | {_ci(c, 4)} | "
                     f"±{c['margin']:.3g} | {_p(c['p_tost'])} | {c['runs_needed']} | {c['verdict']} |")
    if diffs:
        lines += ["", "Exploratory (uncorrected): each method − `vanilla` on each side, Welch's 95 % interval on both "
                  "(the lean side unpaired too, so the two read alike). Does the trainer show the lean loop's "
                  "differences between methods?", "",
                  "| method − vanilla | metric | trainer: runs | trainer [95 % CI] | p | lean: runs | lean [95 % CI] | p |",
                  "|---|---|---|---|---|---|---|---|"]
        for d in diffs:
            t, le = d["trainer"], d["lean"]
            lines.append(f"| {d['method']} | {d['metric']} | {t['runs'][0]}, {t['runs'][1]} | {_ci(t, 4)} | "
                         f"{_p(t['p'])} | {le['runs'][0]}, {le['runs'][1]} | {_ci(le, 4)} | {_p(le['p'])} |")
    return lines


# ----------------------------------------------------------------------------- figures


def plot_rewards(curves_by_key: dict, regimes, methods, figures: Path) -> Path:
    """Held-out expected reward after each step, per regime: mean over seeds, band = 95 % t interval.
    ``curves_by_key[(regime, method)]``: one list of per-step rewards per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cols = min(4, len(regimes))
    rows_n = math.ceil(len(regimes) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 3.8 * rows_n), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ax, regime in zip(axes.flat, regimes):
        for i, method in enumerate(methods):
            if not curves_by_key.get((regime, method)):
                continue
            curves = np.array(curves_by_key[(regime, method)])
            x = np.arange(1, curves.shape[1] + 1)
            mean = curves.mean(0)
            ax.plot(x, mean, label=method, color=cmap(i % 10), linewidth=2.4 if method == "vanilla" else 1.2)
            if len(curves) > 1:
                half = stats.t_quantile(0.95, len(curves) - 1) * curves.std(0, ddof=1) / np.sqrt(len(curves))
                ax.fill_between(x, mean - half, mean + half, color=cmap(i % 10), alpha=0.08)
        ax.set_title(regime)
        ax.set_xlabel("training step")
        ax.set_ylabel("held-out expected reward")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(regimes):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, ncol=2)
    fig.suptitle("held-out expected reward after each step (evaluation seeds; band = 95 % t interval)")
    return save_figure(fig, figures / "reward.png")


def plot_mechanism(mech: list[dict], figures: Path) -> Path:
    """Paired held-out difference from vanilla against the regime's measured update log_ah_gap, one line per p."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5))
    cmap = plt.get_cmap("coolwarm")
    colors = {m: cmap(i / max(1, len(P_METHODS) - 1)) for i, m in enumerate(P_METHODS)}
    colors.update({"adaptive": "tab:green", "apmpo": "tab:purple"})
    for method in FIGURE_METHODS:
        pts = sorted((r for r in mech if r["method"] == method), key=lambda r: r["gap"])
        if not pts:
            continue
        label = f"p = {P_METHODS[method]:g} ({method})" if method in P_METHODS else method
        x = [r["gap"] for r in pts]
        ax.errorbar(x, [r["diff"] for r in pts], yerr=[[r["diff"] - r["lo"] for r in pts], [r["hi"] - r["diff"] for r in pts]],
                    marker="o", capsize=2, label=label, color=colors[method], linewidth=1.2, alpha=0.9)
    for r in {r["regime"]: r for r in mech}.values():
        ax.annotate(r["regime"], (r["gap"], 0), textcoords="offset points", xytext=(0, -14), fontsize=7, ha="center",
                    rotation=30)
    ax.axhline(0, color="k", linewidth=0.8)
    ax.axhspan(-MARGIN, MARGIN, color="grey", alpha=0.12, label=f"±{MARGIN} (equivalence margin)")
    ax.set_xscale("log")
    ax.set_xlabel("regime's measured update log_ah_gap (mean over its runs; log scale)")
    ax.set_ylabel("held-out final reward − vanilla (paired, 95 % CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("difference from vanilla (p = 1) against the regime's measured gap")
    return save_figure(fig, figures / "mechanism.png")


# ----------------------------------------------------------------------------- guide


def guide_lines(mech: list[dict], measured: list[dict], prim: list[dict]) -> list[str]:
    """What the data show per range of the measured gap: per regime, sorted by its gap, every method whose
    held-out difference from vanilla excludes 0 (exploratory, uncorrected), else that none does; and the
    primary verdicts. Generated: no selection beyond the interval's sign."""
    gaps = {m["regime"]: m["update/log_ah_gap"] for m in measured}
    lines = []
    for regime in sorted({r["regime"] for r in mech}, key=lambda r: gaps.get(r, math.inf)):
        rs = [r for r in mech if r["regime"] == regime]
        out = [r for r in rs if r["lo"] > 0 or r["hi"] < 0]
        parts = ("; ".join(f"`{r['method']}` {_ci(r)}" for r in sorted(out, key=lambda r: -r["diff"]))
                 if out else "no method's interval excludes 0")
        widest = max((r["hi"] - r["lo"]) / 2 for r in rs)
        lines.append(f"* gap {_f(gaps.get(regime), 4)} (`{regime}`): {parts} (uncorrected; intervals up to ±{_f(widest)}).")
    decided = [r for r in prim if r["verdict"] != "undecided"]
    lines.append("* Primary questions decided after Holm: " + ("; ".join(f"{r['id']} {r['verdict']}" for r in decided)
                                                            if decided else "none") + ".")
    return lines


def update_readme(readme: Path, block: list[str]) -> bool:
    """Replace the README's generated guide block (between the markers); False if the markers are absent."""
    text = readme.read_text()
    pattern = re.compile(re.escape(GUIDE_START) + r".*?" + re.escape(GUIDE_END), re.S)
    if not pattern.search(text):
        return False
    readme.write_text(pattern.sub(lambda _: "\n".join([GUIDE_START, *block, GUIDE_END]), text))
    return True


# ----------------------------------------------------------------------------- docs/study.md


def empty_context(plan, args, task) -> dict:
    """The report's context before any run: the plan, its methods and regimes, no results."""
    from hmpo_verl.lab.study.plan import DISPLAY_ORDER, primary_questions

    settings = lean.LoopSettings(max_response_length=task.max_response_length, eval_prompts=plan.eval_prompts)
    return {"plan": plan, "settings": settings, "task": args.task, "missing": 0, "done": 0, "planned": 0,
            "commands": ["python -m hmpo_verl.lab.study --readme",
                         "python -m hmpo_verl.lab.study --report-only --confirm --confirm-async"],
            "parallel": args.parallel, "cpu_minutes": 0.0, "heldout": task.test,
            "methods": [m for m in DISPLAY_ORDER if m in plan.methods], "regimes": list(plan.regimes), "measured": [],
            "chosen": {}, "primaries": [], "questions": primary_questions(), "eval_rows": [], "comps": [],
            "figures": {}, "guide": [], "confirmation": ["Not run yet."]}



def write_docs(path: Path, ctx: dict) -> None:
    rel = lambda p: os.path.relpath(p, path.parent)  # noqa: E731
    plan, s = ctx["plan"], ctx["settings"]
    lines = [
        "# Comparative study: when does the choice of mean matter?",
        "",
        "Generated by `python -m hmpo_verl.lab.study`; every number below comes from the runs it made. Do not edit "
        "by hand (the pre-registration section is fixed in `hmpo_verl/lab/study/plan.py`).",
        "",
        "```bash",
        *ctx["commands"],
        "```",
        "",
    ]
    if ctx["missing"]:
        lines += [f"**PARTIAL**: {ctx['done']} of the {ctx['planned']} planned runs are finished ({ctx['missing']} "
                  "missing). The tables use the finished runs only; run the command again to resume.", ""]
    if not ctx["eval_rows"]:
        lines += ["**No results yet**: the main run has not been made. The plan and the questions below were "
                  "registered before it.", ""]
    lines += [
        f"Versions: {', '.join(f'{k} {v}' for k, v in versions().items())}. Runs: one thread each, "
        f"{ctx['parallel']} at a time on {os.cpu_count()} CPU cores; {ctx['cpu_minutes']:.0f} CPU-minutes of runs in all.",
        "",
        preregistration_text(),
        "## How it runs",
        "",
        f"Task `{ctx['task']}` (41-token answers). Each run is the lean loop of `hmpo_verl/lab/lean.py`: a directly "
        "driven HF model, KV-cached sampling, and per update exactly verl's registered policy loss "
        "(`get_policy_loss_fn(loss_mode)`) on a real `ActorConfig` with `global_batch_info` as verl's `ppo_loss` "
        "fills it, verl's `agg_loss`, verl's advantage estimators and rollout correction. "
        f"{s.prompts_per_step} prompts x {s.n} samples per step, {plan.steps} steps, AdamW (weight decay "
        f"{s.weight_decay}), grad-norm clip {s.grad_clip}, `loss_agg_mode={s.loss_agg_mode}`, clip {s.clip_ratio} "
        "unless the method sets its own. The learning rate is each method's own (below).",
        "",
        f"**Held-out evaluation.** The task's {len(ctx['heldout'])} test pairs are removed from the RL training "
        "prompts (the warm start, a supervised fit on random problems, saw every pair, as pretraining would). After "
        f"every step the *exact* expected reward of temperature-1 sampling is computed on the first {plan.eval_prompts} "
        f"held-out prompts and on {plan.eval_prompts} training prompts (one teacher-forced pass each: no evaluation noise).",
        "",
        "## Methods",
        "",
        *methods_table(ctx["methods"]),
        "",
        "## Regimes and their measured drift",
        "",
        "*update δ* = log π_θ − log π_old as each update's loss saw it (all updates, all steps); *behaviour "
        "mismatch* = the trainer's log-probs (current parameters, fp32) − the sampler's, on the sampled tokens; "
        "*routing flips* = share of (layer, position) routes where the trainer's own gate picks other experts than the "
        "sampler did, over the positions that predict a response token (under routing replay: the picks replay overrides). "
        "Means over the regime's evaluation runs.",
        "",
        *regimes_table(ctx["regimes"], ctx["measured"]),
        "",
        "## Each method's setting (tuning seeds)",
        "",
        *settings_table(ctx["chosen"], ctx["regimes"], ctx["methods"]),
        "",
        "## Primary questions (answered)",
        "",
        *(primary_table(ctx["primaries"], ctx["questions"]) if ctx["eval_rows"] else ["Not answered yet."]),
        "",
        "## The mechanism",
        "",
        *([f"![mechanism]({rel(ctx['figures']['mechanism'])})", "",
           "Each point: one regime (x = its measured update `log_ah_gap`) and one method; y = its held-out final "
           "reward minus vanilla's, paired over the evaluation seeds, with the 95 % interval; the grey band is the "
           "equivalence margin."] if "mechanism" in ctx["figures"] else ["Not drawn yet."]),
        "",
        "## What the data show, by measured gap (the README's guide)",
        "",
        *(ctx["guide"] or ["Not available yet."]),
        "",
        "## All results (exploratory)",
        "",
        *([f"![reward]({rel(ctx['figures']['reward'])})", ""] if "reward" in ctx["figures"] else []),
        "*± is the half-width of the 95 % t interval over seeds*; Δ is the paired difference from vanilla (seed by "
        "seed) with its 95 % interval, uncorrected; MDE = minimum detectable effect of that paired comparison at 80 % "
        "power (two-sided, 0.05).",
        "",
        *results_table(ctx["eval_rows"], ctx["comps"], ctx["regimes"], ctx["methods"]),
        "",
        "## Confirmation on verl's real trainers",
        "",
        "Two regimes run on verl's own trainers with the lean loop's settings (the methods' tuned learning rates, "
        "the training prompts without the held-out ones): `async_0` on the synchronous trainer and `async_1` on the "
        "one-step-off trainer, whose every batch is sampled by the weights one step old, as the lean loop's lag 1 "
        "(bypass mode: the rollout's log-probs are the old log-probs). verl's fully-async trainer mixes lags within "
        "a step (at staleness 0.5 about half its samples at lag 0 and half at lag 1; README, "
        "`python -m hmpo_verl.lab.async_report`), which no single `async_k` regime reproduces; `async_2` and "
        "`async_4` have no verl trainer that holds the lag fixed.",
        "",
        *ctx["confirmation"],
        "",
        "## Data",
        "",
        "`docs/study_data/`: `runs.csv` (one row per run, both phases: outcomes and measured log-ratios), "
        "`steps.csv.gz` (per-step metrics of the evaluation runs), `settings.csv` (tuning), `primaries.csv`, "
        "`comparisons.csv`, `regimes.csv`, `mechanism.csv`, `confirm_async_0.csv` / `confirm_async_1.csv` (when run).",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
