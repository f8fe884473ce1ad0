"""The study's fourth version, registered before its data: power where the third (``plan.py``,
docs/study_v3.md) could not tell, grids that reach past v3's edge choices, a run length at vanilla's
plateau, several warm starts, and one regime that separates the gap from async staleness.

Every number the pre-registration states is computed here from v3's committed data
(``docs/study_v3_data/``): the seeds each question needs from v3's observed paired sd, the grid
edges, vanilla's slope at v3's last step. ``preregistration_text`` is what docs/study_v4_plan.md
holds (a test keeps the two equal); it changes only before v4's first run.
"""

from __future__ import annotations

import math
from pathlib import Path

from hmpo_verl.lab import stats
from hmpo_verl.lab.study import plan

V3_DATA = plan.DATA  # v3's committed data (docs/study_data/ when this was registered; archived since)

REGIMES = plan.OFF_POLICY_REGIMES + ("moe16_top1",)
METHODS = (*plan.P_METHODS, "gspo")  # Q1-Q3 and Q6 need the p-family and gspo only
WARM_STARTS = 3  # warm starts: the same supervised fit, prompts and held-out split, on accepted seeds
# a warm-start seed is accepted when its fit reaches this greedy accuracy on all 100 prompts (v3's seed 0: 1.00)
# for every model kind v4 uses; seeds are tried in order 0, 1, 2, ... until WARM_STARTS are accepted
WARM_START_MIN_GREEDY = 0.95
TUNING_SEEDS = plan.TUNING_SEEDS  # crossed with every warm start; the score averages the 2 x 3 runs
MDE_TARGET = plan.MARGIN  # every primary's MDE at 80 % power, level 0.05, from v3's paired sd
# the grid ladder (half-decades) and the edge rule's limits: a choice at a grid's edge adds the next point
LR_LADDER = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
GRIDS = {"default": (1e-4, 3e-4, 1e-3), "gspo": (3e-5, 1e-4, 3e-4, 1e-3), "bf16": (1e-4, 3e-4, 1e-3, 3e-3)}
# run length: the pilot (vanilla, tuning seeds, warm start 0, v3's tuned lr) runs PILOT_STEPS; the
# run length is the first multiple of 10 where its mean held-out reward's least-squares slope over the
# last 10 steps is below PLATEAU_SLOPE per step in every regime (PILOT_STEPS if never)
PILOT_STEPS = 150
PLATEAU_SLOPE = 0.001
# the gap regime: top-1 of 16 experts, sampled in bf16, trained in fp32, bypass, no replay, 1 update per
# rollout; it enters if vanilla's own update log_ah_gap reaches GAP_REGIME_MIN in the pilot, else the
# next of GAP_REGIME_LADDER (experts, top-k) is tried; if none reaches it, Q6 is reported not asked
GAP_REGIME_MIN = 0.05
GAP_REGIME_LADDER = ((16, 1), (32, 1))


def v3_primaries(data: Path = V3_DATA) -> list[dict]:
    """v3's answered primary questions (``primaries.csv``)."""
    import pandas as pd

    return pd.read_csv(data / "primaries.csv").to_dict("records")


def seeds_for_mde(sd: float, target: float = MDE_TARGET, alpha: float = plan.ALPHA) -> int:
    """The fewest pairs n whose paired t test at level ``alpha`` has 80 % power at an effect of ``target``
    for differences of sd ``sd`` (``stats.mde_paired(sd, n) <= target``)."""
    ok = lambda n: stats.mde_paired(sd, n, alpha) <= target  # noqa: E731  (the MDE falls as n grows)
    hi = 2
    while not ok(hi):
        hi *= 2
    lo = hi // 2  # not ok (or 1): bisect (lo, hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


def undecided(primaries: list[dict]) -> list[dict]:
    """v3's primaries left *undecided*, each paired one with the pairs its MDE needs (``n_needed``)."""
    return [{**r, "n_needed": seeds_for_mde(r["sd"]) if r["kind"] == "paired" else None}
            for r in primaries if r["verdict"] == "undecided"]


def regime_pairs(primaries: list[dict]) -> dict[str, int]:
    """(warm start, seed) pairs per v4 regime: the most its undecided questions need, rounded up to a
    multiple of WARM_STARTS; the gap regime takes the most any regime takes (its sd is unknown)."""
    need: dict[str, int] = {}
    for r in undecided(primaries):
        if r["n_needed"] is not None:
            regime = r["id"].split("/")[1]
            need[regime] = max(need.get(regime, 0), r["n_needed"])
    need = {r: WARM_STARTS * math.ceil(n / WARM_STARTS) for r, n in need.items()}
    top = max(need.values())
    return {r: need.get(r, top if r == "moe16_top1" else WARM_STARTS * 4) for r in REGIMES}


def v3_grid_edges(data: Path = V3_DATA) -> dict[str, list[tuple[str, str]]]:
    """v3's tuned settings at an edge of their grid (``settings.csv``): ``{"smallest": ..., "largest": ...}``."""
    import pandas as pd

    from hmpo_verl.lab.study import analysis

    frame = pd.read_csv(data / "settings.csv")
    chosen = {(r["regime"], r["method"]): {"lr": r["lr"], "scores": {float(c[8:]): r[c] for c in frame.columns
                                                                      if c.startswith("score_lr") and r[c] == r[c]}}
              for r in frame.to_dict("records")}
    return analysis.grid_edges(chosen)


def v3_vanilla_end_slopes(data: Path = V3_DATA) -> dict[str, float]:
    """Per regime: the least-squares slope, over v3's last 10 steps, of vanilla's held-out reward (mean over
    its evaluation seeds), per step."""
    import pandas as pd

    steps = pd.read_csv(data / "steps.csv.gz", usecols=["regime", "method", "seed", "step", "eval_heldout"])
    out = {}
    for regime, g in steps[steps["method"] == "vanilla"].groupby("regime"):
        curve = g.groupby("step")["eval_heldout"].mean().sort_index().to_numpy()
        out[regime] = stats.ols_slope(list(range(10)), curve[-10:])
    return out


def grid(regime: str, method: str) -> tuple[float, ...]:
    """The starting grid of (regime, method); the edge rule may extend it (``extend``)."""
    return GRIDS["bf16"] if regime == "bf16" and method != "gspo" else GRIDS.get(method, GRIDS["default"])


def extend(grid_: tuple[float, ...], chosen_lr: float) -> tuple[float, ...] | None:
    """The edge rule: a choice at the grid's smallest or largest point adds the next ``LR_LADDER`` point
    beyond it; None when the choice is interior or the ladder ends there (then reported "at the limit")."""
    i = LR_LADDER.index(chosen_lr)
    if chosen_lr == min(grid_) and i > 0:
        return tuple(sorted((*grid_, LR_LADDER[i - 1])))
    if chosen_lr == max(grid_) and i < len(LR_LADDER) - 1:
        return tuple(sorted((*grid_, LR_LADDER[i + 1])))
    return None


def estimate_cpu_s(pairs: dict[str, int], steps: int) -> dict[str, float]:
    """CPU seconds of v4 by v3's measured cost per run (``plan.RUN_CPU_S``; the gap regime as ``moe_bf16``):
    the pilot, the tuning at the starting grids (each extension adds its runs) and the evaluation."""
    cost = {**plan.RUN_CPU_S, "moe16_top1": plan.RUN_CPU_S["moe_bf16"]}
    per_step = {r: cost[r] / plan.STEPS for r in REGIMES}
    pilot = sum(per_step[r] * PILOT_STEPS * len(TUNING_SEEDS) for r in REGIMES)
    tuning = sum(per_step[r] * steps * len(grid(r, m)) * len(TUNING_SEEDS) * WARM_STARTS
                 for r in REGIMES for m in METHODS)
    evaluation = sum(per_step[r] * steps * len(METHODS) * pairs[r] for r in REGIMES)
    return {"pilot": pilot, "tuning": tuning, "evaluation": evaluation}


# docs/study_v4_plan.md after the registered text, added once v4's report took docs/study.md: where the paths the
# registered text names have moved (the text itself is unchanged)
MOVED_NOTE = ("\n**Since registered (paths only):** v3's report and data, named above as `docs/study.md` and "
              "`docs/study_data/`, are now [`docs/study_v3.md`](study_v3.md) and `docs/study_v3_data/` (the same files); "
              "`docs/study.md` is v4's report.\n")


def preregistration_text(data: Path = V3_DATA) -> str:
    """v4's pre-registration, computed from v3's data (docs/study_v4_plan.md holds it verbatim, then
    ``MOVED_NOTE``)."""
    prim = v3_primaries(data)
    und = undecided(prim)
    pairs = regime_pairs(prim)
    edges = v3_grid_edges(data)
    slopes = v3_vanilla_end_slopes(data)
    gspo_low = sorted(r for r, m in edges["smallest"] if m == "gspo")
    bf16_high = sorted(m for r, m in edges["largest"] if r == "bf16")
    paired = [r for r in und if r["n_needed"] is not None]
    family = len(und) + 1  # the undecided primaries and Q6: Holm's first step tests at ALPHA / family
    cost = {k: v / 3600 for k, v in estimate_cpu_s(pairs, 30).items()}
    lines = [
        "# Comparative study, version 4: pre-registration",
        "",
        "Committed before any v4 run; not changed after its first. Generated by `python -m hmpo_verl.lab.study --v4 "
        "--preregister` from v3's data (`docs/study_data/`, report `docs/study.md`) by "
        "`hmpo_verl/lab/study/plan_v4.py`; every number below is computed there.",
        "",
        "## Why a fourth version",
        "",
        f"v3 left {len(und)} of its {len(prim)} primary questions *undecided*; its minimum detectable effect exceeded "
        f"the ±{plan.MARGIN} margin in most of them, so *undecided* mostly meant *could not tell*. Its tuning sat at "
        f"grid edges (`gspo` at its smallest learning rate in {len(gspo_low)} regimes: {', '.join(gspo_low)}; in "
        f"`bf16` {len(bf16_high)} methods at the largest: {', '.join(bf16_high)}), its runs were still rising at the "
        "last step (vanilla's mean held-out reward over v3's last 10 steps rose by " +
        ", ".join(f"{slopes[r]:.4f}" for r in plan.OFF_POLICY_REGIMES) +
        f" per step in {', '.join(plan.OFF_POLICY_REGIMES)}), one warm start served every seed, and no regime "
        "separated a large gap from async staleness.",
        "",
        "## Primary questions",
        "",
        f"The questions v3 left undecided, asked again with the pairs (warm start × seed) that bring each MDE to "
        f"≤ {MDE_TARGET} from v3's observed paired sd (80 % power, two-sided, level {plan.ALPHA}; "
        "`plan_v4.seeds_for_mde`):",
        "",
        f"| question | v3 estimate [95 % CI] | v3 paired sd | v3 MDE (12 seeds) | pairs for MDE ≤ {MDE_TARGET} | "
        f"the same at level {plan.ALPHA}/{family} (Holm's first step) |",
        "|---|---|---|---|---|---|",
        *[f"| {r['id']} | {r['diff']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}] | {r['sd']:.4f} | {r['mde']:.3f} | "
          f"{r['n_needed']} | {seeds_for_mde(r['sd'], alpha=plan.ALPHA / family)} |" for r in paired],
        "",
        *[f"* **{r['id']}** (v3: {r['kind']}, undecided) asked again over the v4 regimes, with each regime's gap "
          "now vanilla's own update `log_ah_gap` (what a user measures; v3 used the mean over every method's runs, "
          "which the harmonic methods inflate under lag)." for r in und if r["n_needed"] is None],
        f"* **Q6** In `moe16_top1` (below), is `hmpo` better than, worse than, or equivalent (±{plan.MARGIN}) to "
        "`vanilla`? If the regime's vanilla gap reaches v3's `async_2` and `hmpo` is not worse, v3's losses under "
        "lag come from staleness, not from the gap; if it is worse, the gap alone suffices.",
        "",
        "Pairs per regime (the most its questions need, rounded up to a multiple of the "
        f"{WARM_STARTS} warm starts; `moe16_top1`, whose sd is unknown, the most of any): " +
        ", ".join(f"`{r}` {n}" for r, n in pairs.items()) + ". These counts assume v3's sd; v4 reports its own "
        "MDE per question and, where it exceeds 0.03, the pairs that would reach it. v3's decided primaries "
        "(Q1/async_1, Q1/async_2, Q2/moe_bf16, Q2/epochs_4, Q4, Q5) are reported again as exploratory.",
        "",
        "## Design",
        "",
        f"**Warm starts.** {WARM_STARTS} warm starts: the same supervised fit (v3's settings) with another seed "
        "for the initial weights and the fit's problems, the same prompts and held-out split. Seeds are tried in "
        f"order 0 (v3's), 1, 2, ...; a seed is accepted when its fit reaches greedy accuracy ≥ {WARM_START_MIN_GREEDY} "
        "on all 100 prompts for every model v4 uses (v3's seed 0: 1.00), else it is reported and skipped (seed 1's "
        "dense fit reached 0.16, measured when the smoke run built it). The warm starts are crossed with the seeds: "
        "every seed runs on every warm start. The unit is the (warm start, seed) pair; paired t over all pairs, the "
        "warm start a fixed block; the difference per warm start is reported beside each primary, and a verdict is "
        "marked *warm-start dependent* when two warm starts' intervals exclude 0 on opposite sides.",
        "",
        f"**Methods.** {', '.join(f'`{m}`' for m in METHODS)} (the p-family for Q3, `gspo` for Q2).",
        "",
        f"**Grids and the edge rule (fixed now).** Starting grids: `gspo` {GRIDS['gspo']}; every other method in "
        f"`bf16` {GRIDS['bf16']}; else {GRIDS['default']}. Tuning: the tuning seeds {TUNING_SEEDS} on every warm "
        "start, the score the mean final training-prompt reward of those runs (ties: the smaller lr). *A choice at "
        "a grid's edge adds the next point beyond it* on the half-decade ladder "
        f"{LR_LADDER} and tunes again, until the choice is interior or the ladder ends (then reported *at the "
        "limit*).",
        "",
        f"**Run length (rule fixed now).** A pilot runs vanilla at v3's tuned lr on the tuning seeds and warm start 0 "
        f"for {PILOT_STEPS} steps in every v4 regime (`moe16_top1` at `moe_bf16`'s). The run length T is the first multiple of 10 at which the "
        f"least-squares slope of the pilot's mean held-out reward over the last 10 steps is below {PLATEAU_SLOPE} "
        f"per step in every regime ({PILOT_STEPS} if never). Tuning and evaluation run T steps.",
        "",
        "**Outcome.** Primary: held-out final reward (mean of the last 5 of T steps, the exact expected reward on the "
        "32 held-out prompts). Secondary, pre-registered for the same questions with its own Holm family: "
        "held-out AUC (mean over the T steps).",
        "",
        f"**The gap regime `moe16_top1`.** A Qwen3-MoE of v3's width with {GAP_REGIME_LADDER[0][0]} experts, top-"
        f"{GAP_REGIME_LADDER[0][1]} routing, sampled in bf16 and trained in fp32, the sampler's log-probs as the "
        "behaviour policy (bypass), no routing replay, 1 update per rollout: a gap from routing flips, with no "
        f"staleness. It enters if vanilla's own update `log_ah_gap` reaches {GAP_REGIME_MIN} in the pilot; else the "
        f"next of {GAP_REGIME_LADDER} (experts, top-k) is tried; if none reaches it, Q6 is reported *not asked* "
        "with the gaps measured.",
        "",
        "**Tests and verdicts.** As v3 (docs/study.md's pre-registration): paired t and TOST within "
        f"±{plan.MARGIN}, Holm over v4's primaries only (difference p-values and TOST p-values as two families), "
        f"the same verdict rules, the MDE of each. The family: {family} difference p-values ({len(paired)} "
        f"paired questions, Q3, Q6), {family - 1} TOST p-values. The sample sizes above give 80 % power at "
        f"{MDE_TARGET} at level {plan.ALPHA} (the MDE's definition, as v3); the last column gives the pairs for the "
        "same power at Holm's strictest step.",
        "",
        "## Budget",
        "",
        "At T = 30 (v3's length; a longer T scales the tuning and evaluation in proportion), by v3's measured cost "
        f"per run: pilot {cost['pilot']:.1f}, tuning {cost['tuning']:.1f} (before any edge extension), evaluation "
        f"{cost['evaluation']:.1f} CPU-hours. More than one session: the command resumes and prints its estimate "
        "before it starts.",
        "",
    ]
    return "\n".join(lines)
