"""The study's plan and analysis: seeds, settings, primary questions, verdicts, equivalence of the confirmation."""

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from hmpo_verl.lab import stats
from hmpo_verl.lab.study import analysis, plan

REPO = Path(__file__).resolve().parents[1]


def test_preregistration_in_docs_is_the_plans():
    """v3's report carries its pre-registration verbatim (committed before the main run; the report repeats it)."""
    assert plan.REPORT == REPO / "docs" / "study_v3.md"
    assert plan.preregistration_text() in plan.REPORT.read_text()


def test_v4_preregistration_in_docs_is_the_plans():
    """docs/study_v4_plan.md is plan_v4's pre-registration, computed from v3's committed data, then the note of
    where the paths it names moved."""
    from hmpo_verl.lab.study import plan_v4

    assert (REPO / "docs" / "study_v4_plan.md").read_text() == plan_v4.preregistration_text() + plan_v4.MOVED_NOTE


def test_v4_seed_counts_bring_each_mde_to_the_target_and_no_fewer_would():
    """Each undecided v3 primary's pair count is the fewest whose MDE (v3's paired sd) is <= 0.03; the
    regimes take the most their questions need, in whole warm-start rounds; the edge rule extends a grid at
    either edge by the next ladder point and leaves an interior choice alone."""
    from hmpo_verl.lab.study import plan_v4

    prim = plan_v4.v3_primaries()
    und = plan_v4.undecided(prim)
    assert {r["id"] for r in und} == {r["id"] for r in prim if r["verdict"] == "undecided"} and und
    for r in und:
        if r["n_needed"] is not None:
            assert stats.mde_paired(r["sd"], r["n_needed"]) <= 0.03 < stats.mde_paired(r["sd"], r["n_needed"] - 1)
    pairs = plan_v4.regime_pairs(prim)
    assert all(n % plan_v4.WARM_STARTS == 0 for n in pairs.values())
    assert pairs["async_4"] >= max(r["n_needed"] for r in und if r["id"] == "Q1/async_4")
    assert pairs["moe16_top1"] == max(pairs.values())
    assert plan_v4.extend((3e-5, 1e-4, 3e-4, 1e-3), 3e-5) == (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)
    assert plan_v4.extend((1e-4, 3e-4, 1e-3, 3e-3), 3e-3) == (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
    assert plan_v4.extend((1e-4, 3e-4, 1e-3), 3e-4) is None
    assert plan_v4.extend((1e-5, 3e-5), 1e-5) is None  # the ladder's end: reported at the limit


def test_tuning_and_evaluation_seeds_are_disjoint_and_the_plan_is_complete():
    p = plan.default_plan()
    tuning = p.tuning_runs()
    assert {r.seed for r in tuning} == set(plan.TUNING_SEEDS)
    assert not set(plan.TUNING_SEEDS) & set(range(1, p.eval_seeds + 1))
    # every method x grid x tuning seed in every off-policy regime; controls tune vanilla only
    for regime in plan.OFF_POLICY_REGIMES:
        for method in plan.regime_methods(regime):
            lrs = {r.lr for r in tuning if r.key == (regime, method)}
            assert lrs == set(plan.lr_grid(method)) and len(lrs) >= 3
    assert {r.method for r in tuning if r.regime in plan.CONTROL_REGIMES} == {"vanilla"}
    assert plan.lr_grid("gspo") != plan.lr_grid("vanilla")
    # vanilla_rc only where the sampler's log-probs differ from the trainer's
    assert "vanilla_rc" in plan.regime_methods("async_1") and "vanilla_rc" in plan.regime_methods("moe_bf16")
    assert "vanilla_rc" not in plan.regime_methods("async_0") and "vanilla_rc" not in plan.regime_methods("epochs_4")


def test_eval_runs_take_the_chosen_lr_and_controls_take_vanillas():
    p = plan.Plan(regimes=("on_policy", "async_1"), methods=("vanilla", "hmpo"), grids={"vanilla": (1e-3,), "hmpo": (1e-3,)},
                  tuning_seeds=(1001,), eval_seeds=2, steps=5, eval_prompts=8)
    chosen = {("on_policy", "vanilla"): 3e-4, ("async_1", "vanilla"): 1e-4, ("async_1", "hmpo"): 1e-3}
    runs = p.eval_runs(chosen)
    assert [(r.regime, r.method, r.lr, r.seed) for r in runs] == [
        ("on_policy", "vanilla", 3e-4, 1), ("on_policy", "hmpo", 3e-4, 1), ("async_1", "hmpo", 1e-3, 1),
        ("async_1", "vanilla", 1e-4, 1), ("on_policy", "vanilla", 3e-4, 2), ("on_policy", "hmpo", 3e-4, 2),
        ("async_1", "hmpo", 1e-3, 2), ("async_1", "vanilla", 1e-4, 2)]
    assert runs[0].path(Path("o")) == Path("o/runs/eval/on_policy/vanilla/lr0.0003/seed1.json")


def _row(regime, method, lr, seed, final_train=0.3, final_heldout=0.3, collapsed=False, gap=0.01):
    return {"regime": regime, "method": method, "lr": lr, "seed": seed, "final_train": final_train,
            "final_heldout": final_heldout, "collapsed_train": collapsed, "update/log_ah_gap": gap}


def test_choose_settings_best_mean_ties_to_smaller_lr_and_largest_stable():
    rows = [_row("r", "m", 1e-4, s, 0.30) for s in (1, 2)] + [_row("r", "m", 3e-4, s, v) for s, v in ((1, 0.5), (2, 0.3))]
    rows += [_row("r", "m", 1e-3, 1, 0.45, collapsed=True), _row("r", "m", 1e-3, 2, 0.35)]
    c = analysis.choose_settings(rows)[("r", "m")]
    assert c["lr"] == 3e-4 and c["score"] == pytest.approx(0.4) and c["largest_stable_lr"] == 3e-4
    assert c["collapsed"] == {1e-4: 0, 3e-4: 0, 1e-3: 1}
    tie = analysis.choose_settings([_row("r", "m", 1e-3, 1, 0.4), _row("r", "m", 1e-4, 1, 0.4)])[("r", "m")]
    assert tie["lr"] == 1e-4
    chosen = {("r", m): {"score": s} for m, s in (("vanilla", 0.4), ("hmpo", 0.45), ("pm_p-2", 0.44))}
    assert analysis.best_fixed_p(chosen, "r") == "hmpo" and analysis.best_fixed_p(chosen, "other") is None


def test_primaries_tests_holm_over_primaries_and_verdicts():
    rng = np.random.default_rng(0)
    regimes = ("a", "b", "c")
    rows, gaps = [], {"a": 0.001, "b": 0.01, "c": 0.1}
    for seed in range(1, 13):
        for r in regimes:
            base = 0.4 + 0.05 * rng.standard_normal()
            shifts = {"vanilla": 0.0, "hmpo": {"a": 0.0, "b": 0.1, "c": 0.002}[r], "gspo": -0.2,
                      "pm_p-2": 0.0, "pm_p0": 0.0, "pm_p0.5": 0.0, "adaptive": 0.0}
            for m, shift in shifts.items():
                noise = 0.001 * rng.standard_normal() if m != "hmpo" or r != "b" else 0.02 * rng.standard_normal()
                rows.append(_row(r, m, 1e-3, seed, final_heldout=base + shift + noise, gap=gaps[r]))
    questions = [plan.Question(f"Q1/{r}", "paired", "hmpo", "vanilla", (r,), "") for r in regimes]
    questions += [plan.Question("Q2/a", "paired", "hmpo", "gspo", ("a",), ""),
                  plan.Question("Q3", "trend", "", "", regimes, ""),
                  plan.Question("Q4", "pooled", "adaptive", "best fixed p", regimes, "")]
    chosen = {(r, m): {"score": 0.5 if m == "vanilla" else 0.4} for r in regimes for m in plan.P_METHODS}
    out = {p["id"]: p for p in analysis.primaries(questions, rows, chosen)}
    # independent recomputation of one question, and Holm over exactly these six
    d = [a["final_heldout"] - b["final_heldout"] for a in rows for b in rows
         if a["regime"] == b["regime"] == "b" and a["seed"] == b["seed"] and a["method"] == "hmpo" and b["method"] == "vanilla"]
    assert out["Q1/b"]["diff"] == pytest.approx(np.mean(d)) and out["Q1/b"]["p"] == pytest.approx(sps.ttest_1samp(d, 0).pvalue)
    raw = [out[q.id]["p"] for q in questions]
    assert [out[q.id]["p_holm"] for q in questions] == pytest.approx(stats.holm(raw))
    assert out["Q1/b"]["verdict"] == "better" and out["Q2/a"]["verdict"] == "better"
    assert out["Q1/a"]["verdict"] == "equivalent (±0.03)" and out["Q1/c"]["verdict"].startswith(("equivalent", "different"))
    # Q4: adaptive vs the best fixed p (vanilla here: the highest tuning score) averaged over the regimes per seed
    assert out["Q4"]["n"] == 12 and abs(out["Q4"]["diff"]) < 0.01
    assert out["Q3"]["n"] == 3 and math.isnan(out["Q3"]["p_tost"])
    assert out["Q1/b"]["mde"] == pytest.approx(stats.mde_paired(np.std(d, ddof=1), 12))


def test_p_tilt_is_the_mean_least_squares_slope_on_p():
    rows = [_row("r", m, 1e-3, s, final_heldout=0.3 - 0.02 * p + 0.001 * s)
            for s in (1, 2, 3) for m, p in plan.P_METHODS.items()]
    tilt = analysis.p_tilt(rows, "r")
    assert tilt["n"] == 3 and tilt["tilt"] == pytest.approx(-0.02)


def test_confirmation_equivalence_welch_and_verdicts():
    """trainer − lean: Welch's interval by its formula; TOST inside the margin is 'equivalent', a clear shift
    'differ', a wide interval 'inconclusive' (never 'agree' for not rejecting)."""
    a, b = [0.32, 0.30, 0.45], [0.30, 0.35, 0.40]
    w = analysis.welch_equivalence(a, b, 0.05)
    ref = sps.ttest_ind(a, b, equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert (w["lo"], w["hi"]) == (pytest.approx(ci.low), pytest.approx(ci.high)) and w["p"] == pytest.approx(ref.pvalue)
    lean = [{"method": "vanilla", "seed": s, "final_train_reward": v, "train_auc": v, "clipfrac": 0.1, "ppo_kl": 0.001,
             "log_ah_gap": math.nan} for s, v in enumerate(b, 1)]
    trainer = [{"method": "vanilla", "seed": s, "final_train_reward": v, "train_auc": v + 0.3, "clipfrac": 0.1 + 0.0001 * s,
                "ppo_kl": 0.001, "log_ah_gap": math.nan} for s, v in enumerate(a, 1)]
    rows = {r["metric"]: r for r in analysis.confirmation_rows(lean, trainer, ("vanilla",))}
    assert rows["final_train_reward"]["verdict"] == "inconclusive" and rows["final_train_reward"]["runs_needed"] > 3
    assert rows["train_auc"]["verdict"] == "differ"
    assert rows["clipfrac"]["verdict"] == "equivalent" and "log_ah_gap" not in rows


def test_confirmation_need_is_the_runs_that_fit_the_margin():
    """Before any trainer run: with the lean loop's sd on both sides, n runs per side put the 90 % interval
    inside ±0.05, and n − 1 do not (Welch with equal sds and sizes is the pooled t)."""
    values = [0.20, 0.35, 0.28, 0.41, 0.30, 0.25]
    lean = [{"method": "hmpo", "final_train_reward": v} for v in values]
    (row,) = analysis.confirmation_need(lean, ("vanilla", "hmpo"))
    sd = float(np.std(values, ddof=1))
    half = lambda n: sps.t.ppf(0.95, 2 * n - 2) * sd * math.sqrt(2 / n)  # noqa: E731
    n = row["runs_needed"]
    assert row["sd"] == pytest.approx(sd) and half(n) < analysis.CONFIRM_REWARD_MARGIN <= half(n - 1)


def test_confirmation_differences_are_welch_on_each_side_and_reach_the_report():
    """Each method − vanilla, trainer side and lean side apart, by scipy's Welch; a method with one run on a
    side has no row; the report prints both sides' intervals."""
    from hmpo_verl.lab.study import report

    def rows(values: dict) -> list[dict]:
        return [{"method": m, "seed": s, "final_train_reward": v, "train_auc": v / 2, "clipfrac": 0.01 * s,
                 "ppo_kl": 0.001 * s, "log_ah_gap": math.nan} for m, vs in values.items() for s, v in enumerate(vs, 1)]

    trainer = rows({"vanilla": [0.53, 0.50, 0.56, 0.52], "hmpo": [0.46, 0.42, 0.49], "gspo": [0.45]})
    lean = rows({"vanilla": [0.51, 0.47, 0.55, 0.50, 0.49], "hmpo": [0.44, 0.48, 0.40, 0.47], "gspo": [0.5, 0.52]})
    diffs = analysis.confirmation_differences(lean, trainer, ("vanilla", "hmpo", "gspo"))
    assert [(d["method"], d["metric"]) for d in diffs] == [("hmpo", "final_train_reward"), ("hmpo", "train_auc")]
    for side, data in (("trainer", trainer), ("lean", lean)):
        a = [r["final_train_reward"] for r in data if r["method"] == "hmpo"]
        b = [r["final_train_reward"] for r in data if r["method"] == "vanilla"]
        ref = sps.ttest_ind(a, b, equal_var=False)
        ci = ref.confidence_interval(0.95)
        got = diffs[0][side]
        assert got["diff"] == pytest.approx(np.mean(a) - np.mean(b)) and got["p"] == pytest.approx(ref.pvalue)
        assert (got["lo"], got["hi"]) == (pytest.approx(ci.low), pytest.approx(ci.high))
        assert got["runs"] == (len(a), len(b))
    conf = analysis.confirmation_rows(lean, trainer, ("vanilla", "hmpo"))
    text = "\n".join(report.confirmation_lines(conf, [], "async_1", "one_step_off", "--confirm-async",
                                               [{"finished": True, "wall_s": 100.0}] * 7, 9, 20, diffs))
    t, le = diffs[0]["trainer"], diffs[0]["lean"]
    assert "trainer runs finished: 7 of 7." in text
    assert (f"| hmpo | final_train_reward | 3, 4 | {t['diff']:+.4f} [{t['lo']:+.4f}, {t['hi']:+.4f}] |" in text
            and f"| 4, 5 | {le['diff']:+.4f} [{le['lo']:+.4f}, {le['hi']:+.4f}] |" in text)


def test_confirmation_report_says_what_is_not_run_and_what_it_needs():
    from hmpo_verl.lab.study import report

    need = [{"method": "hmpo", "lean_runs": 12, "sd": 0.08, "runs_needed": 22}]
    lines = report.confirmation_lines([], need, "async_1", "one_step_off", "--confirm-async", [], 9, 20)
    text = "\n".join(lines)
    assert "verl.experimental.one_step_off_policy.main_ppo" in text and "Not run (`--confirm-async`" in text
    assert "`hmpo` sd 0.080 over 12 lean runs → 22 runs per side" in text
    tried = [{"finished": True, "wall_s": 150.0}, {"finished": False, "wall_s": 30.0}]
    lines = report.confirmation_lines([], need, "async_0", "sync", "--confirm", tried, 9, 20)
    assert "1 of 2 trainer runs finished" in "\n".join(lines) and "2.5–2.5 min" in "\n".join(lines)
    lines = report.confirmation_lines([], need, "async_0", "sync", "--confirm", tried[1:], 9, 20)
    assert "0 of 1 trainer runs finished" in "\n".join(lines) and "Not run" not in "\n".join(lines)


def _comp(regime, method, diff, half=0.02):
    return {"regime": regime, "method": method, "diff": diff, "lo": diff - half, "hi": diff + half, "n": 12}


def test_guide_lists_every_method_whose_interval_excludes_zero_by_vanillas_gap(tmp_path):
    """Every method of the comparisons (gspo and vanilla_rc too, not only the p-family) whose interval
    excludes 0 is listed; regimes are ordered by vanilla's own gap (what a user measures), not the mean over
    every method's runs; only the README block between the markers is replaced."""
    from hmpo_verl.lab.study import report

    comps = [_comp("a", "hmpo", -0.1), _comp("a", "gspo", -0.09), _comp("a", "vanilla_rc", -0.04),
             _comp("a", "apmpo", 0.01), _comp("b", "hmpo", 0.0)]
    # the all-method mean orders a before b; vanilla's own gap orders b first
    measured = [{"regime": "a", "update/log_ah_gap": 0.001, "vanilla_gap": 0.1},
                {"regime": "b", "update/log_ah_gap": 0.01, "vanilla_gap": 0.002}]
    lines = report.guide_lines(comps, measured, [{"id": "Q1/a", "verdict": "worse"}, {"id": "Q3", "verdict": "undecided"}])
    assert lines[0].startswith("* vanilla's gap 0.0020 (`b`, 1 method vs vanilla): no method's interval excludes 0")
    assert lines[1].startswith("* vanilla's gap 0.1000 (`a`, 4 methods vs vanilla):")
    for method in ("hmpo", "gspo", "vanilla_rc"):  # every interval that excludes 0, whatever the method
        assert f"`{method}` " in lines[1]
    assert "apmpo" not in lines[1]
    assert lines[-1] == "* Primary questions decided after Holm: Q1/a worse."
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.GUIDE_START}\nold\n{report.GUIDE_END}\nrest\n")
    assert report.update_readme(readme, lines)
    assert readme.read_text() == "\n".join(["intro", report.GUIDE_START, *lines, report.GUIDE_END, "rest", ""])
    readme.write_text("no markers\n")
    assert not report.update_readme(readme, lines) and readme.read_text() == "no markers\n"


def test_guides_no_method_beat_vanilla_line_follows_the_data():
    """The "no method beat vanilla" sentence is generated: with a method whose interval lies above vanilla's
    it names that method and regime instead; an interval touching 0 does not count."""
    from hmpo_verl.lab.study import report

    measured = [{"regime": r, "update/log_ah_gap": 0.01, "vanilla_gap": 0.01} for r in ("a", "b")]
    below = [_comp("a", "hmpo", -0.1), _comp("b", "gspo", 0.02, half=0.02)]  # the second touches 0
    line = [x for x in report.guide_lines(below, measured, []) if "vanilla in any" in x or "Above" in x]
    assert line == ["* **No method beat vanilla in any regime evaluated**: none of the 2 intervals (every method, 2 "
                    "regimes, uncorrected) lies above 0."]
    above = below + [_comp("b", "pm_p0", 0.05)]
    text = "\n".join(report.guide_lines(above, measured, []))
    assert "No method beat vanilla" not in text
    assert "* **Above vanilla** (interval above 0, uncorrected): `pm_p0` in `b` +0.050 [+0.030, +0.070]." in text


def test_guide_on_the_committed_data_omits_no_excluding_interval():
    """On docs/study_v3_data/comparisons.csv: every (regime, method) whose interval excludes 0 is in the guide,
    and the beat-vanilla line agrees with the intervals."""
    import pandas as pd

    from hmpo_verl.lab.study import report
    data = REPO / "docs" / "study_v3_data"
    comps = pd.read_csv(data / "comparisons.csv").to_dict("records")
    measured = pd.read_csv(data / "regimes.csv").to_dict("records")
    lines = report.guide_lines(comps, measured, [])
    for c in comps:
        regime_line = next(x for x in lines if f"(`{c['regime']}`," in x)
        assert (f"`{c['method']}` " in regime_line) == (c["lo"] > 0 or c["hi"] < 0), (c["regime"], c["method"])
    assert any("No method beat vanilla" in x for x in lines) == (not any(c["lo"] > 0 for c in comps))


def test_scope_facts_are_measured_from_the_runs():
    """still_rising counts positive end slopes; grid_edges finds both edges; underpowered counts paired
    primaries whose MDE exceeds the margin; the scope paragraph states them."""
    from hmpo_verl.lab.study import analysis, report

    rising = [0.1 * i for i in range(12)]
    flat = [0.5] * 12
    falling = [1.0 - 0.01 * i for i in range(12)]
    assert analysis.still_rising([rising, flat, falling, rising]) == 2
    assert analysis.still_rising([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]]) == 1  # shorter than the window: the whole run
    grid = lambda lr: {"lr": lr, "scores": {1e-4: 0.1, 3e-4: 0.2, 1e-3: 0.3}}  # noqa: E731
    chosen = {("x", "gspo"): grid(1e-4), ("x", "hmpo"): grid(1e-3), ("x", "vanilla"): grid(1e-3),
              ("x", "pm_p0"): grid(1e-3), ("y", "gspo"): grid(1e-4), ("y", "hmpo"): grid(3e-4)}
    edges = analysis.grid_edges(chosen)
    assert sorted(edges["smallest"]) == [("x", "gspo"), ("y", "gspo")]
    assert sorted(edges["largest"]) == [("x", "hmpo"), ("x", "pm_p0"), ("x", "vanilla")]
    prim = [{"kind": "paired", "mde": 0.05}, {"kind": "paired", "mde": 0.02}, {"kind": "trend"},
            {"kind": "pooled", "mde": 0.05}]
    assert analysis.underpowered(prim) == (1, 2)
    text = report.scope_lines({"task": "t", "params": 77376, "train_prompts": 68, "heldout_prompts": 32, "steps": 30,
                               "rising": (2, 4), "edges": edges, "chosen": chosen, "off_policy": ["x", "y"],
                               "underpowered": (1, 2)})[0]
    assert "100 prompts, 68 trained on, 32 held out" in text and "77,376 parameters" in text
    assert "2 of 4 evaluation runs (50%) are still rising" in text
    assert "`gspo` in all 2 off-policy regimes" in text and "`x`: every method except `gspo`" in text
    assert "in 1 of 2 Q1/Q2 comparisons" in text


def test_from_data_regenerates_the_report_without_run_files(tmp_path):
    """--from-data rebuilds the report from <docs>_data/runs.csv and steps.csv.gz alone (a slice of the
    committed data: 2 regimes, 3 evaluation seeds): its tables and guide equal those computed from the same rows."""
    import pandas as pd

    from hmpo_verl.lab.study import analysis, cli, report
    src = REPO / "docs" / "study_v3_data"
    data = tmp_path / "study_data"
    data.mkdir()
    runs = pd.read_csv(src / "runs.csv")
    keep = lambda d: d[d.regime.isin(["on_policy", "async_1"]) & (d.seed.isin([1, 2, 3]) | (d.phase == "tune"))]  # noqa: E731
    runs = keep(runs)
    runs.to_csv(data / "runs.csv", index=False)
    keep(pd.read_csv(src / "steps.csv.gz").assign(phase="eval")).drop(columns="phase").to_csv(
        data / "steps.csv.gz", index=False)
    assert cli.main(["--from-data", "--regimes", "on_policy", "async_1", "--eval-seeds", "3",
                     "--docs", str(tmp_path / "study.md")]) == 0
    text = (tmp_path / "study.md").read_text()
    rows = runs[runs.phase == "eval"].to_dict("records")
    comps = analysis.comparisons(rows, ["on_policy", "async_1"])
    measured = analysis.regime_measurements(rows, ["on_policy", "async_1"])
    for line in report.guide_lines(comps, measured, []):
        if "Primary" not in line:
            assert line in text
    guide = text[text.index("## What the data show"):text.index("## All results")]
    for c in comps:  # the written guide drops no method whose interval excludes 0 (gspo, vanilla_rc included)
        regime_line = next(x for x in guide.splitlines() if f"(`{c['regime']}`," in x)
        assert (f"`{c['method']}` " in regime_line) == (c["lo"] > 0 or c["hi"] < 0), (c["regime"], c["method"])
    assert any(c["method"] in ("gspo", "vanilla_rc") and c["hi"] < 0 for c in comps)  # the slice has such a case
    assert f"of {len(rows)} evaluation runs" in text  # the scope paragraph counts the runs of steps.csv.gz
    assert (tmp_path / "study_figures" / "mechanism.png").exists()
    with pytest.raises(SystemExit, match="runs.csv"):
        cli.main(["--from-data", "--docs", str(tmp_path / "none" / "study.md")])


def test_v4_plateau_rule_gap_regime_and_questions():
    """The run length is the first multiple of 10 where every regime's mean pilot curve is flat (slope below
    PLATEAU_SLOPE over the last 10 steps), else the cap; the gap regime is the first of the ladder whose
    vanilla gap reaches GAP_REGIME_MIN; the questions are v3's undecided ones, Q3 and Q6 in the gap regime."""
    from hmpo_verl.lab.study import plan_v4, v4

    rise_then_flat = [min(0.02 * t, 0.5) for t in range(60)]  # flat from step 25: the window 30-39 is the first flat
    flat = [0.4] * 60
    assert v4.plateau_length({"a": [rise_then_flat, rise_then_flat], "b": [flat]}, 60) == 40
    assert v4.plateau_length({"a": [[0.01 * t for t in range(60)]]}, 60) is None  # never flat: T is the cap
    low, high = plan_v4.GAP_REGIME_MIN / 2, plan_v4.GAP_REGIME_MIN * 2
    assert v4.gap_regime([{"regime": "moe16_top1", "update/log_ah_gap": high}]) == "moe16_top1"
    assert v4.gap_regime([{"regime": "moe16_top1", "update/log_ah_gap": low},
                          {"regime": "moe32_top1", "update/log_ah_gap": high}]) == "moe32_top1"
    assert v4.gap_regime([{"regime": "moe16_top1", "update/log_ah_gap": low}]) is None
    qs = v4.questions(list(plan.OFF_POLICY_REGIMES) + ["moe32_top1"], "moe32_top1", plan_v4.METHODS)
    ids = [q.id for q in qs]
    assert "Q1/async_1" not in ids and "Q1/async_4" in ids and "Q2/bf16" in ids  # decided ones are not re-asked
    assert ids[-2:] == ["Q3", "Q6"] and qs[-1].regimes == ("moe32_top1",)
    # a plan without gspo or a p-method cannot test Q2 or the trend: they are not asked (not held untestable)
    fewer = [q.id for q in v4.questions(list(plan.OFF_POLICY_REGIMES) + ["moe32_top1"], "moe32_top1",
                                        ("vanilla", "hmpo"))]
    assert fewer == [i for i in ids if i.startswith(("Q1/", "Q6"))]


def test_the_mechanism_figure_names_each_regime_once_apart_where_gaps_coincide():
    """The first panel names every regime at its gap; names whose gaps nearly coincide (v3's async_1 0.0122 and
    epochs_4 0.0125) are set apart, the others at their point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hmpo_verl.lab.study import report
    pts = [{"regime": r, "vanilla_gap": g} for r, g in
           (("bf16", 0.0003), ("async_0", 0.0017), ("async_1", 0.0122), ("epochs_4", 0.0125), ("async_4", 0.11))]
    colors = {k: "k" for k in report.MECHANISMS.values()}
    fig, ax = plt.subplots()
    report._name_regimes(ax, pts, colors)
    names = {t.get_text(): t for t in ax.texts}
    assert sorted(names) == sorted(r["regime"] for r in pts)
    assert [names[r].xyann[0] for r in ("bf16", "async_0", "async_1", "epochs_4", "async_4")] == [0, 0, 0, 8, 0]
    assert names["async_4"].xy == (0.11, 0)
    plt.close(fig)
