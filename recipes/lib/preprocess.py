"""verl's GSM8K and MATH preprocessing, for when no verl checkout is at hand (no `git clone` needed).

    python3 recipes/lib/preprocess.py gsm8k --local_save_dir ~/data/gsm8k [--local_dataset_path DIR]
    python3 recipes/lib/preprocess.py math  --local_save_dir ~/data/math  [--local_dataset_path DIR]

The same command line and the same output as verl's examples/data_preprocess/gsm8k.py and
math_dataset.py (v0.9.0; those scripts live in verl's repository, not in its pip package): the
dataset is read with `datasets.load_dataset` -- from the hub (openai/gsm8k, config "main";
DigitalLearningGmbH/MATH-lighteval) or from --local_dataset_path, a local copy in the hub
repository's layout -- and each split is mapped to verl's RL rows:

    data_source    the hub id (selects verl's reward: gsm8k.py for GSM8K, math_reward.py for MATH)
    prompt         one user message: the question + " " + verl's instruction (INSTRUCTIONS below)
    ability        "math"
    reward_model   {"style": "rule", "ground_truth": the answer verl extracts from the solution}
    extra_info     {"split", "index"} (+ GSM8K's raw "answer" and "question")

The question and solution columns are consumed (popped, as verl's scripts do, so `datasets.map`
drops them); MATH's other columns (`level`, `type`) stay, which recipes/math/prepare_extra.py's
level filter reads. recipes/lib/prepare.sh runs verl's own script instead when VERL_REPO names a
verl checkout; tests/test_recipes_cpu_size.py checks the two agree row for row where one is given.
"""

from __future__ import annotations

import argparse
import os
import re

HUB_IDS = {"gsm8k": "openai/gsm8k", "math": "DigitalLearningGmbH/MATH-lighteval"}
CONFIGS = {"gsm8k": "main", "math": None}
INSTRUCTIONS = {
    "gsm8k": 'Let\'s think step by step and output the final answer after "####".',
    "math": "Let's think step by step and output the final answer within \\boxed{}.",
}
_GSM8K_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")


def gsm8k_answer(solution: str) -> str:
    """The number after the first ``#### `` in the solution, commas removed (verl's rule)."""
    match = _GSM8K_ANSWER.search(solution)
    if match is None:
        raise ValueError(f"a GSM8K answer without '#### <number>': {solution[-80:]!r}")
    return match.group(1).replace(",", "")


def math_answer(solution: str) -> str:
    """The content of the solution's last \\boxed{} (verl's own math_reward helpers)."""
    from verl.utils.reward_score.math_reward import last_boxed_only_string, remove_boxed

    return remove_boxed(last_boxed_only_string(solution))


# task -> (question column, solution column, answer extractor, keep the raw question and solution in extra_info)
FIELDS = {"gsm8k": ("question", "answer", gsm8k_answer, True), "math": ("problem", "solution", math_answer, False)}


def row_mapper(task: str, split: str):
    """``fn(example, idx) -> row`` for ``datasets.Dataset.map(..., with_indices=True)``."""
    question_key, solution_key, extract, keep_raw = FIELDS[task]

    def row(example: dict, idx: int) -> dict:
        question, solution = example.pop(question_key), example.pop(solution_key)
        extra = {"answer": solution, "question": question} if keep_raw else {}
        return {
            "data_source": HUB_IDS[task],
            "prompt": [{"role": "user", "content": question + " " + INSTRUCTIONS[task]}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": extract(solution)},
            "extra_info": {"split": split, "index": idx, **extra},
        }

    return row


def preprocess(task: str, local_save_dir: str, local_dataset_path: str | None = None) -> dict[str, int]:
    """Write ``<local_save_dir>/{train,test}.parquet``; return the row count of each split."""
    import datasets

    args = [local_dataset_path or HUB_IDS[task]] + ([CONFIGS[task]] if CONFIGS[task] else [])
    dataset = datasets.load_dataset(*args)
    out = os.path.expanduser(local_save_dir)
    os.makedirs(out, exist_ok=True)
    counts = {}
    for split in ("train", "test"):
        rows = dataset[split].map(function=row_mapper(task, split), with_indices=True)
        rows.to_parquet(os.path.join(out, f"{split}.parquet"))
        counts[split] = len(rows)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=sorted(HUB_IDS))
    parser.add_argument("--local_save_dir", required=True)
    parser.add_argument("--local_dataset_path", default=None,
                        help="a local copy of the hub dataset, in the hub repository's layout")
    args = parser.parse_args(argv)
    counts = preprocess(args.task, args.local_save_dir, args.local_dataset_path)
    print(f"{HUB_IDS[args.task]}: " + ", ".join(f"{n} {split} rows" for split, n in counts.items())
          + f" -> {args.local_save_dir}")


if __name__ == "__main__":
    main()
