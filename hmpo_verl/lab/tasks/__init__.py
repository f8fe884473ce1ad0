"""The CPU lab's tasks: small RL problems built locally, for verl's real trainer on a CPU.

    from hmpo_verl.lab.tasks import TASKS, get_task
    task = get_task("fibonacci")
    paths = task.prepare_assets()          # -> TaskPaths: .model, .train_parquet, .test_parquet
    task.recipe_dir, task.reward_path, task.reward_name

| name | answer | response tokens | why |
|---|---|---|---|
| ``addition`` | ``"3+4"`` -> ``"7"`` | 2-3 | fast smoke tests; the power means coincide |
| ``fibonacci`` | ``"37"`` -> 40 digits of x_{k+1} = x_k + x_{k-1} mod 10 | 41 | long responses: the means differ |

For verl's vLLM rollout (``cpu_demo --rollout vllm``) each task has a variant whose model vLLM's CPU
attention serves (:func:`vllm_spec`: head size 32 instead of 16; same hidden size, data and warm start),
built under ``<assets>_vllm`` by ``task.prepare_assets(rollout="vllm")``.

Each task module (:mod:`.addition`, :mod:`.fibonacci`) defines its problems and spec (``Spec``); the
shared pieces (tokenizer, model, parquet, warm start, caching) are in :mod:`.common`,
the reward functions in :mod:`.rewards`, each task's verl recipe in ``recipes/<recipe>/hmpo.yaml``.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, replace
from pathlib import Path

from hmpo_verl.lab.tasks.common import PairTaskSpec, TaskPaths

REPO_ROOT = Path(__file__).resolve().parents[3]
RECIPE_NAME = "hmpo"
REWARD_MODULE = "hmpo_verl.lab.tasks.rewards"
ROLLOUTS = ("hf", "vllm")  # verl_cpu's HF server, verl's own vLLM server (vLLM's CPU build)
# the smallest head size vLLM's CPU attention takes (vllm/v1/attention/backends/cpu_attn.py,
# CPUAttentionBackend.get_supported_head_sizes: 32, 64, 80, ... in vLLM 0.27.1); the tasks' models have 16
VLLM_HEAD_SIZE = 32


def vllm_spec(spec: PairTaskSpec) -> PairTaskSpec:
    """``spec`` with a model vLLM's CPU attention serves: heads of :data:`VLLM_HEAD_SIZE`, as many key-value heads.

    Hidden size, layers, data and warm start stay (hidden 64: 4 query heads of 16 and 2 key-value heads
    become 2 heads of 32, each with its own key-value head). With a single shared key-value head the
    Fibonacci model did not learn its rule in the warm start's 600 steps (loss 0.29, greedy accuracy 0);
    with two it did (loss 0.009, greedy accuracy 0.85).
    """
    model = spec.model
    if model.hidden_size % VLLM_HEAD_SIZE:
        raise ValueError(f"model.hidden_size={model.hidden_size} is not a multiple of vLLM's CPU head size {VLLM_HEAD_SIZE}")
    heads = model.hidden_size // VLLM_HEAD_SIZE
    return replace(spec, model=replace(model, num_heads=heads, num_kv_heads=heads))


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

    def assets_dir_for(self, rollout: str = "hf") -> Path:
        """Default asset folder for a rollout (:data:`ROLLOUTS`): :attr:`default_assets`, ``+ "_vllm"`` for vLLM."""
        if rollout not in ROLLOUTS:
            raise ValueError(f"rollout={rollout!r}; allowed: {', '.join(ROLLOUTS)}")
        return self.default_assets if rollout == "hf" else self.default_assets.with_name(f"{self.default_assets.name}_{rollout}")

    def prepare_assets(self, out_dir: str | os.PathLike | None = None, spec=None, log=print,
                       rollout: str = "hf") -> TaskPaths:
        """Build the task's assets under ``out_dir`` (default :meth:`assets_dir_for` the rollout) if missing.

        ``rollout="vllm"``: the task's spec (``spec``, default the module's ``Spec()``) with :func:`vllm_spec`'s model.
        """
        module = importlib.import_module(self.module)
        default_dir = self.assets_dir_for(rollout)
        if rollout == "vllm":
            spec = vllm_spec(spec or module.Spec())
        return module.prepare_assets(default_dir if out_dir is None else out_dir, spec, log=log)


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
