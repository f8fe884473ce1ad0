"""The long-response task: write out a Fibonacci recurrence mod 10 (40 answer digits).

The prompt gives two seed digits ``"ab"``; the answer is the next ``terms`` (40) terms of
x_{k+1} = (x_k + x_{k-1}) mod 10 starting from x_{-1} = a, x_0 = b, as one digit string.
``"37"`` -> ``"0774156178538190998752796516730336954932"``. A response is 41 tokens
(40 digits and ``<|im_end|>``); the reward is GSM8K-like, 1 for the exact string else 0
(:func:`hmpo_verl.lab.tasks.rewards.exact_match`; a partial-credit variant,
``correct_prefix_fraction``, is there too).

Why this task:

* every answer token matters: each digit is a function of the two before it, so one
  wrong digit derails all that follow and the exact-match reward depends on all 40
  (like a chain of reasoning that one slip ruins);
* a tiny model learns it in seconds: the rule is local (attend to the previous two
  tokens, add mod 10), so a 78 K-parameter Qwen2 fits it in ~600 supervised steps.
  Running sums mod 10 of a 32-digit prompt, whose answer tokens must be aligned with
  far-away prompt positions, stayed at chance loss for 300 steps of the same model (one trial);
* its responses have the shape of RL on reasoning: most tokens near-certain, a few
  uncertain ones decide the reward. Under the study's stale, mismatched updates the
  power means of a response's token ratios differ (``actor/pm/log_ah_gap`` 0.20,
  ``actor/pm/ess_frac`` 0.90 over 16 steps of ``hmpo``; docs/tasks.md); with one
  off-policy mini-batch the near-certain tokens dilute the spread (gap 0.009);
* fixed length: the rollout costs the same every step, which a study of hundreds of
  runs needs.

Warm start: 600 AdamW steps (lr 3e-3, 32 problems each) fit the rule almost exactly, then
the output layer is scaled by 0.56, i.e. sampling at temperature ~1.8: the per-token
probability of the right digit falls to ~0.97, so a whole answer is right about 30 % of
the time (~0.97^41) and RL has room to raise it by sharpening the policy (the greedy
answer is right from the start).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial

from hmpo_verl.lab.tasks.common import ModelSpec, PairTaskSpec, Problem, TaskPaths, WarmStartSpec, prepare_pair_task

NAME = "fibonacci"
DATA_SOURCE = "fib_mod10"
CHARACTERS = "0123456789"


@dataclass(frozen=True)
class FibonacciSpec(PairTaskSpec):
    """:class:`PairTaskSpec` with this task's defaults and its number of answer digits."""

    model: ModelSpec = field(default_factory=lambda: ModelSpec(max_position_embeddings=128))
    warm_start: WarmStartSpec = field(
        default_factory=lambda: WarmStartSpec(steps=600, lr=3e-3, batch_size=32, soften_lm_head=0.56)
    )
    terms: int = 40  # answer digits; a response is terms + 1 tokens with <|im_end|>


Spec = FibonacciSpec  # this task's settings; ``Spec()`` are its defaults


def sequence(a: int, b: int, terms: int) -> str:
    """The ``terms`` digits after the seeds ``a, b`` of x_{k+1} = (x_k + x_{k-1}) mod 10."""
    if not (0 <= a <= 9 and 0 <= b <= 9) or terms < 1:
        raise ValueError(f"seeds must be digits 0-9 and terms >= 1, got a={a}, b={b}, terms={terms}")
    digits = []
    for _ in range(terms):
        a, b = b, (a + b) % 10
        digits.append(str(b))
    return "".join(digits)


def problem(a: int, b: int, terms: int = FibonacciSpec.terms) -> Problem:
    """``("ab", <the next `terms` digits>)``."""
    return f"{a}{b}", sequence(a, b, terms)


def prepare_assets(out_dir: str | os.PathLike, spec: FibonacciSpec | None = None, log=print) -> TaskPaths:
    """Build tokenizer, model (random init + warm start) and data under ``out_dir`` if missing."""
    spec = spec or FibonacciSpec()
    return prepare_pair_task(NAME, out_dir, spec, CHARACTERS, DATA_SOURCE, partial(problem, terms=spec.terms),
                             spec.terms + 1, log)
