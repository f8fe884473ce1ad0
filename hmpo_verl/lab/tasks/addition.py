"""The tiny addition task: ``"3+4"`` must be answered ``"7"`` (1-2 answer tokens).

The fast smoke-test task. Built by :mod:`hmpo_verl.lab.tasks.common`: a character-level
Qwen2 tokenizer, a Qwen2 model of hidden 64 and 2 layers (~78 K parameters), verl-schema
parquet (all 100 ordered pairs of digits, each ``train_repeats`` times, shuffled; a test
set of ``test_size`` distinct pairs), reward :func:`hmpo_verl.lab.tasks.rewards.exact_match`.

Warm start: 200 AdamW steps of 64 random problems with their correct answers, then the
output layer x 0.5: the model keeps its ranking of answers but becomes under-confident,
as if sampled at temperature 2. It samples the right sum 45 % of the time (greedy: 98 %;
what a build prints, ``warm_start.json``; on the AMD EPYC of 2026-12-07 39 %, greedy 76 %: the
200 steps stop short of convergence, final loss 0.18, so the CPU's rounding shows), so RL has clear room to
raise the mean reward by making the policy confident where it is right. With 1-3 response tokens a power mean of the
token ratios is nearly the same number for every p: use :mod:`.fibonacci` to see the means differ.
"""

from __future__ import annotations

import os

from hmpo_verl.lab.tasks.common import PairTaskSpec, Problem, TaskPaths, prepare_pair_task

NAME = "addition"
DATA_SOURCE = "tiny_add"
CHARACTERS = "0123456789+=? "


def problem(a: int, b: int) -> Problem:
    """``("a+b", "<sum>")``."""
    return f"{a}+{b}", str(a + b)


Spec = PairTaskSpec  # this task's settings; ``Spec()`` are its defaults


def prepare_assets(out_dir: str | os.PathLike, spec: PairTaskSpec | None = None, log=print) -> TaskPaths:
    """Build tokenizer, model (random init + warm start) and data under ``out_dir`` if missing."""
    return prepare_pair_task(NAME, out_dir, spec or PairTaskSpec(), CHARACTERS, DATA_SOURCE, problem, 3, log)
