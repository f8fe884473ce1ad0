"""The two data steps of recipes/math/prepare_data.sh that verl's own scripts do not do.

    python3 prepare_extra.py levels <math/train.parquet> <out.parquet>   # keep MATH levels 3-5
    python3 prepare_extra.py math500 <out.parquet>                       # MATH-500 in verl's format

`levels` filters the output of verl's examples/data_preprocess/math_dataset.py, which keeps
the dataset's `level` column ("Level 1" ... "Level 5"). Levels 3-5 are the question set of
Dr. GRPO's Qwen2.5-Math-7B recipe (arXiv 2503.20783).

`math500` writes HuggingFaceH4/MATH-500 rows exactly as math_dataset.py writes MATH rows (same
instruction, ground truth extracted from the solution with verl's own last_boxed_only_string /
remove_boxed), with data_source "HuggingFaceH4/MATH-500", which verl's default reward routes to
verl/utils/reward_score/math_reward.py.
"""

from __future__ import annotations

import sys

LEVELS = ("Level 3", "Level 4", "Level 5")
MATH500_SOURCE = "HuggingFaceH4/MATH-500"
# The instruction verl's examples/data_preprocess/math_dataset.py appends to every question.
INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."


def math500_row(example: dict, idx: int) -> dict:
    """One MATH-500 example (problem, solution, answer, subject, level, unique_id) as a verl row."""
    from verl.utils.reward_score.math_reward import last_boxed_only_string, remove_boxed

    return {
        "data_source": MATH500_SOURCE,
        "prompt": [{"role": "user", "content": example["problem"] + " " + INSTRUCTION}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": remove_boxed(last_boxed_only_string(example["solution"]))},
        "extra_info": {"split": "test", "index": idx, "unique_id": example.get("unique_id", "")},
    }


def keep_levels(src: str, dst: str, levels: tuple[str, ...] = LEVELS) -> int:
    """Copy the rows of `src` whose `level` is in `levels` to `dst`; return how many."""
    import datasets

    data = datasets.Dataset.from_parquet(src)
    if "level" not in data.column_names:
        raise SystemExit(f"{src} has no 'level' column (columns: {data.column_names}); expected the output of "
                         "verl's examples/data_preprocess/math_dataset.py")
    kept = data.filter(lambda row: row["level"] in levels)
    if len(kept) == 0:
        raise SystemExit(f"no rows of {src} have level in {levels}")
    kept.to_parquet(dst)
    return len(kept)


def write_math500(dst: str, source: str = MATH500_SOURCE) -> int:
    import datasets

    data = datasets.load_dataset(source, split="test")
    data.map(math500_row, with_indices=True, remove_columns=data.column_names).to_parquet(dst)
    return len(data)


def main(argv: list[str]) -> None:
    if len(argv) == 3 and argv[0] == "levels":
        print(f"{keep_levels(argv[1], argv[2])} rows at {', '.join(LEVELS)} -> {argv[2]}")
    elif len(argv) == 2 and argv[0] == "math500":
        print(f"{write_math500(argv[1])} MATH-500 rows -> {argv[1]}")
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
