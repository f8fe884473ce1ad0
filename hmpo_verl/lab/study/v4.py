"""``python -m hmpo_verl.lab.study --v4``: the fourth version as pre-registered (plan_v4.py,
docs/study_v4_plan.md), resumable (every run one JSON file, as v3's), its estimate printed first.

Stages: the pilot (vanilla, tuning seeds, warm start 0) fixes the run length T by the plateau rule
and picks the gap regime; the tuning runs every method's grid on the tuning seeds x warm starts and
extends a grid whose choice sits at an edge (the edge rule), until none does; the evaluation runs
every method at its setting on (warm start, seed) pairs; the report answers the primaries.

``--report-only`` goes through the same stages (``Runs.runner`` ``no_runs`` instead of ``run.run_all``) and builds
nothing: it reads the warm starts already built, and the report says how far the records reach; a stage with runs
missing ends it (no run length from part of the pilot, no setting from part of the tuning), and a partial
evaluation is tested on the pairs that every method of a question finished.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hmpo_verl.lab import lag_fidelity, lean, stats
from hmpo_verl.lab.study import analysis, plan, plan_v4, run
from hmpo_verl.lab.study.plan import Question, Run


GAP_LADDER = [f"moe{e}_top1" for e, _ in plan_v4.GAP_REGIME_LADDER]  # the gap regimes' names, in order


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
    """The pilot's lr: vanilla's tuned lr in v3 (docs/study_v3_data/settings.csv); a gap regime takes ``moe_bf16``'s."""
    import pandas as pd

    frame = pd.read_csv(plan_v4.V3_DATA / "settings.csv")
    name = "moe_bf16" if regime.startswith("moe") and regime.endswith("_top1") else regime
    return float(frame[(frame["regime"] == name) & (frame["method"] == "vanilla")]["lr"].iloc[0])


def plateau_length(curves: dict[str, list[list[float]]], cap: int) -> int | None:
    """The plateau rule: the first multiple of 10 up to ``cap`` at which the least-squares slope of each regime's
    mean held-out reward (``curves[regime]``: one curve per pilot run) over the last 10 steps is below
    ``plan_v4.PLATEAU_SLOPE`` per step in every regime; None if none (the run length is then the cap)."""
    import numpy as np

    means = {r: np.mean(np.array(c), axis=0) for r, c in curves.items()}
    for t in range(10, cap + 1, 10):
        if all(stats.ols_slope(list(range(10)), m[t - 10:t]) < plan_v4.PLATEAU_SLOPE for m in means.values()):
            return t
    return None


def gap_regime(pilot_rows: list[dict]) -> str | None:
    """The first gap regime of the ladder whose vanilla pilot runs reach ``GAP_REGIME_MIN`` (None if none)."""
    for experts, _ in plan_v4.GAP_REGIME_LADDER:
        gaps = [r["update/log_ah_gap"] for r in pilot_rows if r["regime"] == f"moe{experts}_top1"]
        if gaps and sum(gaps) / len(gaps) >= plan_v4.GAP_REGIME_MIN:
            return f"moe{experts}_top1"
    return None


def questions(regimes: list[str], gap: str | None, methods) -> list[Question]:
    """v4's primaries: v3's undecided ones whose regimes and ``methods`` run here (Q3 over ``regimes``), and Q6 in
    ``gap`` (a question whose methods the plan lacks could never be tested: it is not asked)."""
    und = {r["id"] for r in plan_v4.undecided(plan_v4.v3_primaries())}
    qs = [q for q in plan.primary_questions() if q.id in und and q.kind != "trend" and set(q.regimes) <= set(regimes)
          and {q.a, q.b} <= set(methods)]
    trend = [r for r in regimes if r != gap]
    if "Q3" in und and len(trend) >= 3 and set(plan.P_METHODS) <= set(methods):
        qs.append(Question("Q3", "trend", "", "", tuple(regimes), "as v3's Q3, with vanilla's own gap"))
    if gap and {"hmpo", "vanilla"} <= set(methods):
        qs.append(Question("Q6", "paired", "hmpo", "vanilla", (gap,), f"In `{gap}`, hmpo vs vanilla"))
    return qs


def accepted_warm_starts(task_name: str, assets, kinds: list[str], wanted: int, check: bool, log,
                         build: bool = True) -> tuple[list[int], str | None]:
    """The warm-start seeds v4 uses: tried in order 0, 1, ..., each accepted when every model of ``kinds`` (the
    models of the regimes v4 tunes and evaluates) fits to greedy accuracy >= ``plan_v4.WARM_START_MIN_GREEDY``
    (its ``warm_start.json``; a seed's later models are not built once one fails); all tried ones when not
    ``check`` (the smoke run). Stops loud after 5 x ``wanted`` seeds. ``build`` False (--report-only): only the
    warm starts already built are read; the second value then names the first one not built (None when
    ``wanted`` were accepted)."""
    accepted = []
    for seed in range(5 * wanted):
        if len(accepted) == wanted:
            return accepted, None
        greedy = {}
        for kind in kinds:
            greedy[kind] = _fit(task_name, assets, kind, seed, log, build)
            if greedy[kind] is None:
                return accepted, _not_built(task_name, assets, kind, seed)
            if check and greedy[kind] < plan_v4.WARM_START_MIN_GREEDY:
                break
        if not check or min(greedy.values()) >= plan_v4.WARM_START_MIN_GREEDY:
            accepted.append(seed)
        else:
            log(f"warm start {seed} skipped: greedy accuracy {greedy} < {plan_v4.WARM_START_MIN_GREEDY}")
    if len(accepted) < wanted:
        raise SystemExit(f"only {len(accepted)} of {5 * wanted} warm-start seeds reach greedy accuracy "
                         f"{plan_v4.WARM_START_MIN_GREEDY}; v4 needs {wanted}: see plan_v4.WARM_START_MIN_GREEDY")
    return accepted, None


def pinned_warm_starts(task_name: str, assets, kinds: list[str], seeds: list[int], log,
                       build: bool = True) -> tuple[list[int], str | None, dict[str, dict[int, float]]]:
    """The warm starts of a restored study (``--restore``): ``seeds``, the ones its data's tuning and evaluation
    ran on (accepted where they were made, :func:`accepted_warm_starts`), kept whatever their fit here, since a
    study's regimes share them. Each model of ``kinds`` is built for each seed and its fit read: the third value
    maps each model whose fit of some seed is below ``plan_v4.WARM_START_MIN_GREEDY`` here (another machine's
    arithmetic fits the same recipe and seed differently) to its fits; the regimes of those models do not run
    here (:func:`stages`). The second value as for :func:`accepted_warm_starts` (``build`` False)."""
    unfit = {}
    for kind in kinds:
        greedy = {}
        for seed in seeds:
            greedy[seed] = _fit(task_name, assets, kind, seed, log, build)
            if greedy[seed] is None:
                return seeds, _not_built(task_name, assets, kind, seed), unfit
        if min(greedy.values()) < plan_v4.WARM_START_MIN_GREEDY:
            unfit[kind] = greedy
    return seeds, None, unfit


def _fit(task_name: str, assets, kind: str, seed: int, log, build: bool) -> float | None:
    """The greedy accuracy of warm start ``seed`` of the ``kind`` model (its ``warm_start.json``), built first when
    ``build``; None when it is not built."""
    if build:
        run.warm_start_model(task_name, assets, kind, seed, log=log)
    report = run.built_warm_start_report(task_name, assets, kind, seed)
    return None if report is None else report["greedy_accuracy"]


def _not_built(task_name: str, assets, kind: str, seed: int) -> str:
    return f"warm start {seed} of the {kind} model is not built ({run.warm_start_dir(task_name, assets, kind, seed)})"


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


def _rows(records) -> list[dict]:
    """Run summaries (analysis.run_summary) with the run's warm start."""
    return [{**analysis.run_summary(rec), "warm_start": rec["run"].warm_start} for rec in records]


def _pair_rows(records: list[dict]) -> list[dict]:
    """Run summaries keyed for pairing by (warm start, seed): ``seed`` becomes ``"<ws>:<seed>"``."""
    return [{**row, "seed": f"{row['warm_start']}:{row['seed']}"} for row in _rows(records)]


STEP_COLUMNS = ("reward", "eval_heldout", "eval_train", "update/log_ah_gap", "mismatch/log_ah_gap", "routing/flip_frac")


@dataclass(frozen=True)
class Results:
    """How far v4's stages reached, as :func:`stages` found them: what the report and its data are written from."""

    pilot: Pilot
    order: list[str]  # every regime, in the execution order
    warm_starts: list[int]  # the accepted warm-start seeds
    grids: dict  # (regime, method) -> its grid after the edge rule, in the regimes tuned
    chosen: dict  # (regime, method) -> the tuning's choice (analysis.choose_settings)
    tuning_rows: list[dict]  # every finished tuning run (an incomplete tuning's too: what a new machine restores)
    eval_records: list[dict]  # the finished evaluation runs
    planned: int  # the evaluation runs of the plan, every regime
    finished: list[str]  # the regimes whose evaluation is complete
    not_here: dict[str, int]  # regime -> its planned evaluation runs, for the regimes not run on this machine
    status: list[str]  # how far each stage's runs reach (the report's list)
    facts: dict  # scope_facts (the scope paragraph at the top)


def write_data(data_dir: Path, results: Results) -> None:
    """The report's data beside it: ``runs.csv``, a row per finished pilot run, tuning run (an incomplete
    tuning's too, which ``--restore`` restores on a new machine) and evaluation run (its
    summary, warm start and seed: what the tuning, the tests and the tables are computed from), and
    ``steps.csv.gz``, the pilot's and the evaluation runs' per-step ``STEP_COLUMNS`` (step 0: the evaluation
    before the first update; what the run length rule, the reward figure and the plateau table read)."""
    from hmpo_verl.lab.study import report

    steps = []
    for rec in [*results.pilot.records, *results.eval_records]:
        r = rec["run"]
        key = {"phase": r.phase, "regime": r.regime, "method": r.method, "lr": r.lr, "warm_start": r.warm_start,
               "seed": r.seed}
        steps.append({**key, "step": 0, **rec["first_eval"]})
        steps += [{**key, "step": i, **{c: m[c] for c in STEP_COLUMNS if c in m}}
                  for i, m in enumerate(rec["metrics"], 1)]
    report.save_run_tables(data_dir, _rows(results.pilot.records) + results.tuning_rows + _rows(results.eval_records),
                           steps)


@dataclass(frozen=True)
class Runs:
    """Where v4's runs live and how a stage gets them: ``runner`` is ``run.run_all`` (run what is missing) or
    ``no_runs`` (--report-only: the finished ones only)."""

    task: str
    assets: str | None
    base: lean.LoopSettings
    out: Path
    parallel: int
    runner: Callable
    committed: run.Committed | None = None  # --restore: a report's data, the records of runs with no file written from it
    as_recorded: bool = False  # --restore-as-recorded: the data's complete stages restored though made elsewhere

    def finished(self, runs: list[Run], steps: int, label: str) -> list[dict]:
        """The records of ``runs`` that are finished once the runner has run (``run.load_records``); with
        ``committed``, the runs it holds are restored first (``run.restore``)."""
        if self.committed is not None:
            run.restore(runs, self.committed, self.task, self.assets, steps, self.base, self.out, self.as_recorded)
        self.runner(runs, self.task, self.assets, steps, self.base, self.out, self.parallel, label)
        return run.load_records(runs, self.out, self.task, steps, self.base)


def no_runs(runs: list[Run], task: str, assets: str | None, steps: int, base: lean.LoopSettings, out: Path,
            parallel: int, label: str) -> None:
    """The runner of --report-only: starts nothing, and stops loud where its report would be silently wrong: a
    record made with other settings (the report would count it as not run; the running path runs it again, said)
    or runs made from other inputs than these (:func:`run.pin_inputs`, checked, nothing pinned)."""
    other = [(r, why) for r in runs if (why := run.record_mismatch(r, out, task, steps, base)) not in (None, "no record")]
    if other:
        r, why = other[0]
        raise SystemExit(f"--report-only: {label}: {len(other)} of {len(runs)} records in {out} were made with other "
                         f"settings (e.g. {r.path(out).relative_to(out)}: {why}); this report would count them as not "
                         "run. Report with the options they were made with (--quick, --task, --assets, the code), or "
                         "run without --report-only: it runs them again and replaces their records")
    run.pin_inputs(out, run.run_inputs(runs, task, assets), write=False)


@dataclass(frozen=True)
class Pilot:
    done: int
    planned: int
    steps: int | None  # T; None while the pilot is incomplete
    capped: bool  # T is the pilot's length because no multiple of 10 met the plateau rule
    regimes: list[str]  # the regimes tuned and evaluated: the staleness ones and the gap regime (if any)
    gap_note: str  # the gap regime's name, or why there is none
    cpu_s: dict[str, float] = field(default_factory=dict)  # regime -> the pilot's mean CPU seconds per run
    records: tuple = ()  # every finished pilot run's record (the ladder's too): the committed data

    def line(self) -> str:
        if self.steps is None:
            return f"pilot: {self.done} of {self.planned} runs finished; no run length yet"
        return (f"pilot: {self.done} of {self.planned} runs finished; run length T = {self.steps} steps "
                f"({self.length_note()}); gap regime: {self.gap_note}")

    def length_note(self) -> str:
        return ("the plateau rule's cap: no multiple of 10 up to it met the rule" if self.capped else
                "the plateau rule")


def pilot_stage(p: V4Plan, runs: Runs) -> Pilot:
    """The pilot (vanilla, tuning seeds, warm start 0): the run length T by the plateau rule over the staleness
    regimes, and the first regime of the gap ladder that reaches the gap (the next rung's runs only when the
    one before does not)."""
    ladder = GAP_LADDER
    stale = [r for r in p.regimes if r not in ladder]
    pilot = [Run("pilot", r, "vanilla", v3_vanilla_lr(r), s)
             for r in stale + [ladder[0]] * (ladder[0] in p.regimes) for s in p.tuning_seeds]
    records = runs.finished(pilot, p.pilot_steps, "pilot")
    every, planned = list(records), len(pilot)  # every: the records of the ladder's runs too
    gap = None
    for name in ladder if ladder[0] in p.regimes and len(every) == planned else []:
        if name != ladder[0]:
            more = [Run("pilot", name, "vanilla", v3_vanilla_lr(name), s) for s in p.tuning_seeds]
            planned += len(more)
            every += runs.finished(more, p.pilot_steps, "pilot")
            if len(every) < planned:
                break
        gap = gap_regime(_rows(every))
        if gap:
            break
    if len(every) < planned:
        return Pilot(len(every), planned, None, False, [], "", records=tuple(every))
    curves = {r: [[m["eval_heldout"] for m in rec["metrics"]] for rec in records if rec["run"].regime == r]
              for r in stale}
    rule = plateau_length(curves, p.pilot_steps)
    steps = max(analysis.FINAL_WINDOW, rule or p.pilot_steps)
    gap_note = (gap or "none reached the gap (Q6 not asked)") if ladder[0] in p.regimes else "not in this plan"
    regimes = stale + ([gap] if gap else [])
    cpu = {r: sum(rec["cpu_s"] for rec in every if rec["run"].regime == r) /
           max(1, sum(rec["run"].regime == r for rec in every)) for r in regimes}
    return Pilot(len(every), planned, steps, rule is None, regimes, gap_note, cpu, tuple(every))


@dataclass(frozen=True)
class Tuning:
    done: int
    planned: int  # the runs of the current grids on every planned warm start
    grids: dict
    rows: list[dict]
    chosen: dict | None  # None while the tuning is incomplete: no setting is chosen from part of it
    extensions: list[str]  # the edge rule's extensions so far, "regime/method -> grid"

    def line(self) -> str:
        ext = f"; the edge rule extended {', '.join(self.extensions)}" if self.extensions else ""
        if self.chosen is None:
            return (f"tuning: {self.done} of {self.planned} runs of the current grids finished{ext}; no setting "
                    "chosen and no evaluation reported (a setting chosen from part of the tuning would break the "
                    "pre-registration)")
        return f"tuning: {self.done} of {self.planned} runs finished{ext}"


def start_grid(p: V4Plan, regime: str, method: str) -> tuple[float, ...]:
    """The starting grid (a gap regime further down the ladder tunes on the first's grids)."""
    return p.grid(GAP_LADDER[0] if regime in GAP_LADDER else regime, method)


def tuning_run_count(p: V4Plan, grids: dict) -> int:
    """The tuning runs of ``grids`` (any key -> learning rates) on the tuning seeds x every planned warm start."""
    return sum(len(g) for g in grids.values()) * len(p.tuning_seeds) * p.warm_starts


def tuning_stage(p: V4Plan, regimes: list[str], steps: int, seeds_ws: list[int], runs: Runs, log) -> Tuning:
    """Every method's grid in ``regimes`` on the tuning seeds x warm starts, extended by the edge rule until no
    choice sits at an edge; incomplete (``chosen`` None) while a run of the current grids, or a planned warm
    start, is missing."""
    grids = {(r, m): start_grid(p, r, m) for r in regimes for m in p.methods}
    extensions = []
    while True:
        tuning = [Run("tune", r, m, lr, s, ws) for (r, m), g in grids.items() for lr in g for s in p.tuning_seeds
                  for ws in seeds_ws]
        planned = tuning_run_count(p, grids)
        rows = _rows(runs.finished(tuning, steps, f"tuning {'/'.join(regimes)}"))
        if len(rows) < planned:
            return Tuning(len(rows), planned, dict(grids), rows, None, extensions)
        chosen = analysis.choose_settings(rows)
        extended = {k: plan_v4.extend(grids[k], chosen[k]["lr"]) for k in grids if k in chosen}
        extended = {k: g for k, g in extended.items() if g}
        if not extended:
            return Tuning(len(rows), planned, dict(grids), rows, chosen, extensions)
        extensions += [f"{r}/{m} -> {g}" for (r, m), g in extended.items()]
        log(f"edge rule: {len(extended)} grids extended: " + ", ".join(extensions[-len(extended):]))
        grids.update(extended)


def regime_pairs(p: V4Plan, regime: str) -> int:
    """The (warm start, seed) pairs planned in ``regime`` (a gap regime takes the ladder's first's)."""
    return p.pairs.get(regime, p.pairs.get(GAP_LADDER[0], 0))


def evaluation_runs(p: V4Plan, regime: str, chosen: dict, seeds_ws: list[int]) -> list[Run]:
    """The regime's evaluation runs, pair by pair (seed, then warm start, then method), so that the runs finished
    when a budget runs out are whole pairs."""
    per_ws = regime_pairs(p, regime) // p.warm_starts
    return [Run("eval", regime, m, chosen[(regime, m)]["lr"], s, ws) for s in range(1, per_ws + 1)
            for ws in seeds_ws for m in p.methods if (regime, m) in chosen]


def regime_cpu_s(p: V4Plan, pilot: Pilot, regime: str) -> float:
    """The CPU seconds of the regime's planned tuning (starting grids, before any edge extension) and evaluation
    runs, at the pilot's CPU seconds per run (the pilot runs T = its length; tuning and evaluation run T steps)."""
    tuning = tuning_run_count(p, {m: start_grid(p, regime, m) for m in p.methods})
    per_run = pilot.cpu_s[regime] * pilot.steps / p.pilot_steps
    return per_run * (tuning + regime_pairs(p, regime) * len(p.methods))


def regime_order(p: V4Plan, pilot: Pilot) -> list[str]:
    """The execution order, fixed after the pilot (it changes no rule, test or sample size of the plan): one
    regime at a time, tuned and then evaluated, in ascending order of its cost per primary question,
    :func:`regime_cpu_s` / its paired primaries (Q3 spans every regime and is not counted), ties by name. A budget
    that runs out has then answered as many primaries as the CPU time spent allows (a regime-major order would
    leave every question open until the last regime)."""
    gap = pilot.gap_note if pilot.gap_note in pilot.regimes else None
    qs = [q for q in questions(pilot.regimes, gap, p.methods) if q.kind != "trend"]
    return sorted(pilot.regimes, key=lambda r: (regime_cpu_s(p, pilot, r) / max(1, sum(r in q.regimes for q in qs)), r))


ORDER = "order.json"


def pin_order(out: Path, order: list[str], write: bool) -> None:
    """The execution order, kept in ``<out>/order.json`` when first computed (``write``): one computed later from
    other pilot records (a pilot run made again) stops loud: the study would switch regimes mid-way and its report
    call finished ones not started."""
    import json

    path = out / ORDER
    if path.exists():
        fixed = json.loads(path.read_text())
        if fixed != order:
            raise SystemExit(f"the execution order of the runs in {out} was fixed as {', '.join(fixed)} ({path}); the "
                             f"pilot's records now give {', '.join(order)} (a pilot run made again?). Restore the pilot "
                             f"records it came from, or delete {path} to take the new order (the finished runs are kept "
                             "and reused)")
    elif write:
        path.write_text(json.dumps(order) + "\n")


def pinned_seeds(out: Path, committed: run.Committed | None) -> list[int]:
    """The warm starts a restored study keeps (:func:`pinned_warm_starts`): those pinned in
    ``<out>/warm_starts.json`` once :func:`run.restore` restored a tuning or evaluation record (so that a later
    invocation without --restore, the printed "continue with" or --report-only, keeps them too), else those of
    ``committed``'s tuning and evaluation runs; a --restore whose data has others than the pinned ones stops loud.
    Empty when neither holds any (warm starts accepted by the rule, :func:`accepted_warm_starts`)."""
    import json

    path = out / run.PINNED_WARM_STARTS
    kept = json.loads(path.read_text())["seeds"] if path.exists() else []
    now = committed.warm_starts() if committed is not None else []
    if kept and now and kept != now:
        raise SystemExit(f"--restore {committed.source}: its runs' warm starts {now} are not those the runs in {out} "
                         f"were restored with, {kept} ({path}); point --out at a new folder to restore this data")
    return kept or now


def main(args, log) -> int:
    """The v4 study: every stage from the records in ``--out``, running what is missing first (``--out`` locked over
    every stage: :func:`run.out_lock`); with --report-only nothing is run or built and the report says how far the
    records reach."""
    from hmpo_verl.lab.study import report

    out = Path(args.out or Path(run.REPO_ROOT) / "outputs" / ("study_v4_quick" if args.quick else "study_v4"))
    docs = Path(args.docs) if args.docs else (out / "study_v4.md" if args.quick else run.REPO_ROOT / "docs" / "study.md")
    report.check_readme_source(args.readme, args.quick, docs, run.REPO_ROOT / "docs" / "study.md")
    if args.task != "fibonacci":
        raise SystemExit(f"--v4 --task {args.task}: v4's warm starts are built for the fibonacci task only; "
                         "allowed: --task fibonacci")
    if args.report_only:
        return stages(args, log, out, docs)
    with run.out_lock(out):
        return stages(args, log, out, docs)


def stages(args, log, out: Path, docs: Path) -> int:
    """:func:`main`'s work: the stages in order, each from the records in ``out``, then the report ``docs``."""
    p = quick_v4() if args.quick else default_v4()
    report_only = args.report_only
    for line in estimate_lines(p):
        log(line)
    resume = " ".join(["python -m hmpo_verl.lab.study --v4", *(["--quick"] if args.quick else []), f"--out {out}",
                       *([f"--assets {args.assets}"] if args.assets else []), *([f"--docs {args.docs}"] if args.docs else [])])
    command = " ".join([resume, "--report-only" if report_only else f"--parallel {args.parallel}"])
    provenance = provenance_line(command)
    if report_only and not (out / "runs").is_dir():
        raise SystemExit(f"--report-only: {out} holds no v4 runs (no {out / 'runs'}); point --out at the runs' "
                         f"folder, or start them: {resume}")
    if not report_only:
        with run.keep_built(out):
            lean.load_task(args.task, args.assets, log=log)  # the task's assets, built once before the workers
    base = lean.LoopSettings(max_response_length=lean.recipe_max_response_length(args.task), eval_prompts=p.eval_prompts)
    runs = Runs(args.task, args.assets, base, out, args.parallel, no_runs if report_only else run.run_all,
                run.load_committed(Path(args.restore)) if args.restore else None, args.restore_as_recorded)
    pilot = pilot_stage(p, runs)  # on warm start 0, as the plan fixes, whatever its fit
    status = []

    def say(line: str) -> None:  # a status line of the report, printed as soon as it is known
        status.append(line)
        log(line)

    def progress_only() -> int:  # nothing chosen yet: the progress page (and --readme refused)
        write_progress(docs, status, resume, provenance)
        log(f"wrote {docs}\ncontinue with: {resume}")
        if args.readme:
            update_readme(run.REPO_ROOT / "README.md", {}, False, "no regimes", docs)
        return 0 if report_only else 1

    say(pilot.line())
    if not pilot.steps:
        return progress_only()
    # the warm starts: every model of the regimes the pilot kept (the gap regime's, not the ladder's first)
    kinds = sorted({lean.REGIMES_BY_NAME[r].model for r in pilot.regimes})
    pinned = pinned_seeds(out, runs.committed)
    with run.keep_built(out):
        if pinned:
            seeds_ws, not_built, unfit = pinned_warm_starts(args.task, args.assets, kinds, pinned, log,
                                                            build=not report_only)
        else:
            seeds_ws, not_built = accepted_warm_starts(args.task, args.assets, kinds, p.warm_starts, not args.quick,
                                                       log, build=not report_only)
            unfit = {}
    if pinned:
        say(f"warm starts: seeds {seeds_ws}, those of the restored data's runs (accepted where they were made), "
            f"for the models {kinds}" + (f"; {not_built}, so the tuning cannot finish" if not_built else "") +
            "".join(f"; the {kind} model's fits here, {', '.join(f'{k}: {g:.2f}' for k, g in fits.items())}, are "
                    f"below {plan_v4.WARM_START_MIN_GREEDY} (this machine's arithmetic fits the same recipe and "
                    "seeds differently), so its regimes do not run here" for kind, fits in unfit.items()))
    else:
        say(f"warm starts: {len(seeds_ws)} of {p.warm_starts} accepted for the models {kinds}, seeds {seeds_ws}" +
            (f"; {not_built}, so the tuning cannot finish" if not_built else "") +
            (" (the smoke run skips the acceptance rule)" if args.quick else ""))
    if not args.quick and 0 not in seeds_ws and not not_built:
        say("the pilot ran on warm start 0, as the plan fixes, which the acceptance rule rejects for these models: "
            "the run length and the gap regime come from that fit")
    order = regime_order(p, pilot)
    pin_order(out, order, write=not report_only)
    planned = sum(regime_pairs(p, r) * len(p.methods) for r in order)
    say("execution order (one regime at a time, tuned then evaluated; the least CPU time per primary first): " +
        ", ".join(f"{r} ({regime_cpu_s(p, pilot, r) / 3600:.1f})" for r in order) +
        f"; in brackets the CPU-hours of each regime's tuning (before edge extensions) and evaluation at "
        f"T = {pilot.steps} by the pilot's CPU time per run, {sum(regime_cpu_s(p, pilot, r) for r in order) / 3600:.1f} "
        "in all")
    steps, chosen, grids, tuning_rows, eval_records, reached, finished = pilot.steps, {}, {}, [], [], [], []
    unfit_here = [r for r in order if lean.REGIMES_BY_NAME[r].model in unfit]
    for regime in order:
        if regime in unfit_here:
            continue
        reached.append(regime)
        tuning = tuning_stage(p, [regime], steps, seeds_ws, runs, log)
        say(f"{regime}: {tuning.line()}")
        tuning_rows += tuning.rows
        if not tuning.chosen:
            break
        chosen.update(tuning.chosen)
        grids.update(tuning.grids)
        evaluation = evaluation_runs(p, regime, tuning.chosen, seeds_ws)
        records = runs.finished(evaluation, steps, f"evaluation {regime}")
        eval_records += records
        say(f"{regime}: evaluation: {len(records)} of {len(evaluation)} runs finished")
        if len(records) < len(evaluation):
            break
        finished.append(regime)
    if unfit_here:
        say("not run on this machine (its model's fits of the warm starts are below the plan's threshold here): " +
            ", ".join(unfit_here))
    if later := [r for r in order if r not in reached and r not in unfit_here]:
        say("not started: " + ", ".join(later))
    if restored := run.restored_line(out):
        say(restored)
    if not chosen:
        return progress_only()
    not_here = {r: regime_pairs(p, r) * len(p.methods) for r in unfit_here}
    results = Results(pilot, order, seeds_ws, grids, chosen, tuning_rows, eval_records, planned, finished, not_here,
                      status,
                      {**scope_facts(args.task, args.assets, kinds, seeds_ws), "elsewhere": run.restored_elsewhere(out)})
    write_data(docs.parent / f"{docs.stem}_data", results)
    blocks = write_report(docs, results, provenance)
    done = len(finished) + len(unfit_here) == len(order)  # every regime this machine can run
    log(f"wrote {docs}: {len(eval_records)} of {planned} evaluation runs" + ("" if done else f"\ncontinue with: {resume}"))
    if args.readme:
        update_readme(run.REPO_ROOT / "README.md", blocks, done,
                      f"{len(finished)} of the {len(order) - len(unfit_here)} regimes this machine runs", docs)
        log(f"wrote the README's guide and scope from {docs}")
    return 0 if done or report_only else 1


def update_readme(readme: Path, blocks: dict[str, list[str]], done: bool, evaluated: str, docs: Path) -> None:
    """--v4 --readme: the README's guide and scope blocks from v4's report (``blocks``: :func:`write_report`'s), only
    once every regime this machine runs is evaluated (before, they stay v3's: a guide from part of v4 would drop
    regimes; one whose model does not fit here is said in the report's scope and status), loud otherwise, and loud
    when the README lacks a block."""
    from hmpo_verl.lab.study import report

    if not done:
        raise SystemExit(f"--readme: v4 has evaluated {evaluated}; the README's guide and scope stay v3's until "
                         f"every such regime is evaluated ({docs} is written). Run again without --readme, or when the "
                         "study is complete")
    for key, start, end in (("guide", report.GUIDE_START, report.GUIDE_END), ("scope", report.SCOPE_START, report.SCOPE_END)):
        if not report.update_readme(readme, blocks[key], start, end):
            raise SystemExit(f"{readme} has no {start} ... {end} block: the README's {key} is not updated")


def curves(records: list[dict]) -> dict[tuple[str, str], list[list[float]]]:
    """(regime, method) -> the held-out reward after each step, one list per finished evaluation run."""
    out: dict = {}
    for rec in records:
        out.setdefault((rec["run"].regime, rec["run"].method), []).append([m["eval_heldout"] for m in rec["metrics"]])
    return out


def plateau_lines(curves_by_key: dict, regimes, steps: int) -> list[str]:
    """Whether the evaluation runs reached the plateau the run length was chosen for: per regime, over every
    method's runs and over vanilla's (the plateau rule's method), the runs whose held-out reward still rises over
    the last ``analysis.RISING_WINDOW`` steps (least-squares slope > 0; a run at a plateau does so by noise about
    half the time) and the mean of that slope with its 95 % t interval (none with fewer than 2 runs)."""
    lines = [f"| regime | runs of | runs | still rising at step {steps} | mean slope over the last "
             f"{analysis.RISING_WINDOW} steps, per step [95 % CI] |", "|---|---|---|---|---|"]
    for regime in regimes:
        for label, keep in (("every method", lambda m: True), ("vanilla", lambda m: m == "vanilla")):
            cs = [c for (r, m), runs_ in curves_by_key.items() if r == regime and keep(m) for c in runs_]
            if len(cs) < 2:
                continue
            slopes = analysis.last_slopes(cs)
            mean, half = stats.mean_ci(slopes)
            lines.append(f"| {regime} | {label} | {len(cs)} | {sum(s > 0 for s in slopes)} | {mean:+.5f} "
                         f"[{mean - half:+.5f}, {mean + half:+.5f}] |")
    return lines


def scope_facts(task_name: str, assets: str | None, kinds: list[str], warm_starts: list[int]) -> dict:
    """What the scope paragraph states about the task and the models, read from assets already built (nothing is
    built): ``prompts`` (distinct training prompts not held out, held-out prompts; None when the task's data is
    not built), ``params`` (kind -> parameters of its first accepted warm start's model, the built ones),
    ``fits`` (warm start -> kind -> its ``warm_start.json``, the built ones)."""
    import pandas as pd

    from hmpo_verl.lab.tasks.common import TaskPaths

    data = TaskPaths(Path(lean.asset_dirs(task_name, assets)["dense"]))
    prompts = None
    if data.train_parquet.exists() and data.test_parquet.exists():
        key = lambda prompt: str([dict(m) for m in prompt])  # noqa: E731  (a chat prompt's identity)
        held = {key(p) for p in pd.read_parquet(data.test_parquet)["prompt"]}
        prompts = (len({key(p) for p in pd.read_parquet(data.train_parquet)["prompt"]} - held), len(held))
    params, fits = {}, {}
    for kind in kinds:
        for k in warm_starts:
            report_ = run.built_warm_start_report(task_name, assets, kind, k)
            if report_ is None:
                continue
            fits.setdefault(k, {})[kind] = report_
            model_dir = TaskPaths(run.warm_start_dir(task_name, assets, kind, k)).model
            if kind not in params and (model_dir / "config.json").exists():
                params[kind] = sum(t.numel() for t in lean.load_model(str(model_dir)).parameters())
    return {"prompts": prompts, "params": params, "fits": fits}


ELSEWHERE_FITS = ("; the regimes restored from another machine's data trained on that machine's fits of the same "
                  "seeds, which its data does not hold")


def scope_lines(facts: dict, steps: int, steps_note: str, curves_by_key: dict, chosen: dict, primary: list[dict],
                evaluated: list[str], regimes: list[str], finished: list[str]) -> list[str]:
    """v4's scope, from its data: ``facts`` (:func:`scope_facts`), the run length (``steps_note``: how the pilot
    set it, :meth:`Pilot.length_note`) and how many evaluation runs
    still rise at its end (``curves_by_key``), the settings still at a grid's edge after the edge rule (the
    ladder's end), the paired primaries whose MDE exceeds the target, the regimes evaluated (``finished``: in full)."""
    curves_ = [c for cs in curves_by_key.values() for c in cs]
    rising = analysis.still_rising(curves_)
    edges = analysis.grid_edges(chosen)
    at_edge = [f"`{m}` in `{r}` ({which})" for which in ("smallest", "largest") for r, m in edges[which]]
    tuned = len({r for r, _ in chosen})
    paired = [r for r in primary if r["kind"] == "paired" and math.isfinite(r.get("mde", math.nan))]
    wide = [r for r in paired if r["mde"] > plan_v4.MDE_TARGET]
    prompts = facts["prompts"]
    task = (f"One task (`fibonacci`: {prompts[0] + prompts[1]} prompts, {prompts[0]} trained on, {prompts[1]} held "
            "out)" if prompts else "One task (`fibonacci`; its data is not built here, so its counts are not stated)")
    models = "; ".join(f"{kind} {n:,}" for kind, n in sorted(facts["params"].items()))
    fits = "; ".join(f"{k}: " + ", ".join(f"{kind} {f['greedy_accuracy']:.2f}" for kind, f in sorted(kinds.items()))
                     for k, kinds in sorted(facts["fits"].items()))
    return [
        f"**Scope of study v4: what it can and cannot say.** {task}, small models (parameters: {models or 'not built here'}), "
        f"each warm-started by a supervised fit that saw every prompt's answer, held-out ones included (held-out means "
        f"never RL-trained on, not unseen). {len(facts['fits'])} warm starts (seed: greedy accuracy of each model's "
        f"fit as built on the machine that wrote this report: {fits or 'none built'}"
        f"{ELSEWHERE_FITS if facts.get('elsewhere') else ''}) are crossed with the evaluation seeds; the unit is the "
        "(warm start, seed) pair. "
        f"Runs are {steps} steps long ({steps_note}); at the last step {rising} of {len(curves_)} "
        f"evaluation runs ({rising / max(len(curves_), 1):.0%}) still rise (least-squares slope of held-out reward "
        f"over the last {analysis.RISING_WINDOW} steps > 0; a run at a plateau does so by noise about half the time). "
        "Settings at a grid's edge after the edge rule (the ladder's end)" +
        (f", in the {tuned} of {len(regimes)} regimes tuned so far" if tuned < len(regimes) else "") + ": " +
        (", ".join(at_edge) or "none") + ". "
        f"The MDE exceeds ±{plan_v4.MDE_TARGET} in {len(wide)} of the {len(paired)} paired primaries tested: there an "
        f"*undecided* verdict means the study could not tell, not that the methods are alike. Regimes evaluated: "
        f"{evaluated_text(evaluated, regimes, finished)}" +
        "."]


def evaluated_text(evaluated: list[str], regimes, finished: list[str]) -> str:
    """"k of n (`a`, `b` in part)": the regimes with evaluation runs, those not finished marked."""
    names = ", ".join(f"`{r}`" + ("" if r in finished else " in part") for r in evaluated)
    return f"{len(evaluated)} of {len(regimes)}" + (f" ({names})" if names else "")


def provenance_line(command: str) -> str:
    """The report's exact command and versions."""
    from hmpo_verl.lab.study import report

    return f"Command: `{command}`. Versions: {report.versions_text()}."


def write_progress(docs: Path, status: list[str], resume: str, provenance: str) -> None:
    """The report while the pilot or the tuning is incomplete: how far the runs reach, nothing chosen or tested;
    ``resume``: the command that continues; ``provenance``: :func:`provenance_line`."""
    docs.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# Comparative study, version 4: results (incomplete)", "",
             "Pre-registration: [`study_v4_plan.md`](study_v4_plan.md). Generated from the runs finished so far by "
             "`python -m hmpo_verl.lab.study --v4` (`--report-only`: without running the rest). " + provenance, "",
             *[f"* {line}" for line in status], "", f"Continue (runs what is missing, then reports): `{resume}`", ""]
    docs.write_text("\n".join(lines))


def write_report(docs: Path, results: Results, provenance: str) -> dict[str, list[str]]:
    """v4's report (docs/study.md): the pre-registration's answers (final reward; AUC secondary), with the MDE of each
    and, where it exceeds the target, the pairs that would reach it; the difference per warm start; data. Each
    question is tested on the (warm start, seed) pairs all its methods finished. A paired question whose regime
    has no evaluation run, and the trend question until every regime's evaluation is complete, are *not reached*:
    they stay in the Holm families with p = 1. Returns the README's copies of the guide and the scope."""
    from hmpo_verl.lab.study import report

    regimes, steps, gap_note = results.order, results.pilot.steps, results.pilot.gap_note
    grids, chosen, finished, warm_starts = results.grids, results.chosen, results.finished, results.warm_starts
    rows, curves_by_key = _pair_rows(results.eval_records), curves(results.eval_records)
    data = f"{docs.stem}_data"  # write_data's folder beside the report
    gap = gap_note if gap_note in regimes else None
    qs = questions(regimes, gap, {m for _, m in chosen})  # (every method of the plan is tuned in each regime)
    started = {r["regime"] for r in rows}
    unreached = frozenset(q.id for q in qs if not set(q.regimes) <= (set(finished) if q.kind == "trend" else started))
    vanilla_gaps = analysis.regime_gaps([r for r in rows if r["method"] == "vanilla"])
    lines = ["# Comparative study, version 4: results", "",
             "Pre-registration: [`study_v4_plan.md`](study_v4_plan.md) (committed before these runs); the version it "
             "follows: [`study_v3.md`](study_v3.md) (archived, with its data). Generated by "
             "`python -m hmpo_verl.lab.study --v4` (`--report-only`: from the runs finished so far). " + provenance, "",
             "SCOPE", "",
             f"Runs: {len(rows)} of {results.planned} evaluation runs finished" +
             "".join(f"; {n} are {r}'s, not run on this machine (below)" for r, n in results.not_here.items()) +
             ("; the others are not run yet (the study is still running, or its budget ran out)"
              if len(rows) + sum(results.not_here.values()) < results.planned else "") +
             ("; each question is tested on the (warm start, seed) pairs that every one of its methods finished"
              if len(rows) < results.planned else "") +
             f". T = {steps} steps. Grids after the edge rule: " +
             "; ".join(f"{r}/{m} {g} → {chosen[(r, m)]['lr']:g}" for (r, m), g in grids.items() if (r, m) in chosen) +
             ".", "", f"Data: `{data}/runs.csv` (a row per finished pilot run, tuning run -- an incomplete tuning's too, "
             "which the report does not use until it is complete -- and evaluation run: its phase, regime, "
             "method, lr, warm start, seed and outcomes; what the tuning, the tests and the tables are computed from) "
             f"and `{data}/steps.csv.gz` (after each step of every pilot and evaluation run, step 0 before the first "
             "update: the batch's sampled reward, the exact held-out and training-prompt reward, the update's and the "
             "behaviour's `log_ah_gap`, MoE routing flips; what the run length, the reward figure and the plateau "
             "table are computed from).", "",
             *[f"* {line}" for line in results.status], ""]
    primary = []  # the primary outcome's tests (the guide's decided verdicts)
    # a question whose regime is evaluated in part: its test is on the pairs so far, not the registered sample
    interim = {q.id for q in qs if q.id not in unreached and not set(q.regimes) <= set(finished)}
    in_part = [r for r in regimes if r in started and r not in finished]  # a table's rows of these are interim
    interim_rows = [f"Interim: rows of {', '.join(f'`{r}`' for r in in_part)} come from the pairs finished so far "
                    "(evaluated in part; the list at the top counts the runs) and decide nothing.", ""] if in_part else []
    for outcome, key in (("held-out final reward (primary)", "final_heldout"), ("held-out AUC (secondary)", "auc_heldout")):
        outcome_rows = [{**r, "final_heldout": r[key]} for r in rows]
        prim = analysis.primaries(qs, outcome_rows, chosen, vanilla_gaps, unreached) if rows else []
        for r in prim:
            if r["id"] in interim and r["verdict"] != "not reached":  # (not reached: fewer than 2 pairs so far)
                r["verdict"] = f"interim: {r['verdict']} (the regime's evaluation is incomplete)"
        primary = primary or prim
        lines += [f"## {outcome}", "", *(report.primary_table(prim, qs) if prim else ["No runs yet."]), ""]
        for r in prim:
            if r["kind"] == "paired" and math.isfinite(r["mde"]) and r["mde"] > plan_v4.MDE_TARGET:
                lines.append(f"* {r['id']}: MDE {r['mde']:.3f} > {plan_v4.MDE_TARGET}; "
                             f"{plan_v4.seeds_for_mde(r['sd'])} pairs would reach it (observed sd {r['sd']:.4f}" +
                             (f", interim: {r['n']} pairs so far" if r["id"] in interim else "") + ").")
        lines.append("")
    table, dependents = [], 0
    for q in qs:
        if q.kind != "paired":
            continue
        tests = []
        for w in warm_starts:
            d = analysis.question_differences(q, [r for r in rows if r["warm_start"] == w], chosen)
            tests.append(analysis.paired_test(d) if len(d) >= 2 else None)
        dependent = any(t and t["lo"] > 0 for t in tests) and any(t and t["hi"] < 0 for t in tests)
        dependents += dependent
        table.append(f"| {q.id} | " + " | ".join(report._ci(t) if t else "—" for t in tests) +
                     f" | {'warm-start dependent' if dependent else ''} |")
    lines += ["## Per warm start (final reward)", "",
              "A question is marked *warm-start dependent* when two warm starts' intervals exclude 0 on opposite "
              f"sides: {dependents or 'none'} {'is' if dependents < 2 else 'are'}.", "", *interim_rows,
              "| question | " + " | ".join(f"warm start {w}" for w in warm_starts) + " | |",
              "|---|" + "---|" * (len(warm_starts) + 1), *table]
    methods = [m for m in plan.DISPLAY_ORDER if any(r["method"] == m for r in rows)]
    evaluated = [r for r in regimes if r in started]
    measured, comps = analysis.regime_measurements(rows, regimes), analysis.comparisons(rows, evaluated)
    at = lines.index("SCOPE")  # the scope paragraph goes at the top; it needs the tests above
    scope = scope_lines(results.facts, steps, results.pilot.length_note(), curves_by_key, chosen, primary, evaluated,
                        list(regimes), finished)
    lines[at:at + 1] = scope
    decided = [r for r in primary if r["verdict"] != "not reached" and r["id"] not in interim]  # the guide's
    tuned = [m for m in plan.DISPLAY_ORDER if any(k[1] == m for k in chosen)]
    lines += ["", "## Methods", "", *report.methods_table(tuned),
              "", "## Regimes, as measured on the evaluation runs", "",
              "A user measures vanilla's own gap (the second figure of the gap column).", "", *interim_rows,
              *report.regimes_table(regimes, measured), "",
              "## Settings chosen by the tuning", "",
              *report.settings_table(chosen, regimes, tuned),
              "", "## Every method against vanilla (exploratory: no correction for multiplicity)", "", *interim_rows,
              *report.results_table(rows, comps, evaluated, methods, unit="pairs"), ""]
    guide_body = report.guide_lines(comps, measured, decided) if comps else []

    def guide(link: str) -> list[str]:  # its source's link, relative to the file it is written in
        elsewhere = "".join(f"; `{r}` not run on this machine (its model's warm starts fit below the plan's "
                            "threshold here: see the report's scope)" for r in results.not_here)
        return [f"* From study v4 ([`docs/study.md`]({link})): regimes evaluated "
                f"{evaluated_text(evaluated, regimes, finished)}{elsewhere}; {steps}-step runs, (warm start, seed) "
                "pairs; by vanilla's own gap.", *guide_body] if comps else []
    if comps:
        lines += ["## The guide, from the regimes evaluated so far", "", *guide(docs.name), ""]
    if evaluated:
        figure = report.plot_rewards(curves_by_key, evaluated, methods, docs.parent / f"{docs.stem}_figures",
                                     unit="(warm start, seed) pairs")
        mech = report.plot_mechanism(analysis.mechanism(rows, evaluated, [m for m in methods if m != "vanilla"]),
                                     methods, figure.parent)
        lines += ["## The mechanism", "", f"![mechanism]({mech.parent.name}/{mech.name})", "",
                  "One panel per method; each point one regime evaluated so far (named in the first panel), coloured by where its drift comes "
                  "from: x = vanilla's own update `log_ah_gap` there (log scale), y = the method's held-out final "
                  "reward minus vanilla's, paired over (warm start, seed) pairs, with the 95 % interval "
                  "(uncorrected); the grey band is the ±0.03 margin.", "", *interim_rows,
                  "## Held-out reward and the plateau", "", *interim_rows,
                  f"![held-out reward after each step]({figure.parent.name}/{figure.name})", "",
                  f"Did the runs plateau at T = {steps}? (The pilot chose T by vanilla's mean curve, the plateau rule: "
                  f"its slope over the last 10 steps below {plan_v4.PLATEAU_SLOPE} per step; this is the evaluation's "
                  "own check, over every method's runs and over vanilla's.)", "",
                  *plateau_lines(curves_by_key, evaluated, steps), ""]
    lag_data = plan.DATA / lag_fidelity.DATA_NAME
    if lag_data.exists():
        lines += ["## Why the harmonic side loses under lag (measured in v3's setting)", "",
                  "Measured apart from v4's runs, on v3's 30-step runs at v3's tuned learning rates (the mechanism "
                  "behind the sign v3 found at lags 1 and 2; v4 does not re-measure it). From v3's data:", "",
                  *lag_fidelity.render(lag_data, docs, docs.parent / f"{docs.stem}_figures"), ""]
    docs.write_text("\n".join(lines) + "\n")
    return {"guide": guide("docs/study.md"), "scope": scope}  # (the README's copy, at the repository root)
