"""The CPU lab: tasks built locally, the demo, the comparative study and the benchmarks.

Nothing here runs in production: a verl user needs only the plugin one level up
(means, surrogate, adaptive, advantages, losses, estimators, config, registry).
"""
