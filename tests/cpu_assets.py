"""Task assets for the CPU tests: the demo's own (``outputs/<task>_task``), built once and reused.

``prepare_assets`` builds them when missing (addition ~15 s, fibonacci ~30-90 s) and
rebuilds only when the spec changes. The full warm start matters for the e2e tests: a
barely trained model gets the same reward on every sample of a group, so GRPO's
advantages (and the update) are zero.
"""

from __future__ import annotations

from hmpo_verl.lab.tasks import REPO_ROOT, get_task
from hmpo_verl.lab.tasks.common import TaskPaths

__all__ = ["REPO_ROOT", "task_assets", "tiny_assets"]


def task_assets(name: str) -> TaskPaths:
    """The assets of task ``name`` in its default folder (the demo's)."""
    return get_task(name).prepare_assets(log=None)


def tiny_assets() -> TaskPaths:
    """The addition task's assets."""
    return task_assets("addition")
