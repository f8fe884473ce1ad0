"""Reward functions of the CPU tasks, for verl's ``reward.custom_reward_function``.

Passed to verl as ``reward.custom_reward_function.path=pkg://hmpo_verl.lab.tasks.rewards``
and ``reward.custom_reward_function.name=<function>``. verl's naive reward manager calls
the function once per response with the decoded text (special tokens removed, so the
closing ``<|im_end|>`` is gone) and the row's ``reward_model.ground_truth``. Pure Python:
the reward workers import this module and nothing heavier.
"""

from __future__ import annotations


def exact_match(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float:
    """Sequence-level reward as GSM8K's: 1.0 when the response is exactly the answer
    (surrounding whitespace ignored), else 0.0. Used by every task."""
    return 1.0 if str(solution_str).strip() == str(ground_truth).strip() else 0.0


def correct_prefix_fraction(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float:
    """Partial credit: the length of the response's correct prefix over the longer of the
    two lengths (surrounding whitespace ignored), in [0, 1].

    1.0 only for the exact answer (then it equals :func:`exact_match`); a response that is
    right for its first k characters and then wrong, short or too long scores
    k / max(len(response), len(answer)), so trailing extra characters cost as much as
    missing ones.
    """
    answer, truth = str(solution_str).strip(), str(ground_truth).strip()
    longest = max(len(answer), len(truth))
    if longest == 0:
        return 1.0
    prefix = 0
    for a, t in zip(answer, truth):
        if a != t:
            break
        prefix += 1
    return prefix / longest
