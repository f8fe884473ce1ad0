"""The exact expected reward of verl's actor on a task's test prompts, from the weights the trainer saved.

The main job (:mod:`hmpo_verl.lab.cpu_demo`) asks verl to save the actor's weights in Hugging Face
format at each validation step (:func:`trainer_overrides`: ``trainer.save_freq`` = ``trainer.test_freq``,
``actor.checkpoint.save_contents=[hf_model]``); after the run, :func:`exact_rewards` scores the initial
model (step 0) and each saved step with the study's teacher-forced evaluation,
:func:`hmpo_verl.lab.lean.expected_reward`: for each test prompt the probability that temperature-1
sampling writes the exact answer, averaged over the prompts -- the expected value of the sampled
test reward ``val-core/<data_source>/acc/mean@n``, without its sampling noise.

The values are logged as verl logs a validation metric (:func:`exact_key`,
``val-core/<data_source>/reward/exact_mean``) into the run's ``metrics.jsonl`` (verl's file-logger
format, one ``{"step", "data"}`` record per step), so the summary and the plot read them like
verl's own metrics.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

EXACT_INFIX = "/reward/exact_mean"  # val-core/<data_source>/reward/exact_mean, beside verl's .../acc/mean@<n>


def exact_key(data_source: str) -> str:
    """The metric name, in verl's ``val-core/<data_source>/<variable>/<statistic>`` form."""
    return f"val-core/{data_source}{EXACT_INFIX}"


def trainer_overrides() -> list[str]:
    """Hydra overrides that make verl save the actor's HF weights at every validation step (and the last),
    beside what a resume needs (verl's default contents, which it loads back)."""
    contents = "actor_rollout_ref.actor.checkpoint"
    return ["trainer.save_freq=${trainer.test_freq}", f"{contents}.save_contents=[model,optimizer,extra,hf_model]",
            f"{contents}.load_contents=[model,optimizer,extra]"]


def saved_weights(checkpoint_dir: Path, step: int) -> Path:
    """Where verl's FSDP checkpoint manager writes the HF weights of ``step``."""
    return Path(checkpoint_dir) / f"global_step_{step}" / "actor" / "huggingface"


def exact_rewards(task_name: str, assets_dir: Path, checkpoint_dir: Path, steps: list[int],
                  saved_since: float = 0.0, resumed_from: Optional[int] = None) -> tuple[str, dict[int, float], list[str]]:
    """(metric name, {step: exact expected reward on the task's test prompts}, notes) for the
    validation ``steps`` of a run: step 0 from the initial model in ``assets_dir``, each other step
    from the HF weights verl saved under ``checkpoint_dir``.

    Weights must have been written at or after ``saved_since`` (the run's start), so a folder left by
    an earlier run in the same place is never scored as this run's; but for step ``resumed_from``, the
    checkpoint a resumed run started from (read before the run: ``cpu_demo.resume_step``), older by
    design. A step without such weights gets a note saying why instead of a value.
    """
    from hmpo_verl.lab.lean import expected_reward, load_model, load_task

    task = load_task(task_name, assets_dir=assets_dir, log=lambda *a, **k: None)
    values, notes = {}, []
    for step in sorted(steps):
        path = Path(task.model_path) if step == 0 else saved_weights(checkpoint_dir, step)
        if not (path / "config.json").is_file():
            notes.append(f"step {step}: no saved HF weights in {path} (verl saves them at trainer.save_freq, with "
                         "actor_rollout_ref.actor.checkpoint.save_contents containing hf_model)")
        elif step > 0 and step != resumed_from and (path / "config.json").stat().st_mtime < saved_since:
            notes.append(f"step {step}: the weights in {path} are an earlier run's, older than this run "
                         "(trainer.save_freq other than trainer.test_freq?)")
        else:
            values[step] = expected_reward(load_model(str(path)), task, task.test)
    return exact_key(task.data_source), values, notes


def append_records(metrics_path: Path, key: str, values: dict[int, float]) -> None:
    """Append ``{step: value}`` to verl's file-logger ``metrics_path`` as ``{"step", "data": {key: value}}`` lines."""
    with open(metrics_path, "a") as f:
        for step, value in sorted(values.items()):
            f.write(json.dumps({"step": step, "data": {key: value}}) + "\n")
