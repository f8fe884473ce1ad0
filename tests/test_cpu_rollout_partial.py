"""The hf rollout server as verl's off-policy trainers use it: abort/resume and atomic weight updates.

verl's fully-async trainer syncs weights in the middle of generation: it aborts every
request (``abort_all_requests``), loads the new weights, and resumes (``resume_generation``);
its ``FullyAsyncLLMServerClient`` resends an aborted request's prompt + partial response
(partial rollout). These tests drive :class:`HFRolloutServer` directly, as verl does.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from cpu_assets import tiny_assets

from verl_cpu.rollout.server import HFRolloutServer

LONG = 40  # tokens of a long decode (the tiny model's context is 64)


@pytest.fixture()
def server():
    from verl.workers.config import HFModelConfig, RolloutConfig

    config = RolloutConfig(name="hf", prompt_length=16, response_length=LONG, max_num_seqs=64)
    return HFRolloutServer(config, HFModelConfig(path=str(tiny_assets().model)), batch_wait_s=0.01)


@pytest.fixture()
def slow(server, monkeypatch):
    """Each decode step takes >= 10 ms, so an abort lands in the middle of a decode."""
    forward = server.model.forward

    def slow_forward(*args, **kwargs):
        time.sleep(0.01)
        return forward(*args, **kwargs)

    monkeypatch.setattr(server.model, "forward", slow_forward)
    return server


def _prompt(server, a=2, b=3):
    tokenizer = server.model_config.tokenizer
    text = tokenizer.apply_chat_template([{"role": "user", "content": f"{a}+{b}"}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


LONG_SAMPLING = {"temperature": 1.0, "logprobs": True, "ignore_eos": True, "max_tokens": LONG}


def _model_log_probs(model, prompt, tokens):
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)


def _model_with(state):
    """The tiny model with the weights ``state`` (a reference outside the server)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_assets().model), dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    model.load_state_dict(state)
    return model


async def _until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def test_abort_returns_the_partial_response_as_aborted(slow):
    prompt = _prompt(slow)

    async def run():
        task = asyncio.create_task(slow.generate(prompt, dict(LONG_SAMPLING), request_id="r0"))
        await _until(lambda: slow._decoding == 1)
        await asyncio.sleep(0.05)  # a few tokens in
        report = await slow.abort_all_requests()
        assert task.done(), "abort returned before the aborted request had its answer"
        return report, task.result()

    report, out = asyncio.run(run())
    assert report["aborted_count"] == 1 and report["request_ids"][0].startswith("r0")
    assert out.stop_reason == "aborted"
    assert 0 < len(out.token_ids) < LONG and len(out.log_probs) == len(out.token_ids)
    # the partial response is an ordinary prefix: its log-probs are the model's
    torch.testing.assert_close(torch.tensor(out.log_probs), _model_log_probs(slow.model, prompt, out.token_ids),
                               atol=1e-5, rtol=0)
    assert asyncio.run(slow.stats())["aborted"] == 1


def test_requests_after_an_abort_wait_for_resume_then_run_on_the_new_weights(server):
    prompt = _prompt(server)
    new_weights = [(k, v + 0.1) for k, v in server.model.state_dict().items()]

    async def run():
        await server.abort_all_requests()
        parked = asyncio.create_task(server.generate(prompt, {"temperature": 0.0, "max_tokens": 3, "ignore_eos": True},
                                                     request_id="p"))
        await asyncio.sleep(0.2)
        assert not parked.done(), "a request ran while the gate was closed"
        await server.update_weights_from_tensors(new_weights, last=True, global_steps=5)
        await server.resume_generation()
        return await asyncio.wait_for(parked, 10)

    out = asyncio.run(run())
    assert out.stop_reason == "completed" and len(out.token_ids) == 3
    assert out.extra_fields == {"global_steps": 5, "min_global_steps": 5, "max_global_steps": 5}


def test_reject_request_answers_aborted_at_once(server):
    async def run():
        await server.abort_all_requests(reject_request=True)
        out = await asyncio.wait_for(server.generate(_prompt(server), {"temperature": 0.0}, request_id="x"), 2)
        await server.resume_generation()
        again = await server.generate(_prompt(server), {"temperature": 0.0, "max_tokens": 2}, request_id="y")
        return out, again

    out, again = asyncio.run(run())
    assert out.stop_reason == "aborted" and out.token_ids == []
    assert again.stop_reason == "completed" and len(again.token_ids) == 2


def test_partial_rollout_resumed_like_verls_client_is_one_valid_response(slow):
    """What ``FullyAsyncLLMServerClient`` does: abort mid-decode, resend prompt + partial tokens."""
    prompt = _prompt(slow)

    async def run():
        first = asyncio.create_task(slow.generate(prompt, dict(LONG_SAMPLING), request_id="r"))
        await _until(lambda: slow._decoding == 1)
        await asyncio.sleep(0.05)
        await slow.abort_all_requests()
        await slow.resume_generation()
        head = first.result()
        rest = await slow.generate(prompt + head.token_ids, {**LONG_SAMPLING, "max_tokens": LONG - len(head.token_ids)},
                                   request_id="r")
        return head, rest

    head, rest = asyncio.run(run())
    tokens, log_probs = head.token_ids + rest.token_ids, head.log_probs + rest.log_probs
    assert head.stop_reason == "aborted" and rest.stop_reason == "completed" and len(tokens) == LONG
    torch.testing.assert_close(torch.tensor(log_probs), _model_log_probs(slow.model, prompt, tokens), atol=1e-5, rtol=0)


def test_a_weight_update_in_buckets_is_loaded_at_once_not_bucket_by_bucket(server):
    """A decode between two buckets of one update sees the old weights, never half of the new ones."""
    prompt = _prompt(server)
    old = {k: v.clone() for k, v in server.model.state_dict().items()}
    new = [(k, v + 0.05 * torch.randn_like(v)) for k, v in old.items()]
    half = len(new) // 2

    async def run():
        await server.update_weights_from_tensors(new[:half], last=False)
        between = await server.generate(prompt, {"temperature": 1.0, "max_tokens": 8, "ignore_eos": True},
                                         request_id="b")
        await server.update_weights_from_tensors(new[half:], last=True, global_steps=3)
        return between

    between = asyncio.run(run())
    assert between.extra_fields["global_steps"] is None  # decoded with the version before the update
    torch.testing.assert_close(torch.tensor(between.log_probs), _model_log_probs(_model_with(old), prompt, between.token_ids),
                               atol=1e-5, rtol=0)
    for name, tensor in new:
        torch.testing.assert_close(server.model.state_dict()[name], tensor)


def test_a_weight_update_waits_for_the_running_decode(slow):
    """The update that arrives mid-decode is loaded after it: every token of the response has the old weights."""
    prompt = _prompt(slow)
    old = {k: v.clone() for k, v in slow.model.state_dict().items()}
    new = [(k, v + 0.1) for k, v in old.items()]

    async def run():
        task = asyncio.create_task(slow.generate(prompt, dict(LONG_SAMPLING), request_id="d"))
        await _until(lambda: slow._decoding == 1)
        await slow.update_weights_from_tensors(new, last=True, global_steps=1)
        return await task

    out = asyncio.run(run())
    assert out.stop_reason == "completed" and len(out.token_ids) == LONG
    assert out.extra_fields["global_steps"] is None
    torch.testing.assert_close(torch.tensor(out.log_probs), _model_log_probs(_model_with(old), prompt, out.token_ids),
                               atol=1e-5, rtol=0)


def test_a_request_still_queued_at_the_abort_is_not_aborted_but_decoded_after_the_sync(slow):
    """It has no token yet: it waits for resume_generation and runs on the new weights (never an empty abort)."""
    prompt = _prompt(slow)
    new = [(k, v + 0.1) for k, v in slow.model.state_dict().items()]

    async def run():
        running = asyncio.create_task(slow.generate(prompt, dict(LONG_SAMPLING), request_id="running"))
        await _until(lambda: slow._decoding == 1)
        queued = asyncio.create_task(slow.generate(prompt, {"temperature": 0.0, "max_tokens": 4, "ignore_eos": True},
                                                   request_id="queued"))
        await asyncio.sleep(0.05)
        report = await slow.abort_all_requests()
        await slow.update_weights_from_tensors(new, last=True, global_steps=9)
        assert not queued.done()
        await slow.resume_generation()
        return report, await running, await asyncio.wait_for(queued, 10)

    report, running, queued = asyncio.run(run())
    assert [i.split("#")[0] for i in report["request_ids"]] == ["running"] and running.stop_reason == "aborted"
    assert queued.stop_reason == "completed" and len(queued.token_ids) == 4
    assert queued.extra_fields["global_steps"] == 9
