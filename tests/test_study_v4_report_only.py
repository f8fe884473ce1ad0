"""``python -m hmpo_verl.lab.study --v4 --report-only``: the report of the runs already in ``--out``, stage by stage,
from synthetic run records in run.py's format (no trainer run, no model built: the runner, the warm-start builder
and the task loader raise if called)."""

import json
import random
import re
from dataclasses import asdict
from pathlib import Path

import pytest

from hmpo_verl.lab import lean, stats
from hmpo_verl.lab.study import analysis, cli, plan, plan_v4, run, v4
from hmpo_verl.lab.study.plan import Run

REGIME, GRID, SEEDS = "async_4", (1e-4, 3e-4, 1e-3), (1001, 1002)
PLAN = v4.V4Plan(regimes=(REGIME,), methods=("vanilla", "hmpo"), warm_starts=2, tuning_seeds=SEEDS,
                 pairs={REGIME: 6}, pilot_steps=20, eval_prompts=8,
                 grids={(REGIME, m): GRID for m in ("vanilla", "hmpo")})
T = 10  # flat pilot curves: the plateau rule's first multiple of 10
RUN_ALL = run.run_all  # the real runner (the fixtures forbid it)


@pytest.fixture
def no_builds(monkeypatch):
    """The synthetic plan; starting a run, building a warm start or loading (building) the task fails the test."""

    def forbidden(what):
        def fail(*a, **k):
            raise AssertionError(f"--report-only {what}")
        return fail

    monkeypatch.setattr(v4, "default_v4", lambda: PLAN)
    monkeypatch.setattr(run, "run_all", forbidden("started runs"))
    monkeypatch.setattr(run, "warm_start_model", forbidden("built a warm start"))
    monkeypatch.setattr(lean, "load_task", forbidden("loaded (built) the task"))


@pytest.fixture
def study(tmp_path, no_builds):
    """Warm-start folders (``ws(k)`` marks warm start k built), the run records' writer, and ``report()``: the
    CLI with --report-only, which returns the report's text and what it printed."""
    out, assets, docs = tmp_path / "runs", tmp_path / "assets", tmp_path / "docs" / "study_v4.md"
    base = lean.LoopSettings(max_response_length=lean.recipe_max_response_length("fibonacci"),
                             eval_prompts=PLAN.eval_prompts)

    class Study:
        def __init__(self):
            self.out, self.assets, self.docs = out, assets, docs

        def ws(self, k, greedy=1.0):
            root = run.warm_start_dir("fibonacci", str(assets), "dense", k)
            root.mkdir(parents=True)
            (root / "warm_start.json").write_text(json.dumps({"greedy_accuracy": greedy}))
            (root / "READY").write_text("ok\n")

        def record(self, r: Run, steps: int, heldout: float = 0.5, train: float = 0.5):
            """One finished run as run.execute writes it (constant curves: the final reward is the value)."""
            metrics = [{"eval_heldout": heldout, "eval_train": train, "reward": train, "non_finite": False,
                        "update/log_ah_gap": 0.02} for _ in range(steps)]
            rec = {"run": asdict(r), "task": "fibonacci", "steps": steps, "settings": run.run_settings(base, r),
                   "definitions": run.run_definitions(r), "wall_s": 1.0, "cpu_s": 1.0, "first_eval": {"eval_heldout": 0.4, "eval_train": 0.4},
                   "metrics": metrics}
            path = r.path(out)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(rec))
            assert run.is_done(r, out, "fibonacci", steps, base)

        def pilot(self, seeds=SEEDS):
            for s in seeds:
                self.record(Run("pilot", REGIME, "vanilla", v4.v3_vanilla_lr(REGIME), s), PLAN.pilot_steps)

        def tuning(self, best, warm_starts=(0, 1)):
            """Every tuning run of ``grid``; ``best[method]``: the lr with the highest training-prompt reward."""
            for m in PLAN.methods:
                for lr in GRID:
                    for s in SEEDS:
                        for w in warm_starts:
                            self.record(Run("tune", REGIME, m, lr, s, w), T, train=0.6 if lr == best[m] else 0.5)

        def report(self, capsys):
            assert cli.main(["--v4", "--report-only", "--out", str(out), "--assets", str(assets),
                             "--docs", str(docs)]) == 0
            return docs.read_text(), capsys.readouterr().out

    out.mkdir()
    (out / "runs").mkdir()
    return Study()


def test_pilot_incomplete_says_so_and_how_to_continue(study, capsys):
    study.ws(0)
    study.ws(1)
    study.pilot(SEEDS[:1])
    text, printed = study.report(capsys)
    assert "pilot: 1 of 2 runs finished; no run length yet" in text
    assert "tuning" not in text and "## held-out" not in text
    assert (f"continue with: python -m hmpo_verl.lab.study --v4 --out {study.out} --assets {study.assets} "
            f"--docs {study.docs}\n") in printed  # the same report: a resume without --docs would write docs/study.md


def test_report_only_without_runs_stops_loud(tmp_path, no_builds):
    with pytest.raises(SystemExit, match="holds no v4 runs"):
        cli.main(["--v4", "--report-only", "--out", str(tmp_path / "nothing"), "--docs", str(tmp_path / "r.md")])


def test_tuning_incomplete_chooses_nothing_and_counts(study, capsys):
    """A warm start not built: its tuning runs are missing, no setting is chosen; then every run of the grids
    but a choice at an edge: the edge rule's new point is not run yet, still nothing chosen."""
    study.ws(0)
    study.pilot()
    study.tuning({"vanilla": 3e-4, "hmpo": 3e-4}, warm_starts=(0,))
    text, printed = study.report(capsys)
    assert ("warm starts: 1 of 2 accepted for the models ['dense'], seeds [0]; warm start 1 of the dense model "
            "is not built") in text
    assert f"pilot: 2 of 2 runs finished; run length T = {T} steps" in text
    assert (f"Command: `python -m hmpo_verl.lab.study --v4 --out {study.out} --assets {study.assets} --docs "
            f"{study.docs} --report-only`. Versions: hmpo-verl ") in text and ", torch " in text
    assert "tuning: 12 of 24 runs of the current grids finished; no setting chosen" in text
    assert "## held-out" not in text and "evaluation:" not in printed  # no evaluation run listed, none tested

    study.ws(1)
    study.tuning({"vanilla": 3e-4, "hmpo": 1e-3}, warm_starts=(0, 1))  # hmpo at its grid's largest point
    text, _ = study.report(capsys)
    assert ("tuning: 24 of 28 runs of the current grids finished; the edge rule extended "
            "async_4/hmpo -> (0.0001, 0.0003, 0.001, 0.003); no setting chosen") in text
    assert "## held-out" not in text


def test_evaluation_partial_tests_only_complete_pairs(study, capsys):
    study.ws(0)
    study.ws(1)
    study.pilot()
    study.tuning({"vanilla": 3e-4, "hmpo": 3e-4})
    # (warm start, seed) pairs of both methods, then one run of each method whose partner is missing
    diffs = {(0, 1): -0.02, (0, 2): -0.05, (0, 3): 0.01, (1, 1): -0.04}
    for (w, s), d in diffs.items():
        study.record(Run("eval", REGIME, "vanilla", 3e-4, s, w), T, heldout=0.5 + 0.01 * s)
        study.record(Run("eval", REGIME, "hmpo", 3e-4, s, w), T, heldout=0.5 + 0.01 * s + d)
    study.record(Run("eval", REGIME, "vanilla", 3e-4, 2, 1), T, heldout=0.99)  # hmpo's (1, 2) missing
    study.record(Run("eval", REGIME, "hmpo", 3e-4, 3, 1), T, heldout=0.01)  # vanilla's (1, 3) missing
    text, printed = study.report(capsys)
    assert ("Runs: 10 of 12 evaluation runs finished; the others are not run yet (the study is still running, or "
            "its budget ran out)") in text
    assert "evaluation: 10 of 12 runs finished" in printed
    test = analysis.paired_test(list(diffs.values()))
    row = next(line for line in text.splitlines() if line.startswith("| Q1/async_4"))
    assert row.split("|")[2].strip() == "4"  # the 4 complete pairs; the 2 unpaired runs left out
    # a verdict on part of a regime's pairs is marked interim, and the guide lists no interim verdict as decided
    assert row.split("|")[-2].strip().startswith("interim: ") and "(the regime's evaluation is incomplete)" in row
    assert "* Primary questions decided after Holm: none." in text
    assert "Regimes evaluated: 1 of 1 (`async_4` in part)." in text
    # every table and figure drawn from the partial regime says its rows are interim
    interim = ("Interim: rows of `async_4` come from the pairs finished so far (evaluated in part; the list at the "
               "top counts the runs) and decide nothing.")
    for section in ("## Per warm start", "## Regimes, as measured", "## Every method against vanilla",
                    "## The mechanism", "## Held-out reward and the plateau"):
        assert interim in text.split(section)[1].split("\n## ")[0], section
    assert f"{test['diff']:+.3f}" in row
    assert test["mde"] > plan_v4.MDE_TARGET
    # the plateau check counts every finished run, paired or not: 10 (flat curves: none rising)
    assert "| async_4 | every method | 10 | 0 |" in text and "| async_4 | vanilla | 5 | 0 |" in text
    assert "marked *warm-start dependent* when two warm starts' intervals exclude 0 on opposite sides: none is." in text
    assert (f"* Q1/async_4: MDE {test['mde']:.3f} > {plan_v4.MDE_TARGET}; {plan_v4.seeds_for_mde(test['sd'])} "
            f"pairs would reach it (observed sd {test['sd']:.4f}, interim: 4 pairs so far).") in text


def test_the_running_path_goes_through_the_same_stages(study, capsys, monkeypatch):
    """Without --report-only the runner runs each stage's missing runs (here: writes their records), the warm
    starts are built, and the report covers every planned evaluation run."""
    labels = []

    def fake_run_all(runs, task, assets, steps, base, out, parallel, label):
        labels.append(label)
        for r in runs:
            if not run.is_done(r, out, task, steps, base):
                hmpo = r.method == "hmpo"  # hmpo - vanilla: -0.03 on warm start 0, -0.02 on warm start 1
                study.record(r, steps, heldout=0.5 + 0.01 * r.seed + (0.01 * r.warm_start - 0.03) * hmpo,
                             train=0.6 if r.lr == 3e-4 else 0.5)

    monkeypatch.setattr(run, "run_all", fake_run_all)
    monkeypatch.setattr(run, "warm_start_model", lambda task, assets, kind, k, log=None: study.ws(k))
    monkeypatch.setattr(lean, "load_task", lambda *a, **k: None)
    assert cli.main(["--v4", "--out", str(study.out), "--assets", str(study.assets), "--docs", str(study.docs)]) == 0
    text = study.docs.read_text()
    assert labels == ["pilot", f"tuning {REGIME}", f"evaluation {REGIME}"]
    assert "Runs: 12 of 12 evaluation runs finished." in text and "not run yet" not in text and "Interim:" not in text
    assert (f"Command: `python -m hmpo_verl.lab.study --v4 --out {study.out} --assets {study.assets} --docs "
            f"{study.docs} --parallel ") in text
    assert "| Q1/async_4 (hmpo − vanilla) | 6 | -0.025 [" in text
    # the exploratory table, the regimes' measured gaps, the figure and the plateau check come from the same runs
    assert "| async_4 | hmpo | 6 | 0.495 ± 0.011 | -0.025 [-0.031, -0.019] |" in text
    assert "| async_4 | 4 | " in text and "| 0.0200; 0.0200; 0.0200–0.0200 |" in text
    assert (study.docs.parent / "study_v4_figures" / "reward.png").stat().st_size > 10_000
    assert (study.docs.parent / "study_v4_figures" / "mechanism.png").stat().st_size > 10_000
    assert "![mechanism](study_v4_figures/mechanism.png)" in text
    # every regime v4 can evaluate has a mechanism (the figure's colour): the gap ladder's included
    assert set(plan_v4.REGIMES) | set(v4.GAP_LADDER) <= set(plan.MECHANISMS)
    assert "| async_4 | every method | 12 | 0 | +0.00000 [+0.00000, +0.00000] |" in text  # flat synthetic curves
    assert "| async_4 | vanilla | 6 | 0 | +0.00000 [+0.00000, +0.00000] |" in text
    # the data beside the report: a row per finished run of every stage, with its warm start; every pilot and
    # evaluation run's curve from step 0 (what the run length and the plateau table are recomputed from)
    import pandas as pd
    data = study.docs.parent / "study_v4_data"
    runs_csv, steps_csv = pd.read_csv(data / "runs.csv"), pd.read_csv(data / "steps.csv.gz")
    assert runs_csv.groupby("phase").size().to_dict() == {"pilot": 2, "tune": 24, "eval": 12}
    assert runs_csv["warm_start"].notna().all() and set(runs_csv["seed"]) == {1, 2, 3, 1001, 1002}
    assert steps_csv.groupby("phase").size().to_dict() == {"pilot": 2 * (PLAN.pilot_steps + 1), "eval": 12 * (T + 1)}
    assert (steps_csv[steps_csv.step == 0]["eval_heldout"] == 0.4).all() and "Data: `study_v4_data/runs.csv`" in text
    # the scope paragraph, at the top, from what is built (no task data, no model here) and the runs
    scope = text.split("**Scope of study v4: what it can and cannot say.** ")[1].split("\n")[0]
    assert text.index("**Scope") < text.index("Runs: 12 of 12")
    assert scope.startswith("One task (`fibonacci`; its data is not built here, so its counts are not stated), "
                            "small models (parameters: not built here)")
    assert ("2 warm starts (seed: greedy accuracy of each model's fit as built on the machine that wrote this report: "
            "0: dense 1.00; 1: dense 1.00)" in scope and
            "Runs are 10 steps long (the plateau rule); at the last step 0 of 12 evaluation runs (0%) still rise" in
            scope and "MDE exceeds ±0.03 in 0 of the 1 paired primaries tested" in scope and
            "Regimes evaluated: 1 of 1 (`async_4`)." in scope)
    # the guide: hmpo's interval excludes 0, keyed by vanilla's own gap; Q1 decided
    assert ("* vanilla's gap 0.0200 (`async_4`, 1 method vs vanilla): `hmpo` -0.025 [-0.031, -0.019]" in text and
            "none of the 1 intervals (every method, 1 regime, uncorrected)" in text and
            "decided after Holm: Q1/async_4 different but within ±0.03." in text)


def test_regimes_run_one_at_a_time_the_least_cpu_per_primary_first():
    """The execution order: pilot CPU seconds per run x planned tuning and evaluation runs / paired primaries."""
    p = v4.default_v4()
    pilot = v4.Pilot(20, 20, 150, True, ["async_0", "async_4", "moe_replay", "moe32_top1"], "moe32_top1",
                     {"async_0": 40.0, "async_4": 38.0, "moe_replay": 76.0, "moe32_top1": 72.0})
    qs = [q for q in v4.questions(pilot.regimes, "moe32_top1", p.methods) if q.kind != "trend"]

    def cost(r):
        runs_ = (sum(len(v4.start_grid(p, r, m)) for m in p.methods) * len(p.tuning_seeds) * p.warm_starts
                 + v4.regime_pairs(p, r) * len(p.methods))
        assert v4.regime_cpu_s(p, pilot, r) == pytest.approx(pilot.cpu_s[r] * runs_)  # T = the pilot's length
        return pilot.cpu_s[r] * runs_ / sum(r in q.regimes for q in qs)

    order = v4.regime_order(p, pilot)
    assert [cost(r) for r in order] == sorted(cost(r) for r in order)
    assert order[0] == "async_0" and order[-1] == "moe32_top1"  # 2 primaries at 40 s; 1 (Q6) at 72 s, 57 pairs
    # the evaluation comes pair by pair: every prefix of whole pairs holds every method
    runs_ = v4.evaluation_runs(p, "async_0", {("async_0", m): {"lr": 3e-4} for m in p.methods}, [0, 3, 7])
    assert len(runs_) == v4.regime_pairs(p, "async_0") * len(p.methods)
    assert {r.method for r in runs_[:len(p.methods)]} == set(p.methods)
    assert len({(r.warm_start, r.seed) for r in runs_[:len(p.methods)]}) == 1


def test_an_unreached_question_stays_in_the_holm_family_with_p_one():
    """A partial study's unreached questions count in Holm's m (p = 1), so a reached question's correction is
    the pre-registered family's; their verdict says so."""
    from hmpo_verl.lab.study.plan import Question

    qs = [Question("Qa", "paired", "hmpo", "vanilla", ("async_4",), ""),
          Question("Qb", "paired", "hmpo", "vanilla", ("bf16",), "")]
    rows = [{"regime": "async_4", "method": m, "seed": s, "final_heldout": 0.5 + 0.01 * s - 0.05 * (m == "hmpo")
             + 0.002 * s * s * (m == "hmpo"), "update/log_ah_gap": 0.1} for m in ("hmpo", "vanilla") for s in range(6)]
    alone = analysis.primaries(qs[:1], rows, {})
    both = analysis.primaries(qs, rows, {}, unreached=frozenset({"Qb"}))
    assert both[1]["verdict"] == "not reached" and both[1]["p"] == 1.0
    assert both[0]["p_holm"] == pytest.approx(min(1.0, 2 * alone[0]["p"]))
    assert alone[0]["p_holm"] == pytest.approx(alone[0]["p"])


def test_a_warm_start_is_accepted_only_when_every_model_used_fits(tmp_path):
    """The real v4 case: warm start 0's dense fit passes, its moe32 fit (the gap regime the pilot kept) reaches
    0.84 < 0.95: seed 0 is skipped, loud, and a seed whose first model fails is not checked further."""
    fits = {("dense", 0): 1.0, ("moe32", 0): 0.84, ("dense", 1): 0.16, ("dense", 2): 1.0, ("moe32", 2): 0.99}
    for (kind, k), greedy in fits.items():
        root = run.warm_start_dir("fibonacci", str(tmp_path), kind, k)
        root.mkdir(parents=True)
        (root / "warm_start.json").write_text(json.dumps({"greedy_accuracy": greedy}))
        (root / "READY").write_text("ok\n")
    said = []
    seeds, missing = v4.accepted_warm_starts("fibonacci", str(tmp_path), ["dense", "moe32"], 1, True, said.append,
                                             build=False)
    assert seeds == [2] and missing is None
    assert said == ["warm start 0 skipped: greedy accuracy {'dense': 1.0, 'moe32': 0.84} < 0.95",
                    "warm start 1 skipped: greedy accuracy {'dense': 0.16} < 0.95"]


def test_no_warm_start_accepted_yet_counts_every_planned_tuning_run(study, capsys):
    """No warm start built: the tuning's count is the plan's (grids x seeds x warm starts), not 0 of 0."""
    study.pilot()
    text, _ = study.report(capsys)
    assert f"tuning: 0 of {2 * len(GRID) * len(SEEDS) * 2} runs of the current grids finished; no setting chosen" in text


def test_too_few_passing_warm_starts_stop_loud_naming_the_threshold(tmp_path):
    """5 x wanted seeds (15) tried, fewer than wanted pass: the study stops with the count and where the threshold
    lives, not a silent run on fewer warm starts."""
    for k in range(15):
        root = run.warm_start_dir("fibonacci", str(tmp_path), "dense", k)
        root.mkdir(parents=True)
        (root / "warm_start.json").write_text(json.dumps({"greedy_accuracy": 1.0 if k in (3, 8) else 0.5}))
        (root / "READY").write_text("ok\n")
    with pytest.raises(SystemExit, match=r"only 2 of 15 warm-start seeds reach greedy accuracy 0.95; v4 needs 3: "
                                         r"see plan_v4.WARM_START_MIN_GREEDY"):
        v4.accepted_warm_starts("fibonacci", str(tmp_path), ["dense"], 3, True, lambda _: None, build=False)
    # the same fits with 2 wanted: accepted, and the seeds not tried past the second pass
    seeds, missing = v4.accepted_warm_starts("fibonacci", str(tmp_path), ["dense"], 2, True, lambda _: None,
                                             build=False)
    assert seeds == [3, 8] and missing is None


def test_plateau_lines_count_rising_runs_and_average_their_last_slopes():
    """Two runs per regime over 20 steps: one rising 0.01 per step, one falling 0.004 per step at its end; the
    last-10-step slopes are exact (least squares on a line) and the count is of positive slopes."""
    rising = [0.01 * i for i in range(20)]
    falling = [0.5] * 10 + [0.5 - 0.004 * i for i in range(10)]
    lines = v4.plateau_lines({("async_1", "vanilla"): [rising], ("async_1", "hmpo"): [falling],
                              ("async_2", "vanilla"): [falling, falling]}, ["async_1", "async_2", "bf16"], 20)
    mean, half = 0.003, stats.t_quantile(0.95, 1) * (0.014 / 2 ** 0.5) / 2 ** 0.5  # sd of (0.01, -0.004), n = 2
    assert lines[2] == f"| async_1 | every method | 2 | 1 | +0.00300 [{mean - half:+.5f}, {mean + half:+.5f}] |"
    assert lines[3].startswith("| async_2 | every method | 2 | 0 | -0.00400 [")
    assert lines[4].startswith("| async_2 | vanilla | 2 | 0 | -0.00400 [")
    assert len(lines) == 5  # async_1's vanilla has one run (no interval), bf16 none: no row


def test_a_record_made_with_other_settings_runs_again_and_says_so(study, monkeypatch, capsys):
    """A relaunch whose settings differ from a record's (here: eval_prompts 8 -> 16) runs it again, replacing the
    record, and prints which field differs; records that match are kept; a missing one just runs."""
    monkeypatch.setattr(run, "warm_start_model", lambda *a, **k: None)
    kept, changed, missing = (Run("tune", REGIME, "vanilla", 3e-4, s) for s in SEEDS + (1003,))
    study.record(kept, T)
    study.record(changed, T)
    record = json.loads(changed.path(study.out).read_text())
    record["settings"]["eval_prompts"] = 16
    changed.path(study.out).write_text(json.dumps(record))
    executed = []
    monkeypatch.setattr(run, "execute", lambda r, *a: executed.append(r))
    base = lean.LoopSettings(max_response_length=lean.recipe_max_response_length("fibonacci"),
                             eval_prompts=PLAN.eval_prompts)
    RUN_ALL([kept, changed, missing], "fibonacci", str(study.assets), T, base, study.out, 1, "tuning")
    assert executed == [changed, missing]
    assert ("tuning: 1 of 3 runs in " + str(study.out) + " hold a record made with other settings (e.g. "
            f"{changed.path(study.out).relative_to(study.out)}: setting eval_prompts 16 (now 8)); they run again "
            "and their records are replaced") in capsys.readouterr().out
    assert run.record_mismatch(kept, study.out, "fibonacci", T, base) is None
    assert run.record_mismatch(kept, study.out, "fibonacci", T + 1, base) == f"steps {T} (now {T + 1})"


def test_scope_facts_count_distinct_prompts_and_the_built_models_parameters(tmp_path):
    """Distinct training prompts not held out and held-out prompts, from the task's parquet files; the parameters
    of the first accepted warm start's model that is built (a warm start without a model: its fit only)."""
    import pandas as pd
    import transformers

    from hmpo_verl.lab.tasks.common import TaskPaths

    data = TaskPaths(Path(lean.asset_dirs("fibonacci", str(tmp_path))["dense"]))
    data.train_parquet.parent.mkdir(parents=True)
    chat = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    pd.DataFrame({"prompt": [chat(t) for t in "ABCAD"]}).to_parquet(data.train_parquet)
    pd.DataFrame({"prompt": [chat(t) for t in "DE"]}).to_parquet(data.test_parquet)
    for k in (3, 5):
        root = run.warm_start_dir("fibonacci", str(tmp_path), "dense", k)
        root.mkdir(parents=True)
        (root / "warm_start.json").write_text(json.dumps({"greedy_accuracy": 0.97}))
        (root / "READY").write_text("ok\n")
    config = transformers.Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = transformers.Qwen2ForCausalLM(config)
    model.save_pretrained(TaskPaths(run.warm_start_dir("fibonacci", str(tmp_path), "dense", 5)).model)
    facts = v4.scope_facts("fibonacci", str(tmp_path), ["dense", "moe"], [3, 5])
    assert facts["prompts"] == (3, 2)  # A, B, C (D is held out); D, E
    assert facts["params"] == {"dense": sum(t.numel() for t in model.parameters())}
    assert facts["fits"] == {3: {"dense": {"greedy_accuracy": 0.97}}, 5: {"dense": {"greedy_accuracy": 0.97}}}


def test_readme_is_written_from_v4_only_once_every_regime_is_evaluated(study, monkeypatch, tmp_path):
    """--v4 --readme: loud while the pilot or an evaluation is incomplete (the README's blocks stay as they are);
    once the evaluation is complete, the guide and scope blocks come from v4's report."""
    from hmpo_verl.lab.study import report

    readme = tmp_path / "README.md"
    before = "\n".join(["intro", report.GUIDE_START, "v3 guide", report.GUIDE_END,
                        report.SCOPE_START, "v3 scope", report.SCOPE_END, "end"]) + "\n"
    readme.write_text(before)
    monkeypatch.setattr(run, "REPO_ROOT", tmp_path)
    study.docs = tmp_path / "docs" / "study.md"  # the repository's report: the one --readme copies from
    argv = ["--v4", "--report-only", "--readme", "--out", str(study.out), "--assets", str(study.assets),
            "--docs", str(study.docs)]
    study.ws(0)
    study.ws(1)
    with pytest.raises(SystemExit, match="--readme: v4 has evaluated no regimes; the README's guide and scope stay "
                                         "v3's until every such regime is evaluated"):
        cli.main(argv)  # the pilot has not run
    study.pilot()
    study.tuning({"vanilla": 3e-4, "hmpo": 3e-4})
    for s in (1, 2, 3):
        for w in (0, 1):
            study.record(Run("eval", REGIME, "vanilla", 3e-4, s, w), T, heldout=0.5 + 0.01 * s)
            if (s, w) != (3, 1):
                study.record(Run("eval", REGIME, "hmpo", 3e-4, s, w), T, heldout=0.47 + 0.01 * s + 0.001 * w)
    with pytest.raises(SystemExit, match="v4 has evaluated 0 of the 1 regimes this machine runs"):
        cli.main(argv)  # one run missing
    assert readme.read_text() == before and study.docs.exists()
    study.record(Run("eval", REGIME, "hmpo", 3e-4, 3, 1), T, heldout=0.501)
    assert cli.main(argv) == 0
    text, docs = readme.read_text(), study.docs.read_text()
    guide = text.split(report.GUIDE_START + "\n")[1].split("\n" + report.GUIDE_END)[0].splitlines()
    scope = text.split(report.SCOPE_START + "\n")[1].split("\n" + report.SCOPE_END)[0].splitlines()
    assert guide[0].startswith("* From study v4 ([`docs/study.md`](docs/study.md)): regimes evaluated 1 of 1 "
                               "(`async_4`); 10-step runs")
    assert all(line in docs for line in guide[1:]) and "`hmpo` -0.0" in guide[1]
    # the report's own copy of the guide links its source relative to the report (the README's: from the root)
    assert guide[0].replace("](docs/study.md)", f"]({study.docs.name})") in docs and "](docs/study.md)" not in docs
    assert len(scope) == 1 and scope[0].startswith("**Scope of study v4: what it can and cannot say.**") and scope[0] in docs
    assert text.startswith("intro\n") and text.endswith("end\n") and "v3 guide" not in text and "v3 scope" not in text


@pytest.mark.parametrize("argv, named", [
    (["--v4", "--steps", "50"], "--steps"),
    (["--v4", "--methods", "vanilla", "hmpo", "--eval-seeds", "4"], "--methods --eval-seeds"),
    (["--v4", "--report-only", "--from-data"], "--from-data"),
    (["--v4", "--confirm"], "--confirm"),
    (["--v4", "--preregister", "--docs", "x.md"], "--docs"),
    (["--v4", "--steps", "30"], "--steps"),  # named at v3's default value: still ignored by v4, still refused
    (["--v4", "--eval-seeds=12", "--confirm-seeds", "6"], "--eval-seeds --confirm-seeds"),
    (["--v4", "--preregister", "--parallel", "2", "--task", "fibonacci"], "--parallel --task"),
])
def test_v4_refuses_v3s_options_it_would_ignore(argv, named, capsys):
    """v4's plan is pre-registered: an option only v3 reads stops the command, naming it and what is allowed."""
    with pytest.raises(SystemExit):
        cli.parse_args(argv)
    err = capsys.readouterr().err
    assert f"with {named} is invalid: v4's plan is pre-registered in plan_v4.py; allowed with --v4:" in err


def test_v3_preregister_does_not_replace_the_archived_report(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--preregister"])
    assert "--preregister would replace v3's archived report" in capsys.readouterr().err
    assert cli.parse_args(["--preregister", "--docs", "elsewhere.md"]).docs == "elsewhere.md"
    assert cli.parse_args(["--v4", "--report-only", "--parallel", "1", "--docs", "d.md"]).v4  # v4's own options pass


def test_a_second_study_process_on_the_same_out_stops_loud(tmp_path):
    """While one process holds ``out`` (run.out_lock around its runs), another's run_all stops naming the holder's
    pid, before running anything; once released, the folder is free again."""
    import subprocess
    import sys

    out = tmp_path / "runs"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from hmpo_verl.lab.study import run\n"
                               f"with run.out_lock(Path({str(out)!r})):\n    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(SystemExit, match=rf"{out} is in use by another study process \(pid {holder.pid}\)"):
            RUN_ALL([Run("tune", REGIME, "vanilla", 3e-4, 1001)], "fibonacci", None, T, lean.LoopSettings(), out, 1,
                    "tuning")
    finally:
        holder.kill()
        holder.wait()
    with run.out_lock(out):  # released with its process
        pass


def test_a_relaunch_on_other_inputs_stops_loud_before_any_run(study, tmp_path):
    """The runs of an --out are pinned to the inputs they read (the task's prompts, each warm start's weights): a
    relaunch that would read others (another --assets, a warm start rebuilt) stops naming them; the same content
    rewritten (a parquet file written again with another codec) is the same input; an input not built is not pinned."""
    import pandas as pd

    runs = [Run("eval", REGIME, m, 3e-4, 1, 1) for m in ("vanilla", "hmpo")]
    base = lean.LoopSettings(max_response_length=lean.recipe_max_response_length("fibonacci"),
                             eval_prompts=PLAN.eval_prompts)
    for r in runs:
        study.record(r, T)  # finished: nothing runs, nothing is built
    data = lean.asset_dirs("fibonacci", str(study.assets))["dense"] / "data"
    data.mkdir(parents=True)
    frame = pd.DataFrame({"prompt": ["1 1", "1 2"], "answer": ["2", "3"]})
    frame.to_parquet(data / "train.parquet", compression="snappy")
    weights = run.warm_start_dir("fibonacci", str(study.assets), "dense", 1) / "model"
    weights.mkdir(parents=True)
    (weights / "model.safetensors").write_bytes(b"weights-1")

    def relaunch():
        RUN_ALL(runs, "fibonacci", str(study.assets), T, base, study.out, 1, "evaluation")

    relaunch()
    pinned = json.loads((study.out / run.INPUTS).read_text())
    assert sorted(pinned) == ["data", "dense/ws1"]
    frame.to_parquet(data / "train.parquet", compression="gzip")  # the same rows, other bytes
    relaunch()
    (weights / "model.safetensors").write_bytes(b"weights-2")  # the warm start rebuilt otherwise
    with pytest.raises(SystemExit, match=r"made from other inputs than these: dense/ws1 \(.*fibonacci_dense_ws1/model\) "
                                         r"differ .*Point --assets at the folders the runs were made from, or --out"):
        relaunch()
    (weights / "model.safetensors").write_bytes(b"weights-1")
    frame.assign(answer=["2", "4"]).to_parquet(data / "train.parquet")  # another task's answers
    with pytest.raises(SystemExit, match=r"other inputs than these: data \("):
        relaunch()
    assert json.loads((study.out / run.INPUTS).read_text()) == pinned  # a refused relaunch changes nothing
    assert run.fingerprint(tmp_path / "not_built") is None


@pytest.mark.parametrize("argv, named", [
    (["--v4", "--quick", "--readme"], "--quick"),
    (["--v4", "--readme", "--docs", "elsewhere.md"], "--docs elsewhere.md"),
    (["--quick", "--readme"], "--quick"),
    (["--from-data", "--readme", "--docs", "elsewhere.md"], "--docs elsewhere.md"),
])
def test_readme_is_written_only_from_the_repositorys_own_report(argv, named, tmp_path, no_builds):
    """--readme copies the guide and scope of docs/study.md (v4) or docs/study_v3.md (v3) into the README, whose
    guide links it: a smoke run's report or another file stops the command before anything is run or written."""
    with pytest.raises(SystemExit, match=f"--readme is invalid with {named}: the README's guide and scope are copied "
                                         "from \\(and link\\) the study's own report"):
        cli.main([*argv, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_a_question_too_few_of_whose_pairs_are_finished_stays_in_the_holm_family_with_p_one():
    """A regime whose evaluation has started but holds fewer than 2 pairs of a question: that question is not
    reached (p = 1 in Holm's m), not dropped from the family, which would shrink m and the others' correction."""
    from hmpo_verl.lab.study.plan import Question

    qs = [Question("Qa", "paired", "hmpo", "vanilla", ("async_4",), ""),
          Question("Qb", "paired", "hmpo", "vanilla", ("bf16",), "")]
    rows = [{"regime": "async_4", "method": m, "seed": s, "final_heldout": 0.5 + 0.01 * s - 0.05 * (m == "hmpo")
             + 0.002 * s * s * (m == "hmpo"), "update/log_ah_gap": 0.1} for m in ("hmpo", "vanilla") for s in range(6)]
    one_pair = [{"regime": "bf16", "method": m, "seed": 0, "final_heldout": 0.4, "update/log_ah_gap": 0.1}
                for m in ("hmpo", "vanilla")]
    unreached = analysis.primaries(qs, rows, {}, unreached=frozenset({"Qb"}))
    for extra in ([], one_pair[:1], one_pair):  # no run, one run, one whole pair of bf16
        both = analysis.primaries(qs, rows + extra, {})
        assert both[1]["verdict"] == "not reached" and both[1]["p"] == 1.0 and both[1]["p_tost"] == 1.0
        assert both[0]["p_holm"] == unreached[0]["p_holm"] and both[0]["verdict"] == unreached[0]["verdict"]


def test_a_record_made_by_another_regime_or_method_definition_runs_again_and_says_so(study, monkeypatch, capsys):
    """What the lean loop reads of the regime and the method is in each record: a relaunch after either changed
    in the code (here: async_4's lag, hmpo's clip) runs the run again, saying which field; a record written before
    definitions were stored runs again too; the report's text (a note) is not part of it."""
    from dataclasses import replace

    monkeypatch.setattr(run, "warm_start_model", lambda *a, **k: None)
    base = lean.LoopSettings(max_response_length=lean.recipe_max_response_length("fibonacci"),
                             eval_prompts=PLAN.eval_prompts)
    r = Run("tune", REGIME, "hmpo", 3e-4, 1001)
    study.record(r, T)
    monkeypatch.setitem(lean.REGIMES_BY_NAME, REGIME, replace(lean.REGIMES_BY_NAME[REGIME], note="reworded"))
    assert run.record_mismatch(r, study.out, "fibonacci", T, base) is None
    monkeypatch.setitem(lean.REGIMES_BY_NAME, REGIME, replace(lean.REGIMES_BY_NAME[REGIME], lag=3))
    assert run.record_mismatch(r, study.out, "fibonacci", T, base) == "regime async_4's lag 4 (now 3)"
    monkeypatch.undo()
    monkeypatch.setattr(run, "warm_start_model", lambda *a, **k: None)
    monkeypatch.setitem(lean.METHODS_BY_NAME, "hmpo", replace(lean.METHODS_BY_NAME["hmpo"],
                                                              actor=(("clip_ratio", 0.3),)))
    assert run.record_mismatch(r, study.out, "fibonacci", T, base) == "method hmpo's actor [] (now [['clip_ratio', 0.3]])"
    executed = []
    monkeypatch.setattr(run, "execute", lambda r, *a: executed.append(r))
    RUN_ALL([r], "fibonacci", str(study.assets), T, base, study.out, 1, "tuning")
    assert executed == [r] and "method hmpo's actor [] (now [['clip_ratio', 0.3]])); they run again" in capsys.readouterr().out
    monkeypatch.undo()
    record = json.loads(r.path(study.out).read_text())
    del record["definitions"]
    r.path(study.out).write_text(json.dumps(record))
    assert run.record_mismatch(r, study.out, "fibonacci", T, base) == (
        "no regime or method definitions (a record from before they were stored)")


def test_report_only_stops_loud_on_records_made_with_other_settings_or_inputs(study, capsys):
    """--report-only would count a record made with other settings as not run (a quick run's folder reported
    without --quick, say): it stops naming the first; inputs other than the runs' pinned ones stop it too."""
    study.ws(0)
    study.ws(1)
    study.pilot()
    kept = Run("pilot", REGIME, "vanilla", v4.v3_vanilla_lr(REGIME), SEEDS[0])
    record = json.loads(kept.path(study.out).read_text())
    record["steps"] = 10
    kept.path(study.out).write_text(json.dumps(record))
    with pytest.raises(SystemExit, match=r"--report-only: pilot: 1 of 2 records in .* were made with other settings "
                                         r"\(e.g. runs/pilot/async_4/vanilla/.*: steps 10 \(now 20\)\); this report would "
                                         "count them as not run"):
        study.report(capsys)
    study.pilot()
    (study.out / run.INPUTS).write_text(json.dumps({"dense/ws1": "another"}))
    model = run.warm_start_dir("fibonacci", str(study.assets), "dense", 1) / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    study.tuning({"vanilla": 3e-4, "hmpo": 3e-4})
    with pytest.raises(SystemExit, match=r"made from other inputs than these: dense/ws1"):
        study.report(capsys)
    assert json.loads((study.out / run.INPUTS).read_text()) == {"dense/ws1": "another"}  # nothing pinned


def test_a_failed_run_cancels_the_queued_ones_and_is_raised_at_once():
    """run.wait_for (the pool's loop): the first run's error is raised while the others still queue, and they never
    start (not after every queued run has finished)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    started, release = [], threading.Event()

    def job(i):
        started.append(i)
        if i == 0:
            raise RuntimeError("run 0 failed")
        release.wait(5)

    class Bar:
        def update(self, _):
            pass

        def set_postfix_str(self, _):
            pass

    class Queue:
        def empty(self):
            return True

    with ThreadPoolExecutor(max_workers=1) as pool:
        futures = {pool.submit(job, i): Run("tune", REGIME, "vanilla", 3e-4, 1000 + i) for i in range(6)}
        with pytest.raises(RuntimeError, match="run 0 failed"):
            run.wait_for(futures, Queue(), Bar())
        release.set()
    assert started == [0] and sum(f.cancelled() for f in futures) == 5


def test_the_execution_order_is_fixed_once_computed(tmp_path):
    """The order goes to <out>/order.json the first time (not under --report-only); the same order passes, another
    (the pilot's records changed) stops naming both and how to go on."""
    v4.pin_order(tmp_path, ["async_0", "async_4"], write=False)
    assert not (tmp_path / v4.ORDER).exists()
    v4.pin_order(tmp_path, ["async_0", "async_4"], write=True)
    v4.pin_order(tmp_path, ["async_0", "async_4"], write=True)
    with pytest.raises(SystemExit, match=r"fixed as async_0, async_4 \(.*order.json\); the pilot's records now give "
                                         r"async_4, async_0 \(a pilot run made again\?\)\. Restore .* or delete"):
        v4.pin_order(tmp_path, ["async_4", "async_0"], write=False)
    assert json.loads((tmp_path / v4.ORDER).read_text()) == ["async_0", "async_4"]


def test_assets_a_studys_runs_were_made_from_are_not_rebuilt_under_them(tmp_path):
    """A built folder whose spec differs from the code's is rebuilt, except under run.keep_built of an --out that
    holds runs (inputs pinned): there it stops loud and the folder stays as it was."""
    from dataclasses import dataclass

    from hmpo_verl.lab.tasks import common
    from hmpo_verl.lab.tasks.common import TaskPaths

    @dataclass
    class Spec:
        seed: int

    root, out = tmp_path / "assets", tmp_path / "out"
    built = []

    def build(paths):
        built.append(1)
        return {"greedy_accuracy": 1.0}

    common.prepare("toy", root, Spec(0), build, log=None)
    out.mkdir()
    with run.keep_built(out):  # no runs pinned yet: a changed spec rebuilds, as outside a study
        common.prepare("toy", root, Spec(1), build, log=None)
    assert len(built) == 2
    (out / run.INPUTS).write_text("{}")
    with run.keep_built(out), pytest.raises(SystemExit, match=r"toy task: the assets in .*assets were built from "
                                                             r"another spec than the code's .*; the runs in .*out were "
                                                             "made from them"):
        common.prepare("toy", root, Spec(2), build, log=None)
    assert len(built) == 2 and json.loads(TaskPaths(root).spec.read_text()) == {"seed": 1}
    common.prepare("toy", root, Spec(2), build, log=None)  # outside the study: rebuilt as before
    assert len(built) == 3


def test_the_out_lock_is_reentrant_and_held_across_v4s_stages(tmp_path, monkeypatch):
    """v4.main holds the lock over every stage (a second process cannot take it between two), and run_all inside
    takes it again in the same process."""
    out = tmp_path / "runs"
    seen = []

    def stages(args, log, out_, docs):
        with run.out_lock(out_):  # as run_all does inside: the same process passes
            seen.append(out_.resolve() in run._LOCKED)
        seen.append(out_.resolve() in run._LOCKED)  # still held between two stages
        return 0

    monkeypatch.setattr(v4, "stages", stages)
    assert cli.main(["--v4", "--out", str(out), "--docs", str(tmp_path / "r.md")]) == 0
    assert seen == [True, True] and out.resolve() not in run._LOCKED


def test_restore_resumes_on_a_new_machine_from_the_committed_data_and_checks_it(study, capsys, monkeypatch, tmp_path):
    """A finished study's data (runs.csv, steps.csv.gz) restores its records into an empty --out: the first run of
    each phase and regime runs (in a scratch folder) to check the data, no run runs in --out, and the report is the
    same but for its line on the restore. Data this code does not reproduce (another commit, another machine) stops
    loud before any record is written; with --restore-as-recorded only the stages the data holds whole are
    restored, the others run here whole; data made for another run length stops loud."""
    shift = {"value": 0.0}  # another machine: every outcome moved

    def value(r):  # every run's outcome, a function of the run alone (what a deterministic run gives)
        noise = random.Random(f"{r.method} {r.warm_start} {r.seed}").random() / 20 + shift["value"]
        return dict(heldout=0.5 + noise - 0.03 * (r.method == "hmpo"), train=(0.6 if r.lr == 3e-4 else 0.5) + noise)

    def write(r, steps, out):  # the run's record in ``out``, as run.execute writes it
        study.record(r, steps, **value(r))  # (in the first study's folder: copied)
        if Path(out) != study.out:
            r.path(Path(out)).parent.mkdir(parents=True, exist_ok=True)
            r.path(Path(out)).write_bytes(r.path(study.out).read_bytes())

    def fake_run_all(runs, task, assets, steps, base, out, parallel, label):
        for r in runs:
            if not run.is_done(r, out, task, steps, base):
                ran.append(r)
                write(r, steps, out)

    def fake_execute(r, task, assets, steps, base, out, queue, moe):
        executed.append((r.phase, r.regime))
        write(r, steps, out)

    ran, executed = [], []
    monkeypatch.setattr(run, "run_all", fake_run_all)
    monkeypatch.setattr(run, "execute", fake_execute)
    monkeypatch.setattr(run, "warm_start_model", lambda task, assets, kind, k, log=None: None)
    monkeypatch.setattr(lean, "load_task", lambda *a, **k: None)
    study.ws(0), study.ws(1)
    common = ["--assets", str(study.assets), "--docs", str(study.docs)]
    assert cli.main(["--v4", "--out", str(study.out), *common]) == 0
    first, data = study.docs.read_text(), study.docs.parent / "study_v4_data"
    kept = tmp_path / "kept_data"
    kept.mkdir()
    for name in ("runs.csv", "steps.csv.gz"):
        (kept / name).write_bytes((data / name).read_bytes())

    def fresh_study(name, *more):
        ran.clear(), executed.clear()
        out = tmp_path / name
        code = cli.main(["--v4", "--out", str(out), "--restore", str(kept), *more, *common])
        return code, out

    code, fresh = fresh_study("fresh")  # a new machine of the same arithmetic: no run files
    assert code == 0 and ran == [] and executed == [("pilot", REGIME), ("tune", REGIME), ("eval", REGIME)]
    restored = json.loads(Run("eval", REGIME, "hmpo", 3e-4, 1, 1).path(fresh).read_text())
    assert restored["restored"]["from"] == str(kept) and len(restored["metrics"]) == T
    strip = lambda text: "\n".join(line for line in text.splitlines()  # noqa: E731
                                   if "Command:" not in line and "restored" not in line and "warm starts" not in line)
    text = study.docs.read_text()
    assert strip(text) == strip(first)
    pinned = ("* warm starts: seeds [0, 1], those of the restored data's runs (accepted where they were made), for the "
              "models ['dense']\n")
    assert pinned in text
    ws1 = run.warm_start_dir("fibonacci", str(study.assets), "dense", 1) / "warm_start.json"
    ws1.write_text(json.dumps({"greedy_accuracy": 0.5}))  # the rule would now reject it: the resume keeps it
    assert cli.main(["--v4", "--report-only", "--out", str(fresh), *common]) == 0
    assert pinned.replace("\n", "; the dense model's fits here, 0: 1.00, 1: 0.50") in study.docs.read_text()
    ws1.write_text(json.dumps({"greedy_accuracy": 1.0}))
    assert (f"* 38 run records restored from the committed data ({kept}; `--restore`, on a new machine) rather than "
            f"run again; 38 of them (pilot {REGIME}; tune {REGIME}; eval {REGIME}) once 3 of the data's runs ran here "
            "and gave its summary at its 6 significant digits\n") in text
    printed = capsys.readouterr().out
    assert re.findall(r"--restore: (\d+) records of the (\w+) ", printed) == [("2", "pilot"), ("24", "tune"),
                                                                            ("12", "eval")]

    here = tmp_path / "assets_here"  # this machine fits warm start 1 worse: the data's warm starts kept, not run
    for k, greedy in ((0, 1.0), (1, 0.9)):
        root = run.warm_start_dir("fibonacci", str(here), "dense", k)
        root.mkdir(parents=True)
        (root / "warm_start.json").write_text(json.dumps({"greedy_accuracy": greedy}))
        (root / "READY").write_text("ok\n")
    ran.clear()
    assert cli.main(["--v4", "--out", str(tmp_path / "unfit"), "--restore", str(kept), "--assets", str(here),
                     "--docs", str(study.docs)]) == 1
    text = study.docs.read_text()
    assert ran == [] and ("the dense model's fits here, 0: 1.00, 1: 0.90, are below 0.95 (this machine's arithmetic "
                          "fits the same recipe and seeds differently), so its regimes do not run here" in text)
    assert "* not run on this machine (its model's fits of the warm starts are below the plan's threshold here): " \
           f"{REGIME}\n" in text

    import pandas as pd
    rows = pd.read_csv(kept / "runs.csv")
    rows.loc[rows.phase == "tune", "final_train"] += 0.001  # another commit's tuning numbers
    rows.to_csv(kept / "runs.csv", index=False)
    with pytest.raises(SystemExit, match=r"--restore .*kept_data: runs/tune/async_4/vanilla/lr0.0001/seed1001.json ran "
                                         r"here with final_train '0\.5\d+', the data holds '0\.5\d+': the data is not"):
        fresh_study("drift")
    assert not (tmp_path / "drift" / "runs" / "tune").exists()  # the pilot's records, checked; none of the tuning's

    shift["value"] = 0.01  # another machine: the data's runs do not reproduce here
    (kept / "runs.csv").write_bytes((data / "runs.csv").read_bytes())
    eval_rows = pd.read_csv(kept / "runs.csv")
    eval_rows[~((eval_rows.phase == "eval") & (eval_rows.seed == 3))].to_csv(kept / "runs.csv", index=False)
    with pytest.raises(SystemExit, match=r"runs/pilot/async_4/vanilla/lr0.0003/seed1001.json ran here with .*"
                                         r"add --restore-as-recorded"):
        fresh_study("elsewhere")
    code, elsewhere = fresh_study("elsewhere_as_recorded", "--restore-as-recorded")
    assert code == 0 and executed == [("pilot", REGIME)]  # checked once; the evaluation (data: 8 of 12) ran here whole
    assert re.search("2 warm starts \\(seed: greedy accuracy of each model's fit as built on the machine that wrote "
                     "this report: 0: dense 1.00; 1: dense 1.00" + re.escape(v4.ELSEWHERE_FITS) + "\\) are crossed",
                     study.docs.read_text())
    assert sorted({r.phase for r in ran}) == ["eval"] and len(ran) == 12
    text = study.docs.read_text()
    assert ("* 26 run records restored from the committed data" in text and
            f"rather than run again; 26 of them (pilot {REGIME}; tune {REGIME}) as made elsewhere (another machine or "
            "commit): a run of the data ran here and differed (runs/pilot/async_4/vanilla/lr0.0003/seed1001.json ran "
            f"here with auc_heldout" in text and
            f"; run here instead, the data holding part of them or this machine some: eval {REGIME}. Each stage's runs "
            "come from one machine" in text)

    steps = pd.read_csv(kept / "steps.csv.gz")
    steps[steps.step <= PLAN.pilot_steps - 1].to_csv(kept / "steps.csv.gz", index=False)  # a shorter pilot's data
    shift["value"] = 0.0
    with pytest.raises(SystemExit, match=r"has 19 steps, this plan runs 20: the data is from another plan"):
        fresh_study("third")


@pytest.mark.parametrize("argv, message", [
    (["--restore", "d"], "--restore without --v4 is invalid"),
    (["--v4", "--report-only", "--restore", "d"], "--v4 --restore with --report-only is invalid"),
    (["--v4", "--preregister", "--restore", "d"], "--v4 --preregister with --restore is invalid"),
    (["--v4", "--restore-as-recorded"], "--v4 --restore-as-recorded without --restore is invalid"),
    (["--restore-as-recorded"], "--restore without --v4 is invalid"),
    (["--v4", "--restore", ""], "--v4 --restore '' is invalid"),
])
def test_restore_is_refused_where_it_would_be_ignored_or_could_not_check(argv, message, capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(argv)
    assert message in capsys.readouterr().err


def test_a_restore_of_data_with_other_warm_starts_than_those_pinned_stops_loud(tmp_path):
    (tmp_path / run.PINNED_WARM_STARTS).write_text(json.dumps({"seeds": [7, 8, 10], "from": "docs/study_data"}))
    other = run.Committed(tmp_path / "data", {run.committed_key("tune", REGIME, "hmpo", 1e-4, 3, 1001): {}}, {})
    with pytest.raises(SystemExit, match=r"its runs' warm starts \[3\] are not those the runs in .* were restored "
                                         r"with, \[7, 8, 10\]"):
        v4.pinned_seeds(tmp_path, other)
    assert v4.pinned_seeds(tmp_path, None) == [7, 8, 10]  # a resume without --restore keeps them
    assert v4.pinned_seeds(tmp_path / "new", None) == []  # never restored: the acceptance rule


def test_restore_as_recorded_never_mixes_a_stage_and_checks_each_data_by_its_content(tmp_path, monkeypatch):
    """Off the tested path of --restore: a stage one of whose runs was made here is not restored as made elsewhere
    (it runs here whole); other data at the same path is checked again; a stopped restore pins no warm starts; the
    data's run length binds its tuning runs, and a pilot or evaluation run without steps stops loud."""
    import pandas as pd

    base = lean.LoopSettings(max_response_length=lean.recipe_max_response_length("fibonacci"), eval_prompts=8)
    stage = [Run("eval", REGIME, m, 3e-4, s, 7) for m in ("vanilla", "hmpo") for s in (1, 2)]
    data, out = tmp_path / "data", tmp_path / "out"

    def write_data(value, steps=T):
        data.mkdir(exist_ok=True)
        rows = [{"phase": r.phase, "regime": r.regime, "method": r.method, "lr": r.lr, "seed": r.seed,
                 "warm_start": r.warm_start, "final_heldout": value, "wall_s": 1.0, "cpu_s": 1.0} for r in stage]
        pd.DataFrame(rows).to_csv(data / "runs.csv", index=False)
        pd.DataFrame([{**{k: v for k, v in row.items() if k in ("phase", "regime", "method", "lr", "seed",
                                                                 "warm_start")}, "step": i, "eval_heldout": value}
                      for row in rows for i in range(steps + 1)]).to_csv(data / "steps.csv.gz", index=False)
        return run.load_committed(data)

    def fake_execute(r, task, assets, steps, base_, folder, queue, moe):  # this machine's run: final_heldout 0.5
        path = r.path(Path(folder))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"run": asdict(r), "restored": {"summary": {"final_heldout": 0.5}}}))

    monkeypatch.setattr(run, "execute", fake_execute)
    restore = lambda committed, runs=stage, steps=T: run.restore(runs, committed, "fibonacci", None, steps,  # noqa: E731
                                                                  base, out, as_recorded=True, log=lambda *a: None)
    elsewhere = write_data(0.6)
    with pytest.raises(SystemExit, match="add --restore-as-recorded"):
        run.restore(stage, elsewhere, "fibonacci", None, T, base, out, log=lambda *a: None)
    assert not (out / run.PINNED_WARM_STARTS).exists()  # the stop pins nothing: a resume uses the rule
    fake_execute(stage[0], None, None, T, base, out, None, False)  # one run of the stage made here
    assert restore(elsewhere) == 0 and not (out / run.PINNED_WARM_STARTS).exists()
    assert json.loads((out / run.RESTORED).read_text().splitlines()[-1])["written"] == 0
    assert run.restored_line(out) is None

    stage[0].path(out).unlink()  # none made here: restored whole, as made elsewhere; the warm starts pinned
    assert restore(elsewhere) == 4 and json.loads((out / run.PINNED_WARM_STARTS).read_text())["seeds"] == [7]

    out2 = tmp_path / "out2"  # same path, other content: this machine's data, checked again (and reproducing)
    here = write_data(0.5)
    with pytest.raises(SystemExit, match="has 10 steps, this plan runs 12"):
        run.restore(stage, here, "fibonacci", None, T + 2, base, out2, log=lambda *a: None)
    tuning = [Run("tune", REGIME, "hmpo", 3e-4, 1001, 7)]
    rows = pd.read_csv(data / "runs.csv")
    tune_row = {**rows.iloc[0].to_dict(), "phase": "tune", "method": "hmpo", "seed": 1001}
    pd.concat([rows, pd.DataFrame([tune_row])]).to_csv(data / "runs.csv", index=False)
    with pytest.raises(SystemExit, match=r"tune/async_4/hmpo/lr0.0003/ws7_seed1001.json has 10 steps, this plan runs 12"):
        run.restore(tuning, run.load_committed(data), "fibonacci", None, T + 2, base, out2, log=lambda *a: None)
    steps = pd.read_csv(data / "steps.csv.gz")
    steps[steps.seed != 2].to_csv(data / "steps.csv.gz", index=False)
    with pytest.raises(SystemExit, match=r"has a row in runs.csv and no steps in steps.csv.gz"):
        run.restore(stage, run.load_committed(data), "fibonacci", None, T, base, out2, log=lambda *a: None)
    assert not any(r.path(out2).exists() for r in stage)  # none of the stage's records written before the stop


def test_readme_is_written_once_every_regime_this_machine_runs_is_evaluated_with_one_it_does_not(
        study, monkeypatch, tmp_path):
    """Two regimes, the second on a model whose pinned warm starts fit below plan_v4.WARM_START_MIN_GREEDY here
    (as moe32_top1 on this project's machine): --readme waits for the first regime only, then writes v4's blocks;
    the report names the other as not run on this machine."""
    from hmpo_verl.lab.study import report

    other = "moe_replay"  # the moe model; REGIME's is the dense one
    assert lean.REGIMES_BY_NAME[other].model != lean.REGIMES_BY_NAME[REGIME].model
    both = v4.V4Plan(regimes=(REGIME, other), methods=PLAN.methods, warm_starts=2, tuning_seeds=SEEDS,
                     pairs={REGIME: 6, other: 6}, pilot_steps=20, eval_prompts=8,
                     grids={(r, m): GRID for r in (REGIME, other) for m in PLAN.methods})
    monkeypatch.setattr(v4, "default_v4", lambda: both)
    readme = tmp_path / "README.md"
    readme.write_text("\n".join(["intro", report.GUIDE_START, "v3 guide", report.GUIDE_END,
                                 report.SCOPE_START, "v3 scope", report.SCOPE_END, "end"]) + "\n")
    monkeypatch.setattr(run, "REPO_ROOT", tmp_path)
    study.docs = tmp_path / "docs" / "study.md"
    argv = ["--v4", "--report-only", "--readme", "--out", str(study.out), "--assets", str(study.assets),
            "--docs", str(study.docs)]
    (study.out / run.PINNED_WARM_STARTS).write_text(json.dumps({"seeds": [0, 1]}))  # a restored study's
    for k in (0, 1):
        study.ws(k)
        root = run.warm_start_dir("fibonacci", str(study.assets), "moe", k)
        root.mkdir(parents=True)
        (root / "warm_start.json").write_text(json.dumps({"greedy_accuracy": 0.92}))
        (root / "READY").write_text("ok\n")
    for r in (REGIME, other):
        for s in SEEDS:
            study.record(Run("pilot", r, "vanilla", v4.v3_vanilla_lr(r), s), PLAN.pilot_steps)
    study.tuning({"vanilla": 3e-4, "hmpo": 3e-4})
    evaluation = [Run("eval", REGIME, m, 3e-4, s, w) for m in PLAN.methods for s in (1, 2, 3) for w in (0, 1)]
    for r in evaluation[:-1]:
        study.record(r, T, heldout=0.5 + 0.01 * r.seed - 0.02 * (r.method == "hmpo"))
    with pytest.raises(SystemExit, match="v4 has evaluated 0 of the 1 regimes this machine runs"):
        cli.main(argv)  # one run of the regime this machine runs is missing
    study.record(evaluation[-1], T, heldout=0.51)
    assert cli.main(argv) == 0
    text, docs = readme.read_text(), study.docs.read_text()
    guide = text.split(report.GUIDE_START + "\n")[1].split("\n" + report.GUIDE_END)[0].splitlines()
    assert "v3 guide" not in text and "v3 scope" not in text
    assert all(line in docs for line in guide[1:])
    assert f"are {other}'s, not run on this machine" in docs
    assert guide[0].startswith(f"* From study v4 ([`docs/study.md`](docs/study.md)): regimes evaluated 1 of 2 "
                               f"(`{REGIME}`); `{other}` not run on this machine (its model's warm starts fit below "
                               "the plan's threshold here: see the report's scope); 10-step runs")
