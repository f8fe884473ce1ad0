"""Rollout cost against its floor: verl's agent-loop rollout through the ``hf`` server vs ``model.generate``.

    python -m hmpo_verl.lab.bench --rollout                 # every task, 5 interleaved repeats
    python -m hmpo_verl.lab.bench --rollout --task addition --repeats 3

For a task, one training step's prompts (``data.train_batch_size`` rows of the train
parquet, each repeated ``rollout.n`` times, as verl's trainer sends them) are generated

* **rollout**: by verl's own machinery -- ``AgentLoopManager`` -> ``AgentLoopWorker``
  (a Ray actor) -> ``SingleTurnAgentLoop`` -> ``LLMServerClient`` -> verl's load balancer ->
  :class:`verl_cpu.rollout.server.HFRolloutServer` (a Ray actor) -- with the task's recipe
  (``recipes/<recipe>/hmpo.yaml``), sampling settings and lengths. verl's v1 trainer wraps
  the same agent loop in ``AgentLoopManagerTQ`` (results go to TransferQueue, rewards to
  reward workers, the step waits on a replay buffer); that wrapper is not timed here: the
  real trainer's ``timing_s/gen`` is.
* **floor**: by one direct, batched ``model.generate`` of the same prompt token ids (left
  padded) in this process, with the same model, ``max_new_tokens``, temperature, top-p,
  top-k, and log-probs of the sampled tokens (``compute_transition_scores``), which is what
  the server returns too.

Repeats alternate rollout and floor (after one warm-up of each) so that load from other
processes on the machine hits both alike; reported are the median floor and the rollout
run of median time, and ours per repeat (the server's time after the last request over the
floor run next to it: robust to load that changes between repeats). The floor runs with as many
torch threads as the server has (Ray gives an actor without CPUs one thread;
``VERL_CPU_ROLLOUT_THREADS`` sets the server's), so the ratio measures overhead, not threads.

The rollout's wall time is split along its critical path with the server's timestamps
(:meth:`HFRolloutServer.stats`, wall clock): until the last request reached the server
(verl: its agent loops tokenize, route and send one request per sample; the server decodes
the earlier ones meanwhile), from there until the server handed back the last result (ours:
batching window and the decode still to do), and from there until verl returned the batch
(verl: post-processing, Ray returns). The last request's own decode takes about one floor,
so the ratio cannot fall below 1 + verl's share. The last line is ``rollout/floor ratio: X``
of the last task.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

from hmpo_verl.lab.tasks import TASKS, get_task

REPO_ROOT = Path(__file__).resolve().parents[2]


def compose_config(task, overrides: list[str]):
    """The task's recipe with its assets (built if missing), resolved like verl's Hydra main builds it."""
    from omegaconf import OmegaConf

    from hmpo_verl.lab.cpu_demo import composed

    assets = task.prepare_assets(log=None)
    config = composed(task.recipe_dir, task.recipe_name, [
        f"actor_rollout_ref.model.path={assets.model}",
        f"data.train_files={assets.train_parquet}",
        f"data.val_files={assets.test_parquet}",
        *overrides,
    ])
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

    def __init__(self, config, name_suffix: str):
        import ray
        from verl.experimental.agent_loop import AgentLoopManager
        from verl.workers.rollout.llm_server import LLMServerClient
        from verl.workers.rollout.replica import CONTROL_METHOD_CONCURRENCY
        from verl.workers.rollout.router import get_router_handle

        from verl_cpu.rollout.replica import server_actor_name, start_server

        rollout = config.actor_rollout_ref.rollout
        name = server_actor_name(0, 0, name_suffix)
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

    def close(self) -> None:
        """Stop the server and the agent-loop workers (the next task starts its own)."""
        import ray

        for actor in [self.server, *self.manager.agent_loop_workers]:
            ray.kill(actor)

    def stats(self) -> dict:
        import ray

        return ray.get(self.server.stats.remote())

    def __call__(self, batch):
        """Generate; return (seconds, verl's output DataProto, server counters of this call)."""
        before = self.stats()
        start = time.time()
        output = self.manager.generate_sequences(batch)
        end = time.time()
        after = self.stats()
        counters = {k: after[k] - before[k] for k in ("requests", "batches", "decode_s", "queue_s", "new_tokens")}
        counters["torch_threads"] = after["torch_threads"]
        # the critical path, on the wall clock both processes share
        counters["until_last_request_s"] = after["last_arrival"] - start  # verl: agent loops send the requests
        counters["after_last_request_s"] = after["last_done"] - after["last_arrival"]  # ours: wait + decode
        counters["after_last_result_s"] = end - after["last_done"]  # verl: post-processing, Ray returns
        return end - start, output, counters


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


def bench_task(task, repeats: int, overrides: list[str], log=print) -> float:
    """Time rollout and floor for one task; print a block; return the ratio of medians."""
    import torch

    config = compose_config(task, overrides)
    batch = step_batch(config)
    rollout, floor = VerlRollout(config, name_suffix=f"_bench_{task.name}"), Floor(config)
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
    t_floor = statistics.median(floors)
    # the parts of the rollout are those of its median run, so that they add up to its time
    t_rollout, med = sorted(runs, key=lambda run: run[0])[(len(runs) - 1) // 2]
    requests = runs[0][1]["requests"]
    rollout_cfg = config.actor_rollout_ref.rollout
    log(
        f"\n== task {task.name}: {config.data.train_batch_size} prompts x n={rollout_cfg.n} = {len(batch)} responses, "
        f"max {rollout_cfg.response_length} new tokens, temperature {rollout_cfg.temperature}, top_p {rollout_cfg.top_p}, "
        f"top_k {rollout_cfg.top_k}; {repeats} interleaved repeats: median floor, median rollout run"
    )
    log(f"  response length, mean          rollout {statistics.mean(lengths):.1f}   floor {statistics.mean(floor_lengths):.1f}")
    log(f"  floor: model.generate          {t_floor:7.3f} s   (this process, {torch.get_num_threads()} torch threads)")
    log(f"  rollout through verl           {t_rollout:7.3f} s   = the three parts below")
    log(f"    verl, until the last request {med['until_last_request_s']:7.3f} s   (agent loops: tokenize, route, send)")
    log(f"    ours, after the last request {med['after_last_request_s']:7.3f} s   (server: batching window, decode; "
        f"{med['after_last_request_s'] - t_floor:+.3f} s beyond the floor)")
    log(f"    verl, after the last result  {med['after_last_result_s']:7.3f} s   (post-processing, Ray returns)")
    log(
        f"  server, in all: decoding {med['decode_s']:.3f} s in {med['batches']:.0f} batches for {requests} requests "
        f"({med['new_tokens']:.0f} decode steps, {runs[0][1]['torch_threads']} torch threads); "
        f"a request waited {med['queue_s'] / max(1, requests):.3f} s for its decode on average"
    )
    rollout.close()
    ratio = t_rollout / t_floor
    verl = (med["until_last_request_s"] + med["after_last_result_s"]) / t_floor
    ours = med["after_last_request_s"] / t_floor
    log(f"  the ratio in shares: verl {verl:.2f} + ours {ours:.2f} (a decode of the last request alone is ~1)")
    paired = sorted(c["after_last_request_s"] / f for (_, c), f in zip(runs, floors, strict=True))
    log(f"  ours per repeat, over the floor run next to it: median {statistics.median(paired):.2f}, "
        f"range {paired[0]:.2f}-{paired[-1]:.2f} ({repeats} repeats)")
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
        return {name: bench_task(get_task(name), repeats, overrides, log=log) for name in task_names}
    finally:
        ray.shutdown()


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=list(TASKS), action="append", help="task(s) to bench (default: all, in this order)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rollout/floor repeats (default 5)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the task's recipe, after --")
    args = parser.parse_args(argv)
    run(args.task or list(TASKS), args.repeats, args.overrides, log=lambda *a: print(*a, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
