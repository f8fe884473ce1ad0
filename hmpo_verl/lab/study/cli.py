"""``python -m hmpo_verl.lab.study``: tuning, evaluation, analysis and report in one resumable command."""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

from hmpo_verl.lab import lag_fidelity, lean
from hmpo_verl.lab.cpu_demo import REPO_ROOT
from hmpo_verl.lab.study import analysis, plan, plan_v4, report, run


# v3's options, refused with --v4 (whose plan is pre-registered in plan_v4.py)
V3_ONLY = ("tune_only", "from_data", "regimes", "methods", "eval_seeds", "steps", "lr_grid", "tuning_seeds", "confirm",
           "confirm_async", "confirm_seeds", "confirm_steps")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m hmpo_verl.lab.study",
                                     description="When does the choice of mean matter? The comparative study.")
    parser.add_argument("--quick", action="store_true", help="smoke run of both phases: " + plan.quick_plan.__doc__.split(":")[1].strip())
    parser.add_argument("--tune-only", action="store_true", help="run the tuning phase only")
    parser.add_argument("--task", default=plan.TASK, help=f"task (default {plan.TASK}; the MoE regimes need it)")
    parser.add_argument("--report-only", action="store_true",
                        help="no new runs: report the finished ones (with --v4: nor warm starts built; the report "
                             "says how far each stage reached and chooses or tests only what is complete)")
    parser.add_argument("--from-data", action="store_true",
                        help="no runs, no run files: regenerate the report, figures and guide from the committed data "
                             "(<docs>_data/runs.csv, steps.csv.gz, confirm_*.csv, invocations.txt)")
    parser.add_argument("--preregister", action="store_true",
                        help="write v3's report (docs/study_v3.md) with the plan and the primary questions only (before the main run)")
    parser.add_argument("--v4", action="store_true",
                        help="the study's fourth version (plan_v4.py, v4.py): prints its estimate, then runs it "
                             "(resumable; with --quick a smoke run of every stage); with --preregister: write its "
                             "pre-registration to docs/study_v4_plan.md and stop")
    parser.add_argument("--restore", default=None, metavar="DATA_DIR",
                        help="with --v4: before a stage runs, write the record of each of its runs that has no file in "
                             "--out from a report's committed data (docs/study_data: runs.csv, steps.csv.gz), once the "
                             "first of each phase and regime ran here and gave the data's figures (a new machine "
                             "resumes the study without running its finished runs again; a difference stops it)")
    parser.add_argument("--restore-as-recorded", action="store_true",
                        help="with --restore: when the data's checked run does not reproduce here (another machine's "
                             "arithmetic builds other warm starts), restore the data's complete stages as made "
                             "elsewhere (a stage the data holds only part of runs here whole); the report says so")
    parser.add_argument("--regimes", nargs="+", choices=list(lean.REGIMES_BY_NAME), default=None)
    parser.add_argument("--methods", nargs="+", choices=list(lean.METHODS_BY_NAME), default=None)
    parser.add_argument("--eval-seeds", type=int, default=plan.EVAL_SEEDS, help=f"evaluation seeds 1..n (default {plan.EVAL_SEEDS})")
    parser.add_argument("--steps", type=int, default=plan.STEPS, help=f"training steps per run (default {plan.STEPS})")
    parser.add_argument("--lr-grid", type=float, nargs="+", default=None,
                        help="one learning-rate grid for every method (default: each method's own, see plan.py)")
    parser.add_argument("--tuning-seeds", type=int, default=None,
                        help=f"use the first n tuning seeds (default all: {plan.TUNING_SEEDS})")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (1 thread each)")
    parser.add_argument("--out", default=None, help="run files (default outputs/study; --quick: outputs/study_quick)")
    parser.add_argument("--assets", default=None, help="asset root (default: the task's own folder)")
    parser.add_argument("--docs", default=None, help="report (default: v3 docs/study_v3.md, --v4 docs/study.md; --quick: <out>/study.md, <out>/study_v4.md)")
    parser.add_argument("--readme", action="store_true",
                        help="also rewrite the README's generated guide and scope blocks (with --v4: from v4's "
                             "report, only once every regime is evaluated; stops loud before)")
    parser.add_argument("--confirm", action="store_true",
                        help="also run `async_0` on verl's synchronous trainer (verl.trainer.main_ppo)")
    parser.add_argument("--confirm-async", action="store_true",
                        help="also run `async_1` on verl's one-step-off trainer (verl.experimental.one_step_off_policy)")
    parser.add_argument("--confirm-seeds", type=int, default=6,
                        help="trainer runs per method (6: what the ±0.05 margin needs from the lean loop's spread)")
    parser.add_argument("--confirm-steps", type=int, default=20)
    args = parser.parse_args(argv)
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    if args.v4:  # v4's plan is fixed in plan_v4.py: v3's knobs would be ignored, so they are refused
        named = _named(parser, argv)
        given = [flag(n) for n in V3_ONLY if n in named]
        if args.preregister:
            given += [flag(n) for n in ("quick", "report_only", "readme", "out", "assets", "docs", "parallel", "task",
                                        "restore", "restore_as_recorded") if n in named]
        elif args.restore is not None and not args.restore.strip():
            parser.error("--v4 --restore '' is invalid: it names no data folder (an unset variable?); allowed: "
                         "--restore DATA_DIR, e.g. docs/study_data")
        elif args.restore_as_recorded and not args.restore:
            parser.error("--v4 --restore-as-recorded without --restore is invalid: it says how --restore treats data "
                         "made elsewhere; allowed: --restore DATA_DIR --restore-as-recorded")
        elif args.restore and args.report_only:
            parser.error("--v4 --restore with --report-only is invalid: --restore runs runs of the data here to "
                         "check it; allowed: --restore without --report-only")
        if given:
            parser.error(f"--v4{' --preregister' if args.preregister else ''} with {' '.join(given)} is invalid: v4's "
                         "plan is pre-registered in plan_v4.py; allowed with --v4: " +
                         ("nothing else (it writes docs/study_v4_plan.md)" if args.preregister else
                          "--quick, --report-only, --readme, --out, --assets, --docs, --parallel, --task, --restore, "
                          "--restore-as-recorded"))
    elif args.restore is not None or args.restore_as_recorded:
        parser.error("--restore without --v4 is invalid: it restores v4's run records; allowed: --v4 --restore DATA_DIR "
                     "(v3's report regenerates from its data with --from-data)")
    elif args.preregister and not (args.docs or args.quick) and plan.REPORT.exists():
        parser.error(f"--preregister would replace v3's archived report {plan.REPORT} (its results) with the empty "
                     "pre-registration; allowed: --preregister --docs PATH (a new file), or --v4 --preregister")
    if args.tuning_seeds is not None and not 1 <= args.tuning_seeds <= len(plan.TUNING_SEEDS):
        parser.error(f"--tuning-seeds={args.tuning_seeds} is invalid; allowed: 1..{len(plan.TUNING_SEEDS)}")
    if args.lr_grid and not all(lr > 0 for lr in args.lr_grid):
        parser.error(f"--lr-grid={args.lr_grid} is invalid; allowed: learning rates > 0")
    for name in ("eval_seeds", "steps", "parallel", "confirm_seeds", "confirm_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} is invalid; allowed: an integer >= 1")
    if args.from_data and (args.quick or args.confirm or args.confirm_async or args.tune_only):
        parser.error("--from-data is invalid with --quick, --confirm, --confirm-async or --tune-only; allowed: "
                     "--from-data alone or with --readme/--docs (it makes no runs)")
    if args.steps < analysis.FINAL_WINDOW:
        parser.error(f"--steps={args.steps} is invalid; allowed: >= {analysis.FINAL_WINDOW} (the final reward's window)")
    return args


def _named(parser: argparse.ArgumentParser, argv) -> set[str]:
    """The options named on the command line, whatever their value (``--steps 30`` is named at its default too)."""
    bare = copy.deepcopy(parser)
    for action in bare._actions:
        action.default = argparse.SUPPRESS
    return set(vars(bare.parse_args(argv)))


def _invocations(out: Path, data_dir: Path, argv: list[str]) -> list[str]:
    """The commands that made the runs (appended to ``<out>/invocations.jsonl``; the ones already in
    ``<data_dir>/invocations.txt`` first, so a report regenerated with ``--from-data`` keeps them), this one last."""
    path, kept = out / "invocations.jsonl", data_dir / "invocations.txt"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    seen = [line for line in kept.read_text().splitlines() if line.strip()] if kept.exists() else []
    seen = list(dict.fromkeys(seen + [" ".join(["python -m hmpo_verl.lab.study", *r["argv"]]).strip() for r in rows]))
    current = " ".join(["python -m hmpo_verl.lab.study", *argv]).strip()
    return [c for c in seen if c != current] + [current]


def _from_data(data_dir: Path) -> tuple[list[dict], list[dict], list[dict]]:
    """The tuning rows, evaluation rows and evaluation records (``run`` and per-step ``metrics``) as
    ``_write_data`` stored them in ``data_dir`` (runs.csv, steps.csv.gz): the report of finished runs
    without their run files. Stops with a message when the files are absent."""
    import pandas as pd

    missing = [n for n in ("runs.csv", "steps.csv.gz") if not (data_dir / n).exists()]
    if missing:
        raise SystemExit(f"--from-data: {', '.join(str(data_dir / n) for n in missing)} not found; run the study "
                         "(python -m hmpo_verl.lab.study) or point --docs at a report whose <stem>_data/ holds them")
    rows = pd.read_csv(data_dir / "runs.csv").to_dict("records")  # empty cells: NaN, which the analysis skips
    for r in rows:
        r["seed"], r["lr"] = int(r["seed"]), float(r["lr"])
    steps = pd.read_csv(data_dir / "steps.csv.gz")
    records = []
    for (regime, method, lr, seed), g in steps.groupby(["regime", "method", "lr", "seed"], sort=False):
        metrics = [{k: v for k, v in m.items() if not (isinstance(v, float) and math.isnan(v))}
                   for m in g.sort_values("step").to_dict("records")]
        records.append({"run": plan.Run("eval", regime, method, float(lr), int(seed)), "metrics": metrics})
    return [r for r in rows if r["phase"] == "tune"], [r for r in rows if r["phase"] == "eval"], records


def _write_data(data_dir: Path, tuning_rows, eval_rows, eval_records, chosen, prim, comps, measured, mech,
                runs_too: bool = True) -> None:
    """The report's data files; ``runs_too``: also the runs (runs.csv, steps.csv.gz), which ``--from-data``
    reads and so leaves as they are."""
    import pandas as pd

    data_dir.mkdir(parents=True, exist_ok=True)
    if runs_too:
        report.save_run_tables(data_dir, tuning_rows + eval_rows,
                               [{"regime": r["run"].regime, "method": r["run"].method, "lr": r["run"].lr,
                                 "seed": r["run"].seed, **m} for r in eval_records for m in r["metrics"]])
    pd.DataFrame([{"regime": k[0], "method": k[1], "lr": v["lr"], "score": v["score"],
                   "largest_stable_lr": v["largest_stable_lr"],
                   **{f"score_lr{lr:g}": sc for lr, sc in v["scores"].items()}} for k, v in chosen.items()]
                 ).to_csv(data_dir / "settings.csv", index=False)
    pd.DataFrame([{k: (" ".join(v) if isinstance(v, list) else v) for k, v in p.items()} for p in prim]
                 ).to_csv(data_dir / "primaries.csv", index=False)
    pd.DataFrame(comps).to_csv(data_dir / "comparisons.csv", index=False)
    pd.DataFrame(measured).to_csv(data_dir / "regimes.csv", index=False)
    pd.DataFrame(mech).to_csv(data_dir / "mechanism.csv", index=False)


def _confirm(args, regime: str, flag: str, asked: bool, base, out, records, chosen, data_dir,
             run_steps: int) -> list[str]:
    """The confirmation of ``regime`` on its verl trainer (``run.CONFIRMATIONS``) when ``asked`` (by ``flag``),
    and its report lines (from ``confirm_<regime>.csv`` if kept from an earlier invocation). The file has a row
    per trainer run tried, failed ones included (``finished`` false, no outcomes), so the report read back from
    it counts the runs that were asked for."""
    import pandas as pd

    steps = min(args.confirm_steps, run_steps)
    lean_rows = analysis.lean_confirmation_rows(records, regime, steps)
    path = data_dir / f"confirm_{regime}.csv"
    tried = []
    if asked:
        for seed in range(1, args.confirm_seeds + 1):
            for method in run.CONFIRM_METHODS:
                lr = chosen.get((regime, method), {}).get("lr")
                if lr is None:
                    print(f"confirmation: no tuned setting for {regime}/{method}; skipped", flush=True)
                    continue
                print(f"verl {run.CONFIRMATIONS[regime]} trainer: {regime}/{method}/lr{lr:g}/seed{seed}", flush=True)
                data = run.trainer_run(plan.Run("confirm", regime, method, lr, seed), args.task, args.assets, steps,
                                       base, out)
                row = {"method": method, "seed": seed, "lr": lr, "exit_code": data["exit_code"],
                       "finished": data["exit_code"] == 0 and data["steps"] >= steps, "wall_s": data["wall_s"]}
                if row["finished"]:
                    row.update(analysis.training_curve_outcomes([m["critic/score/mean"] for m in data["metrics"]],
                                                                data["metrics"]))
                else:
                    print(f"  failed (exit {data['exit_code']}, {data['steps']} of {steps} steps)", flush=True)
                tried.append(row)
        data_dir.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(tried).to_csv(path, index=False)
    elif path.exists() and path.stat().st_size > 1:
        tried = pd.read_csv(path).to_dict("records")
    trainer_rows = [r for r in tried if r["finished"]]
    conf = analysis.confirmation_rows(lean_rows, trainer_rows, run.CONFIRM_METHODS)
    need = analysis.confirmation_need(lean_rows, run.CONFIRM_METHODS)
    diffs = analysis.confirmation_differences(lean_rows, trainer_rows, run.CONFIRM_METHODS)
    return report.confirmation_lines(conf, need, regime, run.CONFIRMATIONS[regime], flag, tried,
                                     len(run.CONFIRM_METHODS) * args.confirm_seeds, steps, diffs)


def _scope(task: lean.Task, task_name: str, steps: int, eval_records, chosen, off_policy, prim) -> dict:
    """The facts ``report.scope_lines`` states, measured: the dense model's parameter count, the distinct
    training and held-out prompts, the runs still rising, the grid edges, the underpowered primaries."""
    model = lean.load_model(task.model_path)
    curves = [[m["eval_heldout"] for m in r["metrics"]] for r in eval_records]
    return {"task": task_name, "params": sum(p.numel() for p in model.parameters()),
            "train_prompts": len({tuple(prompt) for prompt, _ in task.train}), "heldout_prompts": len(task.test),
            "steps": steps, "rising": (analysis.still_rising(curves), len(curves)), "edges": analysis.grid_edges(chosen),
            "chosen": chosen, "off_policy": off_policy, "underpowered": analysis.underpowered(prim)}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    the_plan = plan.quick_plan() if args.quick else plan.default_plan(
        args.regimes, args.methods, args.eval_seeds, args.steps, args.lr_grid, args.tuning_seeds)
    out = Path(args.out or REPO_ROOT / "outputs" / ("study_quick" if args.quick else "study")).resolve()
    docs = Path(args.docs) if args.docs else (out / "study.md" if args.quick else plan.REPORT)
    data_dir, figures = docs.parent / f"{docs.stem}_data", docs.parent / f"{docs.stem}_figures"
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    if not args.v4:
        report.check_readme_source(args.readme, args.quick, docs, plan.REPORT)
    if args.v4 and args.preregister:
        path = REPO_ROOT / "docs" / "study_v4_plan.md"
        path.write_text(plan_v4.preregistration_text() + plan_v4.MOVED_NOTE)
        log(f"wrote {path}")
        return 0
    if args.v4:
        from hmpo_verl.lab.study import v4

        return v4.main(args, log)
    with run.keep_built(out):
        task = lean.load_task(args.task, args.assets, log=log)
    if args.preregister:
        report.write_docs(docs, report.empty_context(the_plan, args, task))
        log(f"wrote {docs}")
        return 0
    base = lean.LoopSettings(max_response_length=task.max_response_length, eval_prompts=the_plan.eval_prompts)
    steps = the_plan.steps
    if not (args.report_only or args.from_data):
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "invocations.jsonl", "a") as f:
            f.write(json.dumps({"argv": argv, "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")

    tuning_runs = the_plan.tuning_runs()
    placeholder = {r.key: 3e-4 for r in tuning_runs}  # the evaluation's size does not depend on the lrs
    planned_cpu = plan.estimate_cpu_s(tuning_runs + the_plan.eval_runs(placeholder), steps)
    log(f"plan: {len(tuning_runs)} tuning + {len(the_plan.eval_runs(placeholder))} evaluation runs of {steps} steps, "
        f"about {planned_cpu / 60:.0f} CPU-minutes by the measured cost per regime "
        f"(~{planned_cpu / 60 / args.parallel:.0f} min at --parallel {args.parallel} on idle cores)")
    if args.from_data:
        tuning_rows, eval_rows, eval_records = _from_data(data_dir)
        log(f"from {data_dir}: {len(tuning_rows)} tuning and {len(eval_rows)} evaluation runs")
    else:
        log(f"tuning: {len(tuning_runs)} runs in {out}")
        if not args.report_only:
            run.run_all(tuning_runs, args.task, args.assets, steps, base, out, args.parallel, "tuning")
        tuning_rows = [analysis.run_summary(r) for r in run.load_records(tuning_runs, out, args.task, steps, base)]
    chosen = analysis.choose_settings(tuning_rows)
    eval_runs = the_plan.eval_runs({k: v["lr"] for k, v in chosen.items()})
    if not args.from_data:
        log(f"evaluation: {len(eval_runs)} runs")
        if not (args.report_only or args.tune_only):
            run.run_all(eval_runs, args.task, args.assets, steps, base, out, args.parallel, "evaluation")
        eval_records = run.load_records(eval_runs, out, args.task, steps, base)
        eval_rows = [analysis.run_summary(r) for r in eval_records]

    regimes, methods = list(the_plan.regimes), [m for m in plan.DISPLAY_ORDER if m in the_plan.methods]
    questions = [q for q in plan.primary_questions() if set(q.regimes) <= set(regimes) and
                 {q.a, q.b} - {"", "best fixed p"} <= set(methods)]
    prim = analysis.primaries(questions, eval_rows, chosen)
    comps = analysis.comparisons(eval_rows, regimes)
    measured = analysis.regime_measurements(eval_rows, regimes)
    off_policy = [r for r in regimes if r not in plan.CONTROL_REGIMES]
    mech = analysis.mechanism(eval_rows, off_policy, [m for m in methods if m != "vanilla"])
    _write_data(data_dir, tuning_rows, eval_rows, eval_records, chosen, prim, comps, measured, mech,
                runs_too=not args.from_data)
    figures.mkdir(parents=True, exist_ok=True)
    figs = {}
    if eval_rows:
        curves = defaultdict(list)
        for r in eval_records:
            curves[(r["run"].regime, r["run"].method)].append([m["eval_heldout"] for m in r["metrics"]])
        figs["reward"] = report.plot_rewards(curves, regimes, methods, figures)
    if mech:
        figs["mechanism"] = report.plot_mechanism(mech, methods, figures)
    pooled = [r for q in questions if q.kind == "pooled" for r in analysis.pooled_by_regime(q, eval_rows, chosen)]
    guide = report.guide_lines(comps, measured, prim, pooled) if comps else []
    scope = report.scope_lines(_scope(task, args.task, steps, eval_records, chosen, off_policy, prim)) if eval_rows else []
    apmpo = report.apmpo_lines([m["actor/pm/power"] for r in eval_records if r["run"].method == "apmpo"
                                for m in r["metrics"] if "actor/pm/power" in m])
    planned = len(tuning_runs) + len(eval_runs)
    done = len(tuning_rows) + len(eval_rows)
    confirmation = []
    for regime, flag, asked in (("async_0", "--confirm", args.confirm), ("async_1", "--confirm-async", args.confirm_async)):
        if confirmation:
            confirmation.append("")
        confirmation += _confirm(args, regime, flag, asked, base, out, eval_records, chosen, data_dir, steps)
    lag_data = data_dir / lag_fidelity.DATA_NAME  # the lag-fidelity section, measured apart, kept with its data
    lag_lines = lag_fidelity.render(lag_data, docs, figures) if lag_data.exists() else []
    commands = _invocations(out, data_dir, argv)
    (data_dir / "invocations.txt").write_text("\n".join(commands) + "\n")
    ctx = {"plan": the_plan, "settings": base, "task": args.task, "commands": commands,
           "missing": planned - done, "done": done, "planned": planned, "parallel": args.parallel,
           "cpu_minutes": sum(r["cpu_s"] for r in tuning_rows + eval_rows if math.isfinite(r["cpu_s"])) / 60, "heldout": task.test,
           "methods": methods, "regimes": regimes, "measured": measured, "chosen": chosen, "primaries": prim,
           "questions": questions, "eval_rows": eval_rows, "comps": comps, "figures": figs, "guide": guide,
           "confirmation": confirmation, "scope": scope, "apmpo": apmpo, "lag_fidelity": lag_lines}
    report.write_docs(docs, ctx)
    for block, start, end in ((guide, report.GUIDE_START, report.GUIDE_END), (scope, report.SCOPE_START, report.SCOPE_END)):
        if args.readme and block and not report.update_readme(REPO_ROOT / "README.md", block, start, end):
            log(f"README.md has no {start} ... {end} block: not updated")
    log("\n".join(guide))
    log(f"wrote {docs}, {data_dir}, {figures}")
    return 0
