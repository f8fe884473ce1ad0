"""The CPU lab: tasks built locally, the demo, the comparative study and the benchmarks.

Nothing here runs in production: a verl user needs only the plugin one level up
(means, surrogate, adaptive, advantages, losses, estimators, config, registry).
"""


def positive_int(text: str) -> int:
    """An argparse ``type`` for a count of steps: a whole number >= 1 (0 would still start verl's trainer and
    train nothing; TRL's ``max_steps`` <= 0 means "train by epochs")."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; allowed: a whole number >= 1")
    return value
