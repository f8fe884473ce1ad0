"""The study's report: tables, figures, the generated guide, and v3's report (docs/study_v3.md; v4's is v4.py's).

Everything here is a function of the analysis' rows: re-running the study command on finished
runs regenerates the report, the figures, the data files and (with ``--readme``) the README's
generated guide block, with no hand editing.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

from hmpo_verl.lab import lean, stats
from hmpo_verl.lab.study import analysis
from hmpo_verl.lab.study.plan import MARGIN, MECHANISMS, P_METHODS, REPORT, preregistration_text

GUIDE_START, GUIDE_END = "<!-- study-guide:start -->", "<!-- study-guide:end -->"
SCOPE_START, SCOPE_END = "<!-- study-scope:start -->", "<!-- study-scope:end -->"  # the README's scope paragraph
# v3's report's block of the lag-fidelity section (hmpo_verl.lab.lag_fidelity writes it, from its data)
LAG_START, LAG_END = "<!-- lag-fidelity:start -->", "<!-- lag-fidelity:end -->"


def _f(x, digits=3, sign=False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _ci(row, digits=3) -> str:
    return f"{_f(row['diff'], digits, True)} [{_f(row['lo'], digits, True)}, {_f(row['hi'], digits, True)}]"


def _p(x) -> str:
    return "—" if not math.isfinite(x) else f"{x:.2g}"


def versions() -> dict:
    """The packages a report's figures came from, and the CPU model: another one rounds differently, so a
    supervised fit (the tasks' and the study's warm starts) ends at other weights and every figure moves."""
    from importlib.metadata import version

    import torch
    import transformers

    return {"hmpo-verl": version("hmpo-verl"), "verl": version("verl"), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": sys.version.split()[0], "cpu": cpu_model()}


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo; elsewhere what platform reports)."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def versions_text() -> str:
    """:func:`versions` as a report writes them: "hmpo-verl 0.1.0, verl 0.9.1, ..."."""
    return ", ".join(f"{k} {v}" for k, v in versions().items())


def save_figure(fig, path: Path, layout: bool = True) -> Path:
    """Lay out (unless the caller did), write (PNG, 100 dpi) and close a report figure; returns its path."""
    import matplotlib.pyplot as plt

    if layout:
        fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_run_tables(data_dir: Path, runs: list[dict], steps: list[dict]) -> None:
    """A report's run data: ``runs.csv`` (a row per run) and ``steps.csv.gz`` (a row per run and step), 6
    significant digits; gzip's mtime 0, so equal data give an equal file (no churn in git)."""
    import pandas as pd

    data_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(runs).to_csv(data_dir / "runs.csv", index=False, float_format="%.6g")
    pd.DataFrame(steps).to_csv(data_dir / "steps.csv.gz", index=False, float_format="%.6g",
                               compression={"method": "gzip", "mtime": 0})


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


def results_table(rows: list[dict], comps: list[dict], regimes: list[str], methods: list[str],
                  unit: str = "seeds") -> list[str]:
    """Per regime and method: mean ± 95 % t half-width over ``unit`` (runs), and the paired difference from
    vanilla."""
    by = {(c["regime"], c["method"]): c for c in comps}
    lines = [f"| regime | method | {unit} | held-out final (mean ± 95 % CI half-width) | Δ held-out vs vanilla [95 % CI] "
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


def plot_rewards(curves_by_key: dict, regimes, methods, figures: Path, unit: str = "evaluation seeds") -> Path:
    """Held-out expected reward after each step, per regime: mean over ``unit``, band = 95 % t interval.
    ``curves_by_key[(regime, method)]``: one list of per-step rewards per seed (per ``unit``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cols = min(4, len(regimes))
    rows_n = math.ceil(len(regimes) / cols)
    # at least 9.2 inches wide: the title and the one legend fit above and below a single panel
    fig, axes = plt.subplots(rows_n, cols, figsize=(max(9.2, 4.6 * cols), 3.8 * rows_n), squeeze=False)
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
    handles = {}  # one legend for every panel: each method once, in the methods' order
    for ax in axes.flat:
        handles.update(zip(*reversed(ax.get_legend_handles_labels())))
    fig.suptitle(f"held-out expected reward after each step (mean over {unit}; band = 95 % t interval)")
    fig.legend([handles[m] for m in methods if m in handles], [m for m in methods if m in handles],
               loc="lower center", ncol=len(handles), fontsize=9, bbox_to_anchor=(0.5, 0.0))
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return save_figure(fig, figures / "reward.png", layout=False)


def _name_regimes(ax, pts: list[dict], colors: dict) -> None:
    """Each point's regime written upright at the foot of ``ax`` at its x (log gap); a name whose gap is within
    3 % of the axis' log span from the one before is set 8 points further right (async_1 and epochs_4 share a gap)."""
    named = sorted((r for r in pts if r["vanilla_gap"] > 0), key=lambda r: r["vanilla_gap"])
    span = math.log10(named[-1]["vanilla_gap"] / named[0]["vanilla_gap"]) if named else 0.0
    previous, shift = -math.inf, 0
    for r in named:
        x = math.log10(r["vanilla_gap"])
        shift = shift + 8 if x - previous < 0.03 * span else 0
        previous = x
        ax.annotate(r["regime"], (r["vanilla_gap"], 0), xycoords=("data", "axes fraction"), xytext=(shift, 3),
                    textcoords="offset points", rotation=90, ha="center", va="bottom", fontsize=7,
                    color=colors[MECHANISMS[r["regime"]]])


def plot_mechanism(mech: list[dict], methods: list[str], figures: Path) -> Path:
    """Paired held-out difference from vanilla against vanilla's own measured update log_ah_gap: one panel
    per method (``methods``, vanilla excluded), one point per regime coloured by its mechanism
    (``MECHANISMS``) and named in the first panel; only the async lags, one mechanism's series, are joined by a
    line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    methods = [m for m in methods if any(r["method"] == m for r in mech)]
    cols = min(4, len(methods))
    rows_n = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(max(9.2, 4.2 * cols), 3.6 * rows_n + 0.4), squeeze=False,
                             sharex=True, sharey=True)  # (at least 9.2 inches: the title fits over few panels)
    kinds = list(dict.fromkeys(MECHANISMS[r["regime"]] for r in mech))
    gaps = {r["vanilla_gap"] for r in mech if r["vanilla_gap"] > 0}
    colors = {k: plt.get_cmap("tab10")(i) for i, k in enumerate(kinds)}
    for ax, method in zip(axes.flat, methods):
        pts = [r for r in mech if r["method"] == method]
        for kind in kinds:
            ps = sorted((r for r in pts if MECHANISMS[r["regime"]] == kind), key=lambda r: r["vanilla_gap"])
            if not ps:
                continue
            ax.errorbar([r["vanilla_gap"] for r in ps], [r["diff"] for r in ps],
                        yerr=[[r["diff"] - r["lo"] for r in ps], [r["hi"] - r["diff"] for r in ps]],
                        marker="o", capsize=2, color=colors[kind], label=kind,
                        linestyle="-" if kind == "async staleness" else "none", linewidth=1.0)
        if ax is axes.flat[0]:  # the regimes named once (a regime's x is the same in every panel)
            _name_regimes(ax, pts, colors)
        ax.axhline(0, color="k", linewidth=0.8)
        ax.axhspan(-MARGIN, MARGIN, color="grey", alpha=0.12)
        ax.set_xscale("log")
        if len(gaps) == 1:  # one regime so far: a decade around it (a log axis cannot span one point)
            ax.set_xlim(min(gaps) / 3, min(gaps) * 3)
        ax.set_title(f"{method} (p = {P_METHODS[method]:g})" if method in P_METHODS else method, fontsize=10)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("vanilla's update log_ah_gap (log)")
    for ax in axes[:, 0]:
        ax.set_ylabel("held-out final − vanilla")
    handles = {}
    for ax in axes.flat:
        handles.update(zip(*reversed(ax.get_legend_handles_labels())))
    handles[f"±{MARGIN} (equivalence margin)"] = Patch(color="grey", alpha=0.25)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=len(handles), fontsize=9)
    fig.suptitle("difference from vanilla (paired, 95 % CI) against the regime's gap as vanilla measures it;\n"
                 "one point per regime (named in the first panel), coloured by mechanism (lines join the async lags only)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return save_figure(fig, figures / "mechanism.png", layout=False)


# ----------------------------------------------------------------------------- guide


def _names(items) -> str:
    return ", ".join(f"`{x}`" for x in items)


def guide_lines(comps: list[dict], measured: list[dict], prim: list[dict], pooled: list[dict] = ()) -> list[str]:
    """What the data show per range of the gap a user measures (vanilla's own update log_ah_gap, as the
    README's recipe at p = 1 reads it): per regime, sorted by that gap, every method whose held-out
    difference from vanilla (``comps``: analysis.comparisons, every method) excludes 0, uncorrected, else
    that none does; whether any method's interval lies above vanilla's anywhere; the pooled questions
    regime by regime (``pooled``: analysis.pooled_by_regime, the intervals that exclude 0); and the
    primary verdicts. Generated: no selection beyond the interval's sign."""
    gaps = {m["regime"]: m["vanilla_gap"] for m in measured}
    lines = []
    regimes = sorted({c["regime"] for c in comps}, key=lambda r: (gaps.get(r, math.inf), r))
    for regime in regimes:
        rs = [c for c in comps if c["regime"] == regime]
        out = [c for c in rs if c["lo"] > 0 or c["hi"] < 0]
        parts = ("; ".join(f"`{c['method']}` {_ci(c)}" for c in sorted(out, key=lambda c: -c["diff"]))
                 if out else "no method's interval excludes 0")
        widest = max((c["hi"] - c["lo"]) / 2 for c in rs)
        lines.append(f"* vanilla's gap {_f(gaps.get(regime), 4)} (`{regime}`, {len(rs)} method{'s' if len(rs) > 1 else ''} vs vanilla): {parts} "
                     f"(uncorrected; intervals up to ±{_f(widest)}).")
    above = analysis.above_baseline(comps)
    lines.append(("* **Above vanilla** (interval above 0, uncorrected): " +
                  "; ".join(f"`{c['method']}` in `{c['regime']}` {_ci(c)}" for c in above) + ".") if above else
                 f"* **No method beat vanilla in any regime evaluated**: none of the {len(comps)} intervals (every "
                 f"method, {len(regimes)} regime{'s' if len(regimes) > 1 else ''}, uncorrected) lies above 0.")
    if pooled:
        by = defaultdict(list)
        for r in pooled:
            if r["lo"] > 0 or r["hi"] < 0:
                by[r["method"]].append(f"`{r['regime']}` {_ci(r)} (vs `{r['best']}`)")
        names = list(dict.fromkeys(r["method"] for r in pooled))
        lines.append(f"* {_names(names)} against each regime's best fixed p, regime by regime (uncorrected; the "
                     "primaries Q4/Q5 average over regimes): " +
                     ("; ".join(f"`{m}` excludes 0 in " + ", ".join(by[m]) for m in names if by[m]) or
                      "no interval excludes 0") + ".")
    decided = [r for r in prim if r["verdict"] != "undecided"]
    lines.append("* Primary questions decided after Holm: " + ("; ".join(f"{r['id']} {r['verdict']}" for r in decided)
                                                            if decided else "none") + ".")
    return lines


def scope_lines(scope: dict) -> list[str]:
    """What the study can say, from its data. ``scope``: ``task``; ``params`` (the dense model's parameters);
    ``train_prompts`` / ``heldout_prompts`` (distinct); ``steps``; ``rising`` (runs still rising, evaluation
    runs: analysis.still_rising); ``edges`` (analysis.grid_edges); ``chosen`` (the tuned settings);
    ``off_policy`` (regimes); ``underpowered`` (analysis.underpowered)."""
    rising, runs = scope["rising"]
    k, n = scope["underpowered"]
    smallest = defaultdict(list)
    for regime, method in scope["edges"]["smallest"]:
        smallest[method].append(regime)
    largest = defaultdict(list)
    for regime, method in scope["edges"]["largest"]:
        largest[regime].append(method)
    off = set(scope["off_policy"])
    small = [f"`{m}` in " + (f"all {len(rs)} off-policy regimes" if set(rs) == off else _names(rs))
             for m, rs in sorted(smallest.items())]
    large = []
    for regime, ms in largest.items():
        tuned = [m for (r, m) in scope["chosen"] if r == regime]
        rest = [m for m in tuned if m not in ms]
        large.append(f"`{regime}`: " + (_names(ms) if len(rest) >= len(ms) or len(tuned) == 1 else
                                        "every method" + (f" except {_names(rest)}" if rest else "")))
    edges = ("Tuning sat at its grid's edge: the smallest learning rate for " + ("; ".join(small) or "none") +
             "; the largest in " + ("; ".join(large) or "none") + ". Every verdict involving those settings holds "
             "at them only: a wider grid may move it.")
    total = scope["train_prompts"] + scope["heldout_prompts"]
    return [
        f"**Scope of study v3: what it can and cannot say.** One task (`{scope['task']}`: {total} prompts, "
        f"{scope['train_prompts']} trained on, {scope['heldout_prompts']} held out), one small model "
        f"({scope['params']:,} parameters; the MoE regimes use a small MoE of the same width), warm-started once by "
        f"a supervised fit that saw all {total} prompts' answers (held-out means never RL-trained on, not unseen), "
        f"and that one warm start serves every seed (a seed varies the data order and the sampling, not the "
        f"initial model). Runs are {scope['steps']} steps long, and {rising} of {runs} evaluation runs "
        f"({rising / max(runs, 1):.0%}) are still rising at the last step (the least-squares slope of held-out "
        f"reward over the last {analysis.RISING_WINDOW} steps is positive): the final reward measures how fast a "
        f"method learns, not the level it would reach. {edges} The minimum detectable effect exceeds the "
        f"±{MARGIN} margin in {k} of {n} Q1/Q2 comparisons: most *undecided* verdicts mean the study could not "
        "tell, not that the methods are alike.",
    ]


def apmpo_lines(power: list[float]) -> list[str]:
    """APMPO as run here, against the paper: ``power``: APMPO's p at every step of its evaluation runs."""
    import numpy as np

    if not power:
        return []
    q = np.quantile(power, [0.0, 0.25, 0.5, 0.75, 1.0])
    return [f"**APMPO as run here differs from the paper.** The paper's KL term (as read in issue 30; the "
            "paper's full text is not stored here) is not in the loss: no method in this study has a KL penalty. "
            "Its p = exp(−0.8 × the batch's mean reward) can only fall from 1 to e^−0.8 ≈ 0.45 with 0/1 rewards; "
            f"measured over the {len(power)} steps of its evaluation runs, p had median {q[2]:.2f}, middle half "
            f"{q[1]:.2f}–{q[3]:.2f}, range {q[0]:.2f}–{q[4]:.2f}: it stayed between the geometric and arithmetic "
            "means and never came near the harmonic one."]


def check_readme_source(readme: bool, quick: bool, docs: Path, default: Path) -> None:
    """--readme copies the guide and scope of the repository's own report (``default``) into the README, whose
    guide links it: stops, before any run, when the report is a smoke run's (``quick``) or another file (``docs``)."""
    if readme and (quick or docs.resolve() != default.resolve()):
        raise SystemExit(f"--readme is invalid with {'--quick' if quick else f'--docs {docs}'}: the README's guide and "
                         f"scope are copied from (and link) the study's own report, {default}; allowed: --readme "
                         "without --quick and with --docs absent or that path")


def update_readme(readme: Path, block: list[str], start: str = GUIDE_START, end: str = GUIDE_END) -> bool:
    """Replace the README's generated block between ``start`` and ``end`` (the guide's markers by default);
    False if the markers are absent."""
    text = readme.read_text()
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        return False
    readme.write_text(pattern.sub(lambda _: "\n".join([start, *block, end]), text))
    return True


# ----------------------------------------------------------------------------- v3's report


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
            "figures": {}, "guide": [], "scope": [], "apmpo": [], "confirmation": ["Not run yet."]}



def write_docs(path: Path, ctx: dict) -> None:
    rel = lambda p: os.path.relpath(p, path.parent)  # noqa: E731
    plan, s = ctx["plan"], ctx["settings"]
    archived = [  # the committed report (a --quick or --docs elsewhere is not the archive)
        "**Archived** as the record behind v4 ([study.md](study.md)), which re-asks the questions this version left "
        "undecided with the power it lacked (pre-registered in [study_v4_plan.md](study_v4_plan.md) from this "
        "version's data). Its runs, data and numbers are as they were when v4 was registered; since then its "
        "paths moved (from `docs/study.md`, `docs/study_data/`, `docs/study_figures/`) and this paragraph was added.",
        "",
    ] if path.resolve() == REPORT else []
    lines = [
        "# Comparative study v3: when does the choice of mean matter?",
        "",
        *archived,
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
        f"Versions: {versions_text()}. Runs: one thread each, "
        f"{ctx['parallel']} at a time on {os.cpu_count()} CPU cores; {ctx['cpu_minutes']:.0f} CPU-minutes of runs in all.",
        "",
        *([*ctx["scope"], ""] if ctx["scope"] else []),
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
        *([*ctx["apmpo"], ""] if ctx["apmpo"] else []),
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
           "One panel per method; each point one regime (named in the first panel), coloured by where its drift comes from: x = the update "
           "`log_ah_gap` of vanilla's own runs there (what a user measures at p = 1; log scale), y = the method's "
           "held-out final reward minus vanilla's, paired over the evaluation seeds, with the 95 % interval; the grey "
           "band is the equivalence margin. Only the async lags, one mechanism at four strengths, are joined by a "
           "line. Q3's regime gap (the mean over all methods' runs, which the harmonic methods inflate under lag) "
           "is in the regimes table."] if "mechanism" in ctx["figures"] else ["Not drawn yet."]),
        "",
        "## Why the harmonic side loses under lag",
        "",
        LAG_START,
        *(ctx.get("lag_fidelity") or ["Not measured yet: `python -m hmpo_verl.lab.lag_fidelity`."]),
        LAG_END,
        "",
        "## What the data show, by the gap vanilla measures (the README's guide)",
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
        f"`docs/{path.stem}_data/`: `runs.csv` (one row per run, both phases: outcomes and measured log-ratios), "
        "`steps.csv.gz` (per-step metrics of the evaluation runs), `settings.csv` (tuning), `primaries.csv`, "
        "`comparisons.csv`, `regimes.csv`, `mechanism.csv`, `confirm_async_0.csv` / `confirm_async_1.csv` (when run), "
        "`lag_fidelity.csv` (the lag-fidelity section: one row per lag, seed, captured update and method; its "
        "header holds the command).",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
