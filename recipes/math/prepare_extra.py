"""The data steps of recipes/math/prepare_data.sh that verl's own scripts do not do.

    python3 prepare_extra.py levels <math/train.parquet> <out.parquet>   # keep MATH levels 3-5
    python3 prepare_extra.py math500 <out.parquet> [<source>]            # MATH-500 in verl's format
    python3 prepare_extra.py aime <aime-2024 (DAPO's)> <out.parquet>     # AIME 2024 in the same schema

`levels` filters the output of verl's examples/data_preprocess/math_dataset.py, which keeps
the dataset's `level` column ("Level 1" ... "Level 5"). Levels 3-5 are the question set of
Dr. GRPO's Qwen2.5-Math-7B recipe (arXiv 2503.20783).

`math500` writes HuggingFaceH4/MATH-500 rows exactly as math_dataset.py writes MATH rows (same
instruction, ground truth extracted from the solution with verl's own last_boxed_only_string /
remove_boxed), with data_source "HuggingFaceH4/MATH-500", which verl's default reward routes to
verl/utils/reward_score/math_reward.py.

`aime` rewrites DAPO's AIME-2024 parquet (as verl-recipe's dapo/prepare_dapo_data.sh downloads it)
row for row -- same data_source, prompt and ground truth, so verl's math_dapo reward scores it as
before -- into the schema of the MATH-500 file. verl reads all `data.val_files` into one dataset
with `datasets.concatenate_datasets`, which refuses files whose columns or nested keys differ in
type (e.g. `extra_info.index` an integer in one file and a string in the other); so every
validation file this script writes has exactly VAL_FEATURES, whatever the downloaded file holds
(the original `extra_info.index` is kept, as a string, in `extra_info.unique_id`).
DAPO's file holds the 30 AIME-2024 problems 32 times each (960 rows, for its avg@32 protocol); greedy
validation would spend 930 of its 960 generations on repeats, so `aime` keeps each problem once
(the first row of each prompt + answer), in file order.
"""

from __future__ import annotations

import sys

LEVELS = ("Level 3", "Level 4", "Level 5")
MATH500_SOURCE = "HuggingFaceH4/MATH-500"
# The instruction verl's examples/data_preprocess/math_dataset.py appends to every question.
INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."


def val_features():
    """The one schema of every validation file of recipes/math (verl's row format)."""
    from datasets import Features, List, Value

    return Features({
        "data_source": Value("string"),
        "prompt": List({"role": Value("string"), "content": Value("string")}),
        "ability": Value("string"),
        "reward_model": {"style": Value("string"), "ground_truth": Value("string")},
        "extra_info": {"split": Value("string"), "index": Value("int64"), "unique_id": Value("string")},
    })


def write_val(rows: list[dict], dst: str) -> int:
    """Write validation rows with exactly val_features() (a row that does not fit fails here, by key)."""
    import datasets

    datasets.Dataset.from_list(rows, features=val_features()).to_parquet(dst)
    return len(rows)


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
    return write_val([math500_row(example, i) for i, example in enumerate(data)], dst)


def aime_row(row: dict, idx: int) -> dict:
    """One row of DAPO's AIME parquet in val_features(): its prompt, data_source and answer unchanged."""
    extra = row.get("extra_info") or {}
    return {
        "data_source": str(row["data_source"]),
        "prompt": [{"role": str(m["role"]), "content": str(m["content"])} for m in row["prompt"]],
        "ability": str(row.get("ability") or "math"),
        "reward_model": {"style": str(row["reward_model"].get("style") or "rule"),
                         "ground_truth": str(row["reward_model"]["ground_truth"])},
        "extra_info": {"split": "test", "index": idx, "unique_id": str(extra.get("index", ""))},
    }


def first_of_each(rows) -> list[dict]:
    """The rows whose (prompt, ground truth) has not been seen before, in order."""
    seen, kept = set(), []
    for row in rows:
        key = (tuple((m["role"], m["content"]) for m in row["prompt"]), str(row["reward_model"]["ground_truth"]))
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept


def convert_aime(src: str, dst: str) -> int:
    import datasets

    data = datasets.Dataset.from_parquet(src)
    return write_val([aime_row(row, i) for i, row in enumerate(first_of_each(data))], dst)


def main(argv: list[str]) -> None:
    if len(argv) == 3 and argv[0] == "levels":
        print(f"{keep_levels(argv[1], argv[2])} rows at {', '.join(LEVELS)} -> {argv[2]}")
    elif len(argv) in (2, 3) and argv[0] == "math500":  # source: the hub id (default) or a local copy of it
        print(f"{write_math500(*argv[1:])} MATH-500 rows -> {argv[1]}")
    elif len(argv) == 3 and argv[0] == "aime":
        print(f"{convert_aime(argv[1], argv[2])} distinct AIME problems -> {argv[2]}")
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
