"""HMPO in TRL on a CPU: a few PowerMeanGRPOTrainer steps on one of the lab's tasks.

    python -m hmpo_verl.lab.trl_demo                # 16 steps of HMPO (power -1) on the addition task
    python -m hmpo_verl.lab.trl_demo --power 0 --clip-level sequence --epsilon 3e-4 --epsilon-high 4e-4
    python -m hmpo_verl.lab.trl_demo --task fibonacci

Everything is local (`hmpo_verl.lab.tasks` builds the tokenizer, the warm-started
~0.1 M-parameter Qwen2 and the data; no hub). The reward is the task's own, the function
verl's recipe names (`hmpo_verl.lab.tasks.rewards`: 1 for the exact answer). Needs
`pip install hmpo-verl[trl]`; verl is not imported.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from hmpo_verl.lab import positive_int
from hmpo_verl.lab.tasks import TASKS, get_task
from hmpo_verl.lab.tasks import rewards as task_rewards
from hmpo_verl.lab.tasks.common import TaskPaths


def task_dataset(paths: TaskPaths, split: str = "train"):
    """A task's parquet as a TRL conversational dataset: `prompt` (messages), `ground_truth`, `data_source`."""
    import pandas as pd
    from datasets import Dataset

    frame = pd.read_parquet(paths.train_parquet if split == "train" else paths.test_parquet)
    return Dataset.from_dict({
        "prompt": [[{"role": m["role"], "content": m["content"]} for m in p] for p in frame["prompt"]],
        "ground_truth": [r["ground_truth"] for r in frame["reward_model"]],
        "data_source": list(frame["data_source"]),
    })


def exact_match_reward(completions, ground_truth, data_source, **kwargs) -> list[float]:
    """TRL reward function: the tasks' exact-match score of each (conversational) completion."""
    return [task_rewards.exact_match(ds, c[0]["content"], gt) for c, gt, ds in zip(completions, ground_truth, data_source)]


def build_trainer(paths: TaskPaths, output_dir: str | os.PathLike, max_steps: int = 8, reward_funcs=None,
                  max_completion_length: int = 3, **options):
    """A PowerMeanGRPOTrainer on a task's assets; `options` go to PowerMeanGRPOConfig (power, clip_level, ...)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hmpo_verl.trl import PowerMeanGRPOConfig, PowerMeanGRPOTrainer

    settings = dict(
        output_dir=str(output_dir), max_steps=max_steps, learning_rate=1e-3, per_device_train_batch_size=8,
        num_generations=4, max_completion_length=max_completion_length, temperature=1.0, logging_steps=1, save_strategy="no",
        # one generation batch serves 2 optimizer steps, so the second is off-policy (ratios != 1)
        steps_per_generation=2,
        report_to=[], use_cpu=True, bf16=False, seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )
    settings.update(options)
    args = PowerMeanGRPOConfig(**settings)
    return PowerMeanGRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(paths.model),
        reward_funcs=reward_funcs or exact_match_reward,
        args=args,
        train_dataset=task_dataset(paths),
        processing_class=AutoTokenizer.from_pretrained(paths.tokenizer),
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=positive_int, default=16)
    parser.add_argument("--batch", type=int, default=32, help="completions per optimizer step")
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt (GRPO group)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--power", type=float, default=-1.0,
                        help="p of the power mean (-1 HMPO, 0 geometric, 1 arithmetic)")
    parser.add_argument("--mean", choices=["power", "agm"], default="power")
    parser.add_argument("--clip-level", choices=["token", "sequence"], default="token")
    parser.add_argument("--epsilon", type=float, default=0.2)
    parser.add_argument("--epsilon-high", type=float, default=None)
    parser.add_argument("--task", choices=sorted(TASKS), default="addition")
    parser.add_argument("--assets", default=None, help="where the task is built (default: the demo's folder, reused)")
    parser.add_argument("--out", default="outputs/trl_demo")
    a = parser.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    paths = get_task(a.task).prepare_assets(a.assets)
    completion_tokens = {"addition": 3, "fibonacci": 48}[a.task]  # the tasks' verl recipes' max_response_length
    trainer = build_trainer(paths, a.out, a.steps, max_completion_length=completion_tokens, power=a.power, mean=a.mean, clip_level=a.clip_level,
                            epsilon=a.epsilon, epsilon_high=a.epsilon_high, per_device_train_batch_size=a.batch,
                            num_generations=a.generations, learning_rate=a.lr)
    trainer.train()
    print("step  reward  entropy  pm/seq_ratio_mean  pm/ess_frac  clip_ratio/region_mean   (reward: on generation steps)")
    for row in (row for row in trainer.state.log_history if "entropy" in row):
        reward = f"{row['reward']:.3f}" if "reward" in row else "  -  "
        print(f"{row['step']:>4}  {reward:>6}  {row['entropy']:7.3f}  {row['pm/seq_ratio_mean']:17.3f}  "
              f"{row['pm/ess_frac']:11.3f}  {row['clip_ratio/region_mean']:22.3f}")
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    print(f"log history: {Path(a.out) / 'log_history.json'}")


if __name__ == "__main__":
    main()
