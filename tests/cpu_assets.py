"""Tiny-task assets for the CPU tests: the demo's own (``outputs/tiny_task``), built once and reused.

``prepare_assets`` builds them when missing (~15 s) and rebuilds only when the spec
changes. The full warm start matters for the e2e test: a barely trained model gets the
same reward on every sample of a group, so GRPO's advantages (and the update) are zero.
"""

from __future__ import annotations

from pathlib import Path

from hmpo_verl.lab.tiny_task import TinyTaskPaths, TinyTaskSpec, prepare_assets

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_ASSETS = REPO_ROOT / "outputs" / "tiny_task"
TEST_SPEC = TinyTaskSpec()


def tiny_assets() -> TinyTaskPaths:
    return prepare_assets(TEST_ASSETS, TEST_SPEC, log=None)
