"""What a resumed CPU run needs to repeat the uninterrupted one, tested without Ray: the hf server's
per-request streams (``rollout.full_determinism``), the replay buffer's batch order, the NaN fault knob."""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys

import pytest
import torch
from cpu_assets import tiny_assets
from verl_cpu.replay_buffer import submission_order
from verl_cpu.rollout.sampling import RowStreams, SamplingParams, process_logits, row_seed, sample_step
from verl_cpu.rollout.server import NAN_AT_VERSION_ENV, HFRolloutServer

SAMPLE = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "logprobs": True, "ignore_eos": True}


def _server(monkeypatch=None, full_determinism=True, **env):
    from verl.workers.config import HFModelConfig, RolloutConfig

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config = RolloutConfig(name="hf", prompt_length=32, response_length=4, max_num_seqs=64, seed=7,
                           full_determinism=full_determinism)
    return HFRolloutServer(config, HFModelConfig(path=str(tiny_assets().model)), batch_wait_s=0.05)


def _prompts(server, sums):
    tokenizer = server.model_config.tokenizer
    chat = [tokenizer.apply_chat_template([{"role": "user", "content": s}], add_generation_prompt=True, tokenize=False)
            for s in sums]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in chat]


def _together(server, prompts):
    async def run():
        return await asyncio.gather(*[server.generate(p, dict(SAMPLE), request_id=str(i)) for i, p in enumerate(prompts)])

    return [o.token_ids for o in asyncio.run(run())]


def _one_by_one(server, prompts):
    return [asyncio.run(server.generate(p, dict(SAMPLE), request_id=str(i))).token_ids for i, p in enumerate(prompts)]


def _at_version(server, version):
    asyncio.run(server.set_global_steps(version))


# a group: 8 samples of one prompt, and a few other prompts, as verl's agent loop sends a step's requests
GROUP = ["3+4"] * 8 + ["1+1", "9+8", "5+0"] * 2


def test_a_requests_sample_does_not_depend_on_batching_or_history():
    server = _server()
    prompts = _prompts(server, GROUP)
    _at_version(server, 3)
    batched = _together(server, prompts)
    assert server._stats["batches"] < len(prompts)  # they were batched
    _at_version(server, 4)
    _together(server, prompts[:5])  # other draws in between: the server's history
    _at_version(server, 3)  # e.g. a resumed run, whose server starts at the checkpoint's weight version
    alone = _one_by_one(server, prompts)
    assert batched == alone
    fresh = _server()  # a new process: nothing generated before
    _at_version(fresh, 3)
    assert _together(fresh, prompts) == batched
    # the 8 samples of "3+4" are draws, not copies, and another version draws anew
    assert len({tuple(t) for t in batched[:8]}) > 1
    _at_version(fresh, 5)
    assert _together(fresh, prompts) != batched


def test_without_full_determinism_one_stream_serves_the_server():
    """The default (not reproducible): one stream per server, consumed in whatever order requests are decoded."""
    server = _server(full_determinism=False)
    prompts = _prompts(server, GROUP)
    first = _together(server, prompts)
    assert _together(server, prompts) != first  # the stream moved on
    assert not server._arrivals  # no per-request stream was made


def test_per_row_streams_draw_what_each_row_alone_would():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 11, generator=g)
    params = SamplingParams(max_tokens=1, temperature=0.8)
    seeds = [row_seed(i) for i in range(5)]
    tokens, log_probs = sample_step(logits, params, [torch.Generator().manual_seed(s) for s in seeds])
    for i, seed in enumerate(seeds):
        alone, alone_lp = sample_step(logits[i : i + 1], params, torch.Generator().manual_seed(seed))
        assert tokens[i] == alone[0]
        torch.testing.assert_close(log_probs[i], alone_lp[0])


@pytest.mark.parametrize("chunk_steps, max_elements", [(1, 1 << 22), (6, 1 << 22), (50, 1 << 22), (50, 100)])
def test_row_streams_draw_what_row_by_row_multinomial_draws(chunk_steps, max_elements):
    """The batched per-row sampler is torch.multinomial row by row, step after step (drawn ahead in
    chunks of 1, 6, all, and a capped buffer), with top-k zeros; so seeds give the responses they gave."""
    g = torch.Generator().manual_seed(3)
    steps, rows, vocab = 13, 7, 11
    probs = [process_logits(torch.randn(rows, vocab, generator=g) * 3, SamplingParams(1, top_k=5)).softmax(-1)
             for _ in range(steps)]
    seeds = [row_seed(i) for i in range(rows)]
    streams = RowStreams([torch.Generator().manual_seed(s) for s in seeds], chunk_steps, max_elements)
    reference = [torch.Generator().manual_seed(s) for s in seeds]
    for p in probs:
        expected = torch.cat([torch.multinomial(row, 1, generator=r) for row, r in zip(p, reference, strict=True)])
        assert torch.equal(streams.draw(p), expected)


def test_row_streams_refuse_invalid_probabilities_like_multinomial():
    streams = RowStreams([torch.Generator().manual_seed(0)])
    with pytest.raises(RuntimeError, match="inf, nan or element < 0"):
        streams.draw(torch.tensor([[0.5, float("nan")]]))


def test_row_seeds_are_the_same_in_every_process():
    """Not Python's hash(), which changes with PYTHONHASHSEED between processes (Ray workers, a relaunch)."""
    code = "from verl_cpu.rollout.sampling import row_seed; print(row_seed(7, 0, 3, [1, 2, 3], 1), hash('x'))"
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout.split() for seed in ("1", "2")]
    assert runs[0][0] == runs[1][0] == str(row_seed(7, 0, 3, [1, 2, 3], 1))
    assert runs[0][1] != runs[1][1]  # while hash() did change
    assert row_seed(7, 0, 3, [1, 2, 3], 1) != row_seed(7, 0, 3, [1, 2, 3], 2)
    assert 0 <= row_seed("anything") < 2**63


def test_nan_knob_poisons_the_first_log_prob_at_one_weight_version(monkeypatch):
    server = _server(monkeypatch, **{NAN_AT_VERSION_ENV: "2"})
    prompts = _prompts(server, ["3+4", "1+1"])

    async def log_probs():
        outs = await asyncio.gather(*[server.generate(p, dict(SAMPLE), request_id=str(i)) for i, p in enumerate(prompts)])
        return [o.log_probs for o in outs]

    _at_version(server, 1)
    assert all(math.isfinite(x) for lp in asyncio.run(log_probs()) for x in lp)
    _at_version(server, 2)
    for lp in asyncio.run(log_probs()):
        assert math.isnan(lp[0]) and all(math.isfinite(x) for x in lp[1:])


def test_submission_order_sorts_by_prompt_then_response():
    keys = ["b_1_0", "a_0_0", "b_0_0", "a_1_0", "c_0_0"]
    prompts = ["a", "b"]  # c was not submitted in this batch's order: it goes last
    responses = [[5, 1], [9], [4, 2], [3], [0]]
    order = submission_order(keys, prompts, responses)
    assert [keys[i] for i in order] == ["a_1_0", "a_0_0", "b_0_0", "b_1_0", "c_0_0"]
    # without responses: the sample number orders a prompt's samples
    assert [keys[i] for i in submission_order(keys, prompts)] == ["a_0_0", "a_1_0", "b_0_0", "b_1_0", "c_0_0"]
    # ties on the response fall back to the sample number
    assert submission_order(["a_1_0", "a_0_0"], ["a"], [[1], [1]]) == [1, 0]


@pytest.mark.parametrize("arrival", [[0, 1, 2, 3], [3, 1, 0, 2]])
def test_a_groups_batch_is_the_same_whichever_request_got_which_sample(arrival):
    """The server gives a group's k-th arriving request the k-th stream; sorting by response undoes the
    dependence on arrival order: the same keys/responses pairs come out in the same order."""
    draws = [[7, 1], [3], [7, 0], [2, 2]]  # the group's 4 streams' responses, by arrival rank
    keys = [f"u_{session}_0" for session in range(4)]
    responses = [None] * 4
    for rank, session in enumerate(arrival):
        responses[session] = draws[rank]
    order = submission_order(keys, ["u"], responses)
    assert [responses[i] for i in order] == sorted(draws)


def test_two_groups_of_one_prompt_keep_their_draws_however_their_requests_interleave():
    """verl sends request id det-<priority> under full_determinism: the stream is the group's, not the arrival's."""
    server = _server()
    prompt = _prompts(server, ["3+4"])[0]

    def arrive(order):
        async def run():
            return [(rid, (await server.generate(prompt, dict(SAMPLE), request_id=rid)).token_ids) for rid in order]

        _at_version(server, 1)  # a fresh weight version: nothing arrived yet
        out = asyncio.run(run())
        _at_version(server, 0)
        return {rid: sorted(t for r, t in out if r == rid) for rid in set(order)}

    grouped = arrive(["det-0"] * 4 + ["det-1"] * 4)
    assert arrive(["det-1", "det-0"] * 4) == grouped
    assert grouped["det-0"] != grouped["det-1"]


def test_the_manager_numbers_a_batchs_prompts(monkeypatch):
    from tensordict import TensorDict
    from verl.trainer.ppo.v1.agent_loop_tq import AgentLoopManagerTQ
    from verl_cpu.agent_loop import NumberedAgentLoopManagerTQ

    seen = []
    monkeypatch.setattr(AgentLoopManagerTQ, "generate_sequences", lambda self, prompts: seen.append(prompts))
    manager = object.__new__(NumberedAgentLoopManagerTQ)  # no Ray workers needed to number a batch
    manager.generate_sequences(TensorDict({"input_ids": torch.zeros(5, 3)}, batch_size=[5]))
    assert seen[0]["priority"].tolist() == [0, 1, 2, 3, 4]
    given = TensorDict({"input_ids": torch.zeros(2, 3), "priority": torch.tensor([7, 9])}, batch_size=[2])
    manager.generate_sequences(given)
    assert seen[1]["priority"].tolist() == [7, 9]  # a batch that has its own is left alone
