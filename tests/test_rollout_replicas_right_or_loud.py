"""A rollout whose replica size does not divide its GPUs is refused before Ray starts.

verl 0.9.1's ``LLMServerManager`` starts ``GPUs // W`` rollout replicas of ``W`` = tensor x data x pipeline
parallel size GPUs, and says nothing of the rest: with its default tensor_model_parallel_size 2 a one-GPU node
gets no replica at all, and 8 GPUs at tensor parallel 3 leave 2 without a rollout server. The driver
(``check_rollout_replicas``, in ``driver_checks``) says so first, naming the pool's keys and the sizes that fit.
"""

from __future__ import annotations

import os

import pytest
import verl
from hydra import compose, initialize_config_dir
from test_recipes_config import RECIPES, compose_recipe

from hmpo_verl.hosts.verl.checks import check_rollout_replicas, driver_checks
from hmpo_verl.lab.tasks import REPO_ROOT

VERL_CONFIG = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
CPU_RECIPES = str(REPO_ROOT / "recipes" / "cpu_fibonacci")
TP = "actor_rollout_ref.rollout.tensor_model_parallel_size"


def composed(folder: str, name: str, *overrides: str):
    with initialize_config_dir(config_dir=folder, version_base=None):
        return compose(config_name=name, overrides=list(overrides))


def test_verls_default_tensor_parallel_on_one_gpu_is_refused_before_any_other_check(tmp_path):
    """verl's own config, a one-GPU node: the one-line user's first launch on a small machine."""
    config = composed(VERL_CONFIG, "ppo_trainer", "trainer.n_gpus_per_node=1", f"trainer.default_local_dir={tmp_path}")
    with pytest.raises(ValueError, match=rf"{TP}=2 x .*data_parallel_size=1 x .*pipeline_model_parallel_size=1 = 2 "
                                         r"GPUs per rollout replica does not divide the rollout's 1 GPUs \(trainer."
                                         r"nnodes=1 x trainer.n_gpus_per_node=1\): verl starts no rollout replica, so "
                                         rf"nothing generates. Set {TP} .* to a divisor of 1: 1$"):
        driver_checks(config)
    check_rollout_replicas(composed(VERL_CONFIG, "ppo_trainer", "trainer.n_gpus_per_node=1", f"{TP}=1"))


def test_gpus_a_replica_size_leaves_idle_are_named_with_the_sizes_that_fit():
    config = composed(VERL_CONFIG, "ppo_trainer", "trainer.n_gpus_per_node=8", f"{TP}=3")
    with pytest.raises(ValueError, match=r"verl starts 2 replica\(s\) and leaves 2 GPU\(s\) without a rollout server. "
                                         r".* to a divisor of 8: 1, 2, 4, 8$"):
        check_rollout_replicas(config)
    for tp in (1, 2, 4, 8):
        check_rollout_replicas(composed(VERL_CONFIG, "ppo_trainer", "trainer.n_gpus_per_node=8", f"{TP}={tp}"))
    # a replica across nodes: whole nodes only (verl's RolloutReplica asserts it after Ray starts)
    check_rollout_replicas(composed(VERL_CONFIG, "ppo_trainer", "trainer.nnodes=2", "trainer.n_gpus_per_node=4",
                                    f"{TP}=8"))
    with pytest.raises(ValueError, match="spans nodes of 4 GPUs unevenly"):
        check_rollout_replicas(composed(VERL_CONFIG, "ppo_trainer", "trainer.nnodes=3", "trainer.n_gpus_per_node=4",
                                        f"{TP}=6"))


@pytest.mark.parametrize("recipe, overrides, pool", [
    ("one_step_off", ("rollout.n_gpus_per_node=3", f"{TP}=2"), "rollout.nnodes=1 x rollout.n_gpus_per_node=3"),
    ("fully_async", ("rollout.n_gpus_per_node=3", f"{TP}=2"), "rollout.nnodes=1 x rollout.n_gpus_per_node=3"),
    ("separate_async", ("actor_rollout_ref.rollout.n_gpus_per_node=3", f"{TP}=2"),
     "actor_rollout_ref.rollout.nnodes=1 x actor_rollout_ref.rollout.n_gpus_per_node=3"),
])
def test_a_separate_rollout_pool_is_checked_on_its_own_gpus(recipe, overrides, pool):
    """The off-policy trainers' rollout pool (one-step-off and fully-async: rollout.*; V1 separate_async:
    actor_rollout_ref.rollout.*), not the trainer's GPUs."""
    check_rollout_replicas(composed(CPU_RECIPES, recipe))
    with pytest.raises(ValueError, match=rf"does not divide the rollout's 3 GPUs \({pool}\)"):
        check_rollout_replicas(composed(CPU_RECIPES, recipe, *overrides))


@pytest.mark.parametrize("overrides", [(), ("async=separate_async",)])
def test_the_gpu_recipes_fit(overrides):
    """The GSM8K recipe at its size (8 GPUs, and the separate_async split of recipes/split/)."""
    check_rollout_replicas(compose_recipe(RECIPES, "gsm8k", overrides))


def test_separate_async_checks_its_hybrid_replicas_on_the_trainers_gpus_too():
    """separate_async with actor_rollout_ref.hybrid_engine (verl's default) also starts hybrid replicas on the
    actor's workers (PPOTrainer._setup's LLMServerManager over actor_rollout_wg): TP 2 on a 3-GPU trainer pool
    leaves a GPU idle there, and its standalone pool fitting does not excuse it. Its hybrid switch
    (trainer.v1.separate_async.hybrid_rollout.enable_switch) changes no pool."""
    fits = ("trainer.v1.trainer_mode=separate_async", "trainer.n_gpus_per_node=4",
            "actor_rollout_ref.rollout.nnodes=1", "actor_rollout_ref.rollout.n_gpus_per_node=4", f"{TP}=2")
    check_rollout_replicas(composed(VERL_CONFIG, "ppo_trainer", *fits))
    odd_trainer = (*fits, "trainer.n_gpus_per_node=3")
    with pytest.raises(ValueError, match=r"verl starts no rollout replica there and leaves them idle"):  # not "nothing"
        check_rollout_replicas(composed(VERL_CONFIG, "ppo_trainer", *fits, "trainer.n_gpus_per_node=1"))
    for switch in ("false", "true"):
        with pytest.raises(ValueError, match=r"does not divide the rollout's 3 GPUs \(trainer.nnodes=1 x "
                                             r"trainer.n_gpus_per_node=3\)"):
            check_rollout_replicas(composed(VERL_CONFIG, "ppo_trainer", *odd_trainer,
                                            f"trainer.v1.separate_async.hybrid_rollout.enable_switch={switch}"))
    # without hybrid replicas the trainer's GPUs serve no rollout: only the standalone pool is checked
    check_rollout_replicas(composed(VERL_CONFIG, "ppo_trainer", *odd_trainer, "actor_rollout_ref.hybrid_engine=false"))


@pytest.mark.parametrize("async_file, trainer", [("separate_async", "V1 separate_async"), ("one_step_off", "one-step-off")])
def test_a_separate_rollout_pool_with_the_naive_weight_sync_is_refused_before_ray(async_file, trainer):
    """verl's naive checkpoint engine hands weights over inside a colocated worker: PPOTrainerSeparateAsync asserts
    against it after Ray starts; one-step-off has no check (its actor would call a rollout it lacks)."""
    from hmpo_verl.hosts.verl.checks import check_weight_sync

    key = "actor_rollout_ref.rollout.checkpoint_engine.backend"
    with pytest.raises(ValueError, match=rf"^{key}='naive' with verl's {trainer} trainer: .*allowed: a backend that "
                                         r"sends them between pools"):
        driver_checks(compose_recipe(RECIPES, "math", (f"async={async_file}", f"{key}=naive")))
    check_weight_sync(compose_recipe(RECIPES, "math", (f"async={async_file}",)))
    check_weight_sync(compose_recipe(RECIPES, "math", ("size=cpu", f"async={async_file}")))  # object_store (CPU)


def test_one_step_off_or_fully_async_with_the_hybrid_engine_on_is_refused_and_a_sync_run_keeps_it():
    """Both trainers assert actor_rollout_ref.hybrid_engine off once Ray has started (verl's default is on, and
    fully-async's own yaml keeps it); fully-async with the naive weight sync is refused as the others are."""
    from hmpo_verl.hosts.verl.checks import check_weight_sync

    with pytest.raises(ValueError, match=r"^actor_rollout_ref.hybrid_engine=true with verl's one-step-off trainer.* "
                                         r"allowed: actor_rollout_ref.hybrid_engine=false$"):
        check_weight_sync(compose_recipe(RECIPES, "math", ("async=one_step_off", "actor_rollout_ref.hybrid_engine=true")))
    with pytest.raises(ValueError, match=r"^actor_rollout_ref.hybrid_engine=true with verl's fully-async trainer"):
        check_weight_sync(composed(CPU_RECIPES, "fully_async", "actor_rollout_ref.hybrid_engine=true"))
    with pytest.raises(ValueError, match=r"'naive' with verl's fully-async trainer"):
        check_weight_sync(composed(CPU_RECIPES, "fully_async", "actor_rollout_ref.rollout.checkpoint_engine.backend=naive"))
    for config in (composed(VERL_CONFIG, "ppo_trainer"), composed(CPU_RECIPES, "fully_async"),
                   compose_recipe(RECIPES, "math", ())):  # verl's sync default keeps it; fully-async's recipe is off
        check_weight_sync(config)
