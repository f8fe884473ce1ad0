"""What a GPU run reports: sampled validation, logged validation generations, and the one-GPU first run.

Composes the recipes as verl's main_ppo would (tests/test_recipes_config.py) and checks the settings that
decide how much a validation number can be trusted: MATH's validation (MATH-500 and AIME 2024) samples 16
answers per problem with the validation settings of verl's DAPO recipe for Qwen2.5-Math-7B
(recipe/dapo/test_dapo_7b_math.sh), and both tasks log validation generations. The first-run command of
recipes/README.md ("First run on new hardware") is read from the README and composed on the one-GPU size.
"""

from __future__ import annotations

import re
import shlex

import pytest
from omegaconf import OmegaConf
from test_recipes_config import RECIPES, check_recipe, compose_recipe, stub_model  # noqa: F401 - a fixture

GPU_SIZES = sorted(p.stem for p in (RECIPES / "size").glob("*.yaml") if p.stem != "cpu")
# verl's recipe/dapo/test_dapo_7b_math.sh (Qwen2.5-Math-7B, MATH / AIME-2024): val_kwargs temperature 1.0,
# top_p 0.7 (val_top_p), top_k -1, do_sample True.
DAPO_VAL = {"temperature": 1.0, "top_p": 0.7, "top_k": -1, "do_sample": True}


@pytest.mark.parametrize("size", [*GPU_SIZES, "cpu"])
def test_math_validation_samples_16_answers_per_problem_with_dapos_settings(size):
    cfg = compose_recipe(RECIPES, "math", (f"size={size}",))
    val = cfg.actor_rollout_ref.rollout.val_kwargs
    assert val.n >= 16, "one greedy answer per AIME problem: +-8 points per reading"
    assert {key: val[key] for key in DAPO_VAL} == DAPO_VAL
    assert val.temperature > 0, "verl 0.9.1's agent loop samples validation with val_kwargs.temperature"


@pytest.mark.parametrize("task", ["gsm8k", "math"])
def test_validation_generations_are_logged(task):
    cfg = compose_recipe(RECIPES, task, ())
    assert cfg.trainer.log_val_generations >= 5


def _first_run_command() -> list[str]:
    """The command of recipes/README.md "First run on new hardware" (its first line starting with SIZE=)."""
    section = (RECIPES / "README.md").read_text().split("## First run on new hardware", 1)[1].split("\n## ", 1)[0]
    line = next(line for line in section.splitlines() if line.startswith("SIZE="))
    return shlex.split(line.split("#", 1)[0].replace("\\", ""))


def test_the_first_run_command_composes_on_one_gpu(stub_model):
    words = _first_run_command()
    env = dict(w.split("=", 1) for w in words if re.match(r"^[A-Z_]+=", w))
    script = next(w for w in words if w.endswith("run.sh"))
    overrides = tuple(w for w in words[words.index(script) + 1:])
    assert env["SIZE"] == "qwen2_5_0_5b"
    task = script.split("/")[-2]
    cfg, _ = check_recipe(RECIPES, task, (f"size={env['SIZE']}", *overrides), model_path=stub_model)
    assert cfg.trainer.nnodes * cfg.trainer.n_gpus_per_node == 1
    assert 1 <= cfg.trainer.total_training_steps <= 10, "a few steps"
    assert cfg.trainer.test_freq <= cfg.trainer.total_training_steps, "a validation inside the first run"
    OmegaConf.resolve(cfg)
    longest = cfg.data.max_prompt_length + cfg.data.max_response_length
    assert longest <= cfg.actor_rollout_ref.actor.ppo_max_token_len_per_gpu
