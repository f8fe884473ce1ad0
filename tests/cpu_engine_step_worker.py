"""One ``hmpo`` actor update with verl's own actor worker, without Ray (run under torchrun).

    VERL_PLATFORM=cpu torchrun --nproc_per_node=2 tests/cpu_engine_step_worker.py \
        --model outputs/tiny_task/model --out /tmp/ws2

Builds the actor config from ``recipes/cpu_tiny/hmpo.yaml`` (Hydra compose), creates
``ActorRolloutRefWorker(role="actor")`` -> FSDP2 engine on gloo, feeds it one fixed
global batch (this rank's contiguous share of it, as verl's data-parallel dispatch does),
takes one optimizer step through ``ppo_loss`` and the registered ``hmpo`` loss, and
writes the full (all-gathered) parameters after the step to ``<out>/params_rank<r>.pt``
plus the step's metrics to ``<out>/metrics_rank<r>.json``.

Not collected by pytest (no ``test_`` prefix); driven by ``tests/test_cpu_engine_torchrun.py``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
GLOBAL_BATCH = 16
RESPONSE_LEN = 4


def compose_config(model_path: str):
    """The recipe's config, resolved the way verl's TaskRunner resolves it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    with initialize_config_dir(config_dir=str(REPO_ROOT / "recipes" / "cpu_tiny"), version_base=None):
        config = compose(
            config_name="hmpo",
            overrides=[
                f"actor_rollout_ref.model.path={model_path}",
                "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",  # several micro-batches per rank
                "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
                f"actor_rollout_ref.actor.ppo_mini_batch_size={GLOBAL_BATCH // 8}",  # x rollout.n=8 sequences
            ],
        )
    with open_dict(config):
        config.actor_rollout_ref.actor.optim.total_training_steps = 1
    OmegaConf.resolve(config)
    return config


def global_batch(model_path: str, seed: int = 0):
    """A fixed batch of GLOBAL_BATCH sequences with left-padded prompts and right-padded responses.

    ``old_log_probs`` are the model's own log-probs plus noise, so token ratios differ
    from 1 and the hmpo weights and clipping are exercised.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    generator = torch.Generator().manual_seed(seed)
    prompts, responses = [], []
    for i in range(GLOBAL_BATCH):
        a, b = (7 * i + 3) % 10, (3 * i + 1) % 10
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"{a}+{b}" + "?" * (i % 3)}], add_generation_prompt=True, tokenize=False
        )
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        answer = tokenizer(str(a + b + (i % 2)), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        responses.append(answer[:RESPONSE_LEN])
    pad = tokenizer.pad_token_id
    prompt_len = max(len(p) for p in prompts)
    prompt_ids = torch.tensor([[pad] * (prompt_len - len(p)) + p for p in prompts])
    prompt_mask = torch.tensor([[0] * (prompt_len - len(p)) + [1] * len(p) for p in prompts])
    response_ids = torch.tensor([r + [pad] * (RESPONSE_LEN - len(r)) for r in responses])
    response_mask = torch.tensor([[1] * len(r) + [0] * (RESPONSE_LEN - len(r)) for r in responses])
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa")
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    logp = torch.log_softmax(logits[:, prompt_len - 1 : -1].float(), dim=-1)
    log_probs = logp.gather(-1, response_ids[..., None]).squeeze(-1)
    old_log_probs = (log_probs + 0.15 * torch.randn(log_probs.shape, generator=generator)) * response_mask
    advantages = torch.randn(GLOBAL_BATCH, 1, generator=generator).expand(-1, RESPONSE_LEN) * response_mask
    return {
        "prompts": prompt_ids,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "responses": response_ids,
        "response_mask": response_mask,
        "old_log_probs": old_log_probs.float(),
        "advantages": advantages.float().contiguous(),
    }


def rank_share(batch: dict, rank: int, world_size: int) -> dict:
    per_rank = GLOBAL_BATCH // world_size
    return {k: v[rank * per_rank : (rank + 1) * per_rank].clone() for k, v in batch.items()}


def to_actor_input(batch: dict, config):
    """verl's padded -> no-padding conversion and the meta fields its trainer adds."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    td = TensorDict(batch, batch_size=[batch["input_ids"].shape[0]])
    td = left_right_2_no_padding(td)
    mini_batch = config.actor_rollout_ref.actor.ppo_mini_batch_size * config.actor_rollout_ref.rollout.n
    tu.assign_non_tensor(
        td,
        calculate_entropy=False,
        distillation_use_topk=False,
        distillation_only=False,
        global_batch_size=mini_batch,
        mini_batch_size=mini_batch,
        epochs=1,
        seed=config.actor_rollout_ref.actor.data_loader_seed,
        dataloader_kwargs={"shuffle": False},
        compute_loss=True,
        temperature=config.actor_rollout_ref.rollout.temperature,
    )
    return td


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    assert os.environ.get("VERL_PLATFORM") == "cpu", "run with VERL_PLATFORM=cpu"
    torch.manual_seed(0)

    from verl.workers.engine_workers import ActorRolloutRefWorker

    config = compose_config(args.model)
    batch = global_batch(args.model)
    worker = ActorRolloutRefWorker(config=config.actor_rollout_ref, role="actor")
    worker.init_model()
    rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()

    output = worker.update_actor(to_actor_input(rank_share(batch, rank, world_size), config))

    params, _ = worker.actor.engine.get_per_tensor_param()
    full = {name: tensor.detach().cpu().clone() for name, tensor in params}  # collective: every rank
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(full, out / f"params_rank{rank}.pt")
    metrics = {}
    if output is not None:
        for key, value in output["metrics"].items():
            values = value if isinstance(value, list) else [value]
            metrics[key] = [float(getattr(v, "value", v)) for v in values]
    (out / f"metrics_rank{rank}.json").write_text(json.dumps({"world_size": world_size, "metrics": metrics}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
