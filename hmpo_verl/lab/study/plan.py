"""The study's plan: methods, regimes, learning-rate grids, seeds, run order, and the questions
registered before the main run.

Two phases (every run is one lean-loop run, :func:`hmpo_verl.lab.lean.train`):

1. **tuning**: every method in every regime at every learning rate of its grid, on the
   tuning seeds (``TUNING_SEEDS``, never evaluation seeds); the setting chosen per
   (regime, method) is the one with the highest mean final *training-prompt* reward
   (:func:`hmpo_verl.lab.study.analysis.choose_settings`);
2. **evaluation**: every method in every regime at its chosen setting, on fresh seeds
   1..n, outcomes on the *held-out* prompts (and the training prompts, reported apart).

The control regimes (``on_policy``, where every ratio-based loss has vanilla's gradient, and
``fresh_4``, the control of ``epochs_4``) run only ``CONTROL_METHODS`` and are tuned on
vanilla alone (the others take vanilla's setting there).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hmpo_verl.lab import lean

# this plan's report and data: the study's third version, archived since v4's report (v4.py) took docs/study.md
REPORT = Path(__file__).resolve().parents[3] / "docs" / "study_v3.md"
DATA = REPORT.parent / f"{REPORT.stem}_data"

TASK = "fibonacci"
STEPS = 30
EVAL_PROMPTS = 32  # held-out prompts (the task's 32 test pairs) and as many training prompts
MARGIN = 0.03  # equivalence margin of the primary comparisons (held-out final reward)
ALPHA = 0.05

# p-family (token clip 0.2 in ratio space; p = 1 is vanilla) -- the lines of the mechanism figure
P_METHODS = {"pm_p-2": -2.0, "hmpo": -1.0, "pm_p0": 0.0, "pm_p0.5": 0.5, "vanilla": 1.0}
METHODS = (*P_METHODS, "adaptive", "apmpo", "gspo", "vanilla_rc")
DISPLAY_ORDER = ("vanilla", "pm_p0.5", "pm_p0", "hmpo", "pm_p-2", "adaptive", "apmpo", "gspo", "vanilla_rc")
OFF_POLICY_REGIMES = ("async_0", "async_1", "async_2", "async_4", "bf16", "moe_bf16", "moe_replay", "epochs_4")
CONTROL_REGIMES = ("on_policy", "fresh_4")
# where each off-policy regime's drift comes from (the colours of the mechanism figure)
MECHANISMS = {"async_0": "async staleness", "async_1": "async staleness", "async_2": "async staleness",
              "async_4": "async staleness", "bf16": "bf16 sampling", "moe_bf16": "MoE routing + bf16",
              "moe_replay": "MoE routing + bf16", "epochs_4": "PPO epochs",
              # v4's gap regimes (plan_v4.GAP_REGIME_LADDER): top-1 routing drift, no replay, no staleness
              "moe16_top1": "MoE routing + bf16", "moe32_top1": "MoE routing + bf16"}
CONTROL_METHODS = {"on_policy": ("vanilla", "hmpo"), "fresh_4": ("vanilla",)}

LR_GRID = (1e-4, 3e-4, 1e-3)
# GSPO's sequence clip (3e-4 / 4e-4, the paper's one setting) holds back most updates: its grid is one step up
LR_GRIDS = {"gspo": (3e-4, 1e-3, 3e-3)}
TUNING_SEEDS = (1001, 1002)
EVAL_SEEDS = 12


# CPU seconds per run of STEPS steps on one thread (model load, sampling, updates, both evaluations every
# step), per regime: vanilla at lr 3e-4, measured with `python -m hmpo_verl.lab.study --regimes <all>
# --methods vanilla --lr-grid 3e-4 --tuning-seeds 1 --eval-seeds 1` (outputs/study_cost) while the
# machine ran other work (load 8-15); a quiet machine takes less. The other methods cost the same
# within a few per cent (the loss is a small part of a step).
# (mean of its two runs; async_1 and async_2 as async_0/async_4, whose costs agree: the lag changes no work).
RUN_CPU_S = {"on_policy": 11.6, "fresh_4": 39.7, "async_0": 12.1, "async_1": 12.2, "async_2": 12.2, "async_4": 12.3,
             "bf16": 15.7, "moe_bf16": 22.3, "moe_replay": 22.1, "epochs_4": 17.2}


def estimate_cpu_s(runs: list["Run"], steps: int) -> float:
    """CPU seconds the runs take by ``RUN_CPU_S`` (scaled to ``steps``)."""
    return sum(RUN_CPU_S[r.regime] * steps / STEPS for r in runs)


def lr_grid(method: str) -> tuple[float, ...]:
    return LR_GRIDS.get(method, LR_GRID)


def regime_methods(regime: str) -> tuple[str, ...]:
    """The methods a regime runs: the controls' few; ``vanilla_rc`` only where the sampler's log-probs
    differ from the trainer's (stale or lower-precision sampling: verl's correction has nothing to do
    elsewhere)."""
    if regime in CONTROL_METHODS:
        return CONTROL_METHODS[regime]
    r = lean.REGIMES_BY_NAME[regime]
    has_gap = r.lag > 0 or r.sample_dtype != "fp32"
    return tuple(m for m in METHODS if m != "vanilla_rc" or has_gap)


@dataclass(frozen=True)
class Run:
    phase: str  # "tune" or "eval" (v4: also "pilot")
    regime: str
    method: str
    lr: float
    seed: int
    warm_start: int = 0  # v4: which warm start (run.warm_start_model); v3 ran warm start 0 only

    def path(self, out: Path) -> Path:
        ws = f"ws{self.warm_start}_" if self.warm_start else ""
        return out / "runs" / self.phase / self.regime / self.method / f"lr{self.lr:g}" / f"{ws}seed{self.seed}.json"

    @property
    def key(self) -> tuple[str, str]:
        return self.regime, self.method


@dataclass(frozen=True)
class Plan:
    """What one invocation runs. ``tuning_methods[regime]``: the methods tuned there."""

    regimes: tuple[str, ...]
    methods: tuple[str, ...]
    grids: dict[str, tuple[float, ...]]
    tuning_seeds: tuple[int, ...]
    eval_seeds: int
    steps: int
    eval_prompts: int

    def methods_in(self, regime: str) -> tuple[str, ...]:
        return tuple(m for m in regime_methods(regime) if m in self.methods)

    def tuned_methods(self, regime: str) -> tuple[str, ...]:
        return ("vanilla",) if regime in CONTROL_METHODS else self.methods_in(regime)

    def tuning_runs(self) -> list[Run]:
        """Every tuned method x its grid x tuning seed, seed-major (a cut-short phase leaves whole seeds)."""
        return [Run("tune", regime, method, lr, seed) for seed in self.tuning_seeds for regime in self.regimes
                for method in self.tuned_methods(regime) for lr in self.grids[method]]

    def eval_runs(self, chosen: dict[tuple[str, str], float]) -> list[Run]:
        """Every method at its chosen lr (a control's other methods at vanilla's), seeds 1..n, seed-major."""
        runs = []
        for seed in range(1, self.eval_seeds + 1):
            for regime in self.regimes:
                for method in self.methods_in(regime):
                    lr = chosen.get((regime, method), chosen.get((regime, "vanilla")))
                    if lr is not None:
                        runs.append(Run("eval", regime, method, lr, seed))
        return runs


def default_plan(regimes=None, methods=None, eval_seeds: int = EVAL_SEEDS, steps: int = STEPS,
                 grid: tuple[float, ...] | None = None, tuning_seeds: int | None = None) -> Plan:
    """The study's plan; ``grid`` (one grid for every method) and ``tuning_seeds`` (how many) override the
    defaults, for smaller runs."""
    methods = tuple(methods or METHODS)
    return Plan(regimes=tuple(regimes or (*CONTROL_REGIMES, *OFF_POLICY_REGIMES)), methods=methods,
                grids={m: tuple(grid) if grid else lr_grid(m) for m in set(methods) | {"vanilla"}},
                tuning_seeds=TUNING_SEEDS[:tuning_seeds] if tuning_seeds else TUNING_SEEDS,
                eval_seeds=eval_seeds, steps=steps, eval_prompts=EVAL_PROMPTS)


def quick_plan() -> Plan:
    """A smoke run of both phases (minutes): on_policy and async_2, 4 methods, 2 learning rates, 1 tuning
    and 2 evaluation seeds, 5 steps, 8 evaluation prompts. No MoE regime (its model takes minutes to build)."""
    methods = ("vanilla", "hmpo", "gspo", "apmpo")
    return Plan(regimes=("on_policy", "async_2"), methods=methods,
                grids={m: lr_grid(m)[1:] for m in methods}, tuning_seeds=TUNING_SEEDS[:1], eval_seeds=2, steps=5,
                eval_prompts=8)


# ----------------------------------------------------------------------------- pre-registered questions


@dataclass(frozen=True)
class Question:
    """A primary question. kind "paired": method ``a`` vs ``b`` in ``regimes[0]``; "pooled": ``a`` vs
    the regime's best fixed p (chosen on the tuning seeds), averaged over ``regimes`` per seed;
    "trend": Spearman's rho across ``regimes`` of the regime's measured log_ah_gap and its p-tilt."""

    id: str
    kind: str
    a: str
    b: str
    regimes: tuple[str, ...]
    text: str


def primary_questions() -> list[Question]:
    qs = [Question(f"Q1/{r}", "paired", "hmpo", "vanilla", (r,),
                   f"In `{r}`, is `hmpo` better than, worse than, or equivalent (±{MARGIN}) to `vanilla`?")
          for r in OFF_POLICY_REGIMES]
    qs += [Question(f"Q2/{r}", "paired", "hmpo", "gspo", (r,),
                    f"In `{r}`, is `hmpo` better than, worse than, or equivalent (±{MARGIN}) to `gspo`?")
           for r in OFF_POLICY_REGIMES]
    qs.append(Question("Q3", "trend", "", "", OFF_POLICY_REGIMES,
                       "Does the best p move with the regime's measured update `log_ah_gap`? Spearman's rho, across "
                       "the off-policy regimes, between the gap and the p-tilt (the least-squares slope of held-out "
                       "final reward on p over p = -2, -1, 0, 0.5, 1; negative = the harmonic side does better)."))
    qs.append(Question("Q4", "pooled", "adaptive", "best fixed p", OFF_POLICY_REGIMES,
                       "Does `adaptive` (p per trajectory by clip-aware ESS) beat, lose to, or match (±"
                       f"{MARGIN}) the best fixed p of each regime (the p-method best on the tuning seeds), averaged "
                       "over the off-policy regimes?"))
    qs.append(Question("Q5", "pooled", "apmpo", "best fixed p", OFF_POLICY_REGIMES,
                       "The same for `apmpo` (APMPO's reward-adaptive p and feedback-adaptive clip)."))
    return qs


def preregistration_text() -> str:
    """The pre-registration, as committed to v3's report (then docs/study.md, now ``REPORT``) before the main run (the report repeats it
    verbatim; a test keeps the two equal)."""
    qs = primary_questions()
    lines = [
        "## Pre-registration (committed before the main run; not changed after it)",
        "",
        "**Outcome.** Held-out final reward: the exact expected reward on the task's 32 held-out prompts (never "
        f"trained on), averaged over the last 5 of {STEPS} steps. Training-prompt rewards and AUC are reported apart "
        "and are exploratory.",
        "",
        "**Settings.** Each method at its own setting per regime: the learning rate of its grid "
        f"({', '.join(f'{m}: {g}' for m, g in sorted(LR_GRIDS.items()))}; every other method {LR_GRID}) with the "
        f"highest mean final training-prompt reward over the tuning seeds {TUNING_SEEDS}, which are never "
        f"evaluation seeds; ties go to the smaller learning rate. Clip settings stay those of each method's paper "
        "(GSPO's one setting 3e-4/4e-4; token clip 0.2 for the power means and vanilla): none of the papers gives a "
        f"range to tune over, except APMPO, whose upper clip adapts itself. Evaluation on seeds 1..{EVAL_SEEDS} "
        "(paired: seed k gives every method the same initial model, data order and sampling stream).",
        "",
        f"**Primary questions** ({len(qs)}; everything else in the report is exploratory):",
        "",
        *[f"* **{q.id}** {q.text}" for q in qs],
        "",
        "**Tests.** Paired by seed. Q1, Q2: the paired t test of the difference (two-sided) and two one-sided "
        f"tests of equivalence within ±{MARGIN} (TOST). Q4, Q5: the same on each seed's mean over the regimes of "
        "(method − best fixed p). Q3: the exact permutation p-value of Spearman's rho over the regimes (regime gap "
        "= the mean update `log_ah_gap` of the regime's evaluation runs, all methods). Holm's correction over the "
        f"primary questions only: once over their difference p-values ({len(qs)}), once over their TOST p-values "
        f"({len(qs) - 1}; Q3 has none), family-wise {ALPHA}.",
        "",
        f"**Verdicts.** *better* / *worse*: Holm-adjusted difference p < {ALPHA}, by the sign; *equivalent*: Holm-"
        f"adjusted TOST p < {ALPHA}; both: *different but within ±{MARGIN}*; neither: *undecided*. Each comparison "
        "reports its minimum detectable effect at 80 % power (two-sided, level 0.05, from its observed paired sd).",
        "",
    ]
    return "\n".join(lines)
