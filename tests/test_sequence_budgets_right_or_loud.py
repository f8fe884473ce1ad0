"""A token budget or vLLM context below the run's longest sequence is refused before Ray starts.

verl 0.9.1's dynamic batching asserts ``max_token_len >= max_seq_len`` on each batch's longest sequence
(``verl/utils/seqlen_balancing.py``, budget x sequence-parallel size from ``verl/workers/engine/utils.py``): a
budget below prompt_length + response_length passes every check and stops the run on the step whose longest
response first passes it, hours in. vLLM with ``max_model_len`` below it cuts responses silently. The driver
(``check_sequence_budgets``, in ``driver_checks``) names the key, the length and the value to set.
"""

from __future__ import annotations

import pytest
from test_recipes_config import RECIPES, compose_recipe

from hmpo_verl.hosts.verl.checks import check_sequence_budgets, driver_checks

ACTOR, ROLLOUT, REF = "actor_rollout_ref.actor", "actor_rollout_ref.rollout", "actor_rollout_ref.ref"


def math_7b(*overrides: str):
    """MATH at the 7B size: prompts 1024 + responses 3072 tokens, dynamic batches (recipes/README's memory advice:
    lower ppo_max_token_len_per_gpu)."""
    return compose_recipe(RECIPES, "math", ("size=qwen2_5_math_7b", *overrides))


@pytest.mark.parametrize("task", ["gsm8k", "math"])
@pytest.mark.parametrize("extra", [(), ("size=qwen2_5_math_7b",), ("size=qwen3_30b_a3b_megatron",),
                                   ("size=qwen2_5_0_5b",), ("size=cpu",), ("async=separate_async",),
                                   ("async=one_step_off",)])
def test_every_recipe_fits_its_longest_sequence(task, extra):
    check_sequence_budgets(compose_recipe(RECIPES, task, extra))


@pytest.mark.parametrize("key", [f"{ACTOR}.ppo_max_token_len_per_gpu", f"{ROLLOUT}.log_prob_max_token_len_per_gpu"])
def test_a_budget_below_prompt_plus_response_is_refused_naming_the_minimum(key):
    with pytest.raises(ValueError, match=rf"^{key}=3000 x {ACTOR}.ulysses_sequence_parallel_size=1 is below the "
                                         rf"longest sequence the run can produce, 4096 \({ROLLOUT}.prompt_length 1024 "
                                         rf"\+ response_length 3072\): .* Set {key} >= 4096, or lower "
                                         r"data.max_response_length$"):
        driver_checks(math_7b(f"{key}=3000"))
    check_sequence_budgets(math_7b(f"{key}=4096"))


def test_sequence_parallelism_splits_a_sequence_over_its_gpus():
    """Ulysses sequence parallelism 2 makes a budget of 2048 per GPU hold 4096 tokens (verl: budget x sp_size); the
    actor's key wins over fsdp_config's when > 1 (FSDPActorConfig copies it), fsdp_config's counts alone too."""
    budgets = (f"{ACTOR}.ppo_max_token_len_per_gpu=2048", f"{ROLLOUT}.log_prob_max_token_len_per_gpu=2048")
    check_sequence_budgets(math_7b(*budgets, f"{ACTOR}.ulysses_sequence_parallel_size=2"))
    check_sequence_budgets(math_7b(*budgets, f"{ACTOR}.fsdp_config.ulysses_sequence_parallel_size=2"))
    with pytest.raises(ValueError, match=rf"x {ACTOR}.ulysses_sequence_parallel_size=2 is below .* >= 2048,"):
        check_sequence_budgets(math_7b(f"{ACTOR}.ppo_max_token_len_per_gpu=2000", f"{ACTOR}.ulysses_sequence_parallel_size=2"))
    with pytest.raises(ValueError, match=rf"x {ACTOR}.ulysses_sequence_parallel_size=2 is below"):  # not fsdp_config's 4
        check_sequence_budgets(math_7b(f"{ACTOR}.ppo_max_token_len_per_gpu=1024", f"{ACTOR}.ulysses_sequence_parallel_size=2",
                                       f"{ACTOR}.fsdp_config.ulysses_sequence_parallel_size=4"))


@pytest.mark.parametrize("strategy, split_key", [("veomni", "veomni.ulysses_parallel_size"),
                                                 ("torchtitan", "torchtitan.tensor_parallel_size")])
def test_each_engine_splits_by_its_own_size_and_an_unknown_split_is_not_checked(strategy, split_key):
    """veomni's sp_size is its Ulysses size, torchtitan's its tensor parallel size (their transformer_impl.py);
    Megatron's dynamic context parallelism packs by its own bound, not the budget."""
    from omegaconf import OmegaConf, open_dict

    config = math_7b(f"{ACTOR}.ppo_max_token_len_per_gpu=2048", f"{ROLLOUT}.log_prob_max_token_len_per_gpu=2048")
    with open_dict(config):
        OmegaConf.update(config, f"{ACTOR}.strategy", strategy, force_add=True)
        OmegaConf.update(config, f"{ACTOR}.{split_key}", 2, force_add=True)
    check_sequence_budgets(config)
    OmegaConf.update(config, f"{ACTOR}.{split_key}", 1, force_add=True)
    with pytest.raises(ValueError, match=rf"x {ACTOR}.{split_key}=1 is below"):
        check_sequence_budgets(config)
    with open_dict(config):
        OmegaConf.update(config, f"{ACTOR}.strategy", "megatron", force_add=True)
        OmegaConf.update(config, f"{ACTOR}.megatron.dynamic_context_parallel", True, force_add=True)
    check_sequence_budgets(config)


def test_a_lora_run_or_a_validation_only_run_is_not_refused_for_what_it_does_not_read():
    """With LoRA the actor computes the reference log-probs under the rollout's budget: the ref's is not read."""
    check_sequence_budgets(math_7b(f"{REF}.log_prob_max_token_len_per_gpu=100", f"{ACTOR}.use_kl_loss=true",
                                   "actor_rollout_ref.model.lora_rank=8"))


def test_a_budget_verl_does_not_read_is_not_checked():
    """Fixed micro-batches (use_dynamic_bsz false) ignore the budgets; the ref's is read only where a ref runs."""
    check_sequence_budgets(math_7b(f"{ACTOR}.use_dynamic_bsz=false", f"{ROLLOUT}.log_prob_use_dynamic_bsz=false",
                                   f"{ACTOR}.ppo_micro_batch_size_per_gpu=1", f"{ROLLOUT}.log_prob_micro_batch_size_per_gpu=1",
                                   f"{ACTOR}.ppo_max_token_len_per_gpu=100"))
    check_sequence_budgets(math_7b(f"{REF}.log_prob_max_token_len_per_gpu=100"))  # no KL: no ref model
    with pytest.raises(ValueError, match=rf"^{REF}.log_prob_max_token_len_per_gpu=100 x {REF}"):
        check_sequence_budgets(math_7b(f"{REF}.log_prob_max_token_len_per_gpu=100", f"{ACTOR}.use_kl_loss=true"))


def test_a_vllm_context_below_prompt_plus_response_is_refused():
    with pytest.raises(ValueError, match=rf"^{ROLLOUT}.max_model_len=2048 is below 4096 .*cut each response .*Set "
                                         rf"{ROLLOUT}.max_model_len >= 4096, or null"):
        driver_checks(compose_recipe(RECIPES, "math", (f"{ROLLOUT}.max_model_len=2048",)))
    check_sequence_budgets(compose_recipe(RECIPES, "math", (f"{ROLLOUT}.max_model_len=4096",)))
