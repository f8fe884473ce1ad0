"""The main job's exact test reward (``hmpo_verl.lab.exact_reward``), its summary and plot, and the seed sweep's
arithmetic (``hmpo_verl.lab.demo_sweep``). Fast: no trainer runs here (``test_demo_learns_on_cpu.py`` runs one)."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
from cpu_assets import task_assets

from hmpo_verl.lab import cpu_demo, demo_sweep, exact_reward, lean
from hmpo_verl.lab.tasks import get_task

EXACT = "val-core/fib_mod10/reward/exact_mean"
SAMPLED = "val-core/fib_mod10/acc/mean@4"


def _records(exact: dict[int, float]) -> list[dict]:
    records = [{"step": 0, "data": {SAMPLED: 0.3, EXACT: exact[0]}}]
    for step in range(1, max(exact) + 1):
        data = {cpu_demo.REWARD: 0.3, cpu_demo.CLIPFRAC: 0.01, cpu_demo.ESS: 0.99, cpu_demo.GAP: 0.01,
                cpu_demo.STEP_TIME: 2.0}
        if step in exact:
            data.update({SAMPLED: 0.4, EXACT: exact[step]})
        records.append({"step": step, "data": data})
    return records


def test_the_exact_reward_is_named_as_verl_names_validation_metrics():
    assert exact_reward.exact_key("fib_mod10") == EXACT
    assert cpu_demo.val_key({EXACT: 1.0}) is None  # not mistaken for verl's sampled accuracy
    assert cpu_demo._exact_key(_records({0: 0.3, 2: 0.4})) == EXACT


def test_both_main_job_recipes_are_reproducible_by_default():
    for name in ("fibonacci", "addition"):
        from hydra import compose, initialize_config_dir

        task = get_task(name)
        with initialize_config_dir(config_dir=str(task.recipe_dir), version_base=None):
            config = compose(config_name=task.recipe_name)
        assert config.actor_rollout_ref.rollout.full_determinism is True
        assert isinstance(config.data.seed, int) and isinstance(config.actor_rollout_ref.rollout.seed, int)


def test_the_sync_trainer_saves_hf_weights_at_validation_steps_and_user_overrides_win():
    overrides = cpu_demo.demo_overrides("sync", ["trainer.save_freq=1"])
    assert overrides[0] == "trainer.save_freq=${trainer.test_freq}" and overrides[-1] == "trainer.save_freq=1"
    assert "actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]" in overrides
    assert "actor_rollout_ref.actor.checkpoint.load_contents=[model,optimizer,extra]" in overrides  # resume as before
    assert cpu_demo.demo_overrides("one_step_off", ["x=1"]) == ["x=1"]


def test_exact_rewards_scores_the_initial_model_and_saved_weights_and_names_what_is_missing(tmp_path):
    paths = task_assets("fibonacci")
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(paths.model, exact_reward.saved_weights(checkpoints, 2))
    (exact_reward.saved_weights(checkpoints, 2) / "config.json").touch()  # written by this run
    stale = exact_reward.saved_weights(checkpoints, 4)
    shutil.copytree(paths.model, stale)
    old = time.time() - 3600
    os.utime(stale / "config.json", (old, old))
    key, values, notes = exact_reward.exact_rewards("fibonacci", paths.root, checkpoints, [0, 2, 3, 4],
                                                    saved_since=time.time() - 60)
    task = lean.load_task("fibonacci", assets_dir=paths.root, log=None)
    expected = lean.expected_reward(lean.load_model(str(paths.model)), task, task.test)
    assert key == EXACT
    assert values == {0: expected, 2: expected}  # step 2's weights are a copy of the initial model
    assert 0.2 < expected < 0.5  # the warm start leaves headroom (README: ~30 %)
    assert [n.split(":")[0] for n in notes] == ["step 3", "step 4"]
    assert "no saved HF weights" in notes[0] and "older than this run" in notes[1]


def test_a_resumed_run_scores_the_checkpoint_it_resumed_from(tmp_path):
    paths = task_assets("fibonacci")
    resumed_from = exact_reward.saved_weights(tmp_path, 2)
    shutil.copytree(paths.model, resumed_from)
    old = time.time() - 3600
    os.utime(resumed_from / "config.json", (old, old))
    _, values, notes = exact_reward.exact_rewards("fibonacci", paths.root, tmp_path, [2], saved_since=time.time(),
                                                  resumed_from=2)
    assert list(values) == [2] and notes == []


def test_the_summary_reports_the_exact_rise_and_keeps_timings_apart(tmp_path):
    records = _records({0: 0.30, 10: 0.42, 20: 0.51})
    summary = cpu_demo.summarize(records)
    assert summary["exact_reward_by_step"] == {0: 0.30, 10: 0.42, 20: 0.51}
    lines = []
    cpu_demo.print_summary(summary, {"total_s": 99.0, "until_first_step_s": 50.0}, tmp_path / "x.png", log=lines.append)
    text = "\n".join(lines)
    assert "test-set reward (exact)    0.300  ->  0.510   (step 0 -> 20: +0.210)" in text
    curve, timing = text.split("=== time and files")
    assert "wall time" not in curve and "seconds per step" not in curve and "x.png" not in curve
    assert "wall time" in timing


def test_the_demo_says_why_there_is_no_exact_reward_without_validation(tmp_path):
    lines = []
    records = [{"step": 1, "data": {cpu_demo.REWARD: 0.3}}]
    out = cpu_demo.log_exact_rewards(get_task("fibonacci"), None, tmp_path, records, 0.0, log=lines.append)
    assert out == records and "no validation steps" in lines[0] and "trainer.test_freq" in lines[0]


def test_the_plot_shows_the_exact_reward_and_its_y_labels_do_not_overlap(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to measure it
    cpu_demo.plot(_records({0: 0.30, 10: 0.42, 20: 0.51}), tmp_path / "curve.png", "title")
    (fig,) = figures
    renderer = fig.canvas.get_renderer()
    labels = [ax.yaxis.label.get_window_extent(renderer) for ax in fig.axes]
    panels = [ax.get_window_extent(renderer) for ax in fig.axes]
    for i, (label, panel) in enumerate(zip(labels, panels)):
        assert panel.y0 <= label.y0 and label.y1 <= panel.y1, f"panel {i}'s y-label runs past its panel"
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == [cpu_demo.REWARD, SAMPLED, EXACT]
    assert (tmp_path / "curve.png").stat().st_size > 0


def test_the_sweep_passes_each_seed_and_the_demo_arguments():
    cmd = demo_sweep.demo_command(3, "run", ["--steps", "5", "--", "trainer.test_freq=5"])
    assert cmd[cmd.index("--run-dir"):] == ["--run-dir", "run", "--steps", "5", "--", "data.seed=3",
                                            "actor_rollout_ref.rollout.seed=3", "trainer.test_freq=5"]
    assert demo_sweep.seed_list("1-3") == [1, 2, 3] and demo_sweep.seed_list("4,9") == [4, 9]
    with pytest.raises(ValueError, match="--seeds"):
        demo_sweep.seed_list("a-b")


def test_the_sweep_statistics_by_hand():
    rows = [*demo_sweep.rows_of(1, {"exact_reward_by_step": {"0": 0.3, "10": 0.5}, "total_s": 100}),
            *demo_sweep.rows_of(2, {"exact_reward_by_step": {"0": 0.3, "10": 0.2}, "total_s": 120})]
    (zero, ten) = demo_sweep.step_stats(rows)
    assert zero["mean"] == 0 and zero["rose"] == 0
    assert ten["mean"] == pytest.approx(0.05) and ten["min"] == pytest.approx(-0.1) and ten["max"] == pytest.approx(0.2)
    assert ten["sd"] == pytest.approx(0.15 * 2 ** 0.5) and ten["rose"] == 1 and ten["reward_mean"] == pytest.approx(0.35)


def test_the_summary_read_back_from_json_orders_steps_as_numbers(tmp_path):
    """summary.json turns the steps into strings ("40" < "5"): the rise is still step 0 -> the last step."""
    summary = json.loads(json.dumps(cpu_demo.summarize(_records({0: 0.30, 5: 0.28, 10: 0.42, 40: 0.61}))))
    lines = []
    cpu_demo.print_summary(summary, {"total_s": 99.0}, tmp_path / "x.png", log=lines.append)
    text = "\n".join(lines)
    assert "test-set reward (exact)    0.300  ->  0.610   (step 0 -> 40: +0.310)" in text
    assert "by validation step       0: 0.300, 5: 0.280, 10: 0.420, 40: 0.610" in text


def test_the_sweeps_summary_names_the_cpu_model_its_figures_came_from():
    """Another CPU model fits another initial model (README): a generated summary says which one it ran on."""
    from hmpo_verl.lab.study import report

    rows = [{"seed": 1, "step": s, "exact_reward": 0.33 + s / 100, "rise": s / 100, "total_s": 10.0,
             "load_at_start": 0.1} for s in (0, 5)]
    text = demo_sweep.summary_markdown("python -m hmpo_verl.lab.demo_sweep", rows, "now")
    assert f", cpu {report.cpu_model()}: another CPU model fits another initial model" in text
    assert report.cpu_model() and report.cpu_model() != "unknown"
