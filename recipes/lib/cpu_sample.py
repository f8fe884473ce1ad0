"""A small local sample of the recipes' datasets, in the hub's own layouts, and a tiny model: the CPU size's inputs.

    python3 recipes/lib/cpu_sample.py --out ~/data        # writes ~/data/raw/<hub id>/... and ~/data/hmpo_cpu_model

Nothing is downloaded. The rows are made up here (deterministic; ASCII), in the exact schema of
each upstream dataset, in the file layout of its hub repository, so that the recipes' own prepare
steps read them as they read the hub (`RAW_DATA_DIR=~/data/raw bash recipes/<task>/prepare_data.sh`):

| hub id | layout here | columns | rows |
|---|---|---|---|
| openai/gsm8k | README.md (config `main`), main/{train,test}-00000-of-00001.parquet | question, answer (`... #### <n>`) | 16 / 8 |
| DigitalLearningGmbH/MATH-lighteval | README.md (config `default`), data/{train,test}-00000-of-00001.parquet | problem, level (`Level k`), type, solution (`\\boxed{}`) | 30 / 5 |
| HuggingFaceH4/MATH-500 | test.jsonl | problem, solution, answer, subject, level (int), unique_id | 6 |
| BytedTsinghua-SIA/AIME-2024 | data/aime-2024.parquet | data_source `math_dapo`, prompt (DAPO's `Answer:` form), ability, reward_model, extra_info.index (a string) | 4 problems x 32 copies, like DAPO's file |

The model is the CPU lab's tiny Qwen2 (hmpo_verl.lab.tasks.common: hidden 64, 2 layers, random
initialisation) with its character-level Qwen2 tokenizer over printable ASCII; its context holds the
longest prompt plus the CPU size's responses. Its answers are noise: verl's reward functions run on
them and score them (mostly 0), which is what the CPU size checks.
"""

from __future__ import annotations

import argparse
import json
import random
import string
from pathlib import Path

from hmpo_verl.lab.tasks.common import ModelSpec, build_model, build_tokenizer, save_pretrained

CHARACTERS = string.printable.replace("\x0b", "").replace("\x0c", "").replace("\r", "")
MODEL_SPEC = ModelSpec(max_position_embeddings=2048)
SEED = 0

GSM8K_README = """---
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train-*
  - split: test
    path: main/test-*
---
"""
MATH_README = """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: test
    path: data/test-*
---
"""
# DAPO's AIME-2024 prompt: the problem between these two (its math_dapo reward reads "Answer:").
DAPO_PREFIX = ("Solve the following math problem step by step. The last line of your response should be of the form "
               "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n")
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'
MATH_TYPES = ("Algebra", "Counting & Probability", "Geometry", "Number Theory", "Prealgebra")


def gsm8k_example(rng: random.Random) -> dict:
    """A GSM8K-style word problem with its worked answer, ending in ``#### <n>`` (commas above 999)."""
    a, bags, each = rng.randint(2, 900), rng.randint(2, 9), rng.randint(3, 150)
    bought, total = bags * each, a + bags * each
    return {
        "question": f"Ann has {a} apples. She buys {bags} bags with {each} apples in each bag. "
                    "How many apples does she have now?",
        "answer": f"She buys {bags}*{each}=<<{bags}*{each}={bought}>>{bought} apples.\n"
                  f"She has {a}+{bought}=<<{a}+{bought}={total}>>{total} apples now.\n#### {total:,}",
    }


def math_example(rng: random.Random, level: int) -> dict:
    """A MATH-lighteval-style row: problem, ``Level k``, type, solution ending in ``\\boxed{}``."""
    a, b = rng.randint(2, 30), rng.randint(2, 30)
    return {
        "problem": f"Solve for $x$: ${a}x - {a * b} = 0$.",
        "level": f"Level {level}",
        "type": MATH_TYPES[level % len(MATH_TYPES)],
        "solution": f"Adding ${a * b}$ to both sides gives ${a}x = {a * b}$, so $x = \\frac{{{a * b}}}{{{a}}} = "
                    f"\\boxed{{{b}}}$.",
    }


def math500_example(rng: random.Random, i: int) -> dict:
    a, b = rng.randint(2, 20), rng.randint(2, 20)
    return {
        "problem": f"What is $\\frac{{1}}{{{a}}} + \\frac{{1}}{{{b}}}$? Express your answer as a common fraction.",
        "solution": f"The sum is $\\frac{{{a + b}}}{{{a * b}}}$, which we write as "
                    f"$\\boxed{{\\frac{{{a + b}}}{{{a * b}}}}}$.",
        "answer": f"\\frac{{{a + b}}}{{{a * b}}}",
        "subject": "Prealgebra",
        "level": 1 + i % 5,
        "unique_id": f"test/prealgebra/{100 + i}.json",
    }


def aime_rows(rng: random.Random, problems: int, copies: int) -> list[dict]:
    """DAPO's AIME-2024 parquet rows: each problem ``copies`` times, as in its file."""
    base = []
    for i in range(problems):
        n = rng.randint(10, 99)
        base.append((f"Find the remainder when ${n}^2$ is divided by $1000$.", str(n * n % 1000), f"aime24-{i}"))
    return [{
        "data_source": "math_dapo",
        "prompt": [{"content": DAPO_PREFIX + problem + DAPO_SUFFIX, "role": "user"}],
        "ability": "MATH",
        "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": f"{uid}-{copy}"},
    } for copy in range(copies) for problem, answer, uid in base]


def _parquet(rows: list[dict], path: Path) -> None:
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows).to_parquet(str(path))


def write_raw(raw: Path, seed: int = SEED) -> list[str]:
    """Write the four datasets under ``raw/<hub id>/``; return every text a prompt is built from."""
    rng = random.Random(seed)
    gsm8k = raw / "openai" / "gsm8k"
    splits = {"train": [gsm8k_example(rng) for _ in range(16)], "test": [gsm8k_example(rng) for _ in range(8)]}
    for split, rows in splits.items():
        _parquet(rows, gsm8k / "main" / f"{split}-00000-of-00001.parquet")
    (gsm8k / "README.md").write_text(GSM8K_README)
    texts = [r[k] for rows in splits.values() for r in rows for k in ("question", "answer")]

    math = raw / "DigitalLearningGmbH" / "MATH-lighteval"
    splits = {"train": [math_example(rng, 1 + i % 5) for i in range(30)],
              "test": [math_example(rng, 1 + i % 5) for i in range(5)]}
    for split, rows in splits.items():
        _parquet(rows, math / "data" / f"{split}-00000-of-00001.parquet")
    (math / "README.md").write_text(MATH_README)
    texts += [r[k] for rows in splits.values() for r in rows for k in ("problem", "solution")]

    math500 = raw / "HuggingFaceH4" / "MATH-500"
    math500.mkdir(parents=True, exist_ok=True)
    examples = [math500_example(rng, i) for i in range(6)]
    (math500 / "test.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    texts += [e[k] for e in examples for k in ("problem", "solution")]

    aime = aime_rows(rng, problems=4, copies=32)
    _parquet(aime, raw / "BytedTsinghua-SIA" / "AIME-2024" / "data" / "aime-2024.parquet")
    texts += [m["content"] for r in aime for m in r["prompt"]]
    return texts


def write_model(path: Path, seed: int = SEED) -> None:
    """The lab's tiny Qwen2 (random init) with a character-level tokenizer over :data:`CHARACTERS`."""
    tokenizer = build_tokenizer(CHARACTERS)
    save_pretrained(build_model(MODEL_SPEC, tokenizer, seed), tokenizer, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path.home() / "data",
                        help="writes <out>/raw/<hub id>/ and <out>/hmpo_cpu_model/ (default ~/data)")
    args = parser.parse_args(argv)
    texts = write_raw(args.out / "raw")
    outside = sorted({ch for text in texts for ch in text} - set(CHARACTERS))
    if outside:
        raise SystemExit(f"characters outside the tokenizer's vocabulary: {outside}")
    write_model(args.out / "hmpo_cpu_model")
    print(f"wrote {args.out / 'raw'} (openai/gsm8k, DigitalLearningGmbH/MATH-lighteval, HuggingFaceH4/MATH-500, "
          f"BytedTsinghua-SIA/AIME-2024) and {args.out / 'hmpo_cpu_model'}")


if __name__ == "__main__":
    main()
