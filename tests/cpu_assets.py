"""Tiny-task assets for the CPU tests, built once under ``outputs/test_tiny_task`` and reused.

The tests need a model but not a good one, so the warm start is cut to 20 steps
(~5 s to build). ``prepare_assets`` rebuilds only when the spec changes.
"""

from __future__ import annotations

from pathlib import Path

from hmpo_verl.tiny_task import TinyTaskPaths, TinyTaskSpec, prepare_assets

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_ASSETS = REPO_ROOT / "outputs" / "test_tiny_task"
TEST_SPEC = TinyTaskSpec(warm_start_steps=20)


def tiny_assets() -> TinyTaskPaths:
    return prepare_assets(TEST_ASSETS, TEST_SPEC, log=None)
