"""Reward function of the tiny addition task (see :mod:`hmpo_verl.lab.tiny_task`).

Passed to verl as ``reward.custom_reward_function.path=pkg://hmpo_verl.lab.tiny_reward``
and ``reward.custom_reward_function.name=compute_score``. verl's naive reward manager
calls it once per response with the decoded text (special tokens removed).
"""

from __future__ import annotations


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float:
    """1.0 when the response is exactly the expected sum (surrounding spaces ignored), else 0.0."""
    return 1.0 if str(solution_str).strip() == str(ground_truth).strip() else 0.0
