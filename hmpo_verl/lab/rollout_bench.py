"""Rollout cost against its floor: verl's agent-loop rollout through the ``hf`` server vs ``model.generate``.

    python -m hmpo_verl.lab.bench --rollout                 # every task, 5 interleaved repeats
    python -m hmpo_verl.lab.bench --rollout --task add --repeats 3

For a task, one training step's prompts (``data.train_batch_size`` rows of the train
parquet, each repeated ``rollout.n`` times, as verl's trainer sends them) are generated

* **rollout**: by verl's own machinery -- ``AgentLoopManager`` -> ``AgentLoopWorker``
  (a Ray actor) -> ``SingleTurnAgentLoop`` -> ``LLMServerClient`` -> verl's load balancer ->
  :class:`verl_cpu.rollout.server.HFRolloutServer` (a Ray actor) -- with the task's recipe
  (``recipes/cpu_tiny``), sampling settings and lengths. verl's v1 trainer wraps the same
  agent loop in ``AgentLoopManagerTQ`` (results go to TransferQueue and a replay buffer);
  that wrapper is not timed here: ``timing_s/gen`` of the real trainer is.
* **floor**: by one direct, batched ``model.generate`` of the same prompt token ids (left
  padded) in this process, with the same model, ``max_new_tokens``, temperature, top-p,
  top-k, and log-probs of the sampled tokens (``compute_transition_scores``), which is what
  the server returns too.

Repeats alternate rollout and floor (after one warm-up of each) so that load from other
processes on the machine hits both alike; reported are medians. The floor runs with as many
torch threads as the server has (Ray gives an actor without CPUs one thread;
``VERL_CPU_ROLLOUT_THREADS`` sets the server's), so the ratio measures overhead, not threads. The server's own timers
(:meth:`HFRolloutServer.stats`) split the rollout's wall time: ``decode`` is the server
decoding (ours; compare with the floor), ``queue`` the requests' mean wait in the server
between arrival and their decode (ours: the batching window), the rest is the time the
server had nothing to do -- verl's per-request agent loop, Ray calls and post-processing.
The last line is ``rollout/floor ratio: X`` of the last task.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
RECIPE_DIR = REPO_ROOT / "recipes" / "cpu_tiny"


@dataclass(frozen=True)
class Task:
    """A CPU task as the bench needs it: its recipe and a function that builds its assets."""

    name: str
    recipe: str  # config name in recipes/cpu_tiny

    def assets(self):
        from hmpo_verl.lab.tiny_task import prepare_assets

        return prepare_assets(REPO_ROOT / "outputs" / "tiny_task", log=None)


TASKS = {"add": Task("add", "hmpo")}


def compose_config(task: Task, assets, overrides: list[str]):
    """The task's recipe with its asset paths, resolved like verl's Hydra main builds it."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(RECIPE_DIR), version_base=None):
        config = compose(
            config_name=task.recipe,
            overrides=[
                f"actor_rollout_ref.model.path={assets.model}",
                f"data.train_files={assets.train_parquet}",
                f"data.val_files={assets.test_parquet}",
                *overrides,
            ],
        )
    OmegaConf.resolve(config)
    return config


def step_batch(config):
    """One training step's prompts as verl's trainer hands them to the agent loop: (B*n rows)."""
    from verl.protocol import DataProto
    from verl.trainer.ppo.utils import create_rl_dataset
    from verl.utils import hf_tokenizer
    from verl.utils.dataset.rl_dataset import collate_fn

    tokenizer = hf_tokenizer(config.actor_rollout_ref.model.path)
    dataset = create_rl_dataset(config.data.train_files, config.data, tokenizer, None, is_train=True)
    rows = [dataset[i] for i in range(config.data.train_batch_size)]
    batch = DataProto.from_single_dict(collate_fn(rows))
    return batch.repeat(repeat_times=config.actor_rollout_ref.rollout.n, interleave=True)


class VerlRollout:
    """verl's agent-loop rollout through one ``hf`` server, as the trainer wires it (without the actor)."""

    def __init__(self, config):
        import ray
        from verl.experimental.agent_loop import AgentLoopManager
        from verl.workers.rollout.llm_server import LLMServerClient
        from verl.workers.rollout.replica import CONTROL_METHOD_CONCURRENCY
        from verl.workers.rollout.router import get_router_handle

        from verl_cpu.rollout.replica import server_actor_name, start_server

        rollout = config.actor_rollout_ref.rollout
        name = server_actor_name(0, 0, "_bench")
        self.server = start_server(
            rollout,
            config.actor_rollout_ref.model,
            replica_rank=0,
            name=name,
            node_id=ray.get_runtime_context().get_node_id(),
            max_concurrency=max(1000, rollout.max_num_seqs + CONTROL_METHOD_CONCURRENCY),
        )
        ray.get(self.server.stats.remote())  # model loaded
        balancer = get_router_handle(servers={f"ray://{name}": self.server})
        self.manager = AgentLoopManager.create(config, LLMServerClient(config, load_balancer_handle=balancer))

    def stats(self) -> dict:
        import ray

        return ray.get(self.server.stats.remote())

    def __call__(self, batch):
        """Generate; return (seconds, verl's output DataProto, server counters of this call)."""
        before = self.stats()
        start = time.perf_counter()
        output = self.manager.generate_sequences(batch)
        seconds = time.perf_counter() - start
        after = self.stats()
        counters = {k: after[k] - before[k] for k in ("requests", "batches", "decode_s", "queue_s", "new_tokens")}
        counters["torch_threads"] = after["torch_threads"]
        return seconds, output, counters


def prompt_ids_of(output) -> list[list[int]]:
    """The prompt token ids verl sent, from its left-padded ``prompts`` and ``attention_mask``."""
    prompts = output.batch["prompts"]
    mask = output.batch["attention_mask"][:, : prompts.shape[1]].bool()
    return [row[m].tolist() for row, m in zip(prompts, mask, strict=True)]


def response_lengths(output) -> list[int]:
    return output.batch["response_mask"].sum(-1).tolist()


class Floor:
    """One batched ``model.generate`` of the same prompts with the same settings, in this process."""

    def __init__(self, config):
        import torch
        from transformers import AutoModelForCausalLM
        from verl.utils import hf_tokenizer

        path = config.actor_rollout_ref.model.path
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
        tokenizer = hf_tokenizer(path)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        rollout = config.actor_rollout_ref.rollout
        self.kwargs = dict(
            max_new_tokens=int(rollout.response_length),
            do_sample=rollout.temperature > 0,
            temperature=float(rollout.temperature) if rollout.temperature > 0 else None,
            top_p=float(rollout.top_p),
            top_k=int(rollout.top_k) if rollout.top_k > 0 else None,
            pad_token_id=self.pad,
            eos_token_id=tokenizer.eos_token_id,
            min_new_tokens=int(rollout.response_length) if rollout.ignore_eos else None,
            output_scores=True,
            return_dict_in_generate=True,
        )

    def __call__(self, prompts: list[list[int]]):
        """Return (seconds, response lengths)."""
        import torch

        width = max(len(p) for p in prompts)
        input_ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts])
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **self.kwargs)
            scores = self.model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
            scores.tolist()
        seconds = time.perf_counter() - start
        new = out.sequences[:, width:]
        eos = self.kwargs["eos_token_id"]
        lengths = [int(((row == eos).cumsum(0) == 0).sum()) + int((row == eos).any()) for row in new]
        return seconds, lengths


def bench_task(task: Task, repeats: int, overrides: list[str], log=print) -> float:
    """Time rollout and floor for one task; print a block; return the ratio of medians."""
    import torch

    config = compose_config(task, task.assets(), overrides)
    batch = step_batch(config)
    rollout, floor = VerlRollout(config), Floor(config)
    _, output, counters = rollout(batch)  # warm-up
    prompts = prompt_ids_of(output)
    torch.set_num_threads(counters["torch_threads"])  # the floor computes with the server's threads
    floor(prompts)
    runs, floors, floor_lengths, lengths = [], [], [], []
    for _ in range(repeats):
        seconds, output, counters = rollout(batch)
        runs.append((seconds, counters))
        lengths += response_lengths(output)
        seconds, flen = floor(prompts)
        floors.append(seconds)
        floor_lengths += flen
    t_rollout = statistics.median(s for s, _ in runs)
    t_floor = statistics.median(floors)
    med = {k: statistics.median(c[k] for _, c in runs) for k in ("batches", "decode_s", "queue_s", "new_tokens")}
    requests = runs[0][1]["requests"]
    idle = max(0.0, t_rollout - med["decode_s"])
    rollout_cfg = config.actor_rollout_ref.rollout
    log(
        f"\n== task {task.name}: {config.data.train_batch_size} prompts x n={rollout_cfg.n} = {len(batch)} responses, "
        f"max {rollout_cfg.response_length} new tokens, temperature {rollout_cfg.temperature}, top_p {rollout_cfg.top_p}, "
        f"top_k {rollout_cfg.top_k}; {repeats} interleaved repeats, medians"
    )
    log(f"  response length, mean      rollout {statistics.mean(lengths):.1f}   floor {statistics.mean(floor_lengths):.1f}")
    log(f"  floor: model.generate      {t_floor:8.3f} s   (this process, {torch.get_num_threads()} torch threads)")
    log(f"  rollout through verl       {t_rollout:8.3f} s")
    log(
        f"    server decoding (ours)   {med['decode_s']:8.3f} s   {med['batches']:.0f} batches for {requests} requests, "
        f"{med['new_tokens']:.0f} decode steps, {runs[0][1]['torch_threads']} torch threads"
    )
    log(f"    server queue, mean/request {med['queue_s'] / max(1, requests):6.3f} s   (ours: batching window)")
    log(f"    server idle (verl + Ray)   {idle:6.3f} s   (agent loop, load balancer, RPCs, post-processing)")
    ratio = t_rollout / t_floor
    log(f"rollout/floor ratio: {ratio:.2f}")
    return ratio


def run(task_names: list[str], repeats: int, overrides: list[str], log=print) -> dict[str, float]:
    """Start a local Ray, bench each task in turn, shut Ray down; return {task: ratio}."""
    os.environ["VERL_PLATFORM"] = "cpu"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray

    from verl_cpu.plugin import activate

    activate()  # verl was imported (by hmpo_verl) before VERL_PLATFORM was set here

    path = os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "patches" / "verl_cpu"), os.environ.get("PYTHONPATH", "")])
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"VERL_PLATFORM": "cpu", "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false"}},
    )
    try:
        return {name: bench_task(TASKS[name], repeats, overrides, log=log) for name in task_names}
    finally:
        ray.shutdown()


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(TASKS), action="append", help="task(s) to bench (default: all)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rollout/floor repeats (default 5)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the task's recipe, after --")
    args = parser.parse_args(argv)
    run(args.task or list(TASKS), args.repeats, args.overrides, log=lambda *a: print(*a, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
