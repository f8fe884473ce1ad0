"""Every verl internal hmpo_verl wraps or reads, in one table, checked before it is used.

verl has no plugin API beyond its loss and estimator registries; the rest of what we do in
verl's trainers (guarded checkpoint saves, the rollout log-prob check, per-sample lags, our
option checks before Ray starts) wraps functions verl may move or rename in any release.
Each row names one symbol: the module, the attribute path inside it, what we do with it,
why, and which of verl's trainers needs it. A hook on a verl module checks that module's
rows before it touches anything (`check_module`; in a Ray process a failure is logged and the
process goes on without that guard), and the driver, before Ray starts, imports the modules the
launched trainer will use and checks every row of every loaded module
(`hmpo_verl.hosts.verl.checks.check_verl_symbols`, run by `validate_config` and `run_ppo` on every
entry point): a verl whose symbol moved or vanished stops there with `UnsupportedVerlError`
naming the symbol and `SUPPORTED_VERL`, instead of a run without the guard or an AttributeError
inside a Ray worker. Add a row before wrapping anything new (`run_after_import` refuses a verl
module without one).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

SUPPORTED_VERL = ">=0.9.1,<0.10"  # pyproject.toml's verl extra (tests/test_house.py keeps them equal)

# who needs a symbol: verl's trainers as the README names them
ALL = "every trainer"
SYNC_V1 = "sync (v1 PPOTrainer: main_ppo, colocate_async)"
V0_AND_OFFPOLICY = "v0 RayPPOTrainer and the off-policy trainers built on it (one_step_off, fully_async)"
OFFPOLICY = "one_step_off, fully_async"


@dataclass(frozen=True)
class VerlSymbol:
    """One verl internal we depend on: `module`.`symbol` (symbol may be dotted: Class.method)."""

    module: str
    symbol: str
    use: str  # "reads", "registers into", "subclasses", "wraps"
    why: str
    needed_by: str
    where: str  # our module that uses it

    @property
    def name(self) -> str:
        return f"{self.module}.{self.symbol}"


VERL_SYMBOLS: tuple[VerlSymbol, ...] = (
    VerlSymbol("verl.trainer.ppo.core_algos", "POLICY_LOSS_REGISTRY", "registers into",
               "our policy losses by loss_mode name", ALL, "hosts/verl/registry.py"),
    VerlSymbol("verl.trainer.ppo.core_algos", "ADV_ESTIMATOR_REGISTRY", "registers into",
               "our advantage estimators by adv_estimator name", ALL, "hosts/verl/registry.py"),
    VerlSymbol("verl.trainer.ppo.core_algos", "agg_loss", "reads",
               "verl's loss aggregation, so every loss_agg_mode and global batch means hold", ALL,
               "hosts/verl/losses.py"),
    VerlSymbol("verl.workers.config", "PolicyLossConfig", "subclasses",
               "PowerMeanLossConfig adds our loss options (a Hydra _target_)", ALL, "hosts/verl/config.py"),
    VerlSymbol("verl.trainer.config", "AlgoConfig", "subclasses",
               "PowerMeanAlgoConfig adds our estimator options (a Hydra _target_)", ALL, "hosts/verl/config.py"),
    VerlSymbol("verl.utils.config", "validate_config", "wraps",
               "our option, TRL, checkpoint-directory and resume checks in the driver before Ray starts",
               "main_ppo, one_step_off (fully_async never calls it: see run_ppo)", "hosts/verl/registry.py"),
    VerlSymbol("verl.utils.config", "omega_conf_to_dataclass", "reads",
               "builds our config dataclasses from the composed config for the checks", ALL, "hosts/verl/checks.py"),
    VerlSymbol("verl.trainer.main_ppo", "run_ppo", "wraps",
               "our option checks before Ray starts where validate_config is not called, and verl's own "
               "validate_config in the driver for one_step_off (whose task runner calls it inside Ray)",
               "one_step_off, fully_async", "guards/offpolicy.py"),
    VerlSymbol("verl.trainer.ppo.utils", "need_reference_policy", "reads",
               "the reference-policy argument of verl's validate_config, as its entry points derive it",
               "one_step_off", "guards/offpolicy.py"),
    VerlSymbol("verl.trainer.ppo.utils", "need_critic", "reads",
               "the critic argument of verl's validate_config, as its entry points derive it",
               "one_step_off", "guards/offpolicy.py"),
    VerlSymbol("verl.utils.debug.metrics", "calculate_debug_metrics", "wraps",
               "the one place the driver reads the rollout's log-probs: non-finite ones stop the step",
               "v0 RayPPOTrainer (imports it at the call)", "guards/finite.py"),
    VerlSymbol("verl.trainer.ppo.v1.trainer_base", "calculate_debug_metrics", "wraps",
               "the same check, under the name the v1 trainer imported", SYNC_V1, "guards/finite.py"),
    VerlSymbol("verl.trainer.ppo.v1.trainer_base", "PPOTrainer._save_checkpoint", "wraps",
               "a failed save raises CheckpointSaveError naming the directory and the checkpoint to resume",
               SYNC_V1, "guards/checkpoints.py"),
    VerlSymbol("verl.trainer.ppo.ray_trainer", "RayPPOTrainer._save_checkpoint", "wraps",
               "the same, for the v0 trainer", V0_AND_OFFPOLICY, "guards/checkpoints.py"),
    VerlSymbol("verl.experimental.fully_async_policy.fully_async_trainer", "FullyAsyncTrainer", "wraps",
               "its own _save_checkpoint (a @ray.remote class: patched on the class it wraps) gets the same guard",
               "fully_async", "guards/checkpoints.py"),
    VerlSymbol("verl.trainer.ppo.v1.trainer_base", "compute_data_metrics", "wraps",
               "carries the estimators' critic/pm/* metrics into the step's metrics", SYNC_V1,
               "hosts/verl/estimators.py"),
    VerlSymbol("verl.trainer.ppo.v1.trainer_base", "compute_advantage_for_multi_trajectories", "wraps",
               "our estimators group each agent-loop session's final output, as verl's GRPO (multi-output sessions)",
               "v1 PPOTrainer (sync, colocate_async, separate_async)", "hosts/verl/estimators.py"),
    VerlSymbol("verl.trainer.ppo.ray_trainer", "compute_data_metrics", "wraps",
               "the same, for the v0 trainer", "v0 RayPPOTrainer", "hosts/verl/estimators.py"),
    VerlSymbol("verl.trainer.ppo.ray_trainer", "RayPPOTrainer._update_actor", "wraps",
               "attaches each sample's lag to the batch; turns the loss's per-lag sums into actor/pm/lag<k>/*",
               OFFPOLICY, "guards/offpolicy.py"),
    VerlSymbol("verl.trainer.ppo.ray_trainer", "RayPPOTrainer._load_checkpoint", "wraps",
               "records the step training starts from, so the first weights' label after a start or resume "
               "gives lag 0", "one_step_off", "guards/offpolicy.py"),
    VerlSymbol("verl.trainer.ppo.ray_trainer", "RayPPOTrainer._load_checkpoint", "wraps",
               "at an epoch boundary verl skips data.pt: the sampler's generator is advanced through the saved epoch, "
               "so the next epoch is shuffled as in the uninterrupted run", "v0 RayPPOTrainer, one_step_off",
               "guards/shuffle.py"),
    VerlSymbol("verl.experimental.one_step_off_policy.ray_trainer", "OneStepOffRayTrainer._create_continuous_iterator",
               "wraps", "records the dataloader's state after each batch drawn (it draws batch k+1 before saving "
               "step k)", "one_step_off", "guards/prefetch.py"),
    VerlSymbol("verl.experimental.one_step_off_policy.ray_trainer", "OneStepOffRayTrainer._fit_generate", "wraps",
               "takes the state as of the batch the step trains", "one_step_off", "guards/prefetch.py"),
    VerlSymbol("verl.experimental.one_step_off_policy.ray_trainer", "OneStepOffRayTrainer._save_checkpoint", "wraps",
               "data.pt gets the state as of the batch trained, so a resume does not skip the prefetched batch",
               "one_step_off", "guards/prefetch.py"),
    VerlSymbol("verl.experimental.one_step_off_policy.ray_trainer", "OneStepOffRayTrainer._fit_dump_data", "wraps",
               "creates the rollout-dump executor its __init__ never creates (trainer.rollout_data_dir crashed "
               "step 1) and drains it", "one_step_off", "guards/prefetch.py"),
    VerlSymbol("verl.experimental.one_step_off_policy.ray_trainer", "OneStepOffRayTrainer._init_dump_executor",
               "reads", "RayPPOTrainer's executor for the rollout dump (with _shutdown_dump_executor)", "one_step_off",
               "guards/prefetch.py"),
    VerlSymbol("verl.experimental.one_step_off_policy.ray_trainer", "OneStepOffRayTrainer._shutdown_dump_executor",
               "reads", "drains the rollout dump before the step's checkpoint", "one_step_off", "guards/prefetch.py"),
    VerlSymbol("verl.trainer.ppo.v1.trainer_base", "PPOTrainer._update_actor", "wraps",
               "sends each sample's lag (from its TransferQueue tags) to the workers as a field the loss reads",
               "v1 colocate_async, separate_async", "guards/offpolicy.py"),
    VerlSymbol("verl.trainer.ppo.v1.trainer_base", "PPOTrainer.step", "wraps",
               "turns the loss's per-lag sums into actor/pm/lag<k>/* and adds training/lag/*",
               "v1 colocate_async, separate_async", "guards/offpolicy.py"),
    VerlSymbol("verl.trainer.ppo.v1.trainer_base", "reduce_metrics", "wraps",
               "the loss's staged per-lag sums become their totals over the update, not a mean over micro-batches",
               "v1 colocate_async, separate_async", "guards/offpolicy.py"),
    VerlSymbol("verl.trainer.ppo.v1.trainer_separate_async", "logger", "wraps",
               "verl 0.9.1 passes logger.info(..., flush=True) (a TypeError) in _setup when hybrid_engine=false: "
               "the wrapper drops the keyword", "v1 separate_async", "guards/offpolicy.py"),
    VerlSymbol("verl.workers.utils.losses", "ppo_loss", "wraps",
               "exposes the micro-batch's lags to our loss (worker side)", OFFPOLICY, "guards/offpolicy.py"),
    VerlSymbol("verl.trainer.ppo.rollout_corr_helper", "apply_bypass_mode", "wraps",
               "bypass mode keeps our loss_mode on the trainer's config, with a warning", OFFPOLICY,
               "guards/offpolicy.py"),
)


class UnsupportedVerlError(ImportError):
    """The installed verl lacks a symbol hmpo_verl wraps or reads (moved or renamed)."""


def _verl_version() -> str:
    try:
        from importlib import metadata

        return metadata.version("verl")
    except Exception:  # noqa: BLE001 - a source checkout without metadata
        return getattr(sys.modules.get("verl"), "__version__", "unknown")


def resolve(module, symbol: str):
    """`module`'s attribute at the dotted path `symbol`; AttributeError if any part is missing."""
    value = module
    for part in symbol.split("."):
        value = getattr(value, part)
    return value


def rows_of(module_name: str) -> tuple[VerlSymbol, ...]:
    return tuple(row for row in VERL_SYMBOLS if row.module == module_name)


def missing(module_name: str, module) -> list[VerlSymbol]:
    """The rows of `module_name` that `module` lacks."""
    absent = []
    for row in rows_of(module_name):
        try:
            resolve(module, row.symbol)
        except AttributeError:
            absent.append(row)
    return absent


def unsupported_message(rows: list[VerlSymbol], version: Optional[str] = None) -> str:
    """One message naming every missing symbol, what we use it for, and the verl versions we support."""
    listed = "; ".join(f"{row.name} ({row.use} it: {row.why}; needed by {row.needed_by})" for row in rows)
    return (f"verl {version or _verl_version()} lacks what hmpo_verl uses: {listed}. "
            f"hmpo_verl supports verl {SUPPORTED_VERL}: pip install 'verl{SUPPORTED_VERL}' "
            "(or pip install 'hmpo-verl[verl]')")


def check_module(module_name: str, module) -> None:
    """Raise `UnsupportedVerlError` if `module` lacks a symbol its rows name (called before wrapping it)."""
    absent = missing(module_name, module)
    if absent:
        raise UnsupportedVerlError(unsupported_message(absent))


def check_loaded() -> None:
    """Check every row whose module is imported in this process: one error naming all that are missing."""
    absent = [row for name in dict.fromkeys(row.module for row in VERL_SYMBOLS) if sys.modules.get(name) is not None
              for row in missing(name, sys.modules[name])]
    if absent:
        raise UnsupportedVerlError(unsupported_message(absent))
