"""The CPU lab's tasks: small RL problems built locally, for verl's real trainer on a CPU.

    from hmpo_verl.lab.tasks import TASKS, get_task
    task = get_task("fibonacci")
    paths = task.prepare_assets()          # -> TaskPaths: .model, .train_parquet, .test_parquet
    task.recipe_dir, task.reward_path, task.reward_name

| name | answer | response tokens | why |
|---|---|---|---|
| ``addition`` | ``"3+4"`` -> ``"7"`` | 2-3 | fast smoke tests; the power means coincide |
| ``fibonacci`` | ``"37"`` -> 40 digits of x_{k+1} = x_k + x_{k-1} mod 10 | 41 | long responses: the means differ |

Each task module (:mod:`.addition`, :mod:`.fibonacci`) defines its problems and spec; the
shared pieces (tokenizer, model, parquet, warm start, caching) are in :mod:`.common`,
the reward functions in :mod:`.rewards`, each task's verl recipe in ``recipes/<recipe>/hmpo.yaml``.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

from hmpo_verl.lab.tasks.common import TaskPaths

REPO_ROOT = Path(__file__).resolve().parents[3]
RECIPE_NAME = "hmpo"
REWARD_MODULE = "hmpo_verl.lab.tasks.rewards"


@dataclass(frozen=True)
class Task:
    """A registered task: where its code, assets, reward and recipe are."""

    name: str
    summary: str  # one line, shown by ``cpu_demo --help``
    module: str  # defines ``prepare_assets(out_dir, spec=None, log=print) -> TaskPaths``
    assets_dir: str  # default asset folder, relative to the repo root
    recipe: str  # recipes/<recipe>/hmpo.yaml
    reward_name: str = "exact_match"  # function in hmpo_verl.lab.tasks.rewards
    demo_steps: int = 40  # training steps of ``cpu_demo --task <name>``

    @property
    def reward_path(self) -> str:
        """verl's ``reward.custom_reward_function.path``."""
        return f"pkg://{REWARD_MODULE}"

    @property
    def recipe_dir(self) -> Path:
        return REPO_ROOT / "recipes" / self.recipe

    @property
    def recipe_name(self) -> str:
        return RECIPE_NAME

    @property
    def default_assets(self) -> Path:
        return REPO_ROOT / self.assets_dir

    def prepare_assets(self, out_dir: str | os.PathLike | None = None, spec=None, log=print) -> TaskPaths:
        """Build the task's assets under ``out_dir`` (default :attr:`default_assets`) if missing."""
        module = importlib.import_module(self.module)
        return module.prepare_assets(self.default_assets if out_dir is None else out_dir, spec, log=log)


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("addition", "single-digit addition, 2-3 response tokens (fast; the power means coincide)",
             "hmpo_verl.lab.tasks.addition", "outputs/tiny_task", "cpu_tiny"),
        Task("fibonacci", "40 digits of a Fibonacci recurrence mod 10, 41 response tokens (the means differ)",
             "hmpo_verl.lab.tasks.fibonacci", "outputs/fibonacci_task", "cpu_fibonacci"),
    )
}


def get_task(name: str) -> Task:
    """The registered task ``name``; a ``ValueError`` naming the known tasks otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None
