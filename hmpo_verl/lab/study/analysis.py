"""The study's analysis: per-run outcomes, the tuned settings, paired comparisons with equivalence
tests and detectable effects, the pre-registered primary questions, the mechanism data, and the
confirmation against verl's trainer. Pure functions of the run records (plain dicts and lists).
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from hmpo_verl.lab import stats
from hmpo_verl.lab.study.plan import ALPHA, MARGIN, P_METHODS, Question

FINAL_WINDOW = stats.SMOOTH  # steps averaged for a final reward


def _mean(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else math.nan


def run_summary(record: dict) -> dict:
    """One run's outcomes: held-out and training-prompt final reward (mean of the last ``FINAL_WINDOW``
    evaluations), AUC, collapse (on the held-out curve), and the step means of its measured log-ratios; a record
    restored from a report's data (run.restore) holds its summary, returned as it is."""
    if "restored" in record:
        return dict(record["restored"]["summary"])
    run, metrics = record["run"], record["metrics"]
    non_finite = any(m["non_finite"] for m in metrics)
    held = stats.run_outcomes([m["eval_heldout"] for m in metrics], record["first_eval"]["eval_heldout"], non_finite)
    train = stats.run_outcomes([m["eval_train"] for m in metrics], record["first_eval"]["eval_train"], non_finite)
    row = {"phase": run.phase, "regime": run.regime, "method": run.method, "lr": run.lr, "seed": run.seed,
           "first_heldout": held["first_reward"], "final_heldout": held["final_reward"], "auc_heldout": held["auc"],
           "collapsed": held["collapsed"], "drawdown": held["drawdown"], "steps_to_threshold": held["steps_to_threshold"],
           "first_train": train["first_reward"], "final_train": train["final_reward"], "auc_train": train["auc"],
           "collapsed_train": train["collapsed"], "non_finite": non_finite,
           "final_train_reward": _mean([m["reward"] for m in metrics[-FINAL_WINDOW:]]),
           "wall_s": record["wall_s"], "cpu_s": record.get("cpu_s", math.nan)}
    for key in ("update/log_ah_gap", "update/delta_sd", "update/delta_abs_p999", "mismatch/log_ah_gap",
                "mismatch/delta_sd", "mismatch/delta_abs_p999", "routing/flip_frac", "actor/pg_clipfrac",
                "actor/ppo_kl", "actor/pm/power", "actor/pm/clip_high"):
        row[key] = _mean([m.get(key) for m in metrics])
    return row


# ----------------------------------------------------------------------------- tuning


def choose_settings(tuning: list[dict]) -> dict[tuple[str, str], dict]:
    """Per (regime, method): the learning rate with the highest mean final *training-prompt* reward over
    the tuning seeds (ties: the smaller lr), its score, every grid point's score and collapses, and the
    largest stable lr (the largest with no collapsed tuning run; None if every one collapsed)."""
    by_key: dict = defaultdict(lambda: defaultdict(list))
    for row in tuning:
        by_key[(row["regime"], row["method"])][row["lr"]].append(row)
    chosen = {}
    for key, grid in by_key.items():
        scores = {lr: _mean([r["final_train"] for r in rows]) for lr, rows in grid.items()}
        collapsed = {lr: sum(r["collapsed_train"] for r in rows) for lr, rows in grid.items()}
        best = max(sorted(scores), key=lambda lr: (scores[lr], -lr))
        stable = [lr for lr in grid if collapsed[lr] == 0]
        chosen[key] = {"lr": best, "score": scores[best], "scores": scores, "collapsed": collapsed,
                       "seeds": {lr: len(rows) for lr, rows in grid.items()},
                       "largest_stable_lr": max(stable) if stable else None}
    return chosen


def best_fixed_p(chosen: dict, regime: str) -> str | None:
    """The p-method (``P_METHODS``) with the highest tuning score at its chosen lr in ``regime``."""
    candidates = [(chosen[(regime, m)]["score"], m) for m in P_METHODS if (regime, m) in chosen]
    return max(candidates)[1] if candidates else None


# ----------------------------------------------------------------------------- paired comparisons


def _by_seed(rows: list[dict], regime: str, method: str, metric: str) -> dict[int, float]:
    return {r["seed"]: r[metric] for r in rows if r["regime"] == regime and r["method"] == method}


def paired_test(differences: list[float]) -> dict:
    """Paired difference (mean, 95 % interval, sd, two-sided p), TOST p within ±MARGIN, and the minimum
    detectable effect at 80 % power (two-sided, level ALPHA) from the observed sd."""
    zeros = [0.0] * len(differences)
    d = stats.paired_difference(differences, zeros)
    t = stats.tost(differences, MARGIN)
    return {"n": d["n"], "diff": d["diff"], "lo": d["lo"], "hi": d["hi"], "sd": d["sd"], "p": d["p"],
            "p_tost": t["p"], "mde": stats.mde_paired(d["sd"], d["n"], ALPHA)}


def comparisons(rows: list[dict], regimes: list[str], metric: str = "final_heldout", baseline: str = "vanilla") -> list[dict]:
    """Every method vs ``baseline`` in every regime on ``metric`` (exploratory: no correction)."""
    out = []
    for regime in regimes:
        base = _by_seed(rows, regime, baseline, metric)
        for method in sorted({r["method"] for r in rows if r["regime"] == regime} - {baseline}):
            other = _by_seed(rows, regime, method, metric)
            seeds = sorted(set(base) & set(other))
            if seeds:
                out.append({"regime": regime, "method": method, "metric": metric,
                            **paired_test([other[s] - base[s] for s in seeds])})
    return out


def question_differences(q: Question, rows: list[dict], chosen: dict) -> list[float]:
    """Per-seed differences of a "paired" or "pooled" question on held-out final reward."""
    if q.kind == "paired":
        a, b = (_by_seed(rows, q.regimes[0], m, "final_heldout") for m in (q.a, q.b))
        return [a[s] - b[s] for s in sorted(set(a) & set(b))]
    per_regime = []
    for regime in q.regimes:
        best = best_fixed_p(chosen, regime)
        if best is None:
            continue
        a, b = (_by_seed(rows, regime, m, "final_heldout") for m in (q.a, best))
        per_regime.append({s: a[s] - b[s] for s in set(a) & set(b)})
    if not per_regime:
        return []
    seeds = sorted(set.intersection(*(set(d) for d in per_regime)))
    return [float(np.mean([d[s] for d in per_regime])) for s in seeds]


def regime_gaps(rows: list[dict]) -> dict[str, float]:
    """Each regime's measured update log_ah_gap: the mean over its runs (all methods, all steps)."""
    by: dict = defaultdict(list)
    for r in rows:
        by[r["regime"]].append(r["update/log_ah_gap"])
    return {regime: _mean(v) for regime, v in by.items()}


def p_tilt(rows: list[dict], regime: str) -> dict:
    """Mean over seeds of the least-squares slope of held-out final reward on p (the P_METHODS of each
    seed that ran them all), with its 95 % interval."""
    per_method = {m: _by_seed(rows, regime, m, "final_heldout") for m in P_METHODS}
    seeds = sorted(set.intersection(*(set(v) for v in per_method.values()))) if per_method else []
    slopes = [stats.ols_slope(list(P_METHODS.values()), [per_method[m][s] for m in P_METHODS]) for s in seeds]
    mean, half = stats.mean_ci(slopes) if slopes else (math.nan, math.nan)
    return {"tilt": mean, "half": half, "n": len(slopes)}


def primaries(questions: list[Question], rows: list[dict], chosen: dict, gaps: dict | None = None,
              unreached: frozenset[str] = frozenset()) -> list[dict]:
    """Each primary question's test, Holm-corrected over the primaries only (difference p-values and
    TOST p-values as two families), with its verdict. ``gaps``: the regime gaps of the trend question
    (default ``regime_gaps(rows)``, v3's: every method's runs). ``unreached``: the ids of questions whose
    runs a partial study has not finished: they stay in both families with p = 1 (so the others' Holm
    correction is the pre-registered family's) and their verdict is "not reached"; so does a question too few
    of whose runs are finished to be tested (fewer than 2 pairs; the trend: fewer than 3 regimes)."""
    out = []
    gaps = regime_gaps(rows) if gaps is None else gaps
    for q in questions:
        if q.kind == "trend":
            regimes = [r for r in q.regimes if r in gaps and p_tilt(rows, r)["n"] > 0]
            if len(regimes) >= 3:
                tilts = [p_tilt(rows, r)["tilt"] for r in regimes]
                sp = stats.spearman_permutation([gaps[r] for r in regimes], tilts)
                out.append({"id": q.id, "kind": q.kind, "n": len(regimes), "rho": sp["rho"], "p": sp["p"],
                            "p_tost": math.nan, "regimes": regimes})
            else:
                out.append({"id": q.id, "kind": q.kind, "n": len(regimes), "rho": math.nan, "p": math.nan,
                            "p_tost": math.nan, "regimes": regimes})
            continue
        d = question_differences(q, rows, chosen)
        out.append({"id": q.id, "kind": q.kind, **(paired_test(d) if len(d) >= 2 else
                                                   {"n": len(d), "diff": math.nan, "lo": math.nan, "hi": math.nan,
                                                    "sd": math.nan, "p": math.nan, "p_tost": math.nan, "mde": math.nan})})
    unreached = unreached | {row["id"] for row in out if math.isnan(row["p"])}
    for row in out:
        if row["id"] in unreached:
            row.update({k: math.nan for k in row if k not in ("id", "kind", "n", "regimes")}, p=1.0,
                       p_tost=math.nan if row["kind"] == "trend" else 1.0)  # (the trend has no TOST)
    for key in ("p", "p_tost"):
        for row, adjusted in zip(out, stats.holm([r[key] for r in out])):
            row[f"{key}_holm"] = adjusted
    for row in out:
        row["verdict"] = "not reached" if row["id"] in unreached else verdict(row)
    return out


def verdict(row: dict) -> str:
    """better / worse / equivalent / different but within the margin / undecided (see the pre-registration);
    for the trend question: a monotone association (rho's sign) or undecided."""
    different = row.get("p_holm", math.nan) < ALPHA
    if row["kind"] == "trend":
        if not different:
            return "undecided"
        return "the harmonic side gains as the gap grows" if row["rho"] < 0 else "the arithmetic side gains as the gap grows"
    equivalent = row.get("p_tost_holm", math.nan) < ALPHA
    if different and equivalent:
        return f"different but within ±{MARGIN}"
    if different:
        return "better" if row["diff"] > 0 else "worse"
    return f"equivalent (±{MARGIN})" if equivalent else "undecided"


# ----------------------------------------------------------------------------- regimes and mechanism


def regime_measurements(rows: list[dict], regimes: list[str]) -> list[dict]:
    """Per regime, means over its runs: update log-ratio (the loss's δ) gap, sd and 99.9th percentile of
    |δ|, the behaviour mismatch (trainer − sampler log-probs) and the MoE routing flips; vanilla's own
    gap and the range of the methods' means."""
    out = []
    for regime in regimes:
        rs = [r for r in rows if r["regime"] == regime]
        if not rs:
            continue
        per_method = defaultdict(list)
        for r in rs:
            per_method[r["method"]].append(r["update/log_ah_gap"])
        method_means = [_mean(v) for v in per_method.values()]
        out.append({"regime": regime, "runs": len(rs),
                    **{k: _mean([r[k] for r in rs]) for k in ("update/log_ah_gap", "update/delta_sd",
                                                               "update/delta_abs_p999", "mismatch/delta_sd",
                                                               "mismatch/delta_abs_p999", "mismatch/log_ah_gap",
                                                               "routing/flip_frac")},
                    "vanilla_gap": _mean(per_method.get("vanilla", [])),
                    "gap_min": min(method_means), "gap_max": max(method_means)})
    return out


def mechanism(rows: list[dict], regimes: list[str], methods: list[str]) -> list[dict]:
    """For the mechanism figure: per regime and method, the paired held-out final-reward difference from
    vanilla with its 95 % interval; the regime's measured gap (``gap``: all its runs, Q3's; ``vanilla_gap``:
    vanilla's own runs, what a user measures at p = 1)."""
    gaps = regime_gaps(rows)
    vanilla_gaps = regime_gaps([r for r in rows if r["method"] == "vanilla"])
    by_key = {(c["regime"], c["method"]): c for c in comparisons(rows, regimes)}
    return [{"regime": r, "gap": gaps[r], "vanilla_gap": vanilla_gaps.get(r, math.nan), "method": m,
             **{k: by_key[(r, m)][k] for k in ("diff", "lo", "hi", "n")}}
            for r in regimes if r in gaps for m in methods if (r, m) in by_key]


# ----------------------------------------------------------------------------- confirmation on verl's trainer

# the rewards the confirmation compares (training_curve_outcomes), with an absolute margin
CONFIRM_REWARDS = ("final_train_reward", "train_auc")
# loss metrics the confirmation compares, as verl's trainer and the lean loop both log them (per step)
CONFIRM_METRICS = {"clipfrac": "actor/pg_clipfrac", "ppo_kl": "actor/ppo_kl", "log_ah_gap": "actor/pm/log_ah_gap"}
# equivalence margins of trainer − lean: absolute for the rewards, relative to the lean mean for the loss metrics
CONFIRM_REWARD_MARGIN = 0.05
CONFIRM_RELATIVE_MARGIN = 0.25


def training_curve_outcomes(rewards: list[float], metrics: list[dict]) -> dict:
    """What both verl's trainer and the lean loop log: final training reward (mean of the last
    ``FINAL_WINDOW`` steps), training-reward AUC, and the step mean of each ``CONFIRM_METRICS`` metric
    (NaN where a loss does not log it)."""
    out = {"final_train_reward": float(np.mean(rewards[-FINAL_WINDOW:])), "train_auc": float(np.mean(rewards))}
    for name, key in CONFIRM_METRICS.items():
        out[name] = _mean([m.get(key) for m in metrics])
    return out


def welch_equivalence(a: list[float], b: list[float], margin: float) -> dict:
    """Welch's comparison of a − b: difference, 95 % interval, two-sided p, TOST p within ±margin (Welch
    degrees of freedom), and the runs per side that would put the 90 % interval inside the margin if
    the difference were 0 (from the observed sds)."""
    from scipy import stats as st

    a, b = np.asarray(a, float), np.asarray(b, float)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    diff = float(a.mean() - b.mean())
    if se == 0:
        return {"diff": diff, "lo": diff, "hi": diff, "p": 0.0 if diff != 0 else 1.0,
                "p_tost": 0.0 if abs(diff) < margin else 1.0, "runs_needed": 2}
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = st.t.ppf(0.975, dof) * se
    p = float(2 * st.t.sf(abs(diff) / se, dof))
    p_tost = max(float(st.t.sf((diff + margin) / se, dof)), float(st.t.cdf((diff - margin) / se, dof)))
    return {"diff": diff, "lo": diff - half, "hi": diff + half, "p": p, "p_tost": p_tost,
            "runs_needed": runs_needed(a.var(ddof=1) + b.var(ddof=1), margin)}


def runs_needed(pooled_var: float, margin: float) -> int:
    """Runs per side that put the 90 % interval of a − b inside ±margin if the difference were 0;
    ``pooled_var``: the variance of a − b with one run per side (the sum of the two sides' run variances).
    1000 stands for "more than 999"."""
    from scipy import stats as st

    return next((n for n in range(2, 1000) if st.t.ppf(0.95, 2 * n - 2) * math.sqrt(pooled_var / n) < margin), 1000)


def confirmation_need(lean_rows: list[dict], methods: tuple[str, ...]) -> list[dict]:
    """Before any trainer run: per method, the lean side's sd of the final training reward and the runs
    per side the reward comparison would need for ``CONFIRM_REWARD_MARGIN``, if the trainer's runs
    varied as much as the lean loop's."""
    out = []
    for method in methods:
        values = [r["final_train_reward"] for r in lean_rows if r["method"] == method]
        if len(values) >= 2:
            var = float(np.var(values, ddof=1))
            out.append({"method": method, "lean_runs": len(values), "sd": math.sqrt(var),
                        "runs_needed": runs_needed(2 * var, CONFIRM_REWARD_MARGIN)})
    return out


def confirmation_rows(lean_rows: list[dict], trainer_rows: list[dict], methods: tuple[str, ...]) -> list[dict]:
    """Per method and metric: trainer − lean (Welch) with its equivalence test and verdict:
    *equivalent* (TOST p < 0.05 within the margin), *differ* (interval excludes 0), else *inconclusive*."""
    out = []
    for method in methods:
        lean_m = [r for r in lean_rows if r["method"] == method]
        tr_m = [r for r in trainer_rows if r["method"] == method]
        for metric in (*CONFIRM_REWARDS, *CONFIRM_METRICS):
            a, b = [r[metric] for r in tr_m], [r[metric] for r in lean_m]
            if len(a) < 2 or len(b) < 2 or not all(math.isfinite(x) for x in a + b):
                continue
            margin = (CONFIRM_REWARD_MARGIN if metric in CONFIRM_REWARDS
                      else CONFIRM_RELATIVE_MARGIN * abs(float(np.mean(b))))
            if margin == 0:
                continue
            w = welch_equivalence(a, b, margin)
            verdict_ = ("equivalent" if w["p_tost"] < ALPHA else "differ" if w["p"] < ALPHA else "inconclusive")
            out.append({"method": method, "metric": metric, "trainer_runs": len(a), "lean_runs": len(b),
                        "margin": margin, **w, "verdict": verdict_})
    return out


def confirmation_differences(lean_rows: list[dict], trainer_rows: list[dict], methods: tuple[str, ...]) -> list[dict]:
    """Exploratory, uncorrected: on each side, each method − ``methods[0]`` (vanilla) in the final training
    reward and its AUC, by Welch's interval on both sides (unpaired, so the two sides are read alike) --
    does verl's trainer show the lean loop's differences between methods? One row per method and metric
    with ``trainer`` and ``lean`` dicts (diff, lo, hi, p, runs per method); rows lacking two runs per method
    on either side are left out."""
    base, *others = methods
    out = []
    for method in others:
        for metric in CONFIRM_REWARDS:
            row = {"method": method, "metric": metric}
            for side, rows in (("trainer", trainer_rows), ("lean", lean_rows)):
                a = [r[metric] for r in rows if r["method"] == method]
                b = [r[metric] for r in rows if r["method"] == base]
                if len(a) < 2 or len(b) < 2:
                    break
                w = welch_equivalence(a, b, CONFIRM_REWARD_MARGIN)
                row[side] = {"diff": w["diff"], "lo": w["lo"], "hi": w["hi"], "p": w["p"], "runs": (len(a), len(b))}
            else:
                out.append(row)
    return out


def lean_confirmation_rows(records: list[dict], regime: str, steps: int) -> list[dict]:
    """The lean side of the confirmation: the first ``steps`` steps of the regime's evaluation runs."""
    out = []
    for rec in records:
        run = rec["run"]
        if run.phase == "eval" and run.regime == regime:
            metrics = rec["metrics"][:steps]
            out.append({"method": run.method, "seed": run.seed,
                        **training_curve_outcomes([m["reward"] for m in metrics], metrics)})
    return out



# ----------------------------------------------------------------------------- scope: what the outcome can say

RISING_WINDOW = 10  # steps over which a run's held-out reward counts as still rising (positive slope)


def last_slopes(curves: list[list[float]], window: int = RISING_WINDOW) -> list[float]:
    """Each of the held-out reward ``curves``' (one per run, one value per step) least-squares slope per step over
    its last ``window`` steps (all of them in a shorter run)."""
    return [stats.ols_slope(list(range(len(c[-window:]))), c[-window:]) for c in curves]


def still_rising(curves: list[list[float]], window: int = RISING_WINDOW) -> int:
    """How many of the held-out reward ``curves`` still rise at the end: :func:`last_slopes` positive."""
    return sum(s > 0 for s in last_slopes(curves, window))


def grid_edges(chosen: dict) -> dict[str, list[tuple[str, str]]]:
    """The tuned settings at an edge of their grid: ``{"smallest": [(regime, method), ...], "largest": [...]}``
    (a grid of one point counts as neither)."""
    out = {"smallest": [], "largest": []}
    for (regime, method), c in chosen.items():
        if len(c["scores"]) > 1 and c["lr"] == min(c["scores"]):
            out["smallest"].append((regime, method))
        elif len(c["scores"]) > 1 and c["lr"] == max(c["scores"]):
            out["largest"].append((regime, method))
    return out


def underpowered(prim: list[dict]) -> tuple[int, int]:
    """(paired primaries whose MDE exceeds ``MARGIN``, paired primaries with an MDE)."""
    paired = [r for r in prim if r["kind"] == "paired" and math.isfinite(r.get("mde", math.nan))]
    return sum(r["mde"] > MARGIN for r in paired), len(paired)


def above_baseline(comps: list[dict]) -> list[dict]:
    """The comparisons (``comparisons``: method − vanilla) whose 95 % interval lies above 0."""
    return [c for c in comps if c["lo"] > 0]


def pooled_by_regime(q: Question, rows: list[dict], chosen: dict) -> list[dict]:
    """A "pooled" question (``a`` vs each regime's best fixed p) regime by regime (exploratory, uncorrected):
    per regime, the paired test of ``a`` − that regime's best fixed p, with the p-method's name."""
    out = []
    for regime in q.regimes:
        best = best_fixed_p(chosen, regime)
        if best is None:
            continue
        a, b = (_by_seed(rows, regime, m, "final_heldout") for m in (q.a, best))
        d = [a[s] - b[s] for s in sorted(set(a) & set(b))]
        if len(d) >= 2:
            out.append({"regime": regime, "method": q.a, "best": best, **paired_test(d)})
    return out
