"""``python -m hmpo_verl.lab.study --v4``: the fourth version as pre-registered (plan_v4.py,
docs/study_v4_plan.md), resumable (every run one JSON file, as v3's), its estimate printed first.

Stages: the pilot (vanilla, tuning seeds, warm start 0) fixes the run length T by the plateau rule
and picks the gap regime; the tuning runs every method's grid on the tuning seeds x warm starts and
extends a grid whose choice sits at an edge (the edge rule), until none does; the evaluation runs
every method at its setting on (warm start, seed) pairs; the report answers the primaries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from hmpo_verl.lab import lean, stats
from hmpo_verl.lab.study import analysis, plan, plan_v4, run
from hmpo_verl.lab.study.plan import Question, Run


@dataclass(frozen=True)
class V4Plan:
    regimes: tuple[str, ...]  # the gap regime under its first name (plan_v4.GAP_REGIME_LADDER picks the model)
    methods: tuple[str, ...]
    warm_starts: int
    tuning_seeds: tuple[int, ...]
    pairs: dict[str, int]  # (warm start, seed) pairs per regime
    pilot_steps: int
    eval_prompts: int
    grids: dict[tuple[str, str], tuple[float, ...]] = field(default_factory=dict)

    def grid(self, regime: str, method: str) -> tuple[float, ...]:
        return self.grids.get((regime, method), plan_v4.grid(regime, method))


def default_v4() -> V4Plan:
    return V4Plan(regimes=plan_v4.REGIMES, methods=plan_v4.METHODS, warm_starts=plan_v4.WARM_STARTS,
                  tuning_seeds=plan_v4.TUNING_SEEDS, pairs=plan_v4.regime_pairs(plan_v4.v3_primaries()),
                  pilot_steps=plan_v4.PILOT_STEPS, eval_prompts=plan.EVAL_PROMPTS)


def quick_v4() -> V4Plan:
    """A smoke run of every stage (minutes): async_2, 3 methods, 2 warm starts, 1 tuning seed, 2-point grids
    (the edge rule may add points), a 10-step pilot, 2 pairs, 8 evaluation prompts. No MoE (minutes to build)."""
    methods = ("vanilla", "hmpo", "gspo")
    return V4Plan(regimes=("async_2",), methods=methods, warm_starts=2, tuning_seeds=plan.TUNING_SEEDS[:1],
                  pairs={"async_2": 2}, pilot_steps=10, eval_prompts=8,
                  grids={("async_2", m): (3e-4, 1e-3) for m in methods})


def v3_vanilla_lr(regime: str) -> float:
    """The pilot's lr: vanilla's tuned lr in v3 (docs/study_data/settings.csv); a gap regime takes ``moe_bf16``'s."""
    import pandas as pd

    frame = pd.read_csv(plan_v4.V3_DATA / "settings.csv")
    name = "moe_bf16" if regime.startswith("moe") and regime.endswith("_top1") else regime
    return float(frame[(frame["regime"] == name) & (frame["method"] == "vanilla")]["lr"].iloc[0])


def plateau_length(curves: dict[str, list[list[float]]], cap: int) -> int:
    """The plateau rule: the first multiple of 10 at which the least-squares slope of each regime's mean
    held-out reward (``curves[regime]``: one curve per pilot run) over the last 10 steps is below
    ``plan_v4.PLATEAU_SLOPE`` per step in every regime; ``cap`` if never."""
    import numpy as np

    means = {r: np.mean(np.array(c), axis=0) for r, c in curves.items()}
    for t in range(10, cap + 1, 10):
        if all(stats.ols_slope(list(range(10)), m[t - 10:t]) < plan_v4.PLATEAU_SLOPE for m in means.values()):
            return t
    return cap


def gap_regime(pilot_rows: list[dict]) -> str | None:
    """The first gap regime of the ladder whose vanilla pilot runs reach ``GAP_REGIME_MIN`` (None if none)."""
    for experts, _ in plan_v4.GAP_REGIME_LADDER:
        gaps = [r["update/log_ah_gap"] for r in pilot_rows if r["regime"] == f"moe{experts}_top1"]
        if gaps and sum(gaps) / len(gaps) >= plan_v4.GAP_REGIME_MIN:
            return f"moe{experts}_top1"
    return None


def questions(regimes: list[str], gap: str | None) -> list[Question]:
    """v4's primaries: v3's undecided ones whose regimes run here (Q3 over ``regimes``), and Q6 in ``gap``."""
    und = {r["id"] for r in plan_v4.undecided(plan_v4.v3_primaries())}
    qs = [q for q in plan.primary_questions() if q.id in und and q.kind != "trend" and set(q.regimes) <= set(regimes)]
    trend = [r for r in regimes if r != gap]
    if "Q3" in und and len(trend) >= 3:
        qs.append(Question("Q3", "trend", "", "", tuple(regimes), "as v3's Q3, with vanilla's own gap"))
    if gap:
        qs.append(Question("Q6", "paired", "hmpo", "vanilla", (gap,), f"In `{gap}`, hmpo vs vanilla"))
    return qs


def accepted_warm_starts(task_name: str, assets, kinds: list[str], wanted: int, check: bool, log) -> list[int]:
    """The warm-start seeds v4 uses: tried in order 0, 1, ..., each accepted when every model of ``kinds`` fits
    to greedy accuracy >= ``plan_v4.WARM_START_MIN_GREEDY`` (its ``warm_start.json``); all tried ones when not
    ``check`` (the smoke run). Stops loud after 5 x ``wanted`` seeds."""
    import json

    accepted = []
    for seed in range(5 * wanted):
        if len(accepted) == wanted:
            return accepted
        greedy = {}
        for kind in kinds:
            path = Path(run.warm_start_model(task_name, assets, kind, seed, log=log))
            report = json.loads((path.parent / "warm_start.json").read_text())
            greedy[kind] = report["greedy_accuracy"]
        if not check or min(greedy.values()) >= plan_v4.WARM_START_MIN_GREEDY:
            accepted.append(seed)
        else:
            log(f"warm start {seed} skipped: greedy accuracy {greedy} < {plan_v4.WARM_START_MIN_GREEDY}")
    if len(accepted) < wanted:
        raise SystemExit(f"only {len(accepted)} of {5 * wanted} warm-start seeds reach greedy accuracy "
                         f"{plan_v4.WARM_START_MIN_GREEDY}; v4 needs {wanted}: see plan_v4.WARM_START_MIN_GREEDY")
    return accepted


def estimate_lines(p: V4Plan) -> list[str]:
    cost = plan_v4.estimate_cpu_s(p.pairs, plan.STEPS) if p.regimes == plan_v4.REGIMES else None
    runs_eval = sum(p.pairs[r] for r in p.regimes) * len(p.methods)
    runs_tune = sum(len(p.grid(r, m)) for r in p.regimes for m in p.methods) * len(p.tuning_seeds) * p.warm_starts
    line = (f"v4 plan: pilot {len(p.regimes) * len(p.tuning_seeds)} runs of {p.pilot_steps} steps; tuning {runs_tune} "
            f"runs (before edge extensions); evaluation {runs_eval} runs; each of T steps, T set by the pilot")
    if cost:
        line += (f"; about {cost['pilot'] / 3600:.1f} + {cost['tuning'] / 3600:.1f} + {cost['evaluation'] / 3600:.1f} "
                 "CPU-hours at T = 30 by v3's measured cost per run (tuning and evaluation scale with T / 30)")
    return [line]


def _pair_rows(records: list[dict]) -> list[dict]:
    """Run summaries keyed for pairing by (warm start, seed): ``seed`` becomes ``"<ws>:<seed>"``."""
    out = []
    for rec in records:
        row = analysis.run_summary(rec)
        row["warm_start"], row["seed"] = rec["run"].warm_start, f"{rec['run'].warm_start}:{rec['run'].seed}"
        out.append(row)
    return out


def main(args, log) -> int:
    p = quick_v4() if args.quick else default_v4()
    out = Path(args.out or Path(run.REPO_ROOT) / "outputs" / ("study_v4_quick" if args.quick else "study_v4"))
    docs = Path(args.docs) if args.docs else (out / "study_v4.md" if args.quick else run.REPO_ROOT / "docs" / "study_v4.md")
    for line in estimate_lines(p):
        log(line)
    task = lean.load_task(args.task, args.assets, log=log)
    if args.task != "fibonacci" and p.warm_starts > 1:
        raise SystemExit(f"--v4 --task {args.task}: v4's warm starts are built for the fibonacci task only; "
                         "allowed: --task fibonacci")
    base = lean.LoopSettings(max_response_length=task.max_response_length, eval_prompts=p.eval_prompts)
    out.mkdir(parents=True, exist_ok=True)
    kinds = sorted({lean.REGIMES_BY_NAME[r].model for r in p.regimes})
    seeds_ws = accepted_warm_starts(args.task, args.assets, kinds, p.warm_starts, not args.quick, log)
    log(f"warm starts: seeds {seeds_ws}" + (" (the smoke run skips the acceptance rule)" if args.quick else ""))

    # pilot: the run length and the gap regime
    ladder = [f"moe{e}_top1" for e, _ in plan_v4.GAP_REGIME_LADDER]
    stale = [r for r in p.regimes if r not in ladder]
    pilot_regimes = stale + [ladder[0]] * (ladder[0] in p.regimes)
    pilot = [Run("pilot", r, "vanilla", v3_vanilla_lr(r), s) for r in pilot_regimes for s in p.tuning_seeds]
    run.run_all(pilot, args.task, args.assets, p.pilot_steps, base, out, args.parallel, "pilot")
    pilot_records = run.load_records(pilot, out, args.task, p.pilot_steps, base)
    pilot_rows = [analysis.run_summary(r) for r in pilot_records]
    gap = None
    for name in ladder if ladder[0] in p.regimes else []:
        if name != ladder[0]:
            more = [Run("pilot", name, "vanilla", v3_vanilla_lr(name), s) for s in p.tuning_seeds]
            run.run_all(more, args.task, args.assets, p.pilot_steps, base, out, args.parallel, "pilot")
            pilot_rows += [analysis.run_summary(r) for r in run.load_records(more, out, args.task, p.pilot_steps, base)]
        gap = gap_regime(pilot_rows)
        if gap:
            break
    regimes = stale + ([gap] if gap else [])
    curves = {r: [[m["eval_heldout"] for m in rec["metrics"]] for rec in pilot_records if rec["run"].regime == r]
              for r in stale}
    steps = max(analysis.FINAL_WINDOW, plateau_length(curves, p.pilot_steps))
    gap_note = (gap or "none reached the gap (Q6 not asked)") if ladder[0] in p.regimes else "not in this plan"
    log(f"pilot: run length T = {steps} steps (plateau rule); gap regime: {gap_note}")

    # tuning with the edge rule
    grids = {(r, m): p.grid(r if r not in ladder else ladder[0], m) for r in regimes for m in p.methods}
    while True:
        tuning = [Run("tune", r, m, lr, s, ws) for (r, m), g in grids.items() for lr in g for s in p.tuning_seeds
                  for ws in seeds_ws]
        run.run_all(tuning, args.task, args.assets, steps, base, out, args.parallel, "tuning")
        tuning_rows = [analysis.run_summary(r) for r in run.load_records(tuning, out, args.task, steps, base)]
        chosen = analysis.choose_settings(tuning_rows)
        extended = {k: plan_v4.extend(grids[k], chosen[k]["lr"]) for k in grids if k in chosen}
        extended = {k: g for k, g in extended.items() if g}
        if not extended:
            break
        log(f"edge rule: {len(extended)} grids extended: " + ", ".join(f"{r}/{m} -> {g}" for (r, m), g in extended.items()))
        grids.update(extended)

    # evaluation on (warm start, seed) pairs
    evaluation = [Run("eval", r, m, chosen[(r, m)]["lr"], s, ws) for r in regimes for m in p.methods
                  for ws in seeds_ws for s in range(1, p.pairs.get(r, p.pairs.get(ladder[0], 0)) // p.warm_starts + 1)
                  if (r, m) in chosen]
    log(f"evaluation: {len(evaluation)} runs of {steps} steps")
    run.run_all(evaluation, args.task, args.assets, steps, base, out, args.parallel, "evaluation")
    eval_records = run.load_records(evaluation, out, args.task, steps, base)
    write_report(docs, regimes, gap_note, steps, grids, chosen, tuning_rows, _pair_rows(eval_records),
                 len(evaluation), seeds_ws)
    log(f"wrote {docs}")
    return 0


def write_report(docs: Path, regimes, gap_note: str, steps, grids, chosen, tuning_rows, rows, planned,
                 warm_starts: list[int]) -> None:
    """docs/study_v4.md: the pre-registration's answers (final reward; AUC secondary), with the MDE of each
    and, where it exceeds the target, the pairs that would reach it; the difference per warm start; data.
    ``gap_note``: the gap regime's name, or why there is none."""
    import pandas as pd

    from hmpo_verl.lab.study import report

    data_dir = docs.parent / f"{docs.stem}_data"
    data_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(tuning_rows + rows).to_csv(data_dir / "runs.csv", index=False, float_format="%.6g")
    gap = gap_note if gap_note in regimes else None
    qs = questions(regimes, gap)
    vanilla_gaps = analysis.regime_gaps([r for r in rows if r["method"] == "vanilla"])
    lines = ["# Comparative study, version 4: results", "",
             "Pre-registration: [`study_v4_plan.md`](study_v4_plan.md) (committed before these runs). Generated by "
             "`python -m hmpo_verl.lab.study --v4`.", "",
             f"Runs: {len(rows)} of {planned} evaluation runs finished, T = {steps} steps (plateau rule), gap regime: "
             f"{gap_note}. Grids after the edge rule: " +
             "; ".join(f"{r}/{m} {g} → {chosen[(r, m)]['lr']:g}" for (r, m), g in grids.items() if (r, m) in chosen) +
             ".", ""]
    for outcome, key in (("held-out final reward (primary)", "final_heldout"), ("held-out AUC (secondary)", "auc_heldout")):
        outcome_rows = [{**r, "final_heldout": r[key]} for r in rows]
        prim = analysis.primaries(qs, outcome_rows, chosen, vanilla_gaps) if rows else []
        lines += [f"## {outcome}", "", *(report.primary_table(prim, qs) if prim else ["No runs yet."]), ""]
        for r in prim:
            if r["kind"] == "paired" and math.isfinite(r["mde"]) and r["mde"] > plan_v4.MDE_TARGET:
                lines.append(f"* {r['id']}: MDE {r['mde']:.3f} > {plan_v4.MDE_TARGET}; "
                             f"{plan_v4.seeds_for_mde(r['sd'])} pairs would reach it (observed sd {r['sd']:.4f}).")
        lines.append("")
    lines += ["## Per warm start (final reward)", "",
              "*warm-start dependent*: two warm starts' intervals exclude 0 on opposite sides.", "",
              "| question | " + " | ".join(f"warm start {w}" for w in warm_starts) + " | |",
              "|---|" + "---|" * (len(warm_starts) + 1)]
    for q in qs:
        if q.kind != "paired":
            continue
        tests = []
        for w in warm_starts:
            d = analysis.question_differences(q, [r for r in rows if r["warm_start"] == w], chosen)
            tests.append(analysis.paired_test(d) if len(d) >= 2 else None)
        dependent = any(t and t["lo"] > 0 for t in tests) and any(t and t["hi"] < 0 for t in tests)
        lines.append(f"| {q.id} | " + " | ".join(report._ci(t) if t else "—" for t in tests) +
                     f" | {'warm-start dependent' if dependent else ''} |")
    docs.write_text("\n".join(lines) + "\n")
