"""recipes/math/prepare_extra.py: the two data steps verl's own scripts do not do (offline parts).

The downloads themselves (openai/gsm8k, MATH-lighteval, MATH-500, AIME 2024) need the hub and
are not run here; what is checked is what we add on top of verl: the level filter and the
MATH-500 row format, and that verl's default reward scores those rows.
"""

from __future__ import annotations

import importlib.util

import datasets
import pytest
from verl.utils.reward_score import default_compute_score

from test_recipes_config import RECIPES

_spec = importlib.util.spec_from_file_location("prepare_extra", RECIPES / "math" / "prepare_extra.py")
prepare_extra = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prepare_extra)

# One row as verl's examples/data_preprocess/math_dataset.py writes it (the dataset's own columns,
# e.g. `level` and `type`, stay in the parquet next to the verl columns).
def _verl_math_row(i: int, level: str) -> dict:
    return {
        "data_source": "DigitalLearningGmbH/MATH-lighteval",
        "prompt": [{"role": "user", "content": f"question {i} {prepare_extra.INSTRUCTION}"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": str(i)},
        "extra_info": {"split": "train", "index": i},
        "level": level,
        "type": "Algebra",
    }


def test_keep_levels_keeps_levels_3_to_5(tmp_path):
    levels = ["Level 1", "Level 2", "Level 3", "Level 4", "Level 5", "Level ?", "Level 3"]
    src, dst = tmp_path / "train.parquet", tmp_path / "train_level3to5.parquet"
    datasets.Dataset.from_list([_verl_math_row(i, lv) for i, lv in enumerate(levels)]).to_parquet(src)
    assert prepare_extra.keep_levels(str(src), str(dst)) == 4
    kept = datasets.Dataset.from_parquet(str(dst))
    assert kept["level"] == ["Level 3", "Level 4", "Level 5", "Level 3"]
    assert kept["extra_info"][0] == {"split": "train", "index": 2}  # verl's columns untouched


def test_keep_levels_refuses_a_file_without_levels(tmp_path):
    src = tmp_path / "train.parquet"
    row = _verl_math_row(0, "Level 3")
    del row["level"]
    datasets.Dataset.from_list([row]).to_parquet(src)
    with pytest.raises(SystemExit, match="no 'level' column"):
        prepare_extra.keep_levels(str(src), str(tmp_path / "out.parquet"))


MATH500_EXAMPLE = {
    "problem": "What is $\\frac{1}{2}+\\frac{1}{3}$?",
    "solution": "We have $\\frac{1}{2}+\\frac{1}{3}=\\frac{3}{6}+\\frac{2}{6}=\\boxed{\\frac{5}{6}}$.",
    "answer": "\\frac{5}{6}",
    "subject": "Prealgebra",
    "level": 2,
    "unique_id": "test/prealgebra/1.json",
}


def test_math500_rows_have_verls_format_and_verls_reward_scores_them():
    row = prepare_extra.math500_row(MATH500_EXAMPLE, 7)
    assert set(row) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    assert row["prompt"] == [{"role": "user", "content": MATH500_EXAMPLE["problem"] + " " + prepare_extra.INSTRUCTION}]
    assert row["reward_model"] == {"style": "rule", "ground_truth": "\\frac{5}{6}"}
    # verl's default reward (what the recipes use) routes this data_source to math_reward
    score = lambda text: default_compute_score(row["data_source"], text, row["reward_model"]["ground_truth"])  # noqa: E731
    assert score("So the sum is \\boxed{\\frac{5}{6}}.") == 1.0
    assert score("So the sum is \\boxed{\\frac{1}{6}}.") == 0.0


def test_the_data_sources_the_recipes_use_have_a_verl_reward():
    cases = {
        "openai/gsm8k": ("... so the answer is #### 42", "42"),
        "DigitalLearningGmbH/MATH-lighteval": ("\\boxed{42}", "42"),
        "HuggingFaceH4/MATH-500": ("\\boxed{42}", "42"),
        "math_dapo": ("Answer: 42", "42"),  # DAPO's AIME-2024 parquet (data_source math_dapo / aime*)
        "aime2024": ("Answer: 42", "42"),
    }
    for source, (text, truth) in cases.items():
        score = default_compute_score(source, text, truth)
        score = score["score"] if isinstance(score, dict) else score
        assert score == 1.0, source


def test_aime_conversion_keeps_each_of_dapos_repeated_problems_once(tmp_path):
    """DAPO's AIME-2024 parquet repeats its 30 problems 32 times (960 rows); validation needs each once."""
    prefix = "Solve the following math problem step by step. The last line of your response should be of the form "
    def row(problem: int, copy: int) -> dict:
        return {"data_source": "math_dapo", "ability": "MATH",
                "prompt": [{"role": "user", "content": f"{prefix}Answer: $Answer ...\n\nProblem {problem}."}],
                "reward_model": {"ground_truth": str(100 + problem), "style": "rule-lighteval/MATH_v2"},
                "extra_info": {"index": f"{problem}-{copy}"}}
    src, dst = tmp_path / "aime-2024.dapo.parquet", tmp_path / "aime-2024.parquet"
    datasets.Dataset.from_list([row(p, c) for c in range(32) for p in range(30)]).to_parquet(src)
    assert prepare_extra.convert_aime(str(src), str(dst)) == 30
    out = datasets.Dataset.from_parquet(str(dst))
    assert [r["ground_truth"] for r in out["reward_model"]] == [str(100 + p) for p in range(30)]
    assert out["extra_info"][3] == {"split": "test", "index": 3, "unique_id": "3-0"}  # first copy, renumbered
