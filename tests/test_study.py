"""The comparative study: its statistics on hand-made curves, and a smoke run of the real command."""

import json
import math
import subprocess
import sys

import pandas as pd
import pytest

from hmpo_verl.lab.study import METHODS_BY_NAME, REGIMES_BY_NAME, Run, mean_ci, reading, results_table, run_summary, welch_diff_ci


def test_run_summary_definitions():
    rising = [0.3, 0.35, 0.4, 0.5, 0.55, 0.6]
    s = run_summary(rising, non_finite=False, threshold=0.45, final_window=3)
    assert s["final_reward"] == pytest.approx((0.5 + 0.55 + 0.6) / 3)
    assert s["auc"] == pytest.approx(sum(rising) / 6)
    assert s["steps_to_threshold"] == 5  # moving average (0.4+0.5+0.55)/3 = 0.483 at step 5
    assert not s["collapsed"]
    rose_then_fell = [0.3, 0.4, 0.45, 0.4, 0.2, 0.1, 0.1]
    assert run_summary(rose_then_fell, False, 0.9, 3)["collapsed"]
    never_rose = [0.3, 0.31, 0.29, 0.2]  # below the start, but it never rose 0.05 above it
    assert not run_summary(never_rose, False, 0.9, 3)["collapsed"]
    assert run_summary(rising, non_finite=True, threshold=0.45, final_window=3)["collapsed"]
    assert run_summary(rising, False, 0.99, 3)["steps_to_threshold"] is None


def test_confidence_intervals():
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-6)  # t(0.975, 2) = 4.3027
    assert math.isnan(mean_ci([1.0])[1])
    diff, lo, hi = welch_diff_ci([1.0, 1.1, 0.9], [0.0, 0.1, -0.1])
    assert diff == pytest.approx(1.0) and 0 < lo < 1 < hi
    diff, lo, hi = welch_diff_ci([1.0, 2.0, 3.0], [1.5, 2.5, 2.0])
    assert lo < 0 < hi


def _summary():
    rows = []
    for method, finals in (("grpo", [0.40, 0.42, 0.41]), ("hmpo", [0.50, 0.52, 0.51]), ("agm", [0.30, 0.55, 0.45])):
        for seed, final in enumerate(finals, 1):
            rows.append(dict(regime="on_policy", method=method, seed=seed, final_reward=final, auc=final - 0.05,
                             start_reward=0.3, steps_to_threshold=None if final < 0.45 else 4, collapsed=final < 0.35))
    return pd.DataFrame(rows)


def test_table_and_generated_reading():
    summary = _summary()
    table = results_table(summary)
    assert "| on_policy | hmpo | 3 | 0.510 ± 0.025 |" in table
    assert "| on_policy | agm |" in table and "| 1/3 |" in table
    text = "\n".join(reading(summary))
    assert "excludes 0: hmpo final reward +0.100" in text
    assert "Inside the noise" in text and "agm final reward +0.023" in text
    assert "Collapsed runs: agm/seed1" in text


def test_every_method_and_regime_builds_a_valid_command(tmp_path):
    from hmpo_verl.lab.study import run_overrides

    for regime in REGIMES_BY_NAME.values():
        for method in METHODS_BY_NAME.values():
            overrides = run_overrides(Run(regime, method, 1))
            assert "data.seed=1" in overrides and any("trainer.experiment_name" in o for o in overrides)


@pytest.mark.slow
def test_smoke_run_of_the_study_command(tmp_path):
    """One method, one seed, two steps of the real command, through to the report."""
    out, docs = tmp_path / "study", tmp_path / "docs" / "study.md"
    cmd = [sys.executable, "-m", "hmpo_verl.lab.study", "--methods", "hmpo", "--regimes", "stressed", "--seeds", "1",
           "--steps", "2", "--out", str(out), "--docs", str(docs)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_result = json.loads((out / "runs" / "stressed" / "hmpo" / "seed1" / "result.json").read_text())
    assert run_result["exit_code"] == 0 and run_result["steps"] == 2
    steps = pd.read_csv(out / "steps.csv")
    assert len(steps) == 2 and steps["actor/pm/ess_frac"].notna().all()
    # the stressed regime's injected mismatch shows: ratios are not 1 on the first update
    assert (steps["actor/pm/log_ah_gap"] > 0).all()
    report = docs.read_text()
    assert "| stressed | hmpo | 1 |" in report and "![reward](study_figures/reward.png)" in report
    assert (docs.parent / "study_figures" / "reward.png").stat().st_size > 1000
    # a second invocation finds the run finished and does not train again
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0
    assert json.loads((out / "runs" / "stressed" / "hmpo" / "seed1" / "result.json").read_text()) == run_result
