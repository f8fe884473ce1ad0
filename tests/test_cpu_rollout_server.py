"""The HF rollout server of patches/verl_cpu, used directly (no Ray): sampling, batching, weights, timers;
its replay buffer; and a smoke run of ``bench --rollout`` (Ray, verl's agent loop, the server)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from cpu_assets import REPO_ROOT, tiny_assets
from verl_cpu.rollout.sampling import SamplingParams, process_logits, resolve_sampling_params, sample_step
from verl_cpu.rollout.server import HFRolloutServer, weights_checksum

# ----------------------------------------------------------------------------- sampling


def test_resolve_sampling_params_follows_verl_and_vllm_defaults():
    params = resolve_sampling_params(
        {"temperature": 0.7, "top_p": 0.9, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True},
        prompt_len=10,
        prompt_length=12,
        response_length=8,
    )
    assert params == SamplingParams(max_tokens=8, temperature=0.7, top_p=0.9, top_k=-1, return_logprobs=True)
    # the remaining context caps max_tokens like verl's vLLM server; an explicit max_tokens wins
    assert resolve_sampling_params({}, prompt_len=15, prompt_length=12, response_length=8).max_tokens == 5
    assert resolve_sampling_params({"max_tokens": 3}, prompt_len=1, prompt_length=12, response_length=8).max_tokens == 3


def test_repetition_penalty_is_refused_not_ignored():
    with pytest.raises(NotImplementedError, match="repetition_penalty"):
        resolve_sampling_params({"repetition_penalty": 1.1}, prompt_len=1, prompt_length=4, response_length=4)


def test_top_k_and_top_p_filter_and_renormalise():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
    top2 = process_logits(logits, SamplingParams(max_tokens=1, top_k=2))
    assert torch.isinf(top2[0, 2:]).all() and torch.isfinite(top2[0, :2]).all()
    # top_p keeps the smallest prefix whose mass reaches p (here the first two tokens: 0.665 + 0.245)
    nucleus = process_logits(logits, SamplingParams(max_tokens=1, top_p=0.8))
    assert torch.isfinite(nucleus[0, :2]).all() and torch.isinf(nucleus[0, 2:]).all()
    tokens, logp = sample_step(logits.repeat(500, 1), SamplingParams(max_tokens=1, top_k=2), torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {0, 1}
    expected = torch.log_softmax(torch.tensor([3.0, 2.0]), -1)
    torch.testing.assert_close(logp[tokens == 0][0], expected[0])
    torch.testing.assert_close(logp[tokens == 1][0], expected[1])


def test_temperature_zero_is_greedy_with_raw_log_probs():
    logits = torch.tensor([[0.0, 2.0, 1.0]])
    tokens, logp = sample_step(logits, SamplingParams(max_tokens=1, temperature=0.0))
    assert tokens.tolist() == [1]
    torch.testing.assert_close(logp, torch.log_softmax(logits, -1)[:, 1])


def test_temperature_scales_the_returned_log_probs():
    logits = torch.tensor([[0.0, 2.0, 1.0]])
    tokens, logp = sample_step(logits, SamplingParams(max_tokens=1, temperature=2.0), torch.Generator().manual_seed(1))
    torch.testing.assert_close(logp, torch.log_softmax(logits / 2.0, -1)[0, tokens])


# ----------------------------------------------------------------------------- server


@pytest.fixture(scope="module")
def server():
    from verl.workers.config import HFModelConfig, RolloutConfig

    assets = tiny_assets()
    config = RolloutConfig(name="hf", prompt_length=32, response_length=4, max_num_seqs=64)
    model_config = HFModelConfig(path=str(assets.model))
    return HFRolloutServer(config, model_config, batch_wait_s=0.05)


def _prompts(server, pairs):
    tokenizer = server.model_config.tokenizer
    return [
        tokenizer(
            tokenizer.apply_chat_template([{"role": "user", "content": f"{a}+{b}"}], add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        )["input_ids"]
        for a, b in pairs
    ]


def _generate_all(server, prompts, sampling_params):
    async def run():
        return await asyncio.gather(
            *[server.generate(p, dict(sampling_params), request_id=str(i)) for i, p in enumerate(prompts)]
        )

    return asyncio.run(run())


def test_concurrent_requests_are_batched_and_match_one_at_a_time(server):
    prompts = _prompts(server, [(a, (3 * a) % 10) for a in range(10)])
    greedy = {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "logprobs": True}
    before = asyncio.run(server.stats())
    together = _generate_all(server, prompts, greedy)
    after = asyncio.run(server.stats())
    assert after["requests"] - before["requests"] == len(prompts)
    assert after["batches"] - before["batches"] < len(prompts), "concurrent requests were decoded one by one"
    alone = [_generate_all(server, [p], greedy)[0] for p in prompts]
    for a, b in zip(together, alone, strict=True):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.log_probs), torch.tensor(b.log_probs), atol=1e-5, rtol=0)
        assert a.stop_reason == "completed" and len(a.token_ids) <= 4


def test_log_probs_equal_a_full_forward_of_the_model(server):
    """What verl's actor recomputes as old_log_prob (temperature 1, no top-k/top-p)."""
    prompts = _prompts(server, [(1, 2), (9, 9), (4, 0)])
    outputs = _generate_all(server, prompts, {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "logprobs": True})
    for prompt, out in zip(prompts, outputs, strict=True):
        ids = torch.tensor([prompt + out.token_ids])
        with torch.no_grad():
            logits = server.model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(out.token_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(out.log_probs), expected, atol=1e-5, rtol=0)


def test_responses_stop_at_eos_and_respect_max_tokens(server):
    prompts = _prompts(server, [(2, 3)])
    out = _generate_all(server, prompts, {"temperature": 1.0, "max_tokens": 2, "logprobs": False})[0]
    assert 1 <= len(out.token_ids) <= 2 and out.log_probs is None
    eos = server.eos_token_ids
    for out in _generate_all(server, prompts * 8, {"temperature": 1.0, "logprobs": True}):
        assert all(t not in eos for t in out.token_ids[:-1])


def test_update_weights_moves_the_weights_into_the_model(server):
    original = {k: v.clone() for k, v in server.model.state_dict().items()}
    prompts = _prompts(server, [(5, 5), (6, 1)])
    greedy = {"temperature": 0.0, "logprobs": True}
    before = _generate_all(server, prompts, greedy)
    try:
        perturbed = [(name, tensor + 0.5 * torch.randn_like(tensor)) for name, tensor in original.items()]
        half = len(perturbed) // 2
        asyncio.run(server.update_weights_from_tensors(perturbed[:half], last=False))
        result = asyncio.run(server.update_weights_from_tensors(perturbed[half:], last=True, global_steps=7))
        for name, tensor in perturbed:
            torch.testing.assert_close(server.model.state_dict()[name], tensor)
        assert result["global_steps"] == 7 and result["checksum"] == pytest.approx(weights_checksum(server.model))
        after = _generate_all(server, prompts, greedy)
        assert [o.extra_fields["global_steps"] for o in after] == [7, 7]
        assert [o.log_probs for o in after] != [o.log_probs for o in before]
    finally:
        asyncio.run(server.update_weights_from_tensors(list(original.items()), last=True, global_steps=None))


def test_incomplete_or_unknown_weights_are_errors(server):
    state = list(server.model.state_dict().items())
    with pytest.raises(KeyError, match="did not include"):
        asyncio.run(server.update_weights_from_tensors(state[:-1], last=True))
    with pytest.raises(KeyError, match="not in the rollout model"):
        asyncio.run(server.update_weights_from_tensors([("no.such.weight", torch.zeros(1))], last=True))
    asyncio.run(server.update_weights_from_tensors(state, last=True))  # leaves the server consistent


def test_logprob_noise_simulates_a_mismatched_engine(monkeypatch):
    """VERL_CPU_LOGPROB_NOISE_STD perturbs the reported log-probs only: same tokens, noisy log-probs."""
    from verl.workers.config import HFModelConfig, RolloutConfig

    from verl_cpu.rollout.server import NOISE_ENV

    assets = tiny_assets()
    config = RolloutConfig(name="hf", prompt_length=32, response_length=4, max_num_seqs=64)
    model_config = HFModelConfig(path=str(assets.model))
    clean = HFRolloutServer(config, model_config, batch_wait_s=0.0)
    monkeypatch.setenv(NOISE_ENV, "0.05")
    noisy = HFRolloutServer(config, model_config, batch_wait_s=0.0)
    prompts = _prompts(clean, [(a, (7 * a) % 10) for a in range(10)] * 8)
    params = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "logprobs": True, "seed": 3}
    diffs = []
    for a, b in zip(_generate_all(clean, prompts, params), _generate_all(noisy, prompts, params), strict=True):
        assert a.token_ids == b.token_ids  # sampling is untouched
        diffs += (torch.tensor(b.log_probs) - torch.tensor(a.log_probs)).tolist()
    diffs = torch.tensor(diffs)
    assert abs(diffs.mean().item()) < 0.02 and 0.035 < diffs.std().item() < 0.065


def _server(monkeypatch, **env):
    from verl.workers.config import HFModelConfig, RolloutConfig

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    config = RolloutConfig(name="hf", prompt_length=32, response_length=4, max_num_seqs=64)
    return HFRolloutServer(config, HFModelConfig(path=str(tiny_assets().model)), batch_wait_s=0.0)


def test_contaminated_logprob_noise_has_the_mixture_distribution(monkeypatch):
    """sd 0.02 with probability 0.98, sd 0.5 with probability 0.02: variance 0.98 * 0.02^2 + 0.02 * 0.5^2."""
    from verl_cpu.rollout.server import NOISE_ENV, SPIKE_RATE_ENV, SPIKE_STD_ENV

    server = _server(monkeypatch, **{NOISE_ENV: "0.02", SPIKE_STD_ENV: "0.5", SPIKE_RATE_ENV: "0.02"})
    noise = server._noise((400_000,)).double()
    assert noise.std().item() == pytest.approx((0.98 * 0.02**2 + 0.02 * 0.5**2) ** 0.5, rel=0.03)
    # |noise| > 0.2 comes from the spikes only: 0.02 * P(|N(0, 0.5^2)| > 0.2) = 0.02 * 0.6892
    assert (noise.abs() > 0.2).double().mean().item() == pytest.approx(0.02 * 0.6892, rel=0.08)
    assert torch.equal(_server(monkeypatch, **{NOISE_ENV: "0", SPIKE_RATE_ENV: "0"})._noise((5,)), torch.zeros(5))
    with pytest.raises(ValueError, match=SPIKE_RATE_ENV):
        _server(monkeypatch, **{SPIKE_RATE_ENV: "1.5"})


def test_bf16_server_samples_and_reports_as_a_bf16_engine(monkeypatch):
    """VERL_CPU_ROLLOUT_DTYPE=bfloat16: the reported log-probs are those of the bf16 weights (in fp32, up to
    the rounding of a bf16 KV cache), which differ from the fp32 trainer's by the rounding of bf16, not more;
    weight syncs keep the bf16 copy."""
    from verl_cpu.rollout.server import DTYPE_ENV

    fp32 = _server(monkeypatch)
    server = _server(monkeypatch, **{DTYPE_ENV: "bfloat16"})
    assert all(p.dtype == torch.bfloat16 for p in server.model.parameters())
    asyncio.run(server.update_weights_from_tensors(list(fp32.model.state_dict().items()), last=True))
    assert all(p.dtype == torch.bfloat16 for p in server.model.parameters())
    prompts = _prompts(server, [(a, (3 * a) % 10) for a in range(10)])
    outputs = _generate_all(server, prompts, {"temperature": 1.0, "logprobs": True, "ignore_eos": True, "seed": 1})
    gaps, same_engine = [], []
    for prompt, out in zip(prompts, outputs, strict=True):
        ids = torch.tensor([prompt + out.token_ids])
        with torch.no_grad():
            bf16_logits = server.model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
            fp32_logits = fp32.model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
        target = torch.tensor(out.token_ids)[:, None]
        expected = torch.log_softmax(bf16_logits, -1).gather(-1, target).squeeze(-1)
        same_engine += (torch.tensor(out.log_probs) - expected).tolist()
        gaps += (torch.tensor(out.log_probs) - torch.log_softmax(fp32_logits, -1).gather(-1, target).squeeze(-1)).tolist()
    gaps, same_engine = torch.tensor(gaps).abs(), torch.tensor(same_engine).abs()
    # Decoding with a bf16 KV cache rounds differently from one bf16 forward over the whole sequence (as a
    # vLLM engine differs from its own prefill): measured mean 6.6e-5, max 2.2e-3 here (one token of 40), against
    # mean 2.6e-3, max 3.3e-2 from the fp32 forward. The engine reports the bf16 model's log-probs: within
    # bf16's resolution of them (2^-8 of a logit of order 1) and far closer to them than to the fp32 ones.
    assert same_engine.max().item() < 2**-7 and same_engine.mean().item() < gaps.mean().item() / 10
    assert gaps.mean().item() > 1e-3 and gaps.max().item() < 0.5  # a real, bf16-sized mismatch (measured 0.005, 0.04)
    with pytest.raises(ValueError, match=DTYPE_ENV):
        _server(monkeypatch, **{DTYPE_ENV: "float16"})


def test_ignore_eos_returns_every_token_like_vllm(server):
    prompts = _prompts(server, [(2, 3), (4, 4)])
    outputs = _generate_all(server, prompts, {"temperature": 1.0, "logprobs": True, "ignore_eos": True, "seed": 5})
    for prompt, out in zip(prompts, outputs, strict=True):
        assert len(out.token_ids) == len(out.log_probs) == 4  # response_length, EOS or not
        ids = torch.tensor([prompt + out.token_ids])  # and the log-probs are still the model's
        with torch.no_grad():
            logits = server.model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(out.token_ids)[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(out.log_probs), expected, atol=1e-5, rtol=0)


def test_stats_time_the_decoding_and_the_queue(server):
    prompts = _prompts(server, [(a, a) for a in range(6)])
    before = asyncio.run(server.stats())
    start = time.perf_counter()
    _generate_all(server, prompts, {"temperature": 0.0, "logprobs": True})
    wall = time.perf_counter() - start
    after = asyncio.run(server.stats())
    batches = after["batches"] - before["batches"]
    decode = after["decode_s"] - before["decode_s"]
    queue = after["queue_s"] - before["queue_s"]
    assert batches >= 1 and 0 < decode <= wall
    # each request waits at least the batching window (0.05 s here), at most the whole call
    assert len(prompts) * server.batch_wait_s * 0.9 <= queue <= len(prompts) * wall
    assert 1 <= after["new_tokens"] - before["new_tokens"] <= 4 * batches
    assert after["torch_threads"] == torch.get_num_threads()


def test_a_batch_closes_one_quiet_gap_after_its_last_request(server, monkeypatch):
    """Requests at 0, 0.2 and 0.45 s with a 0.4 s gap form one batch, whose decode starts 0.4 s after the
    last arrival (a poll every 0.4 s, the rule before, started it at 1.2 s: 0.75 s after the last)."""
    monkeypatch.setattr(server, "batch_wait_s", 0.4)
    prompts = _prompts(server, [(1, 2), (3, 4), (5, 6)])
    arrivals = []

    async def run():
        tasks = []
        for prompt, at in zip(prompts, (0.0, 0.2, 0.45), strict=True):
            await asyncio.sleep(at - (time.time() - arrivals[0]) if arrivals else 0.0)
            arrivals.append(time.time())
            tasks.append(asyncio.create_task(server.generate(prompt, {"temperature": 0.0}, request_id=str(at))))
            await asyncio.sleep(0)  # let it reach the queue
        await asyncio.gather(*tasks)

    before = asyncio.run(server.stats())
    asyncio.run(run())
    after = asyncio.run(server.stats())
    assert after["batches"] - before["batches"] == 1
    # queue_s sums each request's wait from its arrival to the decode's start: solve for the start
    start = (after["queue_s"] - before["queue_s"] + sum(arrivals)) / len(arrivals)
    assert 0.38 <= start - arrivals[-1] < 0.6, start - arrivals[-1]


def test_drain_waits_for_requests_still_in_the_batching_window(server):
    prompts = _prompts(server, [(1, 1), (2, 2), (3, 3)])

    async def run():
        tasks = [asyncio.create_task(server.generate(p, {"temperature": 0.0}, request_id=str(i)))
                 for i, p in enumerate(prompts)]
        await asyncio.sleep(0.01)  # received; the batcher holds them while it waits for a quiet gap
        await server.wait_for_requests_to_drain()
        assert all(task.done() for task in tasks)
        await asyncio.gather(*tasks)

    asyncio.run(run())


# ----------------------------------------------------------------------------- replay buffer


def test_the_polling_replay_buffer_takes_its_interval_from_sampler_kwargs():
    from verl_cpu.replay_buffer import DEFAULT_POLL_INTERVAL, PollingReplayBuffer, poll_interval_of

    def make(sampler_kwargs):
        return PollingReplayBuffer(
            trainer_mode="sync",
            trainer_config={},
            max_off_policy_threshold=None,
            max_off_policy_strategy="drop",
            sampler_kwargs=sampler_kwargs,
        )

    assert make({"poll_interval": 0.01}).poll_interval == 0.01
    assert make({}).poll_interval == DEFAULT_POLL_INTERVAL == 0.05
    for bad in ("soon", 0, -1, None, float("nan")):
        with pytest.raises(ValueError, match="sampler_kwargs.poll_interval must be a positive number"):
            poll_interval_of({"poll_interval": bad})


# ----------------------------------------------------------------------------- bench --rollout


def test_bench_rollout_prints_its_ratio_last():
    """Smoke: verl's agent loop through an hf server against model.generate, 2 prompts x 2 samples."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "patches" / "verl_cpu"),
                                                         os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "hmpo_verl.lab.bench", "--rollout", "--task", "addition", "--repeats", "1",
         "--", "data.train_batch_size=2", "actor_rollout_ref.rollout.n=2"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert "2 prompts x n=2 = 4 responses" in result.stdout
    assert "4 requests" in result.stdout  # the server saw every request of the step
    match = re.fullmatch(r"rollout/floor ratio: (\d+\.\d+)", lines[-1])
    assert match and float(match.group(1)) > 0, lines[-1]
