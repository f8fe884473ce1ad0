"""The comparative study: when does the choice of mean matter? (plan, run, analysis, report)

    python -m hmpo_verl.lab.study --quick      # a smoke run of both phases (minutes)
    python -m hmpo_verl.lab.study              # the study: tuning, then evaluation (resumable)
    python -m hmpo_verl.lab.study --report-only --readme   # regenerate v3's docs/study_v3.md and the README guide
    python -m hmpo_verl.lab.study --v4                      # the fourth version (resumable): docs/study.md

Regimes whose drift comes from real mechanisms (async lag, bf16 sampling of a dense and of a
MoE model, with and without routing replay, PPO epochs), each method at its own learning rate
chosen on tuning seeds, evaluation on held-out prompts with fresh seeds, pre-registered primary
questions (TOST equivalence, Holm over the primaries), and the mechanism figure.

Modules: :mod:`.plan` (what runs, and the pre-registered questions), :mod:`.run` (lean-loop
runs in worker processes, the confirmation on verl's trainer), :mod:`.analysis` (outcomes,
settings, tests), :mod:`.report` (tables, figures, guide, v3's report), :mod:`.cli` (the
command); v4: :mod:`.plan_v4` (its pre-registration), :mod:`.v4` (its stages and docs/study.md).
"""
